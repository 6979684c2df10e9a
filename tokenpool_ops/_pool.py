"""The public operators: ``pool`` (Algorithm 1), ``kmeans``, ``kmedoids`` and ``unpool``."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import fields, replace
from typing import Literal, TypeVar

from ._batching import Batch, flatten, no_overflow_warnings
from ._clustering import (
    cluster_means,
    cluster_medoids,
    effective_weights,
    reconstruction_objective,
    sq_errors,
    weighted_means,
    weighted_objective,
)
from ._compat import Array, device, is_array_api_obj, is_traced, take_along_axis
from ._methods import CLUSTERING_METHODS as CLUSTERING_METHODS  # re-exports ("X as X"):
from ._methods import (  # timm, nn, demo, visualize and tests import them from here
    INITS,
    MATCHING_METHODS,
    METHODS,
    NEEDS_SCORES,
    SELECTION_METHODS,
    Detail,
    Init,
)
from ._methods import MERGING_METHODS as MERGING_METHODS
from ._methods import USES_SCORES as USES_SCORES
from ._methods import Method as Method
from ._overflow import read_iterations, without_overflow
from ._primitives import assign_to_medoids
from ._results import Clustering, PoolResult
from ._selection import draw_without_replacement, spread, top_k
from ._tome import match_tokens
from ._validation import (
    Deferred,
    check_count,
    check_init_indices,
    check_is_array,
    check_metric,
    check_same_device,
    check_token_values,
    check_tokens,
    finite_tokens_deferred,
    namespace_of,
    settle,
    token_values_deferred,
)

__all__ = ["Clustering", "PoolResult", "kmeans", "kmedoids", "pool", "unpool"]

DEFAULT_MAX_ITER = 10
R = TypeVar("R", "Clustering", "PoolResult")


def _resolve_init(
    batch: Batch, init: Init, order_by: Array | None, k: int, seed: int, order_name: str
) -> Array:
    """Starting token indices (B, k) from an ``init`` already checked by :func:`_prepare`."""
    xp = batch.xp
    n_problems, n = batch.x.shape[0], batch.x.shape[1]
    if init is None:
        init = "topk" if order_by is not None else "spread"
    if not isinstance(init, str):
        return xp.astype(xp.reshape(init, (n_problems, init.shape[-1])), batch.index_dtype())
    if init == "topk":
        if order_by is None:
            raise ValueError(f"init='topk' ranks tokens by {order_name}; pass {order_name} "
                             "or choose init='spread' or 'random'")
        return top_k(xp, order_by, k)
    if init == "random":
        return draw_without_replacement(xp, None, k, seed, batch.x)
    return spread(xp, n_problems, n, k, batch.x)


def _host_reads(check_values: bool, stop_early: bool, *arrays: Array | None
                ) -> tuple[bool, bool]:
    """``check_values`` and ``stop_early`` as the call can honour them: under a tracer
    (``jax.jit``, ``vmap``, ``grad``, ``torch.compile``, ``torch.export``) no value can be
    read on the host, so the values go unchecked and the clustering runs its ``max_iter``
    iterations (a fused kernel still stops each problem at its fixed point)."""
    if is_traced(*arrays):
        return False, False
    return check_values, stop_early


def _prepare(
    x: Array, k: object, max_iter: object, init: Init, check_values: bool, fast_paths: bool,
    metric: Array | None = None, **per_token: Array | None,
) -> tuple[Batch, int, int, list[Deferred] | None]:
    """Check the arguments shared by every entry point; return the flattened batch, k,
    max_iter and the value checks of x, the ``metric`` (..., N, D) and the per-token arrays
    (..., N), still on the device (None without ``check_values``): :func:`_computed` reads
    them with its overflow check, in one host synchronisation (a bad value cannot crash the
    computation before; see _overflow). An ``init`` array is checked here, before it can
    index anything."""
    check_is_array(x, "x")
    for name, values in {"metric": metric, **per_token}.items():
        if values is not None:
            check_is_array(values, name)
    if init is not None and not isinstance(init, str) and not is_array_api_obj(init):
        raise TypeError(f"init must be 'topk', 'random', 'spread' or an integer array, "
                        f"got {type(init).__name__}")
    init_array = None if init is None or isinstance(init, str) else init
    xp = namespace_of(x=x, init=init_array, metric=metric, **per_token)
    check_tokens(xp, x, check_values=False)
    batch = flatten(xp, x, fast_paths)
    check_same_device(xp, "x", x=x, init=init_array, metric=metric, **per_token)
    k, max_iter = check_count(k, "k"), check_count(max_iter, "max_iter")
    check_metric(xp, metric, tuple(x.shape[:-1]))
    for name, values in per_token.items():
        check_token_values(xp, values, name, tuple(x.shape[:-1]), check_values=False)
    pending = None
    if check_values:  # x from the means, which the batch computes anyway
        pending = [finite_tokens_deferred(xp, batch.x, batch.mean)]
        if metric is not None:  # the metric likewise, from its own means
            features = flatten(xp, metric, fast_paths)
            pending.append(finite_tokens_deferred(xp, features.x, features.mean, "metric"))
        pending += [token_values_deferred(xp, values, name)
                    for name, values in per_token.items() if values is not None]
    if isinstance(init, str) and init not in INITS:
        raise ValueError(f"init must be 'topk', 'random', 'spread' or an integer array, "
                         f"got {init!r}")
    if init_array is not None:
        check_init_indices(xp, init_array, tuple(x.shape[:-2]), x.shape[-2], k, check_values)
    return batch, k, max_iter, pending


# ---------------------------------------------------------------------------------------------
# Clustering alone


def _cluster(
    x: Array, k: int, algorithm: Literal["kmeans", "kmedoids"], weights: Array | None,
    init: Init, max_iter: int, seed: int, check_values: bool, stop_early: bool,
    fast_paths: bool,
) -> Clustering:
    check_values, stop_early = _host_reads(check_values, stop_early, x, weights)
    batch, k, max_iter, pending = _prepare(x, k, max_iter, init, check_values, fast_paths,
                                           weights=weights)
    k = min(k, batch.x.shape[1])
    given = batch.flat(weights)
    start = _resolve_init(batch, init, given, k, seed, "weights")
    if k == 0:
        settle(batch.xp, pending)
        return _to_caller(batch, _empty_clustering(batch))

    def compute(b: Batch) -> Clustering:
        return _clustering(b, algorithm, start, b.flat(given), max_iter, stop_early)

    return _to_caller(batch, _computed(batch, compute, pending, weights=given))


def _clustering(batch: Batch, algorithm: str, start: Array, given: Array | None,
                max_iter: int, stop_early: bool) -> Clustering:
    """K-Means or K-Medoids of a flattened batch; a Clustering of (B, ...) arrays."""
    xp, prims = batch.xp, batch.prims
    w = _ones(batch) if given is None else given
    if algorithm == "kmeans":
        fallback = None if given is None else _ones(batch)
        flat = cluster_means(prims, batch.x, batch.mean, start, w, fallback, max_iter,
                             stop_early)
        centres = flat.centres + batch.mean
    else:
        flat = cluster_medoids(prims, batch.x, batch.mean, start, w, max_iter, stop_early)
        centres = prims.gather_rows(xp, batch.x, flat.medoids)  # input tokens, bit for bit
    return Clustering(centres, flat.assignment, flat.medoids, flat.history[:, -1],
                      flat.history, flat.n_iter)


def _computed(batch: Batch, compute: Callable[[Batch], R], pending: list[Deferred] | None,
              returned: tuple[str, ...] | None = None, **values: Array | None) -> R:
    """``compute(batch)``; with the ``pending`` value checks (None: values unchecked) read
    together with the finite check of the result, and overflowed problems redone in float64
    (see _overflow: finite input gives finite output). ``returned``: the fields the caller
    sees (all when None); ``values``: the per-token inputs, named in an OverflowError."""
    if pending is None:
        return read_iterations(compute(batch))
    with no_overflow_warnings(batch.xp):
        return without_overflow(batch, compute, compute(batch), returned, values, pending)


def _to_caller(batch: Batch, result: R) -> R:
    """A result of (B, ...) arrays back in the caller's batch shape, tokens in their dtype."""
    xp = batch.xp
    changes = {}
    for field in fields(result):  # type: ignore[arg-type]
        value = getattr(result, field.name)
        if value is None or field.name == "n_iter":
            continue
        if field.name in ("tokens", "centres"):
            value = xp.astype(value, batch.out_dtype, copy=False)
        changes[field.name] = batch.unflat(value)
    return replace(result, **changes)  # type: ignore[type-var]


def _ones(batch: Batch) -> Array:
    return batch.xp.ones(batch.x.shape[:2], dtype=batch.x.dtype, device=device(batch.x))


def _empty_clustering(batch: Batch) -> Clustering:
    xp = batch.xp
    n_problems, n = batch.x.shape[:2]
    objective = _empty_objective(batch)
    labels = xp.full((n_problems, n), -1, dtype=batch.index_dtype(), device=device(batch.x))
    return Clustering(centres=batch.x[:, :0, :], assignment=labels, medoids=None,
                      objective=objective, history=objective[:, None], n_iter=0)


def _empty_objective(batch: Batch) -> Array:
    """Eq. 9 with no centres: +inf wherever there is a token to reconstruct."""
    value = math.inf if batch.x.shape[1] > 0 else 0.0
    return batch.xp.full(batch.x.shape[:1], value, dtype=batch.x.dtype,
                         device=device(batch.x))


def kmeans(
    x: Array, k: int, *, weights: Array | None = None, init: Init = None,
    max_iter: int = DEFAULT_MAX_ITER, seed: int = 0, check_values: bool = True,
    stop_early: bool = True, fast_paths: bool = True,
) -> Clustering:
    """Batched (weighted) K-Means: Eq. 10-11, or Eq. 14-15 with ``weights``.

    Parameters
    ----------
    x : array (..., N, M)
        Tokens, real floating. Leading dimensions are independent problems.
    k : int
        Number of clusters; ``k >= N`` makes every token its own cluster.
    weights : array (..., N), optional
        Non-negative token weights ``w_i`` of Eq. 13.
    init : {'topk', 'random', 'spread'} or integer array (..., k), optional
        Starting centres: the k tokens of highest weight (the default when weights are
        given), a seeded random draw, evenly spaced token indices (the default otherwise), or
        explicit token indices.
    max_iter : int
        Most iterations; the loop stops earlier once no assignment changes in any problem.
    seed : int
        Seed of ``init='random'``.
    check_values : bool
        Check array values: NaN or infinity in ``x``, negative or non-finite ``weights``,
        ``init`` indices out of range or repeated, and overflow in the results (then redone
        in float64). All are read in one device synchronisation after the computation,
        which bad values cannot crash; an ``init`` array, which indexes, is checked before
        (one more). False skips them (shapes, dtypes, libraries and devices are always
        checked).
    stop_early : bool
        Stop once no assignment changed in any problem: a device synchronisation per
        iteration, or one read of the iteration count where a fused kernel (Numba, CUDA)
        decides per problem. False runs exactly ``max_iter`` iterations and reads no array
        value on the host, for ``torch.compile`` and CUDA graphs; a fused kernel stops
        each problem at its fixed point either way, so there False costs no iterations.
        Under a tracer (``jax.jit``, ``vmap``, ``grad``, ``torch.compile``,
        ``torch.export``) nothing can be read on the host: ``stop_early`` and
        ``check_values`` are then False whatever they say.
    fast_paths : bool
        Use the backend's fast primitives; False forces the generic array-API code.

    Returns
    -------
    Clustering
        Centres, assignment, objective (Eq. 13) and its history.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.array([[0.0], [0.1], [5.0], [5.2]])
    >>> result = kmeans(x, 2)
    >>> result.assignment.tolist()
    [0, 0, 1, 1]
    """
    return _cluster(x, k, "kmeans", weights, init, max_iter, seed, check_values, stop_early,
                    fast_paths)


def kmedoids(
    x: Array, k: int, *, weights: Array | None = None, init: Init = None,
    max_iter: int = DEFAULT_MAX_ITER, seed: int = 0, check_values: bool = True,
    stop_early: bool = True, fast_paths: bool = True,
) -> Clustering:
    """Batched (weighted) K-Medoids: Eq. 10 and 12, or Eq. 16-18 with ``weights``.

    The pairwise distances are computed once per call (O(N^2 M)); each iteration then costs
    O(N^2 + NK). A medoid is always assigned to itself; the current medoid stays unless
    another member is strictly better; otherwise the lowest index wins. The medoid update
    weights each member's distances by ``w`` (Eq. 17 prints the sum unweighted, but only the
    weighted sum minimises Eq. 13). Parameters as in :func:`kmeans`.

    Returns
    -------
    Clustering
        Medoid tokens as ``centres``, their indices as ``medoids``.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.array([[0.0], [1.0], [3.0], [10.0], [11.0]])
    >>> kmedoids(x, 2).medoids.tolist()
    [1, 3]
    """
    return _cluster(x, k, "kmedoids", weights, init, max_iter, seed, check_values, stop_early,
                    fast_paths)


# ---------------------------------------------------------------------------------------------
# Token Pooling


def pool(
    x: Array, k: int, method: Method = "wkmedoids", *, scores: Array | None = None,
    sizes: Array | None = None, metric: Array | None = None, init: Init = None,
    max_iter: int = DEFAULT_MAX_ITER, seed: int = 0, return_info: bool = False,
    check_values: bool = True, stop_early: bool = True, fast_paths: bool = True,
) -> Array | PoolResult:
    """Token Pooling (Algorithm 1): replace N tokens by k that minimise Eq. 9 / Eq. 13.

    Parameters
    ----------
    x : array (..., N, M)
        Tokens, real floating; leading dimensions are batch. Half precision is computed in
        float32 and returned in the input dtype.
    k : int
        Tokens to keep. ``k >= N`` returns ``x`` itself (Algorithm 1, line 1); ``k = 0``
        returns (..., 0, M).
    method : str
        ``'kmeans'``, ``'kmedoids'``, ``'wkmeans'``, ``'wkmedoids'`` (clustering; output is
        the weighted mean of each cluster, Algorithm 1 line 6), or the baselines of §5:
        ``'topk'`` (PoWER-BERT: the k highest scores), ``'random'`` (uniform draw) and
        ``'importance'`` (draw proportional to the scores; tokens of score zero are drawn
        only when fewer than k scores are positive, then uniformly, so a problem whose
        scores are all zero draws the tokens of 'random'). Baselines keep the chosen tokens,
        in their original order. ``'tome'``: ToMe's bipartite soft matching (Bolya et al.,
        ICLR 2023): tokens alternate into A (even positions) and B (odd); each A token's
        match is its most similar B token (cosine similarity of ``metric``); the
        ``r = N - k`` A tokens most similar to their match are merged into it, when
        ``r <= floor(N / 2)``; otherwise rounds of ``floor(n / 2)`` merges run until k
        tokens remain, the metric merged between rounds as the tokens are. Output tokens
        are size-weighted means of their members, in the order of the last round: the
        unmerged A tokens, then the B tokens, each group in its order (ToMe's code orders
        the unmerged A tokens by similarity instead). Ties go to the lower index, in the
        match and in the ranking. A metric row of zero norm has similarity 0 with every
        token. ``scores``, ``init``, ``max_iter``, ``seed`` and ``stop_early`` play no part
        (as for 'random', scores are still checked).
    scores : array (..., N), optional
        Significance scores (Eq. 5, see :func:`significance_scores`), non-negative. Weights
        of the w-methods and ranking of the default initialisation. Needed by 'topk' and
        'importance'. Without scores the w-methods treat every token as equally
        significant: 'wkmeans' and 'wkmedoids' are then 'kmeans' and 'kmedoids', default
        initialisation ('spread') included.
    sizes : array (..., N), optional
        How many original tokens each input token stands for (Appendix E, "carry").
        The weight of token i is ``scores[i] * sizes[i]`` for the w-methods and ``sizes[i]``
        for the others, so scores are per original token. Output sizes are returned in
        :class:`PoolResult`.
    metric : array (..., N, D), optional
        'tome' only (another method refuses it): the features whose cosine similarity
        decides the matching, ``x`` when None (in a ViT, ToMe uses the block's keys
        averaged over heads). Same library and device as ``x``; compared in ``x``'s
        compute dtype. Checked for NaN and infinity with ``check_values``.
    init : {'topk', 'random', 'spread'} or integer array (..., k), optional
        Starting centres: 'topk' (highest scores; the default with scores), 'random' (seeded),
        'spread' (evenly spaced indices; the default without scores) or explicit indices.
    max_iter : int
        Most clustering iterations; stops early once no assignment changes in any problem.
    seed : int
        Seed of 'random', 'importance' and ``init='random'``. Draws are made on ``x``'s
        device from a counter-based hash of (seed, problem, token), so every backend draws
        the same tokens.
    return_info : bool
        Return a :class:`PoolResult` instead of the tokens alone.
    check_values : bool
        Check array values: NaN or infinity in ``x`` and ``metric``, negative or non-finite
        ``scores`` and ``sizes``, ``init`` indices out of range or repeated, and overflow in
        the results (then redone in float64). All are read in one device synchronisation
        after the computation, which bad values cannot crash; an ``init`` array, which
        indexes, is checked before (one more). False skips them (shapes, dtypes, libraries
        and devices are always checked).
    stop_early : bool
        Stop once no assignment changed in any problem: a device synchronisation per
        iteration, or one read of the iteration count where a fused kernel (Numba, CUDA)
        decides per problem. False runs exactly ``max_iter`` iterations and reads no array
        value on the host, for ``torch.compile`` and CUDA graphs; a fused kernel stops
        each problem at its fixed point either way, so there False costs no iterations.
        Under a tracer (``jax.jit``, ``vmap``, ``grad``, ``torch.compile``,
        ``torch.export``) nothing can be read on the host: ``stop_early`` and
        ``check_values`` are then False whatever they say.
    fast_paths : bool
        Use the backend's fast primitives; False forces the generic array-API code.

    Returns
    -------
    array (..., k, M) or PoolResult
        Same library, device and dtype as ``x``.

    Raises
    ------
    TypeError
        ``x`` not an array, non-floating ``x``, non-integer ``k``, arrays from different
        libraries.
    ValueError
        Wrong shapes, negative ``k``, unknown method, missing scores, negative or NaN scores
        or sizes, non-finite ``x``, bad ``init`` indices, arrays on different devices.
    OverflowError
        A returned value of finite input beyond the range of its dtype even computed in
        float64 (see ``objective`` in :class:`PoolResult`).

    Examples
    --------
    >>> import numpy as np
    >>> x = np.array([[0.0, 0.0], [0.0, 1.0], [10.0, 0.0], [10.0, 2.0]])
    >>> pool(x, 2, "kmedoids").tolist()
    [[0.0, 0.5], [10.0, 1.0]]
    >>> pool(x, 2, "tome").tolist()   # A = tokens 0, 2 merged into their matches 1, 3
    [[0.0, 0.5], [10.0, 1.0]]
    """
    result = pool_result(x, k, method, "info" if return_info else "tokens", scores=scores,
                         sizes=sizes, metric=metric, init=init, max_iter=max_iter, seed=seed,
                         check_values=check_values, stop_early=stop_early,
                         fast_paths=fast_paths)
    return result if return_info else result.tokens


def pool_result(
    x: Array, k: int, method: Method, detail: Detail, *, scores: Array | None = None,
    sizes: Array | None = None, metric: Array | None = None, init: Init = None,
    max_iter: int = DEFAULT_MAX_ITER, seed: int = 0, check_values: bool = True,
    stop_early: bool = True, fast_paths: bool = True,
) -> PoolResult:
    """:func:`pool` as a PoolResult holding the fields of ``detail`` (see ``Detail``)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    if method in NEEDS_SCORES and scores is None:
        raise ValueError(f"method {method!r} needs scores (see significance_scores)")
    if metric is not None and method not in MATCHING_METHODS:
        raise ValueError(f"metric applies to method 'tome' only, not {method!r}")
    check_values, stop_early = _host_reads(check_values, stop_early, x, scores, sizes, metric)
    batch, k, max_iter, pending = _prepare(x, k, max_iter, init, check_values, fast_paths,
                                           metric=metric, scores=scores, sizes=sizes)
    s, given_sizes = batch.flat(scores), batch.flat(sizes)
    if k >= batch.x.shape[1]:
        settle(batch.xp, pending)
        return _identity(batch, x, given_sizes)
    if k == 0:
        settle(batch.xp, pending)
        result = _nothing_kept(batch)
    else:
        with no_overflow_warnings(batch.xp):  # a tiny score's race key is -inf, rightly
            indices = (_choose(batch, method, s, k, seed) if method in SELECTION_METHODS
                       else None if method in MATCHING_METHODS
                       else _resolve_init(batch, init, s, k, seed, "scores"))

        def compute(b: Batch) -> PoolResult:
            if method in MATCHING_METHODS:
                features = b.x if metric is None else b.flat_tokens(metric)
                return _pool_by_matching(b, features, k, b.flat(given_sizes), detail)
            return _pool_flat(b, method, indices, b.flat(s), b.flat(given_sizes), max_iter,
                              stop_early, detail)

        result = _computed(batch, compute, pending, ("tokens",) if detail == "tokens" else None,
                           scores=s, sizes=given_sizes)
    return _to_caller(batch, result)


def _identity(batch: Batch, x: Array, given_sizes: Array | None) -> PoolResult:
    """Algorithm 1, line 1: k >= N keeps every token (``x`` itself, in the caller's shape)."""
    xp = batch.xp
    n_problems, n = batch.x.shape[:2]
    carried = _ones(batch) if given_sizes is None else given_sizes
    ids = xp.arange(n, dtype=batch.index_dtype(), device=device(batch.x))
    ids = xp.broadcast_to(ids[None, :], (n_problems, n))
    zero = xp.zeros((n_problems, 1), dtype=batch.x.dtype, device=device(batch.x))
    return PoolResult(x, batch.unflat(ids), batch.unflat(carried), batch.unflat(ids),
                      batch.unflat(zero[:, 0]), batch.unflat(zero), 0)


def _nothing_kept(batch: Batch) -> PoolResult:
    empty = _empty_clustering(batch)
    no_sizes = batch.xp.zeros((batch.x.shape[0], 0), dtype=batch.x.dtype,
                              device=device(batch.x))
    return PoolResult(empty.centres, empty.assignment, no_sizes, None, empty.objective,
                      empty.history, 0)


def _choose(batch: Batch, method: str, scores: Array | None, k: int, seed: int) -> Array:
    """The k tokens (B, k) a baseline of §5 keeps, ascending."""
    if method == "topk":
        return top_k(batch.xp, scores, k)
    weights = scores if method == "importance" else None
    return draw_without_replacement(batch.xp, weights, k, seed, batch.x)


def _pool_flat(batch: Batch, method: str, indices: Array, scores: Array | None,
               given_sizes: Array | None, max_iter: int, stop_early: bool,
               detail: Detail) -> PoolResult:
    """Token Pooling of a flattened batch from its chosen tokens or starting centres
    ``indices`` (B, k); a PoolResult of (B, ...) arrays."""
    carried = _ones(batch) if given_sizes is None else given_sizes
    # Without scores every token is equally significant: the w-methods are unweighted.
    weights = scores * carried if scores is not None and method.startswith("w") else carried
    if method in SELECTION_METHODS:
        return _select(batch, indices, carried, weights, detail)
    # Cluster means fall back to the sizes where weights sum to zero; unit weights cannot.
    fallback = None if given_sizes is None and weights is carried else carried
    return _pool_by_clustering(batch, method, indices, weights, carried, fallback, max_iter,
                               stop_early, detail)


def _select(batch: Batch, chosen: Array, carried: Array, weights: Array,
            detail: Detail) -> PoolResult:
    """The baselines of §5: keep the ``chosen`` input tokens, in their original order."""
    xp, prims = batch.xp, batch.prims
    tokens = prims.gather_rows(xp, batch.x, chosen)
    sizes = take_along_axis(xp, carried, chosen, axis=-1)
    if detail != "info":
        medoids = chosen if detail == "plan" else None
        return PoolResult(tokens, None, sizes, medoids, None, None, 0)
    centred = batch.centred()
    to_kept = prims.sq_distances(xp, centred, prims.gather_rows(xp, centred, chosen))
    labels, _ = assign_to_medoids(xp, to_kept, chosen)
    objective = weighted_objective(xp, weights, sq_errors(prims, batch.x, tokens, labels))
    return PoolResult(tokens, labels, sizes, chosen, objective, objective[:, None], 0)


def _pool_by_clustering(batch: Batch, method: str, start: Array, weights: Array,
                        carried: Array, fallback: Array | None, max_iter: int,
                        stop_early: bool, detail: Detail) -> PoolResult:
    """Cluster, then return the weighted mean of each cluster (Algorithm 1, line 6)."""
    prims = batch.prims
    k = start.shape[1]
    if method.endswith("kmeans"):
        flat = cluster_means(prims, batch.x, batch.mean, start, weights, fallback, max_iter,
                             stop_early)
    else:
        flat = cluster_medoids(prims, batch.x, batch.mean, start, weights, max_iter, stop_early)
    labels = flat.assignment
    with_objective = detail == "info"
    fused = (prims.merge(batch.xp, batch.x, batch.mean, labels, k, weights, fallback, carried,
                         with_objective)
             if prims.merge is not None and flat.centres is None else None)
    if fused is not None:  # one launch for the means, sizes and objective (CUDA)
        tokens, sizes, objective = fused
    else:
        # Only K-Means clusters can be empty (a medoid belongs to its own cluster).
        empty = batch.mean if flat.centres is None else flat.centres + batch.mean
        tokens, sizes, objective = _merge(batch, labels, k, weights, fallback, carried, empty,
                                          with_objective)
    # The history is kept in every detail: an overflow in the clustering shows there first
    # (see _overflow).
    return PoolResult(tokens, labels, sizes, flat.medoids, objective, flat.history,
                      flat.n_iter)


def _pool_by_matching(batch: Batch, metric: Array, k: int, given_sizes: Array | None,
                      detail: Detail) -> PoolResult:
    """ToMe's bipartite soft matching (see _tome), then the size-weighted mean of each
    group of merged tokens, as for clusters; scores play no part. No clustering history:
    one entry, the objective, as for the selection baselines."""
    carried = _ones(batch) if given_sizes is None else given_sizes
    labels = match_tokens(batch.prims, metric, carried, given_sizes is not None, k,
                          batch.index_dtype())
    fallback = None if given_sizes is None else carried
    tokens, sizes, objective = _merge(batch, labels, k, carried, fallback, carried,
                                      batch.mean, detail == "info")
    history = None if objective is None else objective[:, None]
    return PoolResult(tokens, labels, sizes, None, objective, history, 0)


def _merge(batch: Batch, labels: Array, k: int, weights: Array, fallback: Array | None,
           carried: Array, empty: Array, with_objective: bool
           ) -> tuple[Array, Array, Array | None]:
    """Algorithm 1, line 6: the weighted mean of each group ``labels`` (B, N) in [0, k) of
    the tokens (``empty`` for a group with no member), the carried sizes summed, and the
    objective (Eq. 9/13 of the means, weights ``weights``) when asked (else None)."""
    prims = batch.prims
    token_weights = effective_weights(prims, labels, k, weights, fallback)
    # Means of the original (not centred) tokens, so that they are the members' exact means.
    tokens = weighted_means(prims, batch.x, labels, k, token_weights, empty)
    sizes = prims.segment_sum(batch.xp, carried[:, :, None], labels, k)[:, :, 0]
    objective = (reconstruction_objective(prims, batch.x, batch.mean, tokens, weights)
                 if with_objective else None)
    return tokens, sizes, objective


def unpool(tokens: Array, assignment: Array) -> Array:
    """Nearest-neighbour upsampling: token i becomes ``tokens[assignment[i]]`` (u in Eq. 8).

    Parameters
    ----------
    tokens : array (..., K, M)
        Pooled tokens.
    assignment : array (..., N)
        Integer indices in [0, K), e.g. ``PoolResult.assignment``.

    Returns
    -------
    array (..., N, M)

    Examples
    --------
    >>> import numpy as np
    >>> unpool(np.array([[1.0], [2.0]]), np.array([1, 0, 1])).tolist()
    [[2.0], [1.0], [2.0]]
    """
    xp = namespace_of(tokens=tokens, assignment=assignment)
    check_same_device(xp, "tokens", tokens=tokens, assignment=assignment)
    if tokens.ndim < 2:
        raise ValueError(f"tokens must have shape (..., K, M), got a {tokens.ndim}-d array")
    if not xp.isdtype(assignment.dtype, "integral"):
        raise TypeError(f"assignment must be an integer array, got dtype {assignment.dtype}")
    if tuple(assignment.shape[:-1]) != tuple(tokens.shape[:-2]):
        raise ValueError(f"assignment must have shape (..., N) with the batch shape "
                         f"{tuple(tokens.shape[:-2])} of tokens, got {tuple(assignment.shape)}")
    k = tokens.shape[-2]
    if not is_traced(assignment) and not bool(xp.all((assignment >= 0) & (assignment < k))):
        raise ValueError(f"assignment must hold indices in [0, {k}) (K = {k})")
    return take_along_axis(xp, tokens, assignment[..., None], axis=-2)
