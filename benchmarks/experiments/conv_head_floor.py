"""Can a leaner emitted form lift the conv heads that miss 0.7 of their FLOP ideal? (issue 18; not in the product)

Eight of 123 compute-bound heads layers miss the issue's target: five rank-16 convs (PP-OCRv5 detector Conv.8
and Conv.37, recogniser Conv.6, ResNet-50 stage 1, the MNIST CNN) and ResNet-50's three last-stage 1x1 convs
at rank 144. The emitted weight-mix form (`passes/factorize._heads_conv`) is, after the down conv:

    gate:  GlobalAveragePool, Flatten, Gemm, Softmax, MatMul (mix the heads' weights), Reshape
    apply: Reshape z to [N, 1, r, P], Pad a row of ones (the bias), MatMul, Reshape back
           (+ Shape and Add to build the output shape when two spatial dims are free)

Each layer is built alone here, with the teacher's epilogue (the residual Add or Relu that ONNX Runtime fuses
into the teacher's conv), in these forms:

* `teacher`: the dense conv; `pair`: the plain pair (rank r, bias in the up conv);
* `mix`: the emitted form;
* `mix_reducemean`: the gate pools the reshaped z with one ReduceMean (no GlobalAveragePool, no Flatten);
* `mix_sigmoid`: for h = 2, `softmax([a, b]) = [s, 1 - s]` with `s = sigmoid(a - b)`, so the gate is one Gemm
  that ONNX Runtime fuses with its Sigmoid, and the mix one Gemm `s (U_1 - U_2) + U_2` (one node fewer);
* `mix_lean`: both;
* `conv_gate`: the gate and the mix as 1x1 convs on the pooled `[N, r, 1, 1]` (no Flatten);
* `einsum`: the apply as one `Einsum('nok,nkhw->nohw')` on the padded 4-D z (no reshapes, no Shape);
* `ones_channel`: the ones row made by the down conv, one more output channel with zero weights and bias 1
  (no Pad).

All forms of a layer compute the same function (checked); one intra-op thread, interleaved medians, free
height and width as in the detector's export. The efficiency is the teacher's time over the form's, over the
FLOP ratio of the weight-mix form (`dense / (down + (r + 1) out)` per pixel), the same ideal for every form.

Alone, the Pad that appends the ones row costs about 1 us over a no-op. `--in-model` measures it where it
runs: the PP-OCRv5 detector's heads student (`--mode inher --heads 2 --param-ratio 0.5`, 480 x 480) profiled
at 1 thread beside two edits of its Conv.8, the ones row appended by a Concat with a constant row, and no
ones row at all (the bias dropped: a timing, not a model).

    python -m benchmarks.experiments.conv_head_floor      # results/conv_head_floor.{json,md}
    python -m benchmarks.experiments.conv_head_floor --in-model --out benchmarks/results/conv_head_floor_in_model
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from benchmarks.common import RESULTS, command, interleaved_us, write_results

HEADS = 2
# name -> (C_in, C_out, rank, kernel, height, width, epilogue): the misses' shapes at the models' real inputs
LAYERS = {"detector Conv.8": (48, 96, 16, 1, 60, 60, "add"), "detector Conv.37": (360, 96, 16, 1, 15, 15, "add"),
          "recogniser Conv.6": (64, 64, 16, 1, 24, 160, "add"), "MNIST features.3": (32, 64, 16, 3, 14, 14, "relu"),
          "ResNet-50 /4 body.0": (64, 64, 16, 1, 56, 56, "relu"),
          "ResNet-50 /17 body.6": (512, 2048, 144, 1, 7, 7, "add")}
FORMS = ("teacher", "pair", "mix", "mix_reducemean", "mix_sigmoid", "mix_lean", "conv_gate", "einsum",
         "ones_channel")


class _Graph:
    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self.inits: list[Any] = []

    def node(self, op: str, inputs: list[str], out: str, **attrs: Any) -> str:
        self.nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def const(self, value: Any, name: str, dtype: Any = np.float32) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name


def _weights(c_in: int, c_out: int, rank: int, kernel: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"w": rng.standard_normal((c_out, c_in, kernel, kernel)).astype(np.float32) * 0.05,
            "b": rng.standard_normal(c_out).astype(np.float32) * 0.1,
            "down": rng.standard_normal((rank, c_in, kernel, kernel)).astype(np.float32) * 0.05,
            "heads": rng.standard_normal((HEADS, c_out, rank)).astype(np.float32) * 0.1,
            "gate": rng.standard_normal((rank, HEADS)).astype(np.float32),
            "gate_b": rng.standard_normal(HEADS).astype(np.float32) * 0.1}


def _gate_mix(g: _Graph, form: str, z: str, flat: str, w: dict[str, np.ndarray], rows: int) -> str:
    """The per-sample mixed weight `[N, out, r + 1]` (bias last) in `form`'s way; `rows` counts z's channels."""
    c_out, rank = w["heads"].shape[1:]
    heads = np.concatenate([w["heads"], np.broadcast_to(w["b"].reshape(1, c_out, 1), (HEADS, c_out, 1))], axis=2)
    gate = np.concatenate([w["gate"], np.zeros((rows - rank, HEADS), np.float32)])  # a ones channel has no gate
    if form == "conv_gate":
        pooled = g.node("GlobalAveragePool", [z], "pooled")
        gate_w = g.const(gate.T.reshape(HEADS, rows, 1, 1), "gate")
        logits = g.node("Conv", [pooled, gate_w, g.const(w["gate_b"], "gb")], "logits")
        soft = g.node("Softmax", [logits], "soft", axis=1)
        mixed = g.node("Conv", [soft, g.const(heads.transpose(1, 2, 0).reshape(-1, HEADS, 1, 1), "heads")], "mixed")
        return g.node("Reshape", [mixed, g.const([0, c_out, rank + 1], "mix_shape", np.int64)], "mixed_w")
    if form in ("mix_reducemean", "mix_lean"):
        pooled = g.node("ReduceMean", [flat], "pooled", axes=[2], keepdims=0)
    else:
        pooled = g.node("Flatten", [g.node("GlobalAveragePool", [z], "pooled4")], "pooled", axis=1)
    if form in ("mix_sigmoid", "mix_lean"):  # h = 2: softmax([a, b]) = [sigmoid(a - b), 1 - sigmoid(a - b)]
        logit = g.node("Gemm", [pooled, g.const(gate[:, :1] - gate[:, 1:], "gate"),
                                g.const(w["gate_b"][:1] - w["gate_b"][1:], "gb")], "logit")
        s = g.node("Sigmoid", [logit], "s")
        mixed = g.node("Gemm", [s, g.const((heads[0] - heads[1]).reshape(1, -1), "heads_delta"),
                                g.const(heads[1].reshape(-1), "heads_last")], "mixed")
    else:
        soft = g.node("Softmax", [g.node("Gemm", [pooled, g.const(gate, "gate"), g.const(w["gate_b"], "gb")],
                                         "logits")], "soft", axis=1)
        mixed = g.node("MatMul", [soft, g.const(heads.reshape(HEADS, -1), "heads")], "mixed")
    return g.node("Reshape", [mixed, g.const([0, c_out, rank + 1], "mix_shape", np.int64)], "mixed_w")


def model(form: str, c_in: int, c_out: int, rank: int, kernel: int, epilogue: str) -> bytes:
    """One layer in `form`, input `x` `[1, C_in, H, W]` with H and W free (plus `res` for a residual Add)."""
    w = _weights(c_in, c_out, rank, kernel)
    g = _Graph()
    pads = [kernel // 2] * 4
    if form == "teacher":
        y = g.node("Conv", ["x", g.const(w["w"], "w"), g.const(w["b"], "b")], "y0", pads=pads)
    elif form == "pair":
        z = g.node("Conv", ["x", g.const(w["down"], "down")], "z", pads=pads)
        y = g.node("Conv", [z, g.const(w["heads"][0].reshape(c_out, rank, 1, 1), "up"), g.const(w["b"], "b")], "y0")
    else:
        ones = form == "ones_channel"
        rows = rank + 1 if ones else rank
        if ones:
            down = np.concatenate([w["down"], np.zeros((1, c_in, kernel, kernel), np.float32)])
            z = g.node("Conv", ["x", g.const(down, "down"), g.const(np.r_[np.zeros(rank), 1.0], "down_b")], "z",
                       pads=pads)
        else:
            z = g.node("Conv", ["x", g.const(w["down"], "down")], "z", pads=pads)
        flat = g.node("Reshape", [z, g.const([0, rows, -1], "z_shape", np.int64)], "z_flat")
        mixed = _gate_mix(g, form, z, flat, w, rows)
        one = g.const(1.0, "one")
        if form == "einsum":
            padded = g.node("Pad", [z, g.const([0, 0, 0, 0, 0, 1, 0, 0], "pads", np.int64), one], "z_ones")
            y = g.node("Einsum", [mixed, padded], "y0", equation="nok,nkhw->nohw")
        else:
            padded = flat if ones else g.node("Pad", [flat, g.const([0, 0, 0, 0, 1, 0], "pads", np.int64), one],
                                              "z_ones")
            out = g.node("MatMul", [mixed, padded], "out")
            shape = g.node("Add", [g.node("Shape", [z], "z_dims"), g.const([0, c_out - rows, 0, 0], "delta", np.int64)],
                           "out_shape")
            y = g.node("Reshape", [out, shape], "y0")
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c_in, "H", "W"])]
    if epilogue == "add":
        inputs.append(helper.make_tensor_value_info("res", TensorProto.FLOAT, [1, c_out, "H", "W"]))
        g.node("Add", [y, "res"], "y")
    else:
        g.node("Relu", [y], "y")
    graph = helper.make_graph(g.nodes, form, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              g.inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m.SerializeToString()


def measure(layer: tuple[int, int, int, int, int, int, str], rounds: int) -> dict[str, Any]:
    c_in, c_out, rank, kernel, height, width, epilogue = layer
    rng = np.random.default_rng(1)
    feed = {"x": rng.standard_normal((1, c_in, height, width)).astype(np.float32)}
    if epilogue == "add":
        feed["res"] = rng.standard_normal((1, c_out, height, width)).astype(np.float32)
    outs, us = interleaved_us({f: model(f, c_in, c_out, rank, kernel, epilogue) for f in FORMS}, feed, rounds)
    worst = max(float(np.abs(outs[f] - outs["mix"]).max()) for f in FORMS if f not in ("teacher", "pair"))
    per_pixel = {"teacher": c_in * c_out * kernel * kernel, "pair": (c_in * kernel * kernel + c_out) * rank,
                 "heads": c_in * kernel * kernel * rank + (rank + 1) * c_out}
    ideal = {f: per_pixel["teacher"] / per_pixel["pair" if f == "pair" else "heads"] for f in FORMS if f != "teacher"}
    return {"rank": rank, "pixels": height * width, "max_abs_difference": worst,
            "us": {f: round(v, 1) for f, v in us.items()},
            "efficiency": {f: round(us["teacher"] / us[f] / ideal[f], 3) for f in ideal}}


def markdown(rows: dict[str, Any]) -> str:
    forms = [f for f in FORMS if f != "teacher"]
    lines = ["| layer (rank, pixels) | teacher us | " + " | ".join(forms) + " |", "|---|---:|" + "---|" * len(forms)]
    for name, r in rows.items():
        lines.append(f"| {name} ({r['rank']}, {r['pixels']}) | {r['us']['teacher']:.0f} | "
                     + " | ".join(f"{r['us'][f]:.0f} us ({r['efficiency'][f]:.2f})" for f in forms) + " |")
    return "\n".join(lines) + "\n"


def _edit_ones_row(student: Path, layer: str, how: str, out: Path) -> Path:
    """`student` with `layer`'s ones-row Pad replaced by a Concat with a constant row, or removed."""
    import onnx

    model = onnx.load(str(student))
    graph = model.graph
    at = next(i for i, n in enumerate(graph.node) if n.name == f"{layer}/inher/ones_row")
    pad = graph.node[at]
    if how == "concat":
        pixels = 60 * 60
        graph.initializer.append(numpy_helper.from_array(np.ones((1, 1, 1, pixels), np.float32), "ones_row_const"))
        concat = helper.make_node("Concat", [pad.input[0], "ones_row_const"], [pad.output[0]],
                                  name=f"{layer}/inher/ones_row_concat", axis=2)
        graph.node.remove(pad)
        graph.node.insert(at, concat)
    else:  # no ones row: the apply reads z, the mixed weight loses its bias column
        consumer = next(n for n in graph.node if n.name == f"{layer}/inher/apply")
        consumer.input[1] = pad.input[0]
        graph.node.remove(pad)
        inits = {t.name: t for t in graph.initializer}
        mix = next(n for n in graph.node if n.name == f"{layer}/inher/mix_weights")
        heads = numpy_helper.to_array(inits[mix.input[1]])
        shape_node = next(n for n in graph.node if n.name == f"{layer}/inher/mix_weights_4d")
        shape = numpy_helper.to_array(inits[shape_node.input[1]]).copy()
        k = int(shape[-1])
        heads = heads.reshape(heads.shape[0], -1, k)[:, :, :k - 1].reshape(heads.shape[0], -1)
        inits[mix.input[1]].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(heads), mix.input[1]))
        shape[-1] = k - 1
        inits[shape_node.input[1]].CopyFrom(numpy_helper.from_array(shape, shape_node.input[1]))
    onnx.save(model, str(out))
    return out


def _edit_gates(student: Path, how: str, out: Path) -> Path:
    """`student` with every weight-mix conv gate pooled by one ReduceMean of the reshaped z (`reducemean`), or,
    with 2 heads, as one Gemm fused with a Sigmoid and the mix as one Gemm `s (U_1 - U_2) + U_2` (`sigmoid`)."""
    import onnx

    model = onnx.load(str(student))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    nodes = {n.name: n for n in graph.node}
    for pool in [n for n in graph.node if n.name.endswith("/inher/pool")]:
        at = pool.name.removesuffix("pool")
        if at + "mix_weights" not in nodes:
            continue
        flat, gate, soft, mix = (nodes[at + k] for k in ("pool_flat", "gate", "gate_softmax", "mix_weights"))
        if how == "reducemean":  # z_groups is [N, 1, r, pixels]
            mean = helper.make_node("ReduceMean", [nodes[at + "z_groups"].output[0]], [flat.output[0]],
                                    name=at + "pool_mean", axes=[1, 3], keepdims=0)
            graph.node.insert(list(graph.node).index(pool), mean)
            graph.node.remove(pool)
            graph.node.remove(flat)
            continue
        g, b = numpy_helper.to_array(inits[gate.input[1]]), numpy_helper.to_array(inits[gate.input[2]])
        heads = numpy_helper.to_array(inits[mix.input[1]])
        inits[gate.input[1]].CopyFrom(numpy_helper.from_array(g[:, :1] - g[:, 1:], gate.input[1]))
        inits[gate.input[2]].CopyFrom(numpy_helper.from_array(b[:1] - b[1:], gate.input[2]))
        graph.initializer.extend([numpy_helper.from_array(heads[:1] - heads[1:], at + "heads_delta"),
                                  numpy_helper.from_array(heads[1], at + "heads_last")])
        sigmoid = helper.make_node("Sigmoid", [gate.output[0]], [soft.output[0]], name=at + "gate_sigmoid")
        gemm = helper.make_node("Gemm", [soft.output[0], at + "heads_delta", at + "heads_last"], [mix.output[0]],
                                name=at + "mix_gemm")
        for old, new in ((soft, sigmoid), (mix, gemm)):
            graph.node.insert(list(graph.node).index(old), new)
            graph.node.remove(old)
    onnx.save(model, str(out))
    return out


def in_model(rounds: int) -> dict[str, Any]:
    """Conv.8's and Conv.37's nodes in the running detector student: as emitted, Conv.8's ones row by Concat or
    removed, and every gate pooled by ReduceMean or (2 heads) as a sigmoid."""
    import tempfile

    import onnxruntime as ort

    import onnx_inher
    from benchmarks.latency_table import MODELS
    from onnx_inher import Options, parse_policy
    from onnx_inher.bench.inmodel import read_profile

    build, shapes = MODELS["ocr_det"]
    layer = "Conv.8"
    with tempfile.TemporaryDirectory() as tmp:
        student = Path(tmp) / "heads.onnx"
        onnx_inher.compress(build(), student, Options(policy=parse_policy(param_ratio=0.5), shapes=shapes,
                                                      mode="inher", heads=HEADS, latency_check=False))
        paths = {"emitted (Pad)": student, "Concat": _edit_ones_row(student, layer, "concat", Path(tmp) / "c.onnx"),
                 "no ones row": _edit_ones_row(student, layer, "none", Path(tmp) / "n.onnx"),
                 "ReduceMean gates": _edit_gates(student, "reducemean", Path(tmp) / "r.onnx"),
                 "sigmoid gates": _edit_gates(student, "sigmoid", Path(tmp) / "s.onnx")}
        feed = {"x": np.random.default_rng(0).standard_normal(shapes["x"]).astype(np.float32)}
        sessions = {}
        for name, path in paths.items():
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1
            opts.log_severity_level = 3  # the detector's output declares no shape: one warning a run otherwise
            opts.enable_profiling = True
            opts.profile_file_prefix = f"{tmp}/{len(sessions)}"
            sessions[name] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        for _ in range(5 + rounds):
            for s in sessions.values():
                s.run(None, feed)
        rows = {}
        for name, s in sessions.items():
            times = read_profile(Path(s.end_profiling()), 5, rounds)
            rows[name] = {}
            for at in (layer, "Conv.37"):  # ORT names a node it fused an activation into "fused <name>"
                mine = {n.removeprefix("fused ").removeprefix(f"{at}/inher/"): round(us, 1)
                        for n, us in times.us.items() if n.removeprefix("fused ").startswith(f"{at}/inher/")}
                rows[name][at] = {"layer_us": round(sum(mine.values()), 1), "nodes_us": mine}
    return {"layer": layer, "rounds": rounds, "profiled_us_per_node": "raw ORT profile, profiler overhead included",
            "variants": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--out", type=Path, default=RESULTS / "conv_head_floor")
    parser.add_argument("--in-model", action="store_true", help="the ones row and the gates inside the detector's "
                        "student")
    args = parser.parse_args()
    if args.in_model:
        record = in_model(args.rounds)
        lines = ["| variant | Conv.8 us | its ones row us | its apply us | Conv.37 us |", "|---|---:|---:|---:|---:|"]
        for name, r in record["variants"].items():
            c8, c37 = r["Conv.8"], r["Conv.37"]
            row = next((v for k, v in c8["nodes_us"].items() if k.startswith("ones_row")), 0.0)
            lines.append(f"| {name} | {c8['layer_us']:.0f} | {row:.0f} | {c8['nodes_us'].get('apply', 0.0):.0f} | "
                         f"{c37['layer_us']:.0f} |")
        write_results(args.out, {"command": command("benchmarks.experiments.conv_head_floor"), **record},
                      "\n".join(lines) + "\n")
        print("\n".join(lines))
        return
    rows = {}
    for name, layer in LAYERS.items():
        rows[name] = measure(layer, args.rounds)
        print(name, rows[name]["us"], rows[name]["efficiency"], flush=True)
    doc = {"command": command("benchmarks.experiments.conv_head_floor"), "heads": HEADS, "rows": rows}
    write_results(args.out, doc, markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
