"""Distillation end to end on a tiny compressed MLP: training, determinism, kill -9 + resume, DDP, CLI."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

import onnx_inher
from onnx_inher import Options, parse_policy
from onnx_inher.bridge import to_torch
from onnx_inher.cli import main
from onnx_inher.datasets import input_specs, load_data, split
from onnx_inher.distill import DistillOptions
from onnx_inher.distill import trainer as trainer_module
from onnx_inher.distill.checkpoint import list_checkpoints
from onnx_inher.distill.dist import World
from onnx_inher.distill.losses import OutputLoss
from onnx_inher.distill.options import parse_assignments
from onnx_inher.distill.run import DistillResult
from onnx_inher.distill.trainer import LossPlan, Part, Trainer, autocast_dtype, backoff_due, lr_at
from onnx_inher.errors import InputError
from onnx_inher.reporting.text import exact_start_text
from onnx_inher.runtime import session
from tests.helpers import mlp_teacher, weights

ROOT = Path(__file__).resolve().parents[1]
FAST = {"epochs": 3, "batch_size": 16, "lr": 3e-3, "checkpoint_every": 0, "val_fraction": 0.2}
# One script for every subprocess run, so killed, resumed and uninterrupted runs share threads and imports.
# A test-only slowdown of each step gives the kill a window; it changes no numbers.
RUNNER = """
import json, os, sys, time
from onnx_inher.distill import DistillOptions, distill, trainer
args = json.loads(sys.argv[1])
if args.pop("slow", False):
    step = trainer.Trainer.train_step
    trainer.Trainer.train_step = lambda self, *a: (time.sleep(0.1), step(self, *a))[1]
options = DistillOptions(**args.pop("options"))
result = distill(options=options, **args)
if os.environ.get("RANK", "0") == "0":  # every rank returns the result; one prints it
    print(json.dumps({"steps": result.train.steps, "resumed_from": result.train.resumed_from}))
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Teacher, its 25%-of-params student, and 80 labelled samples (64 train + 16 validation)."""
    folder = tmp_path_factory.mktemp("distill")
    teacher = mlp_teacher(folder / "teacher.onnx")
    onnx_inher.compress(teacher, folder / "student.onnx", Options(policy=parse_policy(param_ratio=0.25),
                                                                     rank_multiple=1))
    x = np.random.default_rng(1).normal(size=(80, 32)).astype(np.float32)
    labels = session(teacher, "cpu").run(["logits"], {"x": x})[0].argmax(1).astype(np.int64)
    np.savez(folder / "data.npz", x=x, labels=labels)
    return {"dir": folder, "teacher": teacher, "student": folder / "student.onnx", "data": folder / "data.npz"}


def run_distill(setup: dict[str, Path], out: Path, **options: object) -> DistillResult:
    return onnx_inher.distill(setup["student"], setup["teacher"], str(setup["data"]), out,
                              DistillOptions(**{**FAST, **options}), cache_dir=setup["dir"] / "cache")


def test_distill_trains_factors_verifies_and_logs(setup: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    result = run_distill(setup, out)
    assert result.train.steps == 12 and result.train_samples == 64 and result.val_samples == 16
    assert result.losses[0]["kind"] == "kd" and result.ort_max_rel < 1e-3
    assert result.train.final["val_loss"] < result.train.initial["val_loss"] and result.train.improved is True
    before, after = weights(setup["student"]), weights(out)
    changed = {n for n in before if not np.array_equal(before[n], after[n])}
    assert changed and all("/inher/" in n for n in changed)
    assert "b1" not in changed  # a teacher weight, frozen under --trainable factors
    records = [json.loads(line) for line in (tmp_path / "out.metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 13))
    assert [r["step"] for r in records if r["kind"] == "val"] == [0, 4, 8, 12]
    assert {"loss", "lr", "loss/logits"} <= set(records[1])
    assert not (tmp_path / "out.checkpoints").exists()
    # a second run finds the teacher's outputs on disk
    assert run_distill(setup, tmp_path / "again.onnx").teacher_cached


def test_same_options_give_byte_identical_students(setup: dict[str, Path], tmp_path: Path) -> None:
    run_distill(setup, tmp_path / "a.onnx", trainable="all")
    run_distill(setup, tmp_path / "b.onnx", trainable="all")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert not np.array_equal(weights(tmp_path / "a.onnx")["b1"], weights(setup["student"])["b1"])


def test_feature_kd_and_loss_overrides(setup: dict[str, Path], tmp_path: Path) -> None:
    result = run_distill(setup, tmp_path / "f.onnx", features=["auto"], losses={"logits": "mse:2"}, steps=3)
    assert result.features == ["h"]
    assert (result.losses[0]["kind"], result.losses[0]["weight"]) == ("mse", 2.0)
    record = json.loads((tmp_path / "f.metrics.jsonl").read_text().splitlines()[1])
    assert record["loss/features"] > 0
    with pytest.raises(InputError, match="not produced in both"):
        run_distill(setup, tmp_path / "g.onnx", features=["fc1/inher/down"])
    with pytest.raises(InputError, match="does not have"):
        run_distill(setup, tmp_path / "g.onnx", losses={"probs": "kl"})


def test_early_stopping_restores_the_best_weights(setup: dict[str, Path], tmp_path: Path) -> None:
    result = run_distill(setup, tmp_path / "e.onnx", lr=0.5, warmup=0.0, epochs=20, eval_every=1, patience=2)
    assert result.train.stopped_early and result.train.steps < 80
    assert result.train.best_step == result.train.steps - 2


def test_a_run_that_only_hurts_gives_back_the_starting_weights(setup: dict[str, Path], tmp_path: Path) -> None:
    result = run_distill(setup, tmp_path / "w.onnx", lr=50.0, warmup=0.0, clip=0.0, steps=4, eval_every=2,
                         trainable="all")
    assert result.train.final["val_loss"] > result.train.initial["val_loss"]
    assert result.train.best_step == 0 and result.train.improved is False
    before, after = weights(setup["student"]), weights(tmp_path / "w.onnx")
    assert all(np.array_equal(before[n], after[n]) for n in before)


def test_a_start_that_already_agrees_everywhere_stops_when_training_no_longer_ties_it(
        setup: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The full-rank student reproduces the teacher, so its top-1 agrees at every validation position and no
    validation can beat it, only tie it: a rate that loses agreement stops the run at its first validation (the
    PP-OCRv5 recogniser's class-split student trained 10 minutes for nothing before this), unless --patience
    says how long to wait."""
    exact = tmp_path / "exact.onnx"
    onnx_inher.compress(setup["teacher"], exact, Options(policy=parse_policy(rank_ratio=1.0), guard=False,
                                                         rank_multiple=1))
    monkeypatch.setattr(trainer_module, "EXACT_POSITIONS", 16)  # the 16 validation samples, one position each

    def distil(out: str, **more: object) -> DistillResult:
        options = {**FAST, "lr": 50.0, "warmup": 0.0, "clip": 0.0, "steps": 8, "eval_every": 2, "trainable": "all"}
        return onnx_inher.distill(exact, setup["teacher"], str(setup["data"]), tmp_path / out,
                                  DistillOptions(**{**options, **more}), cache_dir=setup["dir"] / "cache")

    stopped = distil("s.onnx")
    assert stopped.train.initial["logits/agree"] == 1.0 and stopped.train.exact_start == 16
    assert stopped.train.stopped_early and stopped.train.steps == 2 and stopped.train.improved is False
    start, kept = weights(exact), weights(tmp_path / "s.onnx")
    assert start.keys() == kept.keys() and all(np.array_equal(start[n], kept[n]) for n in start)
    said = exact_start_text(asdict(stopped.train))
    assert "agreed with the teacher's top-1 at all 16 validation positions" in said and "by step 2" in said
    # `--lr auto` does not probe such a start: every rate can only lose agreement, and the gentlest loses least
    said = CliRunner().invoke(main, ["distill", str(exact), "--teacher", str(setup["teacher"]), "--data",
                                     str(setup["data"]), "-o", str(tmp_path / "a.onnx"), "--steps", "8",
                                     "--eval-every", "2", "--batch-size", "16", "--val-fraction", "0.2",
                                     "--checkpoint-every", "0", "--cache-dir", str(setup["dir"] / "cache")])
    assert said.exit_code == 0, said.output
    assert f"--lr auto: {trainer_module.LR_CANDIDATES[-1]:g}, the gentlest rate, not probed" in said.output
    kinds = [json.loads(line)["kind"] for line in (tmp_path / "a.metrics.jsonl").read_text().splitlines()]
    assert "lr_probe" not in kinds and kinds[0] == "val"
    waited = distil("w.onnx", patience=5)
    assert waited.train.exact_start == 16 and not waited.train.stopped_early and waited.train.steps == 8
    monkeypatch.setattr(trainer_module, "EXACT_POSITIONS", 17)  # fewer positions than that prove nothing
    assert distil("n.onnx").train.exact_start is None


def test_data_free_mode_is_labelled(setup: dict[str, Path], tmp_path: Path) -> None:
    result = onnx_inher.distill(setup["student"], setup["teacher"], "random:48", tmp_path / "r.onnx",
                                DistillOptions(**FAST), cache_dir=setup["dir"] / "cache")
    assert result.data_free and result.losses[0]["kind"] == "kl"
    assert json.loads((tmp_path / "r.metrics.jsonl").read_text().splitlines()[0])["data_free"] is True


def spawn(setup: dict[str, Path], out: Path, slow: bool = False, resume: bool = False,
          torchrun: int = 0) -> subprocess.Popen:
    args = {"student": str(setup["student"]), "teacher": str(setup["teacher"]), "data": str(setup["data"]),
            "output": str(out), "cache_dir": str(setup["dir"] / "cache"), "resume": resume, "slow": slow,
            "options": {**FAST, "epochs": 6, "checkpoint_every": 3}}
    runner = setup["dir"] / "runner.py"
    runner.write_text(RUNNER)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"] \
        if torchrun else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([*launcher, str(runner), json.dumps(args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> dict:
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-2000:]
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def uninterrupted(setup: dict[str, Path]) -> Path:
    """The single-process run that the killed-and-resumed run and the 2-process run are compared with."""
    out = setup["dir"] / "full.onnx"
    assert finish(spawn(setup, out)) == {"steps": 24, "resumed_from": None}
    return out


@pytest.mark.cli
def test_resume_after_kill_9_matches_an_uninterrupted_run(setup: dict[str, Path], uninterrupted: Path,
                                                          tmp_path: Path) -> None:

    killed = spawn(setup, tmp_path / "cut.onnx", slow=True)
    folder = tmp_path / "cut.checkpoints"
    deadline = time.monotonic() + 120
    while not any(p.name >= "step-000000006" for p in list_checkpoints(folder)):
        assert killed.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "cut.onnx").exists()

    resumed = finish(spawn(setup, tmp_path / "cut.onnx", resume=True))
    assert resumed["steps"] == 24 and 6 <= resumed["resumed_from"] < 24
    assert (tmp_path / "cut.onnx").read_bytes() == uninterrupted.read_bytes()
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut.metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == list(range(1, 25))


@pytest.mark.cli
def test_two_gloo_processes_match_one(setup: dict[str, Path], uninterrupted: Path, tmp_path: Path) -> None:
    double = spawn(setup, tmp_path / "two.onnx", torchrun=2)
    stdout, stderr = double.communicate(timeout=300)
    assert double.returncode == 0, stderr[-3000:]
    assert json.loads(stdout.strip().splitlines()[-1])["steps"] == 24
    one, two = weights(uninterrupted), weights(tmp_path / "two.onnx")
    assert one.keys() == two.keys()
    for name in one:
        np.testing.assert_allclose(two[name], one[name], rtol=1e-4, atol=1e-5, err_msg=name)
    assert (tmp_path / "two.metrics.jsonl").is_file()


def test_cli_distill_json_and_bad_data(setup: dict[str, Path], tmp_path: Path) -> None:
    base = ["distill", str(setup["student"]), "--teacher", str(setup["teacher"]),
            "--cache-dir", str(setup["dir"] / "cache"), "--epochs", "1", "--batch-size", "16"]
    runner = CliRunner()
    ok = runner.invoke(main, [*base, "--data", str(setup["data"]), "-o", str(tmp_path / "c.onnx"), "--json"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["train"]["steps"] == 4
    np.savez(tmp_path / "bad.npz", x=np.zeros((8, 31), np.float32))
    bad = runner.invoke(main, [*base, "--data", str(tmp_path / "bad.npz"), "-o", str(tmp_path / "d.onnx")])
    assert bad.exit_code == 2 and "axis 1 must be 32" in bad.stderr
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "d.onnx").exists()


def test_a_run_that_never_improves_says_so_and_can_fail(setup: dict[str, Path], tmp_path: Path) -> None:
    args = ["distill", str(setup["student"]), "--teacher", str(setup["teacher"]), "--data", str(setup["data"]),
            "--cache-dir", str(setup["dir"] / "cache"), "--steps", "4", "--eval-every", "2", "--lr", "50",
            "--warmup", "0", "--clip", "0", "--trainable", "all", "--batch-size", "16"]
    runner = CliRunner()
    told = runner.invoke(main, [*args, "-o", str(tmp_path / "a.onnx")])
    assert told.exit_code == 0 and "validation never improved on the starting student" in told.stdout
    failed = runner.invoke(main, [*args, "-o", str(tmp_path / "b.onnx"), "--require-improvement"])
    assert failed.exit_code == 1 and "--require-improvement" in failed.stderr
    assert (tmp_path / "b.onnx").exists()  # written, with its starting weights
    fine = runner.invoke(main, [*args[:8], "--steps", "12", "--eval-every", "4", "-o", str(tmp_path / "c.onnx"),
                                "--require-improvement", "--batch-size", "16"])
    assert fine.exit_code == 0, fine.output


def test_lr_schedule_warms_up_then_decays_to_zero() -> None:
    lrs = [lr_at(s, 100, 1.0, 0.1) for s in range(100)]
    assert lrs[:3] == pytest.approx([0.1, 0.2, 0.3]) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[55] == pytest.approx(0.5, abs=0.02)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:])) and lrs[-1] < 1e-3


def test_precision_is_fp32_on_cpu_unless_asked() -> None:
    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) is None and autocast_dtype("fp32", cpu) is None
    assert autocast_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(InputError, match="fp16 needs a CUDA"):
        autocast_dtype("fp16", cpu)


@pytest.mark.parametrize(("options", "message"), [
    ({"epochs": 0}, "--epochs"), ({"steps": 0}, "--steps"), ({"warmup": 1.0}, "--warmup"),
    ({"alpha": 2.0}, "--alpha"), ({"patience": 2, "val_fraction": 0.0}, "--patience"),
    ({"trainable": "none"}, "--trainable"), ({"losses": {"y": "huber"}}, "unknown loss 'huber'"),
    ({"losses": {"y": "kd:x"}}, "not a number"), ({"precision": "fp8"}, "--precision"),
])
def test_bad_options_are_input_errors(options: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        DistillOptions(**options).validate()


def test_loss_assignments_keep_onnx_names_with_separators() -> None:
    assert parse_assignments(["/enc/out:0=cosine:0.5", "logits=kd"], "--loss") == {"/enc/out:0": "cosine:0.5",
                                                                                 "logits": "kd"}
    with pytest.raises(InputError, match="NAME=VALUE"):
        parse_assignments(["logits"], "--loss")


def test_train_and_eval_modes_switch_around_validation(setup: dict[str, Path]) -> None:
    model = onnx.load(str(setup["student"]))
    module, _ = to_torch(model)
    modes: list[bool] = []
    module.register_forward_pre_hook(lambda m, _inputs: modes.append(m.training))
    data = load_data(str(setup["data"]), input_specs(model))
    train, val = split(data, 0.2)
    teacher = {"logits": session(setup["teacher"], "cpu").run(["logits"], data.inputs)[0]}
    trainer = Trainer(module, LossPlan([OutputLoss("logits", "kd")]), Part(train, teacher), Part(val, teacher),
                      DistillOptions(steps=2, batch_size=16, checkpoint_every=0, lr=1e-3),
                      World(0, 1, torch.device("cpu")), {}, None, None)
    trainer.run()
    assert modes == [False, True, True, False]  # initial validation, two steps, final validation
    assert not module.training


def test_without_a_terminal_progress_comes_as_plain_lines(setup: dict[str, Path], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("ONNX_INHER_QUIET", "0")
    monkeypatch.setattr(trainer_module, "LOG_EVERY", 0.0)  # a line per step instead of one per 30 s
    run_distill(setup, tmp_path / "p.onnx", steps=3)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("distill: step")]
    assert [ln.split(",")[0] for ln in lines] == ["distill: step 1/3", "distill: step 2/3", "distill: step 3/3"]
    assert all("s/step" in ln and "min left" in ln for ln in lines)


def test_lr_auto_probes_each_rate_from_the_start_and_then_trains_as_if_given_the_winner(
        setup: dict[str, Path]) -> None:
    from onnx_inher.distill.trainer import LR_CANDIDATES

    model = onnx.load(str(setup["student"]))
    data = load_data(str(setup["data"]), input_specs(model))
    train, val = split(data, 0.2)
    teacher = {"logits": session(setup["teacher"], "cpu").run(["logits"], data.inputs)[0]}

    def trained(lr: float | None) -> tuple[Any, dict[str, torch.Tensor]]:
        module, _ = to_torch(model)
        result = Trainer(module, LossPlan([OutputLoss("logits", "kd")]), Part(train, teacher), Part(val, teacher),
                         DistillOptions(steps=6, batch_size=16, checkpoint_every=0, lr=lr),
                         World(0, 1, torch.device("cpu")), {}, None, None).run()
        return result, {k: v.detach().clone() for k, v in module.state_dict().items()}

    auto, weights = trained(None)
    assert auto.lr in LR_CANDIDATES and list(auto.lr_probe) == [f"{lr:g}" for lr in LR_CANDIDATES]
    assert auto.lr == min(LR_CANDIDATES, key=lambda lr: (auto.lr_probe[f"{lr:g}"], -lr))
    assert len(set(auto.lr_probe.values())) > 1  # the rates were really tried
    given, same = trained(auto.lr)
    assert given.lr_probe is None and given.final == auto.final
    assert all(torch.equal(weights[k], same[k]) for k in weights)  # the probe left nothing behind


def test_backoff_waits_out_one_mild_dip_but_not_a_wreck_or_a_second_dip(setup: dict[str, Path]) -> None:
    """The rule (`backoff_due`) and the trainer acting on it, with validation losses scripted."""
    assert not backoff_due(1.1, 1.0, 1) and backoff_due(1.1, 1.0, 2) and backoff_due(1.6, 1.0, 1)
    model = onnx.load(str(setup["student"]))
    module, _ = to_torch(model)
    data = load_data(str(setup["data"]), input_specs(model))
    train, val = split(data, 0.2)
    teacher = {"logits": session(setup["teacher"], "cpu").run(["logits"], data.inputs)[0]}
    trainer = Trainer(module, LossPlan([OutputLoss("logits", "kd")]), Part(train, teacher), Part(val, teacher),
                      DistillOptions(steps=6, batch_size=16, checkpoint_every=0, lr=1e-3, eval_every=1),
                      World(0, 1, torch.device("cpu")), {}, None, None)
    # start 1.0; a dip (no cut); a new best; worse twice (cut at the second); a wreck (cut at once); better
    losses = iter([1.0, 1.1, 0.9, 0.95, 0.96, 5.0, 0.8])
    scales: list[float] = []

    def scripted(limit: int | None = None) -> dict[str, float]:
        scales.append(trainer.lr_scale)
        return {"val_loss": next(losses)}

    trainer.evaluate = scripted  # type: ignore[method-assign]
    result = trainer.run()
    # lr_scale as each validation began: cuts after the 5th (second dip in a row) and 6th (wreck) validations
    assert scales == pytest.approx([1.0, 1.0, 1.0, 1.0, 1.0, 0.3, 0.09])
    assert result.best_step == 6 and result.lr_scale == pytest.approx(0.09)


def test_steps_that_fit_count_the_validations_too() -> None:
    from onnx_inher.distill.trainer import steps_that_fit

    assert steps_that_fit(5000, 2.0, 10, 504, 168, 25) == 504  # everything fits: the schedule stays
    # 480 steps of 2 s and 4 validations of 10 s (early, 168, 336, last) take exactly 1000 s
    assert steps_that_fit(1000, 2.0, 10, 504, 168, 25) == 480
    assert steps_that_fit(1, 2.0, 10, 504, 168, 25) == 1


@pytest.mark.parametrize("lr", [None, 1e-3])  # sized after the lr probe, or after a few timed steps
def test_a_time_limit_sizes_the_schedule_so_that_it_ends_on_time(setup: dict[str, Path], lr: float | None,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    model = onnx.load(str(setup["student"]))
    module, _ = to_torch(model)
    data = load_data(str(setup["data"]), input_specs(model))
    train, val = split(data, 0.2)
    teacher = {"logits": session(setup["teacher"], "cpu").run(["logits"], data.inputs)[0]}
    # a fake clock: every training step takes 0.05 s of it, nothing else does, so the sizing is deterministic
    clock = [0.0]
    step = Trainer.train_step

    def timed_step(self: Trainer, *a: Any, **k: Any) -> Any:
        clock[0] += 0.05
        return step(self, *a, **k)

    monkeypatch.setattr(Trainer, "train_step", timed_step)
    monkeypatch.setattr(trainer_module.time, "perf_counter", lambda: clock[0])
    trainer = Trainer(module, LossPlan([OutputLoss("logits", "kd")]), Part(train, teacher), Part(val, teacher),
                      DistillOptions(steps=200, batch_size=16, checkpoint_every=0, lr=lr, time_limit=4.0),
                      World(0, 1, torch.device("cpu")), {}, None, None)
    result = trainer.run()
    assert result.planned_steps == 200 and 10 < result.total_steps < 100, result
    assert result.steps == result.total_steps and not result.out_of_time, result  # the sized schedule ran out
    last = lr_at(result.steps - 1, result.total_steps, trainer.base_lr, 0.05)
    assert last < 0.05 * trainer.base_lr  # the cosine decay ran down with the schedule, not cut mid-way


def test_validation_ranks_class_outputs_by_agreement_before_loss() -> None:
    from onnx_inher.distill.losses import OutputLoss
    from onnx_inher.distill.trainer import selection_score
    from onnx_inher.metrics import better

    probs = [OutputLoss(output="p", kind="kl")]
    frames = 300 * 40  # the recogniser's validation: 300 lines of 40 frames
    start = selection_score({"val_loss": 0.0277, "p/agree": 1.0}, probs, frames)
    later = selection_score({"val_loss": 0.0234, "p/agree": 0.9957}, probs, frames)
    assert start == (1.0, 0.0277, frames)
    assert not better(later, start)  # lower loss, worse decisions: the start stays best
    assert better((1.0, 0.02, frames), start)  # same agreement: the loss decides
    probe = 128 * 40  # --lr auto's 128 samples: 99.90% vs 99.45% of 5,120 frames is a real difference
    assert better((0.999, 0.0282, probe), (0.9945, 0.0277, probe))
    assert not better((0.8125, 9.0, 16), (0.75, 0.5, 16))  # one sample of 16 is noise: the loss decides
    embedding = [OutputLoss(output="e", kind="cosine")]
    assert selection_score({"val_loss": 0.1, "e/cos": 0.9}, embedding, 16) == (None, 0.1, 16)
    mixed = [*probs, *embedding]  # not every output holds classes: the loss alone
    assert selection_score({"val_loss": 0.3, "p/agree": 0.5, "e/cos": 0.9}, mixed, 16)[0] is None
    assert better((None, 0.2, 10), (None, 0.3, 10)) and not better((None, 0.3, 10), (None, 0.2, 10))


def test_a_time_limit_counts_the_setup_before_training(setup: dict[str, Path], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """`run` sizes distillation to its budget: the teacher's outputs computed before training count in it."""
    from onnx_inher.distill import run as run_module
    from onnx_inher.distill.run import training_time_limit

    assert training_time_limit(1579.0, 126.0) == pytest.approx(1453.0)
    assert training_time_limit(100.0, 500.0) == pytest.approx(10.0)  # a long setup still leaves some training
    given: list[float] = []
    real = run_module.Trainer

    def recording(*args: Any, **kw: Any) -> Trainer:
        given.append(args[4].time_limit)
        return real(*args, **kw)

    monkeypatch.setattr(run_module, "Trainer", recording)
    clock = itertools.count(0.0, 1.0)  # every clock reading is one second later: the setup takes seconds
    monkeypatch.setattr(run_module.time, "perf_counter", lambda: float(next(clock)))
    run_distill(setup, tmp_path / "s.onnx", steps=2, time_limit=1000.0)
    assert given and given[0] < 1000.0 - 1.0
