"""Which graph form of a factorised layer ONNX Runtime runs fastest, layer by layer, on real models.

Why: a pair (down k x k conv, up 1x1 conv) and the conv heads differ from the dense conv in more than
FLOPs: NCHWc reorders, fused Conv+Add+activation, and for the heads the per-sample weight mix (a batched
MatMul over reshaped features, no prepacking). This times every factorised layer alone at its real input
shape (`tuning.latency.layer_times`: dense vs factorised, interleaved, medians, with the nodes ORT fuses
after the layer) as a pair and as heads: `mix` is the default heads form (for conv layers the per-sample
weight mix), `conv` the constant-weight conv heads (ungrouped Conv only), with the FLOP
ideal (dense FLOPs / factorised FLOPs, `planning.cost`) and the efficiency (measured speedup / ideal).
`--profile` adds ONNX Runtime's own profile of the whole models (node time by op type, one thread).

`--roofline` adds, per pair and heads row, a measured memory floor: the time ORT takes (one thread, the same
process, right after the layers) to stream the bytes the factorised layer must move at least once
(its input, the rank features written and read back, its output, its weights) through two elementwise
nodes. A layer whose floor is above its FLOP time (dense ms / FLOP ideal: the dense layer's own FLOP rate)
is memory-bound: no kernel can reach the FLOP ideal there, and the roofline ideal
min(FLOP ideal, dense ms / floor ms) is what it is measured against. The issue's per-layer targets are for
compute-bound layers; the summary counts them on those and lists the memory-bound ones. Every run also
times the whole teacher (one thread) for the factorised layers' share of its time (Amdahl's bound).

    .venv/bin/python -m benchmarks.experiments.conv_forms [--only ocr_rec,ocr_det] [--batches 1,8] [--iters 40]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from copy import deepcopy
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from benchmarks.common import RESULTS, command, quiet, write_json
from benchmarks.latency_table import MODELS
from onnx_inher import api
from onnx_inher.bench.inmodel import read_profile
from onnx_inher.bench.profile import shape_table
from onnx_inher.bench.sessions import Runner, Settings, create, interleave
from onnx_inher.bench.stats import summarize
from onnx_inher.passes.factorize import conv_form_applies
from onnx_inher.planning import cost
from onnx_inher.planning.plan import Options, Plan
from onnx_inher.planning.rank import parse_policy
from onnx_inher.runtime import sample_inputs
from onnx_inher.tuning.latency import layer_times
from onnx_inher.tuning.speed import CONV_FORM_MARGIN

FORMS = ("pair", "mix", "conv")


def _plan(teacher: Path, shapes: dict[str, list[int]], form: str) -> tuple[Plan, Any]:
    mode, heads = ("svd", 1) if form == "pair" else ("inher", 2)
    options = Options(mode=mode, heads=heads, policy=parse_policy(param_ratio=0.5), shapes=shapes)
    a = api.analyze(teacher, shapes=shapes)
    p = api.plan(teacher, options, _analysis=a)
    for c in p.candidates:
        c.head_form = None if form == "pair" else form
    return p, a


def _ideal(view: Any, rank: int, heads: int, form: str) -> float:
    f = cost.after(view, rank, heads, None if form == "pair" else form).flops
    return cost.dense(view).flops / f if f else float("nan")


def _streaming_graph(n1: int, n2: int) -> bytes:
    """Two Relus over n1 and n2 floats: each reads and writes its tensor once (2 x 4 bytes a float)."""
    vi = [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [k]) for n, k in (("a", n1), ("b", n2))]
    out = [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [k]) for n, k in (("ya", n1), ("yb", n2))]
    nodes = [onnx.helper.make_node("Relu", [n], [f"y{n}"]) for n in ("a", "b")]
    g = onnx.helper.make_graph(nodes, "floor", vi, out)
    return onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 13)]).SerializeToString()


def _p50_ms(model: bytes, feed: dict[str, np.ndarray], label: str, iters: int) -> float:
    """p50 ms of one model alone on one CPU thread, after 5 warm-up runs."""
    runner = Runner(create(model, Settings(provider="cpu", threads=1), label), feed, label)
    (samples,) = interleave([runner], 5, iters)
    return float(summarize(samples, 1).p50)


def memory_floor_ms(x: int, r: int, y: int, w: int, iters: int) -> float:
    """p50 ms of streaming what a factorised layer moves at least once: x read, r written and read, y written,
    w (weights) read, as two elementwise nodes (n1 + n2 floats each read and written)."""
    n1, n2 = max(1, (x + r + w) // 2), max(1, (r + y) // 2)
    rng = np.random.default_rng(0)
    feed = {"a": rng.standard_normal(n1).astype(np.float32), "b": rng.standard_normal(n2).astype(np.float32)}
    return _p50_ms(_streaming_graph(n1, n2), feed, "memory floor", iters)


def teacher_ms(teacher: Path, shapes: dict[str, list[int]], iters: int) -> float:
    """p50 ms of the whole teacher, one thread: the denominator of the factorised layers' share of its time."""
    model = onnx.load(str(teacher))
    return _p50_ms(model.SerializeToString(), sample_inputs(model, shapes=shapes), "teacher", iters)


def add_roofline(rows: list[dict[str, Any]], teacher: Path, shapes: dict[str, list[int]], iters: int) -> None:
    """Memory floor, roofline ideal and bound (`compute` / `memory`) of every row, in place (see the module
    docstring)."""
    model = onnx.load(str(teacher))
    table = shape_table(teacher, model, sample_inputs(model, shapes=shapes))
    out_of = {n.name: n.output[0] for n in model.graph.node}
    for row in rows:
        dims = table[out_of[row["node"]]].dims if out_of.get(row["node"]) in table else None
        if dims is None or any(not isinstance(d, int) for d in dims):
            continue
        y = int(np.prod(dims))
        x = int(np.prod([int(d) for d in row["at"].removeprefix("input ").split("x")]))
        r = y // row["out"] * row["rank"]
        w = row["rank"] * (row["in"] + row["heads"] * row["out"])  # `in` is already C_in / groups x k x k
        floor = memory_floor_ms(x, r, y, w, iters)
        flop_ms = row["dense_ms"] / row["ideal_flops"]
        ideal = min(row["ideal_flops"], row["dense_ms"] / floor)
        row.update(floor_ms=round(floor, 4), roofline_ideal=round(ideal, 3),
                   roofline_efficiency=round(row["speedup"] / ideal, 3),
                   bound="memory" if floor > flop_ms else "compute")


def layers(teacher: Path, shapes: dict[str, list[int]], iters: int, cache: Path) -> list[dict[str, Any]]:
    """One row per factorised layer and form: dense ms, factorised ms, speedup, FLOP ideal, efficiency."""
    settings = Settings(provider="cpu", threads=1)
    rows = []
    for form in FORMS:
        p, a = _plan(teacher, shapes, form)
        if form == "conv":  # only ungrouped conv layers have this form; the others are the `mix` rows' heads
            p = deepcopy(p)
            for c in p.candidates:
                if c.decision == "factorize" and not conv_form_applies(a.views[c.node], p.opset):
                    c.decision = "skip"
        times = layer_times(p, a.loaded.model, a.views, settings, cache, warmup=5, iters=iters)
        for c in p.candidates:
            if c.node not in times:
                continue
            d, f, where = times[c.node]
            view = a.views[c.node]
            ideal = _ideal(view, int(c.rank or 1), c.heads, form)
            rows.append({"node": c.node, "op": view.op, "form": form, "rank": c.rank, "heads": c.heads,
                         "in": view.in_features, "out": view.out_features, "kernel": list(view.kernel or []),
                         "at": where, "dense_ms": round(d, 4), "factorized_ms": round(f, 4),
                         "speedup": round(d / f, 3), "ideal_flops": round(ideal, 3),
                         "efficiency": round(d / f / ideal, 3)})
    return rows


def rank_sweep(teacher: Path, shapes: dict[str, list[int]], nodes: list[str], ranks: list[int], iters: int,
               cache: Path) -> list[dict[str, Any]]:
    """Pairs of `nodes` at each rank, alone: does a rank off the NCHWc block (16 floats with AVX-512, 8 with
    AVX2) cost more than its FLOPs say?"""
    settings = Settings(provider="cpu", threads=1)
    p, a = _plan(teacher, shapes, "pair")
    rows = []
    for rank in ranks:
        q = deepcopy(p)
        for c in q.candidates:
            c.decision, c.rank = ("factorize", rank) if c.node in nodes else ("skip", c.rank)
        for node, (d, f, where) in layer_times(q, a.loaded.model, a.views, settings, cache, warmup=5,
                                               iters=iters).items():
            ideal = _ideal(a.views[node], rank, 1, "pair")
            rows.append({"node": node, "rank": rank, "at": where, "dense_ms": round(d, 4),
                         "factorized_ms": round(f, 4), "speedup": round(d / f, 3), "ideal_flops": round(ideal, 3),
                         "efficiency": round(d / f / ideal, 3)})
    return rows


def profile_by_op(paths: dict[str, Path], feed: dict[str, np.ndarray], runs: int) -> dict[str, dict[str, float]]:
    """Median microseconds per run of each ORT node, summed by op type (the optimised graph: NCHWc
    reorders and fused nodes show as themselves), one intra-op thread."""
    import onnxruntime as ort

    out: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, path in paths.items():
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = opts.inter_op_num_threads = 1
            opts.enable_profiling, opts.profile_file_prefix, opts.log_severity_level = True, f"{tmp}/p", 3
            sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            for _ in range(5 + runs):
                sess.run(None, feed)
            ops = read_profile(Path(sess.end_profiling()), 5, runs).by_op()
            out[label] = {k: round(v, 1) for k, v in sorted(ops.items(), key=lambda kv: -kv[1])}
    return out


def students(teacher: Path, shapes: dict[str, list[int]], folder: Path) -> dict[str, Path]:
    """Pair, heads (weight mix) and heads (constant conv) students, compressed without the latency check."""
    out = {"teacher": teacher}
    for form in FORMS:
        p, _ = _plan(teacher, shapes, form)
        plan_file = folder / f"{form}.plan.json"
        plan_file.write_text(p.to_json())
        out[form] = folder / f"{form}.onnx"
        api.compress(teacher, out[form], Options(mode=p.options.mode, heads=p.options.heads, shapes=shapes,
                                                 latency_check=False), plan_path=plan_file)
    return out


COMPUTE_BOUND_MS = 0.05  # per sample: layers below this are launch overhead, not FLOPs (left out of the summary)
TARGETS = {"pair": 0.8, "heads": 0.7}  # issue 18.3: fraction of the FLOP ideal per compute-bound layer


def _cell(row: dict[str, Any] | None) -> str:
    return f"{row['speedup']:.2f}x ({row['ideal_flops']:.2f}, {row['efficiency']:.2f})" if row else "-"


def _best_heads(forms: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The heads form the latency check would pick (`tuning.speed`): `conv` when its factorised/dense ratio is
    below `mix`'s by the check's margin."""
    if "conv" not in forms:
        return forms.get("mix")
    mix, conv = forms["mix"], forms["conv"]
    faster = conv["factorized_ms"] / conv["dense_ms"] < CONV_FORM_MARGIN * mix["factorized_ms"] / mix["dense_ms"]
    return conv if faster else mix


def _roofline_summary(name: str, batch: str, layers: dict[str, dict[str, dict[str, Any]]]) -> str:
    """Which layers the memory floor binds, and their efficiency against the roofline ideal."""
    memory = {n: f for n, f in layers.items() if f.get("pair", {}).get("bound") == "memory"}
    lines = [f"**{name}, batch {batch}, roofline**: {len(layers) - len(memory)} of {len(layers)} layers "
             f"(dense >= {COMPUTE_BOUND_MS * int(batch):g} ms) are compute-bound as pairs; memory-bound:\n",
             "| layer | input | rank | dense ms | pair ms | floor ms | FLOP ideal | roofline ideal | eff. vs FLOP | "
             "eff. vs roofline | heads eff. vs roofline |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for node, f in memory.items():
        r, h = f["pair"], _best_heads(f)
        heads = f"{h['roofline_efficiency']:.2f}" if h and "roofline_efficiency" in h else "-"
        lines.append(f"| {node} | {r['at'].removeprefix('input ')} | {r['rank']} | {r['dense_ms']:.3f} | "
                     f"{r['factorized_ms']:.3f} | {r['floor_ms']:.3f} | {r['ideal_flops']:.2f} | "
                     f"{r['roofline_ideal']:.2f} | {r['efficiency']:.2f} | {r['roofline_efficiency']:.2f} | {heads} |")
    return "\n".join(lines) + "\n"


def markdown(doc: dict[str, Any], table_batches: set[str] | None = None, max_rows: int = 1000) -> str:
    """Per model and batch: a summary against the targets, then the compute-bound layers (at most `max_rows`,
    only for `table_batches` when given)."""
    out: list[str] = []
    if "rank_sweep" in doc:
        out += ["| layer | input | rank | dense ms | pair ms | speedup | FLOP ideal | efficiency |",
                "|---|---|---:|---:|---:|---:|---:|---:|"]
        out += [f"| {r['node']} | {r['at'].removeprefix('input ')} | {r['rank']} | {r['dense_ms']:.3f} | "
                f"{r['factorized_ms']:.3f} | {r['speedup']:.2f}x | {r['ideal_flops']:.2f} | {r['efficiency']:.2f} |"
                for r in sorted(doc["rank_sweep"], key=lambda r: (r["node"], r["rank"]))]
    for name, rec in doc.get("models", {}).items():
        for batch, rows in rec["layers"].items():
            by: dict[str, dict[str, dict[str, Any]]] = {}
            for r in rows:
                by.setdefault(r["node"], {})[r["form"]] = r
            bound = {n: f for n, f in by.items()
                     if max(r["dense_ms"] for r in f.values()) >= COMPUTE_BOUND_MS * int(batch)}
            if "teacher_ms" in rec:
                dense = sum(r["dense_ms"] for r in rows if r["form"] == "pair")
                out.append(f"**{name}, batch {batch}**: the factorised layers, each timed alone, take {dense:.2f} ms "
                           f"of the teacher's {rec['teacher_ms'][batch]:.2f} ms "
                           f"({dense / rec['teacher_ms'][batch]:.0%}).\n")
            if any("bound" in r for r in rows):
                out.append(_roofline_summary(name, batch, bound))
                bound = {n: f for n, f in bound.items() if f.get("pair", {}).get("bound") == "compute"}
            pair = [f["pair"]["efficiency"] for f in bound.values() if "pair" in f]
            best = [b["efficiency"] for b in (_best_heads(f) for f in bound.values()) if b]
            mix = [f["mix"]["efficiency"] for f in bound.values() if "mix" in f]
            out.append(f"**{name}, batch {batch}**: {len(bound)} compute-bound layers (dense >= "
                       f"{COMPUTE_BOUND_MS * int(batch):g} ms). Pair efficiency median {np.median(pair):.2f}, "
                       f"{sum(e >= TARGETS['pair'] for e in pair)}/{len(pair)} at >= {TARGETS['pair']}; heads "
                       f"(weight mix only) median {np.median(mix):.2f}, {sum(e >= TARGETS['heads'] for e in mix)}/"
                       f"{len(mix)} at >= {TARGETS['heads']}; heads (form the latency check picks per layer) median "
                       f"{np.median(best):.2f}, {sum(e >= TARGETS['heads'] for e in best)}/{len(best)} at >= "
                       f"{TARGETS['heads']}.\n" if pair and best else f"**{name}, batch {batch}**: no rows.\n")
            if table_batches is not None and batch not in table_batches:
                continue
            out.append("| layer | input | rank pair/heads | pair (ideal, eff.) | heads mix (ideal, eff.) | "
                       "heads conv (ideal, eff.) | faster heads form |")
            out.append("|---|---|---|---|---|---|---|")
            for node, f in list(bound.items())[:max_rows]:
                any_row = next(iter(f.values()))
                best_row = _best_heads(f)
                ranks = f"{f['pair']['rank'] if 'pair' in f else '-'}/{f['mix']['rank'] if 'mix' in f else '-'}"
                out.append(f"| {node} | {any_row['at'].removeprefix('input ')} | {ranks} | {_cell(f.get('pair'))} | "
                           f"{_cell(f.get('mix'))} | {_cell(f.get('conv'))} | "
                           f"{best_row['form'] if best_row and 'conv' in f else '-'} |")
            out.append("")
        if "profile_us" in rec:
            labels = list(rec["profile_us"])
            ops = sorted({op for p in rec["profile_us"].values() for op in p},
                         key=lambda op: -max(p.get(op, 0.0) for p in rec["profile_us"].values()))[:10]
            out.append(f"ORT profile of {name}, batch 1, one thread: node time by op type (ms)\n")
            out.append("| op | " + " | ".join(labels) + " |")
            out.append("|---|" + "---:|" * len(labels))
            for op in ["(all)", *ops]:
                vals = [sum(p.values()) if op == "(all)" else p.get(op, 0.0) for p in rec["profile_us"].values()]
                out.append(f"| {op} | " + " | ".join(f"{v / 1e3:.3f}" for v in vals) + " |")
            out.append("")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="ocr_rec,ocr_det")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--profile", action="store_true", help="Also profile the whole models by op type.")
    ap.add_argument("--roofline", action="store_true", help="Also measure each layer's memory floor.")
    ap.add_argument("--out", type=Path, default=RESULTS / "conv_forms.json")
    ap.add_argument("--markdown", action="store_true", help="Only print the tables of an existing --out JSON.")
    ap.add_argument("--table-batches", default="", help="With --markdown: layer tables only at these batches.")
    ap.add_argument("--max-rows", type=int, default=1000, help="With --markdown: layers per table.")
    ap.add_argument("--rank-sweep", default="", help="Instead: NODE,NODE:R,R,... pairs of these layers of the first "
                    "--only model at these ranks (batch 1).")
    args = ap.parse_args()
    if args.markdown:
        batches = set(args.table_batches.split(",")) if args.table_batches else None
        print(markdown(json.loads(args.out.read_text()), batches, args.max_rows), end="")
        return
    quiet()
    began = time.perf_counter()
    if args.rank_sweep:
        nodes, ranks = args.rank_sweep.split(":")
        build, shapes = MODELS[args.only.split(",")[0]]
        with tempfile.TemporaryDirectory() as tmp:
            rows = rank_sweep(build(), shapes, nodes.split(","), [int(r) for r in ranks.split(",")], args.iters,
                              Path(tmp))
        write_json(args.out, {"command": command("benchmarks.experiments.conv_forms"), "rank_sweep": rows,
                              "seconds": round(time.perf_counter() - began, 1)})
        for r in rows:
            print(f"| {r['node']} | {r['at']} | {r['rank']} | {r['dense_ms']} | {r['factorized_ms']} | "
                  f"{r['speedup']:.2f}x | {r['ideal_flops']:.2f} | {r['efficiency']:.2f} |")
        return
    doc: dict[str, Any] = {"command": command("benchmarks.experiments.conv_forms"), "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only.split(","):
            build, shapes = MODELS[name]
            teacher = build()
            rec: dict[str, Any] = {"teacher": str(teacher), "layers": {}}
            for b in (int(x) for x in args.batches.split(",")):
                at = {k: [b, *v[1:]] for k, v in shapes.items()}
                rec["layers"][str(b)] = layers(teacher, at, args.iters, Path(tmp) / "cache")
                if args.roofline:
                    add_roofline(rec["layers"][str(b)], teacher, at, args.iters)
                rec.setdefault("teacher_ms", {})[str(b)] = round(teacher_ms(teacher, at, args.iters), 4)
                print(f"{name} batch {b}: {len(rec['layers'][str(b)])} rows", flush=True)
            if args.profile:
                folder = Path(tmp) / name
                folder.mkdir()
                paths = students(teacher, shapes, folder)
                feed = sample_inputs(onnx.load(str(teacher), load_external_data=False), shapes=shapes)
                rec["profile_us"] = profile_by_op(paths, feed, 20)
            doc["models"][name] = rec
    doc["seconds"] = round(time.perf_counter() - began, 1)
    write_json(args.out, doc)
    print(f"wrote {args.out} in {doc['seconds']} s")


if __name__ == "__main__":
    main()
