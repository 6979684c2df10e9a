"""Generic building blocks, written once against the array API standard.

Each primitive works on flattened problems: a batch axis ``B`` first, then tokens. Backends
may replace any of them with a faster equivalent (see :mod:`tokenpool_ops.backends`); the
tests check every replacement against the function here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ._compat import Array, Namespace, constant, device, take_along_axis


def sq_distances(xp: Namespace, a: Array, b: Array) -> Array:
    """Squared Euclidean distances between the rows of ``a`` (B, N, M) and ``b`` (B, K, M).

    Uses the Gram expansion ``|a|^2 + |b|^2 - 2 a.b``, clamped at zero against rounding.
    Callers centre the points first (subtract each problem's mean), which keeps the
    cancellation error small even for tokens far from the origin.
    """
    sq_a = xp.sum(a * a, axis=-1)
    sq_b = xp.sum(b * b, axis=-1)
    gram = xp.matmul(a, xp.matrix_transpose(b))
    return xp.clip(sq_a[:, :, None] + sq_b[:, None, :] - 2 * gram, min=0)


def self_sq_distances(xp: Namespace, a: Array) -> Array:
    """Squared distances between all tokens of each problem, (B, N, N), exact zero diagonal.

    Computed once per K-Medoids call (O(N^2 M)). The matrix is made exactly symmetric by
    mirroring its upper triangle (a matrix product need not be symmetric) and its diagonal
    exactly zero, so that the tie rules see true ties: in a two-member cluster both members
    then cost exactly the same.
    """
    n = a.shape[-2]
    ids = xp.arange(n, device=device(a))
    below = ids[:, None] > ids[None, :]
    dist = sq_distances(xp, a, a)
    dist = xp.where(below, xp.matrix_transpose(dist), dist)
    return xp.where(ids[:, None] == ids[None, :], constant(xp, 0.0, a), dist)


def _one_hot(xp: Namespace, labels: Array, k: int, dtype: object) -> Array:
    """(B, k, N) indicator of each token's cluster."""
    cluster_ids = xp.arange(k, dtype=labels.dtype, device=device(labels))
    return xp.astype(labels[:, None, :] == cluster_ids[:, None], dtype)


def segment_sum(xp: Namespace, values: Array, labels: Array, k: int) -> Array:
    """Sum ``values`` (B, N, C) over the tokens of each label: (B, k, C).

    ``labels`` (B, N) holds integers in [0, k). Generic form: a one-hot matrix product.
    """
    return xp.matmul(_one_hot(xp, labels, k, values.dtype), values)


def weighted_segment_sums(
    xp: Namespace, values: Array, labels: Array, k: int, weights: Array
) -> tuple[Array, Array]:
    """``sum_i w_i values_i`` (B, k, C) and ``sum_i w_i`` (B, k) over each label's tokens.

    The numerator and denominator of Eq. 15 from one weighted one-hot matrix, which folds
    the weights in without a (B, N, C) temporary.
    """
    weighted_one_hot = _one_hot(xp, labels, k, values.dtype) * weights[:, None, :]
    return xp.matmul(weighted_one_hot, values), xp.sum(weighted_one_hot, axis=-1)


def weighted_means(
    xp: Namespace, values: Array, labels: Array, k: int, weights: Array, empty: Array,
    segment_sums: Callable[..., tuple[Array, Array]] = weighted_segment_sums,
) -> Array:
    """Weighted mean of ``values`` (B, N, C) per label (B, k, C); ``empty`` where the
    label's weights sum to zero (``empty`` is (B, 1, C) or (B, k, C)).

    ``segment_sums`` lets a backend reuse this formula with its own segment sums.
    """
    sums, totals = segment_sums(xp, values, labels, k, weights)
    totals = totals[:, :, None]
    safe_totals = xp.where(totals > 0, totals, constant(xp, 1.0, totals))
    return xp.where(totals > 0, sums / safe_totals, empty)


def medoid_costs(xp: Namespace, dist: Array, labels: Array, weights: Array) -> Array:
    """Cost of each token as its cluster's medoid: the sum over Eq. 12 / Eq. 17.

    ``cost[b, i] = sum_{i': a(i') = a(i)} w[b, i'] * dist[b, i', i]``, for ``dist`` (B, N, N),
    ``labels`` (B, N) and ``weights`` (B, N). O(N^2) work; no (B, K, N, N) array is formed.
    """
    same_cluster = labels[:, :, None] == labels[:, None, :]
    within = xp.where(same_cluster, dist, constant(xp, 0.0, dist))
    # Summing down the columns, cost[m] = sum_i' w_i' dist[i', m], uses the same entries
    # dist[i, m] as the assignment step, so the objective provably never increases.
    return xp.matmul(weights[:, None, :], within)[:, 0, :]


def assign_to_medoids(xp: Namespace, to_medoids: Array, medoids: Array) -> tuple[Array, Array]:
    """Eq. 16: nearest medoid, lowest cluster index on ties; a medoid always keeps itself.

    ``to_medoids`` (B, N, K) holds squared distances from every token to every medoid,
    ``medoids`` (B, K) the medoids' token indices (distinct within a problem).
    """
    n = to_medoids.shape[1]
    token_ids = xp.arange(n, dtype=medoids.dtype, device=device(medoids))
    is_own_medoid = token_ids[None, :, None] == medoids[:, None, :]  # (B, N, K)
    # A medoid's label is set, not found by argmin: a NaN distance (unchecked input) would
    # otherwise win the argmin and put a medoid in another cluster.
    own_cluster = xp.argmax(xp.astype(is_own_medoid, xp.int8), axis=-1)
    labels = xp.where(xp.any(is_own_medoid, axis=-1), own_cluster, xp.argmin(to_medoids, axis=-1))
    nearest = xp.min(xp.where(is_own_medoid, constant(xp, 0.0, to_medoids), to_medoids), axis=-1)
    return labels, nearest


def medoid_assignment(xp: Namespace, token_dist: Array, medoids: Array) -> tuple[Array, Array]:
    """Eq. 16 with the distances read off the (B, N, N) token matrix of one K-Medoids run."""
    to_medoids = take_along_axis(xp, token_dist, medoids[:, None, :], axis=-1)
    return assign_to_medoids(xp, to_medoids, medoids)


def top_k(xp: Namespace, keys: Array, k: int) -> Array:
    """Indices (B, k) of the k largest ``keys`` (B, N), in ascending index order.

    Among equal keys the lower index is taken (a stable sort of the negated keys).
    """
    order = xp.argsort(-keys, axis=-1, stable=True)
    return xp.sort(order[:, :k], axis=-1)


def gather_rows(xp: Namespace, values: Array, index: Array) -> Array:
    """``values[b, index[b, j], :]``: rows (B, K, C) picked from (B, N, C) by (B, K) indices."""
    return take_along_axis(xp, values, index[:, :, None], axis=1)


def all_finite(xp: Namespace, x: Array) -> bool:
    """True if ``x`` holds no NaN and no infinity (one device synchronisation)."""
    return bool(xp.all(xp.isfinite(x)))


def all_valid(xp: Namespace, values: Array, nonnegative: bool) -> Array:
    """0-d boolean: every value is finite (integers always are) and, with ``nonnegative``,
    at least 0; a NaN fails. The verdict of a value check, left on the device."""
    valid = values >= 0 if nonnegative else None
    if xp.isdtype(values.dtype, "real floating") or valid is None:
        finite = xp.isfinite(values)
        valid = finite if valid is None else valid & finite
    return xp.all(valid)


def finite_sum(xp: Namespace, arrays: Sequence[Array]) -> Array:
    """0-d boolean: whether the total of ``arrays`` (floating, at least one), each summed by
    ``xp.sum`` and the sums added in their order, is finite (a NaN is not). The finite check
    of a result (_overflow.finite_total): a non-finite value makes every such total
    non-finite, whatever the order of the additions."""
    total = xp.sum(arrays[0])
    for values in arrays[1:]:
        total = total + xp.sum(values)
    return all_valid(xp, total, False)


def read_flags(xp: Namespace, flags: Sequence[Array],
               count: Array | None) -> tuple[list[bool], int | None]:
    """0-d boolean ``flags`` and a non-negative 0-d integer ``count`` (or None) read on the
    host in one device synchronisation: packed into one integer, flag i at bit i and the
    count above them."""
    if not flags and count is None:
        return [], None
    dtype = xp.int32 if count is None else xp.int64  # int64: JAX without x64 has no counts
    values = [xp.astype(v, dtype) for v in flags]
    if count is not None:
        values.append(xp.astype(count, dtype))
    packed = xp.stack(values)
    powers = xp.arange(packed.shape[0], dtype=dtype, device=device(packed))
    bits = int(xp.sum(packed << powers))  # the one synchronisation
    return [bool(bits >> i & 1) for i in range(len(flags))], (
        None if count is None else bits >> len(flags))


def read_flags_on_host(xp: Namespace, flags: Sequence[Array],
                       count: Array | None) -> tuple[list[bool], int | None]:
    """:func:`read_flags` for arrays in host memory, where a read costs no synchronisation:
    each value read as it is, without the packing's half a dozen operations."""
    return [bool(flag) for flag in flags], None if count is None else int(count)


@dataclass(frozen=True)
class Primitives:
    """The replaceable primitives of one backend; fields default to the generic versions."""

    xp: Namespace
    sq_distances: Callable[..., Array] = sq_distances
    self_sq_distances: Callable[..., Array] = self_sq_distances
    segment_sum: Callable[..., Array] = segment_sum
    weighted_segment_sums: Callable[..., tuple[Array, Array]] = weighted_segment_sums
    weighted_means: Callable[..., Array] = weighted_means
    medoid_costs: Callable[..., Array] = medoid_costs
    medoid_assignment: Callable[..., tuple[Array, Array]] = medoid_assignment
    all_finite: Callable[..., bool] = all_finite
    all_valid: Callable[..., Array] = all_valid
    finite_sum: Callable[..., Array] = finite_sum
    read_flags: Callable[..., tuple[list[bool], int | None]] = read_flags
    gather_rows: Callable[..., Array] = gather_rows
    top_k: Callable[..., Array] = top_k
    #: A fused K-Medoids (distances and iterations) for tokens on the host, with the result of
    #: ``_clustering.run_kmedoids``; it returns None where it does not apply (e.g. on a GPU).
    kmedoids: Callable[..., tuple[Array, Array, Array, int] | None] | None = None
    #: A fused K-Means for tokens on the host, with the result of ``_clustering.run_kmeans``
    #: (centres, labels, history, n_iter); None where it does not apply.
    kmeans: Callable[..., tuple[Array, Array, Array, int] | None] | None = None
    #: Algorithm 1, line 6 fused for the medoid methods: ``(tokens, sizes, objective)`` of
    #: clusters ``labels`` as ``_merge.merge_clusters`` computes them from the same
    #: arguments (objective None unless asked); None where it does not apply.
    merge: Callable[..., tuple[Array, Array, Array | None] | None] | None = None
    #: ``kmedoids`` then ``merge`` (no objective) in one kernel, a problem at a time, for
    #: tokens on the host: ``(labels, medoids, history, n_iter, tokens, sizes)`` as those two
    #: give them from the same arguments; None where it does not apply (then they run).
    kmedoids_merge: Callable[..., tuple[Array, Array, Array, int, Array, Array] | None] | None = (
        None)
    name: str = "generic"
