"""Plots a person would rather look at than read: per-layer ranks and energy, training curves.

matplotlib runs with the Agg backend (no display on servers) and every PNG is written atomically
with fixed metadata, so the same data gives the same file.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from onnx_inher.ir.io import write_bytes
from onnx_inher.planning.plan import Plan


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    _pyplot().close(fig)
    write_bytes(path, buf.getvalue())


def _short(name: str, width: int = 28) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]


def plot_layers(plan: Plan, path: Path) -> bool:
    """Per factorised layer: rank kept vs full rank (bars) and singular-value energy kept (dots).

    Returns False (and writes nothing) when the plan factorises no layer.
    """
    rows = [c for c in plan.candidates if c.decision == "factorize"]
    if not rows:
        return False
    plt = _pyplot()
    n = len(rows)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * n + 2), 4.2))
    xs = range(n)
    ax.bar(xs, [c.full_rank for c in rows], color="#d9d9d9", label="full rank")
    ax.bar(xs, [c.rank or 0 for c in rows], color="#3b75af", label="rank kept")
    ax.set_ylabel("rank")
    ax.set_xticks(list(xs), [_short(c.node) for c in rows], rotation=70, ha="right", fontsize=7)
    ax2 = ax.twinx()
    ax2.plot(xs, [c.energy_kept if c.energy_kept is not None else float("nan") for c in rows], "o",
             color="#e4572e", markersize=4, label="energy kept")
    ax.set_ylim(0, 1.2 * max(c.full_rank for c in rows))
    ax2.set_ylim(0, 1.2)
    ax2.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax2.set_ylabel("share of singular-value energy kept")
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="upper center", ncol=3, fontsize=8,
              frameon=False)
    t = plan.totals()
    ax.set_title(f"{t['factorized']}/{t['candidates']} layers factorised, params kept {t['param_ratio']:.0%}",
                 fontsize=10)
    save_figure(fig, path)
    return True


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_training(records: list[dict[str, Any]], path: Path) -> bool:
    """Training loss per step, validation loss, and validation metrics (accuracy, agreement, cosine).

    Reads the trainer's metrics.jsonl records: ``kind`` is "train" or "val"; validation metrics are the
    numeric keys holding a '/' (``logits/acc``, ``logits/agree``...).
    """
    train = [r for r in records if r.get("kind") == "train" and "loss" in r]
    val = [r for r in records if r.get("kind") == "val"]
    if not train:
        return False
    metric_keys = sorted({k for r in val for k in r if "/" in k and isinstance(r[k], int | float)})
    panels = 1 + bool(val) + bool(metric_keys)
    plt = _pyplot()
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.4), squeeze=False)
    ax = axes[0][0]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], color="#3b75af", linewidth=1)
    ax.set(xlabel="step", ylabel="training loss", yscale="log")
    if val:
        ax = axes[0][1]
        ax.plot([r["step"] for r in val], [r.get("val_loss") for r in val], "o-", color="#e4572e", markersize=3)
        ax.set(xlabel="step", ylabel="validation loss")
    if metric_keys:
        ax = axes[0][-1]
        for key in metric_keys:
            pts = [(r["step"], r[key]) for r in val if key in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", markersize=3, label=key)
        ax.set(xlabel="step", ylabel="validation metric")
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    return True
