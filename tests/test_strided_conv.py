"""A one-input-channel strided conv's down conv, written space-to-depth (`passes/factorize.py`, `_s2d_conv`):
the same function as the direct form at any rank, exact at full rank, for any input length (the span its
windows read is cut from the input's own shape), and only where it applies.

Why the form exists: ONNX Runtime runs a 1 -> 16 conv with a 512-tap kernel at stride 4 in 143.9 us and its
space-to-depth form in 33.5 us (`benchmarks/experiments/strided_first_conv.py`); CREPE's first layer is one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_inher import api
from onnx_inher.passes import factorize
from onnx_inher.planning.plan import Options
from onnx_inher.planning.rank import RankPolicy
from tests.helpers import ort_run

C_OUT = 32


def strided_teacher(path: Path, kernel: list[int], strides: list[int], pads: list[int] | None = None,
                    c_in: int = 1) -> Path:
    """x -> Conv(1 -> C_OUT, `kernel`, `strides`) + bias -> Relu; the input's spatial dims are free."""
    nd = len(kernel)
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((C_OUT, c_in, *kernel)) / np.sqrt(np.prod(kernel))).astype(np.float32)
    b = rng.standard_normal(C_OUT).astype(np.float32)
    conv = helper.make_node("Conv", ["x", "w", "b"], ["h"], name="conv", strides=strides, kernel_shape=kernel,
                            pads=pads or [0] * (2 * nd))
    graph = helper.make_graph(
        [conv, helper.make_node("Relu", ["h"], ["y"], name="act")], "strided",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c_in, *[f"d{i}" for i in range(nd)]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", C_OUT, *[f"o{i}" for i in range(nd)]])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _compress(teacher: Path, out: Path, rank: int) -> Path:
    result = api.compress(teacher, out, Options(mode="svd", policy=RankPolicy("rank", rank), guard=False,
                                                latency_check=False, rank_multiple=1))
    rewritten = any("s2d" in n.name for n in onnx.load(str(out)).graph.node)
    assert any("space-to-depth" in w and "the form's" in w for w in result.plan.notes) == rewritten
    return out


CASES = {  # name: (kernel, strides, input shapes to run at)
    "2-D, strided along H (CREPE)": ([64, 1], [4, 1], [(2, 1, 1000, 1), (1, 1, 1002, 1), (1, 1, 67, 3)]),
    "2-D, strided along W": ([1, 20], [1, 5], [(2, 1, 1, 301), (1, 1, 2, 300)]),
    "1-D (a Conv1d front end)": ([10], [5], [(2, 1, 400), (1, 1, 403)]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_space_to_depth_is_the_direct_form_at_any_rank_and_length(tmp_path: Path, case: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    kernel, strides, shapes = CASES[case]
    teacher = strided_teacher(tmp_path / "t.onnx", kernel, strides)
    full = _compress(teacher, tmp_path / "full.onnx", rank=min(C_OUT, int(np.prod(kernel))))
    low = _compress(teacher, tmp_path / "low.onnx", rank=4)
    nodes = [n.name for n in onnx.load(str(low)).graph.node]
    assert "conv/svd/s2d_crop" in nodes and "conv/svd/down" in nodes
    monkeypatch.setattr(factorize, "s2d_axis", lambda *a: None)
    direct = _compress(teacher, tmp_path / "direct.onnx", rank=4)
    assert not any("s2d" in n.name for n in onnx.load(str(direct)).graph.node)
    rng = np.random.default_rng(1)
    for shape in shapes:
        feed = {"x": rng.standard_normal(shape).astype(np.float32)}
        expected = ort_run(teacher, feed)[0]
        got = ort_run(full, feed)[0]
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()  # exact at full rank
        a, b = ort_run(low, feed)[0], ort_run(direct, feed)[0]
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()  # the same function as the direct form


@pytest.mark.parametrize("why,kernel,strides,pads,c_in", [
    ("padded", [64, 1], [4, 1], [2, 0, 2, 0], 1),
    ("two input channels", [64, 1], [4, 1], None, 2),
    ("stride does not divide the kernel", [7, 1], [2, 1], None, 1),
    ("strided along both axes", [4, 4], [2, 2], None, 1),
])
def test_space_to_depth_only_where_it_applies(tmp_path: Path, why: str, kernel: list[int], strides: list[int],
                                              pads: list[int] | None, c_in: int) -> None:
    teacher = strided_teacher(tmp_path / "t.onnx", kernel, strides, pads, c_in)
    student = _compress(teacher, tmp_path / "s.onnx", rank=2)
    assert not any("s2d" in n.name for n in onnx.load(str(student)).graph.node), why


def test_bench_says_the_baseline_would_gain_from_the_form_too(tmp_path: Path) -> None:
    """Part of such a student's speedup is the form's: `bench` names the baseline's convs that take it."""
    from onnx_inher.bench import bench
    from onnx_inher.passes.factorize import strided_convs

    teacher = strided_teacher(tmp_path / "t.onnx", [64, 1], [4, 1])
    student = _compress(teacher, tmp_path / "s.onnx", rank=4)
    assert strided_convs(onnx.load(str(teacher))) == ["conv"]
    doc = bench([teacher, student], shapes={"x": [1, 1, 1000, 1]}, iters=2, warmup=1).to_dict()
    assert len(doc["notes"]) == 1 and "baseline's conv" in doc["notes"][0] and "space-to-depth" in doc["notes"][0]
    padded = strided_teacher(tmp_path / "p.onnx", [64, 1], [4, 1], [2, 0, 2, 0])
    assert strided_convs(onnx.load(str(padded))) == []
    alone = bench([teacher], shapes={"x": [1, 1, 1000, 1]}, iters=2, warmup=1).to_dict()
    assert alone["notes"] == []  # nothing to compare against
