"""The paper's two measures: significance scores (Eq. 5) and reconstruction error (Eq. 9, 13)."""

from __future__ import annotations

import math

from ._batching import flatten
from ._clustering import reconstruction_objective
from ._compat import Array, compute_dtype, device
from ._validation import check_same_device, check_token_values, check_tokens, namespace_of

__all__ = ["reconstruction_error", "significance_scores"]


def significance_scores(attn: Array) -> Array:
    """Significance score of each key token, Eq. 5: ``s = sum_h A_h^T 1``.

    The total attention a token receives, summed over heads and queries (PoWER-BERT).

    Parameters
    ----------
    attn : array (..., H, Nq, Nk)
        Attention probabilities (softmax over the last axis).

    Returns
    -------
    array (..., Nk)
        Same dtype as ``attn``; half precision is summed in float32.

    Examples
    --------
    >>> import numpy as np
    >>> attn = np.array([[[0.5, 0.5], [1.0, 0.0]]])  # one head, two queries
    >>> significance_scores(attn).tolist()
    [1.5, 0.5]
    """
    xp = namespace_of(attn=attn)
    if attn.ndim < 3:
        raise ValueError(f"attn must have shape (..., H, Nq, Nk), got a {attn.ndim}-d array")
    if not xp.isdtype(attn.dtype, "real floating"):
        raise TypeError(f"attn must have a real floating dtype, got {attn.dtype}")
    summed = xp.sum(xp.astype(attn, compute_dtype(xp, attn.dtype)), axis=(-3, -2))
    return xp.astype(summed, attn.dtype)


def reconstruction_error(x: Array, centers: Array, *, weights: Array | None = None) -> Array:
    """Asymmetric Chamfer divergence of Eq. 9, or its weighted form Eq. 13.

    ``sum_i w_i min_j |x_i - c_j|^2``: the error of reconstructing every token of ``x`` by its
    nearest centre (nearest-neighbour upsampling, Eq. 8).

    Parameters
    ----------
    x : array (..., N, M)
        Original tokens.
    centers : array (..., K, M)
        Downsampled tokens, same batch shape and M.
    weights : array (..., N), optional
        Non-negative weights ``w_i`` (Eq. 13); ones when omitted (Eq. 9).

    Returns
    -------
    array (...)
        In the compute dtype (float32 for half-precision input). +inf when K = 0 < N.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.array([[0.0], [1.0], [3.0]])
    >>> float(reconstruction_error(x, np.array([[0.0], [3.0]])))
    1.0
    """
    xp = namespace_of(x=x, centers=centers, weights=weights)
    check_tokens(xp, x)
    check_tokens(xp, centers, name="centers")
    check_same_device(xp, "x", x=x, centers=centers, weights=weights)
    if tuple(centers.shape[:-2]) != tuple(x.shape[:-2]) or centers.shape[-1] != x.shape[-1]:
        expected = (*x.shape[:-2], "K", x.shape[-1])
        raise ValueError(f"centers must have shape (..., K, M) = {expected} to match x, "
                         f"got {tuple(centers.shape)}")
    check_token_values(xp, weights, "weights", tuple(x.shape[:-1]))
    batch = flatten(xp, x)
    n, k = x.shape[-2], centers.shape[-2]
    if k == 0 or n == 0:
        value = math.inf if n > 0 else 0.0
        return xp.full(batch.batch_shape, value, dtype=batch.x.dtype, device=device(x))
    w = batch.flat(weights)
    w = xp.ones(batch.x.shape[:2], dtype=batch.x.dtype, device=device(x)) if w is None else w
    error = reconstruction_objective(batch.prims, batch.x, batch.mean,
                                     batch.flat_tokens(centers), w)
    return batch.unflat(error)
