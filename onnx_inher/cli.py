"""`onnx-inher` command line: click commands only, no logic (see onnx_inher.api).

Exit codes: 0 success, 1 a requested check failed, 2 bad input or usage.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click

from onnx_inher import api
from onnx_inher.distill import AUGMENTS, TEACHER_MODES, TEACHER_RUNTIMES, TRAINABLE
from onnx_inher.errors import CheckFailed, InputError, OnnxInherError
from onnx_inher.ir.io import check_output, write_text
from onnx_inher.planning import Options, Plan, parse_policy
from onnx_inher.reporting import text as report


def _dims(values: tuple[str, ...]) -> dict[str, int]:
    out = {}
    for v in values:
        name, _, num = v.partition("=")
        if not name or not num.isdigit() or int(num) < 1:
            raise InputError(f"--dim: expected NAME=POSITIVE_INT (e.g. --dim batch=4), got '{v}'")
        out[name] = int(num)
    return out


def _shapes(values: tuple[str, ...]) -> dict[str, list[int]]:
    """`--shape NAME=DxDxD` (repeatable, one per input): the trtexec / onnxruntime_perf_test convention."""
    out: dict[str, list[int]] = {}
    for v in values:
        name, _, dims = v.rpartition("=")
        parts = dims.split("x")
        if not name or not all(p.isdigit() and int(p) >= 1 for p in parts):
            raise InputError(f"--shape: expected NAME=DxDx... with positive dims (e.g. --shape x=1x3x48x320), "
                             f"got '{v}'")
        if name in out:
            raise InputError(f"--shape: input '{name}' is given twice; give one --shape per input.")
        out[name] = [int(p) for p in parts]
    return out


shape_option = click.option(
    "--shape", "shapes", multiple=True, metavar="NAME=DxD...",
    help="Real shape of an input, e.g. x=1x3x48x320 (repeatable, one per input): FLOPs and sample inputs "
         "use it, unnamed dynamic dims and spatial dims after a conv included.")


def policy_options(f: Callable) -> Callable:
    """The rank-policy and selection options shared by inspect, plan and compress."""
    opts = [
        click.option("--rank", type=int, help="Fixed rank for every layer (clamped to each layer's full rank)."),
        click.option("--rank-ratio", type=float, help="Rank as a fraction of each layer's full rank."),
        click.option("--param-ratio", type=float,
                     help="Keep this fraction of all candidate params, spread by singular-value energy "
                          "(default 0.5)."),
        click.option("--energy", type=float, help="Smallest rank keeping this share of singular-value energy."),
        click.option("--mode", type=click.Choice(["inher", "svd"]),
                     help="inher: shared down-projection + gated heads; svd: a plain factor pair. Default: inher "
                          "with 2 heads, which compress and run turn into plain pairs when those measure "
                          "faster on this machine (see --no-latency-check)."),
        click.option("--heads", type=int,
                     help="Up-projection heads in inher mode (default 2); 1 gives a plain pair (fastest)."),
        click.option("--orientation", type=click.Choice(["auto", "down"]), default="auto", show_default=True,
                     help="Where a k x k conv pair puts its kernel: auto puts it up where that keeps the budget's "
                          "energy with no more params and FLOPs (up: a 1x1 conv to the rank, then the k x k "
                          "conv, which ONNX Runtime runs nearer its FLOP ideal); down: always a k x k conv to the "
                          "rank, then a 1x1 conv."),
        click.option("--rank-multiple", type=int, default=16, show_default=True,
                     help="Round ranks up to a multiple of this (latency steps with it on CPU)."),
        click.option("--include", multiple=True, help="Only nodes whose name matches this regex (repeatable)."),
        click.option("--exclude", multiple=True, help="Skip nodes whose name matches this regex (repeatable)."),
        click.option("--min-params", type=int, default=0, show_default=True,
                     help="Skip layers with fewer weight params."),
        click.option("--no-guard", is_flag=True,
                     help="Factorise even when a layer would not get smaller or cheaper (exactness tests)."),
        click.option("--dim", "dims", multiple=True, metavar="NAME=N",
                     help="Value of a dynamic dim for FLOP counts and sample inputs (repeatable)."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of the heads' perturbations."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def data_options(f: Callable) -> Callable:
    """Options that use real samples: whitened SVD and sensitivity rank allocation (plan and compress)."""
    f = click.option("--allocate", type=click.Choice(["energy", "sensitivity"]),
                     help="How --param-ratio's budget is spread: by singular-value energy, or by each layer's "
                          "measured effect on the outputs over --calibration DATA (slower, usually better; "
                          "with the latency check on, each rank is priced by the layer's measured time here, "
                          "else by its FLOPs). Default: energy; `run` uses sensitivity on its --data (energy with "
                          "--calibration none).")(f)
    f = click.option("--no-class-split", is_flag=True,
                     help="With calibration data, a classifier head with many classes keeps exact weights for the "
                          "classes the teacher uses on that data and a small pair for the rest; this flag "
                          "factorises it like any other layer.")(f)
    return click.option("--calibration", metavar="DATA",
                        help="Data-aware (whitened) SVD: factor each Conv and MatMul/Gemm to minimise its output "
                             "error on DATA (as for `distill --data`: fortunes, mnist5k, an .npz, images:FOLDER, "
                             "...). `run` uses its --data unless given other DATA or 'none' (plain SVD).")(f)


def timing_options(f: Callable) -> Callable:
    """What plan, compress and run time on this machine, and with how many threads."""
    f = click.option("--latency-threads", type=int, metavar="N",
                     help="Intra-op threads the student will run with: every timing (heads or pairs, "
                          "time-priced sensitivity ranks, the latency check) uses N. Default: all cores.")(f)
    return click.option("--no-latency-check", is_flag=True,
                        help="Time nothing on this machine: no check of the student against the teacher (by "
                             "default a few seconds at the real shapes choose heads or pairs and revert layers "
                             "until the student is not slower), and sensitivity ranks priced by FLOPs instead "
                             "of each layer's measured time.")(f)


def speed_options(f: Callable) -> Callable:
    """The latency check of compress and run (onnx_inher/tuning/speed.py)."""
    f = timing_options(f)
    return click.option("--min-speedup", type=float, metavar="X",
                        help="Exit 1 when the student measures below X times the teacher's speed "
                             "(teacher time / student time, at batch 1 on this machine).")(f)


trainable_option = click.option(
    "--trainable", type=click.Choice(list(TRAINABLE)), default="factors", show_default=True,
    help="Weights to train: the factors compress made, all, or all but lookup tables (no-embeddings).")


def _options(kw: dict[str, Any]) -> Options:
    policy = parse_policy(kw.pop("rank"), kw.pop("rank_ratio"), kw.pop("param_ratio"), kw.pop("energy"))
    mode, heads = kw.pop("mode"), kw.pop("heads")
    o = Options(mode=mode or "inher", heads=2 if heads is None else heads, policy=policy,
                pick_form=mode is None and heads is None, min_speedup=kw.pop("min_speedup", None),
                latency_check=False if kw.pop("no_latency_check", False) else None,
                latency_threads=kw.pop("latency_threads", None),
                rank_multiple=kw.pop("rank_multiple"), orientation=kw.pop("orientation"),
                guard=not kw.pop("no_guard"), include=list(kw.pop("include")), exclude=list(kw.pop("exclude")),
                min_params=kw.pop("min_params"), dims=_dims(kw.pop("dims")), shapes=_shapes(kw.pop("shapes", ())),
                seed=kw.pop("seed"),
                calibration=kw.pop("calibration", None), allocate=kw.pop("allocate", None) or "energy",
                class_split=not kw.pop("no_class_split", False))
    o.validate()
    return o


def _planning_options(kw: dict[str, Any]) -> Options:
    """Options of inspect and plan, which write no factors: data only serves --allocate sensitivity and the
    class split of classifier heads."""
    options = _options(kw)
    if options.calibration and options.allocate != "sensitivity" and not options.class_split:
        raise InputError("a plan uses --calibration only with --allocate sensitivity or the class split; "
                         "for whitened factors give --calibration to compress.")
    return options


def _tell(warnings: list[str], notes: list[str]) -> None:
    """Notes (what was measured and decided), then warnings (what may need the user's action), a line each."""
    for text in notes:
        click.echo(f"note: {text}")
    for text in warnings:
        click.echo(f"warning: {text}")


def _note_unused_calibration(p: Plan) -> None:
    """A plan given data that neither the sensitivity allocation nor a class split used says so (whitening,
    which always uses it, happens in compress)."""
    o = p.options
    if o.calibration and o.allocate != "sensitivity" and not any(c.dense_classes for c in p.candidates):
        p.warn(f"--calibration {o.calibration} was not used: no classifier head here gains from a "
               "class split; give the data to compress (whitened factors) or add --allocate sensitivity")


def handled(f: Callable) -> Callable:
    """Turn our errors into one line on stderr and the right exit code (no traceback)."""

    @wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return f(*args, **kwargs)
        except OnnxInherError as err:
            click.echo(f"onnx-inher: error: {err}", err=True)
            sys.exit(err.exit_code)
        except click.ClickException:  # usage errors: click prints them and exits 2
            raise
        except KeyboardInterrupt:
            click.echo("onnx-inher: interrupted", err=True)
            sys.exit(130)
        except MemoryError:
            click.echo("onnx-inher: error: out of memory; try a machine with more RAM.", err=True)
            sys.exit(1)
        except Exception as err:
            if os.environ.get("ONNX_INHER_DEBUG") == "1":
                raise
            click.echo(f"onnx-inher: internal error: {type(err).__name__}: {err} "
                       "(set ONNX_INHER_DEBUG=1 for the traceback and please report it)", err=True)
            sys.exit(1)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="onnx-inher")
def main() -> None:
    """Compress exported ONNX models with SVD-inherited factor layers (InherNet)."""


class NumberOrAuto(click.ParamType):
    """A number, or `auto` (None: the command decides): `--lr` (positive) and `run --time-limit` (seconds,
    0 allowed)."""

    def __init__(self, name: str, expected: str, allow_zero: bool) -> None:
        self.name, self.expected, self.allow_zero = name, expected, allow_zero

    def convert(self, value: Any, param: Any, ctx: Any) -> float | None:
        if value is None or isinstance(value, float):
            return value
        if str(value).strip().lower() == "auto":
            return None
        try:
            number = float(value)
        except ValueError:
            self.fail(f"expected {self.expected} or 'auto', got '{value}'", param, ctx)
        if not (number >= 0 if self.allow_zero else number > 0):
            self.fail(f"expected {self.expected} or 'auto', got '{value}'", param, ctx)
        return number


LR = NumberOrAuto("auto|LR", "a positive number", allow_zero=False)
TIME_LIMIT = NumberOrAuto("auto|SECONDS", "seconds (>= 0)", allow_zero=True)

# Shared by `distill` and `run`: one definition, one help text.
lr_option = click.option("--lr", type=LR, default="auto", show_default=True,
                         help="AdamW peak learning rate, or auto: the best of 1e-3, 3e-4, 1e-4, 3e-5 after 8 steps "
                              "each, scored on up to 128 validation samples.")
temperature_option = click.option("--temperature", type=float, default=None,
                                  help="KD temperature T (default: 4 for up to 100 classes, 1 for more).")
batch_option = click.option("--batch-size", type=int, default=None,
                            help="Global batch (split across processes; default: 64, lower when the teacher's "
                                 "outputs are large: at most 16M output values per batch).")
ctc_blank_option = click.option(
    "--ctc-blank", default="auto", show_default=True, metavar="auto|none|N",
    help="Blank class of [N,T,C] outputs read as CTC: distilled with the ctc loss and reported by CTC-greedy "
         "decoded agreement. auto: class 0 (PaddleOCR, torch) or C-1 (TensorFlow), whichever the teacher "
         "predicts on most frames if it is the most frequent class; none: never read as CTC.")


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@policy_options
@shape_option
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@data_options
@timing_options
@handled
def inspect(model: Path, as_json: bool, **kw: Any) -> None:
    """Table of candidate layers: shape, params, FLOPs, and what would be factorised or skipped and why."""
    p = api.plan(model, _planning_options(kw))
    _note_unused_calibration(p)
    if as_json:
        click.echo(p.to_json(), nl=False)
        return
    click.echo(report.plan_table(p))
    click.echo(report.totals_line(p))
    _tell(p.warnings, p.notes)


@main.command("plan")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Plan JSON to write.")
@policy_options
@shape_option
@click.option("--target", type=click.Choice(["cpu", "cuda"]),
              help="Skip layers whose factorised form is not faster on this machine (per-layer timings, cached).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan's totals and file as JSON.")
@data_options
@timing_options
@handled
def plan_cmd(model: Path, output: Path, target: str | None, as_json: bool, **kw: Any) -> None:
    """Write a JSON plan (edit ranks by hand, then `compress --plan`)."""
    options = _planning_options(kw)
    check_output(output, [model])
    p = api.plan(model, options, target=target)
    _note_unused_calibration(p)
    write_text(output, p.to_json())
    if as_json:
        click.echo(json.dumps({"plan": str(output), "totals": p.totals(), "warnings": p.warnings, "notes": p.notes},
                              indent=2))
        return
    click.echo(report.totals_line(p))
    _tell(p.warnings, p.notes)
    click.echo(f"plan written to {output}")


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Student ONNX to write.")
@policy_options
@shape_option
@click.option("--plan", "plan_path", type=click.Path(path_type=Path), help="Apply this plan instead of a policy.")
@click.option("--verify/--no-verify", default=False, help="Run teacher and student in ONNX Runtime and compare.")
@click.option("--inputs", type=click.Path(path_type=Path), help=".npz of inputs keyed by input name for --verify.")
@click.option("--max-rel-error", type=float, help="Exit 1 if the verified relative error exceeds this.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary.")
@click.option("--target", type=click.Choice(["cpu", "cuda"]),
              help="Skip layers whose factorised form is not faster on this machine (per-layer timings, cached).")
@data_options
@speed_options
@handled
def compress(model: Path, output: Path, plan_path: Path | None, verify: bool, inputs: Path | None,
             max_rel_error: float | None, as_json: bool, target: str | None, **kw: Any) -> None:
    """Rewrite the planned layers into SVD-initialised factor nodes and save the student."""
    options = _options(kw)
    options.pick_form = options.pick_form and plan_path is None  # a plan file's heads are applied as written
    check_output(output, [model, *(p for p in (plan_path, inputs) if p is not None)])
    result = api.compress(model, output, options, plan_path=plan_path, verify=verify or max_rel_error is not None,
                          inputs=inputs, bound=max_rel_error, target=target)
    if as_json:
        doc = {"plan": json.loads(result.plan.to_json())["totals"], "outputs": [str(p) for p in result.outputs],
               "calibration": result.plan.options.calibration,
               "verification": result.verification.to_dict() if result.verification else None,
               "latency_check": result.plan.latency_check, "warnings": result.warnings, "notes": result.notes}
        click.echo(json.dumps(doc, indent=2))
    else:
        click.echo(report.totals_line(result.plan))
        checked = result.plan.latency_check is not None  # its line below gives the form and the reverted layers
        _tell(result.warnings, [n for n in result.notes if not (checked and n.startswith("latency check: "))])
        click.echo(f"student written to {', '.join(map(str, result.outputs))}")
        if result.plan.latency_check:
            click.echo(report.latency_check_line(result.plan.latency_check))
        if result.verification:
            click.echo(report.verify_table(result.verification))
    if not result.speed_ok:
        click.echo(f"onnx-inher: the student is below --min-speedup {options.min_speedup:g} "
                   f"({result.plan.latency_check['speedup']:.2f}x the teacher)", err=True)
        sys.exit(1)
    if result.verification and not result.verification.ok:
        sys.exit(1)


@main.command()
@click.argument("teacher", type=click.Path(path_type=Path))
@click.argument("student", type=click.Path(path_type=Path))
@click.option("--inputs", type=click.Path(path_type=Path), help=".npz of inputs keyed by input name.")
@click.option("--max-rel-error", type=float, help="Exit 1 if the relative error exceeds this.")
@click.option("--dim", "dims", multiple=True, metavar="NAME=N", help="Value of a dynamic dim (repeatable).")
@click.option("--shape", "shapes", multiple=True, metavar="NAME=DxD...",
              help="Shape of an input's random sample, e.g. x=1x3x48x320 (repeatable, one per input).")
@click.option("--json", "as_json", is_flag=True)
@handled
def verify(teacher: Path, student: Path, inputs: Path | None, max_rel_error: float | None, dims: tuple[str, ...],
           shapes: tuple[str, ...], as_json: bool) -> None:
    """Compare teacher and student outputs in ONNX Runtime."""
    rep = api.verify_files(teacher, student, inputs=inputs, bound=max_rel_error, dims=_dims(dims),
                           shapes=_shapes(shapes))
    click.echo(json.dumps(rep.to_dict(), indent=2) if as_json else report.verify_table(rep))
    if not rep.ok:
        sys.exit(1)


@main.command("flush")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Flushed model to write.")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Run both in ONNX Runtime and compare (exit 1 above 1e-5 relative error).")
@click.option("--inputs", type=click.Path(path_type=Path), help=".npz of inputs keyed by input name for --verify.")
@click.option("--shape", "shapes", multiple=True, metavar="NAME=DxD...",
              help="Shape of an input's random sample for --verify, e.g. x=1x3x48x320 (repeatable).")
@handled
def flush_cmd(model: Path, output: Path, verify: bool, inputs: Path | None, shapes: tuple[str, ...]) -> None:
    """Zero MODEL's negligible weights (subnormal, or float32 below 1e-30) and save it: no compression, the
    same outputs, and no arithmetic with subnormal numbers, which ONNX Runtime runs many times slower."""
    result = api.flush(model, output, verify=verify, inputs=inputs, shapes=_shapes(shapes) if shapes else None)
    if not result.outputs:
        click.echo(f"{model}: no negligible weights to flush; nothing written")
        return
    click.echo(f"zeroed {result.flushed:,} negligible weights in {result.tensors} tensors; "
               f"written to {', '.join(map(str, result.outputs))}")
    if result.verification:
        click.echo(report.verify_table(result.verification))
        if not result.verification.ok:
            sys.exit(1)


def _ints(value: str, option: str) -> list[int]:
    parts = [v.strip() for v in value.split(",") if v.strip()]
    if not all(v.isdigit() and int(v) > 0 for v in parts):
        raise InputError(f"{option}: expected comma-separated positive integers (e.g. {option} 1,8,32), got '{value}'")
    return [int(v) for v in parts]


@main.command("bench")
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--provider", type=click.Choice(["auto", "cuda", "tensorrt", "cpu"]), default="auto", show_default=True,
              help="auto: CUDA when onnxruntime offers it, else CPU (with a notice).")
@click.option("--batch", "batches", default=None,
              help="Batch sizes, comma-separated (default 1; with --shape, each replaces the shapes' batch axis).")
@click.option("--seq-len", "seq_lens", default="",
              help="Values of the inputs' dynamic dims after the batch axis, comma-separated (default 128).")
@click.option("--shape", "shapes", multiple=True, metavar="NAME=DxD...",
              help="Benchmark at this input shape, e.g. x=1x3x48x320 (repeatable, one per input; "
                   "instead of --seq-len).")
@click.option("--inputs", type=click.Path(path_type=Path),
              help="Benchmark on these inputs: an .npz keyed by input name (instead of --shape/--batch/--seq-len).")
@click.option("--threads", type=int, default=0, help="Intra-op threads on CPU (default: all cores).")
@click.option("--warmup", type=int, default=10, show_default=True, help="Untimed runs per model and shape.")
@click.option("--iters", type=int, default=100, show_default=True, help="Timed runs per model and shape.")
@click.option("--cuda-graph", is_flag=True, help="Capture and replay CUDA graphs (CUDA provider only).")
@click.option("--per-layer", is_flag=True, help="Also time each factorised layer alone vs its dense original.")
@click.option("--layer-profile", is_flag=True,
              help="Also attribute each factorised layer's time inside the running teacher and student, from "
                   "ONNX Runtime's profiles (what the layer costs in the model, fusions included).")
@click.option("--flushed-baseline/--no-flushed-baseline", default=True, show_default=True,
              help="When the baseline's weights hold negligible floats (subnormal, or float32 below 1e-30), also "
                   "time it with them zeroed: the part of a student's speedup that flushing alone gives.")
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Report prefix: writes PREFIX.json, PREFIX.md and PREFIX.png.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report.")
@handled
def bench_cmd(models: tuple[Path, ...], batches: str | None, seq_lens: str, shapes: tuple[str, ...],
              inputs: Path | None, output: Path | None, as_json: bool, **kw: Any) -> None:
    """Time MODELS interleaved in ONNX Runtime; the first is the baseline, the others get speedups vs it."""
    from onnx_inher.bench import bench
    from onnx_inher.reporting.bench import terminal, write_reports

    result = bench(list(models), batches=_ints(batches, "--batch") if batches is not None else None,
                   seq_lens=_ints(seq_lens, "--seq-len") if seq_lens else [],
                   shapes=_shapes(shapes) if shapes else None, inputs=inputs, **kw)
    doc = result.to_dict()
    written = write_reports(doc, output) if output else []
    click.echo(json.dumps(doc, indent=2, sort_keys=True) if as_json else terminal(doc))
    if written and not as_json:
        click.echo(f"report written to {', '.join(map(str, written))}")


@main.command("distill")
@click.argument("student", type=click.Path(path_type=Path))
@click.option("--teacher", type=click.Path(path_type=Path), required=True, help="The uncompressed teacher ONNX.")
@click.option("--data", required=True,
              help="An .npz keyed by input names (optional 'labels'), a folder of <input>.npy, a .npy (one "
                   "input), images:FOLDER[?size=HxW&mean=..&std=..&channels=rgb|bgr|grey&layout=nchw|nhwc], "
                   "wav:FOLDER[?rate=16000&length=N], lines:FILE[?tokenizer=tokenizer.json&length=N], "
                   "hook:MODULE:FUNCTION or FILE.py:FUNCTION (yields feed dicts), one of mnist5k, digits, "
                   "fashion-mnist, fortunes (add :test for the held-out part), or random[:N] (data-free). "
                   "Read from disk batch by batch.")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Fine-tuned student to write.")
@click.option("--val-data", help="Validation data (same forms as --data) instead of a split of --data.")
@click.option("--val-fraction", type=float, default=0.1, show_default=True, help="Share of --data held for validation.")
@click.option("--epochs", type=int, default=3, show_default=True)
@click.option("--steps", type=int, help="Train this many optimizer steps instead of --epochs.")
@batch_option
@lr_option
@click.option("--weight-decay", type=float, default=0.01, show_default=True)
@click.option("--warmup", type=float, default=0.05, show_default=True, help="Linear warm-up, fraction of the steps.")
@click.option("--clip", type=float, default=1.0, show_default=True, help="Gradient-norm clipping (0 turns it off).")
@temperature_option
@click.option("--alpha", type=float, default=0.5, show_default=True, help="KD weight of the label loss.")
@click.option("--loss", "losses", multiple=True, metavar="OUTPUT=KIND[:WEIGHT]",
              help="Loss of a graph output: kd, kl, ctc (kl plus the CTC likelihood of the teacher's decoded "
                   "text), mse, cosine or pooled (cosine of mask-mean-pooled token outputs), optionally weighted "
                   "(repeatable). kd/kl/ctc read logits, or the log of a Softmax output's probabilities (never a "
                   "second softmax); the default follows the output (ctc where it reads as CTC).")
@ctc_blank_option
@click.option("--features", default="", help="Feature KD: 'auto' (factorised layers' outputs) or comma-separated "
                                             "tensor names present in teacher and student.")
@click.option("--feature-weight", type=float, default=1.0, show_default=True)
@trainable_option
@click.option("--patience", type=int, help="Stop after this many evaluations without a better validation loss.")
@click.option("--eval-every", type=int, help="Evaluate every N steps (default: once per epoch).")
@click.option("--checkpoint-dir", type=click.Path(path_type=Path), help="Default: OUTPUT's name + .checkpoints.")
@click.option("--checkpoint-every", type=int, default=200, show_default=True, help="Steps between checkpoints.")
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint of the same run, if any.")
@click.option("--metrics", type=click.Path(path_type=Path), help="metrics.jsonl path (default: next to OUTPUT).")
@click.option("--cache-dir", type=click.Path(path_type=Path),
              help="Teacher-output cache (default: ~/.cache/onnx-inher/teacher).")
@click.option("--teacher-mode", type=click.Choice(list(TEACHER_MODES)), default="cache", show_default=True,
              help="cache: run the teacher once over the data and memory-map its outputs; online: run it on "
                   "each batch (no disk, any number of --features; needed by --augment).")
@click.option("--backoff/--no-backoff", default=True, show_default=True,
              help="When a validation loss is over 1.5x the best so far, or worse than the best twice in a row, "
                   "restore the best weights, reset the optimizer and cut the learning rate to 0.3x (at most 4 "
                   "times).")
@click.option("--time-limit", type=float, default=0.0, show_default=True, metavar="SECONDS",
              help="Seconds of distillation (0: no limit; loading the data and computing the teacher's outputs "
                   "count too): the schedule is shortened to the steps that fit (timed on "
                   "the --lr auto probe or the first steps, validations counted), so that its learning rate still "
                   "decays on time; training also stops there if steps run slower. The summary says which.")
@click.option("--teacher-runtime", type=click.Choice(list(TEACHER_RUNTIMES)), default="auto", show_default=True,
              help="Where an online teacher runs. auto: ONNX Runtime, unless training is on CUDA and onnxruntime "
                   "has no CUDA provider: then torch on the GPU (fp32, checked against ORT first).")
@click.option("--augment", type=click.Choice(list(AUGMENTS)), default="none", show_default=True,
              help="Text models, new inputs each step (the teacher runs online on them). join: half the token "
                   "sequences are followed by another one of the batch; crop: half become a random part of "
                   "themselves; mix: a third joined, a third cropped.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True,
              help="auto: bf16/fp16 autocast on CUDA, fp32 on the CPU.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=0, show_default=True,
              help="torch intra-op threads on the CPU (0: one per core; 1 is often faster on a busy machine).")
@click.option("--dim", "dims", multiple=True, metavar="NAME=N", help="Dynamic dims for data-free inputs.")
@click.option("--require-improvement", is_flag=True,
              help="Exit 1 (after writing OUTPUT) when validation never improved on the starting student.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary.")
@handled
def distill_cmd(student: Path, teacher: Path, data: str, output: Path, val_data: str | None, losses: tuple[str, ...],
                features: str, dims: tuple[str, ...], checkpoint_dir: Path | None, resume: bool, metrics: Path | None,
                cache_dir: Path | None, require_improvement: bool, as_json: bool, **kw: Any) -> None:
    """Fine-tune a compressed STUDENT to match its teacher (KD), verify it in ONNX Runtime, write it.

    Under `torchrun --nproc_per_node N onnx-inher distill ...` it trains with DistributedDataParallel.
    """
    from onnx_inher.distill import DistillOptions, distill, parse_assignments

    options = DistillOptions(losses=parse_assignments(losses, "--loss"), dims=_dims(dims),
                             features=[f for f in features.split(",") if f], **kw)
    result = distill(student, teacher, data, output, options, val_data=val_data, metrics=metrics,
                     checkpoint_dir=checkpoint_dir, resume=resume, cache_dir=cache_dir)
    if result.world_size > 1 and int(os.environ.get("RANK", "0")) != 0:
        return
    doc = result.to_json()
    train = result.train
    if as_json:
        click.echo(json.dumps(doc, indent=2, default=str))
    else:
        _print_distill(result)
    if require_improvement and train.improved is False:
        raise CheckFailed("--require-improvement: validation never improved on the starting student; "
                          f"{result.output} holds its starting weights.")


def _print_distill(result: Any) -> None:
    train = result.train
    teacher = f"run per batch in {result.teacher_runtime}" if result.teacher_mode == "online" else \
        "cached" if result.teacher_cached else "run"
    if train.planned_steps:
        click.echo(f"--time-limit: the schedule was sized to fit, {train.total_steps} of {train.planned_steps} steps")
    if train.out_of_time:
        click.echo(f"stopped by --time-limit at step {train.steps} of {train.total_steps}")
    click.echo(f"{train.steps} steps of batch {result.batch_size} in {train.seconds:.1f} s on {result.train_samples} "
               f"samples "
               f"({'data-free' if result.data_free else result.data}); teacher {teacher}"
               f"; ORT vs torch {result.ort_max_rel:.1e}")
    for name, values in (("before", train.initial), ("after", train.final)):
        if values:
            click.echo(f"validation {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
    if train.lr_probe:
        tried = ", ".join(f"{lr} {loss:.4g}" for lr, loss in train.lr_probe.items())
        click.echo(f"--lr auto: {train.lr:g} (validation loss after a few steps at each rate: {tried})")
    elif train.lr_probe is not None and train.exact_start:
        click.echo(f"--lr auto: {train.lr:g}, the gentlest rate, not probed: the starting student already agrees "
                   "with the teacher at every validation position")
    elif train.lr_probe is not None:
        click.echo(f"--lr auto: no validation data to compare rates on, so {train.lr:g}")
    if train.lr_scale < 1.0:
        click.echo(f"validation got worse, so the best weights were restored and the learning rate cut to "
                   f"{train.lr_scale:.3g} x --lr (turn off with --no-backoff)")
    if train.stopped_early and train.exact_start and not train.out_of_time:
        why = report.exact_start_text({"exact_start": train.exact_start, "steps": train.steps})
        click.echo(f"stopped early: {why}")
    if train.improved is False:
        click.echo("validation never improved on the starting student: it keeps its starting weights "
                   + ("(it had nothing to gain on this validation data)" if train.exact_start else
                      "(try a lower --lr, more --steps, --features auto)"))
    click.echo(f"student written to {result.output}")


def _print_run(result: Any, as_json: bool) -> None:
    if as_json:
        click.echo(result.to_json(), nl=False)
        return
    click.echo(report.run_summary_table(result.summary, markdown=False))
    click.echo(f"report: {Path(result.folder) / 'report.md'}")


@main.command("run")
@click.argument("teacher", type=click.Path(path_type=Path))
@click.option("--data", required=True, help="Distillation data: as for `distill --data` (mnist5k, digits, "
                                            "fashion-mnist, fortunes, an .npz, a folder of .npy, images:FOLDER, "
                                            "wav:FOLDER, lines:FILE, hook:MODULE:FUNCTION, random[:N]).")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Run folder (created; a rerun skips the stages that are complete and still valid).")
@policy_options
@click.option("--epochs", type=int, help="Distillation epochs (default 3, within --time-limit auto's budget).")
@click.option("--steps", type=int, help="Distillation optimizer steps instead of --epochs.")
@batch_option
@lr_option
@temperature_option
@click.option("--alpha", type=float, default=0.5, show_default=True)
@click.option("--features", default="", help="Feature KD: 'auto' or comma-separated tensor names.")
@click.option("--loss", "losses", multiple=True, metavar="OUTPUT=KIND[:WEIGHT]",
              help="Loss of a graph output, as for `distill --loss` (kd/kl/ctc also mark it as class scores for the "
                   "evaluation, mse/cosine/pooled as features; repeatable).")
@click.option("--metric", metavar="MODULE:FUNCTION",
              help="Your metric, the report's headline: f(teacher_outputs, student_outputs, inputs) -> float or "
                   "{name: float}, dicts of arrays (samples on axis 0; inputs with 'labels' when the data has "
                   "them). MODULE is imported from the current folder, or give path/to/file.py:FUNCTION.")
@ctc_blank_option
@trainable_option
@click.option("--val-fraction", type=float, default=0.1, show_default=True)
@click.option("--compare-pair", is_flag=True,
              help="Also distil a plain pair with the same ranks, to see whether the heads pay for themselves.")
@click.option("--provider", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True)
@click.option("--batch", "batches", default="1,32", show_default=True,
              help="Bench batch sizes (the bench runs at --data's sample shape with this batch axis).")
@click.option("--seq-len", "seq_lens", default="",
              help="Bench sequence lengths (dynamic inner dims) instead of --data's sample shape.")
@click.option("--iters", type=int, default=50, show_default=True, help="Timed bench runs per model and shape.")
@click.option("--time-limit", type=TIME_LIMIT, default="auto", show_default=True,
              help="Seconds of distillation (0: no limit): the schedule is sized to fit them. auto: with no "
                   "--epochs/--steps given, the whole run aims at 30 minutes (distillation gets what compress "
                   "left, less a reserve for evaluate and bench); otherwise no limit.")
@click.option("--require-improvement", is_flag=True,
              help="Exit 1 when a distillation never improved on its SVD-initialised student (validation never "
                   "beat the starting weights, which were then kept); the run folder and report are written.")
@click.option("--json", "as_json", is_flag=True, help="Print the run's results as JSON.")
@data_options
@speed_options
@handled
def run_cmd(teacher: Path, data: str, output: Path, epochs: int | None, steps: int | None, batch_size: int | None,
            lr: float | None,
            temperature: float | None, alpha: float, features: str, trainable: str, val_fraction: float,
            compare_pair: bool, provider: str, batches: str, seq_lens: str, iters: int, as_json: bool,
            **kw: Any) -> None:
    """plan -> compress -> verify -> distill -> verify -> bench -> report, into one resumable run folder."""
    from onnx_inher.distill import DistillOptions, parse_assignments
    from onnx_inher.run import NO_CALIBRATION, RUN_ALLOCATION, RUN_BUDGET, BenchSettings, not_improved, run

    losses, metric, ctc_blank = kw.pop("losses"), kw.pop("metric"), kw.pop("ctc_blank")
    require_improvement, time_limit = kw.pop("require_improvement"), kw.pop("time_limit")
    if kw["allocate"] is None:  # issue 17: ranks measured on the run's own data unless it opts out of data
        kw["allocate"] = "energy" if kw["calibration"] == NO_CALIBRATION else RUN_ALLOCATION
    if kw["allocate"] == "sensitivity" and not kw["calibration"]:
        kw["calibration"] = data  # measure on the data the student will be distilled on
    options = _options(kw)
    budget = RUN_BUDGET if time_limit is None and epochs is None and steps is None else None
    dopts = DistillOptions(epochs=3 if epochs is None else epochs, steps=steps, batch_size=batch_size, lr=lr,
                           temperature=temperature, alpha=alpha, features=[f for f in features.split(",") if f],
                           trainable=trainable, val_fraction=val_fraction, seed=options.seed, dims=options.dims,
                           losses=parse_assignments(losses, "--loss"), time_limit=time_limit or 0.0)
    bset = BenchSettings(batches=tuple(_ints(batches, "--batch")),
                         seq_lens=tuple(_ints(seq_lens, "--seq-len")) if seq_lens else (), provider=provider,
                         iters=iters)
    result = run(teacher, data, output, options, dopts, bset, compare_pair=compare_pair, metric=metric,
                 ctc_blank=ctc_blank, time_budget=budget, log=(lambda m: click.echo(m, err=True)))
    _print_run(result, as_json)
    stuck = not_improved(result.distill)
    if require_improvement and stuck:
        raise CheckFailed(f"--require-improvement: distillation did not improve {', '.join(stuck)} on its SVD "
                          f"initialisation (see {output / 'report.md'}).")


@main.command()
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("runs/demo"), show_default=True,
              help="Run folder.")
@click.option("--quick", is_flag=True, help="A short distillation (what CI runs).")
@click.option("--json", "as_json", is_flag=True, help="Print the run's results as JSON.")
@handled
def demo(output: Path, quick: bool, as_json: bool) -> None:
    """Compress and distil the embedded MNIST CNN (real digits, nothing downloaded) and print the result."""
    from onnx_inher.demo import demo as run_demo
    from onnx_inher.demo import teacher_card

    if not as_json:
        card = teacher_card()
        click.echo(f"onnx-inher demo: the embedded CNN ({card['test_accuracy']:.1%} on {card['test_digits']} held-out "
                   "MNIST digits) -> <= 50% params with 2 InherNet heads (plain pairs if they time faster here), and a "
                   "plain pair beside it; distilled on "
                   f"{card['train_digits']} real digits.")
    _print_run(run_demo(output, quick=quick), as_json)
