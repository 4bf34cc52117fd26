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


def test_an_entry_over_the_cap_is_refused_before_any_work(tmp_path: Path, monkeypatch) -> None:
    teacher, data, cache = mlp(tmp_path / "t.onnx"), dataset(n=1000), tmp_path / "cache"
    # 1000 samples x (3 + 5) float32 = 32 kB: a 20 kB cap is too small
    monkeypatch.setenv("ONNX_INHER_CACHE_MAX_GB", str(20e3 / 1e9))
    over = r"would take 32\.0 kB on disk, over the cache cap of 20\.0 kB"
    with pytest.raises(teacher_cache.CacheOverCap, match=over) as caught:
        teacher_outputs(teacher, data, ["y", "hidden/relu"], cache_dir=cache)
    assert caught.value.estimate == 1000 * 8 * 4 and caught.value.cap == 20_000
    assert not cache.exists() or not any(cache.iterdir())


def test_least_recently_used_entries_are_evicted_to_fit_the_cap(tmp_path: Path, monkeypatch, capsys) -> None:
    teacher, cache = mlp(tmp_path / "t.onnx"), tmp_path / "cache"
    monkeypatch.setenv("ONNX_INHER_QUIET", "0")
    monkeypatch.setenv("ONNX_INHER_CACHE_MAX_GB", str(50e3 / 1e9))  # room for one 32 kB entry, not two
    first = teacher_outputs(teacher, dataset(n=1000, seed=1), ["y", "hidden/relu"], cache_dir=cache)
    assert "teacher outputs cached" in capsys.readouterr().err
    second = teacher_outputs(teacher, dataset(n=1000, seed=2), ["y", "hidden/relu"], cache_dir=cache)
    notice = capsys.readouterr().err
    assert "1 older entry evicted" in notice and f"rm -rf {cache}" in notice
    assert not first.folder.exists() and second.folder.exists()


def test_distill_runs_the_teacher_online_when_the_cache_would_overflow(tmp_path: Path, monkeypatch, capsys) -> None:
    import onnx_inher
    from onnx_inher import Options, parse_policy
    from onnx_inher.distill import DistillOptions

    teacher = mlp(tmp_path / "t.onnx")
    onnx_inher.compress(teacher, tmp_path / "s.onnx", Options(mode="svd", policy=parse_policy(rank=2),
                                                                 rank_multiple=1, guard=False))
    np.savez(tmp_path / "d.npz", x=dataset(n=64).inputs["x"])
    monkeypatch.setenv("ONNX_INHER_QUIET", "0")
    monkeypatch.setenv("ONNX_INHER_CACHE_MAX_GB", "0")
    result = onnx_inher.distill(tmp_path / "s.onnx", teacher, str(tmp_path / "d.npz"), tmp_path / "out.onnx",
                                DistillOptions(steps=3, batch_size=16, checkpoint_every=0),
                                cache_dir=tmp_path / "cache")
    assert result.teacher_mode == "online" and result.train.steps == 3
    said = capsys.readouterr().err
    assert "over the cache cap of 0.0 kB (ONNX_INHER_CACHE_MAX_GB): the teacher runs on each batch instead" in said
    assert "use --teacher-mode online" not in said  # what it already does
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
