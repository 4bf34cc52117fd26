"""Latency of one dense layer vs its factor pair vs InherNet heads, on this machine's ONNX Runtime.

Why: the heads must not cost what the gated sum naively costs (h up-projections per pixel). For
convolutions we mix the heads' weights once per sample; this script measures what that buys.

    PYTHONPATH=. .venv/bin/python benchmarks/heads_latency.py [--iters 200]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_inher import api
from onnx_inher.plan import Options
from onnx_inher.rank import parse_policy
from onnx_inher.runtime import session

CASES = [
    # name, op, x shape, weight shape, rank
    ("conv3x3 256->256 @28x28", "Conv", [1, 256, 28, 28], [256, 256, 3, 3], 64),
    ("conv3x3 128->128 @56x56", "Conv", [1, 128, 56, 56], [128, 128, 3, 3], 32),
    ("matmul 128 tok 384->1536", "MatMul", [1, 128, 384], [384, 1536], 96),
    ("matmul 32x128 tok 384->384", "MatMul", [32, 128, 384], [384, 384], 96),
]


def layer(op: str, x: list[int], w: list[int]) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array((rng.standard_normal(w) * 0.05).astype(np.float32), "W")
    if op == "Conv":
        node = helper.make_node("Conv", ["x", "W", "B"], ["y"], pads=[1, 1, 1, 1], name="layer")
        inits = [weight, numpy_helper.from_array(np.zeros(w[0], np.float32), "B")]
        y = [x[0], w[0], x[2], x[3]]
    else:
        node = helper.make_node("MatMul", ["x", "W"], ["y"], name="layer")
        inits, y = [weight], [*x[:-1], w[1]]
    g = helper.make_graph([node], "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, y)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def p50(path: Path, x: np.ndarray, iters: int) -> float:
    sess = session(path, "cpu", threads=2)
    for _ in range(20):
        sess.run(None, {"x": x})
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        sess.run(None, {"x": x})
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=200)
    args = ap.parse_args()
    print("| layer | rank | dense ms | pair ms | heads=2 ms | heads=4 ms | heads2/pair | heads4/pair |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        for name, op, xs, ws, rank in CASES:
            onnx.save(layer(op, xs, ws), str(d / "dense.onnx"))
            x = np.random.default_rng(1).standard_normal(xs).astype(np.float32)
            times = {"dense": p50(d / "dense.onnx", x, args.iters)}
            for label, mode, h in (("pair", "svd", 1), ("h2", "inher", 2), ("h4", "inher", 4)):
                opts = Options(mode=mode, heads=h, policy=parse_policy(rank=rank), guard=False)
                api.compress(d / "dense.onnx", d / f"{label}.onnx", opts)
                times[label] = p50(d / f"{label}.onnx", x, args.iters)
            print(f"| {name} | {rank} | {times['dense']:.3f} | {times['pair']:.3f} | {times['h2']:.3f} | "
                  f"{times['h4']:.3f} | {times['h2'] / times['pair']:.2f} | {times['h4'] / times['pair']:.2f} |")


if __name__ == "__main__":
    main()
