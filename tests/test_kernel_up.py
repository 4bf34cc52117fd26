"""A k x k conv pair with its kernel on the up side (`ir.layers.kernel_up`): a 1x1 conv C_in -> r, then a k x k
conv r -> C_out with every attribute of the teacher's conv. Exact at full rank whatever the pads, strides,
dilations or auto-pad; chosen by the plan only where it keeps the energy threshold with no more params and
FLOPs; counted in the plan as in the file; checked when a plan file asks for it; whitened from the patch Gram
when calibrated; trained and written back by the bridge; timed alone like any other pair."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_inher import api
from onnx_inher.errors import InputError
from onnx_inher.ir.layers import KERNEL_UP, kernel_up
from onnx_inher.passes.locate import locate
from onnx_inher.planning.plan import Options, load_plan
from onnx_inher.planning.rank import parse_policy
from onnx_inher.tuning.allocate import weight_from_matrices
from tests.helpers import bridge_round_trip

ort = pytest.importorskip("onnxruntime")


def _conv(path: Path, w: np.ndarray, *, bias: bool = True, spatial: tuple[int, ...] = (12, 12),
          **attrs: object) -> Path:
    """x -> Conv(w, attrs) -> Relu -> y, one Conv whose weight is `w` (`[C_out, C_in, *k]`)."""
    co, ci = w.shape[:2]
    inits = [numpy_helper.from_array(w.astype(np.float32), "w")]
    inputs = ["x", "w"]
    if bias:
        inits.append(numpy_helper.from_array(np.linspace(-1, 1, co).astype(np.float32), "b"))
        inputs.append("b")
    nodes = [helper.make_node("Conv", inputs, ["c"], name="conv", **attrs),
             helper.make_node("Relu", ["c"], ["y"], name="act")]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", ci, *spatial])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", co, *(f"out{i}" for i in range(len(spatial)))])
    graph = helper.make_graph(nodes, "conv", [x], [y], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _x(ci: int, spatial: tuple[int, ...] = (12, 12), seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, ci, *spatial)).astype(np.float32)


def _random(co: int, ci: int, *kernel: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((co, ci, *kernel)).astype(np.float32) / np.sqrt(ci)


def _low_rank_up(co: int, ci: int, k: tuple[int, ...], r: int, seed: int = 0) -> np.ndarray:
    """`W[o, c, t] = sum_j A[o, t, j] B[j, c]`: rank r with the kernel on the up side, about full rank the other
    way."""
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal((co, *k, r)), rng.standard_normal((r, ci))
    return np.moveaxis((a @ b) / np.sqrt(ci * r), -1, 1).astype(np.float32)


def _low_rank_down(co: int, ci: int, k: tuple[int, ...], r: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = rng.standard_normal((co, r)) @ rng.standard_normal((r, ci * int(np.prod(k))))
    return (m / np.sqrt(ci * r)).reshape(co, ci, *k).astype(np.float32)


def _options(**kw: object) -> Options:
    base: dict[str, object] = {"mode": "svd", "heads": 1, "policy": parse_policy(energy=0.999), "rank_multiple": 1,
                               "latency_check": False}
    base.update(kw)
    return Options(**base)  # type: ignore[arg-type]


def _oriented_plan(teacher: Path, tmp_path: Path, rank: int | None = None) -> Path:
    """A plan file asking for the conv with its kernel up, at `rank` (full rank by default)."""
    plan = api.plan(teacher, _options(guard=False))
    c = plan.candidates[0]
    full = kernel_up(next(v for v in locate(onnx.load(str(teacher))) if hasattr(v, "matrices"))).full_rank
    c.decision, c.orientation, c.rank, c.heads = "factorize", KERNEL_UP, rank or full, 1
    path = tmp_path / "plan.json"
    path.write_text(plan.to_json())
    return path


def _nodes(path: Path) -> dict[str, onnx.NodeProto]:
    return {n.name: n for n in onnx.load(str(path)).graph.node}


@pytest.mark.parametrize(("kernel", "attrs"), [
    ((3, 3), {"pads": [1, 1, 1, 1]}),
    ((3, 3), {"strides": [2, 2], "pads": [0, 1, 1, 0]}),  # asymmetric pads, strided
    ((3, 3), {"dilations": [2, 2], "pads": [2, 2, 2, 2]}),
    ((3, 3), {"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
    ((1, 3), {"pads": [0, 1, 0, 1]}),  # the PP-OCRv5 recogniser's neck kernels
    ((5,), {"pads": [2, 2]}),  # a Conv1d
])
def test_exact_at_full_rank_whatever_the_attributes(tmp_path: Path, kernel: tuple[int, ...], attrs: dict) -> None:
    spatial = (12,) if len(kernel) == 1 else (12, 12)
    teacher = _conv(tmp_path / "t.onnx", _random(12, 8, *kernel), spatial=spatial, **attrs)
    student = tmp_path / "s.onnx"
    api.compress(teacher, student, _options(guard=False), plan_path=_oriented_plan(teacher, tmp_path))
    nodes = _nodes(student)
    down, up = nodes["conv/svd/down"], nodes["conv/svd/up"]
    assert down.op_type == up.op_type == "Conv"
    weights = {t.name: list(t.dims) for t in onnx.load(str(student)).graph.initializer}
    assert weights[down.input[1]][2:] == [1] * len(kernel) and weights[up.input[1]][2:] == list(kernel)
    assert up.input[2] == "b"  # the bias stays the teacher's, on the k x k conv
    x = _x(8, spatial)
    want = _run(teacher, x)
    assert np.abs(_run(student, x) - want).max() <= 1e-5 * float(np.abs(want).max())


def test_the_plan_puts_the_kernel_where_the_weight_is_low_rank(tmp_path: Path) -> None:
    """Low rank with the kernel up: chosen, and exact at that rank. Low rank with the kernel down: kept down."""
    up = _conv(tmp_path / "up.onnx", _low_rank_up(16, 64, (3, 3), 4), pads=[1, 1, 1, 1])
    down = _conv(tmp_path / "down.onnx", _low_rank_down(16, 64, (3, 3), 4), pads=[1, 1, 1, 1])
    for teacher, want in ((up, KERNEL_UP), (down, None)):
        result = api.compress(teacher, tmp_path / f"s_{teacher.stem}.onnx", _options())
        c = result.plan.candidates[0]
        assert (c.decision, c.orientation, c.rank) == ("factorize", want, 4), teacher.stem
        x = _x(64)
        ref = _run(teacher, x)
        assert np.abs(_run(tmp_path / f"s_{teacher.stem}.onnx", x) - ref).max() <= 1e-4 * float(np.abs(ref).max())
    doc = json.loads(result.plan.to_json())
    assert "orientation" not in doc["candidates"][0]  # the kernel down: the plan's bytes as before


def test_orientation_down_keeps_every_kernel_down(tmp_path: Path) -> None:
    teacher = _conv(tmp_path / "t.onnx", _low_rank_up(16, 64, (3, 3), 4), pads=[1, 1, 1, 1])
    c = api.plan(teacher, _options(orientation="down")).candidates[0]
    assert c.orientation is None and c.rank is not None and c.rank > 4


def test_the_plan_counts_what_the_file_holds(tmp_path: Path) -> None:
    teacher = _conv(tmp_path / "t.onnx", _low_rank_up(24, 96, (3, 3), 20), pads=[1, 1, 1, 1])
    result = api.compress(teacher, tmp_path / "s.onnx", _options(policy=parse_policy(param_ratio=0.5)))
    c = result.plan.candidates[0]
    assert c.orientation == KERNEL_UP
    held = {t.name: int(np.prod(t.dims)) for t in onnx.load(str(tmp_path / "s.onnx")).graph.initializer}
    assert sum(held.values()) == held["b"] + c.params_after - 24  # the bias is counted in params_after
    assert c.params_after == c.rank * (96 + 24 * 9) + 24
    assert c.flops_after == 2 * c.rank * (96 + 24 * 9) * 144  # 12 x 12 pixels in and out, batch 1


def test_a_strided_conv_keeps_the_kernel_down_when_that_is_cheaper(tmp_path: Path) -> None:
    """Stride 2: the kernel-up pair's 1x1 down conv runs at the input's pixels, four times the output's. With a
    weight as low-rank one way as the other, the FLOPs decide."""
    rng = np.random.default_rng(0)
    w = np.einsum("o,c,t->oct", rng.standard_normal(32), rng.standard_normal(32), rng.standard_normal(9))
    w = w.reshape(32, 32, 3, 3).astype(np.float32)
    teacher = _conv(tmp_path / "t.onnx", w, strides=[2, 2], pads=[1, 1, 1, 1])
    c = api.plan(teacher, _options()).candidates[0]
    assert (c.decision, c.rank, c.orientation) == ("factorize", 1, None)


@pytest.mark.parametrize(("edit", "why"), [
    ({"heads": 2}, "heads keep the kernel on the down side"),
    ({"orientation": "sideways"}, "orientation 'sideways'"),
])
def test_a_plan_file_that_cannot_take_it_is_refused(tmp_path: Path, edit: dict, why: str) -> None:
    teacher = _conv(tmp_path / "t.onnx", _random(12, 8, 3, 3), pads=[1, 1, 1, 1])
    path = _oriented_plan(teacher, tmp_path)
    doc = json.loads(path.read_text())
    doc["candidates"][0].update(edit)
    path.write_text(json.dumps(doc))
    with pytest.raises(InputError, match=why):
        api.compress(teacher, tmp_path / "s.onnx", _options(guard=False), plan_path=path)
    assert not (tmp_path / "s.onnx").exists()


def test_a_1x1_conv_has_no_kernel_to_move(tmp_path: Path) -> None:
    teacher = _conv(tmp_path / "t.onnx", _random(12, 8, 1, 1))
    plan = api.plan(teacher, _options(guard=False))
    plan.candidates[0].decision, plan.candidates[0].rank, plan.candidates[0].orientation = "factorize", 4, KERNEL_UP
    (tmp_path / "plan.json").write_text(plan.to_json())
    with pytest.raises(InputError, match="1x1 kernel"):
        api.compress(teacher, tmp_path / "s.onnx", _options(guard=False), plan_path=tmp_path / "plan.json")
    assert load_plan(tmp_path / "plan.json").candidates[0].orientation == KERNEL_UP


def test_the_kernel_up_matrices_invert(tmp_path: Path) -> None:
    """`weight_from_matrices` undoes `matrices()` (the sensitivity allocation probes the teacher with it)."""
    teacher = _conv(tmp_path / "t.onnx", _random(6, 5, 3, 2))
    view = kernel_up(next(v for v in locate(onnx.load(str(teacher))) if hasattr(v, "matrices")))
    m = view.matrices()
    assert m.shape == (1, 6 * 6, 5) and view.full_rank == 5
    np.testing.assert_array_equal(m[0, ::6, :], view.weight[:, :, 0, 0])  # rows (o, t): each output's 6 taps
    np.testing.assert_array_equal(m[0, 5::6, :], view.weight[:, :, 2, 1])
    np.testing.assert_array_equal(weight_from_matrices(view, m), view.weight)


def test_calibration_whitens_it_from_the_patch_gram(tmp_path: Path) -> None:
    """Inputs whose channels differ in scale by 100x: the whitened kernel-up pair keeps the loud channels and its
    output error on that data is well below plain SVD's at the same rank."""
    teacher = _conv(tmp_path / "t.onnx", _low_rank_up(16, 32, (3, 3), 12, seed=3) + _random(16, 32, 3, 3, seed=4)
                    * 0.3, pads=[1, 1, 1, 1], bias=False)
    scales = np.geomspace(0.1, 10, 32).astype(np.float32)[None, :, None, None]
    x = (np.random.default_rng(5).standard_normal((64, 32, 12, 12)) * scales).astype(np.float32)
    np.savez(tmp_path / "data.npz", x=x)
    plan = _oriented_plan(teacher, tmp_path, rank=8)
    ref = _run(teacher, x)
    errors = {}
    for name, calibration in (("plain", None), ("whitened", str(tmp_path / "data.npz"))):
        api.compress(teacher, tmp_path / f"{name}.onnx", _options(guard=False, calibration=calibration),
                     plan_path=plan)
        assert "conv/svd/up" in _nodes(tmp_path / f"{name}.onnx")
        errors[name] = float(np.linalg.norm(_run(tmp_path / f"{name}.onnx", x) - ref) / np.linalg.norm(ref))
    assert errors["whitened"] < 0.7 * errors["plain"], errors


def test_the_bridge_trains_it_and_writes_it_back(tmp_path: Path) -> None:
    teacher = _conv(tmp_path / "t.onnx", _random(12, 8, 3, 3), strides=[2, 2], pads=[1, 1, 1, 1])
    api.compress(teacher, tmp_path / "s.onnx", _options(guard=False), plan_path=_oriented_plan(teacher, tmp_path, 4))
    bridge_round_trip(tmp_path / "s.onnx", {"x": _x(8)}, ["conv/svd/up.", "conv/svd/down."], tmp_path)


def test_timed_alone_as_it_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`plan --target cpu` (and the check's reverts, `run`'s time-priced ranks) time the kernel-up pair, under its
    own cache entry."""
    from onnx_inher.tuning import latency

    monkeypatch.setenv("ONNX_INHER_CACHE", str(tmp_path / "cache"))
    teacher = _conv(tmp_path / "t.onnx", _low_rank_up(16, 64, (3, 3), 4), pads=[1, 1, 1, 1])
    built: list[list[str]] = []
    real = latency.replacement_graph

    def spy(view, *args, **kwargs):  # type: ignore[no-untyped-def]
        g = real(view, *args, **kwargs)
        built.append([n.op_type for n in g.model.graph.node])
        return g

    monkeypatch.setattr(latency, "replacement_graph", spy)
    plan = api.plan(teacher, _options(), target="cpu")
    assert plan.candidates[0].orientation == KERNEL_UP
    assert built and built[0][:2] == ["Conv", "Conv"]
    assert list((tmp_path / "cache" / "latency").glob("*.json"))


def test_the_sensitivity_allocation_probes_it_in_the_teacher_layout(tmp_path: Path) -> None:
    """`run`'s default allocation swaps each layer's rank-r reconstruction into the teacher (`weight_from_matrices`)
    and whitens it (`layer_gram`): a kernel-up layer goes through both and keeps its orientation."""
    teacher = _conv(tmp_path / "t.onnx", _low_rank_up(16, 64, (3, 3), 12) + _random(16, 64, 3, 3) * 0.05,
                    pads=[1, 1, 1, 1])
    x = _x(64)
    np.savez(tmp_path / "data.npz", x=np.concatenate([x] * 8))
    result = api.compress(teacher, tmp_path / "s.onnx", _options(policy=parse_policy(param_ratio=0.5),
                                                                 calibration=str(tmp_path / "data.npz"),
                                                                 allocate="sensitivity"))
    c = result.plan.candidates[0]
    assert c.orientation == KERNEL_UP and "kernel on the up side" in (c.note or "")
    assert any("sensitivity allocation" in w for w in result.plan.notes)
    ref = _run(teacher, x)
    assert np.linalg.norm(_run(tmp_path / "s.onnx", x) - ref) <= 0.2 * np.linalg.norm(ref)


def test_the_layer_profile_names_the_form(tmp_path: Path) -> None:
    from onnx_inher.bench.layers import replacement_nodes

    teacher = _conv(tmp_path / "t.onnx", _random(12, 8, 3, 3), pads=[1, 1, 1, 1])
    view = next(v for v in locate(onnx.load(str(teacher))) if hasattr(v, "matrices"))
    for orientation, form in ((KERNEL_UP, "pair, kernel up"), (None, "pair")):
        path = _oriented_plan(teacher, tmp_path, 4)
        doc = json.loads(path.read_text())
        doc["candidates"][0]["orientation"] = orientation
        path.write_text(json.dumps(doc))
        api.compress(teacher, tmp_path / "s.onnx", _options(guard=False), plan_path=path)
        found = replacement_nodes(view, onnx.load(str(tmp_path / "s.onnx")))
        assert found is not None and found[1] == form
