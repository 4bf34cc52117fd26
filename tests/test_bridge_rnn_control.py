"""The bridge's recurrent (LSTM, GRU, RNN) and control-flow (If, Loop, Scan) converters, and Einsum.

Three kinds of evidence: the ONNX conformance cases of these ops against their reference outputs;
hand-built nodes over the attribute grid and torch-exported models against ONNX Runtime (at other batch
and sequence sizes than the export); and gradients reaching W/R/B and weights inside subgraph bodies.
Relative error is max|torch - ORT| / max|ORT| per output.
"""

from __future__ import annotations

import functools
import importlib
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from onnx_inher import api
from onnx_inher.bridge import OnnxModule, to_torch, write_back
from onnx_inher.errors import InputError
from onnx_inher.ir.graph import op_types
from onnx_inher.ir.io import load_model
from onnx_inher.planning.plan import Options
from tests import zoo

pytestmark = pytest.mark.slow  # real-model fixtures from tests/zoo.py

TOL = 1e-4
# onnx/backend/test/case/node modules holding the cases of these ops (also their function expansions
# that use Loop/If/Scan). Importing only these is ~20x faster than collect_testcases() over all ops.
CASE_MODULES = ("lstm", "gru", "rnn", "if_", "loop", "scan", "einsum", "rangeop", "sequence_map", "affinegrid",
                "linear_attention")
OPS = ("LSTM", "GRU", "RNN", "If", "Loop", "Scan", "Einsum")


# --------------------------------------------------------------------------- helpers


@functools.lru_cache(maxsize=1)
def _cases() -> dict[str, object]:
    """The conformance cases (onnx.backend.test.case) that use one of OPS, by name."""
    from onnx.backend.test.case import node as cases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in CASE_MODULES:
            importlib.import_module(f"{cases.__name__}.{name}")
    return {c.name: c for c in cases._NodeTestCases if op_types(c.model.graph) & set(OPS)}


def _uses_sequences(model: onnx.ModelProto) -> bool:
    """Sequence and optional values are not tensors; the bridge runs tensor graphs only."""
    graph_io = [*model.graph.input, *model.graph.output]
    return (any(op.startswith(("Sequence", "Optional")) for op in op_types(model.graph))
            or any(not v.type.HasField("tensor_type") for v in graph_io))


def _to_tensor(array: np.ndarray) -> torch.Tensor:
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(np.array(array))  # a contiguous copy that keeps 0-d arrays 0-d


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()


def ort_run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, feed)


def torch_run(module: OnnxModule, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        return [o.numpy() for o in module(*[torch.from_numpy(feed[n]) for n in module.input_names])]


def rel_err(actual: list[np.ndarray], expected: list[np.ndarray]) -> float:
    errs = []
    for a, e in zip(actual, expected, strict=True):
        assert a.shape == e.shape and a.dtype == e.dtype, (a.shape, e.shape, a.dtype, e.dtype)
        e64 = e.astype(np.float64)
        errs.append(float(np.abs(a.astype(np.float64) - e64).max(initial=0.0) / max(np.abs(e64).max(initial=0.0),
                                                                                    1e-12)))
    return max(errs)


def assert_matches_ort(model: onnx.ModelProto, feed: dict[str, np.ndarray], bound: float = TOL) -> OnnxModule:
    module, _ = to_torch(model, trainable="none")
    err = rel_err(torch_run(module, feed), ort_run(model, feed))
    assert err <= bound, f"relative error {err:.3g} > {bound}"
    return module


# --------------------------------------------------------------------------- conformance cases


@pytest.mark.parametrize("name", sorted(_cases()))
def test_conformance_case(name: str) -> None:
    case = _cases()[name]
    if _uses_sequences(case.model):  # type: ignore[attr-defined]
        pytest.skip("uses sequence/optional values, which the bridge does not represent")
    module, _ = to_torch(case.model, trainable="none")  # type: ignore[attr-defined]
    for inputs, outputs in case.data_sets:  # type: ignore[attr-defined]
        with torch.no_grad():
            got = module(*[_to_tensor(np.asarray(i)) for i in inputs])
        assert len(got) == len(outputs)
        for g, e in zip(got, outputs, strict=True):
            e = np.asarray(e)
            expected = e.astype(np.float32) if e.dtype.name == "bfloat16" else e
            actual = _as_numpy(g)
            assert actual.shape == expected.shape and actual.dtype == expected.dtype
            np.testing.assert_allclose(actual, expected, rtol=case.rtol, atol=case.atol)  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- recurrent nodes vs ORT

SEQ, BATCH, INPUT, HIDDEN = 5, 3, 4, 6
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def _recurrent_model(op: str, direction: str, *, lens: bool, initial: bool, peepholes: bool = False,
                     layout: int = 0, seed: int = 0, **attrs: object) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """One recurrent node; W/R/B/P are initializers (so they become parameters), X/lens/h0/c0 inputs."""
    rng = np.random.default_rng(seed)
    dirs = 2 if direction == "bidirectional" else 1
    g = GATES[op]
    inits = {"W": rng.normal(0, 0.5, (dirs, g * HIDDEN, INPUT)), "R": rng.normal(0, 0.5, (dirs, g * HIDDEN, HIDDEN)),
             "B": rng.normal(0, 0.5, (dirs, 2 * g * HIDDEN))}
    x_shape = (BATCH, SEQ, INPUT) if layout else (SEQ, BATCH, INPUT)
    s_shape = (BATCH, dirs, HIDDEN) if layout else (dirs, BATCH, HIDDEN)
    feed = {"X": rng.normal(0, 1, x_shape).astype(np.float32)}
    names = ["X", "W", "R", "B", "", ""]
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)]
    if lens:
        feed["lens"] = np.array([SEQ, 2, 4][:BATCH], dtype=np.int32)
        names[4] = "lens"
        inputs.append(helper.make_tensor_value_info("lens", TensorProto.INT32, [BATCH]))
    if initial:
        for state in ("h0", "c0") if op == "LSTM" else ("h0",):
            feed[state] = rng.normal(0, 1, s_shape).astype(np.float32)
            inputs.append(helper.make_tensor_value_info(state, TensorProto.FLOAT, s_shape))
        names[5] = "h0"
        if op == "LSTM":
            names.append("c0")
    if peepholes:
        inits["P"] = rng.normal(0, 0.5, (dirs, 3 * HIDDEN))
        names += [""] * (7 - len(names)) + ["P"]
    outputs = ["Y", "Y_h", "Y_c"] if op == "LSTM" else ["Y", "Y_h"]
    node = helper.make_node(op, [n for n in names], outputs, hidden_size=HIDDEN, direction=direction,
                            **({"layout": layout} if layout else {}), **attrs)
    graph = helper.make_graph(
        [node], op.lower(), inputs, [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)]), feed


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("lens", [False, True])
def test_recurrent_node_matches_ort(op: str, direction: str, lens: bool) -> None:
    model, feed = _recurrent_model(op, direction, lens=lens, initial=lens)
    assert_matches_ort(model, feed)


GENERAL_CASES = {
    "lstm_peepholes_clip": ("LSTM", {"peepholes": True, "clip": 0.7}),
    "lstm_input_forget": ("LSTM", {"input_forget": 1}),
    "lstm_activations": ("LSTM", {"activations": ["HardSigmoid", "LeakyRelu", "ScaledTanh"] * 2,
                                  "activation_alpha": [0.3, 0.05, 0.8, 0.25, 0.02, 1.2],
                                  "activation_beta": [0.4, 1.5, 0.6, 0.9]}),
    "gru_linear_before_reset": ("GRU", {"linear_before_reset": 1, "clip": 1.5}),
    "gru_activations": ("GRU", {"activations": ["Sigmoid", "Softsign", "HardSigmoid", "Tanh"]}),
    "rnn_relu": ("RNN", {"activations": ["Relu", "Relu"]}),
    "rnn_leaky_clip": ("RNN", {"activations": ["LeakyRelu", "Tanh"], "activation_alpha": [0.2], "clip": 0.5}),
}


@pytest.mark.parametrize("case", sorted(GENERAL_CASES))
def test_recurrent_attributes_match_ort(case: str) -> None:
    """Peepholes, clip, coupled gates and other activations (with alpha/beta) take the general path."""
    op, attrs = GENERAL_CASES[case]
    attrs = dict(attrs)
    peepholes = bool(attrs.pop("peepholes", False))
    model, feed = _recurrent_model(op, "bidirectional", lens=True, initial=True, peepholes=peepholes, **attrs)
    assert_matches_ort(model, feed)


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_batch_first_layout_equals_sequence_first(op: str) -> None:
    """layout=1 ([batch, seq, ...]) computes the layout-0 result, transposed (ORT's CPU kernels lack it)."""
    seq_first, feed = _recurrent_model(op, "bidirectional", lens=True, initial=True, seed=1)
    batch_first, _ = _recurrent_model(op, "bidirectional", lens=True, initial=True, seed=1, layout=1)
    feed1 = {k: (v.transpose(1, 0, 2) if v.ndim == 3 else v) for k, v in feed.items()}
    out0 = torch_run(to_torch(seq_first, "none")[0], feed)
    out1 = torch_run(to_torch(batch_first, "none")[0], feed1)
    np.testing.assert_allclose(out1[0], out0[0].transpose(2, 0, 1, 3), rtol=1e-6, atol=1e-6)
    for s1, s0 in zip(out1[1:], out0[1:], strict=True):
        np.testing.assert_allclose(s1, s0.transpose(1, 0, 2), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("attrs", "message"), [
    ({"direction": "sideways"}, "sideways"),
    ({"activations": ["Sigmoid", "Tanh"]}, "expects 4 activations"),  # ORT also wants one set per direction
    ({"activations": ["Sigmoid", "Swish"] * 2}, "activation 'swish'"),
])
def test_bad_recurrent_attributes_are_input_errors(attrs: dict[str, object], message: str) -> None:
    model, _ = _recurrent_model("GRU", "bidirectional", lens=False, initial=False)
    node = model.graph.node[0]
    kept = [a for a in node.attribute if a.name not in attrs]
    del node.attribute[:]
    node.attribute.extend([*kept, *(helper.make_attribute(k, v) for k, v in attrs.items())])
    with pytest.raises(InputError, match=message):
        to_torch(model)


def _one_step(module: OnnxModule, inputs: list[torch.Tensor], names: list[str]) -> None:
    """One SGD step towards perturbed targets: every named weight gets a gradient, changes, loss drops."""
    module.train()
    with torch.no_grad():
        targets = [o + 0.1 * torch.randn_like(o) for o in module(*inputs)]
    params = dict(module.named_parameters())
    before = {n: params[n].detach().clone() for n in names}

    def loss() -> torch.Tensor:
        return sum(torch.nn.functional.mse_loss(o, t) for o, t in zip(module(*inputs), targets, strict=True))  # type: ignore[return-value]

    opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.05)
    loss0 = loss()
    loss0.backward()
    no_grad = [n for n in names if params[n].grad is None or not torch.any(params[n].grad != 0)]
    assert not no_grad, f"no gradient reaches {no_grad}"
    opt.step()
    assert all(not torch.equal(params[n].detach(), before[n]) for n in names)
    with torch.no_grad():
        assert loss().item() < loss0.item()


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_general_path_trains_w_r_b_and_peepholes(op: str) -> None:
    torch.manual_seed(0)
    model, feed = _recurrent_model(op, "bidirectional", lens=True, initial=True, peepholes=op == "LSTM",
                                   clip=2.0)
    module, param_map = to_torch(model, trainable="all")
    weights = ["W", "R", "B", "P"] if op == "LSTM" else ["W", "R", "B"]
    _one_step(module, [torch.from_numpy(feed[n]) for n in module.input_names], [param_map[w] for w in weights])


# --------------------------------------------------------------------------- torch-exported nn.LSTM / nn.GRU


def _export(model: torch.nn.Module, example: torch.Tensor, outputs: list[str], path: Path) -> onnx.ModelProto:
    axes = {"x": {0: "batch", 1: "seq"}, outputs[0]: {0: "batch", 1: "seq"}}
    axes.update({o: {1: "batch"} for o in outputs[1:]})
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=17, input_names=["x"],
                          output_names=outputs, dynamic_axes=axes)
    return onnx.load(str(path))


@pytest.fixture(scope="module", params=["LSTM", "GRU"])
def exported_rnn(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) \
        -> tuple[str, onnx.ModelProto]:
    """nn.LSTM / nn.GRU: 2 layers, bidirectional, batch_first; traced at batch 2, sequence 7."""
    torch.manual_seed(0)
    kind = request.param
    layer = getattr(torch.nn, kind)(5, 8, num_layers=2, bidirectional=True, batch_first=True).eval()
    outputs = ["y", "h_n", "c_n"] if kind == "LSTM" else ["y", "h_n"]
    path = tmp_path_factory.mktemp("rnn") / f"{kind}.onnx"
    model = _export(layer, torch.randn(2, 7, 5), outputs, path)
    return kind, model


def test_exported_rnn_matches_ort_at_other_sizes(exported_rnn: tuple[str, onnx.ModelProto]) -> None:
    kind, model = exported_rnn
    assert sum(n.op_type == kind for n in model.graph.node) == 2
    for batch, seq in ((3, 11), (1, 2)):
        feed = {"x": np.random.default_rng(batch).normal(size=(batch, seq, 5)).astype(np.float32)}
        assert_matches_ort(model, feed)


def test_exported_rnn_trains_every_w_r_b_and_writes_back(exported_rnn: tuple[str, onnx.ModelProto]) -> None:
    kind, model = exported_rnn
    torch.manual_seed(1)
    module, param_map = to_torch(model, trainable="all")
    recurrent = {n for node in model.graph.node if node.op_type == kind for n in node.input[1:4]}
    assert len(recurrent) == 6  # W, R, B of both layers
    x = torch.randn(3, 6, 5)
    _one_step(module, [x], [param_map[n] for n in sorted(recurrent)])
    trained = write_back(model, module, param_map)
    feed = {"x": x.numpy()}
    assert rel_err(ort_run(trained, feed), torch_run(module, feed)) <= TOL
    assert rel_err(ort_run(model, feed), torch_run(module, feed)) > TOL  # the step changed what ORT computes


# --------------------------------------------------------------------------- If / Loop models


def _if_model() -> onnx.ModelProto:
    """y = x @ W_then (W_then inside the then-branch) if sum(x) > 0 else 2 * (x @ W_outer) (outer weight)."""
    rng = np.random.default_rng(0)
    w_then = numpy_helper.from_array(rng.normal(size=(4, 3)).astype(np.float32), "W_then")
    w_outer = numpy_helper.from_array(rng.normal(size=(4, 3)).astype(np.float32), "W_outer")
    two = numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two")
    out = [helper.make_tensor_value_info("branch_y", TensorProto.FLOAT, None)]
    then = helper.make_graph([helper.make_node("MatMul", ["x", "W_then"], ["branch_y"])], "then", [], out, [w_then])
    other_out = [helper.make_tensor_value_info("else_y", TensorProto.FLOAT, None)]
    other = helper.make_graph([helper.make_node("MatMul", ["x", "W_outer"], ["xw"]),
                               helper.make_node("Mul", ["xw", "two"], ["else_y"])], "else", [], other_out, [two])
    nodes = [helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
             helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array(0, np.float32))),
             helper.make_node("Greater", ["total", "zero"], ["cond"]),
             helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)]
    graph = helper.make_graph(nodes, "if_model", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w_outer])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_if_model_matches_ort_on_both_branches_and_names_the_branch_weight() -> None:
    model = _if_model()
    module, param_map = to_torch(model, trainable="all")
    assert {"W_then", "W_outer"} <= set(param_map)
    x = np.random.default_rng(1).normal(size=(5, 4)).astype(np.float32)
    for sign in (1.0, -1.0):
        feed = {"x": sign * np.abs(x)}
        assert rel_err(torch_run(module, feed), ort_run(model, feed)) <= TOL


def test_if_branch_weight_trains_and_writes_back() -> None:
    model = _if_model()
    module, param_map = to_torch(model, trainable="all")
    x = torch.from_numpy(np.abs(np.random.default_rng(2).normal(size=(5, 4))).astype(np.float32))
    torch.manual_seed(0)
    _one_step(module, [x], [param_map["W_then"]])
    trained = write_back(model, module, param_map)
    then = next(a.g for a in trained.graph.node[-1].attribute if a.name == "then_branch")
    assert not np.array_equal(numpy_helper.to_array(then.initializer[0]),
                              numpy_helper.to_array(model.graph.node[-1].attribute[0].g.initializer[0]))
    feed = {"x": x.numpy()}
    assert rel_err(ort_run(trained, feed), torch_run(module, feed)) <= TOL


def _loop_model(with_cond: bool) -> onnx.ModelProto:
    """Carried h <- tanh(h @ W + i) for at most `trip` steps while sum(h) < 1.5, scanning h; the initial
    condition is a constant true input, or absent (`with_cond=False`)."""
    rng = np.random.default_rng(3)
    w = numpy_helper.from_array(rng.normal(0, 0.6, size=(4, 4)).astype(np.float32), "W_body")
    limit = numpy_helper.from_array(np.array(1.5, dtype=np.float32), "limit")
    body = helper.make_graph(
        [helper.make_node("MatMul", ["h_in", "W_body"], ["hw"]),
         helper.make_node("Cast", ["i"], ["i_f"], to=TensorProto.FLOAT),
         helper.make_node("Add", ["hw", "i_f"], ["pre"]),
         helper.make_node("Tanh", ["pre"], ["h_out"]),
         helper.make_node("ReduceSum", ["h_out"], ["s"], keepdims=0),
         helper.make_node("Less", ["s", "limit"], ["cond_out"]),
         helper.make_node("Identity", ["h_out"], ["h_scan"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_in", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_out", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("h_scan", TensorProto.FLOAT, None)])
    cond = numpy_helper.from_array(np.array(True), "cond0")
    inputs = [helper.make_tensor_value_info("trip", TensorProto.INT64, []),
              helper.make_tensor_value_info("h0", TensorProto.FLOAT, ["N", 4])]
    loop = helper.make_node("Loop", ["trip", "cond0" if with_cond else "", "h0"], ["h_final", "hs"], body=body)
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("h_final", "hs")]
    graph = helper.make_graph([loop], "loop_model", inputs, outputs, [w, limit, cond])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("with_cond", [False, True])
def test_loop_model_matches_ort(with_cond: bool) -> None:
    model = _loop_model(with_cond)
    module, param_map = to_torch(model, trainable="all")
    assert "W_body" in param_map
    h0 = np.random.default_rng(4).normal(0, 0.3, size=(2, 4)).astype(np.float32)
    trips = []
    for trip in (0, 1, 6):
        feed = {"trip": np.array(trip, dtype=np.int64), "h0": h0}
        expected = ort_run(model, feed)
        trips.append(expected[1].shape[0])
        if trip == 0:  # no iteration: h passes through; the empty scan output's shape is unknowable
            np.testing.assert_array_equal(torch_run(module, feed)[0], expected[0])
            continue
        assert rel_err(torch_run(module, feed), expected) <= TOL
    assert trips[-1] < 6  # the body's condition output stops the loop before the trip count


def test_loop_body_weight_gets_gradients() -> None:
    model = _loop_model(with_cond=False)
    module, param_map = to_torch(model, trainable="all")
    torch.manual_seed(0)
    h0 = torch.from_numpy(np.random.default_rng(5).normal(0, 0.3, size=(2, 4)).astype(np.float32))
    _one_step(module, [torch.tensor(4), h0], [param_map["W_body"]])


def _scan_model(reverse: int, axis: int) -> onnx.ModelProto:
    """s <- tanh(s @ W_scan + x_t) over x's axis `axis` (both directions), scanning s out along the same axis."""
    w = numpy_helper.from_array(np.random.default_rng(6).normal(0, 0.5, size=(4, 4)).astype(np.float32), "W_scan")
    body = helper.make_graph(
        [helper.make_node("MatMul", ["s_in", "W_scan"], ["sw"]),
         helper.make_node("Add", ["sw", "x_t"], ["pre"]),
         helper.make_node("Tanh", ["pre"], ["s_out"]),
         helper.make_node("Identity", ["s_out"], ["y_t"])],
        "body", [helper.make_tensor_value_info("s_in", TensorProto.FLOAT, [2, 4]),
                 helper.make_tensor_value_info("x_t", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("s_out", TensorProto.FLOAT, [2, 4]),
         helper.make_tensor_value_info("y_t", TensorProto.FLOAT, [2, 4])])
    node = helper.make_node("Scan", ["s0", "x"], ["s_final", "ys"], body=body, num_scan_inputs=1,
                            scan_input_axes=[axis], scan_input_directions=[reverse], scan_output_axes=[axis],
                            scan_output_directions=[reverse])
    x_shape = [2, 5, 4] if axis == 1 else [5, 2, 4]
    graph = helper.make_graph([node], "scan_model", [helper.make_tensor_value_info("s0", TensorProto.FLOAT, [2, 4]),
                                                     helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("s_final", "ys")],
                              [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)])


@pytest.mark.parametrize("reverse", [0, 1])
@pytest.mark.parametrize("axis", [0, 1])
def test_scan_axes_and_directions_match_ort_and_train(reverse: int, axis: int) -> None:
    model = _scan_model(reverse, axis)
    rng = np.random.default_rng(7)
    x_shape = (2, 5, 4) if axis == 1 else (5, 2, 4)
    feed = {"s0": rng.normal(size=(2, 4)).astype(np.float32), "x": rng.normal(size=x_shape).astype(np.float32)}
    assert_matches_ort(model, feed)
    module, param_map = to_torch(model, trainable="all")
    torch.manual_seed(0)
    _one_step(module, [torch.from_numpy(feed[n]) for n in module.input_names], [param_map["W_scan"]])


# --------------------------------------------------------------------------- resemblyzer (real model)


def _mels(batch: int, frames: int) -> dict[str, np.ndarray]:
    return {zoo.MEL_INPUT: np.random.default_rng(batch).random((batch, frames, zoo.MEL_CHANNELS), dtype=np.float32)}


def test_resemblyzer_matches_ort() -> None:
    """3 LSTM layers of 256 + Linear, traced at batch 2 x 24 frames, run at 3 x 50
    (benchmarks/experiments/rnn_control.py also runs real 160-frame partials; each new shape costs oneDNN
    seconds to set up on a busy CPU)."""
    model = load_model(zoo.resemblyzer()).model
    module, param_map = to_torch(model, trainable="all")
    assert sum(n.op_type == "LSTM" for n in model.graph.node) == 3
    assert len(param_map) == 11  # W, R, B of the 3 LSTMs + the Linear's weight and bias
    feed = _mels(3, 50)
    assert rel_err(torch_run(module, feed), ort_run(model, feed)) <= TOL


def test_resemblyzer_svd_student_matches_ort(tmp_path: Path) -> None:
    """compress (svd) factorises the Linear only; the bridge runs the student as ORT does."""
    student_path = tmp_path / "student.onnx"
    api.compress(zoo.resemblyzer(), student_path, Options(mode="svd"))
    student = load_model(student_path).model
    module, param_map = to_torch(student)
    factors = [n for n in param_map if "/svd/" in n]
    assert factors and all("linear" in n for n in factors)
    assert sum(n.op_type == "LSTM" for n in student.graph.node) == 3
    feed = _mels(3, 50)
    assert rel_err(torch_run(module, feed), ort_run(student, feed)) <= TOL
