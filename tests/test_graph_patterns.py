"""The weight-storage and graph shapes real exporters produce, built with `onnx.helper`.

Each test writes a small teacher, compresses it through `onnx_inher.api.compress` at full rank with the
guard off (so the student must compute what the teacher computes) and checks the student in ONNX Runtime
(normwise relative error <= 1e-4 in fp32), plus what the pattern is about: the weight chain is folded and
then removed, shared weights are factorised once, what cannot be rewritten is skipped with a reason, names
and outputs stay stable, the file is byte-reproducible.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import ModelProto, TensorProto, helper, numpy_helper

ort = pytest.importorskip("onnxruntime")

from onnx_inher import api  # noqa: E402
from onnx_inher.ir.shapes import SEQUENCE_LEN  # noqa: E402
from onnx_inher.planning.plan import Options  # noqa: E402
from onnx_inher.planning.rank import parse_policy  # noqa: E402
from onnx_inher.runtime import sample_inputs  # noqa: E402

OPSET = 17
TOL = 1e-4
FP16_TOL = 5e-3
MODES = (("svd", 1), ("inher", 2), ("inher", 3))
MODE_IDS = ["svd", "inher2", "inher3"]


# --------------------------------------------------------------------------- helpers


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def randn(*shape: int, seed: int = 0, dtype: type = np.float32) -> np.ndarray:
    return rng(seed).standard_normal(shape).astype(dtype)


def init(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def vi(name: str, elem: int, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def make_model(nodes: list, inputs: list, outputs: list, inits: list | None = None, *, opset: int = OPSET,
               ir_version: int | None = None, name: str = "teacher") -> ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, inits or [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="tests")
    if ir_version is not None:
        model.ir_version = ir_version
    onnx.checker.check_model(model, full_check=True)
    return model


def save(model: ModelProto, folder: Path, name: str = "teacher.onnx") -> Path:
    path = folder / name
    onnx.save(model, str(path))
    return path


def full(mode: str = "svd", heads: int = 1, **kw) -> Options:
    """Full rank, no guard: the student is exact."""
    return Options(mode=mode, heads=heads, policy=parse_policy(rank_ratio=1.0), guard=False, **kw)


def run_ort(path: Path, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


def assert_same_outputs(teacher: Path, student: Path, feed: dict[str, np.ndarray], bound: float = TOL) -> None:
    """Independent of `verify`: run both files in ORT here and compare normwise."""
    for t, s in zip(run_ort(teacher, feed), run_ort(student, feed), strict=True):
        assert t.shape == s.shape and t.dtype == s.dtype
        t64, s64 = t.astype(np.float64), s.astype(np.float64)
        assert np.max(np.abs(t64 - s64)) <= bound * max(np.max(np.abs(t64)), 1e-30)


def compress_exact(teacher: ModelProto | Path, folder: Path, options: Options | None = None, *,
                   out: str = "student.onnx", bound: float = TOL) -> tuple[api.CompressResult, ModelProto]:
    """Compress at full rank with verification; assert the student matches the teacher in ORT."""
    path = teacher if isinstance(teacher, Path) else save(teacher, folder)
    result = api.compress(path, folder / out, options or full(), verify=True, bound=bound)
    assert result.verification is not None
    assert result.verification.ok, result.verification.to_dict()
    assert result.verification.outputs and result.verification.max_rel <= bound
    student = onnx.load(str(folder / out))
    onnx.checker.check_model(student, full_check=True)
    model = onnx.load(str(path))
    if not any(i.type.tensor_type.elem_type == TensorProto.BOOL for i in model.graph.input):
        feed = sample_inputs(model, (options or full()).dims, seed=123)
        assert_same_outputs(path, folder / out, feed, bound)
    return result, student


def cand(result_or_plan, node: str):
    p = getattr(result_or_plan, "plan", result_or_plan)
    found = [c for c in p.candidates if c.node == node]
    assert len(found) == 1, [c.node for c in p.candidates]
    return found[0]


def node_names(model: ModelProto) -> set[str]:
    return {n.name for n in model.graph.node}


def init_names(model: ModelProto) -> set[str]:
    return {t.name for t in model.graph.initializer}


def inits_by_name(model: ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def tensor_names(model: ModelProto) -> set[str]:
    """Every tensor name the graph produces or reads."""
    names = {t.name for t in model.graph.initializer} | {i.name for i in model.graph.input}
    for n in model.graph.node:
        names.update(n.input)
        names.update(n.output)
    return names - {""}


# --------------------------------------------------------------------------- weight storage

IN, OUT = 8, 6


def _storage(kind: str) -> tuple[list, list, set[str], set[str]]:
    """Nodes and initializers that make tensor 'W' ([IN, OUT] float32) the way `kind` stores it, plus
    the names of the chain's nodes and initializers (all orphaned once the MatMul is factorised)."""
    w = randn(IN, OUT, seed=1)
    if kind == "initializer":
        return [], [init("W", w)], set(), {"W"}
    if kind == "constant":
        return [helper.make_node("Constant", [], ["W"], name="w_const", value=init("w_value", w))], [], \
            {"w_const"}, set()
    if kind == "identity":
        return [helper.make_node("Identity", ["w_raw"], ["W"], name="w_id")], [init("w_raw", w)], \
            {"w_id"}, {"w_raw"}
    if kind == "transpose":  # the dynamo exporter stores nn.Linear's [out, in] weight and transposes it
        return [helper.make_node("Transpose", ["w_t"], ["W"], name="w_tr", perm=[1, 0])], [init("w_t", w.T.copy())], \
            {"w_tr"}, {"w_t"}
    if kind == "cast":  # fp16 storage, fp32 compute
        return [helper.make_node("Cast", ["w16"], ["W"], name="w_cast", to=TensorProto.FLOAT)], \
            [init("w16", w.astype(np.float16))], {"w_cast"}, {"w16"}
    if kind == "reshape":
        return [helper.make_node("Reshape", ["w_flat", "w_shape"], ["W"], name="w_reshape")], \
            [init("w_flat", w.reshape(-1)), init("w_shape", np.array([IN, OUT], np.int64))], \
            {"w_reshape"}, {"w_flat", "w_shape"}
    if kind == "identity+transpose":
        return [helper.make_node("Identity", ["w_t"], ["w_t_id"], name="w_id"),
                helper.make_node("Transpose", ["w_t_id"], ["W"], name="w_tr", perm=[1, 0])], \
            [init("w_t", w.T.copy())], {"w_id", "w_tr"}, {"w_t"}
    if kind == "cast+transpose":
        return [helper.make_node("Cast", ["w16_t"], ["w32_t"], name="w_cast", to=TensorProto.FLOAT),
                helper.make_node("Transpose", ["w32_t"], ["W"], name="w_tr", perm=[1, 0])], \
            [init("w16_t", w.T.astype(np.float16))], {"w_cast", "w_tr"}, {"w16_t"}
    if kind == "reshape+transpose":
        return [helper.make_node("Reshape", ["w_flat", "w_shape"], ["w_t"], name="w_reshape"),
                helper.make_node("Transpose", ["w_t"], ["W"], name="w_tr", perm=[1, 0])], \
            [init("w_flat", w.T.reshape(-1)), init("w_shape", np.array([OUT, IN], np.int64))], \
            {"w_reshape", "w_tr"}, {"w_flat", "w_shape"}
    if kind == "constant+transpose":
        return [helper.make_node("Constant", [], ["w_t"], name="w_const", value=init("w_value", w.T.copy())),
                helper.make_node("Transpose", ["w_t"], ["W"], name="w_tr", perm=[1, 0])], [], \
            {"w_const", "w_tr"}, set()
    if kind == "constant+cast":
        return [helper.make_node("Constant", [], ["w16"], name="w_const", value=init("w_value", w.astype(np.float16))),
                helper.make_node("Cast", ["w16"], ["W"], name="w_cast", to=TensorProto.FLOAT)], [], \
            {"w_const", "w_cast"}, set()
    if kind == "identity+identity":
        return [helper.make_node("Identity", ["w_raw"], ["w_mid"], name="w_id1"),
                helper.make_node("Identity", ["w_mid"], ["W"], name="w_id2")], [init("w_raw", w)], \
            {"w_id1", "w_id2"}, {"w_raw"}
    raise AssertionError(kind)


STORAGE = ["initializer", "constant", "identity", "transpose", "cast", "reshape", "identity+transpose",
           "cast+transpose", "reshape+transpose", "constant+transpose", "constant+cast", "identity+identity"]


@pytest.mark.parametrize("mode,heads", MODES[:2], ids=MODE_IDS[:2])
@pytest.mark.parametrize("kind", STORAGE)
def test_weight_storage_is_located_factorised_and_cleaned(tmp_path: Path, kind: str, mode: str, heads: int) -> None:
    chain_nodes, chain_inits, dead_nodes, dead_inits = _storage(kind)
    nodes = [*chain_nodes, helper.make_node("MatMul", ["X", "W"], ["Y"], name="fc")]
    model = make_model(nodes, [vi("X", TensorProto.FLOAT, [2, 3, IN])], [vi("Y", TensorProto.FLOAT, [2, 3, OUT])],
                       chain_inits)
    # exporters also record the weight's type: that value_info must not outlive the weight
    model.graph.value_info.append(vi("W", TensorProto.FLOAT, [IN, OUT]))
    result, student = compress_exact(model, tmp_path, full(mode, heads))
    c = cand(result, "fc")
    assert c.decision == "factorize" and c.rank == min(IN, OUT)
    assert c.weight_shape == [IN, OUT]
    tag = "inher" if heads > 1 else "svd"
    assert f"fc/{tag}/down.weight" in init_names(student)
    # nothing of the old weight chain is left: its nodes, its initializers, its tensors
    assert not dead_nodes & node_names(student)
    assert not dead_inits & init_names(student)
    assert "W" not in tensor_names(student)
    assert "fc" not in node_names(student)
    assert not [n for n in student.graph.node if n.op_type == "Constant"]
    assert not {i.name for i in student.graph.input} - {"X"}
    assert {v.name for v in student.graph.value_info} <= tensor_names(student)


def test_gemm_transposed_constant_weight_and_conv_constant_weight(tmp_path: Path) -> None:
    """Gemm(transB=1) with its weight in a Constant node behind Identity, then a Conv whose weight is
    a Constant node behind Reshape: both located, factorised, their chains gone."""
    wg = randn(6, 12, seed=2)  # [out, in], transB
    wc = randn(5, 6, 3, 3, seed=3)
    nodes = [
        helper.make_node("Constant", [], ["wg_c"], name="wg_const", value=init("wg_v", wg)),
        helper.make_node("Identity", ["wg_c"], ["WG"], name="wg_id"),
        helper.make_node("Gemm", ["X", "WG", "BG"], ["H"], name="gemm", transB=1),
        helper.make_node("Reshape", ["H", "h_shape"], ["H4"], name="h_reshape"),
        helper.make_node("Constant", [], ["wc_flat"], name="wc_const", value=init("wc_v", wc.reshape(-1))),
        helper.make_node("Reshape", ["wc_flat", "wc_shape"], ["WC"], name="wc_reshape"),
        helper.make_node("Conv", ["H4", "WC"], ["Y"], name="conv", pads=[1, 1, 1, 1]),
    ]
    inits = [init("BG", randn(6, seed=4)), init("h_shape", np.array([2, 6, 1, 1], np.int64)),
             init("wc_shape", np.array(wc.shape, np.int64))]
    model = make_model(nodes, [vi("X", TensorProto.FLOAT, [2, 12])], [vi("Y", TensorProto.FLOAT, [2, 5, 1, 1])],
                       inits)
    for mode, heads in MODES:
        folder = tmp_path / f"{mode}{heads}"
        folder.mkdir()
        result, student = compress_exact(model, folder, full(mode, heads))
        assert cand(result, "gemm").decision == "factorize"
        assert cand(result, "conv").decision == "factorize"
        assert not {"wg_const", "wg_id", "wc_const", "wc_reshape", "gemm", "conv"} & node_names(student)
        assert not {"WG", "WC", "wc_flat", "wg_c"} & tensor_names(student)
        assert "wc_shape" not in init_names(student)
        assert "h_shape" in init_names(student)  # a Reshape of activations keeps its shape


# --------------------------------------------------------------------------- shared and tied weights


@pytest.mark.parametrize("mode,heads", MODES, ids=MODE_IDS)
def test_weight_shared_by_two_matmuls_is_factorised_once(tmp_path: Path, mode: str, heads: int) -> None:
    w = randn(IN, OUT, seed=5)
    nodes = [helper.make_node("MatMul", ["X1", "W"], ["Y1"], name="first"),
             helper.make_node("MatMul", ["X2", "W"], ["Y2"], name="second")]
    model = make_model(nodes, [vi("X1", TensorProto.FLOAT, [2, IN]), vi("X2", TensorProto.FLOAT, [3, 4, IN])],
                       [vi("Y1", TensorProto.FLOAT, [2, OUT]), vi("Y2", TensorProto.FLOAT, [3, 4, OUT])],
                       [init("W", w)])
    result, student = compress_exact(model, tmp_path, full(mode, heads))
    first, second = cand(result, "first"), cand(result, "second")
    assert first.decision == second.decision == "factorize"
    assert first.shares_factors_with is None
    assert second.shares_factors_with == "first"
    assert second.rank == first.rank and second.heads == first.heads
    assert second.params_before == 0 and second.params_after == 0  # counted once, on the first
    tag = "inher" if heads > 1 else "svd"
    factor_inits = {t for t in init_names(student) if f"/{tag}/" in t and t.endswith(".weight")}
    assert factor_inits and all(t.startswith(f"first/{tag}/") for t in factor_inits), factor_inits
    assert "W" not in init_names(student)
    down = f"first/{tag}/down.weight"
    readers = {n.name for n in student.graph.node if down in n.input}
    assert readers == {f"first/{tag}/down", f"second/{tag}/down"}
    # every factor weight is read by both replacements
    for t in factor_inits:
        users = {n.name.split("/")[0] for n in student.graph.node if t in n.input}
        assert users == {"first", "second"}, (t, users)
    # and the student stores the weights once: fewer float params than two copies would need
    n_params = sum(int(np.prod(t.dims)) for t in student.graph.initializer if t.data_type == TensorProto.FLOAT)
    one_copy = sum(int(np.prod(t.dims)) for t in student.graph.initializer if t.name in factor_inits)
    assert n_params - one_copy < one_copy


def _tied_model(vocab: int = 20, d: int = 8) -> ModelProto:
    """Embedding table also used (transposed) as the output projection, as tied LMs export it."""
    nodes = [helper.make_node("Gather", ["E", "ids"], ["h"], name="embed"),
             helper.make_node("Relu", ["h"], ["h_act"], name="act"),
             helper.make_node("Transpose", ["E"], ["E_t"], name="tie", perm=[1, 0]),
             helper.make_node("MatMul", ["h_act", "E_t"], ["logits"], name="lm_head")]
    return make_model(nodes, [vi("ids", TensorProto.INT64, [2, 5])], [vi("logits", TensorProto.FLOAT, [2, 5, vocab])],
                      [init("E", randn(vocab, d, seed=6))])


def test_tied_embedding_guard_skips_with_other_user(tmp_path: Path) -> None:
    path = save(_tied_model(), tmp_path)
    p = api.plan(path, Options(mode="svd", policy=parse_policy(rank=1), rank_multiple=1))
    c = cand(p, "lm_head")
    assert c.decision == "skip"
    assert c.reason.startswith("weight is also used by h;"), c.reason  # h: the Gather's output
    unguarded = cand(api.plan(path, Options(mode="svd", policy=parse_policy(rank=1), rank_multiple=1,
                                            guard=False)), "lm_head")
    assert unguarded.decision == "factorize" and unguarded.rank == 1


@pytest.mark.parametrize("mode,heads", MODES[:2], ids=MODE_IDS[:2])
def test_tied_embedding_without_guard_is_factorised_and_table_kept(tmp_path: Path, mode: str, heads: int) -> None:
    result, student = compress_exact(_tied_model(), tmp_path, full(mode, heads))
    assert cand(result, "lm_head").decision == "factorize"
    assert "E" in init_names(student)  # the Gather still reads the table
    assert "embed" in node_names(student)
    assert "tie" not in node_names(student)  # the orphaned Transpose is gone
    assert "E_t" not in tensor_names(student)


def test_outer_weight_read_by_subgraph_survives_cleanup(tmp_path: Path) -> None:
    """A weight read both by a top-level MatMul and, from the outer scope, by an If branch that is not a
    layer (a ReduceSum): the guard names the branch's node; without the guard the MatMul is factorised and
    the weight stays for the branch. (A branch layer reading it shares the factors: tests/test_subgraphs.py.)"""
    w = randn(IN, IN, seed=7)
    then_g = helper.make_graph([helper.make_node("ReduceSum", ["W", "axes"], ["w_sum"], name="then_sum", keepdims=0),
                                helper.make_node("Add", ["H", "w_sum"], ["t_out"], name="then_add")], "then", [],
                               [vi("t_out", TensorProto.FLOAT, [2, IN])])
    else_g = helper.make_graph([helper.make_node("Identity", ["H"], ["e_out"], name="else_id")], "else", [],
                               [vi("e_out", TensorProto.FLOAT, [2, IN])])
    nodes = [helper.make_node("MatMul", ["X", "W"], ["H"], name="fc"),
             helper.make_node("If", ["cond"], ["Y"], name="branch", then_branch=then_g, else_branch=else_g)]
    model = make_model(nodes, [vi("X", TensorProto.FLOAT, [2, IN]), vi("cond", TensorProto.BOOL, [])],
                       [vi("Y", TensorProto.FLOAT, [2, IN])], [init("W", w), init("axes", np.array([0], np.int64))])
    path = save(model, tmp_path)
    guarded = cand(api.plan(path, Options(mode="svd", policy=parse_policy(rank=1), rank_multiple=1)), "fc")
    assert guarded.decision == "skip" and "also used by" in guarded.reason
    assert "branch/then_branch/w_sum" in guarded.reason
    result, student = compress_exact(path, tmp_path, full())
    assert cand(result, "fc").decision == "factorize"
    assert "W" in init_names(student)
    for flag in (True, False):
        feed = {"X": randn(2, IN, seed=8), "cond": np.array(flag)}
        rep = api.verify_files(path, tmp_path / "student.onnx", feed=feed, bound=TOL)
        assert rep.ok, (flag, rep.to_dict())


# --------------------------------------------------------------------------- what is skipped


def test_int8_qdq_weight_is_skipped_and_the_rest_compresses(tmp_path: Path) -> None:
    wq = rng(9).integers(-127, 128, (IN, IN)).astype(np.int8)
    nodes = [helper.make_node("DequantizeLinear", ["Wq", "w_scale", "w_zp"], ["Wdq"], name="dq"),
             helper.make_node("MatMul", ["X", "Wdq"], ["H"], name="qfc"),
             helper.make_node("MatMul", ["H", "W2"], ["Y"], name="fc")]
    inits = [init("Wq", wq), init("w_scale", np.array(0.02, np.float32)), init("w_zp", np.array(0, np.int8)),
             init("W2", randn(IN, OUT, seed=10))]
    model = make_model(nodes, [vi("X", TensorProto.FLOAT, [2, IN])], [vi("Y", TensorProto.FLOAT, [2, OUT])], inits)
    for mode, heads in MODES[:2]:
        folder = tmp_path / mode
        folder.mkdir()
        result, student = compress_exact(model, folder, full(mode, heads))
        q = cand(result, "qfc")
        assert q.decision == "skip" and "quantised" in q.reason and "DequantizeLinear" in q.reason
        assert "compress the float model" in q.reason  # what the user can do about it
        assert cand(result, "fc").decision == "factorize"
        assert {"dq", "qfc"} <= node_names(student)
        assert {"Wq", "w_scale", "w_zp"} <= init_names(student)


def test_integer_layers_are_listed_with_what_to_do(tmp_path: Path) -> None:
    """A dynamic-quantised graph (MatMulInteger) has no float layer: inspect must still show its layers."""
    wq = rng(9).integers(-127, 128, (IN, OUT)).astype(np.int8)
    nodes = [helper.make_node("DynamicQuantizeLinear", ["X"], ["Xq", "x_scale", "x_zp"], name="dql"),
             helper.make_node("MatMulInteger", ["Xq", "Wq", "x_zp", "w_zp"], ["Yi"], name="qmm"),
             helper.make_node("Cast", ["Yi"], ["Yf"], to=TensorProto.FLOAT, name="cast"),
             helper.make_node("Mul", ["Yf", "x_scale"], ["Y"], name="rescale")]
    model = make_model(nodes, [vi("X", TensorProto.FLOAT, [2, IN])], [vi("Y", TensorProto.FLOAT, [2, OUT])],
                       [init("Wq", wq), init("w_zp", np.array(0, np.int8))])
    onnx.save(model, str(tmp_path / "q.onnx"))
    the_plan = api.plan(tmp_path / "q.onnx")
    q = cand(the_plan, "qmm")
    assert q.op == "MatMulInteger" and q.decision == "skip" and "integer (quantised) layer" in q.reason
    assert "then quantise the student" in q.reason


def _if_model() -> ModelProto:
    then_g = helper.make_graph([helper.make_node("MatMul", ["H", "Wt"], ["t_out"], name="then_mm")], "then", [],
                               [vi("t_out", TensorProto.FLOAT, [2, IN])], [init("Wt", randn(IN, IN, seed=11))])
    else_g = helper.make_graph([helper.make_node("Gemm", ["H", "We"], ["e_out"], name="else_gemm")], "else", [],
                               [vi("e_out", TensorProto.FLOAT, [2, IN])], [init("We", randn(IN, IN, seed=12))])
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond"),
         helper.make_node("MatMul", ["state", "Wl"], ["state_out"], name="body_mm")],
        "body",
        [vi("iter", TensorProto.INT64, []), vi("cond_in", TensorProto.BOOL, []),
         vi("state", TensorProto.FLOAT, [2, IN])],
        [vi("cond_out", TensorProto.BOOL, []), vi("state_out", TensorProto.FLOAT, [2, IN])],
        [init("Wl", (randn(IN, IN, seed=13) / np.sqrt(IN)).astype(np.float32))])
    nodes = [helper.make_node("MatMul", ["X", "W1"], ["H"], name="pre"),
             helper.make_node("If", ["cond"], ["B"], name="branch", then_branch=then_g, else_branch=else_g),
             helper.make_node("Loop", ["trips", "", "B"], ["L"], name="loop", body=body),
             helper.make_node("MatMul", ["L", "W2"], ["Y"], name="post")]
    inits = [init("W1", randn(IN, IN, seed=14)), init("W2", randn(IN, OUT, seed=15)),
             init("trips", np.array(2, np.int64))]
    return make_model(nodes, [vi("X", TensorProto.FLOAT, [2, IN]), vi("cond", TensorProto.BOOL, [])],
                      [vi("Y", TensorProto.FLOAT, [2, OUT])], inits)


def test_layers_inside_if_and_loop_are_factorised_naming_the_subgraph(tmp_path: Path) -> None:
    model = _if_model()
    result, student = compress_exact(model, tmp_path, full("inher", 2))
    by_node = {c.node: c for c in result.plan.candidates}
    assert by_node["pre"].decision == by_node["post"].decision == "factorize"
    assert by_node["pre"].graph == by_node["post"].graph == "main"
    inner = {k: c for k, c in by_node.items() if k not in ("pre", "post")}
    assert set(inner) == {"branch/then_branch/then_mm", "branch/else_branch/else_gemm", "loop/body/body_mm"}
    for name, c in inner.items():
        assert c.decision == "factorize", (name, c.reason)
        assert c.graph == name.rsplit("/", 1)[0]
    # the subgraphs hold the factors of their own weights, and no longer the weights
    old = {n.name: n for n in model.graph.node}
    new = {n.name: n for n in student.graph.node}
    assert new["branch"] != old["branch"] and new["loop"] != old["loop"]
    body = next(a.g for a in new["loop"].attribute if a.name == "body")
    assert {t.name for t in body.initializer} == {"loop/body/body_mm/inher/down.weight",
                                                  "loop/body/body_mm/inher/gate.bias",
                                                  "loop/body/body_mm/inher/gate.weight",
                                                  "loop/body/body_mm/inher/heads.weight",
                                                  "loop/body/body_mm/inher/gate.shape",
                                                  "loop/body/body_mm/inher/heads.shape",
                                                  "loop/body/body_mm/inher/out.shape"}
    for flag in (True, False):
        feed = {"X": randn(2, IN, seed=16), "cond": np.array(flag)}
        rep = api.verify_files(tmp_path / "teacher.onnx", tmp_path / "student.onnx", feed=feed, bound=TOL)
        assert rep.ok, (flag, rep.to_dict())


def test_scan_body_matmul_is_factorised(tmp_path: Path) -> None:
    body = helper.make_graph(
        [helper.make_node("MatMul", ["x_t", "Ws"], ["y_t"], name="scan_mm"),
         helper.make_node("Add", ["acc", "y_t"], ["acc_out"], name="scan_add")],
        "scan_body", [vi("acc", TensorProto.FLOAT, [1, OUT]), vi("x_t", TensorProto.FLOAT, [1, IN])],
        [vi("acc_out", TensorProto.FLOAT, [1, OUT]), vi("y_scan", TensorProto.FLOAT, [1, OUT])],
        [init("Ws", randn(IN, OUT, seed=17))])
    body.node.append(helper.make_node("Identity", ["y_t"], ["y_scan"], name="scan_id"))
    nodes = [helper.make_node("MatMul", ["X", "W1"], ["H"], name="pre"),
             helper.make_node("Scan", ["acc0", "H"], ["acc_final", "ys"], name="scan", body=body, num_scan_inputs=1)]
    model = make_model(nodes, [vi("X", TensorProto.FLOAT, [4, 1, IN]), vi("acc0", TensorProto.FLOAT, [1, OUT])],
                       [vi("acc_final", TensorProto.FLOAT, [1, OUT]), vi("ys", TensorProto.FLOAT, [4, 1, OUT])],
                       [init("W1", randn(IN, IN, seed=18))])
    result, _ = compress_exact(model, tmp_path, full())
    assert cand(result, "pre").decision == "factorize"
    c = cand(result, "scan/body/scan_mm")
    assert c.decision == "factorize" and c.graph == "scan/body"


@pytest.mark.parametrize("mode,heads", MODES, ids=MODE_IDS)
def test_depthwise_conv_skipped_grouped_conv_factorised(tmp_path: Path, mode: str, heads: int) -> None:
    nodes = [helper.make_node("Conv", ["X", "Wg", "Bg"], ["H"], name="grouped", group=2, pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["H", "Wd"], ["Y"], name="depthwise", group=6, pads=[1, 1, 1, 1])]
    inits = [init("Wg", randn(6, 2, 3, 3, seed=19)), init("Bg", randn(6, seed=20)),
             init("Wd", randn(6, 1, 3, 3, seed=21))]
    model = make_model(nodes, [vi("X", TensorProto.FLOAT, [2, 4, 5, 5])], [vi("Y", TensorProto.FLOAT, [2, 6, 5, 5])],
                       inits)
    result, student = compress_exact(model, tmp_path, full(mode, heads))
    g, d = cand(result, "grouped"), cand(result, "depthwise")
    assert g.decision == "factorize" and g.groups == 2 and g.rank == 3  # min(out/g=3, in/g*k=18)
    assert d.decision == "skip" and "depthwise" in d.reason
    assert "depthwise" in node_names(student) and "Wd" in init_names(student)
    assert "Wg" not in init_names(student)


# --------------------------------------------------------------------------- dtypes and shapes


@pytest.mark.parametrize("mode,heads", MODES, ids=MODE_IDS)
def test_fp16_model_keeps_fp16_factors(tmp_path: Path, mode: str, heads: int) -> None:
    f16 = TensorProto.FLOAT16
    nodes = [helper.make_node("Conv", ["X", "Wc", "Bc"], ["H"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["H"], ["Ha"], name="relu"),
             helper.make_node("GlobalAveragePool", ["Ha"], ["P"], name="pool"),
             helper.make_node("Flatten", ["P"], ["F"], name="flat"),
             helper.make_node("MatMul", ["F", "Wm"], ["Y"], name="fc")]
    inits = [init("Wc", randn(8, 4, 3, 3, seed=22, dtype=np.float16) * np.float16(0.3)),
             init("Bc", randn(8, seed=23, dtype=np.float16)),
             init("Wm", randn(8, 5, seed=24, dtype=np.float16) * np.float16(0.3))]
    model = make_model(nodes, [vi("X", f16, [2, 4, 6, 6])], [vi("Y", f16, [2, 5])], inits)
    result, student = compress_exact(model, tmp_path, full(mode, heads), bound=FP16_TOL)
    assert cand(result, "conv").decision == cand(result, "fc").decision == "factorize"
    created = [t for t in student.graph.initializer if "/svd/" in t.name or "/inher/" in t.name]
    floats = [t for t in created if t.data_type != TensorProto.INT64]
    assert floats and all(t.data_type == f16 for t in floats), [(t.name, t.data_type) for t in floats]
    assert all(t.data_type in (f16, TensorProto.INT64) for t in student.graph.initializer)
    assert student.graph.output[0].type.tensor_type.elem_type == f16


@pytest.mark.parametrize("mode,heads", MODES, ids=MODE_IDS)
def test_dynamic_batch_and_sequence_dims(tmp_path: Path, mode: str, heads: int) -> None:
    nodes = [helper.make_node("MatMul", ["X", "W"], ["H"], name="fc1"),
             helper.make_node("Relu", ["H"], ["Ha"], name="act"),
             helper.make_node("MatMul", ["Ha", "W2"], ["Y"], name="fc2")]
    model = make_model(nodes, [vi("X", TensorProto.FLOAT, ["batch", "seq", 16])],
                       [vi("Y", TensorProto.FLOAT, ["batch", "seq", 6])],
                       [init("W", randn(16, 12, seed=25)), init("W2", randn(12, 6, seed=26))])
    teacher = save(model, tmp_path)
    result, student = compress_exact(teacher, tmp_path, full(mode, heads))
    assert cand(result, "fc1").decision == cand(result, "fc2").decision == "factorize"
    # FLOPs count a free batch as 1 and a free sequence as SEQUENCE_LEN (said in a warning) unless given
    assert cand(result, "fc1").flops_before == 2 * SEQUENCE_LEN * 16 * 12
    assert any(f"X=1x{SEQUENCE_LEN}x16" in w for w in result.plan.warnings)
    sized = api.plan(teacher, full(mode, heads, dims={"batch": 3, "seq": 5}))
    assert cand(sized, "fc1").flops_before == 2 * 3 * 5 * 16 * 12
    dims = [d.dim_param for d in student.graph.input[0].type.tensor_type.shape.dim[:2]]
    assert dims == ["batch", "seq"]
    for batch, seq in ((1, 1), (3, 7), (5, 2)):
        rep = api.verify_files(teacher, tmp_path / "student.onnx", dims={"batch": batch, "seq": seq}, bound=TOL)
        assert rep.ok, rep.to_dict()
        assert rep.outputs[0].shape == (batch, seq, 6)


@pytest.mark.parametrize("mode,heads", MODES, ids=MODE_IDS)
def test_ir3_opset9_initializers_listed_as_inputs(tmp_path: Path, mode: str, heads: int) -> None:
    nodes = [helper.make_node("Gemm", ["X", "Wg", "Bg"], ["H"], name="gemm", transB=1),
             helper.make_node("Relu", ["H"], ["Ha"], name="act"),
             helper.make_node("Transpose", ["Wm_t"], ["Wm"], name="wm_tr", perm=[1, 0]),
             helper.make_node("MatMul", ["Ha", "Wm"], ["Y"], name="fc")]
    inits = [init("Wg", randn(12, 10, seed=27)), init("Bg", randn(12, seed=28)), init("Wm_t", randn(6, 12, seed=29))]
    inputs = [vi("X", TensorProto.FLOAT, [3, 10])] + [vi(t.name, t.data_type, list(t.dims)) for t in inits]
    model = make_model(nodes, inputs, [vi("Y", TensorProto.FLOAT, [3, 6])], inits, opset=9, ir_version=3)
    result, student = compress_exact(model, tmp_path, full(mode, heads))
    assert cand(result, "gemm").decision == cand(result, "fc").decision == "factorize"
    assert student.ir_version == 3
    inits_s = init_names(student)
    inputs_s = [i.name for i in student.graph.input]
    assert len(inputs_s) == len(set(inputs_s))
    assert inits_s <= set(inputs_s), inits_s - set(inputs_s)
    assert set(inputs_s) - inits_s == {"X"}  # no stale input for a removed initializer
    assert not {"Wg", "Wm_t", "Wm"} & set(inputs_s)
    # a pair's up-projection reads the bias; gated heads store one copy per head instead
    assert ("Bg" in inits_s) == (heads == 1)


@pytest.mark.parametrize("mode,heads", MODES, ids=MODE_IDS)
def test_conv_with_dynamic_batch_and_image_size(tmp_path: Path, mode: str, heads: int) -> None:
    nodes = [helper.make_node("Conv", ["X", "W", "B"], ["H"], name="conv", pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["H"], ["Y"], name="act")]
    model = make_model(nodes, [vi("X", TensorProto.FLOAT, ["n", 3, "height", "width"])],
                       [vi("Y", TensorProto.FLOAT, ["n", 8, None, None])],
                       [init("W", randn(8, 3, 3, 3, seed=37)), init("B", randn(8, seed=38))])
    teacher = save(model, tmp_path)
    result, _ = compress_exact(teacher, tmp_path, full(mode, heads))
    assert cand(result, "conv").decision == "factorize"
    for n, hgt, wid in ((1, 4, 4), (3, 9, 6), (2, 16, 11)):
        rep = api.verify_files(teacher, tmp_path / "student.onnx", dims={"n": n, "height": hgt, "width": wid},
                               bound=TOL)
        assert rep.ok, rep.to_dict()
        assert rep.outputs[0].shape == (n, 8, (hgt + 1) // 2, (wid + 1) // 2)


def test_one_dimensional_activation_gets_a_pair_with_a_note(tmp_path: Path) -> None:
    model = make_model([helper.make_node("MatMul", ["X", "W"], ["Y"], name="fc")], [vi("X", TensorProto.FLOAT, [IN])],
                       [vi("Y", TensorProto.FLOAT, [OUT])], [init("W", randn(IN, OUT, seed=39))])
    result, student = compress_exact(model, tmp_path, full("inher", 2))
    c = cand(result, "fc")
    assert c.decision == "factorize" and c.form == "pair" and c.heads == 1
    assert "1-D activation" in c.note
    assert "fc/svd/down.weight" in init_names(student)


# --------------------------------------------------------------------------- reproducibility, heads, names


def _mlp(d_in: int = 12, d_hidden: int = 10, d_out: int = 6) -> ModelProto:
    nodes = [helper.make_node("Gemm", ["X", "W1", "B1"], ["H"], name="encoder/fc1", transB=1),
             helper.make_node("Relu", ["H"], ["Ha"], name="encoder/act"),
             helper.make_node("MatMul", ["Ha", "W2"], ["Y"], name="encoder/fc2")]
    inits = [init("W1", randn(d_hidden, d_in, seed=30)), init("B1", randn(d_hidden, seed=31)),
             init("W2", randn(d_hidden, d_out, seed=32))]
    return make_model(nodes, [vi("X", TensorProto.FLOAT, [4, d_in])], [vi("Y", TensorProto.FLOAT, [4, d_out])], inits)


def test_output_is_byte_identical_and_seed_changes_perturbations(tmp_path: Path) -> None:
    teacher = save(_mlp(), tmp_path)
    outs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        compress_exact(teacher, tmp_path, full("inher", 2, seed=seed), out=f"{name}.onnx")
        outs[name] = (tmp_path / f"{name}.onnx").read_bytes()
    assert outs["a"] == outs["b"]
    assert outs["a"] != outs["c"]
    a, c = inits_by_name(onnx.load(str(tmp_path / "a.onnx"))), inits_by_name(onnx.load(str(tmp_path / "c.onnx")))
    assert a.keys() == c.keys()
    for name in a:
        same = np.array_equal(a[name], c[name])
        assert same == (not name.endswith("/heads.weight")), name  # only the heads' weights change
    svd = [(tmp_path / f"s{i}.onnx") for i in range(2)]
    for i, p in enumerate(svd):
        compress_exact(teacher, tmp_path, full("svd", 1, seed=i), out=p.name)
    assert svd[0].read_bytes() == svd[1].read_bytes()  # no randomness in a plain pair


@pytest.mark.parametrize("op", ["MatMul", "Gemm", "Conv"])
def test_heads_are_separated_and_average_to_the_pair(tmp_path: Path, op: str) -> None:
    h = 3
    if op == "Conv":
        nodes = [helper.make_node("Conv", ["X", "W", "B"], ["Y"], name="layer", pads=[1, 1, 1, 1])]
        inits = [init("W", randn(6, 3, 3, 3, seed=33)), init("B", randn(6, seed=34))]
        inputs, outputs = [vi("X", TensorProto.FLOAT, [2, 3, 5, 5])], [vi("Y", TensorProto.FLOAT, [2, 6, 5, 5])]
    else:
        attrs = {"transB": 1} if op == "Gemm" else {}
        ins = ["X", "W", "B"] if op == "Gemm" else ["X", "W"]
        w = randn(OUT, IN, seed=35) if op == "Gemm" else randn(IN, OUT, seed=35)
        nodes = [helper.make_node(op, ins, ["Y"], name="layer", **attrs)]
        inits = [init("W", w), init("B", randn(OUT, seed=36))][: len(ins) - 1]
        inputs, outputs = [vi("X", TensorProto.FLOAT, [4, IN])], [vi("Y", TensorProto.FLOAT, [4, OUT])]
    teacher = save(make_model(nodes, inputs, outputs, inits), tmp_path)
    r_inher, inher = compress_exact(teacher, tmp_path, full("inher", h), out="inher.onnx")
    _, pair = compress_exact(teacher, tmp_path, full("svd", 1), out="pair.onnx")
    assert cand(r_inher, "layer").form == "heads" and cand(r_inher, "layer").heads == h
    rank = cand(r_inher, "layer").rank
    wi, wp = inits_by_name(inher), inits_by_name(pair)
    up = wp["layer/svd/up.weight"]
    heads = wi["layer/inher/heads.weight"]
    if op == "Conv":  # [h, g*out*(r+1)] (each row's last column the bias) vs the pair's 1x1 conv [g*out, r, 1, 1]
        with_bias = heads.reshape(h, up.shape[0], up.shape[1] + 1)
        for i in range(h):  # every head carries the full bias, unperturbed
            np.testing.assert_array_equal(with_bias[i, :, -1], wp["B"])
        per_head = with_bias[:, :, :-1]
        up = up.reshape(up.shape[:2])
    else:  # fused [r, h*out] vs the pair's [r, out]
        assert heads.shape == (rank, h * OUT)
        per_head = np.stack(np.split(heads, h, axis=1))
    for i in range(h):
        for j in range(i + 1, h):
            assert not np.allclose(per_head[i], per_head[j]), (i, j)
        assert np.max(np.abs(per_head[i] - up)) > 1e-4  # each head is perturbed
    np.testing.assert_allclose(per_head.astype(np.float64).mean(axis=0), up, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(wi["layer/inher/down.weight"], wp["layer/svd/down.weight"])
    assert not np.any(wi["layer/inher/gate.weight"]) and not np.any(wi["layer/inher/gate.bias"])
    assert wi["layer/inher/gate.weight"].shape[-1] == h


@pytest.mark.parametrize("mode,heads", MODES, ids=MODE_IDS)
def test_created_names_derive_from_the_replaced_node(tmp_path: Path, mode: str, heads: int) -> None:
    model = _mlp()
    # an unnamed node gets the id `op(first output)`
    model.graph.node[2].name = ""
    result, student = compress_exact(model, tmp_path, full(mode, heads))
    tag = "inher" if heads > 1 else "svd"
    replaced = {"encoder/fc1": "encoder/fc1", "encoder/fc2": "MatMul(Y)"}
    assert {c.node for c in result.plan.candidates} == set(replaced.values())
    old_nodes, old_tensors = node_names(model), tensor_names(model)
    prefixes = tuple(f"{v}/{tag}/" for v in replaced.values())
    new_nodes = node_names(student) - old_nodes
    new_tensors = tensor_names(student) - old_tensors
    assert new_nodes and all(n.startswith(prefixes) for n in new_nodes), new_nodes
    assert new_tensors and all(t.startswith(prefixes) for t in new_tensors), new_tensors
    assert all(t.startswith(prefixes) for t in init_names(student) - init_names(model))
    assert not {"encoder/fc1"} & node_names(student)
    # the graph's interface is unchanged
    assert [(o.name, o.type) for o in student.graph.output] == [(o.name, o.type) for o in model.graph.output]
    assert [(i.name, i.type) for i in student.graph.input] == [(i.name, i.type) for i in model.graph.input]
    # the last created node of each replacement writes the replaced node's output
    producers = {o: n.name for n in student.graph.node for o in n.output}
    assert producers["H"].startswith("encoder/fc1/") and producers["Y"].startswith("MatMul(Y)/")


def test_a_teacher_flaw_the_full_checker_sees_is_kept_not_fatal(tmp_path: Path) -> None:
    """Paddle exports declare some outputs with a wrong rank (PP-OCRv5's direction classifier: a rank-0
    Softmax output that is [N,2]); ONNX Runtime runs them. The student keeps the flaw with a warning."""
    nodes = [helper.make_node("MatMul", ["X", "W"], ["H"], name="fc"),
             helper.make_node("Softmax", ["H"], ["Y"], axis=-1, name="softmax")]
    graph = helper.make_graph(nodes, "flawed", [vi("X", TensorProto.FLOAT, [2, IN])], [vi("Y", TensorProto.FLOAT, [])],
                              [init("W", randn(IN, OUT, seed=21))])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), str(tmp_path / "teacher.onnx"))
    result = api.compress(tmp_path / "teacher.onnx", tmp_path / "student.onnx",
                          Options(mode="svd", policy=parse_policy(rank=2), rank_multiple=1))
    assert cand(result, "fc").decision == "factorize"
    assert any("the teacher itself fails the full ONNX check" in w for w in result.plan.warnings)
    assert (tmp_path / "student.onnx").exists()
