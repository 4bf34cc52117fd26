"""Neural-network layers: convolutions, normalisation, pooling, activations, softmax, resize.

Exported graphs are inference graphs, so BatchNormalization always uses its stored statistics and
Dropout is the identity, whatever `module.train()` says: a training step never changes what the
graph computes (only the weights change).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from onnx_inher.bridge.ops.common import axis, pairs
from onnx_inher.bridge.registry import Ctx, Fn, register

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _same_pads(size: Sequence[int], kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int],
               upper: bool) -> list[int]:
    """Explicit ONNX pads `[b..., e...]` for auto_pad SAME_UPPER/SAME_LOWER on input `size`."""
    begins, ends = [], []
    for n, k, s, d in zip(size, kernel, strides, dilations, strict=True):
        out = -(-n // s)
        total = max((out - 1) * s + (k - 1) * d + 1 - n, 0)
        small, big = total // 2, total - total // 2
        begins.append(small if upper else big)
        ends.append(big if upper else small)
    return begins + ends


class _Window:
    """Kernel, strides, dilations and padding of a conv or pool node (auto_pad resolved per input)."""

    def __init__(self, ctx: Ctx, kernel: Sequence[int] | None):
        self.auto_pad = ctx.attr("auto_pad", "NOTSET")
        self.kernel = list(kernel) if kernel is not None else None
        n = len(self.kernel) if self.kernel is not None else None
        self.strides = ctx.attr("strides") or ([1] * n if n else None)
        self.dilations = ctx.attr("dilations") or ([1] * n if n else None)
        self.pads = ctx.attr("pads")

    def resolve(self, x: torch.Tensor, kernel: Sequence[int]) -> tuple[list[int], list[int], list[int]]:
        n = len(kernel)
        strides = list(self.strides or [1] * n)
        dilations = list(self.dilations or [1] * n)
        if self.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            pads = _same_pads(list(x.shape[2:]), kernel, strides, dilations, self.auto_pad == "SAME_UPPER")
        elif self.auto_pad == "VALID" or not self.pads:
            pads = [0] * (2 * n)
        else:
            pads = list(self.pads)
        return strides, dilations, pads


def _symmetric(pads: Sequence[int]) -> bool:
    n = len(pads) // 2
    return list(pads[:n]) == list(pads[n:])


@register("Conv")
def conv(ctx: Ctx) -> Fn:
    window = _Window(ctx, ctx.attr("kernel_shape"))
    group = int(ctx.attr("group", 1))

    def run(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        kernel = list(w.shape[2:])
        strides, dilations, pads = window.resolve(x, [(k - 1) + 1 for k in kernel])
        n = len(kernel)
        if _symmetric(pads):
            padding: list[int] | int = pads[:n]
        else:
            x = F.pad(x, pairs(pads))
            padding = 0
        return CONV[n](x, w, b, strides, padding, dilations, group)

    return run


@register("ConvInteger", since=10)
def conv_integer(ctx: Ctx) -> Fn:
    """int32 convolution of zero-point-shifted uint8/int8 operands, exact: computed in float64, where
    every product and partial sum of 8-bit values is an integer below 2**53. Padding is the input's zero
    point (0 after the shift), as ONNX Runtime pads."""
    window = _Window(ctx, ctx.attr("kernel_shape"))
    group = int(ctx.attr("group", 1))

    def run(x: torch.Tensor, w: torch.Tensor, zx: torch.Tensor | None = None,
            zw: torch.Tensor | None = None) -> torch.Tensor:
        xd, wd = x.to(torch.float64), w.to(torch.float64)
        if zx is not None:
            xd = xd - zx.to(torch.float64).reshape(())
        if zw is not None:
            zwd = zw.to(torch.float64)
            wd = wd - (zwd.reshape(-1, *[1] * (w.dim() - 1)) if zwd.numel() > 1 else zwd.reshape(()))
        kernel = list(w.shape[2:])
        strides, dilations, pads = window.resolve(xd, kernel)
        n = len(kernel)
        if _symmetric(pads):
            padding: list[int] | int = pads[:n]
        else:
            xd = F.pad(xd, pairs(pads))
            padding = 0
        return CONV[n](xd, wd, None, strides, padding, dilations, group).round().to(torch.int32)

    return run


@register("ConvTranspose")
def conv_transpose(ctx: Ctx) -> Fn:
    group = int(ctx.attr("group", 1))
    auto_pad = ctx.attr("auto_pad", "NOTSET")
    attr_pads = ctx.attr("pads")
    output_padding = ctx.attr("output_padding")
    output_shape = ctx.attr("output_shape")
    strides_attr, dilations_attr = ctx.attr("strides"), ctx.attr("dilations")

    def run(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        n = w.dim() - 2
        kernel = list(w.shape[2:])
        strides = list(strides_attr or [1] * n)
        dilations = list(dilations_attr or [1] * n)
        out_pad = list(output_padding or [0] * n)
        size = list(x.shape[2:])
        full = [(size[i] - 1) * strides[i] + out_pad[i] + (kernel[i] - 1) * dilations[i] + 1 for i in range(n)]
        if output_shape:
            target = list(output_shape)[-n:]
            total = [full[i] - target[i] for i in range(n)]
            upper = auto_pad == "SAME_UPPER"
            pads = [t // 2 if upper else t - t // 2 for t in total] + [t - t // 2 if upper else t // 2 for t in total]
        elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            total = [full[i] - size[i] * strides[i] for i in range(n)]
            upper = auto_pad == "SAME_UPPER"
            pads = [t // 2 if upper else t - t // 2 for t in total] + [t - t // 2 if upper else t // 2 for t in total]
        else:
            pads = list(attr_pads or [0] * (2 * n))
        y = CONV_T[n](x, w, b, strides, 0, out_pad, group, dilations)
        crop = [slice(None), slice(None)]
        for i in range(n):
            begin, end = pads[i], pads[i + n]
            if begin < 0 or end < 0:
                y = F.pad(y, [0, 0] * (n - 1 - i) + [max(-begin, 0), max(-end, 0)])
                begin, end = max(begin, 0), max(end, 0)
            crop.append(slice(begin, y.shape[2 + i] - end))
        return y[tuple(crop)]

    return run


def _channel_shape(x: torch.Tensor) -> list[int]:
    return [1, -1] + [1] * (x.dim() - 2)


@register("BatchNormalization")
def batch_norm(ctx: Ctx) -> Fn:
    eps = float(ctx.attr("epsilon", 1e-5))
    outputs = len([o for o in ctx.node.output if o])

    ctx.statistic(3)
    ctx.statistic(4)
    momentum = float(ctx.attr("momentum", 0.9))
    batch_stats = bool(ctx.attr("training_mode", 0))  # only when the graph itself says so (opset 14+)

    def run(x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor,
            var: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if batch_stats:
            dims = [0, *range(2, x.dim())]
            shape = _channel_shape(x)
            m, v = x.mean(dims), x.var(dims, unbiased=False)
            y = (x - m.reshape(shape)) / torch.sqrt(v.reshape(shape) + eps) * scale.reshape(shape) + \
                bias.reshape(shape)
            return (y, mean * momentum + m * (1 - momentum), var * momentum + v * (1 - momentum))[:outputs]
        # Stored statistics (inference graph): training=False regardless of module.train().
        y = F.batch_norm(x, mean, var, scale, bias, False, 0.0, eps)
        return y if outputs == 1 else (y, mean, var)[:max(outputs, 1)]

    return run


@register("InstanceNormalization", since=6)
def instance_norm(ctx: Ctx) -> Fn:
    eps = float(ctx.attr("epsilon", 1e-5))
    return lambda x, scale, bias: F.instance_norm(x, weight=scale, bias=bias, eps=eps)


@register("LayerNormalization", since=17)
def layer_norm(ctx: Ctx) -> Fn:
    ax = int(ctx.attr("axis", -1))
    eps = float(ctx.attr("epsilon", 1e-5))
    extra = len([o for o in ctx.node.output if o]) > 1

    def run(x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> object:
        a = axis(ax, x.dim())
        shape = list(x.shape[a:])
        if not extra and list(scale.shape) == shape and (bias is None or list(bias.shape) == shape):
            return F.layer_norm(x, shape, scale, bias, eps)
        dims = tuple(range(a, x.dim()))
        xf = x.float()
        mean = xf.mean(dims, keepdim=True)
        inv = torch.rsqrt(((xf - mean) ** 2).mean(dims, keepdim=True) + eps)
        y = ((xf - mean) * inv).to(x.dtype) * scale
        if bias is not None:
            y = y + bias
        return (y, mean, inv)

    return run


@register("GroupNormalization", since=18)
def group_norm(ctx: Ctx) -> Fn:
    eps = float(ctx.attr("epsilon", 1e-5))
    groups = int(ctx.attr("num_groups"))
    per_channel = ctx.opset >= 21

    def run(x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        if per_channel:
            return F.group_norm(x, groups, scale, bias, eps)
        n, c = x.shape[0], x.shape[1]
        y = F.group_norm(x, groups, None, None, eps).reshape(n, groups, c // groups, *x.shape[2:])
        shape = [1, groups] + [1] * (y.dim() - 2)
        return (y * scale.reshape(shape) + bias.reshape(shape)).reshape(x.shape)

    return run


@register("LRN")
def lrn(ctx: Ctx) -> Fn:
    size = int(ctx.attr("size"))
    alpha, beta, bias = float(ctx.attr("alpha", 1e-4)), float(ctx.attr("beta", 0.75)), float(ctx.attr("bias", 1.0))

    def run(x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[0], x.shape[1]
        sq = (x * x).reshape(n, 1, c, -1)
        sq = F.pad(sq, (0, 0, (size - 1) // 2, size - 1 - (size - 1) // 2))
        summed = (F.avg_pool2d(sq, (size, 1), stride=1) * size).reshape(x.shape)
        return x / (bias + alpha / size * summed) ** beta

    return run


@register("Dropout")
def dropout(ctx: Ctx) -> Fn:
    outputs = len([o for o in ctx.node.output if o])
    if outputs == 1:
        return lambda x, *_: x
    return lambda x, *_: (x, torch.ones_like(x, dtype=torch.bool))


def _pool_pad(x: torch.Tensor, pads: list[int], value: float) -> torch.Tensor:
    return F.pad(x, pairs(pads), value=value)


def _ceil_extra(size: Sequence[int], kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int],
                pads: Sequence[int]) -> list[int]:
    """Extra end padding so floor-mode pooling gives ceil-mode's output size (ONNX's ceil rule)."""
    n = len(kernel)
    extra = []
    for i in range(n):
        eff = (kernel[i] - 1) * dilations[i] + 1
        span = size[i] + pads[i] + pads[i + n] - eff
        out = -(-span // strides[i]) + 1
        if (out - 1) * strides[i] >= size[i] + pads[i]:
            out -= 1
        extra.append(max((out - 1) * strides[i] + eff - (size[i] + pads[i] + pads[i + n]), 0))
    return extra


MAXPOOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
AVGPOOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


@register("MaxPool")
def max_pool(ctx: Ctx) -> Fn:
    kernel = list(ctx.attr("kernel_shape"))
    window = _Window(ctx, kernel)
    ceil = bool(ctx.attr("ceil_mode", 0))
    want_indices = len([o for o in ctx.node.output if o]) > 1
    storage_order = int(ctx.attr("storage_order", 0))
    n = len(kernel)

    def run(x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        strides, dilations, pads = window.resolve(x, kernel)
        size = list(x.shape[2:])
        simple = _symmetric(pads) and all(pads[i] * 2 <= (kernel[i] - 1) * dilations[i] + 1 for i in range(n))
        if not want_indices and (simple and (not ceil or True)):
            return MAXPOOL[n](x, kernel, strides, pads[:n], dilations, ceil_mode=ceil)
        if ceil:
            extra = _ceil_extra(size, kernel, strides, dilations, pads)
            pads = pads[:n] + [pads[n + i] + extra[i] for i in range(n)]
        padded = _pool_pad(x, pads, float("-inf")) if any(pads) else x
        if not want_indices:
            return MAXPOOL[n](padded, kernel, strides, 0, dilations)
        y, idx = MAXPOOL[n](padded, kernel, strides, 0, dilations, return_indices=True)
        return y, _onnx_indices(idx, x, padded, pads, n, storage_order)

    return run


def _onnx_indices(idx: torch.Tensor, x: torch.Tensor, padded: torch.Tensor, pads: list[int], n: int,
                  storage_order: int) -> torch.Tensor:
    """torch's per-channel flat indices into the padded input -> ONNX's flat indices into the input."""
    psize = list(padded.shape[2:])
    size = list(x.shape[2:])
    coords = []
    rest = idx
    for i in reversed(range(n)):
        coords.append(rest % psize[i] - pads[i])
        rest = rest // psize[i]
    coords.reverse()
    flat = torch.zeros_like(idx)
    order = range(n) if not storage_order else reversed(range(n))
    for i in order:
        flat = flat * size[i] + coords[i]
    spatial = math.prod(size)
    nc = torch.arange(x.shape[0] * x.shape[1], device=x.device).reshape(x.shape[0], x.shape[1], *([1] * n))
    return (flat + nc * spatial).to(torch.int64)


@register("AveragePool")
def average_pool(ctx: Ctx) -> Fn:
    kernel = list(ctx.attr("kernel_shape"))
    window = _Window(ctx, kernel)
    ceil = bool(ctx.attr("ceil_mode", 0))
    include = bool(ctx.attr("count_include_pad", 0))
    n = len(kernel)

    def run(x: torch.Tensor) -> torch.Tensor:
        strides, dilations, pads = window.resolve(x, kernel)
        if all(d == 1 for d in dilations) and _symmetric(pads) and all(pads[i] * 2 <= kernel[i] for i in range(n)) \
                and (include or not any(pads)) and not (ceil and include and any(pads)):
            return AVGPOOL[n](x, kernel, strides, pads[:n], ceil_mode=ceil, count_include_pad=include)
        size = list(x.shape[2:])
        extra = _ceil_extra(size, kernel, strides, dilations, pads) if ceil else [0] * n
        ones = torch.ones((1, 1, *size), dtype=x.dtype, device=x.device)
        mask = _pool_pad(ones, pads, 1.0 if include else 0.0)
        ends = pairs([0] * n + extra)
        xp, mask = F.pad(_pool_pad(x, pads, 0.0), ends), F.pad(mask, ends)
        weight = torch.ones((1, 1, *kernel), dtype=x.dtype, device=x.device)
        c = x.shape[1]
        total = CONV[n](xp, weight.expand(c, 1, *kernel), None, strides, 0, dilations, c)
        count = CONV[n](mask, weight, None, strides, 0, dilations)
        return total / count

    return run


@register("LpPool", since=2)
def lp_pool(ctx: Ctx) -> Fn:
    kernel = list(ctx.attr("kernel_shape"))
    window = _Window(ctx, kernel)
    p = float(ctx.attr("p", 2))
    ceil = bool(ctx.attr("ceil_mode", 0))
    n = len(kernel)

    def run(x: torch.Tensor) -> torch.Tensor:
        strides, dilations, pads = window.resolve(x, kernel)
        extra = _ceil_extra(list(x.shape[2:]), kernel, strides, dilations, pads) if ceil else [0] * n
        xp = F.pad(_pool_pad(x.abs() ** p, pads, 0.0), pairs([0] * n + extra))
        c = x.shape[1]
        weight = torch.ones((c, 1, *kernel), dtype=x.dtype, device=x.device)
        return CONV[n](xp, weight, None, strides, 0, dilations, c) ** (1.0 / p)

    return run


@register("GlobalAveragePool")
def global_average_pool(ctx: Ctx) -> Fn:
    return lambda x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


@register("GlobalMaxPool")
def global_max_pool(ctx: Ctx) -> Fn:
    return lambda x: x.amax(dim=tuple(range(2, x.dim())), keepdim=True)


@register("GlobalLpPool", since=2)
def global_lp_pool(ctx: Ctx) -> Fn:
    p = float(ctx.attr("p", 2))
    return lambda x: (x.abs() ** p).sum(dim=tuple(range(2, x.dim())), keepdim=True) ** (1.0 / p)


def _flat_softmax(fn: Fn, ctx: Ctx) -> Fn:
    """Opset < 13: coerce to 2-D at `axis` (default 1), apply on the last dim, restore the shape."""
    ax = int(ctx.attr("axis", 1))

    def run(x: torch.Tensor) -> torch.Tensor:
        a = axis(ax, x.dim())
        flat = x.reshape(math.prod(x.shape[:a]), -1)
        return fn(flat, -1).reshape(x.shape)

    return run


def _hardmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    return F.one_hot(x.argmax(dim), x.shape[dim]).movedim(-1, dim).to(x.dtype)


for _op, _fn in (("Softmax", F.softmax), ("LogSoftmax", F.log_softmax), ("Hardmax", _hardmax)):
    def _old(ctx: Ctx, fn: Fn = _fn) -> Fn:
        return _flat_softmax(fn, ctx)

    def _new(ctx: Ctx, fn: Fn = _fn) -> Fn:
        ax = int(ctx.attr("axis", -1))
        return lambda x: fn(x, ax)

    register(_op, since=1, until=12)(_old)
    register(_op, since=13)(_new)


@register("Flatten")
def flatten(ctx: Ctx) -> Fn:
    ax = int(ctx.attr("axis", 1))

    def run(x: torch.Tensor) -> torch.Tensor:
        a = axis(ax, x.dim())
        return x.reshape(math.prod(x.shape[:a]), math.prod(x.shape[a:]))

    return run


@register("LeakyRelu")
def leaky_relu(ctx: Ctx) -> Fn:
    alpha = float(ctx.attr("alpha", 0.01))
    return lambda x: F.leaky_relu(x, alpha)


@register("Elu")
def elu(ctx: Ctx) -> Fn:
    alpha = float(ctx.attr("alpha", 1.0))
    return lambda x: F.elu(x, alpha)


@register("Celu", since=12)
def celu(ctx: Ctx) -> Fn:
    alpha = float(ctx.attr("alpha", 1.0))
    return lambda x: F.celu(x, alpha)


@register("Selu")
def selu(ctx: Ctx) -> Fn:
    alpha = float(ctx.attr("alpha", 1.67326319217681884765625))
    gamma = float(ctx.attr("gamma", 1.05070102214813232421875))
    return lambda x: gamma * torch.where(x > 0, x, alpha * (torch.exp(x) - 1))


@register("HardSigmoid")
def hard_sigmoid(ctx: Ctx) -> Fn:
    alpha, beta = float(ctx.attr("alpha", 0.2)), float(ctx.attr("beta", 0.5))
    return lambda x: torch.clamp(alpha * x + beta, 0.0, 1.0)


@register("HardSwish", since=14)
def hard_swish(ctx: Ctx) -> Fn:
    return F.hardswish


@register("Softplus")
def softplus(ctx: Ctx) -> Fn:
    return lambda x: torch.where(x > 20, x, torch.log1p(torch.exp(x)))


@register("ThresholdedRelu", since=10)
def thresholded_relu(ctx: Ctx) -> Fn:
    alpha = float(ctx.attr("alpha", 1.0))
    return lambda x: torch.where(x > alpha, x, torch.zeros_like(x))


@register("Shrink", since=9)
def shrink(ctx: Ctx) -> Fn:
    bias, lambd = float(ctx.attr("bias", 0.0)), float(ctx.attr("lambd", 0.5))
    return lambda x: torch.where(x < -lambd, x + bias, torch.where(x > lambd, x - bias, torch.zeros_like(x)))


@register("PRelu")
def prelu(ctx: Ctx) -> Fn:
    return lambda x, slope: torch.where(x >= 0, x, x * slope)


@register("Gelu", since=20)
def gelu(ctx: Ctx) -> Fn:
    approximate = ctx.attr("approximate", "none")
    return lambda x: F.gelu(x, approximate=approximate)


@register("LpNormalization")
def lp_normalization(ctx: Ctx) -> Fn:
    ax, p = int(ctx.attr("axis", -1)), int(ctx.attr("p", 2))
    def run(x: torch.Tensor) -> torch.Tensor:
        norm = torch.linalg.vector_norm(x, ord=p, dim=ax, keepdim=True)
        return torch.where(norm == 0, torch.zeros_like(x), x / norm)

    return run


@register("MeanVarianceNormalization", since=9)
def mean_variance_normalization(ctx: Ctx) -> Fn:
    axes = tuple(ctx.attr("axes", [0, 2, 3]))

    def run(x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(axes, keepdim=True)
        var = ((x - mean) ** 2).mean(axes, keepdim=True)
        return (x - mean) / (torch.sqrt(var) + 1e-9)

    return run


@register("DepthToSpace")
def depth_to_space(ctx: Ctx) -> Fn:
    b = int(ctx.attr("blocksize"))
    crd = ctx.attr("mode", "DCR") == "CRD"

    def run(x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if crd:
            y = x.reshape(n, c // (b * b), b, b, h, w).permute(0, 1, 4, 2, 5, 3)
        else:
            y = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
        return y.reshape(n, c // (b * b), h * b, w * b)

    return run


@register("SpaceToDepth")
def space_to_depth(ctx: Ctx) -> Fn:
    b = int(ctx.attr("blocksize"))
    crd = ctx.attr("mode", "DCR") == "CRD"

    def run(x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        y = x.reshape(n, c, h // b, b, w // b, b)
        y = y.permute(0, 1, 3, 5, 2, 4) if crd else y.permute(0, 3, 5, 1, 2, 4)
        return y.reshape(n, c * b * b, h // b, w // b)

    return run


@register("RMSNormalization", since=23)
def rms_normalization(ctx: Ctx) -> Fn:
    ax = int(ctx.attr("axis", -1))
    eps = float(ctx.attr("epsilon", 1e-5))

    def run(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(axis(ax, x.dim()), x.dim()))
        xf = x.float()
        y = xf * torch.rsqrt((xf * xf).mean(dims, keepdim=True) + eps)
        return y.to(x.dtype) * scale

    return run


@register("Swish", since=24)
def swish(ctx: Ctx) -> Fn:
    alpha = float(ctx.attr("alpha", 1.0))
    return lambda x: x * torch.sigmoid(alpha * x)


GRID_MODES = {"linear": "bilinear", "bilinear": "bilinear", "nearest": "nearest", "cubic": "bicubic",
              "bicubic": "bicubic"}


@register("GridSample", since=16)
def grid_sample(ctx: Ctx) -> Fn:
    mode = GRID_MODES[ctx.attr("mode", "linear" if ctx.opset >= 20 else "bilinear")]
    padding = ctx.attr("padding_mode", "zeros")
    align = bool(ctx.attr("align_corners", 0))
    return lambda x, grid: F.grid_sample(x, grid.to(x.dtype), mode=mode, padding_mode=padding, align_corners=align)
