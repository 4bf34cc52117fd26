"""Rank policies, parsed in one place (pure numpy, no onnx).

A policy turns a layer's singular values into a rank: a fixed rank, a fraction of full rank,
an energy threshold, or a global parameter budget (`param_ratio`, solved in plan.py by searching
one energy threshold shared by all layers, so the budget is spread by singular-value energy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from onnx_inher.errors import InputError
from onnx_inher.planning.svd import rank_for_energy

KINDS = ("rank", "rank_ratio", "param_ratio", "energy")


@dataclass(frozen=True)
class RankPolicy:
    kind: str
    value: float

    def describe(self) -> str:
        return f"--{self.kind.replace('_', '-')} {self.value:g}"


def parse_policy(
    rank: int | None = None,
    rank_ratio: float | None = None,
    param_ratio: float | None = None,
    energy: float | None = None,
) -> RankPolicy:
    """Exactly one policy; default keeps half of the candidate parameters."""
    given = {k: v for k, v in zip(KINDS, (rank, rank_ratio, param_ratio, energy), strict=True) if v is not None}
    if len(given) > 1:
        raise InputError(f"choose one rank policy, got {', '.join('--' + k.replace('_', '-') for k in given)}")
    if not given:
        return RankPolicy("param_ratio", 0.5)
    kind, value = next(iter(given.items()))
    if kind == "rank":
        if int(value) != value or value < 1:
            raise InputError(f"--rank must be a positive integer, got {value}")
    elif not 0 < value <= 1:
        raise InputError(f"--{kind.replace('_', '-')} must be in (0, 1], got {value}")
    return RankPolicy(kind, float(value))


def raw_rank(policy: RankPolicy, s: np.ndarray, full: int) -> int:
    """Rank before rounding, from one layer's singular values `[g, k]` (param_ratio: `value` is the energy)."""
    if policy.kind == "rank":
        return min(int(policy.value), full)
    if policy.kind == "rank_ratio":
        return max(1, math.ceil(policy.value * full))
    return max(1, rank_for_energy(s, policy.value))


def round_rank(rank: int, full: int, multiple: int) -> tuple[int, int]:
    """(rounded up, rounded down) to `multiple`, never above full rank nor below 1."""
    if multiple <= 1:
        return rank, rank
    up = min(full, math.ceil(rank / multiple) * multiple)
    down = max(1, min(full, (rank // multiple) * multiple) or up)
    return up, down
