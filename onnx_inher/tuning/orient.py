"""Which side of a conv pair carries the k x k kernel, chosen by the output error on calibration data.

The plan chooses it from the weights alone (`planning.plan._orient`): the kernel goes up where that keeps the
budget's energy threshold with no more params and FLOPs. Both SVDs split the same Frobenius energy, but equal
energy is not equal output error: with the kernel up, the PP-OCRv5 recogniser's plain student read 32.1% of
frames as its teacher instead of 39.4%, while CREPE tiny's rose from 48.9% to 96.8% pitch agreement
(benchmarks/RESULTS.md, issue 18). With calibration data the error each orientation makes is known exactly: a
pair in either orientation is one conv whose weight is the factors' product, so its output error on the data
is `|(W - W_r) S|^2` with `S S^T` the layer's patch Gram (`tuning.calibrate`), the same for both.

`reorient` moves a plain conv pair to the other side where that side's largest rank within the pair's params
and FLOPs errs at least `MARGIN` less. It runs where the plan's ranks are being set from data anyway, before the
sensitivity allocation (`run`'s default), whose measured damage then refines the ranks. `compress
--calibration` with the energy allocation keeps the plan's orientation and ranks: there calibration changes
only the factors, so a comparison with plain SVD is at equal size.
"""

from __future__ import annotations

import numpy as np

from onnx_inher.ir.layers import KERNEL_UP, LayerView, kernel_up, kernel_up_unsupported, oriented
from onnx_inher.planning import cost
from onnx_inher.planning.plan import Candidate, Plan, decide
from onnx_inher.planning.svd import OutputGram, approximation_error, data_aware_svd, truncate
from onnx_inher.tuning.allocate import weight_from_matrices
from onnx_inher.tuning.calibrate import layer_gram

MARGIN = 0.05  # the other side must err this much less: at equal error the plan's side stays (ties went up)


def reorient(plan: Plan, views: dict[str, LayerView], grams: dict[str, np.ndarray | OutputGram]) -> list[str]:
    """Give each plain conv pair of `plan` the orientation whose factors err less on the calibration data
    (`grams`: the calibration's input Grams, a conv's over its patches), at no more params and FLOPs; the
    entries change in place. Returns one note naming the layers moved, or nothing."""
    if plan.options.orientation != "auto":
        return []
    shared = {c.shares_factors_with for c in plan.candidates if c.shares_factors_with}
    moved: list[str] = []
    for c in plan.candidates:
        view = views.get(c.node)
        if view is None or not _movable(c, view, shared):
            continue
        patch = grams.get(view.base_key)
        if patch is None or isinstance(patch, OutputGram):
            continue
        now = oriented(view, c.orientation)
        other = view if now.kernel_up else kernel_up(view)
        rank = _rank_within(other, c.params_after, c.flops_after, plan.options.rank_multiple)
        if rank is None:
            continue
        err_now = pair_error(view, now, int(c.rank or 1), patch, grams)
        err_other = pair_error(view, other, rank, patch, grams)
        if err_other >= (1 - MARGIN) * err_now:
            continue
        side, was = ("kernel up", "kernel down") if other.kernel_up else ("kernel down", "kernel up")
        _take(c, other, rank, f"{side} by the output error on the calibration data: {err_other:.3f} at rank "
                              f"{rank} vs {err_now:.3f} at rank {c.rank} ({was})")
        moved.append(f"{c.node} ({side}, {err_other:.3f} vs {err_now:.3f})")
    if not moved:
        return []
    return [f"calibration: {len(moved)} conv pair(s) put the k x k kernel on the other side, where its factors err "
            f"less on the data at no more params and FLOPs: {', '.join(moved[:3])}{' ...' if len(moved) > 3 else ''}"]


def _movable(c: Candidate, view: LayerView, shared: set[str]) -> bool:
    """A factorised plain pair of its own weight, unfolded, outside subgraphs, with a second orientation."""
    return (c.decision == "factorize" and c.heads <= 1 and bool(c.rank) and c.dense_classes is None and not c.fold
            and not c.shares_factors_with and c.node not in shared and not view.scope
            and kernel_up_unsupported(view) is None)


def _rank_within(view: LayerView, params: int, flops: int, multiple: int) -> int | None:
    """The largest rank (a multiple of `multiple`, or the full rank) at which `view`'s pair keeps within
    `params` and `flops`; None when none does."""
    step = max(1, multiple)
    ranks = sorted({*range(step, view.full_rank + 1, step), view.full_rank})
    fits = [r for r in ranks if (c := cost.pair(view, r)).params <= params and c.flops <= flops]
    return fits[-1] if fits else None


def pair_error(view: LayerView, side: LayerView, rank: int, patch: np.ndarray,
               grams: dict[str, np.ndarray | OutputGram]) -> float:
    """Relative output error `|(W - W_r) S| / |W S|` of `view` (the conv, kernel down) when factorised as
    `side` at `rank` with the calibration's whitened SVD, `S S^T` the conv's patch Gram `patch`."""
    gram = layer_gram(side, grams)
    assert gram is not None and not isinstance(gram, OutputGram)
    f = truncate(data_aware_svd(side.matrices(), gram), rank)
    approx = weight_from_matrices(side, f.up.astype(np.float64) @ f.down.astype(np.float64))
    m = view.matrices()
    return approximation_error(m, approx.reshape(m.shape), np.asarray(patch).reshape(m.shape[2], m.shape[2]))


def _take(c: Candidate, side: LayerView, rank: int, why: str) -> None:
    """`c` as `side`'s pair at `rank`: its costs, energy and break-even rank as planning gives them."""
    s = np.linalg.svd(side.matrices().astype(np.float64), compute_uv=False)
    fresh = decide(side, rank, 1, False, 1, s)
    c.orientation = KERNEL_UP if side.kernel_up else None
    c.rank, c.params_after, c.flops_after = fresh.rank, fresh.params_after, fresh.flops_after
    c.energy_kept, c.breakeven_rank = fresh.energy_kept, fresh.breakeven_rank
    c.note = "; ".join(filter(None, [_without_orientation_note(c.note), why]))


PLAN_CLAUSES = ("k x k kernel on the up side", "with the kernel down the same energy needed")


def _without_orientation_note(note: str | None) -> str | None:
    """`note` less the plan's clauses on the orientation (`planning.plan._orient`), which the data overruled."""
    if not note:
        return note
    kept = [part for part in note.split("; ") if not part.startswith(PLAN_CLAUSES)]
    return "; ".join(kept) or None
