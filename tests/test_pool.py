"""The contract of the public API: shapes, dtypes, devices, defaults and documented rules.

Expected values here are worked out by hand or with plain NumPy loops in the test, never by
the code under test.
"""

from __future__ import annotations

import numpy as np
import pytest

import tokenpool_ops

METHODS = ["kmeans", "kmedoids", "wkmeans", "wkmedoids", "topk", "random", "importance"]
CLUSTERING = METHODS[:4]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("batch_shape", [(), (2, 3)])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_output_keeps_library_device_dtype_and_batch_shape(backend, method, batch_shape, dtype,
                                                           rng):
    x = backend.asarray(rng.normal(size=(*batch_shape, 12, 5)).astype(dtype))
    scores = backend.asarray(rng.random((*batch_shape, 12)).astype(dtype))
    xp_dtype = getattr(backend.xp, dtype)
    tokens = tokenpool_ops.pool(x, 4, method, scores=scores)
    backend.assert_like(tokens, (*batch_shape, 4, 5), xp_dtype)
    info = tokenpool_ops.pool(x, 4, method, scores=scores, return_info=True)
    backend.assert_like(info.tokens, (*batch_shape, 4, 5), xp_dtype)
    backend.assert_like(info.sizes, (*batch_shape, 4), xp_dtype)
    backend.assert_like(info.objective, batch_shape, xp_dtype)
    assert tuple(info.assignment.shape) == (*batch_shape, 12)
    assert tuple(info.history.shape) == (*batch_shape, info.n_iter + 1)
    if method in ("kmeans", "wkmeans"):
        assert info.medoids is None
    else:
        assert tuple(info.medoids.shape) == (*batch_shape, 4)


def test_device_comparison_names_the_current_cuda_device(devices_match, monkeypatch):
    # On a GPU, the torch-cuda fixture's device is torch.device("cuda") and results live on
    # cuda:N; assert_like must call them equal (and only on device N). No GPU is needed:
    # the current device is whatever torch.cuda.current_device says.
    torch = pytest.importorskip("torch", reason="torch is not installed")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert devices_match(torch.device("cuda"), torch.device("cuda", 1))
    assert devices_match(torch.device("cuda", 1), torch.device("cuda"))
    assert not devices_match(torch.device("cuda"), torch.device("cuda", 0))
    assert not devices_match(torch.device("cpu"), torch.device("cuda"))
    assert devices_match(torch.device("cpu"), torch.device("cpu"))
    assert devices_match("cpu", "cpu") and not devices_match("cpu", "device1")


def test_worked_example_one_dimensional():
    """Tokens 0, 1, 10, 11, 12 in two clusters: {0, 1} and {10, 11, 12}, means 0.5 and 11."""
    x = np.array([[0.0], [1.0], [10.0], [11.0], [12.0]])
    for method in CLUSTERING:
        info = tokenpool_ops.pool(x, 2, method, scores=np.ones(5), init=np.array([0, 4]),
                                  return_info=True)
        assert info.tokens.tolist() == [[0.5], [11.0]], method
        assert info.assignment.tolist() == [0, 0, 1, 1, 1]
        assert info.sizes.tolist() == [2.0, 3.0]
        assert info.objective.tolist() == pytest.approx(0.25 * 2 + 1 + 0 + 1)
    medoids = tokenpool_ops.kmedoids(x, 2, init=np.array([0, 4]))
    # Cluster {0, 1} ties between its members: the current medoid (0) stays.
    assert medoids.medoids.tolist() == [0, 3]


def test_weighted_means_follow_the_scores():
    """One cluster of three tokens with scores 1, 1, 2: weighted mean (0 + 1 + 2*4) / 4."""
    x = np.array([[0.0], [1.0], [4.0], [100.0]])
    scores = np.array([1.0, 1.0, 2.0, 1.0])
    for method in ("wkmeans", "wkmedoids"):
        tokens = tokenpool_ops.pool(x, 2, method, scores=scores, init=np.array([2, 3]))
        assert tokens.tolist() == [[2.25], [100.0]]


def test_sizes_count_as_repeated_tokens(backend, rng):
    """Pooling tokens with integer sizes equals pooling the set with each token repeated."""
    x = rng.normal(size=(10, 3))
    sizes = np.array([1, 3, 2, 1, 1, 4, 1, 2, 1, 1])
    expanded = np.repeat(x, sizes, axis=0)
    first_copy = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    init = np.array([0, 4, 7])
    for method in CLUSTERING:
        scores = rng.random(10)
        compact = tokenpool_ops.pool(backend.asarray(x), 3, method,
                                     scores=backend.asarray(scores),
                                     sizes=backend.asarray(sizes.astype(float)),
                                     init=backend.asarray(init), return_info=True)
        full = tokenpool_ops.pool(expanded, 3, method, scores=np.repeat(scores, sizes),
                                  init=first_copy[init], return_info=True)
        np.testing.assert_allclose(backend.to_numpy(compact.tokens), full.tokens, rtol=1e-12)
        np.testing.assert_allclose(backend.to_numpy(compact.sizes), full.sizes)
        np.testing.assert_allclose(backend.to_numpy(compact.objective), full.objective,
                                   rtol=1e-9)


def test_empty_kmeans_cluster_keeps_its_centre(backend):
    """Centres 0 and 1 start on the same point: ties send both copies to cluster 0, so
    cluster 1 is empty after the first assignment and must stay at (5, 5). It then wins the
    two copies back: the final clusters are {2}, {0, 1}, {3}."""
    x = backend.asarray(np.array([[5.0, 5.0], [5.0, 5.0], [5.0, 8.0], [14.0, 14.0]]))
    info = tokenpool_ops.pool(x, 3, "kmeans", init=backend.asarray(np.array([0, 1, 3])),
                              return_info=True)
    assert backend.to_numpy(info.tokens).tolist() == [[5.0, 8.0], [5.0, 5.0], [14.0, 14.0]]
    assert backend.to_numpy(info.sizes).tolist() == [1.0, 2.0, 1.0]


def test_a_cluster_left_empty_returns_its_centre_with_size_zero(backend):
    """Three copies of one point and two centres on it: every tie goes to cluster 0."""
    x = backend.asarray(np.array([[5.0, 5.0], [5.0, 5.0], [5.0, 5.0], [14.0, 14.0]]))
    info = tokenpool_ops.pool(x, 3, "kmeans", init=backend.asarray(np.array([0, 1, 3])),
                              return_info=True)
    assert backend.to_numpy(info.tokens).tolist() == [[5.0, 5.0], [5.0, 5.0], [14.0, 14.0]]
    assert backend.to_numpy(info.sizes).tolist() == [3.0, 0.0, 1.0]
    assert backend.to_numpy(info.assignment).tolist() == [0, 0, 0, 2]


def test_zero_weight_cluster_falls_back_to_the_unweighted_mean(backend):
    x = backend.asarray(np.array([[0.0], [2.0], [10.0], [12.0]]))
    scores = backend.asarray(np.array([0.0, 0.0, 1.0, 3.0]))
    for method in ("wkmeans", "wkmedoids"):
        tokens = tokenpool_ops.pool(x, 2, method, scores=scores,
                                    init=backend.asarray(np.array([0, 3])))
        assert backend.to_numpy(tokens).tolist() == [[1.0], [11.5]]


@pytest.mark.parametrize("n,k", [(10, 3), (7, 7), (196, 98), (5, 1)])
def test_default_init_without_scores_is_evenly_spread(n, k, rng):
    result = tokenpool_ops.kmedoids(rng.normal(size=(n, 2)), k, max_iter=0)
    assert result.medoids.tolist() == [j * n // k for j in range(k)]


def test_default_init_with_scores_takes_the_top_scores_lowest_index_on_ties():
    scores = np.array([0.5, 3.0, 1.0, 3.0, 0.1, 2.0])
    result = tokenpool_ops.kmedoids(np.arange(12.0).reshape(6, 2), 3, weights=scores,
                                    max_iter=0)
    assert result.medoids.tolist() == [1, 3, 5]
    info = tokenpool_ops.pool(np.arange(12.0).reshape(6, 2), 3, "kmedoids", scores=scores,
                              max_iter=0, return_info=True)
    assert info.medoids.tolist() == [1, 3, 5]


def test_topk_keeps_original_order_and_breaks_ties_by_index():
    x = np.arange(6.0)[:, None]
    scores = np.array([2.0, 5.0, 2.0, 1.0, 5.0, 2.0])
    assert tokenpool_ops.pool(x, 4, "topk", scores=scores)[:, 0].tolist() == [0.0, 1.0, 2.0, 4.0]


@pytest.mark.parametrize("method", ["random", "importance"])
def test_seeded_draws_are_reproducible_and_distinct(method, rng):
    x = rng.normal(size=(50, 40, 2))
    scores = rng.random((50, 40))
    first = tokenpool_ops.pool(x, 10, method, scores=scores, seed=3, return_info=True)
    again = tokenpool_ops.pool(x, 10, method, scores=scores, seed=3, return_info=True)
    other = tokenpool_ops.pool(x, 10, method, scores=scores, seed=4, return_info=True)
    np.testing.assert_array_equal(first.medoids, again.medoids)
    assert not np.array_equal(first.medoids, other.medoids)
    assert np.all(np.diff(first.medoids, axis=-1) > 0)  # distinct, in original order


def test_importance_draws_in_proportion_to_the_scores():
    """First draw of k=1 over 20000 problems: frequencies follow scores / sum(scores)."""
    scores = np.array([1.0, 2.0, 3.0, 4.0, 0.0])
    x = np.zeros((20000, 5, 1))
    chosen = tokenpool_ops.pool(x, 1, "importance", scores=np.broadcast_to(scores, (20000, 5)),
                                return_info=True).medoids[:, 0]
    frequency = np.bincount(chosen, minlength=5) / 20000
    np.testing.assert_allclose(frequency, scores / scores.sum(), atol=0.015)
    assert frequency[-1] == 0.0


def test_max_iter_zero_returns_the_means_of_the_initial_assignment():
    x = np.array([[0.0], [1.0], [5.0], [6.0], [7.0]])
    info = tokenpool_ops.pool(x, 2, "kmeans", init=np.array([0, 1]), max_iter=0,
                              return_info=True)
    assert info.n_iter == 0
    assert info.tokens.tolist() == [[0.0], [4.75]]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("method", CLUSTERING)
def test_half_precision_computes_in_float32(backend, dtype, method, rng):
    xp = backend.xp
    if not hasattr(xp, dtype):
        pytest.skip(f"{backend.name} has no {dtype}")
    x = rng.normal(size=(3, 30, 8))
    scores = rng.random((3, 30))
    half = getattr(xp, dtype)
    x_half = xp.astype(backend.asarray(x), half)
    rounded = backend.to_numpy(xp.astype(x_half, xp.float32)).astype(np.float32)
    out = tokenpool_ops.pool(x_half, 10, method, scores=backend.asarray(scores),
                             return_info=True)
    reference = tokenpool_ops.pool(rounded, 10, method, scores=scores, return_info=True)
    assert out.tokens.dtype == half
    assert out.objective.dtype == xp.float32
    np.testing.assert_array_equal(backend.to_numpy(out.assignment), reference.assignment)
    np.testing.assert_allclose(backend.to_numpy(xp.astype(out.tokens, xp.float32)),
                               reference.tokens, rtol=1e-2)


def test_objective_and_reconstruction_error_are_eq9_and_eq13(backend, rng):
    x = rng.normal(size=(2, 20, 4))
    scores = rng.random((2, 20))
    for method in METHODS:
        info = tokenpool_ops.pool(backend.asarray(x), 6, method, scores=backend.asarray(scores),
                                  return_info=True)
        tokens = backend.to_numpy(info.tokens)
        weights = scores if method.startswith("w") else np.ones_like(scores)
        sq = ((x[:, :, None, :] - tokens[:, None, :, :]) ** 2).sum(-1)  # (B, N, K)
        by_hand = (weights * sq.min(-1)).sum(-1)
        np.testing.assert_allclose(backend.to_numpy(info.objective), by_hand, rtol=1e-9)
        error = tokenpool_ops.reconstruction_error(backend.asarray(x), info.tokens,
                                                   weights=backend.asarray(weights))
        np.testing.assert_allclose(backend.to_numpy(error), by_hand, rtol=1e-9)


def test_unpool_gives_each_token_its_clusters_output(backend, rng):
    x = rng.normal(size=(2, 20, 4))
    info = tokenpool_ops.pool(backend.asarray(x), 6, "kmedoids", return_info=True)
    up = backend.to_numpy(tokenpool_ops.unpool(info.tokens, info.assignment))
    tokens, assignment = backend.to_numpy(info.tokens), backend.to_numpy(info.assignment)
    for b in range(2):
        for i in range(20):
            np.testing.assert_array_equal(up[b, i], tokens[b, assignment[b, i]])


def test_reconstruction_error_of_identical_sets_is_zero_in_float32(rng):
    x = (rng.normal(size=(4, 196, 384)) + 50).astype(np.float32)
    np.testing.assert_array_equal(tokenpool_ops.reconstruction_error(x, x), 0.0)


def test_significance_scores_sum_heads_and_queries(backend, rng):
    attn = rng.random((2, 3, 5, 7))
    scores = tokenpool_ops.significance_scores(backend.asarray(attn))
    backend.assert_like(scores, (2, 7), backend.xp.float64)
    expected = np.zeros((2, 7))
    for h in range(3):
        for i in range(5):
            expected += attn[:, h, i, :]
    np.testing.assert_allclose(backend.to_numpy(scores), expected, rtol=1e-12)


def test_returns_x_itself_when_nothing_is_pooled(backend, rng):
    x = backend.asarray(rng.normal(size=(3, 4)))
    assert tokenpool_ops.pool(x, 4, "kmeans") is x


@pytest.mark.parametrize("method", CLUSTERING)
def test_without_early_stop_runs_max_iter_and_reaches_the_same_result(backend, method, rng):
    x = backend.asarray(rng.normal(size=(3, 40, 4)))
    scores = backend.asarray(rng.random((3, 40)))
    early = tokenpool_ops.pool(x, 7, method, scores=scores, max_iter=50, return_info=True)
    assert early.n_iter < 50, "the test needs a problem that converges"
    fixed = tokenpool_ops.pool(x, 7, method, scores=scores, max_iter=50, stop_early=False,
                               return_info=True)
    assert fixed.n_iter == 50
    assert tuple(fixed.history.shape) == (3, 51)
    np.testing.assert_array_equal(backend.to_numpy(fixed.assignment),
                                  backend.to_numpy(early.assignment))
    np.testing.assert_array_equal(backend.to_numpy(fixed.tokens), backend.to_numpy(early.tokens))


def test_check_values_false_skips_every_value_check():
    x = np.array([[0.0], [1.0], [np.nan]])
    scores = np.array([-1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="scores"):
        tokenpool_ops.pool(x[:2], 1, "wkmeans", scores=scores[:2])
    out = tokenpool_ops.pool(x, 2, "topk", scores=scores, check_values=False)
    assert out.shape == (2, 1)


@pytest.mark.parametrize("shape", [(0, 5, 3), (2, 0, 3), (2, 5, 0)])
@pytest.mark.parametrize("method", ["kmeans", "wkmedoids", "topk"])
def test_empty_batches_tokens_and_features(backend, shape, method):
    x = backend.asarray(np.zeros(shape))
    info = tokenpool_ops.pool(x, 2, method, scores=backend.asarray(np.ones(shape[:-1])),
                              return_info=True)
    kept = min(2, shape[1])
    backend.assert_like(info.tokens, (shape[0], kept, shape[2]), backend.xp.float64)
    assert tuple(info.objective.shape) == (shape[0],)
    np.testing.assert_array_equal(backend.to_numpy(info.objective), 0.0)


@pytest.mark.parametrize("weighted,plain", [("wkmedoids", "kmedoids"), ("wkmeans", "kmeans")])
def test_w_methods_without_scores_are_their_unweighted_forms(backend, weighted, plain, rng):
    # The design card's first call, pool(x, k, method="wkmedoids"), with no scores: every
    # token is equally significant, default initialisation ('spread') included.
    x = backend.asarray(rng.normal(size=(3, 30, 4)))
    got = tokenpool_ops.pool(x, 7, weighted, return_info=True)
    want = tokenpool_ops.pool(x, 7, plain, return_info=True)
    for field in ("tokens", "assignment", "sizes", "objective", "history"):
        np.testing.assert_array_equal(backend.to_numpy(getattr(got, field)),
                                      backend.to_numpy(getattr(want, field)))
    spread = np.arange(7) * 30 // 7  # floor(j N / k), the documented 'spread' start
    first = tokenpool_ops.pool(x, 7, weighted, max_iter=0, return_info=True)
    if weighted == "wkmedoids":
        np.testing.assert_array_equal(backend.to_numpy(first.medoids), np.tile(spread, (3, 1)))


def test_default_method_is_wkmedoids(rng):
    # With scores, so that every method gives another result on this input: a default other
    # than "wkmedoids" cannot pass. Without scores it is its unweighted form.
    x = rng.normal(size=(2, 20, 3))
    scores = rng.uniform(0.1, 5.0, size=(2, 20))
    default = tokenpool_ops.pool(x, 5, scores=scores)
    for method in [*METHODS, "tome"]:
        same = np.array_equal(default, tokenpool_ops.pool(x, 5, method, scores=scores))
        assert same == (method == "wkmedoids"), method
    np.testing.assert_array_equal(tokenpool_ops.pool(x, 5),
                                  tokenpool_ops.pool(x, 5, "kmedoids"))
