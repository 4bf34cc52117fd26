"""The latency check of `compress` and `run`: never ship a student slower than its teacher by default.

After the student is built, teacher and student run interleaved in ONNX Runtime (in-memory sessions,
all cores or `--latency-threads`, threads spinning during each run as ONNX Runtime's default has them
(`bench.sessions`), the plan's real input shapes at batch 1) for a few seconds. The verdict
is the ratio of medians (teacher time / student time) with a paired bootstrap interval
(`bench.stats.speedup`):

- **conv head form** (when the plan has heads on ungrouped Conv layers): each such layer is timed alone
  at its input shape in both conv head forms (`passes/factorize.py`: the per-sample weight mix, and
  constant weights in one 1x1 conv) against its dense layer, and gets the constant form only where its
  factorised/dense ratio is 10% below the weight mix's (`choose_head_forms`; the plan entry records
  `head_form` and `form_ms`). Without the check the form is always the weight mix, so compress stays
  deterministic.
- **fold** (on 2 or more threads): each factorised conv whose input rows are fixed in the model
  (`tuning.latency.static_rows`) is timed alone with its down conv's output rows folded into the batch,
  one part per thread (`passes/factorize.py`), and folded where that is 10% faster than unfolded
  (`choose_folds`; the plan entry records `fold` and `fold_ms`). ONNX Runtime runs one image's blocked
  conv with <= 64 output channels on one thread; the fold gives the other threads work. The folds then
  stay only if the whole student, timed with and without them, is measurably faster with them
  (`keep_folds`: a fold faster alone once made the MNIST demo's student 0.99x the teacher instead of 1.18x).
- **form** (when the user did not fix `--mode`/`--heads`, the plan has heads and planning did not
  already choose them by timing both forms at the same budget, `choose_form`): the same ranks are
  also built as plain pairs and the three models are timed together; the pairs are kept when they are
  measurably faster than the heads (the interval of heads-time / pair-time lies above 1), else the
  heads stay (within noise they are the better start for distillation). Pairs at the heads' ranks have
  fewer params and FLOPs than the budget asked for, so after a planning choice this comparison would
  favour an undersized student: the PP-OCRv5 detector's heads, chosen at 1.07x vs 1.06x, became pairs
  at 40.9% of the params instead of the 50% asked.
- **first round**: when planning chose the form (`choose_form`) and the student is the structure it timed
  then (the same layers, forms, ranks and folds: `structure`; nothing changed by the steps above), that
  timing is the check's first round (`"measured": "with the form choice"`): the same student, the same
  teacher, feed and threads, not timed twice (ViT-B/16's compress 35 s -> 28 s, the MNIST demo's 8.4 -> 6.3 s).
  Kept in memory only, never in a plan file, which may come from another machine.
- **revert**: while the student is measurably slower than the teacher (the interval lies below 1),
  factorised layers are turned back into dense ones, the worst first by their per-layer timings
  (`tuning.latency.layer_times`, cached per machine: smallest time saved first), 1, 2, 4, ... layers
  per round; each round rebuilds and re-measures the student. When it is not slower but its median
  ratio is below `--min-speedup`, only the layers that measure slower alone are reverted (the others
  can only make it slower still). A reverted layer becomes a skip whose reason holds its measured
  times. Layers timed alone do not always add up in the whole model: when an earlier round measured
  better than the last (intervals apart), that round's student is kept (`restored`). `ok` is False
  (exit 1) when the final ratio is still below `--min-speedup`.

The final student is also timed at batch 8 when that is cheap. Where it is slower there (interval below 1),
layers are reverted as above, the least time saved first, each round timing both batches, until it is not
(`Wide`): a student that ties at batch 1 and loses at batch 8 is not a faster model.
Everything measured goes into `plan.latency_check` (and so into the plan JSON and compress's output).
When nothing is reverted, no conv layer changes head form, no down conv is folded and the form is kept,
the student is the one built first, byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from onnx import ModelProto
from tqdm import tqdm

from onnx_inher import _env
from onnx_inher.bench.core import save_flushed, with_batch
from onnx_inher.bench.sessions import Runner, Settings, create
from onnx_inher.bench.stats import Ratio, drift, speedup
from onnx_inher.ir.io import release_memory, save_model, weight_bytes
from onnx_inher.planning.plan import Candidate, Plan
from onnx_inher.runtime import sample_inputs
from onnx_inher.tuning.latency import LayerTimer, fold_pays, foldable, layer_times, plan_dims

BUDGET_S = 3.0  # seconds of timed rounds per measurement
WARMUP = 3
MIN_ROUNDS, MAX_ROUNDS = 10, 1000
MAX_REPS = 64  # runs per round at most (`runs_per_round`)
MAX_BYTES = 2_000_000_000 - (1 << 20)  # in-memory sessions: a protobuf must stay under 2 GB
MAX_REVERT_ROUNDS = 12
CONV_FORM_MARGIN = 0.9  # the constant-weight conv heads must measure 10% faster alone than the weight mix
UNCHANGED = "every layer reverted: the student is the teacher's graph"
SECOND_BATCH = 8  # also timed when a run of the teacher at this batch is cheap; layers go while it is slower there


def enabled(option: bool | None) -> bool:
    return _env.latency_check_default() if option is None else option


def cpu_settings(threads: int | None = None) -> Settings:
    """What every timing of the check runs with: ONNX Runtime on the CPU, on `threads` intra-op threads (the
    student's deployment, `--latency-threads`), all cores by default."""
    return Settings(provider="cpu", threads=threads or os.cpu_count() or 1)


@dataclass
class Analysed:
    """What a rebuild needs: a freshly loaded teacher (`model`) and its layer views."""

    model: ModelProto
    views: dict[str, Any]
    handle: Any = None  # the caller's own analysis, given back to `rebuild`


def time_models(models: list[ModelProto | Path], feed: dict[str, np.ndarray], settings: Settings,
                budget_s: float = BUDGET_S, what: str = "latency check") -> list[np.ndarray]:
    """Seconds per round of each model, timed interleaved (A, B, ... each round) for about `budget_s`. A
    `ModelProto` is written to a temporary file for its session (`ir.io.save_model` streams it): made from
    bytes, a session held them beside its own copy of the weights. Rounds over which the machine changed speed
    (`bench.stats.drift`) are timed once more: the check's decisions rest on one state's ratio where it can."""
    release_memory()  # what the rebuilds before freed goes back to the OS before the sessions take theirs
    runners = []
    with tempfile.TemporaryDirectory(prefix="onnx-inher-timed-") as tmp:
        for i, m in enumerate(models):
            label = "teacher" if i == 0 else f"student {i}"
            source = save_model(m, Path(tmp) / f"model{i}.onnx")[0] if isinstance(m, ModelProto) else m
            r = Runner(create(source, settings, label), feed, label)
            r.check()
            runners.append(r)
    warm = [[r() for r in runners] for _ in range(WARMUP)]
    reps = runs_per_round(max(min(col) for col in zip(*warm, strict=True)), budget_s, len(runners))
    desc = f"{what}: timing {len(runners)} models"
    rows = timed_rounds(runners, reps, budget_s, desc)
    # the machine changed speed during the rounds: a ratio over two states decides nothing, and such a state
    # lasts seconds to minutes: once more
    if drift(rows) is not None:
        rows = timed_rounds(runners, reps, budget_s, f"{desc} again (the machine changed speed)")
    return rows


def timed_rounds(runners: list[Callable[[], float]], reps: int, budget_s: float,
                 desc: str = "timing") -> list[np.ndarray]:
    """Seconds per run of each model, `reps` runs a round, rounds interleaved for about `budget_s`, with a bar
    of the seconds (a compress spends most of its time here, which left the terminal still for seconds)."""
    rows: list[list[float]] = [[] for _ in runners]
    start = time.perf_counter()
    with tqdm(total=round(budget_s, 1), desc=desc, unit="s", disable=_env.progress_disabled(), leave=False,
              bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}") as bar:
        while len(rows[0]) < MAX_ROUNDS and (len(rows[0]) < MIN_ROUNDS or time.perf_counter() - start < budget_s):
            for j, r in enumerate(runners):
                rows[j].append(sum(r() for _ in range(reps)) / reps)
            bar.update(min(round(time.perf_counter() - start, 1), bar.total) - bar.n)
    return [np.asarray(r) for r in rows]


def _on_disk(model: ModelProto, path: Path) -> Path | None:
    """A trial student written where its session will read it, so that its proto can go before the next one is
    built (BERT-base's form choice held two protos, then their bytes, beside three sessions), or None when it
    is over the protobuf limit."""
    return None if weight_bytes(model) > MAX_BYTES else save_model(model, path)[0]


def runs_per_round(slowest_s: float, budget_s: float, models: int) -> int:
    """Runs of each model per timed round, so that MAX_ROUNDS rounds fill the budget.

    A 0.05 ms model timed one run per round used up MAX_ROUNDS in 0.1 s of a 3 s budget: the whole
    measurement sat inside one burst of whatever else the machine was doing, and the demo once reverted
    a layer on a 0.83x that the next run measured as 1.45x. Rounds of several runs spread the same
    number of rounds over the budget, still interleaved (teacher, student, teacher, ...) every few ms."""
    per_round = budget_s / MAX_ROUNDS / max(models, 1)
    return max(1, min(MAX_REPS, round(per_round / max(slowest_s, 1e-7))))


def _ratio_doc(base: np.ndarray, other: np.ndarray) -> dict[str, Any]:
    r = speedup(base, other)
    moved = drift([base, other])
    return {"speedup": round(r.value, 4), "low": round(r.low, 4), "high": round(r.high, 4),
            "teacher_ms": round(float(np.median(base)) * 1e3, 4), "student_ms": round(float(np.median(other)) * 1e3, 4),
            "rounds": int(base.size), "drift": moved.to_dict() if moved else None}


def verdict(r: Ratio | dict[str, Any], min_speedup: float | None) -> str:
    value, low, high = (r.value, r.low, r.high) if isinstance(r, Ratio) else (r["speedup"], r["low"], r["high"])
    if high < 1.0:
        return "slower"
    if min_speedup is not None and value < min_speedup:
        return "below --min-speedup"
    return "faster" if low > 1.0 else "not measurably slower"


def _headed(plan: Plan) -> list[Candidate]:
    return [c for c in plan.candidates if c.decision == "factorize" and c.heads > 1]


def _as_pairs(plan: Plan, views: dict[str, Any]) -> Plan:
    """The same plan with every headed layer a plain pair at the same rank."""
    from copy import deepcopy

    from onnx_inher.planning.cost import after

    p = deepcopy(plan)
    for c in _headed(p):
        a = after(views[c.node], int(c.rank or 1), 1)
        c.heads, c.form, c.flops_after = 1, "pair", a.flops
        c.params_after = 0 if c.shares_factors_with else a.params
    return p


@contextmanager
def flushed_baseline(teacher: Path, model: ModelProto) -> Iterator[tuple[Path, str | None]]:
    """What the students are timed against: the teacher, or, when its weights hold negligible floats
    (`ir.tensors`), the teacher with them flushed (a temporary file, removed on exit), and a line saying so.
    Every student is flushed, so the flushed teacher is what a student with no layer factorised would be:
    against the teacher as it is, every factorisation of the PP-OCRv5 detector looked 2x faster, whether it
    paid or not."""
    with tempfile.TemporaryDirectory(prefix="onnx-inher-baseline-") as tmp:
        saved = save_flushed(model, Path(tmp), "teacher")
        del model  # this frame lives through the caller's timings: it must not keep the teacher alive
        if saved is None:
            yield teacher, None
            return
        path, values, tensors = saved
        yield path, (f"timed against the teacher with its {values:,} negligible weights ({tensors} tensors) "
                     "flushed, as every student is")


def structure(plan: Plan) -> str:
    """A digest of what a student's latency depends on: which layers are factorised and how (form, rank,
    heads, head form, fold, kept classes), not the factors' values (no subnormal ones are ever emitted). No
    head form is the weight mix (`choose_head_forms` writes "mix" where it keeps it: the same student)."""
    rows = [(c.node, c.decision, c.rank, c.heads, c.form, c.head_form or "mix", c.fold, c.dense_classes,
             c.orientation) for c in plan.candidates]
    return hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()


# the form choice's measurements, by `_timed_key`, for the check of the same compress to take up instead of
# timing the same student again (a whole-model timing: 6 s of ViT-B/16's 35 s compress); popped when used,
# cleared by each check, never written to a plan (a plan file may come from another machine)
_FORM_TIMINGS: dict[tuple[Any, ...], dict[str, Any]] = {}


def _timed_key(plan: Plan, teacher: Path, settings: Settings, feed: dict[str, np.ndarray]) -> tuple[Any, ...]:
    return (str(teacher.resolve()), structure(plan), settings.provider, settings.threads,
            tuple(sorted((k, v.shape) for k, v in feed.items())))


def choose_form(heads_plan: Plan, pairs_plan: Plan, teacher: Path, fresh: Callable[[], Analysed],
                rebuild: Callable[[Analysed, Plan], ModelProto], down_plan: Plan | None = None
                ) -> dict[str, Any] | None:
    """Heads or pairs, decided before calibration: each form planned at the same budget and timed with
    plain-SVD factors (latency does not depend on the values), teacher and the students interleaved.

    Deciding after factorising (same ranks, heads turned into pairs) gave a student smaller than asked
    for: PP-OCR's recogniser at --param-ratio 0.5 became a 38% pair student, its ranks sized for heads.

    `down_plan`: the pairs with every k x k kernel down, where `pairs_plan` puts some up (`planning.plan._orient`).
    It is timed beside them and replaces them when measurably faster (`"orientation": "down"`): the plan takes
    a kernel up by energy at the budget's threshold, and where the params it saves raise that threshold for
    the other layers the whole student can end up with more FLOPs (the MNIST CNN: 46.7% of the teacher's
    instead of 41.4%, though no slower when timed). None when a student is too large to time in memory."""
    a = fresh()
    options = heads_plan.options
    feed = sample_inputs(a.model, plan_dims(a.model, options.dims, options.shapes), shapes=options.shapes)
    with flushed_baseline(teacher, a.model) as (baseline, _), \
            tempfile.TemporaryDirectory(prefix="onnx-inher-forms-") as tmp:
        heads = _on_disk(rebuild(a, heads_plan), Path(tmp) / "heads.onnx")
        del a  # consumed: what it still holds need not sit beside the timed models
        pairs = _on_disk(rebuild(fresh(), pairs_plan), Path(tmp) / "pairs.onnx") if heads is not None else None
        down = _on_disk(rebuild(fresh(), down_plan), Path(tmp) / "pairs_down.onnx") \
            if pairs is not None and down_plan is not None else None
        students = [(heads_plan, heads), (pairs_plan, pairs), *([(down_plan, down)] if down_plan is not None else [])]
        if any(path is None for _, path in students):
            return None
        settings = cpu_settings(options.latency_threads)
        t, *times = time_models([baseline, *(path for _, path in students)], feed, settings, what="form choice")
    for (plan, _), timed in zip(students, times, strict=True):
        _FORM_TIMINGS[_timed_key(plan, teacher, settings, feed)] = _ratio_doc(t, timed)
    h, p = times[0], times[1]
    orientation: dict[str, Any] = {}
    if down_plan is not None:
        by = speedup(p, times[2])  # kernels-up time / kernels-down time: > 1 when every kernel down is faster
        orientation = {"orientation": "down" if by.low > 1.0 else "auto", "pair_kernels_up": _ratio_doc(t, p),
                       "pair_kernels_down": _ratio_doc(t, times[2]),
                       "down_over_up": {"speedup": round(by.value, 4), "low": round(by.low, 4),
                                        "high": round(by.high, 4)}}
        p = times[2] if by.low > 1.0 else p
    vs = speedup(h, p)  # heads time / pair time: > 1 when the pairs are faster
    return {"chosen": "pair" if vs.low > 1.0 else "heads", "heads": _ratio_doc(t, h), "pair": _ratio_doc(t, p),
            "pair_over_heads": {"speedup": round(vs.value, 4), "low": round(vs.low, 4), "high": round(vs.high, 4)},
            **orientation,
            "rule": "pairs when measurably faster than the heads (interval above 1), else heads; each form "
                    "planned at the same budget" + ("; the pairs with every kernel down when measurably faster "
                                                    "than with the plan's kernels up" if orientation else "")}


def kernel_sides(form: dict[str, Any]) -> str:
    """Where the form choice also timed the pairs with every conv kernel down (`choose_form`): both figures and
    the side kept, for the plan's note and the check's line; "" where it did not."""
    if "pair_kernels_down" not in form:
        return ""
    kept = "every kernel down" if form.get("orientation") == "down" else "the plan's kernels up"
    return (f"pairs with the plan's kernels up {form['pair_kernels_up']['speedup']:.2f}x, every kernel down "
            f"{form['pair_kernels_down']['speedup']:.2f}x: {kept}")


def _conv_headed(plan: Plan, views: dict[str, Any]) -> list[Candidate]:
    """Headed layers that can take either conv head form (ungrouped Conv)."""
    from onnx_inher.passes.factorize import conv_form_applies

    return [c for c in _headed(plan) if c.node in views and conv_form_applies(views[c.node], plan.opset)]


def choose_head_forms(plan: Plan, views: dict[str, Any], model: ModelProto, settings: Settings) -> dict[str, Any]:
    """Give every headed conv layer the head form that measures faster alone at its input shape.

    Why per layer: the constant-weight `conv` form does h times the up-projection's MACs but runs them
    prepacked in ONNX Runtime's blocked layout, the `mix` form does fewer but through a per-sample batched
    MatMul and reshapes; which wins depends on the layer's channels, rank and pixels. Each form is timed
    against the dense layer (`layer_times`, interleaved, cached per machine); `conv` wins only by a margin
    (`_faster_form`), a tie or an unmeasured layer keeps `mix`. Layers sharing a weight follow
    the layer that owns the factors. Records `head_form` and `form_ms` in the plan entries; returns
    `{node: times and choice}` for the check's record."""
    from copy import deepcopy

    from onnx_inher.passes.factorize import HEAD_FORMS
    from onnx_inher.planning.cost import after

    cands = _conv_headed(plan, views)
    nodes = {c.node for c in cands}
    timer = LayerTimer(plan, model, settings)  # one shape table for both forms
    times: dict[str, dict[str, tuple[float, float, str]]] = {}
    for form in HEAD_FORMS:
        p = deepcopy(plan)
        for c in p.candidates:
            if c.node in nodes:
                c.head_form = form
        times[form] = layer_times(p, model, views, settings, nodes=nodes, desc=f"timing conv heads ({form})",
                                  timer=timer)
    record: dict[str, Any] = {}
    chosen: dict[str, str] = {}
    for c in cands:
        owner = c.shares_factors_with
        form = chosen.get(owner, "mix") if owner else _faster_form(c.node, times)
        chosen[c.node] = form
        c.head_form = form
        measured = {f: times[f][c.node] for f in HEAD_FORMS if c.node in times[f]}
        if measured:
            c.form_ms = {"dense": round(float(np.median([m[0] for m in measured.values()])), 4),
                         **{f: round(m[1], 4) for f, m in measured.items()}}
            record[c.node] = {**c.form_ms, "chosen": form}
        if form == "conv" and c.form_ms and "mix" in c.form_ms and "conv" in c.form_ms:
            c.note = "; ".join(filter(None, [c.note, (
                f"conv heads as constant weights in one 1x1 conv: {c.form_ms['conv']:.3f} ms alone vs "
                f"{c.form_ms['mix']:.3f} ms for the weight mix (dense {c.form_ms['dense']:.3f} ms, latency check)")]))
        c.flops_after = after(views[c.node], int(c.rank or 1), c.heads, form).flops
    return record


def _faster_form(node: str, times: dict[str, dict[str, tuple[float, float, str]]]) -> str:
    """`conv` when its factorised/dense ratio is below `mix`'s by `CONV_FORM_MARGIN` (each form paired with
    its own dense run). The margin, because a layer timed alone does not pay what the constant form costs in
    the whole model: ORT runs its Concat and gate Mul outside the blocked layout, two reorders more per layer
    (measured on PP-OCRv5: choices within a few percent did not show in the whole model)."""
    if node not in times["mix"] or node not in times["conv"]:
        return "mix"
    (d_mix, f_mix, _), (d_conv, f_conv, _) = times["mix"][node], times["conv"][node]
    return "conv" if f_conv / d_conv < CONV_FORM_MARGIN * f_mix / d_mix else "mix"


def choose_folds(plan: Plan, views: dict[str, Any], model: ModelProto, settings: Settings) -> dict[str, Any]:
    """Fold the output rows of each factorised conv's down conv into the batch where that measures faster
    alone at its input shape, in as many parts as the check has threads.

    Why: ONNX Runtime's blocked (NCHWc) conv spreads one image over its threads by groups of 64 output
    channels, so at batch 1 a down conv of rank <= 64 runs on one thread while the teacher's wider conv ran
    on all (CREPE's 1024 -> 64 conv: 5.7 ms on 1 or 2 threads; folded in two, 3.3 ms on 2). Folding copies
    the input's rows and costs time at larger batches and on one thread, hence the measurement, at the
    check's shape and threads, and a margin (`tuning.latency.fold_pays`). Only rows that stay the same
    whatever the free input dims are folded (`tuning.latency.foldable`). Records `fold` and `fold_ms` in the
    plan entries; returns `{node: times and choice}` for the check's record."""
    from copy import deepcopy

    chosen = [c for c in plan.candidates if c.decision == "factorize" and c.node in views
              and views[c.node].op == "Conv"]
    if settings.threads < 2 or not chosen:
        return {}
    timer = LayerTimer(plan, model, settings)  # one shape table for the rows and both timings
    folds = foldable(timer, views, chosen, settings.threads)
    if not folds:
        return {}
    nodes = set(folds)
    plain = layer_times(plan, model, views, settings, nodes=nodes, desc="timing down convs", timer=timer)
    folded_plan = deepcopy(plan)
    for c in folded_plan.candidates:
        c.fold = folds.get(c.node, c.fold)
    folded = layer_times(folded_plan, model, views, settings, nodes=nodes, desc="timing folded down convs",
                         timer=timer)
    record: dict[str, Any] = {}
    for c in chosen:
        if c.node not in plain or c.node not in folded:
            continue
        (d_plain, f_plain, _), (d_fold, f_fold, _) = plain[c.node], folded[c.node]
        wins = fold_pays((d_plain, f_plain), (d_fold, f_fold))
        c.fold_ms = {"dense": round(float(np.median([d_plain, d_fold])), 4), "plain": round(f_plain, 4),
                     "folded": round(f_fold, 4)}
        record[c.node] = {**c.fold_ms, "parts": settings.threads, "chosen": "folded" if wins else "plain"}
        if wins:
            c.fold = folds[c.node]
    return record


def _fold_note(c: Candidate, threads: int) -> str:
    t = c.fold_ms or {}
    return (f"down conv rows folded into the batch in {threads} parts: {t.get('folded', 0):.3f} ms alone vs "
            f"{t.get('plain', 0):.3f} ms unfolded (dense {t.get('dense', 0):.3f} ms, latency check, {threads} threads)")


def keep_folds(plan: Plan, made: set[str], unfolded: ModelProto, folded: ModelProto, teacher: Path,
               feed: dict[str, np.ndarray], settings: Settings, record: dict[str, Any]) -> bool:
    """Whether the whole student is measurably faster with the folds `choose_folds` made (`made`) than without
    them (interval of unfolded time / folded time above 1); if not, those folds are undone. Either way the plan
    entries say what was measured.

    Why: a fold that measured faster alone can still slow the model: on the MNIST demo's 0.05 ms conv it
    measured 0.040 vs 0.049 ms alone, but the whole student went from 1.18x to 0.99x the teacher, at a cost
    of two timed students here (about `BUDGET_S`)."""
    t, u, f = time_models([teacher, unfolded, folded], feed, settings)
    vs = speedup(u, f)
    keep = vs.low > 1.0
    record["whole_student"] = {"unfolded": _ratio_doc(t, u), "folded": _ratio_doc(t, f),
                               "folded_over_unfolded": {"speedup": round(vs.value, 4), "low": round(vs.low, 4),
                                                        "high": round(vs.high, 4)},
                               "kept": keep, "rule": "folds kept when the whole student measures faster with them "
                                                     "(interval above 1)"}
    for c in plan.candidates:
        if c.node not in made or c.fold is None:  # a fold given in a --plan file is the user's
            continue
        if keep:
            c.note = "; ".join(filter(None, [c.note, _fold_note(c, settings.threads)]))
        else:
            c.fold = None
            record[c.node]["chosen"] = "plain"
            c.note = "; ".join(filter(None, [c.note, (
                f"down conv not folded: faster folded alone ({_fold_note(c, settings.threads)}), but the whole "
                f"student measured {vs.value:.2f}x [{vs.low:.2f}, {vs.high:.2f}] as fast folded as unfolded")]))
    return keep


def _groups(plan: Plan) -> dict[str, list[Candidate]]:
    """Factorised candidates by the layer whose factors they use (a shared weight is reverted whole)."""
    out: dict[str, list[Candidate]] = {}
    for c in plan.candidates:
        if c.decision == "factorize":
            out.setdefault(c.shares_factors_with or c.node, []).append(c)
    return out


def _state(plan: Plan) -> list[tuple[Any, ...]]:
    return [(c.decision, c.reason, c.params_after, c.flops_after, c.fold) for c in plan.candidates]


def _restore(plan: Plan, state: list[tuple[Any, ...]]) -> None:
    for c, (decision, reason, params, flops, fold) in zip(plan.candidates, state, strict=True):
        c.decision, c.reason, c.params_after, c.flops_after, c.fold = decision, reason, params, flops, fold


class _Teacher:
    """The teacher's analysis the check's trial students are built from: loaded when first asked for, consumed
    by a rebuild, and never loaded again just to sit beside the models being timed. It was reloaded after
    every rebuild, so a full copy of the teacher stayed in memory through every timing (BERT-base: the
    check's peak was 5.6x the model file)."""

    def __init__(self, fresh: Callable[[], Analysed]) -> None:
        self._fresh = fresh
        self._a: Analysed | None = None

    def get(self) -> Analysed:
        if self._a is None:
            self._a = self._fresh()
        return self._a

    def rebuild(self, rebuild: Callable[[Analysed, Plan], ModelProto], plan: Plan) -> ModelProto:
        a, self._a = self.get(), None
        return rebuild(a, plan)

    def drop(self) -> None:
        """Let the analysis go (before timing): what it held is loaded again if asked for."""
        self._a = None


LayerTimes = dict[str, tuple[float, float, str]]  # node: (dense ms, factorised ms, where), `layer_times`


def _revert_order(plan: Plan, a: _Teacher, settings: Settings, doc: dict[str, Any]
                  ) -> tuple[LayerTimes, dict[str, list[Candidate]], dict[str, float], list[str]]:
    """Each factorised layer timed alone (recorded in `doc["layers"]`), the layers grouped by the factors they
    share, the ms each group saves (unmeasured layers count as saving nothing), and the groups in the order
    they are reverted: the least time saved first."""
    times = layer_times(plan, a.get().model, a.get().views, settings)
    doc["layers"] = {n: {"dense_ms": round(d, 4), "factorized_ms": round(f, 4), "at": w}
                     for n, (d, f, w) in times.items()}
    groups = _groups(plan)
    gain = {r: sum(times[c.node][0] - times[c.node][1] if c.node in times else 0.0 for c in cs)
            for r, cs in groups.items()}
    return times, groups, gain, sorted(groups, key=lambda r: (gain[r], r))


def _revert(cands: list[Candidate], times: LayerTimes, measured: str) -> list[str]:
    """Turn `cands` back into dense layers; each reason gives what the student `measured` and what the layer
    measured alone. Returns their nodes."""
    for c in cands:
        m = times.get(c.node)
        alone = (f"factorised {m[1]:.3f} ms vs dense {m[0]:.3f} ms at {m[2]}" if m
                 else "its input shape is unknown, not timed alone")
        c.decision, c.fold = "skip", None
        c.reason = f"reverted by the latency check: the student measured {measured}; this layer: {alone}"
        c.params_after, c.flops_after = 0, 0
    return [c.node for c in cands]


@dataclass
class Wide:
    """The second batch's part of the check: what it times with, and how it reverts."""

    baseline: Path
    feed: dict[str, np.ndarray]
    feed_wide: dict[str, np.ndarray]
    settings: Settings
    min_speedup: float | None
    say: Callable[[str], None]

    def revert(self, plan: Plan, current: ModelProto, a: _Teacher, rebuild: Callable[[Analysed, Plan], ModelProto],
               doc: dict[str, Any]) -> tuple[ModelProto, dict[str, Any], list[str]]:
        """Revert layers, the least time saved first (their batch-1 timings alone), 1, 2, 4, ... per round,
        while the student measures slower than the teacher at `SECOND_BATCH` (interval below 1); each round
        times both batches. Why: a student that ties at batch 1 and loses at batch 8 is not the faster model
        the check promises (MTCNN's P-Net: 1.00x at batch 1, 0.97-0.99x at batch 8). Returns the student,
        its batch-1 round and the layers reverted."""
        times, groups, _, order = _revert_order(plan, a, self.settings, doc)
        wide_doc = doc[f"batch_{SECOND_BATCH}"]
        step, reverted, last = 1, [], doc["rounds"][doc.get("restored", len(doc["rounds"]) - 1)]
        while verdict(wide_doc, None) == "slower" and order and len(doc["rounds"]) <= 2 * MAX_REVERT_ROUNDS:
            batch, order = order[:step], order[step:]
            step *= 2
            reverted += _revert([c for root in batch for c in groups[root]], times,
                                f"{wide_doc['speedup']:.2f}x the teacher [{wide_doc['low']:.2f}, "
                                f"{wide_doc['high']:.2f}] at batch {SECOND_BATCH}, slower than the teacher")
            current = a.rebuild(rebuild, plan)
            t, s = time_models([self.baseline, current], self.feed, self.settings)
            last = {"reverted": [c.node for root in batch for c in groups[root]], **_ratio_doc(t, s),
                    "at": f"batch {SECOND_BATCH} slower"}
            last["verdict"] = verdict(last, self.min_speedup)
            t, s = time_models([self.baseline, current], self.feed_wide, self.settings, BUDGET_S / 2)
            wide_doc = _ratio_doc(t, s)
            last[f"batch_{SECOND_BATCH}"] = wide_doc
            doc["rounds"].append(last)
            self.say(f"latency check: slower at batch {SECOND_BATCH}: reverted {len(last['reverted'])} layer(s), "
                     f"student now {last['speedup']:.2f}x, {wide_doc['speedup']:.2f}x at batch {SECOND_BATCH}")
        doc[f"batch_{SECOND_BATCH}"] = wide_doc
        return current, last, reverted


def check(plan: Plan, student: ModelProto, teacher: Path, fresh: Callable[[], Analysed],
          rebuild: Callable[[Analysed, Plan], ModelProto], log: Callable[[str], None] | None = None) -> ModelProto:
    """Measure `student` against `teacher`, choose the form and revert the layers that do not pay (see the
    module doc). `fresh()` loads the teacher anew and `rebuild(analysed, plan)` makes a student from it
    (`api.rewrite` consumes its analysis). Returns the student to save; `plan` is updated in place."""
    options = plan.options
    settings = cpu_settings(options.latency_threads)
    chosen_early = (plan.latency_check or {}).get("form")  # decided when planning (`choose_form`)
    doc: dict[str, Any] = {"provider": "cpu", "threads": settings.threads, "budget_s": BUDGET_S,
                           "min_speedup": options.min_speedup, "form": chosen_early, "rounds": [], "layers": {}}
    plan.latency_check = doc
    if not any(c.decision == "factorize" for c in plan.candidates):
        doc.update(verdict="nothing factorised", ok=options.min_speedup is None, speedup=None)
        return student
    if weight_bytes(student) > MAX_BYTES:
        doc.update(verdict="not measured: the student is over 2 GB (time it with `onnx-inher bench`)", ok=True,
                   speedup=None)
        plan.warn("latency check skipped: the student is over 2 GB")
        return student
    a = _Teacher(fresh)
    basis = plan_dims(a.get().model, options.dims, options.shapes)
    feed = sample_inputs(a.get().model, basis, shapes=options.shapes)
    doc["shapes"] = {k: list(v.shape) for k, v in feed.items()}
    with flushed_baseline(teacher, a.get().model) as (baseline, baseline_note):
        if baseline_note:
            doc["baseline"] = baseline_note
            (log or (lambda _m: None))(f"latency check: {baseline_note}")
        wide, why_not = with_batch(a.get().model, {k: tuple(v.shape) for k, v in feed.items()}, SECOND_BATCH)
        feed_wide = sample_inputs(a.get().model, shapes=wide) if wide else None  # every input at a full shape
        say = log or (lambda _m: None)

        current = student
        if _conv_headed(plan, a.get().views):
            doc["head_forms"] = choose_head_forms(plan, a.get().views, a.get().model, settings)
            if any(c.head_form == "conv" for c in plan.candidates if c.decision == "factorize"):
                current = a.rebuild(rebuild, plan)
                n = sum(1 for v in doc["head_forms"].values() if v["chosen"] == "conv")
                say(f"latency check: {n} conv head layer(s) measured faster with constant weights")
        folds = choose_folds(plan, a.get().views, a.get().model, settings)
        if folds:
            doc["folds"] = folds
            made = {node for node, v in folds.items() if v["chosen"] == "folded"}
            n = len(made)
            if made:
                folded = a.rebuild(rebuild, plan)
                if keep_folds(plan, made, current, folded, baseline, feed, settings, folds):
                    current = folded
                    say(f"latency check: {n} down conv(s) folded into the batch, the whole student measured faster")
                else:
                    say(f"latency check: {n} down conv(s) measured faster folded alone, but not the whole student: "
                        "not folded")
        if options.pick_form and _headed(plan) and chosen_early is None:
            pairs_plan = _as_pairs(plan, a.get().views)
            pairs = a.rebuild(rebuild, pairs_plan)
            t, h, p = time_models([baseline, current, pairs], feed, settings)
            vs = speedup(h, p)  # heads time / pair time: > 1 when the pairs are faster
            chosen = "pair" if vs.low > 1.0 else "heads"
            doc["form"] = {"chosen": chosen, "heads": _ratio_doc(t, h), "pair": _ratio_doc(t, p),
                           "pair_over_heads": {"speedup": round(vs.value, 4), "low": round(vs.low, 4),
                                               "high": round(vs.high, 4)},
                           "rule": "pairs when measurably faster than the heads (interval above 1), else heads"}
            say(f"latency check: heads {doc['form']['heads']['speedup']:.2f}x, "
                f"pairs {doc['form']['pair']['speedup']:.2f}x "
                f"the teacher: keeping {chosen}")
            if chosen == "pair":
                note = (f"form: a plain pair, measured {vs.value:.2f}x [{vs.low:.2f}, {vs.high:.2f}] faster than "
                        f"{plan.options.heads} heads on this machine (latency check)")
                for c, q in zip(plan.candidates, pairs_plan.candidates, strict=True):
                    if c.decision == "factorize" and c.heads > 1:
                        c.heads, c.form, c.params_after, c.flops_after = q.heads, q.form, q.params_after, q.flops_after
                        c.head_form = None  # a pair has no heads; `form_ms` stays as measured
                        c.note = "; ".join(filter(None, [c.note, note]))
                current = pairs
                first = _ratio_doc(t, p)
            else:
                first = _ratio_doc(t, h)
        else:
            a.drop()
            timed = _FORM_TIMINGS.pop(_timed_key(plan, teacher, settings, feed), None) if current is student else None
            if timed is not None:  # this very student, timed against the same teacher when its form was chosen
                first = {**timed, "measured": "with the form choice, the same student"}
            else:
                t, s = time_models([baseline, current], feed, settings)
                first = _ratio_doc(t, s)
        _FORM_TIMINGS.clear()
        doc["rounds"].append({"reverted": [], **first, "verdict": verdict(first, options.min_speedup)})
        say(f"latency check: student {first['speedup']:.2f}x the teacher [{first['low']:.2f}, {first['high']:.2f}]")

        last = doc["rounds"][-1]
        if last["verdict"] in ("slower", "below --min-speedup"):
            times, groups, gain, order = _revert_order(plan, a, settings, doc)
            step = 1
            states, first_student = [_state(plan)], current
            failing = ("slower", "below --min-speedup")
            while last["verdict"] in failing and order and len(doc["rounds"]) <= MAX_REVERT_ROUNDS:
                if last["verdict"] != "slower":  # faster than the teacher, not enough: only what loses time goes
                    order = [r for r in order if gain[r] <= 0]
                    if not order:
                        break
                batch, order = order[:step], order[step:]
                step *= 2
                why = (f"{last['verdict']} than the teacher" if last["verdict"] == "slower"
                       else f"below --min-speedup {options.min_speedup:g}")
                _revert([c for root in batch for c in groups[root]], times,
                        f"{last['speedup']:.2f}x the teacher [{last['low']:.2f}, {last['high']:.2f}], {why}")
                current = a.rebuild(rebuild, plan)
                t, s = time_models([baseline, current], feed, settings)
                r = _ratio_doc(t, s)
                last = {"reverted": [c.node for root in batch for c in groups[root]], **r,
                        "verdict": verdict(r, options.min_speedup)}
                doc["rounds"].append(last)
                states.append(_state(plan))
                say(f"latency check: reverted {len(last['reverted'])} layer(s), student now {r['speedup']:.2f}x")
            # per-layer timings do not always add up in the whole model: keep the best student measured
            best = max(range(len(doc["rounds"])), key=lambda k: doc["rounds"][k]["speedup"])
            if best != len(doc["rounds"]) - 1 and doc["rounds"][best]["low"] > last["high"]:
                _restore(plan, states[best])
                current = first_student if best == 0 else a.rebuild(rebuild, plan)
                doc["restored"] = best
                last = doc["rounds"][best]
                say(f"latency check: reverting did not help; kept the student of round {best}")
        kept = doc["rounds"][: doc.get("restored", len(doc["rounds"]) - 1) + 1]
        reverted = [n for r in kept for n in r["reverted"]]
        # the same student at a second batch: it must not be slower there either
        if feed_wide is None:
            doc[f"batch_{SECOND_BATCH}"] = {"skipped": why_not}
        elif float(last["teacher_ms"]) * SECOND_BATCH * 2 * MIN_ROUNDS / 1e3 > BUDGET_S:
            doc[f"batch_{SECOND_BATCH}"] = {"skipped": "too slow to time within the check's budget"}
        else:
            a.drop()
            t, s = time_models([baseline, current], feed_wide, settings, BUDGET_S / 2)
            doc[f"batch_{SECOND_BATCH}"] = _ratio_doc(t, s)
            if verdict(doc[f"batch_{SECOND_BATCH}"], None) == "slower":
                wide = Wide(baseline, feed, feed_wide, settings, options.min_speedup, say)
                current, last, more = wide.revert(plan, current, a, rebuild, doc)
                reverted += more
        doc.update(verdict=last["verdict"], speedup=last["speedup"], low=last["low"], high=last["high"],
                   drift=last.get("drift"), reverted=reverted,
                   ok=options.min_speedup is None or last["speedup"] >= options.min_speedup)
        if reverted and not any(c.decision == "factorize" for c in plan.candidates):
            # the teacher's own graph: a ratio off 1 is the timing's bias between two sessions, not the student
            doc.update(verdict=UNCHANGED, unchanged=True)
        if reverted:
            plan.note(f"latency check: {len(reverted)} layer(s) reverted to dense (they did not pay on this "
                      f"machine); the student now measures {last['speedup']:.2f}x the teacher "
                      f"[{last['low']:.2f}, {last['high']:.2f}]")
        if not doc["ok"]:
            plan.warn(f"latency check: the student measured {last['speedup']:.2f}x the teacher, below "
                      f"--min-speedup {options.min_speedup:g}")
        return current
