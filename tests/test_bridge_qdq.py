"""Quantised teachers run in torch as in ONNX Runtime (issue 19, point 2).

QDQ: `onnxruntime.quantization.quantize_static` (QuantFormat.QDQ, calibrated) on a CNN with batch norm,
a residual add and pooling, on the embedded MNIST CNN and on an MLP, per tensor and per channel. ORT at
its default optimisation level runs each `DequantizeLinear -> Conv/MatMul/Gemm -> QuantizeLinear` chain
as one integer kernel (QLinearConv, QLinearMatMul, QGemm); the bridge computes those chains the same way
and matches ORT bit for bit. The float path (what the bridge computed before, and what ORT computes with
its optimisations off) sums in another order, and over 1024 inputs a few outputs land one quantisation
step away: the tests would see that.

DynamicQuantizeLSTM: `quantize_dynamic(op_types_to_quantize=["LSTM", "MatMul"])` on exported torch LSTMs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from onnx_inher import api
from onnx_inher.bridge import to_torch, write_back
from onnx_inher.planning.plan import Options
from tests.helpers import MNIST, mlp_teacher, ort_run, rel_err, torch_run

SAMPLES = 1024


class _Reader:
    """Calibration batches for quantize_static (its CalibrationDataReader protocol)."""

    def __init__(self, name: str, shape: tuple[int, ...], batches: int = 8):
        rng = np.random.default_rng(0)
        self.batches = iter([{name: rng.normal(size=shape).astype(np.float32)} for _ in range(batches)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


class _ResNetlet(torch.nn.Module):
    """conv-bn-relu, a residual conv-bn block, a strided conv, global average pool and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16)
        self.c2, self.b2 = torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.BatchNorm2d(16)
        self.c3 = torch.nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.fc = torch.nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.b1(self.c1(x)))
        y = torch.relu(y + self.b2(self.c2(y)))
        return self.fc(torch.relu(self.c3(y)).mean((2, 3)))


def _cnn(path: Path) -> Path:
    torch.manual_seed(0)
    net = _ResNetlet().eval()
    with torch.no_grad():
        for bn in (net.b1, net.b2):
            bn.running_mean.normal_(0, 0.1)
            bn.running_var.uniform_(0.5, 2.0)
    torch.onnx.export(net, (torch.zeros(1, 3, 16, 16),), str(path), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "N"}}, opset_version=17, dynamo=False)
    return path


TEACHERS = {"resnetlet": (_cnn, "x", (3, 16, 16)), "mnist_cnn": (lambda p: MNIST, "image", (1, 28, 28)),
            "mlp": (lambda p: (mlp_teacher(p), p)[1], "x", (32,))}


def _qdq(tmp_path: Path, name: str, per_channel: bool, op_types: list[str] | None = None) -> tuple[Path, str, tuple]:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    build, inp, shape = TEACHERS[name]
    src = build(tmp_path / f"{name}.onnx")
    out = tmp_path / f"{name}_qdq.onnx"
    quantize_static(str(src), str(out), _Reader(inp, (8, *shape)), quant_format=QuantFormat.QDQ,
                    per_channel=per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=op_types)
    return out, inp, shape


def _ort(model: Path, feed: dict[str, np.ndarray], optimise: bool = True) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not optimise:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"]).run(None, feed)[0]


@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
@pytest.mark.parametrize("name", sorted(TEACHERS))
def test_qdq_models_match_ort_bit_for_bit(tmp_path: Path, name: str, per_channel: bool) -> None:
    path, inp, shape = _qdq(tmp_path, name, per_channel)
    model = onnx.load(str(path))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in model.graph.node}
    module, _ = to_torch(model, trainable="none")
    feed = {inp: np.random.default_rng(11).normal(size=(SAMPLES, *shape)).astype(np.float32)}
    got = torch_run(module, feed)[0]
    assert np.array_equal(got, _ort(path, feed))
    # ORT without its fused kernels sums in float: a few outputs one quantisation step away at most
    plain = _ort(path, feed, optimise=False)
    assert np.abs(got - plain).max() <= 7.2e-3 * np.abs(plain).max()


def test_qdq_graphs_pass_gradients_through_quantize_dequantize_pairs(tmp_path: Path) -> None:
    """Integer tensors carry no gradient in torch; each Q -> DQ pair is straight-through instead, so a
    layer before a quantised chain still trains (before this, the MLP's output had no grad_fn at all)."""
    path, _, shape = _qdq(tmp_path, "mlp", False)
    module, _ = to_torch(onnx.load(str(path)), trainable="none")
    x = torch.randn(4, *shape, requires_grad=True)
    out = module(x)[0]
    out.square().sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    with torch.no_grad():
        assert torch.equal(module(x)[0], out.detach())  # the values are what ORT computes, unchanged


@pytest.mark.parametrize("mode", ["svd", "inher"])
def test_students_of_a_partly_quantised_cnn_match_ort(tmp_path: Path, mode: str) -> None:
    """Convs quantised (QDQ), the classifier in float: compress factorises the float Gemms around the
    integer chains; the student, and the student written back after its weights moved, match ORT."""
    path, inp, shape = _qdq(tmp_path, "mnist_cnn", True, op_types=["Conv"])
    out = tmp_path / f"student_{mode}.onnx"
    api.compress(path, out, Options(mode=mode, heads=2))
    student = onnx.load(str(out))
    assert any("/svd/" in n.name or "/inher/" in n.name for n in student.graph.node)
    module, param_map = to_torch(student, trainable="all")
    feed = {inp: np.random.default_rng(12).normal(size=(256, *shape)).astype(np.float32)}
    assert rel_err(torch_run(module, feed), ort_run(student, feed)) <= 1e-6
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05 * (p.abs().mean() + 1e-2))
    assert rel_err(torch_run(module, feed), ort_run(write_back(student, module, param_map), feed)) <= 1e-6


class _Lstm(torch.nn.Module):
    def __init__(self, bidirectional: bool):
        super().__init__()
        self.lstm = torch.nn.LSTM(12, 20, bidirectional=bidirectional)
        self.fc = torch.nn.Linear(40 if bidirectional else 20, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.lstm(x)[0])


def _quantised_lstm(tmp_path: Path, bidirectional: bool, per_channel: bool) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    torch.manual_seed(1)
    src, out = tmp_path / "lstm.onnx", tmp_path / "lstm_q.onnx"
    torch.onnx.export(_Lstm(bidirectional).eval(), (torch.zeros(7, 2, 12),), str(src), input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "T", 1: "N"}}, opset_version=17, dynamo=False)
    quantize_dynamic(str(src), str(out), op_types_to_quantize=["LSTM", "MatMul"], per_channel=per_channel,
                     weight_type=QuantType.QInt8)
    return onnx.load(str(out))


@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["forward", "bidirectional"])
def test_dynamic_quantize_lstm_matches_ort(tmp_path: Path, bidirectional: bool, per_channel: bool) -> None:
    """ORT's quantised GEMMs step for step; what remains is MLAS's sigmoid/tanh against torch's (float32
    ulps). One intra-op thread: with more, ORT quantises each thread's share of the batch on its own."""
    model = _quantised_lstm(tmp_path, bidirectional, per_channel)
    assert any(n.op_type == "DynamicQuantizeLSTM" and n.domain == "com.microsoft" for n in model.graph.node)
    module, _ = to_torch(model, trainable="none")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    for steps, batch in ((9, 1), (11, 4)):
        x = np.random.default_rng(steps).normal(size=(steps, batch, 12)).astype(np.float32)
        assert rel_err(torch_run(module, {"x": x}), session.run(None, {"x": x})) <= 1e-6


def _with_lengths(model: onnx.ModelProto, batch: int, write_y: bool) -> onnx.ModelProto:
    """The quantised LSTM node alone, with sequence_lens, initial_h and initial_c as graph inputs."""
    from onnx import TensorProto, helper

    node = next(n for n in model.graph.node if n.op_type == "DynamicQuantizeLSTM")
    inputs = list(node.input)
    inputs[4:7] = ["lens", "h0", "c0"]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    dirs = 2 if attrs.get("direction") == b"bidirectional" else 1
    hidden = int(attrs["hidden_size"])
    outputs = ["Y" if write_y else "", "Yh", "Yc"]
    lstm = helper.make_node("DynamicQuantizeLSTM", inputs, outputs, domain="com.microsoft", **attrs)
    inits = [t for t in model.graph.initializer if t.name in inputs]
    f32, i32 = TensorProto.FLOAT, TensorProto.INT32
    feeds = [helper.make_tensor_value_info("x", f32, [9, batch, 12]),
             helper.make_tensor_value_info("lens", i32, [batch]),
             *[helper.make_tensor_value_info(n, f32, [dirs, batch, hidden]) for n in ("h0", "c0")]]
    graph = helper.make_graph([lstm], "g", feeds, [helper.make_tensor_value_info(o, f32, None) for o in outputs if o],
                              inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


@pytest.mark.parametrize("write_y", [True, False], ids=["with_Y", "without_Y"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["forward", "bidirectional"])
def test_dynamic_quantize_lstm_with_sequence_lengths_and_initial_state(tmp_path: Path, bidirectional: bool,
                                                                       write_y: bool) -> None:
    """Ended sequences enter ORT's per-step quantisation of the hidden state as zeros when the node
    writes Y (ORT reads its zeroed Y row) and as their last state when it does not."""
    model = _with_lengths(_quantised_lstm(tmp_path, bidirectional, True), 3, write_y)
    module, _ = to_torch(model, trainable="none")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(4)
    dirs = 2 if bidirectional else 1
    for lens in ([9, 9, 9], [9, 5, 2], [6, 4, 6]):
        feed = {"x": rng.normal(size=(9, 3, 12)).astype(np.float32), "lens": np.array(lens, np.int32),
                "h0": (rng.normal(size=(dirs, 3, 20)) * 0.5).astype(np.float32),
                "c0": (rng.normal(size=(dirs, 3, 20)) * 0.5).astype(np.float32)}
        assert rel_err(torch_run(module, feed), session.run(None, feed)) <= 1e-6, lens


def test_dynamic_quantize_lstm_passes_gradients_to_its_input(tmp_path: Path) -> None:
    """Integer weights are constants; the float input gets the straight-through gradient."""
    model = _quantised_lstm(tmp_path, False, False)
    module, _ = to_torch(model, trainable="none")
    x = torch.randn(5, 2, 12, requires_grad=True)
    module(x)[0].square().sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all()) and float(x.grad.abs().sum()) > 0
