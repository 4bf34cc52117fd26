"""Loss ops that training graphs exported with their loss contain."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from onnx_inher.bridge.registry import Ctx, Fn, register


def _nll(log_prob: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, reduction: str,
         ignore_index: int | None) -> torch.Tensor:
    """ONNX NegativeLogLikelihoodLoss: mean divides by the summed weights of the non-ignored targets."""
    target = target.long()
    ignore = -100 if ignore_index is None else ignore_index
    if ignore_index is not None and weight is None:
        weight = torch.ones(log_prob.shape[1], dtype=log_prob.dtype, device=log_prob.device)
    if ignore_index is not None and 0 <= ignore_index < log_prob.shape[1]:
        # torch skips ignored targets by index; ONNX may name an in-range class: zero its weight instead.
        weight = weight.clone()  # type: ignore[union-attr]
        weight[ignore_index] = 0
        ignore = -100
    return F.nll_loss(log_prob, target, weight=weight, ignore_index=ignore, reduction=reduction)


@register("NegativeLogLikelihoodLoss", since=12)
def negative_log_likelihood_loss(ctx: Ctx) -> Fn:
    reduction, ignore = ctx.attr("reduction", "mean"), ctx.attr("ignore_index")
    return lambda x, t, w=None: _nll(x, t, w, reduction, ignore)


@register("SoftmaxCrossEntropyLoss", since=12)
def softmax_cross_entropy_loss(ctx: Ctx) -> Fn:
    reduction, ignore = ctx.attr("reduction", "mean"), ctx.attr("ignore_index")
    with_log_prob = len([o for o in ctx.node.output if o]) > 1

    def run(scores: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> object:
        log_prob = F.log_softmax(scores, dim=1)
        loss = _nll(log_prob, target, weight, reduction, ignore)
        return (loss, log_prob) if with_log_prob else loss

    return run
