"""Classifier heads: output-side (class-probability) weighting of the whitened SVD, and per-position KL
as the sensitivity distance of class outputs (issue 17: the CTC recogniser's collapse to blank)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import onnx_inher
from onnx_inher import Options, parse_policy
from onnx_inher.api import analyze
from onnx_inher.planning.svd import truncate, whitened_svd
from onnx_inher.tuning import allocate as alloc
from onnx_inher.tuning.calibrate import output_weights, softmax_after
from tests.helpers import ctc_inputs, ctc_teacher, ort_run, softmax


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    return float((p * (np.log(np.clip(p, 1e-12, None)) - np.log(np.clip(q, 1e-12, None)))).sum(-1).mean())


def test_the_head_is_found_and_weighted_by_the_teachers_mean_probabilities(tmp_path: Path) -> None:
    path = ctc_teacher(tmp_path / "ctc.onnx", blank_bias=3.0)
    a = analyze(path)
    head = softmax_after(a.views["fc2"], a.loaded.model)
    assert head is not None and head.tensor == "p" and not head.log
    assert softmax_after(a.views["fc1"], a.loaded.model) is None  # a Relu follows: not a head
    x = ctc_inputs(64)
    w = output_weights(a.loaded.model, {"fc2": head}, {"fc2": a.views["fc2"].out_features}, {"x": x})["fc2"]
    p = ort_run(path, {"x": x})[0].reshape(-1, w.size)
    np.testing.assert_allclose(w ** 2 - 0.01 / w.size, p.mean(0), rtol=1e-5, atol=1e-9)
    assert int(np.argmax(w)) == 0  # the blank carries most of the probability


def test_weighted_svd_is_exact_at_full_rank_and_keeps_the_probable_classes_better() -> None:
    rng = np.random.default_rng(0)
    m = rng.normal(size=(1, 40, 24)).astype(np.float32)
    gram = np.cov(rng.normal(size=(24, 500))) * 500
    rows = np.full(40, 0.05)
    rows[:4] = 1.0
    f = truncate(whitened_svd(m, gram, rows=rows), 24)
    np.testing.assert_allclose(f.up @ f.down, m, atol=2e-4)
    plain, weighted = truncate(whitened_svd(m, gram), 6), truncate(whitened_svd(m, gram, rows=rows), 6)
    err = [np.linalg.norm((m - g.up @ g.down)[0, :4]) for g in (plain, weighted)]
    assert err[1] < 0.5 * err[0]


def _wide_head(path: Path) -> Path:
    """x [N, 6, 24] -> Softmax(x @ w + b) over 40 classes, four of which (a blank and three common ones)
    take nearly all the probability, as in a recogniser's head."""
    rng = np.random.default_rng(5)
    w = (rng.normal(size=(24, 40)) / np.sqrt(24)).astype(np.float32)
    b = np.full(40, -3.0, np.float32)
    b[:4] = [4.0, 2.0, 2.0, 2.0]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["z"], name="head"),
             helper.make_node("Add", ["z", "b"], ["zb"], name="bias"),
             helper.make_node("Softmax", ["zb"], ["p"], name="softmax", axis=-1)]
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6, 24])],
                              [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["N", 6, 40])],
                              initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_calibrated_head_weighting_lowers_the_students_kl_and_stays_exact_at_full_rank(tmp_path: Path) -> None:
    path = _wide_head(tmp_path / "head.onnx")
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "cal.npz", x=rng.normal(size=(128, 6, 24)).astype(np.float32))
    x = np.random.default_rng(2).normal(size=(64, 6, 24)).astype(np.float32)
    p = ort_run(path, {"x": x})[0]
    full = Options(mode="svd", policy=parse_policy(rank=24), rank_multiple=1, guard=False,
                   calibration=str(tmp_path / "cal.npz"))
    result = onnx_inher.compress(path, tmp_path / "full.onnx", full)
    assert any("classifier head" in w for w in result.plan.notes)
    np.testing.assert_allclose(ort_run(tmp_path / "full.onnx", {"x": x})[0], p, atol=1e-5)
    options = Options(mode="svd", policy=parse_policy(rank=6), rank_multiple=1, calibration=str(tmp_path / "cal.npz"))
    onnx_inher.compress(path, tmp_path / "weighted.onnx", options)
    # the same whitened SVD without the row weights, for comparison
    from onnx_inher.tuning import calibrate as cal

    original = cal.softmax_after
    try:
        cal.softmax_after = lambda *args, **kw: None  # type: ignore[assignment]
        onnx_inher.compress(path, tmp_path / "whitened.onnx", options)
    finally:
        cal.softmax_after = original
    kls = [_kl(p, ort_run(tmp_path / f"{n}.onnx", {"x": x})[0]) for n in ("whitened", "weighted")]
    assert kls[1] < kls[0]


def _fc2_prober(tmp_path: Path) -> tuple[Path, object, np.ndarray, alloc.Prober]:
    """The CTC-like teacher, its analysis, 16 inputs and a prober that swaps its head `fc2`."""
    path = ctc_teacher(tmp_path / "ctc.onnx", blank_bias=3.0)
    a = analyze(path)
    x = ctc_inputs(16)
    return path, a, x, alloc.Prober(a.loaded.model, [a.views["fc2"]], {"x": x})


def _head_logits(a: object, x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The teacher's logits with `w` as the head's weight."""
    return np.maximum(x @ onnx.numpy_helper.to_array(_init(a, "w1")), 0) @ w + _bias(a)


def test_class_outputs_are_probed_by_per_position_kl(tmp_path: Path) -> None:
    path, a, x, prober = _fc2_prober(tmp_path)
    assert list(prober.kinds) == ["fetch_name_0"]
    w = a.views["fc2"].weight * 0.5  # type: ignore[attr-defined]
    got = prober.distance({"fc2": w})
    logits = _head_logits(a, x, w)
    expected = _kl(ort_run(path, {"x": x})[0], softmax(logits))
    assert abs(got - expected) <= 1e-3 * expected + 1e-6  # 5 classes: the top-8 holds them all
    assert prober.distance({}) == 0.0


def test_the_probers_score_counts_top1_agreement_per_position(tmp_path: Path) -> None:
    """The sensitivity allocation's final check ranks students by this agreement first (metrics.better)."""
    path, a, x, prober = _fc2_prober(tmp_path)
    w = a.views["fc2"].weight.copy()  # type: ignore[attr-defined]
    w[:, 0] *= -1.0  # the blank's column flipped: every frame the blank won now goes elsewhere
    agree, distance, positions = prober.score({"fc2": w})
    logits = _head_logits(a, x, w)
    teacher = ort_run(path, {"x": x})[0]
    expected = float((teacher.argmax(-1) == logits.argmax(-1)).mean())
    assert positions == teacher.shape[0] * teacher.shape[1]
    assert agree == expected and 0.0 < expected < 1.0
    assert distance == prober.distance({"fc2": w}) > 0.0
    assert prober.score({})[:2] == (1.0, 0.0)


def _init(a: object, name: str) -> onnx.TensorProto:
    return next(t for t in a.loaded.model.graph.initializer if t.name == name)  # type: ignore[attr-defined]


def _bias(a: object) -> np.ndarray:
    return onnx.numpy_helper.to_array(_init(a, "b"))
