"""`run`: the whole job in one resumable run folder.

plan -> compress (student_init.onnx) -> distill (student.onnx) -> evaluate (teacher vs init vs final, in
ONNX Runtime, on held-out data) -> bench (teacher vs student latency) -> report (report.md, plots).

Each stage is recorded in run.json with what it was computed from (see `stages`), so a rerun after a crash
or Ctrl-C redoes only what is missing or stale; distillation itself resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import onnx

from onnx_inher import api
from onnx_inher.errors import InputError
from onnx_inher.ir.io import load_model, write_text
from onnx_inher.metrics import Evaluation, evaluate
from onnx_inher.planning.plan import Options
from onnx_inher.reporting.plots import plot_layers, plot_training, read_metrics
from onnx_inher.reporting.result import RunResult
from onnx_inher.run.stages import RunFolder

PathLike = str | os.PathLike[str]
HELD_OUT_ADAPTERS = ("mnist5k", "digits", "fashion-mnist", "fortunes")


@dataclass
class BenchSettings:
    batches: tuple[int, ...] = (1, 32)
    seq_lens: tuple[int, ...] = ()
    provider: str = "auto"
    threads: int = 0
    warmup: int = 10
    iters: int = 50


def eval_spec(data: str) -> str | None:
    """The held-out part of a named data set (never trained on), or None to reuse distill's validation split."""
    name, _, part = data.partition(":")
    if name in HELD_OUT_ADAPTERS and part in ("", "train"):
        return f"{name}:test"
    return None


def _options_doc(options: Options) -> dict[str, Any]:
    doc = asdict(options)
    doc["policy"] = asdict(options.policy)
    return doc


def _eval_data(teacher: Path, data: str, seed: int, val_fraction: float) -> Any:
    from onnx_inher.datasets import input_specs, load_data, split

    model = onnx.load(str(teacher), load_external_data=False)
    specs = input_specs(model)
    held_out = eval_spec(data)
    if held_out is not None:
        return load_data(held_out, specs, seed=seed, model=model)
    full = load_data(data, specs, seed=seed, model=model)
    _, val = split(full, val_fraction, seed)
    if val is None:
        raise InputError(f"data '{data}' has no held-out part and --val-fraction is 0: nothing to evaluate on; "
                         "give a validation fraction > 0.")
    return val


def pair_plan_text(plan_text: str) -> str | None:
    """The same plan with every headed layer turned into a plain pair (same ranks), or None if there is none.

    Distilling both answers the question the heads raise: do they pay for their latency on this model?
    """
    doc = json.loads(plan_text)
    headed = [c for c in doc["candidates"] if c.get("decision") == "factorize" and c.get("heads", 1) > 1]
    if not headed:
        return None
    for c in headed:
        c["heads"] = 1
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def run(teacher: PathLike, data: str, folder: PathLike, options: Options | None = None,
        distill_options: Any = None, bench_settings: BenchSettings | None = None, *, compare_pair: bool = False,
        log: Callable[[str], None] = print) -> RunResult:
    """plan -> compress -> distill -> evaluate -> bench -> report, resumable, into `folder`.

    With `compare_pair`, a plain-pair student with the same ranks is compressed, distilled, evaluated and
    benchmarked beside the headed one, so the report shows whether the heads pay for themselves.
    """
    from onnx_inher.distill import DistillOptions

    options = options or Options()
    options.validate()
    dopts = distill_options or DistillOptions()
    dopts.validate()
    bset = bench_settings or BenchSettings()
    teacher_path = load_model(teacher).path
    out = RunFolder(Path(folder))
    if teacher_path.parent.resolve() == out.folder.resolve():
        raise InputError(f"{folder}: the teacher lives in the run folder; choose another -o folder.")

    def do_plan() -> dict[str, Any]:
        p = api.plan(teacher_path, options)
        text = p.to_json()
        write_text(out.path("plan.json"), text)
        pair = pair_plan_text(text)
        write_text(out.path("plan_pair.json"), pair or text)
        plot_layers(p, out.path("layers.png"))
        return {"totals": p.totals(), "has_heads": pair is not None}

    plan_result = out.stage("plan", {"options": _options_doc(options)}, [teacher_path],
                            ["plan.json", "plan_pair.json"], do_plan, log=log)
    variants = [("student", "plan.json")]
    if compare_pair and plan_result["has_heads"]:
        variants.append(("student_pair", "plan_pair.json"))
    distilled = {}
    for name, plan_file in variants:
        distilled[name] = _compress_and_distill(out, name, plan_file, teacher_path, data, options, dopts, log)
    students = [out.path(f"{name}.onnx") for name, _ in variants]
    inits = [out.path(f"{name}_init.onnx") for name, _ in variants]

    def do_evaluate() -> dict[str, Any]:
        held = _eval_data(teacher_path, data, dopts.seed, dopts.val_fraction)
        doc: dict[str, Any] = {"data": held.source, "samples": len(held)}
        for (name, _), init, final in zip(variants, inits, students, strict=True):
            doc[name] = {"init": evaluate(teacher_path, init, held.inputs, held.labels, source=held.source).to_dict(),
                         "final": evaluate(teacher_path, final, held.inputs, held.labels,
                                           source=held.source).to_dict()}
        write_text(out.path("eval.json"), json.dumps(doc, indent=2, sort_keys=True) + "\n")
        return doc

    eval_result = out.stage("evaluate", {"data": data, "seed": dopts.seed, "val": dopts.val_fraction},
                            [teacher_path, *inits, *students], ["eval.json"], do_evaluate, log=log)

    def do_bench() -> dict[str, Any]:
        from onnx_inher.bench import bench
        from onnx_inher.reporting.bench import write_reports

        res = bench([teacher_path, *students], provider=bset.provider, batches=bset.batches,
                    seq_lens=bset.seq_lens, threads=bset.threads, warmup=bset.warmup, iters=bset.iters)
        doc = res.to_dict()
        write_reports(doc, out.path("bench"))
        return {"points": [{"batch": p["batch"], "seq_len": p["seq_len"],
                            **{name: p["results"][j + 1] for j, (name, _) in enumerate(variants)}}
                           for p in doc["points"]], "settings": doc.get("settings", {})}

    bench_result = out.stage("bench", asdict(bset), [teacher_path, *students],
                             ["bench.json", "bench.md", "bench.png"], do_bench, log=log)
    result = RunResult(str(out.folder), plan_result, eval_result, distilled, bench_result)
    result.summary = summary_rows(teacher_path, out.folder, distilled, plan_result, eval_result, bench_result)
    from onnx_inher.reporting.text import run_markdown

    write_text(out.path("report.md"), run_markdown(result, out.folder))
    write_text(out.path("report.json"), result.to_json())
    plot_training(read_metrics(out.path("metrics.jsonl")), out.path("training.png"))
    return result


def _compress_and_distill(out: RunFolder, name: str, plan_file: str, teacher: Path, data: str, options: Options,
                          dopts: Any, log: Callable[[str], None]) -> dict[str, Any]:
    from onnx_inher.distill import distill

    init, final = out.path(f"{name}_init.onnx"), out.path(f"{name}.onnx")
    metrics = "metrics.jsonl" if name == "student" else f"metrics_{name.removeprefix('student_')}.jsonl"

    def do_compress() -> dict[str, Any]:
        # the plan file already holds the allocated ranks; compress applies them as written
        res = api.compress(teacher, init, replace(options, allocate="energy"), plan_path=out.path(plan_file),
                           verify=True)
        return {"files": [p.name for p in res.outputs], "totals": res.plan.totals(),
                "verification": res.verification.to_dict() if res.verification else None}

    compressed = out.stage(f"compress:{name}", {"options": _options_doc(options)}, [teacher, out.path(plan_file)],
              [init.name], do_compress, log=log)

    def do_distill() -> dict[str, Any]:
        res = distill(init, teacher, data, final, dopts, metrics=out.path(metrics),
                      checkpoint_dir=out.path(f"checkpoints_{name}"), resume=True)
        data_file = out.path(f"{final.name}.data")
        return {"files": [final.name, *([data_file.name] if data_file.exists() else [])], **res.to_json()}

    trained = out.stage(f"distill:{name}", {"data": data, "options": asdict(dopts)}, [teacher, init],
                        [final.name, metrics], do_distill, log=log)
    return {"compress": compressed, "distill": trained}


def _evaluation(doc: dict[str, Any]) -> Evaluation:
    from onnx_inher.metrics import OutputFidelity

    outputs = [OutputFidelity(**o) for o in doc.get("outputs", [])]
    return Evaluation(**{**doc, "outputs": outputs})


def summary_rows(teacher: Path, folder: Path, variants: dict[str, dict[str, Any]], plan_result: dict[str, Any],
                 eval_result: dict[str, Any], bench_result: dict[str, Any]) -> list[dict[str, Any]]:
    """The numbers a user looks at first: teacher, then each student at SVD init and after distillation."""
    totals = plan_result["totals"]
    first = _evaluation(eval_result["student"]["final"])
    metric, teacher_value, _ = first.headline
    rows = [{"model": "teacher", "params": totals["params_before"], "flops": totals["flops_before"],
             "file_bytes": teacher.stat().st_size, "metric": metric, "value": teacher_value}]
    for name in variants:
        label = "student (heads)" if name == "student" and len(variants) > 1 else name.replace("_", " ")
        costs = variants[name]["compress"]["totals"]
        for stage in ("init", "final"):
            ev = _evaluation(eval_result[name][stage])
            latency = {p["batch"]: p[name] for p in bench_result["points"]} if stage == "final" else {}
            rows.append({"model": f"{label}, {'SVD init' if stage == 'init' else 'distilled'}",
                         "params": costs["params_after"], "flops": costs["flops_after"],
                         "file_bytes": (folder / f"{name}.onnx").stat().st_size, "metric": metric,
                         "value": ev.headline[2],
                         "speedup": {b: s.get("speedup") for b, s in latency.items()} or None,
                         "ideal_speedup_flops": {b: s.get("ideal_speedup_flops") for b, s in latency.items()}
                         or None})
    return rows

