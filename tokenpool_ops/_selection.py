"""Choosing k of N tokens: the initialisations of Algorithm 1 and the paper's baselines (§5).

All index sets come back sorted ascending, so selected tokens keep their original order.
Ties are broken towards the lower token index.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._batching import no_overflow_warnings
from ._compat import Array, Namespace, constant, device, index_dtype, take_along_axis
from ._methods import MATCHING_METHODS, SELECTION_METHODS, Init
from ._primitives import top_k
from ._random import uniforms

if TYPE_CHECKING:
    from ._batching import Batch


def choose(batch: Batch, method: str, init: Init, order_by: Array | None, k: int, seed: int,
           order_name: str = "scores") -> Array | None:
    """The tokens (B, k) a baseline of §5 keeps, or the clustering's initial centres from
    ``init`` (already validated), ranked by ``order_by`` (the scores; the weights of
    ``kmeans`` and ``kmedoids``, named ``order_name``); None for 'tome', which matches."""
    if method in MATCHING_METHODS:
        return None
    if method in SELECTION_METHODS:
        if method == "topk":
            return batch.prims.top_k(batch.xp, order_by, k)
        weights = order_by if method == "importance" else None
        with no_overflow_warnings(batch.xp):  # a tiny score's race key is -inf, rightly
            return draw_without_replacement(batch.xp, weights, k, seed, batch.x)
    return initial_centres(batch, init, order_by, k, seed, order_name)


def initial_centres(batch: Batch, init: Init, order_by: Array | None, k: int, seed: int,
                    order_name: str) -> Array:
    """Starting token indices (B, k): an ``init`` array as it is, or the named
    initialisation (by default 'topk' where ``order_by`` is given, 'spread' otherwise)."""
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
        return batch.prims.top_k(xp, order_by, k)
    if init == "random":
        return draw_without_replacement(xp, None, k, seed, batch.x)
    return spread(xp, n_problems, n, k, batch.x)


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
