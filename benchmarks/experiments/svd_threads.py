"""Cost of the SVD pin on one very large layer (VGG-19's fc6, 4096 x 25088), 1 thread vs 2 unpinned.

    .venv/bin/python -m benchmarks.experiments.svd_threads [OUT IN]

`compress` now computes `singular_values` for the plan and `full_svd` again in Factorize, both with
BLAS pinned to one thread; before, one `full_svd` ran with the default threads. The "2 threads" row
calls the same code with the pin lifted (threadpoolctl's limit replaced by a no-op).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable

import numpy as np

from onnx_inher.planning import svd


def timed(fn: Callable[[np.ndarray], object], m: np.ndarray) -> float:
    t = time.perf_counter()
    fn(m)
    return time.perf_counter() - t


def main(out: int, inp: int) -> None:
    m = np.random.default_rng(0).standard_normal((1, out, inp)).astype(np.float32)
    pinned_values, pinned_svd = timed(svd.singular_values, m), timed(svd.full_svd, m)
    svd._one_blas_thread = contextlib.nullcontext  # lift the pin: default BLAS threads
    free_svd = timed(svd.full_svd, m)
    print(f"{out}x{inp}: now (1 thread) singular_values {pinned_values:.1f} s + full_svd {pinned_svd:.1f} s "
          f"= {pinned_values + pinned_svd:.1f} s; before (one full_svd, default threads) {free_svd:.1f} s")


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:3]] or [4096, 25088]
    main(*args)
