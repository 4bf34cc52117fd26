"""Folders of images and WAV files, decoded batch by batch with declared preprocessing.

``images:FOLDER?size=224x224&mean=0.485,0.456,0.406&std=0.229,0.224,0.225`` reads every image under FOLDER
(PNG, JPEG, BMP, GIF, TIFF, WebP, PPM; sorted by path), converts it to RGB, BGR or grey, resizes it to the
model's height and width, scales, normalises and lays it out as NCHW or NHWC. ``wav:FOLDER?rate=16000``
reads every ``.wav`` (PCM 8/16/24/32-bit, mixed down to mono), resamples files at another rate to the one
declared and crops or zero-pads each to a window of ``length`` samples. When every file sits in a first-level
subfolder, the sorted subfolder names are the classes and the files get their index as integer labels (the
``ImageFolder`` convention).

Nothing is decoded when the data is loaded: a `Rows` opens and decodes the files of each batch it is asked
for (images on up to `DECODE_THREADS` threads), so memory holds one batch and a few decoded files.
"""

from __future__ import annotations

import importlib.util
import os
import wave
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from onnx_inher.datasets.streams import Rows, file_bytes_digest
from onnx_inher.errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
IMAGE_OPTIONS = ("size", "fit", "scale", "mean", "std", "channels", "layout", "input", "limit")
WAV_OPTIONS = ("rate", "length", "input", "limit")
FITS = ("stretch", "crop", "pad")
CHANNELS = ("rgb", "bgr", "grey")
LAYOUTS = ("nchw", "nhwc")
DECODE_THREADS = 4


@dataclass(frozen=True)
class Files:
    """The data files of a folder in sorted order, their paths relative to it, and ImageFolder labels."""

    root: Path
    paths: list[Path]
    labels: np.ndarray | None
    classes: list[str]

    def relative(self, i: int) -> str:
        return self.paths[i].relative_to(self.root).as_posix()


def list_files(spec: str, folder: Path, suffixes: Sequence[str], kind: str, limit: int | None) -> Files:
    """Every file under `folder` ending in one of `suffixes` (any case), sorted by relative path."""
    if not folder.is_dir():
        raise InputError(f"data '{spec}': {folder} is not a folder; give the folder that holds the {kind} files.")
    paths = sorted((p for p in folder.rglob("*") if p.suffix.lower() in suffixes and p.is_file()
                    and not any(part.startswith(".") for part in p.relative_to(folder).parts)),
                   key=lambda p: p.relative_to(folder).as_posix())  # hidden files (._x.jpg, .cache/) skipped
    if not paths:
        raise InputError(f"data '{spec}': no {kind} files ({', '.join(suffixes)}) under {folder}; "
                         f"point it at the folder that holds them.")
    if limit is not None:
        paths = paths[:limit]
    rel = [p.relative_to(folder).parts for p in paths]
    if all(len(parts) == 2 for parts in rel):
        classes = sorted({parts[0] for parts in rel})
        lookup = {c: i for i, c in enumerate(classes)}
        return Files(folder, paths, np.array([lookup[parts[0]] for parts in rel], np.int64), classes)
    return Files(folder, paths, None, [])


def parse_options(spec: str, text: str, allowed: Sequence[str]) -> dict[str, str]:
    """``key=value&key=value`` after the ``?`` of a spec; unknown or repeated keys are errors."""
    options: dict[str, str] = {}
    for item in filter(None, text.split("&")):
        key, eq, value = item.partition("=")
        key = key.strip().lower()
        if not eq or not value.strip():
            raise InputError(f"data '{spec}': option '{item}' needs a value (key=value), e.g. size=224x224.")
        if key not in allowed:
            raise InputError(f"data '{spec}': unknown option '{key}'; known: {', '.join(allowed)}.")
        if key in options:
            raise InputError(f"data '{spec}': option '{key}' is given twice.")
        options[key] = value.strip()
    return options


def number(spec: str, key: str, value: str) -> float:
    try:
        return float(Fraction(value.strip()))
    except (ValueError, ZeroDivisionError):
        raise InputError(f"data '{spec}': {key}={value} is not a number (1/255, 0.5 and 127.5 are).") from None


def positive_int(spec: str, key: str, value: str) -> int:
    if not value.isdigit() or int(value) == 0:
        raise InputError(f"data '{spec}': {key}={value} must be a positive integer.")
    return int(value)


def choose_input(spec: str, specs: Sequence, name: str | None, want: str) -> object:
    """The model input the data feeds: `input=NAME`, else the only input."""
    if name is not None:
        found = [s for s in specs if s.name == name]
        if not found:
            raise InputError(f"data '{spec}': input={name}, but the model's inputs are "
                             f"{[s.name for s in specs]}; name one of them.")
        if len(specs) > 1:
            others = [s.name for s in specs if s.name != name]
            raise InputError(f"data '{spec}' feeds only '{name}', but the model also needs {others}; "
                             "use a Python hook (hook:module:function) that yields every input.")
        return found[0]
    if len(specs) != 1:
        raise InputError(f"data '{spec}' holds {want}, but the model takes inputs {[s.name for s in specs]}; "
                         "it needs exactly one input (or a Python hook that yields them all).")
    return specs[0]


# ---------------------------------------------------------------------------------------------- images


@dataclass(frozen=True)
class ImageOptions:
    """How one image becomes one sample: (pixel·scale - mean) / std, laid out as the input wants."""

    height: int
    width: int
    channels: str
    layout: str
    fit: str
    scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    dtype: np.dtype
    rank: int

    def key(self) -> str:
        return (f"images h={self.height} w={self.width} channels={self.channels} layout={self.layout} "
                f"fit={self.fit} scale={self.scale!r} mean={self.mean} std={self.std} dtype={self.dtype.str} "
                f"rank={self.rank}")

    def sample_shape(self) -> tuple[int, ...]:
        c = 1 if self.channels == "grey" else 3
        if self.rank == 3:
            return (self.height, self.width)
        return (c, self.height, self.width) if self.layout == "nchw" else (self.height, self.width, c)


def image_options(spec: str, options: Mapping[str, str], target) -> ImageOptions:
    """Options checked against the model input `target` (InputSpec); what they leave out, the input fixes."""
    shape = target.shape
    if len(shape) not in (3, 4):
        raise InputError(f"data '{spec}' holds images, but input '{target.name}' has shape {_dims(shape)}; "
                         "images feed [N, C, H, W], [N, H, W, C] or grey [N, H, W].")
    layout = options.get("layout", "").lower() or _guess_layout(shape)
    if layout not in LAYOUTS:
        raise InputError(f"data '{spec}': layout={layout}; use layout=nchw or layout=nhwc.")
    if len(shape) == 3:
        c_dim, (h_dim, w_dim) = 1, shape[1:]
    elif layout == "nchw":
        c_dim, h_dim, w_dim = shape[1:]
    else:
        h_dim, w_dim, c_dim = shape[1:]
    channels = options.get("channels", "").lower().replace("gray", "grey")
    if not channels:
        channels = "grey" if c_dim == 1 else "rgb"
    if channels not in CHANNELS:
        raise InputError(f"data '{spec}': channels={channels}; use channels=rgb, bgr or grey.")
    want_c = 1 if channels == "grey" else 3
    if c_dim is not None and c_dim != want_c:
        raise InputError(f"data '{spec}': channels={channels} gives {want_c} channel(s), but input "
                         f"'{target.name}' {_dims(shape)} ({layout}) has {c_dim}; "
                         f"{'use channels=grey' if c_dim == 1 else 'use channels=rgb or bgr'} or layout=.")
    height, width = _size(spec, options.get("size"), h_dim, w_dim, target.name, shape)
    fit = options.get("fit", "stretch").lower()
    if fit not in FITS:
        raise InputError(f"data '{spec}': fit={fit}; use fit=stretch, crop (centre) or pad (right/bottom).")
    integer = np.issubdtype(target.dtype, np.integer)
    if integer and any(k in options for k in ("scale", "mean", "std")):
        raise InputError(f"data '{spec}': input '{target.name}' is {target.dtype}, fed raw pixel values 0..255; "
                         "scale, mean and std apply to float inputs only.")
    if not integer and not np.issubdtype(target.dtype, np.floating):
        raise InputError(f"data '{spec}': input '{target.name}' is {target.dtype}; images feed float or "
                         "integer inputs.")
    scale = 1.0 if integer else number(spec, "scale", options.get("scale", "1/255"))
    mean = _per_channel(spec, "mean", options.get("mean", "0"), want_c)
    std = _per_channel(spec, "std", options.get("std", "1"), want_c)
    if any(s == 0 for s in std):
        raise InputError(f"data '{spec}': std={options.get('std')} has a zero; every std must be non-zero.")
    return ImageOptions(height, width, channels, layout, fit, scale, mean, std, np.dtype(target.dtype), len(shape))


def _guess_layout(shape: Sequence[int | None]) -> str:
    if len(shape) == 4 and shape[3] in (1, 3) and shape[1] not in (1, 3):
        return "nhwc"
    return "nchw"


def _size(spec: str, text: str | None, h_dim: int | None, w_dim: int | None, name: str,
          shape: Sequence[int | None]) -> tuple[int, int]:
    if text is None:
        if h_dim is None or w_dim is None:
            raise InputError(f"data '{spec}': input '{name}' {_dims(shape)} has a free height or width; "
                             "give the size to resize to, e.g. ?size=224x224.")
        return h_dim, w_dim
    parts = text.lower().split("x")
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise InputError(f"data '{spec}': size={text}; write HEIGHTxWIDTH, e.g. size=224x224 or size=48x320.")
    height, width = int(parts[0]), int(parts[1])
    for label, want, got in (("height", h_dim, height), ("width", w_dim, width)):
        if want is not None and want != got:
            raise InputError(f"data '{spec}': size={text} gives {label} {got}, but input '{name}' "
                             f"{_dims(shape)} fixes it at {want}; drop size= or match it.")
    return height, width


def _per_channel(spec: str, key: str, text: str, channels: int) -> tuple[float, ...]:
    values = tuple(number(spec, key, v) for v in text.split(","))
    if len(values) == 1:
        return values * channels
    if len(values) != channels:
        raise InputError(f"data '{spec}': {key}={text} has {len(values)} values for {channels} channel(s); "
                         f"give one value or {channels}.")
    return values


def _dims(shape: Sequence[int | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def pillow() -> object:
    if importlib.util.find_spec("PIL") is None:
        raise InputError("reading image folders needs Pillow: pip install pillow")
    from PIL import Image

    return Image


def decode_image(path: Path, opts: ImageOptions) -> np.ndarray:
    """One image file as one sample (the layout and dtype of `opts`)."""
    image_module = pillow()
    try:
        with image_module.open(path) as im:  # type: ignore[attr-defined]
            im = im.convert("L" if opts.channels == "grey" else "RGB")
            im, placed = _fit(im, opts, image_module)
            pixels = np.asarray(im, dtype=np.float32)
    except Exception as err:  # Pillow raises OSError, ValueError, SyntaxError, DecompressionBombError...
        raise InputError(f"{path}: cannot read image ({type(err).__name__}: {err}); remove or re-save it "
                         "(PNG or JPEG).") from None
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if opts.channels == "bgr":
        pixels = pixels[:, :, ::-1]
    if np.issubdtype(opts.dtype, np.integer):
        values = pixels
    else:
        mean, std = np.array(opts.mean, np.float32), np.array(opts.std, np.float32)
        values = (pixels * np.float32(opts.scale) - mean) / std
    c = values.shape[2]
    out = np.zeros((opts.height, opts.width, c), np.float32)
    h, w = placed
    out[:h, :w] = values[:h, :w]
    if opts.rank == 3:
        sample = out[:, :, 0]
    else:
        sample = out.transpose(2, 0, 1) if opts.layout == "nchw" else out
    return np.ascontiguousarray(sample).astype(opts.dtype)


def _fit(im, opts: ImageOptions, image_module) -> tuple[object, tuple[int, int]]:
    """Resize to the target: stretch, cover-then-centre-crop, or fit inside (then zero-padded right/bottom)."""
    height, width = opts.height, opts.width
    bilinear = image_module.Resampling.BILINEAR
    if opts.fit == "stretch":
        return (im if im.size == (width, height) else im.resize((width, height), bilinear)), (height, width)
    w0, h0 = im.size
    if opts.fit == "crop":
        ratio = max(width / w0, height / h0)
        w1, h1 = max(width, round(w0 * ratio)), max(height, round(h0 * ratio))
        im = im.resize((w1, h1), bilinear)
        left, top = (w1 - width) // 2, (h1 - height) // 2
        return im.crop((left, top, left + width, top + height)), (height, width)
    ratio = min(width / w0, height / h0)
    w1, h1 = max(1, min(width, round(w0 * ratio))), max(1, min(height, round(h0 * ratio)))
    return im.resize((w1, h1), bilinear), (h1, w1)


def image_rows(spec: str, folder: Path, options: Mapping[str, str], specs: Sequence) -> tuple[dict, Files]:
    """`{input name: Rows}` over the images of `folder`, and the files (labels, classes)."""
    target = choose_input(spec, specs, options.get("input"), "images")
    opts = image_options(spec, options, target)
    limit = positive_int(spec, "limit", options["limit"]) if "limit" in options else None
    pillow()
    files = list_files(spec, folder, IMAGE_SUFFIXES, "image", limit)
    sample = opts.sample_shape()

    def read(positions: np.ndarray) -> np.ndarray:
        out = np.empty((len(positions), *sample), opts.dtype)

        def one(j: int) -> None:
            out[j] = decode_image(files.paths[int(positions[j])], opts)

        if len(positions) < 4:
            for j in range(len(positions)):
                one(j)
        else:  # Pillow decodes and resizes without the GIL: a few threads, each holding one decoded file
            with ThreadPoolExecutor(min(DECODE_THREADS, os.cpu_count() or 1)) as pool:
                list(pool.map(one, range(len(positions))))
        return out

    def digest_row(digest, i: int) -> None:
        file_bytes_digest(files.paths[i], digest, files.relative(i))

    rows = Rows((len(files.paths), *sample), opts.dtype, read, key=opts.key(), digest_row=digest_row, finite=True)
    return {target.name: rows}, files


# ------------------------------------------------------------------------------------------------- WAV


@dataclass(frozen=True)
class Clip:
    """A WAV file's header: what reading it needs."""

    rate: int
    channels: int
    width: int
    frames: int


def wav_header(path: Path) -> Clip:
    try:
        with wave.open(str(path), "rb") as w:
            return Clip(w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes())
    except (wave.Error, EOFError, OSError) as err:
        raise InputError(f"{path}: cannot read WAV ({err}); save it as PCM WAV (8/16/24/32-bit integer), e.g. "
                         f"ffmpeg -i in -c:a pcm_s16le out.wav.") from None


def wav_rows(spec: str, folder: Path, options: Mapping[str, str], specs: Sequence) -> tuple[dict, Files]:
    """`{input name: Rows}` over the WAV files of `folder` (one window per file) and the files."""
    target = choose_input(spec, specs, options.get("input"), "audio")
    shape = target.shape
    if not np.issubdtype(target.dtype, np.floating):
        raise InputError(f"data '{spec}': input '{target.name}' is {target.dtype}; audio feeds a float input.")
    if len(shape) == 2:
        axis = 1
    elif len(shape) == 3 and shape[1] == 1:
        axis = 2
    elif len(shape) == 3 and shape[2] == 1:
        axis = 1
    else:
        raise InputError(f"data '{spec}': input '{target.name}' has shape {_dims(shape)}; a waveform feeds "
                         "[N, samples], [N, 1, samples] or [N, samples, 1].")
    length = positive_int(spec, "length", options["length"]) if "length" in options else shape[axis]
    if length is None:
        raise InputError(f"data '{spec}': input '{target.name}' {_dims(shape)} has a free length; give the "
                         "window in samples, e.g. ?length=16000 (files are cropped or zero-padded to it).")
    if shape[axis] is not None and shape[axis] != length:
        raise InputError(f"data '{spec}': length={length}, but input '{target.name}' {_dims(shape)} fixes it "
                         f"at {shape[axis]}; drop length= or match it.")
    limit = positive_int(spec, "limit", options["limit"]) if "limit" in options else None
    files = list_files(spec, folder, (".wav",), "WAV", limit)
    headers = [wav_header(p) for p in files.paths]
    rates = sorted({h.rate for h in headers})
    if "rate" in options:
        rate = positive_int(spec, "rate", options["rate"])
    elif len(rates) == 1:
        rate = rates[0]
    else:
        counts = {r: sum(h.rate == r for h in headers) for r in rates}
        odd = next(p for p, h in zip(files.paths, headers, strict=True) if h.rate != rates[-1])
        raise InputError(f"data '{spec}': the files have different sample rates {counts} (e.g. {odd}); "
                         f"declare the model's rate, e.g. ?rate={rates[-1]}, and the others are resampled to it.")
    sample_shape = {2: (length,), 3: (1, length) if axis == 2 else (length, 1)}[len(shape)]
    dtype = np.dtype(target.dtype)

    def read(positions: np.ndarray) -> np.ndarray:
        out = np.empty((len(positions), *sample_shape), dtype)
        for j, i in enumerate(positions):
            out[j] = read_window(files.paths[int(i)], headers[int(i)], rate, length).reshape(sample_shape)
        return out

    def digest_row(digest, i: int) -> None:
        file_bytes_digest(files.paths[i], digest, files.relative(i))

    key = f"wav rate={rate} length={length} shape={sample_shape} dtype={dtype.str}"
    rows = Rows((len(files.paths), *sample_shape), dtype, read, key=key, digest_row=digest_row, finite=True)
    return {target.name: rows}, files


def read_window(path: Path, clip: Clip, rate: int, length: int) -> np.ndarray:
    """The first `length` samples at `rate` of a PCM WAV as mono float32 in [-1, 1], zero-padded."""
    need = length if clip.rate == rate else min(clip.frames, int(np.ceil(length * clip.rate / rate)) + 1)
    try:
        with wave.open(str(path), "rb") as w:
            raw = w.readframes(need)
    except (wave.Error, EOFError, OSError) as err:
        raise InputError(f"{path}: cannot read WAV ({err}); save it as PCM WAV.") from None
    x = pcm_to_float(raw, clip.width).reshape(-1, clip.channels).mean(axis=1, dtype=np.float32)
    if clip.rate != rate and len(x):
        x = resample(x, max(1, round(len(x) * rate / clip.rate)))
    out = np.zeros(length, np.float32)
    out[: min(length, len(x))] = x[:length]
    return out


def pcm_to_float(raw: bytes, width: int) -> np.ndarray:
    """Interleaved PCM samples (unsigned 8-bit, signed 16/24/32-bit little-endian) as float32 in [-1, 1]."""
    if width == 1:
        return (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    if width == 2:
        return np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    if width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        v = np.where(v >= 1 << 23, v - (1 << 24), v)
        return v.astype(np.float32) / float(1 << 23)
    if width == 4:
        return (np.frombuffer(raw, "<i4").astype(np.float64) / float(1 << 31)).astype(np.float32)
    raise InputError(f"unsupported PCM sample width {width} bytes; save the WAV as 16-bit PCM.")


def resample(x: np.ndarray, n: int) -> np.ndarray:
    """Band-limited (FFT) resampling of a 1-D signal to `n` samples, as scipy.signal.resample does."""
    if n == len(x):
        return x.astype(np.float32)
    spectrum = np.fft.rfft(x.astype(np.float64))
    keep = min(len(spectrum), n // 2 + 1)
    out = np.zeros(n // 2 + 1, np.complex128)
    out[:keep] = spectrum[:keep]
    if keep == n // 2 + 1 and n % 2 == 0 and n < len(x):
        out[-1] = out[-1].real  # the new Nyquist bin of an even length is real
    return (np.fft.irfft(out, n) * (n / len(x))).astype(np.float32)
