"""The converter registry: one small function per ONNX op, keyed by (domain, op type, opset range).

A converter runs once, at conversion time, and returns the callable that the module runs at every
forward pass. Everything that can be decided from the graph is decided then: attributes are read, and
constant inputs (a Reshape's shape, a Slice's starts, Unsqueeze's axes, a Resize's scales...) are read as
numpy arrays, so the forward pass never calls ``.tolist()`` on them and ``torch.compile`` sees plain Python
values::

    @register("Reshape", since=5)
    def reshape(ctx: Ctx) -> Fn:
        shape = ctx.const(1)                    # np.ndarray, or None when the shape is computed at run time
        allowzero = ctx.attr("allowzero", 0)
        if shape is not None:
            dims = [int(d) for d in shape]
            return lambda x, _shape: torch.reshape(x, _resolve(x, dims, allowzero))
        return lambda x, s: torch.reshape(x, _resolve(x, s.tolist(), allowzero))

The returned callable receives the node's inputs positionally (``None`` for an omitted optional input)
and returns one tensor or a tuple (one per node output). Constant inputs are still passed (a converter
that read them with ``ctx.const`` simply ignores the argument).

Subgraph hook (If, Loop, Scan): ``ctx.subgraph("then_branch")`` converts a graph attribute into a
:class:`Program` whose weights become parameters of the same module (named and written back like the
main graph's). A subgraph may read outer-scope values by name; ``ctx.subgraph`` adds those names to the
node's inputs, after the node's own inputs, in the order of ``ctx.captures``. The converter's callable
then receives them as extra positional arguments, and ``ctx.scope(args)`` turns the whole argument tuple
into the dict a program runs on::

    @register("If", since=1)
    def if_(ctx: Ctx) -> Fn:
        then, other = ctx.subgraph("then_branch"), ctx.subgraph("else_branch")
        def run(cond, *rest):
            scope = ctx.scope((cond, *rest))    # outer values by name
            return (then if bool(cond) else other).run(scope, [])
        return run

``Program.run(scope, inputs)`` binds ``inputs`` to the subgraph's formal inputs (Loop's iteration number
and carried values, for example) and returns the subgraph outputs as a tuple.

Neighbour hook (fused patterns): ``ctx.producer(name)`` is the node of the same graph that writes a
tensor, ``ctx.consumers(name)`` the nodes that read it, ``ctx.value(name)`` any constant by name, and
``ctx.sibling(node)`` a Ctx for another node of the graph (to build its converter's callable). ONNX
Runtime computes some node chains as one fused kernel with its own arithmetic (``DequantizeLinear`` ->
``Conv`` -> ``QuantizeLinear`` is ``QLinearConv``); a converter that must match it reads the chain with
these. A tensor the converter reads at run time through them is added with ``ctx.capture(name)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import onnx
from onnx import NodeProto

from onnx_inher.errors import InputError

if TYPE_CHECKING:
    import torch

Fn = Callable[..., Any]
Converter = Callable[["Ctx"], Fn]
ML_DOMAIN = "ai.onnx.ml"


class Program(Protocol):
    """A converted (sub)graph: runs its steps on a scope of named tensors."""

    input_names: list[str]
    output_names: list[str]
    captures: list[str]

    def run(self, scope: dict[str, torch.Tensor], inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]: ...


@dataclass(frozen=True)
class Entry:
    domain: str
    op: str
    since: int
    until: int | None
    convert: Converter


REGISTRY: dict[tuple[str, str], list[Entry]] = {}


def register(op: str, since: int = 1, until: int | None = None, domain: str = "") -> Callable[[Converter], Converter]:
    """Register a converter for ``op`` in opsets ``since..until`` (inclusive; ``None``: no upper bound)."""

    def add(convert: Converter) -> Converter:
        key = (_norm(domain), op)
        REGISTRY.setdefault(key, []).append(Entry(_norm(domain), op, since, until, convert))
        return convert

    return add


def _norm(domain: str) -> str:
    return "" if domain == "ai.onnx" else domain


def lookup(domain: str, op: str, opset: int) -> Converter | None:
    """The converter for ``op`` at the model's opset for its domain, or None."""
    for entry in REGISTRY.get((_norm(domain), op), []):
        if entry.since <= opset and (entry.until is None or opset <= entry.until):
            return entry.convert
    return None


def supported_ops() -> list[tuple[str, str]]:
    """Every (domain, op) with at least one converter, sorted."""
    return sorted(REGISTRY)


@dataclass(frozen=True)
class Links:
    """Who writes and who reads each tensor of one graph, and which tensors leave it."""

    producers: dict[str, NodeProto]
    consumers: dict[str, list[NodeProto]]
    outputs: frozenset[str]

    @staticmethod
    def of(graph: onnx.GraphProto) -> Links:
        producers: dict[str, NodeProto] = {}
        consumers: dict[str, list[NodeProto]] = {}
        for node in graph.node:
            producers.update((o, node) for o in node.output if o)
            for name in node.input:
                if name:
                    consumers.setdefault(name, []).append(node)
        return Links(producers, consumers, frozenset(o.name for o in graph.output))


NO_LINKS = Links({}, {}, frozenset())


class Ctx:
    """What a converter may read about its node at conversion time."""

    def __init__(self, node: NodeProto, node_id: str, opset: int, consts: dict[str, np.ndarray],
                 subgraph: Callable[[onnx.GraphProto, str], Program], compute_dtype: Callable[[int], Any],
                 links: Links = NO_LINKS):
        self.node = node
        self.links = links
        self.node_id = node_id
        self.opset = opset
        self.attrs = {a.name: a for a in node.attribute}
        self._consts = consts
        self._subgraph = subgraph
        self._compute_dtype = compute_dtype
        self.captures: list[str] = []
        self.consumed: set[int] = set()
        self.statistics: set[int] = set()
        self.programs: list[Program] = []

    @property
    def n_inputs(self) -> int:
        return len(self.node.input)

    def has_input(self, i: int) -> bool:
        return i < len(self.node.input) and self.node.input[i] != ""

    def attr(self, name: str, default: Any = None) -> Any:
        """An attribute's Python value (ints, floats, str decoded, lists, TensorProto as numpy), or default."""
        a = self.attrs.get(name)
        if a is None:
            return default
        value = onnx.helper.get_attribute_value(a)
        if isinstance(value, bytes):
            return value.decode()
        if isinstance(value, onnx.TensorProto):
            return onnx.numpy_helper.to_array(value)
        if isinstance(value, list) and value and isinstance(value[0], bytes):
            return [v.decode() for v in value]
        return value

    def const(self, i: int) -> np.ndarray | None:
        """Input ``i``'s value if it is known at conversion time (constant, or folded from constants).

        Reading a value this way marks the input as consumed: the step then passes None for it, so the
        value is not kept as a buffer for the forward pass only to be ignored there."""
        value = self.peek(i)
        if value is not None:
            self.consumed.add(i)
        return value

    def peek(self, i: int) -> np.ndarray | None:
        """Like `const`, but the converter still reads the input at run time."""
        if not self.has_input(i):
            return None
        return self._consts.get(self.node.input[i])

    def ints(self, i: int) -> list[int] | None:
        """A constant input as a list of Python ints (None when it is computed at run time)."""
        value = self.const(i)
        return None if value is None else [int(v) for v in np.asarray(value).reshape(-1)]

    def statistic(self, i: int) -> None:
        """Input ``i`` holds statistics, not weights (BatchNormalization's running mean and variance): its
        parameter never trains, whatever ``trainable`` says."""
        self.statistics.add(i)

    def dtype(self, onnx_type: int) -> torch.dtype:
        """The torch dtype that computes ONNX element type ``onnx_type`` (fp16 may compute in fp32)."""
        return self._compute_dtype(onnx_type)

    def fail(self, why: str) -> InputError:
        """An InputError naming this node, for a case the converter does not support."""
        return InputError(f"node '{self.node_id}' ({self.node.op_type}): {why}")

    def subgraph(self, attr_name: str) -> Program:
        """Convert a graph attribute; its outer-scope reads are appended to the node's inputs."""
        a = self.attrs.get(attr_name)
        if a is None or a.type != onnx.AttributeProto.GRAPH:
            raise self.fail(f"has no graph attribute '{attr_name}'")
        program = self._subgraph(a.g, f"{self.node_id}/{attr_name}")
        for name in program.captures:
            if name not in self.captures:
                self.captures.append(name)
        self.programs.append(program)
        return program

    def producer(self, name: str) -> NodeProto | None:
        """The node of this graph that writes `name` (None for graph inputs, initializers, outer values)."""
        return self.links.producers.get(name)

    def consumers(self, name: str) -> list[NodeProto]:
        """The nodes of this graph that read `name`."""
        return self.links.consumers.get(name, [])

    def is_graph_output(self, name: str) -> bool:
        return name in self.links.outputs

    def value(self, name: str) -> np.ndarray | None:
        """Any tensor's value by name if it is known at conversion time (see `const`)."""
        return self._consts.get(name) if name else None

    def sibling(self, node: NodeProto) -> Ctx:
        """A Ctx for another node of the same graph and domain, to build its converter's callable."""
        return Ctx(node, f"{self.node_id}<-{node.name or node.op_type}", self.opset, self._consts, self._subgraph,
                   self._compute_dtype, self.links)

    def capture(self, name: str) -> None:
        """Read tensor `name` of this graph at run time: it comes after the node's own inputs (and the
        subgraph captures before it), in the order of the calls."""
        if name not in self.captures:
            self.captures.append(name)

    def scope(self, args: Sequence[Any]) -> dict[str, Any]:
        """The outer-scope values a subgraph reads, by name, from the converter's argument tuple."""
        extra = args[len(self.node.input):]
        return dict(zip(self.captures, extra, strict=True))
