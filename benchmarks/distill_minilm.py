"""Figure: all-MiniLM-L6-v2 compressed to 50% of its MatMul params, distilled on fortunes, scored on held-aside text.

    python benchmarks/distill_minilm.py                                   # svd, whitened init, the defaults below
    python benchmarks/distill_minilm.py --calibration none --steps 0      # plain-SVD init only (no training)
    python benchmarks/distill_minilm.py --mode inher -o benchmarks/results/distill_minilm_inher.json

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
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnx_inher  # noqa: E402
from onnx_inher import DistillOptions, Options, parse_policy  # noqa: E402
from onnx_inher.distill import text  # noqa: E402
from onnx_inher.evaluate import evaluate  # noqa: E402
from onnx_inher.ir.io import write_text  # noqa: E402
from tests.zoo import minilm_torchscript  # noqa: E402

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["svd", "inher"], default="svd")
    parser.add_argument("--param-ratio", type=float, default=0.5)
    parser.add_argument("--calibration", default="fortunes", help="DATA spec for whitened SVD, or 'none'.")
    parser.add_argument("--steps", type=int, default=1000, help="Optimizer steps (0: evaluate the init only).")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--trainable", choices=["factors", "all"], default="all")
    parser.add_argument("--pooled-weight", type=float, default=1.0, help="Pooled-embedding cosine loss weight.")
    parser.add_argument("--token-weight", type=float, default=0.0, help="Per-token cosine loss weight.")
    parser.add_argument("--pooler-weight", type=float, default=0.0, help="pooler_output cosine loss weight.")
    parser.add_argument("--train-tokens", type=int, default=32, help="Max tokens of the training sentences.")
    parser.add_argument("--val-fraction", type=float, default=0.02)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--test-samples", type=int, default=0, help="Score on the first N test sentences (0: all).")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: see RESULTS.md).")
    parser.add_argument("--cache-dir", type=Path, help="Teacher-output cache (default: the user cache).")
    parser.add_argument("-o", "--output", type=Path, default=ROOT / "benchmarks" / "results" / "distill_minilm.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("ONNX_INHER_QUIET", "1")
    teacher = minilm_torchscript()
    calibration = None if args.calibration == "none" else args.calibration
    test = text.fortune_tokens("test")
    if args.test_samples:
        test = {k: v[:args.test_samples] for k, v in test.items()}

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        student, tuned, train_npz = work / "student.onnx", work / "tuned.onnx", work / "fortunes_train.npz"
        began = time.perf_counter()
        compressed = onnx_inher.compress(teacher, student, Options(
            mode=args.mode, heads=2, policy=parse_policy(param_ratio=args.param_ratio), calibration=calibration))
        compress_seconds = time.perf_counter() - began
        init = fidelity(teacher, student, test)
        print(f"init: {init}", flush=True)
        record: dict = {
            "teacher": "all-MiniLM-L6-v2 (tests/zoo.py minilm_torchscript)",
            "compress": {"mode": args.mode, "heads": 2 if args.mode == "inher" else 1,
                         "param_ratio_option": args.param_ratio, "calibration": calibration,
                         "seconds": round(compress_seconds, 1), "warnings": compressed.plan.warnings,
                         **{k: compressed.plan.totals()[k] for k in ("factorized", "params_before", "params_after",
                                                                       "param_ratio")}},
            "test": {"data": "fortunes:test (held aside, never trained on)", "sentences": len(test["input_ids"]),
                     "max_tokens": int(test["input_ids"].shape[1]),
                     "metric": "mean cosine of mask-mean-pooled last_hidden_state, teacher vs student, ORT"},
            "init_cosine": init[EMBEDDING], "init": init,
        }
        if args.steps:
            tokens = text.tokenise(text.fortune_sentences("train"), args.train_tokens)
            np.savez(train_npz, **tokens)
            losses = {EMBEDDING: f"pooled:{args.pooled_weight}"} if args.pooled_weight else {}
            if args.token_weight:
                losses = {EMBEDDING: f"cosine:{args.token_weight}"} if not losses else losses
            losses[POOLER] = f"cosine:{args.pooler_weight}"
            options = DistillOptions(steps=args.steps, batch_size=args.batch_size, lr=args.lr, losses=losses,
                                     trainable=args.trainable, val_fraction=args.val_fraction,
                                     eval_every=args.eval_every, checkpoint_every=0, precision="fp32", device="cpu")
            metrics = work / "metrics.jsonl"
            began = time.perf_counter()
            result = onnx_inher.distill(student, teacher, str(train_npz), tuned, options, metrics=metrics,
                                        cache_dir=args.cache_dir)
            wall = time.perf_counter() - began
            final = fidelity(teacher, tuned, test)
            record |= {
                "final_cosine": final[EMBEDDING], "final": final,
                "distill": {"data": f"fortunes train part ({result.train_samples} train + {result.val_samples} "
                                    f"validation sentences, {args.train_tokens} tokens)",
                            "steps": result.train.steps, "batch_size": args.batch_size, "lr": args.lr,
                            "losses": losses, "trainable": args.trainable,
                            "trainable_params": result.trainable_params,
                            "train_seconds": round(result.train.seconds, 1),
                            "seconds_per_step": round(result.train.seconds / max(result.train.steps, 1), 3),
                            "teacher_seconds": result.teacher_seconds, "teacher_cached": result.teacher_cached,
                            "total_seconds": round(wall, 1), "torch_threads": args.threads, "device": "cpu",
                            "best_step": result.train.best_step},
                "curve": curve(metrics),
            }
        record["command"] = shlex.join(["python", "benchmarks/distill_minilm.py", *sys.argv[1:]])
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_text(args.output, json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
