"""Elementwise math, comparisons, logic and matrix products."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from onnx_inher.bridge.ops.common import FLOATS, WIDEN, same_device
from onnx_inher.bridge.registry import Ctx, Fn, register

UNARY = {
    "Abs": torch.abs, "Acos": torch.acos, "Acosh": torch.acosh, "Asin": torch.asin, "Asinh": torch.asinh,
    "Atan": torch.atan, "Atanh": torch.atanh, "Ceil": torch.ceil, "Cos": torch.cos, "Cosh": torch.cosh,
    "Erf": torch.erf, "Exp": torch.exp, "Floor": torch.floor, "Log": torch.log, "Neg": torch.neg,
    "Reciprocal": torch.reciprocal, "Round": torch.round, "Sigmoid": torch.sigmoid, "Sign": torch.sign,
    "Sin": torch.sin, "Sinh": torch.sinh, "Sqrt": torch.sqrt, "Tan": torch.tan, "Tanh": torch.tanh,
    "Not": torch.logical_not, "IsNaN": torch.isnan, "Relu": torch.relu, "Softsign": F.softsign,
    "Mish": F.mish,
}


def _unary(fn: Fn) -> Fn:
    return lambda ctx: fn


for _name, _fn in UNARY.items():
    register(_name)(_unary(_fn))


def _binary(fn: Fn) -> Fn:
    def call(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.device != b.device:
            a, b = same_device(a, b)
        if a.dtype in WIDEN:
            return _narrow(fn(a.to(torch.int64), b.to(torch.int64)), a.dtype)
        return fn(a, b)

    return call


def _narrow(out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Back to the unsigned type after computing in int64 (torch lacks most uint16/32/64 kernels)."""
    return out if out.dtype == torch.bool else out.to(dtype)


BINARY = {
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "And": torch.logical_and, "Or": torch.logical_or,
    "Xor": torch.logical_xor, "Equal": torch.eq, "Greater": torch.gt, "GreaterOrEqual": torch.ge,
    "Less": torch.lt, "LessOrEqual": torch.le, "BitwiseAnd": torch.bitwise_and, "BitwiseOr": torch.bitwise_or,
    "BitwiseXor": torch.bitwise_xor,
}

for _name, _fn in BINARY.items():
    register(_name)(_unary(_binary(_fn)))


def _div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.dtype in FLOATS:
        return torch.div(a, b)
    return torch.div(a, b, rounding_mode="trunc")


register("Div")(_unary(_binary(_div)))


def _pow(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    out = torch.pow(a, b)
    return out if out.dtype == a.dtype else out.to(a.dtype)


register("Pow")(_unary(_binary(_pow)))


@register("BitwiseNot", since=18)
def bitwise_not(ctx: Ctx) -> Fn:
    def run(x: torch.Tensor) -> torch.Tensor:
        if x.dtype in WIDEN:
            bits = {torch.uint16: 0xFFFF, torch.uint32: 0xFFFFFFFF}.get(x.dtype, -1)
            return (x.to(torch.int64) ^ bits).to(x.dtype)
        return torch.bitwise_not(x)

    return run


@register("Mod")
def mod(ctx: Ctx) -> Fn:
    return _binary(torch.fmod if ctx.attr("fmod", 0) else torch.remainder)


@register("BitShift")
def bit_shift(ctx: Ctx) -> Fn:
    left = ctx.attr("direction") == "LEFT"
    return _binary(torch.bitwise_left_shift if left else torch.bitwise_right_shift)


def _variadic(fn: Fn) -> Fn:
    def call(*xs: torch.Tensor) -> torch.Tensor:
        xs = tuple(same_device(*xs))  # type: ignore[arg-type]
        if xs[0].dtype in WIDEN:
            return _narrow(functools.reduce(fn, [x.to(torch.int64) for x in xs]), xs[0].dtype)
        return functools.reduce(fn, xs)

    return call


register("Sum")(_unary(_variadic(torch.add)))
register("Max")(_unary(_variadic(torch.maximum)))
register("Min")(_unary(_variadic(torch.minimum)))


@register("Mean")
def mean(ctx: Ctx) -> Fn:
    add = _variadic(torch.add)
    return lambda *xs: add(*xs) / len(xs)


@register("IsInf")
def is_inf(ctx: Ctx) -> Fn:
    pos, neg = ctx.attr("detect_positive", 1), ctx.attr("detect_negative", 1)
    if pos and neg:
        return torch.isinf
    if pos:
        return torch.isposinf
    if neg:
        return torch.isneginf
    return lambda x: torch.zeros_like(x, dtype=torch.bool)


@register("Clip")
def clip(ctx: Ctx) -> Fn:
    if ctx.opset < 11:
        lo, hi = ctx.attr("min", float("-inf")), ctx.attr("max", float("inf"))
        return lambda x: torch.clamp(x, lo, hi)

    def run(x: torch.Tensor, lo: torch.Tensor | None = None, hi: torch.Tensor | None = None) -> torch.Tensor:
        if lo is not None:
            x = torch.maximum(x, lo.to(x.device))
        if hi is not None:
            x = torch.minimum(x, hi.to(x.device))
        return x

    return run


@register("Where")
def where(ctx: Ctx) -> Fn:
    def run(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if not (c.device == a.device == b.device):
            c, a, b = same_device(c, a, b)
        return torch.where(c, a, b)

    return run


@register("MatMul")
def matmul(ctx: Ctx) -> Fn:
    return _binary(torch.matmul)


@register("Gemm")
def gemm(ctx: Ctx) -> Fn:
    alpha, beta = float(ctx.attr("alpha", 1.0)), float(ctx.attr("beta", 1.0))
    ta, tb = int(ctx.attr("transA", 0)), int(ctx.attr("transB", 0))

    def run(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        if ta:
            a = a.t()
        if c is not None and alpha == 1.0 and beta == 1.0 and tb and c.dim() <= 1:
            return F.linear(a, b, c)  # one fused kernel, the layout nn.Linear uses
        y = F.linear(a, b) if tb else a @ b
        if alpha != 1.0:
            y = y * alpha
        if c is not None:
            y = y + (c * beta if beta != 1.0 else c)
        return y

    return run


@register("Einsum", since=12)
def einsum(ctx: Ctx) -> Fn:
    equation = ctx.attr("equation").replace(" ", "")
    return lambda *xs: torch.einsum(equation, *xs)


@register("MatMulInteger", since=10)
def matmul_integer(ctx: Ctx) -> Fn:
    def run(a: torch.Tensor, b: torch.Tensor, za: torch.Tensor | None = None,
            zb: torch.Tensor | None = None) -> torch.Tensor:
        a32, b32 = a.to(torch.int32), b.to(torch.int32)
        if za is not None:
            a32 = a32 - (za.to(torch.int32).reshape(-1, 1) if za.numel() > 1 else za.to(torch.int32))
        if zb is not None:
            b32 = b32 - zb.to(torch.int32)
        return torch.matmul(a32.double(), b32.double()).to(torch.int32)

    return run


@register("Det", since=11)
def det(ctx: Ctx) -> Fn:
    return torch.linalg.det
