"""The Python API; the CLI is a thin layer over these functions.

Data flows one way: load -> locate -> plan -> factorize -> cleanup -> flush -> check -> save -> verify.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import ModelProto

from onnx_inher import _env
from onnx_inher.errors import CheckFailed, InputError
from onnx_inher.ir.graph import default_opset
from onnx_inher.ir.io import LoadedModel, check_output, load_model, release_memory, save_model
from onnx_inher.ir.layers import LayerView
from onnx_inher.ir.shapes import (
    Shapes,
    TensorInfo,
    check_shapes,
    complete_shapes,
    declared_defaults,
    format_shapes,
    image_defaults,
    image_hint,
    infer,
    input_symbols,
    sequence_defaults,
    sequence_hint,
    shape_symbols,
)
from onnx_inher.passes.cleanup import Cleanup
from onnx_inher.passes.factorize import Factorize, mixes_conv_heads, release_weight, written_s2d
from onnx_inher.passes.flush import FlushNegligible, negligible_weights
from onnx_inher.passes.locate import locate
from onnx_inher.passes.verify import VerifyReport
from onnx_inher.passes.verify import verify as verify_models
from onnx_inher.planning.plan import (
    SPLIT_TOP,
    Options,
    Plan,
    Spectra,
    apply_edits,
    build_plan,
    channels_first,
    load_plan,
    note_channels_first,
    uncovered_note,
)
from onnx_inher.runtime import load_inputs, sample_inputs

if TYPE_CHECKING:
    from onnx_inher.tuning.calibrate import Calibration
    from onnx_inher.tuning.speed import Analysed

PathLike = str | os.PathLike[str]
FULL_RANK_BOUND = 1e-4


@dataclass
class Analysis:
    loaded: LoadedModel
    found: list
    views: dict[str, LayerView]
    symbols: dict[str, int] = field(default_factory=dict)  # named dims: --dim and those the shapes fix
    assumed: dict[str, tuple[int, ...]] = field(default_factory=dict)  # image shapes no --shape gave
    shape_note: str = ""  # what was assumed for them, and how to give the real size
    cost: dict | None = None  # the whole model beside the candidates (`Plan.model_cost`)


def analyze(model: PathLike, dims: dict[str, int] | None = None,
            shapes: Mapping[str, Sequence[int]] | None = None, known_sha256: str | None = None) -> Analysis:
    """Load and locate; FLOPs are counted at `shapes` (real input shapes, checked against the model)
    and `dims` (named dynamic dims), an image input's free height and width at IMAGE_SIDE
    (`ir.shapes.image_defaults`), any other input's free axes after the first at SEQUENCE_LEN
    (`sequence_defaults`), both said in `shape_note`, every other dynamic dim at 1. `known_sha256`: the
    file was loaded and validated before in this process (`ir.io.load_model`)."""
    loaded = load_model(model, known_sha256)
    images = image_defaults(loaded.model, shapes or {}, dims)
    sequences = sequence_defaults(loaded.model, {**(shapes or {}), **images}, dims)
    note = ""
    for assumed in filter(None, [{**images, **sequences}, images if sequences else {}]):
        try:
            a = _analyze(loaded, dims, {**(shapes or {}), **assumed})
        except InputError:
            continue
        a.assumed = assumed
        a.shape_note = "; ".join(filter(None, [
            _assumed_note(loaded.model, images, IMAGES, "size"),
            _assumed_note(loaded.model, {k: v for k, v in sequences.items() if k in assumed}, SEQUENCES, "length"),
            _failed_note(loaded.model, {}, {k: v for k, v in sequences.items() if k not in assumed})]))
        return a
    if images or sequences:
        note = _failed_note(loaded.model, images, sequences)
    a = _analyze(loaded, dims, shapes or {})
    a.shape_note = note
    if not shapes and not images and not sequences and _open_conv_sizes(loaded.model, a.views.values()):
        return _observed(loaded, dims, a)
    return a


IMAGES, SEQUENCES = "image input(s) with a free height or width", "input(s) with a free sequence length"


def _fix(model: ModelProto, images: Shapes, sequences: Shapes) -> str:
    return " ".join([*(f"--shape {image_hint(model, k)}" for k in images),
                     *(f"--shape {sequence_hint(model, k)}" for k in sequences)])


def _assumed_note(model: ModelProto, assumed: Shapes, what: str, unit: str) -> str:
    if not assumed:
        return ""
    fix = _fix(model, assumed, {}) if what == IMAGES else _fix(model, {}, assumed)
    return (f"no --shape for {what}: FLOPs and timings are at {format_shapes(assumed)}; give {fix} with the {unit} "
            "your model runs at")


def _failed_note(model: ModelProto, images: Shapes, sequences: Shapes) -> str:
    if not images and not sequences:
        return ""
    what = " and ".join(w for w, given in ((IMAGES, images), (SEQUENCES, sequences)) if given)
    return (f"no --shape for {what}, and ONNX Runtime cannot run the model at "
            f"{format_shapes({**images, **sequences})}: FLOPs and timings are {'per pixel' if images else 'per token'} "
            f"(free dims at 1), which says nothing about speed; give {_fix(model, images, sequences)} with the size "
            "your model runs at")


def _open_conv_sizes(model: ModelProto, views: Iterable[LayerView]) -> list[str]:
    """Convs whose output height/width shape inference left open: neither a number nor a dim the inputs
    name (which `--dim` or the default 1 resolves). A Reshape whose target comes from `Shape` ops does
    that (CREPE's `[batch, 1024]` frames -> `[batch, 1, 1024, 1]`), and FLOPs would then be per pixel."""
    named = input_symbols(model)
    return [v.node for v in views if v.op in ("Conv", "ConvTranspose") and v.out_dims
            and any(not isinstance(d, int) and d not in named for d in v.out_dims[2:])]


def _observed(loaded: LoadedModel, dims: dict[str, int] | None, a: Analysis) -> Analysis:
    """`a` counted again at the declared input shapes (free dims at their `--dim` value or 1, the same basis),
    observed in one ONNX Runtime run (`counted_shapes`), so that convs count their real pixels; `a` as it
    is when the model cannot run there. The plan records no shape: its basis is unchanged."""
    try:
        b = _analyze(loaded, dims, declared_defaults(loaded.model, dims))
    except InputError:
        return a
    b.symbols = a.symbols
    return b


def _analyze(loaded: LoadedModel, dims: dict[str, int] | None, shapes: Mapping[str, Sequence[int]]) -> Analysis:
    checked = check_shapes(loaded.model, shapes)
    symbols = shape_symbols(loaded.model, checked, dims)
    counted = counted_shapes(loaded, checked) if checked else None
    found = locate(loaded.model, symbols, counted)
    views = {f.node: f for f in found if isinstance(f, LayerView)}
    return Analysis(loaded, found, views, symbols, cost=model_cost(loaded, counted, symbols, found))


def model_cost(loaded: LoadedModel, counted: dict[str, TensorInfo] | None, symbols: dict[str, int],
               found: list) -> dict:
    """Every float weight of the model, and the FLOPs of the main graph's ops that no candidate stands for
    (LSTM, GRU, RNN, quantised products), by op type, at the shapes the candidates are counted at. Shapes
    are inferred only when such ops (or load-time placeholder weights) are there."""
    from onnx_inher.bench.profile import (
        QUANTISED_CONV,
        QUANTISED_MATMUL,
        RECURRENT_GATES,
        float_params,
        uncounted_flops,
    )

    ops = {n.op_type for n in loaded.model.graph.node}
    needs_shapes = bool(ops & {*RECURRENT_GATES, *QUANTISED_MATMUL, *QUANTISED_CONV, "ConstantOfShape"})
    table = (counted if counted is not None else infer(loaded.model)) if needs_shapes else None
    params, _ = float_params(loaded.model, table)
    other = uncounted_flops(loaded.model, table, symbols, {f.node for f in found}) if table is not None else {}
    return {"params": int(params), "other_flops": dict(sorted(other.items()))}


def _with_assumed(options: Options, a: Analysis) -> Options:
    """`options` with the image shapes `analyze` assumed, so that the plan records them and every timing
    (the form's, the latency check's) runs at them."""
    if not a.assumed:
        return options
    return replace(options, shapes={**(options.shapes or {}), **{k: list(v) for k, v in a.assumed.items()}})


def counted_shapes(loaded: LoadedModel, shapes: Shapes) -> dict[str, TensorInfo]:
    """The shapes FLOPs are counted at: inferred with the inputs at `shapes`. When every input's shape is
    then known, the dense nodes' tensors that inference leaves open (a Reshape whose target comes from
    Shape/Slice ops) are observed in one ONNX Runtime run at those shapes, as `bench` counts them."""
    try:
        full = complete_shapes(loaded.model, shapes)
    except InputError:
        return infer(loaded.model, shapes)
    from onnx_inher.bench.profile import shape_table

    try:
        return shape_table(loaded.path, loaded.model, sample_inputs(loaded.model, shapes=full))
    except ImportError:  # no onnxruntime: what inference resolves
        return infer(loaded.model, full)
    except (InputError, MemoryError):
        raise
    except Exception as err:  # ORT's errors have several types: say which shape failed
        given = format_shapes(full)
        raise InputError(f"--shape {given}: the model does not run at this shape in ONNX Runtime "
                         f"({str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}); "
                         "check the shape.") from None


def plan(model: PathLike, options: Options | None = None, *, target: str | None = None,
         _spectra: Spectra | None = None, _analysis: Analysis | None = None) -> Plan:
    """Decide, for every dense layer, whether and how to factorise it (nothing is written).

    With `target` ("cpu" or "cuda"), layers whose factorised form is not faster on this machine,
    by per-layer timings (cached), are skipped with the measured times as the reason. With
    `allocate="sensitivity"` (and `calibration`), ranks are then moved to where the outputs need them."""
    options = options or Options()
    options.validate()
    a = _analysis or analyze(model, options.dims, options.shapes)
    return _plan(a, _with_assumed(options, a), target, _spectra or Spectra())[0]


def _plan(a: Analysis, options: Options, target: str | None, spectra: Spectra) -> tuple[Plan, Calibration | None]:
    """The plan, and the calibration it measured (so that `compress` does not run the samples twice)."""
    feeds, classes = _used_classes(a, options)
    options, form = _choose_form(a, options, classes, spectra)
    p = build_plan(str(a.loaded.path), a.loaded.sha256, default_opset(a.loaded.model), a.found, options, spectra,
                   classes)
    p.warn(*_split_notes(p, a, feeds))
    p.model_cost = a.cost
    if note := uncovered_note(p):
        p.warn(note)
    if a.shape_note:
        p.warn(a.shape_note)
    if form is not None:
        p.latency_check = {"form": form}
        if form["chosen"] == "pair":
            note = (f"form: a plain pair, measured {form['pair_over_heads']['speedup']:.2f}x "
                    f"[{form['pair_over_heads']['low']:.2f}, {form['pair_over_heads']['high']:.2f}] faster than "
                    f"{form['heads_asked']} heads on this machine (latency check), planned at the same budget")
            for c in p.candidates:
                if c.decision == "factorize":
                    c.note = "; ".join(filter(None, [c.note, note]))
        from onnx_inher.tuning.speed import kernel_sides

        kernels = f" ({sides})" if (sides := kernel_sides(form)) else ""
        p.note(f"latency check: heads {form['heads']['speedup']:.2f}x, pairs "
               f"{form['pair']['speedup']:.2f}x the teacher{kernels}: planned as {form['chosen']}")
    if target:
        from onnx_inher.tuning.latency import apply_target

        p = apply_target(p, a.loaded.model, a.views, target)
    if options.allocate != "sensitivity":
        return p, None
    calibration = _calibrate(a, p, options, feeds or None)
    from onnx_inher.tuning import speed
    from onnx_inher.tuning.allocate import allocate_by_sensitivity
    from onnx_inher.tuning.orient import reorient

    p.note(*reorient(p, a.views, calibration.grams))  # ranks come from the data here: so does the side

    timing = speed.cpu_settings(options.latency_threads) if speed.enabled(options.latency_check) else None
    p = allocate_by_sensitivity(a.loaded.model, a.views, p, spectra, calibration.feeds, calibration.grams,
                                calibration.rows, timing)
    return p, calibration


def _used_classes(a: Analysis, options: Options) -> tuple[dict[str, np.ndarray], dict[str, list[int]]]:
    """The calibration samples and, by classifier head, the classes its teacher uses on them (the class
    split, `tuning/classes.py`); nothing without `calibration` or with `class_split` off."""
    if not options.calibration or not options.class_split:
        return {}, {}
    from onnx_inher.tuning.calibrate import calibration_feeds
    from onnx_inher.tuning.classes import classifier_heads, used_classes

    heads = classifier_heads(a.loaded.model, a.views)
    if not heads:  # no teacher run, no samples loaded
        return {}, {}
    feeds = calibration_feeds(options.calibration, a.loaded.model, dims=a.symbols)
    return feeds, used_classes(a.loaded.model, a.views, feeds, heads=heads)


def _split_notes(p: Plan, a: Analysis, feeds: dict[str, np.ndarray]) -> list[str]:
    """One warning per class-split head: what was kept, on what data, and what it costs elsewhere."""
    samples = len(next(iter(feeds.values()))) if feeds else 0
    return [f"class split: {c.node} keeps the weights of {len(c.dense_classes or [])} of its "
            f"{a.views[c.node].out_features} classes (those the teacher ranks in its top {SPLIT_TOP} on "
            f"{samples} calibration samples); the others share a rank-{c.rank} pair, so inputs that need them "
            "are read worse than by the teacher: calibrate on data like what the model will see, or pass "
            "--no-class-split" for c in p.candidates if c.dense_classes is not None]


def _choose_form(a: Analysis, options: Options, classes: dict[str, list[int]],
                 spectra: Spectra) -> tuple[Options, dict | None]:
    """With `pick_form` (the CLI's default) and the latency check on: heads or pairs, whichever measures
    faster here, each planned at the requested budget (tuning/speed.choose_form). The teacher's analysis
    `a` is not touched: the trial students are built from fresh ones."""
    from onnx_inher.tuning import speed

    wanted = options.pick_form and options.mode == "inher" and options.heads > 1
    if not wanted or not speed.enabled(options.latency_check):
        return options, None
    pairs = replace(options, mode="svd", heads=1)
    spectra = spectra if spectra.remember else Spectra(remember=True)  # the trials factorise the same weights

    def planned(o: Options) -> Plan:
        return build_plan(str(a.loaded.path), a.loaded.sha256, default_opset(a.loaded.model), a.found, o, spectra,
                          classes)

    plans = [planned(options), planned(pairs)]
    if not any(c.decision == "factorize" and c.heads > 1 for c in plans[0].candidates):
        return options, None
    down = replace(pairs, orientation="down")  # timed too where the plan puts some kernel up
    down_plan = planned(down) if any(c.orientation for c in plans[1].candidates if c.decision == "factorize") \
        else None

    path, digest = a.loaded.path, a.loaded.sha256
    _unload(a)
    form = speed.choose_form(plans[0], plans[1], path, lambda: _fresh(path, options, digest),
                             lambda an, p: rewrite(an.handle, p, spectra), down_plan)
    _reload(a, options)
    if form is None:
        return options, None
    form["heads_asked"] = options.heads
    if form["chosen"] != "pair":
        return options, form
    return (down if form.get("orientation") == "down" else pairs), form


def _calibrate(a: Analysis, the_plan: Plan, options: Options,
               feeds: dict[str, np.ndarray] | None = None) -> Calibration:
    from onnx_inher.tuning.calibrate import calibrate

    assert options.calibration
    calibration = calibrate(a.loaded.model, a.views, the_plan, options.calibration, a.symbols, feeds)
    the_plan.options.calibration = options.calibration
    the_plan.note(*calibration.notes)
    return calibration


@dataclass
class CompressResult:
    plan: Plan
    outputs: list[Path]
    verification: VerifyReport | None = None
    warnings: list[str] = field(default_factory=list)  # as the plan's: what may need the user's action
    notes: list[str] = field(default_factory=list)  # what was measured and decided

    @property
    def speed_ok(self) -> bool:
        """False when the latency check measured the student below `Options.min_speedup`."""
        return bool((self.plan.latency_check or {}).get("ok", True))


@dataclass
class FlushResult:
    flushed: int  # negligible values zeroed
    tensors: int  # in this many tensors
    outputs: list[Path]  # the files written (none when there was nothing to flush)
    verification: VerifyReport | None = None


FLUSH_BOUND = 1e-5  # relative output change `flush --verify` accepts: zeroing them changes only rounding


def flush(model: PathLike, output: PathLike, *, verify: bool = False, inputs: PathLike | None = None,
          shapes: Mapping[str, Sequence[int]] | None = None) -> FlushResult:
    """The model with its negligible weights zeroed (`passes/flush.py`): the speed a teacher slowed by
    near-dead weights gets without any compression (the PP-OCRv5 detector: 2.0x, outputs unchanged), and
    the baseline `bench` compares students with. Nothing is written when it has none."""
    out = Path(output)
    check_output(out, [Path(model), *([Path(inputs)] if inputs else [])])
    loaded = load_model(model)
    feed = verify_feed(loaded.model, inputs, shapes) if verify else None  # bad inputs fail before any output
    flusher = FlushNegligible(inplace=True)
    flushed, changed = flusher(loaded.model)
    if not changed:
        return FlushResult(0, 0, [])
    written = save_model(flushed, out, external_data=loaded.external_data, inputs=[loaded.path])
    result = FlushResult(flusher.flushed, flusher.tensors, written)
    if feed is not None:
        with _removed_on_bad_input(written):
            result.verification = verify_models(loaded.path, out, feed, FLUSH_BOUND)
    return result


@contextmanager
def _removed_on_bad_input(written: Sequence[Path]) -> Iterator[None]:
    """Bad input found only after writing (the teacher cannot run on the --verify inputs) leaves no output."""
    try:
        yield
    except InputError:
        for path in written:
            path.unlink(missing_ok=True)
        raise


def _read_plan(path: PathLike, a: Analysis, spectra: Spectra) -> Plan:
    p = load_plan(path)
    if p.sha256 != a.loaded.sha256:
        raise InputError(f"{path}: this plan was made for another model ({p.model}); "
                         f"regenerate it with `onnx-inher plan {a.loaded.path}`.")
    p.opset = default_opset(a.loaded.model)
    p.model = str(a.loaded.path)  # the same file (same digest), perhaps moved since: the check reads this one
    return apply_edits(p, a.views, spectra)


def factorised_outputs(the_plan: Plan, a: Analysis) -> dict[str, int]:
    """Output tensor names (and elem types) of the factorised layers: teacher and student share them. A
    class-split head or mixed conv heads that take over the bias Add after the layer
    (`passes.factorize.split_bias`, `conv_bias`) are compared after that bias, a channels-first pair after the
    Transpose and scales it takes over (`planning.plan.channels_first`)."""
    out: dict[str, int] = {}
    for c in the_plan.candidates:
        if c.decision != "factorize":
            continue
        v = a.views[c.node]
        takes = v.split_takes_bias if c.dense_classes is not None else mixes_conv_heads(v, c, the_plan.opset)
        name = v.trailing_add if takes and v.trailing_bias is not None else v.output
        tail = channels_first(v, c)
        if tail is not None:  # a channels-first pair writes the tail's output (`passes.factorize`)
            name = tail.output
        out[name] = onnx.helper.np_dtype_to_tensor_dtype(v.dtype)
    return out


def rewrite(a: Analysis, the_plan: Plan, spectra: Spectra) -> ModelProto:
    """Apply a plan to an analysed model: the student is a new `ModelProto` (the teacher's is left
    as it was, so dropping the analysis frees it whole). The factorised views give up their weights
    as they are consumed, the others at once: afterwards the analysis knows the views' shapes and
    dtypes, not their values."""
    chosen = {c.node for c in the_plan.candidates if c.decision == "factorize"}
    note_channels_first(the_plan, a.views)  # a form chosen since planning may have made pairs of heads
    for view in a.views.values():
        if view.node not in chosen:
            release_weight(view)
    model, _ = Factorize(the_plan, a.views, spectra, release_weights=True)(a.loaded.model)
    model, _ = Cleanup(inplace=True)(model)
    model, _ = FlushNegligible(inplace=True)(model)
    return model


def s2d_note(student: ModelProto) -> str | None:
    """What a plan says when down convs were written space-to-depth (`passes/factorize.py`, `s2d_axis`): the
    teacher's own conv would run faster in that form too, so part of the speedup is the form's."""
    n = written_s2d(student)
    if not n:
        return None
    return (f"{n} down conv(s) on one input channel with a strided kernel written space-to-depth, a form ONNX "
            "Runtime runs 3-4x faster; the teacher's own conv would gain from it too (CREPE tiny's: 1.5x the whole "
            "model), so part of the student's speedup is the form's, not the factorisation's")


def negligible_note(teacher: ModelProto) -> str | None:
    """What a plan says when the teacher's weights hold negligible floats (`ir.tensors`; the student has
    none): part of the student's speedup is then the flushing's, which the teacher could have had alone."""
    values, tensors = negligible_weights(teacher)
    if not values:
        return None
    return (f"the teacher's weights hold {values:,} negligible floats (subnormal or below 1e-30) in {tensors} "
            "tensors, which make ONNX Runtime compute with subnormal numbers, many times slower; the student has "
            "them as zeros (no output changes beyond float rounding), so part of its speedup may come from that "
            "alone (2x on the PP-OCRv5 detector, nothing measurable on others): `bench` also times the teacher "
            "with them flushed, and `onnx-inher flush` writes it")


def _full_check(path: Path) -> str | None:
    """The first line of the full ONNX check's complaint about the model at `path`, or None."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        return str(err).splitlines()[0]
    return None


def check_written(files: list[Path], teacher: Path | None = None) -> str | None:
    """Full ONNX check of a saved student, read by path (an in-memory check would serialise the whole
    model once more, the largest memory peak of `compress`); a student that fails is removed, unless the
    teacher fails the very same check (exporters write such graphs and ONNX Runtime runs them: the
    student only keeps the teacher's flaw). Returns that inherited complaint, if any."""
    problem = _full_check(files[0])
    if problem is None:
        return None
    if teacher is not None and _full_check(teacher) == problem:
        return problem
    for f in files:
        f.unlink(missing_ok=True)
    raise CheckFailed(f"the rewritten model fails the ONNX checker: {problem}")


def compress(
    model: PathLike,
    output: PathLike,
    options: Options | None = None,
    *,
    plan_path: PathLike | None = None,
    verify: bool = False,
    inputs: PathLike | None = None,
    bound: float | None = None,
    target: str | None = None,
) -> CompressResult:
    """Plan (or read a plan), rewrite, check and atomically save; optionally verify in ONNX Runtime."""
    options = options or Options()
    options.validate()
    if target and plan_path:
        raise InputError("--target applies when planning; a --plan file is applied as written (plan with --target).")
    out = Path(output)
    check_output(out, [Path(model)])
    if plan_path and options.allocate != "energy":
        raise InputError("--allocate applies when planning; a --plan file's ranks are applied as written "
                         "(plan with --allocate, then compress --plan).")
    if plan_path and not options.dims and not options.shapes:  # count at the plan's shapes, as it was made
        planned = load_plan(plan_path).options
        options = replace(options, dims=planned.dims, shapes=planned.shapes)
    a = analyze(model, options.dims, options.shapes)
    options = _with_assumed(options, a)
    checked = options.latency_check if options.latency_check is not None else _env.latency_check_default()
    spectra = Spectra(remember=checked)  # the latency check rebuilds the student: keep its factors
    calibration = None
    if plan_path:
        the_plan = _read_plan(plan_path, a, spectra)
        the_plan.model_cost = the_plan.model_cost or a.cost
        if a.assumed and not the_plan.options.shapes:  # a plan made per pixel: time the check at the image size
            the_plan.options.shapes = dict(options.shapes or {})
        if a.shape_note:
            the_plan.warn(a.shape_note)
        planned_on = the_plan.options.calibration
        if planned_on and not options.calibration:
            the_plan.options.calibration = None
            the_plan.warn(f"the plan's ranks were measured on '{planned_on}' but no --calibration was "
                          "given: plain SVD factors (add --calibration for whitened ones)")
    else:
        the_plan, calibration = _plan(a, options, target, spectra)
    if options.calibration:
        from onnx_inher.tuning.calibrate import CalibratedSpectra, plan_ranks

        calibration = calibration or _calibrate(a, the_plan, options)
        fitted = {}
        if _env.sequential_calibration():
            from onnx_inher.tuning.sequential import sequential_svds

            fitted, notes = sequential_svds(a.loaded.model, a.views, the_plan, calibration.feeds, calibration.rows,
                                            grams=calibration.grams)
            the_plan.note(*notes)
        spectra = CalibratedSpectra(calibration.grams, plan_ranks(the_plan), calibration.rows, fitted, checked)
        del calibration
    feed = load_inputs(inputs, a.loaded.model) if inputs else None
    teacher_path, external = a.loaded.path, a.loaded.external_data
    layers = factorised_outputs(the_plan, a) if verify else None
    flushed = negligible_note(a.loaded.model)
    if flushed:
        the_plan.note(flushed)
    rewritten = rewrite(a, the_plan, spectra)
    if note := s2d_note(rewritten):
        the_plan.note(note)
    digest = a.loaded.sha256
    del a  # the teacher proto and every folded weight: peak memory is what lives at once
    rewritten = _latency_check(the_plan, options, rewritten, model, spectra, digest)
    release_memory()
    written = save_model(rewritten, out, external_data=external, inputs=[teacher_path])
    del rewritten
    release_memory()
    inherited = check_written(written, teacher_path)
    if inherited:
        the_plan.warn(f"the teacher itself fails the full ONNX check ({inherited}); ONNX Runtime runs "
                      "it, and the student keeps that flaw")
    result = CompressResult(the_plan, written, warnings=list(the_plan.warnings), notes=list(the_plan.notes))
    if verify:
        with _removed_on_bad_input(written):
            result.verification = verify_files(teacher_path, out, inputs=inputs, bound=bound, dims=options.dims,
                                               shapes=options.shapes, feed=feed, layers=layers)
    return result


def _unload(a: Analysis) -> None:
    """Let `a`'s teacher proto and folded weights go while trial students are built from fresh copies and timed:
    ViT-B/16's analysis (724 MiB live, twice its file) sat beside the form choice's three sessions, its peak."""
    a.loaded, a.found, a.views = replace(a.loaded, model=ModelProto()), [], {}
    release_memory()


def _reload(a: Analysis, options: Options) -> None:
    """`a` as it was before `_unload`: the same file (checked by its digest), located the same way."""
    again = analyze(a.loaded.path, options.dims, options.shapes, a.loaded.sha256)
    a.loaded, a.found, a.views = again.loaded, again.found, again.views


def _latency_check(the_plan: Plan, options: Options, student: ModelProto, model: PathLike,
                   spectra: Spectra, sha256: str) -> ModelProto:
    """Time the student against the teacher; choose the form and revert what does not pay (tuning/speed.py)."""
    from onnx_inher.tuning import speed

    if not speed.enabled(options.latency_check) and options.min_speedup is None:
        return student
    the_plan.options = replace(the_plan.options, latency_check=options.latency_check,
                               min_speedup=options.min_speedup, pick_form=options.pick_form,
                               latency_threads=options.latency_threads)

    return speed.check(the_plan, student, Path(model), lambda: _fresh(model, options, sha256),
                       lambda an, p: rewrite(an.handle, p, spectra))


def _fresh(model: PathLike, options: Options, sha256: str) -> Analysed:
    """A new analysis of the teacher for the latency check's trial students (`rewrite` consumes one); the file
    is the one validated at the start (`sha256`), so it is not validated again."""
    from onnx_inher.tuning import speed

    a = analyze(model, options.dims, options.shapes, sha256)
    release_memory()  # the parse's transient copies: freed, but glibc would keep them
    return speed.Analysed(a.loaded.model, a.views, a)


def verify_files(teacher: PathLike, student: PathLike, *, inputs: PathLike | None = None,
                 bound: float | None = None, dims: dict[str, int] | None = None,
                 shapes: Mapping[str, Sequence[int]] | None = None,
                 feed: dict[str, np.ndarray] | None = None, seed: int = 0,
                 layers: dict[str, int] | None = None) -> VerifyReport:
    """Teacher vs student in ONNX Runtime, on `inputs` (.npz) or random inputs of the right shapes:
    `shapes` (real input shapes, checked against the teacher), named dims from `dims`."""
    t = load_model(teacher)
    load_model(student)
    if feed is None:
        feed = verify_feed(t.model, inputs, shapes, dims, seed)
    return verify_models(teacher, student, feed, bound, tensors=layers)


def verify_feed(model: ModelProto, inputs: PathLike | None, shapes: Mapping[str, Sequence[int]] | None,
                dims: dict[str, int] | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """What `verify` runs: `inputs` (an .npz), or random inputs of `shapes` (real input shapes, checked
    against the model) with named dims from `dims`."""
    if inputs and shapes:
        raise InputError("give the inputs (an .npz) or their shapes (--shape), not both: an .npz fixes the shapes.")
    if inputs:
        return load_inputs(inputs, model)
    # an image's free sides at the size compress plans at (`image_defaults`): a detector cannot run at 8x8
    checked = check_shapes(model, {**image_defaults(model, shapes or {}, dims), **(shapes or {})})
    return sample_inputs(model, shape_symbols(model, checked, dims), seed, shapes=checked)
