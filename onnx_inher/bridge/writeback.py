"""`write_back`: trained parameter values back into the same ONNX graph, by name.

Only tensor values change: initializers keep their name, dims and element type (an fp16 weight trained
as fp32 master weight is written as fp16, i.e. rounded: the written model computes what the module does
with its weights rounded to fp16), `Constant` nodes keep their attribute kind, and the node list is not
touched; weights whose value did not change keep their bytes. The result is a new ModelProto; save it
with `onnx_inher.ir.io.save_model`, which decides the external-data layout (pass `external_data=True`
for a model that came with a data file).
Tensors that still point at external data (a model loaded without it) get their new values inline and
lose the pointer: the save writes them out again. Trained values are written without negligible floats
(`ir.tensors.flush_negligible`: subnormal or below 1e-30, they slow ONNX Runtime down and carry nothing).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx
import torch
from onnx import GraphProto, ModelProto, TensorProto, numpy_helper

from onnx_inher.errors import InputError
from onnx_inher.ir.io import copy_model
from onnx_inher.ir.tensors import flush_negligible


def _weights(graph: GraphProto) -> Iterator[tuple[str, onnx.NodeProto | None, TensorProto | None]]:
    """(name, Constant node or None, initializer or None) for every weight, subgraphs included."""
    for t in graph.initializer:
        yield t.name, None, t
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output:
            yield node.output[0], node, None
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _weights(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from _weights(g)


def _set_tensor(tensor: TensorProto, value: np.ndarray) -> None:
    """Replace a tensor's data in place, keeping name, dims, type and doc string."""
    np_type = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    if tuple(tensor.dims) != value.shape:
        raise InputError(f"weight '{tensor.name}': trained shape {value.shape} differs from the graph's "
                         f"{tuple(tensor.dims)}; a parameter must keep its shape.")
    cast = value.astype(np_type)
    external = tensor.data_location == TensorProto.EXTERNAL
    if not external and np.array_equal(numpy_helper.to_array(tensor), cast, equal_nan=True):
        return  # unchanged (a frozen weight): keep its bytes exactly as they were
    fresh = numpy_helper.from_array(flush_negligible(cast), tensor.name)
    for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        tensor.ClearField(field)  # type: ignore[arg-type]
    if external:
        del tensor.external_data[:]
        tensor.data_location = TensorProto.DEFAULT
    tensor.raw_data = fresh.raw_data


def _set_constant(node: onnx.NodeProto, value: np.ndarray) -> None:
    for a in node.attribute:
        if a.name == "value":
            _set_tensor(a.t, value.reshape(tuple(a.t.dims)) if value.size == int(np.prod(a.t.dims)) else value)
        elif a.name == "value_float":
            a.f = float(flush_negligible(value.astype(np.float32)).reshape(()))
        elif a.name == "value_floats":
            del a.floats[:]
            a.floats.extend(float(v) for v in flush_negligible(value.astype(np.float32)).reshape(-1))


def write_back(model: ModelProto, module: torch.nn.Module, param_map: dict[str, str]) -> ModelProto:
    """A copy of `model` whose weights named in `param_map` hold the module's current values."""
    params = dict(module.named_parameters())
    missing = sorted(q for q in param_map.values() if q not in params)
    if missing:
        raise InputError(f"module has no parameter(s) {missing[:3]}; pass the module and param_map that "
                         "to_torch returned together.")
    out = copy_model(model)
    found: set[str] = set()
    for name, node, tensor in _weights(out.graph):
        qualified = param_map.get(name)
        if qualified is None:
            continue
        value = params[qualified].detach().to("cpu").numpy()
        if node is not None:
            _set_constant(node, value)
        else:
            assert tensor is not None
            _set_tensor(tensor, value)
        found.add(name)
    unknown = sorted(set(param_map) - found)
    if unknown:
        raise InputError(f"param_map names weight(s) {unknown[:3]} that this model does not have; write back "
                         "into the model that was converted.")
    return out
