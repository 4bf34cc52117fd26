"""Model inputs: random samples of the right dtype and shape, or an .npz checked against the model.

Integer inputs that index a table (token ids feeding a Gather) stay inside that table, so random
feeds never crash a real model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import ModelProto

from onnx_inher.errors import InputError
from onnx_inher.ir.graph import GraphIndex
from onnx_inher.ir.shapes import check_shapes, shape_symbols


def _index_bounds(model: ModelProto) -> dict[str, int]:
    """Upper bound for integer inputs that feed a Gather's indices (directly or through a Cast)."""
    index = GraphIndex.build(model.graph)
    bounds: dict[str, int] = {}
    for inp in model.graph.input:
        frontier = [inp.name]
        for _ in range(3):
            nxt = []
            for name in frontier:
                for user in index.consumers.get(name, []):
                    if user.op_type == "Gather" and len(user.input) > 1 and user.input[1] == name:
                        table = index.constant(user.input[0])
                        if hasattr(table, "value"):
                            axis = next((a.i for a in user.attribute if a.name == "axis"), 0)
                            size = table.value.shape[axis]
                            bounds[inp.name] = min(bounds.get(inp.name, size), size)
                    elif user.op_type in ("Cast", "Unsqueeze", "Reshape", "Identity"):
                        nxt.extend(user.output)
            frontier = nxt
    return bounds



def sample_inputs(model: ModelProto, dims: dict[str, int] | None = None, seed: int = 0,
                  shapes: Mapping[str, Sequence[int]] | None = None) -> dict[str, np.ndarray]:
    """Random inputs of the right dtype and shape: the inputs named in `shapes` (checked with
    `ir.shapes.check_shapes`) exactly at those shapes, the others with named dims from `dims` (default
    2 for the first axis, 8 elsewhere) and unnamed dynamic dims 1."""
    shapes = shapes or {}
    dims = shape_symbols(model, shapes, dims)  # the named dims the shapes fix hold for every input
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    bounds = _index_bounds(model)
    feed: dict[str, np.ndarray] = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        tt = inp.type.tensor_type
        shape = [int(v) for v in shapes.get(inp.name, ())]
        for axis, d in enumerate(tt.shape.dim if inp.name not in shapes else ()):
            if d.HasField("dim_value") and d.dim_value > 0:
                shape.append(d.dim_value)
            elif d.dim_param:
                shape.append(dims.setdefault(d.dim_param, 2 if axis == 0 else 8))
            else:
                shape.append(1)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if np.issubdtype(dtype, np.floating):
            feed[inp.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feed[inp.name] = rng.integers(0, 2, shape).astype(bool)
        else:
            feed[inp.name] = rng.integers(0, bounds.get(inp.name, 2), shape).astype(dtype)
    return feed



def load_inputs(path: str | Path, model: ModelProto) -> dict[str, np.ndarray]:
    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as data:
            feed = {k: data[k] for k in data.files}
    except (OSError, ValueError) as err:
        raise InputError(f"{p}: cannot read inputs ({err}); pass an .npz keyed by input names.") from None
    inits = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    missing = [n for n in names if n not in feed]
    extra = [k for k in feed if k not in names]
    if missing or extra:
        raise InputError(f"{p}: inputs must be keyed by the model's input names {names}; "
                         f"missing {missing}, unknown {extra}")
    check_shapes(model, {k: v.shape for k, v in feed.items()}, source=str(p))
    return feed

