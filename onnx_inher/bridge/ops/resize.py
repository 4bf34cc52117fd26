"""Resize and Upsample as separable per-axis resampling with gathers.

Every coordinate transformation, nearest rounding mode and interpolation of the ONNX spec maps onto
"source coordinate per output index, then a small weighted gather along that axis", which is exact for
all of them (F.interpolate covers only some combinations), antialiased downsampling included.
"""

from __future__ import annotations

import math

import torch

from onnx_inher.bridge.ops.common import as_ints
from onnx_inher.bridge.registry import Ctx, Fn, register


def _source(mode: str, out_len: int, in_len: int, scale: float, roi: tuple[float, float] | None,
            device: torch.device) -> torch.Tensor:
    i = torch.arange(out_len, dtype=torch.float64, device=device)
    if mode == "align_corners":
        out_w = scale * in_len
        return i * 0.0 if out_w == 1 else i * (in_len - 1) / (out_w - 1)
    if mode == "asymmetric":
        return i / scale
    if mode == "pytorch_half_pixel":
        return i * 0.0 - 0.5 if scale * in_len == 1 else (i + 0.5) / scale - 0.5
    if mode == "half_pixel":
        return (i + 0.5) / scale - 0.5
    if mode == "half_pixel_symmetric":
        adjustment = out_len / (scale * in_len)
        offset = in_len / 2 * (1 - adjustment)
        return offset + (i + 0.5) / scale - 0.5
    assert roi is not None  # tf_crop_and_resize
    start, end = roi
    out_w = scale * in_len
    if out_w == 1:
        return i * 0.0 + (end - start) * (in_len - 1) / 2 + start * (in_len - 1)
    return i * (end - start) * (in_len - 1) / (out_w - 1) + start * (in_len - 1)


def _nearest(x: torch.Tensor, rule: str) -> torch.Tensor:
    if rule == "floor":
        return torch.floor(x)
    if rule == "ceil":
        return torch.ceil(x)
    frac = x - torch.floor(x)
    half = frac == 0.5
    rounded = torch.floor(x + 0.5)
    if rule == "round_prefer_floor":
        return torch.where(half, torch.floor(x), rounded)
    return torch.where(half, torch.ceil(x), rounded)


def _cubic_kernel(d: torch.Tensor, a: float) -> torch.Tensor:
    d = d.abs()
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    return torch.where(d <= 1, near, torch.where(d < 2, far, torch.zeros_like(d)))


def _linear_kernel(d: torch.Tensor, a: float) -> torch.Tensor:
    return (1 - d.abs()).clamp(min=0)


class _Resampler:
    def __init__(self, mode: str, coord: str, nearest: str, cubic_a: float, exclude_outside: bool,
                 extrapolation: float, antialias: bool = False):
        self.mode, self.coord, self.nearest, self.antialias = mode, coord, nearest, antialias
        self.cubic_a, self.exclude_outside, self.extrapolation = cubic_a, exclude_outside, extrapolation

    def axis(self, x: torch.Tensor, dim: int, out_len: int, scale: float,
             roi: tuple[float, float] | None) -> torch.Tensor:
        in_len = x.shape[dim]
        src = _source(self.coord, out_len, in_len, scale, roi, x.device)
        if self.mode == "nearest":
            idx = _nearest(src, self.nearest).clamp(0, in_len - 1).long()
            y = x.index_select(dim, idx)
        else:
            # Taps floor(x)+o weighted by the kernel at (o - frac) * s; antialiased downsampling widens
            # the kernel by 1/scale (s = scale < 1), otherwise s = 1 (2 linear taps, 4 cubic taps).
            base = torch.floor(src)
            t = src - base
            s = min(scale, 1.0) if self.antialias else 1.0
            support, kernel = (1, _linear_kernel) if self.mode == "linear" else (2, _cubic_kernel)
            start = math.floor(-support / s) + 1
            offsets = range(start, 2 - start)
            coeffs = [kernel((o - t) * s, self.cubic_a) for o in offsets]
            taps = [base.long() + o for o in offsets]
            if self.exclude_outside:
                coeffs = [c * ((k >= 0) & (k < in_len)) for c, k in zip(coeffs, taps, strict=True)]
            total = sum(coeffs)
            coeffs = [c / total for c in coeffs]
            shape = [1] * x.dim()
            shape[dim] = out_len
            y = sum(x.index_select(dim, k.clamp(0, in_len - 1)) * c.to(x.dtype).reshape(shape)
                    for k, c in zip(taps, coeffs, strict=True))
        if self.coord == "tf_crop_and_resize":
            shape = [1] * x.dim()
            shape[dim] = out_len
            outside = ((src < 0) | (src > in_len - 1)).reshape(shape)
            y = torch.where(outside, torch.full_like(y, self.extrapolation), y)
        return y


def _sizes_from_scales(x: torch.Tensor, axes: list[int], scales: list[float]) -> list[int]:
    return [math.floor(x.shape[a] * s) for a, s in zip(axes, scales, strict=True)]


@register("Resize", since=10)
def resize(ctx: Ctx) -> Fn:
    mode = ctx.attr("mode", "nearest")
    coord = "asymmetric" if ctx.opset < 11 else ctx.attr("coordinate_transformation_mode", "half_pixel")
    nearest = ctx.attr("nearest_mode", "round_prefer_floor") if ctx.opset >= 11 else "round_prefer_floor"
    resampler = _Resampler(mode, coord, nearest, float(ctx.attr("cubic_coeff_a", -0.75)),
                           bool(ctx.attr("exclude_outside", 0)), float(ctx.attr("extrapolation_value", 0.0)),
                           bool(ctx.attr("antialias", 0)))
    axes_attr = ctx.attr("axes")
    policy = ctx.attr("keep_aspect_ratio_policy", "stretch")
    scales_index = 1 if ctx.opset < 11 else 2
    roi_c = ctx.const(1) if ctx.opset >= 11 else None
    scales_c, sizes_c = ctx.const(scales_index), ctx.const(3)

    def run(x: torch.Tensor, *args: torch.Tensor | None) -> torch.Tensor:
        rank = x.dim()
        axes = [a % rank for a in axes_attr] if axes_attr else list(range(rank))
        scales_t = scales_c if scales_c is not None else args[scales_index - 1]
        sizes_t = sizes_c if sizes_c is not None else (args[2] if len(args) > 2 else None)
        roi_t = roi_c if roi_c is not None else (args[0] if ctx.opset >= 11 and args else None)
        scales = [float(s) for s in torch.as_tensor(scales_t).reshape(-1).tolist()] \
            if scales_t is not None and torch.as_tensor(scales_t).numel() else None
        if scales is None:
            sizes = as_ints(torch.as_tensor(sizes_t))
            if policy != "stretch":
                pick = min if policy == "not_larger" else max
                s = pick(sizes[i] / x.shape[a] for i, a in enumerate(axes))
                sizes = [round(s * x.shape[a]) for a in axes]
                scales = [s] * len(axes)
            else:
                scales = [sizes[i] / x.shape[a] for i, a in enumerate(axes)]
        else:
            sizes = _sizes_from_scales(x, axes, scales)
        roi = [float(v) for v in torch.as_tensor(roi_t).reshape(-1).tolist()] \
            if roi_t is not None and torch.as_tensor(roi_t).numel() else None
        y = x
        for i, a in enumerate(axes):
            if sizes[i] == x.shape[a] and scales[i] == 1.0 and coord != "tf_crop_and_resize":
                continue
            pair = None
            if roi is not None:
                half = len(roi) // 2
                pair = (roi[i], roi[i + half])
            y = resampler.axis(y, a, sizes[i], scales[i], pair)
        return y

    return run


@register("Upsample", since=7, until=9)
def upsample(ctx: Ctx) -> Fn:
    mode = ctx.attr("mode", "nearest")
    resampler = _Resampler(mode, "asymmetric", "floor", -0.75, False, 0.0)
    scales_attr = ctx.attr("scales")
    scales_c = ctx.const(1)

    def run(x: torch.Tensor, scales_t: torch.Tensor | None = None) -> torch.Tensor:
        scales = list(scales_attr) if scales_attr else [float(s) for s in torch.as_tensor(
            scales_c if scales_c is not None else scales_t).reshape(-1).tolist()]
        y = x
        for a, s in enumerate(scales):
            if s != 1.0:
                y = resampler.axis(y, a, math.floor(x.shape[a] * s), s, None)
        return y

    return run
