"""Average distilled MiniLM students that share one graph (a "model soup"), then score the average.

    python -m benchmarks.experiments.soup_minilm A.onnx B.onnx [C.onnx ...] --save soup.onnx -o soup.json

Students fine-tuned from the same starting point with different input streams (here: continuations of
one student with `--augment join` and `--augment mix`) stay in one basin of the loss; the mean of their
weights cancels part of each run's own noise, which is a well-known way to get a little more out of
several fine-tuning runs at no training cost (Wortsman et al., "Model soups", ICML 2022). Every float
initializer is averaged (equal weights); the students must have the same graph, names and shapes, or
the script stops. Scores every ingredient and the soup on `fortunes:test` like benchmarks.distill_minilm.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from benchmarks.common import RESULTS, command, write_json, zoo
from benchmarks.distill_minilm import EMBEDDING, fidelity
from onnx_inher.datasets import text
from onnx_inher.ir.io import save_model


def graph_signature(model: onnx.ModelProto) -> list[tuple[str, str, tuple[str, ...], tuple[str, ...]]]:
    return [(n.name, n.op_type, tuple(n.input), tuple(n.output)) for n in model.graph.node]


def soup(paths: list[Path]) -> onnx.ModelProto:
    """The first student's graph with every float initializer replaced by the students' mean."""
    models = [onnx.load(str(p)) for p in paths]
    first = models[0]
    for path, model in zip(paths[1:], models[1:], strict=True):
        if graph_signature(model) != graph_signature(first):
            raise SystemExit(f"{path}: not the same graph as {paths[0]}; only students of one run can be averaged")
    tensors = [{t.name: numpy_helper.to_array(t) for t in m.graph.initializer} for m in models]
    out = onnx.ModelProto()
    out.CopyFrom(first)
    for i, tensor in enumerate(first.graph.initializer):
        values = [t[tensor.name] for t in tensors]
        if any(v.shape != values[0].shape for v in values):
            raise SystemExit(f"initializer {tensor.name}: shapes differ between the students")
        if values[0].dtype.kind != "f":
            continue  # shapes, indices: identical by construction
        mean = np.mean(np.stack([v.astype(np.float64) for v in values]), axis=0).astype(values[0].dtype)
        out.graph.initializer[i].CopyFrom(numpy_helper.from_array(mean, tensor.name))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("students", type=Path, nargs="+")
    parser.add_argument("--save", type=Path, required=True, help="Where to write the averaged student.")
    parser.add_argument("-o", "--output", type=Path, default=RESULTS / "soup_minilm.json")
    args = parser.parse_args()
    if len(args.students) < 2:
        raise SystemExit("give two or more students")
    teacher, test = zoo.minilm_torchscript(), text.fortune_tokens("test")
    save_model(soup(args.students), args.save)
    scores = {str(p): fidelity(teacher, p, test)[EMBEDDING] for p in args.students}
    record = {"students": scores, "soup": fidelity(teacher, args.save, test)[EMBEDDING],
              "test": {"data": "fortunes:test (held aside, never trained on)", "sentences": len(test["input_ids"]),
                       "metric": "mean cosine of mask-mean-pooled last_hidden_state, teacher vs student, ORT"},
              "command": command("benchmarks.experiments.soup_minilm")}
    write_json(args.output, record)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
