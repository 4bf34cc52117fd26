"""Real shapes (issue 18, point 2): FLOPs, sample inputs, `--target`, `bench` and `run` at the model's real
input shape, on a recogniser-shaped teacher x[N,3,48,W] (fixed height, free unnamed width).

Nothing here asserts a timing: only shapes, FLOP counts, recorded options, files and exit codes.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from onnx_inher import api
from onnx_inher.bench import bench
from onnx_inher.cli import main
from onnx_inher.ir.shapes import IMAGE_SIDE, SEQUENCE_LEN, image_defaults
from onnx_inher.planning.plan import Options
from onnx_inher.planning.rank import parse_policy
from tests.helpers import ort_run, width_conv_teacher

PREFIX = "onnx-inher: error:"
SHAPE = [1, 3, 48, 320]
QUICK = ["--iters", "2", "--warmup", "0", "--threads", "1"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("real_shapes")
    teacher = width_conv_teacher(folder / "teacher.onnx")
    student = folder / "student.onnx"
    api.compress(teacher, student, Options(mode="svd", policy=parse_policy(param_ratio=0.5), rank_multiple=1))
    inputs = folder / "x.npz"
    np.savez(inputs, x=np.random.default_rng(0).standard_normal((1, 3, 48, 40)).astype(np.float32))
    return {"dir": folder, "teacher": teacher, "student": student, "inputs": inputs}


def _options(**kw: object) -> Options:
    return Options(policy=parse_policy(param_ratio=0.5), rank_multiple=1, **kw)  # type: ignore[arg-type]


def _flops(plan: api.Plan, op: str | None = None) -> int:
    return sum(c.flops_before for c in plan.candidates if op is None or c.op == op)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_flops_count_the_real_width(models: dict[str, Path]) -> None:
    """At W=320 every conv and the head (behind a Reshape that ONNX inference leaves open) cost exactly 320
    times what they cost at W=1. Without a shape, the image's free width is taken as 224 (not 1: a conv net
    at one pixel is all fixed costs), and the plan records that and says how to give the real size."""
    default = api.plan(models["teacher"], _options())
    one = api.plan(models["teacher"], _options(shapes={"x": [1, 3, 48, 1]}))
    real = api.plan(models["teacher"], _options(shapes={"x": SHAPE}))
    assert _flops(real, "Conv") == 320 * _flops(one, "Conv") > 0
    assert _flops(default, "Conv") == IMAGE_SIDE * _flops(one, "Conv")
    head_one, head_real = (next(c for c in p.candidates if c.node == "head").flops_before for p in (one, real))
    assert head_real == 2 * 320 * 64 * 10 == 320 * head_one
    assert json.loads(real.to_json())["options"]["shapes"] == {"x": SHAPE}
    assert json.loads(default.to_json())["options"]["shapes"] == {"x": [1, 3, 48, IMAGE_SIDE]}
    assert any("x=1x3x48x224" in w and "--shape x=1x3x48xW" in w for w in default.warnings), default.warnings
    assert not any("--shape" in w for w in real.warnings)


def _frames_teacher(path: Path) -> Path:
    """CREPE in miniature: frames x[batch, 256] -> a Reshape to [batch, 1, 256, 1] whose target comes from
    Shape ops (which ONNX shape inference leaves open) -> two (k x 1) convs. Only the batch is free."""
    rng = np.random.default_rng(0)
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 256])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 64, None, None])
    nodes = [onnx.helper.make_node("Shape", ["x"], ["xs"]),
             onnx.helper.make_node("Slice", ["xs", "zero", "one"], ["n"]),
             onnx.helper.make_node("Concat", ["n", "tail"], ["target"], axis=0),
             onnx.helper.make_node("Reshape", ["x", "target"], ["frames"]),
             onnx.helper.make_node("Conv", ["frames", "w1"], ["c1"], name="conv1", pads=[3, 0, 4, 0]),
             onnx.helper.make_node("Relu", ["c1"], ["r1"]),
             onnx.helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv2", pads=[3, 0, 4, 0])]
    inits = [onnx.numpy_helper.from_array(np.array([0], np.int64), "zero"),
             onnx.numpy_helper.from_array(np.array([1], np.int64), "one"),
             onnx.numpy_helper.from_array(np.array([1, 256, 1], np.int64), "tail"),
             onnx.numpy_helper.from_array(rng.standard_normal((64, 1, 8, 1)).astype(np.float32), "w1"),
             onnx.numpy_helper.from_array(rng.standard_normal((64, 64, 8, 1)).astype(np.float32) * 0.05, "w2")]
    graph = onnx.helper.make_graph(nodes, "frames", [x], [y], inits)
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)]), str(path))
    return path


def _token_teacher(path: Path, positions: int | None = None) -> Path:
    """A sentence encoder in miniature: token ids `[batch, sequence]` -> embedding -> (+ `positions` learned
    position rows, which fixes the longest sequence it runs) -> a 32 -> 64 MatMul."""
    rng = np.random.default_rng(0)
    ids = onnx.helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, ["batch", "sequence"])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", "sequence", 64])
    nodes = [onnx.helper.make_node("Gather", ["table", "input_ids"], ["e"])]
    inits = [onnx.numpy_helper.from_array(rng.standard_normal((100, 32)).astype(np.float32), "table"),
             onnx.numpy_helper.from_array(rng.standard_normal((32, 64)).astype(np.float32), "w")]
    if positions:
        nodes.append(onnx.helper.make_node("Add", ["e", "pos"], ["ep"]))
        inits.append(onnx.numpy_helper.from_array(rng.standard_normal((1, positions, 32)).astype(np.float32), "pos"))
    nodes.append(onnx.helper.make_node("MatMul", ["ep" if positions else "e", "w"], ["y"], name="proj"))
    graph = onnx.helper.make_graph(nodes, "tokens", [ids], [y], inits)
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)]), str(path))
    return path


def test_a_free_sequence_is_planned_at_128_tokens_and_says_so(tmp_path: Path) -> None:
    """Without --shape a sentence encoder's plan and latency check ran at one token (all-MiniLM's default
    student measured 1.21x there, 1.55x at 128): a free axis after the batch is now taken at SEQUENCE_LEN,
    recorded in the plan, with the --shape to give; --dim and --shape still decide."""
    teacher = _token_teacher(tmp_path / "tokens.onnx")
    default = api.plan(teacher, _options(mode="svd"))
    proj = next(c for c in default.candidates if c.node == "proj")
    assert proj.flops_before == 2 * SEQUENCE_LEN * 32 * 64
    assert json.loads(default.to_json())["options"]["shapes"] == {"input_ids": [1, SEQUENCE_LEN]}
    assert any(f"input_ids=1x{SEQUENCE_LEN}" in w and "--shape input_ids=1xL" in w for w in default.warnings)
    dim = api.plan(teacher, _options(mode="svd", dims={"sequence": 16}))
    assert next(c for c in dim.candidates if c.node == "proj").flops_before == 2 * 16 * 32 * 64
    shaped = api.plan(teacher, _options(mode="svd", shapes={"input_ids": [1, 40]}))
    assert next(c for c in shaped.candidates if c.node == "proj").flops_before == 2 * 40 * 32 * 64
    assert not any("--shape" in w for w in dim.warnings + shaped.warnings)


def test_a_sequence_the_model_cannot_run_at_128_stays_per_token_and_says_so(tmp_path: Path) -> None:
    """64 learned positions: ONNX Runtime cannot run it at 128 tokens; shape inference takes the length from the
    position table, so the fallback counts the 64 tokens the model can run."""
    teacher = _token_teacher(tmp_path / "short.onnx", positions=64)
    p = api.plan(teacher, _options(mode="svd"))
    assert next(c for c in p.candidates if c.node == "proj").flops_before == 2 * 64 * 32 * 64
    assert json.loads(p.to_json())["options"]["shapes"] == {}
    assert any(f"cannot run the model at input_ids=1x{SEQUENCE_LEN}" in w and "per token" in w for w in p.warnings)


def test_convs_behind_a_shape_driven_reshape_count_their_real_pixels(tmp_path: Path) -> None:
    """Without --shape, a model whose only free dim is its batch is counted at batch 1 by running it once, so
    a conv behind a Reshape that inference leaves open counts its 256 rows, not one (CREPE's plan printed
    971k FLOPs for 73.6M). Its plan records no shape: the basis (free dims at 1) is the same."""
    teacher = _frames_teacher(tmp_path / "frames.onnx")
    default = api.plan(teacher, _options(mode="svd"))
    given = api.plan(teacher, _options(mode="svd", shapes={"x": [1, 256]}))
    conv2 = next(c for c in default.candidates if c.node == "conv2")
    assert conv2.flops_before == 2 * 64 * 64 * 8 * 256
    assert [(c.node, c.flops_before, c.rank, c.decision) for c in default.candidates] == [
        (c.node, c.flops_before, c.rank, c.decision) for c in given.candidates]
    assert json.loads(default.to_json())["options"]["shapes"] == {}
    assert not any("--shape" in w for w in default.warnings)


def test_an_image_that_cannot_be_224_wide_stays_per_pixel_and_says_so(tmp_path: Path) -> None:
    """When the model does not run at the assumed width (here it adds a constant 40 columns wide), the plan
    falls back to the per-pixel basis and says that this says nothing about speed: no error, no guess."""
    model = onnx.load(str(width_conv_teacher(tmp_path / "t.onnx")))
    model.graph.node[0].input[0] = "x40"
    model.graph.node.insert(0, onnx.helper.make_node("Add", ["x", "cols"], ["x40"], name="fixed_width"))
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros((1, 1, 1, 40), np.float32), "cols"))
    onnx.save(model, str(tmp_path / "w40.onnx"))
    p = api.plan(tmp_path / "w40.onnx", _options())
    assert json.loads(p.to_json())["options"]["shapes"] == {}
    assert any("cannot run the model at x=1x3x48x224" in w and "per pixel" in w for w in p.warnings), p.warnings
    assert _flops(p, "Conv") == _flops(api.plan(tmp_path / "w40.onnx", _options(shapes={"x": [1, 3, 48, 1]})),
                                       "Conv")


def test_a_channels_last_image_is_planned_at_224_too(tmp_path: Path) -> None:
    """Keras and TF export images as `[N, H, W, C]` (MTCNN's P-Net: `[N, M1, M2, 3]`, which cannot run at
    one pixel): the free sides are taken as 224 there too, and the hint keeps that layout."""
    rng = np.random.default_rng(0)
    nodes = [onnx.helper.make_node("Transpose", ["x"], ["nchw"], name="to_nchw", perm=[0, 3, 1, 2]),
             onnx.helper.make_node("Conv", ["nchw", "w"], ["y"], name="conv", kernel_shape=[3, 3])]
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", "H", "W", 3])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 64, "h", "w"])
    w = onnx.numpy_helper.from_array(rng.standard_normal((64, 3, 3, 3)).astype(np.float32), "w")
    graph = onnx.helper.make_graph(nodes, "nhwc", [x], [y], [w])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), str(tmp_path / "t.onnx"))
    p = api.plan(tmp_path / "t.onnx", _options())
    assert json.loads(p.to_json())["options"]["shapes"] == {"x": [1, IMAGE_SIDE, IMAGE_SIDE, 3]}
    assert any("--shape x=1xHxWx3" in w for w in p.warnings), p.warnings
    assert p.candidates[0].flops_before == 2 * 64 * 27 * (IMAGE_SIDE - 2) ** 2


def test_shape_fixes_named_dims_too(models: dict[str, Path]) -> None:
    batch4 = api.plan(models["teacher"], _options(shapes={"x": [4, 3, 48, 8]}))
    batch1 = api.plan(models["teacher"], _options(shapes={"x": [1, 3, 48, 8]}))
    assert _flops(batch4) == 4 * _flops(batch1)


def test_student_does_not_depend_on_the_counted_shape(models: dict[str, Path], tmp_path: Path) -> None:
    """The shape only changes what is counted: an svd student is byte-identical with and without it, and a
    headed student planned at W=320 still runs at any width."""
    plain, shaped = tmp_path / "plain.onnx", tmp_path / "shaped.onnx"
    svd = dict(mode="svd", policy=parse_policy(param_ratio=0.5), rank_multiple=1)
    api.compress(models["teacher"], plain, Options(**svd))  # type: ignore[arg-type]
    api.compress(models["teacher"], shaped, Options(**svd, shapes={"x": SHAPE}))  # type: ignore[arg-type]
    assert _sha(plain) == _sha(shaped)
    heads = tmp_path / "heads.onnx"
    result = api.compress(models["teacher"], heads, _options(shapes={"x": SHAPE}), verify=True)
    assert result.verification is not None and result.verification.ok
    assert any(c.heads > 1 for c in result.plan.candidates if c.decision == "factorize")
    x = np.random.default_rng(1).standard_normal((2, 3, 48, 37)).astype(np.float32)
    assert ort_run(heads, {"x": x})[0].shape == ort_run(models["teacher"], {"x": x})[0].shape == (2, 37, 10)


def test_compress_plan_counts_at_the_plans_shape(models: dict[str, Path], tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    result = CliRunner().invoke(main, ["plan", str(models["teacher"]), "-o", str(plan), "--mode", "svd",
                                       "--shape", "x=1x3x48x320"])
    assert result.exit_code == 0, result.output
    written = api.compress(models["teacher"], tmp_path / "s.onnx", Options(mode="svd"), plan_path=plan)
    totals, planned = written.plan.totals(), json.loads(plan.read_text())["totals"]
    assert totals["flops_after"] == planned["flops_after"] and totals["flops_before"] == planned["flops_before"]


def test_bench_at_given_shapes(models: dict[str, Path]) -> None:
    """--shape fixes the shape (the report records it); --batch, when given, replaces its batch axis;
    --inputs benchmarks the .npz as it is. FLOPs of the baseline at W=320 are 320 times those at W=1."""
    pair = [models["teacher"], models["student"]]
    doc = bench(pair, shapes={"x": SHAPE}, iters=2, warmup=0, threads=1).to_dict()
    assert doc["settings"]["shapes"] == {"x": SHAPE}
    assert [p["inputs"] for p in doc["points"]] == [{"x": SHAPE}]
    narrow = bench(pair[:1], shapes={"x": [1, 3, 48, 1]}, iters=2, warmup=0, threads=1).to_dict()
    assert doc["points"][0]["results"][0]["flops"] == 320 * narrow["points"][0]["results"][0]["flops"]
    batched = bench(pair, shapes={"x": SHAPE}, batches=[1, 2], iters=2, warmup=0, threads=1).to_dict()
    assert sorted(p["inputs"]["x"][0] for p in batched["points"]) == [1, 2]
    assert {p["batch"]: p["inputs"]["x"][1:] for p in batched["points"]} == {1: SHAPE[1:], 2: SHAPE[1:]}
    fed = bench(pair, inputs=models["inputs"], iters=2, warmup=0, threads=1).to_dict()
    assert fed["settings"]["inputs"] == str(models["inputs"])
    assert [p["inputs"] for p in fed["points"]] == [{"x": [1, 3, 48, 40]}]


def test_plan_target_times_layers_at_the_real_shape(models: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    monkeypatch.setenv("ONNX_INHER_CACHE", str(tmp_path / "cache"))
    planned = api.plan(models["teacher"], _options(mode="svd", shapes={"x": [1, 3, 48, 24]}), target="cpu")
    conv2 = next(c for c in planned.candidates if c.node == "conv2")
    assert "at input 1x32x48x24" in (conv2.reason or conv2.note or "")


def test_verify_at_a_shape(models: dict[str, Path]) -> None:
    result = CliRunner().invoke(main, ["verify", str(models["teacher"]), str(models["student"]),
                                       "--shape", "x=2x3x48x33", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["outputs"][0]["shape"] == [2, 33, 10]


def _bad_cases(m: dict[str, Path]) -> dict[str, tuple[list[str], str]]:
    t, s, npz = str(m["teacher"]), str(m["student"]), str(m["inputs"])
    return {
        "fixed dim": (["bench", t, "--shape", "x=1x3x32x320"], "axis 2 is fixed at 48"),
        "rank": (["bench", t, "--shape", "x=1x3x320"], "input 'x' is given 3 dims"),
        "unknown input": (["bench", t, "--shape", "y=1x3x48x320"], "no input 'y'"),
        "zero dim": (["bench", t, "--shape", "x=1x3x48x0"], "positive dims"),
        "not a shape": (["bench", t, "--shape", "x"], "NAME=DxDx"),
        "twice": (["bench", t, "--shape", "x=1x3x48x8", "--shape", "x=1x3x48x9"], "given twice"),
        "with seq-len": (["bench", t, "--shape", "x=1x3x48x8", "--seq-len", "8"], "drop --seq-len"),
        "inputs and batch": (["bench", t, "--inputs", npz, "--batch", "2"], "drop --batch"),
        "inputs and shape": (["bench", t, "--inputs", npz, "--shape", "x=1x3x48x8"], "not both"),
        "plan fixed dim": (["plan", t, "-o", str(m["dir"] / "p.json"), "--shape", "x=1x3x47x8"], "use 48 there"),
        "inspect dim clash": (["inspect", t, "--shape", "x=2x3x48x8", "--dim", "N=4"], "--dim N=4 contradicts"),
        "verify both": (["verify", t, s, "--inputs", npz, "--shape", "x=1x3x48x8"], "not both"),
        "verify rank": (["verify", t, s, "--shape", "x=1x3x48"], "input 'x' is given 3 dims"),
    }


@pytest.mark.parametrize("case", list(_bad_cases({"teacher": Path(), "student": Path(), "inputs": Path(),
                                                  "dir": Path()})))
def test_bad_shapes_exit_2_with_one_line(models: dict[str, Path], case: str) -> None:
    args, expected = _bad_cases(models)[case]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(PREFIX) and expected in lines[0], result.stderr
    assert result.stdout == ""
    assert not (models["dir"] / "p.json").exists()


def test_bad_npz_shape_names_the_file(models: dict[str, Path]) -> None:
    bad = models["dir"] / "bad.npz"
    np.savez(bad, x=np.zeros((1, 3, 40, 8), np.float32))
    result = CliRunner().invoke(main, ["bench", str(models["teacher"]), "--inputs", str(bad)])
    assert result.exit_code == 2
    assert str(bad) in result.stderr and "fixed at 48" in result.stderr


def _cli() -> list[str]:
    exe = Path(sys.executable).with_name("onnx-inher")
    return [str(exe)] if exe.is_file() else [sys.executable, "-c", "from onnx_inher.cli import main; main()"]


@pytest.mark.cli
def test_bench_shape_through_the_entry_point(models: dict[str, Path]) -> None:
    env = {k: v for k, v in os.environ.items() if k != "ONNX_INHER_DEBUG"}
    args = [*_cli(), "bench", str(models["teacher"]), str(models["student"]), "--shape", "x=1x3x48x320", *QUICK]
    done = subprocess.run([*args, "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["settings"]["shapes"] == {"x": SHAPE} and doc["points"][0]["inputs"] == {"x": SHAPE}
    shown = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert shown.returncode == 0 and "x=1x3x48x320" in shown.stdout
    bad = subprocess.run([*_cli(), "bench", str(models["teacher"]), "--shape", "x=1x3x32x320"], capture_output=True,
                         text=True, env=env, timeout=300)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == [f"{PREFIX} --shape: input 'x' is given 1x3x32x320, but its axis 2 is "
                                               "fixed at 48 in the model (Nx3x48x?); use 48 there."]


def test_run_takes_the_shapes_from_its_data(models: dict[str, Path], tmp_path: Path) -> None:
    """FLOPs, sample inputs and the bench of `run` are at one sample of --data (batch 1), recorded in plan.json."""
    data = tmp_path / "data.npz"
    np.savez(data, x=np.random.default_rng(2).standard_normal((16, 3, 48, 24)).astype(np.float32))
    folder = tmp_path / "run"
    result = CliRunner().invoke(main, ["run", str(models["teacher"]), "--data", str(data), "-o", str(folder),
                                       "--mode", "svd", "--steps", "2", "--batch-size", "4", "--val-fraction", "0.25",
                                       "--batch", "1,2", "--iters", "2", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads((folder / "plan.json").read_text())
    assert plan["options"]["shapes"] == {"x": [1, 3, 48, 24]}
    at_one = api.plan(models["teacher"], Options(mode="svd", shapes={"x": [1, 3, 48, 1]}))
    assert plan["totals"]["flops_before"] == 24 * at_one.totals()["flops_before"]
    points = json.loads((folder / "bench.json").read_text())["points"]
    assert sorted(tuple(p["inputs"]["x"]) for p in points) == [(1, 3, 48, 24), (2, 3, 48, 24)]


@pytest.mark.parametrize("dims,expected", [
    (["N", 3, "H", "W"], (1, 3, 224, 224)),
    (["N", 3, 48, None], (1, 3, 48, 224)),
    (["N", "H", "W", 3], (1, 224, 224, 3)),
    (["N", 3, 32, 32], None),             # nothing free
    (["N", 1, 1, "seq"], None),           # an attention mask, not an image
    (["N", "seq", "hidden"], None),       # not 4-D
])
def test_which_inputs_are_images(dims: list, expected: tuple | None) -> None:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, dims)
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 64, None, None])
    model = onnx.helper.make_model(onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g",
                                                          [x], [y]))
    assert image_defaults(model, {}).get("x") == expected
    assert image_defaults(model, {"x": [1] * len(dims)}) == {}  # a --shape wins
