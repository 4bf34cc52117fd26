"""Distillation losses: small, plain functions of tensors, each with golden-value tests.

Conventions shared by all of them, so a trainer can mix them freely:
* the class / feature axis is the last one; every leading axis (batch, tokens) is a position;
* losses are means over positions (never sums), so their size does not grow with batch or sequence length;
* an optional `mask` (shape = the leading axes, 1 = counts) drops padding tokens from the mean;
* they compute in float32 whatever the inputs are, so mixed precision never runs a softmax in fp16.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from onnx_inher.distill.options import LOSS_KINDS
from onnx_inher.ir.outputs import CLASS_LOSSES, LOG_PROBABILITIES, LOGITS, PROBABILITIES, OutputKind

EPS = 1e-8
SPACES = (LOGITS, PROBABILITIES, LOG_PROBABILITIES)
CLASS_KINDS = CLASS_LOSSES  # the losses that read class scores
# the smallest normal float32 and its log: probabilities that underflowed to 0 (or to a subnormal) count as it
TINY = torch.finfo(torch.float32).tiny
LOG_FLOOR = math.log(TINY)


def token_mask(value: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    """`mask` where `value` is token-level ([N, L, ...] with [N, L] = the mask's shape), else None: other
    tensors are averaged over every position."""
    if mask is None or value.dim() < 3 or tuple(value.shape[:2]) != tuple(mask.shape):
        return None
    return mask


def _masked_mean(per_position: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return per_position.mean()
    weight = mask.to(per_position.dtype)
    return (per_position * weight).sum() / weight.sum().clamp_min(1.0)


def kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
       mask: torch.Tensor | None = None) -> torch.Tensor:
    """T²·KL(softmax(teacher/T) ‖ softmax(student/T)), averaged over positions.

    The T² factor (Hinton et al.) keeps the soft targets' gradient the same size whatever T is, so the
    weight between this term and the hard-label term does not need retuning when T changes.
    """
    t = float(temperature)
    log_q = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / t, dim=-1)
    per_position = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
    return _masked_mean(per_position, mask) * (t * t)


def class_scores(value: torch.Tensor, space: str = LOGITS, class_axis: int = -1) -> torch.Tensor:
    """What `kl`, `kd_loss` and `cross_entropy` read, from an output in any space: the class axis moved last,
    probabilities turned into their log (float32), log-probabilities and logits as they are.

    The log of probabilities is a logit up to a constant per position, and softmax ignores such constants:
    softmax(log p / T) = p^(1/T) / Σ p^(1/T). So a model that ends in Softmax is distilled exactly as if it
    had exported its logits, temperature included, and no softmax is ever applied to probabilities.
    Probabilities that underflowed to 0 count as the smallest normal float32 (log -87.3); at any T >= 1
    their share of the soft targets is below 1e-38^(1/T) each.
    """
    if space not in SPACES:
        raise ValueError(f"unknown output space '{space}'; use one of {', '.join(SPACES)}")
    x = value if class_axis in (-1, value.dim() - 1) else value.movedim(class_axis, -1)
    if space == PROBABILITIES:
        return x.float().clamp_min(TINY).log()  # clamped first: no 0/0 in the gradient
    if space == LOG_PROBABILITIES:
        return x.float().clamp_min(LOG_FLOOR)
    return x


def cross_entropy(student_logits: torch.Tensor, labels: torch.Tensor,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy with integer labels (shape = the leading axes), averaged over positions."""
    logits = student_logits.float()
    per_position = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).long(),
                                   reduction="none").reshape(labels.shape)
    return _masked_mean(per_position, mask)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None,
            temperature: float = 4.0, alpha: float = 0.5, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Hinton KD: α·CE(labels) + (1-α)·T²·KL; without labels only the KL term remains (weight 1)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    soft = kl(student_logits, teacher_logits, temperature, mask)
    if labels is None:
        return soft
    return alpha * cross_entropy(student_logits, labels, mask) + (1.0 - alpha) * soft


def greedy_labels(scores: torch.Tensor, blank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CTC greedy decoding of `[N, T, C]` scores: the concatenated label ids and each sequence's length."""
    ids = scores.argmax(dim=-1)
    keep = ids != blank
    keep[:, 1:] &= ids[:, 1:] != ids[:, :-1]
    return ids[keep], keep.sum(dim=1)


def ctc_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor, blank: int,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """CTC negative log-likelihood, per label, of the teacher's greedy decoding under the student.

    A CTC recogniser is read by its decoded text, and the text changes only where the teacher's frames
    are close calls (a space, a doubled letter): per-frame KL weighs those few frames like the many sure
    blanks, while this term is the log-probability of the very sequence the teacher reads (sequence-level
    KD, Kim & Rush 2016). `mask` (`[N, T]`) gives each sequence its real length.
    """
    labels, lengths = greedy_labels(teacher_logits, blank)
    n, t = student_logits.shape[:2]
    frames = torch.full((n,), t, dtype=torch.long) if mask is None else mask.long().sum(dim=1)
    log_probs = F.log_softmax(student_logits.float(), dim=-1).transpose(0, 1)
    return F.ctc_loss(log_probs, labels, frames, lengths, blank=blank, reduction="mean", zero_infinity=True)


def mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error over all elements (positions × features)."""
    per_position = (student.float() - teacher.float()).pow(2).mean(dim=-1)
    return _masked_mean(per_position, mask)


def cosine(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """1 − cosine similarity along the last axis, averaged over positions: direction only, not scale.

    Sentence embeddings are compared by cosine, so this is the loss that moves the metric we report.
    """
    similarity = F.cosine_similarity(student.float(), teacher.float(), dim=-1, eps=EPS)
    return _masked_mean(1.0 - similarity, mask)


def pooled_cosine(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """1 − cosine of mask-weighted mean-pooled embeddings (`[N, T, D]` -> `[N, D]`), averaged over samples.

    A sentence-transformers encoder is used through this pooled vector, so matching it directly trains
    the number we report; per-token cosine spends capacity on tokens whose errors cancel in the mean.
    Outputs without a token axis fall back to the plain cosine.
    """
    if student.dim() < 3:
        return cosine(student, teacher)
    weight = (torch.ones(student.shape[:2], device=student.device) if mask is None else mask).float()[..., None]
    count = weight.sum(dim=1).clamp_min(1.0)
    s = (student.float() * weight).sum(dim=1) / count
    t = (teacher.float() * weight).sum(dim=1) / count
    return (1.0 - F.cosine_similarity(s, t, dim=-1, eps=EPS)).mean()


def normalised_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """MSE divided by the teacher's mean square: scale-free, so features of different layers weigh alike.

    With a `mask` (shape = the leading axes) both means run over the unmasked positions only: a padded
    token's hidden state is computed but never used, and on short sentences padded to a fixed length
    it would otherwise take most of the loss (and of the student's capacity).
    """
    t = teacher.float()
    squared_error, scale = (student.float() - t).pow(2).mean(dim=-1), t.pow(2).mean(dim=-1)
    return _masked_mean(squared_error, mask) / (_masked_mean(scale, mask) + EPS)


def feature_loss(student: Mapping[str, torch.Tensor], teacher: Mapping[str, torch.Tensor],
                 names: Sequence[str], mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean normalised MSE over intermediate tensors that exist under the same ONNX name in both models.

    Factorised layers keep their original output names, so the student's layer outputs line up with the
    teacher's by name; a missing name or a shape mismatch is a programming error here (the trainer checks
    names against both graphs before training starts). `mask` applies to the tensors whose leading axes
    are its shape (token-level features); others are averaged over every position.
    """
    if not names:
        raise ValueError("feature_loss needs at least one tensor name")
    terms = []
    for name in names:
        s, t = student[name], teacher[name]
        if s.shape != t.shape:
            raise ValueError(f"feature '{name}': student shape {tuple(s.shape)} != teacher {tuple(t.shape)}")
        terms.append(normalised_mse(s, t, token_mask(s, mask)))
    return torch.stack(terms).mean()


@dataclass(frozen=True)
class OutputLoss:
    """How one graph output is distilled: a loss kind and its weight (plus T and α for kd/kl).

    `space` and `class_axis` say what a kd/kl loss reads (see `class_scores`): logits, probabilities (a
    Softmax output: the KL is taken on their log, never on a second softmax) or log-probabilities, with
    the classes on `class_axis` (1 for `[N,C,H,W]`); every other axis is a position.
    """

    output: str
    kind: str
    weight: float = 1.0
    temperature: float = 4.0
    alpha: float = 0.5
    space: str = LOGITS
    class_axis: int = -1
    blank: int = 0  # the CTC blank class, for kind "ctc"

    def __post_init__(self) -> None:
        if self.kind not in LOSS_KINDS:
            raise ValueError(f"output '{self.output}': unknown loss '{self.kind}'; use one of {', '.join(LOSS_KINDS)}")
        if self.weight < 0:
            raise ValueError(f"output '{self.output}': loss weight must be >= 0, got {self.weight}")
        if self.space not in SPACES:
            raise ValueError(f"output '{self.output}': unknown space '{self.space}'; use one of {', '.join(SPACES)}")

    def __call__(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.kind in CLASS_KINDS:
            s, t = (class_scores(v, self.space, self.class_axis) for v in (student, teacher))
            if mask is not None and tuple(s.shape[:2]) != tuple(mask.shape):
                mask = None
            if self.kind == "kd":
                return kd_loss(s, t, labels, self.temperature, self.alpha, mask)
            if self.kind == "ctc":
                return kl(s, t, self.temperature, mask) + ctc_to_teacher(s, t, self.blank, mask)
            return kl(s, t, self.temperature, mask)
        if self.kind == "mse":
            return mse(student, teacher, mask)
        if self.kind == "pooled":
            return pooled_cosine(student, teacher, mask)
        return cosine(student, teacher, mask)


def default_kind(output: OutputKind, has_labels: bool) -> str:
    """The loss an output gets unless the user says otherwise, from what the graph says it is
    (`onnx_inher.ir.outputs.detect`).

    Class outputs (probabilities, log-probabilities, logits) get Hinton KD when the data has one label per
    sample and the output is `[N,C]`, else KL (per position for `[N,T,C]` and `[N,C,H,W]`); everything else
    is treated as an embedding or a regression output and gets the cosine loss, which is what embedding
    similarity is measured by.
    """
    if not output.is_classes:
        return "cosine"
    return "kd" if has_labels and output.rank == 2 else "kl"
