"""What a model costs on paper at one input shape: params, weight bytes, FLOPs, file size.

FLOPs are 2 x multiply-accumulates of every MatMul, Gemm, Conv and ConvTranspose, whatever feeds
them (attention's activation x activation products count too), from shapes inferred with the
benchmark's concrete input dims. Other ops (norms, softmax, adds) are not counted: they are what
keeps a measured speedup below the FLOP ratio, and the report says so rather than guess their cost.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import ModelProto, TensorProto

from onnx_inher.ir.io import iter_tensors
from onnx_inher.ir.shapes import TensorInfo, infer

DENSE_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose")
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


def _dense_tensors(model: ModelProto) -> list[str]:
    names = {n for node in model.graph.node if node.op_type in DENSE_OPS for n in [*node.input[:2], node.output[0]]}
    return sorted(n for n in names if n)


def observed_shapes(path: Path, feed: dict[str, np.ndarray], names: list[str]) -> dict[str, tuple[int, ...]]:
    """Shapes of `names` seen in one ONNX Runtime run on the CPU (for what shape inference leaves open)."""
    import onnxruntime as ort

    full = onnx.load(str(path))
    outputs = {o.name for o in full.graph.output}
    full.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in outputs)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 4  # callers probe shapes a model may reject, and handle the exception
    sess = ort.InferenceSession(full.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    del full
    return {n: tuple(int(d) for d in v.shape) for n, v in zip(names, sess.run(names, feed), strict=True)}


def shape_table(path: Path, model: ModelProto, feed: dict[str, np.ndarray]) -> dict[str, TensorInfo]:
    """Inferred shapes at the feed's shapes; the inputs and outputs of dense nodes that inference leaves
    unknown (e.g. a batch axis behind a broadcast with 1) are observed in one ORT run."""
    table = concrete_shapes(model, feed_shapes(feed))
    initializers = {t.name for t in model.graph.initializer}
    unknown = [n for n in _dense_tensors(model) if n not in initializers
               and (n not in table or _known(table[n].dims) is None)]
    if unknown:
        for name, dims in observed_shapes(path, feed, unknown).items():
            table[name] = TensorInfo(dims, table[name].elem_type if name in table else 0)
    return table


def _known(dims: tuple | None) -> tuple[int, ...] | None:
    if dims is None or not all(isinstance(d, int) for d in dims):
        return None
    return tuple(int(d) for d in dims)


def node_flops(node: onnx.NodeProto, table: dict[str, TensorInfo]) -> int | None:
    """2 x MACs of one dense node from its inferred shapes, or None when they are unknown."""
    def dims(name: str) -> tuple[int, ...] | None:
        info = table.get(name)
        return _known(info.dims) if info is not None else None

    out = dims(node.output[0])
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


def profile(path: Path, model: ModelProto, feed: dict[str, np.ndarray]) -> Profile:
    """Cost of `model` (loaded without external data is fine: only dims are read) at the feed's shapes."""
    params = weight_bytes = 0
    table = shape_table(path, model, feed)
    for t in iter_tensors(model.graph):
        if t.data_type in FLOAT_TYPES:
            n = math.prod(t.dims)
            params += n
            weight_bytes += n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    for node in model.graph.node:  # placeholder weights generated at load time (e.g. the onnx "light" models)
        info = table.get(node.output[0]) if node.op_type == "ConstantOfShape" else None
        if info is not None and info.elem_type in FLOAT_TYPES and _known(info.dims) is not None:
            n = math.prod(info.dims)  # type: ignore[arg-type]
            params += n
            weight_bytes += n * onnx.helper.tensor_dtype_to_np_dtype(info.elem_type).itemsize
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
