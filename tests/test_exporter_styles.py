"""Graph styles of exporters we cannot install here (tf2onnx, Paddle2ONNX), rebuilt by hand.

tf2onnx: NHWC inputs wrapped in Transposes around Conv, `:0`-suffixed names with slashes, weights
read through Identity ("ReadVariableOp"), MatMul + Add bias. Paddle2ONNX: `conv2d_0.w_0`-style
names, Conv with explicit pads and dilations, `matmul_v2` as MatMul with a separate Add.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_inher import api
from onnx_inher.planning.plan import Options
from onnx_inher.planning.rank import parse_policy

RNG = np.random.default_rng(0)


def _init(name: str, *shape: int) -> onnx.TensorProto:
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32) * 0.2, name)


def tf2onnx_style() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Transpose", ["input_1:0"], ["model/conv/Conv2D__6:0"], perm=[0, 3, 1, 2],
                         name="model/conv/Conv2D__6"),
        helper.make_node("Identity", ["model/conv/Conv2D/ReadVariableOp:0"], ["model/conv/kernel:0"],
                         name="model/conv/Conv2D/ReadVariableOp"),
        helper.make_node("Conv", ["model/conv/Conv2D__6:0", "model/conv/kernel:0", "model/conv/BiasAdd/b:0"],
                         ["model/conv/BiasAdd:0"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1],
                         dilations=[1, 1], group=1, name="model/conv/BiasAdd"),
        helper.make_node("Relu", ["model/conv/BiasAdd:0"], ["model/conv/Relu:0"], name="model/conv/Relu"),
        helper.make_node("Transpose", ["model/conv/Relu:0"], ["model/conv/Relu__8:0"], perm=[0, 2, 3, 1],
                         name="model/conv/Relu__8"),
        helper.make_node("MatMul", ["model/conv/Relu__8:0", "model/dense/MatMul/ReadVariableOp:0"],
                         ["model/dense/MatMul:0"], name="model/dense/MatMul"),
        helper.make_node("Add", ["model/dense/MatMul:0", "model/dense/BiasAdd/ReadVariableOp:0"], ["dense:0"],
                         name="model/dense/BiasAdd"),
    ]
    graph = helper.make_graph(
        nodes, "tf2onnx",
        [helper.make_tensor_value_info("input_1:0", TensorProto.FLOAT, ["unk__12", 8, 8, 24])],
        [helper.make_tensor_value_info("dense:0", TensorProto.FLOAT, ["unk__12", 8, 8, 40])],
        [_init("model/conv/Conv2D/ReadVariableOp:0", 48, 24, 3, 3), _init("model/conv/BiasAdd/b:0", 48),
         _init("model/dense/MatMul/ReadVariableOp:0", 48, 40), _init("model/dense/BiasAdd/ReadVariableOp:0", 40)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="tf2onnx",
                             ir_version=7)


def paddle_style() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Conv", ["x", "conv2d_0.w_0", "conv2d_0.b_0"], ["conv2d_0.tmp_1"], kernel_shape=[3, 3],
                         pads=[2, 2, 2, 2], dilations=[2, 2], strides=[2, 2], group=2, name="p2o.Conv.0"),
        helper.make_node("Flatten", ["conv2d_0.tmp_1"], ["flatten_0.tmp_0"], axis=1, name="p2o.Flatten.0"),
        helper.make_node("MatMul", ["flatten_0.tmp_0", "linear_1.w_0"], ["linear_1.tmp_0"], name="p2o.MatMul.0"),
        helper.make_node("Add", ["linear_1.tmp_0", "linear_1.b_0"], ["linear_1.tmp_1"], name="p2o.Add.0"),
    ]
    graph = helper.make_graph(
        nodes, "paddle",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 16, 9, 9])],
        [helper.make_tensor_value_info("linear_1.tmp_1", TensorProto.FLOAT, [-1, 10])],
        [_init("conv2d_0.w_0", 32, 8, 3, 3), _init("conv2d_0.b_0", 32), _init("linear_1.w_0", 32 * 5 * 5, 10),
         _init("linear_1.b_0", 10)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], producer_name="PaddlePaddle",
                             ir_version=6)


@pytest.mark.parametrize("build", [tf2onnx_style, paddle_style])
@pytest.mark.parametrize("mode,heads", [("svd", 1), ("inher", 2), ("inher", 3)])
def test_exporter_style_exact_at_full_rank(build, mode: str, heads: int, tmp_path: Path) -> None:
    src = tmp_path / "teacher.onnx"
    onnx.save(build(), str(src))
    opts = Options(mode=mode, heads=heads, policy=parse_policy(rank_ratio=1.0), guard=False)
    r = api.compress(src, tmp_path / "student.onnx", opts, verify=True, bound=1e-4)
    assert r.verification is not None and r.verification.ok, r.verification.to_dict()
    assert r.plan.totals()["factorized"] == 2
    student = onnx.load(str(tmp_path / "student.onnx"))
    assert not {"model/conv/Conv2D/ReadVariableOp:0", "conv2d_0.w_0"} & {t.name for t in student.graph.initializer}
