"""`run`: the whole job in one resumable run folder.

plan -> compress (student_init.onnx) -> distill (student.onnx) -> evaluate (teacher vs init vs final, in
ONNX Runtime, on held-out data) -> bench (teacher vs student latency) -> report (report.md, plots).

Each stage is recorded in run.json with what it was computed from (see `stages`), so a rerun after a crash
or Ctrl-C redoes only what is missing or stale; distillation itself resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import onnx

from onnx_inher import api
from onnx_inher.errors import CheckFailed, InputError
from onnx_inher.ir.io import load_model, write_text
from onnx_inher.ir.outputs import declared_roles
from onnx_inher.ir.shapes import shape_symbols
from onnx_inher.metrics import Evaluation, UserMetric, evaluate, load_metric, parse_ctc_blank
from onnx_inher.planning.plan import Options
from onnx_inher.reporting.plots import plot_layers, plot_training, read_metrics
from onnx_inher.reporting.result import RunResult
from onnx_inher.run.stages import RunFolder

PathLike = str | os.PathLike[str]
HELD_OUT_ADAPTERS = ("mnist5k", "digits", "fashion-mnist", "fortunes")
EVAL_FORMAT = 2  # eval.json with per-output kinds and class agreements: older run folders re-evaluate
PROBE_SAMPLES = 4
NO_CALIBRATION = "none"  # `--calibration none`: plain SVD factors (run whitens on its --data by default)
# `run --time-limit auto` (the default when no --epochs/--steps are given): the whole run aims at this many
# seconds on the machine it runs on, the issue-17 target for a 2-core CPU. Distillation is the stage that
# scales with the data, so its schedule is sized to what plan and compress leave (`distill_time_limit`).
# `run`'s rank allocation on its own data (issue 17, point 2): each layer's measured effect on the outputs
# (tuning/allocate.py), checked against the energy ranks on the calibration samples, which stay when the
# measured ranks do not win
RUN_ALLOCATION = "sensitivity"
RUN_BUDGET = 30 * 60.0
EVAL_RESERVE = 90.0  # seconds kept for evaluate and bench (76 s for the PP-OCR recogniser, 75 s for CREPE)
MIN_DISTILL = 60.0


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


def with_data_shapes(options: Options, teacher: Path, data: str, seed: int) -> Options:
    """`options` with the shapes of one sample of `data` (batch 1): the run counts FLOPs, makes sample
    inputs and benchmarks at the shape it distils on. `--dim` values those shapes fix give way to them."""
    from onnx_inher.datasets import input_specs, load_data, sample_shapes

    model = onnx.load(str(teacher), load_external_data=False)
    specs = input_specs(model)
    shapes = sample_shapes(load_data(data, specs, seed=seed, dims=options.dims, model=model), specs)
    fixed = shape_symbols(model, shapes)
    return replace(options, shapes=shapes, dims={k: v for k, v in options.dims.items() if k not in fixed})


def _check_losses(teacher: Path, losses: dict[str, str]) -> None:
    from onnx_inher.distill.options import parse_loss

    names = [o.name for o in onnx.load(str(teacher), load_external_data=False).graph.output]
    for output, spec in losses.items():
        if output not in names:
            raise InputError(f"--loss {output}={spec}: the teacher has no output '{output}'; its outputs are "
                             f"{', '.join(names)}")
        parse_loss(output, spec)


def _probe_metric(metric: UserMetric, teacher: Path, data: str, dopts: Any) -> None:
    """Call the user's metric on a few held-out samples (teacher vs itself) before anything is trained, so a
    metric that fails or returns the wrong type stops the run now (exit 2), not after distillation."""
    from onnx_inher.datasets.loading import LABELS
    from onnx_inher.runtime import session

    held = _eval_data(teacher, data, dopts.seed, dopts.val_fraction)
    feed = {k: v[:PROBE_SAMPLES] for k, v in held.inputs.items()}
    sess = session(teacher, "cpu")
    names = [o.name for o in sess.get_outputs()]
    outputs = dict(zip(names, sess.run(names, {i.name: feed[i.name] for i in sess.get_inputs()}), strict=True))
    labels = {LABELS: held.labels[:PROBE_SAMPLES]} if held.labels is not None else {}
    metric(outputs, outputs, {**feed, **labels})


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
        metric: str | None = None, ctc_blank: int | str | None = "auto", require_improvement: bool = False,
        time_budget: float | None = None, log: Callable[[str], None] = print) -> RunResult:
    """plan -> compress -> distill -> evaluate -> bench -> report, resumable, into `folder`.

    With `compare_pair`, a plain-pair student with the same ranks is compressed, distilled, evaluated and
    benchmarked beside the headed one, so the report shows whether the heads pay for themselves.
    `distill_options.losses` ({output: "kind[:weight]"}, `--loss`) also tells evaluation which outputs hold
    classes; `metric` ("module:function" or "file.py:function", `--metric`) is the user's own metric and
    the report's headline (see `onnx_inher.metrics.UserMetric`); `ctc_blank` ("auto", None or a class) is
    the blank of CTC-greedy decoding for `[N,T,C]` outputs (see `onnx_inher.metrics.ctc_blank_of`).
    Factors are whitened on `data` unless `options.calibration` names other data or is "none" (plain SVD).
    Without `options`, ranks are allocated by measured sensitivity on that data (RUN_ALLOCATION), as the
    CLI does unless `--allocate energy` or `--calibration none`.
    With `require_improvement`, a distillation whose validation never beat its starting student (the run
    gave the SVD-initialised weights back) raises `CheckFailed` (exit 1) once the report is written.
    With `time_budget` (seconds; the CLI's `--time-limit auto` gives RUN_BUDGET) each distillation's schedule
    is sized to what is left of it, less EVAL_RESERVE for evaluate and bench (`distill_time_limit`).
    """
    from onnx_inher.distill import DistillOptions

    started = time.perf_counter()

    options = options or Options(allocate=RUN_ALLOCATION)
    if options.calibration is None:  # whitened factors from the run's own data (issue 17); "none" opts out
        options = replace(options, calibration=data)
    elif options.calibration == NO_CALIBRATION:
        options = replace(options, calibration=None)
    options.validate()
    dopts = distill_options or DistillOptions()
    dopts.validate()
    bset = bench_settings or BenchSettings()
    if options.latency_threads and not bset.threads:  # the report times what the student was tuned for
        bset = replace(bset, threads=options.latency_threads)
    teacher_path = load_model(teacher).path
    blank, user_metric = parse_ctc_blank(ctc_blank), load_metric(metric) if metric else None
    dopts = replace(dopts, ctc_blank=blank)  # one blank for the loss and the evaluation
    _check_losses(teacher_path, dopts.losses)  # before hours of work, not at the distill stage
    if user_metric is not None:
        _probe_metric(user_metric, teacher_path, data, dopts)
    out = RunFolder(Path(folder))
    if teacher_path.parent.resolve() == out.folder.resolve():
        raise InputError(f"{folder}: the teacher lives in the run folder; choose another -o folder.")
    if not options.shapes:  # the real shapes: FLOPs, sample inputs and the bench are at the data's shape
        options = with_data_shapes(options, teacher_path, data, dopts.seed)

    def do_plan() -> dict[str, Any]:
        p = api.plan(teacher_path, options)
        text = p.to_json()
        write_text(out.path("plan.json"), text)
        pair = pair_plan_text(text)
        write_text(out.path("plan_pair.json"), pair or text)
        plot_layers(p, out.path("layers.png"))
        return {"totals": p.totals(), "has_heads": pair is not None,
                "class_split": [w for w in p.warnings if w.startswith("class split")],
                "allocation": [w for w in p.notes if w.startswith("sensitivity allocation")]}

    plan_result = out.stage("plan", {"options": _options_doc(options)}, [teacher_path],
                            ["plan.json", "plan_pair.json"], do_plan, log=log)
    variants = [("student", "plan.json")]
    if compare_pair and plan_result["has_heads"]:
        variants.append(("student_pair", "plan_pair.json"))
    distilled: dict[str, Any] = {}
    for name, plan_file in list(variants):
        if name == "student_pair" and _form(distilled["student"]) == "pair":  # the check already chose pairs
            log("[student_pair] the latency check made the student plain pairs: nothing to compare")
            variants.remove((name, plan_file))
            continue
        todo = len(variants) - len(distilled)  # students still to distil share what is left
        distilled[name] = _compress_and_distill(out, name, plan_file, teacher_path, data, options, dopts, log,
                                                budget=None if time_budget is None else (time_budget, started, todo))
    students = [out.path(f"{name}.onnx") for name, _ in variants]
    inits = [out.path(f"{name}_init.onnx") for name, _ in variants]

    def do_evaluate() -> dict[str, Any]:
        held = _eval_data(teacher_path, data, dopts.seed, dopts.val_fraction)
        doc: dict[str, Any] = {"data": held.source, "samples": len(held)}
        settings = {"source": held.source, "declared": declared_roles(dopts.losses), "ctc_blank": blank,
                    "metric": user_metric}
        for (name, _), init, final in zip(variants, inits, students, strict=True):
            doc[name] = {"init": evaluate(teacher_path, init, held.inputs, held.labels, **settings).to_dict(),
                         "final": evaluate(teacher_path, final, held.inputs, held.labels, **settings).to_dict()}
        write_text(out.path("eval.json"), json.dumps(doc, indent=2, sort_keys=True) + "\n")
        return doc

    eval_options = {"data": data, "seed": dopts.seed, "val": dopts.val_fraction, "format": EVAL_FORMAT,
                    "losses": dopts.losses, "ctc_blank": blank, "metric": metric}
    metric_files = [user_metric.file] if user_metric is not None and user_metric.file is not None else []
    eval_result = out.stage("evaluate", eval_options, [teacher_path, *inits, *students, *metric_files],
                            ["eval.json"], do_evaluate, log=log)

    def do_bench() -> dict[str, Any]:
        from onnx_inher.bench import bench
        from onnx_inher.reporting.bench import write_reports

        res = bench([teacher_path, *students], provider=bset.provider, batches=bset.batches,
                    seq_lens=bset.seq_lens, shapes=bench_shapes, threads=bset.threads, warmup=bset.warmup,
                    iters=bset.iters)
        doc = res.to_dict()
        write_reports(doc, out.path("bench"))
        flushed = doc["models"][-1].get("reference")  # bench timed the teacher flushed too, last
        return {"points": [{"batch": p["batch"], "seq_len": p["seq_len"],
                            **{name: p["results"][j + 1] for j, (name, _) in enumerate(variants)},
                            **({"flushed_teacher": p["results"][-1]} if flushed else {})}
                           for p in doc["points"]], "settings": doc.get("settings", {}), "flushed_teacher": flushed}

    bench_shapes = None if bset.seq_lens else options.shapes  # --seq-len asks for other inner dims
    bench_result = out.stage("bench", {**asdict(bset), "shapes": bench_shapes}, [teacher_path, *students],
                             ["bench.json", "bench.md", "bench.png"], do_bench, log=log)
    result = RunResult(str(out.folder), plan_result, eval_result, distilled, bench_result)
    result.summary = summary_rows(teacher_path, out.folder, distilled, plan_result, eval_result, bench_result)
    from onnx_inher.reporting.text import run_markdown

    write_text(out.path("report.md"), run_markdown(result, out.folder))
    write_text(out.path("report.json"), result.to_json())
    plot_training(read_metrics(out.path("metrics.jsonl")), out.path("training.png"))
    stuck = not_improved(distilled)
    if stuck:
        exact = [n for n in stuck if distilled[n]["distill"].get("train", {}).get("exact_start")]
        log(f"distillation did not improve on the SVD-initialised student for: {', '.join(stuck)} "
            "(validation never beat the starting weights, so they were kept"
            + (f"; {', '.join(exact)} already agreed with the teacher at every validation position" if exact else "")
            + "); see report.md")
        if require_improvement:
            raise CheckFailed(f"--require-improvement: distillation did not improve {', '.join(stuck)}; try a "
                              "lower --lr, more --steps, feature KD (--features auto) or calibration.")
    return result


def _form(variant: dict[str, Any]) -> str | None:
    """The form compress's latency check chose for a variant (None: it did not choose)."""
    form = (variant["compress"].get("latency_check") or {}).get("form")
    return form["chosen"] if form else None


def not_improved(variants: dict[str, dict[str, Any]]) -> list[str]:
    """The students whose distillation gave their starting weights back (validation never improved)."""
    return [name for name, v in variants.items() if v["distill"].get("train", {}).get("improved") is False]


def distill_time_limit(budget: float, started: float, students: int) -> float:
    """Seconds of distillation for the next of `students` students: an equal share of what is left of the
    run's `budget` after EVAL_RESERVE, at least MIN_DISTILL (a budget already spent still trains a little)."""
    left = budget - (time.perf_counter() - started) - EVAL_RESERVE
    return max(MIN_DISTILL, left / max(students, 1))


def _compress_and_distill(out: RunFolder, name: str, plan_file: str, teacher: Path, data: str, options: Options,
                          dopts: Any, log: Callable[[str], None],
                          budget: tuple[float, float, int] | None = None) -> dict[str, Any]:
    from onnx_inher.distill import distill

    init, final = out.path(f"{name}_init.onnx"), out.path(f"{name}.onnx")
    metrics = "metrics.jsonl" if name == "student" else f"metrics_{name.removeprefix('student_')}.jsonl"

    def do_compress() -> dict[str, Any]:
        # the plan file already holds the allocated ranks; compress applies them as written
        res = api.compress(teacher, init, replace(options, allocate="energy"), plan_path=out.path(plan_file),
                           verify=True)
        write_text(out.path(f"{name}_init.plan.json"), res.plan.to_json())  # the plan as applied, check included
        return {"files": [p.name for p in res.outputs], "totals": res.plan.totals(),
                "verification": res.verification.to_dict() if res.verification else None,
                "latency_check": res.plan.latency_check}  # what it measured, reverted or chose (tuning/speed.py)

    compressed = out.stage(f"compress:{name}", {"options": _options_doc(options)}, [teacher, out.path(plan_file)],
              [init.name, f"{name}_init.plan.json"], do_compress, log=log)
    check = compressed.get("latency_check") or {}
    if check.get("ok") is False:  # --min-speedup: stop before hours of distillation
        raise CheckFailed(f"--min-speedup {options.min_speedup:g}: the {name.replace('_', ' ')} measured "
                          f"{check['speedup']:.2f}x the teacher (see {out.folder / 'run.json'}).")
    if check.get("reverted") and not compressed["totals"]["factorized"]:
        raise CheckFailed(f"the latency check reverted every factorised layer of the {name.replace('_', ' ')}: "
                          "none paid for itself on this machine at these shapes, so there is nothing to distil "
                          f"(measurements in {out.folder / 'run.json'}); try plain pairs (--heads 1), a smaller "
                          "--param-ratio, or --no-latency-check.")

    def do_distill() -> dict[str, Any]:
        options = dopts
        if budget is not None:
            limit = distill_time_limit(*budget)
            log(f"[distill:{name}] --time-limit auto: {limit / 60:.1f} min of the run's {budget[0] / 60:.0f}-minute "
                "budget (pass --epochs/--steps or --time-limit 0 for the full schedule)")
            options = replace(dopts, time_limit=limit)
        res = distill(init, teacher, data, final, options, metrics=out.path(metrics),
                      checkpoint_dir=out.path(f"checkpoints_{name}"), resume=True)
        data_file = out.path(f"{final.name}.data")
        return {"files": [final.name, *([data_file.name] if data_file.exists() else [])], **res.to_json()}

    identity = {"data": data, "options": asdict(dopts), **({"time_budget": budget[0]} if budget else {})}
    trained = out.stage(f"distill:{name}", identity, [teacher, init],
                        [final.name, metrics], do_distill, log=log)
    return {"compress": compressed, "distill": trained}


def _evaluation(doc: dict[str, Any]) -> Evaluation:
    from onnx_inher.metrics import OutputFidelity

    outputs = [OutputFidelity(**o) for o in doc.get("outputs", [])]
    return Evaluation(**{**doc, "outputs": outputs})


def _figure_cells(ev: Evaluation, names: list[str], teacher: bool) -> dict[str, Any]:
    """The summary row's metric cells: `metric`/`value`/`share` (the headline), then `second` (the next one)."""
    figures = {f.name: f for f in ev.figures()}
    cells: dict[str, Any] = {}
    for key, name in zip(("", "second"), names, strict=False):
        f = figures.get(name)
        value = None if f is None else f.teacher if teacher else f.student
        share = f.share if f is not None else False
        if key:
            cells[key] = {"metric": name, "value": value, "share": share}
        else:
            cells.update(metric=name, value=value, share=share)
    return cells


def summary_rows(teacher: Path, folder: Path, variants: dict[str, dict[str, Any]], plan_result: dict[str, Any],
                 eval_result: dict[str, Any], bench_result: dict[str, Any]) -> list[dict[str, Any]]:
    """The numbers a user looks at first: teacher, then each student at SVD init and after distillation.

    `metric`/`value` is the headline task metric (`Evaluation.figures`); `second` the next figure (top-1
    agreement beside accuracy, per-frame agreement beside the decoded one), when there is one.
    """
    totals = plan_result["totals"]
    stuck = set(not_improved(variants))
    first = _evaluation(eval_result["student"]["final"])
    names = [f.name for f in first.figures()][:2]
    rows = [{"model": "teacher", "params": totals["params_before"], "flops": totals["flops_before"],
             "file_bytes": teacher.stat().st_size, **_figure_cells(first, names, teacher=True)}]
    for name in variants:
        label = "student (heads)" if name == "student" and len(variants) > 1 else name.replace("_", " ")
        costs = variants[name]["compress"]["totals"]
        for stage in ("init", "final"):
            ev = _evaluation(eval_result[name][stage])
            latency = {p["batch"]: p[name] for p in bench_result["points"]} if stage == "final" else {}
            trained = "distilled" + (" (no gain: kept its init weights)" if name in stuck else "")
            rows.append({"model": f"{label}, {'SVD init' if stage == 'init' else trained}",
                         "params": costs["params_after"], "flops": costs["flops_after"],
                         "file_bytes": (folder / f"{name}.onnx").stat().st_size,
                         **_figure_cells(ev, names, teacher=False),
                         "speedup": {b: s.get("speedup") for b, s in latency.items()} or None,
                         "ideal_speedup_flops": {b: s.get("ideal_speedup_flops") for b, s in latency.items()}
                         or None})
    return rows
