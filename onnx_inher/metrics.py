"""How close the student is to the teacher, measured in ONNX Runtime on held-out data.

Numbers computed by the runtime users deploy with (not by the training framework):

* per output, what it holds decides the metric (`onnx_inher.ir.outputs.detect`: probabilities,
  log-probabilities, logits, or other):
  - class outputs: top-1 agreement with the teacher at every position along the class axis (per sample
    for `[N,C]`, per frame for `[N,T,C]`, per pixel for `[N,C,H,W]`); for `[N,T,C]` also the
    whole-sequence agreement (share of samples where every frame agrees) and, where the output looks like
    CTC, the agreement of CTC-greedy decoded sequences (see `ctc_blank_of`);
  - every output: the mean cosine similarity between teacher and student (per sample) and the max
    relative error. For a text encoder whose output is ``[N, T, D]`` and whose inputs include an
    ``attention_mask``, the cosine is taken on mask-weighted mean-pooled sentence embeddings, the way
    sentence-transformers models are used;
* task accuracy, when the data carries class labels: top-1 of teacher and of student on the first `[N,C]`
  class output;
* a user's own metric (`--metric module:function`, see `load_metric`).

The headline (`Evaluation.figures()[0]`) is the task metric: the user's metric when given, else accuracy,
else the decoded / sequence / top-1 agreement of the first class output; the cosine only when no output
holds classes.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnx_inher.datasets.loading import LABELS
from onnx_inher.datasets.text import ATTENTION_MASK as MASK
from onnx_inher.errors import InputError
from onnx_inher.ir.outputs import OutputKind, detect
from onnx_inher.runtime import session

CTC_BLANKS = "auto, none or a class index"
# Names of the figures that are shares of samples or positions (shown as percentages).
ACCURACY, TOP1, SEQUENCE, CTC, COSINE = ("accuracy", "top-1 agreement", "sequence agreement",
                                         "CTC decoded agreement", "cosine to teacher")
SHARES = (ACCURACY, TOP1, SEQUENCE, CTC)


@dataclass
class OutputFidelity:
    name: str
    cosine_mean: float
    cosine_min: float
    max_rel: float
    pooled: bool
    kind: str = "other"  # probabilities, log_probabilities, logits or other (ir.outputs)
    class_axis: int | None = None
    kind_reason: str = ""
    positions: int | None = None  # class outputs: positions per sample (1 for [N,C], T for [N,T,C], H·W)
    top1_agreement: float | None = None  # share of positions (samples, frames, pixels) with the same top-1
    sequence_agreement: float | None = None  # [N,T,C]: share of samples whose every frame agrees
    ctc_agreement: float | None = None  # share of samples with identical CTC-greedy decoded sequences
    ctc_blank: int | None = None  # the blank class those were decoded with


@dataclass(frozen=True)
class Figure:
    """One number of the summary: its name, the teacher's value, the student's, whether it is a share."""

    name: str
    teacher: float | None
    student: float | None
    share: bool


@dataclass
class Evaluation:
    samples: int
    source: str
    teacher_accuracy: float | None = None
    student_accuracy: float | None = None
    top1_agreement: float | None = None  # these three: of the first class output (see OutputFidelity)
    sequence_agreement: float | None = None
    ctc_agreement: float | None = None
    metric: str | None = None  # the user's --metric, module:function
    teacher_metric: dict[str, float] | None = None  # f(teacher, teacher, inputs): the reference value
    student_metric: dict[str, float] | None = None  # f(teacher, student, inputs)
    outputs: list[OutputFidelity] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def figures(self) -> list[Figure]:
        """The task metrics, headline first: the user's metric, accuracy, CTC-decoded / sequence / top-1
        agreement with the teacher (the teacher agrees with itself: 1), and the cosine only when no output
        holds classes."""
        out = [Figure(k, (self.teacher_metric or {}).get(k), v, False) for k, v in (self.student_metric or {}).items()]
        if self.student_accuracy is not None:
            out.append(Figure(ACCURACY, self.teacher_accuracy, self.student_accuracy, True))
        for name, value in ((CTC, self.ctc_agreement), (SEQUENCE, self.sequence_agreement),
                            (TOP1, self.top1_agreement)):
            if value is not None:
                out.append(Figure(name, 1.0, value, True))
        if not any(o.kind != "other" for o in self.outputs) or not out:
            first = self.outputs[0] if self.outputs else None
            out.append(Figure(COSINE, 1.0, first.cosine_mean if first else None, False))
        return out

    @property
    def headline(self) -> tuple[str, float | None, float | None]:
        """(metric name, teacher value, student value) for one-line summaries."""
        first = self.figures()[0]
        return first.name, first.teacher, first.student


@dataclass(frozen=True)
class UserMetric:
    """A user's metric: f(teacher_outputs, student_outputs, inputs) -> float or {name: float}.

    Each argument is a dict of numpy arrays with the samples on axis 0: the outputs keyed by output name as
    ONNX Runtime returned them, the inputs keyed by input name plus ``labels`` when the data has labels.
    It is called once on the whole held-out set, and once more with the teacher in the student's place
    (the teacher's row of the summary). A float is named after the function; the first value of a dict
    is the headline.
    """

    spec: str
    fn: Callable[..., Any]
    file: Path | None

    @property
    def name(self) -> str:
        return getattr(self.fn, "__name__", self.spec.rpartition(":")[2])

    def __call__(self, teacher: Mapping[str, np.ndarray], student: Mapping[str, np.ndarray],
                 inputs: Mapping[str, np.ndarray]) -> dict[str, float]:
        try:
            # streamed data may hold memory-mapped or lazy arrays: a user's function gets plain numpy
            value = self.fn(dict(teacher), dict(student), {k: np.asarray(v) for k, v in inputs.items()})
        except Exception as err:
            raise InputError(f"--metric {self.spec}: the function raised {type(err).__name__}: {err}") from None
        items = value.items() if isinstance(value, Mapping) else [(self.name, value)]
        out = {}
        for k, v in items:
            if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, int | float | np.number) \
                    or not math.isfinite(float(v)):
                raise InputError(f"--metric {self.spec}: must return a finite float or a dict of name -> finite "
                                 f"float, got {type(value).__name__} {str(value)[:80]}")
            out[k] = float(v)
        if not out:
            raise InputError(f"--metric {self.spec}: returned an empty dict; return a float or name -> float.")
        return out


def load_metric(spec: str) -> UserMetric:
    """`module:function` (imported with the current folder on the path) or `path/to/file.py:function`.

    Every problem (no colon, the import fails, no such function) is an `InputError`: exit 2, one line.
    """
    module, sep, name = spec.rpartition(":")
    if not sep or not module or not name:
        raise InputError(f"--metric: expected MODULE:FUNCTION (e.g. --metric mymetrics:cer, or "
                         f"path/to/metrics.py:cer), got '{spec}'")
    file = None
    # the current folder is on the path while the metric loads, for a module named there and for a file's own
    # imports alike (`benchmarks/experiments/crepe_speech.py` imports `benchmarks.experiments.ocr_lines`)
    added = os.getcwd() not in sys.path
    if added:
        sys.path.insert(0, os.getcwd())
    try:
        if module.endswith(".py") or "/" in module or os.sep in module:
            file = Path(module)
            if not file.is_file():
                raise InputError(f"--metric {spec}: no file {file}")
            found = importlib.util.spec_from_file_location(f"onnx_inher_metric_{file.stem}", file)
            if found is None or found.loader is None:
                raise InputError(f"--metric {spec}: {file} is not a Python file")
            mod = importlib.util.module_from_spec(found)
            found.loader.exec_module(mod)
        else:
            mod = importlib.import_module(module)
            where = getattr(mod, "__file__", None)
            file = Path(where) if where else None
    except InputError:
        raise
    except Exception as err:
        raise InputError(f"--metric {spec}: cannot import '{module}': {type(err).__name__}: {err}") from None
    finally:
        if added:
            sys.path.remove(os.getcwd())
    fn = getattr(mod, name, None)
    if not callable(fn):
        raise InputError(f"--metric {spec}: '{module}' has no function '{name}'")
    return UserMetric(spec, fn, file)


# (mean top-1 agreement with the teacher or None, validation loss, positions the agreement was counted on)
Score = tuple[float | None, float, int]


def better(score: Score, best: Score) -> bool:
    """Whether a validation (or a measured student) beats the best so far: a clearly higher top-1 agreement,
    or the same agreement (within one position, or its standard error over the positions counted) and a lower
    loss; the loss alone where outputs do not hold classes. Distillation's validation and the sensitivity
    allocation's final check both decide by it.

    The loss alone can improve while the student decides worse: the PP-OCRv5 recogniser's class-split student
    starts at 100% frame agreement on validation; distilling it lowered the KL + CTC loss from 0.0277 to 0.0234
    by matching the teacher's tiny probabilities over 18,000 unused classes, while the frame agreement fell
    to 99.6% and the lines read as the teacher does from 100% to 97%. A user asked for a student that decides
    as the teacher does; the loss is the means. On a few validation samples the agreement is noise, and the
    loss decides."""
    (agree, loss, n), (best_agree, best_loss, _) = score, best
    if agree is None or best_agree is None:
        return loss < best_loss
    tolerance = max(1.0 / n, math.sqrt(best_agree * (1.0 - best_agree) / n))
    if abs(agree - best_agree) > tolerance:
        return agree > best_agree
    return loss < best_loss


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


def parse_ctc_blank(value: int | str | None) -> int | str | None:
    """`--ctc-blank`: "auto" (the default), "none" / None (no CTC decoding) or a class index >= 0."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        if value is not None and value < 0:
            raise InputError(f"--ctc-blank must be {CTC_BLANKS} (>= 0), got {value}")
        return value
    text = str(value).strip().lower()
    if text in ("auto", "none"):
        return None if text == "none" else "auto"
    if text.isdigit():
        return int(text)
    raise InputError(f"--ctc-blank must be {CTC_BLANKS}, got '{value}'")


def ctc_decode(ids: np.ndarray, blank: int) -> list[tuple[int, ...]]:
    """CTC greedy decoding of per-frame top-1 ids `[N, T]`: collapse repeats, then drop blanks."""
    keep = np.ones(ids.shape, dtype=bool)
    keep[:, 1:] = ids[:, 1:] != ids[:, :-1]
    keep &= ids != blank
    return [tuple(int(c) for c in row[k]) for row, k in zip(ids, keep, strict=True)]


def ctc_blank_of(teacher_ids: np.ndarray, classes: int, setting: int | str | None, token_level: bool) -> int | None:
    """The blank class CTC decoding uses, or None when the output is not read as CTC.

    `setting` None: never; an int: that class; "auto": the output looks like CTC when it is per frame
    (`[N,T,C]`, T > 1) but not per input token (no attention mask of shape `[N,T]`), and the teacher's
    most frequent top-1 over all frames is class 0 (PaddleOCR's and torch CTCLoss's blank) or class C-1
    (TensorFlow's): a CTC model predicts the blank on most frames. That class is the blank.
    """
    if setting is None or teacher_ids.ndim != 2:
        return None
    if not isinstance(setting, str):
        if not 0 <= int(setting) < classes:
            raise InputError(f"--ctc-blank {setting}: outside the output's {classes} classes")
        return int(setting)
    if token_level or teacher_ids.shape[1] < 2 or classes < 2:
        return None
    counts = np.bincount(teacher_ids.reshape(-1), minlength=classes)
    top = int(counts.argmax())
    return top if top in (0, classes - 1) else None


def class_agreement(teacher: np.ndarray, student: np.ndarray, class_axis: int, mask: np.ndarray | None = None,
                    ctc_blank: int | str | None = "auto") -> dict[str, Any]:
    """Top-1 agreement of two class outputs at every position (every axis but the class axis), and for
    `[N,T,C]` the whole-sequence and CTC-decoded agreement. `mask` (`[N,T]`, 1 = real token) drops padding."""
    return id_agreement(teacher.argmax(class_axis), student.argmax(class_axis), teacher.shape[class_axis], mask,
                        ctc_blank)


def id_agreement(t_ids: np.ndarray, s_ids: np.ndarray, classes: int, mask: np.ndarray | None = None,
                 ctc_blank: int | str | None = "auto") -> dict[str, Any]:
    """`class_agreement` from the top-1 class ids alone (what `evaluate` keeps of each batch)."""
    same = t_ids == s_ids
    positions = same.reshape(len(same), -1)
    token_level = mask is not None and mask.shape == same.shape
    if token_level:
        valid = mask.reshape(len(same), -1).astype(bool)  # type: ignore[union-attr]
        top1 = float(positions[valid].mean()) if valid.any() else 1.0
        whole = (positions | ~valid).all(1)
    else:
        top1, whole = float(positions.mean()), positions.all(1)
    out: dict[str, Any] = {"positions": int(positions.shape[1]), "top1_agreement": top1}
    if same.ndim == 2:  # [N,T,C] (or [N,C,T]): positions form one sequence per sample
        out["sequence_agreement"] = float(whole.mean())
        blank = ctc_blank_of(t_ids, classes, ctc_blank, token_level)
        if blank is not None:
            decoded = zip(ctc_decode(t_ids, blank), ctc_decode(s_ids, blank), strict=True)
            out["ctc_agreement"] = float(np.mean([a == b for a, b in decoded]))
            out["ctc_blank"] = blank
    return out


EVAL_VALUES = 1 << 24  # output values per batch and model: bounds evaluation memory (the recogniser's
# [300, 40, 18385] softmax is 0.9 GB a model; holding it whole, in float64, peaked at 16.7 GB)


@dataclass
class _Tally:
    """What `evaluate` keeps of one output, batch by batch: per-sample cosines, the largest differences and
    the top-1 ids, never the outputs themselves."""

    cosines: list[np.ndarray] = field(default_factory=list)
    max_diff: float = 0.0
    max_ref: float = 0.0
    pooled: bool = False
    axis: int | None = None
    classes: int = 0
    teacher_ids: list[np.ndarray] = field(default_factory=list)
    student_ids: list[np.ndarray] = field(default_factory=list)

    def add(self, t: np.ndarray, s: np.ndarray, mask: np.ndarray | None, kind: OutputKind | None) -> None:
        tp, self.pooled = pool(t, mask)
        sp, _ = pool(s, mask)
        self.cosines.append(cosine_rows(tp.astype(np.float64), sp.astype(np.float64)))
        self.max_diff = max(self.max_diff, float(np.max(np.abs(t.astype(np.float64) - s))) if t.size else 0.0)
        self.max_ref = max(self.max_ref, float(np.max(np.abs(t))) if t.size else 0.0)
        self.axis = _class_axis(kind, t)
        if self.axis is not None:
            self.classes = t.shape[self.axis]
            self.teacher_ids.append(t.argmax(self.axis))
            self.student_ids.append(s.argmax(self.axis))


def _eval_batch(first: list[np.ndarray], n: int, batch_size: int) -> int:
    """Samples per batch after the first: at most `batch_size`, and at most `EVAL_VALUES` output values."""
    per_sample = sum(y.size // max(len(y), 1) for y in first) if first and first[0].ndim else 1
    return max(1, min(batch_size, EVAL_VALUES // max(per_sample, 1), n))


def evaluate(teacher: str | Path, student: str | Path, inputs: dict[str, np.ndarray],
             labels: np.ndarray | None = None, *, source: str = "", batch_size: int = 256,
             provider: str = "auto", declared: Mapping[str, str] | None = None,
             ctc_blank: int | str | None = "auto", metric: UserMetric | None = None) -> Evaluation:
    """Teacher vs student on `inputs` (arrays keyed by input name, samples on axis 0).

    `declared`: output name -> "classes" / "features", what the user's `--loss` said (`ir.outputs`);
    `ctc_blank`: "auto", None (no CTC decoding) or the blank class (see `ctc_blank_of`); `metric`: a
    user's metric (`load_metric`). Outputs are scored batch by batch and dropped, so memory does not
    grow with the data (batches hold at most `EVAL_VALUES` output values); only a user's metric, which
    is given every output at once, makes `evaluate` keep them.
    """
    n = len(next(iter(inputs.values())))
    t_sess, s_sess = session(Path(teacher), provider), session(Path(student), provider)
    names = [o.name for o in t_sess.get_outputs()]
    kinds = {k.name: k for k in detect(onnx.load(str(teacher), load_external_data=False),
                                       labels=labels is not None, declared=declared)}
    t_in = [i.name for i in t_sess.get_inputs()]
    s_in = [i.name for i in s_sess.get_inputs()]
    mask = inputs.get(MASK)
    tallies = [_Tally() for _ in names]
    kept: tuple[list[list[np.ndarray]], list[list[np.ndarray]]] = ([[] for _ in names], [[] for _ in names])
    start, size = 0, min(n, 8, batch_size)  # a small first batch measures the outputs' size per sample
    while start < n:
        idx = np.arange(start, min(n, start + size))
        feed = {k: np.ascontiguousarray(v[idx]) for k, v in inputs.items()}
        t_batch = t_sess.run(names, {k: feed[k] for k in t_in})
        s_batch = s_sess.run(names, {k: feed[k] for k in s_in})
        for j, name in enumerate(names):
            tallies[j].add(t_batch[j], s_batch[j], None if mask is None else mask[idx], kinds.get(name))
            if metric is not None:
                kept[0][j].append(t_batch[j])
                kept[1][j].append(s_batch[j])
        if start == 0:
            size = _eval_batch(t_batch, n, batch_size)
        start = int(idx[-1]) + 1
        del t_batch, s_batch, feed
    result = Evaluation(samples=n, source=source, metric=metric.spec if metric else None)
    ids: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, tally in zip(names, tallies, strict=True):
        cos = np.concatenate(tally.cosines)
        fidelity = OutputFidelity(name, float(cos.mean()), float(cos.min()),
                                  tally.max_diff / max(tally.max_ref, 1e-12), tally.pooled)
        kind = kinds.get(name)
        if kind is not None:
            fidelity.kind, fidelity.kind_reason = kind.kind, kind.reason
        if tally.axis is not None:
            fidelity.class_axis = tally.axis
            t_ids, s_ids = np.concatenate(tally.teacher_ids), np.concatenate(tally.student_ids)
            ids[name] = (t_ids, s_ids)
            for key, value in id_agreement(t_ids, s_ids, tally.classes, mask, ctc_blank).items():
                setattr(fidelity, key, value)
        result.outputs.append(fidelity)
    first = next((o for o in result.outputs if o.class_axis is not None), None)
    if first is not None:
        result.top1_agreement = first.top1_agreement
        result.sequence_agreement, result.ctc_agreement = first.sequence_agreement, first.ctc_agreement
    if labels is not None:
        scored = next((o for o in result.outputs if o.class_axis == 1 and ids[o.name][0].ndim == 1), None)
        if scored is not None and len(labels) == n:
            t_top, s_top = ids[scored.name]
            result.teacher_accuracy = float((t_top == labels).mean())
            result.student_accuracy = float((s_top == labels).mean())
    if metric is not None:
        teacher_all = {name: np.concatenate(kept[0][j]) for j, name in enumerate(names)}
        student_all = {name: np.concatenate(kept[1][j]) for j, name in enumerate(names)}
        feed = {**inputs, **({LABELS: labels} if labels is not None else {})}
        result.teacher_metric = metric(teacher_all, teacher_all, feed)
        result.student_metric = metric(teacher_all, student_all, feed)
    return result


def _class_axis(kind: OutputKind | None, value: np.ndarray) -> int | None:
    """The class axis of an output as it came out of the runtime (None if it holds no classes)."""
    if kind is None or not kind.is_classes or kind.class_axis is None or value.ndim < 2:
        return None
    axis = kind.class_axis if kind.class_axis >= 0 else value.ndim + kind.class_axis
    return axis if 0 < axis < value.ndim and value.shape[axis] > 1 else None
