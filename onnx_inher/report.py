"""Human-readable renderings of plans and verification results (terminal tables)."""

from __future__ import annotations

from onnx_inher.passes.verify import VerifyReport
from onnx_inher.plan import Plan


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
            energy = f"{c.energy_kept:.3f}" if c.energy_kept is not None else "-"
            rows.append([c.node, c.op, shape, human(c.params_before), human(c.params_after),
                         human(c.flops_before), human(c.flops_after), energy, what])
        else:
            rows.append([c.node, c.op, shape, human(c.params_before), "=", human(c.flops_before), "=", "-",
                         f"skip: {c.reason}" if verbose_reasons else "skip"])
    header = ["node", "op", "weight", "params", "->", "FLOPs", "->", "energy", "decision"]
    return _table(rows, header)


def totals_line(plan: Plan) -> str:
    t = plan.totals()
    return (f"{t['factorized']}/{t['candidates']} layers factorised; params {human(t['params_before'])} -> "
            f"{human(t['params_after'])} ({t['param_ratio']:.1%}); FLOPs {human(t['flops_before'])} -> "
            f"{human(t['flops_after'])} ({t['flop_ratio']:.1%})")


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
