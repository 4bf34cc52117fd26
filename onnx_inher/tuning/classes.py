"""Which classes a classifier head's teacher uses on the calibration data (for the class split, issue 17).

A head with many classes (the PP-OCRv5 recogniser's 18,385 characters: 2.2M of its 4.1M params) spends
most of its weights on classes that a user's data never calls for. Its low-rank pair at the plan's rank
cannot keep the few hundred classes that matter apart (83% of lines read as the teacher does, on the
teacher's own features), while the same head with those classes' columns kept exact and a rank-8 pair for
the rest reads 99.75% at a fifth of the params. This module finds "the classes that matter": those the
teacher ranks in its top `SPLIT_TOP` at some position (token, frame, pixel) of some calibration sample,
padding positions left out. The planner then decides whether the split pays (`plan.decide_split`).
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
from onnx import ModelProto
from tqdm import tqdm

from onnx_inher.datasets.text import ATTENTION_MASK as MASK
from onnx_inher.ir.graph import GraphIndex
from onnx_inher.ir.layers import LayerView
from onnx_inher.planning.plan import SPLIT_TOP
from onnx_inher.runtime import runnable_session, with_outputs
from onnx_inher.tuning.calibrate import Head, batches, softmax_after


def classifier_heads(model: ModelProto, views: dict[str, LayerView]) -> dict[str, Head]:
    """The layers that feed a Softmax/LogSoftmax through at most a bias (`calibrate.softmax_after`) and use
    their weight alone, by node."""
    index = GraphIndex.build(model.graph)
    users = Counter(v.shared_key for v in views.values())
    return {n: head for n, v in views.items()
            if not v.scope and users[v.shared_key] == 1 and (head := softmax_after(v, model, index))}


def _positions(p: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """`[positions, C]`: every position's class scores, padding positions dropped when the mask matches."""
    rows = p.reshape(-1, p.shape[-1])
    if mask is not None and p.ndim == 3 and mask.shape == p.shape[:2]:
        rows = rows[np.asarray(mask).reshape(-1) != 0]
    return rows


def used_classes(model: ModelProto, views: dict[str, LayerView], feeds: dict[str, np.ndarray],
                 top: int = SPLIT_TOP, heads: dict[str, Head] | None = None) -> dict[str, list[int]]:
    """By head node: the sorted classes the teacher ranks in its top `top` somewhere on `feeds`. Heads whose
    softmax is not over their last axis with the layer's output width are left out. `heads`: the
    `classifier_heads` when the caller already found them."""
    heads = classifier_heads(model, views) if heads is None else heads
    if not heads:
        return {}
    names = sorted({h.tensor for h in heads.values()})
    used: dict[str, np.ndarray] = {}
    fits = dict.fromkeys(names, True)
    width = {h.tensor: views[n].out_features for n, h in heads.items()}
    axis = {h.tensor: h.axis for h in heads.values()}
    with tempfile.TemporaryDirectory() as spill:
        runner = runnable_session(with_outputs(model, names, Path("calibration model")), Path(spill))
        for batch in tqdm(batches(model, feeds), desc="classes", unit="batch", disable=None, leave=False):
            for name, value in zip(names, runner.run(names, batch), strict=True):
                p = np.asarray(value)
                if p.ndim < 2 or axis[name] not in (-1, p.ndim - 1) or p.shape[-1] != width[name]:
                    fits[name] = False
                if not fits[name]:
                    continue
                rows = _positions(p, batch.get(MASK))
                k = min(top, p.shape[-1])
                best = np.argpartition(-rows, k - 1, axis=-1)[:, :k] if len(rows) else np.zeros((0, k), int)
                hit = used.setdefault(name, np.zeros(p.shape[-1], dtype=bool))
                hit[best.reshape(-1)] = True
    return {n: np.flatnonzero(used[h.tensor]).tolist() for n, h in heads.items()
            if fits[h.tensor] and h.tensor in used}
