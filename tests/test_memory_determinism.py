"""`compress` output does not depend on BLAS threading, and saving never holds a second model copy.

* A threaded LAPACK eigensolver (and some float32 products) give different low bits with 1 and 2
  threads, so before `svd` pinned BLAS to one thread the student's bytes depended on the core count.
  The test compresses the same model in two fresh interpreters whose BLAS pools are set to 1 and 2
  threads (the variables OpenBLAS reads when numpy loads) and compares the files byte for byte.
* `save_model` streams the graph element by element; it must write exactly what
  `SerializeToString(deterministic=True)` writes, and leave the caller's model as it was.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_inher.ir.io import load_model, save_model

pytestmark = pytest.mark.cli  # fresh Python processes

HIDDEN = 384  # large enough for OpenBLAS to use its threads in the 384 x 384 eigensolver


def _mlp(path: Path) -> Path:
    """x -> MatMul(W1) -> Relu -> MatMul(W2) -> y, with random dense weights (full spectrum)."""
    rng = np.random.default_rng(7)
    w1 = rng.standard_normal((HIDDEN, 2 * HIDDEN)).astype(np.float32)
    w2 = rng.standard_normal((2 * HIDDEN, HIDDEN)).astype(np.float32)
    b = rng.standard_normal(2 * HIDDEN).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
         helper.make_node("Add", ["h", "b"], ["hb"], name="fc1_bias"),
         helper.make_node("Relu", ["hb"], ["a"], name="act"),
         helper.make_node("MatMul", ["a", "w2"], ["y"], name="fc2")],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8, HIDDEN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8, HIDDEN])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b, "b"), numpy_helper.from_array(w2, "w2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


def _compress_with_threads(teacher: Path, out: Path, threads: int, mode: str) -> str:
    env = dict(os.environ, ONNX_INHER_QUIET="1")
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    code = ("import sys; from onnx_inher import api; from onnx_inher.planning.plan import Options; "
            "api.compress(sys.argv[1], sys.argv[2], Options(mode=sys.argv[3]))")
    subprocess.run([sys.executable, "-c", code, str(teacher), str(out), mode], env=env, check=True)
    return hashlib.sha256(out.read_bytes()).hexdigest()


@pytest.mark.parametrize("mode", ["inher", "svd"])
def test_student_bytes_do_not_depend_on_blas_threads(tmp_path: Path, mode: str) -> None:
    teacher = _mlp(tmp_path / "mlp.onnx")
    one = _compress_with_threads(teacher, tmp_path / "one.onnx", 1, mode)
    two = _compress_with_threads(teacher, tmp_path / "two.onnx", 2, mode)
    assert one == two
    student = onnx.load(str(tmp_path / "one.onnx"))
    assert any(n.name.startswith("fc1/") for n in student.graph.node), "nothing was factorised"


def _with_constant_node(path: Path) -> Path:
    """A model whose weights sit in a Constant node, an initializer stored as float_data (not raw), a
    1.2 MiB initializer (written in pieces), metadata and a doc string: every graph field the streaming
    writer must place."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    big = numpy_helper.from_array(rng.standard_normal((600, 512)).astype(np.float32), "big")
    big.doc_string = "a field after raw_data"
    bias = helper.make_tensor("bias", TensorProto.FLOAT, [32], rng.standard_normal(32).astype(np.float32).tolist())
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["w"], name="const", value=numpy_helper.from_array(w, "w_value")),
         helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
         helper.make_node("Add", ["h", "bias"], ["y"], name="add")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 32])],
        [bias, big],
        doc_string="streamed",
        value_info=[helper.make_tensor_value_info("h", TensorProto.FLOAT, [2, 32])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="test")
    helper.set_model_props(model, {"k": "v"})
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("external", [False, True])
def test_streamed_save_is_protobufs_bytes_and_leaves_the_model_alone(tmp_path: Path, external: bool) -> None:
    model = load_model(_with_constant_node(tmp_path / "m.onnx")).model
    before = model.SerializeToString(deterministic=True)
    files = save_model(model, tmp_path / "out.onnx", external_data=external)
    assert model.SerializeToString(deterministic=True) == before
    if not external:
        assert files == [tmp_path / "out.onnx"]
        assert (tmp_path / "out.onnx").read_bytes() == before
        return
    # every tensor of >= 1 KiB moved (the Constant's 8 KiB and `big`), the small float_data bias
    # converted to raw_data and kept inline
    written = onnx.load(str(tmp_path / "out.onnx"), load_external_data=False)
    tensors = [written.graph.node[0].attribute[0].t, *written.graph.initializer]
    assert [t.data_location == TensorProto.EXTERNAL for t in tensors] == [True, False, True]
    assert written.graph.initializer[0].HasField("raw_data")
    reloaded = load_model(tmp_path / "out.onnx").model
    np.testing.assert_array_equal(numpy_helper.to_array(reloaded.graph.node[0].attribute[0].t),
                                  numpy_helper.to_array(model.graph.node[0].attribute[0].t))
    for i in range(2):
        np.testing.assert_array_equal(numpy_helper.to_array(reloaded.graph.initializer[i]),
                                      numpy_helper.to_array(model.graph.initializer[i]))


def test_one_eigensolve_gives_the_plan_and_every_rank_cut(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A plan's singular values and a compress's factors come from one eigendecomposition per weight:
    `values` keeps the leading eigenvectors (up to a quarter of the weight's size, within `TOP_BYTES`) and
    every rank's factors are the same bytes as the first columns of a full SVD. Without `remember` a
    weight's vectors go once it is factorised; with it (the latency check's rebuilds) they stay."""
    from onnx_inher import api
    from onnx_inher.planning import plan as planning
    from onnx_inher.planning.svd import full_svd

    a = api.analyze(_mlp(tmp_path / "mlp.onnx"))
    view = a.views["fc1"]  # [1, 768, 384]: 1.1 MiB, past the process-wide cache of small weights
    calls: list[tuple[int, ...]] = []
    original = planning.eigen

    def counted(m: np.ndarray) -> object:
        calls.append(m.shape)
        return original(m)

    monkeypatch.setattr(planning, "eigen", counted)
    u, s, vt = full_svd(view.matrices())
    kept = planning.Spectra(remember=True)
    np.testing.assert_array_equal(kept.values(view), s)
    for rank in (8, 100, 192, 8):  # a quarter of the weight holds 192 of its 384 vectors
        got = kept.top_svd(view, rank)
        assert [x.tobytes() for x in got] == [x.tobytes() for x in (u[:, :, :rank], s[:, :rank], vt[:, :rank])]
    assert len(calls) == 1
    kept.top_svd(view, 193)  # past the kept vectors: solved again
    assert len(calls) == 2
    once = planning.Spectra()
    once.values(view)
    once.top_svd(view, 8)
    assert len(calls) == 3
    once.top_svd(view, 8)  # forgotten once factorised
    assert len(calls) == 4
    monkeypatch.setattr(planning, "TOP_BYTES", 0)
    small = planning.Spectra(remember=True)
    small.values(view)
    small.top_svd(view, 8)
    assert len(calls) == 6  # over the budget: nothing kept
