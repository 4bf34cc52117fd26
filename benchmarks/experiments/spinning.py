"""How thread spinning changes what a teacher/student comparison measures on CPU (issue 18).

ONNX Runtime's default keeps intra-op worker threads spinning between parallel sections and between runs.
`onnx_inher.bench` used to time interleaved sessions with spinning off (a pool left spinning after its run
fights the next session's threads), so every parallel node woke its workers: a cost the model's user never
pays, and students, with more and smaller nodes, paid more of it. This times each pair three ways:

- `off`: interleaved A, B, A, B in one process, spinning off (the old setting);
- `per-run`: interleaved, workers spinning during each run and stopped at its end
  (`session.force_spinning_stop`, today's setting when sessions take turns);
- `alone`: each model in a fresh process of its own, spinning on, nothing else running: what a user
  running ONNX Runtime's defaults gets. Not interleaved, so it drifts with the machine; `--repeats`
  alternates the processes A, B, A, B and keeps the median.

    python -m benchmarks.experiments.spinning TEACHER STUDENT --shape x=1x3x48x320 [--shape ...] \\
        --threads 2 --iters 100 --out benchmarks/results/spinning_rec.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

MODES = {"off": {"session.intra_op.allow_spinning": "0", "session.inter_op.allow_spinning": "0"},
         "per-run": {"session.intra_op.allow_spinning": "1", "session.inter_op.allow_spinning": "1",
                     "session.force_spinning_stop": "1"},
         "alone": {}}


def _feed(session: Any, shapes: dict[str, list[int]]) -> dict[str, np.ndarray]:
    """Seeded inputs: token ids in a small range, masks of ones, token types of zeros, floats normal."""
    rng = np.random.default_rng(0)
    feed = {}
    for i in session.get_inputs():
        shape = shapes[i.name]
        if "int" in i.type:
            value = {"attention_mask": np.ones(shape), "token_type_ids": np.zeros(shape)}.get(
                i.name, rng.integers(0, 100, shape))
            feed[i.name] = np.asarray(value, dtype=np.int64)
        else:
            feed[i.name] = rng.standard_normal(shape).astype(np.float32)
    return feed


def _session(path: str, config: dict[str, str], threads: int) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level = threads, 1, 3
    for k, v in config.items():
        opts.add_session_config_entry(k, v)
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def interleaved(paths: list[str], mode: str, shapes: dict[str, list[int]], threads: int, iters: int) -> list[float]:
    """p50 ms of each model, timed A, B, A, B in this process."""
    import time

    sessions = [_session(p, MODES[mode], threads) for p in paths]
    feed = _feed(sessions[0], shapes)
    for _ in range(10):
        for s in sessions:
            s.run(None, feed)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(iters):
        for s, t in zip(sessions, times, strict=True):
            began = time.perf_counter()
            s.run(None, feed)
            t.append(time.perf_counter() - began)
    return [float(np.median(t)) * 1e3 for t in times]


def alone(path: str, shapes: dict[str, list[int]], threads: int, iters: int) -> float:
    """p50 ms of the model in a fresh process, spinning on (ONNX Runtime's default)."""
    code = ("import json,sys; from benchmarks.experiments.spinning import interleaved; "
            f"print(json.dumps(interleaved([{path!r}], 'alone', {shapes!r}, {threads}, {iters})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(json.loads(done.stdout.strip().splitlines()[-1])[0])


def measure(teacher: str, student: str, shapes: dict[str, list[int]], threads: int, iters: int,
            repeats: int) -> dict[str, Any]:
    out: dict[str, Any] = {"teacher": teacher, "student": student, "shapes": shapes, "threads": threads}
    for mode in ("off", "per-run"):
        t, s = interleaved([teacher, student], mode, shapes, threads, iters)
        out[mode] = {"teacher_ms": round(t, 4), "student_ms": round(s, 4), "speedup": round(t / s, 3)}
    runs = [(alone(teacher, shapes, threads, iters), alone(student, shapes, threads, iters)) for _ in range(repeats)]
    t, s = float(np.median([r[0] for r in runs])), float(np.median([r[1] for r in runs]))
    out["alone"] = {"teacher_ms": round(t, 4), "student_ms": round(s, 4), "speedup": round(t / s, 3)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("teacher")
    parser.add_argument("student")
    parser.add_argument("--shape", action="append", default=[], help="NAME=DxD..., one per input")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3, help="Alternated fresh processes per model (alone).")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    shapes = {k: [int(d) for d in v.split("x")] for k, v in (s.split("=", 1) for s in args.shape)}
    record = measure(args.teacher, args.student, shapes, args.threads, args.iters, args.repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
