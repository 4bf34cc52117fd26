"""Only learned values train (issue 19): Resize scales, Clip bounds, Pow exponents, the attention scale,
epsilons and mask fills stay constants in every trainable mode; every parameter of a real export can move
and the written-back graph still runs in ONNX Runtime exactly as the module does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from onnx_inher.bridge import to_torch, write_back
from onnx_inher.ir.weights import weight_names
from tests import zoo
from tests.helpers import ort_run, paddle_style, rel_err, tf2onnx_style, torch_run

F32 = TensorProto.FLOAT


def _const(name: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name))


def _every_kind_of_float_constant() -> onnx.ModelProto:
    """MatMul + bias, a decomposed LayerNorm, a scaled and masked score, GELU-like Pow, Clip, and a Resize."""
    rng = np.random.default_rng(0)
    f = np.float32
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h0"]), helper.make_node("Add", ["h0", "bias"], ["h"]),
        helper.make_node("ReduceMean", ["h"], ["mu"], axes=[-1]), helper.make_node("Sub", ["h", "mu"], ["d"]),
        helper.make_node("Pow", ["d", "two"], ["d2"]), helper.make_node("ReduceMean", ["d2"], ["var"], axes=[-1]),
        helper.make_node("Add", ["var", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["sd"]),
        helper.make_node("Div", ["d", "sd"], ["n"]), helper.make_node("Mul", ["n", "gamma"], ["g"]),
        helper.make_node("Add", ["g", "beta"], ["ln"]),
        helper.make_node("Div", ["ln", "scale"], ["s"]),  # the attention scale
        helper.make_node("Where", ["keep", "s", "fill"], ["masked"]),  # the -3.4e38 mask fill
        helper.make_node("Clip", ["masked", "lo", "hi"], ["c"]),
        helper.make_node("Unsqueeze", ["c", "axes"], ["c4"]),
        helper.make_node("Resize", ["c4", "", "scales"], ["r"], mode="nearest"),
        helper.make_node("Squeeze", ["r", "axes"], ["y"]),
        _const("gamma", rng.normal(size=8).astype(f)), _const("fill", np.array(-3.4e38, f)),
    ]
    inits = [numpy_helper.from_array(a, n) for n, a in (
        ("W", rng.normal(size=(6, 8)).astype(f)), ("bias", rng.normal(size=8).astype(f)),
        ("two", np.array(2.0, f)), ("eps", np.array(1e-5, f)), ("beta", rng.normal(size=8).astype(f)),
        ("scale", np.array(2.83, f)), ("lo", np.array(-3.0, f)), ("hi", np.array(3.0, f)),
        ("axes", np.array([0], np.int64)), ("scales", np.array([1, 1, 2, 1], f)))]
    graph = helper.make_graph(nodes, "constants", [helper.make_tensor_value_info("x", F32, [2, 4, 6]),
                                                   helper.make_tensor_value_info("keep", TensorProto.BOOL, [2, 4, 8])],
                              [helper.make_tensor_value_info("y", F32, [2, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_only_learned_values_are_weights() -> None:
    model = _every_kind_of_float_constant()
    assert weight_names(model) == {"W", "bias", "gamma", "beta"}
    for mode in ("all", "no-embeddings", "factors"):
        _, param_map = to_torch(model, trainable=mode)
        assert set(param_map) == {"W", "bias", "gamma", "beta"}


def _perturbed_write_back(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> float:
    """Scale every trainable parameter by 1.01 (what one optimizer step can do), write back, and compare
    ONNX Runtime on the written graph with the module."""
    module, param_map = to_torch(model, trainable="all")
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.mul_(1.01)
    written = write_back(model, module, param_map)
    got = ort_run(written, feed)
    assert all(np.isfinite(a).all() for a in got if a.dtype.kind == "f")
    return rel_err(got, torch_run(module, feed))


def test_perturbed_constants_graph_still_runs() -> None:
    rng = np.random.default_rng(1)
    feed = {"x": rng.normal(size=(2, 4, 6)).astype(np.float32), "keep": rng.random((2, 4, 8)) > 0.3}
    assert _perturbed_write_back(_every_kind_of_float_constant(), feed) < 1e-5


def _upsampling_detector(path: Path) -> onnx.ModelProto:
    """A small FPN-style conv net with nn.Upsample (a Resize with constant scales), exported by torch."""

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.down = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.up = torch.nn.Upsample(scale_factor=2.0, mode="nearest")
            self.head = torch.nn.Conv2d(8 + 3, 5, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.cat([self.up(torch.relu(self.down(x))), x], 1)).sigmoid()

    torch.manual_seed(0)
    torch.onnx.export(Net().eval(), (torch.randn(1, 3, 16, 16),), str(path), input_names=["x"],
                      output_names=["y"], opset_version=13, dynamo=False)
    return onnx.load(str(path))


@pytest.mark.parametrize("build", ["detector", "tf2onnx", "paddle"])
def test_perturbed_exports_match_ort(tmp_path: Path, build: str) -> None:
    if build == "detector":
        model = _upsampling_detector(tmp_path / "det.onnx")
        assert any(n.op_type == "Resize" for n in model.graph.node)
    else:
        model = tf2onnx_style() if build == "tf2onnx" else paddle_style()
    inits = {t.name for t in model.graph.initializer}
    rng = np.random.default_rng(2)
    feed = {i.name: rng.normal(size=[d.dim_value if d.dim_value > 0 else 2 for d in i.type.tensor_type.shape.dim])
            .astype(np.float32) for i in model.graph.input if i.name not in inits}
    assert _perturbed_write_back(model, feed) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("name", ["minilm_torchscript", "minilm_dynamo"])
def test_perturbed_minilm_exports_match_ort(name: str) -> None:
    model = onnx.load(str(getattr(zoo, name)()))
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 1000, size=(2, 9)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    names = [i.name for i in model.graph.input]
    feed = {n: v for n, v in (("input_ids", ids), ("attention_mask", mask), ("token_type_ids", np.zeros_like(ids)))
            if n in names}
    assert _perturbed_write_back(model, feed) < 1e-4
