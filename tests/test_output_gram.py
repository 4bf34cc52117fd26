"""Output-side whitening for layers whose input Gram matrix would not fit in memory (issue 17, point 2).

CREPE full's convolutions read 1,024 x 64 or 128 x 64 inputs per output: their patch Gram matrices
would take 34 GB and `run` died with "out of memory" before this. Those layers are whitened with the
Gram matrix of their outputs (`out x out`) instead, which minimises the same output error. The tests
lower MAX_GRAM_FEATURES so that small layers take that path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import onnx_inher
from onnx_inher import Options, RankPolicy, api
from onnx_inher.planning.svd import full_svd, output_error, response_svd, truncate, whitened_svd
from onnx_inher.tuning import calibrate
from onnx_inher.tuning.calibrate import by_outputs, layer_grams
from tests.helpers import ort_run
from tests.test_conv_calibration import CASES, _conv_model, _inputs


def _layer(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    m = rng.standard_normal((2, 12, 60)).astype(np.float32)
    x = rng.standard_normal((3000, 60)) * np.exp(-np.arange(60) / 8.0)  # anisotropic inputs
    return m, x


def test_response_svd_is_exact_at_full_rank_and_truncates_like_input_whitening() -> None:
    m, x = _layer()
    cx = x.T @ x
    cy = np.stack([g.astype(np.float64) @ cx @ g.T.astype(np.float64) for g in m])
    svd = response_svd(m, cy)
    full = truncate(svd, 12)
    np.testing.assert_allclose(full.up @ full.down, m, atol=2e-5)
    for rank in (3, 6):
        by_out = output_error(m, truncate(svd, rank), np.stack([cx, cx]))
        by_in = output_error(m, truncate(whitened_svd(m, np.stack([cx, cx])), rank), np.stack([cx, cx]))
        plain = output_error(m, truncate(full_svd(m), rank), np.stack([cx, cx]))
        assert by_out < 1.01 * by_in, (rank, by_out, by_in)
        assert by_out < 0.8 * plain, (rank, by_out, plain)
    again = response_svd(m, cy)
    assert all(np.array_equal(a, b) for a, b in zip(svd, again, strict=True))  # deterministic


def test_a_lead_map_is_approximated_and_the_identity_changes_nothing() -> None:
    m, x = _layer(1)
    cy = np.stack([g.astype(np.float64) @ (x.T @ x) @ g.T.astype(np.float64) for g in m])
    eye = np.stack([np.eye(12)] * 2)
    plain, led = response_svd(m, cy), response_svd(m, cy, lead=eye)
    np.testing.assert_allclose(led[0] * led[1][:, None, :] @ led[2], plain[0] * plain[1][:, None, :] @ plain[2],
                               atol=1e-5)
    lead = eye + 0.1 * np.random.default_rng(2).standard_normal(eye.shape)
    f = truncate(response_svd(m, cy, lead=lead), 12)
    np.testing.assert_allclose(f.up @ f.down, lead.astype(np.float32) @ m, atol=1e-4)


@pytest.mark.parametrize("case", ["conv2d", "conv2d_grouped", "conv1d_strided_padded"])
def test_conv_output_gram_matches_the_patch_gram(case: str, tmp_path: Path) -> None:
    x_shape, w_shape, attrs = CASES[case]
    model = _conv_model(x_shape, w_shape, attrs)
    onnx.save(model, tmp_path / "m.onnx")
    view = api.analyze(tmp_path / "m.onnx").views["conv"]
    feeds = {"x": _inputs(x_shape, 6)}
    calibrate_rows = calibrate.CONV_ROWS
    try:
        calibrate.CONV_ROWS = 10 ** 6  # every position, so that both Grams see the same rows
        patch = layer_grams(model, [], [view], feeds)[1]["conv"]
    finally:
        calibrate.CONV_ROWS = calibrate_rows
    out = layer_grams(model, [], [], feeds, outputs=[view])[1]["conv"]
    m = view.matrices().astype(np.float64)
    want = np.stack([m[g] @ patch[g] @ m[g].T for g in range(len(m))])
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


@pytest.mark.parametrize("sequential", ["1", "0"])
def test_compress_whitens_wide_convs_by_their_outputs(sequential: str, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONNX_INHER_LATENCY_CHECK", "0")
    monkeypatch.setenv("ONNX_INHER_SEQUENTIAL", sequential)
    monkeypatch.setattr(calibrate, "MAX_GRAM_FEATURES", 20)  # 8 x 3 x 3 = 72 inputs: "too many"
    x_shape, w_shape, attrs = (2, 8, 12, 12), (16, 8, 3, 3), {"pads": [1, 1, 1, 1], "strides": [2, 2]}
    onnx.save(_conv_model(x_shape, w_shape, attrs), tmp_path / "m.onnx")
    view = api.analyze(tmp_path / "m.onnx").views["conv"]
    assert by_outputs(view)
    np.savez(tmp_path / "calib.npz", x=_inputs(x_shape, 40))
    held = _inputs(x_shape, 20, seed=7)
    want = ort_run(tmp_path / "m.onnx", {"x": held}, ["h"])[0]
    errors = {}
    for name, calibration, rank in (("full", str(tmp_path / "calib.npz"), 16), ("plain", None, 4),
                                    ("data", str(tmp_path / "calib.npz"), 4)):
        options = Options(mode="svd", policy=RankPolicy("rank", rank), rank_multiple=1, guard=False,
                          include=["conv"], calibration=calibration)
        res = onnx_inher.compress(tmp_path / "m.onnx", tmp_path / f"{name}.onnx", options)
        if calibration:
            assert any("whitened by their outputs' Gram matrix" in w for w in res.plan.notes)
        got = ort_run(tmp_path / f"{name}.onnx", {"x": held}, ["h"])[0]
        errors[name] = float(np.linalg.norm(got - want) / np.linalg.norm(want - view.bias.reshape(1, -1, 1, 1)))
    assert errors["full"] < 1e-5, errors  # exact at full rank
    assert errors["data"] < 0.85 * errors["plain"], errors
    onnx_inher.compress(tmp_path / "m.onnx", tmp_path / "again.onnx",
                        Options(mode="svd", policy=RankPolicy("rank", 4), rank_multiple=1, guard=False,
                                include=["conv"], calibration=str(tmp_path / "calib.npz")))
    assert (tmp_path / "again.onnx").read_bytes() == (tmp_path / "data.onnx").read_bytes()
