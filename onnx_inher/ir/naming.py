"""Deterministic names: everything we create derives from the node it replaces.

A factorised layer's nodes and weights are named `<node>/<tag>/...`, with the tag saying which form
replaced it. Inside If/Loop/Scan subgraphs a node's id carries its scope path (`qualified`, e.g.
`Loop_0/body/MatMul_1`), so what is created for it is unique across the whole model too. The bridge
(which weights are factors), the benchmarks (which nodes replaced a layer) and the factorize pass
(which writes them) all read the tags from here.
"""

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


def qualified(path: str, name: str) -> str:
    """A node id or tensor name made unique across the model: subgraph names carry their scope path
    (sibling branches may reuse a local name); main-graph names (path "") are left exactly as they are."""
    return f"{path}/{name}" if path else name


def node_id(node: NodeProto, graph: GraphProto) -> str:
    return node_ids(graph)[list(graph.node).index(node)]


PAIR_TAG = "svd"
HEADS_TAG = "inher"
FACTOR_TAGS = (PAIR_TAG, HEADS_TAG)


def factor_tag(heads: int) -> str:
    """The tag of a replacement with `heads` up-projections (1: the plain pair)."""
    return HEADS_TAG if heads > 1 else PAIR_TAG


def is_factor(name: str) -> bool:
    """A node or weight created by compress (`<node>/svd/...`, `<node>/inher/...`)."""
    return any(f"/{tag}/" in name for tag in FACTOR_TAGS)
