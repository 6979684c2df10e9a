"""The fused kernels of PyTorch's fast paths as PyTorch custom operators.

``torch.ops.tokenpool_ops.kmedoids``, ``.kmeans`` and ``.weighted_means`` run the Numba
kernels on CPU tensors and the CUDA kernels (through ``backends._cupy``) on CUDA tensors.
As custom operators (``torch.library.custom_op``) with fake implementations, each is one
opaque node to dynamo, AOTAutograd, inductor, ``torch.export`` and CUDA graphs: a compiled
model calls the kernel instead of breaking its graph or tracing the generic loop.

Their results never depend on the data for their shapes, so that they can be traced: the
objective history always has ``max_iter + 1`` entries (a problem that reached its fixed
point repeats its final value, as the kernels write it) and the most iterations any problem
ran comes back as a 0-d int64 tensor, which the core reads with its value checks (eager,
``stop_early``) or not at all (traced: ``max_iter`` iterations, see ``_validation.host_reads``).

The operators pass their inputs on as given (detached): each route lays them out as it reads
them. The CUDA glue reads tokens whose problems are each contiguous where they are, among
them a block's patch tokens, a view past its prefix tokens (``_cupy.problems_contiguous``);
the Numba kernels' NumPy views copy what is not contiguous; the PyTorch code takes any
layout.

Where a kernel does not cover a call (the CUDA kernel declines some shapes; Numba or CuPy
missing at run time) the operator runs the PyTorch code of the generic loop instead, with
the same results. Nothing here has a backward: callers pass no tensor that needs gradients
(``backends._torch`` keeps those on the PyTorch path).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

#: The namespace of the operators: ``torch.ops.tokenpool_ops``.
NAMESPACE = "tokenpool_ops"


def _plain_primitives() -> Any:
    """PyTorch's primitives without the fused kernels: the fallback of every operator."""
    import array_api_compat.torch as xp

    from tokenpool_ops._primitives import Primitives

    from . import _torch

    return Primitives(xp, sq_distances=_torch.sq_distances,
                      self_sq_distances=_torch.self_sq_distances,
                      segment_sum=_torch.segment_sum,
                      weighted_segment_sums=_torch.weighted_segment_sums,
                      weighted_means=_torch.weighted_means,
                      medoid_assignment=_torch.medoid_assignment,
                      gather_rows=_torch.gather_rows, name="torch")


def _full_history(history: Tensor, n_iter: Any, max_iter: int) -> tuple[Tensor, Tensor]:
    """``history`` with ``max_iter + 1`` columns (the last one repeated, as a converged
    problem repeats its value) and the iteration count as a 0-d int64 tensor."""
    missing = max_iter + 1 - history.shape[1]
    if missing > 0 and history.shape[1] > 0:
        history = torch.cat([history, history[:, -1:].expand(-1, missing)], dim=1)
    elif missing > 0:  # no column to repeat: only a batch of no problem has none
        history = history.new_zeros(history.shape[0], max_iter + 1)
    count = torch.as_tensor(n_iter, dtype=torch.int64, device=history.device).reshape(())
    return history.contiguous(), count


def _on_cuda(x: Tensor) -> bool:
    from . import _torch

    return _torch._on_cuda(x)  # looked up at call time: the CPU tests substitute it


# ---------------------------------------------------------------------------------------------
# K-Medoids


@torch.library.custom_op(f"{NAMESPACE}::kmedoids", mutates_args=())
def kmedoids(x: Tensor, mean: Tensor, init: Tensor, weights: Tensor, max_iter: int,
             stop_early: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """K-Medoids of tokens ``x`` (B, N, M), each problem's mean ``mean`` (B, 1, M), from the
    medoids ``init`` (B, K) with token weights ``weights`` (B, N).

    Returns labels (B, N) and medoids (B, K) in ``init``'s dtype, the objective history
    (B, max_iter + 1) in ``x``'s dtype and the most iterations any problem ran (0-d int64;
    ``max_iter`` without ``stop_early``). ``stop_early`` lets the PyTorch fallback read its
    convergence on the host (eager only); the kernels stop each problem at its fixed point
    either way.
    """
    # As given, detached: each route lays its inputs out (see the module docstring).
    x, mean, init, weights = (t.detach() for t in (x, mean, init, weights))
    fused = _cuda_kmedoids(x, mean, init, weights, max_iter) if _on_cuda(x) else (
        _numba_kmedoids(x, mean, init, weights, max_iter, stop_early))
    if fused is None:
        from tokenpool_ops._clustering import run_kmedoids

        prims = _plain_primitives()
        flat = run_kmedoids(prims, prims.self_sq_distances(prims.xp, x - mean), init, weights,
                            max_iter, stop_early)
        fused = (flat.assignment, flat.medoids, flat.history, flat.n_iter)
    labels, medoids, history, n_iter = fused
    history, count = _full_history(history.to(x.dtype), n_iter, max_iter)
    return labels.to(init.dtype), medoids.to(init.dtype), history, count


@kmedoids.register_fake
def _(x: Tensor, mean: Tensor, init: Tensor, weights: Tensor, max_iter: int,
      stop_early: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    batch, n = x.shape[:2]
    return (init.new_empty(batch, n), init.new_empty(init.shape),
            x.new_empty(batch, max_iter + 1), x.new_empty((), dtype=torch.int64))


def _cuda_kmedoids(x: Tensor, mean: Tensor, init: Tensor, weights: Tensor,
                   max_iter: int) -> tuple[Tensor, Tensor, Tensor, Any] | None:
    from . import _cupy

    return _cupy.torch_kmedoids(x, mean, init, weights, max_iter, True)


def _numba_kmedoids(x: Tensor, mean: Tensor, init: Tensor, weights: Tensor, max_iter: int,
                    stop_early: bool) -> tuple[Any, Any, Any, int] | None:
    if x.device.type != "cpu" or not _numba_available():
        return None
    from . import _torch

    return _torch.numba_kmedoids(x, mean, init, weights, max_iter, stop_early)


# ---------------------------------------------------------------------------------------------
# K-Means


@torch.library.custom_op(f"{NAMESPACE}::kmeans", mutates_args=())
def kmeans(x: Tensor, mean: Tensor, init: Tensor, weights: Tensor, fallback: Tensor | None,
           max_iter: int, stop_early: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """K-Means of tokens ``x`` (B, N, M) from the tokens ``init`` (B, K) as centres, weights
    ``weights`` and zero-weight ``fallback`` (B, N) as ``_clustering.run_kmeans``.

    Returns the centres (B, K, M) in the centred frame, in ``x``'s dtype, labels (B, N) in
    ``init``'s dtype, the history and the iteration count as :func:`kmedoids`.
    """
    # As given, detached: each route lays its inputs out (see the module docstring).
    x, mean, init, weights = (t.detach() for t in (x, mean, init, weights))
    fallback = None if fallback is None else fallback.detach()
    fused = None if _on_cuda(x) else _numba_kmeans(x, mean, init, weights, fallback, max_iter,
                                                         stop_early)
    if fused is None:
        from tokenpool_ops._clustering import run_kmeans

        flat = run_kmeans(_plain_primitives(), x - mean, init, weights, fallback, max_iter,
                          stop_early)
        fused = (flat.centres, flat.assignment, flat.history, flat.n_iter)
    centres, labels, history, n_iter = fused
    history, count = _full_history(history.to(x.dtype), n_iter, max_iter)
    return centres.to(x.dtype), labels.to(init.dtype), history, count


@kmeans.register_fake
def _(x: Tensor, mean: Tensor, init: Tensor, weights: Tensor, fallback: Tensor | None,
      max_iter: int, stop_early: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    batch, n, m = x.shape
    return (x.new_empty(batch, init.shape[1], m), init.new_empty(batch, n),
            x.new_empty(batch, max_iter + 1), x.new_empty((), dtype=torch.int64))


def _numba_kmeans(x: Tensor, mean: Tensor, init: Tensor, weights: Tensor,
                  fallback: Tensor | None, max_iter: int, stop_early: bool
                  ) -> tuple[Any, Any, Any, int] | None:
    if x.device.type != "cpu" or not _numba_available():
        return None
    from . import _torch

    return _torch.numba_kmeans(x, mean, init, weights, fallback, max_iter, stop_early)


# ---------------------------------------------------------------------------------------------
# Weighted means (Algorithm 1, line 6, without gradients)


@torch.library.custom_op(f"{NAMESPACE}::weighted_means", mutates_args=())
def weighted_means(values: Tensor, labels: Tensor, k: int, weights: Tensor,
                   empty: Tensor) -> Tensor:
    """``sum_i w_i values_i / sum_i w_i`` per label (B, k, C), ``empty`` (B, 1, C) or
    (B, k, C) where the weights sum to zero; ``values``, ``weights`` and ``empty`` share
    one dtype, which the result has."""
    values, labels, weights, empty = (t.detach()  # as given: see the module docstring
                                      for t in (values, labels, weights, empty))
    fused = None
    if _on_cuda(values):
        from . import _cupy

        fused = _cupy.torch_weighted_means(values, labels, k, weights, empty)
    elif values.device.type == "cpu" and _numba_available():
        from . import _torch

        fused = _torch.numba_weighted_means(values, labels, k, weights, empty)
    if fused is None:
        import array_api_compat.torch as xp

        from . import _torch

        fused = _torch.weighted_means(xp, values, labels, k, weights, empty)
    return fused.to(values.dtype)


@weighted_means.register_fake
def _(values: Tensor, labels: Tensor, k: int, weights: Tensor, empty: Tensor) -> Tensor:
    return values.new_empty(values.shape[0], k, values.shape[2])


def _numba_available() -> bool:
    from . import numba_available

    return numba_available()


# ---------------------------------------------------------------------------------------------
# The merge (Algorithm 1, line 6, without gradients): the CUDA merge kernel


@torch.library.custom_op(f"{NAMESPACE}::merge", mutates_args=())
def merge(x: Tensor, mean: Tensor, labels: Tensor, k: int, weights: Tensor,
          fallback: Tensor | None, carried: Tensor, with_objective: bool
          ) -> tuple[Tensor, Tensor, Tensor]:
    """``Primitives.merge`` (``_merge.merge_clusters``): of tokens ``x`` (B, N, M) in
    the compute dtype, with their mean (B, 1, M) for an empty cluster, the weighted means
    (B, k, M), the summed ``carried`` sizes (B, k) and, ``with_objective``, Eq. 13 of the
    means (B,); without it an empty (0,) tensor. All in ``x``'s dtype.

    The merge kernel on CUDA tensors (``_cupy.torch_merge``); where it declines, and on
    other devices, the PyTorch code of ``_pool._merge``, with the same results.
    """
    x, mean, labels, weights, carried = (t.detach()  # as given: see the module docstring
                                         for t in (x, mean, labels, weights, carried))
    fallback = None if fallback is None else fallback.detach()
    fused = None
    if _on_cuda(x):
        from . import _cupy

        fused = _cupy.torch_merge(x, mean, labels, k, weights, fallback, carried,
                                  with_objective)
    if fused is None:
        fused = _plain_merge(x, mean, labels, k, weights, fallback, carried, with_objective)
    tokens, sizes, objective = fused
    if objective is None:
        objective = x.new_empty(0)
    return tokens.to(x.dtype), sizes.to(x.dtype), objective.to(x.dtype)


@merge.register_fake
def _(x: Tensor, mean: Tensor, labels: Tensor, k: int, weights: Tensor,
      fallback: Tensor | None, carried: Tensor, with_objective: bool
      ) -> tuple[Tensor, Tensor, Tensor]:
    batch, _, m = x.shape
    return (x.new_empty(batch, k, m), x.new_empty(batch, k),
            x.new_empty(batch if with_objective else 0))


def _plain_merge(x: Tensor, mean: Tensor, labels: Tensor, k: int, weights: Tensor,
                 fallback: Tensor | None, carried: Tensor, with_objective: bool
                 ) -> tuple[Tensor, Tensor, Tensor | None]:
    """``_pool._merge`` by PyTorch's primitives, an empty cluster taking the mean token."""
    from tokenpool_ops._clustering import (
        effective_weights,
        reconstruction_objective,
        weighted_means,
    )

    prims = _plain_primitives()
    token_weights = effective_weights(prims, labels, k, weights, fallback)
    tokens = weighted_means(prims, x, labels, k, token_weights, mean)
    sizes = prims.segment_sum(prims.xp, carried[:, :, None], labels, k)[:, :, 0]
    objective = (reconstruction_objective(prims, x, mean, tokens, weights)
                 if with_objective else None)
    return tokens, sizes, objective


# ---------------------------------------------------------------------------------------------
# A block's whole pooling plan (clustering or selection, and the merge), for traced models


def plan_fields(method: str, k: int, lean: bool) -> tuple[bool, bool]:
    """Whether the plan of ``method`` keeping ``k`` tokens has an assignment and medoids
    (``tokenpool_ops.nn.plan``: a lean selection has no assignment, K-Means and 'tome' no
    medoids, and no plan of zero tokens has medoids)."""
    from tokenpool_ops._methods import SELECTION_METHODS

    has_assignment = not (lean and method in SELECTION_METHODS and k > 0)
    has_medoids = k > 0 and method not in ("kmeans", "wkmeans", "tome")
    return has_assignment, has_medoids


@torch.library.custom_op(f"{NAMESPACE}::plan", mutates_args=())
def plan(x: Tensor, k: int, method: str, scores: Tensor | None, sizes: Tensor | None,
         metric: Tensor | None, lean: bool, init: str | None, max_iter: int, seed: int,
         fast_paths: bool, num_prefix: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``tokenpool_ops.nn.plan`` of the tokens of ``x`` (..., P + N, M) after its first
    ``num_prefix`` = P (the model's class and register tokens, which stay as they are) to
    ``0 <= k < N``, values unchecked and ``stop_early=False`` (as traced code runs it: no
    host read, so the operator can sit in a CUDA graph; the kernels stop each problem at its
    fixed point anyway). ``scores``, ``sizes`` and ``metric`` are the N tokens' own.

    Returns the new sequence (..., P + k, M): the prefix, then the pooled tokens, in ``x``'s
    dtype; the sizes (..., k) in the compute dtype, the assignment (..., N) and the medoids
    (..., k) as indices; an assignment or medoids the plan does not have (:func:`plan_fields`)
    come back with a last axis of length 0.
    """
    from tokenpool_ops.nn import plan as run_plan

    result = run_plan(x[..., num_prefix:, :], k, method,  # type: ignore[arg-type]
                      scores=scores, sizes=sizes, metric=metric, lean=lean, init=init,
                      max_iter=max_iter, seed=seed, check_values=False, stop_early=False,
                      fast_paths=fast_paths)

    def absent() -> Tensor:
        return x.new_empty((*x.shape[:-2], 0), dtype=torch.int64)

    # A new tensor, never a view of x (no output may alias an input).
    sequence = torch.cat([x[..., :num_prefix, :], result.tokens], dim=-2)
    assignment = absent() if result.assignment is None else result.assignment
    medoids = absent() if result.medoids is None else result.medoids
    return sequence, result.sizes, assignment, medoids


@plan.register_fake
def _(x: Tensor, k: int, method: str, scores: Tensor | None, sizes: Tensor | None,
      metric: Tensor | None, lean: bool, init: str | None, max_iter: int, seed: int,
      fast_paths: bool, num_prefix: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    lead, (total, m) = x.shape[:-2], x.shape[-2:]
    has_assignment, has_medoids = plan_fields(method, k, lean)
    work = torch.float32 if torch.finfo(x.dtype).bits < 32 else x.dtype  # _compat.compute_dtype
    length = _sequence_size(num_prefix, k, x.device.type)
    kept = length - num_prefix
    return (x.new_empty(*lead, length, m), x.new_empty(*lead, kept, dtype=work),
            x.new_empty(*lead, total - num_prefix if has_assignment else 0, dtype=torch.int64),
            x.new_empty(*lead, kept if has_medoids else 0, dtype=torch.int64))


def _sequence_size(num_prefix: int, k: int, device_type: str) -> Any:
    """The length of a traced plan's new sequence, ``num_prefix + k``: on the CPU a size the
    tracer knows only by its range [num_prefix + 1, num_prefix + k] where it allows such
    sizes (``fullgraph=True``, export; torch 2.8 or later), else the number. On CUDA always
    the number: inductor's Triton code generation (torch 2.11, on an H200) failed on such
    sizes ("Cannot convert symbols to int" while tiling a split softmax reduction).

    Why: a traced model's blocks after pooling then have symbolic token counts, so that
    inductor compiles their layer norms, GELU and residual adds once for all of them
    instead of once for every block's own count. Why one size for the whole sequence (not
    the prefix plus a size for the pooled tokens): inductor reads the linear layers' input
    (B, 1 + u, C) as (B + B u, C) without a copy only where it can prove the two agree, which
    it cannot for a sum of sizes; with one size u it reshapes (B, u, C) to (B u, C) as a view
    (measured: a copy of every MLP's hidden activations per block, 1.6 % of a DeiT-S pass).
    The operator returns exactly ``num_prefix + k`` tokens, within the range.
    """
    from tokenpool_ops.nn import SYMBOLIC_SIZES

    if k == 0 or not SYMBOLIC_SIZES or device_type != "cpu":
        return num_prefix + k
    try:
        return torch.library.get_ctx().new_dynamic_size(min=num_prefix + 1,
                                                         max=num_prefix + k)
    except torch._subclasses.fake_tensor.DynamicOutputShapeException:
        return num_prefix + k


def plan_applies(x: Tensor, init: object, fast_paths: bool) -> bool:
    """Whether a traced model (``torch.compile``, ``torch.export``) takes a block's plan as
    the one operator :func:`plan`: where the fused kernels serve ``x``'s device (Numba for
    CPU tensors, the CUDA kernels with CuPy for CUDA tensors), with the fast paths on and a
    named ``init``. Elsewhere the plan's PyTorch code is traced.

    Why one operator: the plan's PyTorch code around the kernels (flattening, initial
    centres, weights, merge, sizes) is hundreds of graph nodes per block, which inductor
    compiles for every block anew (each block has its own token count); as one operator the
    block's pooling costs the compiler nothing, and the kernels run as they do eagerly.
    """
    from . import _compiled_paths, _torch

    if not (torch.compiler.is_compiling() and fast_paths and (init is None or
                                                              isinstance(init, str))):
        return False
    if _torch._on_cuda(x):
        return _torch._kernel_op_traced()
    return x.device.type == "cpu" and bool(_compiled_paths("torch"))


# ---------------------------------------------------------------------------------------------
# Attention with Eq. 5 scores from the materialised probabilities (a traced block's inference)


@torch.library.custom_op(f"{NAMESPACE}::attention_with_scores", mutates_args=())
def attention_with_scores(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float,
                          num_prefix: int) -> tuple[Tensor, Tensor]:
    """``softmax(scale q k^T + bias) v`` with the heads merged, (B, N, H, D) contiguous (the
    layout the block's projection reads: no copy after the operator), and the Eq. 5 scores
    of the keys after the ``num_prefix`` first (B, N - num_prefix), from the attention
    probabilities, a few batch elements at a time, as a patched block computes them eagerly
    on the CPU (``tokenpool_ops._patching.attention_with_scores``). No autograd: for
    inference."""
    from tokenpool_ops._patching import attention_with_scores as materialised

    out, scores = materialised(q, k, v, bias, scale, num_prefix)
    return out.contiguous(), scores


@attention_with_scores.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float,
      num_prefix: int) -> tuple[Tensor, Tensor]:
    batch, heads, n = q.shape[:3]
    return (q.new_empty(batch, n, heads, v.shape[-1]),
            q.new_empty(batch, k.shape[-2] - num_prefix))
