"""No subnormal floats in what compress emits or write-back writes (issue 18): they slow ONNX Runtime
down many times on x86 and carry nothing. A teacher with near-dead output channels makes SVD factors
that would hold them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import onnx_inher
from onnx_inher import Options, parse_policy
from onnx_inher.bridge import to_torch, write_back
from onnx_inher.ir import tensors
from onnx_inher.ir.naming import is_factor
from onnx_inher.ir.tensors import denormal_count, flush_denormals
from onnx_inher.passes import factorize
from tests.helpers import ort_run, rel_err, torch_run

TINY = np.finfo(np.float32).tiny


def test_flush_zeroes_only_subnormals() -> None:
    a = np.array([0.0, -0.0, TINY, -TINY, TINY / 2, -TINY / 8, 1e-45, 1.0, np.inf, np.nan], np.float32)
    out = flush_denormals(a)
    assert denormal_count(a) == 3 and denormal_count(out) == 0
    np.testing.assert_array_equal(out[[0, 2, 3, 7, 8]], a[[0, 2, 3, 7, 8]])
    assert np.isnan(out[9]) and (out[4:7] == 0).all()
    half = np.array([6e-8, 1e-5], np.float16)  # fp16 subnormals are ordinary float32 numbers in ORT's kernels
    assert flush_denormals(half) is half
    clean = np.ones(4, np.float32)
    assert flush_denormals(clean) is clean


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
    return sum(denormal_count(numpy_helper.to_array(t)) for t in model.graph.initializer if is_factor(t.name))


@pytest.mark.parametrize("op", ["MatMul", "Conv"])
@pytest.mark.parametrize("mode,heads", [("svd", 1), ("inher", 2)])
def test_emitted_factors_hold_no_denormals_and_flushing_changes_no_output(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, op: str, mode: str, heads: int) -> None:
    teacher = _near_dead_teacher(tmp_path / "teacher.onnx", op)
    options = Options(mode=mode, heads=heads, policy=parse_policy(rank_ratio=0.3), rank_multiple=1)
    onnx_inher.compress(teacher, tmp_path / "flushed.onnx", options)
    with monkeypatch.context() as m:  # the same student without the flush: the factors would hold denormals
        m.setattr(factorize, "flush_denormals", lambda a: a)
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
    assert denormal_count(dict(module.named_parameters())[trained].detach().numpy()) > 0
    out = write_back(student, module, param_map)
    assert sum(denormal_count(numpy_helper.to_array(t)) for t in out.graph.initializer) == 0
    before = {t.name: t.SerializeToString() for t in student.graph.initializer}
    after = {t.name: t.SerializeToString() for t in out.graph.initializer}
    assert [n for n in before if before[n] != after[n]] == ["fc1/svd/up.weight"]  # frozen weights keep their bytes
    feed = {"x": np.random.default_rng(2).normal(size=(8, 64)).astype(np.float32)}
    assert rel_err(ort_run(out, feed), torch_run(module, feed)) < 1e-5


def test_the_flush_is_the_one_in_ir() -> None:
    assert factorize.flush_denormals is tensors.flush_denormals
