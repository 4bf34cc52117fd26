"""Calibration for data-aware (whitened) SVD: each factorised layer's input Gram matrix `X^T X`.

Plain SVD keeps the directions of largest *weight* energy; a layer's inputs, though, are far from
isotropic (MiniLM's hidden states have a few outlier features), so those directions are not the
ones that matter for its *output*. SVD-LLM's fix needs only the Gram matrix of each layer's inputs
on some real data: we run the teacher in ONNX Runtime with those inputs exposed as extra graph
outputs, batch by batch, and accumulate `X^T X` in float64 (the per-layer memory is `in x in`, not
the activations). Padding tokens are left out when the data has an `attention_mask`, since their
hidden states never reach a mask-pooled embedding. `whitened_svd` then uses the matrices.

Only MatMul/Gemm layers whose weight is on the right (`y = x W`, the activation's last axis is the
input features) are whitened; convolutions and left-side products keep plain SVD (said in the plan's
warnings).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from onnx import ModelProto
from tqdm import tqdm

from onnx_inher import _env
from onnx_inher.datasets import input_specs, load_data
from onnx_inher.datasets.text import ATTENTION_MASK as MASK
from onnx_inher.errors import InputError
from onnx_inher.ir.layers import LayerView
from onnx_inher.planning.plan import Plan, Spectra
from onnx_inher.planning.svd import Factors, balanced, truncate, whitened_svd
from onnx_inher.runtime import runnable_session, with_outputs

SAMPLES = 256
BATCH = 32


def activation_input(view: LayerView, model: ModelProto) -> str | None:
    """The tensor whose last axis a right-side MatMul/Gemm contracts with its weight, or None."""
    if view.op not in ("MatMul", "Gemm") or view.side != "right" or view.groups != 1:
        return None
    if view.op == "Gemm" and view.attrs.get("transA"):
        return None
    return model.graph.node[view.node_index].input[1 - view.weight_input]


def calibration_feeds(spec: str, model: ModelProto, samples: int = SAMPLES, seed: int = 0,
                      dims: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """Up to `samples` inputs from a DATA spec (as for `distill --data`), a seeded choice of them."""
    data = load_data(spec, input_specs(model), seed=seed, dims=dims, model=model)
    n = len(data)
    index = np.sort(np.random.default_rng(seed).permutation(n)[:samples]) if n > samples else np.arange(n)
    return data.batch(index)


def token_rows(x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """The activation as `[rows, in]` float64, padding positions dropped when the mask lines up."""
    if mask is not None and x.ndim == 3 and x.shape[:2] == mask.shape:
        x = x[mask.astype(bool)]
    return x.reshape(-1, x.shape[-1]).astype(np.float64)


def _dynamic_length(model: ModelProto, feeds: dict[str, np.ndarray]) -> list[str]:
    """Inputs laid out `[sample, token, ...]` like the attention mask, if every one has a free token axis."""
    mask = feeds.get(MASK)
    if mask is None or mask.ndim != 2:
        return []
    keep = mask.astype(bool)
    if not np.array_equal(keep, np.arange(mask.shape[1])[None, :] < keep.sum(1)[:, None]):
        return []  # not right-padded (left padding, holes): cropping the tail would cut real tokens
    names = [k for k, v in feeds.items() if v.ndim >= 2 and v.shape[:2] == mask.shape]
    declared = {i.name: i.type.tensor_type.shape.dim for i in model.graph.input}
    for name in names:
        dims = declared.get(name)
        if dims is None or len(dims) < 2 or dims[1].HasField("dim_value"):
            return []
    return names


def batches(model: ModelProto, feeds: dict[str, np.ndarray], batch_size: int = BATCH) -> list[dict[str, np.ndarray]]:
    """The samples in batches; for padded text with a free token axis, longest first and cropped to the
    batch's longest sentence, which halves the work on fortunes (mean 31 of 64 tokens). Padding never
    reaches a mask-pooled output nor a calibration row, so nothing measured changes but float order."""
    n = len(next(iter(feeds.values())))
    cropped = _dynamic_length(model, feeds)
    lengths = feeds[MASK].astype(bool).sum(1) if cropped else np.zeros(n, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    out = []
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        width = max(int(lengths[idx].max()), 1)
        out.append({k: np.ascontiguousarray(v[idx, :width] if k in cropped else v[idx]) for k, v in feeds.items()})
    return out


def input_grams(model: ModelProto, tensors: Sequence[str], feeds: dict[str, np.ndarray],
                batch_size: int = BATCH) -> dict[str, np.ndarray]:
    """`X^T X` (float64) of each named tensor over every sample of `feeds`, run batch by batch in ORT."""
    names = [t for t in dict.fromkeys(tensors) if t not in feeds]  # graph inputs are read from the feeds
    grams: dict[str, np.ndarray] = {}
    for name in dict.fromkeys(tensors):
        if name in feeds:
            x = token_rows(np.asarray(feeds[name]), feeds.get(MASK))
            grams[name] = x.T @ x
    if not names:
        return grams
    fetched = with_outputs(model, names, Path("calibration model"))
    quiet = _env.progress_disabled()
    with tempfile.TemporaryDirectory() as spill:
        runner = runnable_session(fetched, Path(spill))
        for batch in tqdm(batches(model, feeds, batch_size), desc="calibrate", unit="batch", disable=quiet,
                          leave=False):
            mask = batch.get(MASK)
            for name, value in zip(names, runner.run(names, batch), strict=True):
                x = token_rows(value, mask)
                gram = x.T @ x
                grams[name] = gram if name not in grams else grams[name] + gram
    return grams


class CalibratedSpectra(Spectra):
    """`Spectra` whose SVDs are whitened by each layer's input Gram matrix, at the plan's rank.

    The plan's singular values (`values`) stay the plain ones: ranks are decided from the weights
    alone, so a plan file gives the same ranks with or without calibration (a fair comparison at
    equal size) and `plan`/`inspect` need no data. Only the factors change. Because `balanced`
    factors depend on the rank (QR of the kept rows), `svd` returns the layer's rank-r factors in
    SVD form (`u * s = up`, `s` = up's column norms, `vt = down`), which `truncate` at r reproduces.
    """

    def __init__(self, grams: dict[str, np.ndarray], ranks: dict[str, int]) -> None:
        super().__init__()
        self.grams, self.ranks = grams, ranks

    def svd(self, view: LayerView) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        gram = self.grams.get(view.shared_key)
        if gram is None or view.node not in self.ranks:
            return super().svd(view)
        return as_svd(balanced(truncate(whitened_svd(view.matrices(), gram), self.ranks[view.node])))


def as_svd(f: Factors) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rank-r factors as an `(u, s, vt)` triple with r columns, so that `truncate(.., r)` gives them back."""
    norms = np.linalg.norm(f.up.astype(np.float64), axis=1)
    safe = np.where(norms > 0, norms, 1.0)
    return (f.up / safe[:, None, :]).astype(np.float32), norms.astype(np.float32), f.down


@dataclass
class Calibration:
    """What the calibration samples gave: the samples themselves, input Grams per shared weight, notes."""

    feeds: dict[str, np.ndarray]
    grams: dict[str, np.ndarray]
    notes: list[str]


def calibrate(model: ModelProto, views: dict[str, LayerView], the_plan: Plan, spec: str,
              dims: dict[str, int] | None = None) -> Calibration:
    """Grams of the plan's factorised layers (summed over layers sharing one weight), and notes."""
    chosen = [views[c.node] for c in the_plan.candidates if c.decision == "factorize" and c.node in views]
    tensors = {v.node: activation_input(v, model) for v in chosen}
    plain = [v.node for v in chosen if tensors[v.node] is None]
    wanted = sorted({t for t in tensors.values() if t})
    if not wanted and the_plan.options.allocate != "sensitivity":
        raise InputError(f"--calibration {spec}: no factorised layer is a MatMul/Gemm with its weight on the "
                         "right, so there is nothing to whiten; drop --calibration.")
    feeds = calibration_feeds(spec, model, dims=dims)
    by_tensor = input_grams(model, wanted, feeds) if wanted else {}
    grams: dict[str, np.ndarray] = {}
    for v in chosen:
        name = tensors[v.node]
        if name is not None:
            g = by_tensor[name]
            grams[v.shared_key] = g if v.shared_key not in grams else grams[v.shared_key] + g
    notes = [f"calibration '{spec}': {len(chosen) - len(plain)} layer(s) factorised by whitened SVD on "
             f"{len(next(iter(feeds.values())))} samples"]
    if plain:
        notes.append(f"calibration: {len(plain)} layer(s) keep plain SVD (not a right-side MatMul/Gemm): "
                     f"{', '.join(plain[:3])}{' ...' if len(plain) > 3 else ''}")
    return Calibration(feeds, grams, notes)


def plan_ranks(the_plan: Plan) -> dict[str, int]:
    return {c.node: int(c.rank) for c in the_plan.candidates if c.decision == "factorize" and c.rank}

