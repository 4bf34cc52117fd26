"""Loading and saving models: validated on the way in, atomic on the way out.

Every failure here is the user's input, so each one becomes an `InputError` naming the file and
the fix. Saving writes into a temporary folder next to the target and renames into place, so a
crash or a full disk never leaves a half-written model behind.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, EncodeError, Message
from google.protobuf.unknown_fields import UnknownFieldSet
from onnx import ModelProto, TensorProto

from onnx_inher.errors import InputError
from onnx_inher.ir.naming import node_ids

MIN_OPSET = 7
PROTOBUF_LIMIT = 2_000_000_000
EXTERNAL_THRESHOLD = 1024
INLINE_INT_LIMIT = 1 << 20
ALIGNMENT = 4096
REPARSE_BYTES = 64 << 20
SPLIT_TENSOR_BYTES = 1 << 20
RAW_DATA_FIELD = TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number


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


def _check_structure(model: ModelProto, path: Path) -> bool:
    """Friendly checks first (opset, order, external files); True when the model uses external data."""
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
    return external


def _run_checker(path: Path) -> None:
    """The ONNX checker, reading the file itself: it then resolves external data next to the model
    rather than in the current directory, and a ModelProto would be serialised and parsed again in
    C++ (two more copies of the weights at once)."""
    try:
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


def load_model(path: str | os.PathLike[str], known_sha256: str | None = None) -> LoadedModel:
    """Read and validate a model, external data included.

    `known_sha256`: the digest of this file as this process already loaded and validated it. The file is then
    parsed once and checked unchanged, not validated again: the latency check loads the teacher afresh for
    each trial student, and each validation held the file, the checker's parse and two of ours (ViT-B/16: a
    346 MB file took the check's peak past 2 GB)."""
    p = Path(path)
    if known_sha256 is not None:
        return _load_known(p, known_sha256)
    if not p.exists():
        raise InputError(f"{p}: no such file; check the path.")
    if p.is_dir():
        raise InputError(f"{p}: is a directory; pass the .onnx file inside it.")
    if p.stat().st_size == 0:
        raise InputError(f"{p}: file is empty; re-export the model.")
    model, digest = _parse(p)
    external = _check_structure(model, p)
    if not external and p.stat().st_size > REPARSE_BYTES:
        # The checker holds the file and its own parse (2x the file): not on top of ours. Parsing
        # again costs about 1 s for BERT-base (417 MiB) and takes load's peak from 3.1x to 2.1x.
        del model
        _run_checker(p)
        model, again = _parse(p)
        if again != digest:
            raise InputError(f"{p}: the file changed while it was being read; try again.")
    else:  # external data: the checker must not look at locations `_check_structure` refuses
        _run_checker(p)
    if external:
        onnx.external_data_helper.load_external_data_for_model(model, str(p.parent))
    return LoadedModel(model=model, path=p, external_data=external, sha256=digest)


def _load_known(p: Path, sha256: str) -> LoadedModel:
    try:
        model, digest = _parse(p)
    except OSError as err:
        raise InputError(f"{p}: cannot read it again ({err.strerror}); keep the teacher in place while "
                         "onnx-inher runs.") from None
    if digest != sha256:
        raise InputError(f"{p}: the file changed while onnx-inher was using it; run again.")
    external = any(_uses_external(t) for t in iter_tensors(model.graph))
    if external:
        onnx.external_data_helper.load_external_data_for_model(model, str(p.parent))
    return LoadedModel(model=model, path=p, external_data=external, sha256=digest)


def _parse(p: Path) -> tuple[ModelProto, str]:
    raw = p.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    model = ModelProto()
    try:
        model.ParseFromString(raw)
    except (DecodeError, RuntimeError, ValueError):
        raise InputError(
            f"{p}: not a valid ONNX protobuf (truncated or not ONNX); re-export or re-download it."
        ) from None
    return model, digest


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


def _payload_bytes(tensor: TensorProto) -> int:
    """Bytes of a tensor's values, without copying them out of the proto (upb's `raw_data` copies)."""
    if tensor.HasField("raw_data"):
        size = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize \
            if tensor.data_type not in (TensorProto.STRING, TensorProto.UNDEFINED) else 0
        return int(np.prod(tensor.dims, dtype=np.int64)) * size if size else len(tensor.raw_data)
    return sum(len(tensor.string_data[i]) for i in range(len(tensor.string_data))) + 8 * (
        len(tensor.float_data) + len(tensor.int32_data) + len(tensor.int64_data) + len(tensor.double_data)
        + len(tensor.uint64_data))


def weight_bytes(model: ModelProto) -> int:
    """Bytes of every tensor's values held in the model (subgraphs included), counted from the tensors:
    upb's `ByteSize()` serialises the whole model to measure it (a transient of twice the model) and
    refuses to even measure one over 2 GiB."""
    return sum(_payload_bytes(t) for t in iter_tensors(model.graph))


def _needs_external(model: ModelProto) -> bool:
    """Weights over the 2 GB limit (2e9 leaves 147 MB of protobuf's 2 GiB for the graph itself)."""
    return weight_bytes(model) > PROTOBUF_LIMIT


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _set_field(msg: Message, fd: FieldDescriptor, value: object) -> None:
    if fd.is_repeated:
        getattr(msg, fd.name).extend(value)  # type: ignore[call-overload]
    elif fd.type == FieldDescriptor.TYPE_MESSAGE:
        getattr(msg, fd.name).CopyFrom(value)
    else:
        setattr(msg, fd.name, value)


def _only_field(msg: Message, fd: FieldDescriptor, value: object) -> bytes:
    """The encoding of one (small) field: a message of the same type holding just that field."""
    tmp = type(msg)()
    _set_field(tmp, fd, value)
    return tmp.SerializeToString(deterministic=True)


class _ExternalPlan:
    """Where each tensor's values go: written to the data file in `iter_tensors` order (as onnx's own
    external-data layout does), then looked up in that order while the model is streamed."""

    def __init__(self, model: ModelProto, data_path: Path | None) -> None:
        self.data_name = data_path.name if data_path is not None else ""
        self.slots: list[tuple[int, int] | None] = []
        self.cursor = 0
        if data_path is None:
            return
        with open(data_path, "wb") as data:
            offset = 0
            for tensor in iter_tensors(model.graph):
                slot = None
                if tensor.data_location != TensorProto.EXTERNAL:
                    raw = _raw_values(tensor)
                    size = len(raw)
                    is_int = tensor.data_type in (TensorProto.INT64, TensorProto.INT32)
                    if not (size < EXTERNAL_THRESHOLD or (is_int and size < INLINE_INT_LIMIT)):
                        pad = (-offset) % ALIGNMENT
                        data.write(b"\0" * pad)
                        offset += pad
                        data.write(raw)
                        slot = (offset, size)
                        offset += size
                    del raw
                self.slots.append(slot)

    def take(self, tensors: list[TensorProto]) -> list[tuple[int, int] | None]:
        out = self.slots[self.cursor:self.cursor + len(tensors)]
        self.cursor += len(tensors)
        return out if out else [None] * len(tensors)

    def moved(self, tensor: TensorProto, slot: tuple[int, int] | None) -> None:
        """Edit a (copied) tensor the way the data file holds it."""
        if not tensor.HasField("raw_data") and tensor.data_location != TensorProto.EXTERNAL:
            tensor.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(tensor), tensor.name))
        if slot is None:
            return
        offset, size = slot
        del tensor.external_data[:]
        for key, value in (("location", self.data_name), ("offset", str(offset)), ("length", str(size))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        tensor.data_location = TensorProto.EXTERNAL
        tensor.ClearField("raw_data")


def _raw_values(tensor: TensorProto) -> bytes:
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    return onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(tensor), tensor.name).raw_data


def _node_tensors(node: onnx.NodeProto) -> list[TensorProto]:
    """A node's tensors in `iter_tensors` order."""
    out: list[TensorProto] = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.TENSOR:
            out.append(attr.t)
        elif attr.type == onnx.AttributeProto.GRAPH:
            out.extend(iter_tensors(attr.g))
        elif attr.type == onnx.AttributeProto.GRAPHS:
            for g in attr.graphs:
                out.extend(iter_tensors(g))
    return out


def _element_pieces(fd: FieldDescriptor, item: Message, plan: _ExternalPlan, external: bool) -> Iterator[bytes]:
    """One element of a graph's repeated field, as stored: tensors bound for the data file are
    edited on a copy, so the caller's model is never touched."""
    if external and fd.name in ("initializer", "node"):
        tensors = [item] if fd.name == "initializer" else _node_tensors(item)  # type: ignore[list-item]
        slots = plan.take(tensors)
        needs_edit = any(s is not None for s in slots) or any(
            not t.HasField("raw_data") and t.data_location != TensorProto.EXTERNAL for t in tensors)
        if needs_edit:
            copy = type(item)()
            copy.CopyFrom(item)
            copied = [copy] if fd.name == "initializer" else _node_tensors(copy)  # type: ignore[list-item]
            for tensor, slot in zip(copied, slots, strict=True):
                plan.moved(tensor, slot)
            item = copy
    tag = _varint(fd.number << 3 | 2)
    if isinstance(item, TensorProto) and item.HasField("raw_data") and not len(UnknownFieldSet(item)) \
            and _payload_bytes(item) >= SPLIT_TENSOR_BYTES:
        yield from _tensor_pieces(item, tag)
        return
    body = item.SerializeToString(deterministic=True)
    yield tag + _varint(len(body)) + body


def _tensor_pieces(tensor: TensorProto, tag: bytes) -> Iterator[bytes]:
    """A large tensor as (fields before raw_data, raw_data, fields after it): serialising it whole
    would hold its values twice more (upb's buffer and the Python bytes), only the values' copy here."""
    head, tail = TensorProto(), TensorProto()
    for fd in TensorProto.DESCRIPTOR.fields:  # not ListFields(): it would copy raw_data out too
        present = len(getattr(tensor, fd.name)) if fd.is_repeated else tensor.HasField(fd.name)
        if fd.number != RAW_DATA_FIELD and present:
            _set_field(head if fd.number < RAW_DATA_FIELD else tail, fd, getattr(tensor, fd.name))
    before, after = head.SerializeToString(deterministic=True), tail.SerializeToString(deterministic=True)
    raw_tag = _varint(RAW_DATA_FIELD << 3 | 2)
    n = len(tensor.raw_data)
    size = len(before) + len(raw_tag) + len(_varint(n)) + n + len(after)
    yield tag + _varint(size) + before + raw_tag + _varint(n)
    yield tensor.raw_data
    yield after


def _graph_pieces(graph: onnx.GraphProto, plan: _ExternalPlan, external: bool) -> Iterator[bytes]:
    """A graph's deterministic serialisation, one field element at a time (protobuf writes known
    fields in field-number order, and an element's bytes do not depend on its neighbours). The
    initializers follow the nodes in the file but come first in the data file: replay that order."""
    fields = sorted(graph.ListFields(), key=lambda f: f[0].number)
    if external:
        plan.cursor = len(graph.initializer)  # nodes' tensors come after every initializer's
    for fd, value in fields:
        if fd.is_repeated and fd.type == FieldDescriptor.TYPE_MESSAGE:
            if external and fd.name == "initializer":
                plan.cursor, resume = 0, plan.cursor
            for item in value:  # type: ignore[attr-defined]
                yield from _element_pieces(fd, item, plan, external)
            if external and fd.name == "initializer":
                plan.cursor = resume
        else:
            yield _only_field(graph, fd, value)


def _write_model(model: ModelProto, path: Path, data_name: str | None) -> None:
    """Serialise, streaming the graph element by element: `SerializeToString` on the whole model holds
    it twice more (upb's buffer and the Python bytes), +508 MiB for BERT-base's student. The bytes are
    exactly `SerializeToString(deterministic=True)`'s. With data_name, large tensors go to one aligned
    data file; integer tensors (shapes, indices) stay inline unless huge.
    """
    if _has_unknown_fields(model):  # rare: let protobuf place them
        _write_model_whole(model, path, data_name)
        return
    external = data_name is not None
    plan = _ExternalPlan(model, path.with_name(data_name) if data_name else None)
    length = 0
    for piece in _graph_pieces(model.graph, plan, external):
        length += len(piece)
    graph_fd = model.DESCRIPTOR.fields_by_name["graph"]
    with open(path, "wb") as f:
        for fd, value in sorted(model.ListFields(), key=lambda x: x[0].number):
            if fd is not graph_fd:
                f.write(_only_field(model, fd, value))
                continue
            f.write(_varint(fd.number << 3 | 2) + _varint(length))
            for piece in _graph_pieces(model.graph, plan, external):
                f.write(piece)


def _has_unknown_fields(model: ModelProto) -> bool:
    return bool(len(UnknownFieldSet(model)) or len(UnknownFieldSet(model.graph)))


def _write_model_whole(model: ModelProto, path: Path, data_name: str | None) -> None:
    """Serialise in one piece (the model is copied first when tensors must move to a data file)."""
    if data_name is not None:
        model = copy_model(model)
        plan = _ExternalPlan(model, path.with_name(data_name))
        for tensor, slot in zip(iter_tensors(model.graph), plan.take(list(iter_tensors(model.graph))), strict=True):
            plan.moved(tensor, slot)
    try:
        data = model.SerializeToString(deterministic=True)
    except EncodeError:
        raise InputError(f"{path}: the model is over protobuf's 2 GiB limit even without its weights.") from None
    with open(path, "wb") as f:
        f.write(data)


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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Atomically write a small file (plans, reports, plots) with the umask's permissions: mkstemp's 0600
    would make shared reports unreadable to the rest of a team."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".onnx-inher-", dir=parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, p)
    except OSError as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise InputError(f"{p}: cannot write ({err.strerror}); choose another path.") from None


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Atomically write a small text file (plans, reports)."""
    write_bytes(path, text.encode())


def release_memory() -> None:
    """Give freed heap back to the OS (glibc keeps freed blocks under its mmap threshold, 2-32 MB,
    so RSS would not drop after the teacher's weights are freed). A no-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def copy_model(model: ModelProto) -> ModelProto:
    """A deep copy, for passes asked not to edit their input in place."""
    out = ModelProto()
    out.CopyFrom(model)
    return out
