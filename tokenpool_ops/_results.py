"""What the public operators return: :class:`PoolResult` and :class:`Clustering`, and
the results that need no computation (k >= N, k = 0)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from ._compat import Array, device

if TYPE_CHECKING:
    from ._batching import Batch
    from ._clustering import FlatClustering

__all__ = ["Clustering", "PoolResult"]

#: The array fields (all but n_iter) of each result class, by class: dataclasses.fields
#: walks the class's fields anew at every call, a few times per pool call. Filled as the
#: classes are defined (:func:`with_array_fields`) and never after: traced code reads it, and
#: dynamo guards compiled code on what it read (see _compat.torch_compiling).
_ARRAY_FIELDS: dict[type, tuple[str, ...]] = {}


def with_array_fields(cls: type) -> type:
    """Register a result dataclass's array fields (a decorator, over ``@dataclass``)."""
    _ARRAY_FIELDS[cls] = tuple(f.name for f in fields(cls) if f.name != "n_iter")
    return cls


def array_fields(result: Any) -> tuple[str, ...]:
    """The names of the array fields of a result (PoolResult, Clustering, FlatClustering):
    every field but ``n_iter``, in their order."""
    return _ARRAY_FIELDS[type(result)]


@with_array_fields
@dataclass(frozen=True)
class Clustering:
    """What :func:`kmeans` and :func:`kmedoids` return. Leading dimensions are batch.

    Attributes
    ----------
    centres : array (..., K, M)
        Cluster centres: the means of Eq. 11/15 for K-Means, the medoid tokens for K-Medoids.
    assignment : array (..., N)
        Cluster of each token (Eq. 10/14/16); -1 when K = 0.
    medoids : array (..., K) or None
        Token index of each medoid (K-Medoids only).
    objective : array (...)
        Eq. 13 (Eq. 9 without weights) at the final centres.
    history : array (..., T + 1)
        The objective at the initial centres and after each of the T iterations. Problems
        that converged early repeat their final value.
    n_iter : int
        Iterations run, T: the loop stops when no assignment changed in any problem.
    """

    centres: Array
    assignment: Array
    medoids: Array | None
    objective: Array
    history: Array
    n_iter: int


@with_array_fields
@dataclass(frozen=True)
class PoolResult:
    """What :func:`pool` returns with ``return_info=True``. Leading dimensions are batch.

    Attributes
    ----------
    tokens : array (..., K, M)
        The pooled tokens, as returned by ``pool``.
    assignment : array (..., N)
        The output token that stands for each input token (the nearest one, Eq. 10, for the
        selection baselines); :func:`unpool` uses it. -1 when K = 0.
    sizes : array (..., K)
        How many original tokens each output token stands for: the sums of the input sizes
        (ones when none were given) over each cluster; a selection keeps its tokens' sizes.
    medoids : array (..., K) or None
        Token indices of the centres, for the medoid methods and the selection baselines
        (None for 'tome', whose tokens are means).
    objective : array (...)
        Reconstruction error of the returned tokens, Eq. 13 with weights ``scores * sizes``
        for the w-methods and ``sizes`` otherwise (Eq. 9 when there are no sizes). +inf for
        K = 0 and N > 0 (the minimum over an empty set). Finite for finite input: where
        float32 overflows, the problem is computed in float64, and an OverflowError names a
        problem whose objective its dtype cannot hold.
    history : array (..., T + 1)
        The clustering's own objective after each iteration (see :class:`Clustering`): the
        error of its centres, which for the medoid methods are the medoids, not the
        returned means. So ``history[..., -1]`` is not ``objective``: it is larger for the
        medoid methods (means reconstruct their clusters better than medoids do). One
        entry, ``objective``, for the selection baselines, 'tome' and the trivial cases.
        May hold +inf where an intermediate objective exceeds the dtype (see
        ``objective``).
    n_iter : int
        Iterations the clustering ran (0 for the selection baselines and 'tome').
    """

    tokens: Array
    assignment: Array
    sizes: Array
    medoids: Array | None
    objective: Array
    history: Array
    n_iter: int


def clustering_of(batch: Batch, flat: FlatClustering) -> Clustering:
    """The Clustering of a flattened batch's run, centres back in the tokens' frame (the
    medoids' tokens themselves, bit for bit)."""
    if flat.centres is None:
        centres = batch.prims.gather_rows(batch.xp, batch.x, flat.medoids)
    else:
        centres = flat.centres + batch.mean
    return Clustering(centres, flat.assignment, flat.medoids, flat.history[:, -1],
                      flat.history, flat.n_iter)


def kept_all(batch: Batch, x: Array, sizes: Array | None) -> PoolResult:
    """Algorithm 1, line 1: k >= N keeps every token (``x`` itself, in the caller's shape,
    as is every field here)."""
    xp = batch.xp
    n_problems, n = batch.x.shape[:2]
    carried = batch.ones() if sizes is None else sizes
    ids = xp.arange(n, dtype=batch.index_dtype(), device=device(batch.x))
    ids = xp.broadcast_to(ids[None, :], (n_problems, n))
    zero = xp.zeros((n_problems, 1), dtype=batch.x.dtype, device=device(batch.x))
    return PoolResult(x, batch.unflat(ids), batch.unflat(carried), batch.unflat(ids),
                      batch.unflat(zero[:, 0]), batch.unflat(zero), 0)


def kept_none(batch: Batch) -> PoolResult:
    """k = 0: no token, every label -1, objective +inf (see :func:`no_clusters`)."""
    empty = no_clusters(batch)
    no_sizes = batch.xp.zeros((batch.x.shape[0], 0), dtype=batch.x.dtype,
                              device=device(batch.x))
    return PoolResult(empty.centres, empty.assignment, no_sizes, None, empty.objective,
                      empty.history, 0)


def no_clusters(batch: Batch) -> Clustering:
    """K = 0 clusters: no centre, every label -1, and Eq. 9 with no centres: +inf wherever
    there is a token to reconstruct."""
    xp = batch.xp
    n_problems, n = batch.x.shape[:2]
    value = math.inf if n > 0 else 0.0
    objective = xp.full((n_problems,), value, dtype=batch.x.dtype, device=device(batch.x))
    labels = xp.full((n_problems, n), -1, dtype=batch.index_dtype(), device=device(batch.x))
    return Clustering(centres=batch.x[:, :0, :], assignment=labels, medoids=None,
                      objective=objective, history=objective[:, None], n_iter=0)
