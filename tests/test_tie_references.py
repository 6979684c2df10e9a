"""K-Means and K-Medoids against loop references, on data full of exact ties.

The references below are plain Python over problems, tokens and clusters, with the tie rules
of the documentation written out (``tokenpool_ops._clustering``):

* assignment: the nearest centre, the lowest cluster index among equally near ones; for
  K-Medoids a medoid always belongs to its own cluster;
* K-Means update: each centre becomes the weighted mean of its members; a cluster whose
  weights sum to zero takes its members' plain mean; an empty cluster keeps its centre;
* K-Medoids update: the member with the least ``sum_j w_j |f_j - f_m|^2`` over its cluster;
  the current medoid stays unless a member is strictly better, else the lowest index wins;
* the loop stops after the first iteration in which no assignment changed in any problem
  (``stop_early``), or after ``max_iter``; a problem that settled repeats its last state;
* ``history[t]`` is Eq. 13 at the centres (medoids) after iteration t, recomputed here from
  that iteration's centres by a double loop.

The data make every tie exact whatever the arithmetic: tokens are small integers with
duplicates and mean exactly zero (each with its mirror image), weights are in {0, 1, 2}, and
for K-Means the integers are multiples of lcm(1..2N), so that every weighted mean (a sum
over at most N tokens with weights at most 2, divided by their total) is an integer too and
every distance, however computed, is exact. Results must then be *identical*, bit for bit,
on every backend and path: the generic array-API code, the library fast paths, the Numba
kernels, NumPy without Numba, and the CUDA kernels' host build (through NumPy's fast-path
entry and through PyTorch's CUDA branches).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

import tokenpool_ops as tp
from tokenpool_ops import backends

# ---------------------------------------------------------------------------------------------
# The references


def sq_dist(a: list[float], b: list[float]) -> float:
    return sum((p - q) ** 2 for p, q in zip(a, b, strict=True))


def nearest(token: list[float], centres: list[list[float]]) -> int:
    """The nearest centre; the lowest cluster index among equally near ones."""
    best = 0
    for c in range(1, len(centres)):
        if sq_dist(token, centres[c]) < sq_dist(token, centres[best]):
            best = c
    return best


def objective(x: list[list[float]], w: list[float], centres: list[list[float]]) -> float:
    """Eq. 13: sum_i w_i min_j |f_i - c_j|^2, by a double loop."""
    return sum(w[i] * min(sq_dist(x[i], c) for c in centres) for i in range(len(x)))


@dataclass
class Trace:
    """One problem's reference run: the state after each iteration (index 0: the start)."""

    labels: list[list[int]]
    centres: list[list[list[float]]]
    medoids: list[list[int]] | None  # K-Medoids only

    @property
    def settled_at(self) -> int:
        """The first iteration whose assignment equals the one before (len - 1 if none)."""
        for t in range(1, len(self.labels)):
            if self.labels[t] == self.labels[t - 1]:
                return t
        return len(self.labels) - 1


def kmeans_trace(x: list[list[float]], w: list[float], init: list[int],
                 iterations: int) -> Trace:
    """Weighted K-Means for ``iterations`` iterations from the tokens ``init``."""
    centres = [list(x[i]) for i in init]
    labels = [nearest(token, centres) for token in x]
    trace = Trace([labels], [centres], None)
    for _ in range(iterations):
        new_centres = []
        for c, centre in enumerate(centres):
            members = [i for i in range(len(x)) if labels[i] == c]
            if not members:
                new_centres.append(centre)  # an empty cluster keeps its centre
                continue
            weights = [w[i] for i in members]
            if sum(weights) == 0:
                weights = [1.0] * len(members)  # zero total weight: the plain mean
            total = sum(weights)
            new_centres.append([sum(wi * x[i][d] for wi, i in zip(weights, members, strict=True))
                                / total for d in range(len(centre))])
        centres = new_centres
        labels = [nearest(token, centres) for token in x]
        trace.labels.append(labels)
        trace.centres.append(centres)
    return trace


def kmedoids_assign(x: list[list[float]], medoids: list[int]) -> list[int]:
    labels = []
    for i, token in enumerate(x):
        if i in medoids:
            labels.append(medoids.index(i))  # a medoid keeps itself, even beside a twin
        else:
            labels.append(nearest(token, [x[m] for m in medoids]))
    return labels


def kmedoids_trace(x: list[list[float]], w: list[float], init: list[int],
                   iterations: int) -> Trace:
    """Weighted K-Medoids (Eq. 16-17, the medoid cost weighted) from the medoids ``init``."""
    medoids = list(init)
    labels = kmedoids_assign(x, medoids)
    trace = Trace([labels], [[list(x[m]) for m in medoids]], [medoids])
    for _ in range(iterations):
        new_medoids = []
        for c, current in enumerate(medoids):
            members = [i for i in range(len(x)) if labels[i] == c]
            cost = {m: sum(w[j] * sq_dist(x[j], x[m]) for j in members) for m in members}
            best = min(members, key=lambda m: (cost[m], m))
            new_medoids.append(best if cost[best] < cost[current] else current)
        medoids = new_medoids
        labels = kmedoids_assign(x, medoids)
        trace.labels.append(labels)
        trace.centres.append([list(x[m]) for m in medoids])
        trace.medoids.append(medoids)  # type: ignore[union-attr]
    return trace


@dataclass
class Expected:
    labels: np.ndarray
    centres: np.ndarray
    medoids: np.ndarray | None
    history: np.ndarray
    n_iter: int


def reference(algorithm: str, x: np.ndarray, weights: np.ndarray | None, init: np.ndarray,
              max_iter: int, stop_early: bool) -> Expected:
    """The batched result: each problem run alone, the batch stopped at the latest settling
    problem (or at max_iter), the history of every iteration recomputed from its centres."""
    run = kmeans_trace if algorithm == "kmeans" else kmedoids_trace
    traces = []
    histories = []
    for b in range(x.shape[0]):
        tokens = x[b].tolist()
        w = [1.0] * x.shape[1] if weights is None else weights[b].tolist()
        trace = run(tokens, w, init[b].tolist(), max_iter)
        traces.append(trace)
        histories.append([objective(tokens, w, centres) for centres in trace.centres])
    n_iter = max_iter
    if stop_early:
        n_iter = min(max_iter, max(trace.settled_at for trace in traces))
    return Expected(
        labels=np.array([trace.labels[n_iter] for trace in traces]),
        centres=np.array([trace.centres[n_iter] for trace in traces]),
        medoids=(None if algorithm == "kmeans"
                 else np.array([trace.medoids[n_iter] for trace in traces])),  # type: ignore[index]
        history=np.array([h[: n_iter + 1] for h in histories]),
        n_iter=n_iter)


# ---------------------------------------------------------------------------------------------
# Tie-heavy data


def tie_heavy_problem(seed: int, batch: int, n: int, m: int, k: int, spread: int,
                      scale: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokens (B, N, M): integers in [-spread, spread] times ``scale``, each with its mirror
    image (an odd N adds the origin), so the mean is exactly zero and a small spread gives
    many duplicates; weights in {0, 1, 2}; distinct starting indices (B, k)."""
    rng = np.random.default_rng(seed)
    half = rng.integers(-spread, spread + 1, size=(batch, n // 2, m))
    parts = [half, -half] + ([np.zeros((batch, 1, m), dtype=half.dtype)] if n % 2 else [])
    x = rng.permuted(np.concatenate(parts, axis=1), axis=1) * scale
    weights = rng.integers(0, 3, size=(batch, n)).astype(np.float64)
    init = np.stack([rng.permutation(n)[:k] for _ in range(batch)])
    return x.astype(np.float64), weights, init


def kmeans_scale(n: int) -> int:
    """Every total of at most N weights in {1, 2} divides lcm(1..2N): integer means."""
    return math.lcm(*range(1, 2 * n + 1))


#: (seed, N, M, k, spread). K-Means keeps N <= 8: lcm(1..16) * spread squared, times M,
#: stays far inside float64's exact integers (2**53).
#: Seeds 107 and 119 have a zero-weight cluster of several tokens whose plain mean moves the
#: labels: a zero-weight cluster that kept its centre instead would change them.
KMEANS_CASES = [(1, 8, 2, 3, 1), (2, 7, 2, 4, 1), (3, 8, 3, 2, 2), (4, 6, 1, 3, 2),
                (107, 8, 2, 3, 1), (119, 8, 3, 2, 2)]
KMEDOIDS_CASES = [(11, 16, 2, 4, 1), (12, 13, 2, 5, 2), (13, 20, 3, 3, 1), (14, 9, 1, 4, 2)]


def problems(algorithm: str) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, int]]:
    cases = KMEANS_CASES if algorithm == "kmeans" else KMEDOIDS_CASES
    for seed, n, m, k, spread in cases:
        scale = kmeans_scale(n) if algorithm == "kmeans" else 1
        x, w, init = tie_heavy_problem(seed, 3, n, m, k, spread, scale)
        yield x, w, init, k


def test_the_data_are_tie_heavy():
    # The point of these problems: the references meet ties and zero-weight clusters, and
    # the batch's problems settle at different iterations (so the history repeats).
    tied_tokens = tied_assignments = zero_weight_clusters = 0
    settle_spread = 0
    for algorithm in ("kmeans", "kmedoids"):
        for x, w, init, _ in problems(algorithm):
            run = kmeans_trace if algorithm == "kmeans" else kmedoids_trace
            traces = [run(x[b].tolist(), w[b].tolist(), init[b].tolist(), 10)
                      for b in range(len(x))]
            settle_spread += len({trace.settled_at for trace in traces}) > 1
            for b, trace in enumerate(traces):
                tied_tokens += len(x[b]) - len(np.unique(x[b], axis=0))
                for centres, labels in zip(trace.centres, trace.labels, strict=True):
                    for token in x[b]:
                        d = sorted(sq_dist(token.tolist(), c) for c in centres)
                        tied_assignments += len(d) > 1 and d[0] == d[1]
                    for c in range(len(centres)):
                        members = [i for i in range(len(labels)) if labels[i] == c]
                        zero_weight_clusters += bool(members) and w[b][members].sum() == 0
    assert tied_tokens > 50 and tied_assignments > 100
    assert zero_weight_clusters > 0 and settle_spread > 0


# ---------------------------------------------------------------------------------------------
# Every backend and path against the references


def check_against_reference(backend: Any, result: Any, want: Expected) -> None:
    assert result.n_iter == want.n_iter
    np.testing.assert_array_equal(backend.to_numpy(result.assignment), want.labels,
                                  err_msg="assignment")
    np.testing.assert_array_equal(backend.to_numpy(result.centres), want.centres,
                                  err_msg="centres")
    if want.medoids is not None:
        np.testing.assert_array_equal(backend.to_numpy(result.medoids), want.medoids,
                                      err_msg="medoids")
    np.testing.assert_array_equal(backend.to_numpy(result.history), want.history,
                                  err_msg="history")
    np.testing.assert_array_equal(backend.to_numpy(result.objective), want.history[:, -1],
                                  err_msg="objective")


def run_all(backend: Any, algorithm: str, weighted: bool, dtype: str = "float64",
            **options: Any) -> int:
    """Every problem, at max_iter 2 and 10, stopping early or not; returns the number of
    batched runs."""
    function = tp.kmeans if algorithm == "kmeans" else tp.kmedoids
    runs = 0
    for x, w, init, k in problems(algorithm):
        weights = w if weighted else None
        for max_iter in (2, 10):
            for stop_early in (True, False):
                want = reference(algorithm, x, weights, init, max_iter, stop_early)
                got = function(
                    backend.asarray(x.astype(dtype)), k, init=backend.asarray(init),
                    weights=None if weights is None else backend.asarray(weights.astype(dtype)),
                    max_iter=max_iter, stop_early=stop_early, **options)
                check_against_reference(backend, got, want)
                runs += 1
    return runs


@pytest.mark.parametrize("fast_paths", [True, False], ids=["fast", "generic"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("algorithm", ["kmeans", "kmedoids"])
def test_every_backend_equals_the_reference(backend, algorithm, weighted, fast_paths):
    # With fast paths, NumPy and PyTorch on the CPU take the Numba kernels.
    run_all(backend, algorithm, weighted, fast_paths=fast_paths)


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_kmedoids_in_float32_equals_the_reference(backend, weighted):
    # Small integers are exact in float32 too: the same bits are due.
    run_all(backend, "kmedoids", weighted, dtype="float32")


@contextmanager
def numba_is(available: bool) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(backends, "numba_available", lambda: available)
        yield


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("algorithm", ["kmeans", "kmedoids"])
@pytest.mark.parametrize("library", ["numpy", "torch-cpu"])
def test_fast_paths_without_numba_equal_the_reference(backend_named, library, algorithm,
                                                      weighted):
    # The library's own fast paths, where Numba is missing.
    with numba_is(False):
        run_all(backend_named(library), algorithm, weighted)


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("algorithm", ["kmeans", "kmedoids"])
@pytest.mark.parametrize("library", ["numpy", "torch-cpu"])
def test_numba_kernels_run_and_equal_the_reference(backend_named, library, algorithm,
                                                   weighted):
    # The fused kernel itself ran (a fast path that silently declined would leave only the
    # generic code under test).
    if not backends.numba_available():
        pytest.skip("numba is not importable: its kernels cannot run")
    backend = backend_named(library)
    module = importlib.import_module(f"tokenpool_ops.backends._{library.split('-')[0]}")
    compiled = module.compiled_paths()
    calls = [0]

    def counted(*args: Any) -> Any:
        calls[0] += 1
        result = compiled[algorithm](*args)
        assert result is not None, "the Numba kernel declined a CPU problem"
        return result

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(backends, "_compiled_paths", lambda name: {**compiled, algorithm: counted})
        runs = run_all(backend, algorithm, weighted)
    assert calls[0] == runs


# ---------------------------------------------------------------------------------------------
# The CUDA kernels' host build

try:  # the host build's driver belongs to the CUDA kernel's own tests
    from tests.test_cuda_kernel import (  # noqa: F401 (host is a fixture)
        SCHEMES,
        cpu_tensors_take_the_cuda_branches,
        host,
        kernel_as_fast_path,
    )
except ImportError as error:  # pragma: no cover - reported by the tests below
    HOST_IMPORT_ERROR: ImportError | None = error
else:
    HOST_IMPORT_ERROR = None


@pytest.mark.skipif(HOST_IMPORT_ERROR is not None, reason=f"{HOST_IMPORT_ERROR}")
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("scheme", SCHEMES if HOST_IMPORT_ERROR is None else ["plan"])
def test_cuda_host_build_equals_the_reference(host, backend_named, scheme, weighted, dtype):
    with kernel_as_fast_path(host, scheme) as calls:
        runs = run_all(backend_named("numpy"), "kmedoids", weighted, dtype=dtype)
    assert calls[0] == runs


@pytest.mark.skipif(HOST_IMPORT_ERROR is not None, reason=f"{HOST_IMPORT_ERROR}")
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("algorithm", ["kmeans", "kmedoids"])
def test_torch_cuda_branches_on_the_host_build_equal_the_reference(host, backend_named,
                                                                   algorithm, weighted):
    # PyTorch tensors routed as CUDA tensors are: K-Medoids launches the kernel; K-Means
    # runs the PyTorch code (its centres are not the merge kernel's shape), still exactly.
    backend = backend_named("torch-cpu")
    context = cpu_tensors_take_the_cuda_branches(host)
    with context as on_host, numba_is(False) if algorithm == "kmeans" else nullcontext():
        runs = run_all(backend, algorithm, weighted)
    assert on_host.launches["kmedoids"] == (runs if algorithm == "kmedoids" else 0)
