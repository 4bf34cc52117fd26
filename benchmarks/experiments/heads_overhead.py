"""Where an InherNet MatMul head block spends its time, node by node (ONNX Runtime's own profiler).

Why: at 4096 tokens MiniLM's plain pairs reach ~97% of their FLOP ratio but gated heads ~70%; the
FLOP ideal already counts the fused r -> h*out up-projection, so the gap is the nodes it does not
count (gate, softmax, reshapes, the K=h mixing product). This measures them on the student's real
layer shapes, one intra-op thread.

    .venv/bin/python -m benchmarks.experiments.heads_overhead [--runs 20] [--rows 32x128]
    .venv/bin/python -m benchmarks.experiments.heads_overhead --models T.onnx S.onnx --batch 256
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort

from benchmarks.common import zoo
from onnx_inher import api
from onnx_inher.bench.layers import dense_graph
from onnx_inher.ir.graph import GraphIndex
from onnx_inher.planning.plan import Options
from onnx_inher.planning.rank import parse_policy
from onnx_inher.tuning.latency import replacement_graph

LAYERS = ["/encoder/layer.0/attention/self/query/MatMul", "/encoder/layer.0/intermediate/dense/MatMul",
          "/encoder/layer.0/output/dense/MatMul"]


def profile(model_bytes: bytes, feed: dict[str, np.ndarray], runs: int, tmp: Path) -> dict[str, float]:
    """Mean microseconds per run of each node (by name), from ORT's profiler after 5 warm-up runs."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    opts.enable_profiling = True
    opts.profile_file_prefix = str(tmp / "prof")
    sess = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
    for _ in range(5):
        sess.run(None, feed)
    events_before = runs
    for _ in range(events_before):
        sess.run(None, feed)
    trace = json.loads(Path(sess.end_profiling()).read_text())
    per_node: dict[str, list[float]] = defaultdict(list)
    for e in trace:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            name = e["name"][: -len("_kernel_time")]
            per_node[name].append(float(e["dur"]))
            OP_OF[name] = str(e.get("args", {}).get("op_name", name))
    return {k: float(np.mean(v[-runs:])) for k, v in per_node.items()}


def by_op(models: list[Path], batch: int, runs: int) -> None:
    """Whole models, node time summed by op type (ORT's optimised graph: fused and layout nodes included)."""
    import onnx

    from onnx_inher.runtime import sample_inputs

    with tempfile.TemporaryDirectory() as tmp_name:
        for path in models:
            model = onnx.load(str(path))
            feed = sample_inputs(model, {d.dim_param: batch for i in model.graph.input
                                         for d in i.type.tensor_type.shape.dim[:1] if d.dim_param})
            per_node = profile(model.SerializeToString(), feed, runs, Path(tmp_name))
            ops: dict[str, float] = defaultdict(float)
            for name, us in per_node.items():
                ops[OP_OF.get(name, name.split("/")[-1].rstrip("_0123456789"))] += us
            total = sum(ops.values())
            print(f"\n{path.name} at batch {batch}: {total / 1e3:.2f} ms of node time per run")
            print("| op (ORT node) | ms | share |\n|---|---|---|")
            for op, us in sorted(ops.items(), key=lambda kv: -kv[1])[:10]:
                print(f"| {op} | {us / 1e3:.3f} | {us / total:.0%} |")


OP_OF: dict[str, str] = {}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--rows", default="32x128", help="Leading dims of the activation, e.g. 1x128 or 32x128.")
    ap.add_argument("--models", nargs="*", type=Path, help="Instead: profile these whole models by op type.")
    ap.add_argument("--batch", type=int, default=256, help="Batch for --models.")
    args = ap.parse_args()
    if args.models:
        by_op(args.models, args.batch, args.runs)
        return
    lead = tuple(int(d) for d in args.rows.split("x"))
    teacher = zoo.minilm_torchscript()
    options = Options(mode="inher", heads=2, policy=parse_policy(param_ratio=0.5))
    a = api.analyze(teacher)
    plan = api.plan(teacher, options, _analysis=a)
    index = GraphIndex.build(a.loaded.model.graph)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for cand in (c for c in plan.candidates if c.node in LAYERS):
            view = a.views[cand.node]
            x_shape = (*lead, view.in_features)
            dense = dense_graph(view, a.loaded.model, index, x_shape)
            assert dense is not None
            heads = replacement_graph(view, a.loaded.model, index, cand, dense, plan.opset)
            feed = {dense.x: np.random.default_rng(0).standard_normal(x_shape).astype(np.float32)}
            d = profile(dense.model.SerializeToString(), feed, args.runs, tmp)
            h = profile(heads.model.SerializeToString(), feed, args.runs, tmp)
            total = sum(h.values())
            print(f"\n{cand.node}  {view.in_features}->{view.out_features}, rank {cand.rank}, x {x_shape}: "
                  f"dense {sum(d.values()) / 1e3:.2f} ms, heads {total / 1e3:.2f} ms "
                  f"(FLOPs {dense.flops / 1e6:.0f}M -> {heads.flops / 1e6:.0f}M)")
            print("| node | ms | share |\n|---|---|---|")
            for name, us in sorted(h.items(), key=lambda kv: -kv[1]):
                print(f"| {name.split('/')[-1]} | {us / 1e3:.3f} | {us / total:.0%} |")


if __name__ == "__main__":
    main()
