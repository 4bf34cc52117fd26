"""What a model costs on paper at one input shape: params, weight bytes, FLOPs, file size.

FLOPs are 2 x multiply-accumulates of every MatMul, Gemm, Conv and ConvTranspose, whatever feeds
them (attention's activation x activation products count too), of the recurrent layers (LSTM, GRU,
RNN: their input and recurrent products over every step) and of the quantised products (QLinearMatMul,
MatMulInteger, QLinearConv, ConvInteger), from shapes inferred with the benchmark's concrete input
dims. The recurrent and quantised ones are counted although onnx-inher does not factorise them: a
speech encoder whose time is all in its LSTM must not be promised the speedup of its one Linear.
Other ops (norms, softmax, adds) are not counted: they are what keeps a measured speedup below the
FLOP ratio, and the report says so rather than guess their cost.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import ModelProto, TensorProto

from onnx_inher.ir.in_place import FOLDER_KEY, reading_in_place
from onnx_inher.ir.io import iter_tensors
from onnx_inher.ir.shapes import TensorInfo, infer

DENSE_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose")
RECURRENT_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
# quantised products: (activation input, weight input), counted as the float op they stand for
QUANTISED_MATMUL = {"QLinearMatMul": (0, 3), "MatMulInteger": (0, 1)}
QUANTISED_CONV = {"QLinearConv": (0, 3), "ConvInteger": (0, 1)}
FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)


@dataclass(frozen=True)
class Profile:
    params: int
    weight_bytes: int
    flops: int
    file_bytes: int
    unresolved_nodes: int  # dense nodes whose shapes inference could not resolve (counted as 0 FLOPs)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def concrete_shapes(model: ModelProto, shapes: dict[str, tuple[int, ...]]) -> dict[str, TensorInfo]:
    """Inferred shapes with the graph inputs set to `shapes` (see `ir.shapes.infer`)."""
    return infer(model, shapes)


def _operands(node: onnx.NodeProto) -> list[str]:
    """The inputs whose shapes `node_flops` reads, besides the first output."""
    if node.op_type in RECURRENT_GATES:
        return list(node.input[:3])
    pair = QUANTISED_MATMUL.get(node.op_type) or QUANTISED_CONV.get(node.op_type)
    if pair:
        return [node.input[i] for i in pair if i < len(node.input)]
    return list(node.input[:2]) if node.op_type in DENSE_OPS else []


def _dense_tensors(model: ModelProto) -> list[str]:
    names = {n for node in model.graph.node for n in [*_operands(node), *(node.output[:1] if _operands(node) else [])]}
    return sorted(n for n in names if n)


def observed_shapes(path: Path, feed: dict[str, np.ndarray], names: list[str],
                    model: ModelProto | None = None) -> dict[str, tuple[int, ...]]:
    """Shapes of `names` seen in one ONNX Runtime run on the CPU (for what shape inference leaves open).

    With `model` (the file's own proto), ORT reads the weights from the file in place (`ir.in_place`): made
    from the teacher loaded again and serialised with the extra outputs, the session held three copies of
    its weights at once, and the latency check's peak on ViT-B/16 (330 MiB) came here. The last few answers
    are remembered: the check asks for the same shapes for its head forms and its folds."""
    import onnxruntime as ort

    p = Path(path)
    real = p.resolve()  # a link's own name is not the file's: the stubs below name the file itself
    stat = real.stat()
    key = (str(real), stat.st_mtime_ns, stat.st_size, tuple(names),
           tuple((k, v.shape, str(v.dtype)) for k, v in sorted(feed.items())))
    if key in _OBSERVED:
        return dict(_OBSERVED[key])
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 4  # callers probe shapes a model may reject, and handle the exception
    if model is not None and not any(t.data_location == TensorProto.EXTERNAL for t in iter_tensors(model.graph)):
        source = reading_in_place(model, real, names)
        opts.add_session_config_entry(FOLDER_KEY, str(real.parent))
    else:  # weights in side files: loaded into the proto, which is serialised with the extra outputs
        full = onnx.load(str(p))
        outputs = {o.name for o in full.graph.output}
        full.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in outputs)
        source = full.SerializeToString()
        del full
    sess = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
    del source
    shapes = {n: tuple(int(d) for d in v.shape) for n, v in zip(names, sess.run(names, feed), strict=True)}
    del sess
    _OBSERVED[key] = shapes
    while len(_OBSERVED) > OBSERVED_KEPT:
        _OBSERVED.pop(next(iter(_OBSERVED)))
    return dict(shapes)


_OBSERVED: dict[tuple, dict[str, tuple[int, ...]]] = {}
OBSERVED_KEPT = 4


def shape_table(path: Path, model: ModelProto, feed: dict[str, np.ndarray]) -> dict[str, TensorInfo]:
    """Inferred shapes at the feed's shapes; the inputs and outputs of dense nodes that inference leaves
    unknown (e.g. a batch axis behind a broadcast with 1) are observed in one ORT run."""
    table = concrete_shapes(model, feed_shapes(feed))
    initializers = {t.name for t in model.graph.initializer}
    unknown = [n for n in _dense_tensors(model) if n not in initializers
               and (n not in table or _known(table[n].dims) is None)]
    if unknown:
        for name, dims in observed_shapes(path, feed, unknown, model).items():
            table[name] = TensorInfo(dims, table[name].elem_type if name in table else 0)
    return table


def _known(dims: tuple | None, symbols: Mapping[str, int] | None = None) -> tuple[int, ...] | None:
    """`dims` as ints; a named dim resolves through `symbols` (default 1) when they are given."""
    if dims is None:
        return None
    if symbols is not None:
        dims = tuple(symbols.get(d, 1) if isinstance(d, str) else d for d in dims)
    if not all(isinstance(d, int) for d in dims):
        return None
    return tuple(int(d) for d in dims)


def _recurrent_flops(node: onnx.NodeProto, dims: Callable[[str], tuple[int, ...] | None]) -> int | None:
    """Every step's input and recurrent products: 2 x seq x batch x dirs x gates*H x (in + H)."""
    x, w, r = (dims(n) for n in node.input[:3])
    if x is None or w is None or r is None or len(x) != 3:
        return None
    layout = next((a.i for a in node.attribute if a.name == "layout"), 0)
    seq, batch = (x[1], x[0]) if layout else (x[0], x[1])
    directions, gates_h, inputs = w
    return 2 * seq * batch * directions * gates_h * (inputs + r[2])


def node_flops(node: onnx.NodeProto, table: dict[str, TensorInfo],
               symbols: Mapping[str, int] | None = None) -> int | None:
    """2 x MACs of one node from its inferred shapes (0 for ops not counted), or None when they are
    unknown; with `symbols`, named dims resolve through them (default 1), as planning counts."""
    def dims(name: str) -> tuple[int, ...] | None:
        info = table.get(name)
        return _known(info.dims, symbols) if info is not None else None

    if node.op_type in RECURRENT_GATES:
        return _recurrent_flops(node, dims)
    out = dims(node.output[0]) if node.output else None
    if node.op_type in QUANTISED_MATMUL:
        a = dims(node.input[QUANTISED_MATMUL[node.op_type][0]])
        if out is None or a is None:
            return None
        return 2 * math.prod(out) * a[-1]
    if node.op_type in QUANTISED_CONV:
        w = dims(node.input[QUANTISED_CONV[node.op_type][1]])
        if out is None or w is None:
            return None
        return 2 * math.prod(out) * math.prod(w[1:])
    if node.op_type == "MatMul":
        a = dims(node.input[0])
        if out is None or a is None:
            return None
        return 2 * math.prod(out) * a[-1] if len(a) > 1 else 2 * math.prod(out) * a[0]
    if node.op_type == "Gemm":
        a = dims(node.input[0])
        trans_a = next((x.i for x in node.attribute if x.name == "transA"), 0)
        if out is None or a is None:
            return None
        return 2 * math.prod(out) * (a[0] if trans_a else a[1])
    if node.op_type == "Conv":
        w = dims(node.input[1])
        if out is None or w is None:
            return None
        return 2 * math.prod(out) * math.prod(w[1:])
    if node.op_type == "ConvTranspose":
        x, w = dims(node.input[0]), dims(node.input[1])
        if x is None or w is None:
            return None
        return 2 * math.prod(x) * math.prod(w[1:])
    return 0


def file_bytes(path: Path, model: ModelProto) -> int:
    """The .onnx file plus every external data file its tensors point at."""
    total = path.stat().st_size
    seen: set[str] = set()
    for t in iter_tensors(model.graph):
        if t.data_location == TensorProto.EXTERNAL:
            loc = next((e.value for e in t.external_data if e.key == "location"), None)
            if loc and loc not in seen:
                seen.add(loc)
                f = path.parent / loc
                total += f.stat().st_size if f.is_file() else 0
    return total


def uncounted_flops(model: ModelProto, table: dict[str, TensorInfo], symbols: Mapping[str, int],
                    counted: set[str]) -> dict[str, int]:
    """FLOPs of the main graph's nodes whose ids (`ir.naming.node_ids`) are not in `counted` (the plan's
    candidates), by op type: the recurrent and quantised layers onnx-inher does not factorise."""
    from onnx_inher.ir.naming import node_ids

    by_op: dict[str, int] = {}
    for nid, node in zip(node_ids(model.graph), model.graph.node, strict=True):
        if nid not in counted:
            f = node_flops(node, table, symbols) or 0
            if f:
                by_op[node.op_type] = by_op.get(node.op_type, 0) + f
    return by_op


def float_params(model: ModelProto, table: dict[str, TensorInfo] | None = None) -> tuple[int, int]:
    """Float weights of `model` (subgraphs too), as (elements, bytes); with `table`, also the placeholder
    weights a `ConstantOfShape` generates at load time (e.g. the onnx "light" models)."""
    params = weight_bytes = 0
    for t in iter_tensors(model.graph):
        if t.data_type in FLOAT_TYPES:
            n = math.prod(t.dims)
            params += n
            weight_bytes += n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    for node in model.graph.node if table is not None else []:
        info = table.get(node.output[0]) if node.op_type == "ConstantOfShape" else None
        if info is not None and info.elem_type in FLOAT_TYPES and _known(info.dims) is not None:
            n = math.prod(info.dims)  # type: ignore[arg-type]
            params += n
            weight_bytes += n * onnx.helper.tensor_dtype_to_np_dtype(info.elem_type).itemsize
    return params, weight_bytes


def profile(path: Path, model: ModelProto, feed: dict[str, np.ndarray]) -> Profile:
    """Cost of `model` (loaded without external data is fine: only dims are read) at the feed's shapes."""
    table = shape_table(path, model, feed)
    params, weight_bytes = float_params(model, table)
    flops = unresolved = 0
    for node in model.graph.node:
        f = node_flops(node, table)
        if f is None:
            unresolved += 1
        else:
            flops += f
    return Profile(int(params), int(weight_bytes), int(flops), file_bytes(path, model), unresolved)


def feed_shapes(feed: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(int(d) for d in v.shape) for k, v in feed.items()}
