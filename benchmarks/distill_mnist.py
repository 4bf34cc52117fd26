"""Figure: the embedded MNIST CNN, compressed with `inher` (2 heads), distilled back on real digits.

    python -m benchmarks.distill_mnist                          # --param-ratio 0.5 (default), 3 epochs
    python -m benchmarks.distill_mnist --param-ratio 0.25 -o benchmarks/results/distill_mnist_025.json

Teacher and student are both scored in ONNX Runtime on `mnist5k:test`, the 1,000 digits the teacher never saw
(the student trains on `mnist5k`, the other 4,000, of which 10% are its validation split). Prints and writes
a JSON record: parameter counts, accuracies before and after distillation, training steps and wall time.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

import onnx_inher
from benchmarks.common import MNIST_TEACHER as TEACHER
from benchmarks.common import RESULTS, ROOT, command, quiet, write_json
from onnx_inher import DistillOptions, Options, parse_policy
from onnx_inher.datasets import input_specs, load_data
from onnx_inher.runtime import session


def accuracy(model: Path) -> float:
    test = load_data("mnist5k:test", input_specs(onnx.load(str(model))))
    logits = session(model, "cpu").run(["logits"], test.inputs)[0]
    return float((logits.argmax(1) == test.labels).mean())


def params(model: Path) -> int:
    return int(sum(np.prod(t.dims) for t in onnx.load(str(model)).graph.initializer))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--param-ratio", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("-o", "--output", type=Path, default=RESULTS / "distill_mnist.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quiet()

    with tempfile.TemporaryDirectory() as tmp:
        student, tuned = Path(tmp) / "student.onnx", Path(tmp) / "tuned.onnx"
        compressed = onnx_inher.compress(TEACHER, student, Options(mode="inher", heads=2,
                                                                   policy=parse_policy(param_ratio=args.param_ratio)))
        before = accuracy(student)
        began = time.perf_counter()
        result = onnx_inher.distill(student, TEACHER, "mnist5k", tuned,
                                    DistillOptions(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                                   checkpoint_every=0),
                                    metrics=Path(tmp) / "metrics.jsonl", cache_dir=Path(tmp) / "cache")
        wall = time.perf_counter() - began
        teacher_acc, after = accuracy(TEACHER), accuracy(tuned)
        record = {
            "teacher": str(TEACHER.relative_to(ROOT)),
            "compress": {"mode": "inher", "heads": 2, "param_ratio_option": args.param_ratio,
                         **{k: compressed.plan.totals()[k] for k in ("params_before", "params_after", "param_ratio",
                                                                       "flops_before", "flops_after", "flop_ratio")}},
            "onnx_params": {"teacher": params(TEACHER), "student": params(tuned)},
            "test_digits": 1000,
            "test_accuracy": {"teacher": teacher_acc, "student_before_distill": before, "student_after_distill": after},
            "gap_points_after": round(100 * (teacher_acc - after), 2),
            "distill": {"data": "mnist5k (4,000 train digits; 10% validation)", "epochs": args.epochs,
                        "batch_size": args.batch_size, "lr": args.lr, "steps": result.train.steps,
                        "train_seconds": round(result.train.seconds, 1), "total_seconds": round(wall, 1),
                        "teacher_seconds": result.teacher_seconds, "trainable_params": result.trainable_params,
                        "torch_threads": args.threads, "device": "cpu"},
            "command": command("benchmarks.distill_mnist"),
        }
    write_json(args.output, record)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
