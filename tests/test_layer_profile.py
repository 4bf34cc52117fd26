"""Each factorised layer's time inside the running models, from ONNX Runtime's profile (issue 18): timed
alone, a small conv pays layout conversions that neither the teacher nor the student pays in the model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from onnx_inher import api
from onnx_inher.bench import bench
from onnx_inher.bench.inmodel import NodeTimes, attribute, whole_model_bound
from onnx_inher.planning.plan import Options
from onnx_inher.planning.rank import parse_policy
from onnx_inher.reporting.bench import markdown, terminal
from tests.test_bench import _cnn


def test_fused_epilogues_count_on_both_sides_and_standalone_ones_on_neither() -> None:
    # ORT names a conv fused with the Add after it after the Add's output tensor (`h1b_nchwc`)
    teacher = NodeTimes({"h1b_nchwc": 100.0, "relu1": 10.0, "conv10_nchwc": 70.0, "Reorder": 5.0},
                        {"h1b_nchwc": "Conv", "relu1": "Relu", "conv10_nchwc": "Conv", "Reorder": "ReorderOutput"})
    student = NodeTimes({"conv1/svd/down_nchwc": 20.0, "h1b_nchwc": 30.0, "relu1": 10.0, "conv10_nchwc": 70.0},
                        {"conv1/svd/down_nchwc": "Conv", "h1b_nchwc": "Conv", "relu1": "Relu", "conv10_nchwc": "Conv"})
    at = attribute("conv1", ["conv1", "h1"], [["bias1", "h1b"], ["relu1", "r1"]], teacher, student)
    assert at.teacher == ["h1b_nchwc"]  # not conv10's node, whose name only starts like it
    assert at.student == ["conv1/svd/down_nchwc", "h1b_nchwc"]  # the Relu runs alone on both sides: left out
    # a head that ends in a MatMul cannot take the Add: the student runs it alone, and pays it
    heads = NodeTimes({"conv1/inher/up": 40.0, "bias1": 15.0, "conv1/inher/down_nchwc": 20.0},
                      {"conv1/inher/up": "MatMul", "bias1": "Add", "conv1/inher/down_nchwc": "Conv"})
    at = attribute("conv1", ["conv1", "h1"], [["bias1", "h1b"]], teacher, heads)
    assert at.teacher == ["h1b_nchwc"] and at.student == ["bias1", "conv1/inher/down_nchwc", "conv1/inher/up"]


def test_a_node_owns_only_what_ort_made_of_it_not_its_numbered_namesakes() -> None:
    """PyTorch names nodes `/Relu`, `/Relu_1`, ...; ORT names the conv it fused into the second
    `/Relu_1_output_0_nchwc`. That is not the first ReLU's: CREPE tiny's conv1 was once charged every
    ReLU-fused conv of the network (0.75 ms of the teacher's 0.79)."""
    names = ["/Relu_output_0_nchwc", "/Relu_1_output_0_nchwc", "/Relu_10_output_0_nchwc",
             "/conv1_BN/BatchNormalization_output_0_bn_nchwc", "fused /classifier/Gemm", "/fc/MatMul/MatMulAddFusion"]
    teacher = NodeTimes({n: 10.0 for n in names}, {n: "Conv" for n in names})
    at = attribute("/conv1/Conv", ["/conv1/Conv", "/conv1/Conv_output_0"],
                   [["/Relu", "/Relu_output_0"],
                    ["/conv1_BN/BatchNormalization", "/conv1_BN/BatchNormalization_output_0"]], teacher, teacher)
    assert at.teacher == ["/Relu_output_0_nchwc", "/conv1_BN/BatchNormalization_output_0_bn_nchwc"]
    factored = ["/classifier/Gemm/svd/down", "fused /classifier/Gemm/svd/up"]  # ORT fused an activation into up
    student = NodeTimes({n: 5.0 for n in factored}, {n: "Gemm" for n in factored})
    head = attribute("/classifier/Gemm", ["/classifier/Gemm", "/classifier/Gemm_output_0"], [], teacher, student)
    assert head.teacher == ["fused /classifier/Gemm"] and head.student == factored
    assert attribute("/fc/MatMul", ["/fc/MatMul"], [], teacher, teacher).teacher == ["/fc/MatMul/MatMulAddFusion"]


@pytest.mark.parametrize("mode,heads,form", [("svd", 1, "pair"), ("inher", 2, "heads")])
def test_layer_profile_attributes_every_factorised_layer(tmp_path: Path, mode: str, heads: int, form: str) -> None:
    teacher = _cnn(tmp_path / "teacher.onnx")
    student = tmp_path / "student.onnx"
    api.compress(teacher, student, Options(mode=mode, heads=heads, policy=parse_policy(rank_ratio=0.25), guard=False,
                                           rank_multiple=1))
    doc = json.loads(json.dumps(bench([teacher, student], provider="cpu", batches=[2], iters=4, warmup=1, threads=1,
                                      layer_profile=True).to_dict()))
    rows = {r["node"]: r for r in doc["layer_profile"]}
    assert set(rows) == {"conv1", "conv2", "fc", "(rest)"}
    for name in ("conv1", "conv2", "fc"):
        r = rows[name]
        assert r["form"] == form and r["batch"] == 2 and r["model"] == "student"
        assert r["teacher_nodes"] and r["student_nodes"]
        assert any(f"{name}/" in n for n in r["student_nodes"])
        assert r["dense_ms"] >= 0 and r["factorized_ms"] >= 0 and r["ideal_speedup_flops"] > 0
        # the profiler's own cost per node is taken off every node, and the 32 -> 10 Gemm at batch 2 (640
        # multiply-adds) can take less than that: 0 ms, in about one run of four on an AMD EPYC
        if name != "fc":
            assert r["dense_ms"] > 0 and r["factorized_ms"] > 0, name
        if r["speedup"] is not None:
            assert r["efficiency_flops"] == pytest.approx(r["speedup"] / r["ideal_speedup_flops"])
    assert rows["conv1"]["profiler_overhead_us"] >= 0  # measured: no bound on how fast this machine is
    assert rows["(rest)"]["teacher_wall_ms"] > 0 and rows["(rest)"]["student_wall_ms"] > 0
    rest = rows["(rest)"]
    claimed = sum(rows[n]["dense_ms"] for n in ("conv1", "conv2", "fc"))
    assert claimed + rest["teacher_ms"] == pytest.approx(rest["teacher_total_ms"])
    claimed = sum(rows[n]["factorized_ms"] for n in ("conv1", "conv2", "fc"))
    assert claimed + rest["student_ms"] == pytest.approx(rest["student_total_ms"])
    run_ms = max(rest["teacher_total_ms"], rest["teacher_wall_ms"])  # the run's time: nodes and per-run overhead
    share = sum(rows[n]["dense_ms"] for n in ("conv1", "conv2", "fc")) / run_ms
    assert rest["factorised_share"] == pytest.approx(share, abs=1e-4)
    assert 1 < rest["ideal_speedup_layers"] <= 1 / (1 - share)
    assert "In the running models" in terminal(doc) and "ONNX Runtime profile" in markdown(doc)
    assert "(whole model; layers" in terminal(doc)


def test_whole_model_bound_is_amdahls_law() -> None:
    """Half the teacher's time in layers whose FLOP ideal is 2x: the whole model can reach 1/(0.5 + 0.25)."""
    rows = [{"dense_ms": 3.0, "ideal_speedup_flops": 2.0}, {"dense_ms": 2.0, "ideal_speedup_flops": 2.0},
            {"dense_ms": 0.0, "ideal_speedup_flops": None}]
    bound = whole_model_bound(rows, teacher_ms=10.0, student_ms=8.0)
    assert bound["factorised_share"] == 0.5
    assert bound["ideal_speedup_layers"] == pytest.approx(1 / 0.75, abs=1e-4)
    assert bound["efficiency_layers"] == pytest.approx(1.25 / (1 / 0.75), abs=1e-3)
    unmeasured = whole_model_bound([{"dense_ms": 2.0, "ideal_speedup_flops": None}], teacher_ms=4.0, student_ms=4.0)
    assert unmeasured["ideal_speedup_layers"] == 1.0  # a layer with no FLOP count is taken at its own time
    assert whole_model_bound([], teacher_ms=4.0, student_ms=4.0)["factorised_share"] is None
