"""cleanup: drop what factorisation orphaned (weights, Constant nodes, weight chains).

Only constant-producing nodes (`Constant` and the foldable weight-chain ops fed by constants)
and unreferenced initializers are removed, so the pass never changes what the graph computes.
"""

from __future__ import annotations

import onnx
from onnx import ModelProto

from onnx_inher.errors import PassError
from onnx_inher.ir.graph import FOLDABLE, GraphIndex
from onnx_inher.ir.io import copy_model

REMOVABLE = FOLDABLE | {"Constant"}


def _used_names(graph: onnx.GraphProto) -> set[str]:
    index = GraphIndex.build(graph)
    return {name for name, users in index.consumers.items() if users} | {o.name for o in graph.output}


class Cleanup:
    name = "cleanup"

    def __init__(self, *, inplace: bool = False) -> None:
        self.inplace = inplace

    def __call__(self, model: ModelProto) -> tuple[ModelProto, bool]:
        out = model if self.inplace else copy_model(model)
        graph = out.graph
        changed = False
        while True:
            used = _used_names(graph)
            constants = {t.name for t in graph.initializer} | {
                o for n in graph.node if n.op_type in REMOVABLE for o in n.output}
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
        self.ensures(graph)
        return out, changed

    def ensures(self, graph: onnx.GraphProto) -> None:
        available = {i.name for i in graph.input} | {t.name for t in graph.initializer}
        for n in graph.node:
            missing = [x for x in n.input if x and x not in available]
            if missing:
                raise PassError(self.name, f"node '{n.name}' reads '{missing[0]}', which nothing produces "
                                "(or the graph is not topologically sorted)")
            available.update(n.output)

