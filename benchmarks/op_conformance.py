"""Pass rate of the PyTorch bridge on the ONNX node conformance cases, per supported op.

    python -m benchmarks.op_conformance            # prints the table, rewrites docs/bridge_ops.md
    python -m benchmarks.op_conformance --failures # also lists every failing case and why

Each case of `onnx.backend.test.case.node.collect_testcases()` is one small model with reference
inputs and outputs. A case is converted with `to_torch(model, trainable="none")`, run, and compared like
the ONNX backend test runner does (same dtype, `assert_allclose` with the case's rtol/atol). Cases that
use an op without a converter count as "unsupported"; expanded cases (a function's body) count for the
op whose function they expand.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import warnings
from dataclasses import dataclass

import numpy as np
import onnx
import torch

from benchmarks.common import ROOT
from onnx_inher.bridge import to_torch
from onnx_inher.bridge.registry import lookup
from onnx_inher.errors import InputError
from onnx_inher.ir.io import write_text

DOC = ROOT / "docs" / "bridge_ops.md"
GOAL = 0.95


@dataclass
class Outcome:
    op: str
    case: str
    status: str  # "pass", "fail", "unsupported" (op or element type refused at conversion)
    why: str = ""


def _ops(graph: onnx.GraphProto) -> set[tuple[str, str]]:
    found = set()
    for node in graph.node:
        found.add((node.domain if node.domain != "ai.onnx" else "", node.op_type))
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                found |= _ops(a.g)
            for g in a.graphs:
                found |= _ops(g)
    return found


def _opset(model: onnx.ModelProto, domain: str) -> int:
    return next((o.version for o in model.opset_import if (o.domain if o.domain != "ai.onnx" else "") == domain), 1)


def _compare(actual: list[np.ndarray], expected: list[np.ndarray], rtol: float, atol: float) -> str:
    if len(actual) != len(expected):
        return f"{len(actual)} outputs, expected {len(expected)}"
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        e = np.asarray(e)
        if a.dtype != e.dtype:
            return f"output {i}: dtype {a.dtype}, expected {e.dtype}"
        if a.shape != e.shape:
            return f"output {i}: shape {a.shape}, expected {e.shape}"
        try:
            np.testing.assert_allclose(a, e, rtol=rtol, atol=atol)
        except AssertionError as err:
            return f"output {i}: " + " ".join(str(err).split())[:160]
    return ""


def _array(x: object) -> np.ndarray:
    return onnx.numpy_helper.to_array(x) if isinstance(x, onnx.TensorProto) else np.asarray(x)


def _to_torch(x: object) -> torch.Tensor:
    """Reference inputs as tensors; bfloat16 arrays (ml_dtypes) travel as their bits."""
    a = _array(x)
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(a).view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(np.array(a))


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def run_case(case: object, base_op: str) -> Outcome:
    model: onnx.ModelProto = case.model  # type: ignore[attr-defined]
    name: str = case.name  # type: ignore[attr-defined]
    missing = [f"{d + '::' if d else ''}{op}" for d, op in sorted(_ops(model.graph))
               if op != "Constant" and lookup(d, op, _opset(model, d)) is None]
    if missing:
        return Outcome(base_op, name, "unsupported", ", ".join(missing))
    try:
        module, _ = to_torch(model, trainable="none")
        for inputs, expected in case.data_sets:  # type: ignore[attr-defined]
            tensors = [_to_torch(x) for x in inputs]
            with torch.no_grad():
                out = module(*tensors)
            why = _compare([_to_numpy(o) for o in out], [_array(e) for e in expected],
                           case.rtol, case.atol)  # type: ignore[attr-defined]
            if why:
                return Outcome(base_op, name, "fail", why)
    except InputError as err:
        status = "unsupported" if "element type" in str(err) else "fail"
        return Outcome(base_op, name, status, str(err)[:160])
    except Exception as err:
        return Outcome(base_op, name, "fail", f"{type(err).__name__}: {' '.join(str(err).split())[:160]}")
    return Outcome(base_op, name, "pass")


def _base_ops(cases: list) -> dict[str, str]:
    """Each case's op: the node's op for one-node cases, the expanded function's op otherwise."""
    single = {c.name: c.model.graph.node[0].op_type for c in cases if len(c.model.graph.node) == 1}
    out = {}
    for c in cases:
        if c.name in single:
            out[c.name] = single[c.name]
            continue
        base = c.name.split("_expanded")[0]
        out[c.name] = single.get(base) or next((op for n, op in sorted(single.items(), key=lambda kv: -len(kv[0]))
                                                if base.startswith(n)), c.model.graph.node[-1].op_type)
    return out


def collect() -> list[Outcome]:
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = [c for c in collect_testcases() if c.kind == "node"]
        ops = _base_ops(cases)
        return [run_case(c, ops[c.name]) for c in cases]


def table(outcomes: list[Outcome]) -> tuple[str, dict[str, tuple[int, int]], dict[str, int]]:
    per_op: dict[str, list[Outcome]] = collections.defaultdict(list)
    for o in outcomes:
        per_op[o.op].append(o)
    supported: dict[str, tuple[int, int]] = {}
    unsupported: dict[str, int] = {}
    for op, items in sorted(per_op.items()):
        tried = [o for o in items if o.status != "unsupported"]
        if tried:
            supported[op] = (len(tried), sum(o.status == "pass" for o in tried))
        if len(tried) < len(items):
            unsupported[op] = len(items) - len(tried)
    lines = ["| op | cases | passed | rate |", "|---|---:|---:|---:|"]
    for op, (n, ok) in supported.items():
        lines.append(f"| {op} | {n} | {ok} | {100 * ok / n:.0f}% |")
    total_n = sum(n for n, _ in supported.values())
    total_ok = sum(ok for _, ok in supported.values())
    lines.append(f"| **all supported ops** ({len(supported)}) | {total_n} | {total_ok} | "
                 f"{100 * total_ok / max(total_n, 1):.1f}% |")
    return "\n".join(lines), supported, unsupported


START, END = "<!-- conformance:start", "<!-- conformance:end -->"


def write_doc(text: str, supported: dict[str, tuple[int, int]], unsupported: dict[str, int]) -> None:
    """Rewrite only the measured block of docs/bridge_ops.md, between its markers: the rest of the page
    (dtypes, integer ops, fp16, devices) is written by hand next to the code it describes."""
    below = [f"{op} ({ok}/{n})" for op, (n, ok) in supported.items() if ok < GOAL * n]
    block = f"""## Conformance on the ONNX node test cases

Measured by `python -m benchmarks.op_conformance` (onnx {onnx.__version__}, torch {torch.__version__}) over
`onnx.backend.test.case.node.collect_testcases()`: each case converted with `trainable="none"`, run, and
compared like the ONNX backend runner (same dtype, the case's rtol/atol). Expanded cases (a function's
body written out in primitive ops) count for the function's op, and only when all their ops are supported.

{text}

Ops below the 95% goal: {", ".join(below) if below else "none"}.

Cases not counted because they use an op without a converter, or an element type the bridge refuses at
conversion time (float8, int4/int2, float4, string, complex; op: cases):
{", ".join(f"{op}: {n}" for op, n in unsupported.items()) or "none"}.

The Dropout failures are its `training_mode=True` cases: the bridge keeps Dropout the identity (below),
and their reference masks come from numpy's random generator anyway. bf16 cases compute in fp32 (below),
so a few expanded bf16 cases differ from the bf16-rounded reference by more than 1e-3.
"""
    page = DOC.read_text()
    head, found, rest = page.partition(START)
    if not found or END not in rest:
        raise SystemExit(f"{DOC}: the {START} ... {END} markers are missing; put them back around the block")
    marker_line, _, rest = rest.partition("\n")
    _, _, tail = rest.partition(END)
    write_text(DOC, f"{head}{START}{marker_line}\n{block}{END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--failures", action="store_true", help="list failing cases and why")
    parser.add_argument("--no-doc", action="store_true", help="do not rewrite docs/bridge_ops.md")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    outcomes = collect()
    text, supported, unsupported = table(outcomes)
    print(text)
    if args.failures:
        for o in outcomes:
            if o.status == "fail":
                print(f"FAIL {o.op} {o.case}: {o.why}", file=sys.stderr)
    if not args.no_doc:
        write_doc(text, supported, unsupported)


if __name__ == "__main__":
    main()
