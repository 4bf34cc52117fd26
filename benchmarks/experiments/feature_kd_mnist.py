"""Does feature KD (`--features auto`) help on the embedded MNIST CNN, and what does it cost? (issue 17, point 3.5)

    python -m benchmarks.experiments.feature_kd_mnist

The teacher compressed hard (svd pairs, --param-ratio 0.1 and 0.2 with --rank-multiple 1: SVD init keeps
33% and 85% top-1 agreement), then distilled for a fixed number of steps with and without feature KD on
the factorised layers' outputs, 2 seeds each; scored in ONNX Runtime on mnist5k:test (1,000 digits never
trained on): top-1 agreement with the teacher and accuracy. Prints and writes
benchmarks/results/feature_kd_mnist.json.

Measured (2 CPU cores shared with other jobs, so the seconds are noisy), 150 steps, mean of 2 seeds:
ratio 0.1: agreement 0.847 without and 0.847 with feature KD; ratio 0.2: 0.984 and 0.9855 (seeds differ by
up to 0.006). No gain that seeds can tell apart, so `--features` stays off by default.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

import onnx_inher
from benchmarks.common import MNIST_TEACHER as TEACHER
from benchmarks.common import RESULTS, command, quiet, write_json
from onnx_inher import DistillOptions, Options, parse_policy
from onnx_inher.datasets import input_specs, load_data
from onnx_inher.runtime import session

STEPS, SEEDS, RATIOS = 150, (0, 1), (0.1, 0.2)


def score(model: Path, test: object, teacher_top: np.ndarray) -> tuple[float, float]:
    top = session(model, "cpu").run(["logits"], test.inputs)[0].argmax(1)  # type: ignore[attr-defined]
    return float((top == teacher_top).mean()), float((top == test.labels).mean())  # type: ignore[attr-defined]


def main() -> None:
    torch.set_num_threads(2)
    quiet()
    test = load_data("mnist5k:test", input_specs(onnx.load(str(TEACHER))))
    teacher_top = session(TEACHER, "cpu").run(["logits"], test.inputs)[0].argmax(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for ratio in RATIOS:
            student = Path(tmp) / f"student_{ratio}.onnx"
            onnx_inher.compress(TEACHER, student, Options(mode="svd", policy=parse_policy(param_ratio=ratio),
                                                          rank_multiple=1))
            init = score(student, test, teacher_top)
            for features in ([], ["auto"]):
                for seed in SEEDS:
                    out = Path(tmp) / f"tuned_{ratio}_{seed}_{bool(features)}.onnx"
                    began = time.perf_counter()
                    res = onnx_inher.distill(student, TEACHER, "mnist5k", out,
                                             DistillOptions(steps=STEPS, batch_size=64, lr=1e-3, seed=seed,
                                                            features=features, checkpoint_every=0),
                                             cache_dir=Path(tmp) / "cache")
                    agree, acc = score(out, test, teacher_top)
                    rows.append({"param_ratio": ratio, "features": ",".join(features) or "none", "seed": seed,
                                 "init_agreement": init[0], "init_accuracy": init[1], "agreement": agree,
                                 "accuracy": acc, "train_seconds": round(res.train.seconds, 2),
                                 "total_seconds": round(time.perf_counter() - began, 2),
                                 "feature_tensors": len(res.features)})
                    print(json.dumps(rows[-1]))
    summary = {}
    for ratio in RATIOS:
        for features in ("none", "auto"):
            sel = [r for r in rows if r["param_ratio"] == ratio and r["features"] == features]
            summary[f"{ratio}/{features}"] = {k: round(float(np.mean([r[k] for r in sel])), 4)
                                              for k in ("agreement", "accuracy", "train_seconds")}
    record = {"steps": STEPS, "seeds": list(SEEDS), "rows": rows, "mean": summary,
              "command": command("benchmarks.experiments.feature_kd_mnist")}
    write_json(RESULTS / "feature_kd_mnist.json", record)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
