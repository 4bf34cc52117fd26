"""Stage breakdown of `compress` through the Python API: wall time, RSS and peak RSS per stage.

    .venv/bin/python -m benchmarks.experiments.profile_stages [bert_base_random|MODEL.onnx] [--mode inher|svd]
        [--cprofile OUT.prof] [--tracemalloc] [--sub]

Stages mirror `onnx_inher.api.compress`: load (ir.io.load_model), locate (passes.locate: shape
inference, constant folding), plan (build_plan, which computes the full SVDs), rewrite (Factorize,
Cleanup, checker) and save (ir.io.save_model). Each stage's peak is the kernel's exact high-water
mark of the stage (VmHWM, reset through /proc/self/clear_refs), not a sample. `--sub` adds rows for
inner calls (checker, shape inference, Factorize, Cleanup, _write_model). Set OPENBLAS_NUM_THREADS
to compare BLAS thread counts. `-m` puts the current folder first on sys.path: to profile another
checkout's `onnx_inher`, run from that checkout's root with PYTHONPATH pointing at this one (whose
`benchmarks` package is found there as long as the other checkout has no `benchmarks/__init__.py`).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import os
import pstats
import tempfile
import time
import tracemalloc
from pathlib import Path

from benchmarks.common import proc_status, reset_peak_rss

MiB = 2**20


class Peaks:
    """Exact per-stage peak RSS: the kernel's high-water mark (VmHWM), reset on entering each stage by
    writing 5 to /proc/self/clear_refs (Linux >= 4.0). Nested stages pass their peak to the enclosing ones."""

    def __init__(self) -> None:
        self.stack: list[int] = []

    @staticmethod
    def rss() -> int:
        return proc_status("VmRSS")

    def enter(self) -> int:
        hwm = proc_status("VmHWM")
        self.stack = [max(p, hwm) for p in self.stack]
        reset_peak_rss()
        self.stack.append(0)
        return self.rss()

    def exit(self) -> int:
        peak = max(self.stack.pop(), proc_status("VmHWM"))
        self.stack = [max(p, peak) for p in self.stack]
        return peak


ROWS: list[tuple[str, float, float, float, float]] = []


@contextlib.contextmanager
def stage(name: str, sampler: Peaks, indent: int = 0):
    before = sampler.enter()
    t0 = time.perf_counter()
    try:
        yield
    finally:
        dt = time.perf_counter() - t0
        after = sampler.rss()
        peak = sampler.exit()
        ROWS.append(("  " * indent + name, dt, before / MiB, after / MiB, peak / MiB))


def wrap(module: object, attr: str, label: str, sampler: Peaks) -> None:
    """Time every call of module.attr as a sub-stage."""
    fn = getattr(module, attr)

    @functools.wraps(fn)
    def timed(*a, **k):
        with stage(label, sampler, indent=1):
            return fn(*a, **k)

    setattr(module, attr, timed)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="bert_base_random")
    ap.add_argument("--mode", default="inher")
    ap.add_argument("--cprofile", type=Path)
    ap.add_argument("--tracemalloc", action="store_true")
    ap.add_argument("--sub", action="store_true")
    ns = ap.parse_args()

    from benchmarks.common import zoo

    path = getattr(zoo, ns.model)() if not ns.model.endswith(".onnx") else Path(ns.model)

    import onnx

    import onnx_inher.ir.io as io
    import onnx_inher.passes.locate as locate_mod
    from onnx_inher import api
    from onnx_inher.ir.io import load_model, save_model
    from onnx_inher.planning.plan import Options, Spectra, build_plan

    sampler = Peaks()
    if ns.sub:
        wrap(io, "_check_structure", "load: _check_structure (incl. onnx.checker)", sampler)
        wrap(onnx.checker, "check_model", "onnx.checker.check_model", sampler)
        wrap(onnx.shape_inference, "infer_shapes", "onnx.shape_inference.infer_shapes", sampler)
        wrap(locate_mod, "infer", "locate: shapes.infer", sampler)
        from onnx_inher.passes.cleanup import Cleanup
        from onnx_inher.passes.factorize import Factorize
        wrap(Factorize, "__call__", "rewrite: Factorize", sampler)
        wrap(Cleanup, "__call__", "rewrite: Cleanup", sampler)
        wrap(locate_mod, "_mark_shared", "locate: _mark_shared", sampler)
        wrap(io, "_write_model", "save: _write_model", sampler)
        wrap(onnx.external_data_helper, "load_external_data_for_model", "load: external data", sampler)
    prof = cProfile.Profile() if ns.cprofile else None
    if ns.tracemalloc:
        tracemalloc.start(10)
    if prof:
        prof.enable()
    base = sampler.rss()
    t_all = time.perf_counter()
    options = Options(mode=ns.mode)
    with tempfile.TemporaryDirectory(prefix="onnx-inher-prof-") as tmp:
        out = Path(tmp) / "student.onnx"
        with stage("load (load_model)", sampler):
            loaded = load_model(path)
        with stage("locate (shape inference, folding)", sampler):
            found = api.locate(loaded.model, options.dims)
            views = {f.node: f for f in found if isinstance(f, api.LayerView)}
        a = api.Analysis(loaded, found, views)
        spectra = Spectra()
        with stage("plan (full SVDs + rank search)", sampler):
            the_plan = build_plan(str(path), loaded.sha256, api.default_opset(loaded.model), found, options, spectra)
        with stage("rewrite (factorize, cleanup, checker)", sampler):
            model = api.rewrite(a, the_plan, spectra)
        with stage("save (save_model)", sampler):
            save_model(model, out, external_data=loaded.external_data, inputs=[loaded.path])
        total = time.perf_counter() - t_all
    if prof:
        prof.disable()
        prof.dump_stats(ns.cprofile)
    print(f"model {path} ({ns.mode}); start RSS {base / MiB:.0f} MiB; ru_maxrss "
          f"{__import__('resource').getrusage(0).ru_maxrss / 1024:.0f} MiB; total {total:.1f} s; "
          f"load avg {os.getloadavg()[0]:.2f}")
    print("| stage | wall s | RSS before MiB | RSS after MiB | peak RSS MiB |")
    print("|---|---:|---:|---:|---:|")
    for name, dt, b, af, pk in ROWS:
        print(f"| {name} | {dt:.2f} | {b:.0f} | {af:.0f} | {pk:.0f} |")
    if ns.tracemalloc:
        snap = tracemalloc.take_snapshot()
        cur, peak = tracemalloc.get_traced_memory()
        print(f"\ntracemalloc: current {cur / MiB:.0f} MiB, peak {peak / MiB:.0f} MiB (numpy + Python objects only)")
        for s in snap.statistics("lineno")[:15]:
            print(f"  {s.size / MiB:8.1f} MiB  {s.traceback}")
    if prof:
        pstats.Stats(prof).sort_stats("cumulative").print_stats(35)


if __name__ == "__main__":
    main()
