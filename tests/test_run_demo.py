"""`demo --quick` end to end (what `make demo` runs, shortened), rerun skipping, and interrupted runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from onnx_inher.cli import main
from onnx_inher.demo import QUICK_TOLERANCE, TEACHER
from onnx_inher.distill import DistillOptions
from onnx_inher.planning.plan import Options
from onnx_inher.planning.rank import parse_policy
from onnx_inher.run import pipeline
from onnx_inher.run.pipeline import BenchSettings

pytestmark = pytest.mark.slow

EXPECTED = ["plan.json", "plan_pair.json", "layers.png", "student_init.onnx", "student.onnx", "metrics.jsonl",
            "student_pair_init.onnx", "student_pair.onnx", "eval.json", "bench.json", "bench.md", "bench.png",
            "report.md", "report.json", "training.png", "run.json"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    folder = tmp_path_factory.mktemp("demo") / "run"
    result = CliRunner().invoke(main, ["demo", "--quick", "-o", str(folder), "--json"])
    assert result.exit_code == 0, result.output
    return folder, result.output


def test_demo_quick_student_close_to_teacher(demo_run: tuple[Path, str]) -> None:
    folder, output = demo_run
    doc = json.loads(output[output.index("{"):])
    rows = {r["model"]: r for r in doc["summary"]}
    teacher = rows["teacher"]["value"]
    for name in ("student (heads), distilled", "student pair, distilled"):
        # the label says "(no gain: kept its init weights)" when the calibrated init was not beaten
        row = next(r for label, r in rows.items() if label.startswith(name))
        assert row["value"] >= teacher - QUICK_TOLERANCE, (name, row["value"], teacher)
        assert row["params"] <= 0.5 * rows["teacher"]["params"]
    for name in EXPECTED:
        assert (folder / name).is_file(), name
    report = (folder / "report.md").read_text()
    assert "Do the heads pay for themselves?" in report and "Verdict:" in report
    assert "mnist5k:test" in report
    assert json.loads((folder / "plan.json").read_text())["options"]["calibration"] == "mnist5k"  # whitened by default


def test_rerun_skips_every_stage(demo_run: tuple[Path, str]) -> None:
    folder, _ = demo_run
    before = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.onnx")}
    result = CliRunner().invoke(main, ["demo", "--quick", "-o", str(folder)])
    assert result.exit_code == 0, result.output
    assert result.output.count("up to date, skipped") >= 7
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.onnx")} == before


def test_interrupted_distill_leaves_a_folder_the_next_run_completes(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    distill_pkg = sys.modules["onnx_inher.distill"]  # `onnx_inher.distill` the attribute is the function
    real = distill_pkg.distill

    def interrupted(*args: object, **kwargs: object) -> object:
        raise KeyboardInterrupt

    options = Options(mode="svd", policy=parse_policy(param_ratio=0.5))
    dopts = DistillOptions(steps=4, batch_size=32)
    bset = BenchSettings(batches=(1,), warmup=1, iters=3)
    monkeypatch.setattr(distill_pkg, "distill", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(TEACHER, "digits", tmp_path / "run", options, dopts, bset, log=lambda _: None)
    manifest = json.loads((tmp_path / "run" / "run.json").read_text())
    assert [s["name"] for s in manifest["stages"]] == ["plan", "compress:student"]
    assert not (tmp_path / "run" / "student.onnx").exists()
    monkeypatch.setattr(distill_pkg, "distill", real)
    logs: list[str] = []
    result = pipeline.run(TEACHER, "digits", tmp_path / "run", options, dopts, bset, log=logs.append)
    assert logs[:2] == ["[plan] up to date, skipped", "[compress:student] up to date, skipped"]
    assert (tmp_path / "run" / "report.md").is_file()
    assert "student_pair" not in result.distill  # svd mode: nothing to compare


def test_bad_run_input_exits_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["run", str(tmp_path / "missing.onnx"), "--data", "digits",
                                       "-o", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert "missing.onnx" in result.output
