"""Latency-aware planning: skip factorisations that are not faster on this machine.

`plan --target cpu|cuda` times every chosen layer's dense node against its factorised replacement
(`passes/factorize.py`'s `emit`, with random factors of the planned rank: timing does not depend on
the values) at the layer's input shape, both followed by the nodes ONNX Runtime would fuse into the
dense node (`bench.layers.epilogue`: constant bias/scale, batch norm, activation), and turns a layer
that is not faster into a skip with the measured times as its reason. Timings are cached per machine
(CPU model, core count, onnxruntime version, provider, threads), so planning the same model again, or
another model with the same layer shapes, measures nothing. The same timer (`LayerTimer`) serves the
time-priced sensitivity allocation, which times each layer at many ranks (`rank_times`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from onnx import helper, numpy_helper
from tqdm import tqdm

from onnx_inher import _env
from onnx_inher.bench.layers import (
    LayerGraph,
    build,
    dense_graph,
    epilogue,
    fold,
    static_input_shape,
    time_pair,
)
from onnx_inher.bench.profile import shape_table
from onnx_inher.bench.sessions import Settings
from onnx_inher.errors import InputError
from onnx_inher.ir.graph import GraphIndex, index_scopes
from onnx_inher.ir.io import write_text
from onnx_inher.ir.layers import KERNEL_UP, LayerView, oriented
from onnx_inher.ir.shapes import check_shapes, shape_symbols
from onnx_inher.planning.plan import Candidate, Plan
from onnx_inher.planning.svd import Factors
from onnx_inher.progress import Heartbeat
from onnx_inher.runtime import machine_info, sample_inputs

FORMAT = "onnx-inher-latency/1"
TARGETS = ("cpu", "cuda")
WARMUP, ITERS = 5, 30


def cache_root() -> Path:
    return _env.cache_root() / "latency"


def machine_key(settings: Settings) -> tuple[str, dict[str, Any]]:
    info = machine_info(settings.provider)
    ident = {k: info[k] for k in ("cpu", "cores", "onnxruntime")}
    ident.update(provider=settings.provider, threads=settings.threads,
                 spinning=settings.session_config(),  # timings taken with other spinning are not these
                 weights="negligible flushed")  # dense layers timed with the teacher's near-dead weights were slow
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16], ident


@dataclass
class LatencyCache:
    """`{layer key: [dense ms, factorised ms]}` in one JSON file per machine fingerprint."""

    path: Path
    machine: dict[str, Any]
    entries: dict[str, list[float]]

    @classmethod
    def open(cls, settings: Settings, root: Path | None = None) -> LatencyCache:
        key, ident = machine_key(settings)
        path = (root or cache_root()) / f"{key}.json"
        entries: dict[str, list[float]] = {}
        if path.is_file():
            try:
                doc = json.loads(path.read_text())
                if doc.get("format") == FORMAT:
                    entries = {k: [float(a), float(b)] for k, (a, b) in doc["entries"].items()}
            except (ValueError, KeyError, TypeError):
                entries = {}  # a corrupt cache is re-measured, never trusted
        return cls(path, ident, entries)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"format": FORMAT, "machine": self.machine, "entries": dict(sorted(self.entries.items()))}
        write_text(self.path, json.dumps(doc, indent=1) + "\n")


def layer_key(view: LayerView, node_attrs: list[Any], x_shape: tuple[int, ...], rank: int, heads: int,
              head_form: str | None = None, tail: list[Any] | None = None, fold: dict[str, int] | None = None) -> str:
    """The cache key of one layer's timing; the default head form, an empty epilogue and no fold add
    nothing, so older entries of layers without one stay valid."""
    doc = [view.op, view.side, view.groups, list(view.weight.shape), str(view.dtype), view.bias is not None,
           sorted((a.name, str(helper.get_attribute_value(a))) for a in node_attrs), list(x_shape), rank, heads,
           sorted((k, str(v)) for k, v in view.attrs.items() if k in ("alpha", "beta", "transA", "transB", "c"))]
    if heads > 1 and head_form not in (None, "mix"):
        doc.append(["head_form", head_form])
    if tail:
        doc.append(["epilogue", [[n.op_type, sorted((a.name, str(helper.get_attribute_value(a))) for a in n.attribute)]
                                 for n in tail]])
    if fold:
        doc.append(["fold", int(fold["parts"])])  # the rows are the input shape's
    if view.kernel_up:
        doc.append(["orientation", KERNEL_UP])
    return hashlib.sha256(json.dumps(doc).encode()).hexdigest()[:24]


def replacement_graph(view: LayerView, model: Any, index: GraphIndex, cand: Candidate, dense: LayerGraph,
                      opset: int, tail: list[Any] | None = None) -> LayerGraph:
    """The factorised replacement as `compress` would emit it, with random factors of the planned rank,
    followed by `tail` (the layer's `epilogue`, as in `dense`)."""
    from onnx_inher.passes.factorize import emit

    rank = int(cand.rank or 1)
    rng = np.random.default_rng(0)
    g, o, i = view.groups, *view.matrix_dims
    kept = len(cand.dense_classes or [])  # a class-split head: k dense columns, the other o - k at rank r
    f = Factors(up=(rng.standard_normal((g, o - kept, rank)) * 0.05).astype(np.float32),
                down=(rng.standard_normal((g, rank, i)) * 0.05).astype(np.float32))
    columns = (rng.standard_normal((i, kept)) * 0.05).astype(np.float32) if cand.dense_classes is not None else None
    node = index.graph.node[view.node_index]  # `index` is the index of the layer's own (sub)graph
    e = emit(view, node, cand, f, opset, 0, view.node, columns)
    tail = tail or []
    consts = {k: numpy_helper.to_array(t) for k, t in e.inits.items()}
    originals = fold([i for n in [node, *tail] for i in n.input], index)
    consts.update({k: v for k, v in originals.items() if k not in consts})
    return build([*e.nodes, *tail], consts, dense.x, dense.x_shape,
                 dense.model.graph.input[0].type.tensor_type.elem_type, tail[-1].output[0] if tail else view.output,
                 model)


def plan_dims(model: Any, dims: dict[str, int], shapes: dict[str, list[int]] | None = None) -> dict[str, int]:
    """The plan's shape basis: `--dim` values and the named dims `--shape` fixes, every other named dim 1
    (as the plan's FLOP counts)."""
    out = shape_symbols(model, check_shapes(model, shapes or {}), dims)
    for inp in model.graph.input:
        for d in inp.type.tensor_type.shape.dim:
            if d.dim_param:
                out.setdefault(d.dim_param, 1)
    return out


class LayerTimer:
    """Times factorised layers of a plan alone, each at its input shape and at a chosen rank, through the
    per-machine cache: the model's shapes are found once, however many layers and ranks are timed."""

    def __init__(self, plan: Plan, model: Any, settings: Settings, cache_dir: Path | None = None,
                 warmup: int = WARMUP, iters: int = ITERS) -> None:
        self.cache = LatencyCache.open(settings, cache_dir)
        self.plan, self.model, self.settings, self.warmup, self.iters = plan, model, settings, warmup, iters
        self.indexes = index_scopes(model.graph)  # a subgraph layer's node and weights are found in its own scope
        basis = plan_dims(model, plan.options.dims, plan.options.shapes)
        self.table = shape_table(Path(plan.model), model, sample_inputs(model, basis, shapes=plan.options.shapes))
        self.measured = 0  # timings taken now (not read from the cache)

    def node(self, view: LayerView) -> tuple[GraphIndex, Any]:
        """The index of the layer's own (sub)graph and its dense node."""
        index = self.indexes[view.scope]
        return index, index.graph.node[view.node_index]

    def __call__(self, c: Candidate, view: LayerView, rank: int | None = None) -> tuple[float, float, str] | None:
        """(dense ms, factorised ms, where) of `c` at `rank` (its planned rank by default); None when the
        layer's input shape is unknown or it cannot be built alone."""
        index, node = self.node(view)
        x_shape = static_input_shape(node, index, self.table)
        if x_shape is None:
            return None
        view = oriented(view, c.orientation)
        if rank is not None and rank != c.rank:
            c = replace(c, rank=rank)
        tail = epilogue(node, index)
        form = c.head_form if c.dense_classes is None else f"split:{len(c.dense_classes)}"
        key = layer_key(view, list(node.attribute), x_shape, int(c.rank or 1), c.heads, form, tail, c.fold)
        if key not in self.cache.entries:
            dense = dense_graph(view, self.model, index, x_shape, tail)
            if dense is None:
                return None
            fact = replacement_graph(view, self.model, index, c, dense, self.plan.opset, tail)
            self.cache.entries[key] = list(time_pair(dense, fact, self.settings, self.warmup, self.iters))
            self.measured += 1
        d_ms, f_ms = self.cache.entries[key]
        return d_ms, f_ms, f"input {'x'.join(map(str, x_shape))}"


def static_rows(timer: LayerTimer, views: dict[str, LayerView], nodes: set[str]) -> dict[str, int]:
    """`{node: rows}` of the Conv layers among `nodes` whose input rows (first spatial axis) are the same
    at the plan's shapes and with every free input dim d made 2d + 1: rows a folded form may hard-code.
    (Shape inference alone leaves them unknown behind a Pad or Reshape whose sizes are computed.) The
    change is d + 1, not 1, because strides absorb a small one: a stride-2 conv gives 12 rows from 25
    input rows and from 26, and 13 from 27. A layer whose rows fold has at least 2 rows per part, so its
    total stride on the axis is below d + 1 and a change of d + 1 reaches it. The shapes at the plan's are
    the `timer`'s (the layers are timed with it next), so only the wider ones are inferred here."""
    plan, model = timer.plan, timer.model
    feed = sample_inputs(model, plan_dims(model, plan.options.dims, plan.options.shapes), shapes=plan.options.shapes)
    declared = {i.name: [bool(d.dim_param) or not d.HasField("dim_value") for d in i.type.tensor_type.shape.dim]
                for i in model.graph.input}
    wider = {k: [2 * d + 1 if k in declared and j < len(declared[k]) and declared[k][j] else d
                 for j, d in enumerate(v.shape)] for k, v in feed.items()}
    try:
        second = shape_table(Path(plan.model), model, sample_inputs(model, shapes=wider))
    except Exception:  # a model that rejects the wider shapes proves nothing static: no fold
        return {}
    out: dict[str, int] = {}
    for n in sorted(nodes):
        index, node = timer.node(views[n])
        a, b = static_input_shape(node, index, timer.table), static_input_shape(node, index, second)
        if a is not None and b is not None and len(a) >= 3 and a[2] == b[2]:
            out[n] = int(a[2])
    return out


FOLD_MARGIN = 0.9  # a folded down conv must measure 10% faster alone than the unfolded one


def foldable(timer: LayerTimer, views: dict[str, LayerView], cands: list[Candidate],
             parts: int) -> dict[str, dict[str, int]]:
    """`{node: fold}` of the conv candidates whose down conv can be folded into `parts` (`passes/factorize.py`):
    the k x k kernel on the down side (a `kernel_up` pair's is a 1x1 conv, and its k x k conv has C_out outputs),
    explicit pads, rows fixed in the model (`static_rows`), output rows that split into equal parts."""
    from onnx_inher.passes.factorize import fold_applies, fold_bounds

    if parts < 2:
        return {}
    convs = [c for c in cands if c.dense_classes is None and c.orientation is None and c.node in views
             and views[c.node].op == "Conv" and fold_applies(timer.node(views[c.node])[1], timer.plan.opset)]
    rows = static_rows(timer, views, {c.node for c in convs}) if convs else {}
    return {c.node: {"parts": parts, "rows": rows[c.node]} for c in convs if c.node in rows and fold_bounds(
        timer.node(views[c.node])[1], int(views[c.node].kernel[0]), rows[c.node], parts) is not None}


def fold_pays(plain: tuple[float, float], folded: tuple[float, float]) -> bool:
    """Whether a folded layer (dense ms, factorised ms) beats the unfolded one by `FOLD_MARGIN`, each paired
    with its own dense run. The margin, because the copies a fold adds are not all in the layer timed alone."""
    return folded[1] / folded[0] < FOLD_MARGIN * plain[1] / plain[0]


def layer_times(plan: Plan, model: Any, views: dict[str, LayerView], settings: Settings,
                cache_dir: Path | None = None, warmup: int = WARMUP, iters: int = ITERS,
                nodes: set[str] | None = None, desc: str = "timing layers",
                timer: LayerTimer | None = None) -> dict[str, tuple[float, float, str]]:
    """`{node: (dense ms, factorised ms, where)}` of the plan's factorised layers (or of `nodes`), each
    timed alone at its input shape, through the per-machine cache. Layers whose input shape is unknown
    (or that cannot be built alone) are left out. Callers that time the same model several ways (forms,
    folds) pass one `timer`, so its shapes are found once."""
    timer = timer or LayerTimer(plan, model, settings, cache_dir, warmup, iters)
    chosen = [c for c in plan.candidates if c.decision == "factorize" and c.node in views
              and (nodes is None or c.node in nodes)]
    out: dict[str, tuple[float, float, str]] = {}
    for c in tqdm(chosen, desc=desc, unit="layer", disable=_env.progress_disabled(), leave=False):
        timed = timer(c, views[c.node])
        if timed is not None:
            out[c.node] = timed
    timer.cache.save()
    return out


@dataclass
class RankTimes:
    """One layer timed alone at several ranks: the dense layer's ms (median over its runs), rank -> ms, and
    the ranks whose ms is that of the folded down conv (the latency check folds them: `fold_pays`)."""

    dense_ms: float
    ms: dict[int, float]
    where: str
    folded: set[int] = field(default_factory=set)
    timings: int = 0  # timings looked up for this layer (cached or taken now), folded ones included


def rank_times(plan: Plan, model: Any, views: dict[str, LayerView], settings: Settings,
               grids: dict[str, list[int]], cache_dir: Path | None = None,
               desc: str = "timing ranks") -> tuple[dict[str, RankTimes], int]:
    """Each layer of `grids` timed alone at every rank of its grid (through the cache); returns the times of
    the layers that could be timed and how many timings were taken now. On several threads a layer whose
    down conv can fold is timed folded too, and a rank is priced folded where the fold pays: the check will
    fold it (on 2 threads CREPE's conv2 runs 4.1 ms at rank 80, and 3.4 ms at rank 64 folded)."""
    timer = LayerTimer(plan, model, settings, cache_dir)
    by_node = {c.node: c for c in plan.candidates if c.node in grids and c.node in views}
    folds = foldable(timer, views, list(by_node.values()), settings.threads)
    todo = [(n, r, f) for n in sorted(by_node) for r in grids[n] for f in ([None, folds[n]] if n in folds else [None])]
    dense: dict[str, list[float]] = {}
    out: dict[str, RankTimes] = {}
    plain: dict[tuple[str, int], tuple[float, float]] = {}
    beat = Heartbeat(desc, len(todo), "timing")
    for done, (n, r, folded_as) in enumerate(tqdm(todo, desc=desc, unit="timing",
                                                  disable=_env.progress_disabled(), leave=False)):
        beat.tick(done)
        if folded_as and (n, r) not in plain:
            continue  # the unfolded layer could not be timed
        timed = timer(replace(by_node[n], fold=folded_as), views[n], r)
        if timed is None:
            continue
        dense.setdefault(n, []).append(timed[0])
        t = out.setdefault(n, RankTimes(0.0, {}, timed[2]))
        t.timings += 1
        if folded_as is None:
            plain[(n, r)] = timed[:2]
            t.ms[r] = timed[1]
        elif fold_pays(plain[(n, r)], timed[:2]):
            t.ms[r] = timed[1]
            t.folded.add(r)
    for n, t in out.items():
        t.dense_ms = float(np.median(dense[n]))
    timer.cache.save()
    return out, timer.measured


def apply_target(plan: Plan, model: Any, views: dict[str, LayerView], target: str,
                 cache_dir: Path | None = None, warmup: int = WARMUP, iters: int = ITERS) -> Plan:
    """Skip every factorisation the measured per-layer timings say is not faster on `target`."""
    if target not in TARGETS:
        raise InputError(f"--target must be one of {', '.join(TARGETS)}, got '{target}'")
    settings = Settings(provider=target, threads=plan.options.latency_threads or os.cpu_count() or 1)
    settings.provider_list()  # a clear error when the target's provider is missing
    times = layer_times(plan, model, views, settings, cache_dir, warmup, iters, desc=f"timing layers ({target})")
    where_cached = LatencyCache.open(settings, cache_dir).path
    chosen = [c for c in plan.candidates if c.decision == "factorize" and c.node in views]
    skipped: dict[str, str] = {}
    for c in chosen:
        if c.shares_factors_with in skipped:
            c.decision, c.reason = "skip", f"shares its weight with '{c.shares_factors_with}', which is skipped"
            continue
        if c.node not in times:
            c.note = "; ".join(filter(None, [c.note, f"not timed for --target {target}: input shape unknown"]))
            continue
        d_ms, f_ms, where = times[c.node]
        if f_ms >= d_ms:
            skipped[c.node] = c.reason = (f"not faster on {target}: factorised {f_ms:.3f} ms vs dense {d_ms:.3f} ms "
                                          f"at {where} (measured on this machine, cache {where_cached})")
            c.decision = "skip"
        else:
            c.note = "; ".join(filter(None, [c.note, f"{target}: factorised {f_ms:.3f} ms vs dense {d_ms:.3f} ms "
                                                      f"at {where}"]))
    plan.note(f"--target {target}: {len(skipped)} of {len(chosen)} factorisations skipped as not faster "
              "on this machine (per-layer timings)")
    return plan
