"""K-Means and K-Medoids on flattened batches, as in §4 and Appendix A of the paper.

Every function here takes problems stacked on a leading batch axis ``B`` and works on all of
them at once: there is no Python loop over problems, clusters or tokens. The only loop is over
iterations, and it stops as soon as no assignment changed in any problem (unless
``stop_early`` is False: then it runs ``max_iter`` iterations and never reads an array value
on the host, so that it can be traced by ``torch.compile``).

Tie rules, identical on every backend:

* assignment (Eq. 10/14/16): the nearest centre; among equally near centres the lowest
  cluster index wins; for K-Medoids a medoid is always assigned to its own cluster;
* medoid update (Eq. 12/17): the current medoid stays unless another member is strictly
  better; among equally good challengers the lowest token index wins.

Points are centred per problem by the caller, which keeps Gram-matrix distances accurate.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._compat import Array, Namespace, constant, device, take_along_axis
from ._primitives import Primitives
from ._results import with_array_fields


@with_array_fields
@dataclass(frozen=True)
class FlatClustering:
    """Result of a clustering run on a flattened batch (B problems)."""

    centres: Array | None  # (B, K, M) in the centred frame; None for K-Medoids (see medoids)
    assignment: Array  # (B, N) cluster of each token
    medoids: Array | None  # (B, K) token index of each medoid, K-Medoids only
    history: Array  # (B, T + 1) objective of the centres after each iteration
    #: T; or, from a fused kernel, a 0-d device array left unread, with a history of
    #: max_iter + 1 entries: _pool reads it with its value checks (see _overflow).
    n_iter: int | Array


def weighted_objective(xp: Namespace, weights: Array, nearest_sq_dist: Array) -> Array:
    """Eq. 13 (Eq. 9 when all weights are one): ``sum_i w_i min_j |f_i - c_j|^2``."""
    return xp.sum(weights * nearest_sq_dist, axis=-1)


def sq_errors(prims: Primitives, x: Array, centres: Array, labels: Array) -> Array:
    """``|f_i - c_a(i)|^2`` per token (B, N), from the differences themselves.

    The Gram expansion is fast for finding the nearest centre but loses digits to
    cancellation; the error we report is recomputed directly, exact up to rounding. Pass
    the tokens as they are (not centred): each difference is then rounded once.
    """
    diff = x - prims.gather_rows(prims.xp, centres, labels)
    return prims.xp.sum(diff * diff, axis=-1)


def reconstruction_objective(prims: Primitives, x: Array, mean: Array, centres: Array,
                             weights: Array) -> Array:
    """Eq. 13 (Eq. 9 with unit weights) of tokens ``x`` (B, N, M) given ``centres``
    (B, K, M), both as they are; ``mean`` (B, 1, M) centres them for the nearest-centre
    search (Gram expansion), and the errors come from the uncentred differences."""
    xp = prims.xp
    labels, _ = assign(xp, prims.sq_distances(xp, x - mean, centres - mean))
    return weighted_objective(xp, weights, sq_errors(prims, x, centres, labels))


def assign(xp: Namespace, sq_dist: Array) -> tuple[Array, Array]:
    """Eq. 10 / 14: each token goes to its nearest centre; ties go to the lowest index.

    ``sq_dist`` is (B, N, K). Returns the assignment (B, N) and the distance to it (B, N).
    """
    return xp.argmin(sq_dist, axis=-1), xp.min(sq_dist, axis=-1)


def effective_weights(
    prims: Primitives, labels: Array, k: int, weights: Array, fallback: Array | None
) -> Array:
    """Per-token weights for the cluster means of Eq. 15 and Algorithm 1, line 6.

    A cluster uses ``weights``; if they sum to zero over its members it uses ``fallback``
    (the sizes, i.e. the unweighted mean of the original tokens); if those sum to zero too it
    uses ones. So every non-empty cluster gets a finite mean. ``fallback=None`` declares the
    weights all positive (unit weights), so there is nothing to check.
    """
    if fallback is None:
        return weights
    xp = prims.xp
    totals = prims.segment_sum(xp, xp.stack([weights, fallback], axis=-1), labels, k)
    per_token = prims.gather_rows(xp, totals, labels)  # (B, N, 2)
    second = xp.where(per_token[:, :, 1] > 0, fallback, constant(xp, 1.0, weights))
    return xp.where(per_token[:, :, 0] > 0, weights, second)


def weighted_means(
    prims: Primitives, values: Array, labels: Array, k: int, token_weights: Array, empty: Array
) -> Array:
    """Weighted mean of ``values`` (B, N, M) per cluster; empty clusters take ``empty``.

    ``token_weights`` must come from :func:`effective_weights`, so a non-empty cluster always
    has a positive total.
    """
    return prims.weighted_means(prims.xp, values, labels, k, token_weights, empty)


def update_centres(
    prims: Primitives, x: Array, labels: Array, centres: Array, weights: Array,
    fallback: Array | None,
) -> Array:
    """Eq. 11 / 15: each centre becomes the (weighted) mean of its members.

    Empty clusters keep their previous centre; zero-weight clusters use ``fallback`` weights.
    """
    k = centres.shape[1]
    token_weights = effective_weights(prims, labels, k, weights, fallback)
    return weighted_means(prims, x, labels, k, token_weights, centres)


def update_medoids(
    prims: Primitives, token_dist: Array, labels: Array, medoids: Array, weights: Array
) -> Array:
    """Eq. 12 / 17: each cluster's new medoid is the member with the least weighted cost.

    The cost of member ``i`` is ``sum_{i' in cluster} w_i' |f_i - f_i'|^2``. Eq. 17 of the
    paper prints this sum without ``w_i'``; the weights are needed for the update to minimise
    the weighted objective (Eq. 13) it belongs to, so that the objective never increases.
    """
    xp = prims.xp
    k = medoids.shape[-1]
    cost = prims.medoid_costs(xp, token_dist, labels, weights)  # (B, N)
    cluster_ids = xp.arange(k, dtype=labels.dtype, device=device(labels))
    is_member = labels[:, None, :] == cluster_ids[None, :, None]  # (B, K, N)
    member_cost = xp.where(is_member, cost[:, None, :], constant(xp, float("inf"), cost))
    challenger = xp.argmin(member_cost, axis=-1)
    challenger_cost = xp.min(member_cost, axis=-1)
    current_cost = take_along_axis(xp, cost, medoids, axis=-1)
    return xp.where(current_cost <= challenger_cost, medoids, xp.astype(challenger, medoids.dtype))


def run_kmeans(
    prims: Primitives, x: Array, init: Array, weights: Array, fallback: Array | None,
    max_iter: int,
    stop_early: bool = True,
) -> FlatClustering:
    """Weighted K-Means (Eq. 14-15; Eq. 10-11 with unit weights) from the tokens ``init``."""
    xp = prims.xp
    centres = prims.gather_rows(xp, x, init)
    labels, nearest = assign(xp, prims.sq_distances(xp, x, centres))
    history = [weighted_objective(xp, weights, nearest)]
    for _ in range(max_iter):
        centres = update_centres(prims, x, labels, centres, weights, fallback)
        new_labels, nearest = assign(xp, prims.sq_distances(xp, x, centres))
        history.append(weighted_objective(xp, weights, nearest))
        converged = stop_early and not bool(xp.any(new_labels != labels))
        labels = new_labels
        if converged:
            break
    return FlatClustering(centres, labels, None, xp.stack(history, axis=-1), len(history) - 1)


def cluster(
    prims: Primitives, method: str, x: Array, mean: Array, init: Array, weights: Array,
    fallback: Array | None, max_iter: int, stop_early: bool = True,
) -> FlatClustering:
    """K-Means (``method`` ending in 'kmeans') or K-Medoids of the tokens ``x`` (B, N, M)
    from the token indices ``init`` (B, K); ``fallback`` as in :func:`effective_weights`
    (K-Means only: a medoid's cluster is never empty nor of zero weight)."""
    if method.endswith("kmeans"):
        return cluster_means(prims, x, mean, init, weights, fallback, max_iter, stop_early)
    return cluster_medoids(prims, x, mean, init, weights, max_iter, stop_early)


def cluster_means(
    prims: Primitives, x: Array, mean: Array, init: Array, weights: Array,
    fallback: Array | None, max_iter: int, stop_early: bool = True,
) -> FlatClustering:
    """K-Means of the tokens ``x`` (B, N, M), whose per-problem mean is ``mean`` (B, 1, M).

    Uses the backend's fused kernel where it has one, else :func:`run_kmeans` on the
    centred tokens.
    """
    if prims.kmeans is not None:
        fused = prims.kmeans(prims.xp, x, mean, init, weights, fallback, max_iter, stop_early)
        if fused is not None:
            centres, labels, history, n_iter = fused
            return FlatClustering(centres, labels, None, history, n_iter)
    return run_kmeans(prims, x - mean, init, weights, fallback, max_iter, stop_early)


def cluster_medoids(
    prims: Primitives, x: Array, mean: Array, init: Array, weights: Array, max_iter: int,
    stop_early: bool = True,
) -> FlatClustering:
    """K-Medoids of the tokens ``x`` (B, N, M), whose per-problem mean is ``mean`` (B, 1, M).

    Uses the backend's fused kernel where it has one, else the distance matrix of the centred
    tokens and :func:`run_kmedoids`.
    """
    if prims.kmedoids is not None:
        fused = prims.kmedoids(prims.xp, x, mean, init, weights, max_iter, stop_early)
        if fused is not None:
            labels, medoids, history, n_iter = fused
            return FlatClustering(None, labels, medoids, history, n_iter)
    # Passed as a temporary, so that the centred copy of x is freed before the iterations.
    token_dist = prims.self_sq_distances(prims.xp, x - mean)
    return run_kmedoids(prims, token_dist, init, weights, max_iter, stop_early)


def run_kmedoids(
    prims: Primitives, token_dist: Array, init: Array, weights: Array, max_iter: int,
    stop_early: bool = True,
) -> FlatClustering:
    """Weighted K-Medoids (Eq. 16-18; Eq. 10 and 12 with unit weights) from ``init``.

    Needs only ``token_dist`` (B, N, N), from ``prims.self_sq_distances`` of the centred
    tokens, computed once in O(N^2 M); each iteration is then O(N^2 + NK).
    """
    xp = prims.xp
    medoids = init
    labels, nearest = prims.medoid_assignment(xp, token_dist, medoids)
    history = [weighted_objective(xp, weights, nearest)]
    for _ in range(max_iter):
        medoids = update_medoids(prims, token_dist, labels, medoids, weights)
        new_labels, nearest = prims.medoid_assignment(xp, token_dist, medoids)
        history.append(weighted_objective(xp, weights, nearest))
        converged = stop_early and not bool(xp.any(new_labels != labels))
        labels = new_labels
        if converged:
            break
    # The centres are input tokens: callers gather them only if they need them.
    return FlatClustering(None, labels, medoids, xp.stack(history, axis=-1), len(history) - 1)
