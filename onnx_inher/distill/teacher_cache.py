"""The teacher's outputs over a data set, computed once in ONNX Runtime and memory-mapped afterwards.

The teacher never changes during distillation, so running it every epoch (or every run of the same
experiment) is wasted time. We run it once, batched, on the CUDA provider when ONNX Runtime has one, and
store every fetched tensor (graph outputs and, for feature KD, intermediate tensors exposed as extra graph
outputs on a copy of the teacher) as one ``.npy`` per name. Later epochs and later runs open those files
memory-mapped, so a data set larger than RAM costs no RAM.

The folder is bounded (`ONNX_INHER_CACHE_MAX_GB`, default 4 GB): an entry that would not fit raises
`CacheOverCap` before any work (distill then runs the teacher on each batch instead), and after an entry is
written the least recently used others are evicted until the folder fits. Each new entry is announced with
its size and how to clear the folder.

The cache key is the sha256 of the teacher's files (the ``.onnx`` and any external data), the data set's
fingerprint, and the fetched names: change any of them and the teacher runs again. A cache entry is built
in a temporary folder and renamed into place with its manifest, so a killed run never leaves a partial one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import ModelProto
from tqdm import tqdm

from onnx_inher import _env
from onnx_inher.datasets import Dataset
from onnx_inher.errors import InputError
from onnx_inher.ir.io import iter_tensors, load_model
from onnx_inher.runtime import runnable_session, with_outputs

MANIFEST = "manifest.json"
FORMAT = "onnx-inher-teacher-cache/1"
BATCH = 64


@dataclass(frozen=True)
class TeacherOutputs:
    """Fetched tensors keyed by ONNX name, [N, ...] over the whole data set (memory-mapped when cached)."""

    arrays: dict[str, np.ndarray]
    folder: Path | None
    key: str
    computed: bool

    def take(self, index: np.ndarray) -> dict[str, np.ndarray]:
        return {k: np.ascontiguousarray(v[index]) for k, v in self.arrays.items()}


class CacheOverCap(InputError):
    """The entry would exceed the cache's size cap; `estimate` and `cap` are in bytes."""

    def __init__(self, estimate: int, cap: int) -> None:
        super().__init__(f"the teacher outputs would take {_gb(estimate)} on disk, over the cache cap of {_gb(cap)} "
                         f"({_env.CACHE_CAP_VAR}); use --teacher-mode online, or raise the cap.")
        self.estimate, self.cap = estimate, cap

    def size_text(self) -> str:
        return _gb(self.estimate)

    def cap_text(self) -> str:
        return _gb(self.cap)


def _gb(n: float) -> str:
    if n >= 1e8:
        return f"{n / 1e9:.2f} GB"
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def default_cache_dir() -> Path:
    return _env.cache_root() / "teacher"


def teacher_digest(path: Path) -> str:
    """sha256 over the model file and its external data files (their names and bytes, in name order)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    model = onnx.load(str(path), load_external_data=False)
    locations = sorted({e.value for t in iter_tensors(model.graph) for e in t.external_data if e.key == "location"})
    for location in locations:
        digest.update(location.encode())
        with open(path.parent / location, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def cache_key(teacher_sha: str, data_fingerprint: str, fetch: Sequence[str]) -> str:
    text = json.dumps({"format": FORMAT, "teacher": teacher_sha, "data": data_fingerprint, "fetch": list(fetch)})
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def teacher_outputs(teacher: Path, data: Dataset, fetch: Sequence[str], *, cache_dir: Path | None = None,
                    batch_size: int = BATCH, preference: str = "auto") -> TeacherOutputs:
    """The teacher's tensors `fetch` on every sample of `data`, from the cache or computed (then cached).

    `cache_dir=None` uses ``$ONNX_INHER_CACHE/teacher``; outputs are then memory-mapped read-only arrays.
    """
    if not fetch:
        raise InputError("teacher: nothing to fetch; name at least one output.")
    folder = cache_dir or default_cache_dir()
    key = cache_key(teacher_digest(teacher), data.fingerprint(), fetch)
    entry = folder / key
    if (entry / MANIFEST).is_file():
        with contextlib.suppress(OSError):  # recently used: the last to be evicted
            os.utime(entry / MANIFEST)
        return TeacherOutputs(_open_entry(entry, fetch), entry, key, computed=False)
    model = fetching_teacher(teacher, data, fetch)
    cap = _env.cache_cap_bytes()
    estimate = entry_bytes(model, data, fetch, preference)
    if estimate > cap:
        raise CacheOverCap(estimate, cap)
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=folder))
    try:
        _compute(model, data, fetch, staging, batch_size, preference)
        if entry.is_dir() and not (entry / MANIFEST).is_file():
            shutil.rmtree(entry, ignore_errors=True)  # an incomplete entry left by an older, killed run
        try:
            os.replace(staging, entry)
        except OSError:
            if not (entry / MANIFEST).is_file():  # not a concurrent run's complete entry: a real error
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    evicted = evict(folder, cap, keep=entry)
    if not _env.quiet():
        print(f"onnx-inher: teacher outputs cached: {_gb(_size(entry))} in {entry}"
              + (f" ({evicted} older entr{'y' if evicted == 1 else 'ies'} evicted)" if evicted else "")
              + f"; the folder holds {_gb(_size(folder))} of at most {_gb(cap)} ({_env.CACHE_CAP_VAR}); "
              f"clear it with `rm -rf {folder}`.", file=sys.stderr)
    return TeacherOutputs(_open_entry(entry, fetch), entry, key, computed=True)


def entry_bytes(model: ModelProto, data: Dataset, fetch: Sequence[str], preference: str = "cpu") -> int:
    """Bytes the fetched tensors of every sample would take: the teacher run on one sample, times N."""
    with tempfile.TemporaryDirectory() as spill:
        one = runnable_session(model, Path(spill), preference).run(list(fetch), data.batch(np.arange(1)))
    return sum(int(a.nbytes) for a in one) * len(data)


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def evict(folder: Path, cap: int, keep: Path) -> int:
    """Delete the least recently used complete entries (never `keep`) until `folder` fits in `cap` bytes."""
    entries = [e for e in folder.iterdir() if e != keep and (e / MANIFEST).is_file()]
    entries.sort(key=lambda e: (e / MANIFEST).stat().st_mtime)
    total, removed = _size(folder), 0
    for old in entries:
        if total <= cap:
            break
        total -= _size(old)
        shutil.rmtree(old, ignore_errors=True)
        removed += 1
    return removed


class OnlineTeacher:
    """The teacher run in ONNX Runtime on each batch as it is trained on, instead of from the cache.

    For inputs that exist only at training time (augmented batches) and for feature KD on more tensors
    than a disk can hold (every factorised layer's output of a text model is tens of GB over a corpus).
    Costs one teacher forward per step, which is small next to the student's forward and backward.
    """

    def __init__(self, teacher: Path, data: Dataset, fetch: Sequence[str], preference: str = "auto",
                 threads: int = 0) -> None:
        self.fetch = list(fetch)
        model = fetching_teacher(teacher, data, self.fetch)
        self._spill = tempfile.TemporaryDirectory(prefix="onnx-inher-teacher-")
        self._session = runnable_session(model, Path(self._spill.name), preference, threads)

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.fetch, self._session.run(self.fetch, feeds), strict=True))


def fetching_teacher(teacher: Path, data: Dataset, fetch: Sequence[str]) -> ModelProto:
    """The teacher, checked against the data's inputs, with `fetch` as its graph outputs."""
    loaded = load_model(teacher).model
    _check_inputs(loaded, data, teacher)
    return with_outputs(loaded, fetch, teacher)


def _check_inputs(model: ModelProto, data: Dataset, path: Path) -> None:
    """Teacher and student must read the same named inputs: the student was derived from the teacher."""
    inits = {t.name for t in model.graph.initializer}
    names = sorted(i.name for i in model.graph.input if i.name not in inits)
    if names != sorted(data.inputs):
        raise InputError(f"{path}: the teacher reads inputs {names} but the data provides {sorted(data.inputs)}; "
                         "distill a student compressed from this teacher.")


def _compute(model: ModelProto, data: Dataset, fetch: Sequence[str], staging: Path, batch_size: int,
             preference: str) -> None:
    """Run the teacher batch by batch, writing each fetched tensor into its own memory-mapped .npy."""
    with tempfile.TemporaryDirectory() as spill:
        runner = runnable_session(model, Path(spill), preference)
        files = _run_batches(runner, data, fetch, staging, batch_size)
    manifest = {"format": FORMAT, "samples": len(data),
                "tensors": {name: {"file": _file_name(fetch, name), "dtype": files[name].dtype.str,
                                   "shape": list(files[name].shape)} for name in fetch}}
    for array in files.values():
        array.flush()
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _run_batches(runner: Any, data: Dataset, fetch: Sequence[str], staging: Path,
                 batch_size: int) -> dict[str, np.ndarray]:
    n = len(data)
    files: dict[str, np.ndarray] = {}
    quiet = _env.progress_disabled()
    for start in tqdm(range(0, n, batch_size), desc="teacher", unit="batch", disable=quiet, leave=False):
        index = np.arange(start, min(start + batch_size, n))
        results = runner.run(list(fetch), data.batch(index))
        for name, value in zip(fetch, results, strict=True):
            if value.ndim == 0 or value.shape[0] != len(index):
                raise InputError(f"teacher output '{name}' has shape {list(value.shape)} for a batch of "
                                 f"{len(index)}: it has no batch axis, so it cannot be distilled per sample.")
            if name not in files:
                files[name] = np.lib.format.open_memmap(staging / _file_name(fetch, name), mode="w+",
                                                        dtype=value.dtype, shape=(n, *value.shape[1:]))
            target = files[name]
            if value.shape[1:] != target.shape[1:]:
                raise InputError(f"teacher output '{name}' changes shape between batches "
                                 f"({list(target.shape[1:])} vs {list(value.shape[1:])}); pad the inputs "
                                 "to one length.")
            target[start:start + len(index)] = value
    return files


def _file_name(fetch: Sequence[str], name: str) -> str:
    """ONNX names may hold '/' or ':'; files are numbered by fetch position instead."""
    return f"{list(fetch).index(name):04d}.npy"


def _open_entry(entry: Path, fetch: Sequence[str]) -> dict[str, np.ndarray]:
    manifest = json.loads((entry / MANIFEST).read_text())
    if manifest.get("format") != FORMAT or list(manifest["tensors"]) != list(fetch):
        raise InputError(f"{entry}: teacher cache entry is from another version; delete the folder.")
    return {name: np.load(entry / info["file"], mmap_mode="r") for name, info in manifest["tensors"].items()}
