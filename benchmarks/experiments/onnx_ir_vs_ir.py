"""onnx-ir (``import onnx_ir as ir``) against our own I/O layer (``onnx_inher.ir.io``).

For each model and each library this measures, in a fresh subprocess per repeat:
  * wall time of load and of save, and the peak RSS of each phase (VmHWM, which is what
    ``ru_maxrss`` reports less the parent's high-water mark that Linux folds in across fork+exec; it is
    reset through ``/proc/self/clear_refs`` between load and save, so the save figure is the peak
    *during* save, the loaded model included);
  * determinism: the same model saved twice to two folders (same file name) in the process, and the
    files of the repeats (separate processes) compared by sha256, external data file included.
Then, in one subprocess per model, the files of the first repeat are checked against the source:
  * content: node list (op_type, domain, inputs, outputs, attributes with tensor values bitwise),
    initializer names and bytes, graph inputs/outputs; metadata (doc strings, producer, value_info,
    metadata_props) and representation (initializer order, raw_data vs typed fields, external
    data) reported apart;
  * ``onnx.checker.check_model(path, full_check=True)`` on the saved file;
  * ONNX Runtime (CPU, 1 thread) on the saved file against the source on one random input: bitwise.
A small model with its weights in Constant nodes (MatMul weight from Constant, Conv weight through
Identity, value_floats / value_ints / value_float Constants, doc strings, metadata) is built here.

Libraries:
  ours          load_model(path) + save_model(model, out, external_data=<source has external data>)
  onnx_ir       ir.load(path) + ir.save(model, out[, external_data="<out>.data",
                size_threshold_bytes=1023, alignment=4096, align_threshold=0]) -- options closest to
                ours (tensors >= 1024 bytes external, every external tensor at a 4096-byte offset)
  onnx_ir_default  ir.save(..., external_data="<out>.data") with onnx-ir's defaults (external
                models only)
  onnx_ir+check onnx.checker.check_model(path) then ir.load (what ours does on load), BERT only

Run (about 4 minutes on 2 cores):
    .venv/bin/python -m benchmarks.experiments.onnx_ir_vs_ir
Options: --repeats N (default 3), --only NAME[,NAME] (substring of model names), --keep (keep files).
Writes benchmarks/results/onnx_ir_vs_ir.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import RESULTS as RESULTS_DIR
from benchmarks.common import ROOT

RESULTS = RESULTS_DIR / "onnx_ir_vs_ir.json"
IR_CLOSEST = {"size_threshold_bytes": 1023, "alignment": 4096, "align_threshold": 0}


# --------------------------------------------------------------------------- helpers


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _files_sha(out: Path) -> dict[str, str]:
    """sha256 of every file a save wrote in its folder (model and data file)."""
    return {p.name: _sha(p) for p in sorted(out.parent.iterdir()) if p.is_file()}


def _maxrss_mib() -> float:
    """Peak RSS of this process: VmHWM. ru_maxrss would be the same figure but for one Linux quirk: exec
    folds the forked parent's high-water mark into it, so a child of a big parent reports the parent's."""
    return max(_status("VmHWM"), 0.0)


def _maxrss_rusage_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _status(key: str) -> float:
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def _rss_mib() -> float:
    return _status("VmRSS")


def _reset_peak() -> bool:
    """Reset the high-water mark VmHWM to the current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------- worker (one per measurement)


def _worker(spec: dict) -> dict:
    lib, src, external = spec["lib"], spec["src"], spec["external"]
    out_a, out_b = Path(spec["out_a"]), Path(spec["out_b"])
    if lib == "ours":
        from onnx_inher.ir.io import load_model, save_model
    else:
        import onnx
        import onnx_ir as ir
    rss_import = _rss_mib()
    t0 = time.perf_counter()
    if lib == "ours":
        loaded = load_model(src)
        model = loaded.model
    else:
        if lib == "onnx_ir+check":
            onnx.checker.check_model(src)
        model = ir.load(src)
    t_load = time.perf_counter() - t0
    load_peak = _maxrss_mib()
    load_peak_rusage = _maxrss_rusage_mib()
    rss_loaded = _rss_mib()
    reset = _reset_peak()

    def save(out: Path) -> None:
        if lib == "ours":
            save_model(model, out, external_data=external)
        elif not external:
            ir.save(model, out)
        elif lib == "onnx_ir_default":
            ir.save(model, out, external_data=out.name + ".data")
        else:
            ir.save(model, out, external_data=out.name + ".data", **IR_CLOSEST)

    t0 = time.perf_counter()
    save(out_a)
    t_save = time.perf_counter() - t0
    save_peak = _maxrss_mib() if reset else float("nan")
    save(out_b)  # untimed: determinism within one process
    return {
        "load_s": t_load, "save_s": t_save, "rss_import_mib": rss_import, "load_peak_mib": load_peak,
        "rss_loaded_mib": rss_loaded, "save_peak_mib": save_peak,
        "load_peak_ru_maxrss_mib": load_peak_rusage,
        "files_a": _files_sha(out_a), "files_b": _files_sha(out_b),
    }


# --------------------------------------------------------------------------- content comparison


def _storage(t) -> str:
    import onnx

    if t.data_location == onnx.TensorProto.EXTERNAL:
        return "external"
    return "raw" if t.HasField("raw_data") else "typed"


def _tensor_key(t) -> tuple:
    from onnx import numpy_helper

    arr = numpy_helper.to_array(t)
    return (t.data_type, tuple(t.dims), arr.tobytes())


def _attr_key(a, where: str, rep: list[str]) -> tuple:
    import onnx

    if a.type == onnx.AttributeProto.TENSOR:
        return (a.name, a.type, _tensor_key(a.t))
    if a.type == onnx.AttributeProto.GRAPH:
        return (a.name, a.type, a.g.name)  # subgraphs: compared by _diff_graph
    b = onnx.AttributeProto()
    b.CopyFrom(a)
    b.ClearField("doc_string")
    return (a.name, a.type, b.SerializeToString(deterministic=True))


def _present(msg) -> list[str]:
    """Fields set on a message (proto2 keeps explicitly set defaults: their presence changes the bytes)."""
    return [f.name for f, _ in msg.ListFields()]


def _node_bytes(node) -> bytes:
    """A node's encoding with its tensor attributes' tensors left out (their storage is reported apart)."""
    import onnx

    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    for a in copy.attribute:
        if a.type == onnx.AttributeProto.TENSOR:
            a.ClearField("t")
    return copy.SerializeToString(deterministic=True)


def _storage_diff(m1, m2) -> list[str]:
    """How tensors are stored (raw_data / typed fields / external), models loaded without external data."""
    import onnx

    def kinds(m):
        out = {}
        for t in m.graph.initializer:
            out[("initializer", t.name)] = _storage(t)
        for i, n in enumerate(m.graph.node):
            for a in n.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    out[(f"{n.op_type} attr", f"{i}.{a.name}")] = _storage(a.t)
        return out

    k1, k2 = kinds(m1), kinds(m2)
    changes: dict[str, int] = {}
    for key, s1 in k1.items():
        s2 = k2.get(key)
        if s2 is not None and s1 != s2:
            label = f"{key[0]} {s1}->{s2}"
            changes[label] = changes.get(label, 0) + 1
    return [f"{label} x{n}" for label, n in sorted(changes.items())]


def _diff_graph(g1, g2, where: str, content: list[str], meta: list[str], rep: list[str]) -> None:
    import onnx

    def ser(items) -> list[bytes]:
        return [x.SerializeToString(deterministic=True) for x in items]

    for field in ("input", "output"):
        if ser(getattr(g1, field)) != ser(getattr(g2, field)):
            names1 = [v.name for v in getattr(g1, field)]
            names2 = [v.name for v in getattr(g2, field)]
            what = "names/order" if names1 != names2 else "types/shapes/doc"
            content.append(f"{where}.{field}: {what} differ")
    if ser(g1.value_info) != ser(g2.value_info):
        if sorted(ser(g1.value_info)) == sorted(ser(g2.value_info)):
            rep.append(f"{where}.value_info: reordered")
        else:
            v1 = {v.name: v.SerializeToString(deterministic=True) for v in g1.value_info}
            v2 = {v.name: v.SerializeToString(deterministic=True) for v in g2.value_info}
            changed = sum(1 for k in v1.keys() & v2.keys() if v1[k] != v2[k])
            meta.append(f"{where}.value_info: {len(v1)} -> {len(v2)} entries (+{len(v2.keys() - v1.keys())} "
                        f"-{len(v1.keys() - v2.keys())} changed {changed})")
    for field in ("name", "doc_string"):
        if getattr(g1, field) != getattr(g2, field):
            meta.append(f"{where}.{field}: {getattr(g1, field)!r:.40} -> {getattr(g2, field)!r:.40}")
    if ser(g1.sparse_initializer) != ser(g2.sparse_initializer):
        content.append(f"{where}.sparse_initializer differs")
    if ser(g1.quantization_annotation) != ser(g2.quantization_annotation):
        meta.append(f"{where}.quantization_annotation differs")
    if ser(g1.metadata_props) != ser(g2.metadata_props):
        meta.append(f"{where}.metadata_props differs")
    # initializers
    n1, n2 = [t.name for t in g1.initializer], [t.name for t in g2.initializer]
    if sorted(n1) != sorted(n2):
        gone, new = sorted(set(n1) - set(n2))[:5], sorted(set(n2) - set(n1))[:5]
        content.append(f"{where}.initializer names differ: -{gone} +{new}")
    elif n1 != n2:
        rep.append(f"{where}.initializer: reordered")
    by_name = {t.name: t for t in g2.initializer}
    bad, docs = [], 0
    for t in g1.initializer:
        u = by_name.get(t.name)
        if u is None:
            continue
        if _tensor_key(t) != _tensor_key(u):
            bad.append(t.name)
        if t.doc_string != u.doc_string or list(t.metadata_props) != list(u.metadata_props):
            docs += 1
    if bad:
        content.append(f"{where}.initializer values differ: {len(bad)} ({bad[:3]})")
    if docs:
        meta.append(f"{where}.initializer doc_string/metadata_props differ on {docs}")
    # nodes
    if len(g1.node) != len(g2.node):
        content.append(f"{where}.node count {len(g1.node)} -> {len(g2.node)}")
        return
    ndiff: dict[str, int] = {}
    first: dict[str, str] = {}
    for i, (a, b) in enumerate(zip(g1.node, g2.node, strict=True)):
        checks = {
            "op_type/domain": (a.op_type, a.domain) != (b.op_type, b.domain),
            "inputs": list(a.input) != list(b.input),
            "outputs": list(a.output) != list(b.output),
            "attributes": sorted(_attr_key(x, where, rep) for x in a.attribute)
            != sorted(_attr_key(x, where, rep) for x in b.attribute),
        }
        for k, v in checks.items():
            if v:
                ndiff[k] = ndiff.get(k, 0) + 1
                first.setdefault(k, f"node {i} {a.op_type} {a.name!r}")
        if [x.name for x in a.attribute] != [x.name for x in b.attribute] and not checks["attributes"]:
            rep.append(f"{where}.node {i}: attribute order")
        if _node_bytes(a) != _node_bytes(b) and not any(checks.values()) and (a.name, a.doc_string) == (
                b.name, b.doc_string):
            ndiff["node encoding"] = ndiff.get("node encoding", 0) + 1
            first.setdefault("node encoding", f"node {i} {a.op_type}: fields {_present(a)} -> {_present(b)}")
        for k, v in (("name", a.name != b.name), ("doc_string", a.doc_string != b.doc_string),
                     ("metadata_props", list(a.metadata_props) != list(b.metadata_props)),
                     ("overload", a.overload != b.overload)):
            if v:
                ndiff["node " + k] = ndiff.get("node " + k, 0) + 1
                first.setdefault("node " + k, f"node {i} {a.op_type}: {getattr(a, k)!r:.30} -> {getattr(b, k)!r:.30}")
        for x, y in zip(a.attribute, b.attribute, strict=False):
            if x.type == y.type == onnx.AttributeProto.GRAPH:
                _diff_graph(x.g, y.g, f"{where}.node{i}.{x.name}", content, meta, rep)
    for k, n in ndiff.items():
        target = content if k in ("op_type/domain", "inputs", "outputs", "attributes") else \
            rep if k == "node encoding" else meta
        target.append(f"{where}.{k} differ on {n} nodes (first: {first[k]})")


def _diff_models(m1, m2) -> dict[str, list[str]]:
    content: list[str] = []
    meta: list[str] = []
    rep: list[str] = []
    if m1.ir_version != m2.ir_version:
        content.append(f"ir_version {m1.ir_version} -> {m2.ir_version}")
    o1 = [(o.domain, o.version) for o in m1.opset_import]
    o2 = [(o.domain, o.version) for o in m2.opset_import]
    if sorted(o1) != sorted(o2):
        content.append(f"opset_import {o1} -> {o2}")
    elif o1 != o2:
        rep.append(f"opset_import order {o1} -> {o2}")
    elif [o.SerializeToString() for o in m1.opset_import] != [o.SerializeToString() for o in m2.opset_import]:
        rep.append(f"opset_import fields set: {[_present(o) for o in m1.opset_import]} -> "
                   f"{[_present(o) for o in m2.opset_import]}")
    for f in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        if getattr(m1, f) != getattr(m2, f):
            meta.append(f"{f}: {getattr(m1, f)!r:.40} -> {getattr(m2, f)!r:.40}")
    if [(p.key, p.value) for p in m1.metadata_props] != [(p.key, p.value) for p in m2.metadata_props]:
        meta.append(f"metadata_props: {[(p.key, p.value) for p in m1.metadata_props]} -> "
                    f"{[(p.key, p.value) for p in m2.metadata_props]}")
    f1 = [f.SerializeToString(deterministic=True) for f in m1.functions]
    f2 = [f.SerializeToString(deterministic=True) for f in m2.functions]
    if f1 != f2:
        content.append(f"functions: {len(f1)} -> {len(f2)} differ")
    if len(m1.training_info) != len(m2.training_info):
        content.append("training_info differs")
    p1, p2 = _present(m1), _present(m2)
    if p1 != p2:
        rep.append(f"model fields set: -{sorted(set(p1) - set(p2))} +{sorted(set(p2) - set(p1))}")
    g1, g2 = _present(m1.graph), _present(m2.graph)
    if g1 != g2:
        rep.append(f"graph fields set: -{sorted(set(g1) - set(g2))} +{sorted(set(g2) - set(g1))}")
    _diff_graph(m1.graph, m2.graph, "graph", content, meta, rep)
    return {"content": content, "metadata": meta, "representation": rep}


def _constant_report(m1, m2, m2_unloaded) -> dict:
    """Constant nodes of the source: still Constant nodes, same attribute, same values, where stored."""
    import onnx

    def consts(m):
        out = {}
        for n in m.graph.node:
            if n.op_type == "Constant":
                out[tuple(n.output)] = n
        return out

    c1, c2, c2n = consts(m1), consts(m2), consts(m2_unloaded)
    same, storage = 0, set()
    for k, a in c1.items():
        b = c2.get(k)
        if b is None:
            continue
        if sorted(_attr_key(x, "", []) for x in a.attribute) == sorted(_attr_key(x, "", []) for x in b.attribute):
            same += 1
        for x in c2n[k].attribute:
            if x.type == onnx.AttributeProto.TENSOR:
                storage.add(_storage(x.t))
    return {"source_constants": len(c1), "saved_constants": len(c2), "identical": same,
            "saved_tensor_storage": sorted(storage)}


def _feed(model, kind: str, seed: int = 0) -> dict:
    import numpy as np
    from onnx import helper

    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feed = {}
    for v in model.graph.input:
        if v.name in inits:
            continue
        tt = v.type.tensor_type
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if kind == "text":
            shape = (1, 16)
            if v.name == "input_ids":
                feed[v.name] = rng.integers(100, 30000, size=shape, dtype=np.int64)
            elif v.name == "attention_mask":
                feed[v.name] = np.ones(shape, dtype=np.int64)
            else:
                feed[v.name] = np.zeros(shape, dtype=np.int64)
            continue
        shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in tt.shape.dim)
        feed[v.name] = rng.standard_normal(shape).astype(dtype)
    return feed


def _ort_run(path: str, feed: dict) -> list:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


def _bitwise(xs: list, ys: list) -> bool:
    import numpy as np

    return len(xs) == len(ys) and all(
        x.dtype == y.dtype and x.shape == y.shape and np.asarray(x).tobytes() == np.asarray(y).tobytes()
        for x, y in zip(xs, ys, strict=True))


def _check(spec: dict) -> dict:
    import onnx

    src, kind = spec["src"], spec["kind"]
    m1n = onnx.load(src, load_external_data=False)
    m1 = onnx.load(src)
    feed = _feed(m1, kind)
    ref = _ort_run(src, feed)
    out: dict = {"ort_source_repeatable": _bitwise(ref, _ort_run(src, feed)), "libs": {}}
    for lib, saved in spec["saved"].items():
        r: dict = {}
        try:
            onnx.checker.check_model(saved, full_check=True)
            r["checker"] = "ok"
        except Exception as err:  # reported, not raised
            r["checker"] = f"FAIL: {' '.join(str(err).split())[:200]}"
        m2n = onnx.load(saved, load_external_data=False)
        r["storage"] = _storage_diff(m1n, m2n)
        m2 = onnx.load(saved)
        r["diff"] = _diff_models(m1, m2)
        r["diff"]["representation"] += r["storage"]
        r["constants"] = _constant_report(m1, m2, m2n)
        try:
            r["ort_bitwise"] = _bitwise(ref, _ort_run(saved, feed))
        except Exception as err:  # reported, not raised
            r["ort_bitwise"] = f"FAIL: {' '.join(str(err).split())[:200]}"
        del m2, m2n
        out["libs"][lib] = r
    return out


# --------------------------------------------------------------------------- the Constant-weights model


def _build_constant_model(path: Path) -> None:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w_mm = numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "w_mm")
    w_conv = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w_conv")
    nodes = [
        helper.make_node("Constant", [], ["w_mm_c"], name="const_mm", value=w_mm,
                         doc_string="MatMul weight as a Constant node"),
        helper.make_node("MatMul", ["x", "w_mm_c"], ["mm"], name="matmul"),
        helper.make_node("Constant", [], ["scale"], value_float=0.5),  # unnamed node
        helper.make_node("Mul", ["mm", "scale"], ["y"], name="mul"),
        helper.make_node("Constant", [], ["w_conv_c"], name="const_conv", value=w_conv),
        helper.make_node("Identity", ["w_conv_c"], ["w_conv_id"], name="identity_w"),
        helper.make_node("Constant", [], ["b_conv"], name="const_bias", value_floats=[0.1, -0.2, 0.3, 0.0]),
        helper.make_node("Conv", ["img", "w_conv_id", "b_conv"], ["conv"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Constant", [], ["shape"], name="const_shape", value_ints=[0, -1]),
        helper.make_node("Reshape", ["conv", "shape"], ["z"], name="reshape"),
    ]
    graph = helper.make_graph(
        nodes, "constant_weights",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64]),
         helper.make_tensor_value_info("img", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 256])],
        value_info=[helper.make_tensor_value_info("mm", TensorProto.FLOAT, ["N", 32])],
        doc_string="graph doc",
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="onnx_ir_vs_ir",
                              producer_version="1", doc_string="model doc", ir_version=8)
    helper.set_model_props(model, {"origin": "benchmarks/experiments/onnx_ir_vs_ir.py"})
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


# --------------------------------------------------------------------------- driver


def _models(work: Path) -> list[dict]:
    from benchmarks.common import zoo

    const = work / "src" / "constant_weights.onnx"
    const.parent.mkdir(parents=True, exist_ok=True)
    _build_constant_model(const)
    bert = str(zoo.bert_base_random())
    libs_bert = ["ours", "onnx_ir", "onnx_ir+check"]
    models = [
        {"name": "bert_base", "src": bert, "kind": "text", "external": False, "libs": libs_bert},
        {"name": "bert_base[ext]", "src": bert, "kind": "text", "external": True, "libs": ["ours", "onnx_ir"]},
        {"name": "minilm_dynamo", "src": str(zoo.minilm_dynamo()), "kind": "text", "external": True,
         "libs": ["ours", "onnx_ir", "onnx_ir_default"]},
        {"name": "minilm_torchscript", "src": str(zoo.minilm_torchscript()), "kind": "text", "external": False,
         "libs": ["ours", "onnx_ir"]},
        {"name": "constant_weights", "src": str(const), "kind": "vision", "external": False,
         "libs": ["ours", "onnx_ir"]},
        {"name": "constant_weights[ext]", "src": str(const), "kind": "vision", "external": True,
         "libs": ["ours", "onnx_ir"]},
    ]
    for p in zoo.light_models():
        models.append({"name": p.stem, "src": str(p), "kind": "vision", "external": False, "libs": ["ours", "onnx_ir"]})
    return models


def _sub(mode: str, spec: dict, timeout: int = 600) -> dict:
    worker = [sys.executable, "-m", "benchmarks.experiments.onnx_ir_vs_ir", mode, json.dumps(spec)]
    proc = subprocess.run(worker, capture_output=True, text=True,
                          timeout=timeout, cwd=str(ROOT))
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"rc {proc.returncode}"]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _summarise(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[0]["error"]}
    med = {k: statistics.median(r[k] for r in ok) for k in
           ("load_s", "save_s", "rss_import_mib", "load_peak_mib", "rss_loaded_mib", "save_peak_mib")}
    within = all(r["files_a"] == r["files_b"] for r in ok)
    across = all(r["files_a"] == ok[0]["files_a"] for r in ok)
    med.update({k.replace("_s", "_min_s"): min(r[k] for r in ok) for k in ("load_s", "save_s")})
    med["deterministic_in_process"] = within
    med["deterministic_across_processes"] = across
    med["files"] = ok[0]["files_a"]
    med["repeats"] = len(ok)
    med["samples"] = [{k: r[k] for k in ("load_s", "save_s", "load_peak_mib", "save_peak_mib")} for r in ok]
    return med


def _run(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="onnx_ir_vs_ir."))
    started = time.perf_counter()
    results: dict = {"models": {}, "env": _env(), "onnx_ir_options_closest_to_ours": IR_CLOSEST}
    try:
        models = _models(work)
        if args.only:
            models = [m for m in models if any(s in m["name"] for s in args.only.split(","))]
        for m in models:
            name, ext = m["name"], m["external"]
            entry: dict = {"source": m["src"], "save_external": ext,
                           "source_bytes": sum(Path(p).stat().st_size for p in _source_files(m["src"])),
                           "libs": {}}
            saved: dict[str, str] = {}
            for lib in m["libs"]:
                runs = []
                for rep in range(args.repeats):
                    base = work / "out" / name.replace("[", "_").replace("]", "") / lib / str(rep)
                    fname = Path(m["src"]).name.replace(".onnx", "") + ".out.onnx"
                    out_a, out_b = base / "a" / fname, base / "b" / fname
                    out_a.parent.mkdir(parents=True)
                    out_b.parent.mkdir(parents=True)
                    runs.append(_sub("--worker", {"lib": lib, "src": m["src"], "out_a": str(out_a),
                                                  "out_b": str(out_b), "external": ext}))
                    shutil.rmtree(out_b.parent)
                    if rep == 0 and "error" not in runs[-1]:
                        saved[lib] = str(out_a)
                    else:
                        shutil.rmtree(out_a.parent)
                entry["libs"][lib] = _summarise(runs)
                print(f"[{time.perf_counter() - started:6.1f}s] {name:24s} {lib:16s} "
                      f"{_short(entry['libs'][lib])}", file=sys.stderr, flush=True)
            src_files = {Path(p).name: _sha(Path(p)) for p in _source_files(m["src"])}
            ours_files = entry["libs"].get("ours", {}).get("files")
            for r in entry["libs"].values():
                if "files" in r:
                    r["same_bytes_as_source"] = list(r["files"].values()) == list(src_files.values())
                    r["same_bytes_as_ours"] = ours_files is not None and r["files"] == ours_files
            check = _sub("--check", {"src": m["src"], "kind": m["kind"], "saved": saved})
            entry["ort_source_repeatable"] = check.get("ort_source_repeatable")
            for lib, r in check.get("libs", {}).items():
                entry["libs"][lib].update(r)
            if "error" in check:
                entry["check_error"] = check["error"]
            print(f"[{time.perf_counter() - started:6.1f}s] {name:24s} checked", file=sys.stderr, flush=True)
            for lib in saved:
                if not args.keep:
                    shutil.rmtree(Path(saved[lib]).parents[1], ignore_errors=True)
            results["models"][name] = entry
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept files under {work}", file=sys.stderr)
    results["total_s"] = time.perf_counter() - started
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1, sort_keys=False) + "\n")
    print(_table(results))
    print(f"\nJSON: {RESULTS.relative_to(ROOT)}  (total {results['total_s']:.0f} s)")


def _source_files(src: str) -> list[str]:
    import onnx

    from onnx_inher.ir.io import iter_tensors

    m = onnx.load(src, load_external_data=False)
    locs = sorted({e.value for t in iter_tensors(m.graph) if t.data_location == onnx.TensorProto.EXTERNAL
                   for e in t.external_data if e.key == "location"})
    return [src] + [str(Path(src).parent / loc) for loc in locs]


def _env() -> dict:
    import importlib.metadata as md

    io = ROOT / "onnx_inher" / "ir" / "io.py"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {
        "python": sys.version.split()[0], "cpus": os.cpu_count(),
        **{p: md.version(p) for p in ("onnx", "onnx-ir", "onnxruntime", "protobuf", "numpy")},
        "git_head": head, "io_py_sha256": _sha(io) if io.exists() else None,
    }


def _short(r: dict) -> str:
    if "error" in r:
        return f"ERROR {r['error']}"
    return (f"load {r['load_s']:.2f}s/{r['load_peak_mib']:.0f}MiB save {r['save_s']:.2f}s/"
            f"{r['save_peak_mib']:.0f}MiB det={r['deterministic_in_process'] and r['deterministic_across_processes']}")


def _yn(v) -> str:
    return "yes" if v is True else "NO" if v is False else str(v)


def _table(results: dict) -> str:
    rows = ["| model | lib | load s | load peak MiB | save s | save peak MiB | deterministic | = source bytes "
            "| = ours bytes | content equal | metadata diffs | representation diffs | checker | ORT bitwise "
            "| Constants kept |",
            "|---|---|---:|---:|---:|---:|---|---|---|---|---|---|---|---|---|"]
    for name, entry in results["models"].items():
        for lib, r in entry["libs"].items():
            if "error" in r:
                rows.append(f"| {name} | {lib} | ERROR {r['error']} |" + " |" * 12)
                continue
            diff = r.get("diff", {})
            c = r.get("constants", {})
            det = r["deterministic_in_process"] and r["deterministic_across_processes"]
            where = ",".join(c.get("saved_tensor_storage", [])) or "-"
            consts = f"{c.get('identical')}/{c.get('source_constants')} ({where})" if c.get("source_constants") else "-"
            rows.append(
                f"| {name} | {lib} | {r['load_s']:.2f} | {r['load_peak_mib']:.0f} | {r['save_s']:.2f} | "
                f"{r['save_peak_mib']:.0f} | {_yn(det)} | "
                f"{_yn(r.get('same_bytes_as_source'))} | {_yn(r.get('same_bytes_as_ours'))} | "
                f"{_yn(not diff.get('content')) if diff else '?'} | {'; '.join(diff.get('metadata', [])) or '-'} | "
                f"{'; '.join(diff.get('representation', [])) or '-'} | {r.get('checker', '?')} | "
                f"{_yn(r.get('ort_bitwise'))} | {consts} |")
            for line in diff.get("content", []):
                rows.append(f"| | | content diff: {line} |" + " |" * 12)
    rows.append("")
    rows.append("Times are medians of fresh processes (minimums in the JSON); peak = VmHWM of the phase in that "
                "process (the save peak includes the loaded model: the high-water mark is reset after load). "
                "RSS after imports: "
                + ", ".join(f"{lib} {r['rss_import_mib']:.0f} MiB" for lib, r in
                            next(iter(results["models"].values()))["libs"].items() if "rss_import_mib" in r)
                + ". ORT run twice on each source is bitwise-repeatable: "
                + (", ".join(f"{n}={_yn(e.get('ort_source_repeatable'))}" for n, e in results["models"].items()
                             if e.get("ort_source_repeatable") is not True) or "yes for every model") + ".")
    return "\n".join(rows)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] in ("--worker", "--check"):
        spec = json.loads(sys.argv[2])
        result = _worker(spec) if sys.argv[1] == "--worker" else _check(spec)
        print(json.dumps(result))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default="")
    parser.add_argument("--keep", action="store_true")
    _run(parser.parse_args())


if __name__ == "__main__":
    main()
