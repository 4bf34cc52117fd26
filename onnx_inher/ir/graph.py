"""A read-only index over one graph: who produces and consumes each tensor, and constant folding
of the small chains exporters put between a weight and its consumer.

Exporters store the same weight in many ways: an initializer, a `Constant` node, an initializer
behind `Identity`/`Transpose`/`Cast`/`Reshape`, or a `ConstantOfShape` (the onnx `light` models).
`GraphIndex.constant` folds those chains with numpy so every pass sees one dense array.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import GraphProto, NodeProto, numpy_helper

from onnx_inher.ir.naming import node_ids, qualified

FOLDABLE = frozenset(
    {"Identity", "Transpose", "Cast", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "ConstantOfShape"}
)
QUANTIZED = frozenset({"DequantizeLinear", "QuantizeLinear", "DynamicQuantizeLinear"})
# What a user can do with a quantised layer, said wherever one is skipped.
QUANTISED_ADVICE = ("compress the float model it was quantised from (or dequantise it), then quantise the student "
                    "the same way (e.g. onnxruntime.quantization.quantize_dynamic)")


@dataclass(frozen=True)
class Constant:
    """A folded constant: its value, the tensor at the root of the chain, and the chain's ops."""

    value: np.ndarray
    root: str
    chain: tuple[str, ...]


@dataclass(frozen=True)
class NotConstant:
    """Why a tensor is not a foldable constant (shown to users as a skip reason)."""

    reason: str
    quantized: bool = False


def default_opset(model: onnx.ModelProto, missing: int = 1) -> int:
    """The model's default-domain (`ai.onnx`) opset; `missing` when it declares none."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), missing)


def attr(node: NodeProto, name: str, default: object = None) -> object:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _constant_node_value(node: NodeProto) -> np.ndarray | None:
    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name == "value_float":
            return np.array(a.f, dtype=np.float32)
        if a.name == "value_floats":
            return np.array(list(a.floats), dtype=np.float32)
        if a.name == "value_int":
            return np.array(a.i, dtype=np.int64)
        if a.name == "value_ints":
            return np.array(list(a.ints), dtype=np.int64)
    return None


MAIN = ""  # the scope path of the main graph


def holder_key(node: NodeProto) -> str:
    """What identifies a subgraph-holding node among its graph's consumers (If/Loop/Scan have outputs)."""
    return node.output[0] if node.output else node.name


def subgraphs(node: NodeProto) -> Iterator[tuple[str, GraphProto]]:
    """(attribute label, graph) for each subgraph of a node: `then_branch`, or `name[k]` in a graph list."""
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.name, a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            for k, g in enumerate(a.graphs):
                yield f"{a.name}[{k}]", g


def walk_scopes(graph: GraphProto, path: str = MAIN) -> Iterator[tuple[str, GraphProto, str | None]]:
    """(path, graph, parent path) for a graph and, depth first in node order, every subgraph in it.

    Paths are `<holder node id>/<attribute>` joined from the main graph down (`Loop_0/body/If_1/else_branch`),
    so they are deterministic and name the place a person would look in a viewer. The main graph's
    parent is None."""
    yield path, graph, None
    for node, nid in zip(graph.node, node_ids(graph), strict=True):
        for label, sub in subgraphs(node):
            child = qualified(path, f"{nid}/{label}")
            for found in walk_scopes(sub, child):
                yield found if found[2] is not None else (found[0], found[1], path)


def child_paths(node: NodeProto, nid: str, path: str) -> list[str]:
    """The scope paths of a node's subgraphs (as `walk_scopes` names them)."""
    return [qualified(path, f"{nid}/{label}") for label, _ in subgraphs(node)]


@dataclass
class GraphIndex:
    """Producers, consumers and initializers of one graph (not its subgraphs).

    A subgraph's index knows its enclosing graph's (`outer`): a name the subgraph neither holds nor
    receives as an input is read from the outer scope, so its weights fold there. `children` gives,
    per subgraph-holding node (`holder_key`), the indexes of its subgraphs."""

    graph: GraphProto
    producer: dict[str, NodeProto] = field(default_factory=dict)
    consumers: dict[str, list[NodeProto]] = field(default_factory=lambda: defaultdict(list))
    initializers: dict[str, onnx.TensorProto] = field(default_factory=dict)
    _cache: dict[str, Constant | NotConstant] = field(default_factory=dict)
    outer: GraphIndex | None = None
    scope: str = MAIN
    inputs: frozenset[str] = frozenset()
    children: dict[str, list[GraphIndex]] = field(default_factory=dict)

    @classmethod
    def build(cls, graph: GraphProto, outer: GraphIndex | None = None, scope: str = MAIN) -> GraphIndex:
        index = cls(graph=graph, outer=outer, scope=scope, inputs=frozenset(i.name for i in graph.input))
        index.initializers = {t.name: t for t in graph.initializer}
        for node in graph.node:
            for out in node.output:
                if out:
                    index.producer[out] = node
            for name in node.input:
                if name:
                    index.consumers[name].append(node)
            for sub_input in _outer_scope_inputs(node):
                index.consumers[sub_input].append(node)
        for out in graph.output:
            index.consumers[out.name]
        return index

    def graph_output_names(self) -> set[str]:
        return {o.name for o in self.graph.output}

    def defines(self, name: str) -> bool:
        """Whether this graph itself holds `name` (an initializer, an input or a node output)."""
        return name in self.initializers or name in self.producer or name in self.inputs

    def owner(self, name: str) -> GraphIndex:
        """The index of the graph whose scope `name` belongs to: this one or the nearest enclosing one
        that defines it (ONNX names do not shadow outer ones)."""
        index: GraphIndex | None = self
        while index is not None:
            if index.defines(name):
                return index
            index = index.outer
        return self

    def constant(self, name: str) -> Constant | NotConstant:
        """Fold `name` to a numpy array if it is a constant reachable through foldable ops."""
        if name not in self._cache:
            self._cache[name] = self._fold(name)
        return self._cache[name]

    def _fold(self, name: str) -> Constant | NotConstant:
        if name in self.initializers:
            return Constant(numpy_helper.to_array(self.initializers[name]), name, ())
        node = self.producer.get(name)
        if node is None:
            if self.outer is not None and name not in self.inputs:
                return self.outer.constant(name)  # read from the enclosing scope
            if self.outer is not None:
                return NotConstant(f"'{name}' is an input of the subgraph (a loop state or a scanned slice), "
                                   "not a constant weight")
            return NotConstant(f"'{name}' is a graph input, not a constant weight")
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            value = _constant_node_value(node)
            if value is None:
                return NotConstant(f"Constant node '{node.name}' holds no dense tensor")
            return Constant(value, name, ())
        if node.op_type in QUANTIZED:
            return NotConstant(f"weight is quantised (behind {node.op_type} '{node.name}'): {QUANTISED_ADVICE}",
                               quantized=True)
        if node.op_type not in FOLDABLE:
            return NotConstant(f"weight is computed by {node.op_type} '{node.name}', not a constant")
        parents: list[Constant] = []
        for inp in node.input:
            if not inp:
                continue
            folded = self.constant(inp)
            if isinstance(folded, NotConstant):
                return folded
            parents.append(folded)
        value = _apply(node, [p.value for p in parents])
        root = parents[0].root if parents else name
        chain = (*parents[0].chain, node.op_type) if parents else (node.op_type,)
        return Constant(value, root, chain)


def scope_graph(graph: GraphProto, scope: str) -> GraphProto:
    """The graph at a scope path (`walk_scopes`; MAIN is `graph` itself), e.g. to find a subgraph layer's node
    as `scope_graph(model.graph, view.scope).node[view.node_index]`."""
    if scope == MAIN:
        return graph
    for path, g, _ in walk_scopes(graph):
        if path == scope:
            return g
    raise KeyError(f"no subgraph '{scope}' in graph '{graph.name}'")


def index_scopes(graph: GraphProto) -> dict[str, GraphIndex]:
    """An index for the main graph and every subgraph, by scope path (`walk_scopes` order); each
    subgraph's index reads outer names through its parent's, and each holder lists its children."""
    out: dict[str, GraphIndex] = {}
    for path, g, parent in walk_scopes(graph):
        outer = out[parent] if parent is not None else None
        out[path] = GraphIndex.build(g, outer, path)
    for path, g, _ in walk_scopes(graph):
        index = out[path]
        for node, nid in zip(g.node, node_ids(g), strict=True):
            subs = [out[p] for p in child_paths(node, nid, path)]
            if subs:
                index.children[holder_key(node)] = subs
    return out


def op_types(graph: onnx.GraphProto) -> set[str]:
    """Op types of a graph and of every subgraph in it (If branches, Loop and Scan bodies)."""
    found = set()
    for node in graph.node:
        found.add(node.op_type)
        for a in node.attribute:
            for g in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                found |= op_types(g)
    return found


def _outer_scope_inputs(node: NodeProto) -> set[str]:
    """Names a node's subgraphs read from the enclosing scope (they keep those tensors alive)."""
    names: set[str] = set()
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        for g in graphs:
            local = {i.name for i in g.input} | {t.name for t in g.initializer}
            for n in g.node:
                local.update(n.output)
            for n in g.node:
                names.update(i for i in n.input if i and i not in local)
                names.update(_outer_scope_inputs(n) - local)
            names.update(o.name for o in g.output if o.name not in local)
    return names


def _apply(node: NodeProto, inputs: list[np.ndarray]) -> np.ndarray:
    op = node.op_type
    if op == "Identity":
        return inputs[0]
    if op == "Transpose":
        perm = attr(node, "perm")
        return np.transpose(inputs[0], perm if perm is None else list(perm))  # type: ignore[arg-type]
    if op == "Cast":
        to = int(attr(node, "to"))  # type: ignore[arg-type]
        return inputs[0].astype(onnx.helper.tensor_dtype_to_np_dtype(to))
    if op == "Reshape":
        shape = [int(s) for s in inputs[1]]
        shape = [inputs[0].shape[i] if s == 0 else s for i, s in enumerate(shape)]
        return inputs[0].reshape(shape)
    if op == "Flatten":
        axis = int(attr(node, "axis", 1))  # type: ignore[arg-type]
        x = inputs[0]
        axis = axis % max(x.ndim, 1) if axis < 0 else axis
        return x.reshape(int(np.prod(x.shape[:axis])), -1)
    if op in ("Squeeze", "Unsqueeze"):
        axes = attr(node, "axes")
        if axes is None and len(inputs) > 1:
            axes = [int(a) for a in inputs[1]]
        if op == "Squeeze":
            return np.squeeze(inputs[0], axis=None if axes is None else tuple(axes))  # type: ignore[arg-type]
        out = inputs[0]
        rank = out.ndim + len(axes)  # type: ignore[arg-type]
        for a in sorted(int(a) % rank for a in axes):  # type: ignore[union-attr]
            out = np.expand_dims(out, a)
        return out
    if op == "ConstantOfShape":
        value = attr(node, "value")
        fill = numpy_helper.to_array(value) if value is not None else np.zeros(1, np.float32)
        return np.full([int(s) for s in inputs[0]], fill.reshape(-1)[0], dtype=fill.dtype)
    raise AssertionError(f"unfoldable op {op}")
