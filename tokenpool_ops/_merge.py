"""From a plan to pooled tokens: the weights of each token, then Algorithm 1, line 6.

A plan is the tokens a baseline keeps (:func:`select`), or groups of tokens, the clusters of
K-Means and K-Medoids or the matches of ToMe, whose weighted means become the output tokens
(:func:`merge`). :func:`token_weights` states once which weights those means use; the
differentiable ``tokenpool_ops.nn.merge`` uses it too.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._batching import Batch
from ._clustering import (
    FlatClustering,
    cluster,
    effective_weights,
    reconstruction_objective,
    sq_errors,
    weighted_means,
    weighted_objective,
)
from ._compat import Array, Namespace, device, take_along_axis
from ._methods import Detail
from ._primitives import assign_to_medoids
from ._results import PoolResult


@dataclass(frozen=True)
class TokenWeights:
    """The weights of a flattened batch's tokens, each (B, N)."""

    #: How many original tokens each token stands for: the given sizes, else ones.
    carried: Array
    #: ``w_i`` of Eq. 13 and of the means: scores times sizes for the w-methods, else sizes.
    weights: Array
    #: What a group whose ``weights`` sum to zero uses instead (see effective_weights);
    #: None where the weights are ones, which cannot sum to zero.
    fallback: Array | None


def token_weights(xp: Namespace, x: Array, scores: Array | None,
                  sizes: Array | None) -> TokenWeights:
    """The weights of tokens ``x`` (B, N, ·) with ``scores`` (B, N), given only for methods
    that weigh by them (the w-methods; without scores they are unweighted), and ``sizes``
    (B, N) or None."""
    carried = (xp.ones(x.shape[:2], dtype=x.dtype, device=device(x)) if sizes is None
               else sizes)
    # scores * ones is scores, bit for bit: the product is needed only with sizes.
    weights = carried if scores is None else scores if sizes is None else scores * carried
    return TokenWeights(carried, weights, None if scores is None and sizes is None else carried)


def select(batch: Batch, chosen: Array, w: TokenWeights, detail: Detail) -> PoolResult:
    """The baselines of §5: keep the ``chosen`` input tokens (B, k), in their original
    order; ``detail`` 'info' also finds each token's nearest kept token and the objective."""
    xp, prims = batch.xp, batch.prims
    tokens = prims.gather_rows(xp, batch.x, chosen)
    sizes = take_along_axis(xp, w.carried, chosen, axis=-1)
    if detail != "info":
        medoids = chosen if detail == "plan" else None
        return PoolResult(tokens, None, sizes, medoids, None, None, 0)
    centred = batch.centred()
    to_kept = prims.sq_distances(xp, centred, prims.gather_rows(xp, centred, chosen))
    labels, _ = assign_to_medoids(xp, to_kept, chosen)
    objective = weighted_objective(xp, w.weights, sq_errors(prims, batch.x, tokens, labels))
    return PoolResult(tokens, labels, sizes, chosen, objective, objective[:, None], 0)


def cluster_and_merge(batch: Batch, method: str, init: Array, k: int, w: TokenWeights,
                      max_iter: int, stop_early: bool, detail: Detail) -> PoolResult:
    """The clustering methods from the initial centres ``init`` (B, k): :func:`cluster`,
    then :func:`merge_clusters`. For K-Medoids without the objective, a backend's
    ``kmedoids_merge`` does both in one kernel, a problem at a time (the same results)."""
    prims = batch.prims
    if (prims.kmedoids_merge is not None and not method.endswith("kmeans")
            and detail != "info"):
        fused = prims.kmedoids_merge(prims.xp, batch.x, batch.mean, init, w.weights,
                                     w.fallback, w.carried, max_iter, stop_early)
        if fused is not None:
            labels, medoids, history, n_iter, tokens, sizes = fused
            return PoolResult(tokens, labels, sizes, medoids, None, history, n_iter)
    clusters = cluster(prims, method, batch.x, batch.mean, init, w.weights, w.fallback,
                       max_iter, stop_early)
    return merge_clusters(batch, clusters, k, w, detail)


def merge_clusters(batch: Batch, clusters: FlatClustering, k: int, w: TokenWeights,
                   detail: Detail) -> PoolResult:
    """The weighted mean of each of the k clusters (Algorithm 1, line 6)."""
    labels = clusters.assignment
    # Only K-Means clusters can be empty (a medoid belongs to its own cluster).
    empty = None if clusters.centres is None else clusters.centres + batch.mean
    tokens, sizes, objective = merge(batch, labels, k, w, empty, detail == "info")
    # The history is kept in every detail: an overflow in the clustering shows there first
    # (see _overflow).
    return PoolResult(tokens, labels, sizes, clusters.medoids, objective, clusters.history,
                      clusters.n_iter)


def merge_matches(batch: Batch, labels: Array, k: int, w: TokenWeights,
                  detail: Detail) -> PoolResult:
    """The size-weighted mean of each group of tokens ToMe merged (see _tome), as for
    clusters. No clustering history: one entry, the objective, as for the baselines."""
    tokens, sizes, objective = merge(batch, labels, k, w, None, detail == "info")
    history = None if objective is None else objective[:, None]
    return PoolResult(tokens, labels, sizes, None, objective, history, 0)


def merge(batch: Batch, labels: Array, k: int, w: TokenWeights, empty: Array | None,
          with_objective: bool) -> tuple[Array, Array, Array | None]:
    """Algorithm 1, line 6: the weighted mean of each group ``labels`` (B, N) in [0, k) of
    the tokens (``empty`` for a group with no member; None: the batch's mean token, which
    no group of a medoid or a ToMe match ever needs), the carried sizes summed, and the
    objective (Eq. 9/13 of the means) when asked (else None).

    ``Primitives.merge``, where a backend has it, does all three in one pass (one launch on
    CUDA) for the groups with the mean token as ``empty``."""
    prims = batch.prims
    if empty is None and prims.merge is not None:
        fused = prims.merge(batch.xp, batch.x, batch.mean, labels, k, w.weights, w.fallback,
                            w.carried, with_objective)
        if fused is not None:
            return fused
    if empty is None:
        empty = batch.mean
    weights = effective_weights(prims, labels, k, w.weights, w.fallback)
    # Means of the original (not centred) tokens, so that they are the members' exact means.
    tokens = weighted_means(prims, batch.x, labels, k, weights, empty)
    sizes = prims.segment_sum(batch.xp, w.carried[:, :, None], labels, k)[:, :, 0]
    objective = (reconstruction_objective(prims, batch.x, batch.mean, tokens, w.weights)
                 if with_objective else None)
    return tokens, sizes, objective
