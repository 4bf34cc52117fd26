"""How fast ONNX Runtime's blocked (NCHWc) CPU conv runs at 16-64 channels: the ceiling of a rank-16 pair.

A factor pair at rank r is a conv with r output channels (the down-projection) and a 1x1 conv with r
input channels (the up-projection). Each conv alone, in ONNX Runtime's profile (kernel time of the conv
node, without the layout conversions a one-conv graph adds), as GFLOP/s beside the dense conv of the same
input. If a 16-channel conv runs at a fraction f of the dense conv's speed, a rank-16 pair reaches about f
of its FLOP ideal, whatever graph it is written as.

    python -m benchmarks.experiments.narrow_conv --out benchmarks/results/narrow_conv.json

`--ranks` sweeps the output channels instead (one 3x3 conv from 64 channels at 56x56, the down conv of a
rank-r pair), multiples of 16 or not: why plans round ranks to a multiple of 16 on this CPU.

    python -m benchmarks.experiments.narrow_conv --ranks --out benchmarks/results/narrow_conv_ranks.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from benchmarks.common import RESULTS, command, quiet
from onnx_inher.bench.inmodel import profile_models
from onnx_inher.bench.sessions import Settings

# (input channels, height, width, kernel): the recogniser's Conv.6 and Conv.10 inputs, a ResNet-50 stage
CASES = [(64, 24, 160, 1), (128, 12, 160, 1), (256, 56, 56, 1), (64, 56, 56, 3)]


def conv_model(c_in: int, c_out: int, h: int, w: int, k: int, path: Path) -> Path:
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array((rng.standard_normal((c_out, c_in, k, k)) * 0.05).astype(np.float32), "w")
    bias = numpy_helper.from_array(np.zeros(c_out, np.float32), "b")
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", pads=[k // 2] * 4)
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c_in, h, w])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [weight, bias])
    import onnx

    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def measure(folder: Path, iters: int, threads: int) -> list[dict]:
    rows = []
    settings = Settings(provider="cpu", threads=threads)
    for c_in, h, w, k in CASES:
        outs = sorted({16, 32, 48, 64, c_in})
        paths = [conv_model(c_in, c, h, w, k, folder / f"c{c_in}_{c}_{k}.onnx") for c in outs]
        feed = {"x": np.random.default_rng(1).standard_normal((1, c_in, h, w)).astype(np.float32)}
        times = profile_models(paths, feed, settings, 5, iters)
        ups = [conv_model(r, c_in, h, w, 1, folder / f"up{r}_{c_in}.onnx") for r in (16, 32, 48, 64)]
        up_times = [profile_models([p], {"x": np.random.default_rng(1).standard_normal((1, r, h, w))
                                         .astype(np.float32)}, settings, 5, iters)[0]
                    for p, r in zip(ups, (16, 32, 48, 64), strict=True)]
        conv_us = _conv_us
        dense = conv_us(times[-1])
        dense_gflops = 2 * c_in * c_in * k * k * h * w / dense / 1e3
        for c, t in zip(outs, times, strict=True):
            us = conv_us(t)
            gflops = 2 * c_in * c * k * k * h * w / us / 1e3
            rows.append({"case": f"{c_in}x{h}x{w} k{k}", "conv": f"{c_in}->{c}", "us": round(us, 1),
                         "gflops": round(gflops, 1), "of_dense": round(gflops / dense_gflops, 3)})
        for r, t in zip((16, 32, 48, 64), up_times, strict=True):
            us = conv_us(t)
            gflops = 2 * r * c_in * h * w / us / 1e3
            rows.append({"case": f"{c_in}x{h}x{w} k{k}", "conv": f"{r}->{c_in} (1x1 up)", "us": round(us, 1),
                         "gflops": round(gflops, 1), "of_dense": round(gflops / dense_gflops, 3)})
    return rows


SWEEP = (64, 56, 56, 3, (8, 12, 15, 16, 17, 20, 24, 31, 32, 33, 40, 48, 64))


def sweep(folder: Path, iters: int, threads: int) -> list[dict]:
    """The down conv of a rank-r pair at ranks on and off the multiples of 16, in ORT's profile."""
    c_in, h, w, k, outs = SWEEP
    settings = Settings(provider="cpu", threads=threads)
    paths = [conv_model(c_in, c, h, w, k, folder / f"r{c}.onnx") for c in outs]
    feed = {"x": np.random.default_rng(1).standard_normal((1, c_in, h, w)).astype(np.float32)}
    times = profile_models(paths, feed, settings, 5, iters)
    dense = _conv_us(times[-1])
    rows = []
    for c, t in zip(outs, times, strict=True):
        us = _conv_us(t)
        rows.append({"case": f"{c_in}x{h}x{w} k{k}", "conv": f"{c_in}->{c}", "us": round(us, 1),
                     "gflops": round(2 * c_in * c * k * k * h * w / us / 1e3, 1),
                     "of_dense": round(c / outs[-1] * dense / us, 3)})
    return rows


def _conv_us(t: Any) -> float:
    """Kernel time of the conv nodes (layout reorders left out), what a conv costs inside a model."""
    return float(sum(v for n, v in t.us.items() if t.ops[n] == "Conv"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ranks", action="store_true", help="sweep the output channels of one conv (see above)")
    ap.add_argument("--out", type=Path, default=RESULTS / "narrow_conv.json")
    args = ap.parse_args()
    quiet()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        rows = (sweep if args.ranks else measure)(Path(tmp), args.iters, args.threads)
    print("| input | conv | us | GFLOP/s | of the dense conv's |\n|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['case']} | {r['conv']} | {r['us']} | {r['gflops']} | {r['of_dense']} |")
    args.out.write_text(json.dumps({"command": command("benchmarks.experiments.narrow_conv"), "rows": rows},
                                   indent=1) + "\n")


if __name__ == "__main__":
    main()
