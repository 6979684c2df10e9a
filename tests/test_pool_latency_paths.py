"""The cheaper routes of issue 23's pool calls equal the routes they replace, bit for bit.

Each fast primitive here is compared with the generic function it stands for (which the
tests of test_backends.py and test_pool.py compare with independent references), on inputs
chosen to reach its corner cases: ties, signed zeros, infinities, NaN (where a fast path
declines), empty and full selections, non-contiguous arrays.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("numba", reason="Numba is not installed: the compiled paths are off")

from tokenpool_ops.backends import primitives_for

from tokenpool_ops._primitives import top_k

HOST_BACKENDS = ["numpy", "torch-cpu"]


def _keys(rng: np.random.Generator, kind: int, shape: tuple[int, int]) -> np.ndarray:
    """Keys of one kind: distinct, few values (many ties), signed zeros and infinities."""
    if kind == 0:
        return rng.random(shape)
    if kind == 1:
        return rng.integers(0, 3, shape).astype(float)
    return rng.choice([0.0, -0.0, 1.0, np.inf, -np.inf, 1e-30], shape)


@pytest.mark.parametrize("name", HOST_BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_compiled_top_k_equals_generic_sort(backend_named, name, dtype):
    backend = backend_named(name)
    xp = backend.xp
    fast = primitives_for(xp).top_k
    assert fast is not top_k, "the host backends are expected to select the tokens by kernel"
    rng = np.random.default_rng(23)
    for trial in range(300):
        b, n = int(rng.integers(1, 4)), int(rng.integers(1, 25))
        k = int(rng.integers(0, n + 1))
        keys = backend.asarray(_keys(rng, trial % 3, (b, n)).astype(dtype))
        got, want = fast(xp, keys, k), top_k(xp, keys, k)
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(backend.to_numpy(got), backend.to_numpy(want),
                                      err_msg=f"keys {backend.to_numpy(keys)}, k {k}")


@pytest.mark.parametrize("name", HOST_BACKENDS)
def test_compiled_top_k_by_hand_and_on_views(backend_named, name):
    # Independent expectations: the two largest, the lower index among the three equal 2s;
    # the same keys read through a strided view (every other column of a wider array).
    backend = backend_named(name)
    xp, fast = backend.xp, primitives_for(backend.xp).top_k
    keys = backend.asarray(np.array([[2.0, 1.0, 2.0, 5.0, 2.0], [0.0, -0.0, 0.0, -1.0, 0.0]],
                                    dtype=np.float32))
    assert backend.to_numpy(fast(xp, keys, 2)).tolist() == [[0, 3], [0, 1]]
    assert backend.to_numpy(fast(xp, keys, 4)).tolist() == [[0, 2, 3, 4], [0, 1, 2, 4]]
    wide = np.zeros((2, 10), dtype=np.float32)
    wide[:, ::2] = backend.to_numpy(keys)
    strided = backend.asarray(wide)[:, ::2]
    assert backend.to_numpy(fast(xp, strided, 2)).tolist() == [[0, 3], [0, 1]]


@pytest.mark.parametrize("name", HOST_BACKENDS)
def test_compiled_top_k_leaves_nan_and_other_dtypes_to_the_sort(backend_named, name):
    # A sort places NaN last; a selection would not: keys with NaN go to the generic sort,
    # as do dtypes the kernel is not built for, and the answer is the sort's.
    backend = backend_named(name)
    xp, fast = backend.xp, primitives_for(backend.xp).top_k
    keys = backend.asarray(np.array([[1.0, np.nan, 3.0, 2.0], [4.0, 3.0, 2.0, 1.0]]))
    for k in range(5):
        np.testing.assert_array_equal(backend.to_numpy(fast(xp, keys, k)),
                                      backend.to_numpy(top_k(xp, keys, k)))
    assert backend.to_numpy(fast(xp, keys, 2)).tolist() == [[2, 3], [0, 1]]
    half = backend.asarray(np.array([[1.0, 3.0, 2.0]], dtype=np.float16))
    assert backend.to_numpy(fast(xp, half, 2)).tolist() == [[1, 2]]


# ---------------------------------------------------------------------------------------------
# Value-check verdicts made on the host (PyTorch CPU tensors)


def test_torch_host_verdicts_are_read_like_tensors():
    torch = pytest.importorskip("torch", reason="torch is not installed")
    import array_api_compat.torch as xp
    from tokenpool_ops.backends import _torch

    good = torch.tensor([[0.5, 2.0]], requires_grad=True)
    bad = torch.tensor([[0.5, -1.0]])
    verdicts = [_torch.all_valid(xp, t, True) for t in (good, bad)]
    assert all(isinstance(v, np.ndarray) and v.shape == () for v in verdicts)
    assert _torch.read_flags(xp, verdicts, torch.tensor(3)) == ([True, False], 3)
    # bfloat16, which NumPy lacks, keeps the tensor route; a verdict stays a 0-d tensor
    half = _torch.all_valid(xp, torch.tensor([1.0, float("inf")], dtype=torch.bfloat16), False)
    assert isinstance(half, torch.Tensor) and not bool(half)
    assert _torch.read_flags(xp, [half, verdicts[0]], None) == ([False, True], None)


def test_numpy_pool_launches_no_numba_threads():
    # The NumPy route runs serial kernels only: launching Numba's thread pool would fix the
    # threading layer (test_numba_threading) in a process that never ran a parallel kernel.
    import subprocess
    import sys

    script = ("import numpy as np, tokenpool_ops\n"
              "from numba.np.ufunc import parallel\n"
              "x = np.random.default_rng(0).normal(size=(9, 30, 4))\n"
              "tokenpool_ops.pool(x, 7, 'kmedoids')\n"
              "print(parallel._is_initialized)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=600, check=True)
    assert done.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------
# The finite check of a result judged on the host (PyTorch CPU), dtype tests without
# array-api-compat, and the identity result of to_caller (issue 23, round d)


def _summands(rng: np.random.Generator, trial: int) -> list[np.ndarray]:
    """One to three arrays whose sums are small, huge (their total overflows float32, or
    cancels), or not finite, in float32, float64 or both."""
    big = float(np.finfo(np.float32).max)
    kinds = [lambda shape: rng.normal(size=shape),
             lambda shape: rng.choice([big / 3, -big / 3, 1.0], size=shape),
             lambda shape: rng.choice([big / 2, big / 2.5, -big / 4], size=shape),
             lambda shape: rng.choice([0.0, np.inf, -np.inf, np.nan, 1.0], size=shape),
             lambda shape: np.zeros(shape)]
    arrays = []
    for _ in range(int(rng.integers(1, 4))):
        shape = tuple(int(d) for d in rng.integers(0, 4, size=int(rng.integers(1, 3))))
        dtype = (np.float32, np.float64)[int(rng.integers(0, 2))] if trial % 2 else np.float32
        arrays.append(kinds[int(rng.integers(0, len(kinds)))](shape).astype(dtype))
    return arrays


def test_torch_finite_sum_equals_generic():
    torch = pytest.importorskip("torch", reason="torch is not installed")
    import array_api_compat.torch as xp
    from tokenpool_ops.backends import _torch

    from tokenpool_ops._primitives import finite_sum

    assert primitives_for(xp).finite_sum is _torch.finite_sum
    rng = np.random.default_rng(230)
    seen = set()
    for trial in range(600):
        arrays = [torch.from_numpy(a) for a in _summands(rng, trial)]
        got, want = _torch.finite_sum(xp, arrays), finite_sum(xp, arrays)
        assert bool(got) == bool(want), [a.tolist() for a in arrays]
        seen.add(bool(want))
    assert seen == {True, False}


def test_torch_finite_sum_by_hand():
    # Independent verdicts: float32 sums of 3e38 overflow, cancelling ones do not, a NaN or
    # an infinity anywhere is never finite; float64 holds what float32 does not.
    torch = pytest.importorskip("torch", reason="torch is not installed")
    import array_api_compat.torch as xp
    from tokenpool_ops.backends import _torch

    def verdict(*values: list[float], dtype: object = torch.float32) -> bool:
        return bool(_torch.finite_sum(xp, [torch.tensor(v, dtype=dtype) for v in values]))

    assert verdict([1.0, 2.0], [3.0])
    assert not verdict([3e38], [3e38])
    assert not verdict([3e38, 3e38])
    assert verdict([3e38], [-3e38], [1.0])
    assert verdict([3e38], [3e38], dtype=torch.float64)
    assert not verdict([1.0], [float("nan")])
    assert not verdict([float("inf")], [float("-inf")])
    assert verdict([], [0.0])


@pytest.mark.parametrize("name", HOST_BACKENDS)
def test_real_floating_and_compute_dtype_as_the_namespace_says(backend_named, name):
    from tokenpool_ops._compat import compute_dtype, is_real_floating

    xp = backend_named(name).xp
    for dtype_name in ("float16", "float32", "float64", "int8", "int64", "uint8", "bool",
                       "complex64", "bfloat16"):
        dtype = getattr(xp, dtype_name, None)
        if dtype is None:  # NumPy has no bfloat16
            continue
        floating = bool(xp.isdtype(dtype, "real floating"))
        assert is_real_floating(xp, dtype) == floating, dtype_name
        if floating:
            expected = xp.float32 if xp.finfo(dtype).bits < 32 else dtype
            assert compute_dtype(xp, dtype) == expected, dtype_name


@pytest.mark.parametrize("name", HOST_BACKENDS)
def test_pool_result_of_a_flat_batch_is_returned_as_computed(backend_named, name):
    # (B, N, M) float32 tokens: to_caller has nothing to change and returns the result
    # itself; with a batch shape to restore or a dtype to cast it changes them, as before.
    from tokenpool_ops._batching import flatten
    from tokenpool_ops._pool import pool_result

    backend = backend_named(name)
    xp = backend.xp
    rng = np.random.default_rng(5)
    x = backend.asarray(rng.normal(size=(2, 3, 9, 4)).astype(np.float32))
    nested = pool_result(x, 3, "kmedoids", "info")
    flat = pool_result(xp.reshape(x, (6, 9, 4)), 3, "kmedoids", "info")
    for field in ("tokens", "assignment", "sizes", "medoids", "objective", "history"):
        got, want = getattr(nested, field), getattr(flat, field)
        assert tuple(got.shape) == (2, 3, *tuple(want.shape)[1:]), field
        np.testing.assert_array_equal(backend.to_numpy(got).reshape(want.shape),
                                      backend.to_numpy(want))
    batch = flatten(xp, xp.reshape(x, (6, 9, 4)))
    assert batch.to_caller(flat) is flat
    half = flatten(xp, xp.astype(xp.reshape(x, (6, 9, 4)), xp.float16))
    assert half.to_caller(flat).tokens.dtype == xp.float16
