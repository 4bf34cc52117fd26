"""factorize: replace planned dense layers by SVD-initialised factor subgraphs.

Two forms, chosen per layer by the plan's `heads`:

* pair (heads == 1, and every layer in `--mode svd`): down-projection `V_r^T` (for Conv a k x k conv
  C_in -> r keeping every attribute), then up-projection `U_r S_r` carrying the bias.
  A Conv pair whose plan entry has `orientation == "kernel_up"` carries the k x k kernel on the up side
  instead: a 1x1 conv C_in -> r, then a k x k conv r -> C_out keeping every attribute (`ir.layers.kernel_up`,
  the SVD of the weight as `[C_out k, C_in]`), where the plan found that side cheaper at its energy.
* heads (InherNet): the same shared down-projection, `h` up-projection heads and a softmax gate.
  - MatMul/Gemm, per-token gate: one fused up-projection r -> h*out, gate `softmax(z G + b)`,
    then the gated sum as a batched product `g[...,1,h] @ Y[...,h,out]`.
  - Conv/ConvTranspose, per-sample gate on the spatially mean-pooled r-features: since the gate
    is constant over pixels, `sum_i g_i (B_i z + b_i) = (sum_i g_i B_i) z + sum_i g_i b_i`; the gate
    mixes the heads' weights (h*out*r MACs per sample) and one r -> out product runs per pixel,
    instead of h up-projections per pixel. With the plan's `head_form == "conv"` (set by the latency check
    where it measures faster, ungrouped Conv only) the same function is emitted with constant weights:
    the gate scales h copies of the rank features, and one 1x1 conv `[out, h*r]` (the heads side by
    side) maps them to the output. h times the up-projection's MACs, but prepacked and in ONNX
    Runtime's blocked layout; without the check the form is always the weight mix (deterministic).
  Exact at initialisation: every head holds the full `U_r S_r` (and full bias) plus a zero-sum
  perturbation, and the gate weights are zero, so the gate is uniform and the heads' mean is
  exactly `U_r S_r`. Training can still separate the heads because the perturbations differ.

* fold (a Conv layer with the plan's `fold`, set by the latency check where it measures faster): the
  down conv's output rows are folded into the batch, `P` row slices of the (row-padded) input stacked on
  the batch axis, one conv, the `P` results put back in row order. The same MACs and outputs; ONNX Runtime
  runs one image's blocked conv with <= 64 output channels on one thread, and the folded batch spreads
  it over `P` (CREPE's 1024 -> 64 down conv on 2 threads: 5.4 -> 3.4 ms alone). Rows must be fixed in the
  model: the slices hard-code them.

* split (a classifier head with the plan's `dense_classes`): `y = ScatterElements((x D) U, kept, x W[:, kept])`.
  The classes the teacher uses on the calibration data keep their exact weight columns; the others go
  through a small rank-r pair whose up-projection spans every class (its kept columns are zeros that the
  scatter overwrites, so they never matter and get no gradient), and the scatter writes the kept classes'
  logits in place. Measured on the PP-OCRv5 recogniser's head (40 x 120 -> 18,385, 2 threads): 0.79 ms
  against 1.99 ms dense and 3.2 ms for a Concat + Gather that restores the class order (ORT's Gather on the
  last axis copies one float at a time). A per-class bias (a Gemm's C, or the constant Add that alone reads
  the layer's output) is taken into the head (`split_bias`): the kept logits add theirs, and the pair carries
  the others' as one more rank, a constant-1 feature whose up-projection row is the bias; the Add node goes,
  so the `[rows, classes]` logits are written once instead of written, then read and written again (the
  whole recogniser: 1.02x -> 1.04x at batch 1, 0.94x -> 0.96x at batch 32, benchmarks/RESULTS.md). The
  up-projection's logits are declared with every dim named (`Emitter.declare`; when shape inference does
  not know their rank, the scatter runs on `[rows, classes]` views, Reshapes that cost no copy), because ONNX
  Runtime lets the scatter overwrite its input only where it can prove the two the same size: before, it
  copied the whole logits first (the recogniser's scatter at batch 32: 20.5 -> 1.7 ms). At full rank of the
  other classes it is the teacher's layer.

Every created name derives from the replaced node (`<node>/svd/...` or `<node>/inher/...`); the
last created node writes the replaced node's output, so the rest of the graph is untouched (a split head
that took over its bias writes the bias Add's output instead, and that Add is removed).

Layers inside If/Loop/Scan subgraphs are replaced in place in their subgraph (the holding node is
copied, never the teacher edited). Their factors go where the weight lives: a weight read from the outer
scope gets its factors in that outer graph, so every branch that read the weight sees them, and one
weight shared by both branches of an If is factorised once. Node ids of subgraph layers carry their
scope path, which keeps the created names unique across the model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.unknown_fields import UnknownFieldSet
from onnx import GraphProto, ModelProto, NodeProto, TensorProto, ValueInfoProto, helper, numpy_helper
from tqdm import tqdm

from onnx_inher.errors import InputError, PassError
from onnx_inher.ir.graph import MAIN, child_paths, default_opset, subgraphs, walk_scopes
from onnx_inher.ir.io import copy_model, release_memory
from onnx_inher.ir.layers import ChannelsFirst, LayerView, oriented
from onnx_inher.ir.naming import factor_tag, node_ids
from onnx_inher.ir.shapes import Dim
from onnx_inher.ir.tensors import flush_negligible
from onnx_inher.planning.plan import Candidate, Plan, Spectra, channels_first, orientation_problem
from onnx_inher.planning.svd import Factors, truncate

PERTURBATION = 1e-2


@dataclass
class Emitter:
    """Collects the nodes and initializers of one replacement, named from its node."""

    prefix: str
    weight_prefix: str
    dtype: np.dtype
    opset: int
    nodes: list[NodeProto] = field(default_factory=list)
    inits: dict[str, TensorProto] = field(default_factory=dict)
    home: str = MAIN  # the scope whose initializers receive `inits`: where the replaced weight lives
    shapes: list[ValueInfoProto] = field(default_factory=list)  # value_info the replacement declares

    def declare(self, name: str, dims: tuple[Dim, ...]) -> None:
        """Declare `name`'s shape, every dim the shape inference left unknown named after it.

        Why: ONNX Runtime's memory planner lets an op write over its input (ScatterElements, Softmax) only
        when it can prove the two are the same size, and an unnamed unknown dim equals nothing, not even
        itself. Named, the split head's scatter writes in place instead of copying the whole
        `[rows, classes]` logits first (the PP-OCRv5 recogniser at batch 32: 20.5 -> 1.7 ms)."""
        named = [d if d is not None else f"{self.prefix}/{name.rsplit('/', 1)[-1]}.d{i}" for i, d in enumerate(dims)]
        self.shapes.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(self.dtype), named))

    def weight(self, suffix: str, array: np.ndarray, *, own: bool = False) -> str:
        """An initializer named after the shared weight's first layer (so layers sharing a teacher weight share
        it), or after this layer when `own` (it holds something of this layer's, such as its bias)."""
        name = f"{self.prefix if own else self.weight_prefix}/{suffix}"
        if name not in self.inits:
            values = flush_negligible(np.ascontiguousarray(array.astype(self.dtype)))
            self.inits[name] = numpy_helper.from_array(values, name)
        return name

    def ints(self, suffix: str, values: list[int]) -> str:
        name = f"{self.prefix}/{suffix}"
        self.inits.setdefault(name, numpy_helper.from_array(np.asarray(values, dtype=np.int64), name))
        return name

    def node(self, op: str, inputs: list[str], suffix: str, output: str | None = None, **attrs: object) -> str:
        name = f"{self.prefix}/{suffix}"
        self.nodes.append(helper.make_node(op, inputs, [output or name], name=name, **attrs))
        return output or name

    def matmul_or_gemm(self, a: str, b: str, suffix: str, *, trans_a: int = 0, trans_b: int = 0,
                       c: str = "", beta: float = 1.0, output: str | None = None) -> str:
        """The cheapest node for `a' @ b' (+ beta*c)`: MatMul when nothing needs Gemm.

        Before opset 11 Gemm requires C: without one, transpose explicitly and use MatMul rather than
        store a zero bias that the cost model (and the plan's param counts) would not know about."""
        if not c and self.opset < 11:
            a = self.node("Transpose", [a], f"{suffix}.a_t") if trans_a else a
            b = self.node("Transpose", [b], f"{suffix}.b_t") if trans_b else b
            trans_a = trans_b = 0
        if not (trans_a or trans_b or c):
            return self.node("MatMul", [a, b], suffix, output)
        inputs = [a, b]
        if c:
            inputs.append(c)
        extra: dict[str, object] = {"beta": beta} if c and beta != 1.0 else {}
        return self.node("Gemm", inputs, suffix, output, transA=trans_a, transB=trans_b, **extra)


def _seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")


def head_weights(up: np.ndarray, h: int, seed: int, name: str) -> np.ndarray:
    """`[h, g, out, r]`: each head is `up` plus a perturbation; perturbations sum to zero over heads."""
    rng = np.random.default_rng(_seed(seed, name))
    scale = PERTURBATION * float(np.sqrt(np.mean(up.astype(np.float64) ** 2)) or 1.0)
    noise = rng.standard_normal((h, *up.shape)) * scale
    noise -= noise.mean(axis=0, keepdims=True)
    return (up[None].astype(np.float64) + noise).astype(np.float32)


def _conv_down_weight(view: LayerView, f: Factors) -> np.ndarray:
    g, r = f.down.shape[0], f.down.shape[1]
    k = int(np.prod(view.kernel))
    if view.op == "Conv":
        return f.down.reshape(g * r, -1, *view.kernel)
    cin_g = view.in_features // k
    return f.down.reshape(g, r, cin_g, k).transpose(0, 2, 1, 3).reshape(g * cin_g, r, *view.kernel)


def fold_applies(node: NodeProto, opset: int) -> bool:
    """Whether a Conv's output rows (its first spatial axis) can be folded into the batch: explicit pads
    (a SAME auto-pad's depend on the shape) and Slice with inputs (opset 10). Padded rows are padded by
    a Pad node first, so each part reads only its own rows."""
    if node.op_type != "Conv" or opset < 10:
        return False
    auto = {a.name: helper.get_attribute_value(a) for a in node.attribute}.get("auto_pad", b"NOTSET")
    return (auto.decode() if isinstance(auto, bytes) else str(auto)) in ("NOTSET", "VALID")


def _pads(attrs: dict[str, object]) -> list[int]:
    value = attrs.get("pads")
    return [int(p) for p in value] if isinstance(value, (list, tuple)) else []


def _row_pads(attrs: dict[str, object]) -> tuple[int, int]:
    pads = _pads(attrs)
    return (pads[0], pads[len(pads) // 2]) if pads else (0, 0)


def fold_bounds(node: NodeProto, kernel: int, rows: int, parts: int) -> list[tuple[int, int]] | None:
    """The rows `[start, end)` of the row-padded input that each of `parts` equal parts of the output rows
    reads; None when the output rows do not split into equal parts of at least 2 rows."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    stride = int((attrs.get("strides") or [1])[0])
    dilation = int((attrs.get("dilations") or [1])[0])
    span = dilation * (kernel - 1) + 1
    rows += sum(_row_pads(attrs))
    if parts < 2 or rows < span:
        return None
    out = (rows - span) // stride + 1
    if out % parts or out // parts < 2:
        return None
    step = out // parts
    return [(p * step * stride, p * step * stride + (step - 1) * stride + span) for p in range(parts)]


def _folded_conv(e: Emitter, node: NodeProto, x: str, w: str, kernel: int, fold: dict[str, int],
                 attrs: dict[str, object]) -> str:
    """The down conv with its output rows folded into the batch: P row slices of the input (each with the
    rows its outputs read) stacked on the batch axis, one conv, and the P results put back in row order.
    The same MACs; ONNX Runtime then runs the P parts on P threads where it would run one image's
    rank <= 64 blocked conv on one."""
    bounds = fold_bounds(node, kernel, int(fold["rows"]), int(fold["parts"])) if fold_applies(node, e.opset) else None
    if bounds is None:
        raise InputError(f"plan folds node '{node.name}' into {fold['parts']} parts of {fold['rows']} input rows, "
                         "which it cannot take (SAME auto-pad, opset < 10, or output rows that do not split into "
                         "equal parts of 2 or more); remove its `fold`.")
    top, bottom = _row_pads(attrs)
    if top or bottom:  # pad the rows once, so that every part reads only its own; the conv pads the rest
        conv_pads = _pads(attrs)
        spatial = len(conv_pads) // 2
        pads = [0, 0, top, *([0] * (spatial - 1)), 0, 0, bottom, *([0] * (spatial - 1))]
        if e.opset >= 11:
            x = e.node("Pad", [x, e.ints("fold.pads", pads)], "fold.pad")
        else:
            x = e.node("Pad", [x], "fold.pad", pads=pads)
        conv_pads[0] = conv_pads[spatial] = 0
        attrs = {**attrs, "pads": conv_pads}
    axes = e.ints("fold.axes", [2])
    pieces = [e.node("Slice", [x, e.ints(f"fold.start{p}", [a]), e.ints(f"fold.end{p}", [b]), axes], f"fold.slice{p}")
              for p, (a, b) in enumerate(bounds)]
    z = e.node("Conv", [e.node("Concat", pieces, "fold.batch", axis=0), w], "down", **attrs)
    parts = [f"{e.prefix}/fold.part{p}" for p in range(len(bounds))]
    split: dict[str, object] = {"num_outputs": len(bounds)} if e.opset >= 18 else {}
    e.nodes.append(helper.make_node("Split", [z], parts, name=f"{e.prefix}/fold.split", axis=0, **split))
    return e.node("Concat", parts, "fold.rows", axis=2)


def _down(e: Emitter, view: LayerView, node: NodeProto, f: Factors, fold: dict[str, int] | None = None) -> str:
    """The shared down-projection x -> r (all of the original node's layout attributes kept), its rows
    folded into the batch when the plan says so (`fold`, Conv only)."""
    x = node.input[1 - view.weight_input] if view.op in ("MatMul", "Gemm") else node.input[0]
    d = f.down[0]
    if view.op == "MatMul":
        return e.node("MatMul", [x, e.weight("down.weight", d.T)], "down") if view.side == "right" \
            else e.node("MatMul", [e.weight("down.weight", d), x], "down")
    if view.op == "Gemm":
        if view.side == "right":
            return e.matmul_or_gemm(x, e.weight("down.weight", d.T), "down", trans_a=int(view.attrs["transA"]))
        return e.matmul_or_gemm(e.weight("down.weight", d), x, "down", trans_b=int(view.attrs["transB"]))
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    axis = None if fold else s2d_axis(view, attrs, e.opset)
    if axis is not None:
        return _s2d_conv(e, view, x, _conv_down_weight(view, f), axis, attrs)
    w = e.weight("down.weight", _conv_down_weight(view, f))
    if fold and view.op == "Conv":
        return _folded_conv(e, node, x, w, int(view.kernel[0]), fold, attrs)
    return e.node(view.op, [x, w], "down", **attrs)


def s2d_axis(view: LayerView, attrs: dict[str, object], opset: int) -> int | None:
    """The spatial axis along which a one-input-channel Conv (1-D, or 2-D with kernel 1 on the other axis)
    strides, when its stride divides its kernel and it has no padding or dilation: its down conv is then
    written space-to-depth (`_s2d_conv`). None otherwise.

    Why: ONNX Runtime runs a conv with one input channel and a long strided kernel poorly. CREPE's first
    layer is 1 -> C, 512 x 1 at stride 4; its rank-16 down conv took 143.9 us alone, 33.5 us space-to-depth
    (`benchmarks/experiments/strided_first_conv.py`)."""
    if view.op != "Conv":
        return None
    return strided_axis(view.kernel, view.groups, int(view.weight.shape[1]), attrs, opset)


def strided_axis(kernel: Sequence[int], groups: int, c_in: int, attrs: dict[str, object], opset: int) -> int | None:
    """`s2d_axis` of a Conv given as its kernel, groups, input channels per group and attributes."""
    nd = len(kernel)
    strides = [int(v) for v in attrs.get("strides") or [1] * nd]  # type: ignore[attr-defined]
    strided = [i for i, st in enumerate(strides) if st > 1]
    if (nd > 2 or groups != 1 or c_in != 1 or opset < 10 or len(strided) != 1
            or any(attrs.get("pads") or [])  # type: ignore[arg-type]
            or any(int(d) != 1 for d in attrs.get("dilations") or [])  # type: ignore[attr-defined]
            or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")):
        return None
    i = strided[0]
    if kernel[i] % strides[i] or any(k != 1 for j, k in enumerate(kernel) if j != i):
        return None
    return i


S2D_CROP = "s2d_crop"  # the first node of a space-to-depth down conv (`written_s2d` counts them)


def written_s2d(student: ModelProto) -> int:
    """How many down convs of `student` `factorize` wrote space-to-depth."""
    return sum(1 for node in student.graph.node if node.name.endswith(f"/{S2D_CROP}"))


def strided_convs(model: ModelProto) -> list[str]:
    """The main graph's Convs whose weight is an initializer and that `strided_axis` would write
    space-to-depth: `bench` names them, since the teacher's own conv gains from that form too."""
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    opset = default_opset(model)
    found = []
    for node in model.graph.node:
        dims = weights.get(node.input[1]) if node.op_type == "Conv" and len(node.input) > 1 else None
        if dims is None or len(dims) < 3:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        groups = int(attrs.get("group", 1))  # type: ignore[call-overload]
        if strided_axis(dims[2:], groups, dims[1], attrs, opset) is not None:
            found.append(node.name or node.output[0])
    return found


def _s2d_conv(e: Emitter, view: LayerView, x: str, w: np.ndarray, axis: int, attrs: dict[str, object]) -> str:
    """The down conv space-to-depth: `y[o, t] = sum_k w[o, k] x[s t + k] = sum_m sum_j w[o, s j + m] x_m[t + j]`
    with `x_m[i] = x[s i + m]`. The input is cropped to the span its windows read (`L - (L - k) mod s`, from
    its own shape: exported models seldom declare it), its stride-`s` phases become `s` channels, and a
    stride-1 conv with a `k / s` kernel runs on them. The same function, float rounding aside."""
    nd = len(view.kernel)
    s, k = int(attrs["strides"][axis]), int(view.kernel[axis])  # type: ignore[index]
    a = 2 + axis
    length = e.node("Gather", [e.node("Shape", [x], "s2d_dims"), e.ints("s2d.axis", [a])], "s2d_length", axis=0)
    extra = e.node("Mod", [e.node("Sub", [length, e.ints("s2d.kernel", [k])], "s2d_after"), e.ints("s2d.stride", [s])],
                   "s2d_extra")
    span = e.node("Sub", [length, extra], "s2d_span")
    cropped = e.node("Slice", [x, e.ints("s2d.start", [0]), span, e.ints("s2d.axes", [a])], S2D_CROP)
    steps = e.node("Div", [span, e.ints("s2d.stride", [s])], "s2d_steps")
    trailing = a < nd + 1  # a spatial axis after the strided one (2-D, strided along H): its size stays -1
    split = [e.ints("s2d.lead", [0] * a), steps, e.ints("s2d.tail", [s, -1] if trailing else [s])]
    parts = e.node("Reshape", [cropped, e.node("Concat", split, "s2d_split_shape", axis=0)], "s2d_split")
    perm = [0, 1, a + 1, *(j for j in range(2, nd + 3) if j != a + 1)]  # the phase axis next to the channel
    moved = e.node("Transpose", [parts], "s2d_move", perm=perm)
    merge = [e.ints("s2d.merge_lead", [0, s, *([-1] * (a - 2))]), steps,
             *([e.ints("s2d.merge_tail", [-1])] if trailing else [])]  # [N, s, (H,) L/s, (W)]
    merged = e.node("Reshape", [moved, e.node("Concat", merge, "s2d_merge_shape", axis=0)], "s2d_merge")
    r = w.shape[0]
    taps = np.moveaxis(w[:, 0], 1 + axis, -1).reshape(r, *(1 for _ in range(nd - 1)), k // s, s)  # w[s j + m] at [j, m]
    w2 = np.moveaxis(np.moveaxis(taps, -1, 1), -1, 2 + axis)  # [r, s, kernel]: phase m as input channel
    kernel = [k // s if j == axis else 1 for j in range(nd)]
    # its own name: a layer sharing the teacher weight may take the direct form, whose layout differs
    return e.node("Conv", [merged, e.weight("down.weight_s2d", w2)], "down", kernel_shape=kernel, strides=[1] * nd)


def _up_pair(e: Emitter, view: LayerView, node: NodeProto, f: Factors, z: str, y: str) -> None:
    u = f.up
    if view.op in ("MatMul", "Gemm"):
        c = str(view.attrs.get("c", ""))
        beta = float(view.attrs.get("beta", 1.0))
        if view.side == "right":
            e.matmul_or_gemm(z, e.weight("up.weight", u[0].T), "up", c=c, beta=beta, output=y)
        else:
            e.matmul_or_gemm(e.weight("up.weight", u[0]), z, "up", c=c, beta=beta, output=y)
        return
    g, o, r = u.shape
    w = u.reshape(g * o, r, *([1] * len(view.kernel)))
    inputs = [z, e.weight("up.weight", w)]
    if view.bias is not None:
        inputs.append(node.input[2])
    e.node("Conv", inputs, "up", y, group=g)


def _pair_kernel_up(e: Emitter, view: LayerView, node: NodeProto, f: Factors) -> None:
    """A conv pair with its k x k kernel on the up side (`ir.layers.kernel_up`): a 1x1 conv `C_in -> r` (`V_r^T`,
    no padding, stride 1), then a k x k conv `r -> C_out` (`U_r S_r`, the bias) with every attribute of the
    original node. Exact at full rank: zero padding stays zero through a 1x1 conv without bias, so padding,
    striding and dilating the rank features equals doing it to the input first."""
    nd = len(view.kernel)
    r = f.down.shape[1]
    down = f.down[0].reshape(r, -1, *([1] * nd))
    z = e.node("Conv", [node.input[0], e.weight("down.weight", down)], "down")
    up = np.moveaxis(f.up[0].reshape(view.out_features, *view.kernel, r), -1, 1)
    inputs = [z, e.weight("up.weight", up)]
    if view.bias is not None:
        inputs.append(node.input[2])
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    e.node("Conv", inputs, "up", node.output[0], **attrs)


def _up_channels_first(e: Emitter, view: LayerView, f: Factors, z: str, tail: ChannelsFirst) -> None:
    """`Conv1x1(Transpose(z))` for `Transpose((z U + b) * s1) * s2` (ConvNeXt's second MLP layer and its layer
    scale, before or after the permute).

    The Transpose moves r channels instead of `out`, ONNX Runtime folds it into the reorder to its blocked
    (NCHWc) layout, and the 1x1 conv takes the bias and the scales into its weights (and the residual Add
    after it into itself), where a MatMul, an Add, a Transpose and a Mul each made a pass over the output.
    The teacher's own layer gains little from the same rewrite: its Transpose would move the `in`-wide
    input (ConvNeXt-T, 2 threads: the student 1.44x -> 1.53x its teacher, the teacher rewritten 1.02x)."""
    _, o, r = f.up.shape
    scale = tail.scale if tail.scale is not None else np.ones(o, dtype=np.float32)
    w = (f.up[0] * scale[:, None]).reshape(o, r, *([1] * (len(tail.perm) - 2)))
    own = tail.scale is not None  # the scale is this layer's: a layer sharing the weight has its own
    inputs = [e.node("Transpose", [z], "up_channels_first", perm=list(tail.perm)),
              e.weight("up.conv_weight", w, own=own)]
    if view.trailing_bias is not None:
        inputs.append(e.weight("up.bias", view.trailing_bias * scale, own=True))
    e.node("Conv", inputs, "up", tail.output)


def tail_nodes(view: LayerView, graph: GraphProto) -> list[int]:
    """Indexes in `graph` of the nodes a channels-first pair replaces after the layer: its bias Add, the
    Transpose and the scale Muls (`view.channels_first`)."""
    tail = view.channels_first
    if tail is None:
        return []
    return _writers(graph, set(tail.taken) | ({view.trailing_add} if view.trailing_bias is not None else set()))


def _writers(graph: GraphProto, outputs: set[str]) -> list[int]:
    """Indexes in `graph` of the nodes whose (first) output is one of `outputs`: the nodes a replacement takes
    over after its layer, which it writes the output of."""
    return [i for i, n in enumerate(graph.node) if n.output and n.output[0] in outputs]


def _heads_dense(e: Emitter, view: LayerView, f: Factors, h: int, z: str, y: str, seed: int) -> None:
    """Per-token gate over h fused heads for MatMul/Gemm (activation `[..., in]`)."""
    r, o = f.down.shape[1], f.up.shape[1]
    lead = [0] * ((view.act_rank or 2) - 1)
    heads = head_weights(f.up, h, seed, e.weight_prefix)[:, 0]
    fused = np.concatenate([hw.T for hw in heads], axis=1)
    bias = ""
    if view.bias is not None:
        bias = e.weight("heads.bias", np.tile(view.bias.astype(np.float32), h))
    ys = e.matmul_or_gemm(z, e.weight("heads.weight", fused), "heads", c=bias)
    logits = e.node("MatMul", [z, e.weight("gate.weight", np.zeros((r, h)))], "gate")
    logits = e.node("Add", [logits, e.weight("gate.bias", np.zeros(h))], "gate_add")
    gate = e.node("Softmax", [logits], "gate_softmax", axis=len(lead))
    gate = e.node("Reshape", [gate, e.ints("gate.shape", [*lead, 1, h])], "gate_row")
    ys = e.node("Reshape", [ys, e.ints("heads.shape", [*lead, h, o])], "heads_split")
    mixed = e.node("MatMul", [gate, ys], "mix")
    e.node("Reshape", [mixed, e.ints("out.shape", [*lead, o])], "out", y)


def _conv_gate(e: Emitter, f: Factors, h: int, z: str) -> str:
    """`softmax(mean_pixels(z) G + b)`, `[N, h]`: the per-sample gate both conv head forms share."""
    g, _, r = f.up.shape
    pooled = e.node("GlobalAveragePool", [z], "pool")
    pooled = e.node("Flatten", [pooled], "pool_flat", axis=1)
    logits = e.node("Gemm", [pooled, e.weight("gate.weight", np.zeros((g * r, h))), e.weight("gate.bias", np.zeros(h))],
                    "gate")
    return e.node("Softmax", [logits], "gate_softmax", axis=1)


def _heads_conv(e: Emitter, view: LayerView, f: Factors, h: int, z: str, y: str, seed: int,
                bias: np.ndarray | None = None) -> None:
    """Per-sample gate on pooled features; the gate mixes head weights, one product per pixel.

    The bias (`bias`: the conv's own plus a per-channel Add it took over, `conv_bias`) rides in the
    product as one more rank, a constant-1 row padded under the rank features, each head's bias its
    weight column: `sum_k g_k (U_k z + b_k) = (sum_k g_k [U_k | b_k]) [z; 1]`. A separate Add over the
    `[out, pixels]` output cost the PP-OCRv5 recogniser's heads 45 us a layer, a sixth of the layer
    (ONNX Runtime fuses a bias into a conv but not into a batched MatMul); the one-row Pad costs a few."""
    g, o, r = f.up.shape
    c_out = g * o
    heads = head_weights(f.up, h, seed, e.weight_prefix)  # [h, g, out, r]
    k = r
    if bias is not None:
        column = np.broadcast_to(bias.astype(np.float32).reshape(1, g, o, 1), (h, g, o, 1))
        heads = np.concatenate([heads, column], axis=3)
        k = r + 1
    gate = _conv_gate(e, f, h, z)
    weights = e.weight("heads.weight", heads.reshape(h, -1), own=bias is not None)
    mixed_w = e.node("MatMul", [gate, weights], "mix_weights")
    mixed_w = e.node("Reshape", [mixed_w, e.ints("mix.shape", [0, g, o, k])], "mix_weights_4d")
    flat = e.node("Reshape", [z, e.ints("z.shape", [0, g, r, -1])], "z_groups")
    if bias is not None:
        flat = _pad_one_row(e, flat)
    out = e.node("MatMul", [mixed_w, flat], "apply")
    e.node("Reshape", [out, _conv_out_shape(e, view, z, c_out, g * r)], "out", y)


def _pad_one_row(e: Emitter, flat: str) -> str:
    """`[N, g, r, P]` -> `[N, g, r + 1, P]`, the last row all ones (one node, no shape arithmetic)."""
    pads = [0, 0, 0, 0, 0, 0, 1, 0]
    if e.opset >= 11:  # the fill a Constant node, not an initializer: a fixed value, no parameter to count or train
        one = numpy_helper.from_array(np.ones((), dtype=e.dtype), f"{e.prefix}/ones_row.value")
        value = e.node("Constant", [], "ones_row.value", value=one)
        return e.node("Pad", [flat, e.ints("ones_row.pads", pads), value], "ones_row", mode="constant")
    return e.node("Pad", [flat], "ones_row", mode="constant", pads=pads, value=1.0)


def _conv_out_shape(e: Emitter, view: LayerView, z: str, c_out: int, z_channels: int) -> str:
    """The Reshape target `[N, c_out, *spatial]` of a conv head's `[N, g, out, pixels]` product: constant
    when at most one spatial dim is unknown (it becomes -1), else `Shape(z)` with its channel count
    replaced by an Add (two nodes; a Slice and Concat cost one more)."""
    spatial = list(view.out_dims[2:]) if view.out_dims else [None] * len(view.kernel)
    unknown = [d for d in spatial if not isinstance(d, int)]
    if len(unknown) <= 1:
        return e.ints("out.shape", [0, c_out, *(d if isinstance(d, int) else -1 for d in spatial)])
    shape = e.node("Shape", [z], "z_dims")
    delta = e.ints("out.channels", [0, c_out - z_channels, *([0] * len(spatial))])
    return e.node("Add", [shape, delta], "out_shape")


def _heads_conv_const(e: Emitter, view: LayerView, f: Factors, h: int, z: str, y: str, seed: int) -> None:
    """Constant-weight conv heads: `y = Conv1x1(concat_k(g_k z), [U_1 .. U_h]) + sum_k g_k b_k`.

    The same function as `_heads_conv` (`sum_k g_k (U_k z + b_k)`), but the up-projection is one 1x1 conv
    with constant `[out, h*r]` weights, which ONNX Runtime prepacks and runs in its blocked (NCHWc) layout,
    where the per-sample mixed weight of `_heads_conv` is a plain batched MatMul with reshapes around it.
    It costs h times the up-projection's MACs per pixel, so it is chosen per layer by measurement."""
    _, o, r = f.up.shape
    ones = [1] * len(view.kernel)
    heads = head_weights(f.up, h, seed, e.weight_prefix)[:, 0]  # [h, out, r]
    gate = _conv_gate(e, f, h, z)
    scale = e.node("Reshape", [gate, e.ints("gate.cols", [0, h, 1])], "gate_cols")
    scale = e.node("Expand", [scale, e.ints("gate.rep", [1, 1, r])], "gate_rep")  # g_k for each of head k's r
    scale = e.node("Reshape", [scale, e.ints("scale.shape", [0, h * r, *ones])], "scale")
    tiled = e.node("Concat", [z] * h, "tile", axis=1)
    scaled = e.node("Mul", [tiled, scale], "scaled")
    w = heads.transpose(1, 0, 2).reshape(o, h * r, *ones)
    if view.bias is None:
        e.node("Conv", [scaled, e.weight("heads.conv_weight", w)], "apply", y)
        return
    out = e.node("Conv", [scaled, e.weight("heads.conv_weight", w)], "apply")
    b = np.tile(view.bias.astype(np.float32)[None], (h, 1))
    mixed_b = e.node("MatMul", [gate, e.weight("heads.bias", b)], "mix_bias")
    mixed_b = e.node("Reshape", [mixed_b, e.ints("bias.shape", [0, o, *ones])], "mix_bias_nd")
    e.node("Add", [out, mixed_b], "apply_bias", y)


def other_classes(view: LayerView, cand: Candidate) -> np.ndarray:
    """The output columns of a class-split head that go through its pair (all but `dense_classes`), in order."""
    return np.setdiff1d(np.arange(view.out_features), cand.dense_classes or [])


@dataclass
class SplitBias:
    """The class bias a split head takes over (`split_bias`): its values over every class, the output the head
    then writes, and the bias Add node it replaces (None: a Gemm's own C)."""

    values: np.ndarray  # [out]
    output: str
    add_index: int | None = None


def split_bias(view: LayerView, graph: GraphProto) -> SplitBias | None:
    """The per-class bias after a class-split head, folded into the head so that no pass over the full-size
    logits adds it: a Gemm's C when it is one value per class, and/or the constant Add that alone reads the
    layer's output (`view.trailing_bias`: the MatMul + Add of a torch/Paddle `Linear`). None when the head
    does not take it (`view.split_takes_bias`; then it is emitted with the bias after the scatter)."""
    if not view.split_takes_bias:
        return None
    total = np.zeros(view.out_features, dtype=np.float32)
    if view.op == "Gemm" and view.attrs.get("c") and view.bias is not None:
        total += np.asarray(view.bias, dtype=np.float32)
    if view.trailing_bias is not None:
        return SplitBias(total + view.trailing_bias, view.trailing_add, _trailing_add_index(view, graph))
    return SplitBias(total, view.output)


def conv_bias(view: LayerView, graph: GraphProto) -> SplitBias | None:
    """The bias a conv layer's mixed heads take into their product (`_heads_conv`): the conv's own, plus the
    per-channel Add that alone reads its output (`view.trailing_bias`: Paddle exports a conv's bias that way;
    ONNX Runtime fuses it into the teacher's conv, but after the heads' MatMul it would be a pass of its
    own), which then goes. None when there is no bias at all."""
    total = np.zeros(view.groups * view.out_features, dtype=np.float32)
    if view.bias is not None:
        total += np.asarray(view.bias, dtype=np.float32).reshape(-1)
    if view.trailing_bias is not None:
        return SplitBias(total + view.trailing_bias, view.trailing_add, _trailing_add_index(view, graph))
    return SplitBias(total, view.output) if view.bias is not None else None


def _trailing_add_index(view: LayerView, graph: GraphProto) -> int:
    """Where the bias Add a head takes over (`view.trailing_add`) sits in its graph: the head replaces it."""
    return _writers(graph, {view.trailing_add})[0]


def _split(e: Emitter, view: LayerView, node: NodeProto, cand: Candidate, dense: np.ndarray, f: Factors,
           bias: SplitBias | None = None) -> None:
    """The class-split head (module docstring): kept columns `dense` (`[in, k]`), the other classes' factors
    `f` (up `[1, out - k, r]`, spread over all `out` classes with zeros at the kept ones). With `bias`, the
    kept logits add their classes' bias and the pair carries the others' as one more rank: a constant-1
    feature (`x D + e`) whose up-projection row is the bias, so the `[rows, classes]` logits are written once."""
    x = node.input[1 - view.weight_input]
    trans_a = int(view.attrs.get("transA", 0)) if view.op == "Gemm" else 0
    classes = list(cand.dense_classes or [])
    rank = f.up.shape[2]
    up = np.zeros((rank + (bias is not None), view.out_features), dtype=np.float32)
    up[:rank, other_classes(view, cand)] = f.up[0].T
    down = f.down[0].T
    if bias is not None:
        up[rank, other_classes(view, cand)] = bias.values[other_classes(view, cand)]
        down = np.concatenate([down, np.zeros((down.shape[0], 1), dtype=down.dtype)], axis=1)
    kept = e.matmul_or_gemm(x, e.weight("dense.weight", dense), "dense", trans_a=trans_a)
    z = e.matmul_or_gemm(x, e.weight("down.weight", down), "down", trans_a=trans_a)
    if bias is not None:
        kept = e.node("Add", [kept, e.weight("dense.bias", bias.values[classes])], "dense_bias")
        one = np.zeros(rank + 1, dtype=np.float32)
        one[rank] = 1.0
        z = e.node("Add", [z, e.weight("down.one", one)], "down_one")
    dims = _logit_dims(view)
    lead = None
    if dims is None:  # rank unknown: scatter [rows, classes] views of the logits so their dims can be named
        lead = e.node("Slice", [e.node("Shape", [kept], "kept_dims"), e.ints("first", [0]), e.ints("last", [-1])],
                      "lead_dims")
        z = e.node("Reshape", [z, e.ints("z_rows.shape", [-1, up.shape[0]])], "z_rows")
        kept = e.node("Reshape", [kept, e.ints("kept_rows.shape", [-1, len(classes)])], "kept_rows")
        dims = (None, view.out_features)
    others = e.node("MatMul", [z, e.weight("up.weight", up)], "up")
    e.declare(others, dims)  # so that the scatter writes into it instead of copying it (`Emitter.declare`)
    where = e.node("Expand", [e.ints("classes", classes), e.node("Shape", [kept], "kept_shape")], "kept_at")
    c = str(view.attrs.get("c", "")) if view.op == "Gemm" and bias is None else ""
    out = bias.output if bias else node.output[0]
    y = e.node("ScatterElements", [others, where, kept], "scatter", None if c or lead else out, axis=-1)
    if lead is not None:
        full = e.node("Concat", [lead, e.ints("class_count", [view.out_features])], "logit_dims", axis=0)
        y = e.node("Reshape", [y, full], "logits", None if c else out)
    if c:
        e.node("Add", [y, c], "bias", node.output[0])


def _logit_dims(view: LayerView) -> tuple[Dim, ...] | None:
    """The dims of a split head's `[..., classes]` logits as far as the model declares them, None when even
    their rank is unknown (a Gemm's are always 2-D)."""
    if view.out_dims is not None and len(view.out_dims) >= 2:
        return view.out_dims
    return (None, view.out_features) if view.op == "Gemm" else None


HEAD_FORMS = ("mix", "conv")  # conv heads: per-sample weight mix (the default), constant-weight 1x1 conv


def conv_form_applies(view: LayerView, opset: int) -> bool:
    """Whether a layer's heads can take the constant-weight `conv` form: ungrouped Conv (a grouped conv's
    channels would have to be interleaved per group), and an opset with Expand (8)."""
    return view.op == "Conv" and view.groups == 1 and opset >= 8


def mixes_conv_heads(view: LayerView, cand: Candidate, opset: int) -> bool:
    """Whether `emit` writes the layer as mixed conv heads (`_heads_conv`), which take its bias over."""
    return (cand.heads > 1 and cand.dense_classes is None and view.op in ("Conv", "ConvTranspose")
            and not (cand.head_form == "conv" and conv_form_applies(view, opset)))


def emit(view: LayerView, node: NodeProto, cand: Candidate, f: Factors, opset: int, seed: int,
         weight_prefix: str, dense: np.ndarray | None = None, bias: SplitBias | None = None,
         tail: ChannelsFirst | None = None) -> Emitter:
    """Nodes and initializers replacing `node`; weights are named after `weight_prefix`, the first
    node sharing them, so layers that share one weight share its factors too. A class-split candidate
    takes its kept columns as `dense` (`[in, k]`) and `f` as the other classes' factors; `bias` is what a
    class-split head or mixed conv heads take over (`split_bias`, `conv_bias`); `tail` the channels-first
    tail a plain pair takes over (`channels_first`; the caller removes its nodes), else the pair writes the
    layer's own output (as the single-layer timings build it)."""
    tag = factor_tag(cand.heads)
    e = Emitter(f"{view.node}/{tag}", f"{weight_prefix}/{tag}", view.dtype, opset)
    if cand.dense_classes is not None:
        if dense is None:
            raise PassError("factorize", f"class-split node '{view.node}' needs its dense columns")
        _split(e, view, node, cand, dense, f, bias)
        return e
    if view.kernel_up:
        _pair_kernel_up(e, view, node, f)
        return e
    z = _down(e, view, node, f, cand.fold)
    if tail is not None:
        _up_channels_first(e, view, f, z, tail)
    elif cand.heads <= 1:
        _up_pair(e, view, node, f, z, node.output[0])
    elif view.op in ("MatMul", "Gemm"):
        _heads_dense(e, view, f, cand.heads, z, node.output[0], seed)
    elif cand.head_form == "conv" and conv_form_applies(view, opset):
        _heads_conv_const(e, view, f, cand.heads, z, node.output[0], seed)
    else:
        _heads_conv(e, view, f, cand.heads, z, bias.output if bias else node.output[0], seed,
                    bias.values if bias else None)
    return e


def release_weight(view: LayerView) -> None:
    """Drop a view's folded weight, keeping its shape and dtype (a zero-stride stand-in, no memory)."""
    view.weight = np.broadcast_to(np.zeros((), view.weight.dtype), view.weight.shape)


def _signature(model: ModelProto) -> list[tuple[str, bytes]]:
    return [(o.name, o.type.SerializeToString()) for o in model.graph.output]


def _referenced(graph: GraphProto, nodes: list[NodeProto]) -> set[str]:
    """Every name the nodes (and their subgraphs, which may read outer initializers) read, plus outputs."""
    names = {o.name for o in graph.output}
    stack = list(nodes)
    while stack:
        node = stack.pop()
        names.update(node.input)
        for attr in node.attribute:
            stack.extend(attr.g.node if attr.HasField("g") else ())
            for g in attr.graphs:
                stack.extend(g.node)
                names.update(o.name for o in g.output)
    return names


Replacements = dict[str, dict[int, Emitter]]  # scope path -> node index in that graph -> replacement


class Scopes:
    """The model's graphs by scope path (`ir.graph.walk_scopes`), and which scope defines a name."""

    def __init__(self, graph: GraphProto) -> None:
        self.graphs: dict[str, GraphProto] = {}
        self.parents: dict[str, str | None] = {}
        for path, g, parent in walk_scopes(graph):
            self.graphs[path], self.parents[path] = g, parent
        self._names: dict[str, set[str]] = {}

    def names(self, path: str) -> set[str]:
        """Every name the graph at `path` itself defines: initializers, inputs, node outputs."""
        if path not in self._names:
            g = self.graphs[path]
            self._names[path] = {t.name for t in g.initializer} | {i.name for i in g.input} | {
                o for n in g.node for o in n.output if o}
        return self._names[path]

    def home(self, path: str, name: str) -> str:
        """The scope that defines `name` as read from `path` (itself or the nearest enclosing graph)."""
        at: str | None = path
        while at is not None and at != MAIN:
            if name in self.names(at):
                return at
            at = self.parents[at]
        return MAIN

    def all_names(self) -> set[str]:
        """Names defined anywhere in the model (created names must not clash with any of them)."""
        return set().union(*(self.names(p) for p in self.graphs))

    def touched(self, changed: set[str]) -> set[str]:
        """The `changed` scopes and every graph that encloses one (their holders must be rewritten)."""
        out: set[str] = set()
        for path in changed:
            at: str | None = path
            while at is not None and at not in out:
                out.add(at)
                at = self.parents[at]
        return out


def _splice(graph: GraphProto, scoped: Replacements, placed: dict[str, dict[str, TensorProto]],
            touched: set[str], path: str = MAIN) -> list[NodeProto]:
    """The graph's nodes with each replaced node swapped for its replacement's nodes; a node holding a
    changed subgraph is swapped for a rewritten copy (the source graph is not edited)."""
    here = scoped.get(path, {})
    ids = node_ids(graph) if touched - {path} else None
    out: list[NodeProto] = []
    for i, node in enumerate(graph.node):
        if i in here:
            out.extend(here[i].nodes)
        elif ids is not None and any(p in touched for p in child_paths(node, ids[i], path)):
            out.append(_rewritten_holder(node, ids[i], path, scoped, placed, touched))
        else:
            out.append(node)
    return out


def _rewritten_holder(node: NodeProto, nid: str, path: str, scoped: Replacements,
                      placed: dict[str, dict[str, TensorProto]], touched: set[str]) -> NodeProto:
    """A copy of an If/Loop/Scan node whose changed subgraphs have their layers replaced and the
    factors that live there added (in name order, as in the main graph)."""
    copy = NodeProto()
    copy.CopyFrom(node)
    for (_, g), child in zip(subgraphs(copy), child_paths(copy, nid, path), strict=True):
        if child not in touched:
            continue
        nodes = _splice(g, scoped, placed, touched, child)
        del g.node[:]
        g.node.extend(nodes)
        for k in sorted(placed.get(child, {})):
            g.initializer.add().CopyFrom(placed[child][k])
    return copy


def _copy_fields(src: Message, dst: Message, skip: set[str]) -> None:
    for fd, value in src.ListFields():
        if fd.name in skip:
            continue
        if fd.is_repeated:
            getattr(dst, fd.name).extend(value)
        elif fd.type == FieldDescriptor.TYPE_MESSAGE:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def _has_unknown(*messages: Message) -> bool:
    return any(len(UnknownFieldSet(m)) for m in messages)


def _valid_fold(fold: object, view: LayerView) -> bool:
    return (view.op == "Conv" and isinstance(fold, dict) and set(fold) == {"parts", "rows"}
            and all(isinstance(v, int) and not isinstance(v, bool) for v in fold.values())
            and fold["parts"] >= 2 and fold["rows"] >= 1)


class Factorize:
    """Pass: apply a plan's `factorize` decisions. `(model) -> (model, changed)`.

    Not in place, the student is built into a fresh `ModelProto` that never receives the replaced
    weights: upb frees a message's memory only with its whole arena, so editing a copy (or the
    teacher) keeps every removed weight allocated. With `release_weights`, each factorised view's
    folded weight is replaced by a zero-stride stand-in (same shape and dtype, no memory) once its
    factors are emitted; only for callers that drop the views afterwards (`api.compress`).
    """

    name = "factorize"

    def __init__(self, plan: Plan, views: dict[str, LayerView], spectra: Spectra, *, inplace: bool = False,
                 release_weights: bool = False):
        self.plan, self.views, self.spectra, self.inplace = plan, views, spectra, inplace
        self.release_weights = release_weights

    def requires(self, model: ModelProto) -> None:
        for c in self.plan.candidates:
            if c.decision != "factorize":
                continue
            view = self.views.get(c.node)
            if view is None:
                raise InputError(f"plan names node '{c.node}', which is not a factorisable layer of this model; "
                                 "regenerate the plan for this model.")
            why = orientation_problem(c, view)
            if why is not None:
                raise InputError(f"plan gives node '{c.node}' orientation '{c.orientation}', which it cannot take "
                                 f"({why}); remove its orientation.")
            full = oriented(view, c.orientation).full_rank
            if not c.rank or not 1 <= c.rank <= full:
                raise InputError(f"plan gives node '{c.node}' rank {c.rank}; it must be in 1..{full} (its full rank"
                                 f"{' with the kernel up' if c.orientation else ''}).")
            if c.heads < 1:
                raise InputError(f"plan gives node '{c.node}' {c.heads} heads; use 1 or more.")
            if c.head_form is not None and c.head_form not in HEAD_FORMS:
                raise InputError(f"plan gives node '{c.node}' head_form '{c.head_form}'; use one of "
                                 f"{', '.join(HEAD_FORMS)} (or leave it out).")
            if c.fold is not None and not _valid_fold(c.fold, view):
                raise InputError(f"plan gives node '{c.node}' fold {c.fold}; a fold is {{\"parts\": P >= 2, "
                                 "\"rows\": input rows}} on a Conv layer (or leave it out).")

    def _emit_all(self, scopes: Scopes) -> Replacements:
        """One replacement per factorised node, by scope; each SVD lives only until its weight's last layer."""
        chosen = [c for c in self.plan.candidates if c.decision == "factorize"]
        seen = {c.node: oriented(self.views[c.node], c.orientation) for c in chosen}
        last = {seen[c.node].shared_key: i for i, c in enumerate(chosen)}
        top: dict[str, int] = {}  # the largest rank each shared weight (in each orientation) is factorised at
        for c in chosen:
            key = seen[c.node].shared_key
            top[key] = max(top.get(key, 1), int(c.rank or 1))
        svds: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        replacements: Replacements = {}
        owner: dict[tuple, str] = {}
        for i, c in enumerate(tqdm(chosen, desc="factorize", unit="layer", disable=None, leave=False)):
            view = self.views[c.node]
            if c.dense_classes is not None:
                node = scopes.graphs[view.scope].node[view.node_index]
                bias = split_bias(view, scopes.graphs[view.scope])
                here = replacements.setdefault(view.scope, {})
                here[view.node_index] = self._emit_split(c, view, node, bias)
                if bias is not None and bias.add_index is not None:  # the head writes the Add's output now
                    here[bias.add_index] = Emitter(f"{view.node}/removed", "", view.dtype, self.plan.opset)
                continue
            view = seen[c.node]
            key = (view.shared_key, c.rank, c.heads, c.head_form)
            prefix = owner.setdefault(key, c.node)
            svd = svds.get(view.shared_key) or self.spectra.top_svd(view, top[view.shared_key])
            if last[view.shared_key] > i:
                svds[view.shared_key] = svd
            else:
                svds.pop(view.shared_key, None)
            factors = truncate(svd, int(c.rank or 1))
            del svd
            node = scopes.graphs[view.scope].node[view.node_index]
            bias = conv_bias(view, scopes.graphs[view.scope]) if mixes_conv_heads(view, c, self.plan.opset) else None
            tail = channels_first(view, c)
            e = emit(view, node, c, factors, self.plan.opset, self.plan.options.seed, prefix, bias=bias, tail=tail)
            e.home = scopes.home(view.scope, view.weight_root)
            here = replacements.setdefault(view.scope, {})
            here[view.node_index] = e
            if bias is not None and bias.add_index is not None:  # the heads write the Add's output now
                here[bias.add_index] = Emitter(f"{view.node}/removed", "", view.dtype, self.plan.opset)
            if tail is not None:  # the pair writes the tail's output now
                for k in tail_nodes(view, scopes.graphs[view.scope]):
                    here[k] = Emitter(f"{view.node}/removed", "", view.dtype, self.plan.opset)
            if self.release_weights:
                release_weight(self.views[c.node])
        if self.release_weights:
            release_memory()
        return replacements

    def _emit_split(self, c: Candidate, view: LayerView, node: NodeProto, bias: SplitBias | None) -> Emitter:
        factors = truncate(self.spectra.split_svd(view, other_classes(view, c)), int(c.rank or 1))
        dense = view.matrices()[0][c.dense_classes or []].T
        e = emit(view, node, c, factors, self.plan.opset, self.plan.options.seed, view.node, dense, bias)
        if self.release_weights:
            release_weight(view)
        return e

    def __call__(self, model: ModelProto) -> tuple[ModelProto, bool]:
        self.requires(model)
        before = _signature(model)
        src = model.graph
        scopes = Scopes(src)
        scoped = self._emit_all(scopes)
        if not scoped:
            return (model if self.inplace else copy_model(model)), False
        emitters = [e for reps in scoped.values() for e in reps.values()]
        placed: dict[str, dict[str, TensorProto]] = {}
        for e in emitters:
            placed.setdefault(e.home, {}).update(e.inits)
        added = placed.pop(MAIN, {})
        existing = ({t.name for t in src.initializer} | {n for nd in src.node for n in nd.output}
                    if len(scopes.graphs) == 1 else scopes.all_names())
        clash = (set(added) | {k for v in placed.values() for k in v}) & existing
        if clash:
            raise PassError(self.name, f"created names already exist in the graph: {sorted(clash)[:3]}")
        touched = scopes.touched(set(scoped) | set(placed))
        if self.inplace or _has_unknown(model, src):  # a fresh build would lose unknown fields
            out = model if self.inplace else copy_model(model)
            nodes = _splice(out.graph, scoped, placed, touched)
            del out.graph.node[:]
            out.graph.node.extend(nodes)
        else:
            replaced = {x for path, reps in scoped.items() for i in reps for x in scopes.graphs[path].node[i].input}
            out = self._fresh(model, _splice(src, scoped, placed, touched), replaced)
        graph = out.graph
        declared = {v.name for v in graph.value_info}
        graph.value_info.extend(v for e in scoped.get(MAIN, {}).values() for v in e.shapes if v.name not in declared)
        for e in emitters:
            e.inits.clear()
        placed.clear()
        for k in sorted(added):  # popped one by one: each standalone tensor is freed once copied in
            graph.initializer.add().CopyFrom(added.pop(k))
            if out.ir_version < 4:
                t = graph.initializer[-1]
                graph.input.append(helper.make_tensor_value_info(k, t.data_type, list(t.dims)))
        self.ensures(out, before)
        return out, True

    def _fresh(self, model: ModelProto, nodes: list[NodeProto], replaced: set[str]) -> ModelProto:
        """The student without the teacher's arena: replaced weights that nothing reads any more are
        left out (Cleanup would drop them anyway, in the same order), everything else is copied.
        `replaced` holds every input of the replaced nodes, subgraph layers' included."""
        src = model.graph
        dropped = (replaced - _referenced(src, nodes)) & {t.name for t in src.initializer}
        out = ModelProto()
        _copy_fields(model, out, {"graph"})
        _copy_fields(src, out.graph, {"node", "initializer", "input"})
        out.graph.node.extend(nodes)
        out.graph.input.extend(v for v in src.input if v.name not in dropped)
        for t in src.initializer:  # one at a time: the copy's transient is one tensor, not all of them
            if t.name not in dropped:
                out.graph.initializer.add().CopyFrom(t)
        return out

    def ensures(self, model: ModelProto, before: list[tuple[str, bytes]]) -> None:
        if _signature(model) != before:
            raise PassError(self.name, "graph outputs changed")
