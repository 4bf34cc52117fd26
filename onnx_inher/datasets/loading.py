"""Distillation data: load it from a spec, check it against the student's inputs, split it.

A DATA spec is one of
  * a path: an ``.npz`` keyed by input names, or a folder of ``<input name>.npy`` files; an optional
    ``labels`` key / ``labels.npy`` holds integer class labels (one per sample); a single ``.npy`` feeds a
    model with one input. Arrays are memory-mapped (compressed ``.npz`` members are first unpacked to a
    temporary file), never read whole;
  * ``images:FOLDER[?options]``: every image under FOLDER, decoded and preprocessed batch by batch;
    options ``size=HxW``, ``fit=stretch|crop|pad``, ``scale=1/255``, ``mean=a,b,c``, ``std=a,b,c``,
    ``channels=rgb|bgr|grey``, ``layout=nchw|nhwc``, ``input=NAME``, ``limit=N`` (defaults come from the
    model's input: its height, width, channel count and layout; scale 1/255, mean 0, std 1). Class
    subfolders give integer labels;
  * ``wav:FOLDER[?rate=16000&length=16000&input=NAME&limit=N]``: PCM WAV files, mono, resampled to
    ``rate`` and cropped or zero-padded to ``length`` samples;
  * ``lines:FILE_OR_FOLDER[?tokenizer=tokenizer.json&length=128&limit=N]``: one sample per non-blank line,
    tokenised into input_ids / attention_mask / token_type_ids;
  * ``hook:MODULE:FUNCTION[?key=value...]`` or ``FILE.py:FUNCTION``: a Python function, or an ONNX Runtime
    CalibrationDataReader, yielding feed dicts ``{input name: array}`` (see `hooks`);
  * a named adapter, optionally with a part: ``mnist5k``, ``digits``, ``fashion-mnist`` (``:train`` default,
    ``:test`` the held-out part), ``fortunes`` (tokenised for MiniLM-style text encoders);
  * ``random`` or ``random:N``: data-free mode, N random samples with the student's shapes and dtypes,
    labelled ``data_free`` everywhere it is reported.
Every array has the samples on axis 0. Everything is checked before training starts, and a problem (wrong
names, ranks, static dims, dtypes, an empty set, NaN) is an `InputError` that names the array and the fix.
Data on disk stays there: a batch reads only its own samples (`streams.Rows`), and a split is a view.
"""

from __future__ import annotations

import hashlib
import struct
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import ModelProto

from onnx_inher.datasets import adapters, hooks, media, text
from onnx_inher.datasets.streams import check_finite, digest_array, spill_reader, take_rows
from onnx_inher.errors import InputError
from onnx_inher.runtime import sample_inputs

LABELS = "labels"
IMAGE_ADAPTERS = {"mnist5k": adapters.mnist5k, "digits": adapters.digits, "fashion-mnist": adapters.fashion_mnist}
TEXT_ADAPTERS = ("fortunes",)
STREAMS = ("images", "wav", "lines", hooks.HOOK)
RANDOM = "random"
RANDOM_SAMPLES = 256


@dataclass(frozen=True)
class InputSpec:
    """One graph input of the student: its name, numpy dtype and shape (None for a dynamic dim)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]
    dim_names: tuple[str, ...] = ()


def input_specs(model: ModelProto) -> list[InputSpec]:
    """The graph inputs that are fed at run time (not initializers), in graph order."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        tt = inp.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim)
        names = tuple(d.dim_param for d in tt.shape.dim)
        specs.append(InputSpec(inp.name, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)), dims, names))
    return specs


@dataclass(frozen=True)
class Dataset:
    """Input arrays keyed by the student's input names, optional labels, and where they came from.

    An input is an ndarray, a memory map or a `Rows` (samples read from disk on demand): index it with
    `batch`, never hold it whole.
    """

    inputs: dict[str, Any]
    labels: np.ndarray | None
    source: str
    data_free: bool = False
    indices: np.ndarray | None = field(default=None, compare=False)

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def take(self, index: np.ndarray) -> Dataset:
        """The samples at `index` (sorted indices keep memory-mapped reads sequential)."""
        labels = None if self.labels is None else self.labels[index]
        base = np.arange(len(self)) if self.indices is None else self.indices
        return Dataset({k: take_rows(v, index) for k, v in self.inputs.items()}, labels, self.source,
                       self.data_free, base[index])

    def batch(self, index: np.ndarray) -> dict[str, np.ndarray]:
        return {k: np.ascontiguousarray(v[index]) for k, v in self.inputs.items()}

    def fingerprint(self) -> str:
        """sha256 of names, dtypes, shapes and bytes of every array: the teacher cache's data key. Arrays
        are hashed a chunk at a time; decoded sources (images, audio, text) hash their files' bytes and the
        preprocessing instead of the decoded samples."""
        digest = hashlib.sha256()
        arrays = dict(self.inputs)
        if self.labels is not None:
            arrays[LABELS] = self.labels
        for name in sorted(arrays):
            a = arrays[name]
            digest.update(f"{name}|{a.dtype.str}|{tuple(a.shape)}|".encode())
            digest_array(digest, a)
        return digest.hexdigest()


def split(data: Dataset, val_fraction: float, seed: int = 0) -> tuple[Dataset, Dataset | None]:
    """Seeded (train, validation) split; `val_fraction` 0 gives no validation set."""
    if not 0.0 <= val_fraction < 1.0:
        raise InputError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    n_val = round(len(data) * val_fraction)
    if n_val == 0:
        return data, None
    if n_val >= len(data):
        raise InputError(f"data '{data.source}': {len(data)} samples are too few for a validation split of "
                         f"{val_fraction}; lower --val-fraction or add data.")
    train, val = adapters.held_out_split(len(data), n_val, seed)
    return data.take(train), data.take(val)


def load_data(spec: str, specs: Sequence[InputSpec], *, seed: int = 0,
              dims: dict[str, int] | None = None, model: ModelProto | None = None) -> Dataset:
    """Resolve a DATA spec into a checked `Dataset` for a student with inputs `specs`."""
    name, _, part = spec.partition(":")
    if name == RANDOM:
        if model is None:
            raise InputError("data-free mode ('random') needs the student model for shapes and token ranges")
        data = random_data(model, specs, samples=_random_count(part), seed=seed, dims=dims)
    elif name in IMAGE_ADAPTERS:
        target = _image_input(spec, specs)
        data = _image_dataset(spec, IMAGE_ADAPTERS[name](part or "train"), target)
    elif name in TEXT_ADAPTERS:
        data = _text_dataset(spec, part or "train", specs)
    elif name in STREAMS and part:
        data = _stream_dataset(spec, name, part, specs)
    elif hooks.is_hook_path(spec):
        target, _, query = spec.partition("?")
        data = _hook_dataset(spec, target, query, specs)
    else:
        data = read_path(Path(spec).expanduser(), specs)
    validate(data, specs)
    return data


def _stream_dataset(spec: str, kind: str, rest: str, specs: Sequence[InputSpec]) -> Dataset:
    """images:, wav:, lines: and hook: specs (everything after the first ``?`` is options)."""
    where, _, query = rest.partition("?")
    if kind == hooks.HOOK:
        return _hook_dataset(spec, where, query, specs)
    if not where:
        raise InputError(f"data '{spec}': give the {'file' if kind == 'lines' else 'folder'} after '{kind}:', "
                         f"e.g. {kind}:path/to/data.")
    path = Path(where).expanduser()
    if kind == "lines":
        options = media.parse_options(spec, query, text.LINE_OPTIONS)
        return Dataset(text.line_tokens(spec, path, options, list(specs)), None, spec)
    allowed = media.IMAGE_OPTIONS if kind == "images" else media.WAV_OPTIONS
    options = media.parse_options(spec, query, allowed)
    reader = media.image_rows if kind == "images" else media.wav_rows
    inputs, files = reader(spec, path, options, specs)
    return Dataset(inputs, files.labels, spec)


def _hook_dataset(spec: str, target: str, query: str, specs: Sequence[InputSpec]) -> Dataset:
    options = {}
    for item in filter(None, query.split("&")):
        key, eq, value = item.partition("=")
        if not eq or not key.isidentifier():
            raise InputError(f"data '{spec}': hook option '{item}' must be key=value (a Python identifier key).")
        options[key] = value
    arrays, labels = hooks.hook_arrays(spec, target, options, specs)
    return Dataset(arrays, labels, spec)


def sample_shapes(data: Dataset, specs: Sequence[InputSpec]) -> dict[str, list[int]]:
    """Each input's shape for one sample of `data` (axis 0: 1, or the input's fixed first dim): the real
    shapes the model runs at, for FLOP counts, sample inputs and benchmarks."""
    return {s.name: [s.shape[0] or 1, *(int(d) for d in data.inputs[s.name].shape[1:])] for s in specs}


def _random_count(part: str) -> int:
    if not part:
        return RANDOM_SAMPLES
    if not part.isdigit() or int(part) == 0:
        raise InputError(f"data 'random:{part}': the count must be a positive integer, e.g. random:512")
    return int(part)


def random_data(model: ModelProto, specs: Sequence[InputSpec], samples: int, seed: int,
                dims: dict[str, int] | None = None) -> Dataset:
    """Data-free mode: random inputs of the student's shapes (token ids inside the embedding table)."""
    batch_names = {s.dim_names[0] for s in specs if s.shape and s.shape[0] is None and s.dim_names[0]}
    static = [s.name for s in specs if not s.shape or s.shape[0] is not None]
    if static:
        raise InputError(f"data-free mode needs a dynamic batch axis; input(s) {static} have a fixed first dim. "
                         "Pass real data (an .npz keyed by input names) instead.")
    feed = sample_inputs(model, {**(dims or {}), **dict.fromkeys(batch_names, samples)}, seed=seed)
    return Dataset({s.name: feed[s.name] for s in specs}, None, f"random:{samples} (data-free)", data_free=True)


def _image_input(spec: str, specs: Sequence[InputSpec]) -> InputSpec:
    """The one float input an image data set feeds (checked before the images are read)."""
    if len(specs) != 1 or not np.issubdtype(specs[0].dtype, np.floating):
        raise InputError(f"data '{spec}' holds images, but the student takes inputs "
                         f"{[(s.name, str(s.dtype)) for s in specs]}; it needs exactly one float input.")
    return specs[0]


def _image_dataset(spec: str, images: adapters.Images, target: InputSpec) -> Dataset:
    pixels = adapters.fit_images(adapters.normalise(images.pixels), (None, *target.shape[1:]))
    return Dataset({target.name: pixels.astype(target.dtype)}, images.labels, spec)


def _text_dataset(spec: str, part: str, specs: Sequence[InputSpec]) -> Dataset:
    wanted = {s.name: s for s in specs}
    unknown = [n for n in wanted if n not in text.TOKEN_INPUTS]
    if unknown:
        raise InputError(f"data '{spec}' provides {list(text.TOKEN_INPUTS)}, but the student also needs "
                         f"{unknown}; pass an .npz keyed by its input names instead.")
    seq = next((s.shape[1] for s in specs if len(s.shape) > 1 and s.shape[1] is not None), None)
    tokens = text.fortune_tokens(part, max_tokens=seq or text.MAX_TOKENS)
    return Dataset({n: tokens[n].astype(s.dtype) for n, s in wanted.items()}, None, spec)


def read_path(path: Path, specs: Sequence[InputSpec] | None = None) -> Dataset:
    """An ``.npz`` (keys = input names) or a folder of ``<name>.npy``; ``labels`` is the optional label key.
    A single ``.npy`` feeds the model's only input (`specs`). Arrays are memory-mapped, never read whole."""
    if path.is_dir():
        files = sorted(path.glob("*.npy"))
        if not files:
            kinds = {p.suffix.lower() for p in path.rglob("*") if p.is_file()}
            hint = ("; for image files use images:" if kinds & set(media.IMAGE_SUFFIXES) else
                    "; for WAV files use wav:" if ".wav" in kinds else
                    "; for text use lines:" if ".txt" in kinds else "")
            raise InputError(f"{path}: no .npy files; write one <input name>.npy per student input{hint}"
                             f"{path if hint else ''}.")
        arrays = {f.stem: _load_npy(f) for f in files}
    elif path.is_file() and path.suffix.lower() == ".npy":
        if specs is None or len(specs) != 1:
            names = [s.name for s in specs or []]
            raise InputError(f"{path}: a single array, but the model takes inputs {names}; save an .npz keyed by "
                             "input names (or a folder of <input name>.npy).")
        arrays = {specs[0].name: _load_npy(path)}
    elif path.is_file():
        arrays = _read_npz(path)
    else:
        known = ", ".join([*IMAGE_ADAPTERS, *TEXT_ADAPTERS, RANDOM, *(f"{k}:..." for k in STREAMS)])
        raise InputError(f"data '{path}': no such file or folder, and not a data set name ({known}).")
    labels = arrays.pop(LABELS, None)
    return Dataset(arrays, None if labels is None else np.array(labels), str(path))


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """Members of an .npz: stored ones memory-mapped in place, compressed ones unpacked to a temporary file
    a chunk at a time and memory-mapped (an archive larger than memory still loads)."""
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as err:
        raise InputError(f"{path}: cannot read data ({err}); pass an .npz keyed by input names.") from None
    arrays = {}
    with archive:
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                continue
            arrays[info.filename[:-4]] = _npz_member(path, archive, info)
    if not arrays:
        raise InputError(f"{path}: no arrays in the archive; save it with numpy.savez(path, name=array, ...).")
    return arrays


def _npz_member(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    fmt = np.lib.format
    what = f"{path}: '{info.filename[:-4]}'"
    try:
        with archive.open(info) as f:
            version = fmt.read_magic(f)
            header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, fortran, dtype = header(f)
            if dtype.hasobject:
                raise InputError(f"{what} holds Python objects; save numeric arrays (allow_pickle is off).")
            if info.compress_type == zipfile.ZIP_STORED and shape and int(np.prod(shape)) > 0:
                start = f.tell()
                with open(path, "rb") as raw:
                    raw.seek(info.header_offset)
                    local = raw.read(30)
                name_len, extra_len = struct.unpack("<HH", local[26:30])
                offset = info.header_offset + 30 + name_len + extra_len + start
                return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape,
                                 order="F" if fortran else "C")
            if not fortran and shape:
                return spill_reader(lambda src, n: src.read(n), what, dtype, shape, f)
    except InputError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, struct.error) as err:
        raise InputError(f"{what}: cannot read ({err}); save it with numpy.savez.") from None
    with archive.open(info) as f:
        return fmt.read_array(f, allow_pickle=False)


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: cannot read .npy ({err}); save it with numpy.save.") from None


def validate(data: Dataset, specs: Sequence[InputSpec]) -> None:
    """Names, counts, ranks, static dims, dtypes, finite values and labels, each a one-line InputError."""
    where = f"data '{data.source}'"
    names = [s.name for s in specs]
    missing = [n for n in names if n not in data.inputs]
    unknown = [k for k in data.inputs if k not in names]
    if missing or unknown:
        raise InputError(f"{where}: arrays must be named after the student's inputs {names} (plus optional "
                         f"'{LABELS}'); missing {missing}, unknown {unknown}.")
    counts = {k: (len(v) if v.ndim else 0) for k, v in data.inputs.items()}
    if min(counts.values()) == 0:
        raise InputError(f"{where}: no samples ({counts}); each array needs samples on axis 0.")
    if len(set(counts.values())) > 1:
        raise InputError(f"{where}: arrays disagree on the number of samples {counts}; axis 0 is the sample axis.")
    for s in specs:
        _check_array(where, s, data.inputs[s.name])
    if data.labels is not None:
        _check_labels(where, data.labels, len(data))


def _check_array(where: str, spec: InputSpec, a: np.ndarray) -> None:
    if a.ndim != len(spec.shape):
        raise InputError(f"{where}: '{spec.name}' has rank {a.ndim} {list(a.shape)}, the student expects rank "
                         f"{len(spec.shape)} {_shape_text(spec)} with samples on axis 0.")
    for axis, (want, got) in enumerate(zip(spec.shape[1:], a.shape[1:], strict=True), start=1):
        if want is not None and want != got:
            raise InputError(f"{where}: '{spec.name}' has shape {list(a.shape)}, the student expects "
                             f"{_shape_text(spec)} (axis {axis} must be {want}).")
    if a.dtype != spec.dtype:
        raise InputError(f"{where}: '{spec.name}' is {a.dtype}, the student expects {spec.dtype}; "
                         f"convert it with array.astype(numpy.{spec.dtype}).")
    check_finite(where, spec.name, a)


def _check_labels(where: str, labels: np.ndarray, n: int) -> None:
    if not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"{where}: '{LABELS}' is {labels.dtype}; labels must be integer class indices.")
    if labels.ndim == 0 or len(labels) != n:
        raise InputError(f"{where}: '{LABELS}' has shape {list(labels.shape)}, expected one label per sample ({n}).")
    if labels.min() < 0:
        raise InputError(f"{where}: '{LABELS}' has negative values; labels must be class indices >= 0.")


def _shape_text(spec: InputSpec) -> str:
    return "[" + ", ".join("N" if i == 0 and d is None else "?" if d is None else str(d)
                           for i, d in enumerate(spec.shape)) + "]"
