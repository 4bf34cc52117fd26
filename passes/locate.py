"""locate: find every dense layer (MatMul, Gemm, Conv, ConvTranspose) with a constant weight.

An analysis, not a rewrite: it returns `LayerView`s for layers that can be factorised and
`Skip`s, with a reason a person can act on, for every other MatMul/Gemm/Conv/ConvTranspose,
including those inside `If`/`Loop`/`Scan` subgraphs.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import ModelProto, NodeProto

from onnx_inher.errors import InputError
from onnx_inher.ir.graph import FOLDABLE, QUANTISED_ADVICE, Constant, GraphIndex, NotConstant, attr
from onnx_inher.ir.layers import LayerView
from onnx_inher.ir.naming import node_ids
from onnx_inher.ir.shapes import TensorInfo, infer, resolve

DENSE_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose")
FLOAT_TYPES = (np.float16, np.float32, np.float64)


@dataclass(frozen=True)
class Skip:
    node: str
    op: str
    reason: str
    weight_shape: tuple[int, ...] = ()
    params: int = 0


def locate(model: ModelProto, symbols: dict[str, int] | None = None,
           counted: dict[str, TensorInfo] | None = None) -> list[LayerView | Skip]:
    """Views and skips for every dense node, in graph order (subgraph findings last).

    Row counts (FLOPs) come from the `counted` shape table when given (shapes at the real input shapes,
    `ir.shapes.infer(model, inputs)`), else from the model's inferred shapes; dynamic dims left in it
    resolve through `symbols` (default 1). The views' own dims are always the declared ones, so what
    `factorize` emits does not depend on the shape the plan was counted at."""
    symbols = symbols or {}
    graph = model.graph
    index = GraphIndex.build(graph)
    shapes = infer(model)
    basis = Basis(counted if counted is not None else shapes, symbols)
    ids = node_ids(graph)
    found: list[LayerView | Skip] = []
    for i, node in enumerate(graph.node):
        if node.op_type in DENSE_OPS and node.domain in ("", "ai.onnx"):
            found.append(_view(node, i, ids[i], index, shapes, basis))
        elif node.op_type in INTEGER_OPS and node.domain in ("", "ai.onnx", "com.microsoft"):
            found.append(_skip(node, ids[i], f"an integer (quantised) layer: {QUANTISED_ADVICE}"))
    _mark_shared(found, index)
    for i, node in enumerate(graph.node):
        found.extend(_subgraph_skips(node, ids[i]))
    return found


# Dense layers computed in integers; their weights are int8/uint8, not factorisable as they are.
INTEGER_OPS = frozenset({"MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv", "DynamicQuantizeMatMul",
                         "MatMulIntegerToFloat", "QGemm", "DynamicQuantizeLSTM"})


def _subgraph_skips(parent: NodeProto, parent_id: str) -> list[Skip]:
    out: list[Skip] = []
    for a in parent.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        for g in graphs:
            for n in g.node:
                if n.op_type in DENSE_OPS:
                    name = n.name or f"{n.op_type}({n.output[0]})"
                    out.append(Skip(f"{parent_id}/{a.name}/{name}", n.op_type,
                                    f"inside the '{a.name}' subgraph of {parent.op_type} '{parent_id}': "
                                    "subgraphs are not rewritten"))
                out.extend(_subgraph_skips(n, f"{parent_id}/{a.name}/{n.name or n.op_type}"))
    return out


def _dims(shapes: dict[str, TensorInfo], name: str) -> tuple | None:
    info = shapes.get(name)
    return info.dims if info is not None else None


@dataclass(frozen=True)
class Basis:
    """What row counts are computed at: a shape table and values for its named dims (others count 1)."""

    shapes: dict[str, TensorInfo]
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


def _view(node: NodeProto, i: int, nid: str, index: GraphIndex, shapes: dict, basis: Basis) -> LayerView | Skip:
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
    return LayerView(nid, "MatMul", i, node.output[0], 1 if side == "right" else 0, w.root, w.chain, w.value, side, 1,
                     int(n_out), int(n_in), (), None, rows, rows, 1, len(x_dims) if x_dims else None,
                     _dims(shapes, node.output[0]), {})


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
    return LayerView(nid, "Gemm", i, node.output[0], slot, w.root, w.chain, w.value, side, 1, int(n_out), int(n_in), (),
                     bias, rows, rows, 1, 2, _dims(shapes, node.output[0]), attrs)


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
    return LayerView(nid, node.op_type, i, node.output[0], 1, w.root, w.chain, value, "right", groups, int(out_g),
                     int(cin_g * k), kernel, bias, _count(cy[:1] + cy[2:] if cy else None, sym),
                     _count(cx[:1] + cx[2:] if cx else None, sym), batch,
                     len(x_dims) if x_dims else None, y_dims, attrs)


def _shared_key(v: LayerView) -> str:
    keyed = {k: v.attrs.get(k) for k in ("alpha", "transA", "transB", "group")}
    return f"{v.weight_root}|{'/'.join(v.weight_chain)}|{v.op}|{v.side}|{v.groups}|{sorted(keyed.items())}"


def _final_users(root: str, index: GraphIndex) -> set[str]:
    """Nodes (by output name) that consume `root` directly or through foldable chains."""
    users: set[str] = set()
    frontier = [root]
    while frontier:
        name = frontier.pop()
        if name in index.graph_output_names():
            users.add(f"graph output '{name}'")
        for consumer in index.consumers.get(name, []):
            if consumer.op_type in FOLDABLE and consumer.input and consumer.input[0] == name:
                frontier.extend(consumer.output)
            else:
                users.add(consumer.output[0] if consumer.output else consumer.name)
    return users


def _mark_shared(found: list[LayerView | Skip], index: GraphIndex) -> None:
    views = [f for f in found if isinstance(f, LayerView)]
    by_root: dict[str, list[LayerView]] = defaultdict(list)
    for v in views:
        v.shared_key = _shared_key(v)
        by_root[v.weight_root].append(v)
    graph = index.graph
    for root, group in by_root.items():
        users = _final_users(root, index)
        for v in group:
            same = {graph.node[o.node_index].output[0] for o in group if o.shared_key == v.shared_key}
            v.other_users = tuple(sorted(users - same))
