"""Malformed input, through the real CLI: every case exits 2 with one actionable line and touches nothing.

For each case we check: exit code 2; stdout empty and exactly one stderr line starting with
``onnx-inher: error:`` that contains the offending file, node or option and a hint of what to do; no
``Traceback``; no file (student, ``.data`` file, ``.onnx-inher-*`` temporary) written anywhere under the
test folder; and every input byte-identical afterwards. Click's own usage errors (unknown option, bad
choice) keep click's format, but must still exit 2 and leave nothing behind.

The models are built here with ``onnx.helper`` (Conv -> Relu -> GlobalAveragePool -> Flatten -> MatMul,
about 6 KB), so the whole file runs in a few seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnx_inher.cli import main

PREFIX = "onnx-inher: error:"


# --------------------------------------------------------------------------- fixtures


def build_model(seed: int = 0, opset: int = 17, nan_conv: bool = False, inf_matmul: bool = False) -> onnx.ModelProto:
    """A valid Conv + MatMul teacher: x[N,8,6,6] -> conv1 (16x8x3x3) -> relu -> pool -> flat -> fc (16x12)."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
    b1 = rng.standard_normal(16).astype(np.float32)
    w2 = rng.standard_normal((16, 12)).astype(np.float32)
    if nan_conv:
        w1[3, 2, 1, 1] = np.nan
    if inf_matmul:
        w2[5, 7] = np.inf
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("MatMul", ["f", "w2"], ["y"], name="fc"),
    ]
    graph = helper.make_graph(
        nodes, "teacher",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 12])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1"), numpy_helper.from_array(w2, "w2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def two_node_model(nodes: list[onnx.NodeProto]) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def save_external(model: onnx.ModelProto, path: Path, location: str) -> Path:
    """Write `model` with every initializer in one external file at `location` (relative to the model)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    blob = bytearray()
    for t in m.graph.initializer:
        raw = t.raw_data
        offset = len(blob)
        blob += raw
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        del t.external_data[:]
        for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(raw)))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
    path.write_bytes(m.SerializeToString())
    data = path.parent / location
    data.write_bytes(bytes(blob))
    return data


def invoke(args: list[str]):
    try:
        runner = CliRunner(mix_stderr=False)  # click < 8.2
    except TypeError:
        runner = CliRunner()
    return runner.invoke(main, args, catch_exceptions=False)


@dataclass
class Run:
    args: list[str]
    expect: list[str]  # substrings of the error line: the offending file/node/option and the hint
    usage: bool = False  # a click usage error (click's own format)
    watch: list[Path] = field(default_factory=list)  # folders outside tmp_path to check for leftovers


class Workspace:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.src = root / "in"
        self.out = root / "out"
        self.src.mkdir()
        self.out.mkdir()

    def model(self, name: str = "model.onnx", **kw) -> Path:
        path = self.src / name
        onnx.save_model(build_model(**kw), str(path))
        return path

    def write(self, name: str, data: bytes | str) -> Path:
        path = self.src / name
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path

    def plan(self, model: Path, name: str = "plan.json") -> Path:
        path = self.src / name
        r = invoke(["plan", str(model), "-o", str(path), "--rank", "4", "--no-guard", "--rank-multiple", "1",
                    "--heads", "1"])
        assert r.exit_code == 0, r.stderr
        return path

    def student(self, name: str = "student.onnx") -> str:
        return str(self.out / name)


def snapshot(root: Path) -> dict[str, str | None]:
    """Every path under root with its sha256 (None for folders)."""
    out: dict[str, str | None] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = None if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def listing(folder: Path) -> set[str]:
    try:
        return set(os.listdir(folder))
    except OSError:
        return set()


# --------------------------------------------------------------------------- cases


def c_missing_file(ws: Workspace) -> Run:
    return Run(["inspect", str(ws.src / "missing.onnx")], ["missing.onnx", "no such file", "check the path"])


def c_directory(ws: Workspace) -> Run:
    (ws.src / "model_dir").mkdir()
    return Run(["inspect", str(ws.src / "model_dir")], ["model_dir", "is a directory", "pass the .onnx file"])


def c_empty_file(ws: Workspace) -> Run:
    p = ws.write("empty.onnx", b"")
    return Run(["compress", str(p), "-o", ws.student()], ["empty.onnx", "empty", "re-export"])


def c_truncated_protobuf(ws: Workspace) -> Run:
    raw = build_model().SerializeToString()
    p = ws.write("truncated.onnx", raw[: len(raw) // 2])
    return Run(["compress", str(p), "-o", ws.student()], ["truncated.onnx", "not a valid ONNX", "re-export"])


def c_text_file(ws: Workspace) -> Run:
    p = ws.write("notes.onnx", "this is a README, not a model\nsecond line\n")
    return Run(["inspect", str(p)], ["notes.onnx", "not a valid ONNX", "re-export"])


def c_random_bytes(ws: Workspace) -> Run:
    p = ws.write("random.onnx", np.random.default_rng(7).bytes(4096))
    return Run(["compress", str(p), "-o", ws.student()], ["random.onnx", "not a valid ONNX", "re-export"])


def c_external_data_missing(ws: Workspace) -> Run:
    p = ws.src / "model.onnx"
    save_external(build_model(), p, "model.onnx.data").unlink()
    return Run(["compress", str(p), "-o", ws.student()], ["model.onnx", "'model.onnx.data'", "missing", "copy it"])


def c_external_data_escapes(ws: Workspace) -> Run:
    p = ws.src / "model.onnx"
    save_external(build_model(), p, "../secret.bin")  # the file exists: we must refuse to read it anyway
    return Run(["compress", str(p), "-o", ws.student()],
               ["model.onnx", "'../secret.bin'", "outside the model's folder", "next to the model"])


def c_external_data_truncated(ws: Workspace) -> Run:
    p = ws.src / "model.onnx"
    data = save_external(build_model(), p, "model.onnx.data")
    data.write_bytes(data.read_bytes()[:1000])
    return Run(["compress", str(p), "-o", ws.student()], ["model.onnx", "'model.onnx.data'", "truncated", "re-export"])


def c_opset_too_old(ws: Workspace) -> Run:
    p = ws.model(opset=3)
    return Run(["compress", str(p), "-o", ws.student()], ["model.onnx", "opset 3", "convert_version"])


def c_opset_too_new(ws: Workspace) -> Run:
    newer = onnx.defs.onnx_opset_version() + 1
    p = ws.model(opset=newer)
    return Run(["inspect", str(p)], ["model.onnx", f"opset {newer}", "convert_version"])


def c_cycle(ws: Workspace) -> Run:
    m = two_node_model([helper.make_node("Add", ["x", "b"], ["y"], name="add_a"),
                        helper.make_node("Relu", ["y"], ["b"], name="relu_b")])
    p = ws.src / "cycle.onnx"
    onnx.save_model(m, str(p))
    return Run(["compress", str(p), "-o", ws.student()], ["cycle.onnx", "cycle", "'add_a'", "relu_b", "re-export"])


def c_unsorted_nodes(ws: Workspace) -> Run:
    m = two_node_model([helper.make_node("Relu", ["a"], ["y"], name="relu_late"),
                        helper.make_node("Neg", ["x"], ["a"], name="neg_first")])
    p = ws.src / "unsorted.onnx"
    onnx.save_model(m, str(p))
    return Run(["inspect", str(p)], ["unsorted.onnx", "'relu_late'", "'neg_first'", "topologically sorted"])


def c_nan_conv_weight(ws: Workspace) -> Run:
    p = ws.model(nan_conv=True)
    return Run(["compress", str(p), "-o", ws.student()], ["'conv1'", "'w1'", "NaN or Inf", "fix or retrain"])


def c_inf_matmul_weight(ws: Workspace) -> Run:
    p = ws.model(inf_matmul=True)
    return Run(["plan", str(p), "-o", str(ws.out / "plan.json")], ["'fc'", "'w2'", "NaN or Inf", "fix or retrain"])


def c_unwritable_folder(ws: Workspace) -> Run:
    p = ws.model()
    ws.out.chmod(0o500)
    folder, watch = ws.out, []
    if os.access(ws.out, os.W_OK):  # root writes through 0o500: use a folder nobody can create files in
        folder, watch = Path("/proc"), [Path("/proc")]
    return Run(["compress", str(p), "-o", str(folder / "student.onnx"), "--rank", "4", "--no-guard"],
               [str(folder / "student.onnx"), "not writable", "choose another -o path"], watch=watch)


def c_output_under_a_file(ws: Workspace) -> Run:
    p = ws.model()
    (ws.out / "somefile.onnx").write_bytes(b"not a folder")
    target = ws.out / "somefile.onnx" / "student.onnx"
    return Run(["compress", str(p), "-o", str(target)], ["somefile.onnx", "not a folder", "choose another -o path"])


def c_output_is_input(ws: Workspace) -> Run:
    p = ws.model()
    return Run(["compress", str(p), "-o", str(p), "--rank", "4", "--no-guard"],
               ["model.onnx", "would overwrite the input", "choose another -o path"])


def c_plan_output_is_input(ws: Workspace) -> Run:
    p = ws.model()
    return Run(["plan", str(p), "-o", str(p)], ["model.onnx", "would overwrite the input", "choose another -o path"])


def c_output_is_input_data_file(ws: Workspace) -> Run:
    p = ws.src / "model.onnx"
    data = save_external(build_model(), p, "model.onnx.data")
    return Run(["compress", str(p), "-o", str(data), "--rank", "4", "--no-guard"],
               ["model.onnx.data", "would overwrite the input", "choose another -o path"])


def c_output_is_input_custom_data_file(ws: Workspace) -> Run:
    p = ws.src / "model.onnx"
    data = save_external(build_model(), p, "weights.bin")  # not named <model>.data: found by reading the model
    return Run(["compress", str(p), "-o", str(data), "--rank", "4", "--no-guard"],
               ["weights.bin", "would overwrite the input", "choose another -o path"])


def c_output_is_plan_file(ws: Workspace) -> Run:
    p = ws.model()
    plan = ws.plan(p)
    return Run(["compress", str(p), "-o", str(plan), "--plan", str(plan)],
               ["plan.json", "would overwrite the input", "choose another -o path"])


def c_output_is_inputs_file(ws: Workspace) -> Run:
    npz = ws.src / "inputs.npz"
    np.savez(npz, x=np.zeros((1, 8, 6, 6), np.float32))
    return Run(["compress", str(ws.model()), "-o", str(npz), "--rank", "4", "--no-guard", "--verify",
                "--inputs", str(npz)], ["inputs.npz", "would overwrite the input", "choose another -o path"])


def c_output_folder_missing(ws: Workspace) -> Run:
    p = ws.model()
    return Run(["compress", str(p), "-o", str(ws.out / "nowhere" / "student.onnx")],
               ["nowhere", "does not exist", "create it first"])


def c_rank_above_full_rank(ws: Workspace) -> Run:
    p = ws.model()
    return Run(["compress", str(p), "-o", ws.student(), "--rank", "100"],
               ["--rank 100", "full rank", "largest is 16", "choose a smaller rank"])


def c_rank_zero(ws: Workspace) -> Run:
    return Run(["compress", str(ws.model()), "-o", ws.student(), "--rank", "0"], ["--rank", "positive integer"])


def c_param_ratio_negative(ws: Workspace) -> Run:
    return Run(["inspect", str(ws.model()), "--param-ratio", "-0.5"], ["--param-ratio", "must be in (0, 1]"])


def c_param_ratio_above_one(ws: Workspace) -> Run:
    return Run(["compress", str(ws.model()), "-o", ws.student(), "--param-ratio", "1.5"],
               ["--param-ratio", "must be in (0, 1]"])


def c_energy_zero(ws: Workspace) -> Run:
    return Run(["compress", str(ws.model()), "-o", ws.student(), "--energy", "0"], ["--energy", "must be in (0, 1]"])


def c_rank_ratio_two(ws: Workspace) -> Run:
    return Run(["plan", str(ws.model()), "-o", str(ws.out / "plan.json"), "--rank-ratio", "2"],
               ["--rank-ratio", "must be in (0, 1]"])


def c_two_policies(ws: Workspace) -> Run:
    return Run(["compress", str(ws.model()), "-o", ws.student(), "--rank", "4", "--energy", "0.9"],
               ["choose one rank policy", "--rank", "--energy"])


def c_heads_zero(ws: Workspace) -> Run:
    return Run(["compress", str(ws.model()), "-o", ws.student(), "--heads", "0"], ["--heads", ">= 1"])


def c_bad_include_regex(ws: Workspace) -> Run:
    return Run(["compress", str(ws.model()), "-o", ws.student(), "--include", "conv(["], ["regex 'conv(['"])


def c_dim_without_value(ws: Workspace) -> Run:
    return Run(["compress", str(ws.model()), "-o", ws.student(), "--dim", "N"],
               ["--dim", "'N'", "NAME=POSITIVE_INT"])


def c_dim_zero(ws: Workspace) -> Run:
    return Run(["verify", str(ws.model()), str(ws.model("other.onnx")), "--dim", "N=0"],
               ["--dim", "'N=0'", "NAME=POSITIVE_INT"])


def c_plan_not_json(ws: Workspace) -> Run:
    plan = ws.write("plan.json", "{ this is not json")
    return Run(["compress", str(ws.model()), "-o", ws.student(), "--plan", str(plan)],
               ["plan.json", "not a valid onnx-inher plan", "regenerate"])


def c_plan_file_missing(ws: Workspace) -> Run:
    return Run(["compress", str(ws.model()), "-o", ws.student(), "--plan", str(ws.src / "noplan.json")],
               ["noplan.json", "not found", "onnx-inher plan"])


def c_plan_for_another_model(ws: Workspace) -> Run:
    plan = ws.plan(ws.model("other.onnx", seed=1))
    return Run(["compress", str(ws.model()), "-o", ws.student(), "--plan", str(plan)],
               ["plan.json", "another model", "regenerate"])


def c_plan_rank_above_full_rank(ws: Workspace) -> Run:
    p = ws.model()
    plan = ws.plan(p)
    doc = json.loads(plan.read_text())
    fc = next(c for c in doc["candidates"] if c["node"] == "fc")
    assert fc["decision"] == "factorize"
    fc["rank"] = 99
    plan.write_text(json.dumps(doc, indent=2))
    return Run(["compress", str(p), "-o", ws.student(), "--plan", str(plan)],
               ["'fc'", "rank 99", "1..12", "full rank"])


def c_inputs_wrong_names(ws: Workspace) -> Run:
    npz = ws.src / "inputs.npz"
    np.savez(npz, pixels=np.zeros((1, 8, 6, 6), np.float32))
    return Run(["compress", str(ws.model()), "-o", ws.student(), "--rank", "4", "--no-guard", "--verify",
                "--inputs", str(npz)], ["inputs.npz", "['x']", "pixels"])


def c_verify_student_missing(ws: Workspace) -> Run:
    return Run(["verify", str(ws.model()), str(ws.out / "student.onnx")], ["student.onnx", "no such file"])


def c_unknown_mode(ws: Workspace) -> Run:
    return Run(["compress", str(ws.model()), "-o", ws.student(), "--mode", "tucker"], ["--mode", "tucker"], usage=True)


def c_unknown_option(ws: Workspace) -> Run:
    return Run(["compress", str(ws.model()), "-o", ws.student(), "--ranks", "4"], ["--ranks"], usage=True)


def c_rank_not_an_int(ws: Workspace) -> Run:
    return Run(["compress", str(ws.model()), "-o", ws.student(), "--rank", "four"], ["--rank", "four"], usage=True)


CASES: dict[str, Callable[[Workspace], Run]] = {
    name[2:]: fn for name, fn in sorted(globals().items()) if name.startswith("c_") and callable(fn)
}


# --------------------------------------------------------------------------- checks


def check(ws: Workspace, run: Run, exit_code: int, stdout: str, stderr: str, before: dict,
          watched: dict[Path, set[str]]) -> None:
    assert "Traceback" not in stdout + stderr, stderr
    assert exit_code == 2, f"exit {exit_code}\nstdout: {stdout}\nstderr: {stderr}"
    if run.usage:
        assert "Error:" in stderr, stderr
        for text in run.expect:
            assert text in stderr, f"{text!r} not in {stderr!r}"
    else:
        assert stdout == "", stdout
        assert stderr.startswith(PREFIX), stderr
        assert stderr.endswith("\n") and stderr.count("\n") == 1, f"not one line: {stderr!r}"
        for text in run.expect:
            assert text in stderr, f"{text!r} not in {stderr!r}"
    after = snapshot(ws.root)
    assert after == before, f"files changed: {set(after.items()) ^ set(before.items())}"
    assert listing(ws.out) == {n[4:] for n in before if n.startswith("out/") and "/" not in n[4:]}
    for folder, names in watched.items():  # e.g. /proc, whose other entries come and go
        ours = [n for n in listing(folder) - names if n.startswith((".onnx-inher-", "student"))]
        assert not ours, f"left in {folder}: {ours}"


@pytest.fixture
def ws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("ONNX_INHER_DEBUG", raising=False)
    w = Workspace(tmp_path)
    yield w
    w.out.chmod(0o755)


def _prepare(ws: Workspace, name: str) -> tuple[Run, dict, dict[Path, set[str]]]:
    run = CASES[name](ws)
    return run, snapshot(ws.root), {f: listing(f) for f in run.watch}


def test_enough_cases() -> None:
    assert len(CASES) >= 22


def test_fixtures_are_valid(ws: Workspace) -> None:
    """The defects, not the fixtures, cause the errors: the clean models compress (inline and external)."""
    plain = ws.model()
    ext = ws.src / "ext.onnx"
    save_external(build_model(), ext, "ext.onnx.data")
    for src, out in ((plain, ws.out / "a.onnx"), (ext, ws.out / "b.onnx")):
        r = invoke(["compress", str(src), "-o", str(out), "--rank", "4", "--no-guard", "--rank-multiple", "1"])
        assert r.exit_code == 0, r.stderr
        assert out.is_file()


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(ws: Workspace, name: str) -> None:
    run, before, watched = _prepare(ws, name)
    r = invoke(run.args)
    check(ws, run, r.exit_code, r.stdout, r.stderr, before, watched)


def _cli() -> list[str]:
    exe = Path(sys.executable).with_name("onnx-inher")
    return [str(exe)] if exe.is_file() else [sys.executable, "-c", "from onnx_inher.cli import main; main()"]


@pytest.mark.cli
@pytest.mark.parametrize("name", ["truncated_protobuf", "nan_conv_weight", "unknown_mode"])
def test_bad_input_subprocess(ws: Workspace, name: str) -> None:
    """The installed entry point in a fresh process: real exit status, nothing but one line on stderr."""
    run, before, watched = _prepare(ws, name)
    env = {k: v for k, v in os.environ.items() if k != "ONNX_INHER_DEBUG"}
    proc = subprocess.run([*_cli(), *run.args], capture_output=True, text=True, env=env, timeout=120)
    check(ws, run, proc.returncode, proc.stdout, proc.stderr, before, watched)
