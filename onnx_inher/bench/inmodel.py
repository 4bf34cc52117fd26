"""Each factorised layer's time inside the running model, from ONNX Runtime's own profile.

Timing a layer alone (`layers.py`) gives it a graph of its own, and on the CPU that graph converts
its activation into ONNX Runtime's blocked (NCHWc) layout and back around the conv: about 0.1 ms at
the PP-OCRv5 recogniser's shapes, paid by the dense layer and its replacement alike but by neither
inside the model, where the blocked layout runs from conv to conv. That fixed cost pulls a small
layer's measured speedup towards 1. Here teacher and student run whole and interleaved, with ONNX
Runtime's profiler on, and each node of ORT's optimised graph is attributed to the layer it computes:
what a user's model spends on the layer, fusions included.

Attribution is by name. A replacement's nodes are `<node>/<tag>/...` and ORT keeps those names
(adding suffixes such as `_nchwc`). When ORT fuses a conv or matmul with the bias Add or activation
after it, the fused node takes the name of the last node fused (the recogniser's `Conv.4` runs as
`Add.19_nchwc`), so those epilogue nodes count for the layer on both sides whenever either side fused
them; an epilogue node that runs on its own in both graphs costs both the same and is left out.
Whatever the student runs that no layer claims (a layout reorder it added, say) shows up in `rest`.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from onnx import ModelProto

from onnx_inher.bench.layers import epilogue, rank_of, replacement_nodes
from onnx_inher.bench.profile import node_flops, shape_table
from onnx_inher.bench.sessions import Runner, Settings, create
from onnx_inher.ir.graph import GraphIndex
from onnx_inher.ir.layers import LayerView
from onnx_inher.ir.naming import FACTOR_TAGS

# ops whose node, after ORT's fusions, carries a dense layer's multiply-adds
COMPUTE_OPS = ("Conv", "FusedConv", "MatMul", "FusedMatMul", "Gemm", "FusedGemm", "ConvTranspose")
# a dense layer is compute-bound (held to the efficiency targets) when it takes at least this long per sample
COMPUTE_BOUND_MS = 0.05
# and does at least this many FLOPs per byte of its weight: 16 rows (pixels, tokens) per weight read in float32.
# A matrix-vector product (one row at batch 1: a classifier head, a 1x1 conv after global pooling) does 0.5;
# its time is reading the weight and its nodes' fixed cost, below any CPU's ridge point (~5-20 FLOPs per byte)
MIN_FLOPS_PER_WEIGHT_BYTE = 8.0


@dataclass(frozen=True)
class NodeTimes:
    """Median microseconds per run of every node of one session's optimised graph, with its op type."""

    us: dict[str, float]
    ops: dict[str, str]
    wall_us: float | None = None  # median of the same model's runs without the profiler, timed beside them

    def total(self, names: Sequence[str]) -> float:
        return float(sum(self.us.get(n, 0.0) for n in names))

    def by_op(self) -> dict[str, float]:
        """Microseconds per run summed by op type (the optimised graph's: NCHWc reorders and fused nodes count
        as themselves)."""
        out: dict[str, float] = defaultdict(float)
        for node, us in self.us.items():
            out[self.ops[node]] += us
        return dict(out)


_BLOCKED_SUFFIX = re.compile(r"(_[a-z]+)*_nchwc")  # `_nchwc`, `_bn_nchwc`: ORT's blocked-layout copies
_FUSED_PREFIX = "fused "  # ORT's name for a node it fused an activation into (`fused /classifier/Gemm`)


def _owns(name: str, node: str) -> bool:
    """`name` is `node` or what ORT made of it: `node_nchwc`, `node_bn_nchwc`, `node/MatmulTransposeFusion/...`,
    `fused node`. Only those suffixes: PyTorch names nodes `/Relu`, `/Relu_1`, ..., and ORT names the fused conv
    `/Relu_1_output_0_nchwc`, so any `_...` after `/Relu` once claimed every ReLU-fused conv of a CNN for its
    first layer (CREPE tiny's conv1 was charged 0.75 ms of the teacher's 0.79)."""
    name = name.removeprefix(_FUSED_PREFIX)
    if name == node:
        return True
    rest = name[len(node):] if name.startswith(node) else None
    return rest is not None and (rest.startswith("/") or _BLOCKED_SUFFIX.fullmatch(rest) is not None)


def read_profile(path: Path, warmup: int, iters: int) -> NodeTimes:
    """The node times of an ORT profile written over `warmup` then `iters` runs of one session."""
    occurrences: dict[str, list[float]] = defaultdict(list)
    ops: dict[str, str] = {}
    for event in json.loads(path.read_text()):
        name = event.get("name", "")
        if event.get("cat") != "Node" or not name.endswith("_kernel_time"):
            continue
        node = name[: -len("_kernel_time")]
        occurrences[node].append(float(event["dur"]))
        ops[node] = str(event.get("args", {}).get("op_name", ""))
    us = {}
    for node, durs in occurrences.items():
        per_run = max(1, round(len(durs) / (warmup + iters)))  # a node inside a loop runs several times a run
        timed = np.asarray(durs[warmup * per_run:] or durs)
        us[node] = float(np.median(timed)) * per_run
    return NodeTimes(us, ops)


def profiler_overhead_us(settings: Settings, nodes: int = 64, iters: int = 200) -> float:
    """What ONNX Runtime's profiler adds to each node's recorded kernel time, in microseconds.

    A chain of no-op Reshapes costs 0.3 us a node when run, but each is recorded at about 2 us: the
    profiler's own clock reads. A replacement of many small nodes (a head's gate and reshapes) would be
    charged that much per node more than it costs, so the layer profile takes it off every node.
    Measured once per process and settings."""
    key = (settings.provider, settings.threads)
    if key not in _OVERHEAD:
        from onnx import TensorProto, helper, numpy_helper

        chain = [helper.make_node("Reshape", [f"t{i}", "s"], [f"t{i + 1}"]) for i in range(nodes)]
        graph = helper.make_graph(chain, "chain", [helper.make_tensor_value_info("t0", TensorProto.FLOAT, [8, 64])],
                                  [helper.make_tensor_value_info(f"t{nodes}", TensorProto.FLOAT, None)],
                                  [numpy_helper.from_array(np.array([8, 64], np.int64), "s")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
        feed = {"t0": np.zeros((8, 64), np.float32)}
        with tempfile.TemporaryDirectory(prefix="onnx-inher-profile-") as tmp:
            plain, profiled = settings.session_options(), settings.session_options()
            profiled.enable_profiling, profiled.profile_file_prefix = True, f"{tmp}/chain"
            for opts in (plain, profiled):
                opts.graph_optimization_level = _no_optimisation()
            runners = [Runner(create(model, settings, "profiler calibration", o), feed, "profiler calibration")
                       for o in (plain, profiled)]
            seconds = [runners[0]() for _ in range(iters)]
            for _ in range(iters):
                runners[1]()
            recorded = read_profile(Path(runners[1].session.end_profiling()), 0, iters)
        per_node = float(np.median(seconds)) * 1e6 / nodes
        _OVERHEAD[key] = max(0.0, float(np.median(list(recorded.us.values()))) - per_node)
    return _OVERHEAD[key]


_OVERHEAD: dict[tuple[str, int], float] = {}


def _no_optimisation() -> Any:
    import onnxruntime as ort

    return ort.GraphOptimizationLevel.ORT_DISABLE_ALL


def profile_models(paths: Sequence[Path], feed: dict[str, np.ndarray], settings: Settings, warmup: int,
                   iters: int, progress: Callable[[int], None] | None = None) -> list[NodeTimes]:
    """Node times of each model's optimised graph, their runs interleaved (A, B, A, B...) so that the
    machine's drift falls on all of them alike; the profiler's own cost per node
    (`profiler_overhead_us`) taken off each. Each model also runs without the profiler in the same
    rounds (`wall_us`): the sum of its node times should come close to it, which the report shows."""
    overhead = profiler_overhead_us(settings)
    with tempfile.TemporaryDirectory(prefix="onnx-inher-profile-") as tmp:
        runners, plain = [], []
        for i, path in enumerate(paths):
            opts = settings.session_options()
            opts.enable_profiling = True
            opts.profile_file_prefix = f"{tmp}/p{i}"
            runner = Runner(create(path, settings, str(path), opts), feed, str(path))
            runner.check()  # one more profiled run: counted as warm-up
            runners.append(runner)
            plain.append(Runner(create(path, settings, str(path)), feed, str(path)))
        for _ in range(warmup):
            for r in [*runners, *plain]:
                r()
        walls: list[list[float]] = [[] for _ in plain]
        for _ in range(iters):
            for r in runners:
                r()
            for j, r in enumerate(plain):
                walls[j].append(r())
            if progress:
                progress(len(runners))
        times = [read_profile(Path(r.session.end_profiling()), warmup + 1, iters) for r in runners]
    return [NodeTimes({n: max(0.0, v - overhead) for n, v in t.us.items()}, t.ops, float(np.median(w)) * 1e6)
            for t, w in zip(times, walls, strict=True)]


@dataclass(frozen=True)
class Attribution:
    """The optimised-graph nodes that compute one factorised layer, in the teacher and in the student."""

    node: str
    teacher: list[str]
    student: list[str]


def attribute(layer: str, names: Sequence[str], fused_after: Sequence[Sequence[str]], teacher: NodeTimes,
              student: NodeTimes) -> Attribution:
    """The nodes of `layer` on both sides. ORT names a node it creates after a node or after its output
    tensor (`<tensor>_nchwc`), so `names` are the dense node's name and outputs, and each entry of
    `fused_after` those of one node after it that ORT may fuse into it (`layers.epilogue`). An epilogue
    node counts on both sides where either side ran it fused (under a compute op), never where both ran
    it on its own."""
    owned = lambda side, keys: [n for n in side.us if any(_owns(n, k) for k in keys)]  # noqa: E731
    t_nodes = owned(teacher, names)
    s_nodes = [n for n in student.us if _owns_factor(n, layer)] + owned(student, names)
    for keys in fused_after:
        t_own, s_own = owned(teacher, keys), owned(student, keys)
        if any(side.ops.get(n) in COMPUTE_OPS for side, own in ((teacher, t_own), (student, s_own)) for n in own):
            t_nodes += t_own
            s_nodes += s_own
    return Attribution(layer, sorted(set(t_nodes)), sorted(set(s_nodes)))


def _owns_factor(name: str, layer: str) -> bool:
    """`name` is one of the nodes that replaced `layer` (`<layer>/<tag>/...`, suffixes ORT adds included)."""
    name = name.removeprefix(_FUSED_PREFIX)
    return any(name.startswith(f"{layer}/{tag}/") for tag in FACTOR_TAGS)


def layer_rows(teacher_model: ModelProto, student_model: ModelProto, views: Sequence[LayerView],
               teacher: NodeTimes, student: NodeTimes, feed: dict[str, np.ndarray], t_table: dict[str, Any],
               student_path: Path) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """One row per factorised layer of the student, and the time of everything no layer claims; `t_table`
    is the teacher's `shape_table` at `feed` (the same for every student)."""
    t_index = GraphIndex.build(teacher_model.graph)
    s_index = GraphIndex.build(student_model.graph)
    s_table = shape_table(student_path, student_model, feed)
    batch = max(1, next(iter(feed.values())).shape[0] if feed else 1)
    rows: list[dict[str, Any]] = []
    claimed_t: set[str] = set()
    claimed_s: set[str] = set()
    for view in views:
        found = replacement_nodes(view, student_model)
        if not found:
            continue
        nodes, form = found
        dense = teacher_model.graph.node[view.node_index]
        tail = [[n.name, *n.output] for n in epilogue(dense, t_index, through_identity=True)]
        at = attribute(view.node, [dense.name, *dense.output], tail, teacher, student)
        claimed_t.update(at.teacher)
        claimed_s.update(at.student)
        t_us, s_us = teacher.total(at.teacher), student.total(at.student)
        dense_flops = node_flops(dense, t_table)
        fact_flops = sum(node_flops(n, s_table) or 0 for n in nodes)
        ideal = dense_flops / fact_flops if dense_flops and fact_flops else None
        speed = t_us / s_us if t_us and s_us else None
        rows.append({"node": view.node, "op": view.op, "form": form, "rank": rank_of(nodes, view, s_index),
                     "dense_ms": t_us / 1e3, "factorized_ms": s_us / 1e3, "speedup": speed,
                     "ideal_speedup_flops": ideal, "efficiency_flops": speed / ideal if speed and ideal else None,
                     "flops_per_weight_byte": round(dense_flops / view.weight.nbytes, 2) if dense_flops else None,
                     "compute_bound": t_us / 1e3 / batch >= COMPUTE_BOUND_MS
                     and bool(dense_flops) and dense_flops >= MIN_FLOPS_PER_WEIGHT_BYTE * view.weight.nbytes,
                     "teacher_nodes": at.teacher, "student_nodes": at.student})
    rest = {"teacher_ms": sum(v for n, v in teacher.us.items() if n not in claimed_t) / 1e3,
            "student_ms": sum(v for n, v in student.us.items() if n not in claimed_s) / 1e3,
            "teacher_total_ms": sum(teacher.us.values()) / 1e3, "student_total_ms": sum(student.us.values()) / 1e3,
            "teacher_wall_ms": teacher.wall_us / 1e3 if teacher.wall_us else None,
            "student_wall_ms": student.wall_us / 1e3 if student.wall_us else None}
    # a run's time: the unprofiled session's where it exceeds the node times' sum (`whole_model_bound`)
    for side in ("teacher", "student"):
        rest[f"{side}_run_ms"] = max(rest[f"{side}_total_ms"], rest[f"{side}_wall_ms"] or 0.0)
    return rows, {**rest, **whole_model_bound(rows, rest["teacher_run_ms"], rest["student_run_ms"])}


def whole_model_bound(rows: Sequence[dict[str, Any]], teacher_ms: float, student_ms: float) -> dict[str, Any]:
    """What the factorised layers can give the whole model (Amdahl): `factorised_share`, their part of
    the teacher's run time, and `ideal_speedup_layers`, the whole-model speedup if every layer ran at
    its FLOP ideal and everything else kept the teacher's time; `efficiency_layers` is the measured
    speedup over it. A run's time is that of the unprofiled sessions where it exceeds the node times'
    sum (`layer_rows` records it as `*_run_ms`): it includes what no node accounts for, the session's and thread
    pool's cost per run, which no factorisation changes.

    Why: the whole graph's FLOP ratio counts only the multiply-adds, so a model whose activations,
    pooling, reshapes and per-run overhead take half its time can never reach it (the MNIST CNN at 2
    threads, batch 1: about 30 us of its 0.1 ms run is in no node). This bound is the fair whole-model
    target."""
    claimed = sum(r["dense_ms"] for r in rows)
    if teacher_ms <= 0 or claimed <= 0:
        return {"factorised_share": None, "ideal_speedup_layers": None, "efficiency_layers": None}
    at_ideal = sum(r["dense_ms"] / r["ideal_speedup_flops"] if r["ideal_speedup_flops"] else r["dense_ms"]
                   for r in rows)
    ideal = teacher_ms / (teacher_ms - claimed + at_ideal)
    measured = teacher_ms / student_ms if student_ms > 0 else None
    return {"factorised_share": round(claimed / teacher_ms, 4), "ideal_speedup_layers": round(ideal, 4),
            "efficiency_layers": round(measured / ideal, 4) if measured else None}


def in_model_results(entries: list[Any], points: list[Any], settings: Settings, warmup: int,
                     iters: int, dense: Any = None) -> list[dict[str, Any]]:
    """Every factorised layer of every student, in the running model, at every benchmarked shape; and per
    student and shape one `(rest)` row with the time of the nodes no layer claims. `dense` (the baseline
    with its negligible weights flushed, when bench made one) runs the dense side instead of the baseline:
    a layer slowed by them would otherwise credit the factorisation with the flushing's
    speedup."""
    from tqdm import tqdm

    from onnx_inher import _env
    from onnx_inher.ir.io import load_model
    from onnx_inher.passes.locate import locate

    teacher = load_model(entries[0].path).model
    views = [v for v in locate(teacher) if isinstance(v, LayerView) and not v.scope]
    students = [(m.label, m.path, load_model(m.path).model) for m in entries[1:]]
    out: list[dict[str, Any]] = []
    with tqdm(total=len(points) * iters * len(students) * 2, desc="layer profile", unit="run",
              disable=_env.progress_disabled(), leave=False) as bar:
        baseline = dense.path if dense is not None else entries[0].path
        for point in points:
            t_table = shape_table(entries[0].path, teacher, point.feed)
            for label, path, student in students:
                t_times, s_times = profile_models([baseline, path], point.feed, settings, warmup, iters, bar.update)
                rows, rest = layer_rows(teacher, student, views, t_times, s_times, point.feed, t_table, path)
                where = {"batch": point.batch, "seq_len": point.seq_len, "model": label,
                         "profiler_overhead_us": round(profiler_overhead_us(settings), 2),
                         "dense_side": "baseline, negligible weights flushed" if dense is not None else "baseline"}
                out += [{**where, **r} for r in rows]
                out.append({**where, "node": "(rest)", **rest})
    return out
