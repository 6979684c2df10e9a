"""NumPy fast paths: distance matrices assembled in place, in one buffer.

Segment sums stay generic on NumPy: the one-hot matrix product runs in BLAS and measured
4-6x faster than ``np.add.at`` or ``np.add.reduceat`` for token-sized rows (B=64, N=196,
M=384).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


def sq_distances(xp: Any, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Generic ``sq_distances`` assembled in one buffer: the peak is one (B, N, K) array."""
    dist = np.matmul(a, np.swapaxes(b, -1, -2))
    dist *= -2
    dist += np.einsum("bnm,bnm->bn", a, a)[:, :, None]
    dist += np.einsum("bkm,bkm->bk", b, b)[:, None, :]
    return np.maximum(dist, 0, out=dist)


def self_sq_distances(xp: Any, a: np.ndarray) -> np.ndarray:
    """Generic ``self_sq_distances`` in place: the lower triangle mirrors the upper one.

    Mirroring in place needs a temporary of half the matrix, where the generic ``where``
    needs a whole one.
    """
    dist = sq_distances(xp, a, a)
    n = a.shape[-2]
    rows, cols = np.tril_indices(n, -1)
    dist[:, rows, cols] = dist[:, cols, rows]
    dist.reshape(dist.shape[0], n * n)[:, :: n + 1] = 0
    return dist


def medoid_assignment(
    xp: Any, token_dist: np.ndarray, medoids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Generic ``medoid_assignment`` reading rows, not columns, of the symmetric matrix.

    Fancy indexing copies K contiguous rows per problem, 3x faster than the broadcast
    ``take_along_axis`` of columns; the self-assignment of medoids is a scatter of K entries
    instead of two masked passes over (B, N, K).
    """
    problems = np.arange(medoids.shape[0])[:, None]
    to_medoids = token_dist[problems, medoids]  # (B, K, N) == columns, by exact symmetry
    labels = np.argmin(to_medoids, axis=1)
    nearest = np.min(to_medoids, axis=1)  # a medoid is at distance 0 from itself
    labels[problems, medoids] = np.arange(medoids.shape[1])
    return labels, nearest


def gather_rows(xp: Any, values: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Generic ``gather_rows`` by fancy indexing: no (B, K, C) index array is built."""
    return values[np.arange(index.shape[0])[:, None], index]


FAST_PATHS: dict[str, Callable[..., Any]] = {
    "sq_distances": sq_distances,
    "self_sq_distances": self_sq_distances,
    "medoid_assignment": medoid_assignment,
    "gather_rows": gather_rows,
}


# ---------------------------------------------------------------------------------------------
# Compiled kernels (Numba), used when Numba is installed


#: Bytes of centred tokens per block when the medoid Gram rows are built block by block:
#: small enough to stay in cache between the centring and the matrix product. Measured
#: fastest for N=196, M=384 (B=64): 256 KiB on NumPy, 2 MiB on PyTorch.
BLOCK_BYTES = 1 << 18


def problem_block(n: int, m: int, itemsize: int, block_bytes: int = BLOCK_BYTES) -> int:
    """Problems per block so that a block of centred tokens stays near ``block_bytes``."""
    return max(1, block_bytes // max(1, n * m * itemsize))


def medoid_gram_rows(x: np.ndarray, mean: np.ndarray, medoids: np.ndarray) -> np.ndarray:
    """Dot products of the centred medoids with the centred tokens, (B, K, N).

    Centred a block of problems at a time into reused buffers, so that no centred copy of
    all of ``x`` exists.
    """
    n_problems, n, m = x.shape
    k = medoids.shape[1]
    out = np.empty((n_problems, k, n), dtype=x.dtype)
    step = problem_block(n, m, x.itemsize)
    centred = np.empty((step, n, m), dtype=x.dtype)
    picked = np.empty((step * k, m), dtype=x.dtype)
    for start in range(0, n_problems, step):
        size = min(step, n_problems - start)
        block = np.subtract(x[start:start + size], mean[start:start + size], out=centred[:size])
        rows = (medoids[start:start + size] + n * np.arange(size)[:, None]).reshape(-1)
        chosen = np.take(block.reshape(size * n, m), rows, axis=0, out=picked[:size * k])
        np.matmul(chosen.reshape(size, k, m), np.swapaxes(block, -1, -2),
                  out=out[start:start + size])
    return out


def compiled_paths() -> dict[str, Callable[..., Any]]:
    """The Numba kernels for NumPy arrays (ImportError without Numba).

    Serial kernels: OpenBLAS threads keep spinning after each matrix product, and parallel
    Numba threads competing with them for the same cores ran 5-10x slower.
    """
    from . import _numba

    def kmedoids(xp: Any, x: np.ndarray, mean: np.ndarray, init: np.ndarray,
                 weights: np.ndarray, max_iter: int,
                 stop_early: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        rows = medoid_gram_rows(x, mean, init)
        return _numba.kmedoids(x, mean, rows, init, weights, max_iter, stop_early, False)

    def weighted_means(xp: Any, values: np.ndarray, labels: np.ndarray, k: int,
                       weights: np.ndarray, empty: np.ndarray) -> np.ndarray:
        return _numba.weighted_means(values, labels, k, weights, empty, False)

    def segment_sum(xp: Any, values: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
        return _numba.segment_sum(values, labels, k)

    return {"kmedoids": kmedoids, "weighted_means": weighted_means, "segment_sum": segment_sum}
