"""Compiled CPU kernels (Numba) behind the NumPy and PyTorch-CPU fast paths.

These kernels replace the passes over whole arrays that the generic code makes from Python:

* :func:`kmedoids`: the K-Medoids iterations of Eq. 16-17, one problem per loop step. It
  starts from the dot products of the K initial medoids with the N - K other tokens,
  (B, K, N - K), which :func:`medoid_gram` computes with the caller's BLAS (at most a
  quarter of the (B, N, N) Gram matrix), and computes any other distance it needs directly
  from the token differences: a new row when a medoid moves, and the two sums that confirm
  a move (the medoid update ranks the members by their distance to the cluster's weighted
  mean, O(n M) per cluster). The full matrix is never formed.
* :func:`kmeans`: the K-Means iterations of Eq. 10-11 / 14-15 on the Gram matrix of the
  centred tokens (:func:`centred_gram`, the caller's BLAS). Each centre is kept as a weighted
  set of tokens, so an iteration costs O(N^2) per problem instead of O(N K M).
* :func:`weighted_means`: the cluster means of Eq. 11/15 and Algorithm 1, line 6, by one
  scatter pass over the tokens (O(N M) instead of the one-hot product's O(N K M));
  :func:`segment_sum` likewise for the small per-token sums (weights, sizes).

All run per problem, in token order, so results do not depend on the thread count. Each
kernel exists twice: parallel over problems (used next to PyTorch) and serial (used next to
NumPy, whose OpenBLAS threads spin for a while after every matrix product and would fight
Numba's threads for the same cores; measured 5-10x slow-downs on 2 cores). The gather of
the centred blocks is serial only: it alternates with the products, PyTorch's as well
(see _gather_centred_serial). (Sharing the
serial K-Medoids+merge kernel of a NumPy batch between two Python threads was tried: it
gained nothing on two idle cores and slowed the matrix products after it;
benchmarks/results/pool_issue23c.md.)

Threading layer: Numba's default picks OpenMP where TBB is absent, and OpenMP's worker
threads keep spinning after each parallel loop (``OMP_WAIT_POLICY=active`` behaviour), on
the very cores PyTorch's own threads need next: one pool call (B=1, N=197, M=384, k=98)
took 86.8 ms of CPU time that way against 2.8 ms with Numba's own ``workqueue`` layer, whose
idle threads sleep. So on import this module selects ``workqueue`` for the process, unless
the user has chosen already: ``NUMBA_THREADING_LAYER`` or ``NUMBA_THREADING_LAYER_PRIORITY``
in the environment, ``numba.config.THREADING_LAYER`` set in code, ``OMP_WAIT_POLICY`` in the
environment (an OpenMP user who tuned the spinning), or parallel Numba code that has run
already (the layer is then fixed). ``workqueue`` aborts the process when launches from
several threads meet (seen here with four threads pooling at once, although the kernels hold
the GIL), so the parallel kernels launch under one lock. To get OpenMP back:
``NUMBA_THREADING_LAYER=omp``, ideally with ``OMP_WAIT_POLICY=passive``.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numba
import numpy as np
from numba.np.ufunc import parallel as _numba_parallel

_CONFIG: Any = numba.config  # its settings are set at run time, unknown to type checkers
#: Environment variables through which a user chooses Numba's threading (see the docstring).
_USER_CHOICES = ("NUMBA_THREADING_LAYER", "NUMBA_THREADING_LAYER_PRIORITY", "OMP_WAIT_POLICY")


def _choose_threading_layer() -> bool:
    """Select the ``workqueue`` layer unless the user chose; whether we selected it."""
    if any(name in os.environ for name in _USER_CHOICES):
        return False
    launched = getattr(_numba_parallel, "_is_initialized", False)  # the layer is fixed then
    if _CONFIG.THREADING_LAYER != "default" or launched:
        return False
    _CONFIG.THREADING_LAYER = "workqueue"
    return True


_choose_threading_layer()
_LAUNCH_LOCK = threading.Lock()


def _shared(parallel: bool, n_problems: int) -> bool:
    """Whether to run the parallel kernel: the kernels split problems, not tokens, so one
    problem runs on one thread, and a parallel launch would only wake the pool (at B = 1
    each launch cost more than the serial kernel's whole run)."""
    return parallel and n_problems > 1


def _launching(parallel: bool) -> contextlib.AbstractContextManager[object]:
    """Held around a parallel kernel where the layer is ``workqueue`` (one launch at a
    time, or Numba aborts); nothing otherwise."""
    if parallel and _CONFIG.THREADING_LAYER == "workqueue":
        return _LAUNCH_LOCK
    return _NO_LOCK


#: What a serial launch holds: nothing (one shared instance: a launch is a few microseconds).
_NO_LOCK = contextlib.nullcontext()

__all__ = ["centred_gram", "kmeans", "kmedoids", "kmedoids_merge", "medoid_gram", "merge",
           "segment_sum", "top_k", "weighted_means"]

# Reassociation lets the distance loop vectorise; the result is still the same on every run.
_FAST_MATH = {"nsz", "arcp", "contract", "afn", "reassoc"}


@numba.njit(cache=True, fastmath=_FAST_MATH)
def _sq_distance(a: Any, b: Any) -> Any:
    total = a.dtype.type(0)
    for q in range(a.shape[0]):
        diff = a[q] - b[q]
        total += diff * diff
    return total


@numba.njit(cache=True, fastmath=_FAST_MATH)
def _centred_sq_norms(x: Any, mean: Any, out: Any) -> None:
    for i in range(x.shape[0]):
        total = x.dtype.type(0)
        for q in range(x.shape[1]):
            v = x[i, q] - mean[q]
            total += v * v
        out[i] = total


@numba.njit(cache=True)
def _medoids_first(medoids: Any, n: int, order: Any) -> None:
    """``order`` (N,): the medoids in cluster order, then the other tokens ascending."""
    k = medoids.shape[0]
    is_medoid = np.zeros(n, np.bool_)
    for c in range(k):
        is_medoid[medoids[c]] = True
        order[c] = medoids[c]
    slot = k
    for i in range(n):
        if not is_medoid[i]:
            order[slot] = i
            slot += 1


@numba.njit(cache=True, fastmath=_FAST_MATH)
def _gather_centred_one(x: Any, mean: Any, medoids: Any, out: Any) -> None:
    """``out`` (N, M): the centred tokens of one problem, medoids first (see _medoids_first)."""
    order = np.empty(x.shape[0], np.int64)
    _medoids_first(medoids, x.shape[0], order)
    for r in range(x.shape[0]):
        token = x[order[r]]
        for q in range(x.shape[1]):
            out[r, q] = token[q] - mean[q]


@numba.njit(cache=True)
def _medoid_rows(gram: Any, sq_norms: Any, medoids: Any) -> Any:
    """Squared distances (K, N) of each medoid to every token from the Gram block.

    ``gram`` (K, N - K) holds the dot products of the centred medoids with the centred other
    tokens in ascending order: ``|a|^2 + |b|^2 - 2 a.b``, clamped at zero. A medoid is at 0
    from itself; the distances between medoids are never read (a medoid always keeps its
    own cluster), so they are set to infinity until a medoid leaves (see _move_medoid).
    """
    k, n = medoids.shape[0], sq_norms.shape[0]
    order = np.empty(n, np.int64)
    _medoids_first(medoids, n, order)
    rows = np.empty((k, n), gram.dtype)
    for c in range(k):
        m = medoids[c]
        for j in range(n - k):
            i = order[k + j]
            d = sq_norms[m] + sq_norms[i] - 2 * gram[c, j]
            rows[c, i] = 0 if d < 0 else d  # clamped at zero; NaN stays NaN, as np.clip
        for other in range(k):
            rows[c, medoids[other]] = np.inf
        rows[c, m] = 0
    return rows


@numba.njit(cache=True)
def _assign(rows: Any, medoids: Any, labels: Any, nearest: Any) -> None:
    """Eq. 16: the nearest medoid, the lowest cluster index on ties; a medoid keeps itself.

    Every token starts in cluster 0 at its distance to medoid 0, so a label is written even
    when no distance is below infinity (overflow) or all are NaN: labels stay in [0, K).
    """
    nearest[:] = rows[0]
    labels[:] = 0
    for c in range(1, rows.shape[0]):
        row = rows[c]
        for i in range(rows.shape[1]):
            if row[i] < nearest[i]:  # strict: an equal later cluster does not win
                nearest[i] = row[i]
                labels[i] = c
    for c in range(medoids.shape[0]):
        labels[medoids[c]] = c
        nearest[medoids[c]] = 0


@numba.njit(cache=True)
def _members_by_cluster(labels: Any, k: int) -> tuple[Any, Any]:
    """Token indices grouped by cluster, ascending within each: (order, starts)."""
    starts = np.zeros(k + 1, np.int64)
    for i in range(labels.shape[0]):
        starts[labels[i] + 1] += 1
    for c in range(k):
        starts[c + 1] += starts[c]
    fill = starts[:k].copy()
    order = np.empty(labels.shape[0], np.int64)
    for i in range(labels.shape[0]):
        order[fill[labels[i]]] = i
        fill[labels[i]] += 1
    return order, starts


@numba.njit(cache=True)
def _move_medoid(x: Any, rows: Any, medoids: Any, c: int, new: int) -> None:
    """Medoid ``c`` becomes token ``new``: its row, and the old medoid's distances to the
    other medoids (an ordinary token now), computed from the token differences."""
    old = medoids[c]
    medoids[c] = new
    for i in range(x.shape[0]):
        rows[c, i] = _sq_distance(x[new], x[i])
    rows[c, new] = 0
    for other in range(medoids.shape[0]):
        if other != c:
            rows[other, old] = _sq_distance(x[medoids[other]], x[old])


@numba.njit(cache=True)
def _medoid_cost(x: Any, row: Any, current: int, i: int, members: Any, weights: Any) -> float:
    """``sum_j w_j |f_i - f_j|^2`` over the members (Eq. 17, weights inside). Distances to the
    current medoid are read off its row, the very values the assignment used, so that a
    move never raises the objective and a two-member cluster sees one distance both ways."""
    cost = 0.0  # float64 accumulation: products of float32 values are exact in it
    for j in members:
        if i == current:
            d = row[j]
        elif j == current:
            d = row[i]
        elif j == i:
            d = 0.0
        else:
            d = _sq_distance(x[i], x[j])
        cost += weights[j] * d
    return cost


@numba.njit(cache=True, fastmath=_FAST_MATH)
def _add_centred(total: Any, weight: Any, token: Any, mean: Any) -> None:
    """``total += weight * (token - mean)``."""
    for q in range(token.shape[0]):
        total[q] += weight * (token[q] - mean[q])


@numba.njit(cache=True, fastmath=_FAST_MATH)
def _offset_score(scale: Any, token: Any, mean: Any, weighted_sum: Any) -> Any:
    """``|scale * (token - mean) - weighted_sum|^2`` (vectorised: the loop may reassociate)."""
    score = 0.0
    for q in range(token.shape[0]):
        v = scale * (token[q] - mean[q]) - weighted_sum[q]
        score += v * v
    return score


#: Clusters up to this size rank their members by the pairwise sums themselves (cheaper
#: than the weighted mean for so few members; two members cost O(1) from the medoid's row).
_PAIRWISE_UP_TO = 4


@numba.njit(cache=True)
def _cheapest_member(x: Any, row: Any, current: int, members: Any, weights: Any) -> int:
    """The member of least cost (_medoid_cost), the lowest token index among equals."""
    best, best_cost = members[0], np.inf
    for i in members:
        cost = _medoid_cost(x, row, current, i, members, weights)
        if cost < best_cost:
            best, best_cost = i, cost
    return best


@numba.njit(cache=True)
def _nearest_to_weighted_mean(x: Any, mean: Any, members: Any, weights: Any,
                              weighted_sum: Any) -> int:
    """The member of least ``|W f_i - S|^2``, the lowest token index among equals."""
    total = 0.0
    weighted_sum[:] = 0
    for j in members:
        total += weights[j]
        _add_centred(weighted_sum, weights[j], x[j], mean)
    best, best_score = members[0], np.inf
    for i in members:
        score = _offset_score(total, x[i], mean, weighted_sum)
        if score < best_score:
            best, best_score = i, score
    return best


@numba.njit(cache=True)
def _update_medoids(x: Any, mean: Any, rows: Any, labels: Any, medoids: Any,
                    weights: Any) -> None:
    """Eq. 17 with the weights inside: the member of least ``sum_j w_j |f_i - f_j|^2``.

    That cost is ``W |f_i - mu|^2`` plus a constant of the cluster (``W = sum_j w_j``, ``mu``
    the weighted mean), so in larger clusters the challenger is the member of least
    ``|W f_i - S|^2`` (``S = sum_j w_j f_j``, centred): O(n M) per cluster of n members
    instead of O(n^2 M) for all pairwise sums, and exact on integer data. Among equals the
    lowest token index wins. The current medoid stays unless the challenger's cost, summed
    from distances, is strictly lower (rounding of the shortcut alone never moves a medoid).
    """
    order, starts = _members_by_cluster(labels, medoids.shape[0])
    weighted_sum = np.empty(x.shape[1], np.float64)
    for c in range(medoids.shape[0]):
        members = order[starts[c]:starts[c + 1]]
        if members.shape[0] < 2:
            continue  # a medoid alone in its cluster stays
        current = medoids[c]
        if members.shape[0] <= _PAIRWISE_UP_TO:
            best = _cheapest_member(x, rows[c], current, members, weights)
        else:
            best = _nearest_to_weighted_mean(x, mean, members, weights, weighted_sum)
        if best != current and (_medoid_cost(x, rows[c], current, best, members, weights)
                                < _medoid_cost(x, rows[c], current, current, members, weights)):
            _move_medoid(x, rows, medoids, c, best)


@numba.njit(cache=True)
def _kmedoids_one(x: Any, mean: Any, gram: Any, medoids: Any, weights: Any, labels: Any,
                  history: Any, max_iter: int) -> int:
    """One problem: assign, then alternate update and assignment until nothing changes."""
    n = x.shape[0]
    sq_norms = np.empty(n, gram.dtype)
    _centred_sq_norms(x, mean, sq_norms)
    rows = _medoid_rows(gram, sq_norms, medoids)
    nearest = np.empty(n, rows.dtype)
    _assign(rows, medoids, labels, nearest)
    history[0] = np.sum(weights * nearest)
    new_labels = np.empty_like(labels)
    done = 0
    while done < max_iter:
        _update_medoids(x, mean, rows, labels, medoids, weights)
        _assign(rows, medoids, new_labels, nearest)
        done += 1
        history[done] = np.sum(weights * nearest)
        changed = np.any(new_labels != labels)
        labels[:] = new_labels
        if not changed:  # a fixed point: further iterations would repeat it exactly
            break
    history[done + 1:] = history[done]
    return done


# ---------------------------------------------------------------------------------------------
# K-Means on the Gram matrix: each centre is kept as a weighted set of tokens,
# c = sum_a coef_a f_member_a, so |f_i - c|^2 = G_ii - 2 sum_a coef_a G_i,member_a + |c|^2
# costs O(N) per member instead of O(M) per token.


@numba.njit(cache=True)
def _assign_to_means(gram: Any, member: Any, coef: Any, count: Any, dot: Any, labels: Any,
                     nearest: Any) -> None:
    """Eq. 10 / 14 from the Gram matrix: the nearest centre, the lowest index on ties.

    Cluster 0 is taken unconditionally (``c == 0``), so every token gets a label in [0, K)
    even when its distances overflow to infinity or are NaN.
    """
    n = gram.shape[0]
    for c in range(count.shape[0]):
        row = dot[c]
        row[:] = 0
        for a in range(count[c]):
            weight, g = coef[c, a], gram[member[c, a]]
            for i in range(n):
                row[i] += weight * g[i]
        centre_sq = 0.0
        for a in range(count[c]):
            centre_sq += coef[c, a] * row[member[c, a]]
        for i in range(n):
            d = gram[i, i] + centre_sq - 2 * row[i]
            d = 0.0 if d < 0 else d  # clamped at zero; NaN stays NaN, as np.clip
            if c == 0 or d < nearest[i]:  # strict: an equal later cluster does not win
                nearest[i] = d
                labels[i] = c


@numba.njit(cache=True)
def _update_means(labels: Any, weights: Any, fallback: Any, member: Any, coef: Any,
                  count: Any) -> None:
    """Eq. 11 / 15 as token sets: each non-empty cluster becomes its members with weights
    ``w_i / sum w``; zero-weight clusters use ``fallback``, then ones (as
    clustering.effective_weights); empty clusters keep their centre."""
    k = count.shape[0]
    order, starts = _members_by_cluster(labels, k)
    for c in range(k):
        members = order[starts[c]:starts[c + 1]]
        if members.shape[0] == 0:
            continue
        use = weights
        if np.sum(weights[members]) <= 0:
            use = fallback if np.sum(fallback[members]) > 0 else np.ones_like(weights)
        total = np.sum(use[members].astype(np.float64))
        count[c] = members.shape[0]
        for a in range(members.shape[0]):
            member[c, a] = members[a]
            coef[c, a] = use[members[a]] / total


@numba.njit(cache=True)
def _kmeans_one(x: Any, mean: Any, gram: Any, init: Any, weights: Any, fallback: Any,
                labels: Any, centres: Any, history: Any, max_iter: int) -> int:
    """One problem: assign to the initial tokens, then alternate update and assignment until
    nothing changes; ``centres`` gets the final centres (centred frame)."""
    n, k = x.shape[0], init.shape[0]
    member = np.empty((k, n), np.int64)
    coef = np.ones((k, n), np.float64)
    count = np.ones(k, np.int64)
    member[:, 0] = init
    dot = np.empty((k, n), np.float64)
    nearest = np.empty(n, np.float64)
    _assign_to_means(gram, member, coef, count, dot, labels, nearest)
    history[0] = np.sum(weights * nearest)
    new_labels = np.empty_like(labels)
    done = 0
    while done < max_iter:
        _update_means(labels, weights, fallback, member, coef, count)
        _assign_to_means(gram, member, coef, count, dot, new_labels, nearest)
        done += 1
        history[done] = np.sum(weights * nearest)
        changed = np.any(new_labels != labels)
        labels[:] = new_labels
        if not changed:  # a fixed point: further iterations would repeat it exactly
            break
    history[done + 1:] = history[done]
    _centres_from_sets(x, mean, member, coef, count, centres)
    return done


@numba.njit(cache=True)
def _centres_from_sets(x: Any, mean: Any, member: Any, coef: Any, count: Any,
                       centres: Any) -> None:
    """``centres`` (K, M): each weighted token set summed, in the centred frame."""
    total = np.empty(x.shape[1], np.float64)
    for c in range(count.shape[0]):
        total[:] = 0
        for a in range(count[c]):
            token, weight = x[member[c, a]], coef[c, a]
            for q in range(x.shape[1]):
                total[q] += weight * (token[q] - mean[q])
        centres[c] = total


@numba.njit(cache=True)
def _divide(row: Any, divisor: Any) -> None:
    """``row /= divisor``, the same quotients. A loop: the in-place array operation passes
    through Numba's ufunc machinery row by row, 3x slower (B=64, K=98, M=384: 0.85 against
    0.26 ms, of a 13 ms NumPy pool call)."""
    for q in range(row.shape[0]):
        row[q] = row[q] / divisor


@numba.njit(cache=True)
def _weighted_means_one(values: Any, labels: Any, weights: Any, empty: Any, out: Any) -> None:
    """One problem's cluster means, in token order; clusters of zero weight take ``empty``."""
    k = out.shape[0]
    totals = np.zeros(k, values.dtype)
    out[:] = 0
    for i in range(values.shape[0]):
        c, w = labels[i], weights[i]
        totals[c] += w
        row = out[c]
        for q in range(values.shape[1]):
            row[q] += w * values[i, q]
    for c in range(k):
        if totals[c] > 0:
            _divide(out[c], totals[c])
        else:
            out[c] = empty[c if empty.shape[0] == k else 0]


@numba.njit(cache=True)
def _merge_one(x: Any, labels: Any, weights: Any, fallback: Any, has_fallback: bool,
               carried: Any, empty: Any, effective: Any, tokens: Any, sizes: Any) -> None:
    """One problem's merge (Algorithm 1, line 6): the per-cluster totals of ``weights``,
    ``fallback`` and ``carried`` in token order, each token's effective weight (the cluster's
    ``weights``, else its ``fallback``, else one: ``_clustering.effective_weights``), then the
    means of :func:`_weighted_means_one`. ``sizes`` gets the carried totals."""
    k = tokens.shape[0]
    weight_totals = np.zeros(k, weights.dtype)
    fallback_totals = np.zeros(k, weights.dtype)
    sizes[:] = 0
    for i in range(x.shape[0]):
        c = labels[i]
        weight_totals[c] += weights[i]
        fallback_totals[c] += fallback[i]
        sizes[c] += carried[i]
    for i in range(x.shape[0]):
        c = labels[i]
        if not has_fallback or weight_totals[c] > 0:
            effective[i] = weights[i]
        elif fallback_totals[c] > 0:
            effective[i] = fallback[i]
        else:
            effective[i] = 1
    _weighted_means_one(x, labels, effective, empty, tokens)


@numba.njit(parallel=True, cache=True)
def _merge_parallel(x, labels, weights, fallback, has_fallback, carried, empty, effective,
                    tokens, sizes):  # type: ignore[no-untyped-def]
    for p in numba.prange(x.shape[0]):
        _merge_one(x[p], labels[p], weights[p], fallback[p], has_fallback, carried[p],
                   empty[p], effective[p], tokens[p], sizes[p])


@numba.njit(cache=True)
def _merge_serial(x, labels, weights, fallback, has_fallback, carried, empty, effective,
                  tokens, sizes):  # type: ignore[no-untyped-def]
    for p in range(x.shape[0]):
        _merge_one(x[p], labels[p], weights[p], fallback[p], has_fallback, carried[p],
                   empty[p], effective[p], tokens[p], sizes[p])


@numba.njit(cache=True)
def _segment_sum_serial(values, labels, out):  # type: ignore[no-untyped-def]
    out[:] = 0
    for p in range(values.shape[0]):
        for i in range(values.shape[1]):
            row = out[p, labels[p, i]]
            for q in range(values.shape[2]):
                row[q] += values[p, i, q]


# Each batch loop twice: Numba's cache keys a function by name, not by its parallel flag.
@numba.njit(parallel=True, cache=True)
def _kmedoids_parallel(x, mean, gram, medoids, weights, labels, history, iterations,
                       max_iter):  # type: ignore[no-untyped-def]
    for p in numba.prange(x.shape[0]):
        iterations[p] = _kmedoids_one(x[p], mean[p], gram[p], medoids[p], weights[p],
                                      labels[p], history[p], max_iter)


@numba.njit(cache=True)
def _kmedoids_serial(x, mean, gram, medoids, weights, labels, history, iterations,
                     max_iter):  # type: ignore[no-untyped-def]
    for p in range(x.shape[0]):
        iterations[p] = _kmedoids_one(x[p], mean[p], gram[p], medoids[p], weights[p],
                                      labels[p], history[p], max_iter)


@numba.njit(cache=True)
def _kmedoids_merge_one(x, mean, gram, medoids, weights, labels, history, max_iter, fallback,
                        has_fallback, carried, empty, effective, tokens,
                        sizes):  # type: ignore[no-untyped-def]
    """One problem's K-Medoids, then its merge while its tokens are still in cache: the
    same two functions as the kernels of :func:`kmedoids` and :func:`merge`, on the same
    arguments, so the same results bit for bit, with one pass over ``x`` from memory fewer."""
    done = _kmedoids_one(x, mean, gram, medoids, weights, labels, history, max_iter)
    _merge_one(x, labels, weights, fallback, has_fallback, carried, empty, effective, tokens,
               sizes)
    return done


@numba.njit(parallel=True, cache=True)
def _kmedoids_merge_parallel(x, mean, gram, medoids, weights, labels, history, iterations,
                             max_iter, fallback, has_fallback, carried, empty, effective,
                             tokens, sizes):  # type: ignore[no-untyped-def]
    for p in numba.prange(x.shape[0]):
        iterations[p] = _kmedoids_merge_one(
            x[p], mean[p], gram[p], medoids[p], weights[p], labels[p], history[p], max_iter,
            fallback[p], has_fallback, carried[p], empty[p], effective[p], tokens[p], sizes[p])


@numba.njit(cache=True)
def _kmedoids_merge_serial(x, mean, gram, medoids, weights, labels, history, iterations,
                           max_iter, fallback, has_fallback, carried, empty, effective,
                           tokens, sizes):  # type: ignore[no-untyped-def]
    for p in range(x.shape[0]):
        iterations[p] = _kmedoids_merge_one(
            x[p], mean[p], gram[p], medoids[p], weights[p], labels[p], history[p], max_iter,
            fallback[p], has_fallback, carried[p], empty[p], effective[p], tokens[p], sizes[p])


@numba.njit(parallel=True, cache=True)
def _kmeans_parallel(x, mean, gram, init, weights, fallback, labels, centres, history,
                     iterations, max_iter):  # type: ignore[no-untyped-def]
    for p in numba.prange(x.shape[0]):
        iterations[p] = _kmeans_one(x[p], mean[p], gram[p], init[p], weights[p], fallback[p],
                                    labels[p], centres[p], history[p], max_iter)


@numba.njit(cache=True)
def _kmeans_serial(x, mean, gram, init, weights, fallback, labels, centres, history,
                   iterations, max_iter):  # type: ignore[no-untyped-def]
    for p in range(x.shape[0]):
        iterations[p] = _kmeans_one(x[p], mean[p], gram[p], init[p], weights[p], fallback[p],
                                    labels[p], centres[p], history[p], max_iter)


# Serial only: the gather alternates with the caller's matrix products, whose BLAS threads
# keep spinning on the other cores for a while after each; a parallel gather fought them
# (PyTorch, B=64, N=197, M=384: the whole pool call's median 12.9-14.3 ms against 11.1-11.7
# with this serial gather, the best calls equal; benchmarks/results/pool_issue23e.md).
@numba.njit(cache=True)
def _gather_centred_serial(x, mean, medoids, out):  # type: ignore[no-untyped-def]
    for p in range(x.shape[0]):
        _gather_centred_one(x[p], mean[p], medoids[p], out[p])


@numba.njit(parallel=True, cache=True)
def _weighted_means_parallel(values, labels, weights, empty, out):  # type: ignore[no-untyped-def]
    for p in numba.prange(values.shape[0]):
        _weighted_means_one(values[p], labels[p], weights[p], empty[p], out[p])


@numba.njit(cache=True)
def _weighted_means_serial(values, labels, weights, empty, out):  # type: ignore[no-untyped-def]
    for p in range(values.shape[0]):
        _weighted_means_one(values[p], labels[p], weights[p], empty[p], out[p])


@numba.njit(cache=True)
def _top_k_one(keys: Any, out: Any) -> bool:
    """``out`` (k,): the indices of the k largest ``keys``, the lower index first among
    equals, ascending; False (``out`` unset) where a key is NaN.

    The first k of a stable sort of ``-keys`` are the tokens below the k-th smallest
    negated key ``t``, then the lowest-index tokens equal to ``t`` until k are taken: one
    selection and one pass in index order instead of a sort (no NaN: a sort places NaN
    last, which a selection would not).
    """
    n, k = keys.shape[0], out.shape[0]
    negated = np.empty(n, keys.dtype)
    for i in range(n):
        negated[i] = -keys[i]
        if np.isnan(negated[i]):
            return False
    if k == 0:
        return True
    threshold = np.partition(negated, k - 1)[k - 1]
    ties = k
    for i in range(n):
        if negated[i] < threshold:
            ties -= 1
    taken = 0
    for i in range(n):
        if negated[i] < threshold or (negated[i] == threshold and ties > 0):
            if not negated[i] < threshold:
                ties -= 1
            out[taken] = i
            taken += 1
    return True


@numba.njit(cache=True)
def _top_k_serial(keys, out):  # type: ignore[no-untyped-def]
    for p in range(keys.shape[0]):
        if not _top_k_one(keys[p], out[p]):
            return False
    return True


def top_k(keys: np.ndarray, k: int) -> np.ndarray | None:
    """``_primitives.top_k`` of ``keys`` (B, N), float32 or float64, with 0 <= k <= N: the
    same indices (B, k), int64, in O(N) per problem; None where a key is NaN (there the
    generic sort decides). Serial: microseconds per problem."""
    out = np.empty((keys.shape[0], k), dtype=np.int64)
    return out if _top_k_serial(keys, out) else None


#: Matrix product of stacks: ``matmul(a, b, out)`` sets ``out = a @ b^T``, (P, K, N - K).
BatchMatmul = Callable[[np.ndarray, np.ndarray, np.ndarray], object]


def _centred_blocks(x: np.ndarray, mean: np.ndarray, medoids: np.ndarray,
                    block_bytes: int) -> Iterator[tuple[slice, np.ndarray]]:
    """Blocks of problems, centred and gathered medoids first into one reused buffer of
    about ``block_bytes``: it stays in cache for a matrix product, and no centred copy of
    all of ``x`` exists. ``medoids`` (B, K) may have K = 0 (tokens in order)."""
    n_problems, n, m = x.shape
    step = max(1, block_bytes // max(1, n * m * x.itemsize))
    buffer = np.empty((min(step, n_problems), n, m), dtype=x.dtype)
    mean = mean[:, 0]
    for start in range(0, n_problems, step):
        stop = min(start + step, n_problems)
        block = buffer[: stop - start]
        _gather_centred_serial(x[start:stop], mean[start:stop], medoids[start:stop], block)
        yield slice(start, stop), block


def medoid_gram(
    x: np.ndarray, mean: np.ndarray, medoids: np.ndarray, block_bytes: int,
    matmul: BatchMatmul,
) -> np.ndarray:
    """Dot products of the centred medoids with the other centred tokens, (B, K, N - K).

    The other tokens come in ascending order. This is the only O(N^2 M) work of K-Medoids,
    at most a quarter of the Gram matrix (K (N - K) <= N^2 / 4), and it runs in the caller's
    BLAS (``matmul``), block by block (see _centred_blocks).
    """
    n_problems, n, _ = x.shape
    k = medoids.shape[1]
    out = np.empty((n_problems, k, n - k), dtype=x.dtype)
    for problems, block in _centred_blocks(x, mean, medoids, block_bytes):
        matmul(block[:, :k], block[:, k:], out[problems])
    return out


def centred_gram(x: np.ndarray, mean: np.ndarray, block_bytes: int,
                 matmul: BatchMatmul) -> np.ndarray:
    """The Gram matrices of the centred tokens, (B, N, N), block by block."""
    n_problems, n, _ = x.shape
    out = np.empty((n_problems, n, n), dtype=x.dtype)
    no_medoids = np.empty((n_problems, 0), dtype=np.int64)
    for problems, block in _centred_blocks(x, mean, no_medoids, block_bytes):
        matmul(block, block, out[problems])
    return out


def _loop_outputs(x: np.ndarray, init: np.ndarray,
                  max_iter: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What every clustering kernel fills: labels (B, N), the objective history
    (B, max_iter + 1) and each problem's iteration count (B,)."""
    n_problems, n = x.shape[:2]
    return (np.empty((n_problems, n), dtype=init.dtype),
            np.empty((n_problems, max_iter + 1), dtype=x.dtype),
            np.zeros(n_problems, dtype=np.int64))


def _iterations_run(history: np.ndarray, iterations: np.ndarray, max_iter: int,
                    stop_early: bool) -> tuple[np.ndarray, int]:
    """The history up to T and T: the most iterations any problem ran with ``stop_early``
    (each repeats its fixed point after it), else ``max_iter``."""
    # The ufunc's reduce itself: ndarray.max passes through two Python frames first.
    n_iter = int(np.maximum.reduce(iterations, initial=0)) if stop_early else max_iter
    return history[:, : n_iter + 1], n_iter


def _merge_outputs(x: np.ndarray, k: int, weights: np.ndarray,
                   carried: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What every merge kernel fills: tokens (B, k, M), sizes (B, k) and its scratch of
    effective weights (B, N)."""
    return (np.empty((x.shape[0], k, x.shape[2]), dtype=x.dtype),
            np.empty((x.shape[0], k), dtype=carried.dtype),
            np.empty(weights.shape, dtype=weights.dtype))


def kmeans(
    x: np.ndarray, mean: np.ndarray, gram: np.ndarray, init: np.ndarray, weights: np.ndarray,
    fallback: np.ndarray | None, max_iter: int, stop_early: bool, parallel: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """K-Means of tokens ``x`` (B, N, M) from the tokens ``init`` (B, K) as centres.

    ``gram`` is :func:`centred_gram` of ``x`` and its per-problem ``mean`` (B, 1, M).
    Every iteration costs O(N (N + K)) per problem instead of O(N K M). Returns the centres
    (B, K, M) in the centred frame, labels (B, N), the objective history (B, T + 1) and T,
    as :func:`kmedoids`.
    """
    labels, history, iterations = _loop_outputs(x, init, max_iter)
    centres = np.empty((x.shape[0], init.shape[1], x.shape[2]), dtype=x.dtype)
    # Without fallback the weights are positive (unit weights): the fallback is never read.
    fallback = weights if fallback is None else fallback
    parallel = _shared(parallel, x.shape[0])
    kernel = _kmeans_parallel if parallel else _kmeans_serial
    with _launching(parallel):
        kernel(x, mean[:, 0, :], gram, init, weights, fallback, labels, centres, history,
               iterations, max_iter)
    return centres, labels, *_iterations_run(history, iterations, max_iter, stop_early)


def kmedoids(
    x: np.ndarray, mean: np.ndarray, gram: np.ndarray, init: np.ndarray,
    weights: np.ndarray, max_iter: int, stop_early: bool, parallel: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """K-Medoids of tokens ``x`` (B, N, M) from the medoids ``init`` (B, K).

    ``gram`` is :func:`medoid_gram` of ``x``, its per-problem ``mean`` (B, 1, M) and
    ``init``. Returns labels (B, N), medoids (B, K), the objective history (B, T + 1) and T,
    as the generic loop: each problem stops at its fixed point and repeats it, so T is the
    most any problem needed (``max_iter`` when not ``stop_early``).
    """
    labels, history, iterations = _loop_outputs(x, init, max_iter)
    medoids = np.array(init, copy=True)
    parallel = _shared(parallel, x.shape[0])
    kernel = _kmedoids_parallel if parallel else _kmedoids_serial
    with _launching(parallel):
        kernel(x, mean[:, 0, :], gram, medoids, weights, labels, history, iterations,
               max_iter)
    return labels, medoids, *_iterations_run(history, iterations, max_iter, stop_early)


def kmedoids_merge(
    x: np.ndarray, mean: np.ndarray, gram: np.ndarray, init: np.ndarray, weights: np.ndarray,
    fallback: np.ndarray | None, carried: np.ndarray, max_iter: int, stop_early: bool,
    parallel: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, np.ndarray, np.ndarray]:
    """:func:`kmedoids` then :func:`merge` of its clusters in one kernel, a problem at a
    time (its tokens read from memory once for both): labels, medoids, history, T as
    :func:`kmedoids`, then the tokens (B, K, M) and sizes (B, K) of :func:`merge` with the
    same ``weights``, ``fallback`` and ``carried`` and the problems' ``mean`` (B, 1, M) for
    an empty cluster (a medoid's cluster never is). The same results bit for bit.

    ``parallel``: Numba's parallel kernel (next to PyTorch); else the serial one (next to
    NumPy)."""
    labels, history, iterations = _loop_outputs(x, init, max_iter)
    medoids = np.array(init, copy=True)
    tokens, sizes, effective = _merge_outputs(x, init.shape[1], weights, carried)
    parallel = _shared(parallel, x.shape[0])
    kernel = _kmedoids_merge_parallel if parallel else _kmedoids_merge_serial
    with _launching(parallel):
        kernel(x, mean[:, 0, :], gram, medoids, weights, labels, history, iterations, max_iter,
               weights if fallback is None else fallback, fallback is not None, carried,
               mean, effective, tokens, sizes)
    history, n_iter = _iterations_run(history, iterations, max_iter, stop_early)
    return labels, medoids, history, n_iter, tokens, sizes


def weighted_means(
    values: np.ndarray, labels: np.ndarray, k: int, weights: np.ndarray, empty: np.ndarray,
    parallel: bool,
) -> np.ndarray:
    """``sum_i w_i values_i / sum_i w_i`` per cluster (B, k, C); ``empty`` where it is 0.

    ``empty`` is (B, 1, C) or (B, k, C).
    """
    out = np.empty((values.shape[0], k, values.shape[2]), dtype=values.dtype)
    parallel = _shared(parallel, values.shape[0])
    kernel = _weighted_means_parallel if parallel else _weighted_means_serial
    with _launching(parallel):
        kernel(values, labels, weights, empty, out)
    return out


def merge(
    x: np.ndarray, labels: np.ndarray, k: int, weights: np.ndarray,
    fallback: np.ndarray | None, carried: np.ndarray, empty: np.ndarray, parallel: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Algorithm 1, line 6 in one pass per problem: the tokens (B, k, M) and sizes (B, k)
    that ``_merge.merge`` computes from ``effective_weights``, :func:`weighted_means` and
    :func:`segment_sum` (each total summed in token order in the weights' dtype, so the
    results are the same bit for bit). ``empty`` (B, 1, M) or (B, k, M) as in
    :func:`weighted_means`; ``fallback`` None declares the weights positive."""
    tokens, sizes, effective = _merge_outputs(x, k, weights, carried)
    has_fallback = fallback is not None
    parallel = _shared(parallel, x.shape[0])
    kernel = _merge_parallel if parallel else _merge_serial
    with _launching(parallel):
        kernel(x, labels, weights, weights if fallback is None else fallback, has_fallback,
               carried, empty, effective, tokens, sizes)
    return tokens, sizes


def segment_sum(values: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """``values`` (B, N, C) summed over the tokens of each label, (B, k, C), in token order.

    Serial only: it serves the small per-token sums (weights, sizes), C = 1 or 2.
    """
    out = np.empty((values.shape[0], k, values.shape[2]), dtype=values.dtype)
    _segment_sum_serial(values, labels, out)
    return out
