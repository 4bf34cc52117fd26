"""Shape inference as a lookup table: tensor name -> (dims, dtype).

Dynamic dims stay symbolic (`str`) or unknown (`None`); FLOP counts resolve them through a
user-given mapping (default 1 per symbol), so the plan states the basis its numbers assume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import onnx
from onnx import ModelProto, TensorProto

Dim = int | str | None

# Float initializers at least this large are weights: no operator reads the values of such a tensor to
# infer a shape (value-dependent inputs - Resize/Upsample scales, Range and OneHot scalars, int64 shape
# vectors - hold a few numbers), so shape inference runs on a skeleton without their data.
WEIGHT_MIN_ELEMENTS = 4096
WEIGHT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16})


@dataclass(frozen=True)
class TensorInfo:
    dims: tuple[Dim, ...] | None
    elem_type: int


def _dims(t: onnx.TypeProto) -> tuple[Dim, ...] | None:
    if not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
        return None
    out: list[Dim] = []
    for d in t.tensor_type.shape.dim:
        if d.HasField("dim_value") and d.dim_value > 0:
            out.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            out.append(d.dim_param)
        else:
            out.append(None)
    return tuple(out)


def _is_repeated(fd: object) -> bool:
    flag = getattr(fd, "is_repeated", None)  # protobuf >= 5.29; older ones only have `label`
    return bool(flag) if flag is not None else fd.label == fd.LABEL_REPEATED  # type: ignore[attr-defined]


def _copy_fields(dst: object, src: object, skip: str) -> None:
    """Copy every set field of message `src` except `skip` into `dst` (same message type)."""
    for fd, value in src.ListFields():  # type: ignore[attr-defined]
        if fd.name == skip:
            continue
        if _is_repeated(fd):
            getattr(dst, fd.name).extend(value)
        elif fd.message_type is not None:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def _is_weight(t: TensorProto) -> bool:
    return t.data_type in WEIGHT_TYPES and math.prod(t.dims) >= WEIGHT_MIN_ELEMENTS


def _skeleton(model: ModelProto) -> ModelProto:
    """`model` without the data of its weight initializers (name, type and dims kept).

    `infer_shapes` serialises its input, parses it in C++, and parses back a full copy of the result:
    with the weights inside, that is several transient copies of them. Stubs are marked EXTERNAL, as in
    a model loaded without its external data, so an operator that did read one would fail rather
    than see made-up values.
    """
    graph = model.graph
    if not any(_is_weight(t) for t in graph.initializer):
        return model
    skeleton = ModelProto()
    _copy_fields(skeleton, model, skip="graph")
    _copy_fields(skeleton.graph, graph, skip="initializer")
    for t in graph.initializer:
        if _is_weight(t):
            stub = skeleton.graph.initializer.add()
            stub.name, stub.data_type = t.name, t.data_type
            stub.dims.extend(t.dims)
            stub.data_location = TensorProto.EXTERNAL
        else:
            skeleton.graph.initializer.append(t)
    return skeleton


def infer(model: ModelProto) -> dict[str, TensorInfo]:
    """Run ONNX shape inference (on a skeleton without the weights' data) and index every typed value
    of the main graph."""
    try:
        inferred = onnx.shape_inference.infer_shapes(_skeleton(model), strict_mode=False, data_prop=True)
    except (onnx.shape_inference.InferenceError, ValueError, onnx.checker.ValidationError):
        inferred = model
    graph = inferred.graph
    table: dict[str, TensorInfo] = {}
    for vi in [*graph.input, *graph.value_info, *graph.output]:
        table[vi.name] = TensorInfo(_dims(vi.type), vi.type.tensor_type.elem_type)
    for t in graph.initializer:
        table.setdefault(t.name, TensorInfo(tuple(int(d) for d in t.dims), t.data_type))
    return table


def resolve(dims: tuple[Dim, ...], symbols: dict[str, int]) -> tuple[int, ...]:
    """Concrete dims for counting: symbols from the mapping, anything unknown counts as 1."""
    return tuple(d if isinstance(d, int) else symbols.get(d, 1) if isinstance(d, str) else 1 for d in dims)
