"""Shared fixtures. Real-model teachers come from tests/zoo.py (built once, cached); helpers shared by
several modules live in tests/helpers.py."""

from __future__ import annotations

import os

os.environ.setdefault("ONNX_INHER_QUIET", "1")
# timing never decides what a test writes; tests/test_latency_check.py turns the check on
os.environ.setdefault("ONNX_INHER_LATENCY_CHECK", "0")

from pathlib import Path

import numpy as np
import pytest

import onnx_inher
from onnx_inher import Options, parse_policy
from tests.helpers import CLS, SEP, VOCAB, WIDTH, text_teacher


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny text encoder, its 50%-of-params student and 48 padded token sequences."""
    folder = tmp_path_factory.mktemp("text")
    teacher = text_teacher(folder / "teacher.onnx")
    onnx_inher.compress(teacher, folder / "student.onnx", Options(policy=parse_policy(param_ratio=0.5),
                                                                     rank_multiple=1))
    rng = np.random.default_rng(2)
    lengths = rng.integers(3, WIDTH + 1, size=48)
    ids = np.zeros((48, WIDTH), np.int64)
    for i, n in enumerate(lengths):
        ids[i, :n] = [CLS, *rng.integers(3, VOCAB, size=n - 2), SEP]
    mask = (np.arange(WIDTH)[None, :] < lengths[:, None]).astype(np.int64)
    np.savez(folder / "tokens.npz", input_ids=ids, attention_mask=mask)
    return {"dir": folder, "teacher": teacher, "student": folder / "student.onnx", "data": folder / "tokens.npz"}
