"""Data-aware (whitened) SVD: the numpy math, calibration in ORT, `compress --calibration`, the pooled loss."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

import onnx_inher
from onnx_inher import Options, RankPolicy
from onnx_inher.cli import main
from onnx_inher.datasets import input_specs, load_data
from onnx_inher.distill.losses import OutputLoss, pooled_cosine
from onnx_inher.planning.svd import balanced, full_svd, output_error, truncate, whitened_svd, whitening
from onnx_inher.tuning.calibrate import as_svd, input_grams
from tests.helpers import MNIST, logit_error, needs_mnist


def _correlated(seed: int = 0, n: int = 4000, d: int = 96) -> np.ndarray:
    """Inputs with a decaying spectrum and a few outlier features, like transformer hidden states."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((d, d)) * np.exp(-np.arange(d) / 10.0)
    x = rng.standard_normal((n, d)) @ mix.T
    x[:, :3] *= 20.0
    return x


def test_whitening_is_a_damped_square_root() -> None:
    x = _correlated(d=32)
    c = x.T @ x
    s, s_inv = whitening(c, damping=1e-2)
    lam = 1e-2 * np.trace(c) / len(c)
    np.testing.assert_allclose(s @ s.T, c + lam * np.eye(len(c)), rtol=1e-9, atol=1e-6 * np.abs(c).max())
    np.testing.assert_allclose(s @ s_inv, np.eye(len(c)), atol=1e-9)
    singular = np.outer(x[0], x[0])  # rank 1: Cholesky would fail, the damped root does not
    assert np.isfinite(whitening(singular)[1]).all()


@pytest.mark.parametrize("rank", [4, 16, 32])
def test_whitened_svd_beats_plain_svd_on_output_error(rank: int) -> None:
    rng = np.random.default_rng(1)
    m = rng.standard_normal((1, 64, 96)).astype(np.float32)
    calib, held = _correlated(seed=2), _correlated(seed=3)  # fit on one sample of inputs, score on another
    c, c_held = calib.T @ calib, held.T @ held
    plain = output_error(m, truncate(full_svd(m), rank), c_held)
    white = output_error(m, truncate(whitened_svd(m, c), rank), c_held)
    assert white < 0.6 * plain, (rank, white, plain)
    # the weight error, which plain SVD minimises, is the price
    w = truncate(whitened_svd(m, c), rank)
    p = truncate(full_svd(m), rank)
    assert np.linalg.norm(m - p.up @ p.down) <= np.linalg.norm(m - w.up @ w.down) + 1e-4


def test_whitened_svd_is_exact_at_full_rank_and_keeps_the_layout() -> None:
    rng = np.random.default_rng(4)
    m = rng.standard_normal((1, 48, 80)).astype(np.float32)
    x = _correlated(d=80)
    u, s, vt = whitened_svd(m, x.T @ x)
    assert (u.shape, s.shape, vt.shape) == ((1, 48, 48), (1, 48), (1, 48, 80))
    f = truncate((u, s, vt), 48)
    assert np.abs(f.up @ f.down - m).max() / np.abs(m).max() < 1e-5
    again = whitened_svd(m, x.T @ x)
    assert all(np.array_equal(a, b) for a, b in zip((u, s, vt), again, strict=True))  # byte-identical reruns


def test_balanced_factors_keep_the_product_with_orthonormal_down_rows() -> None:
    """Whitened `down = V^T S^-1` is badly scaled for AdamW; `balanced` fixes the scale, not the function."""
    rng = np.random.default_rng(6)
    m = rng.standard_normal((1, 40, 64)).astype(np.float32)
    x = _correlated(d=64)
    raw = truncate(whitened_svd(m, x.T @ x), 12)
    fixed = balanced(raw)
    np.testing.assert_allclose(fixed.up @ fixed.down, raw.up @ raw.down, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(fixed.down[0] @ fixed.down[0].T, np.eye(12), atol=1e-5)
    assert np.abs(raw.down).max() / np.abs(fixed.down).max() < 1e-1  # the whitened rows are far from unit scale
    again = as_svd(fixed)
    back = truncate(again, 12)  # what `Factorize` does with `CalibratedSpectra.svd`
    assert np.array_equal(back.down, fixed.down)
    np.testing.assert_allclose(back.up, fixed.up, rtol=1e-6, atol=1e-7)


def test_input_grams_match_numpy_and_drop_padding() -> None:
    """A MatMul on a graph input and one on an intermediate tensor, with an attention mask."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(5)
    w = rng.standard_normal((6, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"]), helper.make_node("Cast", ["attention_mask"], ["m"], to=1)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 5, 6]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [None, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("m", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.eye(4, dtype=np.float32), "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.standard_normal((7, 5, 6)).astype(np.float32)
    mask = (np.arange(5)[None] < rng.integers(1, 6, 7)[:, None]).astype(np.int64)
    grams = input_grams(model, ["x", "r"], {"x": x, "attention_mask": mask}, batch_size=3)
    rows = x[mask.astype(bool)].astype(np.float64)
    np.testing.assert_allclose(grams["x"], rows.T @ rows, rtol=1e-10)
    r = np.maximum(rows @ w.astype(np.float64), 0)
    np.testing.assert_allclose(grams["r"], r.T @ r, rtol=1e-4, atol=1e-6)


@needs_mnist
def test_compress_with_calibration_improves_ort_fidelity_at_the_same_rank(tmp_path: Path) -> None:
    images = load_data("mnist5k:test", input_specs(onnx.load(str(MNIST)))).inputs["image"][:300]
    options = {"mode": "svd", "policy": RankPolicy("rank", 8), "include": ["classifier"], "rank_multiple": 1}
    plain = onnx_inher.compress(MNIST, tmp_path / "plain.onnx", Options(**options))
    white = onnx_inher.compress(MNIST, tmp_path / "white.onnx", Options(**options, calibration="mnist5k"))
    ranks = [(c.node, c.rank) for c in plain.plan.candidates if c.decision == "factorize"]
    assert ranks == [(c.node, c.rank) for c in white.plan.candidates if c.decision == "factorize"] and ranks
    assert json.loads(white.plan.to_json())["options"]["calibration"] == "mnist5k"
    assert json.loads(plain.plan.to_json())["options"]["calibration"] is None
    assert any("whitened SVD" in w for w in white.plan.notes)
    e_plain, e_white = logit_error(tmp_path / "plain.onnx", images), logit_error(tmp_path / "white.onnx", images)
    assert e_white < 0.7 * e_plain, (e_white, e_plain)


@needs_mnist
def test_compress_with_calibration_is_exact_at_full_rank(tmp_path: Path) -> None:
    result = onnx_inher.compress(MNIST, tmp_path / "full.onnx",
                                 Options(mode="svd", policy=RankPolicy("rank", 128), include=["classifier"],
                                         guard=False, calibration="mnist5k"), verify=True, bound=1e-4)
    assert result.verification is not None and result.verification.ok


def test_cli_bad_calibration_data_exits_2(tmp_path: Path) -> None:
    out = CliRunner().invoke(main, ["compress", str(MNIST), "-o", str(tmp_path / "s.onnx"), "--mode", "svd",
                                    "--include", "classifier", "--calibration", str(tmp_path / "missing.npz")])
    assert out.exit_code == 2 and "no such file" in out.output
    assert not (tmp_path / "s.onnx").exists()


def test_pooled_cosine_matches_numpy_and_ignores_padding() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    sp = [(s[i, :int(mask[i].sum())]).mean(0).numpy() for i in range(3)]
    tp = [(t[i, :int(mask[i].sum())]).mean(0).numpy() for i in range(3)]
    want = np.mean([1 - a @ b / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(sp, tp, strict=True)])
    assert float(pooled_cosine(s, t, mask)) == pytest.approx(want, abs=1e-6)
    noisy = s.clone()
    noisy[mask == 0] = 1e3  # padding positions do not count
    assert float(pooled_cosine(noisy, t, mask)) == pytest.approx(want, abs=1e-6)
    assert float(OutputLoss("e", "pooled")(s, s, None, mask)) == pytest.approx(0.0, abs=1e-6)


def _token_model(length: int | str) -> onnx.ModelProto:
    """ids -> embedding (Gather) -> MatMul: the hidden rows are a function of the token alone."""
    emb = np.random.default_rng(5).standard_normal((50, 8)).astype(np.float32)
    w = np.random.default_rng(6).standard_normal((8, 4)).astype(np.float32)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Gather", ["emb", "input_ids"], ["h"]),
         onnx.helper.make_node("MatMul", ["h", "w"], ["y"], name="dense")], "tokens",
        [onnx.helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, ["batch", length]),
         onnx.helper.make_tensor_value_info("attention_mask", onnx.TensorProto.INT64, ["batch", length])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", length, 4])],
        [onnx.numpy_helper.from_array(emb, "emb"), onnx.numpy_helper.from_array(w, "w")])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])


def test_padded_text_is_cropped_per_batch_only_where_the_token_axis_is_free() -> None:
    from onnx_inher.tuning.calibrate import batches

    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 12, size=70)
    mask = (np.arange(16)[None, :] < lengths[:, None]).astype(np.int64)
    feeds = {"input_ids": rng.integers(0, 50, size=(70, 16)) * mask, "attention_mask": mask}
    free, fixed = _token_model("tokens"), _token_model(16)
    cropped = batches(free, feeds, 32)
    assert [b["input_ids"].shape[1] for b in cropped] == [int(lengths.max()), *[
        int(np.sort(lengths)[::-1][s:s + 32].max()) for s in (32, 64)]]
    assert sorted(int(b["attention_mask"].sum()) for b in cropped) == sorted(
        int(mask[np.argsort(-lengths, kind="stable")][s:s + 32].sum()) for s in (0, 32, 64))
    assert all(b["input_ids"].shape[1] == 16 for b in batches(fixed, feeds, 32))
    left = {k: v[:, ::-1].copy() for k, v in feeds.items()}  # left-padded: the tail holds the tokens
    assert all(b["input_ids"].shape[1] == 16 for b in batches(free, left, 32))
    rows = onnx.numpy_helper.to_array(free.graph.initializer[0])[feeds["input_ids"][mask.astype(bool)]]
    expected = rows.astype(np.float64).T @ rows.astype(np.float64)
    for model in (free, fixed):
        np.testing.assert_allclose(input_grams(model, ["h"], feeds)["h"], expected, rtol=1e-6)
