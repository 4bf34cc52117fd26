"""Where a model's time goes at 1 and 2 threads while this VM is in each of its two states (issue 18; not in the
product).

On this 2-vCPU machine a model at 2 intra-op threads runs in one of two states, each lasting seconds to
minutes, whatever the process or the spinning setting: all-MiniLM-L6-v2's teacher at 128 tokens takes about
17 ms or about 25 ms, its student 11 ms or 19 ms. This profiles the teacher (and optionally a student) with
ONNX Runtime's profiler, alternating 1-thread and 2-thread sessions for `--rounds` rounds, and sorts the
2-thread rounds into the two states by the teacher's total. Per op type it prints the time at 1 thread and
at 2 threads in each state: which ops lose their second thread in the slow state.

    python -m benchmarks.experiments.thread_states --rounds 30      # results/thread_states.{json,md}
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import RESULTS, command, write_results, zoo
from onnx_inher.bench.inmodel import read_profile

RUNS = 20  # profiled runs per session and round
SLOW = 1.25  # a 2-thread round is slow when the teacher took this much longer than the fastest 2-thread round


def _feed() -> dict[str, np.ndarray]:
    return {"input_ids": np.full((1, 128), 1037, np.int64), "attention_mask": np.ones((1, 128), np.int64),
            "token_type_ids": np.zeros((1, 128), np.int64)}


def profile_once(model: Path, threads: int, folder: Path) -> dict[str, float]:
    """Median microseconds per run, summed by op type, over RUNS profiled runs of a fresh session."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.enable_profiling = True
    opts.profile_file_prefix = str(folder / f"t{threads}")
    session = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    feed = {i.name: _feed()[i.name] for i in session.get_inputs()}
    for _ in range(5 + RUNS):
        session.run(None, feed)
    return read_profile(Path(session.end_profiling()), 5, RUNS).by_op()


def _median_by_op(rounds: list[dict[str, float]]) -> dict[str, float]:
    ops = sorted({op for r in rounds for op in r})
    return {op: round(float(np.median([r.get(op, 0.0) for r in rounds])) / 1e3, 3) for op in ops}


def measure(model: Path, rounds: int) -> dict[str, Any]:
    one, two = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(rounds):
            one.append(profile_once(model, 1, Path(tmp)))
            two.append(profile_once(model, 2, Path(tmp)))
            ms = [sum(r[-1].values()) / 1e3 for r in (one, two)]
            print(f"round {i}: 1 thread {ms[0]:.1f} ms, 2 threads {ms[1]:.1f} ms", flush=True)
    totals = [sum(r.values()) for r in two]
    fast = [r for r, t in zip(two, totals, strict=True) if t < SLOW * min(totals)]
    slow = [r for r, t in zip(two, totals, strict=True) if t >= SLOW * min(totals)]
    return {"rounds": rounds, "fast_rounds": len(fast), "slow_rounds": len(slow),
            "ms_1_thread": _median_by_op(one), "ms_2_threads_fast": _median_by_op(fast) if fast else None,
            "ms_2_threads_slow": _median_by_op(slow) if slow else None,
            "totals_2_threads_ms": [round(t / 1e3, 2) for t in totals]}


def markdown(record: dict[str, Any]) -> str:
    one, fast, slow = record["ms_1_thread"], record["ms_2_threads_fast"] or {}, record["ms_2_threads_slow"] or {}
    lines = [f"{record['fast_rounds']} fast and {record['slow_rounds']} slow 2-thread rounds of {record['rounds']}", "",
             "| op type | 1 thread ms | 2 threads, fast state ms | 2 threads, slow state ms |", "|---|---:|---:|---:|"]
    for op in sorted(one, key=lambda o: -one[o])[:14]:
        cells = [f"{side.get(op, float('nan')):.3f}" for side in (one, fast, slow)]
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    lines.append(f"| **total** | {sum(one.values()):.2f} | {sum(fast.values()):.2f} | {sum(slow.values()):.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--model", type=Path, default=None, help="an ONNX model with BERT-style inputs "
                        "(default: the zoo's all-MiniLM-L6-v2 TorchScript export)")
    parser.add_argument("--out", type=Path, default=RESULTS / "thread_states")
    args = parser.parse_args()
    model = args.model or zoo.minilm_torchscript()
    record = {"model": str(model), **measure(model, args.rounds)}
    doc = {"command": command("benchmarks.experiments.thread_states"), **record}
    write_results(args.out, doc, markdown(record))
    print(markdown(record))


if __name__ == "__main__":
    main()
