"""The bridge's recurrent and control-flow converters: conformance pass counts and resemblyzer parity.

    .venv/bin/python -m benchmarks.experiments.rnn_control

Part 1 runs every ONNX conformance case (onnx.backend.test.case) that uses LSTM, GRU, RNN, If, Loop,
Scan or Einsum through `to_torch` and compares with the case's reference outputs at the case's own
tolerances; each case is counted under the first of those ops found in its top-level graph. Part 2
compares the bridge with ONNX Runtime on the resemblyzer speaker encoder (tests/zoo.py) and on its
`compress --mode svd` student, at several batch x frame sizes (the export traced 2 x 24).
"""

from __future__ import annotations

import collections
import importlib
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from benchmarks.common import zoo
from onnx_inher import api
from onnx_inher.bridge import to_torch
from onnx_inher.errors import InputError
from onnx_inher.ir.graph import op_types
from onnx_inher.ir.io import load_model
from onnx_inher.planning.plan import Options

OPS = ("LSTM", "GRU", "RNN", "If", "Loop", "Scan", "Einsum")
CASE_MODULES = ("lstm", "gru", "rnn", "if_", "loop", "scan", "einsum", "rangeop", "sequence_map", "affinegrid",
                "linear_attention")
SIZES = ((1, 160), (3, 50), (8, 160))
REPEATS = 5


def _cases() -> list[object]:
    from onnx.backend.test.case import node as cases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in CASE_MODULES:
            importlib.import_module(f"{cases.__name__}.{name}")
    return [c for c in cases._NodeTestCases if op_types(c.model.graph) & set(OPS)]


def _tensor(array: np.ndarray) -> torch.Tensor:
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(np.array(array))


def _check(case: object) -> str:
    """'ok', or why the case failed."""
    try:
        module, _ = to_torch(case.model, trainable="none")  # type: ignore[attr-defined]
    except InputError as err:
        return f"not converted: {err}"
    for inputs, outputs in case.data_sets:  # type: ignore[attr-defined]
        try:
            with torch.no_grad():
                got = module(*[_tensor(np.asarray(i)) for i in inputs])
        except Exception as err:  # reported in the table, not hidden
            return f"run failed: {type(err).__name__}: {err}"
        for g, e in zip(got, outputs, strict=True):
            e = np.asarray(e)
            expected = e.astype(np.float32) if e.dtype.name == "bfloat16" else e
            actual = g.float().numpy() if g.dtype == torch.bfloat16 else g.numpy()
            if actual.shape != expected.shape:
                return f"shape {actual.shape} != {expected.shape}"
            if not np.allclose(actual, expected, rtol=case.rtol, atol=case.atol):  # type: ignore[attr-defined]
                return f"max abs diff {np.abs(actual.astype(np.float64) - expected).max():.3g}"
    return "ok"


def conformance() -> None:
    table: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
    for case in _cases():
        top = {n.op_type for n in case.model.graph.node}  # type: ignore[attr-defined]
        op = next((o for o in OPS if o in top), None) or next(o for o in OPS if o in op_types(case.model.graph))  # type: ignore[attr-defined]
        table[op].append((case.name, _check(case)))  # type: ignore[attr-defined]
    print("| op | cases | passed | failed: case (why) |")
    print("|---|---|---|---|")
    for op in OPS:
        rows = table.get(op, [])
        failed = "; ".join(f"{n} ({why[:110]})" for n, why in rows if why != "ok")
        print(f"| {op} | {len(rows)} | {sum(why == 'ok' for _, why in rows)} | {failed or '-'} |")


def _rel_err(actual: np.ndarray, expected: np.ndarray) -> float:
    e = expected.astype(np.float64)
    return float(np.abs(actual.astype(np.float64) - e).max() / np.abs(e).max())


def _median_ms(run: Callable[[], object], repeats: int = REPEATS) -> float:
    """Median wall time of `repeats` calls after one untimed call (oneDNN builds its RNN kernels per shape)."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


def resemblyzer() -> None:
    """Parity of the bridge with ORT, and its forward time next to the source nn.Module and ORT (1 thread)."""
    torch.set_num_threads(1)
    teacher_path = zoo.resemblyzer()
    source = zoo._resemblyzer_module()
    with tempfile.TemporaryDirectory() as tmp:
        student_path = Path(tmp) / "student.onnx"
        api.compress(teacher_path, student_path, Options(mode="svd"))
        models = {"teacher": load_model(teacher_path).model, "svd student": load_model(student_path).model}
    print("\n| resemblyzer | batch x frames | max rel err torch vs ORT | bridge ms | source nn.Module ms | ORT ms |")
    print("|---|---|---|---|---|---|")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    for name, model in models.items():
        module, _ = to_torch(model)
        session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        for batch, frames in SIZES:
            mels = np.random.default_rng(batch).random((batch, frames, zoo.MEL_CHANNELS), dtype=np.float32)
            x = torch.from_numpy(mels)
            expected = session.run(None, {zoo.MEL_INPUT: mels})[0]
            with torch.no_grad():
                actual = module(x)[0].numpy()
                bridge_ms = _median_ms(lambda: module(x))  # noqa: B023 (called before the next iteration)
                source_ms = _median_ms(lambda: source(x))  # noqa: B023
            ort_ms = _median_ms(lambda: session.run(None, {zoo.MEL_INPUT: mels}))  # noqa: B023
            print(f"| {name} | {batch} x {frames} | {_rel_err(actual, expected):.2e} | {bridge_ms:.0f} | "
                  f"{source_ms:.0f} | {ort_ms:.0f} |")


if __name__ == "__main__":
    conformance()
    resemblyzer()
