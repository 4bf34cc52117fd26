"""Loading and saving models: validated on the way in, atomic on the way out.

Every failure here is the user's input, so each one becomes an `InputError` naming the file and
the fix. Saving writes into a temporary folder next to the target and renames into place, so a
crash or a full disk never leaves a half-written model behind.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError, EncodeError
from onnx import ModelProto, TensorProto

from onnx_inher.errors import InputError
from onnx_inher.ir.naming import node_ids

MIN_OPSET = 7
PROTOBUF_LIMIT = 2_000_000_000
EXTERNAL_THRESHOLD = 1024
INLINE_INT_LIMIT = 1 << 20
ALIGNMENT = 4096


@dataclass
class LoadedModel:
    """A model plus what we need to save its successor the same way."""

    model: ModelProto
    path: Path
    external_data: bool
    sha256: str


def iter_tensors(graph: onnx.GraphProto) -> Iterator[TensorProto]:
    """All tensors stored in a graph: initializers and Constant values, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from iter_tensors(g)


def _uses_external(tensor: TensorProto) -> bool:
    return tensor.data_location == TensorProto.EXTERNAL


def _check_external_files(model: ModelProto, path: Path) -> None:
    base = path.parent.resolve()
    for tensor in iter_tensors(model.graph):
        if not _uses_external(tensor):
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        target = (base / location).resolve()
        if not location or Path(location).is_absolute() or base not in target.parents:
            raise InputError(
                f"{path}: tensor '{tensor.name}' points at external data '{location}' outside the "
                "model's folder; refusing to read it. Keep external data files next to the model."
            )
        if not target.is_file():
            raise InputError(
                f"{path}: external data file '{location}' for tensor '{tensor.name}' is missing; "
                f"copy it next to the model (expected at {target})."
            )
        end = int(info.get("offset", 0) or 0) + int(info.get("length", 0) or 0)
        if end > target.stat().st_size:
            raise InputError(
                f"{path}: external data file '{location}' is truncated (tensor '{tensor.name}' "
                f"needs {end} bytes, file has {target.stat().st_size}); re-export the model."
            )


def _check_structure(model: ModelProto, path: Path) -> None:
    if not model.HasField("graph") or not model.opset_import:
        raise InputError(
            f"{path}: not an ONNX model (no graph or opset); pass the .onnx file your exporter wrote."
        )
    opsets = {o.domain: o.version for o in model.opset_import}
    default = opsets.get("", opsets.get("ai.onnx"))
    newest = onnx.defs.onnx_opset_version()
    if default is None or not MIN_OPSET <= default <= newest:
        raise InputError(
            f"{path}: opset {default} is not supported (need {MIN_OPSET}..{newest}); convert it with "
            "onnx.version_converter.convert_version(model, 17)."
        )
    _check_order(model.graph, path)
    external = any(_uses_external(t) for t in iter_tensors(model.graph))
    if external:
        _check_external_files(model, path)
    try:
        # The checker reads the file itself: it then resolves external data next to the model rather
        # than in the current directory, and a ModelProto would be serialised and parsed again in C++
        # (two more copies of the weights at once).
        onnx.checker.check_model(str(path))
    except (onnx.checker.ValidationError, ValueError) as err:
        text = " ".join(str(err).split())[:300].rstrip(".") or type(err).__name__
        raise InputError(f"{path}: invalid ONNX model: {text}; fix or re-export the model.") from None


def _check_order(graph: onnx.GraphProto, path: Path) -> None:
    """Every node reads only tensors defined before it: name the node in a cycle or out of order."""
    ids = node_ids(graph)
    producer = {out: i for i, n in enumerate(graph.node) for out in n.output if out}
    defined = {v.name for v in graph.input} | {t.name for t in graph.initializer} | {""}
    defined |= {t.values.name for t in graph.sparse_initializer}
    for i, node in enumerate(graph.node):
        for name in node.input:
            if name in defined:
                continue
            j = producer.get(name)
            if j is None:
                raise InputError(f"{path}: node '{ids[i]}' reads '{name}', which no node, graph input or "
                                 "initializer provides; fix or re-export the model.")
            cycle = _cycle_from(graph, producer, i)
            if cycle:
                raise InputError(f"{path}: node '{ids[i]}' is part of a cycle "
                                 f"({' -> '.join(ids[k] for k in cycle)}); an ONNX graph must be acyclic, "
                                 "fix or re-export the model.")
            raise InputError(f"{path}: node '{ids[i]}' reads '{name}' before node '{ids[j]}' produces it; "
                             "nodes must be topologically sorted, re-export the model.")
        defined.update(node.output)


def _cycle_from(graph: onnx.GraphProto, producer: dict[str, int], start: int) -> list[int]:
    """A path of node indices from `start` back to itself through node inputs, or []."""
    stack, seen = [(start, [start])], set()
    while stack:
        i, trail = stack.pop()
        for name in graph.node[i].input:
            j = producer.get(name)
            if j is None:
                continue
            if j == start:
                return [start, *reversed(trail[1:]), start]
            if j not in seen:
                seen.add(j)
                stack.append((j, [*trail, j]))
    return []


def load_model(path: str | os.PathLike[str]) -> LoadedModel:
    """Read and validate a model, external data included."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file; check the path.")
    if p.is_dir():
        raise InputError(f"{p}: is a directory; pass the .onnx file inside it.")
    raw = p.read_bytes()
    if not raw:
        raise InputError(f"{p}: file is empty; re-export the model.")
    digest = hashlib.sha256(raw).hexdigest()
    model = ModelProto()
    try:
        model.ParseFromString(raw)
    except (DecodeError, RuntimeError, ValueError):
        raise InputError(
            f"{p}: not a valid ONNX protobuf (truncated or not ONNX); re-export or re-download it."
        ) from None
    del raw
    _check_structure(model, p)
    external = any(_uses_external(t) for t in iter_tensors(model.graph))
    if external:
        onnx.external_data_helper.load_external_data_for_model(model, str(p.parent))
    return LoadedModel(model=model, path=p, external_data=external, sha256=digest)


def _check_writable(path: Path, protected: list[Path]) -> None:
    target = path.resolve()
    for other in protected:
        if other.exists() and target == other.resolve():
            raise InputError(f"{path}: output would overwrite the input {other}; choose another -o path.")
    if path.exists() and path.is_dir():
        raise InputError(f"{path}: output is a directory; give a file name such as {path}/student.onnx.")
    parent = path.parent if str(path.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise InputError(f"{path}: {parent} is a file, not a folder; choose another -o path.")
    if not parent.is_dir():
        raise InputError(f"{path}: folder {parent} does not exist; create it first.")
    try:  # os.access says yes to root even on read-only folders: try it for real
        fd, probe = tempfile.mkstemp(prefix=".onnx-inher-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise InputError(f"{path}: folder {parent} is not writable ({err.strerror}); choose another -o path.") \
            from None


def data_file_name(path: Path) -> str:
    """External data file for a model: `<model file>.data`, next to it."""
    return path.name + ".data"


def output_paths(path: Path, external: bool) -> list[Path]:
    """Every file a save to `path` writes."""
    return [path, path.with_name(data_file_name(path))] if external else [path]


def _external_files(model_path: Path) -> list[Path]:
    """The external data files a model's tensors point at ([] when it cannot be read)."""
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception:
        return []
    return [model_path.parent / e.value for t in iter_tensors(model.graph) if _uses_external(t)
            for e in t.external_data if e.key == "location"]


def check_output(path: str | os.PathLike[str], inputs: list[Path]) -> None:
    """Fail early (before any work) when an output cannot be written."""
    p = Path(path)
    protected = list(inputs) + [q.with_name(data_file_name(q)) for q in inputs]
    outs = output_paths(p, external=True)
    if any(o.is_file() for o in outs):  # only then is it worth reading where the inputs keep their data
        protected += [f for q in inputs if q.is_file() for f in _external_files(q)]
    for out in outs:
        _check_writable(out, protected)


def _needs_external(model: ModelProto) -> bool:
    """Over the 2 GB protobuf limit (newer protobuf refuses to even measure such a model)."""
    try:
        return model.ByteSize() > PROTOBUF_LIMIT
    except EncodeError:
        return True


def _write_model(model: ModelProto, path: Path, data_name: str | None) -> None:
    """Serialise; with data_name, large float tensors go to one aligned data file.

    Tensors are detached in place and restored afterwards, so saving a 2 GB model does not
    need a second copy of its weights. Integer tensors (shapes, indices) stay inline unless huge.
    """
    moved: list[tuple[TensorProto, bytes]] = []
    try:
        if data_name is not None:
            with open(path.with_name(data_name), "wb") as data:
                offset = 0
                for tensor in iter_tensors(model.graph):
                    if tensor.data_location == TensorProto.EXTERNAL:
                        continue
                    if not tensor.HasField("raw_data"):
                        array = onnx.numpy_helper.to_array(tensor)
                        tensor.CopyFrom(onnx.numpy_helper.from_array(array, tensor.name))
                    size = len(tensor.raw_data)
                    is_int = tensor.data_type in (TensorProto.INT64, TensorProto.INT32)
                    if size < EXTERNAL_THRESHOLD or (is_int and size < INLINE_INT_LIMIT):
                        continue
                    pad = (-offset) % ALIGNMENT
                    data.write(b"\0" * pad)
                    offset += pad
                    data.write(tensor.raw_data)
                    moved.append((tensor, tensor.raw_data))
                    del tensor.external_data[:]
                    for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(size))):
                        entry = tensor.external_data.add()
                        entry.key, entry.value = key, value
                    tensor.data_location = TensorProto.EXTERNAL
                    tensor.ClearField("raw_data")
                    offset += size
        with open(path, "wb") as f:
            f.write(model.SerializeToString(deterministic=True))
    finally:
        for tensor, raw in moved:
            del tensor.external_data[:]
            tensor.data_location = TensorProto.DEFAULT
            tensor.raw_data = raw


def save_model(
    model: ModelProto,
    path: str | os.PathLike[str],
    *,
    external_data: bool = False,
    inputs: list[Path] | None = None,
) -> list[Path]:
    """Atomically write `model` (and its data file when external) and return the files written."""
    p = Path(path)
    check_output(p, inputs or [])
    external = external_data or _needs_external(model)
    finals = output_paths(p, external)
    parent = p.parent if str(p.parent) else Path(".")
    tmpdir: Path | None = None
    try:
        tmpdir = Path(tempfile.mkdtemp(prefix=".onnx-inher-", dir=parent))
        _write_model(model, tmpdir / p.name, data_file_name(p) if external else None)
        for final in reversed(finals):
            os.replace(tmpdir / final.name, final)
    except OSError as err:
        raise InputError(f"{p}: cannot write output ({err.strerror}); choose another -o path.") from None
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
    return finals


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Atomically write a small text file (plans, reports)."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".onnx-inher-", dir=parent)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, p)
    except OSError as err:
        raise InputError(f"{p}: cannot write ({err.strerror}); choose another path.") from None


def copy_model(model: ModelProto) -> ModelProto:
    """A deep copy, for passes asked not to edit their input in place."""
    out = ModelProto()
    out.CopyFrom(model)
    return out
