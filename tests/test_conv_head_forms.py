"""The two forms of conv heads (passes/factorize.py): the per-sample weight mix (default) and constant
weights in one 1x1 conv, chosen per layer by the latency check (tuning/speed.py `choose_head_forms`).

Both compute `sum_k g_k (U_k z + b_k)`: at initialisation they give the same outputs as each other and as
the plain pair of the same rank, and at full rank the teacher's. Timings are injected: nothing here
depends on how fast this machine is, except one tiny real per-layer timing that only checks it runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_inher
from onnx_inher import api
from onnx_inher.bench.layers import dense_graph, epilogue
from onnx_inher.bench.sessions import Settings
from onnx_inher.errors import InputError
from onnx_inher.ir.graph import GraphIndex
from onnx_inher.planning.plan import Options, Plan
from onnx_inher.planning.rank import parse_policy
from onnx_inher.tuning import speed
from onnx_inher.tuning.latency import layer_key, layer_times

ort = pytest.importorskip("onnxruntime")

UNGROUPED = ("conv1", "conv2")  # conv3 is grouped: it keeps the weight mix whatever the plan says


def _teacher(path: Path) -> Path:
    """conv+bias -> Relu, conv without bias -> Add(constant bias) (the Paddle style), grouped conv+bias."""
    rng = np.random.default_rng(0)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)

    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2"),
             helper.make_node("Add", ["c2", "b2"], ["a2"], name="bias2"),
             helper.make_node("Conv", ["a2", "w3", "b3"], ["y"], name="conv3", group=2, pads=[1, 1, 1, 1])]
    inits = [numpy_helper.from_array(a, n) for n, a in (
        ("w1", w(24, 16, 3, 3)), ("b1", w(24)), ("w2", w(32, 24, 1, 1)), ("b2", w(1, 32, 1, 1)),
        ("w3", w(32, 16, 3, 3)), ("b3", w(32)))]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16, 12, 10])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32, 12, 10])
    graph = helper.make_graph(nodes, "convs", [x], [y], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _options(rank_ratio: float, latency_check: bool = False) -> Options:
    return Options(mode="inher", heads=2, policy=parse_policy(rank_ratio=rank_ratio), rank_multiple=1, guard=False,
                   latency_check=latency_check)


def _student(teacher: Path, out: Path, form: str | None, rank_ratio: float, mode: str = "inher") -> Path:
    """Compress with every layer's head form set to `form` through a plan file (the check off)."""
    options = _options(rank_ratio)
    options.mode, options.heads = mode, (2 if mode == "inher" else 1)
    plan = api.plan(teacher, options)
    for c in plan.candidates:
        c.head_form = form
    plan_file = out.with_suffix(".plan.json")
    plan_file.write_text(plan.to_json())
    api.compress(teacher, out, options, plan_path=plan_file)
    return out


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def _x() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((3, 16, 12, 10)).astype(np.float32)


def test_conv_form_is_exact_at_init_and_at_full_rank(tmp_path: Path) -> None:
    teacher = _teacher(tmp_path / "t.onnx")
    x = _x()
    mix = _run(_student(teacher, tmp_path / "mix.onnx", None, 0.5), x)
    const = _run(_student(teacher, tmp_path / "conv.onnx", "conv", 0.5), x)
    pair = _run(_student(teacher, tmp_path / "pair.onnx", None, 0.5, mode="svd"), x)
    scale = float(np.abs(pair).max())
    assert np.abs(const - mix).max() <= 1e-5 * scale  # the same function as the weight mix
    assert np.abs(const - pair).max() <= 1e-5 * scale  # and, at init, as the plain pair of that rank
    names = [n.name for n in onnx.load(str(tmp_path / "conv.onnx")).graph.node]
    assert all(f"{c}/inher/tile" in names and f"{c}/inher/apply" in names for c in UNGROUPED)
    assert "conv3/inher/mix_weights" in names and "conv3/inher/tile" not in names  # grouped: the weight mix
    full = _run(_student(teacher, tmp_path / "full.onnx", "conv", 1.0), x)
    ref = _run(teacher, x)
    assert np.abs(full - ref).max() <= 1e-4 * float(np.abs(ref).max())


def _ops(path: Path, layer: str) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node if n.name.startswith(f"{layer}/")]


def test_weight_mix_takes_the_bias_into_its_product(tmp_path: Path) -> None:
    """The heads' bias rides in the apply MatMul as a constant-1 row (no Add over the output): the conv's own
    bias, and a per-channel Add that alone reads the conv's output, which goes (Paddle's bias); exact at full
    rank and equal to the pair at init."""
    teacher = _teacher(tmp_path / "t.onnx")
    x = _x()
    mix_path = _student(teacher, tmp_path / "mix.onnx", None, 0.5)
    model = onnx.load(str(mix_path))
    assert "bias2" not in [n.name for n in model.graph.node]  # the Add was taken over...
    assert next(n for n in model.graph.node if n.name == "conv2/inher/out").output[0] == "a2"  # ...its output kept
    for layer in ("conv1", "conv2", "conv3"):
        ops = _ops(mix_path, layer)
        assert "Pad" in ops and "Add" not in ops, (layer, ops)
    pair = _run(_student(teacher, tmp_path / "pair.onnx", None, 0.5, mode="svd"), x)
    assert np.abs(_run(mix_path, x) - pair).max() <= 1e-5 * float(np.abs(pair).max())
    ref = _run(teacher, x)
    full = _run(_student(teacher, tmp_path / "full.onnx", None, 1.0), x)
    assert np.abs(full - ref).max() <= 1e-4 * float(np.abs(ref).max())


def _float_params(path: Path) -> int:
    return sum(int(np.prod(t.dims)) for t in onnx.load(str(path)).graph.initializer if t.data_type == TensorProto.FLOAT)


def test_the_plan_counts_the_bias_the_heads_take_over(tmp_path: Path) -> None:
    """Each head stores the taken-over Add's bias and the Add's copy goes: the plan's params are the file's."""
    teacher = _teacher(tmp_path / "t.onnx")
    result = api.compress(teacher, tmp_path / "s.onnx", _options(0.5))
    totals = result.plan.totals()
    assert _float_params(tmp_path / "s.onnx") == _float_params(teacher) - totals["params_before"] \
        + totals["params_after"]


def _one_conv(path: Path, bias: np.ndarray, dims: list[str | int], readers: int = 1) -> Path:
    """conv -> Add(`bias`) (and, with `readers` 2, a Relu that also reads the conv's output)."""
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c", "b"], ["y"], name="bias")]
    out_dims = [dims[0], 24, *dims[2:]]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_dims)]
    if readers == 2:
        nodes.append(helper.make_node("Relu", ["c"], ["r"], name="relu"))
        outputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, out_dims))
    inits = [numpy_helper.from_array((rng.standard_normal((24, 16, 3, 3)) / 12).astype(np.float32), "w"),
             numpy_helper.from_array(bias.astype(np.float32), "b")]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)
    graph = helper.make_graph(nodes, "conv", [x], outputs, inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize("case", ["per-channel", "along W", "two readers"])
def test_only_a_per_channel_add_read_by_nothing_else_is_taken_over(tmp_path: Path, case: str) -> None:
    bias = np.arange(10.0) if case == "along W" else np.arange(24.0).reshape(24, 1, 1)
    teacher = _one_conv(tmp_path / "t.onnx", bias, ["N", 16, 12, 10], readers=2 if case == "two readers" else 1)
    student = _student(teacher, tmp_path / "s.onnx", None, 1.0)
    kept = "bias" in [n.name for n in onnx.load(str(student)).graph.node]
    assert kept == (case != "per-channel")
    sess = ort.InferenceSession(str(teacher), providers=["CPUExecutionProvider"])
    x = _x()
    for got, ref in zip(ort.InferenceSession(str(student), providers=["CPUExecutionProvider"]).run(None, {"x": x}),
                        sess.run(None, {"x": x}), strict=True):
        assert np.abs(got - ref).max() <= 1e-4 * float(np.abs(ref).max())


@pytest.mark.parametrize("dims,shape_ops", [(["N", 16, 12, 10], 0), (["N", 16, 12, "W"], 0),
                                            (["N", 16, "H", "W"], 2)])
def test_heads_output_shape_needs_no_shape_arithmetic_with_one_free_dim(tmp_path: Path, dims: list[str | int],
                                                                        shape_ops: int) -> None:
    """The `[N, out, pixels]` product goes back to `[N, out, H, W]` by a constant Reshape target (-1 for the
    one dim the model leaves free), or by `Shape(z)` plus the channel change when two are free."""
    teacher = _one_conv(tmp_path / "t.onnx", np.arange(24.0).reshape(1, 24, 1, 1), dims)
    student = _student(teacher, tmp_path / "s.onnx", None, 1.0)
    ops = _ops(student, "conv")
    assert ops.count("Shape") + ops.count("Slice") + ops.count("Concat") + ops.count("Add") == shape_ops, ops
    x = np.random.default_rng(3).standard_normal((2, 16, 12, 10)).astype(np.float32)
    ref, got = _run(teacher, x), _run(student, x)
    assert np.abs(got - ref).max() <= 1e-4 * float(np.abs(ref).max())


def test_unknown_head_form_in_a_plan_is_refused(tmp_path: Path) -> None:
    teacher = _teacher(tmp_path / "t.onnx")
    plan = api.plan(teacher, _options(0.5))
    plan.candidates[0].head_form = "fast"
    (tmp_path / "p.json").write_text(plan.to_json())
    with pytest.raises(InputError, match="head_form 'fast'"):
        api.compress(teacher, tmp_path / "s.onnx", _options(0.5), plan_path=tmp_path / "p.json")


def _fake_layer_times(faster: dict[str, str], win_ms: float = 0.5):
    """Dense 1 ms; each layer's factorised time `win_ms` in the form `faster` names, 0.8 ms in the other."""

    def layer_times(plan: Plan, model, views, settings, **kw):
        return {c.node: (1.0, win_ms if c.head_form == faster.get(c.node, "mix") else 0.8, "input 1")
                for c in plan.candidates if c.decision == "factorize"
                and (kw.get("nodes") is None or c.node in kw["nodes"])}

    return layer_times


def test_choice_is_per_layer_and_recorded_in_the_plan(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    teacher = _teacher(tmp_path / "t.onnx")
    a = api.analyze(teacher)
    plan = api.plan(teacher, _options(0.5), _analysis=a)
    flops_mix = {c.node: c.flops_after for c in plan.candidates}
    monkeypatch.setattr(speed, "layer_times", _fake_layer_times({"conv1": "conv", "conv2": "mix"}))
    record = speed.choose_head_forms(plan, a.views, a.loaded.model, Settings("cpu", 1))
    by = {c.node: c for c in plan.candidates}
    assert by["conv1"].head_form == "conv" and by["conv2"].head_form == "mix" and by["conv3"].head_form is None
    assert by["conv1"].form_ms == {"dense": 1.0, "mix": 0.8, "conv": 0.5}
    assert "constant weights in one 1x1 conv: 0.500 ms alone vs 0.800 ms" in (by["conv1"].note or "")
    assert record["conv1"]["chosen"] == "conv" and set(record) == set(UNGROUPED)
    assert by["conv1"].flops_after > flops_mix["conv1"]  # h x the up-projection's MACs
    assert by["conv2"].flops_after == flops_mix["conv2"]
    close = api.plan(teacher, _options(0.5), _analysis=a)  # 5% faster alone is within what the model hides
    monkeypatch.setattr(speed, "layer_times", _fake_layer_times({"conv1": "conv"}, win_ms=0.76))
    speed.choose_head_forms(close, a.views, a.loaded.model, Settings("cpu", 1))
    assert next(c for c in close.candidates if c.node == "conv1").head_form == "mix"
    again = Plan.from_json(plan.to_json())
    assert {c.node: (c.head_form, c.form_ms) for c in again.candidates} == \
        {c.node: (c.head_form, c.form_ms) for c in plan.candidates}


def _fake_timer(models, feed, settings, budget_s=speed.BUDGET_S, what=""):
    return [np.full(30, 1e-3 / (1 + 0.1 * i)) * (1 + 0.001 * np.sin(np.arange(30) + i)) for i in range(len(models))]


def test_latency_check_emits_the_measured_form(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    teacher = _teacher(tmp_path / "t.onnx")
    monkeypatch.setenv("ONNX_INHER_LATENCY_CHECK", "1")
    monkeypatch.setattr(speed, "time_models", _fake_timer)
    monkeypatch.setattr(speed, "layer_times", _fake_layer_times({"conv1": "conv"}))
    r = onnx_inher.compress(teacher, tmp_path / "s.onnx", _options(0.5, latency_check=True))
    assert r.plan.latency_check["head_forms"]["conv1"]["chosen"] == "conv"
    names = [n.name for n in onnx.load(str(tmp_path / "s.onnx")).graph.node]
    assert "conv1/inher/tile" in names and "conv2/inher/mix_weights" in names
    x = _x()
    off = _run(_student(teacher, tmp_path / "off.onnx", None, 0.5), x)
    assert np.abs(_run(tmp_path / "s.onnx", x) - off).max() <= 1e-5 * float(np.abs(off).max())


def test_deterministic_weight_mix_with_the_check_off(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    teacher = _teacher(tmp_path / "t.onnx")
    monkeypatch.setenv("ONNX_INHER_LATENCY_CHECK", "0")

    def never(*args: object, **kwargs: object) -> object:
        raise AssertionError("nothing is timed with the check off")

    monkeypatch.setattr(speed, "layer_times", never)
    outs = []
    for name in ("a.onnx", "b.onnx"):
        r = onnx_inher.compress(teacher, tmp_path / name, Options(mode="inher", heads=2))
        outs.append((tmp_path / name).read_bytes())
        assert '"head_form"' not in r.plan.to_json()
    assert outs[0] == outs[1]
    assert not any("/inher/tile" in n.name for n in onnx.load(str(tmp_path / "a.onnx")).graph.node)


def test_layers_are_timed_with_what_ort_fuses_after_them(tmp_path: Path) -> None:
    teacher = _teacher(tmp_path / "t.onnx")
    a = api.analyze(teacher)
    model = a.loaded.model
    index = GraphIndex.build(model.graph)
    by = {n.name: n for n in model.graph.node}
    assert [n.name for n in epilogue(by["conv1"], index)] == ["relu1"]
    assert [n.name for n in epilogue(by["conv2"], index)] == ["bias2"]
    assert epilogue(by["conv3"], index) == []  # writes the graph output
    view = a.views["conv2"]
    tail = epilogue(by["conv2"], index)
    dense = dense_graph(view, model, index, (1, 24, 12, 10), tail)
    assert dense is not None and dense.model.graph.output[0].name == "a2"
    attrs = list(by["conv2"].attribute)
    assert layer_key(view, attrs, (1, 24, 12, 10), 8, 2) != layer_key(view, attrs, (1, 24, 12, 10), 8, 2, tail=tail)
    assert layer_key(view, attrs, (1, 24, 12, 10), 8, 2) == layer_key(view, attrs, (1, 24, 12, 10), 8, 2, "mix")
    plan = api.plan(teacher, _options(0.5), _analysis=a)
    for c in plan.candidates:
        c.head_form = "conv"
    plan.options.shapes = {"x": [1, 16, 12, 10]}
    times = layer_times(plan, model, a.views, Settings("cpu", 1), tmp_path / "cache", warmup=1, iters=2)
    assert set(UNGROUPED) <= set(times) and all(d > 0 and f > 0 for d, f, _ in times.values())
