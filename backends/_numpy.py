"""NumPy fast paths: distance matrices assembled in place, in one buffer.

Segment sums stay generic on NumPy: the one-hot matrix product runs in BLAS and measured
4-6x faster than ``np.add.at`` or ``np.add.reduceat`` for token-sized rows (B=64, N=196,
M=384).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from tokenpool_ops._primitives import read_flags_on_host
from tokenpool_ops._primitives import sq_distances as generic_sq_distances
from tokenpool_ops._primitives import top_k as generic_top_k


def sq_distances(xp: Any, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Generic ``sq_distances`` assembled in one buffer: the peak is one (B, N, K) array.

    ``-2 a.b`` comes first here, so it could overflow to -inf and be clamped to a finite 0.
    That needs ``|a|^2 + |b|^2`` beyond half the dtype's range, which the squared norms
    tell: then the generic order runs, where an overflow stays infinite or NaN (_overflow).
    """
    sq_a = np.einsum("bnm,bnm->bn", a, a)
    sq_b = np.einsum("bkm,bkm->bk", b, b)
    if sq_a.max(initial=0) + sq_b.max(initial=0) > np.finfo(a.dtype).max / 2:
        return generic_sq_distances(xp, a, b)
    dist = np.matmul(a, np.swapaxes(b, -1, -2))
    dist *= -2
    dist += sq_a[:, :, None]
    dist += sq_b[:, None, :]
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
    "read_flags": read_flags_on_host,
}


# ---------------------------------------------------------------------------------------------
# Compiled kernels (Numba), used when Numba is installed


#: Bytes of centred tokens per block in the medoid Gram product (see _numba.medoid_gram):
#: small enough to stay in cache between the gather and the product. Measured fastest for
#: N=196, M=384 (B=64): 256 KiB on NumPy, 2 MiB on PyTorch.
BLOCK_BYTES = 1 << 18


def _matmul_transposed(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
    # The method, not np.swapaxes: that wrapper is three Python calls, once per block.
    np.matmul(a, b.swapaxes(-1, -2), out=out)


def compiled_paths() -> dict[str, Callable[..., Any]]:
    """The Numba kernels for NumPy arrays (ImportError without Numba).

    Serial kernels: OpenBLAS threads keep spinning after each matrix product, and parallel
    Numba threads competing with them for the same cores ran 5-10x slower.
    """
    from . import _numba  # noqa: F401  (ImportError here without Numba, as documented)

    return {"kmedoids": _kmedoids, "kmeans": _kmeans, "weighted_means": _weighted_means,
            "segment_sum": _segment_sum, "merge": _merge, "kmedoids_merge": _kmedoids_merge,
            "top_k": _top_k}


# The entries of compiled_paths, defined once (not per call: primitives are looked up at every
# pool call). Each imports _numba when first called, which compiled_paths has already done.


def _kmedoids(xp: Any, x: np.ndarray, mean: np.ndarray, init: np.ndarray, weights: np.ndarray,
              max_iter: int, stop_early: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    from . import _numba

    gram = _numba.medoid_gram(x, mean, init, BLOCK_BYTES, _matmul_transposed)
    return _numba.kmedoids(x, mean, gram, init, weights, max_iter, stop_early, False)


def _kmeans(xp: Any, x: np.ndarray, mean: np.ndarray, init: np.ndarray, weights: np.ndarray,
            fallback: np.ndarray | None, max_iter: int,
            stop_early: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    from . import _numba

    gram = _numba.centred_gram(x, mean, BLOCK_BYTES, _matmul_transposed)
    return _numba.kmeans(x, mean, gram, init, weights, fallback, max_iter, stop_early, False)


def _weighted_means(xp: Any, values: np.ndarray, labels: np.ndarray, k: int,
                    weights: np.ndarray, empty: np.ndarray) -> np.ndarray:
    from . import _numba

    return _numba.weighted_means(values, labels, k, weights, empty, False)


def _segment_sum(xp: Any, values: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    from . import _numba

    return _numba.segment_sum(values, labels, k)


def _merge(xp: Any, x: np.ndarray, mean: np.ndarray, labels: np.ndarray, k: int,
           weights: np.ndarray, fallback: np.ndarray | None, carried: np.ndarray,
           with_objective: bool) -> tuple[np.ndarray, np.ndarray, None] | None:
    """``Primitives.merge``: the tokens and sizes in one Numba pass (``_numba.merge``), the
    same bit for bit as the weights, means and sums above; None (the generic merge runs)
    where the objective is asked for or the dtypes differ."""
    from . import _numba

    given = (x, mean, weights, carried) + (() if fallback is None else (fallback,))
    if with_objective or any(a.dtype != x.dtype for a in given):
        return None
    tokens, sizes = _numba.merge(x, labels, k, weights, fallback, carried, mean, False)
    return tokens, sizes, None


def _kmedoids_merge(xp: Any, x: np.ndarray, mean: np.ndarray, init: np.ndarray,
                    weights: np.ndarray, fallback: np.ndarray | None, carried: np.ndarray,
                    max_iter: int, stop_early: bool
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, np.ndarray,
                               np.ndarray] | None:
    """``Primitives.kmedoids_merge``: :func:`_kmedoids` and :func:`_merge` in one Numba
    kernel (``_numba.kmedoids_merge``); None where ``_merge`` would not apply (dtypes that
    differ)."""
    from . import _numba

    given = (x, mean, weights, carried) + (() if fallback is None else (fallback,))
    if any(a.dtype != x.dtype for a in given):
        return None
    gram = _numba.medoid_gram(x, mean, init, BLOCK_BYTES, _matmul_transposed)
    return _numba.kmedoids_merge(x, mean, gram, init, weights, fallback, carried, max_iter,
                                 stop_early, False)


def _top_k(xp: Any, keys: np.ndarray, k: int) -> np.ndarray:
    """``Primitives.top_k`` by selection (``_numba.top_k``), for float32 and float64 keys
    without NaN; the generic sort otherwise. The same indices."""
    from . import _numba

    if keys.dtype in (np.float32, np.float64):
        chosen = _numba.top_k(keys, k)
        if chosen is not None:
            return chosen
    return generic_top_k(xp, keys, k)
