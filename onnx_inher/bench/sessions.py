"""ONNX Runtime sessions set up for honest timing, and one timed run of a model.

CPU: fixed intra-op threads, one inter-op thread, sequential execution. Worker threads spin while a run
is in progress, as they do by ONNX Runtime's default, and when several sessions take turns each stops
spinning at the end of its run (`session.force_spinning_stop`): a pool left spinning keeps its cores busy
for some milliseconds after a run, and the next session's threads fight it (a 4 ms run was measured at
43 ms). Spinning off altogether, as before, woke the workers at every parallel node, which is not how the
model runs for its user: the PP-OCRv5 recogniser at 2 threads took 14.8 ms instead of 9.6 ms, and students,
with more and smaller nodes, paid more of it (benchmarks/RESULTS.md, issue 18).
CUDA: inputs and outputs bound on the device (IO binding, no host copies inside the timed region),
exhaustive cuDNN convolution search, optional CUDA graphs, synchronisation before reading the clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from onnx_inher.errors import InputError
from onnx_inher.ir.shapes import format_shapes
from onnx_inher.runtime import providers as runtime_providers

PROVIDERS = ("auto", "cuda", "tensorrt", "cpu")
DEVICE_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


@dataclass(frozen=True)
class Settings:
    """How every session of one benchmark is created (recorded in the report)."""

    provider: str = "auto"
    threads: int = 0
    spinning: bool = True  # workers spin while a run is in progress (ONNX Runtime's default)
    stop_spinning: bool = True  # ... and stop at its end, so that sessions taking turns do not fight
    cuda_graph: bool = False

    def provider_list(self) -> list[Any]:
        import onnxruntime as ort

        if self.provider not in PROVIDERS:
            raise InputError(f"--provider must be one of {', '.join(PROVIDERS)}, got '{self.provider}'")
        cuda_opts = {"cudnn_conv_algo_search": "EXHAUSTIVE", "enable_cuda_graph": "1" if self.cuda_graph else "0"}
        if self.provider == "tensorrt":
            if "TensorrtExecutionProvider" not in ort.get_available_providers():
                raise InputError("TensorRT was requested but this onnxruntime has no TensorRT provider; "
                                 "install onnxruntime-gpu with TensorRT, or use --provider cuda")
            return [("TensorrtExecutionProvider", {"trt_engine_cache_enable": "0"}),
                    ("CUDAExecutionProvider", cuda_opts), "CPUExecutionProvider"]
        chosen = runtime_providers(self.provider)
        return [("CUDAExecutionProvider", cuda_opts) if p == "CUDAExecutionProvider" else p for p in chosen]

    def session_options(self) -> Any:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 4  # failures raise and are reported in one line (`first_line`)
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if self.threads:
            opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        for key, value in self.session_config().items():
            opts.add_session_config_entry(key, value)
        return opts

    def session_config(self) -> dict[str, str]:
        """The session config entries that set the threads' spinning."""
        flag = "1" if self.spinning else "0"
        config = {"session.intra_op.allow_spinning": flag, "session.inter_op.allow_spinning": flag}
        if self.spinning and self.stop_spinning:
            config["session.force_spinning_stop"] = "1"
        return config


def first_line(err: BaseException) -> str:
    """The first line of an ONNX Runtime error (its messages run to many lines), or its type."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def create(model: Path | bytes, settings: Settings, label: str, options: Any = None) -> Any:
    """A session of `model`; `options` (default `settings.session_options()`) may add to them, e.g. profiling."""
    import onnxruntime as ort

    source = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(source, options or settings.session_options(), providers=settings.provider_list())
    except InputError:
        raise
    except Exception as err:  # onnxruntime raises its own exception types
        raise InputError(f"{label}: ONNX Runtime cannot load the model: {first_line(err)}") from None


@dataclass
class Runner:
    """One session fed one input set; `__call__` runs it once and returns the seconds it took."""

    session: Any
    feed: dict[str, np.ndarray]
    label: str
    _binding: Any = None
    _device_values: list[Any] = field(default_factory=list)  # keeps bound device buffers alive

    @property
    def provider(self) -> str:
        return str(self.session.get_providers()[0])

    @property
    def on_device(self) -> bool:
        return self.provider in DEVICE_PROVIDERS

    def prepare(self, device: str | None = None) -> None:
        """On a GPU provider (or any `device`), bind the inputs once on the device and the outputs to
        buffers that stay put: no host copies inside the timed region, and CUDA graphs replay fixed
        addresses. On the CPU provider runs stay plain `run` calls unless a device is given."""
        self._binding = None
        device = device or ("cuda" if self.on_device else None)
        if device is None:
            return
        import onnxruntime as ort

        binding = self.session.io_binding()
        self._device_values = []
        for name, value in self.feed.items():
            self._device_values.append(ort.OrtValue.ortvalue_from_numpy(value, device, 0))
            binding.bind_ortvalue_input(name, self._device_values[-1])
        for out in self.session.get_outputs():
            binding.bind_output(out.name, device, 0)
        self._run_bound(binding)  # allocates the outputs; then pin them
        outputs = binding.get_outputs()
        binding.clear_binding_outputs()
        for out, value in zip(self.session.get_outputs(), outputs, strict=True):
            binding.bind_ortvalue_output(out.name, value)
            self._device_values.append(value)
        self._binding = binding

    def _run_bound(self, binding: Any) -> None:
        try:
            self.session.run_with_iobinding(binding)
        except Exception as err:  # onnxruntime's own exception types
            raise InputError(f"{self.label}: ONNX Runtime failed to run it: {first_line(err)}") from None

    def __call__(self) -> float:
        if self._binding is not None:
            b = self._binding
            b.synchronize_inputs()
            start = time.perf_counter()
            self.session.run_with_iobinding(b)
            b.synchronize_outputs()
            return time.perf_counter() - start
        start = time.perf_counter()
        self.session.run(None, self.feed)
        return time.perf_counter() - start

    def check(self) -> None:
        """One untimed run that turns a shape/dtype mismatch into a clear error."""
        if self.on_device:
            return
        try:
            self.session.run(None, self.feed)
        except Exception as err:  # onnxruntime's own exception types
            shapes = format_shapes({k: np.shape(v) for k, v in self.feed.items()})
            raise InputError(f"{self.label}: ONNX Runtime failed on the benchmark inputs ({shapes}): "
                             f"{first_line(err)}; give the shapes the model runs at with --shape NAME=DxD...") \
                from None


def interleave(runners: Sequence[Callable[[], float]], warmup: int, iters: int,
               progress: Callable[[int], None] | None = None) -> list[np.ndarray]:
    """Warm up, then time rounds of A, B, A, B...: row j holds model j's seconds, one per round."""
    for _ in range(warmup):
        for run in runners:
            run()
    out = np.zeros((len(runners), iters))
    for i in range(iters):
        for j, run in enumerate(runners):
            out[j, i] = run()
        if progress:
            progress(len(runners))
    return list(out)
