"""No negligible floats (subnormal, or float32 below 1e-30) in what compress emits or write-back writes
(issue 18): arithmetic with them goes subnormal, which slows ONNX Runtime down many times on x86, and
they carry nothing. A teacher with near-dead output channels makes SVD factors that would hold them,
and teachers carry them in the layers compress leaves alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import onnx_inher
from onnx_inher import Options, api, parse_policy
from onnx_inher.bridge import to_torch, write_back
from onnx_inher.ir import tensors
from onnx_inher.ir.naming import is_factor
from onnx_inher.ir.tensors import flush_negligible, negligible_count
from onnx_inher.passes import factorize
from tests.helpers import ort_run, rel_err, torch_run

TINY = np.finfo(np.float32).tiny


def test_flush_zeroes_float32_below_1e_30_and_float64_subnormals_only() -> None:
    a = np.array([0.0, -0.0, 1e-30, -2e-30, 9e-31, -TINY, TINY / 8, 1e-45, 1.0, np.inf, np.nan], np.float32)
    out = flush_negligible(a)
    assert negligible_count(a) == 4 and negligible_count(out) == 0
    np.testing.assert_array_equal(out[[0, 2, 3, 8, 9]], a[[0, 2, 3, 8, 9]])
    assert np.isnan(out[10]) and (out[4:8] == 0).all()
    double = np.array([1e-35, 1e-300, 1e-310], np.float64)  # float64 keeps its range: only its subnormals go
    assert negligible_count(double) == 1 and flush_negligible(double)[2] == 0 and flush_negligible(double)[0] == 1e-35
    half = np.array([6e-8, 1e-5], np.float16)  # fp16 subnormals are ordinary float32 numbers in ORT's kernels
    assert flush_negligible(half) is half
    clean = np.ones(4, np.float32)
    assert flush_negligible(clean) is clean


def _near_dead_teacher(path: Path, op: str) -> Path:
    """A 64 -> 96 MatMul (or 1x1 Conv) + ReLU + 96 -> 32 MatMul whose first layer has 24 near-dead output
    and 16 near-dead input channels (weights around 1e-36, the way trained nets leave unused filters)."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(64, 96)).astype(np.float32) / 8
    w1[:, :24] *= 1e-35  # near-dead outputs: tiny up-projection entries
    w1[:16, :] *= 1e-35  # near-dead inputs: tiny down-projection entries
    w2 = rng.normal(size=(96, 32)).astype(np.float32) / 10
    if op == "Conv":
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64, 5, 5])
        first = helper.make_node("Conv", ["x", "w1"], ["h"], name="conv1")
        w1_init = numpy_helper.from_array(np.ascontiguousarray(w1.T[:, :, None, None]), "w1")
        flat = [helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
                helper.make_node("Flatten", ["p"], ["f"], name="flat")]
        second_in = "f"
    else:
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])
        first = helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1")
        w1_init = numpy_helper.from_array(w1, "w1")
        flat, second_in = [], "r"
    nodes = [first, helper.make_node("Relu", ["h"], ["r"], name="relu"), *flat,
             helper.make_node("MatMul", [second_in, "w2"], ["y"], name="fc2")]
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32])
    graph = helper.make_graph(nodes, "near_dead", [x], [y], [w1_init, numpy_helper.from_array(w2, "w2")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _factor_denormals(model: onnx.ModelProto) -> int:
    return sum(negligible_count(numpy_helper.to_array(t)) for t in model.graph.initializer if is_factor(t.name))


@pytest.mark.parametrize("op", ["MatMul", "Conv"])
@pytest.mark.parametrize("mode,heads", [("svd", 1), ("inher", 2)])
def test_emitted_factors_hold_no_denormals_and_flushing_changes_no_output(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, op: str, mode: str, heads: int) -> None:
    teacher = _near_dead_teacher(tmp_path / "teacher.onnx", op)
    options = Options(mode=mode, heads=heads, policy=parse_policy(rank_ratio=0.3), rank_multiple=1)
    onnx_inher.compress(teacher, tmp_path / "flushed.onnx", options)
    with monkeypatch.context() as m:  # the same student without the flushes: the factors would hold them
        m.setattr(factorize, "flush_negligible", lambda a: a)
        m.setattr(api, "FlushNegligible", lambda inplace: (lambda model: (model, False)))
        onnx_inher.compress(teacher, tmp_path / "raw.onnx", options)
    flushed, raw = onnx.load(str(tmp_path / "flushed.onnx")), onnx.load(str(tmp_path / "raw.onnx"))
    assert _factor_denormals(raw) > 0
    assert _factor_denormals(flushed) == 0
    shape = (16, 64, 5, 5) if op == "Conv" else (16, 64)
    feed = {"x": np.random.default_rng(1).normal(size=shape).astype(np.float32)}
    assert rel_err(ort_run(flushed, feed), ort_run(raw, feed)) < 1e-6


def test_write_back_flushes_trained_denormals_and_keeps_frozen_bytes(tmp_path: Path) -> None:
    teacher = _near_dead_teacher(tmp_path / "teacher.onnx", "MatMul")
    onnx_inher.compress(teacher, tmp_path / "student.onnx",
                        Options(mode="svd", policy=parse_policy(rank_ratio=0.3), rank_multiple=1))
    student = onnx.load(str(tmp_path / "student.onnx"))
    module, param_map = to_torch(student, trainable="factors")
    trained = param_map["fc1/svd/up.weight"]
    with torch.no_grad():  # what an optimizer step can leave behind: values decayed into the subnormal range
        p = dict(module.named_parameters())[trained]
        p.view(-1)[::3] = torch.tensor(TINY / 4)
    assert negligible_count(dict(module.named_parameters())[trained].detach().numpy()) > 0
    out = write_back(student, module, param_map)
    assert sum(negligible_count(numpy_helper.to_array(t)) for t in out.graph.initializer) == 0
    before = {t.name: t.SerializeToString() for t in student.graph.initializer}
    after = {t.name: t.SerializeToString() for t in out.graph.initializer}
    assert [n for n in before if before[n] != after[n]] == ["fc1/svd/up.weight"]  # frozen weights keep their bytes
    feed = {"x": np.random.default_rng(2).normal(size=(8, 64)).astype(np.float32)}
    assert rel_err(ort_run(out, feed), torch_run(module, feed)) < 1e-5


def test_the_flush_is_the_one_in_ir() -> None:
    assert factorize.flush_negligible is tensors.flush_negligible
