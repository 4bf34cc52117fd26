"""Parameter and FLOP counts of a dense layer and of its replacements (pure arithmetic).

FLOPs are 2 x multiply-accumulates at the plan's shape basis (dynamic dims from `--dim`, else 1).
The counts follow exactly the nodes `factorize` emits, so the guard ("never factorise a layer
that would not get smaller and cheaper") compares like with like.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnx_inher.ir.layers import LayerView


@dataclass(frozen=True)
class Cost:
    params: int
    flops: int


def _bias(view: LayerView) -> int:
    """Bias params as stored (a Gemm's scalar C is one param, broadcast over the outputs)."""
    if view.bias is None:
        return 0
    return int(view.attrs.get("c_size", view.bias.size))  # type: ignore[call-overload]


def _k(view: LayerView) -> int:
    return int(np.prod(view.kernel)) if view.kernel else 1


def dense(view: LayerView) -> Cost:
    g, o, i = view.groups, view.out_features, view.in_features
    macs = g * o * i * (view.in_rows if view.op == "ConvTranspose" else view.rows)
    return Cost(g * o * i + _bias(view), 2 * macs)


def pair(view: LayerView, rank: int) -> Cost:
    """Down (x -> r) then up (r -> out, with the bias)."""
    g, o, i = view.groups, view.out_features, view.in_features
    if view.kernel_up:  # 1x1 down at the input's pixels, then the k x k up at the output's
        o_k, c_in = view.matrix_dims
        return Cost(rank * (c_in + o_k) + _bias(view), 2 * (view.in_rows * rank * c_in + view.rows * rank * o_k))
    if view.op == "ConvTranspose":
        macs = view.in_rows * g * rank * i + view.rows * g * rank * o
    else:
        macs = view.rows * g * rank * (i + o)
    return Cost(g * rank * (i + o) + _bias(view) - _scale_taken(view), 2 * macs)


def _scale_taken(view: LayerView) -> int:
    """The per-channel scales a channels-first pair folds into its up-projection (`view.channels_first`, only
    ever found on a right-side MatMul): the Muls' own copies go."""
    return view.channels_first.scale_params if view.channels_first is not None else 0


def heads(view: LayerView, rank: int, h: int, head_form: str | None = None) -> Cost:
    """Shared down, h up-projection heads and a softmax gate (see passes/factorize.py for the graph).

    Per-token gate (MatMul/Gemm): one fused up-projection r -> h*out, then the gated sum.
    Per-sample gate (Conv): the gate mixes the heads' weights, then one r -> out product per pixel;
    in the constant-weight `conv` form, one h*r -> out 1x1 conv per pixel instead (same params).
    """
    g, o, i = view.groups, view.out_features, view.in_features
    r = g * rank
    bias = h * (int(view.bias.size) if view.bias is not None else 0) + _taken_over(view, h, head_form)
    gate_params = r * h + h
    if view.op in ("MatMul", "Gemm"):
        per_row = i * rank + h * rank * o + rank * h + h * o
        return Cost(i * rank + h * rank * o + gate_params + bias, 2 * view.rows * per_row)
    down = (view.in_rows * g * rank * i) if view.op == "ConvTranspose" else view.rows * g * rank * i
    apply = view.rows * g * rank * o
    mix = view.batch * (h * g * o * rank + h * g * o + r * h)
    if head_form == "conv":  # no weight mix; the 1x1 conv reads all h scaled copies of the rank features
        apply, mix = view.rows * h * g * rank * o, view.batch * (h * g * o + r * h)
    pool = view.rows * r
    return Cost(g * rank * i + h * g * o * rank + gate_params + bias, 2 * (down + apply + mix) + pool)


def _taken_over(view: LayerView, h: int, head_form: str | None) -> int:
    """Params mixed conv heads add by taking over the bias Add after the conv (`view.trailing_bias`): every
    head stores the vector, and the Add's own copy goes."""
    if view.trailing_bias is None or view.op not in ("Conv", "ConvTranspose") \
            or (head_form == "conv" and view.op == "Conv" and view.groups == 1):
        return 0
    return (h - 1) * int(view.trailing_bias.size)


def split(view: LayerView, dense_classes: int, rank: int) -> Cost:
    """A class-split head (right-side MatMul/Gemm): `dense_classes` output columns kept as they are, the others
    through a rank-`rank` pair whose up-projection spans all `out` classes (the kept ones are zero columns
    that the scatter overwrites: stored, so counted); the scatter moves data, no MACs. When it takes the bias
    over (`view.split_takes_bias`), the kept classes store theirs and the pair one more rank, a constant-1
    feature (its down column, its offset, its up row), and a bias Add after the layer goes with its copy."""
    i, o, k = view.in_features, view.out_features, dense_classes
    r = rank + 1 if view.split_takes_bias else rank
    per_row = i * k + r * (i + o)
    if not view.split_takes_bias:
        return Cost(per_row + _bias(view), 2 * view.rows * per_row)
    gone = o if view.trailing_bias is not None else 0
    return Cost(per_row + k + r - gone, 2 * view.rows * per_row)


def after(view: LayerView, rank: int, h: int, head_form: str | None = None) -> Cost:
    if view.kernel_up and h > 1:
        raise ValueError(f"{view.node}: heads keep the kernel on the down side")
    return pair(view, rank) if h <= 1 else heads(view, rank, h, head_form)


def breakeven_rank(view: LayerView, h: int) -> float:
    """Largest rank (exclusive) at which h heads still have fewer weights: in*out/(in + h*out)."""
    o, i = view.matrix_dims
    return i * o / (i + max(h, 1) * o)
