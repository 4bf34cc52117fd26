"""Which constant tensors of a graph are weights (learned values), judged by how they are used.

A float constant is not necessarily a weight: exporters also store Resize scales, Clip bounds, Pow
exponents, the attention scale, GELU's constants, LayerNorm epsilons and the `-3.4e38` mask fill as float
tensors. Training those breaks models: a Resize scale moved by an optimizer step makes ONNX Runtime
refuse the graph, a decayed mask fill overflows to NaN. So a tensor is a weight only when it reaches (also
through Identity/Cast/Transpose/Reshape-like ops, and inside If/Loop/Scan bodies) one of the slots below;
everything else stays a constant whatever the trainable mode.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

import onnx
from onnx import GraphProto, ModelProto

# op type -> input positions that hold learned values (None: every input)
WEIGHT_SLOTS: dict[str, frozenset[int] | None] = {
    "MatMul": frozenset({0, 1}), "Gemm": frozenset({0, 1, 2}), "Einsum": None,
    "Conv": frozenset({1, 2}), "ConvTranspose": frozenset({1, 2}),
    "BatchNormalization": frozenset({1, 2}), "InstanceNormalization": frozenset({1, 2}),
    "LayerNormalization": frozenset({1, 2}), "GroupNormalization": frozenset({1, 2}),
    "SkipLayerNormalization": frozenset({2, 3, 4}), "SimplifiedLayerNormalization": frozenset({1}),
    "PRelu": frozenset({1}), "Gather": frozenset({0}),
    "LSTM": frozenset({1, 2, 3, 7}), "GRU": frozenset({1, 2, 3}), "RNN": frozenset({1, 2, 3}),
}
# Elementwise ops whose constant operand is a learned bias or scale when it has more than one element
# (a channel axis); a scalar there is a fixed constant (scales, epsilons, mask fills).
ELEMENTWISE = frozenset({"Add", "Mul"})
# Ops that pass a weight on unchanged in value: look through them to the real consumer.
PASS_THROUGH = frozenset({"Identity", "Cast", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten",
                          "Expand", "Tile", "Concat", "Split", "Slice"})


def _graphs(graph: GraphProto) -> Iterator[GraphProto]:
    yield graph
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from _graphs(g)


def _size(node_or_tensor: onnx.TensorProto) -> int:
    n = 1
    for d in node_or_tensor.dims:
        n *= d
    return n


def weight_names(model: ModelProto) -> set[str]:
    """Names of the initializers and `Constant` outputs (subgraphs included) used as learned values."""
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
    sizes: dict[str, int] = {}
    for graph in _graphs(model.graph):
        for t in graph.initializer:
            sizes[t.name] = _size(t)
        for node in graph.node:
            for i, name in enumerate(node.input):
                if name:
                    consumers[name].append((node, i))
            if node.op_type == "Constant" and node.output:
                value = next((a for a in node.attribute if a.name in ("value", "value_floats")), None)
                if value is not None:
                    sizes[node.output[0]] = _size(value.t) if value.name == "value" else len(value.floats)
    return {name for name in sizes if _reaches_a_weight_slot(name, sizes[name], consumers)}


def _reaches_a_weight_slot(name: str, size: int, consumers: dict[str, list[tuple[onnx.NodeProto, int]]]) -> bool:
    frontier, seen = [name], {name}
    while frontier:
        tensor = frontier.pop()
        for node, i in consumers.get(tensor, []):
            slots = WEIGHT_SLOTS.get(node.op_type, frozenset())
            if slots is None or i in slots or (node.op_type in ELEMENTWISE and size > 1):
                return True
            if node.op_type in PASS_THROUGH and i == 0:
                for out in node.output:
                    if out and out not in seen:
                        seen.add(out)
                        frontier.append(out)
    return False
