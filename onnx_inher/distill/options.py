"""Distillation options: one dataclass, checked once before anything runs (torch-free)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from onnx_inher.errors import InputError
from onnx_inher.metrics import parse_ctc_blank

LOSS_KINDS = ("kd", "kl", "ctc", "mse", "cosine", "pooled")
TRAINABLE = ("factors", "all", "no-embeddings")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
TEACHER_MODES = ("cache", "online")
AUGMENTS = ("none", "join", "crop", "mix")
TEACHER_RUNTIMES = ("auto", "ort", "torch")


@dataclass
class DistillOptions:
    """Everything that shapes a distillation run (paths aside). Defaults suit a compressed student.

    `losses` maps an output name to ``kind`` or ``kind:weight`` (kd, kl, ctc: kl plus the CTC likelihood of
    the teacher's decoded text, mse, cosine, pooled: cosine of mask-weighted mean-pooled token outputs, the
    sentence-embedding metric); outputs not named get the default for their kind (see `losses.default_kind`;
    per-frame outputs that read as CTC under `ctc_blank` get ctc). `features` names intermediate tensors for
    feature KD ("auto": the outputs of every factorised layer), weighted by `feature_weight`.
    """

    epochs: int = 3
    steps: int | None = None
    batch_size: int | None = None  # None: `auto_batch` of the teacher's outputs per sample
    lr: float | None = None  # None: `--lr auto` (trainer.Trainer.lr_probe)
    weight_decay: float = 0.01
    warmup: float = 0.05
    clip: float = 1.0
    temperature: float | None = None  # None: `auto_temperature` of each class output
    alpha: float = 0.5
    losses: dict[str, str] = field(default_factory=dict)
    features: list[str] = field(default_factory=list)
    feature_weight: float = 1.0
    trainable: str = "factors"
    val_fraction: float = 0.1
    patience: int | None = None
    eval_every: int | None = None
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    precision: str = "auto"
    device: str = "auto"
    seed: int = 0
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default (one per core)
    teacher_batch: int = 64
    max_rel_error: float = 1e-3
    dims: dict[str, int] = field(default_factory=dict)
    teacher_mode: str = "cache"
    augment: str = "none"
    teacher_runtime: str = "auto"
    time_limit: float = 0.0  # seconds of distillation, setup (data, teacher outputs) included; 0: none
    ctc_blank: int | str | None = "auto"  # per-frame outputs read as CTC get the "ctc" loss (`run.with_ctc`)
    backoff: bool = True  # validation far worse than the best, or worse twice in a row: restore the best,
    # lr x BACKOFF_FACTOR (trainer.backoff_due)

    @property
    def online_teacher(self) -> bool:
        """Augmented inputs exist only at training time, so the teacher must run on each batch."""
        return self.teacher_mode == "online" or self.augment != "none"

    def validate(self) -> None:
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "teacher_batch": self.teacher_batch}
        for name, value in positive.items():
            if value is not None and value < 1:
                raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.steps is not None and self.steps < 1:
            raise InputError(f"--steps must be >= 1, got {self.steps}")
        if (self.lr is not None and self.lr <= 0) or self.weight_decay < 0 or self.clip < 0:
            raise InputError("--lr must be > 0, --weight-decay and --clip >= 0 (0 turns clipping off)")
        if not 0 <= self.warmup < 1:
            raise InputError(f"--warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        if (self.temperature is not None and self.temperature <= 0) or not 0 <= self.alpha <= 1:
            raise InputError("--temperature must be > 0 and --alpha in [0, 1]")
        if not 0 <= self.val_fraction < 1:
            raise InputError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.patience is not None and (self.patience < 1 or self.val_fraction == 0):
            raise InputError("--patience needs a validation set (--val-fraction > 0) and must be >= 1")
        if self.checkpoint_every < 0 or self.keep_checkpoints < 1 or (self.eval_every or 1) < 1:
            raise InputError("--checkpoint-every must be >= 0, --keep-checkpoints and --eval-every >= 1")
        if self.trainable not in TRAINABLE:
            raise InputError(f"--trainable must be one of {', '.join(TRAINABLE)}, got '{self.trainable}'")
        if self.precision not in PRECISIONS or self.device not in DEVICES:
            raise InputError(f"--precision must be one of {', '.join(PRECISIONS)}; --device one of "
                             f"{', '.join(DEVICES)}")
        if self.teacher_mode not in TEACHER_MODES or self.augment not in AUGMENTS:
            raise InputError(f"--teacher-mode must be one of {', '.join(TEACHER_MODES)}; --augment one of "
                             f"{', '.join(AUGMENTS)}")
        if self.teacher_runtime not in TEACHER_RUNTIMES:
            raise InputError(f"--teacher-runtime must be one of {', '.join(TEACHER_RUNTIMES)}, "
                             f"got '{self.teacher_runtime}'")
        if self.teacher_runtime == "torch" and not self.online_teacher:
            raise InputError("--teacher-runtime torch runs the teacher on each batch: add --teacher-mode online "
                             "(the teacher cache is always filled by ONNX Runtime)")
        if self.time_limit < 0:
            raise InputError(f"--time-limit must be >= 0 seconds (0: none), got {self.time_limit}")
        if self.threads < 0:
            raise InputError(f"--threads must be >= 0 (0: torch's default), got {self.threads}")
        if self.feature_weight < 0:
            raise InputError(f"--feature-weight must be >= 0, got {self.feature_weight}")
        for output, spec in self.losses.items():
            parse_loss(output, spec)
        self.ctc_blank = parse_ctc_blank(self.ctc_blank)

    def run_identity(self) -> dict[str, Any]:
        """The options that change the trained weights (a resumed run must match them exactly)."""
        skip = {"checkpoint_every", "keep_checkpoints", "teacher_batch", "max_rel_error", "device", "threads",
                "teacher_runtime", "time_limit"}
        return {k: v for k, v in sorted(asdict(self).items()) if k not in skip}


def parse_loss(output: str, spec: str) -> tuple[str, float]:
    """``kind`` or ``kind:weight`` -> (kind, weight)."""
    kind, _, weight_text = spec.partition(":")
    if kind not in LOSS_KINDS:
        raise InputError(f"--loss {output}={spec}: unknown loss '{kind}'; use one of {', '.join(LOSS_KINDS)}")
    try:
        weight = float(weight_text) if weight_text else 1.0
    except ValueError:
        raise InputError(f"--loss {output}={spec}: weight '{weight_text}' is not a number") from None
    if weight < 0:
        raise InputError(f"--loss {output}={spec}: weight must be >= 0")
    return kind, weight


def parse_assignments(values: tuple[str, ...] | list[str], option: str) -> dict[str, str]:
    """``NAME=VALUE`` pairs from repeatable CLI options (names may hold '/' and ':')."""
    out = {}
    for v in values:
        name, sep, value = v.rpartition("=")
        if not sep or not name or not value:
            raise InputError(f"{option}: expected NAME=VALUE (e.g. {option} logits=kd:1.0), got '{v}'")
        out[name] = value
    return out


def default_paths(output: Path) -> tuple[Path, Path]:
    """Where the metrics log and checkpoints go unless given: next to the output model."""
    stem = output.with_suffix("")
    return Path(f"{stem}.metrics.jsonl"), Path(f"{stem}.checkpoints")


MANY_CLASSES = 100  # above this many classes the default KD temperature is 1


def auto_temperature(classes: int | None) -> float:
    """The KD temperature when the user gave none: 4 (Hinton) for up to 100 classes, 1 above.

    Softening spreads the teacher's mass over every class, and with many classes the spread swamps the
    signal: at T = 4 the PP-OCRv5 recogniser's soft targets over its 18,385 classes keep 2.7% of their mass
    on the teacher's top class (entropy 9.4 nats, as flat as a uniform over ~12,000 classes), against 95%
    at T = 1. Common practice agrees: T = 4 on CIFAR-100, T = 1 on ImageNet's 1,000 classes."""
    return 4.0 if classes is None or classes <= MANY_CLASSES else 1.0


BATCH = 64  # the default batch, for outputs small enough (`auto_batch`)
BATCH_MIN = 8
LOSS_VALUES = 16_000_000  # teacher output values per batch the default batch stays under


def auto_batch(values_per_sample: int, world_size: int = 1) -> int:
    """The batch when the user gave none: 64, halved (down to 8) until a batch's teacher outputs hold at most
    16 M values. The loss keeps several copies of them (log-softmaxes, their gradients), so their size is
    the step's memory and much of its time: the PP-OCRv5 recogniser's [40, 18,385] per line trained at
    batch 64 took 14.4 s a step (0.22 s a line), at 16 1.46 s (0.09 s a line)."""
    batch = BATCH
    while batch > BATCH_MIN and batch * values_per_sample > LOSS_VALUES:
        batch //= 2
    return max(batch, world_size)
