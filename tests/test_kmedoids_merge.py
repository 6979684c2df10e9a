"""``Primitives.kmedoids_merge``: K-Medoids and the merge of its clusters in one host kernel,
a problem at a time, equal bit for bit to the two kernels it replaces (issue 23: one pass over
the tokens fewer at B = 64)."""

from __future__ import annotations

import numpy as np
import pytest
import tokenpool_ops.backends as backends
from tokenpool_ops.backends import primitives_for

from tokenpool_ops._merge import token_weights

COMPILED_BACKENDS = ["numpy", "torch-cpu"]


def merge_cases(rng, n_problems, n, dtype):
    """(scores, sizes) pairs: clusters whose scores are all zero (the merge falls back to
    the sizes, then to ones), absent scores or sizes, integer and fractional sizes."""
    scores = rng.random((n_problems, n))
    scores[0] = 0.0
    if n_problems > 1:
        scores[1, : n // 3] = 0.0
    sizes = rng.integers(1, 4, size=(n_problems, n)).astype(float)
    sizes[0, :5] = 0.0
    cases = [(scores, sizes), (scores, None), (None, sizes), (None, None),
             (scores, rng.random((n_problems, n)) * 3)]
    return [(None if s is None else s.astype(dtype), None if z is None else z.astype(dtype))
            for s, z in cases]


@pytest.mark.parametrize("name", COMPILED_BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("n_problems", [1, 3])  # serial and parallel kernels on PyTorch
@pytest.mark.parametrize("max_iter,stop_early", [(10, True), (3, False), (0, True)])
def test_fused_kernel_equals_kmedoids_then_merge(backend_named, name, dtype, n_problems,
                                                 max_iter, stop_early, rng):
    pytest.importorskip("numba", reason="numba is not installed: compiled kernels untested")
    from tokenpool_ops._batching import flatten

    backend = backend_named(name)
    xp = backend.xp
    prims = primitives_for(xp)
    assert prims.kmedoids_merge is not None, "this backend is expected to have the kernel"
    n, k = 31, 7
    x = backend.asarray(rng.normal(size=(n_problems, n, 5)).astype(dtype))
    init = backend.asarray(np.stack([rng.permutation(n)[:k] for _ in range(n_problems)]))
    batch = flatten(xp, x)
    for scores, sizes in merge_cases(rng, n_problems, n, dtype):
        w = token_weights(xp, batch.x, None if scores is None else backend.asarray(scores),
                          None if sizes is None else backend.asarray(sizes))
        fused = prims.kmedoids_merge(xp, batch.x, batch.mean, init, w.weights, w.fallback,
                                     w.carried, max_iter, stop_early)
        assert fused is not None, "the fused kernel declined a CPU problem"
        labels, medoids, history, n_iter = prims.kmedoids(xp, batch.x, batch.mean, init,
                                                          w.weights, max_iter, stop_early)
        tokens, sizes_out, _ = prims.merge(xp, batch.x, batch.mean, labels, k, w.weights,
                                           w.fallback, w.carried, False)
        assert fused[3] == n_iter
        for got, want in zip(fused[:3] + fused[4:], (labels, medoids, history, tokens,
                                                      sizes_out), strict=True):
            np.testing.assert_array_equal(backend.to_numpy(got), backend.to_numpy(want))
        # Independently of the kernels: every output token is the weighted mean of its
        # cluster (weights w, or the sizes where a cluster's w sum to 0, then ones).
        got_labels, got_tokens = backend.to_numpy(fused[0]), backend.to_numpy(fused[4])
        weights, fallback = backend.to_numpy(w.weights), backend.to_numpy(w.carried)
        x_host = backend.to_numpy(x).astype(np.float64)
        for p in range(n_problems):
            for c in range(k):
                members = got_labels[p] == c
                assert members.any(), "a medoid's cluster is never empty"
                weight = weights[p, members].astype(np.float64)
                if weight.sum() <= 0:
                    weight = fallback[p, members].astype(np.float64)
                if weight.sum() <= 0:
                    weight = np.ones(members.sum())
                want_mean = weight @ x_host[p, members] / weight.sum()
                np.testing.assert_allclose(got_tokens[p, c], want_mean,
                                           rtol=1e-5 if dtype == "float32" else 1e-12,
                                           atol=1e-5 if dtype == "float32" else 1e-12)


@pytest.mark.parametrize("name", COMPILED_BACKENDS)
def test_fused_kernel_declines_mixed_dtypes(backend_named, name, rng):
    pytest.importorskip("numba", reason="numba is not installed: compiled kernels untested")
    backend = backend_named(name)
    xp = backend.xp
    prims = primitives_for(xp)
    x = backend.asarray(rng.normal(size=(2, 12, 3)).astype("float32"))
    mean = backend.asarray(backend.to_numpy(x).mean(axis=1, keepdims=True))
    init = backend.asarray(np.array([[0, 5, 9], [1, 2, 3]]))
    weights = backend.asarray(rng.random((2, 12)))  # float64 against float32 tokens
    carried = backend.asarray(np.ones((2, 12), dtype="float32"))
    assert prims.kmedoids_merge(xp, x, mean, init, weights, None, carried, 5, True) is None


@pytest.mark.parametrize("name", COMPILED_BACKENDS)
@pytest.mark.parametrize("method", ["kmedoids", "wkmedoids"])
@pytest.mark.parametrize("detail", ["tokens", "plan", "info"])
def test_pool_with_and_without_the_fused_kernel(backend_named, name, method, detail, rng,
                                                monkeypatch):
    # The pool pipeline gives the same result whether or not the backend has the kernel.
    pytest.importorskip("numba", reason="numba is not installed: compiled kernels untested")
    from tokenpool_ops._pool import pool_result

    backend = backend_named(name)
    x = backend.asarray(rng.normal(size=(4, 40, 6)).astype("float32"))
    scores = backend.asarray(rng.random((4, 40)).astype("float32"))
    sizes = backend.asarray(rng.integers(1, 5, size=(4, 40)).astype("float32"))
    with_kernel = pool_result(x, 9, method, detail, scores=scores, sizes=sizes)

    original = backends._compiled_paths

    def without_fused(name: str):  # the backend's kernels less kmedoids_merge
        return {key: f for key, f in original(name).items() if key != "kmedoids_merge"}

    monkeypatch.setattr(backends, "_compiled_paths", without_fused)
    monkeypatch.setattr(backends, "_built", {})
    assert primitives_for(backend.xp).kmedoids_merge is None
    without_kernel = pool_result(x, 9, method, detail, scores=scores, sizes=sizes)
    for field in ("tokens", "assignment", "sizes", "medoids", "objective", "history"):
        got, want = getattr(with_kernel, field), getattr(without_kernel, field)
        assert (got is None) == (want is None), field
        if got is not None:
            np.testing.assert_array_equal(backend.to_numpy(got), backend.to_numpy(want))
    assert with_kernel.n_iter == without_kernel.n_iter
