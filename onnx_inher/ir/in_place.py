"""A model whose weights ONNX Runtime reads from the teacher's own file, in place.

Some answers need a whole-model ORT session but none of the weights' values, such as the shapes that shape
inference leaves open. Made from the model's bytes, a session holds them, ORT's parse of them and its
initializers at once (ViT-B/16, 330 MiB: 1044 MiB). Here the session gets a skeleton of the model (every large
weight a stub, `ir.shapes.skeleton`) whose stubs are external data at their own offsets in the original
file, found by walking its protobuf wire format (`raw_data_spans`): ORT reads each weight once, into its
initializer, and no other copy is made.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator, Sequence
from pathlib import Path

from onnx import ModelProto, TensorProto, ValueInfoProto

from onnx_inher.ir.shapes import skeleton

# field numbers in onnx.proto
MODEL_GRAPH, GRAPH_INITIALIZER, TENSOR_NAME, TENSOR_RAW_DATA = 7, 5, 8, 9
# the ORT session option that says where external data lives for a model given as bytes
FOLDER_KEY = "session.model_external_initializers_file_folder_path"


def _varint(buf: mmap.mmap, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(buf: mmap.mmap, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, start, end of its value) of each field of the message in `buf[start:end]`."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            after = _varint(buf, pos)[1]
        elif wire == 1:
            after = pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            after = pos + length
        elif wire == 5:
            after = pos + 4
        else:
            raise ValueError(f"protobuf wire type {wire} at byte {pos}")
        yield field, wire, pos, after
        pos = after


def raw_data_spans(path: Path) -> dict[str, tuple[int, int]]:
    """`{name: (offset, length)}` of the `raw_data` of each main-graph initializer in the file. Only field
    headers are read (the file is memory-mapped): weights' pages are never touched."""
    spans: dict[str, tuple[int, int]] = {}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        for field, wire, start, end in _fields(buf, 0, len(buf)):
            if field != MODEL_GRAPH or wire != 2:
                continue
            for g_field, g_wire, g_start, g_end in _fields(buf, start, end):
                if g_field != GRAPH_INITIALIZER or g_wire != 2:
                    continue
                name, raw = None, None
                for t_field, t_wire, t_start, t_end in _fields(buf, g_start, g_end):
                    if t_field == TENSOR_NAME and t_wire == 2:
                        name = buf[t_start:t_end].decode()
                    elif t_field == TENSOR_RAW_DATA and t_wire == 2:
                        raw = (t_start, t_end - t_start)
                if name is not None and raw is not None:
                    spans[name] = raw
    return spans


def reading_in_place(model: ModelProto, path: Path, outputs: Sequence[str] = ()) -> bytes:
    """The skeleton of `model` (parsed from `path`, weights inline) with every stub read from `path` in place,
    and `outputs` added to its graph outputs, serialised. ORT resolves the stubs against `FOLDER_KEY` set to
    `path`'s folder. A stub whose data is not `raw_data` in the file gets its tensor back whole."""
    spans = raw_data_spans(path)
    bare = skeleton(model)
    if bare is model:  # no large weight: nothing to read in place
        bare = ModelProto()
        bare.CopyFrom(model)
    whole = {t.name: t for t in model.graph.initializer}
    for stub in bare.graph.initializer:
        if stub.data_location != TensorProto.EXTERNAL or stub.external_data:
            continue
        span = spans.get(stub.name)
        if span is None:
            stub.CopyFrom(whole[stub.name])
            continue
        for key, value in (("location", path.name), ("offset", str(span[0])), ("length", str(span[1]))):
            entry = stub.external_data.add()
            entry.key, entry.value = key, value
    have = {o.name for o in bare.graph.output}
    bare.graph.output.extend(ValueInfoProto(name=n) for n in outputs if n not in have)
    return bare.SerializeToString()
