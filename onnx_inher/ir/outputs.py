"""What each graph output holds, read from the graph: class probabilities, log-probabilities, logits, or other.

Distillation picks its loss and evaluation its metric from this, so both agree on which axis holds the
classes and on whether a softmax has already been applied.

The rule, in order (the first that applies decides; `reason` says which one did):

1. **declared**: the user named the output's loss (`--loss OUT=kd|kl` says classes, `mse|cosine|pooled` says
   features); classes declared on an output the graph does not explain get the last axis as the class axis.
2. **probabilities / log-probabilities**: the output is a `Softmax` / `LogSoftmax`, seen through ops that only
   move or rename data (Identity, Cast, Transpose, Reshape, Flatten, Squeeze, Unsqueeze). The class axis is
   the op's `axis`, followed through those ops. Before opset 13 Softmax normalises everything from `axis` on
   as one flattened axis; that is a class axis only when `axis` is the last one.
3. **logits**: the output is made by a linear layer (MatMul, Gemm, Conv, ConvTranspose), seen through the ops
   of rule 2, a constant bias or scale (Add/Sub/Mul/Div with a constant) and, for 4-D outputs, Resize/Upsample;
   it is `[N,C]`, `[N,T,C]` (MatMul; `[N,C,T]` from a 1-D Conv) or `[N,C,H,W]`, with C > 1 classes (C unknown
   is accepted); and its name does not say it is something else (`FEATURE_HINTS`: embeddings, hidden
   states, boxes, key points..., unless it also says class scores: `logits_per_image`). Nothing in a graph
   tells class scores from a regression made by the same kind of layer, so this is a judgement: an
   exported network whose last op is a bare linear layer is most often a classifier head, while embedding
   and encoder outputs end in a normalisation, an activation or a pooling. A regression head ending in a
   bare linear layer (e.g. an RGB image from a last Conv) is misread as logits: declare it with
   `--loss OUT=mse`. The rank of the output must be known from the graph for this rule.
4. **named logits**: a 2-D or 3-D output whose name says class scores (`LOGIT_HINTS`: logit, score, class)
   gets the last axis, whatever made it.
5. **labels**: when the data carries class labels, a 2-D output `[N,C]` is taken as logits.
6. everything else is **other** (features, regression, embeddings): a cosine-type loss and metric.

Pure onnx: no model is run, no weight data is read (models loaded without external data work).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import onnx
from onnx import ModelProto

from onnx_inher.ir.graph import FOLDABLE, GraphIndex, attr, default_opset
from onnx_inher.ir.shapes import Dim, TensorInfo, infer

PROBABILITIES, LOG_PROBABILITIES, LOGITS, OTHER = "probabilities", "log_probabilities", "logits", "other"
KINDS = (PROBABILITIES, LOG_PROBABILITIES, LOGITS, OTHER)
# Ops that move or relabel values without changing them (the class axis is followed through them).
MOVES = frozenset({"Identity", "Cast", "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze"})
# Ops a logits head may end with after its linear layer, when one operand is a constant (bias, scale).
AFFINE = frozenset({"Add", "Sub", "Mul", "Div"})
SPATIAL = frozenset({"Resize", "Upsample"})
LINEAR = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose"})
LOGIT_HINTS = ("logit", "score", "class")
FEATURE_HINTS = ("embed", "hidden", "feature", "pool", "encod", "vector", "box", "regress", "coord", "landmark",
                 "keypoint", "depth", "heatmap", "offset", "flow", "image", "pixel")
DECLARED_CLASSES, DECLARED_FEATURES = "classes", "features"


@dataclass(frozen=True)
class OutputKind:
    """One graph output: its kind, the class axis (non-negative; None for `other`), rank and class count."""

    name: str
    kind: str
    class_axis: int | None
    rank: int | None
    classes: int | None
    reason: str

    @property
    def is_classes(self) -> bool:
        return self.kind != OTHER

    @property
    def space(self) -> str:
        """What a KL loss reads: logits (also for `other` outputs a user declared as classes), probabilities
        (the log is taken, no second softmax) or log-probabilities."""
        return self.kind if self.kind in (PROBABILITIES, LOG_PROBABILITIES) else LOGITS

    @property
    def position_axes(self) -> int:
        """How many axes besides the batch and class axes: 0 for [N,C], 1 for [N,T,C], 2 for [N,C,H,W]."""
        return max((self.rank or 2) - 2, 0)


def _is_constant(index: GraphIndex, name: str, depth: int = 0) -> bool:
    """Whether `name` is a constant (initializer, Constant node, or a foldable chain of them), read from the
    graph's structure only."""
    if name in index.initializers:
        return True
    node = index.producer.get(name)
    if node is None or depth > 16:
        return False
    if node.op_type == "Constant":
        return True
    return node.op_type in FOLDABLE and all(_is_constant(index, i, depth + 1) for i in node.input if i)


def _dims(table: dict[str, TensorInfo], name: str) -> tuple[Dim, ...] | None:
    info = table.get(name)
    return info.dims if info is not None else None


def _through_reshape(axis: int, before: tuple[Dim, ...] | None, after: tuple[Dim, ...] | None) -> int | None:
    """Where axis `axis` of `before` lands in `after` when a reshape keeps it whole, else None."""
    if before is None or after is None or not 0 <= axis < len(before):
        return None
    size = before[axis]
    if before[: axis + 1] == after[: axis + 1] and None not in before[: axis + 1]:
        return axis  # the same leading axes, the class axis among them
    tail = len(before) - axis
    if len(after) >= tail and before[axis:] == after[len(after) - tail:] and None not in before[axis:]:
        return len(after) - tail  # the same trailing axes
    if all(isinstance(d, int) for d in (*before, *after)):
        lead = 1
        for d in before[:axis]:
            lead *= int(d)  # type: ignore[arg-type]
        acc = 1
        for j, d in enumerate(after):
            if acc == lead and d == size:
                return j
            acc *= int(d)  # type: ignore[arg-type]
    return None


def _follow(axis: int, node: onnx.NodeProto, data: str, table: dict[str, TensorInfo]) -> int | None:
    """The class axis after `node` (a move, an affine op or a resize), or None if it cannot be followed."""
    op = node.op_type
    if op == "Transpose":
        perm = attr(node, "perm")
        rank = len(_dims(table, node.output[0]) or ())
        perm = list(perm) if perm is not None else list(reversed(range(rank)))  # type: ignore[arg-type]
        return perm.index(axis) if axis in perm else None
    if op in ("Reshape", "Flatten", "Squeeze", "Unsqueeze"):
        return _through_reshape(axis, _dims(table, data), _dims(table, node.output[0]))
    if op in AFFINE:
        before, after = _dims(table, data), _dims(table, node.output[0])
        if before is not None and after is not None and len(after) > len(before):
            return axis + len(after) - len(before)  # broadcasting added leading axes
    return axis


Step = tuple[onnx.NodeProto, str]  # a node walked through and its data input


def _chain(index: GraphIndex, name: str, extra: frozenset[str]) -> tuple[onnx.NodeProto | None, list[Step]]:
    """Walk back from `name` through moves (and the `extra` ops, affine ones only with a constant operand):
    the first other producer (None for a graph input) and the nodes walked through with their data input,
    output side last."""
    walked: list[Step] = []
    node = index.producer.get(name)
    while node is not None:
        if node.op_type in MOVES and node.input:
            data = node.input[0]
        elif node.op_type in extra & AFFINE:
            ins = [i for i in node.input if i]
            varying = [i for i in ins if not _is_constant(index, i)]
            if len(ins) != 2 or len(varying) != 1:
                break
            data = varying[0]
        elif node.op_type in extra & SPATIAL and node.input:
            data = node.input[0]
        else:
            break
        walked.append((node, data))
        node = index.producer.get(data)
    return node, walked[::-1]




def _normalised(axis: int, rank: int | None) -> int | None:
    if rank is None:
        return axis if axis >= 0 else None
    return axis + rank if -rank <= axis < 0 else axis if 0 <= axis < rank else None


def softmax_axis_attr(node: onnx.NodeProto, model: ModelProto) -> int:
    """A Softmax/LogSoftmax node's `axis` as written, or the default of the model's opset (-1 from 13, else 1)."""
    return int(attr(node, "axis", -1 if default_opset(model, missing=13) >= 13 else 1))  # type: ignore[arg-type]


def _softmax_axis(node: onnx.NodeProto, model: ModelProto, table: dict[str, TensorInfo]) -> tuple[int | None, str]:
    rank = len(d) if (d := _dims(table, node.input[0])) is not None else None
    opset = default_opset(model, missing=13)
    raw = softmax_axis_attr(node, model)
    axis = _normalised(raw, rank)
    if axis is None:
        return None, f"{node.op_type} axis {raw} on an input of unknown rank"
    if opset < 13 and rank is not None and axis != rank - 1:
        return None, f"{node.op_type} (opset {opset}) normalises axes {axis}..{rank - 1} flattened together"
    return axis, ""


def _linear_axis(node: onnx.NodeProto) -> int:
    return 1 if node.op_type in ("Gemm", "Conv", "ConvTranspose") else -1


def _classes(dims: tuple[Dim, ...] | None, axis: int | None) -> int | None:
    if dims is None or axis is None or not 0 <= axis < len(dims):
        return None
    d = dims[axis]
    return d if isinstance(d, int) else None


def _kind(index: GraphIndex, model: ModelProto, table: dict[str, TensorInfo], name: str, rank: int | None,
          labels: bool) -> OutputKind:
    dims = _dims(table, name) or None

    def make(kind: str, axis: int | None, reason: str) -> OutputKind:
        return OutputKind(name, kind, axis, rank, _classes(dims, axis), reason)

    def followed(source_axis: int | None, walked: list[Step]) -> int | None:
        axis = source_axis
        for node, data in walked:
            if axis is None:
                return None
            axis = _follow(axis, node, data, table)
        return axis

    source, walked = _chain(index, name, frozenset())
    if source is not None and source.op_type in ("Softmax", "LogSoftmax"):
        kind = PROBABILITIES if source.op_type == "Softmax" else LOG_PROBABILITIES
        axis, why = _softmax_axis(source, model, table)
        axis = followed(axis, walked)
        if axis is None:
            return make(OTHER, None, why or f"{source.op_type} '{source.name}': its axis is lost in a reshape")
        c = _classes(dims, axis)
        if c == 1:
            return make(OTHER, None, f"{source.op_type} over a single class")
        return make(kind, axis, f"{source.op_type} '{source.name}' over axis {axis}"
                    + (f" (through {', '.join(n.op_type for n, _ in walked)})" if walked else ""))
    lowered = name.lower()
    logit_named = any(h in lowered for h in LOGIT_HINTS)
    feature_named = any(h in lowered for h in FEATURE_HINTS) and not logit_named
    source, walked = _chain(index, name, AFFINE | (SPATIAL if rank == 4 else frozenset()))
    if source is not None and source.op_type in LINEAR and rank in (2, 3, 4) and not feature_named:
        src_rank = len(d) if (d := _dims(table, source.output[0])) is not None else rank
        axis = followed(_normalised(_linear_axis(source), src_rank), walked)
        c = _classes(dims, axis)
        good_axis = axis is not None and (axis == 1 if rank == 4 else axis in (1, rank - 1))
        if good_axis and (c is None or c > 1):
            return make(LOGITS, axis, f"{source.op_type} '{source.name}' is a linear head, classes on axis {axis}")
    if rank in (2, 3) and logit_named and _classes(dims, rank - 1) != 1:
        return make(LOGITS, rank - 1, "named like class scores")
    if labels and rank == 2 and _classes(dims, 1) != 1:
        return make(LOGITS, 1, "a 2-D output, and the data has class labels")
    return make(OTHER, None, "features or a regression (not a softmax, nor a linear class head)")


def detect(model: ModelProto, *, labels: bool = False, declared: Mapping[str, str] | None = None,
           table: dict[str, TensorInfo] | None = None) -> list[OutputKind]:
    """The kind of every graph output, in graph order (see the module docstring for the rule).

    `labels`: the data carries class labels; `declared`: output name -> "classes" or "features", what the user
    said (see `declared_roles`); `table`: shape inference already done on `model`.
    """
    index = GraphIndex.build(model.graph)
    table = infer(model) if table is None else table
    declared = declared or {}
    out = []
    for o in model.graph.output:
        dims = _dims(table, o.name) or None  # no dims: unknown (some exporters write an empty shape)
        rank = len(dims) if dims is not None else None
        found = _kind(index, model, table, o.name, rank, labels)
        role = declared.get(o.name)
        if role == DECLARED_FEATURES and found.is_classes:
            found = OutputKind(o.name, OTHER, None, rank, None, f"declared as features (was: {found.kind})")
        elif role == DECLARED_CLASSES and not found.is_classes:
            axis = (rank - 1) if rank else -1
            found = OutputKind(o.name, LOGITS, axis, rank, _classes(dims, axis), "declared as class scores")
        out.append(found)
    return out


CLASS_LOSSES = ("kd", "kl", "ctc")  # the loss kinds that read class scores (the trainer's too)


def declared_roles(losses: Mapping[str, str]) -> dict[str, str]:
    """`--loss OUT=KIND[:W]` specs -> what they say about each output: kd/kl/ctc mean classes, others
    features."""
    return {name: DECLARED_CLASSES if spec.partition(":")[0] in CLASS_LOSSES else DECLARED_FEATURES
            for name, spec in losses.items()}
