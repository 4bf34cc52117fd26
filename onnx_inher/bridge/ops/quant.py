"""QDQ (QuantizeLinear / DequantizeLinear, per-tensor, per-axis and blocked).

A QDQ graph's quantised weights are integer initializers, so they are buffers (not trained), and so are
their scales (`ir.weights` does not count a scale as a learned value). Quantisation rounds half to even
and saturates, as ONNX specifies. Integer tensors carry no gradient in torch, so a `QuantizeLinear ->
DequantizeLinear` pair passes its gradient straight through (identity) from the float tensor before the
pair to the one after.

Fused chains. ONNX Runtime (at its default optimisation level) does not compute `DequantizeLinear ->
Conv/MatMul/Gemm -> QuantizeLinear` in float: it runs `QLinearConv`, `QLinearMatMul` or `QGemm`, which
sum the zero-point-shifted 8-bit operands exactly in int32, add the int32 bias, and requantise with one
float32 multiplier per output channel, `float32(acc) * (x_scale * w_scale / y_scale)`, rounded half to
even and saturated (MLAS `MlasRequantizeOutput`). A float convolution of the dequantised values sums in
another order, and an ulp there moves a value to the next quantisation step now and then: one step of
the output scale, which later layers compound. So such a `QuantizeLinear` computes its value the fused
way (`_Fused`) and keeps the float path only for the gradient (straight-through).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch

from onnx_inher.bridge.ops.common import axis
from onnx_inher.bridge.registry import Ctx, Fn, lookup, register

FUSED_OPS = ("Conv", "MatMul", "Gemm")
EIGHT_BIT = (np.uint8, np.int8)

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


def _split(ctx: Ctx, args: tuple[torch.Tensor | None, ...], n_captures: int,
           ) -> tuple[tuple[torch.Tensor | None, ...], tuple[torch.Tensor | None, ...]]:
    """(x, scale, zero point) and the captured tensors (None where nothing was captured): captures follow
    the node's own inputs, which may stop before the optional zero point."""
    n = len(ctx.node.input)
    own = (*args[:n], None, None, None)[:3]
    captured = (*args[n:], *[None] * n_captures)[:n_captures]
    return own, captured


@dataclass
class _Fused:
    """ORT's fused integer kernel for the chain feeding one QuantizeLinear, read at conversion time."""

    op_fn: Fn  # the op's own converter: run on zero-point-shifted integers in float64 it sums exactly
    x_zero: float
    weight: torch.Tensor  # float64, zero point subtracted
    bias: torch.Tensor | None  # float64 int32 values
    multiplier: torch.Tensor  # float32, scalar or shaped for the op's output channels
    y_zero: float
    lo: int
    hi: int

    def __call__(self, qx: torch.Tensor) -> torch.Tensor:
        shifted = qx.to(torch.float64) - self.x_zero
        acc = self.op_fn(shifted, self.weight.to(shifted.device))
        if self.bias is not None:
            acc = acc + self.bias.to(acc.device)
        y = torch.round(acc.to(torch.float32) * self.multiplier.to(acc.device)) + self.y_zero
        return torch.clamp(y, self.lo, self.hi)


def _dq(ctx: Ctx, name: str) -> tuple[onnx.NodeProto, np.ndarray, np.ndarray] | None:
    """The DequantizeLinear writing `name` with constant scale and zero point: (node, scale, zero)."""
    node = ctx.producer(name)
    if node is None or node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
        return None
    if int(next((a.i for a in node.attribute if a.name == "block_size"), 0)):
        return None
    scale = ctx.value(node.input[1])
    zero = ctx.value(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros((), np.uint8)
    if scale is None or zero is None or scale.dtype != np.float32:
        return None
    return node, scale, zero


def _along(values: np.ndarray, rank: int, ax: int) -> np.ndarray:
    """A scalar or per-axis vector shaped to broadcast over a rank-`rank` tensor along axis `ax`."""
    if values.size == 1:
        return values.reshape(())
    shape = [1] * rank
    shape[axis(ax, rank)] = -1
    return values.reshape(shape)


def _dq_axis(node: onnx.NodeProto) -> int:
    return int(next((a.i for a in node.attribute if a.name == "axis"), 1))


def _fusable_op(ctx: Ctx, op: onnx.NodeProto) -> bool:
    """The shapes of chain ORT fuses: one consumer, not a graph output, Gemm without alpha/beta/transA."""
    if op.op_type not in FUSED_OPS or op.domain not in ("", "ai.onnx") or len(ctx.consumers(op.output[0])) != 1:
        return False
    if ctx.is_graph_output(op.output[0]):
        return False
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in op.attribute}
    return op.op_type != "Gemm" or (attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0
                                    and not attrs.get("transA", 0))


def _fused_bias(ctx: Ctx, op: onnx.NodeProto) -> tuple[bool, torch.Tensor | None]:
    """(fusable, int32 bias as float64): the bias must be absent or an int32 DequantizeLinear (zero point 0)."""
    if op.op_type == "MatMul" or len(op.input) < 3 or not op.input[2]:
        return True, None
    found = _dq(ctx, op.input[2])
    if found is None:
        return False, None
    q = ctx.value(found[0].input[0])
    if q is None or q.dtype != np.int32 or np.any(found[2] != 0):
        return False, None
    return True, torch.from_numpy(q.astype(np.float64))


def _multiplier(op: str, x_scale: np.ndarray, w_scale: np.ndarray, y_scale: np.ndarray, rank: int) -> torch.Tensor:
    """ORT's requantisation multiplier, one per output channel, in float32 and in its order of operations
    (`x_scale * w_scale / y_scale`), shaped for the op's output: Conv's channels are axis 1 of an output of
    the weight's rank, MatMul's and Gemm's the last axis."""
    mult = np.asarray((np.float32(x_scale.reshape(())) * w_scale.astype(np.float32)) / np.float32(y_scale.reshape(())),
                      dtype=np.float32)
    mult = _along(mult, rank, 1) if op == "Conv" else mult.reshape(-1 if mult.size > 1 else ())
    return torch.from_numpy(np.ascontiguousarray(mult))


def _fused(ctx: Ctx, y_scale: np.ndarray | None, y_zero: np.ndarray | None) -> _Fused | None:
    """The fused kernel ORT runs for this QuantizeLinear's input chain, or None if ORT would not fuse it."""
    op = ctx.producer(ctx.node.input[0])
    if op is None or y_scale is None or y_zero is None or y_scale.size != 1 or y_zero.dtype.type not in EIGHT_BIT:
        return None
    if not _fusable_op(ctx, op):
        return None
    xq, wq = _dq(ctx, op.input[0]), _dq(ctx, op.input[1])
    if xq is None or wq is None or xq[1].size != 1 or xq[2].size != 1 or xq[2].dtype != y_zero.dtype:
        return None
    w = ctx.value(wq[0].input[0])
    ok, bias = _fused_bias(ctx, op)
    if w is None or w.dtype.type not in EIGHT_BIT or not ok:
        return None
    shifted = w.astype(np.float64) - _along(wq[2].astype(np.float64), w.ndim, _dq_axis(wq[0]))
    if bias is not None and op.op_type == "Conv":
        bias = bias.reshape(-1, *[1] * (w.ndim - 2))
    convert = lookup("", op.op_type, ctx.opset)
    assert convert is not None
    ctx.capture(xq[0].input[0])
    info = np.iinfo(y_zero.dtype)
    return _Fused(convert(ctx.sibling(op)), float(xq[2].reshape(())), torch.from_numpy(shifted), bias,
                  _multiplier(op.op_type, xq[1], wq[1], y_scale, w.ndim), float(y_zero.reshape(())),
                  int(info.min), int(info.max))


@register("QuantizeLinear", since=10)
def quantize_linear(ctx: Ctx) -> Fn:
    ax, block = int(ctx.attr("axis", 1)), int(ctx.attr("block_size", 0))
    saturate = bool(ctx.attr("saturate", 1))
    out_type = ctx.attr("output_dtype", 0)
    fused = _fused(ctx, ctx.peek(1), ctx.peek(2)) if not block else None

    def run(*args: torch.Tensor | None) -> torch.Tensor:
        (x, scale, zero), (qx,) = _split(ctx, args, 1)
        assert x is not None and scale is not None
        dtype = zero.dtype if zero is not None else (ctx.dtype(out_type) if out_type else torch.uint8)
        s = _broadcast(scale, x, ax, block)
        z = _broadcast(zero, x, ax, block).to(torch.float32) if zero is not None else 0.0
        q = x.float() / s
        exact = fused(qx) if fused is not None and qx is not None else torch.round(q) + z  # z after rounding
        q = q + z
        q = q + (exact - q).detach()  # straight-through: the value rounded (or ORT's fused result)
        lo, hi = RANGES.get(dtype, (None, None))
        if lo is not None and saturate:
            q = torch.clamp(q, lo, hi)
        return q.to(dtype)

    return run


def _quantized_from(ctx: Ctx) -> str | None:
    """The float tensor a QuantizeLinear turned into this node's integer input, if one did.

    Integer tensors carry no gradient in torch, so a `QuantizeLinear -> DequantizeLinear` pair would cut
    the autograd tape; the pair's gradient is instead passed straight through from this float tensor."""
    q = ctx.producer(ctx.node.input[0])
    if q is None or q.op_type != "QuantizeLinear" or q.domain not in ("", "ai.onnx"):
        return None
    ctx.capture(q.input[0])
    return q.input[0]


@register("DequantizeLinear", since=10)
def dequantize_linear(ctx: Ctx) -> Fn:
    ax, block = int(ctx.attr("axis", 1)), int(ctx.attr("block_size", 0))
    _quantized_from(ctx)

    def run(*args: torch.Tensor | None) -> torch.Tensor:
        (x, scale, zero), (before,) = _split(ctx, args, 1)
        assert x is not None and scale is not None
        s = _broadcast(scale, x, ax, block)
        xf = x.to(torch.float32)
        if zero is not None:
            xf = xf - _broadcast(zero, x, ax, block).to(torch.float32)
        out = (xf * s).to(scale.dtype)
        if before is not None and before.requires_grad and before.shape == out.shape:
            out = out + (before.to(out.dtype) - before.detach().to(out.dtype))  # straight-through, value unchanged
        return out

    return run


def quantize_dynamic_uint8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORT's dynamic uint8 quantisation of a whole tensor, step for step in float32 (DynamicQuantizeLinear,
    and the quantised GEMMs of its RNN kernels): the range always holds 0, scale = range / 255 (1 for an
    all-zero input), zero point and values rounded half to even, then saturated. Returns (values, scale,
    zero point), values and zero point as float32 integers."""
    xf = x.to(torch.float32)
    lo = torch.clamp(xf.min(), max=0.0) if xf.numel() else xf.new_zeros(())
    hi = torch.clamp(xf.max(), min=0.0) if xf.numel() else xf.new_zeros(())
    scale = torch.where(hi == lo, torch.ones_like(hi), (hi - lo) / 255.0)
    zero = torch.clamp(torch.round(0.0 - lo / scale), 0, 255)
    return torch.clamp(torch.round(xf / scale) + zero, 0, 255), scale, zero


@register("DynamicQuantizeLinear", since=11)
def dynamic_quantize_linear(ctx: Ctx) -> Fn:
    """ONNX Runtime's arithmetic (`quantize_dynamic_uint8`), so it matches ORT bit for bit."""

    def run(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, scale, zero = quantize_dynamic_uint8(x)
        return q.to(torch.uint8), scale, zero.to(torch.uint8)

    return run
