"""Negligible weights (subnormal, or float32 below 1e-30) the teacher carries in layers compress leaves
alone are flushed too (issue 18), and `bench` times the teacher flushed, so that a student's speedup is
not credited with what flushing alone gives (the PP-OCRv5 detector: 2.0x from flushing alone)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import onnx_inher
from onnx_inher import Options, parse_policy
from onnx_inher.bench import bench
from onnx_inher.passes.flush import FlushNegligible, negligible_weights
from onnx_inher.reporting.bench import markdown, terminal
from tests.helpers import ort_run, rel_err


def _teacher(path: Path) -> Path:
    """MatMul 32->48 (factorised), + bias with near-dead entries, Relu, MatMul 48->8 whose rows for the
    dead units are near-dead too (too small to be factorised: excluded by name), + a Constant scale
    written as value_floats with one tiny entry."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(32, 48)).astype(np.float32) / 6
    b1 = rng.normal(size=48).astype(np.float32)
    b1[:6] = 1e-36
    w2 = rng.normal(size=(48, 8)).astype(np.float32) / 7
    w2[:10] *= 1e-33
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Add", ["h", "b1"], ["hb"], name="bias1"),
             helper.make_node("Relu", ["hb"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["z"], name="fc2"),
             helper.make_node("Constant", [], ["s"], name="scale", value_floats=[1.0] * 7 + [3e-39]),
             helper.make_node("Mul", ["z", "s"], ["y"], name="scaled")]
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1"),
                               numpy_helper.from_array(w2, "w2")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_compress_flushes_the_weights_it_leaves_alone_and_says_so(tmp_path: Path) -> None:
    teacher = _teacher(tmp_path / "t.onnx")
    assert negligible_weights(onnx.load(str(teacher))) == (6 + 80 + 1, 3)
    res = onnx_inher.compress(teacher, tmp_path / "s.onnx",
                              Options(mode="svd", policy=parse_policy(rank_ratio=0.5), rank_multiple=1,
                                      exclude=("fc2",)))
    student = onnx.load(str(tmp_path / "s.onnx"))
    assert negligible_weights(student) == (0, 0)
    assert [c.node for c in res.plan.candidates if c.decision == "factorize"] == ["fc1"]
    assert any("87 negligible floats" in w and "3 tensors" in w for w in res.plan.notes)
    # the layer left alone keeps its values, but for the flushed ones
    w2 = numpy_helper.to_array(next(t for t in student.graph.initializer if t.name == "w2"))
    w2_t = numpy_helper.to_array(next(t for t in onnx.load(str(teacher)).graph.initializer if t.name == "w2"))
    assert (w2[:10] == 0).all() and np.array_equal(w2[10:], w2_t[10:])
    full = onnx_inher.compress(teacher, tmp_path / "full.onnx",
                               Options(mode="svd", policy=parse_policy(rank_ratio=1.0), rank_multiple=1,
                                       guard=False))
    assert full.plan.candidates
    feed = {"x": np.random.default_rng(1).normal(size=(16, 32)).astype(np.float32)}
    assert rel_err(ort_run(onnx.load(str(tmp_path / "full.onnx")), feed), ort_run(onnx.load(str(teacher)), feed)) < 1e-5


def test_the_pass_reaches_subgraphs_and_constant_attributes_and_leaves_its_input_alone() -> None:
    tiny = numpy_helper.from_array(np.array([1.0, 2e-31, -5e-40], np.float32), "c")
    branch = helper.make_graph([helper.make_node("Constant", [], ["k"], value=tiny)], "then", [],
                               [helper.make_tensor_value_info("k", TensorProto.FLOAT, [3])])
    # a scalar is deliberate (a clamp floor before a log, say): kept, however small
    floor = numpy_helper.from_array(np.array(np.finfo(np.float32).tiny, np.float32), "floor")
    other = helper.make_graph([helper.make_node("Constant", [], ["k2"], value_float=1e-35),
                               helper.make_node("Constant", [], ["k3"], value=floor),
                               helper.make_node("Max", ["k2", "k3"], ["k4"])], "else", [],
                              [helper.make_tensor_value_info("k4", TensorProto.FLOAT, [])])
    graph = helper.make_graph([helper.make_node("If", ["cond"], ["out"], then_branch=branch, else_branch=other)],
                              "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.array([1e-300, 1e-310]), "double")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    before = model.SerializeToString()
    flush = FlushNegligible()
    out, changed = flush(model)
    assert changed and (flush.flushed, flush.tensors) == (3, 2)  # 2 in the branch tensor, 1 in the float64 one
    assert model.SerializeToString() == before
    assert negligible_weights(out) == (0, 0)
    then = next(a.g for a in out.graph.node[0].attribute if a.name == "then_branch")
    k = numpy_helper.to_array(then.node[0].attribute[0].t)
    np.testing.assert_array_equal(k, [1.0, 0.0, 0.0])
    other_out = next(a.g for a in out.graph.node[0].attribute if a.name == "else_branch")
    assert other_out.node[0].attribute[0].f == np.float32(1e-35)
    assert numpy_helper.to_array(other_out.node[1].attribute[0].t) == np.finfo(np.float32).tiny
    again, _ = FlushNegligible()(model)
    assert again.SerializeToString() == out.SerializeToString()
    clean, changed = FlushNegligible()(out)
    assert clean is out and not changed


def test_bench_times_the_teacher_flushed_when_its_weights_hold_negligible_floats(tmp_path: Path) -> None:
    teacher = _teacher(tmp_path / "t.onnx")
    student = tmp_path / "s.onnx"
    onnx_inher.compress(teacher, student, Options(mode="svd", policy=parse_policy(rank_ratio=0.5), rank_multiple=1))
    doc = json.loads(json.dumps(bench([teacher, student], provider="cpu", iters=3, warmup=1, threads=1).to_dict()))
    labels = [m["label"] for m in doc["models"]]
    assert labels == ["t", "s", "t (flushed)"]
    assert doc["models"][2]["reference"].startswith("the baseline with its 87 negligible weights")
    assert doc["models"][2]["path"] is None  # a temporary file, gone after the bench
    _, stud, ref = doc["points"][0]["results"]
    assert stud["speedup_vs_reference"]["value"] > 0 and ref["speedup_vs_reference"] is None
    assert ref["speedup"]["value"] > 0
    assert "vs flushed baseline" in terminal(doc) and "t (flushed)" in markdown(doc)
    plain = bench([teacher, student], provider="cpu", iters=3, warmup=1, threads=1, flushed_baseline=False)
    assert [m.label for m in plain.models] == ["t", "s"]
    clean = bench([tmp_path / "s.onnx", teacher], provider="cpu", iters=3, warmup=1, threads=1)
    assert [m.label for m in clean.models] == ["s", "t"]  # a baseline without negligible weights gets no reference


def test_run_report_says_what_flushing_alone_gives() -> None:
    from onnx_inher.reporting.text import flushed_teacher_lines

    ratio = lambda v: {"value": v, "low": v - 0.01, "high": v + 0.01}  # noqa: E731
    bench_doc = {"flushed_teacher": "the baseline with its 35,276 negligible weights (subnormal or below 1e-30, in "
                                    "21 tensors) zeroed",
                 "points": [{"batch": 1, "seq_len": None, "student": {"speedup": ratio(2.1),
                                                                     "speedup_vs_reference": ratio(1.05)},
                             "flushed_teacher": {"speedup": ratio(2.0)}}]}
    text = " ".join(flushed_teacher_lines(bench_doc, {"student": "student"}))
    assert "hold 35,276 negligible weights (subnormal or below 1e-30, in 21 tensors);" in text
    assert "b1: flushed teacher 2.00× the teacher; vs it: student 1.05×" in text
    assert flushed_teacher_lines({"points": []}, {}) == []


def test_flush_command_writes_the_teacher_flushed_and_verifies_it(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from onnx_inher.cli import main

    teacher = _teacher(tmp_path / "t.onnx")
    before = teacher.read_bytes()
    res = CliRunner().invoke(main, ["flush", str(teacher), "-o", str(tmp_path / "f.onnx")])
    assert res.exit_code == 0, res.output
    assert "zeroed 87 negligible weights in 3 tensors" in res.output and "max" in res.output.lower()
    assert teacher.read_bytes() == before
    assert negligible_weights(onnx.load(str(tmp_path / "f.onnx"))) == (0, 0)
    res = CliRunner().invoke(main, ["flush", str(tmp_path / "f.onnx"), "-o", str(tmp_path / "g.onnx")])
    assert res.exit_code == 0 and "nothing written" in res.output and not (tmp_path / "g.onnx").exists()
    res = CliRunner().invoke(main, ["flush", str(teacher), "-o", str(teacher)])
    assert res.exit_code == 2 and teacher.read_bytes() == before  # never overwrites its input
    res = CliRunner().invoke(main, ["flush", str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "h.onnx")])
    assert res.exit_code == 2 and "missing.onnx" in res.output
    res = CliRunner().invoke(main, ["flush", str(teacher), "-o", str(tmp_path / "i.onnx"), "--shape", "y=4x32"])
    assert res.exit_code == 2 and not (tmp_path / "i.onnx").exists()  # bad --verify input: no partial output


def test_bench_says_when_it_cannot_look_for_near_dead_weights(tmp_path: Path) -> None:
    teacher = _teacher(tmp_path / "t.onnx")
    student = tmp_path / "s.onnx"
    onnx_inher.compress(teacher, student, Options(mode="svd", policy=parse_policy(rank_ratio=0.5), rank_multiple=1))
    external = tmp_path / "ext.onnx"
    onnx.save(onnx.load(str(teacher)), str(external), save_as_external_data=True, location="ext.data",
              size_threshold=0)
    result = bench([external, student], provider="cpu", iters=2, warmup=0, threads=1)
    assert [m.label for m in result.models] == ["ext", "s"]
    assert any("near-dead weights not looked for" in s for s in result.skipped)


def test_a_teacher_that_cannot_run_on_the_sample_inputs_is_bad_input(tmp_path: Path) -> None:
    """A model whose free dims take only some sizes (here the batch must be 5) fails in ONNX Runtime on
    the sample inputs: one line naming the model, the shapes tried and the fix, exit 2, no output left."""
    from click.testing import CliRunner

    from onnx_inher.cli import main

    model = onnx.load(str(_teacher(tmp_path / "t.onnx")))
    model.graph.node[0].input[0] = "x5"
    model.graph.node.insert(0, helper.make_node("Add", ["x", "five"], ["x5"], name="fixed_batch"))
    model.graph.initializer.append(numpy_helper.from_array(np.zeros((5, 32), np.float32), "five"))
    teacher = tmp_path / "fixed.onnx"
    onnx.save(model, str(teacher))
    res = CliRunner().invoke(main, ["flush", str(teacher), "-o", str(tmp_path / "f.onnx")])
    assert res.exit_code == 2, res.output
    line = res.output.strip().splitlines()[-1]
    assert "fixed.onnx" in line and "cannot run it on inputs of shape x=" in line and "--shape" in line, line
    assert not (tmp_path / "f.onnx").exists() and "Traceback" not in res.output
    res = CliRunner().invoke(main, ["flush", str(teacher), "-o", str(tmp_path / "f.onnx"), "--shape", "x=5x32"])
    assert res.exit_code == 0 and (tmp_path / "f.onnx").exists(), res.output
    res = CliRunner().invoke(main, ["compress", str(teacher), "-o", str(tmp_path / "s.onnx"), "--verify",
                                    "--no-latency-check"])
    assert res.exit_code == 2 and "cannot run it on inputs of shape" in res.output, res.output
    assert not (tmp_path / "s.onnx").exists()


def test_verify_runs_an_image_model_at_the_size_compress_plans_at(tmp_path: Path) -> None:
    """An image input with free sides is verified at 224 (as compress plans), not 8: a net that pools by 32,
    as detectors do, cannot run at 8x8."""
    from click.testing import CliRunner

    from onnx_inher.cli import main

    w = np.random.default_rng(0).standard_normal((4, 3, 1, 1)).astype(np.float32)
    w[0, 0] = 1e-35
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("MaxPool", ["c"], ["y"], name="pool", kernel_shape=[32, 32], strides=[32, 32])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, "h", "w"])
    graph = helper.make_graph(nodes, "pool32", [x], [y], [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "t.onnx"))
    res = CliRunner().invoke(main, ["flush", str(tmp_path / "t.onnx"), "-o", str(tmp_path / "f.onnx")])
    assert res.exit_code == 0, res.output
    assert "1x4x7x7" in res.output and (tmp_path / "f.onnx").exists()


def test_bench_names_the_shapes_a_model_cannot_run_at(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from onnx_inher.cli import main

    model = onnx.load(str(_teacher(tmp_path / "t.onnx")))
    model.graph.node[0].input[0] = "x5"
    model.graph.node.insert(0, helper.make_node("Add", ["x", "five"], ["x5"], name="fixed_batch"))
    model.graph.initializer.append(numpy_helper.from_array(np.zeros((5, 32), np.float32), "five"))
    onnx.save(model, str(tmp_path / "fixed.onnx"))
    res = CliRunner().invoke(main, ["bench", str(tmp_path / "fixed.onnx"), "--batch", "2", "--iters", "1"])
    assert res.exit_code == 2, res.output
    line = res.output.strip().splitlines()[-1]
    assert "failed on the benchmark inputs (x=2x32)" in line and "--shape" in line, line


def test_what_compress_decided_is_a_note_said_once_even_when_its_plan_is_applied_again(tmp_path: Path) -> None:
    """The flush is information, not something to act on: a `note:` line, and no `warning:` line for a run that
    went as it should. A plan written by one compress and applied by another (as `run` does) keeps each note
    once."""
    from click.testing import CliRunner

    from onnx_inher.cli import main

    teacher = _teacher(tmp_path / "t.onnx")
    first = onnx_inher.compress(teacher, tmp_path / "s.onnx",
                                Options(mode="svd", policy=parse_policy(rank_ratio=0.5), rank_multiple=1,
                                        exclude=("fc2",)))
    assert not first.warnings and first.notes == first.plan.notes and len(first.notes) == 1
    plan = tmp_path / "plan.json"
    plan.write_text(first.plan.to_json())
    assert json.loads(plan.read_text())["notes"] == first.notes and json.loads(plan.read_text())["warnings"] == []
    out = CliRunner().invoke(main, ["compress", str(teacher), "-o", str(tmp_path / "again.onnx"), "--plan", str(plan)])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert [line for line in lines if "negligible floats" in line] == [f"note: {first.notes[0]}"], out.output
    assert not any(line.startswith("warning:") for line in lines), out.output
