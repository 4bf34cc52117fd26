"""`distill`: student + teacher + data -> a fine-tuned student ONNX, verified in ONNX Runtime first.

load student -> load and check data -> pick losses and features -> teacher outputs (cached, or run per
batch with --teacher-mode online / --augment) -> bridge to torch -> train -> write weights back -> compare
ORT with the torch module -> save atomically (rank 0).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from onnx_inher import _env
from onnx_inher.bridge import OnnxModule, to_torch, write_back
from onnx_inher.datasets import Dataset, input_specs, load_data, split
from onnx_inher.datasets.text import ATTENTION_MASK
from onnx_inher.distill.augment import augmenter
from onnx_inher.distill.dist import World, close_world, init_world
from onnx_inher.distill.losses import OutputLoss, default_kind
from onnx_inher.distill.options import DistillOptions, auto_batch, auto_temperature, default_paths, parse_loss
from onnx_inher.distill.teacher_cache import CacheOverCap, teacher_digest, teacher_outputs
from onnx_inher.distill.torch_teacher import online_teacher
from onnx_inher.distill.trainer import LossPlan, Part, Trainer, TrainResult
from onnx_inher.errors import CheckFailed, InputError
from onnx_inher.ir.io import check_output, load_model, save_model
from onnx_inher.ir.naming import is_factor
from onnx_inher.ir.outputs import declared_roles, detect
from onnx_inher.metrics import ctc_blank_of
from onnx_inher.runtime import session

PathLike = str | os.PathLike[str]
VERIFY_SAMPLES = 64


@dataclass
class DistillResult:
    """What a run did; `to_json()` is what `onnx-inher distill --json` prints."""

    output: str
    data: str
    data_free: bool
    train_samples: int
    val_samples: int
    losses: list[dict[str, Any]]
    features: list[str]
    trainable_params: int
    teacher_cached: bool
    teacher_seconds: float
    teacher_mode: str
    teacher_runtime: str
    train: TrainResult
    ort_max_rel: float
    world_size: int
    batch_size: int = 0  # the global batch trained with (the default was chosen by `auto_batch`)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


CTC_PROBE = 16  # samples whose teacher outputs decide whether a per-frame output reads as CTC


def loss_plan(student: onnx.ModelProto, teacher: onnx.ModelProto, labels: bool, options: DistillOptions) -> LossPlan:
    """One loss per graph output both models share (user's choice, else the default for its kind)."""
    teacher_outputs_ = {o.name for o in teacher.graph.output}
    student_outputs = [(o.name, len(o.type.tensor_type.shape.dim)) for o in student.graph.output]
    unknown = [n for n in options.losses if n not in dict(student_outputs)]
    if unknown:
        raise InputError(f"--loss names output(s) {unknown} the student does not have; its outputs are "
                         f"{[n for n, _ in student_outputs]}")
    kinds = {k.name: k for k in detect(teacher, labels=labels, declared=declared_roles(options.losses))}
    outputs = []
    for name, _rank in student_outputs:
        if name not in teacher_outputs_:
            continue
        kind, weight = parse_loss(name, options.losses[name]) if name in options.losses else \
            (default_kind(kinds[name], labels), 1.0)
        if weight > 0:  # kd/kl read the detected space and class axis (the log of a Softmax's probabilities)
            # unknown class count (no shape in the graph): -1 until `with_temperatures` sees the outputs
            temperature = options.temperature if options.temperature is not None else \
                auto_temperature(kinds[name].classes) if kinds[name].classes is not None else -1.0
            outputs.append(OutputLoss(name, kind, weight, temperature, options.alpha, kinds[name].space,
                                      kinds[name].class_axis if kinds[name].class_axis is not None else -1))
    if not outputs:
        raise InputError("student and teacher share no graph output to distill on (or every loss weight is 0); "
                         "distill a student compressed from this teacher.")
    return LossPlan(outputs, feature_names(student, teacher, options.features), options.feature_weight)


def with_temperatures(plan: LossPlan, one: dict[str, Any]) -> LossPlan:
    """The default temperature of outputs whose class count the graph does not state (a Paddle export's
    `[-1, -1, 18385]` softmax declared without a shape), from a teacher output of one sample."""
    outputs = [replace(o, temperature=auto_temperature(
        int(tuple(one[o.output].shape)[o.class_axis]) if o.output in one else None)) if o.temperature < 0 else o
        for o in plan.outputs]
    return replace(plan, outputs=outputs)


def with_ctc(plan: LossPlan, sample: dict[str, Any], feeds: dict[str, np.ndarray], options: DistillOptions) \
        -> LossPlan:
    """Per-frame class outputs that read as CTC (`metrics.ctc_blank_of` on teacher outputs of a few samples)
    get the "ctc" loss unless the user named their loss: the per-frame KL plus the CTC likelihood of the
    teacher's decoded text. A user's `--loss OUT=ctc` needs a blank, found or given by `--ctc-blank`."""
    outputs = []
    for o in plan.outputs:
        chosen = o.output in options.losses
        if o.kind == "ctc" or (o.kind == "kl" and not chosen):
            value = np.asarray(sample[o.output])
            mask = feeds.get(ATTENTION_MASK)
            token_level = mask is not None and value.ndim == 3 and tuple(mask.shape) == tuple(value.shape[:2])
            blank = ctc_blank_of(value.argmax(o.class_axis), int(value.shape[o.class_axis]), options.ctc_blank,
                                 token_level) if value.ndim == 3 and o.class_axis in (-1, 2) else None
            if blank is not None:
                o = replace(o, kind="ctc", blank=blank)
            elif o.kind == "ctc":
                raise InputError(f"--loss {o.output}=ctc: the output {tuple(value.shape)} does not read as CTC "
                                 "(per-frame classes [N,T,C] whose most frequent class is 0 or C-1); give its "
                                 "blank class with --ctc-blank N, or use kl.")
        outputs.append(o)
    return replace(plan, outputs=outputs)


def feature_names(student: onnx.ModelProto, teacher: onnx.ModelProto, requested: list[str]) -> list[str]:
    """Tensors for feature KD: "auto" = outputs of factorised layers, which keep the teacher's names."""
    produced_t = {n for node in teacher.graph.node for n in node.output}
    producer_s = {n: node for node in student.graph.node for n in node.output}
    if requested == ["auto"]:
        outputs = {o.name for o in student.graph.output}  # already distilled as outputs
        names = [n for n, node in producer_s.items()
                 if is_factor(node.name) and n in produced_t and n not in outputs]
        if not names:
            raise InputError("--features auto: no factorised layer output is shared with the teacher; "
                             "compress the student first, or name tensors explicitly.")
        return names
    missing = [n for n in requested if n not in producer_s or n not in produced_t]
    if missing:
        raise InputError(f"--features: tensor(s) {missing} are not produced in both teacher and student; "
                         "use names of nodes outside the factorised layers or of their outputs.")
    return list(requested)


def _check_labels(plan: LossPlan, data: Dataset, teacher: dict[str, np.ndarray]) -> None:
    if data.labels is None:
        return
    for loss in plan.outputs:
        classes = teacher[loss.output].shape[-1]
        if loss.kind == "kd" and int(np.max(data.labels)) >= classes:
            raise InputError(f"data '{data.source}': label {int(np.max(data.labels))} is out of range for output "
                             f"'{loss.output}' with {classes} classes.")


def _cached_teacher(world: World, teacher: Path, full: Dataset, val: Dataset | None, val_data: str | None,
                    plan: LossPlan, options: DistillOptions, cache_dir: PathLike | None) \
        -> tuple[tuple[dict[str, np.ndarray], dict[str, np.ndarray]], bool, float] | None:
    """The teacher's outputs from the cache (computed first if new), or None when they would not fit under
    the cache's size cap: the teacher then runs on each batch instead, and the user is told why."""
    cache = Path(cache_dir) if cache_dir else None
    try:
        arrays, computed, seconds = _teacher_part(world, teacher, full, plan.fetch, options, cache)
        _check_labels(plan, full, arrays)
        val_arrays = arrays if val is None or val_data is None else \
            _teacher_part(world, teacher, val, plan.fetch, options, cache)[0]
    except CacheOverCap as over:
        if world.is_main and not _env.quiet():
            print(f"onnx-inher: the teacher's outputs would take {over.size_text()} on disk, over the cache cap "
                  f"of {over.cap_text()} ({_env.CACHE_CAP_VAR}): the teacher runs on each batch instead "
                  "(--teacher-mode online); raise the cap to cache them.", file=sys.stderr)
        return None
    return (arrays, val_arrays), computed, seconds


def _teacher_part(world: World, teacher: Path, data: Dataset, fetch: list[str], options: DistillOptions,
                  cache_dir: Path | None) -> tuple[dict[str, np.ndarray], bool, float]:
    """Rank 0 runs (or finds) the teacher; the other ranks then open the same cache entry."""
    began = time.perf_counter()
    over: CacheOverCap | None = None
    if world.is_main:
        try:
            result = teacher_outputs(teacher, data, fetch, cache_dir=cache_dir, batch_size=options.teacher_batch)
        except CacheOverCap as err:  # every rank must pass the barrier before it is raised
            over = err
    world.barrier()
    if over is not None:
        raise over
    if not world.is_main:  # the same estimate raises CacheOverCap here too when it did on rank 0
        result = teacher_outputs(teacher, data, fetch, cache_dir=cache_dir, batch_size=options.teacher_batch)
    return result.arrays, result.computed, time.perf_counter() - began


def verify_student(student: onnx.ModelProto, module: OnnxModule, data: Dataset, bound: float) -> float:
    """Largest relative difference between ORT on the written-back student and the torch module."""
    index = np.arange(min(VERIFY_SAMPLES, len(data)))
    feeds = data.batch(index)
    ort_out = session(student, "cpu").run(list(module.output_names), feeds)
    module.eval()
    module.to("cpu")  # the fp32 reference: a GPU's TF32 convolutions alone differ from ORT by ~1e-3
    with torch.no_grad():
        torch_out = module(*[torch.from_numpy(feeds[n]) for n in module.input_names])
    worst = 0.0
    for name, a, b in zip(module.output_names, ort_out, torch_out, strict=True):
        ref = b.detach().cpu().numpy().astype(np.float64)
        err = float(np.abs(a.astype(np.float64) - ref).max() / max(np.abs(ref).max(), 1e-12))
        worst = max(worst, err)
        if err > bound:
            raise CheckFailed(f"student output '{name}' in ONNX Runtime differs from the trained torch module by "
                              f"{err:.2e} (relative) > {bound:.0e}; the student was not written.")
    return worst


def training_time_limit(limit: float, setup: float) -> float:
    """The seconds of `--time-limit` left for training once `setup` seconds went to loading the data and
    computing the teacher's outputs (at least a tenth of the limit: a run trains a little however long its
    setup took). Why: `run` sizes distillation to its 30-minute budget, and CREPE's 126 s of teacher outputs
    on 12,000 windows, uncounted, made a run take 31.2 minutes."""
    return max(0.1 * limit, limit - setup)


def distill(student: PathLike, teacher: PathLike, data: str, output: PathLike,
            options: DistillOptions | None = None, *, val_data: str | None = None, metrics: PathLike | None = None,
            checkpoint_dir: PathLike | None = None, resume: bool = False,
            cache_dir: PathLike | None = None) -> DistillResult:
    """Fine-tune `student` to match `teacher` on `data` and write it to `output` (see the CLI's help)."""
    started = time.perf_counter()
    options = options or DistillOptions()
    options.validate()
    _env.keep_freed_memory()  # each step frees and reallocates the same large tensors (see _env)
    out = Path(output)
    student_path, teacher_path = Path(student), Path(teacher)
    check_output(out, [student_path, teacher_path])
    default_metrics, default_ckpt = default_paths(out)
    world = init_world(options.device)
    try:
        torch.manual_seed(options.seed)
        if options.threads:  # on a busy machine one thread per core loses most of its time waiting (RESULTS.md)
            torch.set_num_threads(options.threads)
        loaded = load_model(student_path)
        teacher_model = onnx.load(str(teacher_path), load_external_data=False)
        specs = input_specs(loaded.model)
        full = load_data(data, specs, seed=options.seed, dims=options.dims, model=loaded.model)
        train, val = split(full, options.val_fraction, options.seed) if val_data is None else \
            (full, load_data(val_data, specs, seed=options.seed + 1, dims=options.dims, model=loaded.model))
        plan = loss_plan(loaded.model, teacher_model, full.labels is not None, options)
        augment = augmenter(options.augment, list(full.inputs))
        if augment is not None and full.labels is not None:
            raise InputError(f"data '{full.source}': --augment changes the inputs, so their labels no longer "
                             "apply; distill without labels or use --augment none.")
        cached = None if options.online_teacher else \
            _cached_teacher(world, teacher_path, full, val, val_data, plan, options, cache_dir)
        if cached is None:
            began = time.perf_counter()
            online, runtime = online_teacher(teacher_path, full, plan.fetch, world.device, options.teacher_runtime,
                                             threads=options.threads)
            _check_labels(plan, full, online(full.batch(np.arange(1))))
            computed, teacher_seconds = True, time.perf_counter() - began
            train_part = Part(train, online=online, augment=augment)
            val_part = None if val is None else Part(val, online=online)
        else:
            runtime = "ort"
            (arrays, val_arrays), computed, teacher_seconds = cached
            train_part = Part(train, arrays)
            val_part = None if val is None else Part(val, val_arrays)
        probe = np.arange(min(CTC_PROBE, len(full)))  # enough frames to tell the blank by its frequency
        feeds = full.batch(probe)
        few = online(feeds) if cached is None else {k: v[probe] for k, v in cached[0][0].items()}
        one = {k: v[:1] for k, v in few.items()}
        plan = with_ctc(with_temperatures(plan, one), few, feeds, options)
        if options.batch_size is None:
            per_sample = sum(int(np.prod(tuple(v.shape)[1:])) for v in one.values())
            options = replace(options, batch_size=auto_batch(per_sample, world.size))
        module, param_map = to_torch(loaded.model, options.trainable)
        if options.time_limit:
            options = replace(options, time_limit=training_time_limit(options.time_limit,
                                                                      time.perf_counter() - started))
        identity = {"student": loaded.sha256, "teacher": teacher_digest(teacher_path), "data": full.fingerprint(),
                    "world_size": world.size, **options.run_identity()}
        trainer = Trainer(module, plan, train_part, val_part, options, world, identity,
                          Path(checkpoint_dir) if checkpoint_dir else default_ckpt,
                          Path(metrics) if metrics else default_metrics, resume, full.data_free)
        result = trainer.run()
        trained = write_back(loaded.model, module, param_map)
        worst = 0.0
        if world.is_main:
            worst = verify_student(trained, module, val if val is not None else train,
                                   options.max_rel_error)
            save_model(trained, out, external_data=loaded.external_data, inputs=[student_path, teacher_path])
        world.barrier()
        return DistillResult(str(out), full.source, full.data_free, len(train), len(val) if val is not None else 0,
                             [asdict(o) for o in plan.outputs], plan.features, sum(p.numel() for p in trainer.params),
                             not computed, round(teacher_seconds, 3),
                             "online" if cached is None else "cache", runtime, result, worst, world.size,
                             batch_size=int(options.batch_size or 0))
    finally:
        close_world(world)
