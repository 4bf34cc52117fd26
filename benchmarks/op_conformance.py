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


def write_doc(text: str, supported: dict[str, tuple[int, int]], unsupported: dict[str, int]) -> None:
    below = [f"{op} ({ok}/{n})" for op, (n, ok) in supported.items() if ok < GOAL * n]
    body = f"""# PyTorch bridge: supported ops

`onnx_inher.bridge.to_torch` converts a graph whose every op has a converter in `onnx_inher/bridge/ops/`
(registry and how to add one: `onnx_inher/bridge/registry.py`). Any other op is refused at conversion
time with an `InputError` naming the op and its node (exit 2 from the CLI), never mid-training.

## Conformance on the ONNX node test cases

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

## Inference form and dtypes

Exported graphs are inference graphs: `BatchNormalization` uses its stored statistics and `Dropout` is
the identity, also after `module.train()`, so a training step changes the weights and nothing else. Only
a graph that asks for it itself (`BatchNormalization` with `training_mode=1`) gets batch statistics. The
running mean and variance are never trainable, even with `trainable="all"`.
fp16/bf16 graphs compute in fp32, as ONNX Runtime's CPU kernels do: parameters are fp32 master weights,
fp16 inputs are cast up and fp16 outputs back, and `write_back` stores fp16 again.

## Which tensors train

Only learned values become parameters (`onnx_inher.ir.weights`): MatMul/Gemm/Einsum operands, Conv and
ConvTranspose weights and biases, normalisation scales and biases, PRelu slopes, RNN weights, Gather
tables, and channel biases and scales of Add/Mul (more than one element). Resize scales, Clip bounds, Pow
exponents, the attention scale, epsilons, mask fills and BatchNorm statistics stay constants in every
trainable mode (`tests/test_bridge_weights.py` perturbs every parameter of real exports and checks ORT).

## Integer (quantised) ops

`DynamicQuantizeLinear`, `MatMulInteger` and `ConvInteger` follow ONNX Runtime's arithmetic: float32
range and scale (1 for an all-zero input), zero point and values rounded half to even, integer products
summed exactly (in float64, exact for 8-bit operands). Given the same inputs they match ORT bit for bit
(`tests/test_bridge_integer.py`). Reached tolerance on whole models: the embedded MNIST CNN through
`quantize_dynamic` matches ORT exactly (max relative error 0); a dynamic-quantised all-MiniLM-L6-v2 reaches
0.107 max relative error (token cosine ≥ 0.991), because its LayerNorm and GELU outputs differ from ORT's
by float rounding, and a one-ulp difference can move a value to the next quantisation step; each layer
compounds that. QDQ (`QuantizeLinear`/`DequantizeLinear`) trains through a straight-through estimator.

## Devices and shape values

`module.to(device)` moves every parameter and buffer. Shape values (the output of `Shape` and what is
computed from it) stay on the CPU, so `Reshape`/`Expand`/`Slice` read them without waiting for the
accelerator; where they meet data on another device they are moved to it. Constant shape inputs are read
once at conversion time.

## torch.compile

`torch.compile(module)` runs and matches eager mode, backward included (CREPE tiny: outputs within 5e-7,
MiniLM: within 1.5e-6). Graphs whose shapes come from constants trace as one graph (CREPE tiny: 1 graph,
0 breaks, compiled in 47 s on one CPU core). Graphs that compute shapes at run time (`Shape` -> `Gather` ->
`Concat` -> `Reshape`, `Range`, as transformer exports do) break the graph at each read of a shape tensor
(`.tolist()`/`.item()`): MiniLM (TorchScript export) traces as 51 graphs, and compiling it took about
400 s on 2 busy CPU cores. Eager mode is the supported default (its training-step throughput matches
hand-written modules: `benchmarks/bridge_speed.py`); the distiller does not compile.

## Adding a converter

One function per op, registered by (domain, op type, opset range): see the docstring of
`onnx_inher/bridge/registry.py`, which also documents the subgraph hook (`ctx.subgraph`, `ctx.scope`)
that `If`/`Loop`/`Scan` use to convert a graph attribute with access to outer-scope values.
"""
    write_text(DOC, body)


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
