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

from onnx_inher import api, report
from onnx_inher.errors import InputError, OnnxInherError
from onnx_inher.ir.io import check_output, write_text
from onnx_inher.plan import Options
from onnx_inher.rank import parse_policy


def _dims(values: tuple[str, ...]) -> dict[str, int]:
    out = {}
    for v in values:
        name, _, num = v.partition("=")
        if not name or not num.isdigit() or int(num) < 1:
            raise InputError(f"--dim: expected NAME=POSITIVE_INT (e.g. --dim batch=4), got '{v}'")
        out[name] = int(num)
    return out


def policy_options(f: Callable) -> Callable:
    """The rank-policy and selection options shared by inspect, plan and compress."""
    opts = [
        click.option("--rank", type=int, help="Fixed rank for every layer (clamped to each layer's full rank)."),
        click.option("--rank-ratio", type=float, help="Rank as a fraction of each layer's full rank."),
        click.option("--param-ratio", type=float,
                     help="Keep this fraction of all candidate params, spread by singular-value energy "
                          "(default 0.5)."),
        click.option("--energy", type=float, help="Smallest rank keeping this share of singular-value energy."),
        click.option("--mode", type=click.Choice(["inher", "svd"]), default="inher", show_default=True,
                     help="inher: shared down-projection + gated heads; svd: a plain factor pair."),
        click.option("--heads", type=int, default=2, show_default=True,
                     help="Up-projection heads in inher mode; 1 gives a plain pair (fastest)."),
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


def _options(kw: dict[str, Any]) -> Options:
    policy = parse_policy(kw.pop("rank"), kw.pop("rank_ratio"), kw.pop("param_ratio"), kw.pop("energy"))
    o = Options(mode=kw.pop("mode"), heads=kw.pop("heads"), policy=policy, rank_multiple=kw.pop("rank_multiple"),
                guard=not kw.pop("no_guard"), include=list(kw.pop("include")), exclude=list(kw.pop("exclude")),
                min_params=kw.pop("min_params"), dims=_dims(kw.pop("dims")), seed=kw.pop("seed"))
    o.validate()
    return o


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


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@policy_options
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@handled
def inspect(model: Path, as_json: bool, **kw: Any) -> None:
    """Table of candidate layers: shape, params, FLOPs, and what would be factorised or skipped and why."""
    p = api.plan(model, _options(kw))
    if as_json:
        click.echo(p.to_json(), nl=False)
        return
    click.echo(report.plan_table(p))
    click.echo(report.totals_line(p))
    for w in p.warnings:
        click.echo(f"warning: {w}")


@main.command("plan")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Plan JSON to write.")
@policy_options
@handled
def plan_cmd(model: Path, output: Path, **kw: Any) -> None:
    """Write a JSON plan (edit ranks by hand, then `compress --plan`)."""
    options = _options(kw)
    check_output(output, [model])
    p = api.plan(model, options)
    write_text(output, p.to_json())
    click.echo(report.totals_line(p))
    click.echo(f"plan written to {output}")


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Student ONNX to write.")
@policy_options
@click.option("--plan", "plan_path", type=click.Path(path_type=Path), help="Apply this plan instead of a policy.")
@click.option("--verify/--no-verify", default=False, help="Run teacher and student in ONNX Runtime and compare.")
@click.option("--inputs", type=click.Path(path_type=Path), help=".npz of inputs keyed by input name for --verify.")
@click.option("--max-rel-error", type=float, help="Exit 1 if the verified relative error exceeds this.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary.")
@handled
def compress(model: Path, output: Path, plan_path: Path | None, verify: bool, inputs: Path | None,
             max_rel_error: float | None, as_json: bool, **kw: Any) -> None:
    """Rewrite the planned layers into SVD-initialised factor nodes and save the student."""
    options = _options(kw)
    check_output(output, [model, *(p for p in (plan_path, inputs) if p is not None)])
    result = api.compress(model, output, options, plan_path=plan_path, verify=verify or max_rel_error is not None,
                          inputs=inputs, bound=max_rel_error)
    if as_json:
        doc = {"plan": json.loads(result.plan.to_json())["totals"], "outputs": [str(p) for p in result.outputs],
               "verification": result.verification.to_dict() if result.verification else None}
        click.echo(json.dumps(doc, indent=2))
    else:
        click.echo(report.totals_line(result.plan))
        for note in result.notes:
            click.echo(f"warning: {note}")
        click.echo(f"student written to {', '.join(map(str, result.outputs))}")
        if result.verification:
            click.echo(report.verify_table(result.verification))
    if result.verification and not result.verification.ok:
        sys.exit(1)


@main.command()
@click.argument("teacher", type=click.Path(path_type=Path))
@click.argument("student", type=click.Path(path_type=Path))
@click.option("--inputs", type=click.Path(path_type=Path), help=".npz of inputs keyed by input name.")
@click.option("--max-rel-error", type=float, help="Exit 1 if the relative error exceeds this.")
@click.option("--dim", "dims", multiple=True, metavar="NAME=N", help="Value of a dynamic dim (repeatable).")
@click.option("--json", "as_json", is_flag=True)
@handled
def verify(teacher: Path, student: Path, inputs: Path | None, max_rel_error: float | None, dims: tuple[str, ...],
           as_json: bool) -> None:
    """Compare teacher and student outputs in ONNX Runtime."""
    rep = api.verify_files(teacher, student, inputs=inputs, bound=max_rel_error, dims=_dims(dims))
    click.echo(json.dumps(rep.to_dict(), indent=2) if as_json else report.verify_table(rep))
    if not rep.ok:
        sys.exit(1)


@main.command()
def demo() -> None:
    """End-to-end demo on an embedded teacher (arrives with the `run`/`demo` issue)."""
    click.echo("onnx-inher demo: not yet available - it lands with the end-to-end `run` command. "
               "Meanwhile try: onnx-inher inspect MODEL.onnx")
