"""Deterministic names: everything we create derives from the node it replaces."""

from __future__ import annotations

from collections import Counter

from onnx import GraphProto, NodeProto


def node_ids(graph: GraphProto) -> list[str]:
    """A stable, unique id for every node: its name, or `op(first output)` when unnamed or clashing."""
    counts = Counter(n.name for n in graph.node if n.name)
    ids = []
    for node in graph.node:
        if node.name and counts[node.name] == 1:
            ids.append(node.name)
        else:
            ids.append(f"{node.op_type}({node.output[0] if node.output else ''})")
    return ids


def node_id(node: NodeProto, graph: GraphProto) -> str:
    return node_ids(graph)[list(graph.node).index(node)]
