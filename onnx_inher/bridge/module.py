"""`to_torch`: an ONNX graph as a `torch.nn.Module` whose weights are named `nn.Parameter`s.

The node list is converted once into a list of steps `(callable, input names, output names)`;
`forward` walks it with a dict of named values. Its cost per node is constant (a dict lookup per
input, one call), so nothing grows with the batch size, and every tensor keeps its ONNX name:
`run(feeds, fetch)` returns any intermediate by name, which feature distillation needs.

Weights: every float initializer or `Constant` output used as a learned value (`ir.weights`: the
weight/bias/scale inputs of MatMul, Gemm, Conv, normalisations, RNNs, Gather tables, channel biases and
scales of Add/Mul) becomes an `nn.Parameter` (trainable as asked), kept in the `weights` ParameterDict
under a sanitised, deterministic key; `param_map` gives the exact ONNX name -> qualified parameter name,
which `write_back` uses. Every other constant (Resize scales, Clip bounds, the attention scale, mask
fills, integers), and values folded from constants at conversion time (e.g. the onnx `light` models'
`ConstantOfShape` weights), are buffers of the `consts` submodule in every trainable mode.

fp16 graphs compute in fp32 (parameters are fp32 master weights, written back as fp16): ONNX Runtime
computes most fp16 kernels in fp32 on the CPU, and fp32 master weights are what mixed-precision
training keeps anyway.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import torch
from onnx import GraphProto, ModelProto, TensorProto, numpy_helper

from onnx_inher.bridge import ops as _ops  # noqa: F401  (registers the converters)
from onnx_inher.bridge.registry import Ctx, Fn, Links, lookup
from onnx_inher.errors import InputError
from onnx_inher.ir.naming import is_factor, node_ids
from onnx_inher.ir.weights import weight_names

TRAINABLE = ("factors", "all", "no-embeddings", "none")
FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}
# Ops whose result differs between calls, or that must see the live module: never folded.
NOT_FOLDABLE = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
                          "Bernoulli", "If", "Loop", "Scan"})
FOLD_LIMIT = 1 << 26  # elements: larger folded results would bloat the module
# Element types torch cannot hold (or the bridge does not compute): refused at conversion time.
UNSUPPORTED_TYPES = {getattr(TensorProto, n): n for n in (
    "STRING", "COMPLEX64", "COMPLEX128", "FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ",
    "FLOAT8E8M0", "UINT4", "INT4", "FLOAT4E2M1", "UINT2", "INT2") if hasattr(TensorProto, n)}


def torch_dtype(onnx_type: int) -> torch.dtype:
    """The torch dtype of an ONNX element type."""
    np_type = onnx.helper.tensor_dtype_to_np_dtype(onnx_type)
    if onnx_type == TensorProto.BFLOAT16:
        return torch.bfloat16
    return torch.from_numpy(np.zeros(0, dtype=np_type)).dtype


def compute_dtype(onnx_type: int) -> torch.dtype:
    """fp16 and bf16 compute in fp32 (see the module docstring)."""
    if onnx_type in (TensorProto.FLOAT16, TensorProto.BFLOAT16):
        return torch.float32
    return torch_dtype(onnx_type)


def _sanitise(name: str, taken: set[str]) -> str:
    key = re.sub(r"[^0-9A-Za-z_]", "_", name).strip("_") or "w"
    if key[0].isdigit() or hasattr(torch.nn.ParameterDict, key):  # e.g. "values", "keys": method names
        key = f"w_{key}"
    unique, n = key, 2
    while unique in taken:
        unique, n = f"{key}_{n}", n + 1
    taken.add(unique)
    return unique


def constant_node_tensor(node: onnx.NodeProto) -> TensorProto | None:
    """The dense value of a `Constant` node as a TensorProto (None for sparse values)."""
    for a in node.attribute:
        if a.name == "value":
            return a.t
        if a.name == "value_float":
            return numpy_helper.from_array(np.array(a.f, dtype=np.float32))
        if a.name == "value_floats":
            return numpy_helper.from_array(np.array(list(a.floats), dtype=np.float32))
        if a.name == "value_int":
            return numpy_helper.from_array(np.array(a.i, dtype=np.int64))
        if a.name == "value_ints":
            return numpy_helper.from_array(np.array(list(a.ints), dtype=np.int64))
    return None


def _is_constant_node(node: onnx.NodeProto) -> bool:
    return node.op_type == "Constant" and node.domain in ("", "ai.onnx")


class Step:
    """One node: the converter's callable, its input and output names."""

    __slots__ = ("fn", "inputs", "node_id", "outputs", "single")

    def __init__(self, fn: Fn, inputs: tuple[str, ...], outputs: tuple[str, ...], node_id: str):
        self.fn, self.inputs, self.outputs, self.node_id = fn, inputs, outputs, node_id
        self.single = len(outputs) == 1


class GraphProgram:
    """A converted graph (the main graph or a subgraph): steps plus where its weights live."""

    def __init__(self, owner: OnnxModule, input_names: list[str], output_names: list[str]):
        self.owner = owner
        self.input_names = input_names
        self.output_names = output_names
        self.steps: list[Step] = []
        self.captures: list[str] = []
        self.weights: list[tuple[str, str, bool]] = []  # (onnx name, key, is parameter)
        self.output_casts: list[torch.dtype | None] = []
        self._last_uses: list[tuple[str, ...]] = []

    def env(self, scope: dict[str, torch.Tensor] | None) -> dict[str, Any]:
        params = self.owner.weights._parameters
        buffers = self.owner.consts._buffers
        env: dict[str, Any] = dict(scope) if scope else {}
        for name, key, is_param in self.weights:
            env[name] = params[key] if is_param else buffers[key]
        return env

    def last_uses(self) -> list[tuple[str, ...]]:
        """Per step, the values no later step reads: `execute` drops them from its dict right after.

        Without it every intermediate of a forward pass lived until the pass ended. Under autograd that
        costs nothing extra (backward keeps what it needs), but in `torch.no_grad()` it made a 64-line check
        of the PP-OCRv5 recogniser's student peak at 14.7 GB. Subgraph captures are node inputs (see
        `registry`), so they count as uses."""
        if len(self._last_uses) != len(self.steps):
            last: dict[str, int] = {}
            for i, step in enumerate(self.steps):
                for name in (*step.inputs, *step.outputs):
                    if name:
                        last[name] = i
            frees: list[list[str]] = [[] for _ in self.steps]
            for name, i in last.items():
                frees[i].append(name)
            self._last_uses = [tuple(sorted(f)) for f in frees]
        return self._last_uses

    def execute(self, env: dict[str, Any], upto: int | None = None, keep: Sequence[str] = ()) -> dict[str, Any]:
        """Run the steps (the first `upto`) on `env`; values no later step reads leave `env`, except the
        graph outputs and `keep`."""
        steps = self.steps if upto is None else self.steps[:upto]
        kept = {*self.output_names, *keep}
        for step, frees in zip(steps, self.last_uses(), strict=False):
            out = step.fn(*[env[n] if n else None for n in step.inputs])
            if step.single:
                env[step.outputs[0]] = out
            else:
                for name, value in zip(step.outputs, out, strict=False):
                    if name:
                        env[name] = value
            for name in frees:
                if name not in kept:
                    env.pop(name, None)
        return env

    def run(self, scope: dict[str, torch.Tensor], inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        env = self.env(scope)
        env.update(zip(self.input_names, inputs, strict=False))
        self.execute(env)
        return tuple(env[n] for n in self.output_names)


class OnnxModule(torch.nn.Module):
    """Executes an ONNX graph. `forward(*inputs)` takes the graph inputs in order, returns a tuple."""

    def __init__(self) -> None:
        super().__init__()
        self.weights = torch.nn.ParameterDict()
        self.consts = torch.nn.Module()
        self.input_names: list[str] = []
        self.output_names: list[str] = []
        self.input_casts: list[torch.dtype | None] = []
        self.in_casts: dict[str, torch.dtype] = {}
        self.out_casts: dict[str, torch.dtype] = {}
        self.program: GraphProgram

    def _feed(self, env: dict[str, Any], values: Sequence[torch.Tensor], names: Sequence[str]) -> None:
        casts = self.in_casts
        for name, value in zip(names, values, strict=True):
            if not isinstance(value, torch.Tensor):
                value = torch.as_tensor(np.asarray(value))
            cast = casts.get(name)
            env[name] = value.to(cast) if cast is not None and value.dtype != cast else value

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if len(inputs) != len(self.input_names):
            raise TypeError(f"expected {len(self.input_names)} inputs ({', '.join(self.input_names)}), "
                            f"got {len(inputs)}")
        env = self.program.env(None)
        self._feed(env, inputs, self.input_names)
        self.program.execute(env)
        return self._outputs(env, self.output_names)

    def _outputs(self, env: dict[str, Any], names: Sequence[str]) -> tuple[torch.Tensor, ...]:
        casts = self.out_casts
        out = []
        for name in names:
            value = env[name]
            cast = casts.get(name)
            out.append(value.to(cast) if cast is not None else value)
        return tuple(out)

    def run(self, feeds: dict[str, torch.Tensor], fetch: Sequence[str]) -> dict[str, torch.Tensor]:
        """Any tensors by ONNX name (graph outputs or intermediates); runs only the steps they need."""
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise InputError(f"missing graph input(s) {missing}; the graph needs {self.input_names}.")
        producers = self._producers()
        unknown = [n for n in fetch if n not in producers]
        if unknown:
            raise InputError(f"no tensor named {unknown} in this graph; fetch graph outputs or node outputs.")
        env = self.program.env(None)
        self._feed(env, [feeds[n] for n in self.input_names], self.input_names)
        upto = max((producers[n] for n in fetch), default=0)
        self.program.execute(env, upto, keep=fetch)
        return {n: env[n] for n in fetch}

    def _producers(self) -> dict[str, int]:
        known = {n: 0 for n in self.input_names}
        known.update({name: 0 for name, _, _ in self.program.weights})
        for i, step in enumerate(self.program.steps):
            known.update({o: i + 1 for o in step.outputs if o})
        return known


class _Builder:
    """Builds an OnnxModule from a model: weights first, then one step per node (folding constants)."""

    def __init__(self, model: ModelProto, trainable: str):
        self.model = model
        self.trainable = trainable
        self.opsets = {("" if o.domain == "ai.onnx" else o.domain): o.version for o in model.opset_import}
        self.module = OnnxModule()
        self.param_map: dict[str, str] = {}
        self.taken: set[str] = set()
        self.buffer_keys: dict[str, str] = {}
        # lookup tables (a Gather's data): a fine-tuned row only moves for tokens seen in training, so a
        # student trained on a small corpus drifts apart from the teacher on every other token
        self.tables = {n.input[0] for n in model.graph.node if n.op_type == "Gather" and n.input}
        # only learned values become parameters: Resize scales, mask fills, epsilons... stay constants
        self.weights = weight_names(model)

    def _requires_grad(self, name: str) -> bool:
        if self.trainable == "no-embeddings":
            return name not in self.tables
        return self.trainable == "all" or (self.trainable == "factors" and is_factor(name))

    def _add_weight(self, program: GraphProgram, name: str, tensor: TensorProto, consts: dict[str, np.ndarray],
                    tensors: dict[str, torch.Tensor]) -> None:
        array = numpy_helper.to_array(tensor)
        if tensor.data_type in FLOAT_TYPES:  # computed in fp32 (fp64 stays fp64), weights or not
            value = torch.from_numpy(np.array(array, dtype=np.float32 if tensor.data_type != TensorProto.DOUBLE
                                              else np.float64))
            if name not in self.weights:  # a fixed constant in every trainable mode
                consts[name] = array
                tensors[name] = value
                return
            grad = self._requires_grad(name)
            if name in self.param_map:
                key = self.param_map[name].removeprefix("weights.")
            else:
                key = _sanitise(name, self.taken)
                self.module.weights[key] = torch.nn.Parameter(value, requires_grad=grad)
                self.param_map[name] = f"weights.{key}"
            program.weights.append((name, key, True))
            tensors[name] = value
            if not grad:
                consts[name] = array
            return
        consts[name] = array
        tensors[name] = torch.from_numpy(np.array(array))

    def _buffer(self, program: GraphProgram, name: str, value: torch.Tensor) -> None:
        key = self.buffer_keys.get(name)
        if key is None:
            key = _sanitise(name, self.taken)
            self.buffer_keys[name] = key
            self.module.consts.register_buffer(key, value)
        program.weights.append((name, key, False))

    def build(self) -> tuple[OnnxModule, dict[str, str]]:
        graph = self.model.graph
        inits = {t.name for t in graph.initializer}
        inputs = [i for i in graph.input if i.name not in inits]
        self.module.input_names = [i.name for i in inputs]
        self.module.input_casts = [_input_cast(i) for i in inputs]
        self.module.program = self.convert(graph, "", {}, {}, top=True)
        self.module.output_names = list(self.module.program.output_names)
        self.module.in_casts = {n: c for n, c in zip(self.module.input_names, self.module.input_casts, strict=True)
                                if c is not None}
        self.module.out_casts = {n: c for n, c in zip(self.module.output_names, self.module.program.output_casts,
                                                      strict=True) if c is not None}
        return self.module, self.param_map

    def convert(self, graph: GraphProto, prefix: str, outer_consts: dict[str, np.ndarray],
                outer_tensors: dict[str, torch.Tensor], top: bool = False) -> GraphProgram:
        inits = {t.name for t in graph.initializer}
        formal = [i.name for i in graph.input if not (top and i.name in inits)]
        program = GraphProgram(self.module, formal, [o.name for o in graph.output])
        program.output_casts = [_output_cast(o) for o in graph.output]
        shadowed = set(formal)
        consts = {k: v for k, v in outer_consts.items() if k not in shadowed}
        tensors = {k: v for k, v in outer_tensors.items() if k not in shadowed}
        local: set[str] = set(formal)
        for t in graph.initializer:
            self._add_weight(program, t.name, t, consts, tensors)
            local.add(t.name)
        ids = node_ids(graph)
        unsupported = self._unsupported(graph, ids)
        if unsupported:
            raise unsupported
        needed: set[str] = set()
        steps: list[tuple[Step, onnx.NodeProto]] = []
        links = Links.of(graph)
        for node, node_id in zip(graph.node, ids, strict=True):
            local.update(o for o in node.output if o)
            if _is_constant_node(node):
                tensor = constant_node_tensor(node)
                if tensor is None:
                    raise InputError(f"node '{prefix}{node_id}' (Constant): sparse constants are not supported; "
                                     "store the weight as a dense tensor.")
                self._add_weight(program, node.output[0], tensor, consts, tensors)
                continue
            domain = "" if node.domain == "ai.onnx" else node.domain
            ctx = Ctx(node, prefix + node_id, self.opsets.get(domain, 1), consts,
                      lambda g, p, c=consts, t=tensors: self.convert(g, p + "/", c, t), compute_dtype, links)
            convert = lookup(domain, node.op_type, ctx.opset)
            assert convert is not None  # checked by _unsupported
            fn = convert(ctx)
            step = Step(fn, (*node.input, *ctx.captures), tuple(node.output), prefix + node_id)
            if self._fold(step, node, consts, tensors):
                continue
            step.inputs = tuple("" if i in ctx.consumed else n for i, n in enumerate(step.inputs))
            for i in ctx.statistics:
                if node.input[i] in self.param_map:
                    self.module.get_parameter(self.param_map[node.input[i]]).requires_grad_(False)
            steps.append((step, node))
            needed.update(n for n in step.inputs if n)
        program.steps = [s for s, _ in steps]
        needed.update(program.output_names)
        own = {name for name, _, _ in program.weights}
        for name in sorted(needed):
            if name in tensors and name not in self.param_map:
                self._buffer(program, name, tensors[name])
                own.add(name)
        program.captures = sorted(n for n in needed if n not in local and n not in own)
        # Converters read constants only while converting, but their callables may keep `ctx` (and so
        # these dicts) alive: empty them, or every weight would stay in memory twice.
        consts.clear()
        tensors.clear()
        return program

    def _unsupported(self, graph: GraphProto, ids: list[str]) -> InputError | None:
        for value in [*graph.input, *graph.output]:
            elem = _elem_type(value)
            if elem in UNSUPPORTED_TYPES:
                return InputError(f"graph value '{value.name}' has element type {UNSUPPORTED_TYPES[elem]}, which "
                                  "the PyTorch bridge does not support; cast it to a float or integer type.")
        for t in graph.initializer:
            if t.data_type in UNSUPPORTED_TYPES:
                return InputError(f"initializer '{t.name}' has element type {UNSUPPORTED_TYPES[t.data_type]}, "
                                  "which the PyTorch bridge does not support.")
        for node, node_id in zip(graph.node, ids, strict=True):
            for a in node.attribute:
                elem = a.i if a.name in ("to", "output_dtype", "dtype") and a.type == onnx.AttributeProto.INT \
                    else a.t.data_type if a.type == onnx.AttributeProto.TENSOR else 0
                if elem in UNSUPPORTED_TYPES:
                    return InputError(f"node '{node_id}' ({node.op_type}) uses element type "
                                      f"{UNSUPPORTED_TYPES[elem]}, which the PyTorch bridge does not support.")
            if _is_constant_node(node):
                continue
            domain = "" if node.domain == "ai.onnx" else node.domain
            opset = self.opsets.get(domain, 1)
            if lookup(domain, node.op_type, opset) is None:
                where = f"{domain}::" if domain else ""
                return InputError(f"node '{node_id}': op {where}{node.op_type} (opset {opset}) is not supported by "
                                  "the PyTorch bridge; see docs/bridge_ops.md for the supported ops.")
        return None

    def _fold(self, step: Step, node: onnx.NodeProto, consts: dict[str, np.ndarray],
              tensors: dict[str, torch.Tensor]) -> bool:
        """Evaluate a node whose inputs are all constant now, once, instead of at every forward."""
        if node.op_type in NOT_FOLDABLE or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                                               for a in node.attribute):
            return False
        if not all(n in consts and n in tensors for n in step.inputs if n):
            return False
        if not any(step.inputs) and node.op_type not in ("ConstantOfShape", "EyeLike", "Range"):
            return False
        with torch.no_grad():
            out = step.fn(*[tensors[n] if n else None for n in step.inputs])
        outs = (out,) if step.single else tuple(out)
        if any(not isinstance(o, torch.Tensor) or o.numel() > FOLD_LIMIT for o in outs):
            return False
        for name, value in zip(step.outputs, outs, strict=False):
            if name:
                tensors[name] = value
                consts[name] = value.numpy() if value.dtype != torch.bfloat16 else value.float().numpy()
        return True


def _elem_type(value_info: onnx.ValueInfoProto) -> int:
    t = value_info.type
    return t.tensor_type.elem_type if t.HasField("tensor_type") else 0


def _input_cast(value_info: onnx.ValueInfoProto) -> torch.dtype | None:
    """Graph inputs in fp16/bf16 are computed in fp32."""
    elem = _elem_type(value_info)
    return torch.float32 if elem in (TensorProto.FLOAT16, TensorProto.BFLOAT16) else None


def _output_cast(value_info: onnx.ValueInfoProto) -> torch.dtype | None:
    """fp16/bf16 graph outputs are cast back to their declared type."""
    elem = _elem_type(value_info)
    return torch_dtype(elem) if elem in (TensorProto.FLOAT16, TensorProto.BFLOAT16) else None


def to_torch(model: ModelProto, trainable: str = "factors") -> tuple[OnnxModule, dict[str, str]]:
    """Convert `model` to an `OnnxModule` and map each float weight's ONNX name to its parameter name.

    trainable: "factors" (weights created by compress), "all" (every float weight), "no-embeddings" (every
    float weight but lookup tables read by Gather) or "none".
    Raises InputError naming the first unsupported op and its node.
    """
    if trainable not in TRAINABLE:
        raise InputError(f"trainable must be one of {', '.join(TRAINABLE)}, got '{trainable}'.")
    module, param_map = _Builder(model, trainable).build()
    module.eval()
    return module, param_map
