"""Process-wide settings read from the environment, in one place.

Quiet mode (`ONNX_INHER_QUIET=1`, set by `--json` and by the test suite) turns off progress bars and
notices; caches live under one root (`ONNX_INHER_CACHE`, default `~/.cache/onnx-inher`). Every module
asks here instead of reading the variables itself, so the two conventions cannot drift apart.
"""

from __future__ import annotations

import os
from pathlib import Path

QUIET_VAR = "ONNX_INHER_QUIET"
CACHE_VAR = "ONNX_INHER_CACHE"
CACHE_CAP_VAR = "ONNX_INHER_CACHE_MAX_GB"
LATENCY_CHECK_VAR = "ONNX_INHER_LATENCY_CHECK"
DEFAULT_CACHE_CAP_GB = 4.0


def quiet() -> bool:
    """True when progress bars and notices should stay off."""
    return os.environ.get(QUIET_VAR) == "1"


def progress_disabled() -> bool | None:
    """tqdm's `disable`: True in quiet mode, else None (tqdm then hides itself when stderr is no terminal)."""
    return True if quiet() else None


def cache_root() -> Path:
    """Root of every onnx-inher cache (teacher outputs, latency tables, test fixtures)."""
    return Path(os.environ.get(CACHE_VAR) or Path.home() / ".cache" / "onnx-inher")


def cache_cap_bytes() -> int:
    """How much disk the teacher-output cache may hold (`ONNX_INHER_CACHE_MAX_GB`, default 4 GB).

    A user's data set with feature KD can ask for tens of GB; past the cap the teacher runs on each batch
    instead, and older entries are evicted, so a default run never fills a disk silently.
    """
    text = os.environ.get(CACHE_CAP_VAR)
    try:
        gb = float(text) if text else DEFAULT_CACHE_CAP_GB
    except ValueError:
        gb = DEFAULT_CACHE_CAP_GB
    return int(max(gb, 0.0) * 1e9)


def latency_check_default() -> bool:
    """Whether `compress` and `run` time the student against the teacher when the caller did not say
    (`ONNX_INHER_LATENCY_CHECK=0` turns the default off: the test suite sets it, so timing never decides
    what a test writes)."""
    return os.environ.get(LATENCY_CHECK_VAR, "1") != "0"


SEQUENTIAL_VAR = "ONNX_INHER_SEQUENTIAL"


def sequential_calibration() -> bool:
    """Whether calibrated factors are fitted in graph order to the student's own inputs (the default;
    `ONNX_INHER_SEQUENTIAL=0` gives each layer the teacher-whitened factors alone, for comparisons)."""
    return os.environ.get(SEQUENTIAL_VAR, "1") != "0"


DAMAGE_TABLE_VAR = "ONNX_INHER_DAMAGE_TABLE"


def damage_table_disabled() -> bool:
    """`ONNX_INHER_DAMAGE_TABLE=0` measures the sensitivity table afresh and writes no cache (tests that
    time or count the probes; a user who suspects a stale table can also delete ~/.cache/onnx-inher/damage)."""
    return os.environ.get(DAMAGE_TABLE_VAR, "1") == "0"


MALLOC_VAR = "ONNX_INHER_MALLOC"
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse instead of handing it back to the kernel; True if it took.

    Why: glibc serves blocks over its mmap threshold (at most 32 MB) with fresh mappings and unmaps them on
    free, and trims the heap as it shrinks. A training step allocates and frees the same large tensors each
    time (the PP-OCRv5 recogniser's [16, 40, 18385] outputs and their gradients are 47 MB each), so every
    step faulted in and zeroed new pages: 115,000 page faults a second, and 2.0 s a distillation step where
    1.2 s is the arithmetic (RESULTS.md, issue 17). With mmap off and trimming off the blocks are reused:
    the same weights, 1.6x faster, about 0.7 GB more peak RSS. `ONNX_INHER_MALLOC=system` leaves glibc as it
    is; on other C libraries this does nothing.
    """
    import ctypes
    import sys

    if os.environ.get(MALLOC_VAR) == "system" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
