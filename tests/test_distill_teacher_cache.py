"""Teacher cache: outputs and intermediates equal a direct ORT run, computed once, memory-mapped after."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_inher.datasets import Dataset
from onnx_inher.distill import teacher_cache
from onnx_inher.distill.teacher_cache import teacher_outputs
from onnx_inher.errors import InputError
from onnx_inher.runtime import session

RNG = np.random.default_rng(0)
W1, W2 = RNG.normal(size=(6, 5)).astype(np.float32), RNG.normal(size=(5, 3)).astype(np.float32)


def mlp(path: Path, w1: np.ndarray = W1, extra_output: bool = False) -> Path:
    """y = relu(x @ w1) @ w2, with the hidden tensor named 'hidden/relu' (a '/' as exporters write)."""
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["hidden/relu"], name="relu"),
             helper.make_node("MatMul", ["hidden/relu", "w2"], ["y"], name="fc2")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])]
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(W2, "w2")]
    if extra_output:
        nodes.append(helper.make_node("Shape", ["y"], ["shape"], name="shape"))
        outputs.append(helper.make_tensor_value_info("shape", TensorProto.INT64, [2]))
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
                              outputs, initializer=inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def dataset(n: int = 37, seed: int = 1) -> Dataset:
    return Dataset({"x": np.random.default_rng(seed).normal(size=(n, 6)).astype(np.float32)}, None, "toy")


def test_outputs_and_intermediates_match_ort_then_come_from_disk(tmp_path: Path, monkeypatch) -> None:
    teacher, data, cache = mlp(tmp_path / "t.onnx"), dataset(), tmp_path / "cache"
    first = teacher_outputs(teacher, data, ["y", "hidden/relu"], cache_dir=cache, batch_size=8)
    assert first.computed
    hidden = np.maximum(data.inputs["x"] @ W1, 0)
    np.testing.assert_allclose(first.arrays["hidden/relu"], hidden, rtol=1e-5, atol=1e-5)
    direct = session(teacher, "cpu").run(["y"], data.inputs)[0]
    np.testing.assert_array_equal(first.arrays["y"], direct)

    monkeypatch.setattr(teacher_cache, "runnable_session", lambda *a, **k: pytest.fail("teacher ran again"))
    again = teacher_outputs(teacher, data, ["y", "hidden/relu"], cache_dir=cache, batch_size=8)
    assert not again.computed and again.key == first.key
    assert isinstance(again.arrays["y"], np.memmap)
    np.testing.assert_array_equal(again.arrays["y"], direct)
    np.testing.assert_array_equal(again.take(np.array([3, 5]))["hidden/relu"], first.arrays["hidden/relu"][[3, 5]])


def test_key_follows_teacher_data_and_fetch(tmp_path: Path) -> None:
    teacher, cache = mlp(tmp_path / "t.onnx"), tmp_path / "cache"
    keys = {teacher_outputs(teacher, dataset(), ["y"], cache_dir=cache).key,
            teacher_outputs(teacher, dataset(seed=2), ["y"], cache_dir=cache).key,
            teacher_outputs(teacher, dataset(), ["y", "hidden/relu"], cache_dir=cache).key,
            teacher_outputs(mlp(tmp_path / "t2.onnx", W1 * 2), dataset(), ["y"], cache_dir=cache).key}
    assert len(keys) == 4
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 4


def test_leftover_staging_folder_is_not_a_cache_hit(tmp_path: Path) -> None:
    teacher, data, cache = mlp(tmp_path / "t.onnx"), dataset(), tmp_path / "cache"
    key = teacher_cache.cache_key(teacher_cache.teacher_digest(teacher), data.fingerprint(), ["y"])
    (cache / f".{key}.killed").mkdir(parents=True)  # what a kill -9 during the teacher run leaves
    (cache / key).mkdir()  # an entry without its manifest
    (cache / key / "0000.npy").write_bytes(b"partial")
    assert teacher_outputs(teacher, data, ["y"], cache_dir=cache).computed


def test_clear_errors_before_running(tmp_path: Path) -> None:
    teacher, cache = mlp(tmp_path / "t.onnx", extra_output=True), tmp_path / "cache"
    with pytest.raises(InputError, match=r"no tensor named \['fc9'\]"):
        teacher_outputs(teacher, dataset(), ["y", "fc9"], cache_dir=cache)
    with pytest.raises(InputError, match=r"reads inputs \['x'\] but the data provides \['image'\]"):
        teacher_outputs(teacher, Dataset({"image": np.zeros((2, 6), np.float32)}, None, "toy"), ["y"],
                        cache_dir=cache)
    with pytest.raises(InputError, match="no batch axis"):
        teacher_outputs(teacher, dataset(), ["shape"], cache_dir=cache)
    with pytest.raises(InputError, match="nothing to fetch"):
        teacher_outputs(teacher, dataset(), [], cache_dir=cache)


def test_embedded_mnist_teacher_logits(tmp_path: Path) -> None:
    path = Path(__file__).resolve().parents[1] / "onnx_inher" / "data" / "mnist_cnn.onnx"
    if not path.is_file():
        pytest.skip("embedded teacher not built yet: python -m benchmarks.train_mnist_teacher")
    images = np.random.default_rng(0).normal(size=(10, 1, 28, 28)).astype(np.float32)
    out = teacher_outputs(path, Dataset({"image": images}, None, "toy"),
                          ["logits", "/features/features.3/Conv_output_0"], cache_dir=tmp_path, batch_size=4)
    assert out.arrays["logits"].shape == (10, 10)
    assert out.arrays["/features/features.3/Conv_output_0"].shape == (10, 64, 14, 14)
