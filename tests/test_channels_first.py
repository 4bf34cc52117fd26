"""A channels-last linear layer whose output goes back to channels-first (ConvNeXt's MLP: `Linear` on
`[N, H, W, C]`, `permute(0, 3, 1, 2)`, a per-channel layer scale) becomes, as a plain pair, a Transpose of its
rank features and one 1x1 Conv that takes the bias and the scale (`passes/factorize.py`,
`_up_channels_first`). The same function as the MatMul pair: exact at full rank, equal to it at any rank,
trainable through the bridge, counted in the plan as in the file; and only where a 1x1 Conv computes it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_inher import api
from onnx_inher.passes import factorize
from onnx_inher.planning.plan import CHANNELS_FIRST, Options
from onnx_inher.planning.rank import parse_policy
from tests.helpers import bridge_round_trip

ort = pytest.importorskip("onnxruntime")

C, HIDDEN = 32, 96


def _block(path: Path, *, perm: tuple[int, ...] = (0, 3, 1, 2), scale: str = "per-channel",
           extra_reader: str = "") -> Path:
    """x [N, C, H, W] -> to channels-last -> fc1 -> Relu -> fc2 (MatMul + Add) -> Transpose(`perm`) -> Mul(scale)
    -> + x. `scale`: "per-channel", "along W" (not a channel vector), "shared" (another Mul reads it too),
    "before" (a per-channel Mul before the Transpose).
    `extra_reader`: "add" (a Relu also reads fc2's biased output) or "transpose" (also the Transpose's)."""
    rng = np.random.default_rng(0)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)

    gamma = (1.0 + rng.standard_normal((C, 1, 1))).astype(np.float32) if scale != "along W" else w(6)
    scaled = [helper.make_node("Transpose", ["h2b"], ["t"], name="to_first", perm=list(perm)),
              helper.make_node("Mul", ["gamma", "t"], ["s"], name="layer_scale")]
    if scale == "before":  # Hugging Face's ConvNeXt: the layer scale on [N, H, W, C], then the permute
        gamma = gamma.reshape(C)
        scaled = [helper.make_node("Mul", ["gamma", "h2b"], ["hs"], name="layer_scale"),
                  helper.make_node("Transpose", ["hs"], ["s"], name="to_first", perm=list(perm))]
    nodes = [helper.make_node("Transpose", ["x"], ["xl"], name="to_last", perm=[0, 2, 3, 1]),
             helper.make_node("MatMul", ["xl", "w1"], ["h1"], name="fc1"),
             helper.make_node("Add", ["h1", "b1"], ["h1b"], name="fc1_bias"),
             helper.make_node("Relu", ["h1b"], ["h"], name="act"),
             helper.make_node("MatMul", ["h", "w2"], ["h2"], name="fc2"),
             helper.make_node("Add", ["h2", "b2"], ["h2b"], name="fc2_bias"),
             *scaled,
             helper.make_node("Add", ["s", "x"], ["y"], name="residual")]
    inits = [numpy_helper.from_array(a, n) for n, a in (("w1", w(C, HIDDEN)), ("b1", w(HIDDEN)),
                                                        ("w2", w(HIDDEN, C)), ("b2", w(C)), ("gamma", gamma))]
    out_dims = ["N", C, 6, 6]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_dims)]
    if scale == "shared":
        nodes.append(helper.make_node("Mul", ["x", "gamma"], ["xs"], name="other_scale"))
        outputs.append(helper.make_tensor_value_info("xs", TensorProto.FLOAT, ["N", C, 6, 6]))
    if extra_reader:
        read, dims = {"add": ("h2b", ["N", 6, 6, C]), "transpose": ("t", out_dims)}[extra_reader]
        nodes.append(helper.make_node("Relu", [read], ["r"], name="reader"))
        outputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, dims))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", C, 6, 6])
    graph = helper.make_graph(nodes, "block", [x], outputs, inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _options(rank_ratio: float) -> Options:
    return Options(mode="svd", heads=1, policy=parse_policy(rank_ratio=rank_ratio), rank_multiple=1, guard=False,
                   latency_check=False)


def _run(path: Path, x: np.ndarray) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})


def _x() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((3, C, 6, 6)).astype(np.float32)


def _nodes(path: Path) -> dict[str, onnx.NodeProto]:
    return {n.name: n for n in onnx.load(str(path)).graph.node}


@pytest.mark.parametrize("scale", ["per-channel", "before"])
def test_the_pair_writes_the_transpose_bias_and_scale_as_one_conv(tmp_path: Path, scale: str) -> None:
    teacher = _block(tmp_path / "t.onnx", scale=scale)
    student = tmp_path / "s.onnx"
    for plan in (api.plan(teacher, _options(0.5)), api.compress(teacher, student, _options(0.5)).plan):
        notes = {c.node: c.note or "" for c in plan.candidates}
        assert CHANNELS_FIRST in notes["fc2"] and CHANNELS_FIRST not in notes["fc1"]  # the plan says so
    nodes = _nodes(student)
    assert not {"fc2_bias", "to_first", "layer_scale"} & set(nodes)  # taken over...
    assert nodes["fc2/svd/up"].op_type == "Conv" and nodes["fc2/svd/up"].output[0] == "s"  # ...their output kept
    assert list(nodes["fc2/svd/up_channels_first"].attribute[0].ints) == [0, 3, 1, 2]
    assert nodes["fc1/svd/up"].op_type == "MatMul" and "fc1_bias" in nodes  # a Relu follows fc1: a MatMul pair
    assert "residual" in nodes


@pytest.mark.parametrize("scale", ["per-channel", "before"])
def test_same_function_as_the_matmul_pair_and_exact_at_full_rank(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   scale: str) -> None:
    teacher = _block(tmp_path / "t.onnx", scale=scale)
    x = _x()
    ref = _run(teacher, x)[0]
    api.compress(teacher, tmp_path / "full.onnx", _options(1.0))
    assert np.abs(_run(tmp_path / "full.onnx", x)[0] - ref).max() <= 1e-5 * float(np.abs(ref).max())
    api.compress(teacher, tmp_path / "half.onnx", _options(0.5))
    monkeypatch.setattr(factorize, "channels_first", lambda view, cand: None)
    api.compress(teacher, tmp_path / "matmul.onnx", _options(0.5))
    assert _nodes(tmp_path / "matmul.onnx")["fc2/svd/up"].op_type == "MatMul"
    half, matmul = _run(tmp_path / "half.onnx", x)[0], _run(tmp_path / "matmul.onnx", x)[0]
    assert np.abs(half - matmul).max() <= 1e-5 * float(np.abs(matmul).max())
    assert np.abs(half - ref).max() > 1e-3 * float(np.abs(ref).max())  # rank 16 of 32 is not the teacher


def _float_params(path: Path) -> int:
    return sum(int(np.prod(t.dims)) for t in onnx.load(str(path)).graph.initializer if t.data_type == TensorProto.FLOAT)


@pytest.mark.parametrize("scale", ["per-channel", "shared", "before"])
def test_the_plan_counts_what_the_file_holds(tmp_path: Path, scale: str) -> None:
    """The bias moves into the conv; the scale goes with its Mul unless another node reads it."""
    teacher = _block(tmp_path / "t.onnx", scale=scale)
    result = api.compress(teacher, tmp_path / "s.onnx", _options(0.5))
    totals = result.plan.totals()
    assert "layer_scale" not in _nodes(tmp_path / "s.onnx")
    assert _float_params(tmp_path / "s.onnx") == _float_params(teacher) - totals["params_before"] \
        + totals["params_after"]
    x = _x()
    for got, want in zip(_run(tmp_path / "s.onnx", x), _run(teacher, x), strict=True):
        assert got.shape == want.shape


@pytest.mark.parametrize(("case", "kwargs", "gone"), [
    ("scale along W", {"scale": "along W"}, {"fc2_bias", "to_first"}),  # the Mul stays after the conv
    ("transpose read twice", {"extra_reader": "transpose"}, {"fc2_bias", "to_first"}),
    ("biased output read twice", {"extra_reader": "add"}, set()),
    ("other permutation", {"perm": (0, 3, 2, 1)}, set()),
])
def test_taken_over_only_where_a_1x1_conv_computes_it(tmp_path: Path, case: str, kwargs: dict, gone: set[str]
                                                      ) -> None:
    teacher = _block(tmp_path / "t.onnx", **kwargs)
    student = tmp_path / "s.onnx"
    api.compress(teacher, student, _options(1.0))
    nodes = _nodes(student)
    assert {"fc2_bias", "to_first", "layer_scale"} - set(nodes) == gone, case
    assert (nodes["fc2/svd/up"].op_type == "Conv") == bool(gone), case
    x = _x()
    for got, want in zip(_run(student, x), _run(teacher, x), strict=True):
        assert np.abs(got - want).max() <= 1e-5 * float(np.abs(want).max()), case


def test_heads_keep_the_matmul_form(tmp_path: Path) -> None:
    teacher = _block(tmp_path / "t.onnx")
    options = _options(1.0)
    options.mode, options.heads = "inher", 2
    api.compress(teacher, tmp_path / "s.onnx", options)
    nodes = _nodes(tmp_path / "s.onnx")
    assert "to_first" in nodes and not any(n.startswith("fc2/svd/") for n in nodes)


def test_the_bridge_trains_it_and_writes_it_back(tmp_path: Path) -> None:
    teacher = _block(tmp_path / "t.onnx")
    api.compress(teacher, tmp_path / "s.onnx", _options(0.5))
    bridge_round_trip(tmp_path / "s.onnx", {"x": _x()}, ["fc2/svd/up."], tmp_path)  # the conv's weight and bias train


def test_single_layer_timings_build_the_pair_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Timing a layer alone (`plan --target cpu`, the check's reverts, `run`'s time-priced ranks) builds the
    pair without the nodes after the layer: it once wrote the tail's output there and could not be built."""
    monkeypatch.setenv("ONNX_INHER_CACHE", str(tmp_path / "cache"))
    teacher = _block(tmp_path / "t.onnx")
    plan = api.plan(teacher, _options(0.5), target="cpu")
    fc2 = next(c for c in plan.candidates if c.node == "fc2")
    assert fc2.decision == "factorize" or "not faster on cpu" in (fc2.reason or ""), fc2.reason
    assert list((tmp_path / "cache" / "latency").glob("*.json"))  # it was timed


def test_only_float32_layers_take_it(tmp_path: Path) -> None:
    """ONNX Runtime's CPU Conv runs float32 only: a float16 layer keeps its MatMul pair."""
    from onnx_inher.ir.layers import LayerView
    from onnx_inher.passes.locate import locate

    model = onnx.load(str(_block(tmp_path / "t.onnx")))
    views = {v.node: v for v in locate(model) if isinstance(v, LayerView)}
    assert views["fc2"].channels_first is not None and views["fc1"].channels_first is None
    for t in model.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    for v in [*model.graph.input, *model.graph.output]:
        v.type.tensor_type.elem_type = TensorProto.FLOAT16
    half = {v.node: v for v in locate(model) if isinstance(v, LayerView)}
    assert half["fc2"].dtype == np.float16 and half["fc2"].channels_first is None


def test_a_sequence_back_to_channels_first_takes_a_1d_conv(tmp_path: Path) -> None:
    """`[N, L, C] @ W -> Transpose(0, 2, 1)` (a sequence model handing its features back to 1-D convs): the pair
    writes a Conv1d; exact at full rank."""
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="proj"),
             helper.make_node("Transpose", ["h"], ["y"], name="to_first", perm=[0, 2, 1])]
    graph = helper.make_graph(nodes, "seq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 20, C])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", HIDDEN, 20])],
                              [numpy_helper.from_array((rng.standard_normal((C, HIDDEN)) / 6).astype(np.float32), "w")])
    teacher = tmp_path / "t.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(teacher))
    api.compress(teacher, tmp_path / "s.onnx", _options(1.0))
    nodes_s = _nodes(tmp_path / "s.onnx")
    assert "to_first" not in nodes_s and nodes_s["proj/svd/up"].op_type == "Conv"
    x = np.random.default_rng(4).standard_normal((2, 20, C)).astype(np.float32)
    run = lambda p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]  # noqa: E731
    want = run(teacher)
    assert np.abs(run(tmp_path / "s.onnx") - want).max() <= 1e-5 * float(np.abs(want).max())
