"""The plan: every candidate layer, the decision taken for it and why, and what it costs.

A plan is data (JSON), separate from applying it, so users can read it, edit ranks by hand and
feed it back to `compress --plan`. Ranks given in a plan are applied as written (no guard).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from onnx_inher.errors import InputError
from onnx_inher.ir.layers import (
    KERNEL_UP,
    ChannelsFirst,
    LayerView,
    heads_unsupported,
    kernel_up,
    kernel_up_unsupported,
    oriented,
    split_unsupported,
)
from onnx_inher.planning import cost
from onnx_inher.planning.rank import RankPolicy, raw_rank, round_rank
from onnx_inher.planning.svd import PRODUCT_BLOCK, Eigen, eigen, energy_kept, factors

FORMAT = "onnx-inher-plan/1"
MODES = ("inher", "svd")
ORIENTATIONS = ("auto", "down")  # a conv pair's k x k kernel: on the side `_orient` chooses, or always down
ALLOCATIONS = ("energy", "sensitivity")
# The class split of a classifier head (issue 17): the classes the teacher ranks in its top SPLIT_TOP at some
# position of the calibration data keep their dense columns; the others share a rank-SPLIT_RANK pair. The
# PP-OCRv5 recogniser's 120 x 18,385 head, scored alone on the teacher's features over 400 unseen lines:
# 248 dense classes (top 3 on 300 lines) with the rest at rank 4 or 8 read 99.75% of lines as the teacher
# does (103k / 176k params), where its rank-48 whitened pair (888k params) read 83%. A split is used only
# when it keeps at most SPLIT_SHARE of the dense params: a head whose data uses most classes has nothing
# to gain from it.
SPLIT_TOP = 3
SPLIT_RANK = 8
SPLIT_SHARE = 0.5


@dataclass
class Candidate:
    node: str
    op: str
    weight: str = ""
    weight_shape: list[int] = field(default_factory=list)
    groups: int = 1
    full_rank: int = 0
    decision: str = "skip"
    reason: str | None = None
    rank: int | None = None
    heads: int = 1
    form: str | None = None
    params_before: int = 0
    params_after: int = 0
    flops_before: int = 0
    flops_after: int = 0
    energy_kept: float | None = None
    breakeven_rank: float | None = None
    shares_factors_with: str | None = None
    note: str | None = None
    energy_rank: int | None = None  # the energy plan's rank, when --allocate sensitivity moved it
    sensitivity: float | None = None  # output distance with this layer alone at its energy rank
    # where the layer lives in a model with If/Loop/Scan subgraphs: "main" or the subgraph's path
    # ("If_0/then_branch"); None (and left out of the JSON) in a model without subgraph layers
    graph: str | None = None
    # conv heads only, set by the latency check: "mix" (per-sample weight mix) or "conv" (constant-weight
    # 1x1 conv), and the times that chose it; None (and left out of the JSON) means "mix", unmeasured
    head_form: str | None = None
    form_ms: dict[str, float] | None = None
    # class-split heads only: the output columns (classes) kept dense, sorted; `rank` is then the rank of
    # the pair that carries every other class. None (and left out of the JSON) for every other layer
    dense_classes: list[int] | None = None
    # Conv layers only, set by the latency check: the down conv runs with its output rows folded into the
    # batch, `{"parts": P, "rows": input rows}` (ONNX Runtime spreads one image's blocked conv over threads
    # by groups of 64 output channels, so a rank <= 64 down conv runs on one thread at batch 1), and the
    # times that chose it; None (and left out of the JSON): not folded
    fold: dict[str, int] | None = None
    fold_ms: dict[str, float] | None = None
    # Conv pairs only: "kernel_up" puts the k x k kernel on the up side (a 1x1 conv C_in -> r, then a k x k
    # conv r -> C_out, `ir.layers.kernel_up`); None (and left out of the JSON): on the down side
    orientation: str | None = None

    def as_json(self) -> dict[str, Any]:
        """The JSON fields: every field; `graph`, `head_form`, `form_ms`, `dense_classes`, `fold`, `fold_ms` and
        `orientation` only when set (plans that do not use them keep their bytes)."""
        doc = asdict(self)
        for optional in ("graph", "head_form", "form_ms", "dense_classes", "fold", "fold_ms", "orientation"):
            if doc[optional] is None:
                del doc[optional]
        return doc


@dataclass
class Options:
    mode: str = "inher"
    heads: int = 2
    policy: RankPolicy = field(default_factory=lambda: RankPolicy("param_ratio", 0.5))
    rank_multiple: int = 16
    guard: bool = True
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    min_params: int = 0
    dims: dict[str, int] = field(default_factory=dict)
    shapes: dict[str, list[int]] = field(default_factory=dict)  # real input shapes FLOPs are counted at
    seed: int = 0
    calibration: str | None = None  # DATA spec whose input Gram matrices whiten the SVD
    allocate: str = "energy"  # or "sensitivity": ranks moved to where measured output damage is (needs data)
    # compress/run time the student against the teacher and revert layers that do not pay (tuning/speed.py);
    # None: on unless ONNX_INHER_LATENCY_CHECK=0
    latency_check: bool | None = None
    min_speedup: float | None = None  # a student slower than this (teacher time / student time) fails (exit 1)
    # intra-op threads every timing runs with (the check, the form choice, time-priced ranks); None: all cores
    latency_threads: int | None = None
    # heads or a plain pair by measurement: the CLI's default when neither --mode nor --heads is given; in
    # Python the form asked for in `mode`/`heads` is kept unless this is set
    pick_form: bool = False
    # classifier heads keep dense columns for the classes the teacher uses on the calibration data and a
    # small pair for the rest (SPLIT_*); needs `calibration`
    class_split: bool = True
    # "auto": a conv pair puts its k x k kernel up where that keeps the energy threshold with no more params and
    # FLOPs (`_orient`); "down": always on the down side, the form of every plan before it
    orientation: str = "auto"

    def validate(self) -> None:
        if self.mode not in MODES:
            raise InputError(f"unknown mode '{self.mode}'; choose one of {', '.join(MODES)}")
        if self.heads < 1:
            raise InputError(f"--heads must be >= 1, got {self.heads}")
        if self.orientation not in ORIENTATIONS:
            raise InputError(f"unknown orientation '{self.orientation}'; choose one of {', '.join(ORIENTATIONS)}")
        if self.allocate not in ALLOCATIONS:
            raise InputError(f"unknown allocation '{self.allocate}'; choose one of {', '.join(ALLOCATIONS)}")
        if self.allocate == "sensitivity" and not self.calibration:
            raise InputError("--allocate sensitivity measures each layer on real inputs: give them with "
                             "--calibration DATA (e.g. fortunes, mnist5k, an .npz).")
        if self.rank_multiple < 1:
            raise InputError(f"--rank-multiple must be >= 1, got {self.rank_multiple}")
        if self.min_params < 0:
            raise InputError(f"--min-params must be >= 0, got {self.min_params}")
        if self.min_speedup is not None and not self.min_speedup > 0:
            raise InputError(f"--min-speedup must be > 0, got {self.min_speedup:g}")
        if self.min_speedup is not None and self.latency_check is False:
            raise InputError("--min-speedup needs the latency check; drop --no-latency-check.")
        if self.latency_threads is not None and self.latency_threads < 1:
            raise InputError(f"--latency-threads must be >= 1, got {self.latency_threads}")
        if self.latency_threads is not None and self.latency_check is False:
            raise InputError("--latency-threads sets the threads the latency check times with; drop "
                             "--no-latency-check.")
        for name, shape in self.shapes.items():
            if not all(isinstance(d, int) and d >= 1 for d in shape):
                raise InputError(f"--shape {name}: dims must be positive integers, got {list(shape)}")
        for pattern in [*self.include, *self.exclude]:
            try:
                re.compile(pattern)
            except re.error as err:
                raise InputError(f"bad node-name regex '{pattern}': {err}") from None

    @property
    def requested_heads(self) -> int:
        return 1 if self.mode == "svd" else self.heads


@dataclass
class Plan:
    model: str
    sha256: str
    opset: int
    options: Options
    candidates: list[Candidate]
    # what may need the user's action (a shape to give, a price to accept, an unmet budget); `notes` say what
    # was measured and decided (the form, the calibration, reverted layers), so that a run that went as it
    # should prints no warning at all
    warnings: list[str] = field(default_factory=list)
    latency_check: dict[str, Any] | None = None  # what compress's latency check measured (tuning/speed.py)
    # the whole teacher beside the candidates: {"params": float weights, "other_flops": {op: FLOPs}} for the
    # ops no candidate stands for (recurrent, quantised), at the plan's shapes (`api.model_cost`)
    model_cost: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def warn(self, *texts: str) -> None:
        """Add warnings not already there: a plan applied by `compress --plan` carries its planning's."""
        self.warnings.extend(t for t in dict.fromkeys(texts) if t not in self.warnings)

    def note(self, *texts: str) -> None:
        """Add notes not already there (as `warn`)."""
        self.notes.extend(t for t in dict.fromkeys(texts) if t not in self.notes)

    def totals(self) -> dict[str, Any]:
        chosen = [c for c in self.candidates if c.decision == "factorize"]
        pb = sum(c.params_before for c in self.candidates)
        pa = sum(c.params_after if c.decision == "factorize" else c.params_before for c in self.candidates)
        fb = sum(c.flops_before for c in self.candidates)
        fa = sum(c.flops_after if c.decision == "factorize" else c.flops_before for c in self.candidates)
        totals = {
            "candidates": len(self.candidates),
            "factorized": len(chosen),
            "skipped": len(self.candidates) - len(chosen),
            "params_before": pb,
            "params_after": pa,
            "param_ratio": pa / pb if pb else 1.0,
            "flops_before": fb,
            "flops_after": fa,
            "flop_ratio": fa / fb if fb else 1.0,
        }
        if self.model_cost is not None:
            totals["model"] = whole_model(self.model_cost, pb, pa, fb, fa)
        return totals

    def to_json(self) -> str:
        opts = asdict(self.options)
        opts["policy"] = {"kind": self.options.policy.kind, "value": self.options.policy.value}
        doc = {
            "format": FORMAT,
            "model": {"path": self.model, "sha256": self.sha256, "opset": self.opset},
            "options": opts,
            "totals": self.totals(),
            "warnings": self.warnings,
            "notes": self.notes,
            "candidates": [c.as_json() for c in self.candidates],
        }
        if self.latency_check is not None:
            doc["latency_check"] = self.latency_check
        if self.model_cost is not None:
            doc["model_cost"] = self.model_cost
        return json.dumps(doc, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "plan") -> Plan:
        try:
            doc = json.loads(text)
            if doc.get("format") != FORMAT:
                raise ValueError(f"format is {doc.get('format')!r}, expected {FORMAT!r}")
            o = dict(doc["options"])
            o["policy"] = RankPolicy(o["policy"]["kind"], float(o["policy"]["value"]))
            options = Options(**o)
            names = {f for f in Candidate.__dataclass_fields__}
            cands = [Candidate(**{k: v for k, v in c.items() if k in names}) for c in doc["candidates"]]
            return cls(doc["model"]["path"], doc["model"]["sha256"], int(doc["model"]["opset"]), options,
                       cands, list(doc.get("warnings", [])), doc.get("latency_check"), doc.get("model_cost"),
                       list(doc.get("notes", [])))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise InputError(f"{source}: not a valid onnx-inher plan ({err}); regenerate it with `onnx-inher plan`.") \
                from None


def whole_model(cost: dict[str, Any], pb: int, pa: int, fb: int, fa: int) -> dict[str, Any]:
    """The whole teacher and student: every float weight, and the candidates' FLOPs plus those of the ops
    no candidate stands for (`Plan.model_cost`); `factorisable_flop_share` is the candidates' part of the
    teacher's FLOPs, the most the plan can act on."""
    other = sum(int(v) for v in cost.get("other_flops", {}).values())
    params = max(int(cost["params"]), pb)
    flops = fb + other
    return {"params_before": params, "params_after": params - (pb - pa),
            "param_ratio": (params - (pb - pa)) / params if params else 1.0,
            "flops_before": flops, "flops_after": fa + other, "flop_ratio": (fa + other) / flops if flops else 1.0,
            "factorisable_flop_share": fb / flops if flops else 1.0}


LOW_SHARE = 0.5  # below this share of the teacher's FLOPs in factorisable layers, the plan warns


def uncovered_note(plan: Plan) -> str | None:
    """A warning when most of the teacher's FLOPs are in ops onnx-inher does not factorise (an LSTM speech
    encoder with one Linear): its student cannot be much faster, whatever the plan's own ratios say."""
    if plan.model_cost is None:
        return None
    t = plan.totals()["model"]
    other = {k: int(v) for k, v in plan.model_cost.get("other_flops", {}).items() if v}
    if not other or t["factorisable_flop_share"] >= LOW_SHARE:
        return None
    ops = ", ".join(f"{op} {v / t['flops_before']:.0%}" for op, v in sorted(other.items(), key=lambda kv: -kv[1]))
    return (f"the factorisable layers (MatMul, Gemm, Conv) are {t['factorisable_flop_share']:.0%} of the teacher's "
            f"FLOPs; the rest is in {ops}, which onnx-inher does not factorise: the student keeps "
            f"{t['flop_ratio']:.0%} of the teacher's FLOPs and can be little faster")


class Spectra:
    """Singular values per shared weight (a few KiB per layer), and the eigenvectors a factorisation needs.

    A plan needs only the singular values, a compress the factors of the same weights. Both come from one
    eigendecomposition of the weight's smaller Gram matrix (`svd.eigen`): `values` keeps the leading
    eigenvectors (`n x k` floats, k up to a quarter of the weight's size and `TOP_BYTES` in all), and
    `top_svd` turns them into a rank's factors with one product, where it used to compute the Gram matrix
    and solve it again (AlexNet: 16 s of a 52 s compress). Without `remember` a weight's vectors are
    dropped once factorised; with it (the latency check rebuilds the student for every trial) they stay for
    this object's life. Holding every layer's full SVD instead was about 500 MiB of `compress`'s peak on
    BERT-base. Small weights go through the process-wide cache.
    """

    def __init__(self, remember: bool = False) -> None:
        self._s: dict[str, np.ndarray] = {}
        self.remember = remember
        self._eig: dict[tuple[str, tuple[int, ...]], Eigen] = {}
        self._eig_bytes = 0

    def values(self, view: LayerView) -> np.ndarray:
        if view.shared_key not in self._s:
            self._s[view.shared_key] = self._eigen(view, 0, keep=True).s.astype(np.float32)
        return self._s[view.shared_key]

    def svd(self, view: LayerView) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The full SVD."""
        n = min(view.matrices().shape[1:])
        return self.top_svd(view, n)

    def split_svd(self, view: LayerView, rest: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The SVD of a class-split head's other classes: the rows `rest` of its `[1, out, in]` matrices."""
        m = np.ascontiguousarray(view.matrices()[:, rest, :])
        e = _cached(m)
        return factors(m, e, e.vecs.shape[2])

    def top_svd(self, view: LayerView, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`svd(view)` cut to its first `rank` components, from the kept eigenvectors when they reach it (the
        same bytes either way)."""
        e = self._eigen(view, rank, keep=self.remember)
        if not self.remember:
            self._forget(_key(view))
        return factors(view.matrices(), e, rank)

    def _eigen(self, view: LayerView, rank: int, keep: bool) -> Eigen:
        """The weight's `Eigen`, covering `rank`: the kept one if it does, else computed (and, with `keep`, its
        leading vectors kept within the budget)."""
        hit = self._eig.get(_key(view))
        if hit is not None and hit.covers(rank):
            return hit
        e = _cached(view.matrices())
        if not keep:
            return e
        self._forget(_key(view))
        g, n = e.vecs.shape[:2]
        room = min(int(view.weight.nbytes * TOP_SHARE), TOP_BYTES - self._eig_bytes) // (4 * g * n)
        k = n if room >= n else room // PRODUCT_BLOCK * PRODUCT_BLOCK
        if k > 0:
            kept = e.cut(k)
            self._eig[_key(view)] = kept
            self._eig_bytes += kept.vecs.nbytes
        return e

    def _forget(self, key: tuple[str, tuple[int, ...]]) -> None:
        old = self._eig.pop(key, None)
        if old is not None:
            self._eig_bytes -= old.vecs.nbytes


def _key(view: LayerView) -> tuple[str, tuple[int, ...]]:
    return view.shared_key, tuple(int(d) for d in view.weight.shape)


TOP_BYTES = 256 << 20  # eigenvectors a `Spectra` keeps in all
# and only as many of a weight's as a quarter of its size: a low-rank layer's (AlexNet's FCs at rank 16) cost
# little to keep, while all of a square weight's are as large as the weight (BERT-base: +344 MiB of peak when
# the rank cuts were kept whole)
TOP_SHARE = 0.25


_CACHE: OrderedDict[str, Eigen] = OrderedDict()
CACHE_MATRIX_BYTES = 1 << 20
CACHE_BYTES = 64 << 20


def _cached(matrices: np.ndarray) -> Eigen:
    """`svd.eigen` of small weights, remembered by content in this process.

    Users tune ranks by compressing the same model several times (a notebook, a sweep, the test
    suite). Only weights up to 1 MiB are cached (64 MiB in all): a big model's SVDs would stay in
    memory for the life of the process, and hashing its weights costs time on every run.
    """
    if matrices.nbytes > CACHE_MATRIX_BYTES:
        return eigen(matrices)
    data = np.ascontiguousarray(matrices).view(np.uint8).reshape(-1)
    key = hashlib.sha256(data).hexdigest() + str(matrices.shape) + str(matrices.dtype)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    result = eigen(matrices)
    _CACHE[key] = result
    while sum(e.vecs.nbytes for e in _CACHE.values()) > CACHE_BYTES and len(_CACHE) > 1:
        _CACHE.popitem(last=False)
    return result


def _base(view: LayerView, h: int) -> Candidate:
    before = cost.dense(view)
    return Candidate(
        node=view.node, op=view.op, weight=view.weight_root, weight_shape=list(view.weight.shape),
        groups=view.groups, full_rank=view.full_rank, heads=h, params_before=before.params,
        flops_before=before.flops, breakeven_rank=round(cost.breakeven_rank(view, h), 2),
        graph=view.scope or None,
    )


def fits(view: LayerView, rank: int, h: int) -> bool:
    """The guard: at `rank` with `h` heads the layer gets both smaller and cheaper than its dense form."""
    before, after = cost.dense(view), cost.after(view, rank, h)
    return after.params < before.params and after.flops < before.flops


def decide(view: LayerView, rank: int, h: int, guard: bool, multiple: int, s: np.ndarray,
           round_down: bool = True) -> Candidate:
    """Round, guard and cost one layer at a raw rank. Without `round_down` a rank that only fits when rounded
    down (below the raw rank) is not taken: the layer is skipped instead."""
    c = _base(view, h)
    c.form = "heads" if h > 1 else "pair"
    up, down = round_rank(rank, view.full_rank, multiple)
    chosen = up
    if guard:
        if view.other_users:
            c.reason = f"weight is also used by {', '.join(view.other_users)}; factorising would add parameters"
            return c
        ok = [r for r in dict.fromkeys((up, down) if round_down else (up,)) if fits(view, r, h)]
        if not ok:
            a = cost.after(view, up, h)
            c.rank = up
            c.reason = (f"rank {up} would not make it smaller and cheaper with {h} head(s) "
                        f"(params {c.params_before}->{a.params}, FLOPs {c.flops_before}->{a.flops}); "
                        f"needs rank < {c.breakeven_rank:g}")
            return c
        chosen = ok[0]
    a = cost.after(view, chosen, h)
    c.decision, c.rank, c.params_after, c.flops_after = "factorize", chosen, a.params, a.flops
    c.energy_kept = round(energy_kept(s, chosen), 6)
    return c


def decide_split(view: LayerView, classes: list[int], options: Options, opset: int) -> Candidate | None:
    """The class-split form for a classifier head whose teacher uses only `classes` on the calibration data,
    or None where it does not apply or would keep over SPLIT_SHARE of the dense params."""
    k = len(classes)
    if split_unsupported(view, opset) or not 0 < k < view.out_features:
        return None
    rank = min(SPLIT_RANK, view.in_features, view.out_features - k)
    before, after = cost.dense(view), cost.split(view, k, rank)
    if after.params > SPLIT_SHARE * before.params or after.flops >= before.flops:
        return None
    c = _base(view, 1)
    c.decision, c.form, c.rank, c.dense_classes = "factorize", "split", rank, sorted(int(i) for i in classes)
    c.params_after, c.flops_after = after.params, after.flops
    c.note = (f"class split: the {k} classes the teacher ranks in its top {SPLIT_TOP} on the calibration data keep "
              f"their weights; the other {view.out_features - k} share a rank-{rank} pair (inputs that need "
              "those classes are read worse than by the teacher)")
    return c


def _filter_reason(view: LayerView, options: Options) -> str | None:
    if options.include and not any(re.search(p, view.node) for p in options.include):
        return "not matched by --include"
    hit = next((p for p in options.exclude if re.search(p, view.node)), None)
    if hit is not None:
        return f"excluded by --exclude '{hit}'"
    if view.weight_params < options.min_params:
        return f"{view.weight_params} weight params < --min-params {options.min_params}"
    return None


def _decide_all(views: list[LayerView], policy: RankPolicy, options: Options, opset: int,
                spectra: Spectra, splits: dict[str, Candidate] | None = None) -> dict[str, Candidate]:
    out: dict[str, Candidate] = {}
    primary: dict[str, Candidate] = {}
    for v in views:
        if splits and v.node in splits:  # fixed by the data, whatever the budget's threshold
            out[v.node] = primary[v.shared_key] = splits[v.node]
            continue
        h = options.requested_heads
        note = heads_unsupported(v, opset) if h > 1 else None
        if note:
            h = 1
        first = primary.get(v.shared_key)
        if first is not None:
            c = _base(v, first.heads)
            c.params_before = 0
            c.shares_factors_with = first.node
            c.form, c.note, c.orientation = first.form, note, first.orientation
            if first.decision == "factorize":
                a = cost.after(oriented(v, first.orientation), first.rank or 1, first.heads)
                c.decision, c.rank, c.flops_after = "factorize", first.rank, a.flops
                c.energy_kept = first.energy_kept
            else:
                c.reason = f"shares its weight with '{first.node}', which is skipped"
            out[v.node] = c
            continue
        s = spectra.values(v)
        # an energy threshold is a floor: rounding a layer down below it to make it fit would keep less of it
        # than of every other layer (the recogniser's 1x3 neck convs: 89% instead of ~100%, a tenth of its
        # lines lost for 3% of its params), so energy policies skip such a layer; fixed ranks may round down
        c = decide(v, raw_rank(policy, s, v.full_rank), h, options.guard, options.rank_multiple, s,
                   round_down=policy.kind in ("rank", "rank_ratio"))
        c.note = note
        if h == 1 and options.orientation == "auto" and policy.kind in ("energy", "param_ratio"):
            c = _orient(v, c, policy, options, spectra)
        if policy.kind == "rank" and policy.value > v.full_rank:
            c.note = "; ".join(filter(None, [c.note, f"--rank clamped to full rank {v.full_rank}"]))
        primary[v.shared_key] = c
        out[v.node] = c
    return out


def _orient(view: LayerView, c: Candidate, policy: RankPolicy, options: Options, spectra: Spectra) -> Candidate:
    """The conv pair with its k x k kernel on the up side (`ir.layers.kernel_up`) where that keeps the energy
    threshold with no more params and FLOPs than `c`, the kernel-down decision; else `c`. Ties go up: at the same
    cost the k x k conv with C_out outputs runs nearer its FLOP ideal than one with r outputs. Energy is
    comparable across the two: both SVDs split the same Frobenius norm. Rank policies keep the kernel down:
    a rank asked for is a rank of the form the user knows."""
    if kernel_up_unsupported(view) is not None:
        return c
    up = kernel_up(view)
    s = spectra.values(up)
    cu = decide(up, raw_rank(policy, s, up.full_rank), 1, options.guard, options.rank_multiple, s, round_down=False)
    if cu.decision != "factorize":
        return c
    if c.decision == "factorize" and (cu.params_after > c.params_after or cu.flops_after > c.flops_after):
        return c
    other = (f"rank {c.rank}, {c.params_after} params and {c.flops_after} FLOPs" if c.decision == "factorize"
             else "no rank that makes it smaller and cheaper")
    cu.note = "; ".join(filter(None, [c.note, f"k x k kernel on the up side (a 1x1 conv to the rank, then the k x k "
                                               f"conv); with the kernel down the same energy needed {other}"]))
    cu.orientation = KERNEL_UP
    return cu


def _param_total(cands: dict[str, Candidate]) -> int:
    return sum(c.params_after if c.decision == "factorize" else c.params_before for c in cands.values())


def _solve_param_ratio(views: list[LayerView], options: Options, opset: int, spectra: Spectra,
                       splits: dict[str, Candidate]) -> tuple[dict[str, Candidate], list[str]]:
    """Highest shared energy threshold whose plan keeps at most `ratio` of the candidate params."""
    ratio = options.policy.value
    weights = {v.shared_key: cost.dense(v).params for v in reversed(views)}
    budget = ratio * sum(weights.values())
    lo, hi = 0.0, 1.0
    best = _decide_all(views, RankPolicy("energy", 1e-9), options, opset, spectra, splits)
    warnings: list[str] = []
    if _param_total(best) > budget:
        warnings.append(f"--param-ratio {ratio:g} is not reachable: the smallest plan keeps "
                        f"{_param_total(best) / max(sum(weights.values()), 1):.3f} of the candidate params")
        return best, warnings
    for _ in range(30):
        mid = (lo + hi) / 2
        trial = _decide_all(views, RankPolicy("energy", mid), options, opset, spectra, splits)
        if _param_total(trial) <= budget:
            lo, best = mid, trial
        else:
            hi = mid
    return best, warnings


def build_plan(model_path: str, sha256: str, opset: int, found: list, options: Options,
               spectra: Spectra, classes: dict[str, list[int]] | None = None) -> Plan:
    """Decide every candidate from `locate`'s findings under the options' policy. `classes` (by node: the
    classes a classifier head's teacher uses on the calibration data) gives those heads the class-split form
    where it pays (`decide_split`); the budget left is spread over the other layers."""
    options.validate()
    views: list[LayerView] = []
    filtered: dict[str, Candidate] = {}
    for f in found:
        if isinstance(f, LayerView):
            why = _filter_reason(f, options)
            if why:
                c = _base(f, options.requested_heads)
                c.reason = why
                filtered[f.node] = c
            else:
                views.append(f)
    policy = options.policy
    warnings: list[str] = []
    for v in tqdm(views, desc="SVD", unit="layer", disable=None, leave=False):
        spectra.values(v)
    if policy.kind == "rank" and views and policy.value > max(v.full_rank for v in views):
        raise InputError(f"--rank {int(policy.value)} is above the full rank of every candidate layer "
                         f"(largest is {max(v.full_rank for v in views)}); choose a smaller rank.")
    splits = {v.node: c for v in views if v.node in (classes or {})
              and (c := decide_split(v, (classes or {})[v.node], options, opset)) is not None}
    if policy.kind == "param_ratio":
        decided, warnings = _solve_param_ratio(views, options, opset, spectra, splits)
    else:
        decided = _decide_all(views, policy, options, opset, spectra, splits)
    candidates = []
    for f in found:
        if isinstance(f, LayerView):
            candidates.append(decided.get(f.node) or filtered[f.node])
        else:
            candidates.append(Candidate(node=f.node, op=f.op, weight_shape=list(f.weight_shape),
                                        reason=f.reason, params_before=f.params, graph=f.graph or None))
    if any(c.graph for c in candidates):  # a model with subgraph layers: every entry says where it is
        for c in candidates:
            c.graph = c.graph or "main"
    plan = Plan(str(model_path), sha256, opset, options, candidates, warnings)
    note_channels_first(plan, {v.node: v for v in views})
    return plan


CHANNELS_FIRST = ("written as a Transpose of its rank features and a 1x1 Conv, which takes over the bias Add, the "
                  "Transpose back to channels-first and the per-channel scales beside it")


def channels_first(view: LayerView, cand: Candidate) -> ChannelsFirst | None:
    """The channels-first tail a plain pair writes itself (`passes/factorize.py`, `_up_channels_first`), or
    None: a right-side MatMul whose output goes back to channels-first (`view.channels_first`), not split by
    classes, not headed."""
    if cand.heads > 1 or cand.dense_classes is not None or view.op != "MatMul" or view.side != "right":
        return None
    return view.channels_first


def note_channels_first(plan: Plan, views: dict[str, LayerView]) -> None:
    """Say on each factorised layer that is written channels-first that it is (once)."""
    for c in plan.candidates:
        view = views.get(c.node)
        if c.decision == "factorize" and view is not None and channels_first(view, c) is not None \
                and CHANNELS_FIRST not in (c.note or ""):
            c.note = "; ".join(filter(None, [c.note, CHANNELS_FIRST]))


def load_plan(path: str | Path) -> Plan:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: plan file not found; write one with `onnx-inher plan MODEL -o {p}`.")
    return Plan.from_json(p.read_text(), str(p))


def apply_edits(plan: Plan, views: dict[str, LayerView], spectra: Spectra) -> Plan:
    """Recompute the numbers of a (possibly hand-edited) plan; its ranks and heads are applied as written."""
    owners: dict[tuple[str, int, int], str] = {}  # as `Factorize` names shared factors: first of each key
    for c in plan.candidates:
        view = views.get(c.node)
        if c.decision not in ("factorize", "skip"):
            raise InputError(f"plan: node '{c.node}' has decision '{c.decision}'; use 'factorize' or 'skip'.")
        if c.decision != "factorize":
            continue
        if view is None:
            raise InputError(f"plan names node '{c.node}', which is not a factorisable layer of this model; "
                             "regenerate the plan for this model.")
        if c.dense_classes is not None:
            _edit_split(c, view, plan.opset)
            continue
        if not isinstance(c.heads, int) or c.heads < 1:
            raise InputError(f"plan gives node '{c.node}' heads {c.heads}; use an integer >= 1.")
        view = _edit_orientation(c, view)
        if not isinstance(c.rank, int) or not 1 <= c.rank <= view.full_rank:
            raise InputError(f"plan gives node '{c.node}' rank {c.rank}; it must be an integer in "
                             f"1..{view.full_rank} (its full rank).")
        if c.heads > 1:
            why = heads_unsupported(view, plan.opset)
            if why:
                c.heads, c.note = 1, why
        a = cost.after(view, c.rank, c.heads)
        c.form = "heads" if c.heads > 1 else "pair"
        c.params_after, c.flops_after = a.params, a.flops
        # a layer that reuses another's factors (same weight, rank and heads) adds no parameters
        owner = owners.setdefault((view.shared_key, c.rank, c.heads), c.node)
        c.shares_factors_with = owner if owner != c.node else None
        if c.shares_factors_with:
            c.params_after = 0
        c.energy_kept = round(energy_kept(spectra.values(view), c.rank), 6)
        c.reason = None
    return plan


def orientation_problem(c: Candidate, view: LayerView) -> str | None:
    """Why a plan entry's `orientation` cannot be applied to its layer, None when it can (or is absent): a known
    value, on a layer and a form that take it. Plan edits and `Factorize` check plans with it."""
    if c.orientation is None:
        return None
    if c.orientation != KERNEL_UP:
        return f"unknown orientation '{c.orientation}'; use '{KERNEL_UP}' or leave it out"
    return (kernel_up_unsupported(view) or ("heads keep the kernel on the down side" if c.heads > 1 else None)
            or ("a fold splits a k x k down conv" if c.fold is not None else None))


def _edit_orientation(c: Candidate, view: LayerView) -> LayerView:
    """Check a plan entry's `orientation`; the view its rank and costs are read from."""
    why = orientation_problem(c, view)
    if why is not None:
        raise InputError(f"plan gives node '{c.node}' orientation '{c.orientation}', which it cannot take ({why}); "
                         "remove its orientation.")
    return oriented(view, c.orientation)


def _edit_split(c: Candidate, view: LayerView, opset: int) -> None:
    """Check and cost a class-split entry of a plan file (its classes and rank are applied as written)."""
    why = split_unsupported(view, opset)
    if why:
        raise InputError(f"plan gives node '{c.node}' dense_classes, but it cannot be class-split ({why}); "
                         "remove dense_classes from that entry.")
    classes = c.dense_classes or []
    out = view.out_features
    if not classes or not all(isinstance(i, int) and 0 <= i < out for i in classes) \
            or len(set(classes)) != len(classes) or len(classes) >= out:
        raise InputError(f"plan gives node '{c.node}' dense_classes that are not distinct class indices in "
                         f"0..{out - 1} (some, not all); regenerate the plan or fix the list.")
    full = min(view.in_features, out - len(classes))
    if not isinstance(c.rank, int) or not 1 <= c.rank <= full:
        raise InputError(f"plan gives node '{c.node}' rank {c.rank} for its other classes; it must be an integer "
                         f"in 1..{full}.")
    c.dense_classes = sorted(classes)
    c.heads, c.form, c.shares_factors_with, c.reason, c.energy_kept = 1, "split", None, None, None
    a = cost.split(view, len(classes), c.rank)
    c.params_after, c.flops_after = a.params, a.flops
