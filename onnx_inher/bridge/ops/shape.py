"""Shapes, layout, indexing and type conversion.

Shape values (the output of `Shape` and what is computed from it) live on the CPU, so Reshape/Expand/
Slice read them without waiting for an accelerator; constant shape inputs are read at conversion time
(`ctx.const`), so the common case needs no read-back at all.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from onnx_inher.bridge.ops.common import as_ints, axis, pairs, same_device
from onnx_inher.bridge.registry import Ctx, Fn, register

INT64_MAX = np.iinfo(np.int64).max


@register("Identity")
def identity(ctx: Ctx) -> Fn:
    return lambda x: x


@register("Shape")
def shape(ctx: Ctx) -> Fn:
    start, end = ctx.attr("start"), ctx.attr("end")

    def run(x: torch.Tensor) -> torch.Tensor:
        dims = list(x.shape)
        if start is not None or end is not None:
            dims = dims[slice(start, end)]
        return torch.tensor(dims, dtype=torch.int64)

    return run


@register("Size")
def size(ctx: Ctx) -> Fn:
    return lambda x: torch.tensor(x.numel(), dtype=torch.int64)


def _target_shape(x: torch.Tensor, dims: list[int], allowzero: int) -> list[int]:
    if allowzero:
        return dims
    return [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]


@register("Reshape", since=5)
def reshape(ctx: Ctx) -> Fn:
    allowzero = int(ctx.attr("allowzero", 0))
    dims = ctx.ints(1)
    if dims is not None:
        return lambda x, _s: x.reshape(_target_shape(x, dims, allowzero))
    return lambda x, s: x.reshape(_target_shape(x, as_ints(s), allowzero))


@register("Reshape", since=1, until=4)
def reshape_v1(ctx: Ctx) -> Fn:
    dims = list(ctx.attr("shape"))
    return lambda x: x.reshape(_target_shape(x, dims, 0))


@register("Transpose")
def transpose(ctx: Ctx) -> Fn:
    perm = ctx.attr("perm")
    if perm is None:
        return lambda x: x.permute(*reversed(range(x.dim())))
    perm = list(perm)
    return lambda x: x.permute(perm)


def _axes(ctx: Ctx, input_index: int) -> tuple[list[int] | None, bool]:
    """Axes from the attribute (old opsets) or a constant input; (None, True) when computed at run time."""
    attr = ctx.attr("axes")
    if attr is not None:
        return list(attr), False
    if ctx.has_input(input_index):
        value = ctx.ints(input_index)
        return value, value is None
    return None, False


@register("Squeeze")
def squeeze(ctx: Ctx) -> Fn:
    axes, dynamic = _axes(ctx, 1)

    def run(x: torch.Tensor, a: torch.Tensor | None = None) -> torch.Tensor:
        chosen = as_ints(a) if dynamic else axes
        if chosen is None:
            return x.reshape([d for d in x.shape if d != 1])
        drop = {axis(i, x.dim()) for i in chosen}
        return x.reshape([d for i, d in enumerate(x.shape) if i not in drop])

    return run


@register("Unsqueeze")
def unsqueeze(ctx: Ctx) -> Fn:
    axes, dynamic = _axes(ctx, 1)

    def run(x: torch.Tensor, a: torch.Tensor | None = None) -> torch.Tensor:
        chosen = as_ints(a) if dynamic else axes
        assert chosen is not None
        rank = x.dim() + len(chosen)
        new = sorted(axis(i, rank) for i in chosen)
        dims = list(x.shape)
        for i in new:
            dims.insert(i, 1)
        return x.reshape(dims)

    return run


@register("Concat")
def concat(ctx: Ctx) -> Fn:
    ax = int(ctx.attr("axis", 0))

    def run(*xs: torch.Tensor) -> torch.Tensor:
        parts = [x for x in xs if x is not None]
        if len({p.device for p in parts}) > 1:
            parts = same_device(*parts)  # type: ignore[assignment]
        return torch.cat(parts, dim=ax)

    return run


@register("Split")
def split(ctx: Ctx) -> Fn:
    ax = int(ctx.attr("axis", 0))
    outputs = len(ctx.node.output)
    sizes_attr = ctx.attr("split")
    sizes_c = ctx.ints(1) if ctx.opset >= 13 else None
    num_outputs = ctx.attr("num_outputs")

    def run(x: torch.Tensor, s: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        sizes = sizes_attr or sizes_c or (as_ints(s) if s is not None else None)
        if not sizes:
            n = x.shape[axis(ax, x.dim())]
            parts = num_outputs or outputs
            chunk = -(-n // parts)
            sizes = [min(chunk, n - i * chunk) for i in range(parts)]
        return tuple(torch.split(x, list(sizes), dim=ax))

    return run


def _slice(x: torch.Tensor, starts: list[int], ends: list[int], axes: list[int] | None,
           steps: list[int] | None) -> torch.Tensor:
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps or [1] * len(starts)
    index: list[slice] = [slice(None)] * x.dim()
    flips = []
    for s, e, a, st in zip(starts, ends, axes, steps, strict=True):
        a = axis(a, x.dim())
        n = x.shape[a]
        if st > 0:
            s = min(max(s + n if s < 0 else s, 0), n)
            e = min(max(e + n if e < 0 else e, 0), n)
            index[a] = slice(s, e, st)
        else:
            s = min(max(s + n if s < 0 else s, -1), n - 1)
            e = min(max(e + n if e < 0 else e, -1), n - 1)
            if s <= e:
                index[a] = slice(0, 0)
                continue
            # walk backwards: flip, then slice forwards
            index[a] = slice(n - 1 - s, n - 1 - e, -st)
            flips.append(a)
    if flips:
        x = torch.flip(x, flips)
    return x[tuple(index)]


@register("Slice", since=10)
def slice_(ctx: Ctx) -> Fn:
    consts = [ctx.ints(i) for i in range(1, 5)]
    have = [ctx.has_input(i) for i in range(1, 5)]

    def run(x: torch.Tensor, *args: torch.Tensor | None) -> torch.Tensor:
        vals = []
        for k in range(4):
            if consts[k] is not None:
                vals.append(consts[k])
            elif have[k] and k < len(args) and args[k] is not None:
                vals.append(as_ints(args[k]))  # type: ignore[arg-type]
            else:
                vals.append(None)
        return _slice(x, vals[0], vals[1], vals[2], vals[3])  # type: ignore[arg-type]

    return run


@register("Slice", since=1, until=9)
def slice_v1(ctx: Ctx) -> Fn:
    starts, ends, axes = list(ctx.attr("starts")), list(ctx.attr("ends")), ctx.attr("axes")
    return lambda x: _slice(x, starts, ends, list(axes) if axes else None, None)


def _norm_index(idx: torch.Tensor, n: int) -> torch.Tensor:
    return torch.where(idx < 0, idx + n, idx)


@register("Gather")
def gather(ctx: Ctx) -> Fn:
    ax = int(ctx.attr("axis", 0))
    idx_c = ctx.peek(1)
    if idx_c is not None and idx_c.ndim == 0:
        i = int(idx_c)
        ctx.const(1)
        return lambda x, _i: x.select(ax, i if i >= 0 else i + x.shape[ax])

    def run(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        a = axis(ax, x.dim())
        if idx.device != x.device:
            idx = idx.to(x.device)
        idx = _norm_index(idx.long(), x.shape[a])
        if a == 0 and x.dim() == 2 and x.dtype.is_floating_point:
            return F.embedding(idx, x)
        flat = x.index_select(a, idx.reshape(-1))
        return flat.reshape(*x.shape[:a], *idx.shape, *x.shape[a + 1:])

    return run


@register("GatherElements", since=11)
def gather_elements(ctx: Ctx) -> Fn:
    ax = int(ctx.attr("axis", 0))

    def run(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        a = axis(ax, x.dim())
        return torch.gather(x, a, _norm_index(idx.to(x.device).long(), x.shape[a]))

    return run


@register("GatherND", since=11)
def gather_nd(ctx: Ctx) -> Fn:
    b = int(ctx.attr("batch_dims", 0))

    def run(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        idx = idx.to(x.device).long()
        k = idx.shape[-1]
        batch = x.shape[:b]
        nb = math.prod(batch)
        xb = x.reshape(nb, *x.shape[b:])
        ib = idx.reshape(nb, -1, k)
        dims = x.shape[b:b + k]
        ib = torch.stack([_norm_index(ib[..., j], dims[j]) for j in range(k)], -1)
        flat = torch.zeros(ib.shape[:-1], dtype=torch.long, device=x.device)
        for j in range(k):
            flat = flat * dims[j] + ib[..., j]
        rest = xb.shape[1 + k:]
        gathered = xb.reshape(nb, -1, *rest)
        out = torch.stack([gathered[i].index_select(0, flat[i]) for i in range(nb)]) if nb > 1 \
            else gathered[0].index_select(0, flat[0]).unsqueeze(0)
        return out.reshape(*batch, *idx.shape[b:-1], *rest)

    return run


_REDUCTIONS = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}


@register("ScatterElements", since=11)
def scatter_elements(ctx: Ctx) -> Fn:
    ax = int(ctx.attr("axis", 0))
    reduction = ctx.attr("reduction", "none")

    def run(x: torch.Tensor, idx: torch.Tensor, upd: torch.Tensor) -> torch.Tensor:
        a = axis(ax, x.dim())
        idx = _norm_index(idx.to(x.device).long(), x.shape[a])
        if reduction == "none":
            return torch.scatter(x, a, idx, upd)
        return torch.scatter_reduce(x, a, idx, upd, _REDUCTIONS[reduction], include_self=True)

    return run


@register("Scatter", since=9, until=10)
def scatter(ctx: Ctx) -> Fn:
    ax = int(ctx.attr("axis", 0))
    return lambda x, idx, upd: torch.scatter(x, axis(ax, x.dim()), _norm_index(idx.long(), x.shape[ax]), upd)


@register("ScatterND", since=11)
def scatter_nd(ctx: Ctx) -> Fn:
    reduction = ctx.attr("reduction", "none")

    def run(x: torch.Tensor, idx: torch.Tensor, upd: torch.Tensor) -> torch.Tensor:
        idx = idx.to(x.device).long()
        k = idx.shape[-1]
        dims = x.shape[:k]
        flat = torch.zeros(idx.shape[:-1], dtype=torch.long, device=x.device)
        for j in range(k):
            flat = flat * dims[j] + _norm_index(idx[..., j], dims[j])
        out = x.clone().reshape(-1, *x.shape[k:])
        u = upd.reshape(-1, *x.shape[k:])
        f = flat.reshape(-1)
        if reduction == "none":
            out[f] = u
        else:
            out = out.index_reduce(0, f, u, {"add": "mean", "mul": "prod", "max": "amax", "min": "amin"}[reduction]) \
                if reduction != "add" else out.index_add(0, f, u)
        return out.reshape(x.shape)

    return run


@register("Expand", since=8)
def expand(ctx: Ctx) -> Fn:
    dims_c = ctx.ints(1)

    def run(x: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
        dims = dims_c if dims_c is not None else as_ints(s)  # type: ignore[arg-type]
        rank = max(len(dims), x.dim())
        dims = [1] * (rank - len(dims)) + list(dims)
        xs = [1] * (rank - x.dim()) + list(x.shape)
        target = [max(a, b) if 1 in (a, b) else b for a, b in zip(xs, dims, strict=True)]
        return x.reshape(xs).expand(target)

    return run


@register("Tile", since=6)
def tile(ctx: Ctx) -> Fn:
    reps_c = ctx.ints(1)
    return lambda x, r: x.repeat(reps_c if reps_c is not None else as_ints(r))


@register("Pad", since=11)
def pad(ctx: Ctx) -> Fn:
    mode = ctx.attr("mode", "constant")
    pads_c, axes_c = ctx.ints(1), ctx.ints(3)
    value_c = ctx.const(2)

    def run(x: torch.Tensor, p: torch.Tensor | None, v: torch.Tensor | None = None,
            a: torch.Tensor | None = None) -> torch.Tensor:
        pads = pads_c if pads_c is not None else as_ints(p)  # type: ignore[arg-type]
        value = float(value_c) if value_c is not None and np.size(value_c) else \
            (float(v.item()) if v is not None and v.numel() else 0.0)
        axes = axes_c if axes_c is not None else (as_ints(a) if a is not None else None)
        return _pad(x, list(pads), mode, value, axes)

    return run


@register("Pad", since=2, until=10)
def pad_v2(ctx: Ctx) -> Fn:
    mode, pads, value = ctx.attr("mode", "constant"), list(ctx.attr("pads")), float(ctx.attr("value", 0.0))
    return lambda x: _pad(x, pads, mode, value, None)


def _pad(x: torch.Tensor, pads: list[int], mode: str, value: float, axes: list[int] | None) -> torch.Tensor:
    rank = x.dim()
    if axes is not None:
        full = [0] * (2 * rank)
        n = len(axes)
        for i, a in enumerate(axes):
            a = axis(a, rank)
            full[a], full[a + rank] = pads[i], pads[i + n]
        pads = full
    if not any(pads):
        return x
    torch_pads = pairs(pads)
    if mode == "constant":
        return F.pad(x, torch_pads, value=value)
    # reflect/edge/wrap pad only trailing dims in torch: move padded dims last.
    padded_axes = [i for i in range(rank) if pads[i] or pads[i + rank]]
    if mode == "wrap":
        for a in padded_axes:
            n = x.shape[a]
            idx = torch.arange(-pads[a], n + pads[a + rank], device=x.device) % n
            x = x.index_select(a, idx)
        return x
    for a in padded_axes:
        n = x.shape[a]
        idx = torch.arange(-pads[a], n + pads[a + rank], device=x.device)
        if mode == "edge":
            idx = idx.clamp(0, n - 1)
        else:  # reflect
            period = max(2 * (n - 1), 1)
            idx = idx.abs() % period
            idx = torch.where(idx >= n, period - idx, idx)
        x = x.index_select(a, idx)
    return x


@register("Cast")
def cast(ctx: Ctx) -> Fn:
    to = ctx.dtype(int(ctx.attr("to")))
    return lambda x: x if x.dtype == to else x.to(to)


@register("CastLike", since=15)
def cast_like(ctx: Ctx) -> Fn:
    return lambda x, like: x.to(like.dtype)


@register("ConstantOfShape", since=9)
def constant_of_shape(ctx: Ctx) -> Fn:
    value = ctx.attr("value")
    fill = value.reshape(-1)[0].item() if value is not None else 0.0
    dtype = ctx.dtype(_onnx_type(value)) if value is not None else torch.float32
    dims_c = ctx.ints(0)

    def run(s: torch.Tensor | None) -> torch.Tensor:
        dims = dims_c if dims_c is not None else as_ints(s)  # type: ignore[arg-type]
        return torch.full(dims, fill, dtype=dtype)

    return run


def _onnx_type(array: np.ndarray) -> int:
    import onnx

    return onnx.helper.np_dtype_to_tensor_dtype(array.dtype)


@register("Range", since=11)
def range_(ctx: Ctx) -> Fn:
    def run(start: torch.Tensor, limit: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        s, lim, d = start.item(), limit.item(), delta.item()
        n = max(math.ceil((lim - s) / d), 0)
        return (torch.arange(n, dtype=start.dtype if start.dtype.is_floating_point else torch.int64,
                             device=start.device) * d + s).to(start.dtype)

    return run


@register("NonZero", since=9)
def non_zero(ctx: Ctx) -> Fn:
    return lambda x: torch.nonzero(x).t().contiguous() if x.dim() else torch.nonzero(x.reshape(1)).t()[:0]


@register("OneHot", since=9)
def one_hot(ctx: Ctx) -> Fn:
    ax = int(ctx.attr("axis", -1))

    def run(idx: torch.Tensor, depth: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        d = int(depth.reshape(-1)[0].item())
        i = idx.long()
        i = torch.where(i < 0, i + d, i)
        valid = (i >= 0) & (i < d)
        hot = F.one_hot(torch.where(valid, i, torch.zeros_like(i)), d) * valid.unsqueeze(-1)
        out = torch.where(hot.bool(), values[1], values[0])
        return out.movedim(-1, axis(ax, idx.dim() + 1))

    return run


@register("Trilu", since=14)
def trilu(ctx: Ctx) -> Fn:
    upper = int(ctx.attr("upper", 1))

    def run(x: torch.Tensor, k: torch.Tensor | None = None) -> torch.Tensor:
        kk = int(k.item()) if k is not None else 0
        return torch.triu(x, kk) if upper else torch.tril(x, kk)

    return run


@register("EyeLike", since=9)
def eye_like(ctx: Ctx) -> Fn:
    k = int(ctx.attr("k", 0))
    dtype_attr = ctx.attr("dtype")

    def run(x: torch.Tensor) -> torch.Tensor:
        dtype = ctx.dtype(dtype_attr) if dtype_attr is not None else x.dtype
        n, m = x.shape
        return _eye(n, m, k, dtype, x.device)

    return run


def _eye(n: int, m: int, k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    rows = torch.arange(n, device=device).unsqueeze(1)
    cols = torch.arange(m, device=device).unsqueeze(0)
    return (cols - rows == k).to(dtype)


@register("Compress", since=9)
def compress(ctx: Ctx) -> Fn:
    ax = ctx.attr("axis")

    def run(x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        keep = torch.nonzero(cond.reshape(-1)).reshape(-1).to(x.device)
        if ax is None:
            flat = x.reshape(-1)
            return flat.index_select(0, keep[keep < flat.numel()])
        a = axis(ax, x.dim())
        return x.index_select(a, keep[keep < x.shape[a]])

    return run


@register("ReverseSequence", since=10)
def reverse_sequence(ctx: Ctx) -> Fn:
    batch_axis, time_axis = int(ctx.attr("batch_axis", 1)), int(ctx.attr("time_axis", 0))

    def run(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        t = x.shape[time_axis]
        pos = torch.arange(t, device=x.device).unsqueeze(1)
        lens = lengths.to(x.device).long().unsqueeze(0)
        src = torch.where(pos < lens, lens - 1 - pos, pos)  # [time, batch]
        xt = x.movedim((time_axis, batch_axis), (0, 1))
        idx = src.reshape(*src.shape, *([1] * (xt.dim() - 2))).expand(xt.shape)
        return torch.gather(xt, 0, idx).movedim((0, 1), (time_axis, batch_axis))

    return run
