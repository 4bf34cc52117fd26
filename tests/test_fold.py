"""Down convs with their output rows folded into the batch (passes/factorize.py `_folded_conv`), chosen per
layer by the latency check (tuning/speed.py `choose_folds`).

The folded form does the same MACs on row slices stacked on the batch axis, so it must give the unfolded
student's outputs, at any batch. Timings are injected: nothing here depends on how fast this machine is."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_inher
from onnx_inher import api
from onnx_inher.bench.sessions import Settings
from onnx_inher.errors import InputError
from onnx_inher.passes.factorize import fold_applies, fold_bounds
from onnx_inher.planning.plan import Options, Plan
from onnx_inher.planning.rank import parse_policy
from onnx_inher.tuning import latency, speed
from onnx_inher.tuning.latency import LayerTimer, rank_times, static_rows

ort = pytest.importorskip("onnxruntime")


def _teacher(path: Path, rows: int | str = 24) -> Path:
    """conv1: 3x3, stride 2 on rows, W padded; conv2: (5, 1) dilated by 2 on rows, with bias;
    conv3: 3x3 with padded rows; conv4: SAME auto-pad (cannot fold)."""
    rng = np.random.default_rng(0)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)

    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", strides=[2, 1], pads=[0, 1, 0, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", kernel_shape=[5, 1], dilations=[2, 1]),
             helper.make_node("Conv", ["c2", "w3", "b3"], ["c3"], name="conv3", pads=[2, 1, 0, 1]),
             helper.make_node("Conv", ["c3", "w4"], ["y"], name="conv4", auto_pad="SAME_UPPER")]
    inits = [numpy_helper.from_array(a, n) for n, a in (
        ("w1", w(24, 12, 3, 3)), ("w2", w(32, 24, 5, 1)), ("b2", w(32)), ("w3", w(24, 32, 3, 3)), ("b3", w(24)),
        ("w4", w(24, 24, 3, 3)))]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 12, rows, 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 24, "R", 6])
    graph = helper.make_graph(nodes, "convs", [x], [y], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _options(mode: str = "svd", latency_check: bool = False) -> Options:
    return Options(mode=mode, heads=2 if mode == "inher" else 1, policy=parse_policy(rank_ratio=0.5),
                   rank_multiple=1, guard=False, latency_check=latency_check)


def _student(teacher: Path, out: Path, folds: dict[str, dict[str, int]], mode: str = "svd") -> Path:
    plan = api.plan(teacher, _options(mode))
    for c in plan.candidates:
        c.fold = folds.get(c.node)
    plan_file = out.with_suffix(".plan.json")
    plan_file.write_text(plan.to_json())
    api.compress(teacher, out, _options(mode), plan_path=plan_file)
    return out


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]




def test_fold_bounds_split_the_output_rows_into_equal_parts() -> None:
    conv = helper.make_node("Conv", ["x", "w"], ["y"], strides=[2, 1], dilations=[1, 1])
    # kernel 3, stride 2: 24 input rows -> 11 output rows; 11 does not split in 2
    assert fold_bounds(conv, 3, 24, 2) is None
    assert fold_bounds(conv, 3, 25, 2) == [(0, 13), (12, 25)]  # 12 outputs, 6 each, overlapping input rows
    dilated = helper.make_node("Conv", ["x", "w"], ["y"], dilations=[2, 1])
    assert fold_bounds(dilated, 5, 11, 3) is None  # 3 outputs: parts of 1 row are not worth a fold
    assert fold_bounds(dilated, 5, 14, 3) == [(0, 10), (2, 12), (4, 14)]
    padded = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 0, 2, 0])
    assert fold_applies(padded, 17)
    assert fold_bounds(padded, 3, 9, 2) == [(0, 7), (5, 12)]  # rows padded to 12: 10 outputs, 5 each
    assert fold_applies(helper.make_node("Conv", ["x", "w"], ["y"], pads=[0, 1, 0, 1]), 17)
    assert not fold_applies(helper.make_node("Conv", ["x", "w"], ["y"], auto_pad="SAME_UPPER"), 17)
    assert not fold_applies(helper.make_node("Conv", ["x", "w"], ["y"]), 9)


@pytest.mark.parametrize("mode", ["svd", "inher"])
def test_folded_down_convs_give_the_unfolded_outputs_at_any_batch(tmp_path: Path, mode: str) -> None:
    teacher = _teacher(tmp_path / "t.onnx", rows=25)  # conv1: 12 output rows, conv2: 4, conv3: 4
    folds = {"conv1": {"parts": 2, "rows": 25}, "conv2": {"parts": 2, "rows": 12}, "conv3": {"parts": 2, "rows": 4}}
    plain = _student(teacher, tmp_path / "plain.onnx", {}, mode)
    folded = _student(teacher, tmp_path / "folded.onnx", folds, mode)
    names = [n.name for n in onnx.load(str(folded)).graph.node]
    assert "conv1/" + ("svd" if mode == "svd" else "inher") + "/fold.split" in names
    assert sum(n.endswith("/fold.split") for n in names) == 3 and sum(n.endswith("/fold.pad") for n in names) == 1
    for batch in (1, 3):
        x = np.random.default_rng(batch).standard_normal((batch, 12, 25, 6)).astype(np.float32)
        ref = _run(plain, x)
        assert np.abs(_run(folded, x) - ref).max() <= 1e-5 * float(np.abs(ref).max())


def test_a_fold_the_layer_cannot_take_is_refused(tmp_path: Path) -> None:
    teacher = _teacher(tmp_path / "t.onnx")
    for node, fold in (("conv4", {"parts": 2, "rows": 4}),  # SAME auto-pad
                       ("conv1", {"parts": 2, "rows": 24}),  # 11 output rows
                       ("conv1", {"parts": 1, "rows": 24})):  # not a fold
        plan = api.plan(teacher, _options())
        next(c for c in plan.candidates if c.node == node).fold = fold
        (tmp_path / "p.json").write_text(plan.to_json())
        with pytest.raises(InputError, match=f"node '{node}'"):
            api.compress(teacher, tmp_path / "s.onnx", _options(), plan_path=tmp_path / "p.json")
        assert not (tmp_path / "s.onnx").exists()


def test_static_rows_are_those_the_free_dims_do_not_change(tmp_path: Path) -> None:
    fixed = _teacher(tmp_path / "fixed.onnx", rows=25)
    a = api.analyze(fixed)
    plan = api.plan(fixed, _options(), _analysis=a)
    assert static_rows(LayerTimer(plan, a.loaded.model, Settings("cpu", 1)), a.views, {"conv1", "conv2", "conv3"}) == \
        {"conv1": 25, "conv2": 12, "conv3": 4}
    free = _teacher(tmp_path / "free.onnx", rows="H")
    a = api.analyze(free)
    options = _options()
    options.shapes = {"x": [1, 12, 25, 6]}
    plan = api.plan(free, options, _analysis=a)
    assert static_rows(LayerTimer(plan, a.loaded.model, Settings("cpu", 1)), a.views, {"conv1", "conv2", "conv3"}) == {}


def _fake_layer_times(faster: set[str], folded_ms: float = 0.5):
    """Dense 1 ms; factorised 0.8 ms, or `folded_ms` for a folded layer in `faster`."""

    def layer_times(plan: Plan, model, views, settings, **kw):
        return {c.node: (1.0, folded_ms if c.fold and c.node in faster else 0.8, "input 1")
                for c in plan.candidates if c.decision == "factorize"
                and (kw.get("nodes") is None or c.node in kw["nodes"])}

    return layer_times


def test_folds_are_chosen_per_layer_by_measurement_and_recorded(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    teacher = _teacher(tmp_path / "t.onnx", rows=25)
    a = api.analyze(teacher)
    plan = api.plan(teacher, _options(), _analysis=a)
    flops = {c.node: c.flops_after for c in plan.candidates}
    monkeypatch.setattr(speed, "layer_times", _fake_layer_times({"conv1"}))
    assert speed.choose_folds(plan, a.views, a.loaded.model, Settings("cpu", 1)) == {}  # one thread: no fold
    record = speed.choose_folds(plan, a.views, a.loaded.model, Settings("cpu", 2))
    by = {c.node: c for c in plan.candidates}
    assert by["conv1"].fold == {"parts": 2, "rows": 25} and by["conv2"].fold is None and by["conv4"].fold is None
    assert set(record) == {"conv1", "conv2", "conv3"}  # conv4 pads SAME: its pads depend on the shape
    assert record["conv1"] == {"dense": 1.0, "plain": 0.8, "folded": 0.5, "parts": 2, "chosen": "folded"}
    assert record["conv2"]["chosen"] == "plain"
    assert {c.node: c.flops_after for c in plan.candidates} == flops  # the same MACs
    again = Plan.from_json(plan.to_json())
    assert {c.node: (c.fold, c.fold_ms) for c in again.candidates} == {c.node: (c.fold, c.fold_ms)
                                                                       for c in plan.candidates}
    close = api.plan(teacher, _options(), _analysis=a)  # 5% faster alone is within what the model hides
    monkeypatch.setattr(speed, "layer_times", _fake_layer_times({"conv1"}, folded_ms=0.76))
    speed.choose_folds(close, a.views, a.loaded.model, Settings("cpu", 2))
    assert all(c.fold is None for c in close.candidates)


def _fake_timer(models, feed, settings, budget_s=speed.BUDGET_S, what=""):
    return [np.full(30, 1e-3 / (1 + 0.1 * i)) * (1 + 0.001 * np.sin(np.arange(30) + i)) for i in range(len(models))]


def test_latency_check_emits_the_folds_it_measured(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    teacher = _teacher(tmp_path / "t.onnx", rows=25)
    monkeypatch.setenv("ONNX_INHER_LATENCY_CHECK", "1")
    monkeypatch.setattr(speed, "time_models", _fake_timer)
    monkeypatch.setattr(speed, "layer_times", _fake_layer_times({"conv2"}))
    options = _options(latency_check=True)
    options.latency_threads = 2
    r = onnx_inher.compress(teacher, tmp_path / "s.onnx", options)
    assert r.plan.latency_check["folds"]["conv2"]["chosen"] == "folded"
    assert '"fold": {' in r.plan.to_json()
    names = [n.name for n in onnx.load(str(tmp_path / "s.onnx")).graph.node]
    assert "conv2/svd/fold.split" in names and "conv1/svd/fold.split" not in names
    x = np.random.default_rng(2).standard_normal((2, 12, 25, 6)).astype(np.float32)
    ref = _run(_student(teacher, tmp_path / "off.onnx", {}), x)
    assert np.abs(_run(tmp_path / "s.onnx", x) - ref).max() <= 1e-5 * float(np.abs(ref).max())


@pytest.mark.parametrize("whole_faster", [True, False])
def test_folds_stay_only_where_the_whole_student_measures_faster_with_them(monkeypatch: pytest.MonkeyPatch,
                                                                           tmp_path: Path, whole_faster: bool) -> None:
    # a fold that measured faster alone can slow the whole model (the MNIST demo: 1.18x -> 0.99x the teacher)
    teacher = _teacher(tmp_path / "t.onnx", rows=25)
    monkeypatch.setenv("ONNX_INHER_LATENCY_CHECK", "1")
    monkeypatch.setattr(speed, "layer_times", _fake_layer_times({"conv2"}))
    calls: list[int] = []

    def timer(models, feed, settings, budget_s=speed.BUDGET_S, what=""):
        calls.append(len(models))
        if len(models) == 3:  # teacher, unfolded, folded
            folded = 0.8e-3 if whole_faster else 0.95e-3
            return [np.full(30, t) * (1 + 0.001 * np.sin(np.arange(30) + i))
                    for i, t in enumerate((1e-3, 0.9e-3, folded))]
        return _fake_timer(models, feed, settings, budget_s)

    monkeypatch.setattr(speed, "time_models", timer)
    options = _options(latency_check=True)
    options.latency_threads = 2
    r = onnx_inher.compress(teacher, tmp_path / "s.onnx", options)
    record = r.plan.latency_check["folds"]
    assert calls[0] == 3 and record["whole_student"]["kept"] is whole_faster
    conv2 = next(c for c in r.plan.candidates if c.node == "conv2")
    names = [n.name for n in onnx.load(str(tmp_path / "s.onnx")).graph.node]
    if whole_faster:
        assert record["conv2"]["chosen"] == "folded" and conv2.fold == {"parts": 2, "rows": 12}
        assert "conv2/svd/fold.split" in names
        assert "rows folded into the batch in 2 parts: 0.500 ms alone vs 0.800 ms" in (conv2.note or "")
    else:
        assert record["conv2"]["chosen"] == "plain" and conv2.fold is None and '"fold": {' not in r.plan.to_json()
        assert not any("fold" in n for n in names)
        assert "down conv not folded: faster folded alone" in (conv2.note or "")


def test_nothing_is_folded_with_the_check_off(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    teacher = _teacher(tmp_path / "t.onnx", rows=25)
    monkeypatch.setenv("ONNX_INHER_LATENCY_CHECK", "0")
    r = onnx_inher.compress(teacher, tmp_path / "s.onnx", _options())
    assert '"fold"' not in r.plan.to_json()
    assert not any("fold" in n.name for n in onnx.load(str(tmp_path / "s.onnx")).graph.node)


def test_a_restored_round_gets_its_folds_back(tmp_path: Path) -> None:
    """A revert clears a layer's fold; when the check keeps an earlier round's student, the plan must
    describe that student, folds included."""
    teacher = _teacher(tmp_path / "t.onnx", rows=25)
    plan = api.plan(teacher, _options())
    c = next(c for c in plan.candidates if c.node == "conv1")
    c.fold = {"parts": 2, "rows": 25}
    state = speed._state(plan)
    c.decision, c.fold = "skip", None
    speed._restore(plan, state)
    assert c.decision == "factorize" and c.fold == {"parts": 2, "rows": 25}


@pytest.mark.parametrize("folded_ms, priced", [(0.5, 0.5), (0.75, 0.8)])
def test_ranks_are_priced_folded_where_the_fold_pays(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                      folded_ms: float, priced: float) -> None:
    """The time-priced allocation prices a rank with its down conv folded where the check would fold it
    (10% faster alone), so it need not move a layer up to a rank ONNX Runtime splits over threads."""
    teacher = _teacher(tmp_path / "t.onnx", rows=25)
    a = api.analyze(teacher)
    plan = api.plan(teacher, _options(), _analysis=a)

    def fake_pair(dense, fact, settings, warmup, iters):  # dense 1 ms; 0.8 ms unfolded, `folded_ms` folded
        return 1.0, folded_ms if any(n.op_type == "Split" for n in fact.model.graph.node) else 0.8

    monkeypatch.setattr(latency, "time_pair", fake_pair)
    grids = {"conv1": [2, 4], "conv4": [2]}
    two, measured = rank_times(plan, a.loaded.model, a.views, Settings("cpu", 2), grids, tmp_path / "c2")
    assert two["conv1"].ms == {2: priced, 4: priced} and two["conv1"].timings == 4
    assert two["conv1"].folded == ({2, 4} if priced == folded_ms else set())
    assert two["conv4"].ms == {2: 0.8} and not two["conv4"].folded  # SAME auto-pad: never folded
    assert measured == 5
    one, _ = rank_times(plan, a.loaded.model, a.views, Settings("cpu", 1), grids, tmp_path / "c1")
    assert one["conv1"].ms == {2: 0.8, 4: 0.8} and not one["conv1"].folded and one["conv1"].timings == 2
