"""The latency check of compress/run (onnx_inher/tuning/speed.py), with an injected timer: no test here
depends on how fast this machine is. The suite turns the check off by default (tests/conftest.py)."""

from __future__ import annotations

import json
from copy import deepcopy
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import onnx_inher
from onnx_inher import Options
from onnx_inher.cli import main
from onnx_inher.planning.plan import load_plan
from onnx_inher.tuning import speed

MNIST = Path(onnx_inher.__file__).parent / "data" / "mnist_cnn.onnx"
TEACHER_MS = 1.0


def fake_timer(pair_ms: float, heads_ms: float, calls: list | None = None, kernel_up_ms: float = 0.0):
    """Each factorised layer adds `pair_ms` (plain pair) or `heads_ms` (heads) to the teacher's time, and a pair
    with its k x k kernel up (a k x k `up` conv) `kernel_up_ms` more."""

    def time_models(models, feed, settings, budget_s=speed.BUDGET_S, what="latency check"):
        out = []
        for i, m in enumerate(models):
            ms = TEACHER_MS
            if i:
                model = m if isinstance(m, onnx.ModelProto) else onnx.load(str(m))  # a student: proto or file
                names = [n.name for n in model.graph.node]
                pairs = {n.split("/svd/")[0] for n in names if "/svd/" in n}
                heads = {n.split("/inher/")[0] for n in names if "/inher/" in n}
                dims = {t.name: list(t.dims) for t in model.graph.initializer}
                up = [n for n in model.graph.node if n.name.endswith("/svd/up") and n.op_type == "Conv"
                      and any(d > 1 for d in dims.get(n.input[1], [1, 1])[2:])]
                ms += pair_ms * len(pairs) + heads_ms * len(heads) + kernel_up_ms * len(up)
            out.append(np.full(30, ms / 1e3) * (1 + 0.001 * np.sin(np.arange(30) + i)))
        if calls is not None:
            calls.append(len(models))
        return out

    return time_models


def fake_layers(gains: dict[str, float]):
    """Per-layer timings: dense 1 ms, factorised 1 - gain ms (unknown layers save 0.1 ms)."""

    def layer_times(plan, model, views, settings, **kw):
        return {c.node: (1.0, 1.0 - gains.get(c.node, 0.1), "input 1")
                for c in plan.candidates if c.decision == "factorize"}

    return layer_times


@pytest.fixture
def checked(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("ONNX_INHER_LATENCY_CHECK", "1")
    monkeypatch.setattr(speed, "layer_times", fake_layers({}))  # never time layers for real here
    return monkeypatch


def test_default_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONNX_INHER_LATENCY_CHECK", "0")
    assert not speed.enabled(None) and speed.enabled(True)
    monkeypatch.setenv("ONNX_INHER_LATENCY_CHECK", "1")
    assert speed.enabled(None) and not speed.enabled(False)


def test_pairs_chosen_when_they_measure_faster(checked: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[int] = []
    checked.setattr(speed, "time_models", fake_timer(pair_ms=-0.1, heads_ms=0.2, calls=calls))
    r = onnx_inher.compress(MNIST, tmp_path / "s.onnx", Options(pick_form=True))
    doc = r.plan.latency_check
    # teacher, heads, pairs and the pairs with every kernel down (the plan puts two of the CNN's up) together
    # when planning; the check takes the pairs' timing up (the same student: nothing reverted, no head form or
    # fold changed) and times the student at batch 8 only
    assert calls == [4, 2]
    assert doc["form"]["orientation"] == "auto"  # every kernel down times the same: the plan's kernels stay up
    assert doc["rounds"][0]["measured"] == "with the form choice, the same student"
    assert doc["rounds"][0]["speedup"] == doc["form"]["pair"]["speedup"] and not speed._FORM_TIMINGS
    # the pairs were planned at the budget asked for (0.425 of the params: rank steps of 16 on small layers, some
    # with the kernel up), not at the heads' ranks (0.386)
    totals = r.plan.totals()
    assert 0.40 <= totals["params_after"] / totals["params_before"] <= 0.55, totals
    assert doc["batch_8"]["speedup"] > 1 and doc["shapes"] == {"image": [1, 1, 28, 28]}
    assert doc["form"]["chosen"] == "pair" and doc["verdict"] == "faster" and doc["ok"] and not doc["reverted"]
    chosen = [c for c in r.plan.candidates if c.decision == "factorize"]
    assert chosen and all(c.heads == 1 and c.form == "pair" and "form: a plain pair" in c.note for c in chosen)
    names = [n.name for n in onnx.load(str(tmp_path / "s.onnx")).graph.node]
    assert any("/svd/" in n for n in names) and not any("/inher/" in n for n in names)


def test_pairs_take_every_kernel_down_when_that_measures_faster(checked: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The MNIST CNN's plan puts two 3x3 kernels up; where those pairs time slower than the same budget with every
    kernel down, the student is built with every kernel down, and the plan says so."""
    checked.setattr(speed, "time_models", fake_timer(pair_ms=-0.1, heads_ms=0.2, kernel_up_ms=0.05))
    r = onnx_inher.compress(MNIST, tmp_path / "s.onnx", Options(pick_form=True))
    form = r.plan.latency_check["form"]
    assert form["chosen"] == "pair" and form["orientation"] == "down"
    assert form["pair_kernels_down"]["speedup"] > form["pair_kernels_up"]["speedup"]
    assert r.plan.options.orientation == "down" and not any(c.orientation for c in r.plan.candidates)
    assert any("every kernel down" in w for w in r.plan.notes)
    model = onnx.load(str(tmp_path / "s.onnx"))
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    downs = [n for n in model.graph.node if n.name.endswith("/svd/down") and n.op_type == "Conv"]
    assert downs and all(dims[n.input[1]][2:] == [3, 3] for n in downs)


def test_heads_kept_within_noise_or_when_the_form_is_fixed(checked: pytest.MonkeyPatch, tmp_path: Path) -> None:
    checked.setattr(speed, "time_models", fake_timer(pair_ms=-0.1, heads_ms=-0.1))
    r = onnx_inher.compress(MNIST, tmp_path / "a.onnx", Options(pick_form=True))
    assert r.plan.latency_check["form"]["chosen"] == "heads"
    checked.setattr(speed, "time_models", fake_timer(pair_ms=-0.2, heads_ms=-0.05))
    r = onnx_inher.compress(MNIST, tmp_path / "b.onnx", Options())  # Python keeps the form asked for
    assert r.plan.latency_check["form"] is None
    assert any(c.heads == 2 for c in r.plan.candidates if c.decision == "factorize")


def test_no_revert_keeps_the_student_byte_identical(checked: pytest.MonkeyPatch, tmp_path: Path) -> None:
    checked.setattr(speed, "time_models", fake_timer(pair_ms=-0.1, heads_ms=-0.1))
    onnx_inher.compress(MNIST, tmp_path / "on.onnx", Options(pick_form=False))
    onnx_inher.compress(MNIST, tmp_path / "off.onnx", Options(latency_check=False))
    assert (tmp_path / "on.onnx").read_bytes() == (tmp_path / "off.onnx").read_bytes()


def test_slower_student_reverts_worst_first(checked: pytest.MonkeyPatch, tmp_path: Path) -> None:
    checked.setattr(speed, "time_models", fake_timer(pair_ms=0.2, heads_ms=0.3))
    plain = onnx_inher.compress(MNIST, tmp_path / "p.onnx", Options(latency_check=False, heads=1))
    order = [c.node for c in plain.plan.candidates if c.decision == "factorize"]
    gains = {n: 0.5 - 0.1 * i for i, n in enumerate(order)}  # the last one saves least: reverted first
    checked.setattr(speed, "layer_times", fake_layers(gains))
    r = onnx_inher.compress(MNIST, tmp_path / "s.onnx", Options(heads=1), plan_path=None)
    doc = r.plan.latency_check
    assert doc["rounds"][0]["verdict"] == "slower"
    assert doc["rounds"][1]["reverted"] == [order[-1]]  # 1, then 2, then 4 ... worst first
    assert doc["reverted"] == list(reversed(order))  # every layer makes it slower: all go
    # the last round measured the teacher's own graph: no verdict on a student is left to give
    assert doc["rounds"][-1]["verdict"] == "not measurably slower"
    assert doc["verdict"] == speed.UNCHANGED and doc["unchanged"] and doc["ok"]
    assert set(doc["layers"]) == set(order)
    for c in r.plan.candidates:
        if c.node in order:
            assert c.decision == "skip" and c.reason.startswith("reverted by the latency check")
            assert "factorised" in c.reason and "dense" in c.reason
    assert not any("/svd/" in n.name for n in onnx.load(str(tmp_path / "s.onnx")).graph.node)
    assert any("reverted to dense" in w for w in r.plan.notes)


def test_min_speedup_reverts_only_losing_layers(checked: pytest.MonkeyPatch, tmp_path: Path) -> None:
    checked.setattr(speed, "time_models", fake_timer(pair_ms=-0.05, heads_ms=-0.05))
    plain = onnx_inher.compress(MNIST, tmp_path / "p.onnx", Options(latency_check=False, heads=1))
    order = [c.node for c in plain.plan.candidates if c.decision == "factorize"]
    checked.setattr(speed, "layer_times", fake_layers({order[0]: -0.2}))
    r = onnx_inher.compress(MNIST, tmp_path / "s.onnx", Options(heads=1, min_speedup=3.0))
    doc = r.plan.latency_check
    assert [x["reverted"] for x in doc["rounds"]] == [[], [order[0]]]  # the only layer slower alone
    assert not doc["ok"] and doc["verdict"] == "below --min-speedup" and not r.speed_ok
    # reverting it made the whole student slower (each pair saves time here): the first student is kept
    assert doc["restored"] == 0 and doc["reverted"] == []
    assert all(c.decision == "factorize" for c in r.plan.candidates if c.node in order)
    assert (tmp_path / "s.onnx").read_bytes() == (tmp_path / "p.onnx").read_bytes()


def test_plan_json_round_trips_the_check(checked: pytest.MonkeyPatch, tmp_path: Path) -> None:
    checked.setattr(speed, "time_models", fake_timer(pair_ms=-0.1, heads_ms=0.2))
    r = onnx_inher.compress(MNIST, tmp_path / "s.onnx", Options(pick_form=True))
    (tmp_path / "plan.json").write_text(r.plan.to_json())
    again = load_plan(tmp_path / "plan.json")
    assert again.latency_check == json.loads(r.plan.to_json())["latency_check"]
    assert again.options.pick_form is True and again.options.min_speedup is None


def test_cli_flags_and_exit_codes(checked: pytest.MonkeyPatch, tmp_path: Path) -> None:
    checked.setattr(speed, "time_models", fake_timer(pair_ms=-0.1, heads_ms=0.2))
    cli = CliRunner()
    ok = cli.invoke(main, ["compress", str(MNIST), "-o", str(tmp_path / "a.onnx"), "--json"])
    assert ok.exit_code == 0, ok.output
    doc = json.loads(ok.output)
    assert doc["latency_check"]["form"]["chosen"] == "pair" and doc["latency_check"]["ok"]
    fixed = cli.invoke(main, ["compress", str(MNIST), "-o", str(tmp_path / "b.onnx"), "--heads", "2", "--json"])
    assert json.loads(fixed.output)["latency_check"]["form"] is None  # an explicit form is kept
    off = cli.invoke(main, ["compress", str(MNIST), "-o", str(tmp_path / "c.onnx"), "--no-latency-check", "--json"])
    assert off.exit_code == 0 and json.loads(off.output)["latency_check"] is None
    slow = cli.invoke(main, ["compress", str(MNIST), "-o", str(tmp_path / "d.onnx"), "--min-speedup", "9"])
    assert slow.exit_code == 1 and "below --min-speedup 9" in slow.output
    assert (tmp_path / "d.onnx").exists()  # written, and reported as failing
    bad = cli.invoke(main, ["compress", str(MNIST), "-o", str(tmp_path / "e.onnx"), "--min-speedup", "2",
                            "--no-latency-check"])
    assert bad.exit_code == 2 and "--min-speedup needs the latency check" in bad.output
    zero = cli.invoke(main, ["compress", str(MNIST), "-o", str(tmp_path / "f.onnx"), "--min-speedup", "0"])
    assert zero.exit_code == 2


def test_run_stops_below_min_speedup_before_distilling(checked: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import sys

    from onnx_inher.distill import DistillOptions
    from onnx_inher.errors import CheckFailed
    from onnx_inher.run import BenchSettings, pipeline

    def never(*args: object, **kwargs: object) -> object:
        raise AssertionError("distill must not run")

    checked.setattr(sys.modules["onnx_inher.distill"], "distill", never)
    checked.setattr(speed, "time_models", fake_timer(pair_ms=-0.1, heads_ms=0.2))
    with pytest.raises(CheckFailed, match="--min-speedup 9"):
        pipeline.run(MNIST, "digits", tmp_path / "run", Options(min_speedup=9.0, pick_form=True),
                     DistillOptions(steps=2), BenchSettings(batches=(1,), warmup=1, iters=3), log=lambda _: None)
    manifest = json.loads((tmp_path / "run" / "run.json").read_text())
    stage = next(s for s in manifest["stages"] if s["name"] == "compress:student")
    assert stage["result"]["latency_check"]["form"]["chosen"] == "pair"
    assert stage["result"]["latency_check"]["ok"] is False
    applied = load_plan(tmp_path / "run" / "student_init.plan.json")
    assert applied.latency_check == stage["result"]["latency_check"]


def test_rounds_of_a_sub_ms_model_span_the_budget() -> None:
    """1000 single runs of a 0.05 ms model fill 0.1 s of a 3 s budget; grouped, the rounds fill it all."""
    from onnx_inher.tuning import speed

    reps = speed.runs_per_round(5e-5, 3.0, 2)
    assert reps * 5e-5 * 2 * speed.MAX_ROUNDS == pytest.approx(3.0, rel=0.05)
    assert speed.runs_per_round(0.02, 3.0, 2) == 1  # a 20 ms model: one run per round, as before
    assert speed.runs_per_round(1e-9, 3.0, 2) == speed.MAX_REPS


def test_a_timing_that_spans_a_change_of_machine_speed_is_taken_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """A check's decision on rounds that straddle two machine states (this VM: MiniLM 17 -> 25 ms at 2 threads)
    would rest on a ratio that holds in neither: the rounds are timed once more (the state lasts seconds to
    minutes), and a steady timing is taken as it is."""
    steady = [np.full(40, 0.017), np.full(40, 0.011)]
    stepped = [np.r_[np.full(20, 0.017), np.full(20, 0.025)], np.r_[np.full(20, 0.011), np.full(20, 0.019)]]
    given = [stepped, steady]
    calls: list[int] = []

    def rounds(runners, reps, budget_s, desc="timing"):
        calls.append(reps)
        return given.pop(0)

    monkeypatch.setattr(speed, "timed_rounds", rounds)
    feed = {"image": np.zeros((1, 1, 28, 28), np.float32)}
    got = speed.time_models([MNIST, MNIST], feed, speed.cpu_settings(1), budget_s=0.1)
    assert len(calls) == 2 and got is steady
    given[:] = [steady, stepped]
    calls.clear()
    assert speed.time_models([MNIST, MNIST], feed, speed.cpu_settings(1), budget_s=0.1) is steady
    assert len(calls) == 1


def test_the_check_line_says_when_batch_8_is_measurably_slower() -> None:
    from onnx_inher.reporting.text import latency_check_line

    doc = {"speedup": 1.03, "low": 1.01, "high": 1.05, "verdict": "faster", "threads": 2,
           "batch_8": {"speedup": 0.95, "low": 0.93, "high": 0.96}}
    assert "still slower than the teacher at batch 8" in latency_check_line(doc)
    doc["batch_8"] = {"speedup": 1.04, "low": 0.96, "high": 1.12}
    assert "slower" not in latency_check_line(doc) and "batch 8: 1.04x" in latency_check_line(doc)
    # every layer reverted: two sessions of the teacher's graph differ by the timing's bias, not by a student
    doc.update(verdict="every layer reverted: the student is the teacher's graph", unchanged=True,
               batch_8={"speedup": 0.99, "low": 0.99, "high": 0.995})
    assert "still slower" not in latency_check_line(doc) and "the teacher's graph" in latency_check_line(doc)
    assert "speed changed" not in latency_check_line(doc)
    doc["drift"] = {"baseline_ms": [17.2, 17.3, 25.4, 25.6], "speedups": [[1.55, 1.54, 1.31, 1.32]]}
    assert "the machine's speed changed during the check: the teacher took 17.2-25.6 ms" in latency_check_line(doc)


def test_a_student_slower_at_batch_8_loses_layers_until_it_is_not(checked: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A tie at batch 1 and a loss at batch 8 is not a faster student: layers go, the least time saved first,
    each round timing both batches, until batch 8 is not slower (MTCNN's P-Net: 1.00x, then 0.97-0.99x)."""
    at_one, at_eight = fake_timer(pair_ms=0.0, heads_ms=0.0), fake_timer(pair_ms=0.1, heads_ms=0.1)
    batches: list[int] = []

    def time_models(models, feed, settings, budget_s=speed.BUDGET_S, what="latency check"):
        batch = next(iter(feed.values())).shape[0]
        batches.append(batch)
        return (at_eight if batch == speed.SECOND_BATCH else at_one)(models, feed, settings, budget_s)

    checked.setattr(speed, "time_models", time_models)
    plain = onnx_inher.compress(MNIST, tmp_path / "p.onnx", Options(latency_check=False, heads=1))
    order = [c.node for c in plain.plan.candidates if c.decision == "factorize"]
    checked.setattr(speed, "layer_times", fake_layers({n: 0.5 - 0.1 * i for i, n in enumerate(order)}))
    r = onnx_inher.compress(MNIST, tmp_path / "s.onnx", Options(heads=1))
    doc = r.plan.latency_check
    assert doc["rounds"][0]["verdict"] == "not measurably slower"  # batch 1 alone would have kept them all
    assert doc["rounds"][1]["reverted"] == [order[-1]] and doc["rounds"][1]["at"] == "batch 8 slower"
    assert doc["reverted"] == list(reversed(order))
    assert speed.verdict(doc["batch_8"], None) != "slower"
    assert batches.count(speed.SECOND_BATCH) == len(doc["rounds"])  # every revert round timed batch 8 too
    for c in r.plan.candidates:
        if c.node in order:
            assert c.decision == "skip" and "at batch 8, slower than the teacher" in c.reason
    from onnx_inher.reporting.text import latency_check_line

    assert "still slower" not in latency_check_line(doc)


def test_latency_threads_set_every_timing_and_need_the_check(checked: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`--latency-threads N`: the form choice and the check time with N threads (a student tuned for the threads
    it will run with); N < 1, or N with the check off, is a usage error naming the option."""
    seen: list[int] = []
    timer = fake_timer(pair_ms=-0.1, heads_ms=0.2)

    def recording(models, feed, settings, budget_s=speed.BUDGET_S, what=""):
        seen.append(settings.threads)
        return timer(models, feed, settings, budget_s)

    checked.setattr(speed, "time_models", recording)
    r = onnx_inher.compress(MNIST, tmp_path / "s.onnx", Options(pick_form=True, latency_threads=1))
    assert seen == [1, 1] and r.plan.latency_check["threads"] == 1  # the form choice and batch 8
    assert json.loads(r.plan.to_json())["options"]["latency_threads"] == 1
    for args, message in ((["--latency-threads", "0"], "--latency-threads must be >= 1"),
                          (["--latency-threads", "1", "--no-latency-check"], "drop --no-latency-check")):
        out = CliRunner().invoke(main, ["compress", str(MNIST), "-o", str(tmp_path / "x.onnx"), *args])
        assert out.exit_code == 2 and message in out.output and not (tmp_path / "x.onnx").exists(), out.output


def test_students_are_timed_against_the_teacher_flushed(checked: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Every student is flushed (passes/flush.py): against a teacher slowed by near-dead weights, every
    factorisation would look faster, whether it paid or not."""
    from onnx import numpy_helper

    from onnx_inher.bench.layers import fold
    from onnx_inher.ir.graph import GraphIndex
    from onnx_inher.passes.flush import negligible_weights

    model = onnx.load(str(MNIST))
    w = next(t for t in model.graph.initializer if numpy_helper.to_array(t).ndim == 4)
    values = numpy_helper.to_array(w).copy()
    values.reshape(-1)[:5] = 1e-35
    w.CopyFrom(numpy_helper.from_array(values, w.name))
    teacher = tmp_path / "near_dead.onnx"
    onnx.save(model, str(teacher))
    baselines: list = []
    timer = fake_timer(pair_ms=-0.1, heads_ms=0.2)

    def time_models(models, feed, settings, budget_s=speed.BUDGET_S, what="latency check"):
        baselines.append((models[0], negligible_weights(onnx.load(str(models[0])))))
        return timer(models, feed, settings, budget_s)

    checked.setattr(speed, "time_models", time_models)
    r = onnx_inher.compress(teacher, tmp_path / "s.onnx", Options(pick_form=True))
    assert baselines and all(path != teacher and found == (0, 0) for path, found in baselines)
    assert not any(path.exists() for path, _ in baselines)  # a temporary copy, removed after the check
    assert "5 negligible weights (1 tensors) flushed" in r.plan.latency_check["baseline"]
    # a dense layer timed alone gets the flushed weights too
    assert (fold([w.name], GraphIndex.build(model.graph))[w.name].reshape(-1)[:5] == 0).all()


def test_a_form_chosen_when_planning_is_not_redecided_at_smaller_pairs(checked: pytest.MonkeyPatch,
                                                                      tmp_path: Path) -> None:
    """Planning times heads and pairs at the same budget; pairs at the heads' ranks are smaller than asked,
    so a second look would favour them for being smaller (the detector: 40.9% of the params, not 50%)."""
    calls: list[int] = []
    equal, pairs_win = fake_timer(pair_ms=-0.1, heads_ms=-0.1), fake_timer(pair_ms=-0.3, heads_ms=-0.1)

    def time_models(models, feed, settings, budget_s=speed.BUDGET_S, what="latency check"):
        calls.append(len(models))
        return (equal if len(calls) == 1 else pairs_win)(models, feed, settings, budget_s)

    checked.setattr(speed, "time_models", time_models)
    r = onnx_inher.compress(MNIST, tmp_path / "s.onnx", Options(pick_form=True))
    assert r.plan.latency_check["form"]["chosen"] == "heads"
    # planning timed teacher, heads, pairs and pairs with every kernel down (the CNN's plan puts two up); the
    # check timed the student alone, no second pick
    assert calls[0] == 4 and all(n == 2 for n in calls[1:])
    assert all(c.heads == 2 for c in r.plan.candidates if c.decision == "factorize")


def test_the_check_times_anew_a_student_the_form_choice_did_not_time(checked: pytest.MonkeyPatch,
                                                                      tmp_path: Path) -> None:
    """The form choice's timing stands in for the check's first only for the same structure: another rank, a
    reverted layer or a plan from a file (perhaps from another machine) is timed again."""
    calls: list[int] = []
    checked.setattr(speed, "time_models", fake_timer(pair_ms=-0.1, heads_ms=0.2, calls=calls))
    plan = onnx_inher.plan(MNIST, Options(latency_check=False, heads=1))
    edited = next(c for c in plan.candidates if c.decision == "factorize")
    assert speed.structure(plan) != speed.structure(_with_rank(plan, edited.node, (edited.rank or 1) + 16))
    mixed = deepcopy(plan)
    for c in mixed.candidates:
        c.head_form = c.head_form or "mix"  # what choose_head_forms writes where it keeps the default form
    assert speed.structure(mixed) == speed.structure(plan)
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(plan.to_json())
    feed = {"image": np.zeros((1, 1, 28, 28), np.float32)}
    other = speed._timed_key(_with_rank(plan, edited.node, (edited.rank or 1) + 16), MNIST, speed.cpu_settings(),
                             feed)
    speed._FORM_TIMINGS[other] = {"speedup": 9.0, "low": 9.0, "high": 9.0}  # a timing of another structure
    r = onnx_inher.compress(MNIST, tmp_path / "s.onnx", Options(pick_form=True), plan_path=plan_file)
    assert calls[0] == 2 and "measured" not in r.plan.latency_check["rounds"][0]  # timed here
    assert r.plan.latency_check["rounds"][0]["speedup"] < 9 and not speed._FORM_TIMINGS


def _with_rank(plan, node: str, rank: int):
    out = deepcopy(plan)
    next(c for c in out.candidates if c.node == node).rank = rank
    return out


def test_a_plan_made_where_the_teacher_was_before(checked: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A plan records its teacher's path; the same file (same digest) moved elsewhere is the teacher the check
    times and reads shapes from, not the path in the plan (which no longer exists)."""
    import shutil

    checked.setattr(speed, "time_models", fake_timer(pair_ms=-0.1, heads_ms=-0.1))
    before = tmp_path / "before" / "teacher.onnx"
    before.parent.mkdir()
    shutil.copy(MNIST, before)
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(onnx_inher.plan(before, Options(latency_check=False, heads=1)).to_json())
    after = tmp_path / "after.onnx"
    before.rename(after)
    r = onnx_inher.compress(after, tmp_path / "s.onnx", Options(heads=1), plan_path=plan_file)
    assert r.plan.model == str(after) and r.plan.latency_check["rounds"]
