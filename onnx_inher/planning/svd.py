"""Truncated SVD in float32 with a fixed sign convention (pure numpy).

The sign fix (largest-magnitude entry of each left singular vector positive) makes factors
reproducible across LAPACK builds, which keeps compressed files byte-identical run to run.
BLAS runs single-threaded in here: a threaded eigensolver or float32 product gives different
low bits with 1 and 2 threads (so a file would depend on the core count), and on a shared 2-core
machine OpenBLAS's spinning threads made BERT-base's SVDs 5-8x slower than one thread.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from threadpoolctl import ThreadpoolController

RELATIVE_CUTOFF = 1e-7
_controller: ThreadpoolController | None = None


@contextmanager
def _one_blas_thread() -> Iterator[None]:
    """Pin BLAS/LAPACK to one thread (the controller is built once: scanning libraries costs ms)."""
    global _controller
    if _controller is None:
        _controller = ThreadpoolController()
    with _controller.limit(limits=1, user_api="blas"):
        yield


@dataclass(frozen=True)
class Factors:
    """Per-group factors: `up[g] @ down[g] ~= M[g]`; up = U_r S_r `[g, out, r]`, down = V_r^T `[g, r, in]`."""

    up: np.ndarray
    down: np.ndarray


def _gram(m: np.ndarray) -> tuple[np.ndarray, bool]:
    """Float64 Gram matrix of the smaller side (`M M^T` if out <= in, else `M^T M`)."""
    m64 = m.astype(np.float64)
    wide = m.shape[1] <= m.shape[2]
    return (m64 @ np.swapaxes(m64, 1, 2) if wide else np.swapaxes(m64, 1, 2) @ m64), wide


def singular_values(matrices: np.ndarray) -> np.ndarray:
    """`[g, min(out, in)]` singular values, descending (no vectors: cheap, and all a plan needs)."""
    with _one_blas_thread():
        gram, _ = _gram(matrices)
        w = np.linalg.eigvalsh(gram)[:, ::-1]
    return np.sqrt(np.clip(w, 0, None)).astype(np.float32)


def full_svd(matrices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD through a float64 eigendecomposition of the smaller Gram matrix.

    5-10x faster than LAPACK's gesdd on the 2-core machines we target (a 4096 x 18432 layer takes
    seconds, not minutes) and accurate for singular values above ~1e-7 of the largest. Directions
    whose singular value is below that are dropped (their share of the layer is below 1e-7).
    """
    with _one_blas_thread():
        return _full_svd(matrices)


def _full_svd(matrices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    e = _eigen(matrices)
    return _factors(matrices, e, e.vecs.shape[2])


# the factors' products run in blocks of this many singular vectors, so that a rank-r cut is the same bytes as
# the first r columns of the full SVD: BLAS may round a product differently at another shape
PRODUCT_BLOCK = 64


@dataclass(frozen=True)
class Eigen:
    """A weight's singular values and the leading eigenvectors of its smaller Gram side (`[g, n, k]`, float32).

    The eigensolve is the O(n^3) part of an SVD; a plan needs the values and a compress the factors of the
    same weight, so keeping the vectors a rank can need lets the factors follow by one product with the
    weight (`factors`) instead of a second Gram matrix and eigensolve (16 s of AlexNet's 52 s compress)."""

    s: np.ndarray  # [g, min(out, in)] float64, descending, zero below RELATIVE_CUTOFF of the largest
    vecs: np.ndarray  # [g, n, k] float32: M M^T's eigenvectors if `wide` (n = out), else M^T M's (n = in)
    wide: bool

    @property
    def complete(self) -> bool:
        return self.vecs.shape[2] == self.vecs.shape[1]

    def covers(self, rank: int) -> bool:
        """Whether `factors` at `rank` needs no vector beyond these (its last product block included)."""
        return self.complete or self.vecs.shape[2] >= _block_end(rank, self.vecs.shape[1])

    def cut(self, k: int) -> Eigen:
        """The first `k` vectors (a multiple of PRODUCT_BLOCK, or all), as their own array."""
        k = min(k, self.vecs.shape[1])
        return self if k >= self.vecs.shape[2] else Eigen(self.s, np.ascontiguousarray(self.vecs[:, :, :k]), self.wide)


def _block_end(rank: int, n: int) -> int:
    return min(n, -(-max(rank, 1) // PRODUCT_BLOCK) * PRODUCT_BLOCK)


def eigen(matrices: np.ndarray) -> Eigen:
    with _one_blas_thread():
        return _eigen(matrices)


def _eigen(matrices: np.ndarray) -> Eigen:
    gram, wide = _gram(matrices)
    w, vecs = np.linalg.eigh(gram)
    del gram
    s = np.sqrt(np.clip(w[:, ::-1], 0, None))
    s = np.where(s > RELATIVE_CUTOFF * s[:, :1], s, 0.0)
    return Eigen(s, np.ascontiguousarray(vecs[:, :, ::-1], dtype=np.float32), wide)


def factors(matrices: np.ndarray, e: Eigen, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(u, s, vt)` cut to `rank` from a weight and its `Eigen` (which must cover the rank): the same bytes as
    the first `rank` components of `full_svd`."""
    with _one_blas_thread():
        return _factors(matrices, e, rank)


def _factors(matrices: np.ndarray, e: Eigen, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not e.covers(rank):
        raise ValueError(f"eigenvectors cut at {e.vecs.shape[2]} cannot give rank {rank}")
    n = e.vecs.shape[1]
    rank = min(rank, n)
    end = _block_end(rank, n)
    s = e.s[:, :end]
    keep = s > 0
    inv = np.where(keep, 1.0 / np.where(keep, s, 1.0), 0.0).astype(np.float32)
    m32 = matrices.astype(np.float32, copy=False)
    blocks = [e.vecs[:, :, i:min(i + PRODUCT_BLOCK, n)] for i in range(0, end, PRODUCT_BLOCK)]
    if e.wide:
        u = e.vecs[:, :, :end]
        vt = np.concatenate([np.swapaxes(b, 1, 2) @ m32 for b in blocks], axis=1) * inv[:, :, None]
    else:
        vt = np.swapaxes(e.vecs[:, :, :end], 1, 2)
        u = np.concatenate([m32 @ b for b in blocks], axis=2) * inv[:, None, :]
    flip = np.sign(np.take_along_axis(u, np.abs(u).argmax(axis=1, keepdims=True), axis=1))
    flip[flip == 0] = 1
    u, vt = u * flip, vt * np.swapaxes(flip, 1, 2)
    return (np.ascontiguousarray(u[:, :, :rank], dtype=np.float32), s[:, :rank].astype(np.float32),
            np.ascontiguousarray(vt[:, :rank], dtype=np.float32))


def truncate(svd: tuple[np.ndarray, np.ndarray, np.ndarray], rank: int) -> Factors:
    u, s, vt = svd
    return Factors(up=u[:, :, :rank] * s[:, None, :rank], down=vt[:, :rank, :])


def energy_kept(s: np.ndarray, rank: int) -> float:
    """Share of squared singular values (Frobenius energy) the rank keeps, over all groups."""
    total = float(np.sum(s.astype(np.float64) ** 2))
    return 1.0 if total == 0 else float(np.sum(s[:, :rank].astype(np.float64) ** 2) / total)


def rank_for_energy(s: np.ndarray, energy: float) -> int:
    """Smallest rank keeping at least `energy` of the Frobenius energy."""
    power = np.sum(s.astype(np.float64) ** 2, axis=0)
    total = power.sum()
    if total == 0:
        return 1
    cum = np.cumsum(power) / total
    return int(min(np.searchsorted(cum, energy - 1e-12) + 1, s.shape[1]))


WHITENING_DAMPING = 1e-2


def whitening(gram: np.ndarray, damping: float = WHITENING_DAMPING) -> tuple[np.ndarray, np.ndarray]:
    """`(S, S^-1)` with `S S^T = C + λI` for an input Gram matrix `C = X^T X` (`[in, in]`, float64).

    Symmetric square root by eigh rather than SVD-LLM's Cholesky: a Gram matrix from few samples or
    dead features is singular and Cholesky fails, while the damped eigenvalues here stay positive.
    `λ = damping * mean eigenvalue` keeps `S` well conditioned (so full rank stays exact in float32)
    and pulls directions the calibration data never excites back toward plain SVD.
    """
    c = np.asarray(gram, dtype=np.float64)
    c = (c + c.T) / 2
    floor = damping * max(float(np.trace(c)) / len(c), np.finfo(np.float64).tiny)
    with _one_blas_thread():
        w, q = np.linalg.eigh(c + floor * np.eye(len(c)))
    root = np.sqrt(np.clip(w, floor, None))
    return q * root, (q / root).T


def whitened_svd(matrices: np.ndarray, gram: np.ndarray, damping: float = WHITENING_DAMPING,
                 rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Data-aware SVD (SVD-LLM): `(U, s, V^T S^-1)` from the SVD `M S = U diag(s) V^T`.

    Truncating it to rank r minimises the output error `sum_x |(M - M_r) x|^2 = |(M - M_r) S|_F^2` over
    the calibration inputs (with `S S^T` their Gram matrix) instead of the weight error `|M - M_r|_F`,
    so a layer keeps the directions its inputs use. `truncate` applies unchanged: up = `U_r s_r`,
    down = `V_r^T S^-1`; at full rank `U diag(s) V^T S^-1 = M`. The singular values are those of `M S`.
    A `[g, in, in]` gram whitens each group of a grouped convolution with its own inputs' Gram matrix.

    `rows` (`[out]`, positive) weights the output side too: the truncation then minimises
    `|D (M - M_r) S|_F` with `D = diag(rows)`, for outputs whose errors do not all cost the same (a
    classifier's logits: see `calibrate.output_weights`). `U` comes back as `D^-1 U`, so full rank stays `M`.
    """
    gram = np.asarray(gram)
    if gram.ndim == 3:
        parts = [whitened_svd(matrices[j:j + 1], gram[j], damping) for j in range(len(gram))]
        u, s, down = (np.concatenate(p) for p in zip(*parts, strict=True))
        return u, s, down
    s_mat, s_inv = whitening(gram, damping)
    d = None if rows is None else np.asarray(rows, dtype=np.float64)[:, None]
    with _one_blas_thread():
        scaled = matrices.astype(np.float64) @ s_mat
        u, s, vt = _full_svd((scaled if d is None else d * scaled).astype(np.float32))
        down = (vt.astype(np.float64) @ s_inv).astype(np.float32)
        if d is not None:
            u = (u.astype(np.float64) / d).astype(np.float32)
    return u, s, down


@dataclass(frozen=True)
class OutputGram:
    """`Y^T Y` of a layer's outputs less bias (`[g, out, out]`, float64): whitening on the output side.

    A layer's input Gram matrix is `in x in`; CREPE's second conv reads 1,024 channels through a 64-tap
    kernel, so its patches have 65,536 values and their Gram matrix would take 34 GB (and the sampled
    patch rows more). The output-side Gram of the same calibration samples is `out x out` (128 x 128
    there) and leads to the same truncation (`response_svd`)."""

    gram: np.ndarray


def response_svd(matrices: np.ndarray, gram: np.ndarray, damping: float = WHITENING_DAMPING,
                 lead: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Data-aware SVD from the outputs' Gram matrix `C_y = M C_x M^T` (Zhang et al. 2015, "Accelerating
    Very Deep Convolutional Networks": the principal subspace of a layer's responses).

    The best rank-r approximation of the responses `M X` is `U_r U_r^T M X`, with `U_r` the top-r
    eigenvectors of `C_y`; `M_r = U_r U_r^T M` reaches it, so truncating `(U, s, V^T)` with `V^T = U^T M / s`
    (s: the row norms) minimises the same output error as `whitened_svd`, from an `out x out` matrix. Full
    rank is exact (`U U^T = I`). Damping adds `mu M M^T` (the plain SVD's Gram, `mu` = `damping` x their trace
    ratio), as `whitened_svd` adds `lambda I` to `C_x`: directions the samples never excite fall back to plain
    SVD. `lead` (`[g, out, out]`) approximates `L M` instead, for responses that should become `L y`
    (`sequential`'s least-squares map from the student's responses to the teacher's); `C_y` is then the
    Gram matrix of the responses `L` is applied to."""
    c_all = np.asarray(gram, dtype=np.float64)
    c_all = c_all[None] if c_all.ndim == 2 else c_all
    us, ss, vts = [], [], []
    with _one_blas_thread():
        for j in range(len(matrices)):
            m = matrices[j].astype(np.float64)
            plain = m @ m.T
            c = (c_all[j] + c_all[j].T) / 2
            mu = damping * float(np.trace(c)) / max(float(np.trace(plain)), np.finfo(np.float64).tiny)
            lm = m if lead is None else lead[j] @ m
            k = c + mu * plain if lead is None else lead[j] @ (c + mu * plain) @ lead[j].T
            _, u = np.linalg.eigh((k + k.T) / 2)
            u = u[:, ::-1]
            flip = np.sign(np.take_along_axis(u, np.abs(u).argmax(axis=0, keepdims=True), axis=0))
            flip[flip == 0] = 1
            u = u * flip
            b = u.T @ lm
            s = np.linalg.norm(b, axis=1)
            vt = b / np.where(s > 0, s, 1.0)[:, None]
            us.append(u)
            ss.append(s)
            vts.append(vt)
    return (np.stack(us).astype(np.float32), np.stack(ss).astype(np.float32), np.stack(vts).astype(np.float32))


def data_aware_svd(matrices: np.ndarray, gram: np.ndarray | OutputGram, damping: float = WHITENING_DAMPING,
                   rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`whitened_svd` for an input Gram matrix, `response_svd` for an `OutputGram` (which has no class-row
    weighting: it serves layers with huge inputs, not classifier heads)."""
    if isinstance(gram, OutputGram):
        return response_svd(matrices, gram.gram, damping)
    return whitened_svd(matrices, gram, damping, rows=rows)


def output_error(matrices: np.ndarray, factors: Factors, gram: np.ndarray) -> float:
    """Relative output error `|(M - up down) S|_F / |M S|_F` on inputs with Gram matrix `gram` (`[in, in]`,
    or `[g, in, in]` per group)."""
    return approximation_error(matrices, factors.up.astype(np.float64) @ factors.down.astype(np.float64), gram)


def approximation_error(matrices: np.ndarray, approx: np.ndarray, gram: np.ndarray) -> float:
    """Relative output error `|(M - A) S|_F / |M S|_F` of any approximation `A` of `M` (`[g, out, in]`)."""
    c = np.asarray(gram, dtype=np.float64)
    spec = "goi,gij,goj->" if c.ndim == 3 else "goi,ij,goj->"
    m = matrices.astype(np.float64)
    diff = m - approx.astype(np.float64)
    err = float(np.einsum(spec, diff, c, diff))
    ref = float(np.einsum(spec, m, c, m))
    return float(np.sqrt(max(err, 0.0) / max(ref, np.finfo(np.float64).tiny)))


def balanced(factors: Factors) -> Factors:
    """The same product `up @ down` with `down` given orthonormal rows (QR), `up` absorbing the rest.

    Whitened factors carry `S^-1` in `down`: its columns for high-variance inputs are tiny and their
    gradients large (norm ~60 vs ~2 for plain SVD on MiniLM), so one AdamW step (same-size update for
    every entry) wrecked the student. With orthonormal rows `down` is scaled like plain SVD's `V_r^T`
    and fine-tuning behaves as it does after plain SVD; the function is unchanged. Signs are fixed
    (diagonal of R positive) so the result does not depend on the LAPACK build.
    """
    with _one_blas_thread():
        q, r = np.linalg.qr(np.swapaxes(factors.down.astype(np.float64), 1, 2))
        sign = np.sign(np.diagonal(r, axis1=1, axis2=2)).copy()
        sign[sign == 0] = 1
        q, r = q * sign[:, None, :], r * sign[:, :, None]
        up = factors.up.astype(np.float64) @ np.swapaxes(r, 1, 2)
    return Factors(up=up.astype(np.float32), down=np.ascontiguousarray(np.swapaxes(q, 1, 2)).astype(np.float32))
