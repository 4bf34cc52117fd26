"""ai.onnx.ml ops that appear after neural networks converted by skl2onnx."""

from __future__ import annotations

import torch

from onnx_inher.bridge.registry import ML_DOMAIN, Ctx, Fn, register


@register("ArrayFeatureExtractor", domain=ML_DOMAIN)
def array_feature_extractor(ctx: Ctx) -> Fn:
    """Select columns of the last axis: `x[..., indices]` (a 1-D input is treated as one row)."""

    def run(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        cols = idx.to(x.device).long().reshape(-1)
        out = x.index_select(x.dim() - 1, cols)
        return out.reshape(1, -1) if x.dim() == 1 else out

    return run
