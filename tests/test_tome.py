"""``pool(x, k, "tome")``: ToMe's bipartite soft matching (Bolya et al., ICLR 2023).

The operator is compared with ToMe written out here the plain way: a loop over problems
and rounds, explicit sorting, NumPy float64, each round merging its tokens as ToMe does
(size-weighted means, sizes summed). Expected values elsewhere are worked out by hand.
"""

from __future__ import annotations

import numpy as np
import pytest

import tokenpool_ops

BATCH, N, M, D = (2, 3), 16, 5, 3  # one shape for every backend: JAX compiles per shape


def cosine(u: np.ndarray, v: np.ndarray) -> float:
    norms = np.linalg.norm(u) * np.linalg.norm(v)
    return 0.0 if norms == 0 else float(u @ v) / norms


def tome_round(tokens, metric, sizes, members, r):
    """One round of ToMe on one problem's lists; returns the new lists and the smallest gap
    between two similarities that decided something (a match or a rank)."""
    a_ids, b_ids = list(range(0, len(tokens), 2)), list(range(1, len(tokens), 2))
    match, best, gap = [], [], np.inf
    for a in a_ids:
        similarities = [cosine(metric[a], metric[b]) for b in b_ids]
        j = 0
        for candidate in range(1, len(b_ids)):
            if similarities[candidate] > similarities[j]:
                j = candidate
        others = [s for i, s in enumerate(similarities) if i != j]
        if others:
            gap = min(gap, similarities[j] - max(others))
        match.append(j)
        best.append(similarities[j])
    ranking = sorted(range(len(a_ids)), key=lambda i: (-best[i], i))
    if 0 < r < len(a_ids):
        gap = min(gap, best[ranking[r - 1]] - best[ranking[r]])
    merged, kept = ranking[:r], sorted(ranking[r:])
    groups = [[a_ids[i]] for i in kept] + [[b] for b in b_ids]
    for i in merged:
        groups[len(kept) + match[i]].append(a_ids[i])
    new = ([], [], [], [])
    for group in groups:
        weights = np.array([sizes[t] for t in group])
        new[0].append(sum(sizes[t] * tokens[t] for t in group) / weights.sum())
        new[1].append(sum(sizes[t] * metric[t] for t in group) / weights.sum())
        new[2].append(weights.sum())
        new[3].append(sorted(m for t in group for m in members[t]))
    return (*new, gap)


def reference_tome(x, k, metric=None, sizes=None):
    """ToMe from N to k tokens on every problem: tokens, sizes, assignment and the smallest
    deciding gap (the data is tie-free where it is well above rounding)."""
    x = np.asarray(x, dtype=np.float64)
    batch, (n, m) = x.shape[:-2], x.shape[-2:]
    flat_x = x.reshape(-1, n, m)
    flat_metric = flat_x if metric is None else np.asarray(metric, np.float64).reshape(
        flat_x.shape[0], n, -1)
    flat_sizes = np.ones(flat_x.shape[:2]) if sizes is None else np.asarray(
        sizes, np.float64).reshape(flat_x.shape[:2])
    out_tokens, out_sizes, assignment, gap = [], [], [], np.inf
    for p in range(flat_x.shape[0]):
        tokens, feats = list(flat_x[p]), list(flat_metric[p])
        weights, members = list(flat_sizes[p]), [[i] for i in range(n)]
        while len(tokens) > k:
            r = min(len(tokens) - k, len(tokens) // 2)
            tokens, feats, weights, members, round_gap = tome_round(tokens, feats, weights,
                                                                    members, r)
            gap = min(gap, round_gap)
        out_tokens.append(np.array(tokens))
        out_sizes.append(np.array(weights))
        labels = np.empty(n, dtype=np.int64)
        for j, group in enumerate(members):
            labels[group] = j
        assignment.append(labels)
    return (np.array(out_tokens).reshape(*batch, k, m), np.array(out_sizes).reshape(*batch, k),
            np.array(assignment).reshape(*batch, n), gap)


def eq9(x, tokens, weights):
    """Eq. 9/13 per problem, the plain way: each token to its nearest returned token."""
    d = ((x[..., :, None, :] - tokens[..., None, :, :]) ** 2).sum(-1)
    return (weights * d.min(-1)).sum(-1)


@pytest.mark.parametrize("k", [10, 3])  # one round (r = 6 <= 8); rounds of 8, 4 and 1
@pytest.mark.parametrize("with_sizes", [False, True])
@pytest.mark.parametrize("with_metric", [False, True])
def test_equals_tome_written_out(backend, k, with_sizes, with_metric):
    rng = np.random.default_rng(7)
    x = rng.normal(size=(*BATCH, N, M))
    metric = rng.normal(size=(*BATCH, N, D)) if with_metric else None
    sizes = rng.integers(1, 5, size=(*BATCH, N)).astype(float) if with_sizes else None
    tokens, out_sizes, assignment, gap = reference_tome(x, k, metric, sizes)
    assert gap > 1e-6  # tie-free: no decision within rounding of another
    info = tokenpool_ops.pool(
        backend.asarray(x), k, "tome", return_info=True,
        metric=None if metric is None else backend.asarray(metric),
        sizes=None if sizes is None else backend.asarray(sizes))
    backend.assert_like(info.tokens, (*BATCH, k, M), backend.xp.float64)
    np.testing.assert_array_equal(backend.to_numpy(info.assignment), assignment)
    np.testing.assert_array_equal(backend.to_numpy(info.sizes), out_sizes)
    np.testing.assert_allclose(backend.to_numpy(info.tokens), tokens, rtol=1e-12, atol=1e-12)
    weights = np.ones((*BATCH, N)) if sizes is None else sizes
    np.testing.assert_allclose(backend.to_numpy(info.objective), eq9(x, tokens, weights),
                               rtol=1e-10)
    np.testing.assert_array_equal(backend.to_numpy(info.history),
                                  backend.to_numpy(info.objective)[..., None])
    assert info.medoids is None and info.n_iter == 0


def test_tokens_are_the_size_weighted_means_of_their_members(rng):
    x = rng.normal(size=(4, 30, 6)).astype(np.float32)
    sizes = rng.integers(1, 9, size=(4, 30)).astype(np.float32)
    for k in (29, 15, 7, 1):
        info = tokenpool_ops.pool(x, k, "tome", sizes=sizes, return_info=True)
        assert info.tokens.shape == (4, k, 6) and info.tokens.dtype == np.float32
        for p in range(4):
            labels = info.assignment[p]
            assert sorted(set(labels.tolist())) == list(range(k))  # no output token empty
            for j in range(k):
                w = sizes[p, labels == j].astype(np.float64)
                mean = (w[:, None] * x[p, labels == j]).sum(0) / w.sum()
                np.testing.assert_allclose(info.tokens[p, j], mean, rtol=1e-5, atol=1e-6)
                assert info.sizes[p, j] == w.sum()
        np.testing.assert_array_equal(info.sizes.sum(-1), sizes.sum(-1))


@pytest.mark.parametrize("k", [9, 8, 1])
def test_odd_token_counts_and_the_half_cap(backend, k):
    """17 tokens: 9 A and 8 B. To 9 is one round of 8 merges (floor(17 / 2)); to 8 it is
    two rounds (17 -> 9 -> 8), not one that merges all 9 A tokens; to 1, five rounds."""
    x = np.random.default_rng(3).normal(size=(2, 17, 4))
    tokens, sizes, assignment, gap = reference_tome(x, k)
    assert gap > 1e-6
    info = tokenpool_ops.pool(backend.asarray(x), k, "tome", return_info=True)
    np.testing.assert_array_equal(backend.to_numpy(info.assignment), assignment)
    np.testing.assert_array_equal(backend.to_numpy(info.sizes), sizes)
    np.testing.assert_allclose(backend.to_numpy(info.tokens), tokens, rtol=1e-12, atol=1e-12)


def test_ties_go_to_the_lower_index(backend):
    """Four tokens of one metric: every A token (0, 2) matches B token 1 (the lower of two
    equal matches) and A token 0 ranks first (the lower of two equal similarities), so it is
    merged into token 1; token 2 stays, first in the output (unmerged A, then B)."""
    x = backend.asarray(np.array([[0.0], [1.0], [2.0], [3.0]]))
    metric = backend.asarray(np.ones((4, 2)))
    info = tokenpool_ops.pool(x, 3, "tome", metric=metric, return_info=True)
    assert backend.to_numpy(info.assignment).tolist() == [1, 1, 0, 2]
    assert backend.to_numpy(info.tokens).tolist() == [[2.0], [0.5], [3.0]]
    assert backend.to_numpy(info.sizes).tolist() == [1.0, 2.0, 1.0]


def test_zero_norm_metric_rows_have_similarity_zero(backend):
    """Token 0 has a zero metric row: similarity 0 with both B tokens, so A token 2 (equal
    to B token 1) is the one merged, and nothing is NaN."""
    x = backend.asarray(np.array([[0.0], [1.0], [2.0], [3.0]]))
    metric = backend.asarray(np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    info = tokenpool_ops.pool(x, 3, "tome", metric=metric, return_info=True)
    assert backend.to_numpy(info.assignment).tolist() == [0, 1, 1, 2]
    assert backend.to_numpy(info.tokens).tolist() == [[0.0], [1.5], [3.0]]
    zeros = tokenpool_ops.pool(x, 1, "tome", metric=metric * 0, return_info=True)
    assert np.isfinite(backend.to_numpy(zeros.tokens)).all()
    assert backend.to_numpy(zeros.tokens).tolist() == [[1.5]]


def test_metric_of_extreme_magnitude_matches_like_its_scaled_copy():
    """Cosine similarity ignores scale: a float32 metric scaled by 2^120 or 2^-120 (exact
    scalings, whose squares overflow or vanish in float32) matches exactly as it does at
    unit scale, over several rounds of merged metric."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3, 20, 4)).astype(np.float32)
    metric = rng.normal(size=(3, 20, 6)).astype(np.float32)
    expected = tokenpool_ops.pool(x, 3, "tome", metric=metric, return_info=True).assignment
    for scale in (np.float32(2.0**120), np.float32(2.0**-120)):
        got = tokenpool_ops.pool(x, 3, "tome", metric=metric * scale, return_info=True)
        np.testing.assert_array_equal(got.assignment, expected)


def test_trivial_cases_as_the_other_methods(rng):
    x = rng.normal(size=(2, 6, 3))
    sizes = rng.integers(1, 4, size=(2, 6)).astype(float)
    same = tokenpool_ops.pool(x, 6, "tome", sizes=sizes, return_info=True)
    assert same.tokens is x and same.assignment.tolist() == [list(range(6))] * 2
    assert same.sizes.tolist() == sizes.tolist()
    assert tokenpool_ops.pool(x, 9, "tome") is x
    empty = tokenpool_ops.pool(x, 0, "tome", return_info=True)
    assert empty.tokens.shape == (2, 0, 3) and (empty.assignment == -1).all()
    assert np.isinf(empty.objective).all()


def test_scores_play_no_part_but_are_checked(rng):
    x = rng.normal(size=(12, 4))
    plain = tokenpool_ops.pool(x, 5, "tome")
    np.testing.assert_array_equal(tokenpool_ops.pool(x, 5, "tome", scores=rng.random(12)),
                                  plain)
    with pytest.raises(ValueError, match="scores must be finite and non-negative"):
        tokenpool_ops.pool(x, 5, "tome", scores=-np.ones(12))


def test_bad_metric_gets_a_clear_error(rng):
    x = rng.normal(size=(2, 12, 4))
    with pytest.raises(ValueError, match=r"metric must have shape \(\.\.\., N, D\)"):
        tokenpool_ops.pool(x, 5, "tome", metric=rng.normal(size=(2, 11, 4)))
    with pytest.raises(TypeError, match="metric must have a real floating dtype"):
        tokenpool_ops.pool(x, 5, "tome", metric=np.ones((2, 12, 4), dtype=np.int64))
    with pytest.raises(ValueError, match="metric applies to method 'tome' only"):
        tokenpool_ops.pool(x, 5, "kmedoids", metric=x)
    bad = rng.normal(size=(2, 12, 3))
    bad[1, 4, 2] = np.nan
    with pytest.raises(ValueError, match="metric contains NaN or infinity"):
        tokenpool_ops.pool(x, 5, "tome", metric=bad)
    # Unchecked, a NaN metric cannot crash the call, nor leak into the tokens: they are
    # the means of x.
    unchecked = tokenpool_ops.pool(x, 5, "tome", metric=bad, check_values=False)
    assert np.isfinite(unchecked).all()
    with pytest.raises(ValueError, match="x contains NaN"):
        tokenpool_ops.pool(np.where(bad[..., :1] > 0, np.nan, x), 5, "tome")


def test_metric_of_another_library_or_device(backend_named):
    torch_backend = backend_named("torch-cpu")
    x = np.random.default_rng(0).normal(size=(12, 4))
    with pytest.raises(TypeError, match="one array library"):
        tokenpool_ops.pool(x, 5, "tome", metric=torch_backend.asarray(x))
    strict = backend_named("array_api_strict")
    other = strict.xp.asarray(x, device=strict.xp.Device("CPU_DEVICE"))
    with pytest.raises(ValueError, match="metric is on device"):
        tokenpool_ops.pool(strict.asarray(x), 5, "tome", metric=other)


def test_half_precision_metric_is_compared_in_float32(backend_named):
    torch = backend_named("torch-cpu")
    x = np.random.default_rng(2).normal(size=(2, 20, 8)).astype(np.float32)
    half = torch.xp.float16
    got = tokenpool_ops.pool(torch.asarray(x, half), 6, "tome", return_info=True)
    want = tokenpool_ops.pool(x.astype(np.float16).astype(np.float32), 6, "tome",
                              return_info=True)
    torch.assert_like(got.tokens, (2, 6, 8), half)
    np.testing.assert_array_equal(torch.to_numpy(got.assignment), want.assignment)


def test_inputs_are_left_bit_identical(backend):
    rng = np.random.default_rng(11)
    inputs = {"x": rng.normal(loc=5.0, size=(*BATCH, N, M)),
              "metric": rng.normal(size=(*BATCH, N, D)),
              "sizes": rng.integers(1, 4, size=(*BATCH, N)).astype(float)}
    arrays = {name: backend.asarray(a) for name, a in inputs.items()}
    tokenpool_ops.pool(arrays["x"], 3, "tome", metric=arrays["metric"], sizes=arrays["sizes"],
                       return_info=True)
    for name, a in inputs.items():
        np.testing.assert_array_equal(backend.to_numpy(arrays[name]), a, err_msg=name)


def test_merge_rounds_cap_each_round_and_refuse_zero():
    from tokenpool_ops._tome import merge_rounds

    # Worked by hand: 10 -> 5 -> 3 -> 2 (floor(n / 2) a round at most), then 2 -> 1.
    assert merge_rounds(10, 2) == [5, 2, 1]
    assert merge_rounds(10, 1) == [5, 2, 1, 1]
    assert merge_rounds(4, 4) == [] and merge_rounds(0, 0) == []
    with pytest.raises(ValueError, match="at least one token"):  # used to loop forever
        merge_rounds(6, 0)
