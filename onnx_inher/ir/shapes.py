"""Shape inference as a lookup table: tensor name -> (dims, dtype).

Dynamic dims stay symbolic (`str`) or unknown (`None`); FLOP counts resolve them through a
user-given mapping (default 1 per symbol), so the plan states the basis its numbers assume. Given the
inputs' real shapes (`--shape x=1x3x48x320`, checked by `check_shapes`), inference runs with the graph
inputs set to them, so every dim after them (a conv's output height and width) is concrete too.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import onnx
from onnx import ModelProto, TensorProto, ValueInfoProto

from onnx_inher.errors import InputError
from onnx_inher.ir.graph import walk_scopes

Dim = int | str | None
Shapes = dict[str, tuple[int, ...]]

# Float initializers at least this large are weights: no operator reads the values of such a tensor to
# infer a shape (value-dependent inputs - Resize/Upsample scales, Range and OneHot scalars, int64 shape
# vectors - hold a few numbers), so shape inference runs on a skeleton without their data.
WEIGHT_MIN_ELEMENTS = 4096
WEIGHT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16})


@dataclass(frozen=True)
class TensorInfo:
    dims: tuple[Dim, ...] | None
    elem_type: int


def _dims(t: onnx.TypeProto) -> tuple[Dim, ...] | None:
    if not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
        return None
    out: list[Dim] = []
    for d in t.tensor_type.shape.dim:
        if d.HasField("dim_value") and d.dim_value > 0:
            out.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            out.append(d.dim_param)
        else:
            out.append(None)
    return tuple(out)


def _is_repeated(fd: object) -> bool:
    flag = getattr(fd, "is_repeated", None)  # protobuf >= 5.29; older ones only have `label`
    return bool(flag) if flag is not None else fd.label == fd.LABEL_REPEATED  # type: ignore[attr-defined]


def _copy_fields(dst: object, src: object, skip: str) -> None:
    """Copy every set field of message `src` except `skip` into `dst` (same message type)."""
    for fd, value in src.ListFields():  # type: ignore[attr-defined]
        if fd.name == skip:
            continue
        if _is_repeated(fd):
            getattr(dst, fd.name).extend(value)
        elif fd.message_type is not None:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def _is_weight(t: TensorProto) -> bool:
    return t.data_type in WEIGHT_TYPES and math.prod(t.dims) >= WEIGHT_MIN_ELEMENTS


def skeleton(model: ModelProto) -> ModelProto:
    """`model` without the data of its weight initializers (name, type and dims kept).

    `infer_shapes` serialises its input, parses it in C++, and parses back a full copy of the result:
    with the weights inside, that is several transient copies of them. Stubs are marked EXTERNAL, as in
    a model loaded without its external data, so an operator that did read one would fail rather
    than see made-up values.
    """
    graph = model.graph
    if not any(_is_weight(t) for t in graph.initializer):
        return model
    bare = ModelProto()
    _copy_fields(bare, model, skip="graph")
    _copy_fields(bare.graph, graph, skip="initializer")
    for t in graph.initializer:
        if _is_weight(t):
            stub = bare.graph.initializer.add()
            stub.name, stub.data_type = t.name, t.data_type
            stub.dims.extend(t.dims)
            stub.data_location = TensorProto.EXTERNAL
        else:
            bare.graph.initializer.append(t)
    return bare


def infer(model: ModelProto, inputs: Mapping[str, Sequence[int]] | None = None) -> dict[str, TensorInfo]:
    """Run ONNX shape inference (on a skeleton without the weights' data) and index every typed value
    of the main graph. With `inputs`, the named graph inputs have those concrete shapes during the
    inference (they are edited in place and restored afterwards, which avoids copying the weights)."""
    if not inputs:
        return _infer(model)
    with _inputs_at(model, inputs):
        return _infer(model)


@contextmanager
def _inputs_at(model: ModelProto, inputs: Mapping[str, Sequence[int]]) -> Iterator[None]:
    """The named graph inputs set to concrete shapes for the duration (restored afterwards)."""
    saved = [(inp, onnx.TypeProto()) for inp in model.graph.input if inp.name in inputs]
    for inp, backup in saved:
        backup.CopyFrom(inp.type)
        shape = inp.type.tensor_type.shape
        shape.ClearField("dim")
        for v in inputs[inp.name]:
            shape.dim.add().dim_value = int(v)
    try:
        yield
    finally:
        for inp, backup in saved:
            inp.type.CopyFrom(backup)


def _inferred(model: ModelProto) -> ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(skeleton(model), strict_mode=False, data_prop=True)
    except (onnx.shape_inference.InferenceError, ValueError, onnx.checker.ValidationError):
        return model


def _table(graph: onnx.GraphProto) -> dict[str, TensorInfo]:
    table: dict[str, TensorInfo] = {}
    for vi in [*graph.input, *graph.value_info, *graph.output]:
        table[vi.name] = TensorInfo(_dims(vi.type), vi.type.tensor_type.elem_type)
    for t in graph.initializer:
        table.setdefault(t.name, TensorInfo(tuple(int(d) for d in t.dims), t.data_type))
    return table


def _infer(model: ModelProto) -> dict[str, TensorInfo]:
    return _table(_inferred(model).graph)


def infer_graphs(model: ModelProto,
                 inputs: Mapping[str, Sequence[int]] | None = None) -> dict[str, dict[str, TensorInfo]]:
    """`infer` for the main graph and every subgraph (If branches, Loop and Scan bodies), from one
    inference run: a table per scope path (`ir.graph.walk_scopes`), each holding only its own graph's
    values (sibling branches may reuse a name). Inference inside subgraphs may stay incomplete: a
    missing name just has no entry."""
    with _inputs_at(model, inputs or {}):
        inferred = _inferred(model)
    return {path: _table(g) for path, g, _ in walk_scopes(inferred.graph)}


def resolve(dims: tuple[Dim, ...], symbols: dict[str, int]) -> tuple[int, ...]:
    """Concrete dims for counting: symbols from the mapping, anything unknown counts as 1."""
    return tuple(d if isinstance(d, int) else symbols.get(d, 1) if isinstance(d, str) else 1 for d in dims)


def graph_inputs(model: ModelProto) -> list[ValueInfoProto]:
    """The inputs fed at run time (initializers listed as inputs are not)."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def format_shape(dims: Sequence[Dim]) -> str:
    """`1x3x48x320`; a symbolic dim by its name, an unknown one as `?` (the --shape convention)."""
    return "x".join("?" if d is None else str(d) for d in dims) if dims else "scalar"


def format_shapes(shapes: Mapping[str, Sequence[Dim]]) -> str:
    """`x=1x3x48x320, mask=1x48`: inputs and their shapes, as messages and `--shape` write them."""
    return ", ".join(f"{k}={format_shape(tuple(v))}" for k, v in shapes.items())


def check_shapes(model: ModelProto, shapes: Mapping[str, Sequence[int]], source: str = "--shape") -> Shapes:
    """`shapes` checked against the model's inputs: known names, one value per dim, fixed dims as declared,
    one value per named dim across inputs. Each problem is a one-line `InputError` naming the input and
    the fix; `source` says where the shapes came from (`--shape`, an .npz path)."""
    inputs = {i.name: i for i in graph_inputs(model)}
    out: Shapes = {}
    seen: dict[str, tuple[int, str]] = {}  # named dim -> (value, input that set it)
    for name, given in shapes.items():
        shape = tuple(int(d) for d in given)
        if name not in inputs:
            raise InputError(f"{source}: the model has no input '{name}'; its inputs are "
                             f"{', '.join(inputs) or 'none'}.")
        declared = _dims(inputs[name].type) or ()
        decl = format_shape(declared)
        if len(shape) != len(declared):
            raise InputError(f"{source}: input '{name}' is given {len(shape)} dims ({format_shape(shape)}) but is "
                             f"{len(declared)}-D in the model ({decl}); give one value per dim.")
        for axis, (want, got) in enumerate(zip(declared, shape, strict=True)):
            if isinstance(want, int) and want != got:
                raise InputError(f"{source}: input '{name}' is given {format_shape(shape)}, but its axis {axis} is "
                                 f"fixed at {want} in the model ({decl}); use {want} there.")
            if isinstance(want, str) and want:
                value, where = seen.setdefault(want, (got, name))
                if value != got:
                    raise InputError(f"{source}: dim '{want}' is {value} in input '{where}' but {got} in input "
                                     f"'{name}'; give it one value.")
        out[name] = shape
    return out


IMAGE_SIDE = 224  # the size a free image height or width is planned and timed at when no --shape gives it


def _image_sides(declared: tuple[Dim, ...] | None) -> tuple[int, int] | None:
    """The height and width axes of an image input: `[N, C, H, W]` with C fixed, or `[N, H, W, C]` with 1-4
    fixed channels; None for anything else."""
    if declared is None or len(declared) != 4:
        return None
    sides = (2, 3) if isinstance(declared[1], int) else (1, 2) if isinstance(declared[3], int) and declared[3] <= 4 \
        else None
    if sides is None or any(isinstance(declared[a], int) and declared[a] == 1 for a in sides):
        return None  # a side fixed at 1 is no image: an attention mask `[N, 1, 1, seq]`, say
    return sides


def image_hint(model: ModelProto, name: str) -> str:
    """The `--shape` to give for image input `name`: its fixed dims, batch 1, H and W for the free sides."""
    declared = next((_dims(i.type) for i in graph_inputs(model) if i.name == name), None)
    sides = _image_sides(declared)
    if declared is None or sides is None:
        return f"{name}=..."
    letters = dict(zip(sides, "HW", strict=True))
    parts = [str(d) if isinstance(d, int) else letters.get(axis, "1") for axis, d in enumerate(declared)]
    return f"{name}={'x'.join(parts)}"


def image_defaults(model: ModelProto, shapes: Mapping[str, Sequence[int]],
                   dims: Mapping[str, int] | None = None) -> Shapes:
    """Shapes for the image inputs that `shapes` and `dims` leave free: a float input `[N, C, H, W]` with its
    channels fixed, or `[N, H, W, C]` with 1-4 fixed channels (Keras, TF), whose height or width is free,
    gets batch 1 and IMAGE_SIDE for each free side.

    Why: every other free dim counts as 1, and a conv net at one pixel is all fixed costs, so the latency
    check's verdicts there (form, reverts) say nothing about the real model (the PP-OCRv5 detector at 1x1:
    2.49x [0.96, 3.10]), and some nets cannot run there at all (MTCNN's P-Net). 224 is the common size;
    the plan says it was assumed and how to give the real one."""
    given = dict(dims or {})
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
    out: Shapes = {}
    for inp in graph_inputs(model):
        declared = _dims(inp.type)
        elem = inp.type.tensor_type.elem_type if inp.type.HasField("tensor_type") else 0
        sides = _image_sides(declared) if elem in floats and inp.name not in shapes else None
        if declared is None or sides is None:
            continue
        if all(isinstance(declared[a], int) or (isinstance(declared[a], str) and declared[a] in given)
               for a in sides):
            continue

        def value(d: Dim, default: int) -> int:
            return d if isinstance(d, int) else given.get(d, default) if isinstance(d, str) and d else default

        out[inp.name] = tuple(value(d, IMAGE_SIDE if axis in sides else 1) for axis, d in enumerate(declared))
    return out


SEQUENCE_LEN = 128  # the length a free sequence axis is planned and timed at when no --shape gives it


def sequence_defaults(model: ModelProto, shapes: Mapping[str, Sequence[int]],
                      dims: Mapping[str, int] | None = None) -> Shapes:
    """Shapes for the inputs that `shapes` (images included, `image_defaults`) and `dims` leave free after
    their first axis: token ids and masks `[N, seq]`, frames `[N, T, F]`. The first axis gets 1 (or its
    `--dim`), every other free axis SEQUENCE_LEN (a named one its `--dim` value where given).

    Why: every free dim counted as 1, so a sentence encoder's plan and latency check ran at one token.
    all-MiniLM-L6-v2's default student measured 1.21x its teacher there and 1.55x at 128 tokens (2 threads),
    and a check at one token decides heads or pairs and which layers to revert on fixed costs alone. 128 is
    the common padded length (and `bench --seq-len`'s default); the plan says it was assumed and how to give
    the real one."""
    given = dict(dims or {})
    out: Shapes = {}
    for inp in graph_inputs(model):
        declared = _dims(inp.type)
        if inp.name in shapes or not declared or len(declared) < 2:
            continue
        free = [a for a, d in enumerate(declared) if a > 0 and not isinstance(d, int) and not (
            isinstance(d, str) and d in given)]
        if not free:
            continue

        def value(axis: int, d: Dim) -> int:
            if isinstance(d, int):
                return d
            if isinstance(d, str) and d in given:
                return int(given[d])
            return SEQUENCE_LEN if axis > 0 else 1

        out[inp.name] = tuple(value(axis, d) for axis, d in enumerate(declared))
    return out


def sequence_hint(model: ModelProto, name: str) -> str:
    """The `--shape` to give for sequence input `name`: its fixed dims, batch 1, L for the free axes."""
    declared = next((_dims(i.type) for i in graph_inputs(model) if i.name == name), None)
    if not declared:
        return f"{name}=..."
    return f"{name}=" + "x".join(str(d) if isinstance(d, int) else "L" if axis > 0 else "1"
                                 for axis, d in enumerate(declared))


def input_symbols(model: ModelProto) -> set[str]:
    """The named dims of the model's inputs (those `--dim` and `--shape` can set)."""
    return {d for i in graph_inputs(model) for d in (_dims(i.type) or ()) if isinstance(d, str) and d}


def declared_defaults(model: ModelProto, dims: Mapping[str, int] | None = None) -> Shapes:
    """Every input at its declared shape, a named dim at its `dims` value and any other free dim at 1: the
    basis FLOPs are counted at without `--shape`, as concrete shapes that ONNX Runtime can run."""
    given = dict(dims or {})
    out: Shapes = {}
    for inp in graph_inputs(model):
        declared = _dims(inp.type)
        if declared is None:
            continue
        out[inp.name] = tuple(d if isinstance(d, int) else given.get(d, 1) if isinstance(d, str) and d else 1
                              for d in declared)
    return out


def shape_symbols(model: ModelProto, shapes: Mapping[str, Sequence[int]],
                  dims: Mapping[str, int] | None = None, source: str = "--shape") -> dict[str, int]:
    """Named-dim values: `dims` (--dim) and those that `shapes` (checked) imply; a contradiction between
    the two is an `InputError`."""
    out = dict(dims or {})
    inputs = {i.name: i for i in graph_inputs(model)}
    for name, shape in shapes.items():
        declared = _dims(inputs[name].type) if name in inputs else None
        for d, v in zip(declared or (), shape, strict=False):
            if isinstance(d, str) and d:
                if d in (dims or {}) and out[d] != int(v):
                    raise InputError(f"--dim {d}={out[d]} contradicts {source} (dim '{d}' of input '{name}' is "
                                     f"{int(v)}); drop one of them.")
                out[d] = int(v)
    return out


def complete_shapes(model: ModelProto, shapes: Mapping[str, Sequence[int]], source: str = "--shape") -> Shapes:
    """Every input's shape from `shapes` (checked against the model): an input it leaves out takes its fixed
    dims and the named dims the others fix, or is an `InputError` naming it."""
    checked = check_shapes(model, shapes, source)
    symbols = shape_symbols(model, checked, source=source)
    out: Shapes = {}
    for inp in graph_inputs(model):
        if inp.name in checked:
            out[inp.name] = checked[inp.name]
            continue
        declared = _dims(inp.type)
        dims = [d if isinstance(d, int) else symbols.get(d) if isinstance(d, str) else None for d in declared or ()]
        if declared is None or any(d is None for d in dims):
            raise InputError(f"{source}: input '{inp.name}' ({format_shape(declared or ())}) has dynamic dims that "
                             f"no shape given fixes; give it one too (--shape {inp.name}=...).")
        out[inp.name] = tuple(int(d) for d in dims)  # type: ignore[arg-type]
    return out
