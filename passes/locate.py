"""locate: find every dense layer (MatMul, Gemm, Conv, ConvTranspose) with a constant weight.

An analysis, not a rewrite: it returns `LayerView`s for layers that can be factorised and
`Skip`s, with a reason a person can act on, for every other MatMul/Gemm/Conv/ConvTranspose, in the
main graph and inside `If`/`Loop`/`Scan` subgraphs alike (streaming and multi-rate models keep their
layers there).
"""

from __future__ import annotations

from collections import ChainMap, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import numpy as np
import onnx
from onnx import ModelProto, NodeProto

from onnx_inher.errors import InputError
from onnx_inher.ir.graph import (
    FOLDABLE,
    MAIN,
    QUANTISED_ADVICE,
    Constant,
    GraphIndex,
    NotConstant,
    attr,
    holder_key,
    index_scopes,
)
from onnx_inher.ir.layers import ChannelsFirst, LayerView
from onnx_inher.ir.naming import node_ids, qualified
from onnx_inher.ir.shapes import TensorInfo, infer_graphs, resolve

DENSE_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose")
FLOAT_TYPES = (np.float16, np.float32, np.float64)


@dataclass(frozen=True)
class Skip:
    node: str
    op: str
    reason: str
    weight_shape: tuple[int, ...] = ()
    params: int = 0
    graph: str = ""  # the subgraph's path ("" for the main graph), as on `LayerView.scope`


def locate(model: ModelProto, symbols: dict[str, int] | None = None,
           counted: dict[str, TensorInfo] | None = None) -> list[LayerView | Skip]:
    """Views and skips for every dense node, in graph order: the main graph's, then each subgraph's
    (If branches, Loop and Scan bodies, nested ones too) in `ir.graph.walk_scopes` order.

    Row counts (FLOPs) come from the `counted` shape table when given (shapes at the real input shapes,
    `ir.shapes.infer(model, inputs)`), else from the model's inferred shapes; dynamic dims left in it
    resolve through `symbols` (default 1). The views' own dims are always the declared ones, so what
    `factorize` emits does not depend on the shape the plan was counted at. A subgraph layer's node id
    carries its scope path (`If_0/then_branch/MatMul_1`); its weight may be the subgraph's own or read
    from an enclosing graph, and a Loop/Scan body's FLOPs are those of one iteration."""
    symbols = symbols or {}
    indexes = index_scopes(model.graph)
    tables = infer_graphs(model)
    shapes = tables[MAIN]
    found = _scan(indexes[MAIN], shapes, Basis(counted if counted is not None else shapes, symbols))
    if len(indexes) > 1:
        real = _counted_subgraphs(model, counted, tables)
        for path, index in indexes.items():
            if path != MAIN:
                basis = Basis(_chain(index, real, counted if counted is not None else shapes), symbols)
                found.extend(_scan(index, _chain(index, tables, shapes), basis))
    _mark_shared(found, indexes)
    return found


def _scan(index: GraphIndex, shapes: Mapping[str, TensorInfo], basis: Basis) -> list[LayerView | Skip]:
    """The findings of one graph (not its subgraphs), with scope-qualified node ids."""
    found: list[LayerView | Skip] = []
    ids = node_ids(index.graph)
    for i, node in enumerate(index.graph.node):
        nid = qualified(index.scope, ids[i])
        if node.op_type in DENSE_OPS and node.domain in ("", "ai.onnx"):
            f = _view(node, i, nid, index, shapes, basis)
        elif node.op_type in INTEGER_OPS and node.domain in ("", "ai.onnx", "com.microsoft"):
            f = _skip(node, nid, f"an integer (quantised) layer: {QUANTISED_ADVICE}")
        else:
            continue
        if isinstance(f, LayerView):
            f.scope = index.scope
        elif index.scope:
            f = replace(f, graph=index.scope)
        found.append(f)
    return found


def _chain(index: GraphIndex, tables: Mapping[str, Mapping[str, TensorInfo]],
           main: Mapping[str, TensorInfo]) -> Mapping[str, TensorInfo]:
    """What a subgraph sees: its own values first, then each enclosing graph's, the main graph's last."""
    maps: list[Mapping[str, TensorInfo]] = []
    at: GraphIndex | None = index
    while at is not None:
        maps.append(main if at.scope == MAIN else tables.get(at.scope, {}))
        at = at.outer
    return ChainMap(*maps)  # type: ignore[arg-type]


def _counted_subgraphs(model: ModelProto, counted: Mapping[str, TensorInfo] | None,
                       tables: dict[str, dict[str, TensorInfo]]) -> dict[str, dict[str, TensorInfo]]:
    """Subgraph shape tables at the real input shapes when the main graph was counted at them (the
    `counted` table fixes every input), else the declared-shape tables."""
    if counted is None:
        return tables
    inputs = {}
    for inp in model.graph.input:
        info = counted.get(inp.name)
        if info is not None and info.dims and all(isinstance(d, int) for d in info.dims):
            inputs[inp.name] = [int(d) for d in info.dims]  # type: ignore[arg-type]
    return infer_graphs(model, inputs) if inputs else tables


# Dense layers computed in integers; their weights are int8/uint8, not factorisable as they are.
INTEGER_OPS = frozenset({"MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv", "DynamicQuantizeMatMul",
                         "MatMulIntegerToFloat", "QGemm", "DynamicQuantizeLSTM"})


def _dims(shapes: Mapping[str, TensorInfo], name: str) -> tuple | None:
    info = shapes.get(name)
    return info.dims if info is not None else None


@dataclass(frozen=True)
class Basis:
    """What row counts are computed at: a shape table and values for its named dims (others count 1)."""

    shapes: Mapping[str, TensorInfo]
    symbols: dict[str, int]

    def dims(self, name: str) -> tuple | None:
        return _dims(self.shapes, name)


def _count(dims: tuple | None, symbols: dict[str, int]) -> int:
    return int(np.prod(resolve(dims, symbols))) if dims else 1


def _weight(node: NodeProto, nid: str, index: GraphIndex, slot: int) -> Constant | NotConstant:
    folded = index.constant(node.input[slot])
    if isinstance(folded, Constant):
        if folded.value.dtype.type not in FLOAT_TYPES:
            return NotConstant(f"weight dtype {folded.value.dtype} is not a float type")
        if not np.all(np.isfinite(folded.value)):
            raise InputError(
                f"node '{nid}': weight '{folded.root}' contains NaN or Inf values; fix or retrain the "
                "model before compressing it."
            )
    return folded


def _view(node: NodeProto, i: int, nid: str, index: GraphIndex, shapes: Mapping, basis: Basis) -> LayerView | Skip:
    if node.op_type == "MatMul":
        return _matmul(node, i, nid, index, shapes, basis)
    if node.op_type == "Gemm":
        return _gemm(node, i, nid, index, shapes, basis)
    return _conv(node, i, nid, index, shapes, basis)


def _skip(node: NodeProto, nid: str, reason: str, w: Constant | None = None) -> Skip:
    shape = tuple(int(d) for d in w.value.shape) if w is not None else ()
    return Skip(nid, node.op_type, reason, shape, int(w.value.size) if w is not None else 0)


def _matmul(node, i, nid, index, shapes, basis) -> LayerView | Skip:
    right, left = _weight(node, nid, index, 1), _weight(node, nid, index, 0)
    if isinstance(right, Constant) and isinstance(left, Constant):
        return _skip(node, nid, "both inputs are constant (constant folding, not a layer)")
    side, w, x_name = ("right", right, node.input[0]) if isinstance(right, Constant) else ("left", left, node.input[1])
    if not isinstance(w, Constant):
        why = next((r for r in (right, left) if isinstance(r, NotConstant) and r.quantized), right)
        return _skip(node, nid, why.reason if isinstance(why, NotConstant) else "no constant weight")
    if w.value.ndim != 2:
        return _skip(node, nid, f"weight is {w.value.ndim}-D; only 2-D weights are factorised", w)
    x_dims, cx = _dims(shapes, x_name), basis.dims(x_name)
    if side == "right":
        n_in, n_out = w.value.shape
        rows = _count(cx[:-1] if cx else None, basis.symbols)
    else:
        n_out, n_in = w.value.shape
        rows = _count(cx[:-2] + cx[-1:] if cx and len(cx) >= 2 else None, basis.symbols)
    view = LayerView(nid, "MatMul", i, node.output[0], 1 if side == "right" else 0, w.root, w.chain, w.value, side, 1,
                     int(n_out), int(n_in), (), None, rows, rows, 1, len(x_dims) if x_dims else None,
                     _dims(shapes, node.output[0]), {})
    if side != "right":
        return view
    return _with_channels_first(_with_trailing_bias(view, node, index, lambda v: _class_vector(v, int(n_out))), index)


def _gemm(node, i, nid, index, shapes, basis) -> LayerView | Skip:
    attrs = {k: attr(node, k, d) for k, d in (("alpha", 1.0), ("beta", 1.0), ("transA", 0), ("transB", 0))}
    right, left = _weight(node, nid, index, 1), _weight(node, nid, index, 0)
    if isinstance(right, Constant) and isinstance(left, Constant):
        return _skip(node, nid, "both inputs are constant (constant folding, not a layer)")
    if isinstance(right, Constant):
        side, w, slot = "right", right, 1
        wm = w.value.T if attrs["transB"] else w.value
        n_in, n_out = wm.shape
        a_dims = basis.dims(node.input[0])
        rows = _count(a_dims[1:] if a_dims and attrs["transA"] else a_dims[:1] if a_dims else None, basis.symbols)
    elif isinstance(left, Constant):
        side, w, slot = "left", left, 0
        wm = w.value.T if attrs["transA"] else w.value
        n_out, n_in = wm.shape
        b_dims = basis.dims(node.input[1])
        rows = _count(b_dims[:1] if b_dims and attrs["transB"] else b_dims[1:] if b_dims else None, basis.symbols)
    else:
        return _skip(node, nid, right.reason if isinstance(right, NotConstant) else "no constant weight")
    bias = None
    attrs["c"] = node.input[2] if len(node.input) > 2 and node.input[2] else ""
    if attrs["c"]:
        c = index.constant(attrs["c"])
        # a bias: one value, or one per output along C's last axis ([M, 1] with M == N is per row, not a bias)
        if isinstance(c, Constant) and (c.value.size == 1 or (side == "right" and c.value.shape[-1:] == (n_out,)
                                                              and c.value.size == n_out)):
            bias = np.broadcast_to(c.value.reshape(-1), (n_out,)) * float(attrs["beta"])  # type: ignore[arg-type]
            attrs["c_size"] = int(c.value.size)  # as stored: a scalar C is broadcast, not n_out params
    view = LayerView(nid, "Gemm", i, node.output[0], slot, w.root, w.chain, w.value, side, 1, int(n_out), int(n_in), (),
                     bias, rows, rows, 1, 2, _dims(shapes, node.output[0]), attrs)
    return _with_trailing_bias(view, node, index, lambda v: _class_vector(v, int(n_out))) if side == "right" else view


def _conv(node, i, nid, index, shapes, basis) -> LayerView | Skip:
    w = _weight(node, nid, index, 1)
    if isinstance(w, NotConstant):
        return _skip(node, nid, w.reason)
    groups = int(attr(node, "group", 1))  # type: ignore[arg-type]
    value = w.value
    if value.ndim < 3:
        return _skip(node, nid, f"weight is {value.ndim}-D; Conv weights are at least 3-D", w)
    kernel = tuple(int(k) for k in value.shape[2:])
    k = int(np.prod(kernel))
    if node.op_type == "Conv":
        c_out, cin_g = value.shape[0], value.shape[1]
        out_g = c_out // groups
    else:
        cin_g, out_g = value.shape[0] // groups, value.shape[1]
    if cin_g == 1 and groups > 1:
        return _skip(node, nid, "depthwise convolution (one input channel per group): nothing to factorise", w)
    bias = None
    if len(node.input) > 2 and node.input[2]:
        b = index.constant(node.input[2])
        if isinstance(b, NotConstant):
            return _skip(node, nid, f"bias is not a constant ({b.reason})", w)
        bias = b.value
    x_dims, y_dims = _dims(shapes, node.input[0]), _dims(shapes, node.output[0])
    cx, cy, sym = basis.dims(node.input[0]), basis.dims(node.output[0]), basis.symbols
    batch = _count(cx[:1], sym) if cx else 1
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    view = LayerView(nid, node.op_type, i, node.output[0], 1, w.root, w.chain, value, "right", groups, int(out_g),
                     int(cin_g * k), kernel, bias, _count(cy[:1] + cy[2:] if cy else None, sym),
                     _count(cx[:1] + cx[2:] if cx else None, sym), batch,
                     len(x_dims) if x_dims else None, y_dims, attrs)
    return _with_trailing_bias(view, node, index,
                               lambda v: _channel_vector(v, groups * int(out_g), 2 + len(kernel)))


def _channel_vector(value: np.ndarray, channels: int, out_rank: int) -> np.ndarray | None:
    """`value` as one float per output channel of a conv output of rank `out_rank` (`[C, 1, 1]`,
    `[1, C, 1, 1]`), None when it broadcasts along any other axis."""
    if value.size != channels or value.ndim < out_rank - 1 or value.ndim > out_rank:
        return None
    if value.shape[value.ndim - (out_rank - 1)] != channels or not np.issubdtype(value.dtype, np.floating):
        return None
    return np.asarray(value, dtype=np.float32).reshape(-1)


def _class_vector(value: np.ndarray, classes: int) -> np.ndarray | None:
    """`value` as one float per output column of a MatMul/Gemm (`[C]`, `[1, ..., C]`), None otherwise."""
    if value.size != classes or value.ndim == 0 or value.shape[-1] != classes \
            or not np.issubdtype(value.dtype, np.floating):
        return None
    return np.asarray(value, dtype=np.float32).reshape(-1)


def _with_trailing_bias(view: LayerView, node: NodeProto, index: GraphIndex,
                        to_vector: Callable[[np.ndarray], np.ndarray | None]) -> LayerView:
    """`view` with the Add that alone reads the layer's output and adds a constant bias read by nothing else
    (how Paddle exports a conv's bias, and torch/Paddle a Linear's as MatMul + Add): its output and the bias
    as one value per output (`to_vector`). Mixed conv heads and class-split heads take it over."""
    found = _constant_after(node.output[0], index, "Add", to_vector)
    if found is not None and found.owned:
        view.trailing_add, view.trailing_bias = found.output, found.vector
    return view


@dataclass(frozen=True)
class _ConstantAfter:
    output: str  # the node's output
    vector: np.ndarray
    owned: bool  # no other node reads the constant


def _constant_after(name: str, index: GraphIndex, op: str, to_vector: Callable[[np.ndarray], np.ndarray | None]
                    ) -> _ConstantAfter | None:
    """The `op` node (Add, Mul) that alone reads `name` and combines it with a constant vector (`to_vector`),
    or None."""
    node = _only_user(name, index, op)
    other = [i for i in node.input if i != name] if node is not None else []
    if node is None or len(other) != 1:
        return None
    folded = index.constant(other[0])
    vector = None if isinstance(folded, NotConstant) else to_vector(folded.value)
    if vector is None:
        return None
    return _ConstantAfter(node.output[0], vector, len(index.consumers.get(other[0], [])) == 1)


def _only_user(name: str, index: GraphIndex, op: str) -> NodeProto | None:
    """The one node reading `name` when it is an `op` and `name` is not a graph output, else None."""
    users = index.consumers.get(name, [])
    if len(users) != 1 or users[0].op_type != op or name in index.graph_output_names():
        return None
    return users[0]


def _with_channels_first(view: LayerView, index: GraphIndex) -> LayerView:
    """`view` with the Transpose that takes its output (after its bias Add) back to channels-first, and the
    constant per-channel scales just before and after it (`ChannelsFirst`), when a 1x1 Conv can compute them:
    3- to 5-D activations, the last axis moved to axis 1 and the others kept in order, float32 weights (ONNX
    Runtime's CPU Conv takes no other float type, where its MatMul does). A scale other nodes read too stays
    in the file for them."""
    n = view.act_rank
    if n is None or not 3 <= n <= 5 or view.dtype != np.float32:
        return view
    at = view.trailing_add if view.trailing_bias is not None else view.output
    taken: list[str] = []
    scales: list[_ConstantAfter] = []
    before = _constant_after(at, index, "Mul", lambda v: _class_vector(v, view.out_features))
    if before is not None:
        at = before.output
        taken.append(at)
        scales.append(before)
    transpose = _only_user(at, index, "Transpose")
    perm = (0, n - 1, *range(1, n - 1))
    if transpose is None or tuple(attr(transpose, "perm", ())) != perm:  # type: ignore[arg-type]
        return view
    at = transpose.output[0]
    taken.append(at)
    after = _constant_after(at, index, "Mul", lambda v: _channel_vector(v, view.out_features, n))
    if after is not None:
        at = after.output
        taken.append(at)
        scales.append(after)
    scale = np.prod([c.vector for c in scales], axis=0).astype(np.float32) if scales else None
    lost = sum(int(c.vector.size) for c in scales if c.owned)
    view.channels_first = ChannelsFirst(perm, at, tuple(taken), scale, lost)
    return view


def _shared_key(v: LayerView, owner: str) -> str:
    """Layers with equal keys use one weight the same way, so they can share its factors. A weight held
    by a subgraph is qualified by that subgraph (sibling branches may reuse a local name)."""
    keyed = {k: v.attrs.get(k) for k in ("alpha", "transA", "transB", "group")}
    key = f"{v.weight_root}|{'/'.join(v.weight_chain)}|{v.op}|{v.side}|{v.groups}|{sorted(keyed.items())}"
    return f"{owner}::{key}" if owner else key


def _final_users(root: str, index: GraphIndex) -> set[str]:
    """Nodes (by output name, scope-qualified in subgraphs) that consume `root` directly or through
    foldable chains; a subgraph that reads it from the outer scope is looked into, so the users are
    the layers inside it rather than the If/Loop/Scan holding it."""
    users: set[str] = set()
    frontier = [root]
    while frontier:
        name = frontier.pop()
        if name in index.graph_output_names():
            users.add(f"graph output '{qualified(index.scope, name)}'")
        for consumer in index.consumers.get(name, []):
            if consumer.op_type in FOLDABLE and consumer.input and consumer.input[0] == name:
                frontier.extend(consumer.output)
                continue
            subs = index.children.get(holder_key(consumer), [])
            if name in consumer.input or not subs:
                users.add(qualified(index.scope, consumer.output[0] if consumer.output else consumer.name))
            for sub in subs:
                users |= _final_users(name, sub)
    return users


def _identity(v: LayerView, indexes: dict[str, GraphIndex]) -> str:
    """A view's node as `_final_users` names it."""
    return qualified(v.scope, indexes[v.scope].graph.node[v.node_index].output[0])


def _mark_shared(found: list[LayerView | Skip], indexes: dict[str, GraphIndex]) -> None:
    """Key every view by how it uses its weight, and list the weight's users outside its key's group
    (the guard skips a layer whose weight something else still needs), across every scope."""
    views = [f for f in found if isinstance(f, LayerView)]
    by_root: dict[tuple[str, str], list[LayerView]] = defaultdict(list)
    for v in views:
        owner = indexes[v.scope].owner(v.weight_root).scope
        v.shared_key = _shared_key(v, owner)
        by_root[(owner, v.weight_root)].append(v)
    for (owner, root), group in by_root.items():
        users = _final_users(root, indexes[owner])
        for v in group:
            same = {_identity(o, indexes) for o in group if o.shared_key == v.shared_key}
            v.other_users = tuple(sorted(users - same))
