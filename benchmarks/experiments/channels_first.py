"""ConvNeXt's MLP back to channels-first: how much of the student's gain is the factorisation's (an experiment).

A ConvNeXt block runs its MLP channels-last (`Linear` on `[N, H, W, C]`), then `permute(0, 3, 1, 2)`, a
per-channel layer scale and the residual Add. The default student writes the second layer's pair as a
Transpose of its rank features and a 1x1 Conv that takes the bias and the scale (`passes/factorize.py`,
`_up_channels_first`). The same rewrite is open to the teacher's dense layer, but there the Transpose moves
the MLP's 4C-wide hidden activation instead of r rank features. This script times, interleaved, the teacher
as given, the teacher rewritten that way, the default student in the MatMul pair form (the form before
this change; the same plan), and the default student:

    python -m benchmarks.experiments.channels_first      # benchmarks/results/channels_first.json, ~4 min

`--teacher hf` exports a Hugging Face `ConvNextModel` instead (transformers' own code, random weights, depths
2-2-2-2 and widths 64-512; its layer scales drawn in [0.1, 0.6] rather than left at 1e-6), whose layer scale
comes before the permute: `python -m benchmarks.experiments.channels_first --teacher hf --out
benchmarks/results/channels_first_hf.json`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from benchmarks.common import RESULTS, command, quiet, timed_cell, write_json, zoo


def rewrite_teacher(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Every dense layer `locate` finds going back to channels-first (`ChannelsFirst`: MatMul, bias Add, scales
    and Transpose) written as `Conv1x1(Transpose(h), W^T s, b s)`: the student's form applied to the dense
    layer, whose Transpose then moves its whole input."""
    from onnx_inher.ir.layers import LayerView
    from onnx_inher.passes.locate import locate

    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    views = [v for v in locate(out) if isinstance(v, LayerView) and v.channels_first is not None and not v.scope]
    replace: dict[int, list[onnx.NodeProto]] = {}
    gone: set[str] = set()
    for v in views:
        tail = v.channels_first
        scale = tail.scale if tail.scale is not None else np.ones(v.out_features, np.float32)
        w = v.matrices()[0] * scale[:, None]  # [out, in]
        node = g.node[v.node_index]
        p = f"{node.name}/channels_first"
        g.initializer.append(numpy_helper.from_array(w.reshape(*w.shape, *([1] * (len(tail.perm) - 2))), f"{p}.w"))
        inputs = [f"{p}.x", f"{p}.w"]
        if v.trailing_bias is not None:
            g.initializer.append(numpy_helper.from_array((v.trailing_bias * scale).astype(np.float32), f"{p}.b"))
            inputs.append(f"{p}.b")
            gone.add(v.trailing_add)
        replace[v.node_index] = [
            helper.make_node("Transpose", [node.input[0]], [f"{p}.x"], name=f"{p}/t", perm=list(tail.perm)),
            helper.make_node("Conv", inputs, [tail.output], name=f"{p}/conv")]
        gone.update(tail.taken)
    nodes = [m for i, n in enumerate(g.node)
             for m in replace.get(i, [] if n.output and n.output[0] in gone else [n])]
    del g.node[:]
    g.node.extend(nodes)
    return out, len(replace)


def hf_convnext(path: Path) -> Path:
    """A Hugging Face ConvNeXt (transformers' `ConvNextModel`, random weights), exported by TorchScript."""
    import torch
    from transformers import ConvNextConfig, ConvNextModel

    torch.manual_seed(0)
    model = ConvNextModel(ConvNextConfig(depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512])).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_scale" in name:  # trained models hold real scales, not the 1e-6 they start from
                p.copy_(torch.rand_like(p) * 0.5 + 0.1)
    torch.onnx.export(model, (torch.randn(1, 3, 224, 224),), str(path), input_names=["image"],
                      output_names=["last_hidden_state", "pooler_output"], dynamic_axes={"image": {0: "batch"}},
                      opset_version=17, dynamo=False)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--teacher", choices=["torchvision", "hf"], default="torchvision",
                        help="torchvision's ConvNeXt-T (the zoo fixture) or a small Hugging Face ConvNeXt")
    parser.add_argument("--out", type=Path, default=RESULTS / "channels_first.json")
    args = parser.parse_args()
    quiet()
    import onnxruntime as ort

    import onnx_inher
    from onnx_inher import api
    from onnx_inher.passes import factorize
    from onnx_inher.planning.plan import Options

    ort.set_default_logger_severity(3)  # not the rewritten teacher's unused weights, one line each
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        teacher = (hf_convnext(folder / "hf_convnext.onnx") if args.teacher == "hf"
                   else zoo.FIXTURES["tv_convnext_tiny"]())
        record: dict = {"command": command("benchmarks.experiments.channels_first"), "teacher": teacher.name}
        rewritten, n = rewrite_teacher(onnx.load(str(teacher)))
        record["teacher_layers_rewritten"] = n
        paths = {"teacher": teacher, "teacher_rewritten": folder / "teacher_rewritten.onnx",
                 "student_matmul_pair": folder / "student_matmul_pair.onnx", "student": folder / "student.onnx"}
        onnx.save(rewritten, str(paths["teacher_rewritten"]))
        options = Options(mode="svd", heads=1, latency_check=False)  # the pair plan the check keeps by default
        api.compress(teacher, paths["student"], options)
        form = factorize.channels_first
        factorize.channels_first = lambda view, cand: None  # the MatMul pair of the same plan
        try:
            api.compress(teacher, paths["student_matmul_pair"], options)
        finally:
            factorize.channels_first = form
        x = {"image": np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)}
        outs = {k: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, x)[0]
                for k, p in paths.items()}
        record["max_rel_diff"] = {
            "teacher_rewritten": float(np.abs(outs["teacher_rewritten"] - outs["teacher"]).max()
                                       / np.abs(outs["teacher"]).max()),
            "student_vs_matmul_pair": float(np.abs(outs["student"] - outs["student_matmul_pair"]).max()
                                            / np.abs(outs["student_matmul_pair"]).max())}
        record["points"] = []
        for threads in (1, 2):
            doc = onnx_inher.bench(list(paths.values()), shapes={"image": [1, 3, 224, 224]}, batches=[1, 8],
                                   threads=threads, iters=args.iters, warmup=3).to_dict()
            for pt in doc["points"]:
                row = {"threads": threads, "batch": pt["batch"],
                       **{k: timed_cell(r, 3) for k, r in zip(paths, pt["results"], strict=True)}}
                record["points"].append(row)
                print(json.dumps(row), flush=True)
    write_json(args.out, record)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
