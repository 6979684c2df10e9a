"""The public operators: ``pool`` (Algorithm 1), ``kmeans``, ``kmedoids`` and ``unpool``.

Each entry point reads as one pipeline: validate the arguments, flatten the batch, make the
value checks (on the device), answer the trivial cases, choose the tokens or the initial
centres, compute (weights, then select, cluster or match, then merge) guarded against bad
values and overflow, and hand the result back in the caller's shape.
"""

from __future__ import annotations

from typing import Literal

from ._batching import Batch, flatten
from ._clustering import cluster
from ._compat import Array, is_traced, take_along_axis
from ._merge import cluster_and_merge, merge_matches, select, token_weights
from ._methods import CLUSTERING_METHODS as CLUSTERING_METHODS  # re-exports ("X as X"):
from ._methods import (  # timm, nn, demo, visualize and tests import them from here
    MATCHING_METHODS,
    SELECTION_METHODS,
    WEIGHTED_METHODS,
    Detail,
    Init,
)
from ._methods import MERGING_METHODS as MERGING_METHODS
from ._methods import METHODS as METHODS
from ._methods import USES_SCORES as USES_SCORES
from ._methods import Method as Method
from ._overflow import guarded
from ._results import Clustering, PoolResult, clustering_of, kept_all, kept_none, no_clusters
from ._selection import choose
from ._tome import match_tokens
from ._validation import check_same_device, namespace_of, validate, value_checks

__all__ = ["Clustering", "PoolResult", "kmeans", "kmedoids", "pool", "unpool"]

DEFAULT_MAX_ITER = 10


def _cluster(
    x: Array, k: int, algorithm: Literal["kmeans", "kmedoids"], weights: Array | None,
    init: Init, max_iter: int, seed: int, check_values: bool, stop_early: bool,
    fast_paths: bool,
) -> Clustering:
    """:func:`kmeans` and :func:`kmedoids`, as the pipeline of :func:`pool_result`."""
    call = validate(x, k, max_iter, init, check_values, stop_early, weights=weights)
    batch = flatten(call.xp, x, fast_paths)
    checks = value_checks(batch, call.check_values, weights=weights)
    given, k = batch.flat(weights), min(call.k, batch.n)
    start = choose(batch, algorithm, init, given, k, seed, "weights")
    if k == 0:
        return batch.to_caller(guarded(batch, no_clusters, checks, overflows=False))

    def compute(b: Batch) -> Clustering:
        w = token_weights(b.xp, b.x, b.flat(given), None)
        return clustering_of(b, cluster(b.prims, algorithm, b.x, b.mean, start, w.weights,
                                         w.fallback, call.max_iter, call.stop_early))

    return batch.to_caller(guarded(batch, compute, checks, weights=given))



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
    call = validate(x, k, max_iter, init, check_values, stop_early, method, metric,
                    scores=scores, sizes=sizes)
    batch = flatten(call.xp, x, fast_paths)
    checks = value_checks(batch, call.check_values, metric, scores=scores, sizes=sizes)
    s, given_sizes, k = batch.flat(scores), batch.flat(sizes), call.k
    if k >= batch.n:  # Algorithm 1, line 1: x itself
        return guarded(batch, lambda b: kept_all(b, x, given_sizes), checks, overflows=False)
    if k == 0:
        return batch.to_caller(guarded(batch, kept_none, checks, overflows=False))
    start = choose(batch, method, init, s, k, seed)

    def compute(b: Batch) -> PoolResult:
        w = token_weights(b.xp, b.x, b.flat(s) if method in WEIGHTED_METHODS else None,
                          b.flat(given_sizes))
        if method in SELECTION_METHODS:
            return select(b, start, w, detail)
        if method in MATCHING_METHODS:
            features = b.x if metric is None else b.flat_tokens(metric)
            labels = match_tokens(b.prims, features, w.carried, sizes is not None, k,
                                  b.index_dtype())
            return merge_matches(b, labels, k, w, detail)
        return cluster_and_merge(b, method, start, k, w, call.max_iter, call.stop_early,
                                 detail)

    result = guarded(batch, compute, checks, ("tokens",) if detail == "tokens" else None,
                     scores=s, sizes=given_sizes)
    return batch.to_caller(result)


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
