"""Students vs teachers on this machine's ONNX Runtime: measured speedup, ideal speedup, efficiency.

Issue 6's closing figures: the MiniLM student at 50% of the MatMul params vs its teacher at batch 1
and 32 (128 tokens), and the compressed MNIST CNN vs its teacher, each with per-layer timings.
Students are made here with `compress --param-ratio 0.5` in both forms (svd: plain pairs; inher:
2 heads). Reports go to benchmarks/bench_students/ (JSON, Markdown, PNG; minilm.png joins batch 1 and 32).

    .venv/bin/python -m benchmarks.bench_students [--only minilm|mnist] [--iters 100] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import MNIST_TEACHER, ROOT, zoo
from onnx_inher import api
from onnx_inher.bench import bench
from onnx_inher.planning.plan import Options
from onnx_inher.planning.rank import parse_policy
from onnx_inher.reporting.bench import plot_png, terminal, write_reports

OUT = ROOT / "benchmarks" / "bench_students"


def students(teacher: Path, tmp: Path, name: str) -> list[Path]:
    made = []
    for mode, heads in (("svd", 1), ("inher", 2)):
        out = tmp / f"{name}_{mode}.onnx"
        result = api.compress(teacher, out, Options(mode=mode, heads=heads, policy=parse_policy(param_ratio=0.5)))
        t = result.plan.totals()
        print(f"{out.name}: {t['factorized']}/{t['candidates']} layers, candidate params {t['param_ratio']:.1%}, "
              f"FLOPs {t['flop_ratio']:.1%}", flush=True)
        made.append(out)
    return made


def layer_summary(doc: dict) -> str:
    """Per student and shape: per-layer efficiency (measured / FLOP-ideal speedup) over the compute-bound
    layers (>= 64 rows, or any conv), and the total time of the factorised layers alone."""
    groups: dict[tuple, list[dict]] = {}
    for r in doc["layers"]:
        rows = r["x_shape"][0] * (r["x_shape"][1] if len(r["x_shape"]) == 3 else 1)
        bound = "compute" if r["op"] in ("Conv", "ConvTranspose") or rows >= 64 else "small"
        groups.setdefault((r["batch"], r["seq_len"], r["model"], r["form"], bound), []).append(r)
    lines = ["| shape | model | form | regime | layers | efficiency median | min | max | dense ms | factorised ms |"
             " speedup of these layers |", "|" + "---|" * 11]
    order = sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0, *kv[0][2:]))
    for (batch, seq, model, form, bound), rs in order:
        eff = [r["efficiency_flops"] for r in rs]
        dense, fact = sum(r["dense_ms"] for r in rs), sum(r["factorized_ms"] for r in rs)
        shape = f"b={batch}" + (f" s={seq}" if seq else "")
        lines.append(f"| {shape} | {model} | {form} | {bound} | {len(rs)} | {statistics.median(eff):.2f} | "
                     f"{min(eff):.2f} | {max(eff):.2f} | {dense:.2f} | {fact:.2f} | {dense / fact:.2f}x |")
    return "\n".join(lines)


def run(name: str, models: list[Path], batches: list[int], seq: list[int], iters: int, warmup: int,
        threads: int, layer_iters: int | None = None) -> None:
    t0 = time.perf_counter()
    result = bench(models, provider="cpu", batches=batches, seq_lens=seq, iters=iters, warmup=warmup,
                   threads=threads, per_layer=True, layer_iters=layer_iters)
    doc = result.to_dict()
    OUT.mkdir(parents=True, exist_ok=True)
    write_reports(doc, OUT / name)
    print(f"\n== {name} ({time.perf_counter() - t0:.0f} s) ==\n{terminal(doc)}\n\n{layer_summary(doc)}\n", flush=True)


def merged_minilm_plot() -> Path | None:
    """One latency-vs-batch plot for MiniLM from the batch-1 and batch-32 reports (timed separately
    because batch 32 takes ~40x longer per run)."""
    parts = [OUT / "minilm_b1.json", OUT / "minilm_b32.json"]
    if not all(p.is_file() for p in parts):
        return None
    docs = [json.loads(p.read_text()) for p in parts]
    merged = dict(docs[0], points=[pt for d in docs for pt in d["points"]])
    out = OUT / "minilm.png"
    tmp = out.with_name(".minilm.png.tmp")
    tmp.write_bytes(plot_png(merged))
    os.replace(tmp, out)
    return out


def summarize_saved() -> None:
    for path in sorted(OUT.glob("*.json")):
        print(f"\n== {path.stem} ==\n{layer_summary(json.loads(path.read_text()))}")
    print(f"plot: {merged_minilm_plot()}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["minilm", "mnist"])
    ap.add_argument("--iters", type=int, default=100, help="Timed runs per model at small shapes.")
    ap.add_argument("--layer-iters-large", type=int, default=10, help="Per-layer timed runs at MiniLM batch 32.")
    ap.add_argument("--threads", type=int, default=0, help="Intra-op threads (default: all cores).")
    ap.add_argument("--iters-large", type=int, default=20, help="Timed runs per model at MiniLM batch 32.")
    ap.add_argument("--summary", action="store_true", help="Only print the per-layer summary of saved reports.")
    args = ap.parse_args()
    if args.summary:
        summarize_saved()
        return
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if args.only in (None, "mnist"):
            models = [MNIST_TEACHER, *students(MNIST_TEACHER, tmp, "mnist_cnn")]
            run("mnist_cnn", models, [1, 32, 256], [], args.iters, 10, args.threads)
        if args.only in (None, "minilm"):
            teacher = tmp / "minilm.onnx"  # a short label in the reports
            teacher.symlink_to(zoo.minilm_torchscript())
            models = [teacher, *students(teacher, tmp, "minilm")]
            run("minilm_b1", models, [1], [128], args.iters, 10, args.threads)
            run("minilm_b32", models, [32], [128], args.iters_large, 3, args.threads, args.layer_iters_large)
            print(f"plot: {merged_minilm_plot()}")


if __name__ == "__main__":
    main()
