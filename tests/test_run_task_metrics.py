"""`run --loss/--metric/--ctc-blank` (CLI and Python): the losses and the headline follow what the outputs hold."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import onnx_inher
from onnx_inher.cli import main
from onnx_inher.distill import DistillOptions
from onnx_inher.planning import Options, parse_policy
from onnx_inher.run import BenchSettings
from tests.helpers import ctc_inputs, ctc_teacher, mlp_teacher

METRIC = '''
def frames(teacher, student, inputs):
    (name,) = teacher
    return {"frames": float((teacher[name].argmax(-1) == student[name].argmax(-1)).mean()),
            "samples": float(len(inputs["x"]))}

def wrong(teacher, student, inputs):
    return [1.0]
'''
TINY = ["--mode", "svd", "--param-ratio", "0.25", "--rank-multiple", "1", "--steps", "3", "--batch", "1",
        "--iters", "3"]


@pytest.fixture
def ctc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder with the tiny Softmax [N,T,C] teacher, data.npz and metric.py; the current folder."""
    ctc_teacher(tmp_path / "teacher.onnx")
    np.savez(tmp_path / "data.npz", x=ctc_inputs(80))
    (tmp_path / "metric.py").write_text(METRIC)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ONNX_INHER_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_run_cli_loss_and_metric(ctc: Path) -> None:
    result = CliRunner().invoke(main, ["run", "teacher.onnx", "--data", "data.npz", "-o", "run", *TINY,
                                       "--loss", "fetch_name_0=kl:2", "--metric", "metric:frames", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output[result.output.index("{"):])
    (loss,) = doc["distill"]["student"]["distill"]["losses"]
    assert (loss["kind"], loss["weight"], loss["space"], loss["class_axis"]) == ("kl", 2.0, "probabilities", 2)
    teacher, _init, final = doc["summary"]
    assert (teacher["metric"], teacher["value"]) == ("frames", 1.0)  # the user's metric is the headline
    assert teacher["second"]["metric"] == "samples"
    ev = json.loads((ctc / "run" / "eval.json").read_text())["student"]["final"]
    (out,) = ev["outputs"]
    assert out["kind"] == "probabilities" and out["ctc_blank"] == 0 and out["positions"] == 6
    assert ev["top1_agreement"] is not None and ev["sequence_agreement"] is not None
    assert ev["ctc_agreement"] is not None and ev["student_metric"]["frames"] == pytest.approx(ev["top1_agreement"])
    assert final["value"] == pytest.approx(ev["student_metric"]["frames"])
    report = (ctc / "run" / "report.md").read_text()
    assert "| frames | samples |" in report and "`--metric metric:frames`" in report
    assert "CTC-greedy decoded (blank = class 0)" in report


def test_run_python_headline_is_ctc_agreement_then_top1_for_logits(ctc: Path) -> None:
    options = Options(mode="svd", policy=parse_policy(param_ratio=0.25), rank_multiple=1)
    dopts = DistillOptions(steps=3, checkpoint_every=0)
    bset = BenchSettings(batches=(1,), warmup=1, iters=3)
    result = onnx_inher.run("teacher.onnx", "data.npz", "run", options, dopts, bset, log=lambda _: None)
    assert [r["metric"] for r in result.summary] == ["CTC decoded agreement"] * 3
    assert result.summary[0]["second"]["metric"] == "sequence agreement"
    (loss,) = result.distill["student"]["distill"]["losses"]
    # the default for a Softmax output that reads as CTC: per-frame KL on its log plus the decoded text's CTC
    assert (loss["kind"], loss["space"], loss["blank"]) == ("ctc", "probabilities", 0)
    result = onnx_inher.run("teacher.onnx", "data.npz", "run", options, dopts, bset, ctc_blank=None,
                            log=lambda _: None)
    assert result.summary[0]["metric"] == "sequence agreement"
    (loss,) = result.distill["student"]["distill"]["losses"]
    assert loss["kind"] == "kl"  # --ctc-blank none: not read as CTC, in the loss as in the evaluation
    mlp_teacher(ctc / "mlp.onnx")
    np.savez(ctc / "mlp.npz", x=np.random.default_rng(0).normal(size=(80, 32)).astype(np.float32))
    result = onnx_inher.run("mlp.onnx", "mlp.npz", "run_mlp", options, dopts, bset, log=lambda _: None)
    assert result.summary[0]["metric"] == "top-1 agreement" and result.summary[0]["share"]
    assert "second" not in result.summary[0]
    assert "top-1 agreement" in (ctc / "run_mlp" / "report.md").read_text()


@pytest.mark.parametrize(("args", "message"), [
    (["--metric", "metric:missing"], "--metric metric:missing: 'metric' has no function 'missing'"),
    (["--metric", "nowhere_xyz:f"], "cannot import 'nowhere_xyz'"),
    (["--metric", "metric:wrong"], "must return a finite float or a dict"),
    (["--loss", "logits=kl"], "the teacher has no output 'logits'"),
    (["--loss", "fetch_name_0=huber"], "unknown loss 'huber'"),
    (["--ctc-blank", "blank"], "--ctc-blank must be auto, none or a class index"),
])
def test_bad_loss_or_metric_exits_2_before_any_stage(ctc: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["run", "teacher.onnx", "--data", "data.npz", "-o", "run", *TINY, *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and result.output.count("\n") == 1
    assert not (ctc / "run" / "plan.json").exists()


@pytest.mark.parametrize(("args", "allocate", "calibrated"), [
    ([], "sensitivity", True),  # issue 17: ranks measured on the run's own data by default
    (["--allocate", "energy"], "energy", True),
    (["--calibration", "none"], "energy", False),  # no data for the factors: no data for the ranks either
])
def test_run_allocates_ranks_by_sensitivity_on_its_data_unless_told_otherwise(
        ctc: Path, args: list[str], allocate: str, calibrated: bool) -> None:
    result = CliRunner().invoke(main, ["run", "teacher.onnx", "--data", "data.npz", "-o", "run", *TINY,
                                       "--steps", "1", *args])
    assert result.exit_code == 0, result.output
    plan = json.loads((ctc / "run" / "plan.json").read_text())
    assert plan["options"]["allocate"] == allocate
    assert (plan["options"]["calibration"] == "data.npz") == calibrated
    measured = [w for w in plan["notes"] if w.startswith("sensitivity allocation")]
    assert len(measured) == (allocate == "sensitivity")
    if measured:
        assert "top-1 agreement" in measured[0]  # a class output: the final check ranks by agreement first
    report = (ctc / "run" / "report.md").read_text()
    assert ("- Ranks: Sensitivity allocation (" in report) == (allocate == "sensitivity"), report


def test_run_python_defaults_to_sensitivity_ranks(ctc: Path) -> None:
    dopts = DistillOptions(steps=1, batch_size=1, trainable="all")  # the default budget may factorise nothing
    onnx_inher.run("teacher.onnx", "data.npz", "run", None, dopts, BenchSettings(iters=3), log=lambda _: None)
    plan = json.loads((ctc / "run" / "plan.json").read_text())
    assert plan["options"]["allocate"] == "sensitivity"
