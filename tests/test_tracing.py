"""pool, kmeans and kmedoids with default arguments under JAX's tracers (jit, vmap, grad).

Traced values cannot be read on the host, so under a tracer the calls run as with
``check_values=False, stop_early=False``: the fixed ``max_iter`` iterations. Once no
assignment changes, further iterations change nothing, so the traced results equal the eager
ones.
"""

from __future__ import annotations

import numpy as np
import pytest

import tokenpool_ops

jax = pytest.importorskip("jax", reason="the tracer tests need JAX")
jnp = jax.numpy

METHODS = ["kmeans", "kmedoids", "wkmeans", "wkmedoids", "topk", "random", "importance", "tome"]


def _problem(batch: tuple[int, ...] = (2,)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    x = rng.normal(size=(*batch, 12, 3)).astype(np.float32)
    return x, rng.exponential(size=(*batch, 12)).astype(np.float32)


@pytest.mark.parametrize("method", METHODS)
def test_jit_with_default_arguments_equals_eager(method: str) -> None:
    x, scores = _problem()
    eager = tokenpool_ops.pool(jnp.asarray(x), 4, method, scores=jnp.asarray(scores))
    jitted = jax.jit(lambda x, s: tokenpool_ops.pool(x, 4, method, scores=s))
    np.testing.assert_allclose(jitted(jnp.asarray(x), jnp.asarray(scores)), eager, rtol=1e-6)


def test_jit_of_kmeans_and_kmedoids_runs_max_iter_iterations() -> None:
    x, _ = _problem()
    for cluster in (tokenpool_ops.kmeans, tokenpool_ops.kmedoids):
        eager = cluster(jnp.asarray(x), 4)
        assert eager.n_iter < 6  # so that the traced call runs iterations the eager one did not

        def fields(x, cluster=cluster):
            result = cluster(x, 4, max_iter=6)
            return result.assignment, result.history

        assignment, history = jax.jit(fields)(jnp.asarray(x))
        assert history.shape == (2, 7)  # the initial value and 6 iterations
        np.testing.assert_array_equal(assignment, eager.assignment)
        # Converged problems repeat their final value for the iterations left.
        np.testing.assert_allclose(history[:, -1], eager.history[:, -1], rtol=1e-6)


@pytest.mark.parametrize("method", ["wkmedoids", "kmeans", "topk"])
def test_vmap_over_an_extra_batch_axis_equals_the_batched_call(method: str) -> None:
    x, scores = _problem(batch=(3, 2))
    batched = tokenpool_ops.pool(jnp.asarray(x), 4, method, scores=jnp.asarray(scores))
    mapped = jax.vmap(lambda x, s: tokenpool_ops.pool(x, 4, method, scores=s))
    np.testing.assert_allclose(mapped(jnp.asarray(x), jnp.asarray(scores)), batched, rtol=1e-6)


def test_grad_through_the_merged_tokens_is_one_over_the_cluster_size() -> None:
    """d/dx_i of sum(c * pooled) is c / |cluster of i| for unweighted K-Means."""
    x, _ = _problem()
    info = tokenpool_ops.pool(jnp.asarray(x), 4, "kmeans", return_info=True)
    c = jnp.asarray([1.0, -2.0, 0.5], dtype=jnp.float32)
    grad = jax.grad(lambda x: (tokenpool_ops.pool(x, 4, "kmeans") * c).sum())(jnp.asarray(x))
    sizes = np.take_along_axis(np.asarray(info.sizes), np.asarray(info.assignment), axis=-1)
    np.testing.assert_allclose(grad, np.asarray(c)[None, None, :] / sizes[..., None],
                               rtol=1e-6)


def test_unpool_under_jit() -> None:
    tokens = jnp.asarray([[1.0], [2.0]])
    got = jax.jit(tokenpool_ops.unpool)(tokens, jnp.asarray([1, 0, 1]))
    np.testing.assert_array_equal(got, [[2.0], [1.0], [2.0]])
