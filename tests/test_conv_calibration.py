"""Data-aware (whitened) SVD for convolutions: patch Gram matrices that match ORT's Conv, exact at full rank."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import onnx_inher
from onnx_inher import Options, RankPolicy, api
from onnx_inher.cli import main
from onnx_inher.planning.svd import full_svd, output_error, truncate, whitened_svd
from onnx_inher.tuning.calibrate import conv_patches, layer_grams
from tests.helpers import ort_run

# (input shape, weight shape, Conv attributes): 1-D/2-D/3-D, grouped, strided, dilated, padded, auto_pad
CASES = {
    "conv1d": ((2, 4, 17), (6, 4, 3), {}),
    "conv1d_strided_padded": ((2, 4, 17), (6, 4, 5), {"strides": [2], "pads": [2, 1]}),
    "conv2d": ((2, 3, 9, 11), (8, 3, 3, 3), {"pads": [1, 1, 1, 1]}),
    "conv2d_grouped": ((2, 6, 8, 8), (9, 2, 3, 3), {"group": 3, "pads": [1, 0, 1, 2]}),
    "conv2d_dilated_strided": ((2, 4, 13, 12), (5, 4, 3, 2), {"dilations": [2, 3], "strides": [2, 1]}),
    "conv2d_same_upper": ((1, 4, 9, 10), (6, 4, 4, 3), {"auto_pad": "SAME_UPPER", "strides": [2, 3]}),
    "conv2d_same_lower": ((1, 4, 9, 10), (6, 4, 4, 3), {"auto_pad": "SAME_LOWER", "strides": [2, 2]}),
    "conv2d_valid_1x1": ((2, 8, 5, 6), (12, 8, 1, 1), {"auto_pad": "VALID"}),
    "conv3d_grouped_padded": ((1, 4, 5, 6, 5), (6, 2, 2, 3, 2), {"group": 2, "pads": [1, 0, 1, 0, 1, 1]}),
}


def _conv_model(x_shape: tuple[int, ...], w_shape: tuple[int, ...], attrs: dict, seed: int = 0) -> onnx.ModelProto:
    """x -> Conv(W, b) -> Relu -> Conv 1x1 -> y: the first conv is the layer under test."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(w_shape).astype(np.float32)
    b = rng.standard_normal(w_shape[0]).astype(np.float32)
    k = len(x_shape) - 2
    w2 = rng.standard_normal((3, w_shape[0], *([1] * k))).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["h"], name="conv", **attrs),
         helper.make_node("Relu", ["h"], ["r"]), helper.make_node("Conv", ["r", "w2"], ["y"], name="head")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", *x_shape[1:]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3, *(["s"] * k)]),
         helper.make_tensor_value_info("h", TensorProto.FLOAT, ["n", w_shape[0], *(["s"] * k)])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b"), numpy_helper.from_array(w2, "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _inputs(shape: tuple[int, ...], n: int, seed: int = 1) -> np.ndarray:
    """Correlated channels (one fixed mixing matrix) so that whitening has something to find."""
    x = np.random.default_rng(seed).standard_normal((n, *shape[1:]))
    mix = np.random.default_rng(0).standard_normal((shape[1], shape[1])) * np.exp(-np.arange(shape[1]) / 1.5)
    return np.einsum("dc,nc...->nd...", mix, x).astype(np.float32)


def _view(path: Path, node: str = "conv"):
    return api.analyze(path).views[node]


@pytest.mark.parametrize("case", sorted(CASES))
def test_conv_patches_reproduce_ort_conv(case: str, tmp_path: Path) -> None:
    x_shape, w_shape, attrs = CASES[case]
    model = _conv_model(x_shape, w_shape, attrs)
    onnx.save(model, tmp_path / "m.onnx")
    view = _view(tmp_path / "m.onnx")
    x = _inputs(x_shape, x_shape[0])
    h = ort_run(model, {"x": x}, ["h"])[0] - view.bias.reshape(1, -1, *([1] * (x.ndim - 2)))
    want = np.moveaxis(h, 1, -1).reshape(-1, h.shape[1])  # [N x positions, C_out] in C order
    m = view.matrices().astype(np.float64)
    rng = np.random.default_rng(0)
    patches = conv_patches(x, view, 10 ** 6, rng)  # every position
    got = np.einsum("rgi,goi->rgo", patches, m).reshape(len(patches), -1)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    sample = conv_patches(x, view, 7, np.random.default_rng(3))  # a seeded subset, the same rows as above
    assert sample.shape == (7, view.groups, view.in_features)
    assert all(any(np.array_equal(s, p) for p in patches) for s in sample)


@pytest.mark.parametrize("case", sorted(CASES))
def test_whitened_conv_pair_is_exact_at_full_rank_in_ort(case: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONNX_INHER_LATENCY_CHECK", "0")
    x_shape, w_shape, attrs = CASES[case]
    onnx.save(_conv_model(x_shape, w_shape, attrs), tmp_path / "m.onnx")
    x = _inputs(x_shape, 6)
    np.savez(tmp_path / "calib.npz", x=x)
    full = min(w_shape[0] // int(attrs.get("group", 1)), int(np.prod(w_shape[1:])))
    options = Options(mode="svd", policy=RankPolicy("rank", full), rank_multiple=1, guard=False,
                      include=["conv"], calibration=str(tmp_path / "calib.npz"))
    res = onnx_inher.compress(tmp_path / "m.onnx", tmp_path / "s.onnx", options)
    assert [c.node for c in res.plan.candidates if c.decision == "factorize"] == ["conv"]
    assert sum("1 layer(s) factorised by whitened SVD" in w for w in res.plan.notes) == 1
    (tmp_path / "plan.json").write_text(res.plan.to_json())  # applied again, as `run` applies its plan
    again = onnx_inher.compress(tmp_path / "m.onnx", tmp_path / "again.onnx", options, plan_path=tmp_path / "plan.json")
    assert again.notes == res.notes, (again.notes, res.notes)
    held = _inputs(x_shape, 3, seed=9)
    want, got = ort_run(tmp_path / "m.onnx", {"x": held})[0], ort_run(tmp_path / "s.onnx", {"x": held})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


def test_whitened_conv_truncation_beats_plain_svd_on_output_error(tmp_path: Path) -> None:
    x_shape, w_shape, attrs = (2, 8, 12, 12), (16, 8, 3, 3), {"pads": [1, 1, 1, 1], "strides": [2, 2]}
    model = _conv_model(x_shape, w_shape, attrs)
    onnx.save(model, tmp_path / "m.onnx")
    view = _view(tmp_path / "m.onnx")
    (_, calib), (_, held) = (layer_grams(model, [], [view], {"x": _inputs(x_shape, 40, seed=s)}) for s in (1, 2))
    m = view.matrices()
    for rank in (4, 8):  # fitted on one sample of inputs, scored on another
        plain = output_error(m, truncate(full_svd(m), rank), held["conv"])
        white = output_error(m, truncate(whitened_svd(m, calib["conv"]), rank), held["conv"])
        assert white < 0.85 * plain, (rank, white, plain)


def test_conv_grams_are_deterministic_and_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnx_inher.tuning.calibrate as calibrate

    monkeypatch.setattr(calibrate, "CONV_ROWS", 16)  # fewer positions than the batch has: a seeded sample
    x_shape, w_shape, attrs = CASES["conv2d_grouped"]
    model = _conv_model(x_shape, w_shape, attrs)
    onnx.save(model, tmp_path / "m.onnx")
    view = _view(tmp_path / "m.onnx")
    feeds = {"x": _inputs(x_shape, 10)}
    a, b = (layer_grams(model, [], [view], feeds, batch_size=4)[1]["conv"] for _ in range(2))
    assert a.shape == (3, view.in_features, view.in_features) and np.array_equal(a, b)
    patches = conv_patches(feeds["x"][:4], view, 36, np.random.default_rng(0))
    assert patches.shape == (36, 3, view.in_features)  # only the sampled rows are gathered


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.cli
def test_compress_calibration_on_a_conv_net_is_no_longer_refused(tmp_path: Path) -> None:
    x_shape, w_shape, attrs = CASES["conv2d"]
    onnx.save(_conv_model(x_shape, w_shape, attrs), tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", x=_inputs(x_shape, 8))
    outs = []
    for name in ("a", "b"):
        r = CliRunner().invoke(main, ["compress", str(tmp_path / "m.onnx"), "-o", str(tmp_path / f"{name}.onnx"),
                                      "--mode", "svd", "--rank", "2", "--rank-multiple", "1", "--no-guard",
                                      "--include", "conv", "--calibration", str(tmp_path / "calib.npz")],
                               env={"ONNX_INHER_LATENCY_CHECK": "0"})
        assert r.exit_code == 0, r.output
        assert "nothing to whiten" not in r.output
        outs.append(_sha(tmp_path / f"{name}.onnx"))
    assert outs[0] == outs[1]  # deterministic bytes


def _left_model(seed: int = 0) -> onnx.ModelProto:
    """y = W @ x with x `[n, 12, 7]`: the weight on the left, features on x's second last axis."""
    w = np.random.default_rng(seed).standard_normal((10, 12)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["w", "x"], ["y"], name="left")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 12, 7])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10, 7])], [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _left_inputs(n: int, seed: int) -> np.ndarray:
    return _inputs((n, 12, 7), n, seed)  # correlated along the feature axis (12)


def test_left_side_matmul_is_whitened_exact_at_full_rank_and_better_truncated(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONNX_INHER_LATENCY_CHECK", "0")
    model = _left_model()
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", x=_left_inputs(30, 1))
    options = Options(mode="svd", policy=RankPolicy("rank", 10), rank_multiple=1, guard=False,
                      calibration=str(tmp_path / "calib.npz"))
    res = onnx_inher.compress(tmp_path / "m.onnx", tmp_path / "s.onnx", options)
    assert any("1 layer(s) factorised by whitened SVD" in w for w in res.plan.notes), res.plan.notes
    held = _left_inputs(4, 9)
    want, got = ort_run(model, {"x": held})[0], ort_run(tmp_path / "s.onnx", {"x": held})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
    view = _view(tmp_path / "m.onnx", "left")
    (calib, _), (held_g, _) = (layer_grams(model, [], [], {"x": _left_inputs(40, s)}, lefts=["x"]) for s in (1, 2))
    x = _left_inputs(40, 2).astype(np.float64)
    rows = np.swapaxes(x, 1, 2).reshape(-1, 12)
    np.testing.assert_allclose(held_g["left:x"], rows.T @ rows, rtol=1e-6)
    m = view.matrices()
    for rank in (3, 6):
        plain = output_error(m, truncate(full_svd(m), rank), held_g["left:x"])
        white = output_error(m, truncate(whitened_svd(m, calib["left:x"]), rank), held_g["left:x"])
        assert white < 0.85 * plain, (rank, white, plain)


# ConvTranspose: (input shape, weight shape [C_in, C_out/g, k...], attributes)
TRANSPOSED = {
    "deconv1d": ((2, 4, 7), (4, 5, 3), {}),
    "deconv2d_strided_padded": ((2, 4, 5, 6), (4, 6, 3, 3), {"strides": [2, 2], "pads": [1, 0, 1, 1],
                                                            "output_padding": [1, 0]}),
    "deconv2d_grouped_dilated": ((1, 6, 5, 5), (6, 2, 2, 3), {"group": 3, "dilations": [2, 1]}),
    "deconv2d_same_upper": ((1, 4, 4, 5), (4, 3, 3, 2), {"strides": [2, 3], "auto_pad": "SAME_UPPER"}),
}


def _deconv_model(x_shape: tuple[int, ...], w_shape: tuple[int, ...], attrs: dict) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = rng.standard_normal(w_shape).astype(np.float32)
    c_out = w_shape[1] * int(attrs.get("group", 1))
    b = rng.standard_normal(c_out).astype(np.float32)
    k = len(x_shape) - 2
    graph = helper.make_graph(
        [helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], name="deconv", **attrs)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", *x_shape[1:]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", c_out, *(["s"] * k)])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("case", sorted(TRANSPOSED))
def test_conv_transpose_patches_reproduce_ort_and_whitened_pair_is_exact(
        case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from onnx_inher.tuning.calibrate import TransposedPatches

    monkeypatch.setenv("ONNX_INHER_LATENCY_CHECK", "0")
    x_shape, w_shape, attrs = TRANSPOSED[case]
    model = _deconv_model(x_shape, w_shape, attrs)
    onnx.save(model, tmp_path / "m.onnx")
    view = _view(tmp_path / "m.onnx", "deconv")
    x = _inputs(x_shape, x_shape[0])
    y = ort_run(model, {"x": x})[0] - view.bias.reshape(1, -1, *([1] * (x.ndim - 2)))
    want = np.moveaxis(y, 1, -1).reshape(-1, y.shape[1])
    patches = TransposedPatches(model, view)(x, 10 ** 6, np.random.default_rng(0))
    got = np.einsum("rgi,goi->rgo", patches, view.matrices().astype(np.float64)).reshape(len(patches), -1)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    np.savez(tmp_path / "calib.npz", x=_inputs(x_shape, 6))
    full = min(view.out_features, view.in_features)
    options = Options(mode="svd", policy=RankPolicy("rank", full), rank_multiple=1, guard=False,
                      calibration=str(tmp_path / "calib.npz"))
    res = onnx_inher.compress(tmp_path / "m.onnx", tmp_path / "s.onnx", options)
    assert any("1 layer(s) factorised by whitened SVD" in w for w in res.plan.notes), res.plan.notes
    held = _inputs(x_shape, 3, seed=9)
    want, got = ort_run(model, {"x": held})[0], ort_run(tmp_path / "s.onnx", {"x": held})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
