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


DRIFT_PARTS = 4
DRIFT_TOLERANCE = 0.15  # the baseline's median moving more than this across the run is a machine change, not noise
DRIFT_MIN_ROUNDS = 5  # per part: fewer rounds give medians too rough to compare


@dataclass(frozen=True)
class Drift:
    """The rounds cut into consecutive parts: the baseline's median in each (ms) and each other model's
    speedup in each. Interleaving cancels a change of machine speed that lasts a round, not one that lasts
    a part of the run: this project's 2-vCPU VM runs MiniLM 1.5x slower at 2 threads for seconds to minutes
    at a time, its elementwise ops 2-3x slower than at 1 thread (issue 18), and a ratio over both states
    describes neither."""

    baseline_ms: list[float]
    speedups: list[list[float]]

    def to_dict(self) -> dict[str, list[float] | list[list[float]]]:
        return asdict(self)


def drift(seconds: list[np.ndarray], parts: int = DRIFT_PARTS) -> Drift | None:
    """The per-part medians of an interleaved run (`seconds[0]` the baseline's rounds) when the baseline's
    median moved by more than `DRIFT_TOLERANCE` between parts; None when it held, or the run is too short."""
    rounds = len(seconds[0]) if seconds else 0
    if rounds < parts * DRIFT_MIN_ROUNDS:
        return None
    cuts = np.array_split(np.arange(rounds), parts)
    base = [float(np.median(np.asarray(seconds[0])[c])) for c in cuts]
    if max(base) <= (1 + DRIFT_TOLERANCE) * min(base):
        return None
    speedups = [[round(b / float(np.median(np.asarray(s)[c])), 3) for b, c in zip(base, cuts, strict=True)]
                for s in seconds[1:]]
    return Drift([round(b * 1e3, 4) for b in base], speedups)
