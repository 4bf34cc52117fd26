"""Each factorised layer of a plan timed alone at every step multiple of its rank: is time monotone in rank?

    onnx-inher plan crepe.onnx --shape audio_frames=1x1024 --mode svd -o plan.json
    python -m benchmarks.experiments.rank_times crepe.onnx plan.json --threads 2 -o rank_times.json

Uses what the time-priced sensitivity allocation uses (`tuning.latency.rank_times`, the per-machine latency
cache), but at every multiple of the plan's rank step up to each layer's break-even rank, not only the
allocation's grid. Prints one line per layer (dense ms, then rank: ms) and writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from onnx_inher import api
from onnx_inher.bench.sessions import Settings
from onnx_inher.planning.plan import load_plan
from onnx_inher.tuning.allocate import rank_cap
from onnx_inher.tuning.latency import rank_times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("plan", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("-o", "--output", type=Path)
    args = parser.parse_args()
    p = load_plan(args.plan)
    a = api.analyze(args.model, p.options.dims, p.options.shapes)
    step = p.options.rank_multiple
    grids = {}
    for c in p.candidates:
        if c.decision == "factorize" and c.dense_classes is None and c.node in a.views:
            cap = rank_cap(a.views[c.node], c.heads, p.options.guard)
            grids[c.node] = sorted({*range(step, cap + 1, step), cap})
    times, measured = rank_times(p, a.loaded.model, a.views, Settings(provider="cpu", threads=args.threads), grids)
    doc = {n: {"dense_ms": round(t.dense_ms, 4), "where": t.where, "ms": {r: round(v, 4) for r, v in t.ms.items()}}
           for n, t in sorted(times.items())}
    for n, t in doc.items():
        print(f"{n}: dense {t['dense_ms']:.3f} ms; " + ", ".join(f"{r}: {v:.3f}" for r, v in t["ms"].items()))
    print(f"{measured} timings taken now, the rest from the cache")
    if args.output:
        args.output.write_text(json.dumps({"threads": args.threads, "layers": doc}, indent=1) + "\n")


if __name__ == "__main__":
    main()
