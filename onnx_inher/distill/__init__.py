"""Knowledge-distillation fine-tuning: losses, teacher cache, trainer, checkpoints (data: `onnx_inher.datasets`).

Importing this package does not import torch: `distill` loads the trainer when it is called, so
`import onnx_inher` stays cheap for people who only compress.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from onnx_inher.distill.options import (
    AUGMENTS,
    TEACHER_MODES,
    TEACHER_RUNTIMES,
    TRAINABLE,
    DistillOptions,
    parse_assignments,
)

if TYPE_CHECKING:
    from onnx_inher.distill.run import DistillResult

__all__ = ["AUGMENTS", "TEACHER_MODES", "TEACHER_RUNTIMES", "TRAINABLE", "DistillOptions", "distill",
           "parse_assignments"]


def distill(student: str | os.PathLike[str], teacher: str | os.PathLike[str], data: str,
            output: str | os.PathLike[str], options: DistillOptions | None = None, **kwargs: Any) -> DistillResult:
    """Fine-tune `student` to match `teacher` on `data`; write the verified student to `output`.

    `data` is a DATA spec (an .npz, a folder of .npy, mnist5k, digits, fashion-mnist, fortunes, random[:N]);
    keyword arguments: val_data, metrics, checkpoint_dir, resume, cache_dir (see `onnx-inher distill -h`).
    """
    from onnx_inher.distill.run import distill as run_distill

    return run_distill(student, teacher, data, output, options, **kwargs)
