"""The whole CUDA benchmark path in one go, on whatever Python and onnxruntime-gpu a GPU machine has.

Run through `bash benchmarks/gpu/gpu_check.sh` (it finds a Python and runs this module from the repository
root: `python -m benchmarks.gpu.gpu_check`). Installs
nothing and needs no torch: teachers are ONNX files already on disk (the MNIST CNN in
onnx_inher/data if present, and a batch-dynamic copy of the onnx wheel's light ResNet-50 with
seeded random weights in place of its placeholders); students are made with our
own `compress`. Without a CUDA provider it says so and exits 0.
Results (JSON, Markdown, PNG, a text summary) go to --out ($OUT when the script sets it).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.abc
import importlib.util
import shutil
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

from benchmarks.common import MNIST_TEACHER, ROOT  # the standard library only: safe before the checks below

LINES: list[str] = []


def say(text: str = "") -> None:
    print(text, flush=True)
    LINES.append(text)


class _PassesFinder(importlib.abc.MetaPathFinder):
    """`onnx_inher.passes` lives in ./passes (mapped by pyproject when installed); map it here too."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != "onnx_inher.passes":
            return None
        base = ROOT / "passes"
        return importlib.util.spec_from_file_location(name, base / "__init__.py",
                                                      submodule_search_locations=[str(base)])


def _shim_optional() -> list[str]:
    """Stand-ins for pure-convenience dependencies a bare GPU image may lack (no progress bars, no
    BLAS thread limit); everything measured is unaffected."""
    shimmed = []
    if importlib.util.find_spec("tqdm") is None:
        class _Bar:
            def __init__(self, iterable: Any = None, **_: Any) -> None:
                self.iterable = iterable

            def __iter__(self) -> Any:
                return iter(self.iterable or [])

            def __enter__(self) -> _Bar:
                return self

            def __exit__(self, *_: Any) -> None:
                return None

            def update(self, *_: Any) -> None:
                return None

        sys.modules["tqdm"] = types.SimpleNamespace(tqdm=_Bar)  # type: ignore[assignment]
        shimmed.append("tqdm")
    if importlib.util.find_spec("threadpoolctl") is None:
        class _Controller:
            def limit(self, **_: Any) -> contextlib.nullcontext:
                return contextlib.nullcontext()

        sys.modules["threadpoolctl"] = types.SimpleNamespace(ThreadpoolController=_Controller)  # type: ignore[assignment]
        shimmed.append("threadpoolctl")
    return shimmed


def environment(provider: str) -> dict[str, Any] | None:
    """What this machine offers; None (after saying why) when the CUDA path cannot run."""
    say(f"python {sys.version.split()[0]} at {sys.executable}")
    if sys.version_info < (3, 10):  # noqa: UP036 - this script runs on interpreters the project does not manage
        say("gpu_check: no CUDA benchmark: onnx-inher needs Python >= 3.10; point PYTHON= at a newer interpreter")
        return None
    missing = [m for m in ("numpy", "onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        say(f"gpu_check: no CUDA benchmark: this Python lacks {', '.join(missing)} (install-free by design; "
            "point PYTHON= at an interpreter with onnxruntime-gpu, onnx and numpy)")
        return None
    import onnxruntime as ort

    providers = ort.get_available_providers()
    say(f"onnxruntime {ort.__version__}, providers {providers}")
    if shutil.which("nvidia-smi"):
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
        say(f"GPU: {gpu or 'nvidia-smi gave nothing'}")
    if provider == "cuda" and "CUDAExecutionProvider" not in providers:
        say("gpu_check: no CUDA provider in this onnxruntime; nothing measured "
            "(needs onnxruntime-gpu with CUDA on a machine with an NVIDIA GPU).")
        return None
    return {"providers": providers}


def light_copy(src: Path, dst: Path) -> Path:
    """A benchmarkable copy of an onnx "light" model (real architecture, placeholder weights).

    * Weights: the placeholders are `ConstantOfShape` fills (rank-1 matrices, which a rank policy
      would cut to nothing); they become seeded random initializers, so SVD ranks are realistic.
    * Batch: input/output dim 0 becomes 'N', and flatten-style Reshapes to [1, k] become [-1, k].
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from onnx_inher.ir.graph import Constant, GraphIndex

    model = onnx.load(str(src))
    index = GraphIndex.build(model.graph)
    rng = np.random.default_rng(0)
    kept = []
    for node in model.graph.node:
        if node.op_type == "ConstantOfShape":
            shape = index.constant(node.input[0])
            dims = [int(d) for d in shape.value] if isinstance(shape, Constant) else []
            if len(dims) >= 2:  # a weight: He-style scale over its fan-in
                fan_in = int(np.prod(dims[1:]))
                value = (rng.standard_normal(dims) * np.sqrt(2.0 / fan_in)).astype(np.float32)
            else:
                value = np.zeros(dims, np.float32)
            model.graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
            if model.ir_version < 4:  # IR 3: every initializer is also a graph input
                model.graph.input.append(onnx.helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT,
                                                                            dims))
        else:
            kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    inits = {t.name: t for t in model.graph.initializer}
    for vi in [*model.graph.input, *model.graph.output]:
        if vi.name not in inits and vi.type.tensor_type.shape.dim:
            d = vi.type.tensor_type.shape.dim[0]
            d.Clear()
            d.dim_param = "N"
    del model.graph.value_info[:]
    for node in model.graph.node:
        if node.op_type == "Reshape" and node.input[0] not in inits and node.input[1] in inits:
            shape = numpy_helper.to_array(inits[node.input[1]])
            if shape.size == 2 and shape[0] == 1:
                name = f"{node.name or node.output[0]}/dynamic_batch_shape"
                model.graph.initializer.append(numpy_helper.from_array(np.array([-1, shape[1]], np.int64), name))
                if model.ir_version < 4:
                    model.graph.input.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.INT64, [2]))
                node.input[1] = name
    onnx.save(model, str(dst))
    return dst


def teachers(tmp: Path, quick: bool) -> list[tuple[str, Path, list[int]]]:
    import onnx

    out = []
    mnist = MNIST_TEACHER
    if mnist.is_file():
        out.append(("mnist_cnn", mnist, [1, 256]))
    light = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
    for name, batches in (("resnet50", [1, 32]),):
        src = light / f"light_{name}.onnx"
        if src.is_file():
            out.append((name, light_copy(src, tmp / f"{name}.onnx"), batches[:1] if quick else batches))
        else:
            say(f"gpu_check: {src} not found (this onnx wheel has no light models); skipped {name}")
    if not mnist.is_file():
        say(f"gpu_check: {mnist} not found; skipped the MNIST CNN")
    return out


def students(name: str, teacher: Path, tmp: Path) -> list[Path]:
    from onnx_inher import api
    from onnx_inher.planning.plan import Options
    from onnx_inher.planning.rank import parse_policy

    made = []
    for mode, heads in (("svd", 1), ("inher", 2)):
        out = tmp / f"{name}_{mode}.onnx"
        api.compress(teacher, out, Options(mode=mode, heads=heads, policy=parse_policy(param_ratio=0.5)))
        made.append(out)
    return made


def first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def run(out: Path, provider: str, iters: int, warmup: int, budget_s: float, quick: bool) -> None:
    from onnx_inher.bench import bench
    from onnx_inher.reporting.bench import terminal, write_reports

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for name, teacher, batches in teachers(tmp, quick):
            if time.perf_counter() - start > budget_s:
                say(f"gpu_check: time budget of {budget_s:.0f} s spent; skipped {name}")
                continue
            t0 = time.perf_counter()
            try:
                models = [teacher, *students(name, teacher, tmp)]
            except Exception as err:  # report and go on with the next teacher
                say(f"gpu_check: compressing {name} failed: {first_line(err)}")
                continue
            runs = [("", False, batches, False)]
            if name == "resnet50":
                runs.append(("_cudagraph", True, batches[:1], False))
            if name == "mnist_cnn":
                runs[0] = ("", False, batches, True)  # per-layer: 3 factorised layers, cheap
            for suffix, graph, bs, per_layer in runs:
                try:
                    result = bench(models, provider=provider, batches=bs, iters=iters, warmup=warmup,
                                   cuda_graph=graph, per_layer=per_layer)
                except Exception as err:  # report and go on: one failing configuration must not hide the rest
                    say(f"gpu_check: {name}{suffix} failed: {first_line(err)}")
                    continue
                doc = result.to_dict()
                try:
                    written = [p.name for p in write_reports(doc, out / f"{name}{suffix}")]
                except ImportError:  # matplotlib missing: the JSON and Markdown are written before the PNG
                    written = [f"{name}{suffix}.json", f"{name}{suffix}.md", "(no PNG: matplotlib missing)"]
                say(f"\n== {name}{suffix} (CUDA graphs {'on' if graph else 'off'}) ==")
                say(terminal(doc))
                say(f"written: {', '.join(written)}")
            say(f"{name}: {time.perf_counter() - t0:.0f} s")
    say(f"\ngpu_check: done in {time.perf_counter() - start:.0f} s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "gpu_out")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--budget", type=float, default=150.0, help="Seconds after which no new model is started.")
    ap.add_argument("--quick", action="store_true", help="Batch 1 only (smoke test).")
    ap.add_argument("--provider", choices=["cuda", "cpu"], default="cuda",
                    help="cpu only rehearses the path on a machine without a GPU (CUDA graphs then fail, as reported).")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        env = environment(args.provider)
        if env is not None:
            shimmed = _shim_optional()
            if shimmed:
                say(f"gpu_check: not installed here, replaced by no-op stand-ins: {', '.join(shimmed)}")
            sys.meta_path.insert(0, _PassesFinder())
            run(args.out, args.provider, args.iters, args.warmup, args.budget, args.quick)
    finally:
        (args.out / "gpu_check.txt").write_text("\n".join(LINES) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
