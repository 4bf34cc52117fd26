"""The training loop: AdamW, warm-up + cosine LR, clipping, mixed precision, evaluation, checkpoints.

Every decision is a function of the step number, so a run resumed from a checkpoint takes exactly the
path an uninterrupted run takes: the data order of an epoch comes from a `DistributedSampler` seeded with
(seed, epoch) (a world of one process is just the single-process case), the learning rate is computed
from the step, and the checkpoint holds the weights, the optimizer state, the best validation result and
the RNG states. Under DDP each rank takes every W-th sample of the same permutation, so one step sees
the same samples as one single-process step with the same global batch.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from onnx_inher import _env
from onnx_inher.bridge import OnnxModule
from onnx_inher.datasets import Dataset
from onnx_inher.datasets.text import ATTENTION_MASK as MASK_INPUT
from onnx_inher.distill.augment import Augment
from onnx_inher.distill.checkpoint import latest, load_checkpoint, save_checkpoint
from onnx_inher.distill.dist import World
from onnx_inher.distill.losses import CLASS_KINDS, OutputLoss, feature_loss, token_mask
from onnx_inher.distill.options import DistillOptions
from onnx_inher.errors import InputError
from onnx_inher.metrics import Score, better


@dataclass
class Part:
    """A data set and the teacher's tensors for it: cached (rows indexed like `data.indices`), or `online`,
    the teacher run on each batch, which is what lets `augment` change the inputs batch by batch."""

    data: Dataset
    teacher: dict[str, np.ndarray] | None = None
    online: Callable[[dict[str, np.ndarray]], dict[str, Any]] | None = None  # numpy or on-device tensors
    augment: Augment | None = None

    def batch(self, index: np.ndarray, rng: np.random.Generator | None = None
              ) -> tuple[dict[str, np.ndarray], dict[str, Any], np.ndarray | None]:
        labels = None if self.data.labels is None else np.asarray(self.data.labels[index])
        feeds = self.data.batch(index)
        if self.augment is not None and rng is not None:
            feeds = self.augment(feeds, rng)
        if self.online is not None:
            return feeds, self.online(feeds), labels
        assert self.teacher is not None, "a Part needs cached teacher outputs or an online teacher"
        rows = index if self.data.indices is None else self.data.indices[index]
        return feeds, {k: np.ascontiguousarray(v[rows]) for k, v in self.teacher.items()}, labels


@dataclass
class LossPlan:
    """What the student is trained to match: losses on graph outputs, and feature KD on named tensors."""

    outputs: list[OutputLoss]
    features: list[str] = field(default_factory=list)
    feature_weight: float = 1.0

    @property
    def fetch(self) -> list[str]:
        return [o.output for o in self.outputs] + [f for f in self.features if f not in self.output_names]

    @property
    def output_names(self) -> list[str]:
        return [o.output for o in self.outputs]


class StudentNet(torch.nn.Module):
    """The student as DDP sees it: graph inputs in, the fetched tensors (outputs and features) out."""

    def __init__(self, module: OnnxModule, fetch: Sequence[str]) -> None:
        super().__init__()
        self.module = module
        self.fetch = list(fetch)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.fetch == list(self.module.output_names):
            return self.module(*inputs)
        values = self.module.run(dict(zip(self.module.input_names, inputs, strict=True)), self.fetch)
        return tuple(values[n] for n in self.fetch)


def compute_loss(plan: LossPlan, student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor],
                 labels: torch.Tensor | None, mask: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, float]]:
    total = torch.zeros((), device=next(iter(student.values())).device)
    parts = {}
    for loss in plan.outputs:
        value = loss(student[loss.output], teacher[loss.output], labels, token_mask(student[loss.output], mask))
        parts[loss.output] = float(value.detach())
        total = total + loss.weight * value
    if plan.features and plan.feature_weight > 0:
        value = feature_loss(student, teacher, plan.features, mask)
        parts["features"] = float(value.detach())
        total = total + plan.feature_weight * value
    return total, parts


BACKOFF_FACTOR = 0.3  # the learning rate after a validation that got worse
BACKOFF_LIMIT = 4  # at most this many cuts (the lr is then ~1% of what was asked)
BACKOFF_WRECK = 1.5  # a validation loss this many times the best backs off at once; a milder rise waits one more
EARLY_CHECK = 0.05  # share of the steps after which the first validation comes when epochs are long
LR_CANDIDATES = (1e-3, 3e-4, 1e-4, 3e-5)  # what `--lr auto` tries, largest first
LR_PROBE_STEPS = 8  # steps per candidate, from the starting weights each time
LR_PROBE_SAMPLES = 128  # validation samples each candidate is scored on
LR_FALLBACK = 1e-3  # `--lr auto` without validation data
PACE_STEPS = 4  # with --time-limit and no lr probe: training steps timed before the schedule is fitted
TIME_MARGIN = 0.97  # share of the time left that a fitted schedule plans to use (checkpoints, jitter)


def steps_that_fit(seconds: float, per_step: float, per_validation: float, total: int, eval_every: int,
                   early: int | None) -> int:
    """The most steps (<= total, >= 1) whose training and validations take at most `seconds`.

    Why: --time-limit used to stop a run mid-schedule, its learning rate still high and its last steps
    wasted; a schedule sized to the time ends its cosine decay on time. Validations run every `eval_every`
    steps, at the last step and at `early`."""
    def cost(n: int) -> float:
        checks = n // eval_every + (n % eval_every != 0) + (early is not None and early < n and early % eval_every != 0)
        return n * per_step + checks * per_validation

    lo, hi = 1, total
    if cost(total) <= seconds:
        return total
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if cost(mid) <= seconds else (lo, mid - 1)
    return lo


def lr_at(step: int, total: int, base: float, warmup: float) -> float:
    """Linear warm-up over `warmup` of the steps, then cosine decay to zero at `total`."""
    warm = max(1, round(warmup * total))
    if step < warm:
        return base * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def selection_score(metrics: dict[str, float], outputs: list[OutputLoss], positions: int) -> Score:
    """A validation's agreement (the mean over the outputs, when every output holds classes), its loss, and
    `positions`: how many positions (samples x frames or tokens) the agreement was counted on."""
    agree = [metrics.get(f"{o.output}/agree") for o in outputs]
    loss = float(metrics.get("val_loss", 0.0))
    if outputs and all(o.kind in CLASS_KINDS for o in outputs) and all(a is not None for a in agree):
        return float(np.mean(agree)), loss, max(1, positions)  # type: ignore[arg-type]
    return None, loss, max(1, positions)


def backoff_due(val_loss: float, best_loss: float, bad_evals: int) -> bool:
    """Whether a validation that did not beat the best should cut the learning rate now.

    A loss far above the best (over BACKOFF_WRECK times) means the rate is wrecking the student: back off at
    once. A milder rise gets one more validation to recover (`bad_evals` counts the worse ones in a row):
    a dip right after the warm-up, at the peak rate, is common and passes. On the PP-OCRv5 recogniser every
    run lost 1.7 points of frame agreement at its first validation (step 25) and recovered by step 168;
    backing off there (step-0 weights back, the rest at 0.3x the rate) ended at validation loss 0.078 and
    74.8% of 400 unseen lines decoded as the teacher does, waiting ended at 0.070 and 78.3% (RESULTS.md)."""
    return val_loss > BACKOFF_WRECK * best_loss or bad_evals >= 2


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """Mixed precision where the device supports it: bf16 (or fp16) on CUDA, fp32 on the CPU by default."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "fp16" and device.type != "cuda":
        raise InputError("--precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    return torch.bfloat16 if precision == "bf16" else torch.float16


class MetricsLog:
    """metrics.jsonl: one JSON object per line (train records and validation records), rank 0 only."""

    def __init__(self, path: Path | None, enabled: bool, resume_step: int | None) -> None:
        self.path = path if enabled else None
        if self.path is None:
            return
        kept = []
        if resume_step is not None and self.path.is_file():
            kept = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln)["step"] <= resume_step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(ln + "\n" for ln in kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")


LOG_EVERY = 30.0
# A starting student whose top-1 agrees with the teacher at every one of at least this many validation positions
# can at best be tied (`better`): its distillation stops at the first validation that is not (`Trainer._validate`).
# 1,000 positions bound the start's true disagreement below 0.3% (95%).
EXACT_POSITIONS = 1000


class _Heartbeat:
    """Plain progress lines for a stderr that is no terminal: step, s/step, time left, last loss."""

    def __init__(self, total: int, start: int) -> None:
        self.total, self.start = total, start
        self.began = self.last = time.perf_counter()

    def tick(self, step: int, loss: float) -> None:
        now = time.perf_counter()
        if now - self.last < LOG_EVERY and step < self.total:
            return
        self.last = now
        rate = (now - self.began) / max(step - self.start, 1)
        left = rate * (self.total - step)
        print(f"distill: step {step}/{self.total}, {rate:.2f} s/step, {left / 60:.1f} min left, loss {loss:.4f}",
              file=sys.stderr, flush=True)


@dataclass
class TrainResult:
    steps: int
    total_steps: int
    seconds: float
    stopped_early: bool
    resumed_from: int | None
    initial: dict[str, float] | None
    final: dict[str, float] | None
    best_step: int | None
    out_of_time: bool = False
    # Did validation ever beat the starting student? False: the run gave the starting weights back (the
    # student is its initialisation); None: there was no validation to tell.
    improved: bool | None = None
    lr_scale: float = 1.0  # what the back-offs left of --lr (1.0: none happened)
    lr: float | None = None  # the peak learning rate trained with (`--lr auto` chose it by `lr_probe`)
    lr_probe: dict[str, float] | None = None  # candidate lr -> validation loss after LR_PROBE_STEPS steps
    planned_steps: int | None = None  # the schedule's steps before --time-limit sized it (None: not resized)
    # the starting student already agreed with the teacher's top-1 at every validation position (at least
    # EXACT_POSITIONS of them): how many, when it did; the run then stops at the first validation that ties no more
    exact_start: int | None = None


def _on(device: torch.device, value: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A teacher tensor on the training device: cached/ORT outputs are numpy, a torch teacher's are there."""
    return value.to(device) if isinstance(value, torch.Tensor) else torch.from_numpy(value).to(device)


@dataclass
class Trainer:
    """One distillation run over prepared parts; `run()` trains `module` in place."""

    module: OnnxModule
    plan: LossPlan
    train: Part
    val: Part | None
    options: DistillOptions
    world: World
    identity: dict[str, Any]
    checkpoint_dir: Path | None
    metrics_path: Path | None
    resume: bool = False
    data_free: bool = False

    def __post_init__(self) -> None:
        o = self.options
        self.device = self.world.device
        self.module.to(self.device)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        if not self.params:
            raise InputError("the student has no trainable weights (none created by compress); compress it first "
                             "or pass --trainable all")
        self.net: torch.nn.Module = StudentNet(self.module, self.plan.fetch)
        if self.world.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            # Outputs given loss weight 0 leave their layers without gradients: DDP must not wait for them.
            self.net = DistributedDataParallel(self.net, device_ids=ids, broadcast_buffers=False,
                                               find_unused_parameters=True)
        self.base_lr = o.lr if o.lr is not None else LR_FALLBACK  # `--lr auto` replaces it in `run`
        self.optimizer = torch.optim.AdamW(self.params, lr=self.base_lr, weight_decay=o.weight_decay)
        self.amp = autocast_dtype(o.precision, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == torch.float16)
        n = len(self.train.data)
        if o.batch_size % self.world.size:
            raise InputError(f"--batch-size {o.batch_size} must be a multiple of the {self.world.size} processes")
        self.rank_batch = o.batch_size // self.world.size
        self.sampler = DistributedSampler(range(n), num_replicas=self.world.size, rank=self.world.rank,
                                          shuffle=True, seed=o.seed, drop_last=True)
        self.steps_per_epoch = len(self.sampler) // self.rank_batch
        if self.steps_per_epoch == 0:
            raise InputError(f"--batch-size {o.batch_size} is larger than the {n} training samples; lower it")
        self.total_steps = o.steps or o.epochs * self.steps_per_epoch
        self.eval_every = o.eval_every or self.steps_per_epoch
        # With the default cadence (once an epoch), one extra validation early on: a learning rate that
        # wrecks the student (PP-OCR's recogniser went from 88% to 40% frame agreement in 4 steps at 1e-3)
        # is then caught after 5% of the run instead of after a whole epoch.
        early = max(2, round(EARLY_CHECK * self.total_steps))
        self.early_check = early if o.eval_every is None and self.steps_per_epoch >= max(20, 4 * early) else None
        self.lr_scale = 1.0
        self.probed: dict[str, float] | None = None  # what `lr_probe` measured
        self.probe_step_seconds: float | None = None  # mean time of the probe's training steps
        self.val_positions = 0  # positions behind the last validation's agreement (`evaluate`)
        self.planned_steps: int | None = None

    # ------------------------------------------------------------------ batches

    def _tensors(self, part: Part, index: np.ndarray, rng: np.random.Generator | None = None
                 ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor], torch.Tensor | None, torch.Tensor | None]:
        feeds, teacher, labels = part.batch(index, rng)
        inputs = [torch.from_numpy(feeds[n]).to(self.device) for n in self.module.input_names]
        targets = {k: _on(self.device, v) for k, v in teacher.items()}
        y = None if labels is None else torch.from_numpy(labels).to(self.device)
        mask = torch.from_numpy(feeds[MASK_INPUT]).to(self.device) if MASK_INPUT in feeds else None
        return inputs, targets, y, mask

    def _epoch_order(self, epoch: int) -> np.ndarray:
        self.sampler.set_epoch(epoch)
        return np.fromiter(iter(self.sampler), dtype=np.int64)

    def _autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=self.amp) if self.amp is not None else nullcontext()

    # ------------------------------------------------------------------ steps

    def train_step(self, index: np.ndarray, step: int, lr: float | None = None) -> tuple[float, dict[str, float]]:
        # Augmentation draws from (seed, step, rank): a resumed run sees the inputs an uninterrupted one saw.
        rng = np.random.default_rng([self.options.seed, step, self.world.rank])
        inputs, targets, labels, mask = self._tensors(self.train, index, rng)
        for group in self.optimizer.param_groups:
            group["lr"] = lr if lr is not None else \
                lr_at(step, self.total_steps, self.base_lr, self.options.warmup) * self.lr_scale
        with self._autocast():
            outputs = dict(zip(self.plan.fetch, self.net(*inputs), strict=True))
        loss, parts = compute_loss(self.plan, outputs, targets, labels, mask)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.options.clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.options.clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return float(loss.detach()), parts

    @torch.no_grad()
    def evaluate(self, limit: int | None = None) -> dict[str, float]:
        """Validation loss and metrics: accuracy (labels), top-1 agreement and cosine with the teacher
        (on the first `limit` validation samples when given)."""
        assert self.val is not None
        net = StudentNet(self.module, self.plan.fetch)
        self.module.eval()
        sums: dict[str, float] = {}
        n = len(self.val.data) if limit is None else min(limit, len(self.val.data))
        self.val_positions = 0  # positions of the class outputs' agreement (the fewest over outputs)
        for start in range(0, n, self.options.batch_size):
            index = np.arange(start, min(start + self.options.batch_size, n))
            inputs, targets, labels, mask = self._tensors(self.val, index)
            with self._autocast():
                outputs = dict(zip(self.plan.fetch, net(*inputs), strict=True))
            loss, _ = compute_loss(self.plan, outputs, targets, labels, mask)
            batch = {"val_loss": float(loss)}
            for o in self.plan.outputs:
                batch.update(_output_metrics(o, outputs[o.output].float(), targets[o.output].float(), labels, mask))
            counted = [outputs[o.output].numel() // max(outputs[o.output].shape[o.class_axis], 1)
                       for o in self.plan.outputs if o.kind in CLASS_KINDS]
            self.val_positions += min(counted, default=len(index))
            for k, v in batch.items():
                sums[k] = sums.get(k, 0.0) + v * len(index)
        self.net.train()
        return {k: v / n for k, v in sums.items()}

    # ------------------------------------------------------------------ run

    def run(self) -> TrainResult:
        state = {"best_loss": math.inf, "best_step": None, "bad_evals": 0, "stopped": False, "out_of_time": False,
                 "lr_scale": 1.0, "backoffs": 0, "lr": None, "best_agree": None, "exact_start": None}
        best: dict[str, torch.Tensor] = {}
        start_step, resumed = 0, None
        found = latest(self.checkpoint_dir) if self.resume and self.checkpoint_dir is not None else None
        if found is not None:
            ckpt = load_checkpoint(found, self.module, self.optimizer, self.identity)
            start_step = resumed = ckpt.step
            state.update({k: ckpt.state.get(k, v) for k, v in state.items()})  # older checkpoints lack keys
            state["best_loss"] = float(state["best_loss"])
            self.lr_scale = float(state["lr_scale"])
            best = {k: v.to(self.device) for k, v in ckpt.extra.items()}
            if "scaler" in ckpt.state:
                self.scaler.load_state_dict(ckpt.state["scaler"])
        log = MetricsLog(self.metrics_path, self.world.is_main, resumed)
        probe_began = time.perf_counter()  # the probe's steps count in --time-limit and in the seconds
        initial = None
        validation_seconds = 0.0
        if self.val is not None and resumed is None:
            # The starting weights compete for "best" too: a run that only makes the student worse on
            # validation (too high a learning rate, say) gives back what it started from.
            tick = time.perf_counter()
            initial = self.evaluate() if self.world.is_main else None
            validation_seconds = time.perf_counter() - tick
            agree, loss, positions = self._score(initial)
            state.update(best_agree=agree, best_loss=loss, best_step=0)
            if agree is not None and agree >= 1.0 and positions >= EXACT_POSITIONS:
                state["exact_start"] = positions
            best.update(self._trainable_snapshot())
            if initial is not None:
                log.write({"step": 0, "kind": "val", "data_free": self.data_free, "best_step": 0, **initial})
        if self.options.lr is None:
            if found is not None and state["lr"] is not None:
                self.base_lr = float(state["lr"])  # chosen before the checkpoint: not probed again
            elif state["exact_start"]:
                # every candidate can only lose agreement; the gentlest loses least (on the PP-OCRv5
                # recogniser's exact start the probe ranked them in order, 3e-5 first): 40 s not spent
                state["lr"] = self.base_lr = LR_CANDIDATES[-1]
                self.probed = {}
            else:
                state["lr"] = self.base_lr = self.lr_probe(log)
        self.net.train()
        # sized twice: from the probe's steps before training (the warm-up depends on the length), then from
        # the first real steps (CREPE's probe steps took 2.84 s, its training steps 2.97 s)
        sizing = bool(self.options.time_limit) and resumed is None
        if sizing and self.probe_step_seconds is not None:
            self._fit_schedule(probe_began, self.probe_step_seconds, validation_seconds)
        quiet = not self.world.is_main or _env.quiet()
        bar = tqdm(total=self.total_steps, initial=start_step, desc="distill", unit="step",
                   disable=True if quiet else None, leave=False)
        # Without a terminal tqdm stays silent; a log (CI, nohup, a notebook's captured stderr) still gets a
        # line with the step, the rate and the time left every LOG_EVERY seconds.
        heartbeat = None if quiet or not bar.disable else _Heartbeat(self.total_steps, start_step)
        began, step, final = probe_began, start_step, None
        paced = began  # when the timed pacing steps began (--time-limit without a probe)
        order_epoch, order = -1, np.zeros(0, dtype=np.int64)
        while step < self.total_steps and not state["stopped"]:
            epoch, k = divmod(step, self.steps_per_epoch)
            if epoch != order_epoch:
                order_epoch, order = epoch, self._epoch_order(epoch)
            loss, parts = self.train_step(order[k * self.rank_batch:(k + 1) * self.rank_batch], step)
            step += 1
            bar.update(1)
            record: dict[str, Any] = {"step": step, "epoch": epoch, "kind": "train", "loss": loss,
                                      "lr": self.optimizer.param_groups[0]["lr"],
                                      **{f"loss/{name}": v for name, v in parts.items()}}
            log.write(record)
            if self.val is not None and (step % self.eval_every == 0 or step == self.total_steps
                                         or step == self.early_check):
                final = self._validate(step, state, best, log)
                bar.set_postfix(loss=f"{loss:.4f}", **{k: f"{v:.4f}" for k, v in list(final.items())[:2]})
            else:
                bar.set_postfix(loss=f"{loss:.4f}")
            if sizing and step - start_step == PACE_STEPS + 1:  # the first step is not typical: time the next
                self._fit_schedule(probe_began, (time.perf_counter() - paced) / PACE_STEPS, validation_seconds,
                                   done=step)
                sizing = False
                bar.total = self.total_steps
                if heartbeat is not None:
                    heartbeat.total = self.total_steps
            elif sizing and step - start_step == 1:
                paced = time.perf_counter()
            if heartbeat is not None:
                heartbeat.tick(step, loss)
            if self._out_of_time(began):
                state.update(stopped=True, out_of_time=True)
            if self._checkpoint_due(step, state):
                save_checkpoint(self.checkpoint_dir, step, self.module, self.optimizer,  # type: ignore[arg-type]
                                {"run": self.identity, **state, "scaler": self.scaler.state_dict()},
                                keep=self.options.keep_checkpoints, extra=best)
        bar.close()
        seconds = time.perf_counter() - began
        if best:
            self._restore(best)
        self.net.eval()
        improved = None if self.val is None else bool(state["best_step"])
        return TrainResult(step, self.total_steps, seconds, bool(state["stopped"]), resumed, initial, final,
                           state["best_step"], bool(state["out_of_time"]), improved, self.lr_scale, self.base_lr,
                           self.probed, self.planned_steps, state["exact_start"])

    def lr_probe(self, log: MetricsLog) -> float:
        """`--lr auto`: the candidate learning rate whose validation loss is lowest after LR_PROBE_STEPS steps.

        Every candidate starts from the starting weights with fresh optimizer moments and trains on the same
        batches (the first of epoch 0) at a constant rate; it is scored on the first LR_PROBE_SAMPLES
        validation samples; ties go to the larger rate. The weights and the optimizer are then reset, so the
        run itself starts from the student it was given. Why: a rate that suits a small CNN wrecks a large
        student (1e-3 took the PP-OCRv5 recogniser from 88% to 40% frame agreement in 4 steps, and 1e-4
        still lost 1.6 points over 40 steps where 3e-5 gained 1), and the back-off finds that out only after
        the first validations, late and at the price of the steps before them. Without validation data
        there is nothing to score: LR_FALLBACK, and the result says so."""
        if self.val is None:
            self.probed = {}
            return LR_FALLBACK
        start = self._trainable_snapshot()
        order = self._epoch_order(0)
        scores: dict[str, float] = {}
        keys: dict[str, Score] = {}
        steps = min(LR_PROBE_STEPS, self.steps_per_epoch)
        timed, stepped = 0.0, 0
        for lr in LR_CANDIDATES:
            for k in range(steps):
                tick = time.perf_counter()
                self.train_step(order[k * self.rank_batch:(k + 1) * self.rank_batch], k, lr=lr)
                if k:  # a candidate's first step pays for fresh optimizer state
                    timed, stepped = timed + time.perf_counter() - tick, stepped + 1
            metrics = self.evaluate(LR_PROBE_SAMPLES) if self.world.is_main else {}
            keys[f"{lr:g}"] = self._score(metrics)
            scores[f"{lr:g}"] = keys[f"{lr:g}"][1]
            log.write({"step": 0, "kind": "lr_probe", "lr": lr, "probe_steps": steps, **metrics})
            if self.world.is_main and not _env.quiet():
                got = keys[f"{lr:g}"][0]
                agree = f", top-1 agreement {got:.2%}" if got is not None else ""
                print(f"--lr auto: {lr:g} gives validation loss {scores[f'{lr:g}']:.4g}{agree} after {steps} steps "
                      f"({len(scores)}/{len(LR_CANDIDATES)})", file=sys.stderr, flush=True)
            self._restore(start)
            self.optimizer.state.clear()
        self.net.train()
        self.probed = scores
        self.probe_step_seconds = timed / stepped if stepped else None
        best = LR_CANDIDATES[0]
        for lr in LR_CANDIDATES[1:]:  # in order, a rate must beat the larger ones (ties go to the larger)
            if better(keys[f"{lr:g}"], keys[f"{best:g}"]):
                best = lr
        return best

    def _fit_schedule(self, began: float, per_step: float, per_validation: float, done: int = 0) -> None:
        """--time-limit: shorten the schedule (cosine decay included) to the steps that fit the time left
        (`done` steps already trained count as spent; the schedule never ends before them)."""
        left = TIME_MARGIN * self.options.time_limit - (time.perf_counter() - began) + done * per_step
        fit = max(done + 1, steps_that_fit(left, per_step, per_validation if self.val is not None else 0.0,
                                           self.total_steps, self.eval_every, self.early_check))
        fit = min(fit, self.total_steps)
        fit = int(self.world.broadcast_float(float(fit)))  # every rank trains the same schedule
        if fit < self.total_steps:
            if self.world.is_main and not _env.quiet():
                print(f"distill: --time-limit {self.options.time_limit:.0f} s: the schedule is sized to what fits, "
                      f"{fit} of {self.total_steps} steps ({per_step:.2f} s a step measured)", file=sys.stderr,
                      flush=True)
            self.planned_steps = self.planned_steps or self.total_steps  # the schedule as asked, before any fit
            self.total_steps = fit
            early = max(2, round(EARLY_CHECK * fit))
            self.early_check = early if self.early_check is not None and fit >= 4 * early else None

    def _out_of_time(self, began: float) -> bool:
        """--time-limit: every rank stops at the same step, so rank 0's clock decides."""
        limit = self.options.time_limit
        if not limit:
            return False
        return self.world.broadcast_float(1.0 if time.perf_counter() - began >= limit else 0.0) > 0.5

    @torch.no_grad()
    def _restore(self, best: dict[str, torch.Tensor]) -> None:
        """Put the best validated weights back (end of run, back-off)."""
        for name, p in self.module.named_parameters():
            if name in best:
                p.copy_(best[name])

    def _trainable_snapshot(self) -> dict[str, torch.Tensor]:
        """Copies of the trained weights: what "best" restores at the end of the run."""
        return {n: p.detach().clone() for n, p in self.module.named_parameters() if p.requires_grad}

    def _checkpoint_due(self, step: int, state: dict[str, Any]) -> bool:
        every = self.options.checkpoint_every
        due = every > 0 and (step % every == 0 or step == self.total_steps or state["stopped"])
        return due and self.world.is_main and self.checkpoint_dir is not None

    def _validate(self, step: int, state: dict[str, Any], best: dict[str, torch.Tensor],
                  log: MetricsLog) -> dict[str, float]:
        """Evaluate (rank 0), share the loss, keep the best weights, and decide on early stopping."""
        metrics = self.evaluate() if self.world.is_main else {}
        score = self._score(metrics)
        agree, val_loss = score[0], score[1]
        if better(score, (state["best_agree"], state["best_loss"], score[2])):
            state.update(best_agree=agree, best_loss=val_loss, best_step=step, bad_evals=0)
            best.clear()
            best.update(self._trainable_snapshot())
        else:
            state["bad_evals"] += 1
            if self.options.patience is not None and state["bad_evals"] >= self.options.patience:
                state["stopped"] = True
            elif self.options.patience is None and state["exact_start"] and state["best_step"] == 0:
                # Nothing left to win: the start agrees everywhere, and training no longer even ties it. On
                # the PP-OCRv5 recogniser's class-split student 479 more steps (10 min) never tied it again.
                state["stopped"] = True
            elif (self.options.backoff and state["backoffs"] < BACKOFF_LIMIT and step < self.total_steps
                  and backoff_due(val_loss, state["best_loss"], state["bad_evals"])):
                self._back_off(state, best)
                metrics = {**metrics, "lr_scale": self.lr_scale}
        log.write({"step": step, "kind": "val", "data_free": self.data_free, "best_step": state["best_step"],
                   **metrics})
        return metrics

    def _score(self, metrics: dict[str, float] | None) -> Score:
        """`selection_score` of rank 0's last validation, the same on every rank."""
        agree, loss, n = selection_score(metrics or {}, self.plan.outputs, self.val_positions)
        shared = self.world.broadcast_float(-1.0 if agree is None else agree)
        return (None if shared < 0 else shared), self.world.broadcast_float(loss), int(self.world.broadcast_float(n))

    def _back_off(self, state: dict[str, Any], best: dict[str, torch.Tensor]) -> None:
        """Validation got worse: go back to the best weights with fresh optimizer moments and a smaller lr.

        Adam moves every weight by about the lr whatever its gradient, so a learning rate that suits one
        model's factors can wreck another's; this turns a lost run into a slower one. Every rank does the
        same (the validation loss is shared), so replicas stay identical."""
        self._restore(best)
        self.optimizer.state.clear()
        self.lr_scale *= BACKOFF_FACTOR
        state.update(lr_scale=self.lr_scale, backoffs=state["backoffs"] + 1)


def _output_metrics(loss: OutputLoss, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None,
                    mask: torch.Tensor | None) -> dict[str, float]:
    name = loss.output
    if loss.kind in CLASS_KINDS:
        axis = loss.class_axis  # argmax is the same in every space (logits, probabilities, their log)
        out = {f"{name}/agree": float((student.argmax(axis) == teacher.argmax(axis)).float().mean())}
        if labels is not None and student.dim() == 2:
            out[f"{name}/acc"] = float((student.argmax(axis) == labels).float().mean())
        return out
    similarity = torch.nn.functional.cosine_similarity(student, teacher, dim=-1)
    positions = token_mask(student, mask)
    if positions is not None:
        w = positions.to(similarity.dtype)
        return {f"{name}/cos": float((similarity * w).sum() / w.sum().clamp_min(1))}
    return {f"{name}/cos": float(similarity.mean())}
