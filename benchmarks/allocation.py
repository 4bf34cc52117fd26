"""Energy vs sensitivity rank allocation on the embedded MNIST CNN, before any training.

    python -m benchmarks.allocation [-o benchmarks/results/allocation_mnist.json]

For each budget (`--param-ratio`) and rank step (`--rank-multiple`), compress the CNN with whitened SVD
calibrated on 256 MNIST-5k training digits, once with the energy plan's ranks and once with
`--allocate sensitivity`, and score both students in ONNX Runtime on 500 held-out digits: the relative
error of the logits against the teacher's and the top-1 agreement with it. Also records params, FLOPs,
ranks and the allocation's own verdict (its warning line). MiniLM's figure comes from
`python -m benchmarks.distill_minilm --steps 0 --allocate sensitivity`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

import onnx_inher
from benchmarks.common import MNIST_TEACHER as TEACHER
from benchmarks.common import command, quiet, write_json
from onnx_inher import Options, parse_policy
from onnx_inher.datasets import input_specs, load_data
from onnx_inher.runtime import session


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--output", type=Path)
    parser.add_argument("--ratios", default="0.3,0.5")
    parser.add_argument("--multiples", default="1,4,8,16")
    args = parser.parse_args()
    quiet()
    data = load_data("mnist5k:test", input_specs(onnx.load(str(TEACHER))))
    images = data.inputs["image"][:500]
    teacher = session(TEACHER, "cpu").run(["logits"], {"image": images})[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for ratio in map(float, args.ratios.split(",")):
            for multiple in map(int, args.multiples.split(",")):
                row: dict = {"param_ratio": ratio, "rank_multiple": multiple}
                for allocate in ("energy", "sensitivity"):
                    path = Path(tmp) / f"{allocate}.onnx"
                    began = time.perf_counter()
                    result = onnx_inher.compress(TEACHER, path, Options(
                        mode="svd", policy=parse_policy(param_ratio=ratio), rank_multiple=multiple,
                        calibration="mnist5k", allocate=allocate))
                    seconds = time.perf_counter() - began
                    got = session(path, "cpu").run(["logits"], {"image": images})[0]
                    totals = result.plan.totals()
                    row[allocate] = {
                        "logit_rel_error": round(float(np.linalg.norm(got - teacher) / np.linalg.norm(teacher)), 4),
                        "top1_agreement": round(float((got.argmax(1) == teacher.argmax(1)).mean()), 4),
                        "params_after": totals["params_after"], "flops_after": totals["flops_after"],
                        "ranks": [c.rank for c in result.plan.candidates if c.decision == "factorize"],
                        "compress_seconds": round(seconds, 2),
                        "verdict": next((w for w in result.plan.notes if w.startswith("sensitivity")), None),
                    }
                rows.append(row)
                e, s = row["energy"], row["sensitivity"]
                print(f"ratio {ratio:g} multiple {multiple:>2}: logit error {e['logit_rel_error']:.4f} -> "
                      f"{s['logit_rel_error']:.4f}, agreement {e['top1_agreement']:.3f} -> {s['top1_agreement']:.3f}, "
                      f"params {e['params_after']} -> {s['params_after']}, FLOPs {e['flops_after']} -> "
                      f"{s['flops_after']}", flush=True)
    record = {"teacher": "embedded MNIST CNN", "calibration": "mnist5k (256 training digits)",
              "test": "mnist5k:test[:500]", "mode": "svd", "rows": rows,
              "command": command("benchmarks.allocation")}
    if args.output:
        write_json(args.output, record)


if __name__ == "__main__":
    main()
