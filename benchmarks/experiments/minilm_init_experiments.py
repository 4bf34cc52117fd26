"""Experiments on the starting point of MiniLM at 50% of its MatMul params (not in the product; see RESULTS.md).

    python -m benchmarks.experiments.minilm_init_experiments whitened      # the product's compress --calibration
    python -m benchmarks.experiments.minilm_init_experiments sequential    # + refit each layer on the student's inputs
    python -m benchmarks.experiments.minilm_init_experiments whitened-ranks
    python -m benchmarks.experiments.minilm_init_experiments sensitivity

All start from the plan of `compress --param-ratio 0.5` (svd) and whitened factors from 256 fortunes, and
report the mean cosine of the pooled embedding on the first 500 held-aside sentences (no training):

* sequential: layer by layer in graph order (25 depths), refit the factors so that the layer's output on
  the *compressed student's* inputs matches the teacher's: reduced-rank regression, i.e. whitened SVD of
  `M C_ts C_ss^-1` with the student's Gram `C_ss` (SVD-LLM's "update", in closed form).
* whitened-ranks: ranks from the whitened spectra by a greedy, budget-equal allocation of relative energy.
* sensitivity: each layer compressed alone at its plan rank; the drop of the pooled cosine on the 256
  calibration sentences, divided by its relative whitened error, is the layer's weight; ranks (multiples
  of 16) then go greedily where `weight x error` falls most per parameter, at the plan's parameter count.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from onnx import ModelProto
from onnxruntime import InferenceSession

from benchmarks.common import quiet, write_json, zoo
from onnx_inher import Options, parse_policy
from onnx_inher.api import analyze, plan, rewrite
from onnx_inher.datasets import text
from onnx_inher.datasets.text import ATTENTION_MASK as MASK
from onnx_inher.ir.io import save_model
from onnx_inher.ir.layers import LayerView
from onnx_inher.metrics import cosine_rows, evaluate, pool
from onnx_inher.planning.plan import Spectra
from onnx_inher.planning.svd import balanced, truncate, whitened_svd
from onnx_inher.runtime import runnable_session, with_outputs
from onnx_inher.tuning.calibrate import activation_input, as_svd, calibration_feeds, token_rows

OPTIONS = Options(mode="svd", heads=1, policy=parse_policy(param_ratio=0.5))
BATCH, STEP = 32, 16


class Fixed(Spectra):
    """Factors chosen here, per node, in the (u, s, vt) form `truncate` takes back."""

    def __init__(self, factors: dict) -> None:
        super().__init__()
        self.factors = factors

    def svd(self, view: LayerView) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.factors[view.node]


def runner(model: ModelProto) -> InferenceSession:
    return runnable_session(model, Path(tempfile.mkdtemp()), "cpu")


def rows(model: ModelProto, names: list[str], feeds: dict) -> dict[str, np.ndarray]:
    """Unpadded token rows of the named tensors over the calibration feeds."""
    sess, out = runner(with_outputs(model, names, Path("x"))), {n: [] for n in names}
    for s in range(0, len(feeds[MASK]), BATCH):
        batch = {k: np.ascontiguousarray(v[s:s + BATCH]) for k, v in feeds.items()}
        for n, value in zip(names, sess.run(names, batch), strict=True):
            out[n].append(token_rows(value, batch[MASK]))
    return {n: np.concatenate(v) for n, v in out.items()}


def pooled(model: ModelProto, feeds: dict) -> np.ndarray:
    sess, out = runner(model), []
    for s in range(0, len(feeds[MASK]), BATCH):
        batch = {k: np.ascontiguousarray(v[s:s + BATCH]) for k, v in feeds.items()}
        out.append(pool(sess.run(["last_hidden_state"], batch)[0], batch[MASK])[0])
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["whitened", "sequential", "whitened-ranks", "sensitivity"])
    parser.add_argument("-o", "--output", type=Path)
    parser.add_argument("--save", type=Path, help="Also write the student ONNX (for distill_minilm --student).")
    args = parser.parse_args()
    quiet()
    began = time.perf_counter()
    teacher = zoo.minilm_torchscript()
    a = analyze(teacher)
    the_plan = plan(teacher, OPTIONS, _analysis=a)
    ranks = {c.node: int(c.rank) for c in the_plan.candidates if c.decision == "factorize"}
    model = a.loaded.model
    inputs = {n: activation_input(a.views[n], model) for n in ranks}
    matrices = {n: a.views[n].matrices() for n in ranks}
    feeds = calibration_feeds("fortunes", model)
    teacher_rows = rows(model, sorted(set(inputs.values())), feeds)
    spectra = {n: whitened_svd(matrices[n], teacher_rows[inputs[n]].T @ teacher_rows[inputs[n]]) for n in ranks}
    dims = {n: sum(matrices[n].shape[1:]) for n in ranks}

    def factors_at(rk: dict[str, int | None]) -> dict:
        return {n: as_svd(balanced(truncate(spectra[n], r))) for n, r in rk.items() if r}

    def build(rk: dict[str, int | None], factors: dict | None = None) -> ModelProto:
        a2 = analyze(teacher)
        p2 = plan(teacher, OPTIONS, _analysis=a2)
        for c in p2.candidates:
            if c.node in rk:
                c.decision, c.rank = ("factorize", rk[c.node]) if rk[c.node] else ("skip", None)
        return rewrite(a2, p2, Fixed(factors or factors_at(rk)))

    def error(n: str, r: int) -> float:
        s = spectra[n][1][0].astype(np.float64) ** 2
        return float(s[r:].sum() / s.sum())

    def greedy(weight: dict[str, float]) -> dict[str, int]:
        """Ranks in steps of 16 where weight x relative error falls most per parameter, at the plan's size."""
        budget = sum(ranks[n] * dims[n] for n in ranks)
        cur = dict.fromkeys(ranks, STEP)
        used = sum(STEP * dims[n] for n in ranks)
        while True:
            options = [(weight[n] * (error(n, cur[n]) - error(n, cur[n] + STEP)) / (STEP * dims[n]), n)
                       for n in ranks if (cur[n] + STEP) * dims[n] < matrices[n].shape[1] * matrices[n].shape[2]
                       and used + STEP * dims[n] <= budget]
            if not options:
                return cur
            _, n = max(options)
            cur[n] += STEP
            used += STEP * dims[n]

    chosen, factors, notes = dict(ranks), None, {}
    if args.mode == "sequential":
        factors = factors_at(ranks)
        depth, node_depth = {}, {}
        for node in model.graph.node:
            d = max([depth.get(i, 0) for i in node.input] + [0]) + (node.name in ranks)
            if node.name in ranks:
                node_depth[node.name] = d
            depth.update(dict.fromkeys(node.output, d))
        for d in sorted(set(node_depth.values())):
            nodes = [n for n, k in node_depth.items() if k == d]
            student_rows = rows(build(ranks, factors), sorted({inputs[n] for n in nodes}), feeds)
            for n in nodes:
                xs, xt = student_rows[inputs[n]], teacher_rows[inputs[n]]
                gss = xs.T @ xs
                damped = gss + 1e-2 * np.trace(gss) / len(gss) * np.eye(len(gss))
                target = matrices[n].astype(np.float64) @ (xt.T @ xs) @ np.linalg.inv(damped)
                factors[n] = as_svd(balanced(truncate(whitened_svd(target, gss), ranks[n])))
    elif args.mode == "whitened-ranks":
        chosen = greedy(dict.fromkeys(ranks, 1.0))  # every layer's relative whitened error weighs the same
    elif args.mode == "sensitivity":
        reference = pooled(model, feeds)
        weight = {}
        for n in ranks:
            e = pooled(build({m: (ranks[n] if m == n else None) for m in ranks}), feeds)
            cos = cosine_rows(e, reference)
            weight[n] = float(1 - cos.mean()) / max(error(n, ranks[n]), 1e-12)
        chosen = greedy(weight)
        notes["weights"] = {n: round(w, 5) for n, w in weight.items()}
    student = build(chosen, factors)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "student.onnx"
        save_model(student, path)
        if args.save:
            save_model(student, args.save)
        test = {k: v[:500] for k, v in text.fortune_tokens("test").items()}
        result = evaluate(teacher, path, test, source="fortunes:test[:500]", provider="cpu")
    record = {"mode": args.mode, "params_after": sum(chosen[n] * dims[n] for n in chosen),
              "plan_params_after": sum(ranks[n] * dims[n] for n in ranks),
              "cosine": {o.name: round(o.cosine_mean, 4) for o in result.outputs},
              "seconds": round(time.perf_counter() - began, 1),
              "ranks": {n: [ranks[n], chosen[n]] for n in ranks}, **notes}
    if args.output:
        write_json(args.output, record)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
