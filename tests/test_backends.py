"""Fast paths equal the generic array-API code, and every backend agrees with NumPy.

Fast paths are checked primitive by primitive and end to end (``fast_paths=False`` forces
the generic code). Cross-backend agreement uses integer-valued coordinates whose pairwise
squared distances are all distinct, so no comparison is a near tie and every library must
produce identical assignments.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from tokenpool_ops.backends import primitives_for

import tokenpool_ops
from tokenpool_ops._primitives import Primitives

METHODS = ["kmeans", "kmedoids", "wkmeans", "wkmedoids", "topk", "random", "importance"]
FAST_BACKENDS = ["numpy", "torch-cpu", "torch-cuda"]


def test_fast_paths_are_selected_automatically():
    import array_api_compat.numpy as xp

    assert primitives_for(xp).name == "numpy"
    assert primitives_for(xp, fast_paths=False).name == "generic"


@pytest.mark.parametrize("name", FAST_BACKENDS)
@pytest.mark.parametrize("n,k,m", [(1, 1, 1), (7, 3, 4), (50, 20, 16)])
def test_fast_primitives_equal_generic(backend_named, name, n, k, m, rng):
    backend = backend_named(name)
    fast, generic = primitives_for(backend.xp), Primitives(backend.xp)
    assert fast.name != "generic", "this backend is expected to have fast paths"
    a = backend.asarray(rng.normal(size=(3, n, m)))
    b = backend.asarray(rng.normal(size=(3, k, m)))
    labels = backend.asarray(rng.integers(0, k, size=(3, n)))
    weights = backend.asarray(rng.random((3, n)))
    xp = backend.xp

    def both(primitive, *args):
        return [backend.to_numpy(getattr(p, primitive)(xp, *args)) for p in (fast, generic)]

    def both_pairs(primitive, *args):
        return [[backend.to_numpy(part) for part in getattr(p, primitive)(xp, *args)]
                for p in (fast, generic)]

    np.testing.assert_allclose(*both("sq_distances", a, b), rtol=1e-12, atol=1e-12)
    fast_self, generic_self = both("self_sq_distances", a)
    np.testing.assert_allclose(fast_self, generic_self, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(fast_self, np.swapaxes(fast_self, -1, -2))
    np.testing.assert_array_equal(np.diagonal(fast_self, axis1=-2, axis2=-1), 0.0)
    np.testing.assert_allclose(*both("segment_sum", a, labels, k), rtol=1e-12, atol=1e-12)
    for fast_part, generic_part in zip(*both_pairs("weighted_segment_sums", a, labels, k,
                                                   weights), strict=True):
        np.testing.assert_allclose(fast_part, generic_part, rtol=1e-12, atol=1e-12)
    dist = backend.asarray(generic_self)
    np.testing.assert_allclose(*both("medoid_costs", dist, labels, weights), rtol=1e-12)
    rows = backend.asarray(rng.integers(0, n, size=(3, k)))
    np.testing.assert_array_equal(*both("gather_rows", a, rows))


@pytest.mark.parametrize("name", FAST_BACKENDS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fast_paths_equal_generic_end_to_end(backend_named, name, method, dtype, rng):
    backend = backend_named(name)
    x = rng.normal(size=(4, 60, 8)).astype(dtype)
    scores = rng.exponential(size=(4, 60)).astype(dtype)
    sizes = rng.integers(1, 5, size=(4, 60)).astype(dtype)
    results = [
        tokenpool_ops.pool(backend.asarray(x), 17, method, scores=backend.asarray(scores),
                           sizes=backend.asarray(sizes), return_info=True, fast_paths=fast)
        for fast in (True, False)
    ]
    fast, generic = ({f: backend.to_numpy(getattr(r, f)) for f in
                      ("tokens", "assignment", "sizes", "objective")} for r in results)
    np.testing.assert_array_equal(fast["assignment"], generic["assignment"])
    rtol = 1e-5 if dtype == "float32" else 1e-12
    for field in ("tokens", "sizes", "objective"):
        np.testing.assert_allclose(fast[field], generic[field], rtol=rtol, atol=rtol)


def tie_free_integer_problem(seed: int, batch: int = 3, n: int = 30, m: int = 3):
    """Integer coordinates whose squared pairwise distances are distinct in each problem."""
    rng = np.random.default_rng(seed)
    while True:
        x = rng.integers(-1000, 1000, size=(batch, n, m))
        d = ((x[:, :, None, :] - x[:, None, :, :]) ** 2).sum(-1)
        upper = np.triu_indices(n, 1)
        if all(len(np.unique(d[b][upper])) == len(upper[0]) for b in range(batch)):
            scores = rng.integers(1, 20, size=(batch, n)).astype(float)
            return x.astype(float), scores


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_backend_matches_numpy(backend, method, seed):
    # The reference is NumPy's generic array-API path: on NumPy itself the comparison is
    # then that of its fast paths (the Numba kernels) with the generic code, not of NumPy
    # with itself.
    x, scores = tie_free_integer_problem(seed)
    reference = tokenpool_ops.pool(x, 8, method, scores=scores, return_info=True,
                                   fast_paths=False)
    result = tokenpool_ops.pool(backend.asarray(x), 8, method, scores=backend.asarray(scores),
                                return_info=True)
    np.testing.assert_array_equal(backend.to_numpy(result.assignment), reference.assignment)
    np.testing.assert_allclose(backend.to_numpy(result.tokens), reference.tokens, rtol=1e-12)
    assert result.n_iter == reference.n_iter


@pytest.mark.parametrize("name", FAST_BACKENDS)
def test_fast_medoid_assignment_and_finite_check_equal_generic(backend_named, name, rng):
    backend = backend_named(name)
    xp = backend.xp
    fast, generic = primitives_for(xp), Primitives(xp)
    points = rng.integers(0, 3, size=(4, 30, 2)).astype(float)  # many exact ties
    dist = generic.self_sq_distances(xp, backend.asarray(points))
    medoids = backend.asarray(np.sort(rng.permuted(np.tile(np.arange(30), (4, 1)),
                                                   axis=1)[:, :9], axis=1))
    for got, want in zip(fast.medoid_assignment(xp, dist, medoids),
                         generic.medoid_assignment(xp, dist, medoids), strict=True):
        np.testing.assert_array_equal(backend.to_numpy(got), backend.to_numpy(want))
    for values in ([1.0, 2.0], [1.0, np.nan], [np.inf, 0.0], [-np.inf, 1.0], []):
        array = backend.asarray(np.array(values, dtype=float))
        assert fast.all_finite(xp, array) == generic.all_finite(xp, array) == bool(
            np.all(np.isfinite(values)))


# ---------------------------------------------------------------------------------------------
# Compiled kernels (Numba): each equal to the generic code, and the library's own fast paths
# still tested without them.

COMPILED_BACKENDS = ["numpy", "torch-cpu"]


def compiled_primitives(backend):
    """The backend's primitives with its Numba kernels, or a skip that says why not."""
    pytest.importorskip("numba", reason="numba is not installed: compiled kernels untested")
    prims = primitives_for(backend.xp)
    assert prims.kmedoids is not None, "this backend is expected to have compiled kernels"
    assert prims.kmeans is not None, "this backend is expected to have compiled kernels"
    return prims


@pytest.mark.parametrize("name", FAST_BACKENDS)
@pytest.mark.parametrize("method", ["kmeans", "wkmedoids"])
def test_library_fast_paths_without_numba_equal_generic(backend_named, name, method, rng,
                                                        monkeypatch):
    import tokenpool_ops.backends as backends

    backend = backend_named(name)
    monkeypatch.setattr(backends, "_compiled_paths", lambda name: {})
    # No CPU kernel without Numba; PyTorch keeps the CUDA kernel's entry, which does not need
    # Numba and declines tensors off CUDA.
    want_kmedoids = None
    if name.startswith("torch"):
        from tokenpool_ops.backends import _torch

        want_kmedoids = _torch.cuda_kmedoids
    assert primitives_for(backend.xp).kmedoids is want_kmedoids
    assert primitives_for(backend.xp).kmeans is None
    x = rng.normal(size=(4, 60, 8))
    scores = rng.exponential(size=(4, 60))
    results = [tokenpool_ops.pool(backend.asarray(x), 17, method, scores=backend.asarray(scores),
                                  return_info=True, fast_paths=fast) for fast in (True, False)]
    fast, generic = ({f: backend.to_numpy(getattr(r, f)) for f in ("tokens", "assignment")}
                     for r in results)
    np.testing.assert_array_equal(fast["assignment"], generic["assignment"])
    np.testing.assert_allclose(fast["tokens"], generic["tokens"], rtol=1e-12)


@pytest.mark.parametrize("name", COMPILED_BACKENDS)
@pytest.mark.parametrize("empty_rows", [1, 5])
def test_compiled_means_and_sums_equal_generic(backend_named, name, empty_rows, rng):
    backend = backend_named(name)
    xp = backend.xp
    compiled, generic = compiled_primitives(backend), Primitives(xp)
    values = backend.asarray(rng.normal(size=(3, 20, 6)))
    labels = backend.asarray(rng.integers(0, 4, size=(3, 20)))  # clusters 4 (k=5) stay empty
    weights = rng.random((3, 20))
    weights[0, :] = 0.0  # problem 0: every cluster has zero weight
    weights = backend.asarray(weights)
    empty = backend.asarray(rng.normal(size=(3, empty_rows, 6)))
    got, want = (p.weighted_means(xp, values, labels, 5, weights, empty)
                 for p in (compiled, generic))
    np.testing.assert_allclose(backend.to_numpy(got), backend.to_numpy(want), rtol=1e-12)
    expected_empty = backend.to_numpy(empty)[:, -1]
    np.testing.assert_array_equal(backend.to_numpy(got)[:, 4], expected_empty)
    got, want = (p.segment_sum(xp, values, labels, 5) for p in (compiled, generic))
    np.testing.assert_allclose(backend.to_numpy(got), backend.to_numpy(want), rtol=1e-12,
                               atol=1e-12)


def integer_points_with_ties(rng, batch=5, n=40, m=2):
    """Small integer coordinates with mean exactly zero (each point and its mirror image):
    many equal distances, and every distance exact in floating point however it is computed
    (the centring subtracts an exact zero)."""
    half = rng.integers(-2, 3, size=(batch, n // 2, m))
    x = rng.permuted(np.concatenate([half, -half], axis=1), axis=1).astype(float)
    weights = rng.integers(0, 3, size=(batch, n)).astype(float)
    return x, weights


@pytest.mark.parametrize("name", COMPILED_BACKENDS)
@pytest.mark.parametrize("stop_early", [True, False])
@pytest.mark.parametrize("k", [1, 7, 40])
def test_compiled_kmedoids_equals_generic_on_exact_ties(backend_named, name, stop_early, k, rng):
    # Zero-mean integer data makes every distance exact whichever way it is computed (Gram
    # rows, direct differences), so the tie rules must give bit-identical results. (With
    # a non-integer mean the two ways round differently and may break exact ties apart.)
    backend = backend_named(name)
    compiled_primitives(backend)
    x, weights = integer_points_with_ties(rng)
    for dtype in ("float64", "float32"):
        xa = backend.asarray(x.astype(dtype))
        wa = backend.asarray(weights.astype(dtype))
        got, want = (tokenpool_ops.kmedoids(xa, k, weights=wa, init="random", seed=3,
                                            max_iter=6, stop_early=stop_early, fast_paths=fast)
                     for fast in (True, False))
        assert got.n_iter == want.n_iter
        for field in ("medoids", "assignment", "history", "centres"):
            np.testing.assert_array_equal(backend.to_numpy(getattr(got, field)),
                                          backend.to_numpy(getattr(want, field)), err_msg=field)


@pytest.mark.parametrize("name", COMPILED_BACKENDS)
def test_compiled_kmedoids_moves_medoids_like_generic(backend_named, name, rng):
    # Far from converged after the first step: medoids move, so new distance rows are
    # computed from differences. Tie-free random data in float64.
    backend = backend_named(name)
    compiled_primitives(backend)
    x = rng.normal(size=(6, 80, 5))
    scores = rng.exponential(size=(6, 80))
    got, want = (tokenpool_ops.pool(backend.asarray(x), 9, "wkmedoids",
                                    scores=backend.asarray(scores), init="random",
                                    max_iter=30, return_info=True, fast_paths=fast)
                 for fast in (True, False))
    assert want.n_iter > 2, "the test needs medoids that move"
    assert got.n_iter == want.n_iter
    np.testing.assert_array_equal(backend.to_numpy(got.medoids), backend.to_numpy(want.medoids))
    np.testing.assert_array_equal(backend.to_numpy(got.assignment),
                                  backend.to_numpy(want.assignment))
    np.testing.assert_allclose(backend.to_numpy(got.history), backend.to_numpy(want.history),
                               rtol=1e-12)


GRADIENT_CALLS = {
    "pool-kmedoids": lambda x, fast: tokenpool_ops.pool(x, 5, "kmedoids", fast_paths=fast),
    "kmeans-centres": lambda x, fast: tokenpool_ops.kmeans(x, 5, max_iter=5,
                                                           fast_paths=fast).centres,
}


@pytest.mark.parametrize("call", GRADIENT_CALLS)
def test_compiled_paths_leave_gradients_to_torch(backend_named, call, rng):
    backend = backend_named("torch-cpu")
    compiled_primitives(backend)
    import torch

    x = rng.normal(size=(2, 30, 4))
    grads = []
    for fast in (True, False):
        xt = torch.tensor(x, requires_grad=True)
        GRADIENT_CALLS[call](xt, fast).pow(2).sum().backward()
        grads.append(xt.grad.numpy())
    np.testing.assert_allclose(*grads, rtol=1e-12)
    assert np.abs(grads[0]).sum() > 0


def assert_same_clustering(backend, got, want, rtol):
    assert got.n_iter == want.n_iter
    np.testing.assert_array_equal(backend.to_numpy(got.assignment),
                                  backend.to_numpy(want.assignment))
    for field in ("centres", "history"):
        np.testing.assert_allclose(backend.to_numpy(getattr(got, field)),
                                   backend.to_numpy(getattr(want, field)), rtol=rtol,
                                   atol=rtol, err_msg=field)


@pytest.mark.parametrize("name", COMPILED_BACKENDS)
@pytest.mark.parametrize("stop_early", [True, False])
@pytest.mark.parametrize("k", [1, 9, 80])
def test_compiled_kmeans_equals_generic(backend_named, name, stop_early, k, rng):
    # Distances from the Gram matrix and from explicit centres round differently, so the
    # data are tie-free (random float64) and the values agree to rounding, not bit for bit.
    backend = backend_named(name)
    compiled_primitives(backend)
    x = backend.asarray(rng.normal(size=(6, 80, 5)))
    weights = rng.exponential(size=(6, 80))
    weights[0, :40] = 0.0  # problem 0: clusters of zero weight use the fallback
    weights = backend.asarray(weights)
    got, want = (tokenpool_ops.kmeans(x, k, weights=weights, init="random", seed=1,
                                      max_iter=30, stop_early=stop_early, fast_paths=fast)
                 for fast in (True, False))
    if k == 9:
        assert want.n_iter > 2, "the test needs centres that move"
    assert_same_clustering(backend, got, want, 1e-10)


@pytest.mark.parametrize("name", COMPILED_BACKENDS)
def test_compiled_kmeans_keeps_empty_clusters_and_uses_fallbacks(backend_named, name, rng):
    # Duplicated tokens as starting centres: the later copy loses every tie, so its cluster
    # starts empty and must keep its centre (in some problems to the end); zero scores make
    # pool fall back to the sizes.
    backend = backend_named(name)
    compiled_primitives(backend)
    x = rng.normal(size=(3, 40, 4))
    x[:, 1] = x[:, 0]
    scores = rng.exponential(size=(3, 40))
    scores[1] = 0.0
    sizes = rng.integers(1, 4, size=(3, 40)).astype(float)
    init = backend.asarray(np.tile(np.array([0, 1, 5, 20, 33]), (3, 1)))
    got, want = (tokenpool_ops.pool(backend.asarray(x), 5, "wkmeans",
                                    scores=backend.asarray(scores),
                                    sizes=backend.asarray(sizes), init=init, max_iter=8,
                                    return_info=True, fast_paths=fast)
                 for fast in (True, False))
    got_sizes = backend.to_numpy(got.sizes)
    assert np.any(got_sizes[:, 1] == 0), "cluster 1 is expected to stay empty somewhere"
    np.testing.assert_array_equal(backend.to_numpy(got.assignment),
                                  backend.to_numpy(want.assignment))
    for field in ("tokens", "sizes", "objective", "history"):
        np.testing.assert_allclose(backend.to_numpy(getattr(got, field)),
                                   backend.to_numpy(getattr(want, field)), rtol=1e-10,
                                   atol=1e-10, err_msg=field)
    still_empty = got_sizes[:, 1] == 0
    np.testing.assert_allclose(backend.to_numpy(got.tokens)[still_empty, 1], x[still_empty, 1],
                               rtol=1e-12)


@pytest.mark.parametrize("name", COMPILED_BACKENDS)
def test_compiled_kmeans_in_float32_matches_generic(backend_named, name, rng):
    backend = backend_named(name)
    compiled_primitives(backend)
    x = backend.asarray(rng.normal(size=(4, 60, 8)).astype("float32"))
    got, want = (tokenpool_ops.kmeans(x, 17, max_iter=20, fast_paths=fast)
                 for fast in (True, False))
    assert got.centres.dtype == want.centres.dtype
    assert_same_clustering(backend, got, want, 1e-5)


def test_missing_numba_warns_once_and_falls_back(monkeypatch):
    import sys

    import array_api_compat.numpy as xp
    import tokenpool_ops.backends as backends

    monkeypatch.setitem(sys.modules, "numba", None)  # "import numba" now raises ImportError
    backends._numba_answer.clear()
    try:
        with pytest.warns(RuntimeWarning, match=r"Numba could not be imported .* about 3x "
                                                r"slower for K-Medoids and 6x for K-Means"):
            assert primitives_for(xp).kmedoids is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the second time: no warning
            assert primitives_for(xp).kmeans is None
        x = np.random.default_rng(0).normal(size=(2, 12, 3))
        np.testing.assert_array_equal(tokenpool_ops.pool(x, 4, "kmedoids"),
                                      tokenpool_ops.pool(x, 4, "kmedoids", fast_paths=False))
    finally:
        backends._numba_answer.clear()


def merge_cases(rng, dtype):
    """(scores, sizes) pairs for the merge: zero-weight clusters falling back to the sizes
    and to ones, absent scores or sizes, integer sizes, a NaN weight (values unchecked)."""
    scores = rng.random((3, 30))
    scores[0] = 0.0  # problem 0: every cluster falls back to its sizes
    scores[1, :10] = 0.0
    sizes = rng.integers(1, 4, size=(3, 30)).astype(float)
    sizes[1, :5] = 0.0  # with labels below, cluster 0 of problem 1 falls back to ones
    nan_scores = scores.copy()
    nan_scores[2, 3] = np.nan
    cases = [(scores, sizes), (scores, None), (None, sizes), (None, None), (nan_scores, sizes),
             (scores, rng.random((3, 30)) * 3)]
    return [(None if s is None else s.astype(dtype), None if z is None else z.astype(dtype))
            for s, z in cases]


@pytest.mark.parametrize("name", COMPILED_BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_compiled_merge_equals_the_merge_it_replaces_bit_for_bit(backend_named, name, dtype,
                                                                 rng):
    # Primitives.merge on the host: one Numba pass for what effective_weights, the compiled
    # weighted means and the segment sums compute (the same sums in the same order).
    from dataclasses import replace

    from tokenpool_ops._batching import flatten
    from tokenpool_ops._merge import merge, token_weights

    backend = backend_named(name)
    xp = backend.xp
    prims = compiled_primitives(backend)
    assert prims.merge is not None
    x = backend.asarray(rng.normal(size=(3, 30, 7)).astype(dtype))
    labels = rng.integers(0, 6, size=(3, 30))  # cluster 6 of k = 7 stays empty
    labels[1, :5] = 0
    labels[1, 5:] = rng.integers(1, 6, size=25)
    labels = backend.asarray(labels)
    batch = flatten(xp, x)
    without = replace(batch, prims=replace(batch.prims, merge=None))
    for scores, sizes in merge_cases(rng, dtype):
        w = token_weights(xp, batch.x, None if scores is None else backend.asarray(scores),
                          None if sizes is None else backend.asarray(sizes))
        fused = prims.merge(xp, batch.x, batch.mean, labels, 7, w.weights, w.fallback,
                            w.carried, False)
        assert fused is not None, "the host merge declined a CPU problem"
        want = merge(without, labels, 7, w, batch.mean, False)
        for got_part, want_part in zip(fused[:2], want[:2], strict=True):
            np.testing.assert_array_equal(backend.to_numpy(got_part),
                                          backend.to_numpy(want_part))
        assert fused[2] is None
        # The objective is the generic code's: the host merge declines it.
        assert prims.merge(xp, batch.x, batch.mean, labels, 7, w.weights, w.fallback,
                           w.carried, True) is None
    # An independent check of one case: cluster 0 of problem 1 (zero scores and sizes) is
    # the plain mean of its five tokens.
    scores, sizes = merge_cases(rng, dtype)[0]
    w = token_weights(xp, batch.x, backend.asarray(scores), backend.asarray(sizes))
    tokens, _, _ = prims.merge(xp, batch.x, batch.mean, labels, 7, w.weights, w.fallback,
                               w.carried, False)
    np.testing.assert_allclose(backend.to_numpy(tokens)[1, 0],
                               backend.to_numpy(x)[1, :5].mean(axis=0), rtol=1e-5)


@pytest.mark.parametrize("name", COMPILED_BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_compiled_weighted_means_are_correctly_rounded_quotients(backend_named, name, dtype,
                                                                 rng):
    # Integer tokens and weights: every sum is exact, so each mean must be the correctly
    # rounded quotient of two exact sums (Eq. 15), the value the generic division gives. A
    # multiplication by the reciprocal, which misses it by an ulp in some clusters, fails.
    backend = backend_named(name)
    prims = compiled_primitives(backend)
    n_problems, n, m, k = 4, 60, 9, 7
    values = rng.integers(-50, 51, size=(n_problems, n, m)).astype(dtype)
    weights = rng.integers(1, 6, size=(n_problems, n)).astype(dtype)
    labels = rng.integers(0, k, size=(n_problems, n))
    labels[:, :k] = np.arange(k)  # no empty cluster
    sums, totals = np.zeros((n_problems, k, m)), np.zeros((n_problems, k))
    for p in range(n_problems):  # exact in float64: |sum| <= 60 * 5 * 50
        np.add.at(sums[p], labels[p], weights[p, :, None].astype(np.float64) * values[p])
        np.add.at(totals[p], labels[p], weights[p])
    sums, totals = sums.astype(dtype), totals.astype(dtype)[:, :, None]
    want = sums / totals
    assert np.any(want != sums * (1 / totals)), "the case must tell division from reciprocal"
    got = prims.weighted_means(backend.xp, backend.asarray(values), backend.asarray(labels), k,
                               backend.asarray(weights),
                               backend.asarray(np.zeros((n_problems, 1, m), dtype)))
    np.testing.assert_array_equal(backend.to_numpy(got), want)


@pytest.mark.parametrize("stop_early", [True, False])
def test_eager_torch_kernels_equal_their_custom_operators(backend_named, stop_early, rng):
    # Untraced CPU calls run the Numba kernels without the operator's dispatch; traced ones
    # take the operator. Both must give the same results.
    import torch

    backend = backend_named("torch-cpu")
    prims = compiled_primitives(backend)
    x = torch.from_numpy(rng.normal(size=(3, 40, 5)).astype(np.float32))
    mean = x.mean(dim=1, keepdim=True)
    weights = torch.from_numpy(rng.random((3, 40)).astype(np.float32))
    init = torch.from_numpy(np.stack([rng.choice(40, 6, replace=False) for _ in range(3)]))
    eager = prims.kmedoids(backend.xp, x, mean, init, weights, 8, stop_early)
    labels, medoids, history, count = torch.ops.tokenpool_ops.kmedoids(x, mean, init, weights,
                                                                       8, stop_early)
    assert isinstance(eager[3], int)
    assert eager[3] == (int(count) if stop_early else 8)
    for got, want in zip(eager[:3], (labels, medoids, history[:, : eager[3] + 1]), strict=True):
        np.testing.assert_array_equal(got.numpy(), want.numpy())
    eager = prims.kmeans(backend.xp, x, mean, init, weights, weights, 8, stop_early)
    centres, labels, history, count = torch.ops.tokenpool_ops.kmeans(x, mean, init, weights,
                                                                     weights, 8, stop_early)
    for got, want in zip(eager[:3], (centres, labels, history[:, : eager[3] + 1]), strict=True):
        np.testing.assert_array_equal(got.numpy(), want.numpy())
    np.testing.assert_array_equal(
        prims.weighted_means(backend.xp, x, labels, 6, weights, mean).numpy(),
        torch.ops.tokenpool_ops.weighted_means(x, labels, 6, weights, mean).numpy())


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16", "int64", "uint8"])
def test_torch_all_valid_equals_generic(dtype):
    # One aminmax pass on PyTorch for the verdicts of the value checks; the verdicts must be
    # the generic ones, NaN, infinities, negative values and -0.0 included.
    torch = pytest.importorskip("torch", reason="torch is not installed")
    import array_api_compat.torch as xp
    from tokenpool_ops.backends import _torch

    from tokenpool_ops._primitives import all_valid

    floating = not dtype.startswith(("int", "uint"))
    specials = [np.nan, np.inf, -np.inf, -1.0, -0.0] if floating else [-1, 0]
    if dtype == "uint8":
        specials = [0]
    cases = [[0.5, 2.0, 3.0] if floating else [1, 2, 3], []]
    cases += [[1, 2, value, 3] if not floating else [1.0, value, 2.0] for value in specials]
    for values in cases:
        tensor = torch.tensor(values, dtype=getattr(torch, dtype)).reshape(1, -1)
        for nonnegative in (False, True):
            got = _torch.all_valid(xp, tensor, nonnegative)
            want = all_valid(xp, tensor, nonnegative)
            assert bool(got) == bool(want), (values, nonnegative)
            expected = all(np.isfinite(float(v)) and (not nonnegative or float(v) >= 0)
                           for v in values)
            assert bool(got) == expected, (values, nonnegative)
