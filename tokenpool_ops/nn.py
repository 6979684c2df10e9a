"""Token Pooling as a PyTorch module: the clustering decides, a differentiable merge applies.

The expensive part, :func:`tokenpool_ops.pool`, runs once without autograd and in float32
(autocast is switched off around it, so its distances are never computed in half precision);
it yields a plan: which output token each input token goes to. :func:`merge` then applies the
plan to the live tensor with ``scatter_add``, so gradients reach the input tokens (and the
scores, which weigh the cluster means) exactly as through Algorithm 1, line 6.

>>> import torch
>>> from tokenpool_ops.nn import TokenPooling
>>> x = torch.randn(2, 10, 4, requires_grad=True)
>>> y = TokenPooling(3, "kmedoids")(x)
>>> y.shape
torch.Size([2, 3, 4])
>>> y.sum().backward(); x.grad.shape
torch.Size([2, 10, 4])
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, TypedDict, cast

import torch
from torch import Tensor, nn

from ._clustering import effective_weights, weighted_means
from ._compat import array_namespace
from ._merge import token_weights
from ._methods import WEIGHTED_METHODS
from ._pool import DEFAULT_MAX_ITER, MERGING_METHODS, Init, Method, PoolResult, pool_result

# _torch_ops registers torch.ops.tokenpool_ops: a saved exported program of a patched model
# loads once this module is imported.
from .backends import _torch_ops, primitives_for  # noqa: F401

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack needs Python 3.11

__all__ = ["TokenPooling", "merge", "plan", "pool_with_grad"]


try:  # torch >= 2.8
    from torch.fx.experimental.symbolic_shapes import guard_or_false

    #: Whether traced plans may give symbolic kept-token sizes (backends._torch_ops).
    SYMBOLIC_SIZES = True
except ImportError:  # older torch: traced sizes stay fixed, so conditions are plain bools
    SYMBOLIC_SIZES = False

    def guard_or_false(a: bool) -> bool:  # type: ignore[misc]
        return bool(a)


class PoolOptions(TypedDict, total=False):
    """The keyword options of :func:`tokenpool_ops.pool` that :func:`plan` passes on."""

    init: Init
    max_iter: int
    seed: int
    check_values: bool
    stop_early: bool
    fast_paths: bool


def _autocast_off(x: Tensor) -> AbstractContextManager[object]:
    """Autocast switched off on ``x``'s device (devices without autocast, such as meta, have
    nothing to switch off; nor has an eager call where autocast is off already: entering
    and leaving ``torch.autocast`` cost 5 us, a block's pooling at batch 1 a few tens)."""
    device_type = x.device.type
    if not _autocast_available(device_type) or not _autocast_on(device_type):
        return _NOTHING
    return torch.autocast(device_type, enabled=False)


#: Whether each device type has autocast, asked once here: dynamo before torch 2.14 cannot
#: trace the query (torch._C._is_autocast_available), so a traced block reads this table.
_AUTOCAST_AVAILABLE = {device_type: torch.amp.is_autocast_available(device_type)
                       for device_type in ("cpu", "cuda", "xpu", "mps", "meta")}


def _autocast_available(device_type: str) -> bool:
    known = _AUTOCAST_AVAILABLE.get(device_type)
    if known is None:  # another device type: asked once, eagerly or where dynamo can trace it
        known = _AUTOCAST_AVAILABLE[device_type] = torch.amp.is_autocast_available(device_type)
    return known


#: The context that switches nothing (one instance, reusable).
_NOTHING = nullcontext()


def _grad_off() -> AbstractContextManager[object]:
    """``torch.no_grad()``, or nothing where gradients are off already (a model's forward
    pass in inference: a block's plan enters it no more). Traced calls keep the context."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return torch.no_grad()
    return _NOTHING


def _autocast_on(device_type: str) -> bool:
    """Whether autocast may be on for ``device_type``: always where traced (the compiled
    graph keeps the context, as it always had it) and where torch cannot say (torch < 2.4
    asks by device type otherwise)."""
    if torch.compiler.is_compiling():
        return True
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except TypeError:
        return True


def _flat(t: Tensor | None, n: int) -> Tensor | None:
    return None if t is None else t.reshape(-1, n).float()


def _detached(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach()


def plan(
    x: Tensor, k: int, method: Method = "wkmedoids", *, scores: Tensor | None = None,
    sizes: Tensor | None = None, metric: Tensor | None = None, lean: bool = False,
    **options: Unpack[PoolOptions],
) -> PoolResult:
    """Run :func:`tokenpool_ops.pool` on detached tensors, outside autograd and autocast.

    ``options`` are the keyword options of ``pool`` (``init``, ``max_iter``, ``seed``,
    ``check_values``, ``stop_early``, ``fast_paths``). Returns its :class:`PoolResult`.
    ``lean=True`` computes only what :func:`merge` needs: ``objective`` and ``history`` are
    then None for the selection baselines and 'tome', and so is the selection baselines'
    ``assignment`` (the nearest kept token of every token: a pass over all of them); the
    clustering methods keep their assignment and history but have no ``objective``, and
    'tome' its assignment.
    """
    with _grad_off(), _autocast_off(x):
        return pool_result(x.detach(), k, method, "plan" if lean else "info",
                           scores=_detached(scores), sizes=_detached(sizes),
                           metric=_detached(metric), **options)


def merge(
    x: Tensor, result: PoolResult, method: Method, *, scores: Tensor | None = None,
    sizes: Tensor | None = None, fast_paths: bool = True,
) -> Tensor:
    """Apply a pooling plan to ``x`` (..., N, M) with differentiable ops: (..., K, M).

    The clustering methods and 'tome' return each group's mean weighted by
    ``scores * sizes`` (w-methods) or ``sizes`` (others), falling back to the sizes and then
    to ones for a group whose weights sum to zero, as the core does; an empty cluster (K-Means only)
    takes the core's centre, which carries no gradient. The selection baselines gather the
    kept tokens. Sums are accumulated in float32; the result has the dtype of ``x``.
    ``fast_paths`` as in :func:`tokenpool_ops.pool`.
    """
    n, k = x.shape[-2], result.tokens.shape[-2]
    # In a traced model both may be sizes known by their ranges only (the plan operator's,
    # see backends._torch_ops._sequence_size); undecided means a plan that reduces.
    if guard_or_false(k >= n):
        return x
    if k == 0 or method not in MERGING_METHODS:
        if k == 0:
            return x[..., :0, :]
        medoids = cast(Tensor, result.medoids)  # set by every selection baseline
        index = medoids[..., None].expand(*medoids.shape, x.shape[-1])
        return torch.gather(x, -2, index)

    flat_x = x.reshape(-1, n, x.shape[-1]).float()
    labels = result.assignment.reshape(-1, n)
    # The core's own weighting and fallbacks, on live tensors: its torch ops are differentiable.
    xp = array_namespace(flat_x)
    w = token_weights(xp, flat_x, _flat(scores, n) if method in WEIGHTED_METHODS else None,
                      _flat(sizes, n))
    prims = primitives_for(xp, fast_paths)
    empty = result.tokens.reshape(flat_x.shape[0], k, x.shape[-1]).to(flat_x.dtype)
    with _autocast_off(x):  # sums stay float32 under autocast
        weights = effective_weights(prims, labels, k, w.weights, w.fallback)
        tokens = weighted_means(prims, flat_x, labels, k, weights, empty)
    return tokens.reshape(*x.shape[:-2], k, x.shape[-1]).to(x.dtype)


def pool_with_grad(
    x: Tensor, k: int, method: Method = "wkmedoids", *, scores: Tensor | None = None,
    sizes: Tensor | None = None, metric: Tensor | None = None, lean: bool = False,
    **options: Unpack[PoolOptions],
) -> tuple[Tensor, PoolResult]:
    """:func:`plan` then :func:`merge`: the pooled tokens (with gradients) and the plan
    (``lean`` as in :func:`plan`). Where no gradient is wanted the plan's own tokens are
    returned: merge would compute the same means again. 'tome''s ``metric`` only decides
    the plan: no gradient flows through it (as in ToMe, which matches without autograd)."""
    result = plan(x, k, method, scores=scores, sizes=sizes, metric=metric, lean=lean,
                  **options)
    if not _wants_grad(x, scores, sizes):
        return result.tokens, result
    fast_paths = options.get("fast_paths", True)
    return merge(x, result, method, scores=scores, sizes=sizes, fast_paths=fast_paths), result


def _wants_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class TokenPooling(nn.Module):
    """Token Pooling layer (Algorithm 1): (..., N, M) tokens to (..., k, M).

    Parameters are those of :func:`tokenpool_ops.pool`. Under ``torch.compile`` and
    ``torch.export`` the defaults work: the values go unchecked, the clustering runs its
    ``max_iter`` iterations and the fused kernels are custom operators in the graph. For
    CUDA graphs captured by hand pass ``stop_early=False, check_values=False``; then no
    value is read on the host (the seeded draws of 'random', 'importance' and
    ``init='random'`` are made on the device too).

    ``forward(x, scores=None, sizes=None, metric=None)`` returns the pooled tokens (``metric``:
    'tome' only);
    ``forward_with_info`` also returns the :class:`PoolResult` of the clustering (its
    ``sizes`` are the sizes to carry into the next layer, Appendix E).
    """

    def __init__(
        self, k: int, method: Method = "wkmedoids", *, init: Init = None,
        max_iter: int = DEFAULT_MAX_ITER, seed: int = 0, check_values: bool = True,
        stop_early: bool = True, fast_paths: bool = True,
    ) -> None:
        super().__init__()
        self.k, self.method = k, method
        self.options = PoolOptions(init=init, max_iter=max_iter, seed=seed,
                                   check_values=check_values, stop_early=stop_early,
                                   fast_paths=fast_paths)

    def forward_with_info(
        self, x: Tensor, scores: Tensor | None = None, sizes: Tensor | None = None,
        metric: Tensor | None = None,
    ) -> tuple[Tensor, PoolResult]:
        return pool_with_grad(x, self.k, self.method, scores=scores, sizes=sizes,
                              metric=metric, **self.options)

    def forward(
        self, x: Tensor, scores: Tensor | None = None, sizes: Tensor | None = None,
        metric: Tensor | None = None,
    ) -> Tensor:
        return pool_with_grad(x, self.k, self.method, scores=scores, sizes=sizes,
                              metric=metric, lean=True, **self.options)[0]

    def extra_repr(self) -> str:
        return f"k={self.k}, method={self.method!r}"
