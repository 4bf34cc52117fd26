"""verify: run teacher and student in ONNX Runtime on the same inputs and compare every output.

Relative error is normwise, `max|student - teacher| / max|teacher|`, so outputs near zero do not
blow it up; at full rank it must stay <= 1e-4 in fp32.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import ModelProto

from onnx_inher.errors import InputError
from onnx_inher.ir.shapes import format_shapes
from onnx_inher.runtime import session


@dataclass(frozen=True)
class OutputError:
    name: str
    max_abs: float
    max_rel: float
    shape: tuple[int, ...]


@dataclass
class VerifyReport:
    outputs: list[OutputError]
    bound: float | None
    layers: list[OutputError] = field(default_factory=list)

    @property
    def max_rel(self) -> float:
        return max((o.max_rel for o in self.outputs), default=0.0)

    @property
    def ok(self) -> bool:
        return self.bound is None or self.max_rel <= self.bound

    def to_dict(self) -> dict:
        return {"ok": self.ok, "bound": self.bound, "max_rel": self.max_rel,
                "outputs": [asdict(o) for o in self.outputs], "layers": [asdict(o) for o in self.layers]}


def compare(teacher: list[np.ndarray], student: list[np.ndarray], names: list[str]) -> list[OutputError]:
    errs = []
    for name, t, s in zip(names, teacher, student, strict=True):
        t64, s64 = np.asarray(t, np.float64), np.asarray(s, np.float64)
        diff = float(np.max(np.abs(t64 - s64))) if t64.size else 0.0
        scale = float(np.max(np.abs(t64))) if t64.size else 0.0
        errs.append(OutputError(name, diff, diff / scale if scale > 0 else diff, tuple(t64.shape)))
    return errs


def _exposing(model: ModelProto | str | Path, tensors: dict[str, int]) -> ModelProto | str | Path:
    """The model with `tensors` (name -> ONNX elem type, each produced in its main graph: `verify` keeps only
    those) added as graph outputs; the model itself when there are none."""
    if not tensors:
        return model
    out = ModelProto()
    out.CopyFrom(_load(model))
    present = {o.name for o in out.graph.output}
    out.graph.output.extend(onnx.helper.make_tensor_value_info(name, elem, None)
                            for name, elem in tensors.items() if name not in present)
    return out


def _load(model: ModelProto | str | Path) -> ModelProto:
    return onnx.load(str(model)) if isinstance(model, (str, Path)) else model


def verify(teacher: ModelProto | str | Path, student: ModelProto | str | Path, feed: dict[str, np.ndarray],
           bound: float | None = None, provider: str = "auto",
           tensors: dict[str, int] | None = None) -> VerifyReport:
    """Compare graph outputs (checked against `bound`) and, for diagnosis, the named inner `tensors`
    that teacher and student share (e.g. outputs of factorised layers), given with their elem types."""
    tensors = dict(tensors or {})
    if tensors:  # each model loaded once; only tensors both produce can be compared
        teacher, student = _load(teacher), _load(student)
        shared = _produced(teacher) & _produced(student)
        tensors = {k: v for k, v in tensors.items() if k in shared}
    t_sess = session(_exposing(teacher, tensors), provider)
    s_sess = session(_exposing(student, tensors), provider)
    names = [o.name for o in t_sess.get_outputs()]
    t_out = _run_teacher(t_sess, names, feed, teacher)
    s_out = s_sess.run(names, feed)
    errors = compare(t_out, s_out, names)
    outputs = [e for e in errors if e.name not in tensors or e.name in _graph_outputs(teacher)]
    layers = [e for e in errors if e.name in tensors]
    return VerifyReport(outputs, bound, layers)


def _run_teacher(sess: object, names: list[str], feed: dict[str, np.ndarray],
                 teacher: ModelProto | str | Path) -> list[np.ndarray]:
    """The teacher's outputs on `feed`. When the teacher itself cannot run on them (a detector whose sizes
    must divide by 32, fed a small sample image), that is the inputs' fault, not a bug: one line, exit 2."""
    try:
        return sess.run(names, feed)  # type: ignore[attr-defined]
    except Exception as err:  # ORT raises its own pybind exception types
        if type(err).__module__.split(".")[0] != "onnxruntime":
            raise
        shapes = format_shapes({k: v.shape for k, v in feed.items()})
        where = teacher if isinstance(teacher, (str, Path)) else (teacher.graph.name or "the teacher")
        why = " ".join(str(err).split())
        why = why[why.find("Status Message:"):] if "Status Message:" in why else why
        raise InputError(f"{where}: ONNX Runtime cannot run it on inputs of shape {shapes} ({why[:200]}); "
                         "give shapes it takes with --shape NAME=DxD... or real inputs with --inputs FILE.npz.") \
            from None


def _produced(model: ModelProto) -> set[str]:
    """The main graph's node outputs and inputs: an inner tensor can be compared only where both models have it
    in their main graph (a class-split head that took over its bias writes the bias Add's output, not the
    MatMul's; a tensor computed inside an If/Loop/Scan subgraph cannot be made a graph output)."""
    return {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}


def _graph_outputs(model: ModelProto | str | Path) -> set[str]:
    m = onnx.load(str(model), load_external_data=False) if isinstance(model, (str, Path)) else model
    return {o.name for o in m.graph.output}
