"""Never a crash, never a silent NaN: extreme inputs through every path.

Two promises, fuzzed with Hypothesis over extreme floats (subnormals, +-1e+-38, the float32
maximum, huge offsets with tiny spreads, all-equal tokens, single-token problems):

* any input, NaN and infinity included with ``check_values=False``, gives labels in [0, K)
  and medoids that are distinct tokens of their problem, and never a crash or a hang;
* finite input with finite non-negative scores gives finite tokens, sizes and objective,
  or an OverflowError that names the problem (only where the objective itself cannot be
  represented in the dtype it is returned in).

The paths: the generic array-API code (``fast_paths=False``), the libraries' own fast paths
without the compiled kernels, and the Numba kernels, on NumPy and PyTorch; array-api-strict
and JAX run the generic code. The Numba kernels run with bounds checking (conftest.py), so
an index out of range fails as an IndexError here instead of crashing the process.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import tokenpool_ops.backends as backends
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import tokenpool_ops
from tokenpool_ops._pool import pool_result

METHODS = ["kmeans", "kmedoids", "wkmeans", "wkmedoids", "topk", "random", "importance", "tome"]
F32_MAX = float(np.finfo(np.float32).max)
EXTREMES = [0.0, -0.0, 1e-45, -1e-45, 1.1754944e-38, -1e-38, 1.0, -3.0, 1e19, -1e19, 1e38,
            -1e38, F32_MAX, -F32_MAX]

# (backend, variant): "fast" takes every fast path (the Numba kernels on NumPy and PyTorch
# CPU), "library" the library's own fast paths without Numba, "generic" fast_paths=False.
PATHS = [("numpy", "fast"), ("numpy", "library"), ("numpy", "generic"),
         ("torch-cpu", "fast"), ("torch-cpu", "library"), ("torch-cpu", "generic"),
         ("array_api_strict", "generic")]


@pytest.fixture(params=PATHS, ids=["-".join(p) for p in PATHS])
def path(request, backend_named, monkeypatch):
    name, variant = request.param
    if variant == "library":
        monkeypatch.setattr(backends, "_compiled_paths", lambda name: {})
    return backend_named(name), variant != "generic"


def test_numba_kernels_run_with_bounds_checking():
    import numba
    from tokenpool_ops.backends import _numba

    assert numba.config.BOUNDSCHECK, "conftest.py must switch Numba's bounds checking on"
    values = np.ones((1, 2, 1))
    with pytest.raises(IndexError):
        _numba.segment_sum(values, np.array([[0, 1]]), 1)  # label 1 is out of range for k=1


@st.composite
def extreme_problems(draw, with_nan: bool = False):
    """(x, scores, k, method): small stacks of extreme finite values (or NaN and inf)."""
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 12)), draw(st.integers(1, 3)))
    style = draw(st.sampled_from(["extremes", "offset", "equal", "any"]))
    if style == "extremes":
        x = draw(hnp.arrays(dtype, shape, elements=st.sampled_from(EXTREMES)))
    elif style == "offset":  # a huge offset with a spread of a few units in the last place
        offset = draw(st.sampled_from([1e19, -1e30, 3e38]))
        steps = draw(hnp.arrays(np.int8, shape, elements=st.integers(-3, 3)))
        x = (offset * (1 + steps * np.finfo(dtype).eps)).astype(dtype)
    elif style == "equal":
        x = np.full(shape, draw(st.sampled_from(EXTREMES)), dtype=dtype)
    else:
        x = draw(hnp.arrays(dtype, shape, elements=st.floats(
            width=32, allow_nan=False, allow_infinity=False)))
    scores = draw(hnp.arrays(dtype, shape[:2], elements=st.sampled_from(
        [0.0, 1e-45, 1.0, 7.0, 1e30, F32_MAX])))
    if with_nan:
        bad = draw(hnp.arrays(np.int8, shape, elements=st.integers(0, 6)))
        x = np.where(bad == 1, np.nan, np.where(bad == 2, np.inf, np.where(
            bad == 3, -np.inf, x))).astype(dtype)
        scores = np.where(bad[..., 0] == 4, np.nan, scores).astype(dtype)
    n = shape[1]
    # Mostly 0 < K < N, where something is clustered, chosen or merged; the edges (no token
    # kept, every token kept) in one draw of four.
    if n > 1 and draw(st.integers(0, 3)) > 0:
        k = draw(st.integers(1, n - 1))
    else:
        k = draw(st.sampled_from([0, n, n + 1]))
    return x, scores, k, draw(st.sampled_from(METHODS))


def check_indices(backend, result, n: int, k: int) -> None:
    """Labels in [0, K) (-1 only when K = 0); medoids distinct tokens in [0, N)."""
    k = min(k, n)
    labels = backend.to_numpy(result.assignment)
    if k == 0:
        assert np.all(labels == -1)
    else:
        assert labels.min() >= 0 and labels.max() < k
    if result.medoids is not None:
        medoids = backend.to_numpy(result.medoids)
        assert medoids.min(initial=0) >= 0 and medoids.max(initial=0) < n
        for row in medoids.reshape(-1, medoids.shape[-1]):
            assert len(set(row.tolist())) == len(row), f"medoids repeat: {row}"


def check_overflow_is_the_objectives(backend, arrays, k, method, fast, error) -> None:
    """An OverflowError is due only where the objective, computed in float64, exceeds the
    dtype it is returned in (or float64 itself). The rest of the result, asked for without
    the objective (the plan that tokenpool_ops.nn uses), keeps every promise: same overflow
    handling, so finite tokens and sizes and indices in range."""
    message = str(error)
    dtype = np.dtype(str(arrays["x"].dtype).rsplit(".", 1)[-1])
    reached = re.fullmatch(r"problem \(\d+,\): the objective reaches (\S+) \(computed in "
                           r"float64\), beyond the range of float32 in which it is returned\..*",
                           message, flags=re.DOTALL)
    if dtype == np.float32:
        assert reached is not None, message
        assert float(reached.group(1)) > F32_MAX, message
    else:
        assert re.match(r"problem \(\d+,\): the objective overflows float64\.", message), message
        unchecked = tokenpool_ops.pool(arrays["x"], k, method, scores=arrays["scores"],
                                       return_info=True, fast_paths=fast, check_values=False)
        assert not np.all(np.isfinite(backend.to_numpy(unchecked.objective))), message
    plan = pool_result(arrays["x"], k, method, "plan", scores=arrays["scores"], fast_paths=fast)
    if plan.assignment is not None:  # the selection baselines plan without one
        check_indices(backend, plan, arrays["x"].shape[1], k)
    assert np.all(np.isfinite(backend.to_numpy(plan.tokens)))
    assert np.all(np.isfinite(backend.to_numpy(plan.sizes)))


@given(problem=extreme_problems())
def test_finite_input_gives_finite_output_on_every_path(path, problem):
    backend, fast = path
    x, scores, k, method = problem
    arrays = {"x": backend.asarray(x), "scores": backend.asarray(scores)}
    try:
        result = tokenpool_ops.pool(arrays["x"], k, method, scores=arrays["scores"],
                                    return_info=True, fast_paths=fast)
    except OverflowError as error:  # only the objective may be beyond the dtype's range
        check_overflow_is_the_objectives(backend, arrays, k, method, fast, error)
        return
    check_indices(backend, result, x.shape[1], k)
    assert np.all(np.isfinite(backend.to_numpy(result.tokens)))
    assert np.all(np.isfinite(backend.to_numpy(result.sizes)))
    objective = backend.to_numpy(result.objective)
    if 0 < k or x.shape[1] == 0:
        assert np.all(np.isfinite(objective))
    else:  # K = 0: the minimum over no centres, +inf by definition
        assert np.all(objective == np.inf)
    assert not np.any(np.isnan(backend.to_numpy(result.history)))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy warns about the NaN we feed it
@given(problem=extreme_problems(with_nan=True))
def test_nan_and_inf_unchecked_never_give_bad_indices(path, problem):
    backend, fast = path
    x, scores, k, method = problem
    result = tokenpool_ops.pool(backend.asarray(x), k, method, scores=backend.asarray(scores),
                                return_info=True, fast_paths=fast, check_values=False)
    check_indices(backend, result, x.shape[1], k)
    if method in ("kmedoids", "wkmedoids", "kmeans", "wkmeans"):
        for op in (tokenpool_ops.kmedoids, tokenpool_ops.kmeans):
            clustering = op(backend.asarray(x), k, check_values=False, fast_paths=fast)
            check_indices(backend, clustering, x.shape[1], k)


@pytest.mark.parametrize("method", ["kmeans", "kmedoids", "wkmedoids"])
def test_tokens_whose_distances_overflow_float32(path, method):
    """The issue's first case: |x| ~ 1e19 overflows every squared distance in float32 (it
    crashed the process through the Numba kernels)."""
    backend, fast = path
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 16, 8)).astype(np.float32) * np.float32(1e19)
    scores = rng.random((2, 16)).astype(np.float32)
    tokens = tokenpool_ops.pool(backend.asarray(x), 4, method, scores=backend.asarray(scores),
                                fast_paths=fast)
    # The same clustering on x / 1e19, where nothing overflows, scaled back (distances and
    # means commute with scaling): float32 holds the tokens, float64 computed them.
    small = tokenpool_ops.pool(x.astype(np.float64) / 1e19, 4, method, scores=scores)
    np.testing.assert_allclose(backend.to_numpy(tokens), small * 1e19, rtol=1e-5)
    with pytest.raises(OverflowError, match=r"^problem \(0,\): the objective reaches "
                                            r"\S+ \(computed in float64\), beyond the range "
                                            r"of float32"):
        tokenpool_ops.pool(backend.asarray(x), 4, method, scores=backend.asarray(scores),
                           fast_paths=fast, return_info=True)


def test_tokens_at_the_float32_maximum_give_finite_kmeans(path):
    """The issue's second case: two entries of 3e38 made three NaN tokens and a NaN
    objective. The expected tokens are recomputed here in float64 from the assignment."""
    backend, fast = path
    x = np.random.default_rng(0).normal(size=(2, 16, 8)).astype(np.float32)
    x[0, 0, 0] = x[0, 1, 0] = 3e38
    result = tokenpool_ops.pool(backend.asarray(x), 4, "kmeans", return_info=True,
                                fast_paths=fast)
    tokens = backend.to_numpy(result.tokens).astype(np.float64)
    labels = backend.to_numpy(result.assignment)
    assert np.all(np.isfinite(tokens))
    for p in range(2):
        for c in np.unique(labels[p]):  # an empty K-Means cluster keeps its last centre
            members = x[p][labels[p] == c].astype(np.float64)
            np.testing.assert_allclose(tokens[p, c], members.mean(axis=0), rtol=1e-6)
    # The reported error is the error of an assignment to the returned tokens, so never
    # below the nearest-token error (Eq. 9). In problem 0 the outliers' squared norms
    # (1e75 after centring) swamp the Gram expansion of the other tokens' distances, so the
    # assignment there may miss the nearest token; problem 1 must meet Eq. 9 exactly.
    wide = x.astype(np.float64)
    nearest = ((wide[:, :, None, :] - tokens[:, None, :, :]) ** 2).sum(-1).min(-1).sum(-1)
    objective = backend.to_numpy(result.objective)
    assert objective[0] >= nearest[0] * (1 - 1e-6)
    np.testing.assert_allclose(objective[1], nearest[1], rtol=1e-5)


def test_scores_at_the_float32_maximum_give_finite_wkmeans(path):
    """Equal scores of 3e38 overflow the weighted sums in float32; weighted by equal scores,
    wkmeans is kmeans (same start)."""
    backend, fast = path
    x = np.random.default_rng(0).normal(size=(2, 16, 8)).astype(np.float32)
    start = backend.asarray(np.array([[0, 5, 9, 12]] * 2))
    scores = backend.asarray(np.full((2, 16), 3e38, dtype=np.float32))
    weighted = tokenpool_ops.pool(backend.asarray(x), 4, "wkmeans", scores=scores, init=start,
                                  fast_paths=fast)
    plain = tokenpool_ops.pool(backend.asarray(x), 4, "kmeans", init=start, fast_paths=fast)
    np.testing.assert_allclose(backend.to_numpy(weighted), backend.to_numpy(plain), rtol=1e-6)
    with pytest.raises(OverflowError, match=r"scores 3e\+38"):
        tokenpool_ops.pool(backend.asarray(x), 4, "wkmeans", scores=scores, init=start,
                           fast_paths=fast, return_info=True)


def test_float64_beyond_its_range_is_a_clear_overflow_error():
    x = np.random.default_rng(0).normal(size=(3, 10, 2)) * 1e160
    x[0] /= 1e160  # problem 0 is fine: the error names problem 1
    with pytest.raises(OverflowError, match=r"^problem \(1,\): the objective overflows "
                                            r"float64\. Largest input magnitudes: x \d"):
        tokenpool_ops.kmedoids(x, 4)


def test_jax_keeps_the_promises():
    """JAX compiles each shape anew, so it gets one fixed problem of each kind."""
    jax = pytest.importorskip("jax", reason="jax is not installed")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    x = np.random.default_rng(0).normal(size=(2, 16, 8)).astype(np.float32)
    x[0, 0, 0] = x[0, 1, 0] = 3e38
    result = tokenpool_ops.pool(jnp.asarray(x), 4, "kmedoids", return_info=True)
    assert np.all(np.isfinite(np.asarray(result.tokens)))
    assert np.all(np.isfinite(np.asarray(result.objective)))
    x[1, 3, 1] = np.nan
    result = tokenpool_ops.pool(jnp.asarray(x), 4, "kmedoids", return_info=True,
                                check_values=False)
    labels, medoids = np.asarray(result.assignment), np.asarray(result.medoids)
    assert labels.min() >= 0 and labels.max() < 4
    assert all(len(set(row.tolist())) == 4 for row in medoids)
