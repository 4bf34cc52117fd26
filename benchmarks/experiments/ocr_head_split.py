"""Issue 17: is the recogniser's 120 x 18,385 classifier head what caps its student? A head-only probe, and a
split head to distil.

`probe --teacher REC --calib CALIB.npz --test TEST.npz [--students S.onnx ...]` runs the teacher once,
keeps the head's input features, and scores heads on them alone (the share of test lines CTC-greedy
decoded as the teacher does, and of frames with its argmax): plain rank-r SVD; the "split" head, in
which the classes the teacher ranks in its top-k on the calibration lines keep their dense columns
and the others go through a rank-r SVD; and each given student's factorised head (`MatMul.12/svd/*`).

`swap --teacher REC --calib CALIB.npz STUDENT OUT --rank R [--top K]` writes STUDENT with its factorised
head replaced by the split form: `x @ W_active`, `(x @ D) @ U` for the rest, `Concat` and a `Gather`
restoring the class order, all under `MatMul.12/svd/` so that `distill` trains them as factors.
Nothing here is committed data: models and lines stay under /tmp. The product's class split (issue 17,
eighth pass: `tuning/classes.py`, `passes/factorize.py`) emits a ScatterElements form instead of this
Concat + Gather, which ONNX Runtime runs slowly on the last axis.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

HEAD, WEIGHT, FEATURES, LOGITS = "MatMul.12", "linear_8.w_0", "p2o.pd_op.transpose.8.0", "p2o.pd_op.matmul.12.0"
BIAS = "linear_8.b_0"


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def teacher_run(teacher: str, data: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The head's input features and the teacher's probabilities on the first `n` lines of `data`."""
    m = onnx.load(teacher)
    m.graph.output.append(helper.make_value_info(FEATURES, onnx.TypeProto()))
    s, x = _session(m), np.load(data)["x"][:n]
    runs = [s.run(None, {"x": x[i:i + 50]}) for i in range(0, len(x), 50)]
    return np.concatenate([r[1] for r in runs]), np.concatenate([r[0] for r in runs])


def decode(ids: np.ndarray) -> list[tuple[int, ...]]:
    keep = np.ones(ids.shape, bool)
    keep[:, 1:] = ids[:, 1:] != ids[:, :-1]
    keep &= ids != 0
    return [tuple(row[k]) for row, k in zip(ids, keep, strict=True)]


def active_classes(probs: np.ndarray, top: int) -> np.ndarray:
    return np.unique(np.argsort(-probs, axis=-1)[..., :top])


Factors = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def split_factors(w: np.ndarray, active: np.ndarray, rank: int) -> Factors:
    """(dense columns, down, up, the other classes) of the split head."""
    rest = np.setdiff1d(np.arange(w.shape[1]), active)
    u, s, vt = np.linalg.svd(w[:, rest].astype(np.float64), full_matrices=False)
    down, up = u[:, :rank] * np.sqrt(s[:rank]), np.sqrt(s[:rank])[:, None] * vt[:rank]
    return w[:, active], down, up, rest


def probe(teacher: str, calib: str, test: str, students: list[str], ranks: list[int], tops: list[int]) -> dict:
    init = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in onnx.load(teacher).graph.initializer}
    w, b = init[WEIGHT], init[BIAS]
    _, p_cal = teacher_run(teacher, calib, 300)
    x, p = teacher_run(teacher, test, 400)
    ref_ids = p.argmax(-1)
    ref = decode(ref_ids)

    def score(head: np.ndarray) -> dict[str, float]:
        ids = (x.astype(np.float64) @ head + b).argmax(-1)
        return {"lines": float(np.mean([a == c for a, c in zip(ref, decode(ids), strict=True)])),
                "frames": float((ids == ref_ids).mean())}

    u, s, vt = np.linalg.svd(w, full_matrices=False)
    out: dict = {"dense": score(w), "plain": {}, "split": {}, "students": {}}
    for r in ranks:
        out["plain"][r] = {**score((u[:, :r] * s[:r]) @ vt[:r]), "params": r * sum(w.shape)}
        for k in tops:
            active = active_classes(p_cal, k)
            dense, down, up, rest = split_factors(w, active, r)
            head = np.empty_like(w)
            head[:, active], head[:, rest] = dense, down @ up
            out["split"][f"top{k}_rank{r}"] = {**score(head), "dense_classes": len(active),
                                               "params": w.shape[0] * len(active) + r * (w.shape[0] + len(rest))}
    for path in students:
        si = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in onnx.load(path).graph.initializer}
        out["students"][path] = score(si[f"{HEAD}/svd/down.weight"] @ si[f"{HEAD}/svd/up.weight"])
    return out


def swap(teacher: str, calib: str, student: str, out: str, rank: int, top: int) -> None:
    w = {i.name: numpy_helper.to_array(i) for i in onnx.load(teacher).graph.initializer}[WEIGHT]
    _, p_cal = teacher_run(teacher, calib, 300)
    active = active_classes(p_cal, top)
    dense, down, up, rest = split_factors(w, active, rank)
    inverse = np.argsort(np.concatenate([active, rest])).astype(np.int64)
    m = onnx.load(student)
    g, tag = m.graph, f"{HEAD}/svd/"
    at = next(i for i, n in enumerate(g.node) if n.name.startswith(tag))
    nodes = [n for n in g.node if not n.name.startswith(tag)]
    new = [helper.make_node("MatMul", [FEATURES, tag + "active.weight"], [tag + "active"], name=tag + "active"),
           helper.make_node("MatMul", [FEATURES, tag + "down.weight"], [tag + "down"], name=tag + "down"),
           helper.make_node("MatMul", [tag + "down", tag + "up.weight"], [tag + "up"], name=tag + "up"),
           helper.make_node("Concat", [tag + "active", tag + "up"], [tag + "cat"], name=tag + "cat", axis=-1),
           helper.make_node("Gather", [tag + "cat", tag + "order"], [LOGITS], name=tag + "order", axis=2)]
    inits = [i for i in g.initializer if not i.name.startswith(tag)]
    inits += [numpy_helper.from_array(dense.astype(np.float32), tag + "active.weight"),
              numpy_helper.from_array(down.astype(np.float32), tag + "down.weight"),
              numpy_helper.from_array(up.astype(np.float32), tag + "up.weight"),
              numpy_helper.from_array(inverse, tag + "order")]
    del g.node[:]
    g.node.extend(nodes[:at] + new + nodes[at:])
    del g.initializer[:]
    g.initializer.extend(inits)
    onnx.checker.check_model(m)
    onnx.save(m, out)
    print(f"{out}: {len(active)} dense classes, the other {len(rest)} at rank {rank}: head "
          f"{w.shape[0] * len(active) + rank * (w.shape[0] + len(rest))} params")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("probe")
    p.add_argument("--teacher", required=True)
    p.add_argument("--calib", required=True)
    p.add_argument("--test", required=True)
    p.add_argument("--students", nargs="*", default=[])
    p.add_argument("--ranks", default="4,8,16,48")
    p.add_argument("--tops", default="3")
    s = sub.add_parser("swap")
    s.add_argument("--teacher", required=True)
    s.add_argument("--calib", required=True)
    s.add_argument("student")
    s.add_argument("out")
    s.add_argument("--rank", type=int, default=8)
    s.add_argument("--top", type=int, default=3)
    a = ap.parse_args()
    if a.cmd == "probe":
        ints = lambda text: [int(v) for v in text.split(",")]  # noqa: E731
        print(json.dumps(probe(a.teacher, a.calib, a.test, a.students, ints(a.ranks), ints(a.tops)), indent=1))
    else:
        swap(a.teacher, a.calib, a.student, a.out, a.rank, a.top)


if __name__ == "__main__":
    main()
