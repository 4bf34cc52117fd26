"""Human-readable renderings: plan and verification tables for the terminal, the run's report.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from onnx_inher.passes.verify import VerifyReport
from onnx_inher.planning.plan import Plan
from onnx_inher.reporting.result import RunResult


def human(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def plan_table(plan: Plan, *, verbose_reasons: bool = True) -> str:
    rows = []
    for c in plan.candidates:
        shape = "x".join(map(str, c.weight_shape)) or "-"
        if c.decision == "factorize":
            what = f"{c.form} r={c.rank}" + (f" h={c.heads}" if c.heads > 1 else "")
            what += ", kernel up" if c.orientation else ""
            if c.dense_classes is not None:
                what = f"split: {len(c.dense_classes)} classes kept, the rest r={c.rank}"
            if c.energy_rank and c.energy_rank != c.rank:
                what += f" (energy plan r={c.energy_rank}, sensitivity {c.sensitivity:.3g})"
            energy = f"{c.energy_kept:.3f}" if c.energy_kept is not None else "-"
            rows.append([c.node, c.op, shape, human(c.params_before), human(c.params_after),
                         human(c.flops_before), human(c.flops_after), energy, what])
        else:
            rows.append([c.node, c.op, shape, human(c.params_before), "=", human(c.flops_before), "=", "-",
                         f"skip: {c.reason}" if verbose_reasons else "skip"])
    header = ["node", "op", "weight", "params", "->", "FLOPs", "->", "energy", "decision"]
    return _table(rows, header)


WHOLE_MODEL_GAP = 0.01  # the whole model gets its own line when it differs from the candidate layers by more


def totals_line(plan: Plan) -> str:
    """The candidate layers' totals; then the whole model's, where ops or weights outside them (an LSTM,
    embeddings, norms) make it differ: "params 37.7%" must not read as the model's when it is 3% of it."""
    t = plan.totals()
    line = (f"{t['factorized']}/{t['candidates']} layers factorised; params {human(t['params_before'])} -> "
            f"{human(t['params_after'])} ({t['param_ratio']:.1%}); FLOPs {human(t['flops_before'])} -> "
            f"{human(t['flops_after'])} ({t['flop_ratio']:.1%})")
    m = t.get("model")
    if m and (abs(m["param_ratio"] - t["param_ratio"]) > WHOLE_MODEL_GAP
              or abs(m["flop_ratio"] - t["flop_ratio"]) > WHOLE_MODEL_GAP):
        line += (f"\nwhole model: params {human(m['params_before'])} -> {human(m['params_after'])} "
                 f"({m['param_ratio']:.1%}); FLOPs {human(m['flops_before'])} -> {human(m['flops_after'])} "
                 f"({m['flop_ratio']:.1%})")
    return line


def latency_check_line(doc: dict[str, Any]) -> str:
    """One line of what compress's latency check measured (tuning/speed.py) and what it changed."""
    if doc.get("speedup") is None:
        return f"latency check: {doc.get('verdict')}"
    form = doc.get("form")
    teacher = "the teacher, negligible weights flushed," if doc.get("baseline") else "the teacher"
    text = (f"latency check ({doc.get('threads')} threads, batch 1): student {doc['speedup']:.2f}x {teacher} "
            f"[{doc['low']:.2f}, {doc['high']:.2f}], {doc['verdict']}")
    moved = doc.get("drift")
    if moved:
        text += (f" (the machine's speed changed during the check: the teacher took "
                 f"{min(moved['baseline_ms']):.3g}-{max(moved['baseline_ms']):.3g} ms)")
    if form:
        from onnx_inher.tuning.speed import kernel_sides  # not at start-up: only a check's line needs it

        text += (f"; form: {form['chosen']} (heads {form['heads']['speedup']:.2f}x, pairs "
                 f"{form['pair']['speedup']:.2f}x{f'; {sides}' if (sides := kernel_sides(form)) else ''})")
    if doc.get("reverted"):
        text += f"; {len(doc['reverted'])} layer(s) reverted to dense: {', '.join(doc['reverted'])}"
    wide = doc.get("batch_8") or {}
    if "speedup" in wide:
        text += f"; batch 8: {wide['speedup']:.2f}x"
        if wide.get("high", 1.0) < 1.0 and not doc.get("unchanged"):
            text += (f" [{wide['low']:.2f}, {wide['high']:.2f}], **still slower than the teacher at batch 8** after "
                     "the check's reverts")
    return text


def verify_table(report: VerifyReport) -> str:
    rows = [[o.name, "x".join(map(str, o.shape)), f"{o.max_abs:.3g}", f"{o.max_rel:.3g}"] for o in report.outputs]
    text = _table(rows, ["output", "shape", "max abs err", "max rel err"])
    if report.layers:
        worst = max(report.layers, key=lambda o: o.max_rel)
        text += (f"\n{len(report.layers)} factorised layer outputs compared; worst '{worst.name}' "
                 f"max rel err {worst.max_rel:.3g}")
    if report.bound is not None:
        verdict = "OK" if report.ok else "FAILED"
        text += f"\nverify: {verdict} (max rel err {report.max_rel:.3g}, bound {report.bound:g})"
    return text


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.2%}"


def _val(v: float | None, share: bool) -> str:
    """A summary figure: a share of samples or positions as a percentage, anything else with 4 digits."""
    if v is None:
        return "-"
    return f"{v:.2%}" if share else f"{v:.4g}" if abs(v) >= 1e4 or 0 < abs(v) < 1e-3 else f"{v:.4f}"


def _share(row: dict) -> bool:
    return bool(row.get("share", row.get("metric") == "accuracy"))  # rows written before `share` existed


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.2f} MiB"


def _speed(d: dict | None, key: str = "value") -> str:
    if not d:
        return "-"
    parts = []
    for batch, s in sorted(d.items(), key=lambda kv: int(kv[0])):
        if s is None:
            continue
        value = s[key] if isinstance(s, dict) else s
        ci = f" [{s['low']:.2f}–{s['high']:.2f}]" if isinstance(s, dict) and "low" in s else ""
        parts.append(f"b{batch}: {value:.2f}×{ci}")
    return "; ".join(parts) or "-"


def flushed_teacher_lines(bench: dict[str, Any], labels: dict[str, str]) -> list[str]:
    """How much of the speedup flushing the teacher's negligible weights gives alone, when bench timed that."""
    if not bench.get("flushed_teacher"):
        return []
    parts = []
    for p in bench["points"]:
        ref = p.get("flushed_teacher")
        if not ref or not ref.get("speedup"):
            continue
        students = [f"{labels.get(n, n)} {v['speedup_vs_reference']['value']:.2f}×" for n, v in p.items()
                    if isinstance(v, dict) and v.get("speedup_vs_reference")]
        parts.append(f"b{p['batch']}: flushed teacher {ref['speedup']['value']:.2f}× the teacher; vs it: "
                     + ", ".join(students))
    held = bench["flushed_teacher"].removeprefix("the baseline with its ").removesuffix(" zeroed")
    return [f"The teacher's weights hold {held}; "
            "arithmetic with them goes subnormal, which ONNX Runtime computes many times slower, and the student "
            "has none. So part of its speedup comes from flushing alone, which the teacher could have too "
            f"({'; '.join(parts)}).", ""]


def run_summary_table(rows: list[dict], markdown: bool = True) -> str:
    """Teacher vs student: params, FLOPs, file size, task metric (headline first, then the next figure),
    measured and ideal speedups."""
    second = bool(rows and rows[0].get("second"))
    header = ["model", "params", "FLOPs", "file", rows[0]["metric"] if rows else "metric",
              *([rows[0]["second"]["metric"]] if second else []), "speedup (measured)", "speedup (ideal, FLOPs)"]
    body = []
    for r in rows:
        ideal = r.get("ideal_speedup_flops")
        extra = [_val(r["second"]["value"], r["second"]["share"]) if r.get("second") else "-"] if second else []
        body.append([r["model"], human(r["params"]), human(r["flops"]), _mib(r.get("file_bytes")),
                     _val(r["value"], _share(r)), *extra, _speed(r.get("speedup")),
                     "; ".join(f"b{b}: {v:.2f}×" for b, v in sorted(ideal.items(), key=lambda kv: int(kv[0]))
                               if v) if ideal else "-"])
    if not markdown:
        return _table(body, header)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, b)) + " |" for b in body]
    return "\n".join(lines)


def _pair(final: float | None, init: float | None, what: str) -> str:
    return f"{_pct(final)} of the {what} (SVD init {_pct(init)})"


def _fidelity_lines(label: str, ev: dict) -> list[str]:
    """Per output, what it holds and the metric that fits it: class agreement (every position, whole
    sequences, CTC-decoded) for class outputs, the cosine for features; then the user's metric."""
    lines = []
    final, init = ev["final"], ev["init"]
    for o, o0 in zip(final["outputs"], init["outputs"], strict=True):
        kind = o.get("kind", "other")
        what = f"{kind.replace('_', '-')}; {o['kind_reason']}" if o.get("kind_reason") else kind.replace("_", "-")
        if o.get("top1_agreement") is not None:
            per = o.get("positions") or 1
            where = "samples" if per == 1 else f"positions ({per} per sample)"
            parts = [f"top-1 agrees with the teacher on {_pair(o['top1_agreement'], o0.get('top1_agreement'), where)}"]
            if o.get("sequence_agreement") is not None:
                parts.append(f"at every position of "
                             f"{_pair(o['sequence_agreement'], o0.get('sequence_agreement'), 'sequences')}")
            if o.get("ctc_agreement") is not None:
                parts.append(f"CTC-greedy decoded (blank = class {o['ctc_blank']}) identical for "
                             f"{_pair(o['ctc_agreement'], o0.get('ctc_agreement'), 'samples')}")
            lines.append(f"{label}, output `{o['name']}` ({what}): " + "; ".join(parts)
                         + f"; max rel err {o['max_rel']:.3g}.")
            continue
        pooled = " (mean-pooled with the attention mask)" if o["pooled"] else ""
        lines.append(f"{label}, output `{o['name']}` ({what}){pooled}: cosine to teacher {o['cosine_mean']:.4f} "
                     f"(min {o['cosine_min']:.4f}; SVD init {o0['cosine_mean']:.4f}), max rel err {o['max_rel']:.3g}.")
    if final.get("student_metric"):
        values = ", ".join(f"{k} {v:.4g} (teacher {final['teacher_metric'].get(k, float('nan')):.4g}; SVD init "
                           f"{(init.get('student_metric') or {}).get(k, float('nan')):.4g})"
                           for k, v in final["student_metric"].items())
        lines.append(f"{label}, `--metric {final['metric']}`: {values}.")
    return lines


LOSS_WORDS = {"kd": "Hinton KD (labels and teacher, T={t:g})", "kl": "KL per position (T={t:g})",
              "ctc": "KL per frame (T={t:g}) + CTC likelihood of the teacher's decoded text (blank {blank})",
              "mse": "MSE", "cosine": "cosine", "pooled": "cosine of mean-pooled tokens"}


def _losses_text(dist: dict) -> str:
    """What each output was trained by, so a reader can tell a sequence loss from a per-frame one."""
    parts = []
    for o in dist.get("losses") or []:
        words = LOSS_WORDS.get(o.get("kind"), str(o.get("kind")))
        words = words.format(t=o.get("temperature", 1.0), blank=o.get("blank", 0))
        weight = f" x{o['weight']:g}" if o.get("weight", 1.0) != 1.0 else ""
        parts.append(f"`{o.get('output')}`: {words}{weight}")
    if dist.get("features"):
        parts.append(f"{len(dist['features'])} feature tensor(s) (normalised MSE)")
    return f"; losses: {', '.join(parts)}" if parts else ""


def exact_start_text(train: dict[str, Any]) -> str:
    """Why a distillation whose starting student already agreed everywhere on validation stopped
    (`trainer.EXACT_POSITIONS`)."""
    return (f"the starting student already agreed with the teacher's top-1 at all {train['exact_start']:,} "
            f"validation positions, which training can at best tie, and by step {train.get('steps')} it no longer "
            "did")


def _training_line(label: str, dist: dict) -> str:
    train = dist.get("train", {})
    runtime = "ONNX Runtime" if dist.get("teacher_runtime", "ort") == "ort" else "torch"
    teacher = f"run on each batch in {runtime}" if dist.get("teacher_mode") == "online" else \
        "read from cache" if dist.get("teacher_cached") else f"computed in {dist.get('teacher_seconds')} s"
    stop = ", stopped by the time limit" if train.get("out_of_time") else \
        f", stopped early: {exact_start_text(train)}" if train.get("stopped_early") and train.get("exact_start") \
        else ", stopped early" if train.get("stopped_early") else ""
    if train.get("planned_steps"):
        stop += (f", the schedule sized by the time limit to {train.get('total_steps')} of "
                 f"{train['planned_steps']} steps")
    if train.get("lr") is not None:
        probe = train.get("lr_probe")
        how = ("chosen by `--lr auto` from validation (top-1 agreement with the teacher for class outputs, then "
               "the loss) after a few steps at each of "
               + ", ".join(f"{k} ({v:.4g})" for k, v in probe.items()) if probe else
               "`--lr auto`'s gentlest rate, not probed: the start already agreed everywhere"
               if probe is not None and train.get("exact_start") else
               "`--lr auto` without validation data" if probe is not None else "as given")
        stop += f"; peak learning rate {train['lr']:g} ({how})"
        if train.get("lr_scale", 1.0) < 1.0:
            stop += f", cut to {train['lr_scale']:.3g}x by back-offs"
    if train.get("improved") is False:
        stop += ("; **validation never improved on the starting student, so it keeps its SVD-initialised "
                 "weights** " + ("(it had nothing to gain on this validation data)" if train.get("exact_start") else
                                 "(try a lower --lr, more steps, --features auto or --calibration)"))
    batch = f" of batch {dist['batch_size']}" if dist.get("batch_size") else ""
    return (f"{label}: {train.get('steps')} steps{batch} in {train.get('seconds', 0):.1f} s "
            f"({dist.get('train_samples')} training / {dist.get('val_samples')} validation samples, "
            f"{dist.get('trainable_params')} trainable params{stop}"
            f"){_losses_text(dist)}; teacher outputs {teacher}; ORT vs torch after write-back: max rel err "
            f"{dist.get('ort_max_rel', 0):.2g}.")


def _heads_verdict(result: RunResult) -> list[str]:
    """Do the heads pay for themselves? Same ranks, same training: metric and latency side by side."""
    if "student_pair" not in result.distill:
        return []
    ev = result.evaluation
    metric, share = result.summary[0]["metric"], _share(result.summary[0])
    heads = next(r for r in result.summary if r["model"].startswith("student (heads), distilled"))
    pair = next(r for r in result.summary if r["model"].startswith("student pair, distilled"))
    lines = ["## Do the heads pay for themselves?", "",
             f"Same ranks and the same distillation; the only difference is the gated heads. On {ev['samples']} "
             f"held-out samples the headed student scores {_val(heads['value'], share)} ({metric}) and the plain "
             f"pair {_val(pair['value'], share)}; headed params {human(heads['params'])} vs {human(pair['params'])}."]
    for p in result.bench["points"]:
        h, q = p["student"]["latency_ms"]["p50"], p["student_pair"]["latency_ms"]["p50"]
        lines.append(f"Batch {p['batch']}: heads p50 {h:.3f} ms vs pair {q:.3f} ms ({h / q:.2f}× the pair's time).")
    user = bool(ev["student"]["final"].get("student_metric"))
    lines += ["", "Verdict: " + _verdict(metric, heads["value"], pair["value"], ev["samples"], share, user), ""]
    return lines


def _verdict(metric: str, heads: float | None, pair: float | None, n: int, share: bool = False,
             user: bool = False) -> str:
    if heads is None or pair is None:
        return "no comparable metric."
    if user:
        return (f"by your metric `{metric}` the heads score {heads:.4g} and the plain pair {pair:.4g}; onnx-inher "
                "does not know whether higher is better there: weigh that against their latency.")
    if share or metric == "accuracy":
        p = (heads + pair) / 2
        noise = 2 * (2 * p * (1 - p) / max(n, 1)) ** 0.5  # two standard errors of a difference of two accuracies
        gap = heads - pair
        if abs(gap) <= noise:
            return (f"the difference ({gap:+.2%}) is within noise (±{noise:.2%} at {n} samples): prefer "
                    "`--heads 1`, the plain pair, which is smaller and faster.")
        if gap > 0:
            return (f"the heads score {gap:+.2%} higher (beyond the ±{noise:.2%} noise); weigh that against "
                    "their latency.")
        return f"the plain pair scores {-gap:.2%} higher: use `--heads 1`."
    if heads > pair:
        return f"the heads are closer to the teacher ({heads:.4f} vs {pair:.4f}); weigh that against their latency."
    return "the heads are not closer to the teacher here: use `--heads 1`, the plain pair is smaller and faster."


def run_markdown(result: RunResult, folder: Path) -> str:
    """report.md of a run folder: the summary, the heads question, training, latency, and the plots."""
    plan = result.plan["totals"]
    ev, bench = result.evaluation, result.bench
    first = result.distill["student"]["distill"]
    labels = {"student": "headed student" if "student_pair" in result.distill else "student",
              "student_pair": "plain pair"}
    lines = ["# onnx-inher run report", "",
             f"Teacher compressed to {plan['param_ratio']:.1%} of its candidate-layer params "
             f"({plan['factorized']}/{plan['candidates']} layers factorised), FLOPs {plan['flop_ratio']:.1%}"
             + (f" (the whole model: {plan['model']['param_ratio']:.1%} of its params, "
                f"{plan['model']['flop_ratio']:.1%} of its FLOPs)" if plan.get("model") else "")
             + f", then distilled on `{first.get('data')}`"
             + (" (**data-free: random inputs**)" if first.get("data_free") else "") + ".", "",
             *[f"- {note[0].upper()}{note[1:]}." for note in result.plan.get("class_split", [])],
             *([""] if result.plan.get("class_split") else []),
             "## Summary", "", run_summary_table(result.summary), "",
             f"Task metric measured in ONNX Runtime on {ev['samples']} held-out samples (`{ev['data']}`); "
             "speedups are teacher p50 / student p50 with a 95% bootstrap interval, ideal = FLOP ratio."]
    for name in result.distill:
        lines += _fidelity_lines(labels[name], ev[name])
    lines += ["", *_heads_verdict(result), "## Training", ""]
    lines += [_training_line(labels[name], v["distill"]) for name, v in result.distill.items()]
    if (folder / "training.png").exists():
        lines += ["", "![training and validation curves](training.png)"]
    settings = bench.get("settings", {})
    lines += ["", "## Latency", "", f"{settings.get('provider')}, {settings.get('threads_intra_op')} intra-op "
              "threads, models run interleaved. Full table (p50/p90/p99, throughput, efficiency vs ideal): "
              "[bench.md](bench.md).", "", *flushed_teacher_lines(bench, labels), "![latency vs batch](bench.png)",
              ""]
    checks = [(labels[n], v["compress"].get("latency_check")) for n, v in result.distill.items()]
    if any(doc for _, doc in checks):
        lines += ["Measured before distillation (what compress kept, reverted or chose; every measurement is in "
                  "`student_init.plan.json`'s `latency_check`):", ""]
        lines += [f"- {label}: {latency_check_line(doc)}" for label, doc in checks if doc]
        lines += [""]
    lines += ["## Factorised layers", "", "Every candidate with its decision and reason: [plan.json](plan.json).", ""]
    lines += [f"- Ranks: {note[0].upper()}{note[1:]}." for note in result.plan.get("allocation", [])]
    lines += ["", "![rank and energy kept per layer](layers.png)", ""]
    return "\n".join(lines)
