"""Integer (dynamic-quantised) ops in the bridge compute what ONNX Runtime computes, bit for bit, so a
teacher quantised with `onnxruntime.quantization.quantize_dynamic` can run in torch (issue 19)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from onnx_inher.bridge import to_torch
from tests.helpers import MNIST, ort_run, torch_run

U8, I8, F32 = TensorProto.UINT8, TensorProto.INT8, TensorProto.FLOAT


def _model(nodes: list[onnx.NodeProto], inputs: list, outputs: list, inits: list, opset: int = 13) -> onnx.ModelProto:
    return helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, inits),
                             opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("x", [np.zeros((2, 5), np.float32), np.full((2, 5), 0.25, np.float32),
                               np.linspace(-3, 2, 10, dtype=np.float32).reshape(2, 5),
                               np.random.default_rng(0).normal(size=(4, 7)).astype(np.float32) * 1e-3,
                               np.random.default_rng(1).normal(size=(3, 64)).astype(np.float32) * 40])
def test_dynamic_quantize_linear_matches_ort_exactly(x: np.ndarray) -> None:
    model = _model([helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"])],
                   [helper.make_tensor_value_info("x", F32, list(x.shape))],
                   [helper.make_tensor_value_info("q", U8, None), helper.make_tensor_value_info("s", F32, None),
                    helper.make_tensor_value_info("z", U8, None)], [])
    module, _ = to_torch(model)
    for got, want in zip(torch_run(module, {"x": x}), ort_run(model, {"x": x}), strict=True):
        assert got.dtype == want.dtype and np.array_equal(got, want), (got, want)


@pytest.mark.parametrize("case", [
    {"shape": (2, 4, 9, 9), "w": (6, 4, 3, 3), "attrs": {"pads": [1, 1, 1, 1]}},
    {"shape": (1, 4, 11, 8), "w": (6, 2, 3, 2), "attrs": {"strides": [2, 1], "dilations": [1, 2], "group": 2}},
    {"shape": (2, 3, 10, 10), "w": (5, 3, 3, 3), "attrs": {"auto_pad": "SAME_UPPER", "strides": [2, 2]}},
    {"shape": (2, 3, 17), "w": (4, 3, 5), "attrs": {"pads": [2, 1]}},
])
@pytest.mark.parametrize("w_type", [U8, I8])
def test_conv_integer_matches_ort_exactly(case: dict, w_type: int) -> None:
    rng = np.random.default_rng(2)
    w_np = np.uint8 if w_type == U8 else np.int8
    lo, hi = (0, 256) if w_type == U8 else (-128, 128)
    x = rng.integers(0, 256, case["shape"]).astype(np.uint8)
    w = rng.integers(lo, hi, case["w"]).astype(w_np)
    nodes = [helper.make_node("ConvInteger", ["x", "w", "zx", "zw"], ["y"], **case["attrs"])]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(117, np.uint8), "zx"),
             numpy_helper.from_array(np.array(3, w_np), "zw")]
    model = _model(nodes, [helper.make_tensor_value_info("x", U8, list(x.shape))],
                   [helper.make_tensor_value_info("y", TensorProto.INT32, None)], inits)
    module, _ = to_torch(model)
    got, want = torch_run(module, {"x": x})[0], ort_run(model, {"x": x})[0]
    assert got.dtype == want.dtype == np.int32 and np.array_equal(got, want)


def test_a_dynamic_quantised_cnn_runs_in_torch_as_in_ort(tmp_path: Path) -> None:
    """The embedded MNIST CNN through quantize_dynamic (ConvInteger + MatMulInteger + DynamicQuantizeLinear):
    with the same float arithmetic around the integer ops, torch gives ORT's logits to float rounding."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(MNIST), str(tmp_path / "q.onnx"), weight_type=QuantType.QUInt8,
                     op_types_to_quantize=["Conv", "MatMul", "Gemm"])
    model = onnx.load(str(tmp_path / "q.onnx"))
    ops = {n.op_type for n in model.graph.node}
    assert {"ConvInteger", "DynamicQuantizeLinear"} <= ops
    module, param_map = to_torch(model, trainable="all")
    assert all(not n.endswith(("_quantized", "_zero_point")) for n in param_map)  # integer weights stay buffers
    x = np.random.default_rng(3).normal(size=(8, 1, 28, 28)).astype(np.float32)
    got, want = torch_run(module, {"image": x})[0], ort_run(model, {"image": x})[0]
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    assert (got.argmax(1) == want.argmax(1)).all()
    with torch.no_grad():
        assert torch.isfinite(module(torch.from_numpy(x))[0]).all()
