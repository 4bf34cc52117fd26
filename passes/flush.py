"""flush: no negligible float (`ir.tensors`: subnormal, or float32 below 1e-30) in the student's weights.

The factors compress computes are flushed as they are made; this pass does the same to every weight the
student inherits unchanged. Teachers carry them: the PP-OCRv5 detector holds 35,276 float32 weights
below 1e-30, and ONNX Runtime (which leaves flush-to-zero off) ran one of its 1x1 convs in 29 ms instead
of about 0.2 ms; that teacher runs 2.0x faster with them zeroed, its outputs unchanged. A student that
kept them would be slowed the same way. External-data tensors not loaded in memory are left as they are.

Scalars are left alone too: a lone tiny constant is deliberate, such as float32's smallest normal number
(1.18e-38, below the threshold) as the floor of a clamp before a log, and zeroing it would turn
`log(max(x, tiny))` into -inf. The slow products come from weight tensors, never from one scalar.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import ModelProto, TensorProto, numpy_helper

from onnx_inher.errors import PassError
from onnx_inher.ir.graph import walk_scopes
from onnx_inher.ir.io import copy_model, iter_tensors
from onnx_inher.ir.tensors import flush_negligible, negligible_count

FLOAT_TYPES = {TensorProto.FLOAT: np.float32, TensorProto.DOUBLE: np.float64}


def _view(tensor: TensorProto) -> np.ndarray | None:
    """The tensor's values (a zero-copy view of raw data where there is some), or None if not a float
    tensor held in memory."""
    dtype = FLOAT_TYPES.get(tensor.data_type)
    if dtype is None or tensor.data_location == TensorProto.EXTERNAL or int(np.prod(tensor.dims)) <= 1:
        return None  # not a float tensor in memory, or a scalar (left alone: see the module doc)
    if tensor.HasField("raw_data"):
        return np.frombuffer(tensor.raw_data, dtype=dtype)
    return numpy_helper.to_array(tensor)


def _attribute_floats(model: ModelProto) -> list[onnx.AttributeProto]:
    """Constant nodes' `value_floats` attributes of more than one value (float32 values outside a tensor;
    a `value_float` is a scalar, left alone)."""
    return [a for _, graph, _ in walk_scopes(model.graph) for node in graph.node if node.op_type == "Constant"
            for a in node.attribute if a.name == "value_floats" and len(a.floats) > 1]


def _attribute_values(a: onnx.AttributeProto) -> np.ndarray:
    return np.asarray(a.floats, dtype=np.float32)


def negligible_weights(model: ModelProto) -> tuple[int, int]:
    """(negligible values, tensors or Constant attributes holding any) over every weight in memory,
    subgraphs included."""
    counts = [negligible_count(a) for a in (_view(t) for t in iter_tensors(model.graph)) if a is not None]
    counts += [negligible_count(_attribute_values(a)) for a in _attribute_floats(model)]
    return sum(counts), sum(c > 0 for c in counts)


class FlushNegligible:
    """Pass: zero every negligible float32/float64 weight (initializers and Constant values of more than
    one element, in every subgraph). `flushed` and `tensors` say how many values, in how many tensors, it zeroed."""

    name = "flush"

    def __init__(self, *, inplace: bool = False) -> None:
        self.inplace = inplace
        self.flushed = 0
        self.tensors = 0

    def __call__(self, model: ModelProto) -> tuple[ModelProto, bool]:
        self.flushed = self.tensors = 0
        if negligible_weights(model)[0] == 0:
            return model, False
        out = model if self.inplace else copy_model(model)
        for t in iter_tensors(out.graph):
            a = _view(t)
            count = negligible_count(a) if a is not None else 0
            if not count:
                continue
            doc = t.doc_string
            t.CopyFrom(numpy_helper.from_array(flush_negligible(np.array(a)).reshape(tuple(t.dims)), t.name))
            t.doc_string = doc
            self.flushed += count
            self.tensors += 1
        for a in _attribute_floats(out):
            values = _attribute_values(a)
            count = negligible_count(values)
            if not count:
                continue
            del a.floats[:]
            a.floats.extend(float(v) for v in flush_negligible(values))
            self.flushed += count
            self.tensors += 1
        self.ensures(out)
        return out, True

    def ensures(self, model: ModelProto) -> None:
        """No negligible weight is left in memory."""
        left = negligible_weights(model)[0]
        if left:
            raise PassError(self.name, f"{left} negligible weights remain after flushing")
