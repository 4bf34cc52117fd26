"""Latency statistics: percentiles and a paired bootstrap interval for a speedup ratio (pure numpy).

Models are timed interleaved (round i runs every model once), so round i of the baseline and
round i of a student saw the same machine state. The bootstrap therefore resamples *rounds*, not
each model's samples independently: noise shared by a round cancels in the ratio, as it did when
it was measured.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

BOOTSTRAP_RESAMPLES = 2000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Summary:
    """Milliseconds per run, and items per second at the mean."""

    p50: float
    p90: float
    p99: float
    mean: float
    min: float
    throughput: float
    runs: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def summarize(seconds: np.ndarray, items: int) -> Summary:
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    if ms.size == 0:
        raise ValueError("no timings to summarise")
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    mean = float(ms.mean())
    return Summary(float(p50), float(p90), float(p99), mean, float(ms.min()), items / (mean / 1e3), int(ms.size))


@dataclass(frozen=True)
class Ratio:
    """`baseline p50 / model p50` (> 1: the model is faster) with a bootstrap interval."""

    value: float
    low: float
    high: float
    confidence: float = CONFIDENCE

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def speedup(baseline: np.ndarray, model: np.ndarray, seed: int = 0,
            resamples: int = BOOTSTRAP_RESAMPLES) -> Ratio:
    """Ratio of medians with a paired percentile-bootstrap interval over rounds (seeded: reproducible)."""
    a = np.asarray(baseline, dtype=np.float64)
    b = np.asarray(model, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError("paired timings must be two 1-D arrays of the same, non-zero length")
    point = float(np.median(a) / np.median(b))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.size, size=(resamples, a.size))
    ratios = np.median(a[idx], axis=1) / np.median(b[idx], axis=1)
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(ratios, [tail, 100 - tail])
    return Ratio(point, float(low), float(high))
