"""cleanup: drop what factorisation orphaned (weights, Constant nodes, weight chains).

Only constant-producing nodes (`Constant` and the foldable weight-chain ops fed by constants)
and unreferenced initializers are removed, so the pass never changes what the graph computes.
"""

from __future__ import annotations

import onnx
from onnx import ModelProto

from onnx_inher.errors import PassError
from onnx_inher.ir.graph import FOLDABLE, MAIN, GraphIndex, subgraphs, walk_scopes
from onnx_inher.ir.io import copy_model

REMOVABLE = FOLDABLE | {"Constant"}


def _used_names(graph: onnx.GraphProto) -> set[str]:
    index = GraphIndex.build(graph)
    return {name for name, users in index.consumers.items() if users} | {o.name for o in graph.output}


class Cleanup:
    """Pass: drop orphaned constants in the main graph and in every If/Loop/Scan subgraph.

    Subgraphs are cleaned before the graphs holding them (a dead weight chain inside a branch may be the
    last reader of an outer weight), and a subgraph's own inputs are never touched: a Loop or Scan body's
    inputs are positional."""

    name = "cleanup"

    def __init__(self, *, inplace: bool = False) -> None:
        self.inplace = inplace

    def __call__(self, model: ModelProto) -> tuple[ModelProto, bool]:
        out = model if self.inplace else copy_model(model)
        changed = False
        while True:
            scopes = list(walk_scopes(out.graph))
            constants: dict[str, set[str]] = {}
            for path, g, parent in scopes:  # what is constant as seen from each graph (outer ones included)
                constants[path] = _local_constants(g) | (constants[parent] if parent is not None else set())
            progress = False
            for path, g, _ in reversed(scopes):
                progress |= _clean_graph(g, constants[path], main=path == MAIN)
            changed |= progress
            if not progress or len(scopes) == 1:
                break
        self.ensures(out.graph)
        return out, changed

    def ensures(self, graph: onnx.GraphProto, outer: set[str] | None = None) -> None:
        """Every node (subgraph nodes included) reads only what is defined before it in its scope or
        an enclosing one."""
        available = set(outer or ()) | {i.name for i in graph.input} | {t.name for t in graph.initializer}
        for n in graph.node:
            missing = [x for x in n.input if x and x not in available]
            if missing:
                raise PassError(self.name, f"node '{n.name}' reads '{missing[0]}', which nothing produces "
                                "(or the graph is not topologically sorted)")
            for _, sub in subgraphs(n):
                self.ensures(sub, available)
            available.update(n.output)


def _local_constants(graph: onnx.GraphProto) -> set[str]:
    return {t.name for t in graph.initializer} | {o for n in graph.node if n.op_type in REMOVABLE for o in n.output}


def _clean_graph(graph: onnx.GraphProto, constants: set[str], *, main: bool) -> bool:
    """Drop one graph's dead constant nodes, unread initializers (and, in the main graph, their input
    entries) and stale value_info; whether anything was dropped."""
    changed = False
    while True:
        used = _used_names(graph)
        dead = [i for i, n in enumerate(graph.node)
                if n.op_type in REMOVABLE and n.domain in ("", "ai.onnx")
                and not any(o in used for o in n.output)
                and all(not x or x in constants for x in n.input)]
        if not dead:
            break
        for i in reversed(dead):
            del graph.node[i]
        changed = True
    used = _used_names(graph)
    keep = [t for t in graph.initializer if t.name in used]
    if len(keep) != len(graph.initializer):
        names = {t.name for t in keep}
        dropped = {t.name for t in graph.initializer} - names
        kept_tensors = list(keep)
        del graph.initializer[:]
        graph.initializer.extend(kept_tensors)
        if main:
            inputs = [i for i in graph.input if i.name not in dropped]
            del graph.input[:]
            graph.input.extend(inputs)
        changed = True
    produced = {o for n in graph.node for o in n.output} | {i.name for i in graph.input} | \
        {t.name for t in graph.initializer}
    stale = [v for v in graph.value_info if v.name not in produced]
    if stale:
        vis = [v for v in graph.value_info if v.name in produced]
        del graph.value_info[:]
        graph.value_info.extend(vis)
        changed = True
    return changed
