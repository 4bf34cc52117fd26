"""Layers inside If/Loop/Scan subgraphs are compressed like the main graph's (issue 19, point 3).

Streaming and multi-rate models keep their layers in subgraphs: both branches of an If that selects on a
sample rate, the body of a Loop or Scan that steps an RNN-like cell. Three such teachers, built with
`onnx.helper`:

- multi-rate: an If whose branches each hold a Conv and a MatMul; one branch's Conv weight is read from
  the outer scope, the other is the branch's own, and the MatMul weight is shared by both branches;
- streaming: a Loop whose body steps `h = tanh(x_t Wx + h Wh)` (Wx outer, Wh the body's own), and the
  same cell as a Scan;
- nested: an If inside a Loop body, reading weights two scopes out, one the Loop body's.

For each: `--mode svd` and `--mode inher` at full rank match the teacher in ONNX Runtime (<= 1e-4), at
`--param-ratio 0.5` the student is smaller and runs, the file is byte-reproducible, and the bridge builds
the student and a perturbed write-back matches ONNX Runtime.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import ModelProto, TensorProto, helper, numpy_helper

ort = pytest.importorskip("onnxruntime")

from onnx_inher import api  # noqa: E402
from onnx_inher.ir.graph import walk_scopes  # noqa: E402
from onnx_inher.planning.plan import Options, Plan  # noqa: E402
from onnx_inher.planning.rank import parse_policy  # noqa: E402

F32 = TensorProto.FLOAT
OPSET = 17
TOL = 1e-4
C, T, B = 32, 20, 2  # channels, frames, batch
D, H, STEPS = 48, 64, 6  # streaming cell: input and state widths, steps


def _randn(*shape: int, seed: int, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def _init(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def _vi(name: str, elem: int, shape: list | None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def _model(nodes: list, inputs: list, outputs: list, inits: list) -> ModelProto:
    graph = helper.make_graph(nodes, "teacher", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="tests")
    onnx.checker.check_model(model, full_check=True)
    return model


# --------------------------------------------------------------------------- teachers


def multi_rate() -> ModelProto:
    """x [B, C, T] -> If(high_rate): each branch Conv -> Relu -> Transpose -> MatMul(Wshared) -> head."""
    def branch(tag: str, conv_w: str, local: list[TensorProto], dilation: int) -> onnx.GraphProto:
        nodes = [helper.make_node("Conv", ["x", conv_w, "conv_b"], [f"{tag}_c"], name=f"{tag}_conv",
                                  kernel_shape=[3], pads=[dilation, dilation], dilations=[dilation]),
                 helper.make_node("Relu", [f"{tag}_c"], [f"{tag}_r"], name=f"{tag}_relu"),
                 helper.make_node("Transpose", [f"{tag}_r"], [f"{tag}_t"], name=f"{tag}_tr", perm=[0, 2, 1]),
                 helper.make_node("MatMul", [f"{tag}_t", "Wshared"], [f"{tag}_out"], name=f"{tag}_proj")]
        return helper.make_graph(nodes, tag, [], [_vi(f"{tag}_out", F32, [B, T, 48])], local)

    then_g = branch("hi", "Whi", [_init("Whi", _randn(C, C, 3, seed=1, scale=0.2))], 1)
    else_g = branch("lo", "Wlo", [], 2)  # reads its Conv weight from the outer scope
    nodes = [helper.make_node("If", ["high_rate"], ["feat"], name="rate", then_branch=then_g, else_branch=else_g),
             helper.make_node("MatMul", ["feat", "Whead"], ["y"], name="head")]
    inits = [_init("Wlo", _randn(C, C, 3, seed=2, scale=0.2)), _init("conv_b", _randn(C, seed=3)),
             _init("Wshared", _randn(C, 48, seed=4, scale=0.2)), _init("Whead", _randn(48, 40, seed=5, scale=0.2))]
    return _model(nodes, [_vi("x", F32, [B, C, T]), _vi("high_rate", TensorProto.BOOL, [])],
                  [_vi("y", F32, [B, T, 40])], inits)


def _cell(prefix: str, x: str, h: str, h_out: str) -> list[onnx.NodeProto]:
    """`h_out = tanh(x Wx + h Wh)`; Wx is read from the main graph, Wh is the body's own."""
    return [helper.make_node("MatMul", [x, "Wx"], [f"{prefix}_xw"], name=f"{prefix}_in"),
            helper.make_node("MatMul", [h, "Wh"], [f"{prefix}_hw"], name=f"{prefix}_rec"),
            helper.make_node("Add", [f"{prefix}_xw", f"{prefix}_hw"], [f"{prefix}_s"], name=f"{prefix}_add"),
            helper.make_node("Tanh", [f"{prefix}_s"], [h_out], name=f"{prefix}_tanh")]


def streaming_loop() -> ModelProto:
    """A Loop over frames of x [STEPS, B, D] carrying h [B, H]; outputs the last state and every state."""
    body = helper.make_graph(
        [helper.make_node("Gather", ["x", "i"], ["x_t"], name="frame", axis=0),
         helper.make_node("Identity", ["c_in"], ["c_out"], name="keep"),
         *_cell("cell", "x_t", "h", "h_next"),
         helper.make_node("Identity", ["h_next"], ["h_seq"], name="emit")],
        "body", [_vi("i", TensorProto.INT64, []), _vi("c_in", TensorProto.BOOL, []), _vi("h", F32, [B, H])],
        [_vi("c_out", TensorProto.BOOL, []), _vi("h_next", F32, [B, H]), _vi("h_seq", F32, [B, H])],
        [_init("Wh", _randn(H, H, seed=11, scale=0.15))])
    nodes = [helper.make_node("Loop", ["steps", "", "h0"], ["h_last", "hs"], name="stream", body=body),
             helper.make_node("MatMul", ["hs", "Wout"], ["y"], name="readout")]
    inits = [_init("steps", np.array(STEPS, np.int64)), _init("Wx", _randn(D, H, seed=12, scale=0.2)),
             _init("Wout", _randn(H, 40, seed=13, scale=0.2))]
    return _model(nodes, [_vi("x", F32, [STEPS, B, D]), _vi("h0", F32, [B, H])],
                  [_vi("h_last", F32, [B, H]), _vi("y", F32, [STEPS, B, 40])], inits)


def streaming_scan() -> ModelProto:
    """The same cell as a Scan over axis 0 of x [STEPS, B, D]."""
    body = helper.make_graph(
        [*_cell("cell", "x_t", "h", "h_next"), helper.make_node("Identity", ["h_next"], ["h_seq"], name="emit")],
        "body", [_vi("h", F32, [B, H]), _vi("x_t", F32, [B, D])],
        [_vi("h_next", F32, [B, H]), _vi("h_seq", F32, [B, H])],
        [_init("Wh", _randn(H, H, seed=11, scale=0.15))])
    nodes = [helper.make_node("Scan", ["h0", "x"], ["h_last", "hs"], name="stream", body=body,
                              num_scan_inputs=1),
             helper.make_node("MatMul", ["hs", "Wout"], ["y"], name="readout")]
    inits = [_init("Wx", _randn(D, H, seed=12, scale=0.2)), _init("Wout", _randn(H, 40, seed=13, scale=0.2))]
    return _model(nodes, [_vi("x", F32, [STEPS, B, D]), _vi("h0", F32, [B, H])],
                  [_vi("h_last", F32, [B, H]), _vi("y", F32, [STEPS, B, 40])], inits)


def nested() -> ModelProto:
    """A Loop body holding an If: its branches read Wa (the Loop body's) and Wx (the main graph's, two
    scopes out), and Wa is used by both branches."""
    then_g = helper.make_graph(
        [helper.make_node("MatMul", ["x_t", "Wx"], ["t_x"], name="t_in"),
         helper.make_node("MatMul", ["t_x", "Wa"], ["t_out"], name="t_mix")],
        "then", [], [_vi("t_out", F32, [B, H])])
    else_g = helper.make_graph(
        [helper.make_node("MatMul", ["x_t", "Wx"], ["e_x"], name="e_in"),
         helper.make_node("Relu", ["e_x"], ["e_r"], name="e_relu"),
         helper.make_node("MatMul", ["e_r", "Wa"], ["e_a"], name="e_mix"),
         helper.make_node("Gemm", ["e_a", "We", "be"], ["e_out"], name="e_gemm")],
        "else", [], [_vi("e_out", F32, [B, H])],
        [_init("We", _randn(H, H, seed=21, scale=0.15)), _init("be", _randn(H, seed=22))])
    body = helper.make_graph(
        [helper.make_node("Gather", ["x", "i"], ["x_t"], name="frame", axis=0),
         helper.make_node("Identity", ["c_in"], ["c_out"], name="keep"),
         helper.make_node("If", ["mode"], ["u"], name="pick", then_branch=then_g, else_branch=else_g),
         helper.make_node("Add", ["u", "h"], ["h_next"], name="acc"),
         helper.make_node("Identity", ["h_next"], ["h_seq"], name="emit")],
        "body", [_vi("i", TensorProto.INT64, []), _vi("c_in", TensorProto.BOOL, []), _vi("h", F32, [B, H])],
        [_vi("c_out", TensorProto.BOOL, []), _vi("h_next", F32, [B, H]), _vi("h_seq", F32, [B, H])],
        [_init("Wa", _randn(H, H, seed=23, scale=0.15))])
    nodes = [helper.make_node("Loop", ["steps", "", "h0"], ["h_last", "hs"], name="stream", body=body),
             helper.make_node("MatMul", ["hs", "Wout"], ["y"], name="readout")]
    inits = [_init("steps", np.array(STEPS, np.int64)), _init("Wx", _randn(D, H, seed=24, scale=0.2)),
             _init("Wout", _randn(H, 40, seed=25, scale=0.2))]
    return _model(nodes, [_vi("x", F32, [STEPS, B, D]), _vi("h0", F32, [B, H]), _vi("mode", TensorProto.BOOL, [])],
                  [_vi("h_last", F32, [B, H]), _vi("y", F32, [STEPS, B, 40])], inits)


def _feeds_multi_rate() -> list[dict[str, np.ndarray]]:
    x = _randn(B, C, T, seed=30)
    return [{"x": x, "high_rate": np.array(flag)} for flag in (True, False)]


def _feeds_stream() -> list[dict[str, np.ndarray]]:
    return [{"x": _randn(STEPS, B, D, seed=31), "h0": _randn(B, H, seed=32, scale=0.5)}]


def _feeds_nested() -> list[dict[str, np.ndarray]]:
    return [{**_feeds_stream()[0], "mode": np.array(flag)} for flag in (True, False)]


TEACHERS: dict[str, tuple[Callable[[], ModelProto], Callable[[], list[dict[str, np.ndarray]]]]] = {
    "multi_rate": (multi_rate, _feeds_multi_rate),
    "loop": (streaming_loop, _feeds_stream),
    "scan": (streaming_scan, _feeds_stream),
    "nested": (nested, _feeds_nested),
}
# the subgraph layers each teacher must have factorised (scope-qualified node ids)
INNER = {
    "multi_rate": {"rate/then_branch/hi_conv", "rate/then_branch/hi_proj", "rate/else_branch/lo_conv",
                   "rate/else_branch/lo_proj"},
    "loop": {"stream/body/cell_in", "stream/body/cell_rec"},
    "scan": {"stream/body/cell_in", "stream/body/cell_rec"},
    "nested": {"stream/body/pick/then_branch/t_in", "stream/body/pick/then_branch/t_mix",
               "stream/body/pick/else_branch/e_in", "stream/body/pick/else_branch/e_mix",
               "stream/body/pick/else_branch/e_gemm"},
}
MODES = {"svd": ("svd", 1), "inher": ("inher", 2)}


# --------------------------------------------------------------------------- helpers


def run_ort(model: Path | ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    src = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"]).run(None, feed)


def max_abs(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    assert [x.shape for x in a] == [x.shape for x in b]
    return max(float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))) for x, y in zip(a, b, strict=True))


def params(model: ModelProto) -> int:
    """Float parameters held anywhere in the model (subgraph initializers included)."""
    return sum(int(np.prod(t.dims)) for _, g, _ in walk_scopes(model.graph) for t in g.initializer
               if t.data_type == F32)


def teacher(tmp_path: Path, name: str) -> tuple[Path, list[dict[str, np.ndarray]]]:
    build, feeds = TEACHERS[name]
    path = tmp_path / f"{name}.onnx"
    onnx.save(build(), str(path))
    return path, feeds()


def full(mode: str) -> Options:
    m, h = MODES[mode]
    return Options(mode=m, heads=h, policy=parse_policy(rank_ratio=1.0), guard=False, latency_check=False)


def half(mode: str) -> Options:
    m, h = MODES[mode]
    return Options(mode=m, heads=h, policy=parse_policy(param_ratio=0.5), rank_multiple=8, latency_check=False)


def by_node(plan: Plan) -> dict:
    return {c.node: c for c in plan.candidates}


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", list(TEACHERS))
def test_full_rank_student_is_exact(tmp_path: Path, name: str, mode: str) -> None:
    path, feeds = teacher(tmp_path, name)
    result = api.compress(path, tmp_path / "student.onnx", full(mode))
    cands = by_node(result.plan)
    for node in INNER[name]:
        assert cands[node].decision == "factorize", (node, cands[node].reason)
        assert cands[node].graph == node.rsplit("/", 1)[0]
    assert all(c.graph == "main" for n, c in cands.items() if "/" not in n)
    student = onnx.load(str(tmp_path / "student.onnx"))
    onnx.checker.check_model(student, full_check=True)
    for feed in feeds:
        want, got = run_ort(path, feed), run_ort(tmp_path / "student.onnx", feed)
        scale = max(float(np.max(np.abs(w))) for w in want)
        assert max_abs(got, want) <= TOL * max(scale, 1.0), (feed.keys(), max_abs(got, want))


def test_shared_weight_is_factorised_once_where_both_branches_see_it(tmp_path: Path) -> None:
    path, _ = teacher(tmp_path, "multi_rate")
    result = api.compress(path, tmp_path / "student.onnx", full("svd"))
    cands = by_node(result.plan)
    # the If's attributes are stored sorted (else_branch first): the first layer met owns the factors
    lo, hi = cands["rate/else_branch/lo_proj"], cands["rate/then_branch/hi_proj"]
    assert lo.shares_factors_with is None and hi.shares_factors_with == lo.node and hi.params_after == 0
    student = onnx.load(str(tmp_path / "student.onnx"))
    main = {t.name for t in student.graph.initializer}
    assert {"rate/else_branch/lo_proj/svd/down.weight", "rate/else_branch/lo_proj/svd/up.weight"} <= main
    assert not {"Wshared", "Wlo"} & main  # replaced: read by nothing any more
    scopes = {p: g for p, g, _ in walk_scopes(student.graph)}
    then_inits = {t.name for t in scopes["rate/then_branch"].initializer}
    assert then_inits == {"rate/then_branch/hi_conv/svd/down.weight", "rate/then_branch/hi_conv/svd/up.weight"}
    assert not {t.name for t in scopes["rate/else_branch"].initializer}
    # the outer-scope Conv weight's factors live in the main graph, next to the weight they replace
    assert "rate/else_branch/lo_conv/svd/down.weight" in main
    names = [n for _, g, _ in walk_scopes(student.graph) for n in [*(o for nd in g.node for o in nd.output),
                                                                   *(t.name for t in g.initializer)]]
    assert len(names) == len(set(names))


def test_plan_names_the_subgraph_and_plain_models_keep_their_plan(tmp_path: Path) -> None:
    path, _ = teacher(tmp_path, "nested")
    plan = api.plan(path, half("svd"))
    doc = plan.to_json()
    assert '"graph": "stream/body/pick/else_branch"' in doc and '"graph": "main"' in doc
    again = Plan.from_json(doc)
    assert [c.graph for c in again.candidates] == [c.graph for c in plan.candidates]
    plain = tmp_path / "plain.onnx"
    onnx.save(_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")], [_vi("x", F32, [B, H])],
                     [_vi("y", F32, [B, H])], [_init("W", _randn(H, H, seed=1))]), str(plain))
    assert '"graph"' not in api.plan(plain, half("svd")).to_json()


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", list(TEACHERS))
def test_half_params_is_smaller_runs_and_is_reproducible(tmp_path: Path, name: str, mode: str) -> None:
    path, feeds = teacher(tmp_path, name)
    first, second = tmp_path / "a.onnx", tmp_path / "b.onnx"
    result = api.compress(path, first, half(mode))
    api.compress(path, second, half(mode))
    assert first.read_bytes() == second.read_bytes()
    inner = [c for c in result.plan.candidates if c.graph not in (None, "main")]
    assert any(c.decision == "factorize" for c in inner), [(c.node, c.reason) for c in inner]
    assert all(c.reason for c in result.plan.candidates if c.decision == "skip")
    student = onnx.load(str(first))
    assert params(student) < params(onnx.load(str(path)))
    for feed in feeds:
        outs = run_ort(first, feed)
        assert all(np.isfinite(o).all() for o in outs)
        assert [o.shape for o in outs] == [o.shape for o in run_ort(path, feed)]


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", ["multi_rate", "loop", "nested"])
def test_bridge_builds_the_student_and_perturbed_write_back_matches_ort(tmp_path: Path, name: str,
                                                                        mode: str) -> None:
    torch = pytest.importorskip("torch")
    from onnx_inher.bridge import to_torch, write_back

    path, feeds = teacher(tmp_path, name)
    api.compress(path, tmp_path / "student.onnx", full(mode))
    student = onnx.load(str(tmp_path / "student.onnx"))
    module, param_map = to_torch(student, trainable="all")
    assert any("/svd/" in k or "/inher/" in k for k in param_map)
    with torch.no_grad():
        for feed in feeds:  # the module computes what the student computes
            got = module(*[torch.from_numpy(feed[n]) for n in module.input_names])
            assert max_abs([g.numpy() for g in got], run_ort(student, feed)) <= 1e-4
        for p in module.parameters():
            if p.requires_grad:
                p.mul_(1.01)
    written = write_back(student, module, param_map)
    assert params(written) == params(student)
    with torch.no_grad():
        for feed in feeds:
            got = [g.numpy() for g in module(*[torch.from_numpy(feed[n]) for n in module.input_names])]
            want = run_ort(written, feed)
            assert max_abs(got, want) <= 1e-4
            assert max_abs(want, run_ort(student, feed)) > 1e-4  # the perturbation reached the graph


def test_missing_shapes_in_a_body_do_not_crash(tmp_path: Path) -> None:
    """A Loop body whose state has no declared shape: its layers are still found, compressed exactly."""
    model = streaming_loop()
    body = model.graph.node[0].attribute[0].g
    for v in [*body.input, *body.output]:
        if v.type.tensor_type.elem_type == F32:
            v.type.tensor_type.ClearField("shape")
    path = tmp_path / "loose.onnx"
    onnx.save(model, str(path))
    for mode in MODES:
        result = api.compress(path, tmp_path / f"{mode}.onnx", full(mode))
        cands = by_node(result.plan)
        assert all(cands[n].decision == "factorize" for n in INNER["loop"])
        for feed in _feeds_stream():
            assert max_abs(run_ort(tmp_path / f"{mode}.onnx", feed), run_ort(path, feed)) <= 1e-4


def test_dynamic_shapes_through_the_branches(tmp_path: Path) -> None:
    """Dynamic batch and time, branches without declared output shapes: the Conv heads take their
    spatial dims at run time, and the student is exact at any length."""
    model = multi_rate()
    x = model.graph.input[0].type.tensor_type.shape
    x.dim[0].dim_param, x.dim[2].dim_param = "N", "T"
    y = model.graph.output[0].type.tensor_type.shape
    y.dim[0].dim_param, y.dim[1].dim_param = "N", "T"
    for a in model.graph.node[0].attribute:
        a.g.output[0].type.tensor_type.ClearField("shape")
    path = tmp_path / "dynamic.onnx"
    onnx.save(model, str(path))
    for mode in MODES:
        result = api.compress(path, tmp_path / f"{mode}.onnx", full(mode))
        assert all(by_node(result.plan)[n].decision == "factorize" for n in INNER["multi_rate"])
        for n, t in ((1, 13), (3, 20)):
            for flag in (True, False):
                feed = {"x": _randn(n, C, t, seed=n), "high_rate": np.array(flag)}
                assert max_abs(run_ort(tmp_path / f"{mode}.onnx", feed), run_ort(path, feed)) <= 1e-4


def test_weight_shared_by_main_and_branch_and_weights_behind_chains(tmp_path: Path) -> None:
    """W is read by a main-graph MatMul and by a branch MatMul: one factorisation, W gone. The other
    branch reads an outer weight through its own Transpose and holds a Constant-node weight: both fold,
    and what they leave behind is cleaned up in both scopes."""
    then_g = helper.make_graph([helper.make_node("MatMul", ["h", "W"], ["t_out"], name="t_mm")], "then", [],
                               [_vi("t_out", F32, [B, H])])
    else_g = helper.make_graph(
        [helper.make_node("Transpose", ["V"], ["Vt"], name="e_tr", perm=[1, 0]),
         helper.make_node("MatMul", ["h", "Vt"], ["e_v"], name="e_mm"),
         helper.make_node("Constant", [], ["K"], name="e_k", value=_init("K", _randn(H, H, seed=42, scale=0.1))),
         helper.make_node("MatMul", ["e_v", "K"], ["e_out"], name="e_k_mm")],
        "else", [], [_vi("e_out", F32, [B, H])])
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="fc"),
             helper.make_node("If", ["flag"], ["y"], name="sel", then_branch=then_g, else_branch=else_g)]
    model = _model(nodes, [_vi("x", F32, [B, H]), _vi("flag", TensorProto.BOOL, [])], [_vi("y", F32, [B, H])],
                   [_init("W", _randn(H, H, seed=40, scale=0.1)), _init("V", _randn(H, H, seed=41, scale=0.1))])
    path = tmp_path / "chains.onnx"
    onnx.save(model, str(path))
    guarded = by_node(api.plan(path, Options(mode="svd", policy=parse_policy(rank=8), rank_multiple=1)))
    assert guarded["fc"].decision == guarded["sel/then_branch/t_mm"].decision == "factorize"
    assert guarded["sel/then_branch/t_mm"].shares_factors_with == "fc"
    for mode in MODES:
        result = api.compress(path, tmp_path / f"{mode}.onnx", full(mode))
        cands = by_node(result.plan)
        assert all(c.decision == "factorize" for c in cands.values()), [(c.node, c.reason) for c in cands.values()]
        student = onnx.load(str(tmp_path / f"{mode}.onnx"))
        onnx.checker.check_model(student, full_check=True)
        scopes = {p: g for p, g, _ in walk_scopes(student.graph)}
        assert not {"W", "V"} & {t.name for t in student.graph.initializer}
        assert not {"e_tr", "e_k"} & {n.name for n in scopes["sel/else_branch"].node}
        for flag in (True, False):
            feed = {"x": _randn(B, H, seed=43), "flag": np.array(flag)}
            assert max_abs(run_ort(tmp_path / f"{mode}.onnx", feed), run_ort(path, feed)) <= 1e-4
