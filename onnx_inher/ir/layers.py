"""`LayerView`: one dense layer seen as per-group matrices, whatever op and layout it came from.

Every factoriser works on the canonical form `y = M x` with `M` of shape `[groups, out, in]`
(`in` includes the kernel window for convolutions), so SVD, rank policies and cost accounting
are written once for MatMul, Gemm, Conv and ConvTranspose.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from onnx_inher.ir.shapes import Dim

Side = str  # "right": y = x @ W ; "left": y = W @ x


@dataclass(frozen=True)
class ChannelsFirst:
    """The Transpose back to channels-first that alone reads a channels-last linear layer's output (after its
    bias Add, if any), and the constant per-channel scales on either side of it, if any: ConvNeXt's MLP
    (`Linear` on `[N, H, W, C]`, `permute(0, 3, 1, 2)`, a layer scale before the permute (Hugging Face) or
    after it (torchvision, timm)). A plain pair writes them as a Transpose of its narrow rank features and a
    1x1 Conv (`passes/factorize.py`, `_up_channels_first`)."""

    perm: tuple[int, ...]
    output: str  # what the replacement writes: the last taken node's output
    taken: tuple[str, ...]  # outputs of the nodes it replaces after the bias Add: scale Mul(s) and Transpose
    scale: np.ndarray | None = None  # one float per output channel: the product of the scales taken
    scale_params: int = 0  # what the file loses with the Muls: their scales' sizes, less those other nodes read


@dataclass
class LayerView:
    node: str
    op: str
    node_index: int
    output: str
    weight_input: int
    weight_root: str
    weight_chain: tuple[str, ...]
    weight: np.ndarray
    side: Side
    groups: int
    out_features: int
    in_features: int
    kernel: tuple[int, ...]
    bias: np.ndarray | None
    rows: int
    in_rows: int
    batch: int
    act_rank: int | None
    out_dims: tuple[Dim, ...] | None
    attrs: dict[str, object] = field(default_factory=dict)
    shared_key: str = ""
    other_users: tuple[str, ...] = ()
    # where the node lives: "" for the main graph, else its subgraph's path (`ir.graph.walk_scopes`);
    # `node_index` indexes that graph's nodes
    scope: str = ""
    # a bias written as a separate Add (Paddle's convs, torch/Paddle Linear as MatMul + Add): the constant
    # vector (one per output channel or class) of the Add that alone reads the layer's output, and that Add's
    # output; mixed conv heads and class-split heads take it over
    trailing_bias: np.ndarray | None = None
    trailing_add: str = ""
    # a right-side MatMul on channels-last activations whose output goes back to channels-first
    channels_first: ChannelsFirst | None = None
    # a Conv seen with its kernel window on the output side (`kernel_up`): the pair it gives is a 1x1 conv
    # C_in -> r, then a k x k conv r -> C_out with every original attribute
    kernel_up: bool = False

    @property
    def split_takes_bias(self) -> bool:
        """Whether a class-split head takes the layer's bias into itself (`passes.factorize.split_bias`): a
        Gemm's C when it is one value per class, else the bias Add after the layer (`trailing_bias`)."""
        if self.op == "Gemm" and self.attrs.get("c"):
            return self.bias is not None and self.attrs.get("c_size") == self.out_features
        return self.trailing_bias is not None

    @property
    def dtype(self) -> np.dtype:
        return self.weight.dtype

    @property
    def full_rank(self) -> int:
        return min(self.matrix_dims)

    @property
    def window(self) -> int:
        """Taps of the kernel window (1 for MatMul/Gemm)."""
        return int(np.prod(self.kernel)) if self.kernel else 1

    @property
    def matrix_dims(self) -> tuple[int, int]:
        """`(out, in)` of `matrices()`: the features, or for a `kernel_up` view `(C_out k, C_in)`."""
        if self.kernel_up:
            return self.out_features * self.window, self.in_features // self.window
        return self.out_features, self.in_features

    @property
    def base_key(self) -> str:
        """The teacher weight's `shared_key` (a `kernel_up` view's own key tells its spectrum apart)."""
        return self.shared_key.removesuffix(KERNEL_UP_KEY) if self.kernel_up else self.shared_key

    @property
    def weight_params(self) -> int:
        return int(self.weight.size)

    def matrices(self) -> np.ndarray:
        """Per-group matrices `[g, out, in]` in float32 (SVD precision, whatever the storage dtype)."""
        w = self.weight.astype(np.float32, copy=False)
        g, o, i = self.groups, self.out_features, self.in_features
        if self.kernel_up:  # [C_out, C_in, *k] -> [1, C_out k, C_in]
            return np.ascontiguousarray(np.moveaxis(w, 1, -1)).reshape(1, *self.matrix_dims)
        if self.op == "Conv":
            return w.reshape(g, o, i)
        if self.op == "ConvTranspose":
            cin_g = w.shape[0] // g
            k = int(np.prod(self.kernel))
            return w.reshape(g, cin_g, o, k).transpose(0, 2, 1, 3).reshape(g, o, i)
        scale = float(self.attrs.get("alpha", 1.0))
        if self.op == "Gemm":
            trans = bool(self.attrs.get("transB" if self.side == "right" else "transA", 0))
            w = w.T if trans else w
        m = w.T if self.side == "right" else w
        return (scale * m if scale != 1.0 else m).reshape(1, o, i)


KERNEL_UP = "kernel_up"  # `Candidate.orientation` of a conv pair whose k x k kernel is on the up side
KERNEL_UP_KEY = "|kernel_up"


def kernel_up_unsupported(view: LayerView) -> str | None:
    """Why a layer has no view with its kernel on the up side (`kernel_up`), or None: only an ungrouped Conv
    with a window of more than one tap reading more than one channel has a second orientation."""
    if view.op != "Conv" or view.groups != 1:
        return "not an ungrouped Conv"
    if view.window < 2:
        return "a 1x1 kernel has one orientation"
    if view.in_features // view.window < 2:
        return "one input channel"
    return None


def kernel_up(view: LayerView) -> LayerView:
    """The conv seen as `M' = [C_out k, C_in]` (`W.transpose(0, 2, 3, 1)`): its SVD gives a 1x1 down conv
    `C_in -> r` and a k x k up conv `r -> C_out` that keeps the layer's pads, strides and dilations.

    Why a second orientation: a rank-r pair with the kernel on the down side is a k x k conv with r outputs,
    and ONNX Runtime runs a conv with 16 outputs at about 0.6 of its FLOP rate; with the kernel on the up side
    the k x k conv has C_out outputs (0.73-0.78 at rank 16, `benchmarks/experiments/conv_orientation.py`).
    And on trained convs whose C_in exceeds C_out one SVD keeps far more energy than the other at the same
    params (PP-OCRv5's detector 96 -> 24 3x3 convs: 0.95-1.00 against 0.85-0.95)."""
    why = kernel_up_unsupported(view)
    if why is not None:
        raise ValueError(f"{view.node}: {why}")
    return replace(view, kernel_up=True, shared_key=view.shared_key + KERNEL_UP_KEY)


def oriented(view: LayerView, orientation: str | None) -> LayerView:
    """`view` as a plan entry's `orientation` factorises it."""
    return kernel_up(view) if orientation == KERNEL_UP and not view.kernel_up else view


def heads_unsupported(view: LayerView, opset: int) -> str | None:
    """Why gated heads cannot be emitted for this layer (it then gets a plain pair), or None."""
    if view.side == "left":
        return "weight on the left of the product: gated heads need a per-token gate; using a plain pair"
    if view.op == "MatMul" and view.act_rank is None:
        return "activation rank unknown after shape inference; using a plain pair"
    if view.op == "MatMul" and view.act_rank < 2:
        return "1-D activation (no token axis for the gate); using a plain pair"
    if view.op == "Gemm" and view.attrs.get("c") and view.bias is None:
        return "Gemm bias C is not a constant vector; using a plain pair"
    if view.op in ("Conv", "ConvTranspose"):
        spatial = view.out_dims[2:] if view.out_dims is not None else (None,)
        if not all(isinstance(d, int) for d in spatial) and opset < 10:
            return "dynamic spatial dims need opset >= 10 for the heads' reshape; using a plain pair"
    return None


def split_unsupported(view: LayerView, opset: int) -> str | None:
    """Why this layer cannot take the class-split form (dense columns for some outputs, a pair for the rest,
    a ScatterElements putting the kept ones in place; see passes/factorize.py), or None."""
    if view.op not in ("MatMul", "Gemm") or view.side != "right" or view.groups != 1 or view.scope:
        return "not a right-side MatMul/Gemm in the main graph"
    if view.other_users:
        return "its weight is shared with other nodes"
    if view.op == "Gemm" and view.attrs.get("c") and float(view.attrs.get("beta", 1.0)) != 1.0:  # type: ignore[arg-type]
        return "Gemm with beta != 1"
    if opset < 11:
        return "opset < 11 (no ScatterElements)"
    return None
