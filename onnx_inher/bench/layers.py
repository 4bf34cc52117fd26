"""Per-layer timing: one dense node vs its factorised replacement, alone, at the layer's real input shape.

Each side becomes a tiny ONNX graph (input: the layer's activation, weights as initializers,
output: the layer's output) timed interleaved like whole models. This separates what a
factorisation costs by itself from what the rest of the model hides or adds, and is what
`plan --target` consults (through the latency cache) to skip factorisations that are not faster.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import ModelProto, NodeProto, helper, numpy_helper

from onnx_inher import _env
from onnx_inher.bench.profile import FLOAT_TYPES, concrete_shapes, node_flops, shape_table
from onnx_inher.bench.sessions import Runner, Settings, create, interleave
from onnx_inher.bench.stats import speedup, summarize
from onnx_inher.ir.graph import Constant, GraphIndex
from onnx_inher.ir.layers import LayerView
from onnx_inher.ir.naming import HEADS_TAG, PAIR_TAG
from onnx_inher.ir.tensors import flush_negligible

FORMS = {PAIR_TAG: "pair", HEADS_TAG: "heads"}


@dataclass(frozen=True)
class LayerGraph:
    model: ModelProto
    x: str
    x_shape: tuple[int, ...]
    flops: int
    weight_bytes: int


def activation_input(node: NodeProto, index: GraphIndex) -> str | None:
    """The one non-constant input of a dense node (None if there is not exactly one)."""
    free = [n for n in node.input if n and not isinstance(index.constant(n), Constant)]
    return free[0] if len(free) == 1 else None


def static_input_shape(node: NodeProto, index: GraphIndex, table: dict[str, Any]) -> tuple[int, ...] | None:
    """The fully known shape of a dense node's activation input in `table` (`shape_table`), else None:
    a layer is timed alone only at a real, static shape."""
    x = activation_input(node, index)
    info = table.get(x) if x else None
    if info is None or info.dims is None or not all(isinstance(d, int) for d in info.dims):
        return None
    return tuple(int(d) for d in info.dims)


def build(nodes: Iterable[NodeProto], constants: dict[str, np.ndarray], x: str, x_shape: tuple[int, ...],
          x_type: int, y: str, template: ModelProto) -> LayerGraph:
    """A runnable graph of `nodes` whose free inputs are `x` or `constants`."""
    nodes = list(nodes)
    produced = {o for n in nodes for o in n.output}
    needed = sorted({i for n in nodes for i in n.input if i and i != x and i not in produced})
    missing = [n for n in needed if n not in constants]
    if missing:
        raise ValueError(f"free inputs {missing} are neither the activation nor constants")
    inits = [numpy_helper.from_array(np.ascontiguousarray(constants[n]), n) for n in needed]
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info(x, x_type, list(x_shape))],
                              [helper.make_tensor_value_info(y, x_type, None)], inits)
    model = helper.make_model(graph, opset_imports=list(template.opset_import))
    model.ir_version = max(template.ir_version, 4)
    table = concrete_shapes(model, {x: x_shape})
    flops = sum(node_flops(n, table) or 0 for n in nodes)
    wbytes = sum(int(constants[n].nbytes) for n in needed
                 if onnx.helper.np_dtype_to_tensor_dtype(constants[n].dtype) in FLOAT_TYPES)
    return LayerGraph(model, x, x_shape, int(flops), wbytes)


def fold(names: Iterable[str], index: GraphIndex) -> dict[str, np.ndarray]:
    """The constant values of `names`, negligible floats flushed (`ir.tensors`): compress flushes every
    weight of the student, a layer it leaves dense included, so a dense layer is timed as the student
    would run it. With the teacher's own near-dead weights the PP-OCRv5 detector's `Conv.24` took 29 ms
    instead of 0.3, and every factorisation of it would look like a 9x speedup."""
    out = {}
    for n in names:
        c = index.constant(n)
        if isinstance(c, Constant):
            out[n] = flush_negligible(np.asarray(c.value))
    return out


# what ONNX Runtime fuses into the Conv/Gemm before it (bias and scale with a constant, batch norm, activation)
EPILOGUE_CONST = ("Add", "Mul", "BatchNormalization")
EPILOGUE_ACT = ("Relu", "Clip", "LeakyRelu", "HardSigmoid", "Sigmoid", "Tanh")


def epilogue(node: NodeProto, index: GraphIndex, limit: int = 3, through_identity: bool = False) -> list[NodeProto]:
    """The chain of nodes after `node` that ORT folds into a dense node: each the only reader of the one before,
    every other input constant, an activation ending it. Timed with the layer, because a factorised form
    that ends in a Reshape or a MatMul loses those fusions and pays each node as one more pass over the
    output, a cost the layer alone does not show. `through_identity` also follows (and returns) the
    Identity nodes some exporters put between them (Paddle's), which ORT removes before fusing; `limit`
    counts the others."""
    out: list[NodeProto] = []
    tensor = node.output[0]
    outputs = index.graph_output_names()
    while sum(n.op_type != "Identity" for n in out) < limit and tensor not in outputs:
        readers = index.consumers.get(tensor, [])
        if through_identity and len(readers) == 1 and readers[0].op_type == "Identity":
            out.append(readers[0])
            tensor = readers[0].output[0]
            continue
        if len(readers) != 1 or readers[0].op_type not in (*EPILOGUE_CONST, *EPILOGUE_ACT):
            break
        nxt = readers[0]
        others = [i for i in nxt.input if i and i != tensor]
        first_input = nxt.op_type in ("Add", "Mul") or nxt.input[0] == tensor  # BN/activations: the data input
        if not first_input or len(nxt.output) != 1 or not all(isinstance(index.constant(i), Constant) for i in others):
            break
        out.append(nxt)
        tensor = nxt.output[0]
        if nxt.op_type in EPILOGUE_ACT:
            break
    return out


def dense_graph(view: LayerView, model: ModelProto, index: GraphIndex, x_shape: tuple[int, ...],
                tail: list[NodeProto] | None = None) -> LayerGraph | None:
    """The layer alone, followed by `tail` (its `epilogue`, when given); `index` is the index of the graph
    the view's node lives in (`ir.graph.index_scopes` for a subgraph layer: its weight may be read from an
    outer scope)."""
    node = index.graph.node[view.node_index]
    x = activation_input(node, index)
    if x is None:
        return None
    tail = tail or []
    consts = fold([i for n in [node, *tail] for i in n.input], index)
    return build([node, *tail], consts, x, x_shape, onnx.helper.np_dtype_to_tensor_dtype(view.dtype),
                 tail[-1].output[0] if tail else view.output, model)


def replacement_nodes(view: LayerView, student: ModelProto) -> tuple[list[NodeProto], str] | None:
    """The student's nodes that replaced `view`'s node (named `<node>/svd/...` or `<node>/inher/...`)."""
    for tag, form in FORMS.items():
        prefix = f"{view.node}/{tag}/"
        nodes = [n for n in student.graph.node if n.name.startswith(prefix)]
        if nodes:
            return nodes, f"{form}, kernel up" if _kernel_up(view, nodes, student) else form
    return None


def _kernel_up(view: LayerView, nodes: list[NodeProto], student: ModelProto) -> bool:
    """Whether a k x k conv's pair carries the kernel on its up side (a 1x1 down conv: `ir.layers.kernel_up`)."""
    down = next((n for n in nodes if n.name.endswith("/down")), None)
    if view.op != "Conv" or view.window < 2 or down is None or down.op_type != "Conv" or len(down.input) < 2:
        return False
    dims = next((list(t.dims) for t in student.graph.initializer if t.name == down.input[1]), None)
    return dims is not None and all(d == 1 for d in dims[2:])


def rank_of(nodes: list[NodeProto], view: LayerView, index: GraphIndex) -> int | None:
    down = next((n for n in nodes if n.name.endswith("/down")), None)
    if down is None:
        return None
    weights = [c.value for c in (index.constant(i) for i in down.input if i) if isinstance(c, Constant)]
    if not weights:
        return None
    w = weights[0]
    return int(w.shape[0] // view.groups) if view.op in ("Conv", "ConvTranspose") else int(min(w.shape))


def time_pair(dense: LayerGraph, factorized: LayerGraph, settings: Settings, warmup: int, iters: int,
              seed: int = 0) -> tuple[float, float]:
    """p50 milliseconds of the dense and factorised graphs, timed interleaved on the same input."""
    a, b = time_pair_samples(dense, factorized, settings, warmup, iters, seed)
    return summarize(a, 1).p50, summarize(b, 1).p50


def time_pair_samples(dense: LayerGraph, factorized: LayerGraph, settings: Settings, warmup: int, iters: int,
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seconds per round of the dense and factorised graphs, timed interleaved on the same input."""
    dtype = onnx.helper.tensor_dtype_to_np_dtype(dense.model.graph.input[0].type.tensor_type.elem_type)
    x = np.random.default_rng(seed).standard_normal(dense.x_shape).astype(dtype)
    solo = Settings(settings.provider, settings.threads, cuda_graph=False)
    runners = []
    for g, label in ((dense, "dense layer"), (factorized, "factorised layer")):
        r = Runner(create(g.model.SerializeToString(), solo, label), {g.x: x}, label)
        r.check()
        r.prepare()
        runners.append(r)
    a, b = interleave(runners, warmup, iters)
    return a, b


def per_layer_results(entries: list[Any], points: list[Any], settings: Settings, warmup: int,
                      iters: int) -> list[dict[str, Any]]:
    """Every factorised layer of every student, dense vs replacement, at every benchmarked shape."""
    from tqdm import tqdm

    from onnx_inher.ir.io import load_model
    from onnx_inher.passes.locate import locate

    teacher = load_model(entries[0].path).model
    t_index = GraphIndex.build(teacher.graph)
    # subgraph layers' activations are not graph tensors that one run can observe: not timed alone
    views = [v for v in locate(teacher) if isinstance(v, LayerView) and not v.scope]
    students = [(m.label, load_model(m.path).model) for m in entries[1:]]
    jobs = []
    for label, student in students:
        s_index = GraphIndex.build(student.graph)
        for view in views:
            found = replacement_nodes(view, student)
            if found:
                jobs.append((label, student, s_index, view, *found))
    rows: list[dict[str, Any]] = []
    with tqdm(total=len(jobs) * len(points), desc="layers", unit="layer", disable=_env.progress_disabled(),
              leave=False) as bar:
        for point in points:
            table = shape_table(entries[0].path, teacher, point.feed)
            for label, student, s_index, view, nodes, form in jobs:
                bar.update(1)
                node = teacher.graph.node[view.node_index]
                x_shape = static_input_shape(node, t_index, table)
                if x_shape is None:
                    continue
                tail = epilogue(node, t_index)  # the same nodes follow the replacement in the student
                dense = dense_graph(view, teacher, t_index, x_shape, tail)
                if dense is None:
                    continue
                consts = fold({i for n in nodes for i in n.input if i}, s_index)
                originals = fold([i for n in [node, *tail] for i in n.input], t_index)
                consts.update({k: v for k, v in originals.items() if k not in consts})
                fact = build([*nodes, *tail], consts, dense.x, x_shape,
                             dense.model.graph.input[0].type.tensor_type.elem_type,
                             tail[-1].output[0] if tail else view.output, student)
                d_s, f_s = time_pair_samples(dense, fact, settings, warmup, iters)
                d_ms, f_ms = summarize(d_s, 1).p50, summarize(f_s, 1).p50
                ideal_f = dense.flops / fact.flops if fact.flops else None
                ideal_b = dense.weight_bytes / fact.weight_bytes if fact.weight_bytes else None
                ratio = speedup(d_s, f_s)
                sp = ratio.value
                rows.append({"batch": point.batch, "seq_len": point.seq_len, "model": label, "node": view.node,
                             "op": view.op, "form": form, "rank": rank_of(nodes, view, s_index),
                             "x_shape": list(x_shape), "dense_ms": d_ms, "factorized_ms": f_ms, "speedup": sp,
                             "speedup_low": ratio.low, "speedup_high": ratio.high,
                             "dense_flops": dense.flops, "factorized_flops": fact.flops,
                             "ideal_speedup_flops": ideal_f, "ideal_speedup_bytes": ideal_b,
                             "efficiency_flops": sp / ideal_f if ideal_f else None,
                             "efficiency_bytes": sp / ideal_b if ideal_b else None})
    return rows
