"""Rank allocation by measured sensitivity: spend the plan's budget where the model's outputs need it.

The energy policy gives every layer the same share of its singular-value energy, as if a layer's
weight error cost the same everywhere. It does not: on all-MiniLM-L6-v2 at half its MatMul params,
some projections move the sentence embedding many times more than the same relative error in
another layer (benchmarks/experiments/minilm_init_experiments.py). So we measure it.

1. Each factorised layer is replaced, alone, by its rank-r reconstruction (whitened SVD where
   calibration gave the layer's input Gram matrix, plain SVD otherwise) at every rank of a fixed ladder
   (`ladder`), and the model's float outputs on `TABLE_SAMPLES` calibration samples are compared with the
   unmodified ones: the mean per-position KL divergence for class outputs, 1 - cosine of the mask-pooled
   rows, or the relative squared error for 1-wide outputs, averaged over the outputs. One ONNX Runtime
   session serves every probe: the layers' weights are fed as inputs, so no graph is rewritten or
   reloaded per layer. The table depends on neither the budget nor the plan, so it is cached
   (`DamageTable`) and another budget only reruns step 3.
2. Ranks grow from one `--rank-multiple` step where the measured damage (interpolated between the
   ladder's ranks) falls most per unit of what is left of the budget (`_price`), greedily, until the
   energy plan's parameter count or FLOPs would be exceeded, and never past a layer's break-even rank.
   The FLOPs stay a limit although `--param-ratio` names only params: spending the params alone moved
   the PP-OCRv5 recogniser's rank into its convolutions and made `run`'s student read 79.5% of unseen
   lines instead of 75.3%, but 1.00x the teacher's speed instead of 1.21x (benchmarks/RESULTS.md,
   issue 17 fourth pass).
   With the latency check on (the default), time replaces FLOPs: every layer is timed alone at its real
   input shape at each step multiple of its rank (`time_grid`, cached per machine like the check's
   timings), and the greedy may jump several steps where a higher rank runs faster. FLOPs did not predict
   time: on CREPE at 2 threads its 1024-channel conv took 5.4 ms at rank 64 and 4.1 ms at 80, and the FLOP
   greedy chose the slow ranks (benchmarks/RESULTS.md, issue 18).
3. Layers interact, so the whole student is then measured both ways on all the calibration samples and
   ranked as distillation ranks its validations (`metrics.better`): where every output holds classes, a
   clearly higher top-1 agreement with the teacher wins and a tie goes to the closer outputs; elsewhere the
   closer outputs win. If the moved ranks do not win, the energy ranks stay (the plan says which, with both
   measurements).

The layers chosen and the budget are the energy plan's; only ranks move. While it runs it holds every
factorised layer's SVD, about twice the layers' weights (86 MB for MiniLM).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from onnx import ModelProto, TensorProto, helper
from tqdm import tqdm

from onnx_inher import _env
from onnx_inher.bench.sessions import Settings
from onnx_inher.datasets.text import ATTENTION_MASK as MASK
from onnx_inher.errors import InputError
from onnx_inher.ir.graph import scope_graph
from onnx_inher.ir.io import write_text
from onnx_inher.ir.layers import LayerView, oriented
from onnx_inher.ir.outputs import LOG_PROBABILITIES, PROBABILITIES, OutputKind, detect
from onnx_inher.metrics import Score, better, cosine_rows, pool
from onnx_inher.planning import cost
from onnx_inher.planning.plan import Plan, Spectra, apply_edits, fits
from onnx_inher.planning.svd import OutputGram, data_aware_svd, full_svd, truncate
from onnx_inher.progress import Heartbeat
from onnx_inher.runtime import runnable_session
from onnx_inher.tuning.calibrate import batches, layer_gram
from onnx_inher.tuning.latency import rank_times

PROBE = "onnx_inher.probe."
SIGNIFICANT = 4  # distances are rounded so that float noise between machines cannot reorder the greedy
FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)


@dataclass
class Layer:
    """One factorised layer as the allocation sees it: spectrum, cost per rank and measured damage."""

    view: LayerView
    svd: tuple[np.ndarray, np.ndarray, np.ndarray]
    plan_rank: int
    cap: int
    heads: int
    sensitivity: float = 0.0
    measured: dict[int, float] | None = None  # rank -> output distance with this layer alone at that rank
    times: dict[int, float] | None = None  # rank -> ms of the factorised layer alone on this machine
    dense_ms: float = 0.0  # the dense layer alone, where timed
    folded: set[int] = field(default_factory=set)  # timed ranks priced with the down conv folded (the check folds)

    def __post_init__(self) -> None:
        self._costs: dict[int, np.ndarray] = {}
        # the greedy asks for errors thousands of times: keep the energy left past each rank
        power = (self.svd[1].astype(np.float64) ** 2).sum(0)
        total = float(power.sum())
        self._tail = (total - np.concatenate([[0.0], np.cumsum(power)])) / total if total else np.zeros(len(power) + 1)

    def error(self, rank: int) -> float:
        """Relative squared truncation error at `rank` (of `M S` when whitened, of `M` otherwise)."""
        return float(self._tail[min(rank, len(self._tail) - 1)])

    def size(self, rank: int) -> np.ndarray:
        """(params, FLOPs) of the factorised layer at `rank`."""
        if rank not in self._costs:
            c = cost.after(self.view, rank, self.heads)
            self._costs[rank] = np.array([c.params, c.flops], dtype=np.int64)
        return self._costs[rank]

    def cost(self, rank: int) -> np.ndarray:
        """What the greedy budgets: (params, FLOPs), or (params, nanoseconds alone) where the layer was timed."""
        params, flops = self.size(rank)
        return np.array([params, round(self.time(rank) * 1e6) if self.times else flops], dtype=np.int64)

    def time(self, rank: int) -> float:
        """Milliseconds alone at `rank`: the timed rank's, else linearly interpolated between timed ranks."""
        assert self.times
        if rank in self.times:
            return self.times[rank]
        ranks = sorted(self.times)
        return float(np.interp(rank, ranks, [self.times[r] for r in ranks]))

    def moves(self, rank: int, step: int) -> list[int]:
        """The ranks the greedy may raise this layer to from `rank`: one step, or, where the layer was timed,
        any timed rank above (time is not monotone in rank, so the cheapest next rank may be several steps up:
        at 2 threads CREPE's 1024-channel conv ran 5.4 ms at rank 64 and 4.1 ms at rank 80)."""
        if self.times:
            return [r for r in sorted(self.times) if r > rank]
        nxt = min(rank + step, self.cap)
        return [nxt] if nxt > rank else []

    def weight(self) -> float:
        return self.sensitivity / max(self.error(self.plan_rank), 1e-12)

    def damage(self, rank: int) -> float:
        """Output distance with this layer alone at `rank`: the measured table, linearly interpolated between
        its ranks and made non-increasing in rank (a higher rank holds the lower one's subspace, so a
        measured rise is noise); without a table, the energy model `weight x e(rank)`."""
        if not self.measured:
            return self.weight() * self.error(rank)
        ranks = sorted(self.measured)
        values = np.minimum.accumulate(np.array([self.measured[r] for r in ranks], dtype=np.float64))
        return float(np.interp(rank, ranks, values))


def weight_from_matrices(view: LayerView, m: np.ndarray) -> np.ndarray:
    """Inverse of `LayerView.matrices`: `[g, out, in]` back to the layout the node reads."""
    g, o = view.groups, view.out_features
    shape = view.weight.shape
    if view.kernel_up:  # [1, C_out k, C_in] back to [C_out, C_in, *k]
        w = np.moveaxis(m.reshape(o, *view.kernel, shape[1]), -1, 1)
    elif view.op == "Conv":
        w = m.reshape(shape)
    elif view.op == "ConvTranspose":
        cin_g, k = shape[0] // g, int(np.prod(view.kernel))
        w = m.reshape(g, o, cin_g, k).transpose(0, 2, 1, 3).reshape(shape)
    else:
        w = m[0] / float(view.attrs.get("alpha", 1.0))  # type: ignore[arg-type]
        w = w.T if view.side == "right" else w
        if view.op == "Gemm" and view.attrs.get("transB" if view.side == "right" else "transA"):
            w = w.T
        w = w.reshape(shape)
    return np.ascontiguousarray(w).astype(view.dtype)


def probe_model(model: ModelProto, views: list[LayerView]) -> tuple[ModelProto, dict[str, str]]:
    """A copy of `model` whose probed nodes read their weight from a graph input of the same shape."""
    probe = ModelProto()
    probe.CopyFrom(model)
    names: dict[str, str] = {}
    for view in views:
        name = f"{PROBE}{view.node}"
        scope_graph(probe.graph, view.scope).node[view.node_index].input[view.weight_input] = name
        elem = helper.np_dtype_to_tensor_dtype(view.dtype)
        probe.graph.input.append(helper.make_tensor_value_info(name, elem, list(view.weight.shape)))
        names[view.node] = name
    return probe, names


TOP_K = 8  # teacher classes kept per position: a trained classifier puts nearly all its mass on a few


@dataclass
class ClassRef:
    """A class output's reference at every position: the teacher's top-k classes, their probabilities."""

    index: np.ndarray  # [positions, k] int
    prob: np.ndarray  # [positions, k] float64


def _log_probs(y: np.ndarray, kind: OutputKind) -> np.ndarray:
    """`[positions, classes]` log-probabilities of a class output, whatever space it is in."""
    axis = kind.class_axis if kind.class_axis is not None else y.ndim - 1
    z = np.moveaxis(np.asarray(y, dtype=np.float64), axis, -1)
    z = z.reshape(-1, z.shape[-1])
    if kind.kind == PROBABILITIES:
        return np.log(np.clip(z, 1e-12, None))
    if kind.kind == LOG_PROBABILITIES:
        return z
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def _class_ref(y: np.ndarray, kind: OutputKind) -> ClassRef:
    logp = _log_probs(y, kind)
    k = min(TOP_K, logp.shape[1])
    index = np.argpartition(-logp, k - 1, axis=1)[:, :k]
    return ClassRef(index, np.exp(np.take_along_axis(logp, index, 1)))


def _kl(ref: ClassRef, y: np.ndarray, kind: OutputKind) -> np.ndarray:
    """Per-position KL(teacher || student) over the teacher's top-k classes (the rest of its mass is ~0)."""
    q = np.take_along_axis(_log_probs(y, kind), ref.index, 1)
    return (ref.prob * (np.log(np.clip(ref.prob, 1e-12, None)) - q)).sum(1)


def _agrees(ref: ClassRef, y: np.ndarray, kind: OutputKind) -> np.ndarray:
    """Per position: whether the student's top class is the teacher's."""
    top = np.take_along_axis(ref.index, ref.prob.argmax(1)[:, None], 1)[:, 0]
    return _log_probs(y, kind).argmax(1) == top


def _distance(ref: list[np.ndarray | list[ClassRef]], got: list[np.ndarray]) -> float:
    """Mean over outputs: mean per-position KL for class outputs; 1 - cosine of pooled rows otherwise
    (relative squared error when rows are 1 wide)."""
    out = []
    for r, g in zip(ref, got, strict=True):
        if isinstance(r, list):
            out.append(float(np.mean(g)))  # class outputs arrive as per-position KL already
        elif r.shape[1] > 1:
            out.append(float(1.0 - cosine_rows(r, g).mean()))
        else:
            out.append(float(((r - g) ** 2).sum() / max(float((r ** 2).sum()), 1e-30)))
    return float(np.mean(out))


class Prober:
    """Runs the calibration samples with chosen weights swapped in and measures how far the outputs move.

    Class outputs (probabilities, log-probabilities, logits: `ir.outputs`) are compared position by
    position, by KL divergence from the teacher: a CTC recogniser's `[N,T,C]` softmax pooled over its
    frames hid the collapse to blank that per-frame KL shows at once. For memory, only the teacher's
    top-k classes per position are kept. Other outputs are mask-mean-pooled and compared by cosine."""

    def __init__(self, model: ModelProto, views: list[LayerView], feeds: dict[str, np.ndarray]) -> None:
        self.outputs = [o.name for o in model.graph.output if o.type.tensor_type.elem_type in FLOATS]
        if not self.outputs:
            raise InputError("--allocate sensitivity: the model has no float output to measure; "
                             "use the default energy allocation.")
        kinds = {k.name: k for k in detect(model)}
        self.kinds = {n: kinds[n] for n in self.outputs if n in kinds and kinds[n].is_classes}
        probe, self.names = probe_model(model, views)
        self.weights = {self.names[v.node]: v.weight for v in views}
        self.batches = batches(model, feeds)
        self._spill = tempfile.TemporaryDirectory(prefix="onnx-inher-probe-")  # removed with the prober
        self.session = runnable_session(probe, Path(self._spill.name))
        self.reference = self._run({}, None)
        self.agreement: float | None = None  # of the last `distance`, when every output holds classes
        self.positions = 0

    def _run(self, swapped: dict[str, np.ndarray],
             reference: list[np.ndarray | list[ClassRef]] | None) -> list[np.ndarray | list[ClassRef]]:
        """Per output: pooled rows, or (class outputs) the top-k reference per batch, or with a reference
        given the per-position KL from it (and, in `agreement`, the share of positions whose top class is
        the teacher's, when every output holds classes)."""
        weights = {**self.weights, **{self.names[n]: w for n, w in swapped.items()}}
        parts: list[list] = [[] for _ in self.outputs]
        agree: list[np.ndarray] = []
        for b, batch in enumerate(self.batches):
            for j, y in enumerate(self.session.run(self.outputs, {**batch, **weights})):
                kind = self.kinds.get(self.outputs[j])
                if kind is None:
                    parts[j].append(pool(np.asarray(y, dtype=np.float64), batch.get(MASK))[0])
                elif reference is None:
                    parts[j].append(_class_ref(y, kind))
                else:
                    parts[j].append(_kl(reference[j][b], y, kind))  # type: ignore[index]
                    agree.append(_agrees(reference[j][b], y, kind))  # type: ignore[index]
        if reference is not None:
            every = len(self.kinds) == len(self.outputs) and bool(agree)
            self.agreement = float(np.concatenate(agree).mean()) if every else None
            self.positions = sum(len(a) for a in agree) // max(len(self.outputs), 1)
        return [p if self.outputs[j] in self.kinds and reference is None else np.concatenate(p)
                for j, p in enumerate(parts)]

    def run(self, swapped: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Pooled float outputs over all samples (every output pooled, class outputs too), with `swapped`
        (node -> weight) in place of the originals."""
        weights = {**self.weights, **{self.names[n]: w for n, w in swapped.items()}}
        pooled: list[list[np.ndarray]] = [[] for _ in self.outputs]
        for batch in self.batches:
            for j, y in enumerate(self.session.run(self.outputs, {**batch, **weights})):
                pooled[j].append(pool(np.asarray(y, dtype=np.float64), batch.get(MASK))[0])
        return [np.concatenate(p) for p in pooled]

    def distance(self, swapped: dict[str, np.ndarray]) -> float:
        return _round(_distance(self.reference, self._run(swapped, self.reference)))  # type: ignore[arg-type]

    def score(self, swapped: dict[str, np.ndarray]) -> Score:
        """The whole student's (top-1 agreement or None, output distance, positions), ranked by `better` as
        distillation ranks its validations: the agreement first where every output holds classes."""
        distance = self.distance(swapped)
        return self.agreement, distance, max(1, self.positions)


def _round(x: float) -> float:
    return float(f"{x:.{SIGNIFICANT}g}")


def greedy_ranks(layers: dict[str, Layer], budget: np.ndarray, step: int) -> dict[str, int]:
    """Ranks (multiples of `step`, at most each layer's cap) within `budget` = (params, FLOPs), or (params,
    nanoseconds alone) for timed layers (`Layer.cost`).

    Both count: on a CNN the parameters that help most often sit in convolutions whose FLOPs per
    parameter are high, and a student of equal size but twice the FLOPs is not what a user asked
    for. Each round makes the move (`Layer.moves`: one step, or a jump to any timed rank) whose output
    damage (`Layer.damage`) falls most per unit of `_price`; ties go to the node name and then the lower
    rank, so the result does not depend on dict order."""
    ranks = {n: min(step, layer.cap) for n, layer in layers.items()}
    used = sum((layer.cost(ranks[n]) for n, layer in layers.items()), np.zeros(2, dtype=np.int64))
    while True:
        best: tuple[float, str, int] | None = None
        for n in sorted(layers):
            layer, r = layers[n], ranks[n]
            for nxt in layer.moves(r, step):
                added = layer.cost(nxt) - layer.cost(r)
                if np.any(used + added > budget):
                    continue
                gain = (layer.damage(r) - layer.damage(nxt)) / _price(added, budget - used)
                if best is None or gain > best[0]:
                    best = (gain, n, nxt)
        if best is None:
            return ranks
        _, n, nxt = best
        used += layers[n].cost(nxt) - layers[n].cost(ranks[n])
        ranks[n] = nxt


TABLE_SAMPLES = 64  # calibration samples each table entry is measured on (the final check uses them all)
LADDER = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)  # ranks probed, in --rank-multiple steps
TABLE_FORMAT = "onnx-inher-damage/1"
TIMED_RANKS = 32  # ranks timed per layer at most: past that, every k-th step multiple


def time_grid(cap: int, step: int) -> list[int]:
    """The ranks a layer is timed at: every `step` multiple up to its cap and the cap itself (every k-th
    multiple where there are more than TIMED_RANKS). Not the damage ladder's geometric ranks: time jumps
    between neighbouring multiples (ONNX Runtime splits a conv's output-channel blocks over threads in
    fixed sets), and a ladder would step over the fast ranks."""
    ranks = list(range(step, cap + 1, step))
    stride = max(1, -(-len(ranks) // TIMED_RANKS))
    return sorted({*ranks[stride - 1::stride], min(step, cap), cap})


def ladder(cap: int, step: int) -> list[int]:
    """The ranks a layer is measured at: a geometric ladder of `step` multiples up to its cap, and the cap.
    It depends on neither the budget nor the energy plan, so a table serves every budget."""
    return sorted({min(m * step, cap) for m in LADDER if m * step <= cap} | {min(step, cap), cap})


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


@dataclass
class DamageTable:
    """Measured output distances, `{node|svd digest|rank: distance}`, one JSON file per (model, samples).

    Like AIMET's per-layer compression table: measuring is the expensive part (one run of the samples
    per layer and rank), and what it measures does not depend on the budget, so a second `compress` at
    another `--param-ratio` reuses it. The key holds the singular values of the layer's (whitened)
    SVD, so other calibration data never reads a stale entry."""

    path: Path | None
    entries: dict[str, float]

    @classmethod
    def open(cls, model_sha: str, feeds: dict[str, np.ndarray]) -> DamageTable:
        if not model_sha or _env.damage_table_disabled():
            return cls(None, {})
        key = _digest(*[feeds[k] for k in sorted(feeds)])[:16]
        path = _env.cache_root() / "damage" / f"{model_sha[:16]}-{key}.json"
        entries: dict[str, float] = {}
        if path.is_file():
            try:
                doc = json.loads(path.read_text())
                if doc.get("format") == TABLE_FORMAT:
                    entries = {str(k): float(v) for k, v in doc["entries"].items()}
            except (ValueError, KeyError, TypeError, AttributeError):
                entries = {}  # a corrupt table is measured again, never trusted
        return cls(path, entries)

    @staticmethod
    def key(layer: Layer, rank: int) -> str:
        return f"{layer.view.node}|{_digest(np.asarray(layer.svd[1], dtype=np.float64))[:16]}|{rank}"

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"format": TABLE_FORMAT, "entries": dict(sorted(self.entries.items()))}
        write_text(self.path, json.dumps(doc, indent=0) + "\n")


def measure_table(layers: dict[str, Layer], prober: Prober, sharers: dict[str, list[LayerView]], step: int,
                  table: DamageTable) -> int:
    """Fill every layer's `measured` curve on its rank ladder (from `table` where it has the entry);
    returns how many entries were measured now."""
    todo = [(n, r) for n in sorted(layers) for r in ladder(layers[n].cap, step)
            if DamageTable.key(layers[n], r) not in table.entries]
    beat = Heartbeat("sensitivity table", len(todo), "probe")
    quiet = _env.progress_disabled()
    for done, (n, r) in enumerate(tqdm(todo, desc="sensitivity table", unit="probe", disable=quiet, leave=False)):
        beat.tick(done)
        table.entries[DamageTable.key(layers[n], r)] = prober.distance(_swapped(layers[n], r, sharers))
    for layer in layers.values():
        layer.measured = {r: table.entries[DamageTable.key(layer, r)] for r in ladder(layer.cap, step)}
    if todo:
        table.save()
    return len(todo)


def _price(added: np.ndarray, left: np.ndarray) -> float:
    """What a rank step costs: its params and FLOPs, each as a share of what is left of that budget.

    Priced by params alone, the greedy spent FLOPs freely on convolutions (many FLOPs per param) until the
    FLOPs ran out and a third of the params was never used (Fashion-MNIST ResNet at `--param-ratio 0.5`:
    29.6% of the params; the PP-OCRv5 recogniser: 1.56 M of 2.0 M). Dividing by what is left makes the
    scarcer budget dearer as it runs out, so both are spent (the primal-dual greedy for knapsacks with
    two constraints); where FLOPs per param are the same everywhere the order is the old one."""
    left = np.maximum(left.astype(np.float64), 1.0)
    return float(max(added[0], 0) / left[0] + max(added[1], 0) / left[1]) or 1e-30


def rank_cap(view: LayerView, heads: int, guard: bool) -> int:
    """Largest rank at which the layer still gets smaller and cheaper (full rank without the guard)."""
    if not guard:
        return view.full_rank
    r = view.full_rank
    while r > 1 and not fits(view, r, heads):
        r -= 1
    return r


def _swapped(layer: Layer, rank: int, sharers: dict[str, list[LayerView]]) -> dict[str, np.ndarray]:
    """The layer's rank-r reconstruction, in the weight layout of every node that shares its weight."""
    f = truncate(layer.svd, rank)
    m = (f.up.astype(np.float64) @ f.down.astype(np.float64)).astype(np.float32)
    return {v.node: weight_from_matrices(v, m) for v in sharers[layer.view.shared_key]}


def _all_swapped(layers: dict[str, Layer], ranks: dict[str, int],
                 sharers: dict[str, list[LayerView]]) -> dict[str, np.ndarray]:
    """Every layer at `ranks` (at its energy-plan rank where absent): the whole student, kept dense."""
    out: dict[str, np.ndarray] = {}
    for n, layer in layers.items():
        out.update(_swapped(layer, ranks.get(n, layer.plan_rank), sharers))
    return out


def time_layers(layers: dict[str, Layer], the_plan: Plan, model: ModelProto, views: dict[str, LayerView],
                settings: Settings, step: int) -> str:
    """Give every layer its time alone at each rank of its `time_grid` (and its energy rank), so the greedy
    prices time instead of FLOPs; returns what the plan's warning says of it. All or nothing: one budget
    cannot add nanoseconds to FLOPs, so if a layer cannot be timed alone (input shape unknown), none is."""
    grids = {n: sorted({*time_grid(layer.cap, step), layer.plan_rank}) for n, layer in layers.items()}
    times, measured = rank_times(the_plan, model, views, settings, grids, desc="timing ranks")
    untimed = sorted(set(layers) - set(times))
    if untimed:
        return f"priced by FLOPs: {untimed[0]} cannot be timed alone (its input shape is unknown)"
    for n, layer in layers.items():
        layer.times, layer.dense_ms, layer.folded = times[n].ms, times[n].dense_ms, times[n].folded
    entries = sum(t.timings for t in times.values())
    folded = sum(len(layer.folded) for layer in layers.values())
    threads = f"{settings.threads} thread{'s' if settings.threads > 1 else ''}"
    return (f"priced by time alone at the real shapes on this machine ({threads}; {entries} "
            f"timings, {entries - measured} from the cache"
            f"{f'; {folded} ranks priced with the down conv folded' if folded else ''})")


def allocate_by_sensitivity(model: ModelProto, views: dict[str, LayerView], the_plan: Plan, spectra: Spectra,
                            feeds: dict[str, np.ndarray], grams: dict[str, np.ndarray | OutputGram],
                            rows: dict[str, np.ndarray] | None = None, timing: Settings | None = None) -> Plan:
    """Re-rank the plan's factorised layers by measured output sensitivity, within its params and FLOPs,
    or, with `timing`, within its params and the time its layers take alone on this machine."""
    chosen = [c for c in the_plan.candidates if c.decision == "factorize" and c.node in views and c.rank
              and c.dense_classes is None]  # a class-split head's rank is fixed by the data, not traded
    seen = {c.node: oriented(views[c.node], c.orientation) for c in chosen}
    sharers: dict[str, list[LayerView]] = {}
    for c in chosen:
        sharers.setdefault(seen[c.node].shared_key, []).append(seen[c.node])
    owners = {key: group[0].node for key, group in sharers.items()}
    if not chosen:
        return the_plan
    by_node = {c.node: c for c in chosen}
    layers: dict[str, Layer] = {}
    for n in owners.values():
        view, c = seen[n], by_node[n]
        gram = layer_gram(view, grams)
        svd = data_aware_svd(view.matrices(), gram, rows=(rows or {}).get(view.shared_key)) if gram is not None \
            else full_svd(view.matrices())
        layers[n] = Layer(view, svd, int(c.rank or 1), rank_cap(view, c.heads, the_plan.options.guard), c.heads)
    views_probed = [v for group in sharers.values() for v in group]
    step = max(1, the_plan.options.rank_multiple)
    few = {k: v[:TABLE_SAMPLES] for k, v in feeds.items()}
    table = DamageTable.open(the_plan.sha256, few)
    measured = measure_table(layers, Prober(model, views_probed, few), sharers, step, table)
    for layer in layers.values():
        layer.sensitivity = layer.damage(layer.plan_rank)
    priced = time_layers(layers, the_plan, model, views, timing, step) if timing is not None else "priced by FLOPs"
    budget = sum((layer.cost(layer.plan_rank) for layer in layers.values()), np.zeros(2, dtype=np.int64))
    ranks = greedy_ranks(layers, budget, step)
    prober = Prober(model, views_probed, feeds)
    energy_score, moved_score = prober.score(_all_swapped(layers, {}, sharers)), prober.score(
        _all_swapped(layers, ranks, sharers))
    (energy_agree, energy, _), (moved_agree, moved, _) = energy_score, moved_score
    kept = better(moved_score, energy_score)
    for c in chosen:
        owner = layers[owners[seen[c.node].shared_key]]
        c.energy_rank, c.sensitivity = c.rank, owner.sensitivity
        c.rank = ranks[owner.view.node] if kept else c.rank
        if owner.times:
            c.note = "; ".join(filter(None, [c.note, (
                f"alone on this machine: {owner.time(int(c.rank or 1)):.3f} ms at rank {c.rank}"
                f"{' (down conv folded)' if c.rank in owner.folded else ''}, "
                f"{owner.time(owner.plan_rank):.3f} ms at the energy rank {owner.plan_rank}, dense "
                f"{owner.dense_ms:.3f} ms (sensitivity allocation)")]))
    apply_edits(the_plan, views, spectra)
    final = {n: ranks[n] if kept else layer.plan_rank for n, layer in layers.items()}
    spent = sum((layer.size(final[n]) for n, layer in layers.items()), np.zeros(2, dtype=np.int64))
    energy_size = sum((layer.size(layer.plan_rank) for layer in layers.values()), np.zeros(2, dtype=np.int64))
    the_plan.options.allocate = "sensitivity"
    samples = len(next(iter(feeds.values())))
    same = all(ranks[n] == layer.plan_rank for n, layer in layers.items())
    verdict = "moved no rank" if same else "applied" if kept else "not applied, the energy ranks stay"
    entries = sum(len(layer.measured or {}) for layer in layers.values())
    timed = ""
    if all(layer.times for layer in layers.values()):
        ms = sum(layer.time(final[n]) for n, layer in layers.items())
        timed = (f"; the factorised layers take {ms:.3f} ms alone "
                 f"(energy ranks {sum(layer.time(layer.plan_rank) for layer in layers.values()):.3f} ms, dense "
                 f"{sum(layer.dense_ms for layer in layers.values()):.3f} ms)")
    the_plan.note(
        f"sensitivity allocation ({len(layers)} layers, a table of {entries} ranks on "
        f"{len(next(iter(few.values())))} samples, {entries - measured} of them from the cache"
        f"{f' {table.path}' if table.path and measured < entries else ''}; {priced}; checked on {samples} "
        f"samples) {verdict}: {_agreement_text(moved_agree)}output distance "
        f"{moved:g} with the moved ranks vs {_agreement_text(energy_agree)}{energy:g} with the energy ranks; "
        f"{int(spent[0])} factor params and "
        f"{int(spent[1])} FLOPs (energy plan: {int(energy_size[0])} and {int(energy_size[1])}){timed}")
    return the_plan


def _agreement_text(agree: float | None) -> str:
    return "" if agree is None else f"top-1 agreement {100 * agree:.2f}% and "
