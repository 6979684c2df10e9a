"""Fast paths equal the generic array-API code, and every backend agrees with NumPy.

Fast paths are checked primitive by primitive and end to end (``fast_paths=False`` forces
the generic code). Cross-backend agreement uses integer-valued coordinates whose pairwise
squared distances are all distinct, so no comparison is a near tie and every library must
produce identical assignments.
"""

from __future__ import annotations

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
    x, scores = tie_free_integer_problem(seed)
    reference = tokenpool_ops.pool(x, 8, method, scores=scores, return_info=True)
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
