"""NumPy fast paths: in-place distance assembly and scatter-add segment sums."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np


def sq_distances(xp: Any, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Generic ``sq_distances`` assembled in one buffer: the peak is one (B, N, K) array."""
    dist = np.matmul(a, np.swapaxes(b, -1, -2))
    dist *= -2
    dist += np.einsum("bnm,bnm->bn", a, a)[:, :, None]
    dist += np.einsum("bkm,bkm->bk", b, b)[:, None, :]
    return np.maximum(dist, 0, out=dist)


def self_sq_distances(xp: Any, a: np.ndarray) -> np.ndarray:
    """Generic ``self_sq_distances``, symmetrised and zeroed in place."""
    dist = sq_distances(xp, a, a)
    dist += np.swapaxes(dist, -1, -2)  # NumPy buffers the overlapping transpose for us
    dist *= 0.5
    n = a.shape[-2]
    dist.reshape(dist.shape[0], n * n)[:, :: n + 1] = 0
    return dist


def segment_sum(xp: Any, values: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Generic ``segment_sum`` by unbuffered scatter-add: O(N C) instead of O(N K C)."""
    batch, n, channels = values.shape
    out = np.zeros((batch * k, channels), dtype=values.dtype)
    rows = (labels + (np.arange(batch) * k)[:, None]).reshape(-1)
    np.add.at(out, rows, values.reshape(batch * n, channels))
    return out.reshape(batch, k, channels)


FAST_PATHS: dict[str, Callable[..., Any]] = {
    "sq_distances": sq_distances,
    "self_sq_distances": self_sq_distances,
    "segment_sum": segment_sum,
}
