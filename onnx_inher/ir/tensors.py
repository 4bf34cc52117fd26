"""Numeric hygiene of the weights we write: no float32 weight so small that arithmetic with it goes subnormal.

x86 CPUs compute with subnormal (denormal) operands or results many times slower unless flush-to-zero is
on, and ONNX Runtime leaves it off by default. Subnormal weights are the obvious case: SVD of a teacher
with near-dead channels produces them, and one 1x1 conv of a PP-OCRv5 recogniser student took 18.9 ms
instead of ~1 ms. Weights that are normal but tiny do it too, through their products: the PP-OCRv5
detector carries 35,276 float32 weights below 1e-30 (near-dead filters), and one of its 1x1 convs took
13 ms instead of ~0.2 ms even with its subnormal weights zeroed; with every weight below 1e-30 zeroed the
whole model ran 2.0x faster, its outputs bit-identical on a real input.

So a float32 value below 1e-30 in magnitude is negligible: multiplied by any activation below 1e8 it
stays under 1e-22, below float32's resolution of any output over 1e-15, and with activations below
1e-8 the product is subnormal, the slow case. Float64 keeps its full range (only its subnormals are
negligible); fp16/bf16 are left alone, since ONNX Runtime's CPU kernels widen them to float32, where
their smallest values are ordinary numbers. Everything compress emits and every trained value written
back goes through `flush_negligible`.
"""

from __future__ import annotations

import numpy as np

# magnitudes below which a weight is zeroed, per dtype
NEGLIGIBLE_BELOW = {np.dtype(np.float32): 1e-30, np.dtype(np.float64): float(np.finfo(np.float64).tiny)}


def _small(a: np.ndarray) -> np.ndarray | None:
    below = NEGLIGIBLE_BELOW.get(a.dtype)
    if below is None:
        return None
    return (np.abs(a) < below) & (a != 0)


def negligible_count(a: np.ndarray) -> int:
    """Number of nonzero negligible values in `a` (0 for dtypes left alone)."""
    small = _small(a)
    return int(np.count_nonzero(small)) if small is not None else 0


def flush_negligible(a: np.ndarray) -> np.ndarray:
    """`a` with its negligible values set to +0 (a copy only when something changes)."""
    small = _small(a)
    if small is None or not small.any():
        return a
    out = np.array(a, copy=True)
    out[small] = 0
    return out
