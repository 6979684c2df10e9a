"""ToMe's bipartite soft matching as a pooling plan, on flattened batches.

Bolya et al., "Token Merging: Your ViT But Faster" (ICLR 2023), §3. One round splits the n
tokens alternately into A (positions 0, 2, 4, ...) and B (1, 3, 5, ...); each A token's
match is the B token whose metric row is most similar to its own (cosine similarity); the r
A tokens most similar to their match are merged into it. A round removes r <= floor(n / 2)
tokens; larger reductions run several rounds (:func:`merge_rounds`), the metric merged
between rounds as the tokens are (size-weighted means).

Output order of a round: the A tokens left unmerged, in their order, then the B tokens, in
their order (ToMe's reference code puts the unmerged A tokens in their similarity order
instead). Ties go to the lower index, on every backend: in the match (the first maximum) and
in the ranking (a stable sort). The plan is an assignment of every token to its output
token; ``_pool`` merges with it as it merges clusters (size-weighted means, sizes summed).
"""

from __future__ import annotations

from ._clustering import effective_weights, weighted_means
from ._compat import Array, Namespace, constant, device, take_along_axis
from ._primitives import Primitives


def merge_rounds(n: int, k: int) -> list[int]:
    """Tokens each round removes on the way from n tokens to k: all that are left to
    remove, at most floor(n / 2) of the n tokens entering the round (ToMe's cap).

    Merging never reaches zero tokens (a round on one token removes nothing), so ``k`` must
    be at least 1 when ``n > k``; ``pool`` answers k = 0 without merging."""
    if n > k and k < 1:
        raise ValueError(f"merging reaches at least one token; got n={n}, k={k}")
    removed = []
    while n > k:
        r = min(n - k, n // 2)
        removed.append(r)
        n -= r
    return removed


def unit_rows(xp: Namespace, metric: Array) -> Array:
    """The rows of ``metric`` (B, n, D) scaled to unit length; a zero row stays zero (its
    cosine similarity with every token is then 0, not NaN). Each row is divided by its
    largest magnitude first, so that its squares neither overflow nor underflow."""
    if metric.shape[-1] == 0:
        return metric
    one = constant(xp, 1.0, metric)
    largest = xp.max(xp.abs(metric), axis=-1, keepdims=True)
    scaled = metric / xp.where(largest > 0, largest, one)
    norm = xp.sqrt(xp.sum(scaled * scaled, axis=-1, keepdims=True))
    return scaled / xp.where(norm > 0, norm, one)


def bipartite_round(xp: Namespace, metric: Array, r: int, index_dtype: object) -> Array:
    """One round of bipartite soft matching that merges r <= floor(n / 2) of the n tokens
    of ``metric`` (B, n, D): the output index (B, n) of every token, in [0, n - r)."""
    n = metric.shape[1]
    unit = unit_rows(xp, metric)
    a, b = unit[:, 0::2, :], unit[:, 1::2, :]
    n_a = a.shape[1]
    similarity = xp.matmul(a, xp.matrix_transpose(b))  # (B, n_a, n - n_a): the round's cost
    # copy=False: no copy where argmax and argsort give the index dtype already.
    match = xp.astype(xp.argmax(similarity, axis=-1), index_dtype,  # first maximum: lower B
                      copy=False)
    ranking = xp.argsort(-xp.max(similarity, axis=-1), axis=-1, stable=True)  # lower A first
    kept = xp.sort(ranking[:, r:], axis=-1)
    # Where each A token stands in [kept (ascending), merged]: its output index if kept.
    position = xp.astype(xp.argsort(xp.concat([kept, ranking[:, :r]], axis=-1), axis=-1),
                         index_dtype, copy=False)
    n_kept = n_a - r
    to_a = xp.where(position < n_kept, position, n_kept + match)
    # B token j's output index is n_kept + j; with n odd, one column more (cut below) gives
    # B as many columns as A.
    to_b = n_kept + xp.arange(n_a, dtype=index_dtype, device=device(metric))
    to_b = xp.broadcast_to(to_b[None, :], (metric.shape[0], n_a))
    # Token i is A token i // 2 when i is even, B token i // 2 when it is odd: the two
    # interleaved.
    pairs = xp.stack([to_a, to_b], axis=-1)  # (B, n_a, 2)
    return xp.reshape(pairs, (metric.shape[0], 2 * n_a))[:, :n]


def match_tokens(prims: Primitives, metric: Array, sizes: Array, sizes_may_be_zero: bool,
                 k: int, index_dtype: object) -> Array:
    """Rounds of bipartite soft matching from the N tokens of ``metric`` (B, N, D), of
    ``sizes`` (B, N), to k in [1, N): the output token (B, N) of every input token.

    Between rounds the metric rows of each group become their size-weighted mean (the
    plain mean where the group's sizes sum to zero; ``sizes_may_be_zero=False`` declares
    the sizes positive, so there is nothing to check) and the sizes their sum.
    """
    xp = prims.xp
    n = metric.shape[1]
    assignment = xp.arange(n, dtype=index_dtype, device=device(metric))
    assignment = xp.broadcast_to(assignment[None, :], (metric.shape[0], n))
    rounds = merge_rounds(n, k)
    if len(rounds) > 1 and metric.shape[-1] > 0:
        # Cosine similarity ignores a positive factor per problem; within [-1, 1] the
        # size-weighted sums of the merges cannot overflow.
        largest = xp.max(xp.abs(metric), axis=(1, 2), keepdims=True)
        metric = metric / xp.where(largest > 0, largest, constant(xp, 1.0, metric))
    for i, r in enumerate(rounds):
        destination = bipartite_round(xp, metric, r, index_dtype)
        assignment = take_along_axis(xp, destination, assignment, axis=-1)
        if i + 1 == len(rounds):
            break
        n_out = metric.shape[1] - r
        fallback = sizes if sizes_may_be_zero else None
        weights = effective_weights(prims, destination, n_out, sizes, fallback)
        metric = weighted_means(prims, metric, destination, n_out, weights, metric[:, :1, :])
        sizes = prims.segment_sum(xp, sizes[:, :, None], destination, n_out)[:, :, 0]
    return assignment
