"""Agreement with independent implementations, computed here and never by tokenpool_ops.

* ``kmeans`` against scikit-learn's Lloyd K-Means (``algorithm="lloyd"``, ``tol=0``,
  ``n_init=1``, the same starting tokens), with and without sample weights, on Gaussian blobs
  and on plain Gaussian noise, single and batched. Both count one iteration per centre update
  and stop once the labels no longer change, so they must agree at a small ``max_iter`` as
  well as at convergence: same labels, centres equal to rtol 1e-6.
* ``kmedoids`` against a brute-force alternating K-Medoids written below with Python loops
  (the tie rules of the library's documentation): identical medoids and assignment.
* ``reconstruction_error`` against a double loop of Eq. 9 / Eq. 13 and ``significance_scores``
  against a loop of Eq. 5.
* ``pool``: 'topk' keeps the k highest-scoring rows in their original order; the clustering
  methods return the (size- and score-) weighted mean of each returned cluster, and
  'wkmedoids' chooses the medoids of the brute force started from the top-k scores.

Every problem is drawn from a fixed seed and every test runs on each backend.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.cluster import KMeans

import tokenpool_ops as tp

# (seed, N, M, k, kind). scikit-learn moves the centre of a cluster that empties to a far
# point, where tokenpool_ops keeps it in place; the seeds are chosen so that no cluster ever
# empties, which each test asserts first (see empties_a_cluster).
PROBLEMS = [
    (0, 40, 2, 3, "blobs"),
    (2, 120, 8, 10, "blobs"),
    (1, 200, 16, 20, "blobs"),
    (3, 60, 2, 5, "noise"),
    (4, 150, 5, 12, "noise"),
    (5, 200, 16, 20, "noise"),
]


def make_points(rng: np.random.Generator, n: int, m: int, k: int, kind: str) -> np.ndarray:
    if kind == "noise":
        return rng.normal(size=(n, m))
    centres = rng.normal(scale=10.0, size=(k, m))
    return centres[rng.integers(k, size=n)] + rng.normal(size=(n, m))


def make_problem(seed: int, n: int, m: int, k: int, kind: str, batch: tuple[int, ...] = ()):
    """Points (..., N, M), positive weights (..., N) and distinct start indices (..., k)."""
    rng = np.random.default_rng(seed)
    shape = (*batch, n)
    points = np.stack([make_points(rng, n, m, k, kind) for _ in range(int(np.prod(batch)))])
    weights = rng.uniform(0.2, 3.0, size=shape)
    init = np.stack([rng.choice(n, size=k, replace=False) for _ in range(int(np.prod(batch)))])
    return points.reshape(*shape, m), weights, init.reshape(*batch, k)


def empties_a_cluster(x: np.ndarray, init: np.ndarray, weights, max_iter: int) -> bool:
    """Whether plain Lloyd from x[init] ever leaves a cluster empty within max_iter updates."""
    w = np.ones(len(x)) if weights is None else weights
    centres, labels = x[init], None
    for _ in range(max_iter + 1):
        new = np.argmin(((x[:, None, :] - centres[None]) ** 2).sum(-1), axis=1)
        counts = np.bincount(new, minlength=len(init))
        if (counts == 0).any():
            return True
        if labels is not None and (new == labels).all():
            return False
        labels = new
        centres = np.stack([np.average(x[labels == c], axis=0, weights=w[labels == c])
                            for c in range(len(init))])
    return False


def sklearn_lloyd(x: np.ndarray, init: np.ndarray, weights: np.ndarray | None, max_iter: int):
    model = KMeans(n_clusters=len(init), init=x[init], n_init=1, max_iter=max_iter, tol=0,
                   algorithm="lloyd")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning at small max_iter is expected
        model.fit(x, sample_weight=weights)
    return model.labels_, model.cluster_centers_


# --- K-Means against scikit-learn ----------------------------------------------------------------


@pytest.mark.parametrize("max_iter", [1, 3, 300])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: f"{p[4]}-N{p[1]}-M{p[2]}-k{p[3]}")
def test_kmeans_matches_sklearn_lloyd(backend, problem, weighted, max_iter):
    x, w, init = make_problem(*problem)
    w = w if weighted else None
    result = tp.kmeans(backend.asarray(x), problem[3], init=backend.asarray(init),
                       weights=None if w is None else backend.asarray(w), max_iter=max_iter)
    assert not empties_a_cluster(x, init, w, max_iter), "a cluster empties: pick another seed"
    labels, centres = sklearn_lloyd(x, init, w, max_iter)
    np.testing.assert_array_equal(backend.to_numpy(result.assignment), labels)
    np.testing.assert_allclose(backend.to_numpy(result.centres), centres, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("max_iter", [2, 300])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("kind", ["blobs", "noise"])
def test_batched_kmeans_matches_separate_sklearn_runs(backend, kind, weighted, max_iter):
    batch, k = (2, 3), 6
    x, w, init = make_problem(11, 50, 4, k, kind, batch=batch)
    w = w if weighted else None
    result = tp.kmeans(backend.asarray(x), k, init=backend.asarray(init),
                       weights=None if w is None else backend.asarray(w), max_iter=max_iter)
    got_labels = backend.to_numpy(result.assignment)
    got_centres = backend.to_numpy(result.centres)
    assert got_labels.shape == (*batch, 50) and got_centres.shape == (*batch, k, 4)
    for b in np.ndindex(*batch):
        assert not empties_a_cluster(x[b], init[b], None if w is None else w[b], max_iter)
        labels, centres = sklearn_lloyd(x[b], init[b], None if w is None else w[b], max_iter)
        np.testing.assert_array_equal(got_labels[b], labels, err_msg=f"problem {b}")
        np.testing.assert_allclose(got_centres[b], centres, rtol=1e-6, atol=1e-9,
                                   err_msg=f"problem {b}")


# --- K-Medoids against a brute force ----------------------------------------------------------


def brute_force_kmedoids(x: np.ndarray, init, weights=None, max_iter: int = 100):
    """Alternating K-Medoids with plain loops.

    Assignment: the nearest medoid, the lowest cluster on ties; a medoid keeps itself.
    Update: the member minimising sum over members j of w_j |x_j - x_m|^2; the current medoid
    stays unless a member is strictly better, else the lowest index. Stops when no medoid moves.
    """
    n = len(x)
    w = np.ones(n) if weights is None else weights
    dist = [[float(np.sum((x[i] - x[j]) ** 2)) for j in range(n)] for i in range(n)]
    medoids = [int(i) for i in init]

    def assign(medoids):
        labels = []
        for i in range(n):
            if i in medoids:
                labels.append(medoids.index(i))
                continue
            best = 0
            for c in range(1, len(medoids)):
                if dist[i][medoids[c]] < dist[i][medoids[best]]:
                    best = c
            labels.append(best)
        return labels

    labels = assign(medoids)
    for _ in range(max_iter):
        new = []
        for c, current in enumerate(medoids):
            members = [i for i in range(n) if labels[i] == c]
            cost = {m: sum(w[j] * dist[j][m] for j in members) for m in members}
            challenger = min(members, key=lambda m: (cost[m], m))  # lowest index on ties
            new.append(challenger if cost[challenger] < cost[current] else current)
        if new == medoids:
            break
        medoids = new
        labels = assign(medoids)
    return np.array(medoids), np.array(labels)


KMEDOIDS_PROBLEMS = [(20, 8, 2, 2), (21, 15, 3, 3), (22, 24, 2, 5), (23, 30, 4, 6),
                     (24, 30, 3, 4)]


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("kind", ["blobs", "noise"])
@pytest.mark.parametrize("problem", KMEDOIDS_PROBLEMS, ids=lambda p: f"N{p[1]}-M{p[2]}-k{p[3]}")
def test_kmedoids_matches_brute_force(backend, problem, kind, weighted):
    x, w, init = make_problem(*problem, kind)
    w = w if weighted else None
    result = tp.kmedoids(backend.asarray(x), problem[3], init=backend.asarray(init),
                         weights=None if w is None else backend.asarray(w), max_iter=100)
    medoids, labels = brute_force_kmedoids(x, init, w)
    np.testing.assert_array_equal(backend.to_numpy(result.medoids), medoids)
    np.testing.assert_array_equal(backend.to_numpy(result.assignment), labels)
    np.testing.assert_array_equal(backend.to_numpy(result.centres), x[medoids])


def test_batched_kmedoids_matches_brute_force_per_problem(backend):
    x, w, init = make_problem(30, 20, 3, 4, "noise", batch=(3,))
    result = tp.kmedoids(backend.asarray(x), 4, init=backend.asarray(init),
                         weights=backend.asarray(w), max_iter=100)
    for b in range(3):
        medoids, labels = brute_force_kmedoids(x[b], init[b], w[b])
        np.testing.assert_array_equal(backend.to_numpy(result.medoids)[b], medoids)
        np.testing.assert_array_equal(backend.to_numpy(result.assignment)[b], labels)


# --- measures against the equations ------------------------------------------------------------


def chamfer_loop(x: np.ndarray, centres: np.ndarray, weights=None) -> float:
    """Eq. 9 (Eq. 13 with weights): sum_i w_i min_j |x_i - c_j|^2."""
    total = 0.0
    for i in range(len(x)):
        nearest = min(sum((x[i][d] - c[d]) ** 2 for d in range(len(c))) for c in centres)
        total += (1.0 if weights is None else weights[i]) * nearest
    return total


@pytest.mark.parametrize("weighted", [False, True], ids=["eq9", "eq13"])
def test_reconstruction_error_matches_double_loop(backend, weighted):
    rng = np.random.default_rng(40)
    x = rng.normal(loc=3.0, size=(2, 3, 17, 5))
    centres = rng.normal(loc=3.0, size=(2, 3, 4, 5))
    w = rng.uniform(0.0, 2.0, size=(2, 3, 17)) if weighted else None
    got = tp.reconstruction_error(backend.asarray(x), backend.asarray(centres),
                                  weights=None if w is None else backend.asarray(w))
    expected = np.array([[chamfer_loop(x[a, b], centres[a, b], None if w is None else w[a, b])
                          for b in range(3)] for a in range(2)])
    backend.assert_like(got, (2, 3), backend.xp.float64)
    np.testing.assert_allclose(backend.to_numpy(got), expected, rtol=1e-10)


def test_significance_scores_match_eq5_loop(backend):
    rng = np.random.default_rng(41)
    logits = rng.normal(size=(2, 4, 7, 9))  # (batch, heads, queries, keys)
    attn = np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)
    got = tp.significance_scores(backend.asarray(attn))
    expected = np.zeros((2, 9))
    for b in range(2):
        for j in range(9):
            expected[b, j] = sum(attn[b, h, i, j] for h in range(4) for i in range(7))
    backend.assert_like(got, (2, 9), backend.xp.float64)
    np.testing.assert_allclose(backend.to_numpy(got), expected, rtol=1e-12)


# --- pool ------------------------------------------------------------------------------------


def test_pool_topk_keeps_highest_scoring_rows_in_order(backend):
    rng = np.random.default_rng(50)
    x = rng.normal(size=(3, 25, 6))
    scores = rng.uniform(size=(3, 25))
    got = backend.to_numpy(tp.pool(backend.asarray(x), 7, "topk", scores=backend.asarray(scores)))
    for b in range(3):
        keep = np.sort(np.argsort(-scores[b], kind="stable")[:7])
        np.testing.assert_array_equal(got[b], x[b, keep])


@pytest.mark.parametrize("with_sizes", [False, True], ids=["no-sizes", "sizes"])
@pytest.mark.parametrize("method", ["kmeans", "kmedoids", "wkmeans", "wkmedoids"])
def test_pool_tokens_are_weighted_means_of_returned_clusters(backend, method, with_sizes):
    rng = np.random.default_rng(51)
    k = 5
    x = rng.normal(size=(2, 30, 4))
    scores = rng.uniform(0.1, 2.0, size=(2, 30))
    sizes = rng.integers(1, 5, size=(2, 30)).astype(np.float64) if with_sizes else None
    info = tp.pool(backend.asarray(x), k, method, scores=backend.asarray(scores),
                   sizes=None if sizes is None else backend.asarray(sizes), return_info=True)
    labels = backend.to_numpy(info.assignment)
    weights = np.ones_like(scores) if sizes is None else sizes
    if method.startswith("w"):
        weights = weights * scores
    expected = np.zeros((2, k, 4))
    for b in range(2):
        for c in range(k):
            members = labels[b] == c
            assert members.any(), f"cluster {c} of problem {b} is empty; pick another seed"
            expected[b, c] = (weights[b, members, None] * x[b, members]).sum(0) / weights[
                b, members].sum()
    np.testing.assert_allclose(backend.to_numpy(info.tokens), expected, rtol=1e-12, atol=1e-14)


def test_pool_wkmedoids_follows_brute_force_from_topk_scores(backend):
    rng = np.random.default_rng(52)
    x = rng.normal(size=(2, 24, 3))
    scores = rng.uniform(0.1, 2.0, size=(2, 24))
    info = tp.pool(backend.asarray(x), 4, "wkmedoids", scores=backend.asarray(scores),
                   max_iter=100, return_info=True)
    for b in range(2):
        start = np.sort(np.argsort(-scores[b], kind="stable")[:4])
        medoids, labels = brute_force_kmedoids(x[b], start, scores[b])
        np.testing.assert_array_equal(backend.to_numpy(info.medoids)[b], medoids)
        np.testing.assert_array_equal(backend.to_numpy(info.assignment)[b], labels)
