"""What the benchmark scripts share: the repository's paths, the real-model fixtures, JSON records, RSS probes.

Every script runs as a module from the repository root (`python -m benchmarks.compress_bench`,
`python -m benchmarks.experiments.soup_minilm`), which puts the root on `sys.path`; no script edits it.
This is the only module that reaches into the test fixtures, each imported on first use: `zoo` is
`tests/zoo.py` (real third-party teachers, built once and cached), `helpers` is `tests/helpers.py` (tiny
teachers and the hand-built tf2onnx/Paddle2ONNX graph styles) and `subgraphs` is `tests/test_subgraphs.py`
(its public `TEACHERS`: streaming and multi-rate models with layers inside If/Loop/Scan bodies).

Importing this module loads only the standard library: `compress_bench` measures the peak RSS of the
processes it spawns, which inherit its own, and `gpu/gpu_check` must start on a bare interpreter.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests import helpers, zoo
    from tests import test_subgraphs as subgraphs

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MNIST_TEACHER = ROOT / "onnx_inher" / "data" / "mnist_cnn.onnx"

__all__ = ["MNIST_TEACHER", "RESULTS", "ROOT", "add_model_options", "chosen_models", "command", "helpers",
           "interleaved_us", "measure_models", "proc_status", "quiet", "reset_peak_rss", "subgraphs", "timed_cell",
           "write_json", "zoo"]


def __getattr__(name: str) -> Any:
    if name == "zoo":  # PEP 562: `from benchmarks.common import zoo` imports the fixtures only when asked
        from tests import zoo

        return zoo
    if name == "helpers":
        from tests import helpers

        return helpers
    if name == "subgraphs":
        from tests import test_subgraphs

        return test_subgraphs
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def quiet() -> None:
    """No progress bars or notices, unless the caller's environment already sets ONNX_INHER_QUIET."""
    from onnx_inher._env import QUIET_VAR

    os.environ.setdefault(QUIET_VAR, "1")


def command(module: str) -> str:
    """How this run was started, for its JSON record: `python -m MODULE ARGS...`."""
    return shlex.join(["python", "-m", module, *sys.argv[1:]])


def timed_cell(result: dict[str, Any], ms_digits: int = 4) -> dict[str, Any]:
    """One model's row of an `onnx_inher.bench` point as a compact record: median ms and speedup with its
    interval (the baseline, which has none, reads 1.0 [1.0, 1.0])."""
    s = result.get("speedup") or {"value": 1.0, "low": 1.0, "high": 1.0}
    return {"ms": round(result["latency_ms"]["p50"], ms_digits), "speedup": round(s["value"], 3),
            "low": round(s["low"], 3), "high": round(s["high"], 3)}


def write_json(path: Path, record: Any) -> None:
    """`record` as indented JSON, written atomically; parent folders are created."""
    from onnx_inher.ir.io import write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(record, indent=2) + "\n")


def measure_models(module: str, names: list[str], measure: Callable[[str, Path], dict[str, Any]],
                   markdown: Callable[[dict[str, dict[str, Any]]], str], out: Path) -> None:
    """Measure each model (its students written to a scratch folder), print its table rows as they come, then
    write every record to `out`.json and the table to `out`.md."""
    began = time.perf_counter()
    records: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            records[name] = measure(name, Path(tmp))
            print(markdown({name: records[name]}), flush=True)
    doc = {"command": command(module), "seconds": round(time.perf_counter() - began, 1), "models": records}
    write_results(out, doc, markdown(records))
    print(f"wrote {out.with_suffix('.json')} and .md in {doc['seconds']} s")


def write_results(out: Path, doc: dict[str, Any], table: str) -> None:
    """`doc` to `out`.json and its Markdown `table` to `out`.md."""
    write_json(out.with_suffix(".json"), doc)
    out.with_suffix(".md").write_text(table)


def interleaved_us(models: dict[str, bytes], feed: dict[str, Any], rounds: int,
                   warmup: int = 0) -> tuple[dict[str, Any], dict[str, float]]:
    """Each in-memory model's first output (from one run, which also warms it up) and its median microseconds per
    run over `rounds` interleaved rounds, after `warmup` more runs each; one intra-op thread, ONNX Runtime's CPU
    provider. The experiments that compare emitted forms of one layer time them this way."""
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sessions = {name: ort.InferenceSession(m, opts, providers=["CPUExecutionProvider"]) for name, m in models.items()}
    outputs = {name: s.run(None, feed)[0] for name, s in sessions.items()}
    for s in sessions.values():
        for _ in range(warmup):
            s.run(None, feed)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, s in sessions.items():
            began = time.perf_counter()
            s.run(None, feed)
            times[name].append(time.perf_counter() - began)
    return outputs, {name: float(np.median(t)) * 1e6 for name, t in times.items()}


def add_model_options(parser: argparse.ArgumentParser, models: list[str], iters: int, out: Path) -> None:
    """The options every per-model latency table takes: `--only`, `--iters`, `--threads`, `--batches`, `--out`."""
    parser.add_argument("--only", default="", help="Comma-separated model names: " + ", ".join(models))
    parser.add_argument("--iters", type=int, default=iters, help="Timed rounds per point.")
    parser.add_argument("--threads", default="", help="Comma-separated intra-op thread counts (default: 1 and all).")
    parser.add_argument("--batches", default="1,8", help="Comma-separated batches (fixed-batch models: 1 only).")
    parser.add_argument("--out", type=Path, default=out)


def chosen_models(args: argparse.Namespace, models: list[str]) -> tuple[list[str], list[int], list[int]]:
    """The models, thread counts and batches `add_model_options`'s options ask for (an unknown name exits)."""
    names = [n for n in args.only.split(",") if n] or list(models)
    unknown = [n for n in names if n not in models]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; choose from {list(models)}")
    threads = [int(t) for t in args.threads.split(",") if t] or [1, os.cpu_count() or 1]
    return names, threads, [int(b) for b in args.batches.split(",")]


def proc_status(key: str) -> int:
    """A memory line of /proc/self/status in bytes: `VmRSS` (now) or `VmHWM` (peak since the last reset). Linux."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def reset_peak_rss() -> None:
    """Reset the kernel's high-water mark (`VmHWM`) to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
