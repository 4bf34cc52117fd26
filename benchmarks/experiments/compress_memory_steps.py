"""Peak RSS of each step of `api.compress`, in process: where the memory of a compress goes.

    ONNX_INHER_QUIET=1 .venv/bin/python -m benchmarks.experiments.compress_memory_steps [bert_base_random]

Each wrapped step resets the kernel's high-water mark (`/proc/self/clear_refs` 5) before it runs and
prints its wall time, RSS before and after, and its own peak (VmHWM). Steps nest (`Factorize.__call__`
contains `_emit_all` and `_fresh`), so a parent's line comes after its children's. Linux only.
Unlike `profile_stages.py`, this runs `api.compress` itself, so it sees the teacher being dropped.
"""

from __future__ import annotations

import functools
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import proc_status, reset_peak_rss


def _status() -> dict[str, int]:
    """RSS now and its peak since the last reset, in MiB."""
    return {key: proc_status(key) // 2**20 for key in ("VmRSS", "VmHWM")}


def _wrap(owner: Any, name: str, label: str) -> None:
    inner: Callable[..., Any] = getattr(owner, name)

    @functools.wraps(inner)
    def step(*args: Any, **kwargs: Any) -> Any:
        reset_peak_rss()
        before, t = _status(), time.perf_counter()
        result = inner(*args, **kwargs)
        after = _status()
        print(f"| {label} | {time.perf_counter() - t:.2f} | {before['VmRSS']} | {after['VmRSS']} | "
              f"{after['VmHWM']} |", flush=True)
        return result

    setattr(owner, name, step)


def main(name: str) -> None:
    from benchmarks.common import zoo
    from onnx_inher import api
    from onnx_inher.passes import cleanup, factorize

    path = getattr(zoo, name)()
    for owner, attr, label in [
        (api, "analyze", "load + locate (analyze)"), (api, "plan", "plan"),
        (factorize.Factorize, "_emit_all", "Factorize: emit layers"),
        (factorize.Factorize, "_fresh", "Factorize: fresh student proto"),
        (factorize.Factorize, "__call__", "Factorize (all)"), (cleanup.Cleanup, "__call__", "Cleanup"),
        (api, "release_memory", "release_memory (after drops)"), (api, "save_model", "save"),
        (api, "check_written", "check written file"),
    ]:
        _wrap(owner, attr, label)
    reset_peak_rss()
    print(f"{path.name}: start RSS {_status()['VmRSS']} MiB")
    print("| step | wall s | RSS before MiB | RSS after MiB | peak MiB |\n|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="onnx-inher-mem-") as tmp:
        api.compress(path, Path(tmp) / "student.onnx")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bert_base_random")
