"""The whole model beside the candidate layers: FLOPs of recurrent and quantised ops, every float weight,
and the warning when the factorisable layers are a small part of the teacher (a speech encoder whose time
is in its LSTM must not read "FLOPs 37%" as a promise).

FLOPs are computed by hand here from the ONNX operator definitions, not through the library.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnx_inher import api
from onnx_inher.bench.profile import node_flops, profile
from onnx_inher.cli import main
from onnx_inher.ir.shapes import infer
from onnx_inher.planning.plan import Options, Plan
from onnx_inher.planning.rank import parse_policy
from tests.helpers import ort_run

FEAT, HIDDEN, OUT, STEPS = 16, 64, 64, 50


def lstm_encoder(path: Path, bidirectional: bool = False) -> Path:
    """`x [T, 1, FEAT]` -> LSTM(HIDDEN) -> the last direction's states `[T, HIDDEN*dirs]` -> MatMul -> `[T, OUT]`."""
    rng = np.random.default_rng(0)
    dirs = 2 if bidirectional else 1
    w = rng.standard_normal((dirs, 4 * HIDDEN, FEAT)).astype(np.float32) * 0.1
    r = rng.standard_normal((dirs, 4 * HIDDEN, HIDDEN)).astype(np.float32) * 0.1
    b = np.zeros((dirs, 8 * HIDDEN), np.float32)
    proj = rng.standard_normal((HIDDEN * dirs, OUT)).astype(np.float32) * 0.1
    nodes = [
        helper.make_node("LSTM", ["x", "W", "R", "B"], ["y"], name="lstm", hidden_size=HIDDEN,
                         direction="bidirectional" if bidirectional else "forward"),
        helper.make_node("Reshape", ["y", "flat"], ["states"], name="flatten"),
        helper.make_node("MatMul", ["states", "P"], ["out"], name="proj"),
    ]
    graph = helper.make_graph(
        nodes, "lstm_encoder", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", 1, FEAT])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["T", OUT])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(r, "R"), numpy_helper.from_array(b, "B"),
         numpy_helper.from_array(np.array([-1, HIDDEN * dirs], np.int64), "flat"), numpy_helper.from_array(proj, "P")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def test_recurrent_flops_count_every_step_and_direction(tmp_path: Path) -> None:
    for bidirectional in (False, True):
        model = onnx.load(lstm_encoder(tmp_path / f"lstm{bidirectional}.onnx", bidirectional))
        dirs = 2 if bidirectional else 1
        table = infer(model, {"x": (STEPS, 1, FEAT)})
        lstm = model.graph.node[0]
        assert node_flops(lstm, table) == 2 * STEPS * dirs * 4 * HIDDEN * (FEAT + HIDDEN)
        # a named dim resolves through the symbols, as planning counts
        assert node_flops(lstm, infer(model), {"T": 7}) == 2 * 7 * dirs * 4 * HIDDEN * (FEAT + HIDDEN)
        assert node_flops(lstm, infer(model)) is None  # unknown without them


def test_quantised_products_count_as_their_float_op() -> None:
    a = helper.make_tensor_value_info("a", TensorProto.UINT8, [4, 32])
    b = helper.make_tensor_value_info("b", TensorProto.UINT8, [32, 8])
    node = helper.make_node("MatMulInteger", ["a", "b"], ["y"])
    graph = helper.make_graph([node], "q", [a, b], [helper.make_tensor_value_info("y", TensorProto.INT32, [4, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert node_flops(model.graph.node[0], infer(model)) == 2 * 4 * 8 * 32


def test_bench_profile_counts_the_lstm(tmp_path: Path) -> None:
    path = lstm_encoder(tmp_path / "enc.onnx")
    feed = {"x": np.zeros((STEPS, 1, FEAT), np.float32)}
    cost = profile(path, onnx.load(path), feed)
    assert cost.flops == 2 * STEPS * 4 * HIDDEN * (FEAT + HIDDEN) + 2 * STEPS * HIDDEN * OUT
    assert cost.unresolved_nodes == 0


def test_plan_shows_the_whole_model_and_warns_when_it_is_mostly_lstm(tmp_path: Path) -> None:
    path = lstm_encoder(tmp_path / "enc.onnx")
    plan = api.plan(path, Options(mode="svd", policy=parse_policy(param_ratio=0.5), shapes={"x": [STEPS, 1, FEAT]}))
    t = plan.totals()
    lstm_flops = 2 * STEPS * 4 * HIDDEN * (FEAT + HIDDEN)
    proj_flops = 2 * STEPS * HIDDEN * OUT
    assert t["flops_before"] == proj_flops and t["params_before"] == HIDDEN * OUT
    m = t["model"]
    assert m["params_before"] == 4 * HIDDEN * (FEAT + HIDDEN) + 8 * HIDDEN + HIDDEN * OUT
    assert m["flops_before"] == proj_flops + lstm_flops
    assert m["flops_after"] == t["flops_after"] + lstm_flops
    assert m["params_before"] - m["params_after"] == t["params_before"] - t["params_after"]
    assert abs(m["factorisable_flop_share"] - proj_flops / (proj_flops + lstm_flops)) < 1e-9
    warning = next(w for w in plan.warnings if "does not factorise" in w)
    assert "LSTM 83%" in warning and "factorisable layers (MatMul, Gemm, Conv) are 17%" in warning
    again = Plan.from_json(plan.to_json())
    assert again.model_cost == plan.model_cost and again.totals() == t


def test_cli_prints_the_whole_model_line(tmp_path: Path) -> None:
    path = lstm_encoder(tmp_path / "enc.onnx")
    out = tmp_path / "student.onnx"
    r = CliRunner().invoke(main, ["compress", str(path), "-o", str(out), "--mode", "svd", "--param-ratio", "0.5",
                                  "--shape", f"x={STEPS}x1x{FEAT}", "--no-latency-check"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    at = next(i for i, line in enumerate(lines) if "layers factorised" in line)
    assert lines[at + 1].startswith("whole model: params ")
    assert "onnx-inher does not factorise" in r.output
    feed = {"x": np.random.default_rng(1).standard_normal((STEPS, 1, FEAT)).astype(np.float32)}
    assert ort_run(out, feed)[0].shape == (STEPS, OUT)


def test_no_whole_model_line_when_the_candidates_are_the_model(tmp_path: Path) -> None:
    """An MLP's candidates hold every weight and FLOP: one line, no warning."""
    from tests.helpers import mlp_teacher

    path = mlp_teacher(tmp_path / "mlp.onnx")
    r = CliRunner().invoke(main, ["inspect", str(path), "--mode", "svd", "--param-ratio", "0.5", "--json"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["totals"]["model"]["factorisable_flop_share"] == 1.0
    plain = CliRunner().invoke(main, ["inspect", str(path), "--mode", "svd", "--param-ratio", "0.5"],
                               catch_exceptions=False)
    assert "whole model" not in plain.output and "does not factorise" not in plain.output
