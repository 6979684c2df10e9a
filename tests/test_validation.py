"""Bad input is refused with the documented error, and good input is never modified.

The public operators (``pool``, ``kmeans``, ``kmedoids``, ``unpool``, ``reconstruction_error``,
``significance_scores``) promise in their docstrings a ``TypeError`` or ``ValueError`` naming
the argument at fault. Each test below feeds one bad argument and checks both the error type
and that the message names that argument, so a check that silently disappears (or blames the
wrong argument) fails here. Array inputs are tested on every backend of the ``backend``
fixture; arguments that are plain Python values (k, method, max_iter, init strings) are
tested once, on NumPy. The last test checks that no operator writes into its inputs.
"""

from __future__ import annotations

import numpy as np
import pytest

import tokenpool_ops as tp

N, M, K = 6, 3, 2
METHODS = ("kmeans", "kmedoids", "wkmeans", "wkmedoids", "topk", "random", "importance")

#: The operators that take tokens ``x`` and a count ``k``; scores go in as kmeans weights.
OPERATORS = {
    "pool": lambda x, k=K, **kw: tp.pool(x, k, "kmeans", **kw),
    "kmeans": lambda x, k=K, **kw: tp.kmeans(x, k, **kw),
    "kmedoids": lambda x, k=K, **kw: tp.kmedoids(x, k, **kw),
}


def tokens(seed: int = 0, batch: tuple[int, ...] = ()) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(*batch, N, M))


def positive(seed: int = 1, batch: tuple[int, ...] = ()) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.5, 2.0, size=(*batch, N))


# --- x ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", OPERATORS)
def test_one_dimensional_x_is_a_value_error(backend, op):
    x = backend.asarray(tokens()[:, 0])
    with pytest.raises(ValueError, match=r"^x\b"):
        OPERATORS[op](x)


@pytest.mark.parametrize("op", OPERATORS)
def test_integer_x_is_a_type_error(backend, op):
    x = backend.asarray(np.arange(N * M).reshape(N, M))
    with pytest.raises(TypeError, match=r"^x\b"):
        OPERATORS[op](x)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("op", [*OPERATORS, "reconstruction_error"])
def test_non_finite_x_is_a_value_error(backend, op, bad):
    x = tokens()
    x[2, 1] = bad
    x = backend.asarray(x)
    with pytest.raises(ValueError, match=r"^x contains NaN or infinity"):
        if op == "reconstruction_error":
            tp.reconstruction_error(x, backend.asarray(tokens(1)[:K]))
        else:
            OPERATORS[op](x)


@pytest.mark.parametrize("bad", [(np.inf, -np.inf), (np.nan, 1.0), (np.inf, 1.0)],
                         ids=["inf-and-minus-inf", "nan", "inf"])
def test_non_finite_x_in_one_problem_of_a_batch_is_found(backend, bad):
    # The check reads the per-problem means first; +inf and -inf in one column cancel to NaN
    # there, and a bad value in the last problem must be found as well as in the first.
    x = tokens(batch=(3,))
    x[2, 1, 0], x[2, 4, 0] = bad
    with pytest.raises(ValueError, match=r"^x contains NaN or infinity"):
        tp.kmedoids(backend.asarray(x), K)


def test_finite_x_whose_mean_overflows_passes_the_check():
    # Two float32 values near the largest finite one sum to infinity: the mean is not finite
    # although x is, so the check must scan x itself instead of refusing it.
    from tokenpool_ops._validation import check_finite_tokens

    x = np.zeros((1, 2, 3), dtype=np.float32)
    x[0, :, 0] = np.finfo(np.float32).max
    with np.errstate(over="ignore"):
        mean = np.mean(x, axis=1, keepdims=True, dtype=np.float32)
    assert not np.isfinite(mean).all()
    check_finite_tokens(np, x, mean)  # no error
    x[0, 1, 1] = np.nan
    with pytest.raises(ValueError, match=r"^x contains NaN or infinity"):
        check_finite_tokens(np, x, mean)


@pytest.mark.parametrize("op", OPERATORS)
def test_check_values_false_lets_non_finite_x_through(backend, op):
    x = tokens()
    x[2, 1] = np.nan
    out = OPERATORS[op](backend.asarray(x), check_values=False)
    result = out if op == "pool" else out.centres
    backend.assert_like(result, (K, M), backend.xp.float64)


# --- shapes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["scores", "sizes"])
@pytest.mark.parametrize("shape", [(N + 1,), (N - 1,), (3, N), (2, N, 1)],
                         ids=["N+1", "N-1", "wrong-batch", "extra-axis"])
def test_per_token_values_of_wrong_shape_are_refused(backend, name, shape):
    x = backend.asarray(tokens(batch=(2,)))
    bad = backend.asarray(np.ones(shape))
    good = {"scores": backend.asarray(positive(batch=(2,)))}
    with pytest.raises(ValueError, match=rf"^{name} must have shape"):
        tp.pool(x, K, "wkmedoids", **{**good, name: bad})


@pytest.mark.parametrize("op", ["kmeans", "kmedoids"])
def test_weights_of_wrong_shape_are_refused(backend, op):
    x = backend.asarray(tokens())
    with pytest.raises(ValueError, match=r"^weights must have shape"):
        OPERATORS[op](x, weights=backend.asarray(np.ones(N + 1)))


@pytest.mark.parametrize("op", OPERATORS)
@pytest.mark.parametrize("init", [[0, 1, 2], [0], [[0, 1], [2, 3], [4, 5]]],
                         ids=["k+1", "k-1", "wrong-batch"])
def test_init_of_wrong_shape_is_refused(backend, op, init):
    x = backend.asarray(tokens(batch=(2,)))
    with pytest.raises(ValueError, match=r"^init must have shape"):
        OPERATORS[op](x, init=backend.asarray(np.array(init)))


@pytest.mark.parametrize("centers_shape", [(K, M + 1), (2, K, M)], ids=["M+1", "extra-batch"])
def test_reconstruction_error_refuses_centers_that_do_not_match_x(backend, centers_shape):
    x = backend.asarray(tokens())
    with pytest.raises(ValueError, match=r"^centers must have shape"):
        tp.reconstruction_error(x, backend.asarray(np.zeros(centers_shape)))


def test_significance_scores_refuses_two_dimensional_attention(backend):
    attn = backend.asarray(np.full((N, N), 1.0 / N))
    with pytest.raises(ValueError, match=r"^attn must have shape"):
        tp.significance_scores(attn)


# --- k, method, max_iter (plain Python values) ------------------------------------------------


@pytest.mark.parametrize("op", OPERATORS)
def test_negative_k_is_a_value_error(op):
    with pytest.raises(ValueError, match=r"^k must be a non-negative integer"):
        OPERATORS[op](tokens(), k=-1)


@pytest.mark.parametrize("k", [2.5, "3", True, 2.0, None], ids=repr)
@pytest.mark.parametrize("op", OPERATORS)
def test_non_integer_k_is_a_type_error(op, k):
    with pytest.raises(TypeError, match=r"^k must be a non-negative integer"):
        OPERATORS[op](tokens(), k=k)


@pytest.mark.parametrize("method", ["kmeans++", "KMeans", "", "wkmedoid"])
def test_unknown_method_is_a_value_error(method):
    with pytest.raises(ValueError, match=r"^method must be one of"):
        tp.pool(tokens(), K, method, scores=positive())


@pytest.mark.parametrize("op", OPERATORS)
def test_negative_max_iter_is_a_value_error(op):
    with pytest.raises(ValueError, match=r"^max_iter must be a non-negative integer"):
        OPERATORS[op](tokens(), max_iter=-1)


# --- scores, sizes, weights --------------------------------------------------------------------


@pytest.mark.parametrize("method", ["topk", "importance"])
def test_score_based_methods_need_scores(backend, method):
    with pytest.raises(ValueError, match=rf"^method '{method}' needs scores"):
        tp.pool(backend.asarray(tokens()), K, method)


NOT_ARRAYS = {"list": [[0.0, 1.0], [2.0, 3.0]], "float": 1.5, "none": None, "str": "x"}


@pytest.mark.parametrize("value", NOT_ARRAYS.values(), ids=NOT_ARRAYS.keys())
@pytest.mark.parametrize("op", ["pool", "kmeans", "kmedoids"])
def test_x_that_is_not_an_array_says_what_was_expected(op, value):
    expected = (r"^x must be an array of a library supporting the array API \(NumPy, "
                rf"PyTorch, JAX, CuPy, ...\), got {type(value).__name__}$")
    with pytest.raises(TypeError, match=expected):
        OPERATORS[op](value)


def test_scores_that_are_not_an_array_say_what_was_expected():
    with pytest.raises(TypeError, match=r"^scores must be an array of a library supporting "
                                        r"the array API .*, got list$"):
        tp.pool(tokens(), K, "wkmedoids", scores=[1.0] * tokens().shape[0])


@pytest.mark.parametrize("method", ["kmeans", "kmedoids"])
def test_init_topk_needs_scores_in_pool(backend, method):
    with pytest.raises(ValueError, match=r"^init='topk' ranks tokens by scores"):
        tp.pool(backend.asarray(tokens()), K, method, init="topk")


@pytest.mark.parametrize("op", ["kmeans", "kmedoids"])
def test_init_topk_needs_weights_in_clustering(backend, op):
    with pytest.raises(ValueError, match=r"^init='topk' ranks tokens by weights"):
        OPERATORS[op](backend.asarray(tokens()), init="topk")


@pytest.mark.parametrize("bad", [-0.5, np.nan, np.inf], ids=["negative", "nan", "inf"])
@pytest.mark.parametrize("method", ["wkmedoids", "topk", "importance"])
def test_bad_scores_are_a_value_error(backend, method, bad):
    scores = positive()
    scores[3] = bad
    with pytest.raises(ValueError, match=r"^scores must be finite and non-negative"):
        tp.pool(backend.asarray(tokens()), K, method, scores=backend.asarray(scores))


@pytest.mark.parametrize("bad", [-1.0, np.nan, np.inf], ids=["negative", "nan", "inf"])
def test_bad_sizes_are_a_value_error(backend, bad):
    sizes = np.ones(N)
    sizes[0] = bad
    with pytest.raises(ValueError, match=r"^sizes must be finite and non-negative"):
        tp.pool(backend.asarray(tokens()), K, "kmedoids", sizes=backend.asarray(sizes))


def test_negative_integer_sizes_are_a_value_error(backend):
    sizes = np.ones(N, dtype=np.int64)
    sizes[1] = -2
    with pytest.raises(ValueError, match=r"^sizes must be finite and non-negative"):
        tp.pool(backend.asarray(tokens()), K, "kmeans", sizes=backend.asarray(sizes))


def test_integer_sizes_pool_as_their_float_values(backend):
    """Integer sizes were accepted but reached the arithmetic uncast (array-api-strict
    refused int64 * float64); the clustering runs before the value checks are read."""
    sizes = np.arange(1, N + 1, dtype=np.int64) % 3 + 1
    x = backend.asarray(tokens())
    got = tp.pool(x, K, "kmeans", sizes=backend.asarray(sizes), return_info=True)
    want = tp.pool(x, K, "kmeans", sizes=backend.asarray(sizes.astype(np.float64)),
                   return_info=True)
    np.testing.assert_array_equal(backend.to_numpy(got.tokens), backend.to_numpy(want.tokens))
    np.testing.assert_array_equal(backend.to_numpy(got.sizes), backend.to_numpy(want.sizes))


@pytest.mark.parametrize("bad", [-1.0, np.nan], ids=["negative", "nan"])
@pytest.mark.parametrize("op", ["kmeans", "kmedoids"])
def test_bad_weights_are_a_value_error(backend, op, bad):
    weights = positive()
    weights[4] = bad
    with pytest.raises(ValueError, match=r"^weights must be finite and non-negative"):
        OPERATORS[op](backend.asarray(tokens()), weights=backend.asarray(weights))


def test_bad_reconstruction_weights_are_a_value_error(backend):
    weights = positive()
    weights[0] = np.nan
    with pytest.raises(ValueError, match=r"^weights must be finite and non-negative"):
        tp.reconstruction_error(backend.asarray(tokens()), backend.asarray(tokens(1)[:K]),
                                weights=backend.asarray(weights))


# --- init ------------------------------------------------------------------------------------


@pytest.mark.parametrize("init", [[0, N], [-1, 0], [N + 10, 1]], ids=["N", "-1", "N+10"])
@pytest.mark.parametrize("op", OPERATORS)
def test_init_indices_out_of_range_are_a_value_error(backend, op, init):
    with pytest.raises(ValueError, match=r"^init indices must lie in \[0, 6\)"):
        OPERATORS[op](backend.asarray(tokens()), init=backend.asarray(np.array(init)))


@pytest.mark.parametrize("op", OPERATORS)
def test_duplicate_init_indices_within_a_problem_are_a_value_error(backend, op):
    x = backend.asarray(tokens(batch=(2,)))
    init = backend.asarray(np.array([[0, 1], [3, 3]]))
    with pytest.raises(ValueError, match=r"^init indices must be distinct"):
        OPERATORS[op](x, init=init)


@pytest.mark.parametrize("op", OPERATORS)
def test_same_init_indices_in_different_problems_are_fine(backend, op):
    x = backend.asarray(tokens(batch=(2,)))
    out = OPERATORS[op](x, init=backend.asarray(np.array([[0, 4], [0, 4]])))
    result = out if op == "pool" else out.centres
    backend.assert_like(result, (2, K, M), backend.xp.float64)


@pytest.mark.parametrize("op", OPERATORS)
def test_float_init_array_is_a_type_error(backend, op):
    with pytest.raises(TypeError, match=r"^init must be .* an integer array"):
        OPERATORS[op](backend.asarray(tokens()), init=backend.asarray(np.array([0.0, 3.0])))


@pytest.mark.parametrize("init", ["kmeans++", "TOPK", ""])
@pytest.mark.parametrize("op", OPERATORS)
def test_unknown_init_string_is_a_value_error(op, init):
    with pytest.raises(ValueError, match=r"^init must be 'topk', 'random', 'spread'"):
        OPERATORS[op](tokens(), init=init)


# --- unpool ----------------------------------------------------------------------------------


@pytest.mark.parametrize("assignment", [[0, 2, 1], [-1, 0, 1]], ids=["K", "-1"])
def test_unpool_refuses_assignment_out_of_range(backend, assignment):
    pooled = backend.asarray(tokens()[:K])
    with pytest.raises(ValueError, match=r"^assignment must hold indices in \[0, 2\)"):
        tp.unpool(pooled, backend.asarray(np.array(assignment)))


def test_unpool_refuses_one_dimensional_tokens(backend):
    with pytest.raises(ValueError, match=r"^tokens must have shape"):
        tp.unpool(backend.asarray(np.ones(K)), backend.asarray(np.array([0, 1])))


def test_unpool_refuses_non_integer_assignment(backend):
    pooled = backend.asarray(tokens()[:K])
    with pytest.raises(TypeError, match=r"^assignment must be an integer array"):
        tp.unpool(pooled, backend.asarray(np.array([0.0, 1.0, 1.0])))


@pytest.mark.parametrize("assignment_shape", [(3,), (3, 4), (2, 1, 4)],
                         ids=["missing-batch", "wrong-batch", "extra-batch"])
def test_unpool_refuses_assignment_with_another_batch_shape(backend, assignment_shape):
    pooled = backend.asarray(tokens(batch=(2,))[:, :K])  # (2, K, M)
    assignment = backend.asarray(np.zeros(assignment_shape, dtype=np.int64))
    with pytest.raises(ValueError, match=r"^assignment must have shape"):
        tp.unpool(pooled, assignment)


# --- mixed libraries and devices ----------------------------------------------------------------


def _torch(a: np.ndarray):
    torch = pytest.importorskip("torch", reason="torch is not installed; needed to mix libraries")
    return torch.asarray(a)


MIXED_CALLS = {
    "pool-scores": lambda x, other: tp.pool(x, K, "wkmedoids", scores=other(positive())),
    "pool-sizes": lambda x, other: tp.pool(x, K, "kmeans", sizes=other(positive())),
    "pool-init": lambda x, other: tp.pool(x, K, "kmeans", init=other(np.array([0, 3]))),
    "kmeans-weights": lambda x, other: tp.kmeans(x, K, weights=other(positive())),
    "kmedoids-init": lambda x, other: tp.kmedoids(x, K, init=other(np.array([0, 3]))),
    "reconstruction-centers": lambda x, other: tp.reconstruction_error(x, other(tokens(1)[:K])),
    "unpool-assignment": lambda x, other: tp.unpool(x, other(np.array([0, 1, 5]))),
}


@pytest.mark.parametrize("call", MIXED_CALLS)
def test_numpy_mixed_with_torch_is_a_type_error(call):
    with pytest.raises(TypeError, match="one array library"):
        MIXED_CALLS[call](tokens(), _torch)


@pytest.mark.parametrize("call", ["pool-scores", "kmeans-weights", "unpool-assignment"])
def test_torch_mixed_with_numpy_is_a_type_error(call):
    with pytest.raises(TypeError, match="one array library"):
        MIXED_CALLS[call](_torch(tokens()), np.asarray)


@pytest.mark.parametrize("call", MIXED_CALLS)
def test_arrays_on_different_devices_are_a_value_error(call):
    xps = pytest.importorskip("array_api_strict",
                              reason="array_api_strict is not installed; it fakes devices")
    x = xps.asarray(tokens(), device=xps.Device("device1"))

    def on_cpu(a: np.ndarray):
        return xps.asarray(a, device=xps.Device("CPU_DEVICE"))

    with pytest.raises(ValueError, match="device"):
        MIXED_CALLS[call](x, on_cpu)


# --- inputs are never modified -------------------------------------------------------------------


def _snapshot(backend, a) -> tuple[bytes, str, tuple[int, ...]]:
    copy = np.array(backend.to_numpy(a), copy=True)
    return copy.tobytes(), str(copy.dtype), copy.shape


@pytest.mark.parametrize("call", [*METHODS, "kmeans()", "kmedoids()"])
def test_inputs_are_left_bit_identical(backend, call):
    rng = np.random.default_rng(7)
    inputs = {
        "x": backend.asarray(rng.normal(loc=5.0, size=(2, 3, 12, M))),  # off-centre on purpose
        "scores": backend.asarray(rng.uniform(0.1, 2.0, size=(2, 3, 12))),
        "sizes": backend.asarray(rng.integers(1, 4, size=(2, 3, 12)).astype(np.float64)),
        "init": backend.asarray(np.broadcast_to(np.array([1, 5, 9]), (2, 3, 3)).copy()),
    }
    before = {name: _snapshot(backend, a) for name, a in inputs.items()}
    x, scores, sizes, init = inputs["x"], inputs["scores"], inputs["sizes"], inputs["init"]
    if call == "kmeans()":
        tp.kmeans(x, 3, weights=scores, init=init, max_iter=5)
    elif call == "kmedoids()":
        tp.kmedoids(x, 3, weights=scores, init=init, max_iter=5)
    else:
        tp.pool(x, 3, call, scores=scores, sizes=sizes, init=init, max_iter=5, return_info=True)
    after = {name: _snapshot(backend, a) for name, a in inputs.items()}
    for name in inputs:
        assert after[name] == before[name], f"{call} modified its input {name}"
