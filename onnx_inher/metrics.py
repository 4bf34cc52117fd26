"""How close the student is to the teacher, measured in ONNX Runtime on held-out data.

Two kinds of numbers, both computed by the runtime users deploy with (not by the training framework):

* task accuracy, when the data carries class labels: top-1 of teacher and of student, and how often
  the student's top-1 agrees with the teacher's;
* fidelity, always: per output, the mean cosine similarity between teacher and student (per sample),
  and the max relative error. For a text encoder whose output is ``[N, T, D]`` and whose inputs
  include an ``attention_mask``, the cosine is taken on mask-weighted mean-pooled sentence
  embeddings, the way sentence-transformers models are used.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from onnx_inher.datasets.text import ATTENTION_MASK as MASK
from onnx_inher.runtime import session


@dataclass
class OutputFidelity:
    name: str
    cosine_mean: float
    cosine_min: float
    max_rel: float
    pooled: bool


@dataclass
class Evaluation:
    samples: int
    source: str
    teacher_accuracy: float | None = None
    student_accuracy: float | None = None
    top1_agreement: float | None = None
    outputs: list[OutputFidelity] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def headline(self) -> tuple[str, float | None, float | None]:
        """(metric name, teacher value, student value) for one-line summaries."""
        if self.student_accuracy is not None:
            return "accuracy", self.teacher_accuracy, self.student_accuracy
        first = self.outputs[0] if self.outputs else None
        return "cosine to teacher", 1.0, first.cosine_mean if first else None


def _batches(n: int, size: int) -> Iterator[np.ndarray]:
    for start in range(0, n, size):
        yield np.arange(start, min(n, start + size))


def pool(y: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, bool]:
    """One row per sample: `[N,T,D]` sequence outputs are mask-mean-pooled (padding never counts, as in
    a sentence embedding); anything else is flattened. The flag says whether pooling happened."""
    if mask is not None and y.ndim == 3 and mask.shape == y.shape[:2]:
        w = mask.astype(np.float64)[..., None]
        return (y * w).sum(1) / np.maximum(w.sum(1), 1e-9), True
    return y.reshape(len(y), -1), False


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return num / np.maximum(den, 1e-12)


def evaluate(teacher: str | Path, student: str | Path, inputs: dict[str, np.ndarray],
             labels: np.ndarray | None = None, *, source: str = "", batch_size: int = 256,
             provider: str = "auto") -> Evaluation:
    """Teacher vs student on `inputs` (arrays keyed by input name, samples on axis 0)."""
    n = len(next(iter(inputs.values())))
    t_sess, s_sess = session(Path(teacher), provider), session(Path(student), provider)
    names = [o.name for o in t_sess.get_outputs()]
    t_in = [i.name for i in t_sess.get_inputs()]
    s_in = [i.name for i in s_sess.get_inputs()]
    t_out: list[list[np.ndarray]] = [[] for _ in names]
    s_out: list[list[np.ndarray]] = [[] for _ in names]
    for idx in _batches(n, batch_size):
        feed = {k: np.ascontiguousarray(v[idx]) for k, v in inputs.items()}
        for acc, sess, ins in ((t_out, t_sess, t_in), (s_out, s_sess, s_in)):
            for j, y in enumerate(sess.run(names, {k: feed[k] for k in ins})):
                acc[j].append(y.astype(np.float64))
    mask = inputs.get(MASK)
    result = Evaluation(samples=n, source=source)
    for j, name in enumerate(names):
        t, s = np.concatenate(t_out[j]), np.concatenate(s_out[j])
        tp, pooled = pool(t, mask)
        sp, _ = pool(s, mask)
        cos = cosine_rows(tp, sp)
        rel = float(np.max(np.abs(t - s)) / max(float(np.max(np.abs(t))), 1e-12))
        result.outputs.append(OutputFidelity(name, float(cos.mean()), float(cos.min()), rel, pooled))
    if labels is not None:
        t_logits, s_logits = np.concatenate(t_out[0]), np.concatenate(s_out[0])
        if t_logits.ndim == 2:
            t_top, s_top = t_logits.argmax(1), s_logits.argmax(1)
            result.teacher_accuracy = float((t_top == labels).mean())
            result.student_accuracy = float((s_top == labels).mean())
            result.top1_agreement = float((t_top == s_top).mean())
    return result
