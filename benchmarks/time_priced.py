"""Sensitivity ranks priced by FLOPs vs by measured time: which student is faster, which is closer?

    python -m benchmarks.time_priced --data crepe_full=train.npz --data ocr_rec=train3k.npz
    python -m benchmarks.time_priced --only mnist_cnn,minilm --iters 30

For each model (`benchmarks.latency_table.MODELS`, at its real input shapes) three plans at the same budget,
all with calibration data (whitened SVD): the energy ranks; `--allocate sensitivity` with the greedy priced by
FLOPs (what the allocation did before issue 18's time pricing, and still does with the latency check off);
and `--allocate sensitivity` priced by each layer's time alone on this machine (the default with the check
on). Each plan is compressed as it is (no latency check, plain SVD factors: speed does not depend on the
values), and the teacher and the three students are timed interleaved by `onnx_inher.bench` at batch 1 and 8,
1 thread and all cores. Closeness is the allocation's own final check (output distance to the teacher on the
calibration samples, and top-1 agreement where every output holds classes), read from the plan's warning.

Data: MNIST and MiniLM use built-in sets; CREPE and the PP-OCRv5 recogniser need the .npz files their
experiments build (`benchmarks/experiments/crepe_speech.py`, `benchmarks/experiments/ocr_lines.py`).
"""

from __future__ import annotations

import argparse
import os
import re
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, measure_models, quiet
from benchmarks.latency_table import FIXED_BATCH, MODELS

DATA = {"mnist_cnn": "mnist5k", "minilm": "fortunes"}  # built-in sets; others need --data NAME=PATH
# the recogniser at 0.5 factorises only its class-split head, which the allocation leaves alone
RATIO = {"ocr_rec": 0.3}
STUDENTS = ("energy", "flops", "time")
CHECK = re.compile(r"(?:top-1 agreement ([\d.]+)% and )?output distance ([\d.e-]+) with the moved ranks vs "
                   r"(?:top-1 agreement ([\d.]+)% and )?([\d.e-]+) with the energy ranks")


def _plans(teacher: Path, shapes: dict[str, list[int]], data: str, ratio: float) -> dict[str, Any]:
    from onnx_inher import Options, parse_policy, plan

    common = {"mode": "svd", "policy": parse_policy(param_ratio=ratio), "shapes": shapes, "calibration": data}
    out = {}
    for label, kw in {"energy": {"allocate": "energy", "latency_check": False},
                      "flops": {"allocate": "sensitivity", "latency_check": False},
                      "time": {"allocate": "sensitivity", "latency_check": True}}.items():
        began = time.perf_counter()
        out[label] = (plan(teacher, Options(**common, **kw)), time.perf_counter() - began)
    return out


def _check(p: Any) -> dict[str, Any]:
    said = next((w for w in p.notes if w.startswith("sensitivity allocation")), "")
    m = CHECK.search(said)
    if not m:
        return {"said": said}
    agree, dist, e_agree, e_dist = m.groups()
    return {"distance": float(dist), "energy_distance": float(e_dist),
            "agreement": float(agree) if agree else None, "energy_agreement": float(e_agree) if e_agree else None,
            "applied": "not applied" not in said, "priced": "time" if "priced by time" in said else "FLOPs"}


def measure(name: str, data: str, folder: Path, iters: int, threads: list[int]) -> dict[str, Any]:
    import onnx_inher
    from onnx_inher import Options, api

    build, shapes = MODELS[name]
    teacher = build()
    ratio = RATIO.get(name, 0.5)
    plans = _plans(teacher, shapes, data, ratio)
    students, record = [], {"teacher": str(teacher), "shapes": shapes, "data": data, "param_ratio": ratio,
                            "plans": {}, "runs": []}
    for label, (p, seconds) in plans.items():
        plan_file = folder / f"{name}_{label}.plan.json"
        plan_file.write_text(p.to_json())
        out = folder / f"{name}_{label}.onnx"
        api.compress(teacher, out, Options(mode="svd", shapes=shapes, latency_check=False), plan_path=plan_file)
        students.append(out)
        totals = p.totals()
        record["plans"][label] = {
            "plan_s": round(seconds, 1), "param_ratio": round(totals["param_ratio"], 4),
            "flop_ratio": round(totals["flop_ratio"], 4),
            "ranks": {c.node: c.rank for c in p.candidates if c.decision == "factorize"},
            **({} if label == "energy" else _check(p))}
    for t in threads:
        points = [1] if name in FIXED_BATCH else [1, 8]
        doc = onnx_inher.bench([teacher, *students], shapes=shapes, batches=points, threads=t, iters=iters,
                               warmup=max(3, iters // 10)).to_dict()
        for point in doc["points"]:
            res = point["results"]
            record["runs"].append({"threads": t, "batch": point["batch"],
                                   "teacher_ms": round(res[0]["latency_ms"]["p50"], 4),
                                   **{label: {"speedup": round(res[j + 1]["speedup"]["value"], 3),
                                              "low": round(res[j + 1]["speedup"]["low"], 3),
                                              "high": round(res[j + 1]["speedup"]["high"], 3),
                                              "ideal_flops": round(res[j + 1].get("ideal_speedup_flops") or 0, 3)}
                                      for j, label in enumerate(STUDENTS)}})
        record["machine"] = doc["machine"]
    return record


def markdown(records: dict[str, dict[str, Any]]) -> str:
    lines = ["| model (ratio) | threads | batch | energy ranks | sensitivity, priced by FLOPs | "
             "sensitivity, priced by time |", "|---|---:|---:|---|---|---|"]
    for name, rec in records.items():
        for run in rec["runs"]:
            cells = [f"{run[s]['speedup']:.2f}x [{run[s]['low']:.2f}, {run[s]['high']:.2f}]" for s in STUDENTS]
            lines.append(f"| {name} ({rec['param_ratio']}) | {run['threads']} | {run['batch']} | " + " | ".join(cells)
                         + " |")
    lines += ["", "| model | energy: distance | FLOPs-priced: distance, ranks | time-priced: distance, ranks |",
              "|---|---|---|---|"]
    for name, rec in records.items():
        p = rec["plans"]
        e = p["flops"]
        e_agree = f" ({e['energy_agreement']:.2f}% top-1)" if e.get("energy_agreement") is not None else ""
        lines.append(f"| {name} | {e.get('energy_distance', '?')}{e_agree}, {list(p['energy']['ranks'].values())} | "
                     f"{_said(p['flops'])} | {_said(p['time'])} |")
    return "\n".join(lines) + "\n"


def _said(c: dict[str, Any]) -> str:
    agree = f" ({c['agreement']:.2f}% top-1)" if c.get("agreement") is not None else ""
    kept = "" if c.get("applied", True) else " (not applied: energy ranks kept)"
    return f"{c.get('distance', '?')}{agree}{kept}, {list(c['ranks'].values())}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="Comma-separated model names (default: those with data).")
    parser.add_argument("--data", action="append", default=[], metavar="NAME=DATA",
                        help="Calibration data for a model, e.g. crepe_full=train.npz (repeatable).")
    parser.add_argument("--iters", type=int, default=30, help="Timed rounds per point.")
    parser.add_argument("--out", type=Path, default=RESULTS / "time_priced")
    args = parser.parse_args()
    quiet()
    data = dict(DATA)
    for spec in args.data:
        name, _, path = spec.partition("=")
        data[name] = str(Path(path).resolve())
    names = [n for n in args.only.split(",") if n] or [n for n in MODELS if n in data]
    missing = [n for n in names if n not in MODELS or n not in data]
    if missing:
        raise SystemExit(f"no model or no data for {missing}: models {list(MODELS)}, data for {sorted(data)}")
    measure_models("benchmarks.time_priced", names,
                   lambda name, folder: measure(name, data[name], folder, args.iters, [1, os.cpu_count() or 1]),
                   markdown, args.out)

if __name__ == "__main__":
    main()
