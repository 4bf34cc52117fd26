"""Train the Fashion-MNIST teacher of `benchmarks/reproduce.py`: a small ResNet, exported to ONNX.

    python -m benchmarks.train_fashion_teacher                 # -> ~/.cache/onnx-inher/reproduce/fashion_resnet.onnx
    python -m benchmarks.train_fashion_teacher --width 0.5 --random-init -o thin.onnx   # a random-init thin ResNet

The network (`FashionResNet`): a 3×3 stride-2 stem (28→14), then three basic residual blocks (two 3×3 convs,
BatchNorm, a 1×1 projection shortcut where the shape changes) at 14×14, 7×7 and 4×4, global average pool and
one Linear layer; channels (32, 64, 128) for the teacher, ~0.3M params. BatchNorm is folded into the convs
by the exporter (eval mode), so the ONNX graph is Conv/Add/Relu/GlobalAveragePool/Gemm.

Data: Debian's dataset-fashion-mnist, normalised as the tool's `fashion-mnist` adapter does it. The 60,000
training images are split once (seeded permutation, `VAL_SEED`): the last `VAL_IMAGES` are held out and never
trained on (by the teacher or any student): reproduce.py validates students on them. The teacher trains on the
other 55,000 with random 2-pixel shifts and horizontal flips; its accuracy in the JSON is measured in ONNX
Runtime, from the exported file, on the 10,000 test images. Training is seeded and single-threaded.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from benchmarks.common import command, write_json
from benchmarks.train_mnist_teacher import shift
from benchmarks.train_mnist_teacher import train as train_classifier
from onnx_inher._env import cache_root
from onnx_inher.datasets.adapters import fashion_mnist, normalise
from onnx_inher.ir.io import save_model
from onnx_inher.runtime import session

OPSET = 17
TEACHER_CHANNELS = (32, 64, 128)
VAL_IMAGES = 5000
VAL_SEED = 20
CACHE = cache_root() / "reproduce"
TEACHER = CACHE / "fashion_resnet.onnx"


class Block(nn.Module):
    """Basic residual block: conv3×3-BN-ReLU-conv3×3-BN + shortcut (1×1 conv-BN when the shape changes), ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential() if cin == cout and stride == 1 else \
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class FashionResNet(nn.Module):
    """stem conv3×3/2 (1→c0) → blocks c0 (14×14), c1 (/2, 7×7), c2 (/2, 4×4) → GAP → Linear(c2→10)."""

    def __init__(self, channels: Sequence[int] = TEACHER_CHANNELS) -> None:
        super().__init__()
        c0, c1, c2 = channels
        self.stem = nn.Sequential(nn.Conv2d(1, c0, 3, 2, 1, bias=False), nn.BatchNorm2d(c0), nn.ReLU())
        self.blocks = nn.Sequential(Block(c0, c0, 1), Block(c0, c1, 2), Block(c1, c2, 2))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c2, 10))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(image)))


def onnx_params(channels: Sequence[int]) -> int:
    """Params of the exported graph (BatchNorm folded: each conv gains a bias of its output channels)."""
    model = FashionResNet(channels)
    convs = sum(m.weight.numel() + m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d))
    linear = sum(p.numel() for m in model.modules() if isinstance(m, nn.Linear) for p in m.parameters())
    return convs + linear


def matched_channels(target: int, multiple: int = 8) -> tuple[tuple[int, int, int], int]:
    """Channels (multiples of `multiple`: ONNX Runtime's fast CPU conv kernels want them) whose exported params
    are within 3% of `target`, closest to the teacher's 1:2:4 proportions; else simply the closest."""
    grid = range(multiple, TEACHER_CHANNELS[-1] + 1, multiple)
    options = [((a, b, c), onnx_params((a, b, c))) for a in grid for b in grid for c in grid if a <= b <= c]
    near = [o for o in options if abs(o[1] - target) <= 0.03 * target]
    if not near:
        return min(options, key=lambda o: abs(o[1] - target))  # type: ignore[return-value]
    return min(near, key=lambda o: (o[0][1] / o[0][0] - 2) ** 2 + (o[0][2] / o[0][1] - 2) ** 2
               + 10 * abs(o[1] - target) / target)  # type: ignore[return-value]


def split_indices(n: int = 60000) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out validation) indices of the 60,000 Fashion-MNIST training images (seeded, sorted)."""
    order = np.random.default_rng(VAL_SEED).permutation(n)
    return np.sort(order[VAL_IMAGES:]), np.sort(order[:VAL_IMAGES])


def augment(batch: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random shifts of up to `max_shift` pixels (edge fill by the normalised background) and flips."""
    out = shift(batch, generator, max_shift, fill=float(batch.min()))
    flip = torch.rand(len(out), generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, batch: int, lr: float, seed: int) -> int:
    """The MNIST teacher's recipe (AdamW, one epoch of warm-up, cosine decay) with shifts and flips."""
    return train_classifier(model, x, y, epochs, batch, lr, seed, augment=augment, weight_decay=5e-4)


def export(model: nn.Module, path: Path, doc: str) -> None:
    """TorchScript exporter, opset 17, dynamic batch; `image` [N,1,28,28] float32 -> `logits` [N,10]."""
    model.eval()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter is chosen on purpose (BatchNorm folded)
        staged = Path(tmp) / path.name
        torch.onnx.export(model, (torch.zeros(1, 1, 28, 28),), str(staged), dynamo=False, opset_version=OPSET,
                          input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}}, do_constant_folding=True)
        proto = onnx.load(str(staged))
    proto.doc_string = doc
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(proto, path)


def test_accuracy(path: Path) -> float:
    test = fashion_mnist("test")
    logits = session(path, "cpu").run(["logits"], {"image": normalise(test.pixels)})[0]
    return float((logits.argmax(1) == test.labels).mean())


def random_student(channels: Sequence[int], path: Path, seed: int) -> None:
    """A FashionResNet of `channels` with torch's default (Kaiming-uniform) init, BatchNorm at identity."""
    torch.manual_seed(seed)
    export(FashionResNet(channels), path, f"FashionResNet{tuple(channels)}, random init (seed {seed})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train-images", type=int, default=0,
                        help="Train on the first N images of the (seeded) train split (0: all 55,000; a smoke test).")
    parser.add_argument("-o", "--output", type=Path, default=TEACHER)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    data = fashion_mnist("train")
    train_index, _ = split_indices(len(data.labels))
    if args.train_images:
        train_index = np.sort(np.random.default_rng(args.seed).permutation(train_index)[:args.train_images])
    x = torch.from_numpy(normalise(data.pixels[train_index]))
    y = torch.from_numpy(data.labels[train_index])

    model = FashionResNet()
    start = time.perf_counter()
    steps = train(model, x, y, args.epochs, args.batch, args.lr, args.seed)
    seconds = time.perf_counter() - start
    export(model, args.output, "Fashion-MNIST ResNet teacher trained by benchmarks/train_fashion_teacher.py; "
                               "input normalised (x/255 - 0.1307) / 0.3081 (the fashion-mnist adapter).")
    accuracy = test_accuracy(args.output)
    proto = onnx.load(str(args.output))
    report = {
        "model": str(args.output), "channels": list(TEACHER_CHANNELS),
        "data": f"Debian dataset-fashion-mnist: {len(train_index):,} of the 60,000 train images "
                f"(seeded split {VAL_SEED}; {VAL_IMAGES} held out for validation)",
        "test_images": 10000, "test_accuracy": round(accuracy, 4),
        "onnx_params": int(sum(np.prod(t.dims) for t in proto.graph.initializer)),
        "epochs": args.epochs, "batch": args.batch, "lr": args.lr, "seed": args.seed, "optimizer_steps": steps,
        "train_seconds": round(seconds, 1), "train_threads": args.threads, "torch": torch.__version__,
        "command": command("benchmarks.train_fashion_teacher"),
    }
    write_json(args.output.with_suffix(".json"), report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
