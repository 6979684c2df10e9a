"""Hypothesis property tests of the paper's algorithms, on every installed backend.

Each property is a statement the paper (or our documented contract) makes about every input:
the objective never increases (§4, Appendix A), the medoid constraint holds bit-exactly,
pooled tokens are the weighted means of their members (Algorithm 1, line 6), problems in a
batch are independent, and rescaling scores or translating tokens changes nothing it should
not. Inputs come from strategies (see ``problems``): coarse integers made distinct by a
fixed irrational offset per token, so that a failure shrinks to a readable input. The
clustering properties draw 2 <= k <= N - 1; k = N (the identity) and k = 0 have their own
tests.

Tie-free only up to rounding: no two tokens coincide and token distances differ, but the
algorithms also compare sums of distances over clusters (the medoid costs of Eq. 17) and
distances to cluster means (K-Means), and two of those can come within rounding of each
other. Ruling that out by construction would need values whose subset sums all differ by
more than the rounding error (super-increasing: a range near 2^(N^2) for N^2 distances),
far beyond float64 at N = 128, so the properties that compare assignments across different
arithmetic (translated tokens; float32 against float64) rely on such near-ties being rare.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import tokenpool_ops

CLUSTERING = ["kmeans", "kmedoids", "wkmeans", "wkmedoids"]
MEDOIDS = ["kmedoids", "wkmedoids"]


# JAX compiles every operation anew for each shape (about 2 s per pool call), so on JAX the
# properties are explored over a few fixed shapes; array-api-strict (pure Python on NumPy)
# draws N up to 24; NumPy and PyTorch up to 128, the token counts of real ViT blocks.
FIXED_SHAPES = [(2, 9, 3), (1, 16, 2)]
MAX_N = {"numpy": 128, "torch-cpu": 128, "torch-cuda": 128, "cupy": 128}


def tie_breaker(batch: int, n: int, m: int) -> np.ndarray:
    """A distinct small offset for every token and feature: the fractional parts of
    multiples of irrational steps (a Weyl sequence), so that no two tokens coincide and
    no distances are equal however the drawn values below shrink (to all zeros, say)."""
    index = np.arange(batch * n * m, dtype=np.float64).reshape(batch, n, m)
    return np.modf(index * (np.sqrt(5.0) - 1) / 2 + np.sqrt(2.0) * index**2 / 7)[0]


@st.composite
def problems(draw, fixed_shapes: bool = False, min_n: int = 1, min_m: int = 1,
             max_batch: int = 3, max_n: int = 24, clustered: bool = False):
    """(x, scores, k, sizes): a (B, N, M) float64 stack, scores with some zeros, k, and
    integer sizes in 1..3.

    The values come from strategies, so a failure shrinks to a readable input: coarse
    values (integers in -8..8) plus ``tie_breaker`` / 16, scaled by a drawn magnitude.
    ``clustered`` draws 2 <= k <= N - 1 (N >= 3), where something is clustered; else k in
    1..N.
    """
    if clustered:
        min_n = max(min_n, 3)
    if fixed_shapes:
        batch, n, m = draw(st.sampled_from([s for s in FIXED_SHAPES
                                            if s[1] >= min_n and s[2] >= min_m]))
        batch = min(batch, max_batch)
    else:
        batch = draw(st.integers(1, max_batch), label="batch")
        n = draw(st.integers(min_n, max(min_n, max_n)), label="n")
        m = draw(st.integers(min_m, 5), label="m")
    if fixed_shapes:  # JAX compiles anew for each k as well: a few values
        k = draw(st.sampled_from(sorted({2, n // 2, n - 1} if clustered else {1, n // 2, n})),
                 label="k")
    else:
        k = draw(st.integers(2, n - 1) if clustered else st.integers(1, n), label="k")
    coarse = draw(hnp.arrays(np.int8, (batch, n, m), elements=st.integers(-8, 8)),
                  label="coarse")
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]), label="scale")
    x = (coarse + tie_breaker(batch, n, m) / 16) * scale
    scores = draw(hnp.arrays(np.float64, (batch, n), elements=st.sampled_from(
        [0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 7.0])), label="scores")
    sizes = draw(hnp.arrays(np.float64, (batch, n), elements=st.sampled_from([1.0, 2.0, 3.0])),
                 label="sizes")
    return x, scores, k, sizes


def draw_problem(data, backend, **kwargs):
    kwargs.setdefault("max_n", MAX_N.get(backend.name, 24))
    return data.draw(problems(fixed_shapes=backend.name == "jax", **kwargs), label="problem")


def run(backend, x, k, method, scores=None, sizes=None, **kwargs):
    """pool() on ``backend`` with return_info=True, the result converted to NumPy."""
    convert = backend.asarray
    result = tokenpool_ops.pool(
        convert(x), k, method,
        scores=None if scores is None else convert(scores),
        sizes=None if sizes is None else convert(sizes),
        return_info=True, **kwargs,
    )
    return {name: (getattr(result, name) if name == "n_iter" or getattr(result, name) is None
                   else backend.to_numpy(getattr(result, name)))
            for name in ("tokens", "assignment", "sizes", "medoids", "objective", "history",
                         "n_iter")}


def weighted_cluster_means(x, assignment, weights, k, fallback):
    """Per-cluster weighted means with plain loops; a zero total falls back to ``fallback``."""
    batch, _, m = x.shape
    means = np.full((batch, k, m), np.nan)
    for b in range(batch):
        for j in range(k):
            members = assignment[b] == j
            if not members.any():
                continue
            w = weights[b, members]
            if w.sum() == 0:
                w = fallback[b, members]
            means[b, j] = (w[:, None] * x[b, members]).sum(0) / w.sum()
    return means


@pytest.mark.parametrize("method", CLUSTERING)
@given(data=st.data())
def test_objective_never_increases(backend, method, data):
    problem = draw_problem(data, backend, clustered=True)
    x, scores, k, _ = problem
    history = run(backend, x, k, method, scores=scores, max_iter=20)["history"]
    weights = scores if method.startswith("w") else np.ones_like(scores)
    # Gram-matrix distances carry an absolute rounding error of about eps * |x - mean|^2.
    spread = (weights * ((x - x.mean(1, keepdims=True)) ** 2).sum(-1)).sum(-1)
    steps = np.diff(history, axis=-1)
    assert np.all(steps <= 1e-9 * history[..., :-1] + 1e-12 * spread[:, None]), history


@pytest.mark.parametrize("method", MEDOIDS)
@given(data=st.data())
def test_medoid_constraint_holds_bit_exactly(backend, method, data):
    problem = draw_problem(data, backend, clustered=True)
    x, scores, k, _ = problem
    weights = scores if method == "wkmedoids" else None
    result = tokenpool_ops.kmedoids(backend.asarray(x), k, init="spread",
                                    weights=None if weights is None else backend.asarray(weights))
    medoids = backend.to_numpy(result.medoids)
    assignment = backend.to_numpy(result.assignment)
    centres = backend.to_numpy(result.centres)
    for b in range(x.shape[0]):
        assert len(set(medoids[b].tolist())) == k
        np.testing.assert_array_equal(centres[b], x[b, medoids[b]])
        np.testing.assert_array_equal(assignment[b, medoids[b]], np.arange(k))


@pytest.mark.parametrize("method", CLUSTERING)
@given(data=st.data())
def test_pooled_tokens_are_weighted_means_of_members(backend, method, data):
    problem = draw_problem(data, backend, clustered=True)
    x, scores, k, sizes = problem
    out = run(backend, x, k, method, scores=scores, sizes=sizes)
    weights = scores * sizes if method.startswith("w") else sizes
    expected = weighted_cluster_means(x, out["assignment"], weights, k, fallback=sizes)
    filled = ~np.isnan(expected)  # empty K-Means clusters keep their centre instead
    np.testing.assert_allclose(out["tokens"][filled], expected[filled], rtol=1e-9,
                               atol=1e-9 * np.abs(x).max())
    counts = np.stack([np.bincount(a, weights=s, minlength=k)
                       for a, s in zip(out["assignment"], sizes, strict=False)])
    np.testing.assert_allclose(out["sizes"], counts)


@pytest.mark.parametrize("method", [*CLUSTERING, "topk"])
@given(data=st.data())
def test_problems_in_a_batch_are_independent(backend, method, data):
    problem = draw_problem(data, backend, max_batch=4, clustered=True)
    x, scores, k, _ = problem
    stacked = run(backend, x, k, method, scores=scores, max_iter=50)
    for b in range(x.shape[0]):
        alone = run(backend, x[b], k, method, scores=scores[b], max_iter=50)
        np.testing.assert_array_equal(stacked["assignment"][b], alone["assignment"])
        np.testing.assert_allclose(stacked["tokens"][b], alone["tokens"], rtol=1e-9,
                                   atol=1e-12 * np.abs(x).max())
        np.testing.assert_allclose(stacked["objective"][b], alone["objective"], rtol=1e-9,
                                   atol=1e-12)


@pytest.mark.parametrize("method", [*CLUSTERING, "topk", "importance"])
@given(data=st.data(), power=st.integers(-20, 20))
def test_rescaling_scores_by_a_power_of_two_changes_nothing(backend, method, data, power):
    problem = draw_problem(data, backend, clustered=True)
    x, scores, k, _ = problem
    base = run(backend, x, k, method, scores=scores)
    scaled = run(backend, x, k, method, scores=scores * 2.0**power)
    np.testing.assert_array_equal(base["assignment"], scaled["assignment"])
    np.testing.assert_array_equal(base["tokens"], scaled["tokens"])
    factor = 2.0**power if method.startswith("w") else 1.0  # only Eq. 13 carries the scores
    np.testing.assert_allclose(scaled["objective"], base["objective"] * factor, rtol=1e-12)


@pytest.mark.parametrize("method", [*CLUSTERING, "topk"])
@given(data=st.data(), offset=st.floats(-1e3, 1e3))
def test_translating_tokens_translates_the_result(backend, method, data, offset):
    problem = draw_problem(data, backend, clustered=True)
    x, scores, k, _ = problem
    scale = np.abs(x).max()
    base = run(backend, x, k, method, scores=scores)
    moved = run(backend, x + offset * scale, k, method, scores=scores)
    np.testing.assert_array_equal(base["assignment"], moved["assignment"])
    np.testing.assert_allclose(moved["tokens"], base["tokens"] + offset * scale,
                               atol=1e-9 * scale * (1 + abs(offset)))
    np.testing.assert_allclose(moved["objective"], base["objective"], rtol=1e-6,
                               atol=1e-9 * scale**2 * x.shape[1])


@pytest.mark.parametrize("method", [*CLUSTERING, "topk", "random", "importance"])
@given(data=st.data(), extra=st.integers(0, 3))
def test_k_at_least_n_returns_tokens_unchanged(backend, method, data, extra):
    problem = draw_problem(data, backend, min_n=1)
    x, scores, _, _ = problem
    n = x.shape[1]
    out = run(backend, x, n + extra, method, scores=scores)
    np.testing.assert_array_equal(out["tokens"], x)
    np.testing.assert_array_equal(out["assignment"], np.broadcast_to(np.arange(n), scores.shape))
    np.testing.assert_array_equal(out["objective"], 0.0)


@pytest.mark.parametrize("method", [*CLUSTERING, "topk", "random", "importance"])
@given(data=st.data())
def test_k_zero_returns_no_tokens(backend, method, data):
    problem = draw_problem(data, backend)
    x, scores, _, _ = problem
    out = run(backend, x, 0, method, scores=scores)
    assert out["tokens"].shape == (x.shape[0], 0, x.shape[2])
    assert out["sizes"].shape == (x.shape[0], 0)
    np.testing.assert_array_equal(out["assignment"], -1)
    np.testing.assert_array_equal(out["objective"], np.inf)


@pytest.mark.parametrize("method", CLUSTERING)
@given(data=st.data(), copies=st.integers(2, 3))
def test_duplicated_tokens_give_finite_results_and_valid_medoids(backend, method, data,
                                                                 copies):
    problem = draw_problem(data, backend, clustered=True)
    x, scores, k, _ = problem
    x = np.concatenate([x] * copies, axis=1)  # every token appears `copies` times
    scores = np.concatenate([scores] * copies, axis=1)
    out = run(backend, x, k, method, scores=scores)
    assert np.all(np.isfinite(out["tokens"]))
    assert np.all(np.isfinite(out["history"]))
    np.testing.assert_allclose(out["sizes"].sum(-1), x.shape[1])
    if out["medoids"] is not None:
        for b in range(x.shape[0]):
            np.testing.assert_array_equal(out["assignment"][b, out["medoids"][b]], np.arange(k))


@pytest.mark.parametrize("method", [*CLUSTERING, "topk"])
@given(data=st.data())
def test_huge_offsets_in_float32_match_float64(backend, method, data):
    """Tokens at 1e4 spread over +-16: centring keeps float32 as good as float64.

    Without centring the Gram expansion would lose about 1e8 * 2^-24 ~ 6 to cancellation,
    more than the gaps between the distances. Both runs see the same float32 values (x and
    scores) and so differ only in arithmetic. Float32 holds values near 1e4 on a grid of
    2^-10, which makes exact ties (duplicate tokens, a token midway between two centres):
    float64 breaks them by rounding where float32 computes them exactly. A spread of 16 puts
    2^15 grid steps across each coordinate and two coordinates make such ties rare: on 3,000
    problems of this construction drawn outside Hypothesis (M from 2 to 5, each method),
    float32 and float64 agreed on every one. Hypothesis aims at ties, though (it found a token
    exactly as far from two medoids), so the medoid methods may differ at exact ties, checked
    to be exact, and in the two clusters each touches; and a token's label at a near tie
    (two distances within float32's rounding, which the GPU's order of summation resolved
    otherwise than float64 on an H200), checked to be within that rounding.
    """
    problem = draw_problem(data, backend, min_n=2, min_m=2, clustered=True)
    x, scores, k, _ = problem
    # Seeded jitter of up to 64 grid steps: Hypothesis also draws problems whose tokens all
    # sit a few grid steps apart (x nearly constant), where ties are everywhere and one tie
    # broken differently sends the two runs down different iterations.
    jitter = np.random.default_rng(0).uniform(-1 / 16, 1 / 16, x.shape)
    x32 = (1e4 + 16 * x / np.abs(x).max() + jitter).astype(np.float32)
    scores32 = scores.astype(np.float32)
    single = run(backend, x32, k, method, scores=scores32)
    double = run(backend, x32.astype(np.float64), k, method, scores=scores32.astype(np.float64))
    assert single["tokens"].dtype == np.float32
    differ = single["assignment"] != double["assignment"]
    touched = np.zeros(single["tokens"].shape[:2], bool)
    if single["medoids"] is not None:
        # Hypothesis does find exact ties (a token as far from two medoids; two members of a
        # cluster with the same total distance to it): there float32 keeps the documented
        # rule (lowest index) and float64 may not, having rounded while centring. Only such
        # ties may differ, and only the clusters they touch.
        weights = scores32 if method.startswith("w") else np.ones_like(scores32)
        for b, j in np.argwhere(single["medoids"] != double["medoids"]):
            members = np.flatnonzero(single["assignment"][b] == j)
            np.testing.assert_array_equal(members, np.flatnonzero(double["assignment"][b] == j))
            ours, theirs = single["medoids"][b, j], double["medoids"][b, j]
            assert exact_medoid_cost(x32[b], weights[b], members, ours) \
                == exact_medoid_cost(x32[b], weights[b], members, theirs)
        for b, i in np.argwhere(differ):
            # A token may go to either of two medoids whose distances float32 cannot tell
            # apart: a near tie, which each backend's order of summation decides its own way
            # (the CUDA kernel's differs from NumPy's BLAS).
            ours = single["medoids"][b, single["assignment"][b, i]]
            theirs = double["medoids"][b, double["assignment"][b, i]]
            gap = abs(exact_sq_distance(x32[b], i, ours) - exact_sq_distance(x32[b], i, theirs))
            assert gap <= float32_rounding(x32[b], i, ours) + float32_rounding(x32[b], i, theirs)
    for b, i in np.argwhere(differ):
        touched[b, [single["assignment"][b, i], double["assignment"][b, i]]] = True
    if single["medoids"] is None:
        # K-Means: the runs may part only at a (near) tie: at the first iteration whose
        # labels differ, each differing token's two nearest centres were one; a label
        # changed there moves its centres, so the whole problem may differ after it.
        iterations = max(single["n_iter"], double["n_iter"])
        for b in np.unique(np.argwhere(differ)[:, 0]):
            assert kmeans_diverges_at_a_tie(backend, x32, k, method, scores32, b, iterations), \
                "labels differ without a (near) tie"
            touched[b] = True
    np.testing.assert_allclose(single["tokens"][~touched], double["tokens"][~touched], rtol=1e-6)


def float32_rounding(tokens: np.ndarray, i: int, j: int) -> float:
    """A bound on float32's error in the squared distance of tokens i and j, computed as the
    library does: |c_i|^2 + |c_j|^2 - 2 c_i.c_j of the centred tokens c, each sum of M
    products within (M + 2) u (|c_i| + |c_j|)^2 of the exact value (u = 2^-24), doubled for
    the rounding of the mean. Exact ties have a gap of zero, within any bound."""
    tokens = tokens.astype(np.float64)
    centred = tokens - tokens.mean(axis=0)
    norms = np.sqrt((centred[[i, j]] ** 2).sum(-1))
    return float(float32_bound(tokens.shape[-1], norms.sum()))


def float32_bound(m: int, norm_sums: Any) -> Any:
    """2 (M + 2) u (|c_i| + |c_j|)^2 for the sums of centred norms ``norm_sums``: the bound
    of :func:`float32_rounding`, elementwise."""
    return 2 * (m + 2) * 2.0 ** -24 * norm_sums ** 2


def near_ties(tokens: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Per token, whether its squared distances to its two nearest centres differ by no more
    than float32's rounding of them (the bound of :func:`float32_rounding`; an exact tie
    differs by zero)."""
    tokens, centres = tokens.astype(np.float64), centres.astype(np.float64)
    mean = tokens.mean(axis=0)
    dist = ((tokens[:, None] - centres[None]) ** 2).sum(-1)
    norms = np.sqrt(((tokens - mean) ** 2).sum(-1))[:, None] + np.sqrt(
        ((centres - mean) ** 2).sum(-1))[None]
    bound = float32_bound(tokens.shape[-1], norms)
    nearest = np.argsort(dist, axis=1)[:, :2]
    rows = np.arange(len(dist))[:, None]
    return np.diff(dist[rows, nearest], axis=1)[:, 0] <= bound[rows, nearest].sum(axis=1)


def kmeans_diverges_at_a_tie(backend, x32, k, method, scores32, b, iterations) -> bool:
    """Whether the float32 and float64 K-Means runs of problem ``b`` first label a token
    differently where its two nearest centres of the step before were a (near) tie: the
    runs redone with 0, 1, ... iterations (``stop_early=False``) until their labels part,
    the centres before that step being the float64 run's tokens one iteration earlier (its
    weighted means), or the initial centres ('topk' by the scores) at iteration 0."""
    x64, scores64 = x32.astype(np.float64), scores32.astype(np.float64)
    for t in range(iterations + 1):
        single = run(backend, x32, k, method, scores=scores32, max_iter=t, stop_early=False)
        double = run(backend, x64, k, method, scores=scores64, max_iter=t, stop_early=False)
        parted = np.flatnonzero(single["assignment"][b] != double["assignment"][b])
        if parted.size:
            before = (run(backend, x64, k, "topk", scores=scores64) if t == 0 else
                      run(backend, x64, k, method, scores=scores64, max_iter=t - 1,
                          stop_early=False))
            return bool(near_ties(x32[b], before["tokens"][b])[parted].all())
    return False


def exact_medoid_cost(tokens, weights, members, medoid):
    """Sum over ``members`` of weight x |token - medoid|^2 without rounding (Fractions of the
    float32 weights and of the exact distances)."""
    return sum(Fraction(float(weights[i])) * Fraction(exact_sq_distance(tokens, i, medoid))
               for i in members)


def exact_sq_distance(tokens, i, j):
    """|tokens[i] - tokens[j]|^2 without rounding: float32 values near 1e4 on a grid of 2^-10
    that differ by at most 32 have differences, squares and sums exact in float64."""
    return float(((tokens[i].astype(np.float64) - tokens[j].astype(np.float64)) ** 2).sum())


@pytest.mark.parametrize("algorithm", ["kmeans", "kmedoids"])
@given(data=st.data(), weighted=st.booleans())
def test_single_token_problems_run_the_clustering(backend, algorithm, weighted, data):
    # kmeans() and kmedoids() run their loop at k = N too (pool returns x itself there):
    # one token, one cluster, which is the token itself, at zero error from the start.
    x, scores, _, _ = draw_problem(data, backend)
    x, scores = x[:, :1], scores[:, :1]
    run_algorithm = tokenpool_ops.kmeans if algorithm == "kmeans" else tokenpool_ops.kmedoids
    result = run_algorithm(backend.asarray(x), 1,
                           weights=backend.asarray(scores) if weighted else None)
    np.testing.assert_array_equal(backend.to_numpy(result.centres), x)
    np.testing.assert_array_equal(backend.to_numpy(result.assignment), 0)
    assert result.n_iter == 1  # one iteration, in which nothing changed
    np.testing.assert_array_equal(backend.to_numpy(result.history), np.zeros((len(x), 2)))
    if algorithm == "kmedoids":
        np.testing.assert_array_equal(backend.to_numpy(result.medoids), 0)
