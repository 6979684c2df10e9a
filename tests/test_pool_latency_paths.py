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
