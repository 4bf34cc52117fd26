"""ONNX Runtime sessions: provider choice, in-memory or spilled models, extra outputs.

CUDA is used when the installed onnxruntime offers it; otherwise we fall back to the CPU and say
so once. Calibration, sensitivity probes and the teacher cache all run models that may exceed
protobuf's 2 GB limit or need intermediate tensors as outputs, so both live here, once.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx
from onnx import ModelProto

from onnx_inher import _env
from onnx_inher.errors import InputError
from onnx_inher.ir.io import PROTOBUF_LIMIT

_warned = False


def providers(preference: str = "auto") -> list[str]:
    try:
        import onnxruntime as ort
    except ImportError:
        raise InputError("onnxruntime is not installed: pip install onnx-inher[cpu] (or [gpu] for CUDA)") \
            from None
    available = ort.get_available_providers()
    if preference == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    global _warned
    if preference == "cuda":
        raise InputError("CUDA was requested but this onnxruntime has no CUDA provider; "
                         "pip install onnx-inher[gpu] (and uninstall onnxruntime)")
    if not _warned and not _env.quiet():
        print("onnx-inher: no CUDA provider in onnxruntime; running on CPU", file=sys.stderr)
        _warned = True
    return ["CPUExecutionProvider"]


def session(model: ModelProto | str | Path, preference: str = "auto", threads: int = 0):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # a failed run raises, and we say why in one line: ORT's own log line is noise
    if threads:
        opts.intra_op_num_threads = threads
    source = str(model) if isinstance(model, (str, Path)) else model.SerializeToString()
    try:
        return ort.InferenceSession(source, opts, providers=providers(preference))
    except Exception as err:  # onnxruntime raises its own exception types
        first = str(err).strip().splitlines()[0]
        raise InputError(f"ONNX Runtime cannot load the model: {first}") from None


def with_outputs(model: ModelProto, fetch: Sequence[str], path: Path) -> ModelProto:
    """`model` with graph outputs = `fetch` (existing outputs or any node output, typed by shape inference)."""
    graph = model.graph
    outputs = {o.name: o for o in graph.output}
    produced = {name for node in graph.node for name in node.output if name}
    missing = [n for n in fetch if n not in outputs and n not in produced]
    if missing:
        raise InputError(f"{path}: the teacher has no tensor named {missing}; feature KD names must be outputs "
                         "of nodes present in both teacher and student (see `onnx-inher inspect`).")
    if all(n in outputs for n in fetch) and len(fetch) == len(outputs):
        return model
    typed = _value_infos(model, [n for n in fetch if n not in outputs])
    copy = ModelProto()
    copy.CopyFrom(model)
    del copy.graph.output[:]
    copy.graph.output.extend([outputs.get(n) or typed[n] for n in fetch])
    return copy



def _value_infos(model: ModelProto, names: Sequence[str]) -> dict[str, onnx.ValueInfoProto]:
    """Types of intermediate tensors; ORT needs an element type on every graph output."""
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=False)
    known = {v.name: v for v in inferred.graph.value_info}
    found = {}
    for name in names:
        info = known.get(name)
        elem = info.type.tensor_type.elem_type if info is not None else 0
        if not elem:
            raise InputError(f"cannot infer the type of intermediate tensor '{name}'; fetch another tensor.")
        found[name] = onnx.helper.make_tensor_value_info(name, elem, None)
    return found



def runnable_session(model: ModelProto, spill: Path, preference: str = "cpu", threads: int = 0) -> Any:
    """An ORT session on an in-memory model; over protobuf's 2 GB limit it goes through a file in `spill`,
    which must outlive the session."""
    return session(model if model.ByteSize() < PROTOBUF_LIMIT else _spill(model, spill), preference, threads)



def _spill(model: ModelProto, staging: Path) -> Path:
    """Models over protobuf's 2 GB limit reach ORT as a file with external data."""
    path = staging / "teacher.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="teacher.onnx.data")
    return path

