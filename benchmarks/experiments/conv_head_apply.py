"""Three ways to apply the per-sample mixed weight of conv heads, timed at real layer shapes (not in the product).

The weight-mix conv heads (`passes/factorize._heads_conv`) build each sample's `[out, r + 1]` weight from the
gate (`softmax(pool(z) G) @ [U_1 | b_1; ...]`) and apply it to the rank features `z` with a batched MatMul,
`[N, 1, out, r + 1] @ [N, 1, r + 1, pixels]` (the bias as a row of ones under `z`). Where that layer misses the
heads' efficiency target (0.7 of its FLOP ideal), is the MatMul the wrong op? Compared here, after the same gate:

* `matmul`: the emitted form;
* `conv`: a Conv with the mixed weight and bias as inputs (`[out, r, 1, 1]`), which takes a bias without the
  ones row and could fuse a following activation. Batch 1 only: per-sample weights at batch N need a grouped
  conv with N groups, and a Conv's `group` is a fixed attribute, so no emitted form can use it for a free batch;
* `transposed`: `z^T [N, pixels, r + 1] @ W^T [N, r + 1, out]` and a Transpose back, whose product has the
  output channels (a multiple of 16) as its wide side instead of the pixels (49 at ResNet-50's last stage).

Each model is the gate and the apply alone, on `z` of the layer's shape, one intra-op thread, interleaved;
outputs are checked equal first.

    python -m benchmarks.experiments.conv_head_apply     # results/conv_head_apply.{json,md}
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from benchmarks.common import RESULTS, command, interleaved_us, write_results

# (name, out channels, rank, height, width): ResNet-50's last-stage 1x1 convs (the three heads at 0.65-0.67),
# a stage-3 one, and the PP-OCRv5 detector's rank-16 Conv.8 (0.62) and Conv.12 at 480 x 480
SHAPES = [("resnet50 stage 4, 512 -> 2048", 2048, 144, 7, 7), ("resnet50 stage 3, 256 -> 1024", 1024, 128, 14, 14),
          ("ppocrv5 det Conv.8, 48 -> 96", 96, 16, 60, 60), ("ppocrv5 det Conv.12, 96 -> 192", 192, 32, 60, 60)]
FORMS = ("matmul", "conv", "transposed")
HEADS = 2


def _ints(values: list[int], name: str) -> Any:
    return numpy_helper.from_array(np.array(values, np.int64), name)


def model(form: str, out: int, rank: int, height: int, width: int) -> bytes:
    """Gate plus apply for one layer's rank features `z` `[1, rank, height, width]`."""
    rng = np.random.default_rng(0)
    k = rank + 1
    heads = rng.standard_normal((HEADS, out, k)).astype(np.float32) * 0.1
    layout = heads if form != "transposed" else heads.transpose(0, 2, 1)  # [h, k, out] for W^T
    inits = [numpy_helper.from_array(layout.reshape(HEADS, -1).copy(), "heads"),
             numpy_helper.from_array(rng.standard_normal((rank, HEADS)).astype(np.float32), "gw"),
             numpy_helper.from_array(np.zeros(HEADS, np.float32), "gb")]
    nodes = [helper.make_node("GlobalAveragePool", ["z"], ["p"]), helper.make_node("Flatten", ["p"], ["pf"]),
             helper.make_node("Gemm", ["pf", "gw", "gb"], ["lg"]), helper.make_node("Softmax", ["lg"], ["g"], axis=1),
             helper.make_node("MatMul", ["g", "heads"], ["mw"])]
    one = numpy_helper.from_array(np.array(1, np.float32), "one")
    if form == "matmul":
        nodes += [helper.make_node("Reshape", ["mw", "s1"], ["w"]), helper.make_node("Reshape", ["z", "s2"], ["zg"]),
                  helper.make_node("Pad", ["zg", "pads", "one"], ["zp"]),
                  helper.make_node("MatMul", ["w", "zp"], ["o"]), helper.make_node("Reshape", ["o", "s3"], ["y"])]
        inits += [_ints([0, 1, out, k], "s1"), _ints([0, 1, rank, -1], "s2"), _ints([0, 0, 0, 0, 0, 0, 1, 0], "pads"),
                  one, _ints([0, out, height, width], "s3")]
    elif form == "conv":
        nodes += [helper.make_node("Reshape", ["mw", "s1"], ["w3"]),
                  helper.make_node("Split", ["w3", "split"], ["wk", "bk"], axis=2),
                  helper.make_node("Reshape", ["wk", "sw"], ["w"]), helper.make_node("Reshape", ["bk", "sb"], ["b"]),
                  helper.make_node("Conv", ["z", "w", "b"], ["y"])]
        inits += [_ints([0, out, k], "s1"), _ints([rank, 1], "split"), _ints([-1, rank, 1, 1], "sw"),
                  _ints([-1], "sb")]
    else:
        nodes += [helper.make_node("Reshape", ["mw", "s1"], ["w"]), helper.make_node("Reshape", ["z", "s2"], ["zg"]),
                  helper.make_node("Pad", ["zg", "pads", "one"], ["zp"]),
                  helper.make_node("Transpose", ["zp"], ["zt"], perm=[0, 2, 1]),
                  helper.make_node("MatMul", ["zt", "w"], ["o"]),
                  helper.make_node("Transpose", ["o"], ["ot"], perm=[0, 2, 1]),
                  helper.make_node("Reshape", ["ot", "s3"], ["y"])]
        inits += [_ints([0, k, out], "s1"), _ints([0, rank, -1], "s2"), _ints([0, 0, 0, 0, 1, 0], "pads"), one,
                  _ints([0, out, height, width], "s3")]
    graph = helper.make_graph(nodes, form, [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, rank, height,
                                                                                                   width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m.SerializeToString()


def measure(out: int, rank: int, height: int, width: int, rounds: int) -> dict[str, Any]:
    z = {"z": np.random.default_rng(1).standard_normal((1, rank, height, width)).astype(np.float32)}
    outputs, med = interleaved_us({f: model(f, out, rank, height, width) for f in FORMS}, z, rounds)
    worst = max(float(np.abs(outputs[f] - outputs["matmul"]).max()) for f in FORMS)
    return {"max_abs_difference": worst, "us": {f: round(v, 1) for f, v in med.items()},
            "over_matmul": {f: round(v / med["matmul"], 3) for f, v in med.items()}}


def markdown(rows: dict[str, Any]) -> str:
    head = " | ".join(f"{f} us" for f in FORMS)
    lines = [f"| layer (rank, pixels) | {head} | conv / matmul | transposed / matmul |",
             "|---|" + "---:|" * (len(FORMS) + 2)]
    for name, r in rows.items():
        lines.append(f"| {name} ({r['rank']}, {r['pixels']}) | " + " | ".join(f"{r['us'][f]:.1f}" for f in FORMS)
                     + f" | {r['over_matmul']['conv']:.2f} | {r['over_matmul']['transposed']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--out", type=Path, default=RESULTS / "conv_head_apply")
    args = parser.parse_args()
    rows = {}
    for name, out, rank, height, width in SHAPES:
        rows[name] = {"out": out, "rank": rank, "pixels": height * width,
                      **measure(out, rank, height, width, args.rounds)}
        print(name, rows[name], flush=True)
    doc = {"command": command("benchmarks.experiments.conv_head_apply"), "rows": rows}
    write_results(args.out, doc, markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
