"""The conv pair's kernel side by the output error on calibration data (`tuning.orient`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_inher import api
from onnx_inher.ir.layers import KERNEL_UP, kernel_up
from onnx_inher.planning.plan import Options
from onnx_inher.planning.rank import parse_policy
from onnx_inher.planning.svd import data_aware_svd, output_error, truncate
from onnx_inher.tuning.orient import pair_error, reorient
from tests.helpers import ort_run

C_OUT, C_IN, K = 16, 8, 3


def _two_sided_conv(path: Path) -> Path:
    """A 3x3 conv 8 -> 16 whose weight is a large rank-2 part in the kernel-up view `[C_out k, C_in]` that reads
    only channels 0-3, plus a smaller rank-2 part in the kernel-down view `[C_out, C_in k]` on channels 4-7. By
    energy the kernel goes up; on data where channels 0-3 are silent only the second part reaches the output."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((C_OUT * K * K, 2)), np.zeros((2, C_IN))
    b[:, :4] = rng.standard_normal((2, 4))
    loud = np.moveaxis((a @ b).reshape(C_OUT, K, K, C_IN), -1, 1) * 10
    p, q = rng.standard_normal((C_OUT, 2)), np.zeros((2, C_IN, K, K))
    q[:, 4:] = rng.standard_normal((2, 4, K, K))
    heard = (p @ q.reshape(2, -1)).reshape(C_OUT, C_IN, K, K)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", C_IN, 16, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", C_OUT, 16, 16])
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])], "two",
                              [x], [y], [numpy_helper.from_array(((loud + heard) / 10).astype(np.float32), "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


def _silent_data(path: Path) -> Path:
    x = np.random.default_rng(1).standard_normal((64, C_IN, 16, 16)).astype(np.float32)
    x[:, :4] = 0
    np.savez(path, x=x)
    return path


def _options(data: Path, allocate: str, **kw: object) -> Options:
    return Options(mode="svd", policy=parse_policy(param_ratio=0.5), rank_multiple=1, calibration=str(data),
                   allocate=allocate, latency_check=False, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("orient")
    return {"teacher": _two_sided_conv(folder / "two.onnx"), "data": _silent_data(folder / "x.npz"),
            "dir": folder}


def test_the_data_moves_the_kernel_down_where_the_energy_put_it_up(case: dict[str, Path]) -> None:
    by_energy = api.plan(case["teacher"], _options(case["data"], "energy")).candidates[0]
    by_data = api.plan(case["teacher"], _options(case["data"], "sensitivity"))
    moved = by_data.candidates[0]
    assert by_energy.orientation == KERNEL_UP and by_energy.decision == "factorize"
    assert moved.orientation is None and moved.decision == "factorize"
    assert moved.params_after <= by_energy.params_after and moved.flops_after <= by_energy.flops_after
    assert "kernel down by the output error on the calibration data" in (moved.note or "")
    assert "k x k kernel on the up side" not in (moved.note or "")  # the plan's clause, overruled, is gone
    assert any("put the k x k kernel on the other side" in w and "conv (kernel down" in w for w in by_data.notes)


def test_the_student_is_closer_to_its_teacher_on_the_data(case: dict[str, Path]) -> None:
    """What the choice is for: on the data the down pair's outputs are far nearer the teacher's."""
    x = dict(np.load(case["data"]))
    ref = ort_run(case["teacher"], x)[0]
    errors = {}
    for name, options in (("energy", _options(case["data"], "energy")),
                          ("data", _options(case["data"], "sensitivity"))):
        out = case["dir"] / f"{name}.onnx"
        api.compress(case["teacher"], out, options)
        errors[name] = float(np.linalg.norm(ort_run(out, x)[0] - ref) / np.linalg.norm(ref))
    assert errors["data"] < 0.5 * errors["energy"], errors


def test_orientation_down_and_rank_policies_are_left_alone(case: dict[str, Path]) -> None:
    down = api.plan(case["teacher"], _options(case["data"], "sensitivity", orientation="down")).candidates[0]
    assert down.orientation is None and "calibration data" not in (down.note or "")


def test_pair_error_is_the_output_error_of_either_side(case: dict[str, Path]) -> None:
    """The kernel-down side's error is `output_error` on the patch Gram; at full rank either side is exact."""
    a = api.analyze(case["teacher"])
    view = a.views["conv"]
    rng = np.random.default_rng(2)
    patches = rng.standard_normal((500, C_IN * K * K))
    gram = patches.T @ patches / 500
    grams = {view.base_key: gram}
    f = truncate(data_aware_svd(view.matrices(), gram), 3)
    assert pair_error(view, view, 3, gram, grams) == pytest.approx(output_error(view.matrices(), f, gram), rel=1e-4)
    up = kernel_up(view)
    assert pair_error(view, view, view.full_rank, gram, grams) < 1e-5
    assert pair_error(view, up, up.full_rank, gram, grams) < 1e-5
    assert pair_error(view, up, 1, gram, grams) > pair_error(view, up, 4, gram, grams)


def test_reorient_keeps_the_budget_and_skips_what_it_cannot_move(case: dict[str, Path]) -> None:
    """No Gram (a layer calibration did not see), heads, or a pair already on its better side: nothing moves."""
    a = api.analyze(case["teacher"])
    plan = api.plan(case["teacher"], Options(mode="svd", policy=parse_policy(param_ratio=0.5), rank_multiple=1,
                                              latency_check=False))
    before = plan.to_json()
    assert reorient(plan, a.views, {}) == [] and plan.to_json() == before
    heads = api.plan(case["teacher"], Options(mode="inher", heads=2, policy=parse_policy(param_ratio=0.5),
                                               rank_multiple=1, latency_check=False))
    x = np.load(case["data"])["x"]
    cols = np.lib.stride_tricks.sliding_window_view(np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1))), (K, K), axis=(2, 3))
    patches = cols.transpose(0, 2, 3, 1, 4, 5).reshape(-1, C_IN * K * K).astype(np.float64)
    gram = {a.views["conv"].base_key: patches.T @ patches / len(patches)}
    assert reorient(heads, a.views, gram) == []
    notes = reorient(plan, a.views, gram)
    assert notes and plan.candidates[0].orientation is None
    assert reorient(plan, a.views, gram) == []  # on its better side now: a second pass changes nothing
