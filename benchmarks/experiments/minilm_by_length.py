"""Where a MiniLM student loses fidelity: pooled-embedding cosine to the teacher by sentence length.

    python -m benchmarks.experiments.minilm_by_length STUDENT.onnx [-o result.json]

Scores on `fortunes:test` (1,510 held-aside sentences at 64 tokens), like benchmarks.distill_minilm, and splits
the mean by the number of real tokens: a student distilled on 32-token inputs never saw a longer
context, and this shows what that costs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from benchmarks.common import write_json, zoo
from onnx_inher.datasets import text
from onnx_inher.datasets.text import ATTENTION_MASK
from onnx_inher.metrics import cosine_rows, pool
from onnx_inher.runtime import session

BUCKETS = ((1, 16), (17, 32), (33, 48), (49, 63), (64, 64))
BATCH = 64


def pooled(runner, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return pool(runner.run(["last_hidden_state"], feeds)[0], feeds[ATTENTION_MASK])[0]


def cosines(student: Path) -> tuple[np.ndarray, np.ndarray]:
    test = text.fortune_tokens("test")
    teacher_run, student_run = session(zoo.minilm_torchscript(), "cpu", 1), session(student, "cpu", 1)
    names = [i.name for i in teacher_run.get_inputs()]
    out = []
    for start in range(0, len(test["input_ids"]), BATCH):
        feeds = {k: test[k][start:start + BATCH] for k in names}
        a, b = pooled(teacher_run, feeds), pooled(student_run, feeds)
        out.append(cosine_rows(a, b))
    return np.concatenate(out), test[ATTENTION_MASK].sum(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("student", type=Path)
    parser.add_argument("-o", "--output", type=Path)
    args = parser.parse_args()
    cos, tokens = cosines(args.student)
    rows = [{"tokens": f"{lo}-{hi}", "sentences": int(k.sum()), "cosine": round(float(cos[k].mean()), 4)}
            for lo, hi in BUCKETS for k in [(tokens >= lo) & (tokens <= hi)] if k.any()]
    record = {"student": str(args.student), "cosine": round(float(cos.mean()), 4), "by_tokens": rows}
    print(json.dumps(record, indent=2))
    if args.output:
        write_json(args.output, record)


if __name__ == "__main__":
    main()
