"""The online teacher run in torch (through our bridge) on the training device, for CUDA without ORT-CUDA.

An online teacher (`--teacher-mode online`, `--augment`) runs once per training step. With the CPU-only
`onnxruntime` wheel and torch on a GPU, ORT puts that forward pass on the host CPU, every step, beside a
student that trains on the GPU. The bridge already executes any graph we train, so the teacher can run
beside the student on the same device, in fp32 with autocast off and TF32 off (its outputs are targets:
they must be the teacher's, not a cheaper approximation of it).

It is checked once against ORT on the CPU before training: a bridge bug must not silently change the targets.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from onnx_inher.bridge import to_torch
from onnx_inher.datasets import Dataset
from onnx_inher.distill.options import TEACHER_RUNTIMES
from onnx_inher.distill.teacher_cache import OnlineTeacher, fetching_teacher
from onnx_inher.errors import CheckFailed, InputError
from onnx_inher.runtime import providers

CHECK_ROWS = 4


class TorchTeacher:
    """Callable like `OnlineTeacher`: numpy feeds in, the fetched tensors out, left on the device (the
    trainer reads them there; MiniLM's features at batch 256 are ~150 MB, a round trip through the host a step)."""

    def __init__(self, teacher: Path, data: Dataset, fetch: Sequence[str], device: torch.device) -> None:
        self.fetch = list(fetch)
        self.device = device
        module, _ = to_torch(fetching_teacher(teacher, data, self.fetch), trainable="none")
        self.module = module.to(device).eval()

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
                inputs = {n: torch.from_numpy(np.ascontiguousarray(v)).to(self.device) for n, v in feeds.items()}
                out = self.module.run(inputs, self.fetch)
            return {n: out[n].detach() for n in self.fetch}
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def choose_runtime(choice: str, device: torch.device) -> str:
    """auto: ORT where it can run on the training device (any CPU; CUDA with onnxruntime-gpu), else torch."""
    if choice not in TEACHER_RUNTIMES:
        raise InputError(f"--teacher-runtime must be one of {', '.join(TEACHER_RUNTIMES)}, got '{choice}'")
    if choice != "auto":
        return choice
    if device.type == "cpu":
        return "ort"
    try:
        has_cuda = "CUDAExecutionProvider" in providers("auto")
    except InputError:  # no onnxruntime at all: torch is the only way to run the teacher per batch
        has_cuda = False
    return "ort" if has_cuda else "torch"


def online_teacher(teacher: Path, data: Dataset, fetch: Sequence[str], device: torch.device, choice: str,
                   threads: int = 0, bound: float = 1e-4) -> tuple[OnlineTeacher | TorchTeacher, str]:
    """The per-batch teacher and the runtime it runs in; a torch teacher is first checked against ORT."""
    runtime = choose_runtime(choice, device)
    ort = OnlineTeacher(teacher, data, fetch, preference="cpu" if runtime == "torch" else "auto", threads=threads)
    if runtime == "ort":
        return ort, runtime
    candidate = TorchTeacher(teacher, data, fetch, device)
    feeds = data.batch(np.arange(min(CHECK_ROWS, len(data))))
    reference, got = ort(feeds), candidate(feeds)
    for name in candidate.fetch:
        ref = reference[name].astype(np.float64)
        mine = got[name].cpu().numpy().astype(np.float64)
        err = float(np.abs(mine - ref).max() / max(np.abs(ref).max(), 1e-12))
        if err > bound:
            raise CheckFailed(f"{teacher}: the teacher's '{name}' in torch on {device} differs from ONNX Runtime by "
                              f"{err:.1e} (relative) > {bound:.0e}; use --teacher-runtime ort.")
    del ort
    return candidate, runtime
