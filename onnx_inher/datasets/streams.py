"""Arrays whose samples are read on demand: data that stays on disk until a batch asks for it.

A `Rows` looks like a read-only numpy array with the samples on axis 0 (`shape`, `dtype`, `ndim`, `len`,
indexing), but it holds no samples: `rows[index]` reads, decodes and returns exactly those samples. Image
folders, WAV folders, text lines, `.npz` members and a Python hook's feeds are all `Rows`, so calibration,
evaluation and distillation read them batch by batch, and `Dataset.take` (the train/validation split) makes
a view (an index into the same files), never a copy.

Memory bound: one read holds the batch it returns plus, for decoded sources, one decoded file at a time;
`chunks()` (validation, fingerprints) reads at most `CHUNK_BYTES` of samples at once. Data that comes from a
stream (a hook) or a compressed archive is first spilled to an unlinked temporary file (under the cache root,
`spill_dir`) and memory-mapped.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from onnx_inher._env import cache_root
from onnx_inher.errors import InputError

CHUNK_BYTES = 16 << 20
Array = Any  # np.ndarray or Rows: what a Dataset holds per input


class Rows:
    """Samples `index` (positions in the source) of a source read by `read(positions) -> ndarray`.

    `key` names the source and its preprocessing for fingerprints; `digest_row(digest, position)` feeds
    a cheap identity of one sample (e.g. the file's bytes) instead of hashing decoded values. `finite`
    says values are finite by construction (decoded pixels, audio, tokens), so validation skips the scan.
    """

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype, read: Callable[[np.ndarray], np.ndarray], *,
                 key: str = "", digest_row: Callable[[Any, int], None] | None = None, finite: bool = False,
                 index: np.ndarray | None = None) -> None:
        self._base_shape = tuple(int(d) for d in shape)
        self.dtype = np.dtype(dtype)
        self._read = read
        self.key = key
        self._digest_row = digest_row
        self.finite = finite
        self.index = np.arange(self._base_shape[0]) if index is None else np.asarray(index, dtype=np.int64)
        self._identity: str | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.index), *self._base_shape[1:])

    @property
    def ndim(self) -> int:
        return len(self._base_shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def __len__(self) -> int:
        return len(self.index)

    def __repr__(self) -> str:
        return f"Rows({self.key or 'stream'}, shape={list(self.shape)}, dtype={self.dtype})"

    def row_bytes(self) -> int:
        return max(1, int(np.prod(self._base_shape[1:])) * self.dtype.itemsize)

    def subset(self, index: Any) -> Rows:
        """A view of samples `index` of this view (nothing is read)."""
        picked = self.index[_positions(index, len(self))]
        return Rows(self._base_shape, self.dtype, self._read, key=self.key, digest_row=self._digest_row,
                    finite=self.finite, index=picked)

    def read(self, index: Any) -> np.ndarray:
        """Samples `index` (int array, slice or boolean mask over this view) as a new ndarray."""
        positions = self.index[_positions(index, len(self))]
        if len(positions) == 0:
            return np.empty((0, *self._base_shape[1:]), self.dtype)
        out = np.asarray(self._read(positions))
        if out.shape != (len(positions), *self._base_shape[1:]) or out.dtype != self.dtype:
            raise InputError(f"data '{self.key}': a read gave {out.dtype} {list(out.shape)}, expected "
                             f"{self.dtype} {[len(positions), *self._base_shape[1:]]}; its samples must all "
                             "have the same shape.")
        return out

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, tuple):
            if not key:
                return self.read(slice(None))
            first, rest = key[0], key[1:]
            if isinstance(first, (int, np.integer)):
                return self[first][rest]
            return self.read(first)[(slice(None), *rest)]
        if isinstance(key, (int, np.integer)):
            i = int(key) + (len(self) if key < 0 else 0)
            if not 0 <= i < len(self):
                raise IndexError(f"index {int(key)} is out of bounds for {len(self)} samples")
            return self.read(np.array([i]))[0]
        return self.read(key)

    def chunks(self, limit: int = CHUNK_BYTES) -> Iterator[np.ndarray]:
        """Consecutive runs of samples, at most `limit` bytes each (at least one sample)."""
        step = max(1, limit // self.row_bytes())
        for start in range(0, len(self), step):
            yield self.read(slice(start, start + step))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = np.empty(self.shape, self.dtype)
        step = max(1, CHUNK_BYTES // self.row_bytes())
        for start in range(0, len(self), step):
            out[start:start + step] = self.read(slice(start, start + step))
        return out if dtype is None else out.astype(dtype)

    def astype(self, dtype: Any) -> np.ndarray:
        """Every sample, converted (reads the whole view: for small arrays such as a mask)."""
        return np.asarray(self).astype(dtype)

    def reshape(self, *shape: Any) -> np.ndarray:
        return np.asarray(self).reshape(*shape)

    def digest_into(self, digest: Any) -> None:
        """Feed this view's samples to a hashlib digest: file identities where the source has them (with
        the preprocessing in `key`), else the decoded bytes chunk by chunk."""
        if self._digest_row is None:
            for chunk in self.chunks():
                digest.update(np.ascontiguousarray(chunk).tobytes())
            return
        if self._identity is None:  # computed once per view: a run asks for the data's key several times
            inner = hashlib.sha256(self.key.encode())
            for position in self.index:
                self._digest_row(inner, int(position))
            self._identity = inner.hexdigest()
        digest.update(self._identity.encode())


def _positions(index: Any, n: int) -> np.ndarray:
    if isinstance(index, slice):
        return np.arange(n)[index]
    picked = np.asarray(index)
    if picked.dtype == bool:
        if picked.shape != (n,):
            raise IndexError(f"boolean index of shape {list(picked.shape)} for {n} samples")
        return np.flatnonzero(picked)
    if picked.ndim == 0:
        picked = picked[None]
    if not np.issubdtype(picked.dtype, np.integer) and picked.size:
        raise IndexError(f"samples are selected by integers, a slice or a mask, not {picked.dtype}")
    picked = picked.astype(np.int64).reshape(-1)
    picked = np.where(picked < 0, picked + n, picked)
    if picked.size and (picked.min() < 0 or picked.max() >= n):
        raise IndexError(f"sample index out of bounds for {n} samples")
    return picked


def array_rows(array: np.ndarray, key: str) -> Rows:
    """A view over an array already addressable without copying (a memory map): indexing copies only the
    samples asked for."""
    return Rows(array.shape, array.dtype, lambda positions: np.ascontiguousarray(array[positions]), key=key)


def take_rows(value: Array, index: np.ndarray) -> Array:
    """Samples `index` of one input: a view for on-disk data (`Rows`, memory maps), a copy for arrays."""
    if isinstance(value, Rows):
        return value.subset(index)
    if isinstance(value, np.memmap):
        return array_rows(value, getattr(value, "filename", "") or "memmap").subset(index)
    return value[index]


def check_finite(where: str, name: str, value: Array) -> None:
    """NaN/inf scan, chunk by chunk for on-disk data (nothing is held beyond one chunk)."""
    if not np.issubdtype(value.dtype, np.floating) or getattr(value, "finite", False):
        return
    if isinstance(value, np.ndarray) and not isinstance(value, np.memmap):
        chunks: Iterator[np.ndarray] = iter([value])
    else:
        rows = value if isinstance(value, Rows) else array_rows(value, name)
        chunks = rows.chunks()
    for chunk in chunks:
        if not np.isfinite(chunk).all():
            raise InputError(f"{where}: '{name}' contains NaN or infinite values; clean the data.")


def digest_array(digest: Any, value: Array) -> None:
    """Feed one input's bytes to `digest` in C order, at most `CHUNK_BYTES` at a time (the same digest as
    hashing `value.tobytes()` whole, for any array)."""
    if isinstance(value, Rows):
        value.digest_into(digest)
        return
    n = len(value) if value.ndim else 1
    row = max(1, int(value.nbytes // max(n, 1)))
    step = max(1, CHUNK_BYTES // row)
    if value.ndim == 0:
        digest.update(np.ascontiguousarray(value).tobytes())
        return
    for start in range(0, n, step):
        digest.update(np.ascontiguousarray(value[start:start + step]).tobytes())


class Spill:
    """Samples written to an unlinked temporary file as they arrive, then memory-mapped: a stream (a hook,
    a compressed archive) becomes random-access data without being held in memory."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.handle = tempfile.TemporaryFile(prefix="onnx-inher-data-", dir=spill_dir())  # unlinked at once
        self.dtype: np.dtype | None = None
        self.sample_shape: tuple[int, ...] | None = None
        self.count = 0

    def append(self, batch: np.ndarray) -> None:
        batch = np.asarray(batch)
        if batch.ndim == 0:
            raise InputError(f"{self.what}: got a scalar; every array needs samples on axis 0.")
        if self.dtype is None:
            self.dtype, self.sample_shape = batch.dtype, tuple(batch.shape[1:])
        elif batch.dtype != self.dtype or tuple(batch.shape[1:]) != self.sample_shape:
            raise InputError(f"{self.what}: a batch of {batch.dtype} {list(batch.shape)} follows batches of "
                             f"{self.dtype} [N, {', '.join(map(str, self.sample_shape or ()))}]; every batch "
                             "needs the same dtype and sample shape.")
        if batch.dtype.hasobject:
            raise InputError(f"{self.what}: holds Python objects; yield numeric numpy arrays.")
        self.handle.write(np.ascontiguousarray(batch).tobytes())
        self.count += len(batch)

    def array(self) -> np.ndarray:
        """The samples written so far as a read-only memory map (or an empty array)."""
        if self.dtype is None or self.sample_shape is None:
            return np.empty((0,), np.float32)
        self.handle.flush()
        if self.count == 0 or self.dtype.itemsize * int(np.prod(self.sample_shape)) == 0:
            return np.empty((self.count, *self.sample_shape), self.dtype)
        mapped = np.memmap(self.handle, dtype=self.dtype, mode="r", shape=(self.count, *self.sample_shape))
        return mapped


def spill_dir() -> str | None:
    """Where spilled data goes: ``<cache root>/spill`` (on disk, where the teacher cache lives; /tmp is often
    RAM-backed), or the system's temporary folder if that cannot be created."""
    folder = cache_root() / "spill"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return str(folder) if os.access(folder, os.W_OK) else None


def spill_reader(read: Callable[[Any, int], bytes], what: str, dtype: np.dtype,
                 shape: tuple[int, ...], source: Any) -> np.ndarray:
    """Copy a C-ordered array of `shape` from a file-like `source` (read(source, n) -> bytes) to a spill
    file in `CHUNK_BYTES` pieces and memory-map it."""
    spill = Spill(what)
    total = int(np.prod(shape)) * np.dtype(dtype).itemsize
    spill.dtype, spill.sample_shape = np.dtype(dtype), tuple(shape[1:])
    done = 0
    while done < total:
        piece = read(source, min(CHUNK_BYTES, total - done))
        if not piece:
            raise InputError(f"{what}: the array ends after {done} of {total} bytes; write it again.")
        spill.handle.write(piece)
        done += len(piece)
    spill.count = shape[0] if shape else 1
    return spill.array()


def file_bytes_digest(path: os.PathLike[str] | str, digest: Any, relative: str) -> None:
    """A file's name (relative to its data folder) and bytes, for fingerprints."""
    digest.update(relative.encode() + b"\0")
    with open(path, "rb") as f:
        while piece := f.read(1 << 20):
            digest.update(piece)
