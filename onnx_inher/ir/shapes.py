"""Shape inference as a lookup table: tensor name -> (dims, dtype).

Dynamic dims stay symbolic (`str`) or unknown (`None`); FLOP counts resolve them through a
user-given mapping (default 1 per symbol), so the plan states the basis its numbers assume.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import ModelProto

Dim = int | str | None


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


def infer(model: ModelProto) -> dict[str, TensorInfo]:
    """Run ONNX shape inference on a copy-free basis and index every typed value of the main graph."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
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
