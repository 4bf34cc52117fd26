"""The class split of a classifier head (issue 17): the classes the teacher uses on the calibration data keep
their weights, the others share a small pair, a scatter puts the kept logits in place."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_inher
from onnx_inher import Options, parse_policy
from onnx_inher.api import analyze
from onnx_inher.bridge import to_torch
from onnx_inher.planning import cost
from onnx_inher.planning.plan import SPLIT_RANK
from onnx_inher.tuning.classes import used_classes
from tests.helpers import ort_run, torch_run
from tests.test_bad_input import invoke

CLASSES, USED, FEATURES, HIDDEN, FRAMES = 300, 12, 16, 32, 5


def _vocab_head(path: Path, used: int = USED, per_frame_bias: bool = False) -> Path:
    """x [N, 5, 16] -> Relu(x W1) -> Softmax(h W2 + b) over 300 classes, of which the bias makes only the first
    `used` likely (a recogniser's alphabet inside a large vocabulary)."""
    rng = np.random.default_rng(3)
    w1 = (rng.normal(size=(FEATURES, HIDDEN)) / 4).astype(np.float32)
    w2 = (rng.normal(size=(HIDDEN, CLASSES)) / np.sqrt(HIDDEN)).astype(np.float32)
    b = np.full(CLASSES, -2.0, np.float32)
    b[:used] = 6.0
    if per_frame_bias:  # [FRAMES, CLASSES]: not one bias per class, so the head cannot take it over
        b = np.tile(b, (FRAMES, 1)) + np.linspace(0.0, 0.1, FRAMES, dtype=np.float32)[:, None]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
             helper.make_node("Relu", ["h0"], ["h"], name="relu"),
             helper.make_node("MatMul", ["h", "w2"], ["z"], name="head"),
             helper.make_node("Add", ["z", "b"], ["zb"], name="bias"),
             helper.make_node("Softmax", ["zb"], ["p"], name="softmax", axis=-1)]
    graph = helper.make_graph(
        nodes, "vocab", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", FRAMES, FEATURES])],
        [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["N", FRAMES, CLASSES])],
        initializer=[numpy_helper.from_array(a, n) for n, a in (("w1", w1), ("w2", w2), ("b", b))])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _inputs(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, FRAMES, FEATURES)).astype(np.float32)


@pytest.fixture
def head(tmp_path: Path) -> tuple[Path, Path]:
    np.savez(tmp_path / "cal.npz", x=_inputs(96, 1))
    return _vocab_head(tmp_path / "vocab.onnx"), tmp_path / "cal.npz"


def _options(cal: Path, **kw: object) -> Options:
    return Options(mode="svd", rank_multiple=1, latency_check=False, calibration=str(cal), **kw)  # type: ignore[arg-type]


def test_used_classes_are_every_class_the_teacher_ranks_in_its_top_3(head: tuple[Path, Path]) -> None:
    teacher, cal = head
    x = np.load(cal)["x"]
    a = analyze(teacher)
    got = used_classes(a.loaded.model, a.views, {"x": x})
    p = ort_run(teacher, {"x": x})[0].reshape(-1, CLASSES)
    expected = np.unique(np.argsort(-p, axis=-1)[:, :3]).tolist()
    assert got == {"head": expected}
    assert 3 <= len(expected) <= USED and max(expected) < USED
    assert "fc1" not in got  # a Relu follows it: not a classifier head


def test_the_plan_splits_the_head_and_spreads_the_rest_of_the_budget(head: tuple[Path, Path]) -> None:
    teacher, cal = head
    p = onnx_inher.plan(teacher, _options(cal, policy=parse_policy(param_ratio=0.5)))
    c = next(c for c in p.candidates if c.node == "head")
    view = analyze(teacher).views["head"]
    assert c.decision == "factorize" and c.form == "split" and c.heads == 1 and c.rank == SPLIT_RANK
    assert c.dense_classes and set(c.dense_classes) <= set(range(USED))
    assert c.params_after == cost.split(view, len(c.dense_classes), SPLIT_RANK).params < c.params_before / 2
    assert any(w.startswith("class split: head keeps the weights of") for w in p.warnings)
    assert p.totals()["params_after"] <= 0.5 * p.totals()["params_before"]
    doc = json.loads(p.to_json())
    assert next(e for e in doc["candidates"] if e["node"] == "head")["dense_classes"] == c.dense_classes
    assert "dense_classes" not in next(e for e in doc["candidates"] if e["node"] == "fc1")


def test_no_class_split_and_a_head_that_uses_most_classes_keep_the_plain_pair(tmp_path: Path,
                                                                            head: tuple[Path, Path]) -> None:
    teacher, cal = head
    off = onnx_inher.plan(teacher, _options(cal, class_split=False, policy=parse_policy(param_ratio=0.5)))
    assert next(c for c in off.candidates if c.node == "head").form == "pair"
    broad = _vocab_head(tmp_path / "broad.onnx", used=CLASSES)  # every class equally likely: top 3 covers most
    p = onnx_inher.plan(broad, _options(cal, policy=parse_policy(param_ratio=0.5)))
    assert next(c for c in p.candidates if c.node == "head").dense_classes is None
    assert not any(w.startswith("class split") for w in p.warnings)


def _split_plan(teacher: Path, cal: Path, out: Path, rank: int) -> Path:
    p = onnx_inher.plan(teacher, _options(cal, policy=parse_policy(param_ratio=0.5)))
    doc = json.loads(p.to_json())
    for e in doc["candidates"]:
        if e["node"] == "head":
            e["rank"] = rank
        else:
            e["decision"] = "skip"
    out.write_text(json.dumps(doc))
    return out


def test_the_split_is_exact_at_full_rank_and_keeps_the_used_classes_exact(tmp_path: Path,
                                                                          head: tuple[Path, Path]) -> None:
    teacher, cal = head
    x = _inputs(64, 7)
    p = ort_run(teacher, {"x": x})[0]
    kept = json.loads(_split_plan(teacher, cal, tmp_path / "full.json", HIDDEN).read_text())
    assert next(e for e in kept["candidates"] if e["node"] == "head")["rank"] == HIDDEN
    result = onnx_inher.compress(teacher, tmp_path / "full.onnx", _options(cal), plan_path=tmp_path / "full.json",
                                 verify=True)
    np.testing.assert_allclose(ort_run(tmp_path / "full.onnx", {"x": x})[0], p, atol=1e-5)
    # the layer is compared where teacher and student share a tensor: after the bias the head took over
    assert result.verification is not None and [e.name for e in result.verification.layers] == ["zb"]
    student = onnx.load(str(tmp_path / "full.onnx"))
    ops = [n.op_type for n in student.graph.node]
    assert "ScatterElements" in ops and "Gather" not in ops
    # the bias Add after the head is folded in: no pass over the full-size logits adds it, its weight is gone
    assert "bias" not in {n.name for n in student.graph.node} and "b" not in {t.name for t in student.graph.initializer}
    scatter = next(n for n in student.graph.node if n.op_type == "ScatterElements")
    assert scatter.output[0] == "zb"
    onnx_inher.compress(teacher, tmp_path / "r1.onnx", _options(cal), plan_path=_split_plan(teacher, cal,
                                                                                          tmp_path / "r1.json", 1))
    q = ort_run(tmp_path / "r1.onnx", {"x": x})[0]
    assert (q.argmax(-1) == p.argmax(-1)).all()  # rank 1 for the rest: the used classes still decide
    used = sorted(set(p.reshape(-1, CLASSES).argmax(-1)))
    logit = lambda probs: np.log(probs[..., used]) - np.log(probs[..., used[:1]])  # noqa: E731
    np.testing.assert_allclose(logit(q), logit(p), atol=1e-4)  # kept classes: same logits up to the shift


def test_a_bias_that_is_not_per_class_stays_after_the_split_head(tmp_path: Path, head: tuple[Path, Path]) -> None:
    _, cal = head
    teacher = _vocab_head(tmp_path / "frames.onnx", per_frame_bias=True)
    onnx_inher.compress(teacher, tmp_path / "full.onnx", _options(cal),
                        plan_path=_split_plan(teacher, cal, tmp_path / "full.json", HIDDEN))
    x = _inputs(16, 5)
    np.testing.assert_allclose(ort_run(tmp_path / "full.onnx", {"x": x})[0], ort_run(teacher, {"x": x})[0], atol=1e-5)
    nodes = onnx.load(str(tmp_path / "full.onnx")).graph.node
    assert [n.op_type for n in nodes][-3:] == ["ScatterElements", "Add", "Softmax"] and nodes[-2].name == "bias"


def test_the_split_student_is_deterministic_and_the_bridge_runs_it_as_ort_does(tmp_path: Path,
                                                                                head: tuple[Path, Path]) -> None:
    teacher, cal = head
    options = _options(cal, policy=parse_policy(param_ratio=0.5))
    onnx_inher.compress(teacher, tmp_path / "a.onnx", options)
    onnx_inher.compress(teacher, tmp_path / "b.onnx", options)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    feed = {"x": _inputs(8, 9)}
    module, names = to_torch(onnx.load(str(tmp_path / "a.onnx")))
    np.testing.assert_allclose(torch_run(module, feed)[0], ort_run(tmp_path / "a.onnx", feed)[0], atol=1e-5)
    trained = sorted(onnx_name for onnx_name, key in names.items() if module.get_parameter(key).requires_grad)
    # what distill trains: the factors, and the class bias the head took over (kept classes, constant-1 feature)
    assert trained == [f"head/svd/{w}" for w in ("dense.bias", "dense.weight", "down.one", "down.weight",
                                                 "up.weight")]


def test_a_plan_with_bad_dense_classes_is_one_line_and_exit_2(tmp_path: Path, head: tuple[Path, Path]) -> None:
    teacher, cal = head
    plan = _split_plan(teacher, cal, tmp_path / "plan.json", 4)
    doc = json.loads(plan.read_text())
    next(e for e in doc["candidates"] if e["node"] == "head")["dense_classes"] = [0, 0, CLASSES + 5]
    plan.write_text(json.dumps(doc))
    r = invoke(["compress", str(teacher), "-o", str(tmp_path / "s.onnx"), "--plan", str(plan)])
    assert r.exit_code == 2 and not (tmp_path / "s.onnx").exists()
    assert r.stderr.count("\n") == 1 and "'head'" in r.stderr and "dense_classes" in r.stderr


def test_the_latency_tools_time_a_split_head_in_its_own_form(tmp_path: Path, head: tuple[Path, Path]) -> None:
    from onnx_inher.bench.sessions import Settings
    from onnx_inher.tuning.latency import layer_times

    teacher, cal = head
    p = onnx_inher.plan(teacher, _options(cal, policy=parse_policy(param_ratio=0.5), dims={"N": 2}))
    a = analyze(teacher, {"N": 2})
    times = layer_times(p, a.loaded.model, a.views, Settings(threads=1), cache_dir=tmp_path, warmup=1, iters=3)
    assert set(times) == {c.node for c in p.candidates if c.decision == "factorize"} and "head" in times
    assert all(t[0] > 0 and t[1] > 0 for t in times.values())


def _gemm_classifier(path: Path) -> Path:
    """x [N, 24] -> Softmax(Gemm(x, W^T, b), transB=1) over 200 classes, 6 of them likely: a torch `nn.Linear`
    classifier exported, on data from a few of its classes."""
    rng = np.random.default_rng(4)
    w = (rng.normal(size=(200, 24)) / np.sqrt(24)).astype(np.float32)  # [out, in], read transposed
    b = np.full(200, -2.0, np.float32)
    b[[3, 50, 77, 120, 121, 199]] = 6.0
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["z"], name="fc", transB=1),
             helper.make_node("Softmax", ["z"], ["p"], name="softmax", axis=1)]
    graph = helper.make_graph(nodes, "cls", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 24])],
                              [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["N", 200])],
                              initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


def test_a_gemm_classifier_with_its_bias_splits_and_is_exact_at_full_rank(tmp_path: Path) -> None:
    teacher = _gemm_classifier(tmp_path / "cls.onnx")
    rng = np.random.default_rng(2)
    np.savez(tmp_path / "cal.npz", x=rng.normal(size=(64, 24)).astype(np.float32))
    options = _options(tmp_path / "cal.npz", policy=parse_policy(param_ratio=0.5))
    p = onnx_inher.plan(teacher, options)
    c = next(c for c in p.candidates if c.node == "fc")
    assert c.form == "split" and set(c.dense_classes or []) <= {3, 50, 77, 120, 121, 199}
    doc = json.loads(p.to_json())
    doc["candidates"][0]["rank"] = 24  # the other classes at full rank: the teacher's layer
    (tmp_path / "full.json").write_text(json.dumps(doc))
    onnx_inher.compress(teacher, tmp_path / "full.onnx", _options(tmp_path / "cal.npz"),
                        plan_path=tmp_path / "full.json")
    x = rng.normal(size=(32, 24)).astype(np.float32)
    np.testing.assert_allclose(ort_run(tmp_path / "full.onnx", {"x": x})[0], ort_run(teacher, {"x": x})[0],
                               atol=1e-5)
    nodes = onnx.load(str(tmp_path / "full.onnx")).graph.node
    assert [n.op_type for n in nodes][-2:] == ["ScatterElements", "Softmax"]  # Gemm's C folded in, no Add after
    onnx_inher.compress(teacher, tmp_path / "s.onnx", options)
    q, ref = ort_run(tmp_path / "s.onnx", {"x": x})[0], ort_run(teacher, {"x": x})[0]
    assert (q.argmax(1) == ref.argmax(1)).all()


def test_run_with_every_default_splits_the_head_and_completes(tmp_path: Path, head: tuple[Path, Path],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """`run` verifies the student after compress: a split head that took over its bias must still be compared
    (an ORT 'Invalid output name' once stopped the PP-OCRv5 recogniser's run there)."""
    from click.testing import CliRunner

    from onnx_inher.cli import main

    teacher, cal = head
    monkeypatch.setenv("ONNX_INHER_CACHE", str(tmp_path / "cache"))
    result = CliRunner().invoke(main, ["run", str(teacher), "--data", str(cal), "-o", str(tmp_path / "run"),
                                       "--steps", "1", "--batch-size", "8", "--batch", "1", "--iters", "3"])
    assert result.exit_code == 0, result.output
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert next(e for e in plan["candidates"] if e["node"] == "head").get("dense_classes")
    student = onnx.load(str(tmp_path / "run" / "student.onnx"))
    assert "ScatterElements" in [n.op_type for n in student.graph.node]


def _unknown_rank(teacher: Path, cal: Path, out: Path) -> tuple[Path, Path]:
    """The teacher behind a Squeeze without axes of an `[N, one, 5, 16]` input, and its calibration data:
    shape inference then knows neither the rank nor the dims of the head's logits (as on the PP-OCRv5
    recogniser, whose Paddle export squeezes its features the same way)."""
    model = onnx.load(str(teacher))
    x = model.graph.input[0]
    x.CopyFrom(helper.make_tensor_value_info("x4", TensorProto.FLOAT, ["N", "one", FRAMES, FEATURES]))
    model.graph.node.insert(0, helper.make_node("Squeeze", ["x4"], ["x"], name="squeeze"))
    model.graph.output[0].type.tensor_type.shape.Clear()
    onnx.save(model, str(out))
    np.savez(out.with_suffix(".npz"), x4=np.load(cal)["x"][:, None])
    return out, out.with_suffix(".npz")


@pytest.mark.parametrize("rank_known", [True, False])
def test_the_scatter_writes_in_place_into_logits_whose_dims_are_all_named(tmp_path: Path, head: tuple[Path, Path],
                                                                         rank_known: bool) -> None:
    # ONNX Runtime lets the scatter overwrite its data input only where it can prove the two the same size,
    # which an unnamed unknown dim never is: the up-projection's logits are declared with every dim named
    teacher, cal = head
    if not rank_known:
        teacher, cal = _unknown_rank(teacher, cal, tmp_path / "unknown.onnx")
    onnx_inher.compress(teacher, tmp_path / "s.onnx", _options(cal),
                        plan_path=_split_plan(teacher, cal, tmp_path / "full.json", HIDDEN))
    student = onnx.load(str(tmp_path / "s.onnx"))
    scatter = next(n for n in student.graph.node if n.op_type == "ScatterElements")
    declared = {v.name: v for v in student.graph.value_info}
    dims = declared[scatter.input[0]].type.tensor_type.shape.dim
    assert all(d.HasField("dim_value") or d.dim_param for d in dims) and dims[-1].dim_value == CLASSES
    reshapes = [n.name for n in student.graph.node if n.op_type == "Reshape"]
    if rank_known:  # declared as the model's own logits: ['N', 5, 300], and nothing added around the scatter
        assert [d.dim_param or d.dim_value for d in dims] == ["N", FRAMES, CLASSES] and not reshapes
    else:  # rank unknown: the scatter runs on [rows, classes] views, put back in the logits' shape after it
        assert len(dims) == 2 and dims[0].dim_param == "head/svd/up.d0"
        assert reshapes == ["head/svd/z_rows", "head/svd/kept_rows", "head/svd/logits"]
    feed = {"x": _inputs(24, 4)} if rank_known else {"x4": _inputs(24, 4)[:, None]}
    np.testing.assert_allclose(ort_run(tmp_path / "s.onnx", feed)[0], ort_run(teacher, feed)[0], atol=1e-5)
    module, _ = to_torch(student)
    np.testing.assert_allclose(torch_run(module, feed)[0], ort_run(tmp_path / "s.onnx", feed)[0], atol=1e-5)


@pytest.mark.parametrize("per_frame_bias", [False, True])
def test_the_plan_counts_what_the_split_head_stores(tmp_path: Path, per_frame_bias: bool) -> None:
    """With the bias taken over, the kept classes store theirs and the pair one more rank, and the Add's copy
    goes; with a per-frame bias nothing is taken: either way the plan's params are the file's, and verify
    compares the head where both models have its logits."""
    np.savez(tmp_path / "cal.npz", x=_inputs(96, 1))
    teacher = _vocab_head(tmp_path / "vocab.onnx", per_frame_bias=per_frame_bias)
    r = onnx_inher.compress(teacher, tmp_path / "s.onnx", _options(tmp_path / "cal.npz",
                                                                   policy=parse_policy(param_ratio=0.5)), verify=True)

    def floats(path: Path) -> int:
        return sum(int(np.prod(t.dims)) for t in onnx.load(str(path)).graph.initializer
                   if t.data_type == TensorProto.FLOAT)

    totals = r.plan.totals()
    assert floats(tmp_path / "s.onnx") == floats(teacher) - totals["params_before"] + totals["params_after"]
    assert r.verification is not None
    assert [e.name for e in r.verification.layers] == ["z" if per_frame_bias else "zb"]
