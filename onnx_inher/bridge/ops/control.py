"""Control flow: If, Loop and Scan, through the registry's subgraph hook.

Each body is converted once, at conversion time (`ctx.subgraph`), into a program whose weights are
parameters of the same module, so a weight inside a branch or a loop body is trained and written back
like any other. The branch taken and the trip count are decided at run time from tensor values (this
reads them back from the device, as ONNX Runtime does); the bodies themselves run as ordinary steps.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from onnx_inher.bridge.ops.common import axis
from onnx_inher.bridge.registry import Ctx, Fn, Program, register


def _result(values: Sequence[torch.Tensor], n_outputs: int) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """A step returns one tensor for a one-output node, else a tuple."""
    return values[0] if n_outputs == 1 else tuple(values)


def _stack(items: list[torch.Tensor], dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Per-iteration values stacked along a new axis `dim` (an empty [0] tensor after zero iterations:
    the shape of a value never produced is unknown)."""
    if not items:
        return torch.zeros(0, dtype=dtype)
    return torch.stack(items, dim)


def _output_dtypes(ctx: Ctx, attr_name: str) -> list[torch.dtype]:
    """The declared element types of a body's outputs (float32 where undeclared)."""
    graph = ctx.attrs[attr_name].g
    dtypes = []
    for out in graph.output:
        elem = out.type.tensor_type.elem_type if out.type.HasField("tensor_type") else 0
        dtypes.append(ctx.dtype(elem) if elem else torch.float32)
    return dtypes


@register("If", since=1)
def if_(ctx: Ctx) -> Fn:
    then, other = ctx.subgraph("then_branch"), ctx.subgraph("else_branch")
    n_outputs = len(ctx.node.output)
    for name, program in (("then_branch", then), ("else_branch", other)):
        if len(program.output_names) != n_outputs:
            raise ctx.fail(f"{name} has {len(program.output_names)} outputs, the node has {n_outputs}")

    def run(cond: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        branch = then if bool(cond) else other
        return _result(branch.run(ctx.scope((cond, *rest)), []), n_outputs)

    return run


@register("Loop", since=1)
def loop(ctx: Ctx) -> Fn:
    """`for i in range(M) while cond`: either bound may be absent (ONNX's four loop forms).

    The body's condition output always decides whether to go on, also without a `cond` input (which
    then starts as true): the spec's table calls it ignored there, but ONNX Runtime and the onnx
    reference implementation both obey it, and they are what a model was checked against."""
    body = ctx.subgraph("body")
    n_carried = ctx.n_inputs - 2
    n_scan = len(body.output_names) - 1 - n_carried
    if n_scan < 0 or len(body.input_names) != 2 + n_carried:
        raise ctx.fail(f"body takes {len(body.input_names)} inputs and gives {len(body.output_names)} outputs; "
                       f"a Loop with {n_carried} carried values needs {2 + n_carried} and at least {1 + n_carried}")
    scan_dtypes = _output_dtypes(ctx, "body")[1 + n_carried:]
    has_bound, has_cond = ctx.has_input(0), ctx.has_input(1)
    n_outputs = len(ctx.node.output)

    def run(trip_count: torch.Tensor | None, cond: torch.Tensor | None,
            *rest: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        scope = ctx.scope((trip_count, cond, *rest))
        carried = list(rest[:n_carried])
        bound = int(trip_count) if has_bound and trip_count is not None else None
        cond_value = cond if has_cond and cond is not None else torch.tensor(True)
        going = bool(cond_value)
        scans: list[list[torch.Tensor]] = [[] for _ in range(n_scan)]
        i = 0
        while going and (bound is None or i < bound):
            out = body.run(scope, [torch.tensor(i, dtype=torch.int64), cond_value, *carried])
            cond_value, carried = out[0], list(out[1:1 + n_carried])
            for acc, value in zip(scans, out[1 + n_carried:], strict=True):
                acc.append(value)
            going = bool(cond_value)
            i += 1
        stacked = [_stack(acc, 0, dtype) for acc, dtype in zip(scans, scan_dtypes, strict=True)]
        return _result([*carried, *stacked][:n_outputs], n_outputs)

    return run


class _ScanPlan:
    """Scan's attributes: how each scan input is sliced and each scan output assembled."""

    def __init__(self, ctx: Ctx, body: Program, n_states: int, n_inputs: int):
        self.body = body
        self.n_states = n_states
        self.n_outputs = len(body.output_names) - n_states
        self.in_axes = [int(a) for a in ctx.attr("scan_input_axes", [0] * n_inputs)]
        self.in_reverse = [bool(d) for d in (ctx.attr("scan_input_directions") or ctx.attr("directions")
                                             or [0] * n_inputs)]
        self.out_axes = [int(a) for a in ctx.attr("scan_output_axes", [0] * self.n_outputs)]
        self.out_reverse = [bool(d) for d in ctx.attr("scan_output_directions", [0] * self.n_outputs)]
        self.out_dtypes = _output_dtypes(ctx, "body")[n_states:]

    def run(self, scope: dict[str, torch.Tensor], states: Sequence[torch.Tensor],
            xs: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """One scan over `xs` (no batch axis): the final states and the assembled scan outputs."""
        axes = [axis(a, x.dim()) for a, x in zip(self.in_axes, xs, strict=True)]
        steps = xs[0].shape[axes[0]] if xs else 0
        slices = [x.unbind(a) for x, a in zip(xs, axes, strict=True)]
        collected: list[list[torch.Tensor]] = [[] for _ in range(self.n_outputs)]
        state = list(states)
        for t in range(steps):
            step_in = [s[steps - 1 - t] if rev else s[t] for s, rev in zip(slices, self.in_reverse, strict=True)]
            out = self.body.run(scope, [*state, *step_in])
            state = list(out[:self.n_states])
            for acc, value in zip(collected, out[self.n_states:], strict=True):
                acc.append(value)
        outputs = []
        for acc, a, rev, dtype in zip(collected, self.out_axes, self.out_reverse, self.out_dtypes, strict=True):
            items = acc[::-1] if rev else acc
            rank = items[0].dim() + 1 if items else 1
            outputs.append(_stack(items, axis(a, rank), dtype))
        return state, outputs


@register("Scan", since=9)
def scan(ctx: Ctx) -> Fn:
    """Scan 9+: N state inputs, then `num_scan_inputs` sequences sliced along their scan axes."""
    n_inputs = int(ctx.attr("num_scan_inputs"))
    n_states = ctx.n_inputs - n_inputs
    plan = _ScanPlan(ctx, ctx.subgraph("body"), n_states, n_inputs)
    n_node_outputs = len(ctx.node.output)

    def run(*args: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        scope = ctx.scope(args)
        states, outputs = plan.run(scope, args[:n_states], args[n_states:ctx.n_inputs])
        return _result([*states, *outputs], n_node_outputs)

    return run


@register("Scan", since=8, until=8)
def scan_8(ctx: Ctx) -> Fn:
    """Scan 8: a leading batch axis on every input and output, and optional per-batch sequence lengths.

    Each batch entry is scanned on its own (over its own length); shorter scan outputs are zero-padded."""
    n_inputs = int(ctx.attr("num_scan_inputs"))
    n_states = ctx.n_inputs - 1 - n_inputs
    plan = _ScanPlan(ctx, ctx.subgraph("body"), n_states, n_inputs)
    n_node_outputs = len(ctx.node.output)

    def run(lens: torch.Tensor | None, *rest: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        scope = ctx.scope((lens, *rest))
        states, xs = rest[:n_states], rest[n_states:n_states + n_inputs]
        batch = xs[0].shape[0]
        finals: list[list[torch.Tensor]] = [[] for _ in range(n_states)]
        scanned: list[list[torch.Tensor]] = [[] for _ in range(plan.n_outputs)]
        for b in range(batch):
            length = int(lens[b]) if lens is not None else xs[0].shape[1]
            state, outputs = plan.run(scope, [s[b] for s in states], [x[b, :length] for x in xs])
            for acc, value in zip(finals, state, strict=True):
                acc.append(value)
            for acc, value in zip(scanned, outputs, strict=True):
                acc.append(value)
        padded = []
        for acc in scanned:
            longest = max(v.shape[0] for v in acc)
            padded.append(torch.stack([torch.cat([v, v.new_zeros(longest - v.shape[0], *v.shape[1:])]) for v in acc]))
        return _result([*[torch.stack(f) for f in finals], *padded], n_node_outputs)

    return run
