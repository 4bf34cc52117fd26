"""What-if experiment (not a patch): the peak RSS of `compress` if memory were released as suggested in
benchmarks/RESULTS.md. It repeats `onnx_inher.api.compress` step by step, reaching into internals:

* load: hash the file in chunks and run the checker on the path *before* the Python parse, so the
  checker's C++ copies (file buffer + parsed model) never coexist with the Python ModelProto;
* after Factorize + Cleanup: drop the cached full SVDs (`Spectra._svd` and the process-wide
  `plan._CACHE`) and the folded weights
  (`LayerView.weight`), copy the student into a fresh ModelProto and drop the teacher's (upb frees a
  message's memory only with its arena), then `malloc_trim(0)` so glibc returns the freed heap;
* check the written student by path (`check_model(path, full_check=True)`) instead of the in-memory
  model.

It prints the per-step RSS and exact peak (VmHWM reset through /proc/self/clear_refs) and the student's
sha256, which must equal what `onnx-inher compress` writes with the same BLAS thread count.

    OPENBLAS_NUM_THREADS=1 .venv/bin/python -m benchmarks.experiments.lowmem_whatif [bert_base_random] [inher|svd]
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import sys
import tempfile
import time
from pathlib import Path

import onnx
from onnx import ModelProto

from benchmarks.common import proc_status, reset_peak_rss, zoo
from onnx_inher import api
from onnx_inher.ir import io
from onnx_inher.passes.cleanup import Cleanup
from onnx_inher.passes.factorize import Factorize
from onnx_inher.planning.plan import Options, Spectra, build_plan

ROWS: list[tuple[str, float, float, float]] = []


def mark(name: str, t0: float) -> float:
    ROWS.append((name, time.perf_counter() - t0, proc_status("VmRSS") / 2**20, proc_status("VmHWM") / 2**20))
    reset_peak_rss()
    return time.perf_counter()


def trim() -> None:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "bert_base_random"
    mode = sys.argv[2] if len(sys.argv) > 2 else "inher"
    path = getattr(zoo, name)()
    reset_peak_rss()
    t = time.perf_counter()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    onnx.checker.check_model(str(path))
    t = mark("load: chunked sha256 + checker(path), before the Python parse", t)
    model = ModelProto()
    model.ParseFromString(path.read_bytes())
    external = any(onnx.external_data_helper.uses_external_data(x) for x in io.iter_tensors(model.graph))
    if external:
        onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
    loaded = io.LoadedModel(model, path, external, digest.hexdigest())
    del model
    t = mark("load: Python parse (+ external data)", t)
    found = api.locate(loaded.model, {})
    views = {f.node: f for f in found if isinstance(f, api.LayerView)}
    t = mark("locate", t)
    spectra = Spectra()
    plan = build_plan(str(path), loaded.sha256, api.default_opset(loaded.model), found, Options(mode=mode), spectra)
    t = mark("plan (full SVDs cached for every layer)", t)
    student, _ = Factorize(plan, views, spectra, inplace=True)(loaded.model)
    student, _ = Cleanup(inplace=True)(student)
    t = mark("Factorize + Cleanup", t)
    plan_module = sys.modules["onnx_inher.planning.plan"]
    if hasattr(plan_module, "_CACHE"):  # process-wide SVD cache
        plan_module._SVD_CACHE.clear()
    for v in views.values():
        v.weight = None  # type: ignore[assignment]
    fresh = ModelProto()
    fresh.CopyFrom(student)
    del student, found, views
    loaded.model = None  # type: ignore[assignment]
    trim()
    t = mark("drop SVDs, folded weights and the teacher's proto; malloc_trim", t)
    with tempfile.TemporaryDirectory(prefix="onnx-inher-whatif-") as tmp:
        out = Path(tmp) / f"{name}-{mode}.onnx"  # external data embeds the name: same as compress_bench
        written = io.save_model(fresh, out, external_data=external, inputs=[path])
        t = mark("save_model (as today)", t)
        del fresh
        trim()
        onnx.checker.check_model(str(out), full_check=True)
        t = mark("checker(path, full_check) on the written student", t)
        sha = hashlib.sha256()
        for p in written:
            sha.update(p.read_bytes())
    size = sum(p.stat().st_size for p in [path, *path.parent.glob(path.name + ".*")]) / 2**20
    peak = max(r[3] for r in ROWS)
    print(f"{name} {mode}: file {size:.0f} MiB, peak {peak:.0f} MiB = {peak / size:.2f}x file; "
          f"student sha256 {sha.hexdigest()}")
    print("| step | wall s | RSS after MiB | peak RSS MiB |\n|---|---:|---:|---:|")
    for step, dt, rss, hwm in ROWS:
        print(f"| {step} | {dt:.2f} | {rss:.0f} | {hwm:.0f} |")


if __name__ == "__main__":
    main()
