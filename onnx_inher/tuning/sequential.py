"""Sequential (asymmetric) calibration: each layer's factors fit the teacher's output from the student's input.

Whitening each layer with the teacher's own input Gram matrix (`calibrate`) minimises that layer's error
as if every layer before it were exact. They are not: in a 31-layer recogniser at half its params, every
truncation shifts the inputs of all later layers, and the errors compound. Zhang et al. 2015 ("Accelerating
Very Deep Convolutional Networks", asymmetric reconstruction) fit each layer, in graph order, to the
teacher's output *from the inputs the compressed network actually produces*:

    minimise over rank-r M_r:  sum_x |M x_t - M_r x_s|^2

with `x_t` the teacher's input to the layer and `x_s` the student's (earlier layers already factorised).
With `C_ss = X_s^T X_s` and `C_ts = X_t^T X_s` the unconstrained solution is `M' = M C_ts C_ss^-1`, and the
best rank-r `M_r` is the `C_ss`-whitened truncation of `M'` (the same `whitened_svd`). We write
`M' = M + M (C_ts - C_ss)(C_ss + lambda I)^-1`, so that when nothing upstream changed (`x_s = x_t`, e.g.
at full rank) `M' = M` exactly, damping or not.

Cost: two passes over the calibration samples per layer (teacher and student inputs), in one ONNX Runtime
session whose layer weights are graph inputs (as in the sensitivity probe), so nothing is rebuilt per layer.
Memory per layer: its Gram matrices (`in x in`, twice) and one batch of activations. Layers whose weight is
shared by several nodes, on the left of a product, transposed-input Gemms, ConvTranspose and layers inside
subgraphs keep the teacher-whitened factors.
"""

from __future__ import annotations

import tempfile
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from onnx import ModelProto
from tqdm import tqdm

from onnx_inher import _env
from onnx_inher.datasets.text import ATTENTION_MASK as MASK
from onnx_inher.ir.layers import LayerView
from onnx_inher.planning.plan import Plan
from onnx_inher.planning.svd import WHITENING_DAMPING, balanced, data_aware_svd, response_svd, truncate, whitened_svd
from onnx_inher.progress import Heartbeat
from onnx_inher.runtime import runnable_session, with_outputs
from onnx_inher.tuning.allocate import probe_model, weight_from_matrices
from onnx_inher.tuning.calibrate import (
    CONV_ROWS,
    activation_input,
    as_svd,
    batches,
    by_outputs,
    conv_patches,
    response_rows,
    token_rows,
)

Svd = tuple[np.ndarray, np.ndarray, np.ndarray]


def sequential_layers(model: ModelProto, views: dict[str, LayerView], the_plan: Plan) -> list[LayerView]:
    """The plan's factorised layers this method fits, in graph order (see the module docstring for the rest)."""
    chosen = [views[c.node] for c in the_plan.candidates
              if c.decision == "factorize" and c.node in views and c.rank and not views[c.node].scope
              and c.dense_classes is None  # a class-split head keeps its teacher-whitened rest
              and c.orientation is None]  # a kernel-up pair keeps its teacher-whitened factors (`layer_gram`)
    users = Counter(v.shared_key for v in chosen)
    fit = [v for v in chosen if users[v.shared_key] == 1 and v.op in ("Conv", "MatMul", "Gemm")
           and activation_input(v, model) is not None]
    return sorted(fit, key=lambda v: v.node_index)


def _rows(view: LayerView, x: np.ndarray, mask: np.ndarray | None, seed: list[int]) -> np.ndarray:
    """`[g, rows, in]` float64: a Conv's sampled input patches (the same positions for the same seed and
    shape), or a MatMul/Gemm's input rows (padding dropped)."""
    if view.op == "Conv":
        patches = conv_patches(x, view, max(CONV_ROWS, 2 * view.in_features), np.random.default_rng(seed))
        return np.ascontiguousarray(patches.transpose(1, 0, 2))
    return token_rows(np.asarray(x), mask)[None]


def _inherited(m: np.ndarray, c_ss: np.ndarray, c_ts: np.ndarray, damping: float) -> np.ndarray:
    """`M + M (C_ts - C_ss)(C_ss + lambda I)^-1` per group: the least-squares layer on the student's inputs."""
    out = np.empty(m.shape, dtype=np.float64)
    for g in range(len(m)):
        c = (c_ss[g] + c_ss[g].T) / 2
        floor = damping * max(float(np.trace(c)) / len(c), np.finfo(np.float64).tiny)
        delta = np.linalg.solve(c + floor * np.eye(len(c)), (c_ts[g] - c_ss[g]).T).T
        out[g] = m[g] + m[g] @ delta
    return out


def _held_out_error(m: np.ndarray, approx: np.ndarray, c_tt: np.ndarray, c_ts: np.ndarray, c_ss: np.ndarray,
                    rows: np.ndarray | None) -> float:
    """`sum |D (M x_t - A x_s)|^2` over the rows whose Grams are given (`D` = the class-head row weights)."""
    d = np.ones(m.shape[1]) if rows is None else np.asarray(rows, dtype=np.float64)
    total = 0.0
    for g in range(len(m)):
        mg, ag = d[:, None] * m[g], d[:, None] * approx[g]
        total += float(np.trace(mg @ c_tt[g] @ mg.T) - 2 * np.trace(mg @ c_ts[g] @ ag.T)
                       + np.trace(ag @ c_ss[g] @ ag.T))
    return total


def _reconstruction(f: Any) -> np.ndarray:
    return f.up.astype(np.float64) @ f.down.astype(np.float64)


def _projector(svd: Svd, rank: int, lead: np.ndarray | None = None) -> np.ndarray:
    """`U_r U_r^T L` per group: what a `response_svd` truncation does to the layer's responses."""
    u = svd[0][:, :, :rank].astype(np.float64)
    p = u @ np.swapaxes(u, 1, 2)
    return p if lead is None else p @ lead


def _fit_by_outputs(view: LayerView, rank: int, halves: list[list[np.ndarray | None]], teacher_gram: Any,
                    damping: float, kept: list[str]) -> tuple[Any, bool]:
    """Graph-order fit of a layer whitened on its output side (`calibrate.by_outputs`), and whether it won.

    The same least squares as for input Grams, on the responses `y = M x` instead of the inputs: the map
    `L = I + (C_ts - C_ss)(C_ss + lambda I)^-1` takes the teacher's layer applied to the student's inputs to
    the teacher's own responses, and the rank-r `U_r U_r^T L M` is the best reduced-rank version of it
    (`response_svd` with `lead=L`). All matrices are `out x out`; the held-out rule is the same."""
    m = view.matrices()
    eye = np.broadcast_to(np.eye(m.shape[1]), (m.shape[0], m.shape[1], m.shape[1]))
    (ss_a, ts_a, tt_a), (ss_b, ts_b, tt_b) = halves
    if teacher_gram is not None and ss_a is not None and ss_b is not None:
        lead = _inherited(eye, ss_a, ts_a, damping)
        e_fit = _held_out_error(eye, _projector(response_svd(m, ss_a, damping, lead=lead), rank, lead), tt_b,
                                ts_b, ss_b, None)
        e_white = _held_out_error(eye, _projector(response_svd(m, tt_a, damping), rank), tt_b, ts_b, ss_b, None)
        if not e_fit < e_white:
            kept.append(f"{view.node} (held-out error {e_fit:.3g} fitted vs {e_white:.3g} whitened)")
            return balanced(truncate(data_aware_svd(m, teacher_gram, damping), rank)), False
    ss, ts = [a + b if a is not None and b is not None else a if a is not None else b
              for a, b in zip(halves[0][:2], halves[1][:2], strict=True)]
    lead = _inherited(eye, ss, ts, damping)
    return balanced(truncate(response_svd(m, ss, damping, lead=lead), rank)), True


def sequential_svds(model: ModelProto, views: dict[str, LayerView], the_plan: Plan, feeds: dict[str, np.ndarray],
                    rows: dict[str, np.ndarray] | None = None, damping: float = WHITENING_DAMPING,
                    grams: dict[str, np.ndarray] | None = None) -> tuple[dict[str, Svd], list[str]]:
    """Rank-r factors (as `(u, s, vt)` at the plan's rank, by shared weight) fitted in graph order, and notes.

    A fit is kept only where it predicts rows it was not fitted on: the calibration batches are split in
    two (even and odd batches; even and odd rows when there is one batch), the layer is fitted on the first
    half and, for comparison, whitened with the teacher's inputs of that half, and the two output errors on
    the second half decide; the loser's factors are not used (whitened ones come from `grams`, all rows).
    The correction `(C_ss + lambda I)^-1 (C_ts - C_ss)` is an `in x in` matrix estimated from the rows, and
    with few of them it fits the samples, not the layer. Measured on all-MiniLM-L6-v2 at half its MatMul
    params (held-out fortunes, embedding cosine / Spearman): with 64 calibration sentences (~2,000 token
    rows) 0.672 / 0.652 teacher-whitened, 0.653 / 0.660 every layer fitted, and the fitted student also
    distilled worse (0.739 vs 0.777 after 120 steps); with 256 sentences 0.708 / 0.692 whitened, 0.731 / 0.728
    fitted. With this rule: 0.674 / 0.655 (64) and 0.733 / 0.734 (256), better than either everywhere. A
    count rule (fit only with >= 8 rows per input) got 0.672 / 0.652 and 0.725 / 0.725, and dropped six of
    the recogniser's layers, among them its squeeze-excitation convs (256 pooled rows for 240-480 inputs):
    frame agreement at init 93.2% instead of 94.3%. A layer whose fit loses keeps its teacher-whitened
    factors; a chosen fit is refitted on all the rows; later layers are fitted to the inputs either gives."""
    layers = sequential_layers(model, views, the_plan)
    if not layers:
        return {}, []
    ranks = {c.node: int(c.rank) for c in the_plan.candidates if c.decision == "factorize" and c.rank}
    probe, names = probe_model(model, layers)
    graph = {i.name for i in model.graph.input}
    # what each layer's fit reads: its input, or for a layer whitened on its output side its node output
    sources = {v.node: model.graph.node[v.node_index].output[0] if by_outputs(v) else activation_input(v, model) or ""
               for v in layers}
    fetch = sorted({s for s in sources.values() if s not in graph})
    student = {names[v.node]: v.weight for v in layers}
    out: dict[str, Svd] = {}
    kept: list[str] = []
    quiet = _env.progress_disabled()
    with tempfile.TemporaryDirectory(prefix="onnx-inher-sequential-") as spill:
        # the teacher's inputs from the teacher itself (constant weights: ORT prepacks them), the student's
        # from the probe, whose layer weights are graph inputs
        session = reference = None
        if fetch:  # separate folders: a model over 2 GB is spilled to a file that must outlive its session
            (Path(spill) / "probe").mkdir()
            (Path(spill) / "teacher").mkdir()
            session = runnable_session(with_outputs(probe, fetch, Path("calibration model")), Path(spill) / "probe")
            reference = runnable_session(with_outputs(model, fetch, Path("calibration model")), Path(spill) / "teacher")
        todo = batches(model, feeds)
        beat = Heartbeat("sequential calibration", len(layers), "layer")
        for done, view in enumerate(tqdm(layers, desc="sequential calibration", unit="layer", disable=quiet,
                                         leave=False)):
            beat.tick(done)
            src = sources[view.node]
            halves: list[list[np.ndarray | None]] = [[None, None, None], [None, None, None]]  # ss, ts, tt
            for b, batch in enumerate(todo):
                seed = [0, b, zlib.crc32(view.node.encode())]
                if src in batch:
                    xt = xs = batch[src]
                else:
                    assert session is not None and reference is not None
                    xt = reference.run([src], batch)[0]
                    xs = session.run([src], {**batch, **student})[0]
                mask = batch.get(MASK)
                if by_outputs(view):
                    rt, rs = response_rows(view, xt, mask), response_rows(view, xs, mask)
                else:
                    rt, rs = _rows(view, xt, mask, seed), _rows(view, xs, mask, seed)
                split = [(b % 2, rt, rs)] if len(todo) > 1 else \
                    [(0, rt[:, ::2], rs[:, ::2]), (1, rt[:, 1::2], rs[:, 1::2])]
                for h, t, u in split:
                    grams_h = (np.swapaxes(u, 1, 2) @ u, np.swapaxes(t, 1, 2) @ u, np.swapaxes(t, 1, 2) @ t)
                    halves[h] = [g if acc is None else acc + g for acc, g in zip(halves[h], grams_h, strict=True)]
            layer_rows = (rows or {}).get(view.shared_key) if view.op != "Conv" else None
            teacher_gram = (grams or {}).get(view.shared_key)
            if by_outputs(view):
                f, won = _fit_by_outputs(view, ranks[view.node], halves, teacher_gram, damping, kept)
                if won:
                    out[view.shared_key] = as_svd(f)
                student[names[view.node]] = weight_from_matrices(view, _reconstruction(f).astype(np.float32))
                continue
            m0 = view.matrices().astype(np.float64)

            def fitted(c_ss: np.ndarray, c_ts: np.ndarray, m0: np.ndarray = m0, view: LayerView = view,
                       layer_rows: np.ndarray | None = layer_rows) -> Any:
                m = _inherited(m0, c_ss, c_ts, damping).astype(np.float32)
                gram = c_ss if view.op == "Conv" else c_ss[0]
                return balanced(truncate(whitened_svd(m, gram, damping, rows=layer_rows), ranks[view.node]))

            (ss_a, ts_a, tt_a), (ss_b, ts_b, tt_b) = halves
            f = None
            if teacher_gram is not None and ss_a is not None and ss_b is not None and src not in graph:
                # both procedures see the same half: whitening by the teacher's inputs of half A, the fit by
                # the student's; both are scored on half B
                white_a = whitened_svd(view.matrices(), tt_a if view.op == "Conv" else tt_a[0], damping,
                                       rows=layer_rows)
                e_white = _held_out_error(m0, _reconstruction(truncate(white_a, ranks[view.node])), tt_b, ts_b,
                                          ss_b, layer_rows)
                e_fit = _held_out_error(m0, _reconstruction(fitted(ss_a, ts_a)), tt_b, ts_b, ss_b, layer_rows)
                if not e_fit < e_white:
                    kept.append(f"{view.node} (held-out error {e_fit:.3g} fitted vs {e_white:.3g} whitened)")
                    f = balanced(truncate(whitened_svd(view.matrices(), teacher_gram, damping, rows=layer_rows),
                                          ranks[view.node]))
            if f is None:
                both = [a + b if a is not None and b is not None else a if a is not None else b
                        for a, b in zip(halves[0][:2], halves[1][:2], strict=True)]
                f = fitted(both[0], both[1])
                out[view.shared_key] = as_svd(f)
            student[names[view.node]] = weight_from_matrices(view, _reconstruction(f).astype(np.float32))
    notes = [f"calibration: {len(out)} layer(s) fitted in graph order to the teacher's outputs from the "
             "student's inputs (asymmetric reconstruction)"]
    if kept:
        notes.append(f"calibration: {len(kept)} layer(s) kept their teacher-whitened factors, whose output error "
                     "on held-out calibration rows was lower than the graph-order fit's: "
                     f"{', '.join(kept[:3])}{', ...' if len(kept) > 3 else ''}")
    return out, notes
