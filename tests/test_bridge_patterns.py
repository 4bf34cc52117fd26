"""Bridge behaviour on small hand-built graphs: weight storage, trainable selection, fp16, inference-form
layers, unsupported ops, intermediates by name and the subgraph hook."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from onnx_inher.bridge import to_torch, write_back
from onnx_inher.bridge.registry import REGISTRY, Ctx, Fn, register
from onnx_inher.errors import InputError
from tests.helpers import ort_run, rel_err, torch_run

F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16


def randn(*shape: int, seed: int = 0, dtype: type = np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def make(nodes: list, inputs: list, outputs: list, inits: list | None = None, opset: int = 17,
         extra_opsets: list | None = None) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits or [])
    opsets = [helper.make_opsetid("", opset), *(extra_opsets or [])]
    return helper.make_model(graph, opset_imports=opsets)


def vi(name: str, elem: int, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def _constant_weight_model() -> onnx.ModelProto:
    """MatMul weight in a Constant node, bias as value_floats, Gemm weight an initializer."""
    w = numpy_helper.from_array(randn(4, 6, seed=1), "unused_name")
    nodes = [helper.make_node("Constant", [], ["W"], value=w, name="w_const"),
             helper.make_node("Constant", [], ["B"], value_floats=[0.1] * 6, name="b_const"),
             helper.make_node("MatMul", ["X", "W"], ["H"], name="mm"),
             helper.make_node("Add", ["H", "B"], ["Hb"], name="add"),
             helper.make_node("Gemm", ["Hb", "G"], ["Y"], name="gemm", transB=1)]
    inits = [numpy_helper.from_array(randn(3, 6, seed=2), "G")]
    return make(nodes, [vi("X", F32, ["n", 4])], [vi("Y", F32, ["n", 3])], inits)


def test_constant_node_weights_are_parameters_and_written_back_in_place(tmp_path: Path) -> None:
    model = _constant_weight_model()
    module, param_map = to_torch(model, trainable="all")
    assert set(param_map) == {"W", "B", "G"}
    assert all(q.startswith("weights.") for q in param_map.values())
    params = dict(module.named_parameters())
    with torch.no_grad():
        for q in param_map.values():
            params[q].add_(0.25)
    trained = write_back(model, module, param_map)
    assert [n.op_type for n in trained.graph.node] == [n.op_type for n in model.graph.node]
    feed = {"X": randn(5, 4, seed=3)}
    assert rel_err(ort_run(trained, feed), torch_run(module, feed)) <= 1e-6
    value = next(a.t for a in trained.graph.node[0].attribute if a.name == "value")
    assert value.name == "unused_name"
    np.testing.assert_allclose(numpy_helper.to_array(value), randn(4, 6, seed=1) + 0.25, rtol=1e-6)
    floats = next(a for a in trained.graph.node[1].attribute if a.name == "value_floats")
    assert floats.type == onnx.AttributeProto.FLOATS and np.allclose(list(floats.floats), 0.35)


def test_trainable_selection_and_stable_names() -> None:
    model = _constant_weight_model()
    model.graph.initializer[0].name = "fc/svd/up.weight"
    model.graph.node[4].input[1] = "fc/svd/up.weight"
    for trainable, expected in (("factors", {"fc/svd/up.weight"}), ("all", {"W", "B", "fc/svd/up.weight"}),
                                ("none", set())):
        module, param_map = to_torch(model, trainable=trainable)
        named = dict(module.named_parameters())
        assert {o for o, q in param_map.items() if named[q].requires_grad} == expected
    assert param_map["fc/svd/up.weight"] == "weights.fc_svd_up_weight"
    with pytest.raises(InputError, match="trainable"):
        to_torch(model, trainable="some")


def test_fp16_graph_computes_in_fp32_and_writes_fp16_back() -> None:
    nodes = [helper.make_node("Conv", ["X", "Wc", "Bc"], ["H"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["H"], ["Ha"]),
             helper.make_node("GlobalAveragePool", ["Ha"], ["P"]),
             helper.make_node("Flatten", ["P"], ["Fl"]),
             helper.make_node("MatMul", ["Fl", "Wm"], ["Y"])]
    inits = [numpy_helper.from_array(randn(8, 4, 3, 3, seed=5, dtype=np.float16) * np.float16(0.3), "Wc"),
             numpy_helper.from_array(randn(8, seed=6, dtype=np.float16), "Bc"),
             numpy_helper.from_array(randn(8, 5, seed=7, dtype=np.float16) * np.float16(0.3), "Wm")]
    model = make(nodes, [vi("X", F16, ["n", 4, 6, 6])], [vi("Y", F16, ["n", 5])], inits)
    module, param_map = to_torch(model, trainable="all")
    assert all(p.dtype == torch.float32 for p in module.parameters())
    feed = {"X": randn(3, 4, 6, 6, seed=8, dtype=np.float16)}
    assert rel_err(torch_run(module, feed), ort_run(model, feed)) <= 5e-3
    trained = write_back(model, module, param_map)
    assert [t.data_type for t in trained.graph.initializer] == [F16, F16, F16]


def test_inference_form_batchnorm_and_dropout_do_not_change_in_train_mode() -> None:
    nodes = [helper.make_node("BatchNormalization", ["X", "s", "b", "m", "v"], ["H"]),
             helper.make_node("Dropout", ["H", "ratio"], ["Y"])]
    inits = [numpy_helper.from_array(a, n) for n, a in (
        ("s", randn(3, seed=1)), ("b", randn(3, seed=2)), ("m", randn(3, seed=3)),
        ("v", np.abs(randn(3, seed=4)) + 0.5), ("ratio", np.array(0.5, np.float32)))]
    model = make(nodes, [vi("X", F32, ["n", 3, 4, 4])], [vi("Y", F32, ["n", 3, 4, 4])], inits)
    module, _ = to_torch(model, trainable="all")
    feed = {"X": randn(2, 3, 4, 4, seed=9)}
    module.train()
    train_out = torch_run(module, feed)
    assert rel_err(train_out, ort_run(model, feed)) <= 1e-6
    params = dict(module.named_parameters())
    assert set(params) == {"weights.s", "weights.b"}, "statistics and the dropout ratio are constants, not weights"


def test_unsupported_op_is_an_input_error_naming_op_and_node_at_conversion() -> None:
    nodes = [helper.make_node("Relu", ["X"], ["H"], name="ok"),
             helper.make_node("StringNormalizer", ["H"], ["Y"], name="the_culprit")]
    model = make(nodes, [vi("X", F32, [2])], [vi("Y", F32, [2])])
    with pytest.raises(InputError, match=r"node 'the_culprit': op StringNormalizer .*not supported"):
        to_torch(model)


@pytest.mark.cli
def test_unsupported_op_exits_2_from_a_script(tmp_path: Path) -> None:
    """The CLI maps InputError to exit 2; the bridge raises it (not a crash mid-training)."""
    nodes = [helper.make_node("StringNormalizer", ["X"], ["Y"], name="bad")]
    path = tmp_path / "m.onnx"
    onnx.save(make(nodes, [vi("X", F32, [2])], [vi("Y", F32, [2])]), str(path))
    code = ("import sys, onnx\nfrom onnx_inher.errors import InputError\nfrom onnx_inher.bridge import to_torch\n"
            f"try:\n    to_torch(onnx.load({str(path)!r}))\nexcept InputError as e:\n"
            "    print(e); sys.exit(e.exit_code)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "bad" in done.stdout


def test_run_returns_intermediates_by_name_and_stops_early() -> None:
    model = _constant_weight_model()
    module, _ = to_torch(model)
    x = torch.from_numpy(randn(2, 4, seed=1))
    got = module.run({"X": x}, ["H", "Y"])
    assert torch.allclose(got["H"], x @ torch.from_numpy(randn(4, 6, seed=1)))
    assert torch.equal(got["Y"], module(x)[0])
    with pytest.raises(InputError, match="no tensor named"):
        module.run({"X": x}, ["nope"])


def test_constant_shape_inputs_are_folded_not_buffers() -> None:
    """Reshape's constant shape is read at conversion: no buffer, no run-time read-back."""
    nodes = [helper.make_node("Reshape", ["X", "shape"], ["Y"])]
    inits = [numpy_helper.from_array(np.array([0, -1], np.int64), "shape")]
    model = make(nodes, [vi("X", F32, ["n", 2, 3])], [vi("Y", F32, ["n", 6])], inits)
    module, param_map = to_torch(model)
    assert not list(module.buffers()) and not param_map
    assert module(torch.ones(4, 2, 3))[0].shape == (4, 6)


TEST_DOMAIN = "test.onnx_inher"


def _register_test_if() -> None:
    """A private If (in a test domain) built only from the documented subgraph hook."""
    if (TEST_DOMAIN, "If") in REGISTRY:
        return

    @register("If", domain=TEST_DOMAIN)
    def test_if(ctx: Ctx) -> Fn:
        then, other = ctx.subgraph("then_branch"), ctx.subgraph("else_branch")

        def run(cond: torch.Tensor, *rest: torch.Tensor) -> tuple[torch.Tensor, ...]:
            scope = ctx.scope((cond, *rest))
            out = (then if bool(cond) else other).run(scope, [])
            return out[0]

        return run


def test_subgraph_hook_reads_outer_scope_and_registers_subgraph_weights() -> None:
    _register_test_if()
    then_g = helper.make_graph([helper.make_node("MatMul", ["X", "Wt"], ["T"])], "then", [],
                               [vi("T", F32, None)], [numpy_helper.from_array(randn(3, 2, seed=1), "Wt")])
    else_g = helper.make_graph([helper.make_node("MatMul", ["X", "Wouter"], ["E"])], "else", [],
                               [vi("E", F32, None)])
    nodes = [helper.make_node("If", ["C"], ["Y"], domain=TEST_DOMAIN, then_branch=then_g, else_branch=else_g)]
    model = make(nodes, [vi("C", TensorProto.BOOL, []), vi("X", F32, ["n", 3])], [vi("Y", F32, ["n", 2])],
                 [numpy_helper.from_array(randn(3, 2, seed=2), "Wouter")],
                 extra_opsets=[helper.make_opsetid(TEST_DOMAIN, 1)])
    module, param_map = to_torch(model, trainable="all")
    assert set(param_map) == {"Wouter", "Wt"}
    x = torch.from_numpy(randn(4, 3, seed=3))
    then_out = module(torch.tensor(True), x)[0]
    else_out = module(torch.tensor(False), x)[0]
    assert torch.allclose(then_out, x @ torch.from_numpy(randn(3, 2, seed=1)))
    assert torch.allclose(else_out, x @ torch.from_numpy(randn(3, 2, seed=2)))
    then_out.sum().backward()
    assert dict(module.named_parameters())[param_map["Wt"]].grad is not None
