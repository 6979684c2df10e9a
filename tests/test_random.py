"""The seeded draws of 'random', 'importance' and init='random': a counter-based hash
computed on the array's device, the same numbers on every library, with the right
distribution (chi-square tests at a fixed seed, so they never flake)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import tokenpool_ops
from tokenpool_ops._random import uniforms

MASK = 0xFFFFFFFF


def lowbias32(x: int) -> int:
    """The documented finaliser, written out on Python ints (no 16-bit halves)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK
    x ^= x >> 15
    x = (x * 0x846CA68B) & MASK
    return x ^ (x >> 16)


def expected_uniform(seed: int, b: int, i: int) -> float:
    seed %= 1 << 64
    key = lowbias32(lowbias32(seed & MASK) ^ (seed >> 32))
    h = lowbias32((lowbias32(lowbias32(key ^ b) ^ i) + b) & MASK)
    return ((h >> 8) + 1) / 2**24


@pytest.mark.parametrize("seed", [0, 1, 2**40 + 7, -3])
def test_uniforms_follow_the_documented_hash_on_every_backend(backend, seed):
    like = backend.asarray(np.zeros((3, 5)))
    got = backend.to_numpy(uniforms(backend.xp, seed, (3, 5), like))
    want = [[expected_uniform(seed, b, i) for i in range(5)] for b in range(3)]
    np.testing.assert_array_equal(got, want)


def test_uniforms_are_the_same_in_float32_and_float64():
    import array_api_compat.numpy as xp

    wide = uniforms(xp, 5, (4, 300), np.zeros(1, dtype=np.float64))
    narrow = uniforms(xp, 5, (4, 300), np.zeros(1, dtype=np.float32))
    np.testing.assert_array_equal(wide, narrow.astype(np.float64))


# The 0.999 quantiles of the chi-square distribution with 7 and 3 degrees of freedom.
CHI2_999 = {7: 24.322, 3: 16.266}


def chi_square(counts: np.ndarray, expected: np.ndarray) -> float:
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("seed", [0, 1])
def test_random_draws_every_token_equally_often(seed):
    problems, n = 16000, 8
    x = np.zeros((problems, n, 1))
    chosen = tokenpool_ops.pool(x, 1, "random", seed=seed, return_info=True).medoids[:, 0]
    counts = np.bincount(chosen, minlength=n)
    assert chi_square(counts, np.full(n, problems / n)) < CHI2_999[7]


@pytest.mark.parametrize("seed", [0, 1])
def test_importance_draws_in_proportion_to_the_scores_chi_square(seed):
    scores = np.array([1.0, 2.0, 3.0, 4.0, 0.0])
    problems = 16000
    x = np.zeros((problems, 5, 1))
    chosen = tokenpool_ops.pool(x, 1, "importance", scores=np.broadcast_to(scores, (problems, 5)),
                                seed=seed, return_info=True).medoids[:, 0]
    counts = np.bincount(chosen, minlength=5)
    assert counts[4] == 0  # zero score: never drawn while others can be
    expected = problems * scores[:4] / scores.sum()
    assert chi_square(counts[:4], expected) < CHI2_999[3]


def expected_importance_draw(seed: int, scores: np.ndarray, k: int) -> list[list[int]]:
    """The documented draw written out: positive scores race by -log(u) / score (smallest
    first), then zero scores by u (largest first); equal keys go to the lower index."""
    draws = []
    for b, row in enumerate(scores):
        u = [expected_uniform(seed, b, i) for i in range(len(row))]
        positive = sorted((-np.log(u[i]) / row[i], i) for i in range(len(row)) if row[i] > 0)
        zero = sorted((-u[i], i) for i in range(len(row)) if row[i] == 0)
        draws.append(sorted(i for _, i in (positive + zero)[:k]))
    return draws


@pytest.mark.parametrize("seed", [0, 5])
def test_importance_with_zero_scores_draws_uniformly_among_them_on_every_backend(backend, seed):
    """All-zero scores express no preference: the draw is 'random''s. With fewer positive
    scores than k, every positive token is taken and the rest come uniformly from the zeros."""
    rng = np.random.default_rng(seed)
    scores = np.zeros((4, 9))
    scores[2, [1, 6]] = [0.5, 2.0]  # two positive scores, k = 4
    scores[3] = rng.exponential(size=9)
    x = backend.asarray(rng.normal(size=(4, 9, 2)))
    drawn = tokenpool_ops.pool(x, 4, "importance", scores=backend.asarray(scores), seed=seed,
                               return_info=True).medoids
    got = backend.to_numpy(drawn).tolist()
    assert got == expected_importance_draw(seed, scores, 4)
    assert {1, 6} <= set(got[2])
    uniform = tokenpool_ops.pool(x, 4, "random", seed=seed, return_info=True).medoids
    assert got[:2] == backend.to_numpy(uniform).tolist()[:2]


def test_importance_with_all_zero_scores_is_uniform_chi_square():
    problems, n = 16000, 8
    x = np.zeros((problems, n, 1))
    chosen = tokenpool_ops.pool(x, 1, "importance", scores=np.zeros((problems, n)), seed=3,
                                return_info=True).medoids[:, 0]
    counts = np.bincount(chosen, minlength=n)
    assert chi_square(counts, np.full(n, problems / n)) < CHI2_999[7]


def test_draw_happens_on_the_device_without_host_arrays():
    """On PyTorch's meta device no value exists at all: a draw made on the host and copied
    over would fail or leave the meta device; the counter-based draw is pure tensor code."""
    torch = pytest.importorskip("torch", reason="torch is not installed")
    import array_api_compat.torch as xp

    like = torch.empty((2, 7), device="meta")
    u = uniforms(xp, 3, (2, 7), like)
    assert u.device.type == "meta" and u.shape == (2, 7) and u.dtype == torch.float32


def test_jax_without_x64_draws_the_same_numbers_without_a_warning():
    """JAX without x64 has no int64: the documented numbers come from NumPy instead."""
    import subprocess
    import sys

    pytest.importorskip("jax", reason="jax is not installed")
    program = ("import warnings; warnings.simplefilter('error'); "
               "import jax.numpy as jnp, numpy as np; "
               "from tokenpool_ops._random import uniforms; "
               "print(np.asarray(uniforms(jnp, 7, (2, 3), jnp.zeros(1))).tolist())")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    want = [[expected_uniform(7, b, i) for i in range(3)] for b in range(2)]
    np.testing.assert_array_equal(np.array(json.loads(done.stdout)), want)
