"""Small helpers shared by the converters."""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# torch has few kernels for these: integer math on them runs in int64 and is cast back.
WIDEN = (torch.uint16, torch.uint32, torch.uint64)


def same_device(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Move tensors onto one device: shape values are computed on the CPU (`Shape` returns a CPU
    tensor, so reading them back never waits for an accelerator), data may live elsewhere."""
    target = target_device(tensors)
    if target is None:
        return list(tensors)
    return [t.to(target) if t is not None and t.device != target else t for t in tensors]


def target_device(tensors: Sequence[torch.Tensor | None]) -> torch.device | None:
    """Where an op on these tensors runs, or None if they already share a device.

    Tensors with dimensions decide: an accelerator if any of them is on one, else the CPU. Scalars
    (0-d) follow them, in both directions: torch accepts a CPU scalar beside CUDA data but not a CUDA
    scalar (a constant moved with the module) beside CPU shape values, so such a scalar comes to the CPU
    rather than sending shape arithmetic to the GPU.
    """
    present = [t for t in tensors if t is not None]
    if len({t.device for t in present}) <= 1:
        return None
    shaped = {t.device for t in present if t.dim() > 0} or {t.device for t in present}
    return next((d for d in shaped if d.type != "cpu"), torch.device("cpu"))


def axis(a: int, rank: int) -> int:
    return a + rank if a < 0 else a


def as_ints(t: torch.Tensor) -> list[int]:
    return [int(v) for v in t.reshape(-1).tolist()]


def pairs(pads: Sequence[int]) -> list[int]:
    """ONNX pads `[b1, b2, ..., e1, e2, ...]` as F.pad's `(b_last, e_last, ..., b_first, e_first)`."""
    n = len(pads) // 2
    out: list[int] = []
    for i in reversed(range(n)):
        out += [int(pads[i]), int(pads[i + n])]
    return out
