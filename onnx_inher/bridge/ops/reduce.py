"""Reductions, arg-reductions, TopK and CumSum.

Reduce* take their axes from an attribute (older opsets) or a constant input (ReduceSum from 13, the
others from 18), read at conversion time when constant.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from onnx_inher.bridge.ops.common import as_ints, axis
from onnx_inher.bridge.registry import Ctx, Fn, register


def _logsumexp(x: torch.Tensor, dims: tuple[int, ...], keep: bool) -> torch.Tensor:
    return torch.logsumexp(x, dims, keepdim=keep) if dims else x


REDUCE: dict[str, Callable[[torch.Tensor, tuple[int, ...], bool], torch.Tensor]] = {
    "ReduceSum": lambda x, d, k: torch.sum(x, d, keepdim=k),
    "ReduceMean": lambda x, d, k: torch.mean(x, d, keepdim=k),
    "ReduceMax": lambda x, d, k: torch.amax(x, d, keepdim=k) if x.numel() else _empty(x, d, k, _lowest(x.dtype)),
    "ReduceMin": lambda x, d, k: torch.amin(x, d, keepdim=k) if x.numel() else _empty(x, d, k, _highest(x.dtype)),
    "ReduceProd": lambda x, d, k: _prod(x, d, k),
    "ReduceL1": lambda x, d, k: torch.sum(x.abs(), d, keepdim=k),
    "ReduceL2": lambda x, d, k: torch.sqrt(torch.sum(x * x, d, keepdim=k)),
    "ReduceLogSum": lambda x, d, k: torch.log(torch.sum(x, d, keepdim=k)),
    "ReduceLogSumExp": _logsumexp,
    "ReduceSumSquare": lambda x, d, k: torch.sum(x * x, d, keepdim=k),
}
AXES_INPUT_SINCE = {"ReduceSum": 13}


def _empty(x: torch.Tensor, dims: tuple[int, ...], keep: bool, fill: float) -> torch.Tensor:
    shape = [1 if i in dims else n for i, n in enumerate(x.shape)] if keep else \
        [n for i, n in enumerate(x.shape) if i not in dims]
    return torch.full(shape, fill, dtype=x.dtype, device=x.device)


def _lowest(dtype: torch.dtype) -> float | int | bool:
    if dtype == torch.bool:
        return False
    return float("-inf") if dtype.is_floating_point else torch.iinfo(dtype).min


def _highest(dtype: torch.dtype) -> float | int | bool:
    if dtype == torch.bool:
        return True
    return float("inf") if dtype.is_floating_point else torch.iinfo(dtype).max


def _prod(x: torch.Tensor, dims: tuple[int, ...], keep: bool) -> torch.Tensor:
    for d in sorted(dims, reverse=True):
        x = torch.prod(x, d, keepdim=keep)
    return x


def _reducer(op: str) -> Callable[[Ctx], Fn]:
    reduce = REDUCE[op]

    def convert(ctx: Ctx) -> Fn:
        keep = bool(ctx.attr("keepdims", 1))
        noop = bool(ctx.attr("noop_with_empty_axes", 0))
        from_input = ctx.opset >= AXES_INPUT_SINCE.get(op, 18)
        attr_axes = None if from_input else ctx.attr("axes")
        const_axes = ctx.ints(1) if from_input else None
        dynamic = from_input and const_axes is None and ctx.has_input(1)

        def run(x: torch.Tensor, a: torch.Tensor | None = None) -> torch.Tensor:
            chosen = as_ints(a) if dynamic and a is not None else (attr_axes if attr_axes is not None else const_axes)
            if not chosen:
                if noop:
                    return x
                chosen = list(range(x.dim()))
            return reduce(x, tuple(sorted(axis(i, x.dim()) for i in chosen)), keep)

        return run

    return convert


for _op in REDUCE:
    register(_op)(_reducer(_op))


def _arg(fn: Callable[..., torch.Tensor]) -> Callable[[Ctx], Fn]:
    def convert(ctx: Ctx) -> Fn:
        ax, keep = int(ctx.attr("axis", 0)), bool(ctx.attr("keepdims", 1))
        last = bool(ctx.attr("select_last_index", 0))

        def run(x: torch.Tensor) -> torch.Tensor:
            if last:
                a = axis(ax, x.dim())
                flipped = fn(torch.flip(x, [a]), a, keepdim=keep)
                return x.shape[a] - 1 - flipped
            return fn(x, ax, keepdim=keep)

        return run

    return convert


register("ArgMax")(_arg(torch.argmax))
register("ArgMin")(_arg(torch.argmin))


@register("TopK", since=10)
def top_k(ctx: Ctx) -> Fn:
    ax = int(ctx.attr("axis", -1))
    largest, is_sorted = bool(ctx.attr("largest", 1)), bool(ctx.attr("sorted", 1))
    k_c = ctx.ints(1)

    def run(x: torch.Tensor, k: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        kk = k_c[0] if k_c is not None else as_ints(k)[0]  # type: ignore[arg-type]
        a = axis(ax, x.dim())
        if x.dtype == torch.uint64:
            values, idx = run(x.to(torch.int64), k)
            return values.to(x.dtype), idx
        if x.dtype.is_floating_point or x.dtype in (torch.int32, torch.int64):
            # Stable order by (value, index) like ONNX: sort indices first, then a stable sort on values.
            values, idx = torch.sort(x, dim=a, descending=largest, stable=True)
            values, idx = values.narrow(a, 0, kk), idx.narrow(a, 0, kk)
        else:
            values, idx = torch.topk(x, kk, a, largest, is_sorted)
        return values, idx

    return run


@register("CumSum", since=11)
def cum_sum(ctx: Ctx) -> Fn:
    exclusive, reverse = bool(ctx.attr("exclusive", 0)), bool(ctx.attr("reverse", 0))
    ax_c = ctx.ints(1)

    def run(x: torch.Tensor, a: torch.Tensor | None) -> torch.Tensor:
        ax = axis((ax_c if ax_c is not None else as_ints(a))[0], x.dim())  # type: ignore[arg-type]
        y = torch.flip(x, [ax]) if reverse else x
        out = torch.cumsum(y, ax, dtype=x.dtype)
        if exclusive:
            out = out - y
        return torch.flip(out, [ax]) if reverse else out

    return run


@register("CumProd", since=26)
def cum_prod(ctx: Ctx) -> Fn:
    exclusive, reverse = bool(ctx.attr("exclusive", 0)), bool(ctx.attr("reverse", 0))
    ax_c = ctx.ints(1)

    def run(x: torch.Tensor, a: torch.Tensor | None) -> torch.Tensor:
        ax = axis((ax_c if ax_c is not None else as_ints(a))[0], x.dim())  # type: ignore[arg-type]
        y = torch.flip(x, [ax]) if reverse else x
        if exclusive:
            ones = torch.ones_like(y.narrow(ax, 0, 1))
            y = torch.cat([ones, y.narrow(ax, 0, y.shape[ax] - 1)], ax)
        out = torch.cumprod(y, ax, dtype=x.dtype)
        return torch.flip(out, [ax]) if reverse else out

    return run
