"""Choosing k of N tokens: the initialisations of Algorithm 1 and the paper's baselines (§5).

All index sets come back sorted ascending, so selected tokens keep their original order.
Ties are broken towards the lower token index.
"""

from __future__ import annotations

from ._compat import Array, Namespace, constant, device, index_dtype, take_along_axis
from ._random import uniforms


def top_k(xp: Namespace, keys: Array, k: int) -> Array:
    """Indices (B, k) of the k largest ``keys`` (B, N), in ascending index order.

    Among equal keys the lower index is taken (a stable sort of the negated keys).
    """
    order = xp.argsort(-keys, axis=-1, stable=True)
    return xp.sort(order[:, :k], axis=-1)


def spread(xp: Namespace, batch: int, n: int, k: int, like: Array) -> Array:
    """Evenly spaced indices ``floor(j N / k)``, j = 0..k-1: the default with no scores."""
    ids = (xp.arange(k, dtype=index_dtype(xp, like), device=device(like)) * n) // k
    return xp.broadcast_to(ids[None, :], (batch, k))


def draw_without_replacement(
    xp: Namespace, weights: Array | None, k: int, seed: int, like: Array
) -> Array:
    """k distinct indices per problem, uniformly or with probability proportional to weights.

    Exponential race: token i gets key E_i / w_i with E_i = -log U_i ~ Exp(1); the k smallest
    keys are a draw without replacement proportional to w (Efraimidis and Spirakis, 2006),
    and without weights the k largest U_i are a uniform draw. Tokens of zero weight have no
    preference among them: they are taken only when fewer than k tokens have positive weight,
    and then uniformly (by the largest U_i, as an unweighted draw), so a problem whose weights
    are all zero draws exactly the tokens of an unweighted draw. The uniforms come from a
    counter-based hash of (seed, problem, token) computed on ``like``'s device (see
    :mod:`._random`), so every backend draws the same tokens; a problem's draw depends on its
    position in the batch. Equal keys go to the lower index.
    """
    u = uniforms(xp, seed, (like.shape[0], like.shape[1]), like)
    if weights is None:
        return top_k(xp, u, k)
    positive = weights > 0
    safe = xp.where(positive, weights, constant(xp, 1.0, weights))
    # The k smallest race keys E_i / w_i win; zero-weight tokens race by U_i (largest first).
    race = xp.where(positive, -xp.log(u) / safe, -u)
    by_race = xp.argsort(race, axis=-1, stable=True)
    # Then positive weights first, keeping the race order inside each group (stable).
    zero_weight = xp.astype(take_along_axis(xp, ~positive, by_race, axis=-1), xp.int8)
    order = take_along_axis(xp, by_race, xp.argsort(zero_weight, axis=-1, stable=True), axis=-1)
    return xp.sort(order[:, :k], axis=-1)
