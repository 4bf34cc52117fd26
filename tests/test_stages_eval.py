"""Run-folder stages (skip only when still valid), the ORT evaluation, and the plots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_inher
from onnx_inher.metrics import cosine_rows, evaluate
from onnx_inher.reporting.plots import plot_layers, plot_training
from onnx_inher.run.stages import MANIFEST, RunFolder


def _stage(folder: RunFolder, calls: list[str], option: int = 1, inputs: tuple[Path, ...] = ()) -> dict:
    def body() -> dict:
        calls.append("ran")
        (folder.path("out.txt")).write_text(f"value {option}")
        return {"option": option}

    return folder.stage("make", {"option": option}, list(inputs), ["out.txt"], body, log=lambda _: None)


def test_stage_skipped_when_valid_and_rerun_when_not(tmp_path: Path) -> None:
    calls: list[str] = []
    src = tmp_path / "input.txt"
    src.write_text("a")
    run = RunFolder(tmp_path / "run")
    assert _stage(run, calls, inputs=(src,)) == {"option": 1}
    assert _stage(RunFolder(tmp_path / "run"), calls, inputs=(src,)) == {"option": 1}
    assert calls == ["ran"]  # the second, fresh folder object trusted the manifest
    _stage(RunFolder(tmp_path / "run"), calls, option=2, inputs=(src,))
    assert len(calls) == 2  # options changed
    src.write_text("b")
    _stage(RunFolder(tmp_path / "run"), calls, option=2, inputs=(src,))
    assert len(calls) == 3  # input content changed
    (tmp_path / "run" / "out.txt").write_text("tampered")
    _stage(RunFolder(tmp_path / "run"), calls, option=2, inputs=(src,))
    assert len(calls) == 4  # output no longer what was recorded
    (tmp_path / "run" / "out.txt").unlink()
    _stage(RunFolder(tmp_path / "run"), calls, option=2, inputs=(src,))
    assert len(calls) == 5


def test_interrupted_stage_is_not_recorded(tmp_path: Path) -> None:
    run = RunFolder(tmp_path)

    def body() -> dict:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run.stage("broken", {}, [], ["x"], body, log=lambda _: None)
    doc = json.loads((tmp_path / MANIFEST).read_text())
    assert [s["name"] for s in doc["stages"]] == []


def test_corrupt_manifest_means_rerun(tmp_path: Path) -> None:
    (tmp_path / MANIFEST).write_text("{not json")
    calls: list[str] = []
    _stage(RunFolder(tmp_path), calls)
    assert calls == ["ran"]


def _linear_model(path: Path, w: np.ndarray) -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", w.shape[0]])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", w.shape[1]])
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y],
                          [numpy_helper.from_array(w.astype(np.float32), "w")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_evaluate_accuracy_agreement_and_cosine(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(6, 4))
    teacher = _linear_model(tmp_path / "t.onnx", w)
    student = _linear_model(tmp_path / "s.onnx", w * 2.0)  # same directions: cosine 1, same argmax
    x = rng.normal(size=(50, 6)).astype(np.float32)
    labels = (x @ w).argmax(1)
    labels[:5] = (labels[:5] + 1) % 4  # teacher is wrong on 5 of 50
    e = evaluate(teacher, student, {"x": x}, labels)
    assert e.teacher_accuracy == pytest.approx(0.9)
    assert e.student_accuracy == pytest.approx(0.9)
    assert e.top1_agreement == 1.0
    assert e.outputs[0].cosine_mean == pytest.approx(1.0, abs=1e-6)
    assert e.outputs[0].max_rel == pytest.approx(1.0, rel=1e-5)
    other = _linear_model(tmp_path / "o.onnx", -w)
    assert evaluate(teacher, other, {"x": x}).outputs[0].cosine_mean == pytest.approx(-1.0, abs=1e-6)


def test_cosine_rows_golden() -> None:
    a = np.array([[1.0, 0.0], [1.0, 1.0]])
    b = np.array([[0.0, 2.0], [2.0, 2.0]])
    np.testing.assert_allclose(cosine_rows(a, b), [0.0, 1.0])


def test_plots_written_and_deterministic(tmp_path: Path) -> None:
    model = Path(onnx_inher.__file__).parent / "data" / "mnist_cnn.onnx"
    p = onnx_inher.plan(model)
    assert plot_layers(p, tmp_path / "a.png") and plot_layers(p, tmp_path / "b.png")
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = [{"kind": "train", "step": i, "loss": 1.0 / (i + 1)} for i in range(20)]
    records += [{"kind": "val", "step": 19, "val_loss": 0.1, "logits/acc": 0.9}]
    assert plot_training(records, tmp_path / "train.png")
    assert not plot_training([], tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


def test_reports_are_readable_by_others(tmp_path: Path) -> None:
    """mkstemp makes 0600 files; reports and plans follow the umask like any other tool's output."""
    import os

    from onnx_inher.ir.io import write_text

    old = os.umask(0o022)
    try:
        write_text(tmp_path / "plan.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "plan.json").stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]


def test_a_distillation_that_gave_its_start_back_is_reported_as_such() -> None:
    from onnx_inher.reporting.text import _training_line
    from onnx_inher.run import not_improved

    variants = {"student": {"distill": {"train": {"improved": False, "steps": 80}}},
                "student_pair": {"distill": {"train": {"improved": True, "steps": 80}}}}
    assert not_improved(variants) == ["student"]
    assert not_improved({"student": {"distill": {"train": {"improved": None}}}}) == []
    line = _training_line("student", variants["student"]["distill"])
    assert "validation never improved on the starting student" in line and "SVD-initialised" in line
    assert "never improved" not in _training_line("pair", variants["student_pair"]["distill"])
