"""The benchmark report as a terminal table, JSON, Markdown and a latency-vs-batch PNG."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

from onnx_inher.ir.io import write_bytes
from onnx_inher.reporting.text import human


def _mib(n: int | None) -> str:
    return f"{n / 2**20:.1f}" if n is not None else "-"


def _x(v: float | None) -> str:
    return f"{v:.2f}x" if v is not None else "-"


def _pct(v: float | None) -> str:
    return f"{v:.0%}" if v is not None else "-"


def _shape(p: dict[str, Any], given: bool = False) -> str:
    """`b=8 s=128`; with shapes given by --shape or --inputs, the inputs' shapes (`x=1x3x48x320`)."""
    if given and p.get("inputs"):
        return " ".join(f"{k}={'x'.join(map(str, v)) or 'scalar'}" for k, v in p["inputs"].items())
    return f"b={p['batch']}" + (f" s={p['seq_len']}" if p["seq_len"] else "")


def _given(doc: dict[str, Any]) -> bool:
    s = doc.get("settings", {})
    return s.get("shapes") is not None or s.get("inputs") is not None


def _ci(sp: dict[str, Any] | None, missing: str = "-") -> str:
    return f"{sp['value']:.2f}x [{sp['low']:.2f}, {sp['high']:.2f}]" if sp else missing


def reference(doc: dict[str, Any]) -> dict[str, Any] | None:
    """The model bench added as a second reference (the baseline with its negligible weights flushed)."""
    return next((m for m in doc["models"] if m.get("reference")), None)


def rows(doc: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    ref = reference(doc)
    header = ["shape", "model", "p50 ms", "p90 ms", "p99 ms", "mean ms", "items/s", "speedup [95% CI]",
              "ideal FLOPs", "eff", "ideal bytes", "eff"] + (["vs flushed baseline"] if ref else [])
    out = []
    given = _given(doc)
    for p in doc["points"]:
        for r in p["results"]:
            lat = r["latency_ms"]
            row = [_shape(p, given), r["model"], f"{lat['p50']:.3f}", f"{lat['p90']:.3f}", f"{lat['p99']:.3f}",
                   f"{lat['mean']:.3f}", f"{r['throughput_items_per_s']:.1f}", _ci(r["speedup"], "baseline"),
                   _x(r["ideal_speedup_flops"]), _pct(r["efficiency_flops"]), _x(r["ideal_speedup_bytes"]),
                   _pct(r["efficiency_bytes"])]
            out.append(row + ([_ci(r.get("speedup_vs_reference"))] if ref else []))
    return header, out


def _reference_note(doc: dict[str, Any]) -> list[str]:
    ref = reference(doc)
    if not ref:
        return []
    return [f"'{ref['label']}' is {ref['reference']}: arithmetic with them goes subnormal, which ONNX Runtime "
            "computes many times slower, and students have none. Its speedup is what flushing alone gives; "
            "'vs flushed baseline' is what the rest of a student's changes give."]


def _dense_side(doc: dict[str, Any]) -> str:
    rows = doc.get("layer_profile") or [{}]
    side = rows[0].get("dense_side", "baseline")
    return f"; teacher side: the {side}" if side != "baseline" else ""


def profile_rows(doc: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["shape", "model", "layer", "form", "rank", "teacher ms", "student ms", "speedup", "ideal FLOPs", "eff",
              "compute-bound"]
    out = []
    for r in doc.get("layer_profile", []):
        if r["node"] == "(rest)":
            out.append([_shape(r), r["model"], "(everything else)", "", "", f"{r['teacher_ms']:.3f}",
                        f"{r['student_ms']:.3f}", _x(r["teacher_ms"] / r["student_ms"] if r["student_ms"] else None),
                        "", "", ""])
            if r.get("teacher_wall_ms") and r.get("student_wall_ms"):  # how well the node times account for a run
                out.append([_shape(r), r["model"], "(all nodes / run without profiler)", "", "",
                            f"{r['teacher_total_ms']:.3f} / {r['teacher_wall_ms']:.3f}",
                            f"{r['student_total_ms']:.3f} / {r['student_wall_ms']:.3f}", "", "", "", ""])
            if r.get("ideal_speedup_layers"):  # the whole model against its layers' FLOP ideal (Amdahl)
                t_ms, s_ms = r["teacher_run_ms"], r["student_run_ms"]
                out.append([_shape(r), r["model"], f"(whole model; layers {r['factorised_share']:.0%} of the teacher)",
                            "", "", f"{t_ms:.3f}", f"{s_ms:.3f}", _x(t_ms / s_ms), _x(r["ideal_speedup_layers"]),
                            _pct(r["efficiency_layers"]), ""])
            continue
        out.append([_shape(r), r["model"], r["node"], r["form"], str(r["rank"] or "-"), f"{r['dense_ms']:.3f}",
                    f"{r['factorized_ms']:.3f}", _x(r["speedup"]), _x(r["ideal_speedup_flops"]),
                    _pct(r["efficiency_flops"]), "yes" if r["compute_bound"] else "no"])
    return header, out


def model_rows(doc: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["model", "params", "FLOPs (largest shape)", "file MiB", "session peak MiB"]
    largest = doc["points"][-1]["results"] if doc["points"] else []
    flops = {r["model"]: r["flops"] for r in largest}
    return header, [[m["label"], human(m["params"] or 0), human(flops.get(m["label"], 0)), _mib(m["file_bytes"]),
                     _mib(m["session_peak_rss_bytes"])] for m in doc["models"]]


def layer_rows(doc: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["shape", "model", "layer", "form", "x shape", "dense ms", "factor ms", "speedup [95% CI]", "ideal FLOPs",
              "eff", "ideal bytes"]
    out = []
    for r in doc["layers"]:
        ci = f"{r['speedup']:.2f}x [{r['speedup_low']:.2f}, {r['speedup_high']:.2f}]"
        out.append([_shape(r), r["model"], r["node"], r["form"], "x".join(map(str, r["x_shape"])),
                    f"{r['dense_ms']:.3f}", f"{r['factorized_ms']:.3f}", ci, _x(r["ideal_speedup_flops"]),
                    _pct(r["efficiency_flops"]), _x(r["ideal_speedup_bytes"])])
    return header, out


def _table(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, body)])


def _markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in body]
    return "\n".join(lines)


def _spinning(s: dict[str, Any]) -> str:
    if not s["spinning"]:
        return "spinning off"
    return "threads spin during each run, stopped after it" if s.get("spinning_stops_after_run") else "spinning on"


def _settings_line(doc: dict[str, Any]) -> str:
    s, m = doc["settings"], doc["machine"]
    return (f"{s['provider']} on {m['cpu']} ({m['cores']} cores), onnxruntime {m['onnxruntime']}; "
            f"{s['threads_intra_op']} intra-op thread(s), {_spinning(s)}, "
            f"IO binding {'on' if s['io_binding'] else 'off'}, CUDA graphs {'on' if s['cuda_graph'] else 'off'}; "
            f"{s['warmup']} warm-up + {s['iters']} timed runs per model and shape, interleaved")


def terminal(doc: dict[str, Any]) -> str:
    parts = [_settings_line(doc), "", _table(*rows(doc)), "", _table(*model_rows(doc))]
    parts += _reference_note(doc)
    if doc["layers"]:
        parts += ["", _table(*layer_rows(doc))]
    if doc.get("layer_profile"):
        parts += ["", f"In the running models (ONNX Runtime profile{_dense_side(doc)}):",
                  _table(*profile_rows(doc))]
    parts += [f"skipped: {s}" for s in doc["skipped"]]
    parts += [f"note: {n}" for n in doc.get("notes", [])]
    return "\n".join(parts)


def markdown(doc: dict[str, Any]) -> str:
    parts = [f"# Benchmark: baseline `{doc['baseline']}`", "", _settings_line(doc) + ".", "",
             "Speedup = baseline p50 / model p50 (95% paired bootstrap interval over rounds). Ideal = baseline / model "
             "FLOPs (dense ops) or weight bytes; eff = measured / ideal.", "", _markdown(*rows(doc)),
             *(["", *_reference_note(doc)] if reference(doc) else []), "",
             "## Models", "", _markdown(*model_rows(doc)), "", f"Session memory: {doc['memory_method']}."]
    if doc["layers"]:
        parts += ["", "## Factorised layers (dense node vs its replacement, alone, at its real input shape)", "",
                  _markdown(*layer_rows(doc))]
    if doc.get("layer_profile"):
        parts += ["", "## Factorised layers in the running models (ONNX Runtime profile)", "",
                  "Kernel time of the optimised graph's nodes that compute each layer (with the bias or activation "
                  "ONNX Runtime fused into it), median per run; teacher and student interleaved. A layer is "
                  "compute-bound when its dense form takes at least 0.05 ms per sample and does at least 8 FLOPs "
                  "per byte of its weight (a matrix-vector product, one row at batch 1, does 0.5: its time is "
                  "reading the weight). The profiler's own cost "
                  f"per node ({doc['layer_profile'][0].get('profiler_overhead_us', 0):.1f} us, measured on a chain "
                  "of no-op nodes) is taken off every node. Teacher side: "
                  + (_dense_side(doc).lstrip("; ") or "the baseline") + ".", "",
                  _markdown(*profile_rows(doc))]
    if doc["skipped"]:
        parts += ["", "Skipped: " + "; ".join(doc["skipped"]) + "."]
    if doc.get("notes"):
        parts += ["", *(f"Note: {n}." for n in doc["notes"])]
    return "\n".join(parts) + "\n"


def plot_png(doc: dict[str, Any]) -> bytes:
    """p50 latency vs batch size, one line per model (and sequence length), p10-p90 as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    seqs = sorted({p["seq_len"] or 0 for p in doc["points"]})
    styles = ["-", "--", ":", "-."]
    for j, m in enumerate(doc["models"]):
        for k, seq in enumerate(seqs):
            pts = [(p["batch"], r["latency_ms"]) for p in doc["points"] if (p["seq_len"] or 0) == seq
                   for r in p["results"] if r["model"] == m["label"]]
            if not pts:
                continue
            xs = [b for b, _ in pts]
            mid = [lat["p50"] for _, lat in pts]
            hi = [lat["p90"] - lat["p50"] for _, lat in pts]
            lo = [max(lat["p50"] - lat["min"], 0.0) for _, lat in pts]
            label = m["label"] + (" (baseline)" if j == 0 else "") + (f", seq {seq}" if seq else "")
            ax.errorbar(xs, mid, yerr=[lo, hi], marker="o", capsize=3, linestyle=styles[k % len(styles)],
                        color=f"C{j}", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    batches = sorted({p["batch"] for p in doc["points"]})
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel("batch size")
    ax.set_ylabel("latency per run, ms (p50; bars: min to p90)")
    ax.set_title(f"{doc['settings']['provider']}: latency vs batch", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def report_paths(prefix: str | os.PathLike[str]) -> dict[str, Path]:
    p = Path(prefix)
    stem = p.with_suffix("") if p.suffix in (".json", ".md", ".png") else p
    return {ext: stem.with_name(stem.name + "." + ext) for ext in ("json", "md", "png")}


def write_reports(doc: dict[str, Any], prefix: str | os.PathLike[str]) -> list[Path]:
    """`<prefix>.json`, `<prefix>.md` and `<prefix>.png`, each written atomically."""
    paths = report_paths(prefix)
    write_bytes(paths["json"], (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())
    write_bytes(paths["md"], markdown(doc).encode())
    write_bytes(paths["png"], plot_png(doc))
    return list(paths.values())
