"""Property tests: one dense layer at a time, through the public `compress` API, checked in ONNX Runtime.

Every example builds a single-layer teacher (a torch module exported by the TorchScript exporter at
opset 17, or a graph built with `onnx.helper`), compresses it, and checks:

(a) at full rank (`rank_ratio=1.0`), in mode svd and in mode inher with 2 and 3 heads, the student
    computes what the teacher computes (normwise relative error <= 1e-4);
(b) at a drawn truncated rank r, the student (svd, and inher with 2 or 3 heads: the gate is uniform
    at init) matches an independent low-rank reference: the teacher graph run in ONNX Runtime with its
    weight replaced by the rank-r truncation of the canonical per-group matrix, computed here in
    float64 numpy;
(c) every student passes `onnx.checker.check_model(full_check=True)`, the plan factorised the one
    layer at the requested rank and form, and the plan's parameter numbers are the real ones:
    float params(student) == float params(teacher) - params_before + params_after.

The reference reshapes weights on its own (not through `LayerView.matrices`), so a layout mistake in
the library cannot cancel itself out. Truncated ranks are only drawn where the spectrum has a gap
(sigma_r - sigma_{r+1} > 1e-3 sigma_1 in every group): elsewhere the rank-r truncation is not unique
and float32 and float64 SVDs may legitimately disagree.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from onnx import ModelProto, TensorProto, helper, numpy_helper

ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from onnx_inher.api import compress  # noqa: E402
from onnx_inher.planning.plan import Options  # noqa: E402
from onnx_inher.planning.rank import parse_policy  # noqa: E402

TOL = 1e-4
GAP = 1e-3
OPSET = 17
DENSE = ("MatMul", "Gemm", "Conv", "ConvTranspose")
FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)
FULL_RANK_RUNS = (("svd", 1), ("inher", 2), ("inher", 3))
# 1 stays possible (full rank 1: only the full-rank checks apply) but most draws leave a rank to truncate
CHANNELS = st.sampled_from([1, 2, 3, 4, 5, 6])
FEATURES = st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8])


def examples(n: int) -> settings:
    return settings(max_examples=n, deadline=None, derandomize=True, database=None, print_blob=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --------------------------------------------------------------------------- the checked case


@dataclass
class Case:
    """A single-layer teacher plus what the checks need to know about it."""

    model: ModelProto
    feed: dict[str, np.ndarray]
    heads_ok: bool  # mode inher must emit gated heads (else a plain pair, with a note)


def _session(model: ModelProto | str | Path):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    src = str(model) if isinstance(model, (str, Path)) else model.SerializeToString()
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def run(model: ModelProto | str | Path, feed: dict[str, np.ndarray]) -> np.ndarray:
    return _session(model).run(None, feed)[0]


def rel_err(student: np.ndarray, teacher: np.ndarray) -> float:
    assert student.shape == teacher.shape, (student.shape, teacher.shape)
    scale = float(np.max(np.abs(teacher.astype(np.float64))))
    return float(np.max(np.abs(student.astype(np.float64) - teacher))) / (scale or 1.0)


def float_params(model: ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type in FLOATS)


def dense_node(model: ModelProto) -> onnx.NodeProto:
    nodes = [n for n in model.graph.node if n.op_type in DENSE]
    assert len(nodes) == 1, [n.op_type for n in model.graph.node]
    return nodes[0]


def weight_name(model: ModelProto) -> str:
    node = dense_node(model)
    inits = {t.name for t in model.graph.initializer}
    slots = (1,) if node.op_type in ("Conv", "ConvTranspose") else (0, 1)
    names = [node.input[i] for i in slots if node.input[i] in inits]
    assert len(names) == 1, names
    return names[0]


def _attr(node: onnx.NodeProto, name: str, default: object) -> object:
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def canonical(op: str, w: np.ndarray, groups: int) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """The per-group matrices `[g, out, in*k]` of a weight, and the map back to the weight's layout.

    MatMul/Gemm weights are used as stored: a rank-r truncation commutes with transposition and
    with the scale alpha, so the stored 2-D matrix truncates to the same product.
    """
    if op == "Conv":
        return w.reshape(groups, w.shape[0] // groups, -1), lambda m: m.reshape(w.shape)
    if op == "ConvTranspose":
        cin_g, out_g, k = w.shape[0] // groups, w.shape[1], int(np.prod(w.shape[2:]))
        m = w.reshape(groups, cin_g, out_g, k).transpose(0, 2, 1, 3).reshape(groups, out_g, cin_g * k)
        return m, lambda m: m.reshape(groups, out_g, cin_g, k).transpose(0, 2, 1, 3).reshape(w.shape)
    assert w.ndim == 2
    return w[None], lambda m: m[0]


def reference_svd(model: ModelProto):
    """(u, s, vt, back) of the canonical float64 matrices of the teacher's weight."""
    node = dense_node(model)
    inits = {t.name: t for t in model.graph.initializer}
    w = numpy_helper.to_array(inits[weight_name(model)]).astype(np.float64)
    m, back = canonical(node.op_type, w, int(_attr(node, "group", 1)))
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    return u, s, vt, back


def gapped_ranks(s: np.ndarray) -> list[int]:
    """Truncated ranks r (1 <= r < full) at which the rank-r truncation is well defined in fp32."""
    full = s.shape[1]
    top = np.maximum(s[:, :1], 1e-30)
    return [r for r in range(1, full) if np.all((s[:, r - 1] - s[:, r]) / top[:, 0] > GAP)]


def low_rank_teacher(model: ModelProto, r: int) -> ModelProto:
    """The teacher with its weight replaced by the rank-r truncation of its canonical matrices."""
    u, s, vt, back = reference_svd(model)
    m_r = (u[:, :, :r] * s[:, None, :r]) @ vt[:, :r, :]
    ref = ModelProto()
    ref.CopyFrom(model)
    name = weight_name(ref)
    for t in ref.graph.initializer:
        if t.name == name:
            dtype = numpy_helper.to_array(t).dtype
            t.CopyFrom(numpy_helper.from_array(back(m_r).astype(dtype), name))
    return ref


def compress_one(case: Case, teacher: Path, out: Path, mode: str, heads: int, policy) -> tuple[np.ndarray, object]:
    """Compress through the public API; check the file, the plan and its parameter numbers."""
    result = compress(teacher, out, Options(mode=mode, heads=heads, policy=policy, guard=False, rank_multiple=1),
                      verify=False)
    onnx.checker.check_model(str(out), full_check=True)
    student = onnx.load(str(out))
    plan = result.plan
    [cand] = plan.candidates
    assert cand.decision == "factorize", cand
    expected = "heads" if mode == "inher" and heads > 1 and case.heads_ok else "pair"
    assert cand.form == expected and (cand.heads > 1) == (expected == "heads"), (cand.form, cand.heads, cand.note)
    totals = plan.totals()
    assert float_params(student) == float_params(case.model) - totals["params_before"] + totals["params_after"], \
        (float_params(student), float_params(case.model), totals["params_before"], totals["params_after"])
    assert not any(n.op_type in DENSE and n.name == dense_node(case.model).name for n in student.graph.node
                   if n.name), "the replaced node is still in the student"
    return run(out, case.feed), cand


def check_case(case: Case, data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        teacher = d / "teacher.onnx"
        onnx.save(case.model, str(teacher))
        onnx.checker.check_model(str(teacher), full_check=True)
        t_out = run(teacher, case.feed)
        assert np.all(np.isfinite(t_out))
        s = reference_svd(case.model)[1]
        full = s.shape[1]

        # (a) full rank: every form is exact.
        for mode, h in FULL_RANK_RUNS:
            out = d / f"full-{mode}-{h}.onnx"
            s_out, cand = compress_one(case, teacher, out, mode, h, parse_policy(rank_ratio=1.0))
            assert cand.rank == full, (cand.rank, full)
            err = rel_err(s_out, t_out)
            assert err <= TOL, f"full rank, mode {mode}, heads {h}: rel err {err:.3g}"

        # (b) truncated rank: the low-rank reference, for the pair and for gated heads alike.
        ranks = gapped_ranks(s)
        opset = next(o.version for o in case.model.opset_import if o.domain in ("", "ai.onnx"))
        event(f"{dense_node(case.model).op_type}, opset {opset}, inher form: {'heads' if case.heads_ok else 'pair'}")
        if not ranks:
            event("full rank only (full rank 1, or no spectral gap)")
            return
        event("truncated rank checked")
        r = data.draw(st.sampled_from(ranks), label="rank")
        ref_out = run(low_rank_teacher(case.model, r), case.feed)
        h = data.draw(st.sampled_from([2, 3]), label="heads")
        for mode, heads in (("svd", 1), ("inher", h)):
            out = d / f"rank{r}-{mode}-{heads}.onnx"
            s_out, cand = compress_one(case, teacher, out, mode, heads, parse_policy(rank=r))
            assert cand.rank == r, (cand.rank, r)
            err = rel_err(s_out, ref_out)
            assert err <= TOL, f"rank {r}/{full}, mode {mode}, heads {heads}: rel err {err:.3g} vs low-rank reference"


# --------------------------------------------------------------------------- torch-built layers


def export(module, shape: tuple[int, ...], dynamic: dict[int, str] | None, seed: int,
           feed_shape: tuple[int, ...] | None = None) -> Case:
    """Export `module` with the TorchScript exporter into a tmp file; feed `feed_shape` (default `shape`)."""
    module.eval()
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(tmp) / "layer.onnx"
        torch.onnx.export(module, (torch.zeros(shape),), str(path), dynamo=False, opset_version=OPSET,
                          input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": dynamic} if dynamic else None)
        model = onnx.load(str(path))
    x = np.random.default_rng(seed).standard_normal(feed_shape or shape).astype(np.float32)
    return Case(model, {"x": x}, heads_ok=True)


def tag(**features: object) -> None:
    """One hypothesis event per feature (see `pytest --hypothesis-show-statistics`)."""
    for k, v in features.items():
        event(f"{k}={v}")


def _per_dim(draw, nd: int, lo: int, hi: int) -> tuple[int, ...]:
    return tuple(draw(st.integers(lo, hi)) for _ in range(nd))


def _dynamic_axes(dynamic: str | None, nd: int) -> dict[int, str] | None:
    return {None: None, "batch": {0: "n"}, "all": {0: "n", **{2 + i: f"s{i}" for i in range(nd)}}}[dynamic]


def _feed_shape(shape: tuple[int, ...], dynamic: str | None) -> tuple[int, ...]:
    """Dynamic axes are fed other sizes than the export's: the student must not have baked them in."""
    if dynamic == "all":
        return (shape[0] + 1, shape[1], *(s + 1 for s in shape[2:]))
    return (shape[0] + 1, *shape[1:]) if dynamic == "batch" else shape


PADDINGS = ("same", "valid", "explicit")


@st.composite
def conv_cases(draw, nd: int, padding_kind: str) -> Case:
    groups = draw(st.sampled_from([1, 2, 3]))
    cin_g = draw(st.integers(1 if groups == 1 else 2, 4))  # groups > 1: never depthwise
    out_g = draw(CHANNELS)
    kernel = _per_dim(draw, nd, 1, 3)
    # torch allows padding='same' only at stride 1 and exports it as auto_pad SAME_UPPER, which ONNX Runtime
    # refuses with dilation ("Dilation not supported for AutoPadType::SAME_UPPER"): dilated 'same' is untested
    stride = (1,) * nd if padding_kind == "same" else _per_dim(draw, nd, 1, 2)
    dilation = (1,) * nd if padding_kind == "same" else _per_dim(draw, nd, 1, 2)
    padding: object = padding_kind
    if padding_kind == "explicit":
        padding = _per_dim(draw, nd, 0, 2)
    bias = draw(st.booleans())
    span = [d * (k - 1) + 1 for d, k in zip(dilation, kernel, strict=True)]
    size = tuple(draw(st.integers(s, s + 4)) for s in span)
    batch = draw(st.integers(1, 2))
    dynamic = draw(st.sampled_from([None, "batch", "all"]))
    seed = draw(st.integers(0, 2**16))
    tag(groups=groups, stride=max(stride), dilation=max(dilation), bias=bias, dynamic=dynamic,
        full_rank_1=min(out_g, cin_g * int(np.prod(kernel))) == 1)
    torch.manual_seed(seed)
    cls = torch.nn.Conv1d if nd == 1 else torch.nn.Conv2d
    module = cls(groups * cin_g, groups * out_g, kernel, stride=stride, padding=padding, dilation=dilation,
                 groups=groups, bias=bias, padding_mode="zeros")
    shape = (batch, groups * cin_g, *size)
    return export(module, shape, _dynamic_axes(dynamic, nd), seed, _feed_shape(shape, dynamic))


@st.composite
def conv_transpose_cases(draw, nd: int, groups: int) -> Case:
    cin_g = draw(st.integers(1 if groups == 1 else 2, 4))
    out_g = draw(CHANNELS)
    kernel = _per_dim(draw, nd, 1, 3)
    stride = _per_dim(draw, nd, 1, 2)
    dilation = _per_dim(draw, nd, 1, 2)
    padding = tuple(draw(st.integers(0, d * (k - 1) // 2)) for d, k in zip(dilation, kernel, strict=True))
    output_padding = tuple(draw(st.integers(0, s - 1)) for s in stride)
    bias = draw(st.booleans())
    size = _per_dim(draw, nd, 1, 5)
    batch = draw(st.integers(1, 2))
    dynamic = draw(st.sampled_from([None, "batch", "all"]))
    seed = draw(st.integers(0, 2**16))
    tag(stride=max(stride), dilation=max(dilation), padding=max(padding) > 0, output_padding=max(output_padding) > 0,
        bias=bias, dynamic=dynamic)
    torch.manual_seed(seed)
    cls = torch.nn.ConvTranspose1d if nd == 1 else torch.nn.ConvTranspose2d
    module = cls(groups * cin_g, groups * out_g, kernel, stride=stride, padding=padding,
                 output_padding=output_padding, groups=groups, bias=bias, dilation=dilation)
    shape = (batch, groups * cin_g, *size)
    return export(module, shape, _dynamic_axes(dynamic, nd), seed, _feed_shape(shape, dynamic))


@st.composite
def linear_cases(draw, input_rank: int) -> Case:
    n_in, n_out = draw(FEATURES), draw(FEATURES)
    bias = draw(st.booleans())
    lead = _per_dim(draw, input_rank - 1, 1, 3)
    dynamic = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    tag(bias=bias, dynamic=dynamic)
    torch.manual_seed(seed)
    module = torch.nn.Linear(n_in, n_out, bias=bias)
    shape = (*lead, n_in)
    axes = {i: f"d{i}" for i in range(len(lead))} if dynamic else None
    feed = (*(d + 1 for d in lead), n_in) if dynamic else shape
    case = export(module, shape, axes, seed, feed)
    # the exporter's choice: Gemm(transB=1) for a 2-D input with a bias, else MatMul (+ Add)
    want = "Gemm" if input_rank == 2 and bias else "MatMul"
    assert dense_node(case.model).op_type == want
    return case


# --------------------------------------------------------------------------- onnx.helper-built layers


def _model(nodes, inputs, output_name: str, inits: list[TensorProto], opset: int) -> ModelProto:
    graph = helper.make_graph(nodes, "layer", inputs,
                              [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


def _dims(shape: tuple[int, ...], dynamic: set[int]) -> list[int | str]:
    return [f"d{i}" if i in dynamic else d for i, d in enumerate(shape)]


# C's shape for an output Y[M, N]: none, [N], [1, N], scalar, [1], [M, N], [M, 1]
C_KINDS = ("none", "vector", "row", "scalar", "one", "full", "column")


@st.composite
def gemm_cases(draw, c_kind: str) -> Case:
    side = draw(st.sampled_from(["right", "left"]))
    rows, n_in, n_out = draw(st.integers(1, 5)), draw(FEATURES), draw(FEATURES)
    if c_kind in ("full", "column") and draw(st.booleans()):
        rows = n_out  # a square output: C [M, 1] then has one value per output without being a bias
    trans_a, trans_b = draw(st.integers(0, 1)), draw(st.integers(0, 1))
    alpha = draw(st.sampled_from([1.0, 0.5, 2.0, -1.25]))
    beta = draw(st.sampled_from([1.0, 0.5, -1.5]))
    opset = draw(st.sampled_from([9, 11, 13, 17] if c_kind != "none" else [11, 13, 17]))  # C optional from 11
    dynamic = draw(st.booleans()) and c_kind not in ("full", "column")
    seed = draw(st.integers(0, 2**16))
    tag(side=side, transA=trans_a, transB=trans_b, alpha=alpha, beta=beta, dynamic=dynamic)
    rng = np.random.default_rng(seed)
    if side == "right":  # Y[rows, out] = alpha * x' @ W' + beta * C
        m, n = rows, n_out
        w = rng.standard_normal((n_out, n_in) if trans_b else (n_in, n_out)).astype(np.float32)
        x_shape = (n_in, rows) if trans_a else (rows, n_in)
        x_dyn = {1 if trans_a else 0} if dynamic else set()
        inputs = ["x", "W"]
    else:  # Y[out, cols] = alpha * W' @ x' + beta * C
        m, n = n_out, rows
        w = rng.standard_normal((n_in, n_out) if trans_a else (n_out, n_in)).astype(np.float32)
        x_shape = (rows, n_in) if trans_b else (n_in, rows)
        x_dyn = {0 if trans_b else 1} if dynamic else set()
        inputs = ["W", "x"]
    inits = [numpy_helper.from_array(w, "W")]
    c_shape = {"vector": (n,), "row": (1, n), "scalar": (), "one": (1,), "full": (m, n), "column": (m, 1)}.get(c_kind)
    if c_shape is not None:
        inits.append(numpy_helper.from_array(rng.standard_normal(c_shape).astype(np.float32), "C"))
        inputs.append("C")
    node = helper.make_node("Gemm", inputs, ["y"], name="gemm", alpha=alpha, beta=beta, transA=trans_a,
                            transB=trans_b)
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, _dims(x_shape, x_dyn))
    model = _model([node], [x_info], "y", inits, opset)
    # heads need the weight on the right and C a bias (one value, or one per output: [M, N] and [M, 1] only at M == 1)
    heads_ok = side == "right" and (c_kind not in ("full", "column") or m == 1)
    feed = {"x": rng.standard_normal(x_shape).astype(np.float32)}
    return Case(model, feed, heads_ok)


@st.composite
def matmul_cases(draw, side: str) -> Case:
    n_in, n_out = draw(FEATURES), draw(FEATURES)
    lead = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
    dynamic = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    if side == "right":  # x[..., in] @ W[in, out]
        w = rng.standard_normal((n_in, n_out)).astype(np.float32)
        x_shape = (*lead, n_in)
        inputs = ["x", "W"]
    else:  # W[out, in] @ x[..., in, cols] (or x[in]: a matrix-vector product)
        w = rng.standard_normal((n_out, n_in)).astype(np.float32)
        cols = draw(st.integers(1, 4))
        x_shape = (*lead, n_in, cols) if draw(st.booleans()) or lead else (n_in,)
        inputs = ["W", "x"]
    x_dyn = {i for i, d in enumerate(x_shape) if d != n_in} if dynamic else set()
    node = helper.make_node("MatMul", inputs, ["y"], name="matmul")
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, _dims(x_shape, x_dyn))
    model = _model([node], [x_info], "y", [numpy_helper.from_array(w, "W")], OPSET)
    heads_ok = side == "right" and len(x_shape) >= 2
    tag(x_rank=len(x_shape), dynamic=dynamic)
    return Case(model, {"x": rng.standard_normal(x_shape).astype(np.float32)}, heads_ok)


@st.composite
def auto_pad_cases(draw, auto_pad: str) -> Case:
    nd = draw(st.sampled_from([1, 2]))
    groups = draw(st.sampled_from([1, 2]))
    cin_g = draw(st.integers(1 if groups == 1 else 2, 4))
    out_g = draw(CHANNELS)
    kernel = _per_dim(draw, nd, 1, 3)
    stride = _per_dim(draw, nd, 1, 2)
    # ONNX Runtime: "Dilation not supported for AutoPadType::SAME_UPPER or AutoPadType::SAME_LOWER"
    dilation = _per_dim(draw, nd, 1, 2) if auto_pad == "VALID" else (1,) * nd
    bias = draw(st.booleans())
    span = [d * (k - 1) + 1 for d, k in zip(dilation, kernel, strict=True)]
    size = tuple(draw(st.integers(s, s + 4)) for s in span)
    batch = draw(st.integers(1, 2))
    dynamic = draw(st.booleans())
    opset = draw(st.sampled_from([9, 11, 17]))
    seed = draw(st.integers(0, 2**16))
    tag(nd=nd, groups=groups, stride=max(stride), dilation=max(dilation), bias=bias, dynamic=dynamic)
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((groups * out_g, cin_g, *kernel)) / np.sqrt(cin_g * np.prod(kernel))).astype(np.float32)
    inits = [numpy_helper.from_array(w, "W")]
    inputs = ["x", "W"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(groups * out_g).astype(np.float32), "B"))
        inputs.append("B")
    node = helper.make_node("Conv", inputs, ["y"], name="conv", auto_pad=auto_pad, group=groups,
                            kernel_shape=list(kernel), strides=list(stride), dilations=list(dilation))
    x_shape = (batch, groups * cin_g, *size)
    x_dyn = {0, *range(2, 2 + nd)} if dynamic else set()
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, _dims(x_shape, x_dyn))
    model = _model([node], [x_info], "y", inits, opset)
    # heads on dynamic spatial dims need Shape/Slice/Concat for the output shape, so opset >= 10
    heads_ok = not (dynamic and opset < 10)
    feed = _feed_shape(x_shape, "all" if dynamic else None)
    return Case(model, {"x": rng.standard_normal(feed).astype(np.float32)}, heads_ok)


# --------------------------------------------------------------------------- the properties
# The categorical axis that matters most is a pytest parameter, so every value is covered whatever
# hypothesis draws; the rest is drawn. 540 examples: 3x30 + 3x20 + 2x30 + 2x12 + 3x20 + 7x18 + 2x30 + 3x20.


@pytest.mark.parametrize("padding_kind", PADDINGS)
@examples(30)
@given(data=st.data())
def test_conv2d(padding_kind: str, data: st.DataObject) -> None:
    check_case(data.draw(conv_cases(2, padding_kind), label="case"), data)


@pytest.mark.parametrize("padding_kind", PADDINGS)
@examples(20)
@given(data=st.data())
def test_conv1d(padding_kind: str, data: st.DataObject) -> None:
    check_case(data.draw(conv_cases(1, padding_kind), label="case"), data)


@pytest.mark.parametrize("groups", [1, 2])
@examples(30)
@given(data=st.data())
def test_conv_transpose2d(groups: int, data: st.DataObject) -> None:
    check_case(data.draw(conv_transpose_cases(2, groups), label="case"), data)


@pytest.mark.parametrize("groups", [1, 2])
@examples(12)
@given(data=st.data())
def test_conv_transpose1d(groups: int, data: st.DataObject) -> None:
    check_case(data.draw(conv_transpose_cases(1, groups), label="case"), data)


@pytest.mark.parametrize("input_rank", [2, 3, 4])
@examples(20)
@given(data=st.data())
def test_linear(input_rank: int, data: st.DataObject) -> None:
    check_case(data.draw(linear_cases(input_rank), label="case"), data)


@pytest.mark.parametrize("c_kind", C_KINDS)
@examples(18)
@given(data=st.data())
def test_gemm(c_kind: str, data: st.DataObject) -> None:
    check_case(data.draw(gemm_cases(c_kind), label="case"), data)


@pytest.mark.parametrize("side", ["right", "left"])
@examples(30)
@given(data=st.data())
def test_matmul(side: str, data: st.DataObject) -> None:
    check_case(data.draw(matmul_cases(side), label="case"), data)


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID"])
@examples(20)
@given(data=st.data())
def test_conv_auto_pad(auto_pad: str, data: st.DataObject) -> None:
    check_case(data.draw(auto_pad_cases(auto_pad), label="case"), data)
