"""The conv pair's orientation on real models: every student with the k x k kernels where the plan puts them
(`--orientation auto`, the default) against the same model with every kernel on the down side (`--orientation
down`, the form before), both timed interleaved with the teacher.

Two ways each:

* `pairs`: `compress --mode svd --no-latency-check` at the default budget: the plan's choice alone, nothing
  measured or reverted, so the two students differ only where the orientation moved a kernel (and where the
  budget's energy threshold moved with it);
* `defaults`: `compress` with every default (the form choice and the latency check), what a user gets.

Each row says how many layers took the kernel up, the params and FLOPs the plan keeps, and the students' output
distance to the teacher on one random input at the model's shape (relative L2 of the first output: a proxy, not
the task metric).

    python -m benchmarks.experiments.kernel_up_students                   # results/kernel_up_students.{json,md}
    python -m benchmarks.experiments.kernel_up_students --only ocr_det --iters 20 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import RESULTS, add_model_options, chosen_models, measure_models, quiet, timed_cell
from benchmarks.default_students import MODELS, _fixed_batch

# the default students with an ungrouped k x k conv the orientation can move
WITH_KXK = ["ocr_det", "ocr_rec", "ocr_cls", "mtcnn_pnet", "mtcnn_rnet", "mtcnn_onet", "crepe_tiny", "crepe_full",
            "resnet50_random", "mnist_cnn", "tv_mobilenet_v3_large", "tv_efficientnet_b0"]
WAYS = {"pairs": ["--mode", "svd", "--no-latency-check"], "defaults": []}


def _compress(teacher: Path, out: Path, extra: list[str]) -> dict[str, Any]:
    import onnx

    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "onnx_inher", "compress", str(teacher), "-o", str(out), "--json",
                           *extra], capture_output=True, text=True, env={**os.environ, "ONNX_INHER_QUIET": "1"})
    record: dict[str, Any] = {"exit": done.returncode, "seconds": round(time.perf_counter() - began, 1)}
    if done.returncode != 0:
        record["printed"] = (done.stdout + done.stderr).strip().splitlines()[-6:]
        return record
    doc = json.loads(done.stdout)
    totals, check = doc["plan"], doc.get("latency_check") or {}
    student = onnx.load(str(out))
    dims = {t.name: list(t.dims) for t in student.graph.initializer}
    ups = [n for n in student.graph.node if n.op_type == "Conv" and n.name.endswith("/svd/up")]
    record.update(factorised=totals["factorized"],
                  kernel_up=sum(int(np.prod(dims.get(n.input[1], [1, 1])[2:])) > 1 for n in ups),
                  params_pct=round(100 * totals["param_ratio"], 1), flops_pct=round(100 * totals["flop_ratio"], 1),
                  form=(check.get("form") or {}).get("chosen"),
                  check=check.get("rounds", [{}])[-1].get("speedup") if check.get("rounds") else None)
    return record


def _distance(teacher: Path, students: list[Path], shapes: dict[str, list[int]]) -> list[float]:
    import onnx
    import onnxruntime as ort

    from onnx_inher.runtime import sample_inputs

    feed = sample_inputs(onnx.load(str(teacher), load_external_data=False), shapes=shapes)
    ref = ort.InferenceSession(str(teacher), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    out = []
    for s in students:
        got = ort.InferenceSession(str(s), providers=["CPUExecutionProvider"]).run(None, feed)[0]
        out.append(round(float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30)), 5))
    return out


def measure(name: str, folder: Path, iters: int, threads: list[int], batches: list[int]) -> dict[str, Any]:
    import onnx_inher

    build, shapes = MODELS[name]
    teacher = build()
    record: dict[str, Any] = {"teacher": str(teacher), "shapes": shapes, "ways": {}}
    points = [1] if _fixed_batch(teacher) else batches
    for way, extra in WAYS.items():
        paths = {o: folder / f"{name}_{way}_{o}.onnx" for o in ("down", "auto")}
        made = {o: _compress(teacher, p, [*extra, "--orientation", o]) for o, p in paths.items()}
        rec: dict[str, Any] = {"compress": made, "runs": []}
        record["ways"][way] = rec
        if any(m["exit"] != 0 for m in made.values()):
            continue
        rec["distance"] = dict(zip(paths, _distance(teacher, list(paths.values()), shapes), strict=True))
        for t in threads:
            doc = onnx_inher.bench([teacher, *paths.values()], shapes=shapes, batches=points, threads=t, iters=iters,
                                   warmup=max(3, iters // 10)).to_dict()
            for pt in doc["points"]:
                res = pt["results"]
                rec["runs"].append({"threads": t, "batch": pt["batch"],
                                    "teacher_ms": round(res[0]["latency_ms"]["p50"], 4),
                                    **{o: timed_cell(r) for o, r in zip(paths, res[1:3], strict=True)}})
            record["machine"] = doc["machine"]
    return record


def markdown(records: dict[str, dict[str, Any]]) -> str:
    lines = ["| model | way | kernel up | params (down / auto) | FLOPs | distance | speedup down -> auto, each point |",
             "|---|---|---|---|---|---|---|"]
    for name, rec in records.items():
        for way, w in rec["ways"].items():
            d, a = w["compress"]["down"], w["compress"]["auto"]
            if d["exit"] or a["exit"]:
                lines.append(f"| {name} | {way} | compress exit {d['exit']} / {a['exit']} | | | | |")
                continue
            points = "; ".join(f"{r['threads']}t b{r['batch']} {r['down']['speedup']:.2f}x -> "
                               f"{r['auto']['speedup']:.2f}x [{r['auto']['low']:.2f}, {r['auto']['high']:.2f}]"
                               for r in w["runs"])
            form = f" ({d['form']} / {a['form']})" if d.get("form") else ""
            dist = w.get("distance", {})
            lines.append(f"| {name} | {way}{form} | {a['kernel_up']}/{a['factorised']} | {d['params_pct']}% / "
                         f"{a['params_pct']}% | {d['flops_pct']}% / {a['flops_pct']}% | {dist.get('down')} / "
                         f"{dist.get('auto')} | {points} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(parser, WITH_KXK, 20, RESULTS / "kernel_up_students")
    args = parser.parse_args()
    quiet()
    names, threads, batches = chosen_models(args, WITH_KXK)
    measure_models("benchmarks.experiments.kernel_up_students", names,
                   lambda name, folder: measure(name, folder, args.iters, threads, batches), markdown, args.out)


if __name__ == "__main__":
    main()
