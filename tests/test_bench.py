"""`bench` (interleaved ORT timing, ratios, ideal vs measured, reports) and `plan --target`.

Timing values are never asserted (CI machines are noisy); structure, invariants, files and exit
codes are.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnx_inher import api
from onnx_inher.bench import bench, interleave
from onnx_inher.bench.core import Point, drift_note
from onnx_inher.bench.stats import DRIFT_MIN_ROUNDS, DRIFT_PARTS, drift, speedup, summarize
from onnx_inher.cli import main
from onnx_inher.planning.plan import Options
from onnx_inher.planning.rank import parse_policy
from onnx_inher.reporting.bench import terminal
from onnx_inher.tuning.latency import apply_target

ROOT = Path(__file__).resolve().parents[1]


def _cnn(path: Path, batch: str | int = "batch", input_name: str = "x") -> Path:
    """Conv 3x3 8->32, Relu, Conv 3x3 32->32, global pool, Gemm 32->10: a small real-shaped CNN."""
    rng = np.random.default_rng(0)
    w = lambda name, *s: numpy_helper.from_array((rng.standard_normal(s) * 0.1).astype(np.float32), name)  # noqa: E731
    c1, c2, fc = w("conv1.w", 32, 8, 3, 3), w("conv2.w", 32, 32, 3, 3), w("fc.w", 10, 32)
    b1 = numpy_helper.from_array(np.zeros(32, np.float32), "b1")
    nodes = [
        helper.make_node("Conv", [input_name, c1.name, "b1"], ["h1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", c2.name], ["h2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["h2"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", fc.name], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info(input_name, TensorProto.FLOAT,
                                                                           [batch, 8, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 10])], [c1, b1, c2, fc])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("bench")
    teacher = _cnn(d / "teacher.onnx")
    student = d / "student.onnx"
    api.compress(teacher, student, Options(mode="inher", heads=2, policy=parse_policy(rank_ratio=0.25), guard=False,
                                                 rank_multiple=1))
    return teacher, student


def test_interleave_runs_models_round_robin_after_warmup() -> None:
    calls: list[str] = []
    runners = [lambda: calls.append("A") or 0.001, lambda: calls.append("B") or 0.002]
    times = interleave(runners, warmup=2, iters=3)
    assert calls == ["A", "B"] * 5
    assert [t.tolist() for t in times] == [[0.001] * 3, [0.002] * 3]


def test_speedup_interval_contains_the_ratio_of_medians() -> None:
    rng = np.random.default_rng(1)
    noise = rng.lognormal(0, 0.2, 200)  # shared by both models in a round, as interleaving makes it
    base, fast = 0.004 * noise * rng.lognormal(0, 0.02, 200), 0.002 * noise * rng.lognormal(0, 0.02, 200)
    r = speedup(base, fast)
    assert r.low <= r.value <= r.high
    assert r.value == pytest.approx(np.median(base) / np.median(fast))
    assert 1.9 < r.low and r.high < 2.1  # pairing cancels the shared noise
    unpaired = speedup(base, rng.permutation(fast))
    assert unpaired.high - unpaired.low > r.high - r.low
    s = summarize(base, items=8)
    assert s.p50 <= s.p90 <= s.p99 and s.throughput == pytest.approx(8 / (s.mean / 1e3))


def test_a_change_of_machine_speed_during_the_run_is_reported_per_part() -> None:
    """A slowdown that adds the same 8 ms to every run for the second half of the rounds (this 2-core VM at 2
    threads: MiniLM's teacher 17 -> 25 ms, its student 11 -> 19 ms) mixes two speedups into one figure."""
    rng = np.random.default_rng(2)
    rounds = 100
    stall = np.r_[np.zeros(rounds // 2), np.full(rounds // 2, 0.008)]
    jitter = lambda: rng.lognormal(0, 0.01, rounds)  # noqa: E731
    base, student = 0.017 * jitter() + stall, 0.011 * jitter() + stall
    moved = drift([base, student])
    assert moved is not None and len(moved.baseline_ms) == DRIFT_PARTS
    assert moved.baseline_ms[0] == pytest.approx(17, rel=0.02) and moved.baseline_ms[-1] == pytest.approx(25, rel=0.02)
    assert moved.speedups[0][0] == pytest.approx(17 / 11, rel=0.02)
    assert moved.speedups[0][-1] == pytest.approx(25 / 19, rel=0.02)
    point = Point(1, 128, {}, seconds=[base, student], drift=moved)
    note = drift_note(point, ["teacher", "student"])
    assert note.startswith("b=1 s=128: the machine's speed changed")
    assert f"student {', '.join(f'{x:.2f}' for x in moved.speedups[0])}x" in note and "17, " in note
    # steady noise, even heavy, and runs too short to cut are not a change of state
    noisy = 0.017 * rng.lognormal(0, 0.1, rounds)
    assert drift([noisy, noisy / 1.5]) is None
    short = DRIFT_PARTS * DRIFT_MIN_ROUNDS - 1
    stepped = np.r_[np.full(short // 2, 0.017), np.full(short - short // 2, 0.025)]
    assert drift([stepped, stepped - 0.006]) is None


def test_bench_result_structure_and_sanity(pair: tuple[Path, Path]) -> None:
    teacher, student = pair
    result = bench([teacher, student], provider="cpu", batches=[1, 4], iters=5, warmup=1, threads=1, per_layer=True)
    doc = json.loads(json.dumps(result.to_dict()))
    assert doc["format"] == "onnx-inher-bench/1" and doc["baseline"] == "teacher"
    # sessions taking turns spin during their runs only (ONNX Runtime's default, minus the fight between pools)
    assert doc["settings"]["spinning"] is True and doc["settings"]["spinning_stops_after_run"] is True
    assert doc["settings"]["threads_intra_op"] == 1
    assert [p["batch"] for p in doc["points"]] == [1, 4]
    for p in doc["points"]:
        assert p["inputs"] == {"x": [p["batch"], 8, 16, 16]}
        base, stud = p["results"]
        assert base["speedup"] is None and base["model"] == "teacher"
        sp = stud["speedup"]
        assert sp["value"] > 0 and sp["low"] <= sp["value"] <= sp["high"]
        lat = stud["latency_ms"]
        assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] and lat["runs"] == 5
        assert stud["throughput_items_per_s"] == pytest.approx(p["batch"] / (lat["mean"] / 1e3))
        assert stud["ideal_speedup_flops"] > 1 and stud["ideal_speedup_bytes"] > 1
        assert stud["efficiency_flops"] == pytest.approx(sp["value"] / stud["ideal_speedup_flops"])
        assert stud["flops"] < base["flops"]
    t, s = doc["models"]
    assert t["params"] > s["params"] > 0 and t["file_bytes"] > s["file_bytes"] > 0
    assert t["flops_unresolved_nodes"] == 0 and s["flops_unresolved_nodes"] == 0
    # batch 4 FLOPs are 4x batch 1 (the counter reads shapes inferred at the benchmarked inputs)
    assert doc["points"][1]["results"][0]["flops"] == 4 * doc["points"][0]["results"][0]["flops"]
    layers = {(r["batch"], r["node"]): r for r in doc["layers"]}
    assert set(layers) == {(b, n) for b in (1, 4) for n in ("conv1", "conv2", "fc")}
    assert layers[(4, "conv2")]["form"] == "heads" and layers[(4, "conv2")]["rank"] == 8
    assert layers[(4, "conv2")]["x_shape"] == [4, 32, 16, 16]
    assert all(r["dense_ms"] > 0 and r["factorized_ms"] > 0 and r["ideal_speedup_flops"] for r in doc["layers"])
    text = terminal(doc)
    assert "speedup [95% CI]" in text and "conv2" in text


def test_cli_writes_json_markdown_and_png(pair: tuple[Path, Path], tmp_path: Path) -> None:
    teacher, student = pair
    out = tmp_path / "report"
    res = CliRunner().invoke(main, ["bench", str(teacher), str(student), "--provider", "cpu", "--batch", "1,2",
                                    "--iters", "3", "--warmup", "1", "--threads", "1", "-o", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "report.json").read_text())
    assert len(doc["points"]) == 2
    assert "| b=2 | student |" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = CliRunner().invoke(main, ["bench", str(teacher), "--provider", "cpu", "--iters", "2", "--json"])
    alone = json.loads(res.output)["settings"]
    assert res.exit_code == 0 and alone["spinning"] is True and alone["spinning_stops_after_run"] is False


def test_cli_bad_input_exits_2(pair: tuple[Path, Path], tmp_path: Path) -> None:
    teacher, _ = pair
    other = _cnn(tmp_path / "other.onnx", input_name="image")
    fixed = _cnn(tmp_path / "fixed.onnx", batch=1)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not onnx")
    cases = [
        ([str(tmp_path / "missing.onnx")], "no such file"),
        ([str(teacher), str(other)], "differ from the baseline"),
        ([str(garbage)], "not a valid ONNX model"),
        ([str(teacher), "--batch", "0"], "positive integers"),
        ([str(teacher), "--iters", "0"], "--iters must be >= 1"),
        ([str(fixed), "--batch", "4"], "fixed batch of 1"),
        ([str(teacher), "-o", str(tmp_path / "no" / "dir" / "r"), "--iters", "1"], "cannot write"),
    ]
    for args, message in cases:
        res = CliRunner().invoke(main, ["bench", *args, "--provider", "cpu"])
        assert res.exit_code == 2, (args, res.output)
        assert message in res.output, (args, res.output)


def test_io_binding_path_gives_the_plain_run_outputs(pair: tuple[Path, Path]) -> None:
    """The CUDA path binds inputs/outputs once and re-runs on pinned buffers; rehearsed here on the CPU device."""
    from onnx_inher.bench.sessions import Runner, Settings, create

    _, student = pair
    x = np.random.default_rng(0).standard_normal((2, 8, 16, 16)).astype(np.float32)
    session = create(student, Settings(provider="cpu", threads=1), "student")
    runner = Runner(session, {"x": x}, "student")
    runner.prepare(device="cpu")
    assert runner() > 0 and runner() > 0
    bound = runner._binding.copy_outputs_to_cpu()[0]
    np.testing.assert_allclose(bound, session.run(None, {"x": x})[0], rtol=1e-6)


def test_unavailable_provider_or_cuda_graph_on_cpu_exits_2(pair: tuple[Path, Path]) -> None:
    teacher, _ = pair
    for args, message in (([], "--cuda-graph needs the CUDA provider"),):
        res = CliRunner().invoke(main, ["bench", str(teacher), "--provider", "cpu", "--cuda-graph", *args])
        assert res.exit_code == 2 and message in res.output, res.output
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        res = CliRunner().invoke(main, ["bench", str(teacher), "--provider", "cuda"])
        assert res.exit_code == 2 and "no CUDA provider" in res.output, res.output
        res = CliRunner().invoke(main, ["plan", str(teacher), "-o", str(teacher.with_name("p.json")),
                                        "--target", "cuda"])
        assert res.exit_code == 2 and "no CUDA provider" in res.output, res.output
    res = CliRunner().invoke(main, ["compress", str(teacher), "-o", str(teacher.with_name("s.onnx")),
                                    "--plan", str(teacher.with_name("p.json")), "--target", "cpu"])
    assert res.exit_code == 2 and "--target applies when planning" in res.output, res.output


def test_fixed_batch_skips_points_it_cannot_run(tmp_path: Path) -> None:
    fixed = _cnn(tmp_path / "fixed.onnx", batch=1)
    doc = bench([fixed], provider="cpu", batches=[1, 8], iters=2, warmup=0).to_dict()
    assert [p["batch"] for p in doc["points"]] == [1]
    assert doc["skipped"] == ["batch 8: input 'x' has a fixed batch of 1"]


def test_external_data_model_is_read_from_its_folder(pair: tuple[Path, Path], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    teacher, _ = pair
    folder = tmp_path / "ext"
    folder.mkdir()
    onnx.save(onnx.load(str(teacher)), str(folder / "t.onnx"), save_as_external_data=True, location="t.onnx.data",
              size_threshold=0)
    monkeypatch.chdir(tmp_path)  # external data must be found next to the model, not in the working directory
    doc = bench([folder / "t.onnx"], provider="cpu", iters=2, warmup=0, threads=1).to_dict()
    m = doc["models"][0]
    assert m["file_bytes"] == sum(f.stat().st_size for f in folder.iterdir())
    assert m["params"] == doc_params(teacher)


def doc_params(path: Path) -> int:
    return sum(int(np.prod(t.dims)) for t in onnx.load(str(path)).graph.initializer if t.data_type == 1)


def test_plan_target_times_layers_once_and_skips_slower_ones(pair: tuple[Path, Path], tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    teacher, _ = pair
    options = Options(mode="svd", policy=parse_policy(rank_ratio=0.25), guard=False, dims={"batch": 2})
    a = api.analyze(teacher, options.dims)
    planned = apply_target(api.plan(teacher, options, _analysis=a), a.loaded.model, a.views, "cpu",
                           cache_dir=tmp_path, iters=3, warmup=1)
    chosen = [c for c in planned.candidates if c.rank]
    assert len(chosen) == 3
    for c in chosen:
        text = c.reason if c.decision == "skip" else c.note
        assert "ms vs dense" in str(text) and "input 2x" in str(text)
    caches = list(tmp_path.glob("*.json"))
    assert len(caches) == 1 and len(json.loads(caches[0].read_text())["entries"]) == 3

    # a cached verdict is reused; a layer measured slower is skipped with the times as its reason
    cache = json.loads(caches[0].read_text())
    cache["entries"] = {k: [1.0, 2.0] for k in cache["entries"]}
    caches[0].write_text(json.dumps(cache))
    monkeypatch.setattr("onnx_inher.tuning.latency.time_pair", lambda *a, **k: pytest.fail("re-measured"))
    again = apply_target(api.plan(teacher, options, _analysis=a), a.loaded.model, a.views, "cpu", cache_dir=tmp_path)
    assert all(c.decision == "skip" and "not faster on cpu: factorised 2.000 ms vs dense 1.000 ms" in str(c.reason)
               for c in again.candidates if c.rank)

    # --latency-threads: timed with that many threads, in that thread count's cache
    monkeypatch.undo()
    one = Options(mode="svd", policy=parse_policy(rank_ratio=0.25), guard=False, dims={"batch": 2}, latency_threads=1)
    apply_target(api.plan(teacher, one, _analysis=a), a.loaded.model, a.views, "cpu", cache_dir=tmp_path / "one",
                 iters=3, warmup=1)
    assert json.loads(next((tmp_path / "one").glob("*.json")).read_text())["machine"]["threads"] == 1


def test_gpu_check_without_cuda_says_so_and_exits_0(tmp_path: Path) -> None:
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu" / "gpu_check.sh")], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "OUT": str(tmp_path)}, timeout=120,
                         cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "no CUDA" in res.stdout
    assert "no CUDA" in (tmp_path / "gpu_check.txt").read_text()


def test_session_settings_spin_as_onnx_runtime_does_and_stop_between_turns() -> None:
    from onnx_inher.bench.sessions import Settings
    from onnx_inher.tuning.latency import machine_key

    turns, alone = Settings(provider="cpu", threads=2), Settings(provider="cpu", threads=2, stop_spinning=False)
    assert turns.session_config() == {"session.intra_op.allow_spinning": "1", "session.inter_op.allow_spinning": "1",
                                      "session.force_spinning_stop": "1"}
    assert "session.force_spinning_stop" not in alone.session_config()
    off = Settings(provider="cpu", threads=2, spinning=False).session_config()
    assert off["session.intra_op.allow_spinning"] == "0" and "session.force_spinning_stop" not in off
    # layer timings taken with another spinning are another measurement: another cache file
    assert machine_key(turns)[0] != machine_key(Settings(provider="cpu", threads=2, spinning=False))[0]
