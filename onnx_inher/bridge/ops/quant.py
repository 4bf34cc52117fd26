"""QDQ (QuantizeLinear / DequantizeLinear, per-tensor, per-axis and blocked).

A QDQ graph's quantised weights are integer initializers, so they are buffers (not trained); the float
scales are parameters like any float weight. Quantisation rounds half to even and saturates, as ONNX
specifies; its gradient is the straight-through estimator (identity inside the range), so training a
QDQ graph's float weights works.
"""

from __future__ import annotations

import torch

from onnx_inher.bridge.ops.common import axis
from onnx_inher.bridge.registry import Ctx, Fn, register

RANGES = {torch.uint8: (0, 255), torch.int8: (-128, 127), torch.uint16: (0, 65535), torch.int16: (-32768, 32767),
          torch.int32: (-(2**31), 2**31 - 1)}


def _broadcast(param: torch.Tensor, x: torch.Tensor, ax: int, block: int) -> torch.Tensor:
    """Scale/zero point shaped to multiply `x`: scalar, per-axis (1-D) or blocked (same rank)."""
    if param.dim() == 0 or (param.numel() == 1 and param.dim() <= 1):
        return param.reshape(())
    a = axis(ax, x.dim())
    if param.dim() == 1:
        shape = [1] * x.dim()
        shape[a] = -1
        return param.reshape(shape)
    return param.repeat_interleave(block, dim=a).narrow(a, 0, x.shape[a])


@register("QuantizeLinear", since=10)
def quantize_linear(ctx: Ctx) -> Fn:
    ax, block = int(ctx.attr("axis", 1)), int(ctx.attr("block_size", 0))
    saturate = bool(ctx.attr("saturate", 1))
    out_type = ctx.attr("output_dtype", 0)

    def run(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None) -> torch.Tensor:
        dtype = zero.dtype if zero is not None else (ctx.dtype(out_type) if out_type else torch.uint8)
        s = _broadcast(scale, x, ax, block)
        z = _broadcast(zero, x, ax, block).to(torch.float32) if zero is not None else 0.0
        q = x.float() / s
        q = q + (torch.round(q) - q).detach() + z  # straight-through rounding
        lo, hi = RANGES.get(dtype, (None, None))
        if lo is not None and saturate:
            q = torch.clamp(q, lo, hi)
        return q.to(dtype)

    return run


@register("DequantizeLinear", since=10)
def dequantize_linear(ctx: Ctx) -> Fn:
    ax, block = int(ctx.attr("axis", 1)), int(ctx.attr("block_size", 0))

    def run(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None) -> torch.Tensor:
        s = _broadcast(scale, x, ax, block)
        xf = x.to(torch.float32)
        if zero is not None:
            xf = xf - _broadcast(zero, x, ax, block).to(torch.float32)
        return (xf * s).to(scale.dtype)

    return run


@register("DynamicQuantizeLinear", since=11)
def dynamic_quantize_linear(ctx: Ctx) -> Fn:
    """ONNX Runtime's arithmetic, step for step (float32): the range always holds 0, scale = range / 255
    (1 for an all-zero input, as ORT does), zero point and values rounded half to even, then saturated."""

    def run(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        xf = x.to(torch.float32)
        lo = torch.clamp(xf.min(), max=0.0)
        hi = torch.clamp(xf.max(), min=0.0)
        scale = torch.where(hi == lo, torch.ones_like(hi), (hi - lo) / 255.0)
        zero = torch.clamp(torch.round(0.0 - lo / scale), 0, 255)
        q = torch.clamp(torch.round(xf / scale) + zero, 0, 255)
        return q.to(torch.uint8), scale, zero.to(torch.uint8)

    return run
