"""Truncated SVD in float32 with a fixed sign convention (pure numpy).

The sign fix (largest-magnitude entry of each left singular vector positive) makes factors
reproducible across LAPACK builds, which keeps compressed files byte-identical run to run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Factors:
    """Per-group factors: `up[g] @ down[g] ~= M[g]`; up = U_r S_r `[g, out, r]`, down = V_r^T `[g, r, in]`."""

    up: np.ndarray
    down: np.ndarray


def singular_values(matrices: np.ndarray) -> np.ndarray:
    """`[g, min(out, in)]` singular values, descending."""
    return np.linalg.svd(matrices.astype(np.float32, copy=False), compute_uv=False)


def full_svd(matrices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    u, s, vt = np.linalg.svd(matrices.astype(np.float32, copy=False), full_matrices=False)
    flip = np.sign(np.take_along_axis(u, np.abs(u).argmax(axis=1, keepdims=True), axis=1))
    flip[flip == 0] = 1
    return u * flip, s, vt * np.swapaxes(flip, 1, 2)


def truncate(svd: tuple[np.ndarray, np.ndarray, np.ndarray], rank: int) -> Factors:
    u, s, vt = svd
    return Factors(up=u[:, :, :rank] * s[:, None, :rank], down=vt[:, :rank, :])


def energy_kept(s: np.ndarray, rank: int) -> float:
    """Share of squared singular values (Frobenius energy) the rank keeps, over all groups."""
    total = float(np.sum(s.astype(np.float64) ** 2))
    return 1.0 if total == 0 else float(np.sum(s[:, :rank].astype(np.float64) ** 2) / total)


def rank_for_energy(s: np.ndarray, energy: float) -> int:
    """Smallest rank keeping at least `energy` of the Frobenius energy."""
    power = np.sum(s.astype(np.float64) ** 2, axis=0)
    total = power.sum()
    if total == 0:
        return 1
    cum = np.cumsum(power) / total
    return int(min(np.searchsorted(cum, energy - 1e-12) + 1, s.shape[1]))
