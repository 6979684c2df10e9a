"""PyTorch fast paths: fused distance assembly and ``index_add_`` segment sums.

The fused kernels (Numba on the CPU, CUDA through CuPy) are reached through the custom
operators of ``backends._torch_ops`` where a call is traced, so that ``torch.compile`` and
``torch.export`` keep them in the graph as one operator each; eager calls on the CPU run the
Numba kernels directly, without the operators' dispatch (see ``_eager``).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from tokenpool_ops._primitives import all_valid as generic_all_valid
from tokenpool_ops._primitives import read_flags as generic_read_flags
from tokenpool_ops._primitives import read_flags_on_host
from tokenpool_ops._primitives import segment_sum as generic_segment_sum
from tokenpool_ops._primitives import top_k as generic_top_k
from tokenpool_ops._primitives import weighted_means as generic_weighted_means
from tokenpool_ops._primitives import weighted_segment_sums as generic_weighted_segment_sums

from . import _torch_ops


def sq_distances(xp: Any, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Generic ``sq_distances`` with one fused ``baddbmm``; the peak is one (B, N, K) array.

    ``(|a|^2 + |b|^2) - 2 a.b`` in the generic order: an overflowed ``-2 a.b`` meets an
    infinite sum of norms and gives NaN, never a finite 0 after the clamp (_overflow).
    """
    sq_a = (a * a).sum(-1)
    sq_b = (b * b).sum(-1)
    dist = sq_a[:, :, None] + sq_b[:, None, :]
    return dist.baddbmm_(a, b.mT, alpha=-2).clamp_min_(0)


def self_sq_distances(xp: Any, a: torch.Tensor) -> torch.Tensor:
    """Generic ``self_sq_distances`` in place: the lower triangle mirrors the upper one."""
    dist = sq_distances(xp, a, a)
    rows, cols = torch.tril_indices(dist.shape[-1], dist.shape[-1], -1, device=dist.device)
    dist[:, rows, cols] = dist[:, cols, rows]
    dist.diagonal(dim1=-2, dim2=-1).zero_()
    return dist


def segment_sum(xp: Any, values: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Generic ``segment_sum`` by ``index_add_`` on CPU: O(N C) instead of O(N K C).

    On CUDA, ``index_add_`` adds with atomics in no fixed order, so results could differ from
    run to run in the last bits; there the deterministic generic matrix product is kept.
    """
    if values.device.type != "cpu":
        return generic_segment_sum(xp, values, labels, k)
    batch, n, channels = values.shape
    offsets = torch.arange(batch, device=labels.device)[:, None] * k
    rows = (labels + offsets).reshape(-1)
    out = values.new_zeros(batch * k, channels)
    out.index_add_(0, rows, values.reshape(batch * n, channels))
    return out.reshape(batch, k, channels)


def weighted_segment_sums(
    xp: Any, values: torch.Tensor, labels: torch.Tensor, k: int, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generic ``weighted_segment_sums`` from two ``index_add_`` on CPU (see segment_sum)."""
    if values.device.type != "cpu":
        return generic_weighted_segment_sums(xp, values, labels, k, weights)
    sums = segment_sum(xp, values * weights[:, :, None], labels, k)
    return sums, segment_sum(xp, weights[:, :, None], labels, k)[:, :, 0]


def weighted_means(
    xp: Any, values: torch.Tensor, labels: torch.Tensor, k: int, weights: torch.Tensor,
    empty: torch.Tensor,
) -> torch.Tensor:
    """Generic ``weighted_means`` on the ``index_add_`` segment sums above."""
    return generic_weighted_means(xp, values, labels, k, weights, empty,
                                  segment_sums=weighted_segment_sums)


def medoid_assignment(
    xp: Any, token_dist: torch.Tensor, medoids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generic ``medoid_assignment`` with an expanded gather and a K-entry scatter.

    The column gather reads through an expanded (not materialised) index, and the reductions
    run along the contiguous last axis; the self-assignment of medoids is a scatter of K
    entries instead of two masked passes over (B, N, K).
    """
    n = token_dist.shape[-1]
    to_medoids = torch.gather(token_dist, 2, medoids[:, None, :].expand(-1, n, -1))  # (B, N, K)
    nearest = torch.amin(to_medoids, dim=-1)  # a medoid is at distance 0 from itself
    labels = torch.argmin(to_medoids, dim=-1)  # the first index among equals, as documented
    problems = torch.arange(medoids.shape[0], device=medoids.device)[:, None]
    labels[problems, medoids] = torch.arange(medoids.shape[1], device=medoids.device)
    return labels, nearest


def gather_rows(xp: Any, values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Generic ``gather_rows`` with an expanded (not materialised) index."""
    return torch.gather(values, 1, index[:, :, None].expand(-1, -1, values.shape[-1]))


def all_finite(xp: Any, x: torch.Tensor) -> bool:
    """Generic ``all_finite`` from one ``aminmax`` pass (NaN propagates): 10x faster on CPU."""
    if x.numel() == 0:
        return True
    low, high = torch.aminmax(x)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def all_valid(xp: Any, values: torch.Tensor, nonnegative: bool) -> torch.Tensor | np.ndarray:
    """Generic ``all_valid`` from one ``aminmax`` pass (NaN propagates into both), instead
    of a boolean temporary per condition. Eager on the CPU, NumPy reads the tensor in place
    and the verdict is a NumPy 0-d boolean, already on the host: at B = 1 the three tensor
    operations and the read of a 0-d tensor cost twice the check (read_flags takes both)."""
    if values.numel() == 0:
        return generic_all_valid(xp, values, nonnegative)
    if values.dtype in _NUMPY_DTYPES and _eager(values):
        host = _host_array(values)  # NaN propagates into both reductions
        low, high = _MINIMUM(host, axis=None), _MAXIMUM(host, axis=None)
        # NumPy booleans combined without an array operation; the verdict a 0-d NumPy
        # boolean, on the host, as read_flags takes it.
        return np.asarray((low >= 0 if nonnegative else low > -math.inf) and high < math.inf)
    low, high = torch.aminmax(values)
    low_valid = low >= 0 if nonnegative else low > -math.inf
    return low_valid & (high < math.inf)


_MINIMUM, _MAXIMUM = np.minimum.reduce, np.maximum.reduce


def finite_sum(xp: Any, arrays: list[torch.Tensor]) -> torch.Tensor | np.ndarray:
    """Generic ``finite_sum``: the same sums (``torch.sum`` of each array), whose total is
    judged on the host where the arrays are (eager, on the CPU) without adding tensors.

    Where the sums are finite and their magnitudes add up to less than half the largest
    value of their dtype, no addition of them can overflow (each rounding grows a sum by a
    factor 1 + 2^-24 at most in float32): the total is finite, as the generic additions
    would find.
    Otherwise, the rare case, the generic total is formed and judged: the same verdict in
    every case. At B = 1 this halves the finite check of a result (two tensor additions and
    a reduction of the total fewer)."""
    sums = [torch.sum(values) for values in arrays]
    if _eager(*sums):
        magnitude, bound = 0.0, math.inf
        for summed in sums:
            magnitude += abs(summed.item())  # exact: a float32 or float64 as a Python float
            bound = min(bound, _HALF_MAX.get(summed.dtype, 0.0))
        if magnitude < bound:
            return np.asarray(True)
    total = sums[0]
    for summed in sums[1:]:
        total = total + summed
    return all_valid(xp, total, False)


#: Half the largest finite value of the dtypes whose sums finite_sum judges on the host.
_HALF_MAX = {dtype: torch.finfo(dtype).max / 2 for dtype in (torch.float32, torch.float64)}


#: The dtypes of the tensors NumPy can read in place (not bfloat16, which it lacks).
_NUMPY_DTYPES = frozenset({torch.float16, torch.float32, torch.float64, torch.uint8, torch.int8,
                           torch.int16, torch.int32, torch.int64, torch.bool})


def _on_the_host(value: torch.Tensor | np.ndarray) -> bool:
    """Whether a flag is in host memory: a CPU tensor, or a verdict NumPy made (all_valid)."""
    return isinstance(value, np.ndarray) or value.device.type == "cpu"


def read_flags(xp: Any, flags: list[torch.Tensor | np.ndarray],
               count: torch.Tensor | None) -> tuple[list[bool], int | None]:
    """Generic ``read_flags`` (one packed read) on a device; on the CPU, where reading costs
    no synchronisation, each value read as it is (``read_flags_on_host``)."""
    for value in flags if count is None else [*flags, count]:
        if not _on_the_host(value):
            return generic_read_flags(xp, flags, count)
    return read_flags_on_host(xp, flags, count)


# ---------------------------------------------------------------------------------------------
# The CUDA kernels (backends/cuda through backends._cupy), for CUDA tensors where CuPy is
# installed; independent of Numba.


def _needs_grad(*tensors: torch.Tensor) -> bool:
    if not torch.is_grad_enabled():
        return False
    for t in tensors:  # a loop: a generator costs a call per tensor (issue 23)
        if t.requires_grad:
            return True
    return False


def _on_cuda(tensor: torch.Tensor) -> bool:
    # The one test of the CUDA branches: the CPU tests substitute it to route CPU tensors
    # through them, into the host build of the kernels.
    return tensor.device.type == "cuda"


#: Whether CuPy can be imported: decided once, so that a traced call decides without an import.
CUPY_INSTALLED = importlib.util.find_spec("cupy") is not None


def _kernel_op_traced() -> bool:
    """Whether a traced call (torch.compile, torch.export) takes the CUDA kernels, as custom
    operators: with CuPy installed. Without it the PyTorch code is traced."""
    return CUPY_INSTALLED


def cuda_kmedoids(xp: Any, x: torch.Tensor, mean: torch.Tensor, init: torch.Tensor,
                  weights: torch.Tensor, max_iter: int, stop_early: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any] | None:
    """``Primitives.kmedoids`` by the CUDA kernel (``_cupy.torch_kmedoids``); None (the
    PyTorch code runs) off CUDA and where the kernel declines. Labels and medoids have no
    gradient. Traced, the kernel is the operator ``_torch_ops.kmedoids`` (which runs the
    PyTorch code itself where the kernel declines)."""
    if not _on_cuda(x):
        return None
    if torch.compiler.is_compiling():
        if not _kernel_op_traced():
            return None
        labels, medoids, history, _ = _torch_ops.kmedoids(x, mean, init, weights, max_iter,
                                                          stop_early)
        return labels, medoids, history, max_iter  # traced: never stop_early
    from . import _cupy

    return _cupy.torch_kmedoids(x, mean, init, weights, max_iter, stop_early)


def cuda_weighted_means(values: torch.Tensor, labels: torch.Tensor, k: int,
                        weights: torch.Tensor, empty: torch.Tensor) -> torch.Tensor | None:
    """The merge kernel's weighted means for CUDA tensors (``_cupy.torch_weighted_means``):
    O(N M) per problem, no (B, K, N) one-hot. None (the PyTorch code runs) off CUDA, where
    the kernel declines, and where the means need gradients: the kernel has no backward,
    and ``tokenpool_ops.nn.merge`` differentiates through the PyTorch code. Traced, the
    operator ``_torch_ops.weighted_means`` (for one dtype and one ``empty`` row per problem,
    where the kernel applies).
    """
    if not _on_cuda(values) or _needs_grad(values, weights, empty):
        return None
    if torch.compiler.is_compiling():
        same_dtype = values.dtype == weights.dtype == empty.dtype
        if not (_kernel_op_traced() and same_dtype and empty.shape[1] == 1):
            return None
        return _torch_ops.weighted_means(values, labels, k, weights, empty)
    from . import _cupy

    return _cupy.torch_weighted_means(values, labels, k, weights, empty)


def fused_weighted_means(xp: Any, values: torch.Tensor, labels: torch.Tensor, k: int,
                         weights: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    """``weighted_means`` by the merge kernel where it applies (:func:`cuda_weighted_means`),
    else the ``index_add_`` version above."""
    fused = cuda_weighted_means(values, labels, k, weights, empty)
    return fused if fused is not None else weighted_means(xp, values, labels, k, weights, empty)


def cuda_merge(xp: Any, x: torch.Tensor, mean: torch.Tensor, labels: torch.Tensor, k: int,
               weights: torch.Tensor, fallback: torch.Tensor | None, carried: torch.Tensor,
               with_objective: bool) -> tuple[torch.Tensor, torch.Tensor, Any] | None:
    """``Primitives.merge`` by the merge kernel (``_cupy.torch_merge``); None (the PyTorch
    code runs) off CUDA, where the kernel declines and where gradients are needed. Traced,
    the operator ``_torch_ops.merge`` (with CuPy installed; it runs the PyTorch code itself
    where the kernel declines)."""
    given = [t for t in (x, mean, weights, fallback, carried) if t is not None]
    if not _on_cuda(x) or _needs_grad(*given):
        # On the host the Numba means and the PyTorch sums are as lean.
        return None
    if torch.compiler.is_compiling():
        if not _kernel_op_traced():
            return None
        tokens, sizes, objective = _torch_ops.merge(x, mean, labels, k, weights, fallback,
                                                    carried, with_objective)
        return tokens, sizes, objective if with_objective else None
    from . import _cupy

    return _cupy.torch_merge(x, mean, labels, k, weights, fallback, carried, with_objective)


FAST_PATHS: dict[str, Callable[..., Any]] = {
    "sq_distances": sq_distances,
    "self_sq_distances": self_sq_distances,
    "segment_sum": segment_sum,
    "weighted_segment_sums": weighted_segment_sums,
    "weighted_means": fused_weighted_means,
    "medoid_assignment": medoid_assignment,
    "all_finite": all_finite,
    "all_valid": all_valid,
    "finite_sum": finite_sum,
    "gather_rows": gather_rows,
    "read_flags": read_flags,
    "kmedoids": cuda_kmedoids,
    "merge": cuda_merge,
}


# ---------------------------------------------------------------------------------------------
# Compiled kernels (Numba), used when Numba is installed, for CPU tensors


def _on_host(*tensors: torch.Tensor) -> bool:
    """Whether the Numba kernels may take these tensors: on the CPU (traced too: they are
    the custom operators of ``_torch_ops``)."""
    for t in tensors:  # a loop: a generator costs a call per tensor (issue 23)
        if t.device.type != "cpu":
            return False
    return True


#: Bytes of centred tokens per block in the medoid Gram product (see backends._numpy).
BLOCK_BYTES = 2 << 20


def _bmm_transposed(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
    # PyTorch's own BLAS on NumPy views of host memory: no copies.
    torch.bmm(torch.from_numpy(a), torch.from_numpy(b).mT, out=torch.from_numpy(out))


def _of_dtype(dtype: torch.dtype, tensors: tuple[torch.Tensor, ...]) -> bool:
    """Whether every tensor has ``dtype`` (a loop: see _on_host)."""
    for t in tensors:
        if t.dtype != dtype:
            return False
    return True


def _host_arrays(*tensors: torch.Tensor) -> list[np.ndarray]:
    """NumPy views of CPU tensors (copies only of non-contiguous ones), for the kernels."""
    return [_host_array(t) for t in tensors]


def _host_array(t: torch.Tensor) -> np.ndarray:
    """A NumPy view of one CPU tensor (a copy if it is not contiguous); detached only where
    it needs to be (each detach is a new tensor object, and a pool call makes a dozen)."""
    return (t.detach() if t.requires_grad else t).contiguous().numpy()


def _eager(*tensors: torch.Tensor) -> bool:
    """Whether a host kernel may run on these tensors directly, without its custom operator:
    untraced and on the CPU. The operator's dispatch (autograd redispatch, dynamo's guard
    around the implementation) cost about 0.1 ms per call on this machine, a third of one
    Gram matrix of a B = 1 pool call; it is needed only where the call is traced."""
    return not torch.compiler.is_compiling() and _on_host(*tensors)


def numba_kmedoids(x: torch.Tensor, mean: torch.Tensor, init: torch.Tensor,
                   weights: torch.Tensor, max_iter: int, stop_early: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The Numba K-Medoids (``_numba.medoid_gram`` and ``_numba.kmedoids``) of CPU tensors,
    on NumPy views of them: labels, medoids, the history (B, T + 1) and T, the most
    iterations any problem ran (``max_iter`` without ``stop_early``). The one door to the
    kernel of eager calls (:func:`compiled_paths`) and of the operator ``_torch_ops.kmedoids``."""
    from . import _numba

    x_host, mean_host, init_host, weights_host = _host_arrays(x, mean, init, weights)
    gram = _numba.medoid_gram(x_host, mean_host, init_host, BLOCK_BYTES, _bmm_transposed)
    labels, medoids, history, n_iter = _numba.kmedoids(
        x_host, mean_host, gram, init_host, weights_host, max_iter, stop_early, True)
    return torch.from_numpy(labels), torch.from_numpy(medoids), torch.from_numpy(history), n_iter


def numba_kmeans(x: torch.Tensor, mean: torch.Tensor, init: torch.Tensor,
                 weights: torch.Tensor, fallback: torch.Tensor | None, max_iter: int,
                 stop_early: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The Numba K-Means (``_numba.centred_gram`` and ``_numba.kmeans``) of CPU tensors:
    centres, labels, history and T as :func:`numba_kmedoids`, for eager calls and the
    operator ``_torch_ops.kmeans``."""
    from . import _numba

    x_host, mean_host, init_host, weights_host = _host_arrays(x, mean, init, weights)
    gram = _numba.centred_gram(x_host, mean_host, BLOCK_BYTES, _bmm_transposed)
    centres, labels, history, n_iter = _numba.kmeans(
        x_host, mean_host, gram, init_host, weights_host,
        None if fallback is None else _host_array(fallback), max_iter, stop_early, True)
    return torch.from_numpy(centres), torch.from_numpy(labels), torch.from_numpy(history), n_iter


def numba_weighted_means(values: torch.Tensor, labels: torch.Tensor, k: int,
                         weights: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    """The Numba weighted means (``_numba.weighted_means``) of CPU tensors of one dtype, for
    eager calls and the operator ``_torch_ops.weighted_means``."""
    from . import _numba

    values_host, labels_host, weights_host, empty_host = _host_arrays(values, labels, weights,
                                                                      empty)
    return torch.from_numpy(_numba.weighted_means(values_host, labels_host, k, weights_host,
                                                  empty_host, True))


def compiled_paths() -> dict[str, Callable[..., Any]]:
    """The Numba kernels for CPU tensors (ImportError without Numba), over :data:`FAST_PATHS`.

    Traced, each is a custom operator (``backends._torch_ops``); eager calls run the same
    kernels on NumPy views of the tensors, without the operator's dispatch. Parallel
    kernels: PyTorch's OpenMP threads go idle quickly after each operation, so Numba's
    threads can have the cores. Tensors elsewhere than on the CPU, or whose means need
    gradients, take what :data:`FAST_PATHS` gives them: the CUDA kernels for CUDA tensors
    where CuPy is installed, else the PyTorch code. The iteration count comes back unread
    (a 0-d tensor) from the operators where ``stop_early`` asks for it: the core reads it
    with its value checks.
    """
    from . import _numba

    def kmedoids(xp: Any, x: torch.Tensor, mean: torch.Tensor, init: torch.Tensor,
                 weights: torch.Tensor, max_iter: int, stop_early: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any] | None:
        if _on_cuda(x):
            return cuda_kmedoids(xp, x, mean, init, weights, max_iter, stop_early)
        if not _on_host(x, mean, init, weights):
            return None
        if _eager(x):  # assignments and medoids have no gradient: detached views
            return numba_kmedoids(x, mean, init, weights, max_iter, stop_early)
        labels, medoids, history, count = _torch_ops.kmedoids(
            x.detach(), mean.detach(), init, weights.detach(), max_iter, stop_early)
        return labels, medoids, history, count if stop_early else max_iter

    def kmeans(xp: Any, x: torch.Tensor, mean: torch.Tensor, init: torch.Tensor,
               weights: torch.Tensor, fallback: torch.Tensor | None, max_iter: int,
               stop_early: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any] | None:
        given = [t for t in (x, mean, init, weights, fallback) if t is not None]
        if not _on_host(*given) or _needs_grad(*given):
            return None  # the centres of kmeans() carry gradients on the PyTorch path
        if _eager(x):
            return numba_kmeans(x, mean, init, weights, fallback, max_iter, stop_early)
        centres, labels, history, count = _torch_ops.kmeans(
            x, mean, init, weights, fallback, max_iter, stop_early)
        return centres, labels, history, count if stop_early else max_iter

    def compiled_weighted_means(xp: Any, values: torch.Tensor, labels: torch.Tensor, k: int,
                                weights: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
        if (_on_cuda(values) or not _on_host(values, labels, weights, empty)
                or _needs_grad(values, weights, empty)
                or not values.dtype == weights.dtype == empty.dtype):
            return fused_weighted_means(xp, values, labels, k, weights, empty)
        if _eager(values):
            return numba_weighted_means(values, labels, k, weights, empty)
        return _torch_ops.weighted_means(values, labels, k, weights, empty)

    def host_merge(xp: Any, x: torch.Tensor, mean: torch.Tensor, labels: torch.Tensor, k: int,
                   weights: torch.Tensor, fallback: torch.Tensor | None,
                   carried: torch.Tensor, with_objective: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, Any] | None:
        """``Primitives.merge`` in one Numba pass (``_numba.merge``): the tokens and sizes,
        the same bit for bit as the weights, means and sums of the PyTorch code with the
        kernel's means. CUDA tensors take :func:`cuda_merge`; None (the PyTorch code runs)
        where the objective is asked for, gradients are needed, dtypes differ or the call is
        traced (there the means are the weighted_means operator)."""
        if _on_cuda(x):
            return cuda_merge(xp, x, mean, labels, k, weights, fallback, carried,
                              with_objective)
        given = [t for t in (x, mean, weights, fallback, carried) if t is not None]
        if (with_objective or not _eager(labels, *given) or _needs_grad(*given)
                or any(t.dtype != x.dtype for t in given)):
            return None
        fallback_host = None if fallback is None else _host_array(fallback)
        x_host, labels_host, weights_host, carried_host, mean_host = _host_arrays(
            x, labels, weights, carried, mean)
        tokens, sizes = _numba.merge(x_host, labels_host, k, weights_host, fallback_host,
                                     carried_host, mean_host, True)
        return torch.from_numpy(tokens), torch.from_numpy(sizes), None

    def host_kmedoids_merge(xp: Any, x: torch.Tensor, mean: torch.Tensor, init: torch.Tensor,
                            weights: torch.Tensor, fallback: torch.Tensor | None,
                            carried: torch.Tensor, max_iter: int, stop_early: bool
                            ) -> tuple[Any, ...] | None:
        """``Primitives.kmedoids_merge``: ``kmedoids`` then ``host_merge`` in one Numba
        kernel (``_numba.kmedoids_merge``), eagerly on the CPU only; None wherever
        ``host_merge`` would not apply (then both run), CUDA tensors included (their two
        launches are ``kmedoids`` and ``host_merge``'s ``cuda_merge``)."""
        given = (x, mean, weights, carried) if fallback is None else (
            x, mean, weights, fallback, carried)
        if (_on_cuda(x) or not _eager(init, *given) or _needs_grad(*given)
                or not _of_dtype(x.dtype, given)):
            return None
        fallback_host = None if fallback is None else _host_array(fallback)
        x_host, mean_host, init_host, weights_host, carried_host = _host_arrays(
            x, mean, init, weights, carried)
        gram = _numba.medoid_gram(x_host, mean_host, init_host, BLOCK_BYTES, _bmm_transposed)
        labels, medoids, history, n_iter, tokens, sizes = _numba.kmedoids_merge(
            x_host, mean_host, gram, init_host, weights_host, fallback_host, carried_host,
            max_iter, stop_early, True)
        return (torch.from_numpy(labels), torch.from_numpy(medoids), torch.from_numpy(history),
                n_iter, torch.from_numpy(tokens), torch.from_numpy(sizes))

    def host_top_k(xp: Any, keys: torch.Tensor, k: int) -> torch.Tensor:
        """``Primitives.top_k`` by selection (``_numba.top_k``) for eager float32 and
        float64 keys on the CPU without NaN; the generic sort otherwise (traced calls too).
        The same indices."""
        if _eager(keys) and keys.dtype in (torch.float32, torch.float64):
            chosen = _numba.top_k(_host_array(keys), k)
            if chosen is not None:
                return torch.from_numpy(chosen)
        return generic_top_k(xp, keys, k)

    return {"kmedoids": kmedoids, "kmeans": kmeans, "weighted_means": compiled_weighted_means,
            "merge": host_merge, "kmedoids_merge": host_kmedoids_merge, "top_k": host_top_k}


# Which kernels are at hand (numba_available, _compiled_paths), settled as this module is
# imported, which every PyTorch route does before it asks, and which runs for real even from
# inside a trace. Traced code asks (plan_applies, primitives_for), and these two answers are
# memoised: asked first inside a trace, the memo filled after it and failed the compiled
# code's guards, so a model compiled before any eager call compiled again at its second call
# (the other memos are not read by traced code: _compat.torch_compiling).
from . import _compiled_paths  # noqa: E402

_compiled_paths("torch")
