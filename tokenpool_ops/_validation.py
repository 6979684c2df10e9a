"""Checks of user input. Every error names the argument at fault."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from ._batching import flat_with_mean
from ._compat import (
    Array,
    Namespace,
    array_namespace,
    backend_name,
    device,
    is_array_api_obj,
    is_real_floating,
    is_traced,
    refuse_jit_trace,
)
from ._methods import INITS, MATCHING_METHODS, METHODS, NEEDS_SCORES, Init
from .backends import primitives_for

if TYPE_CHECKING:
    from ._batching import Batch
    from ._primitives import Primitives


class Checked(NamedTuple):
    """What :func:`validate` settles: the namespace, ``k`` and ``max_iter`` as ints, and
    the host reads the call can make (see :func:`host_reads`)."""

    xp: Namespace
    k: int
    max_iter: int
    check_values: bool
    stop_early: bool


def validate(
    x: Array, k: object, max_iter: object, init: Init, check_values: bool, stop_early: bool,
    method: str | None = None, metric: Array | None = None, **per_token: Array | None,
) -> Checked:
    """Every eager check of a public entry point, in one order: ``method`` (None: the
    clustering entry points), the arrays' kinds, library, shapes, dtypes and devices, ``k``,
    ``max_iter`` and ``init``; an ``init`` array is checked on its values too (with
    ``check_values``), before it can index anything. The values of x, the ``metric``
    (..., N, D) and the per-token arrays (..., N) are checked later, on the device
    (:func:`value_checks`)."""
    if method is not None:
        _check_method(method, per_token.get("scores"), metric)
    check_values, stop_early = host_reads(check_values, stop_early, x, metric,
                                          *per_token.values())
    check_is_array(x, "x")
    for name, values in {"metric": metric, **per_token}.items():
        if values is not None:
            check_is_array(values, name)
    if init is not None and not isinstance(init, str) and not is_array_api_obj(init):
        raise TypeError(f"init must be 'topk', 'random', 'spread' or an integer array, "
                        f"got {type(init).__name__}")
    init_array = None if init is None or isinstance(init, str) else init
    xp = namespace_of(x=x, init=init_array, metric=metric, **per_token)
    check_tokens(xp, x, check_values=False)
    check_same_device(xp, "x", x=x, init=init_array, metric=metric, **per_token)
    k, max_iter = check_count(k, "k"), check_count(max_iter, "max_iter")
    check_metric(xp, metric, tuple(x.shape[:-1]))
    for name, values in per_token.items():
        check_token_values(xp, values, name, tuple(x.shape[:-1]), check_values=False)
    if isinstance(init, str) and init not in INITS:
        raise ValueError(f"init must be 'topk', 'random', 'spread' or an integer array, "
                         f"got {init!r}")
    if init_array is not None:
        check_init_indices(xp, init_array, tuple(x.shape[:-2]), x.shape[-2], k, check_values)
    return Checked(xp, k, max_iter, check_values, stop_early)


def _check_method(method: str, scores: Array | None, metric: Array | None) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    if method in NEEDS_SCORES and scores is None:
        raise ValueError(f"method {method!r} needs scores (see significance_scores)")
    if metric is not None and method not in MATCHING_METHODS:
        raise ValueError(f"metric applies to method 'tome' only, not {method!r}")


def host_reads(check_values: bool, stop_early: bool, *arrays: Array | None
               ) -> tuple[bool, bool]:
    """``check_values`` and ``stop_early`` as the call can honour them: under a tracer
    (``jax.jit``, ``vmap``, ``grad``, ``torch.compile``, ``torch.export``) no value can be
    read on the host, so the values go unchecked and the clustering runs its ``max_iter``
    iterations (a fused kernel still stops each problem at its fixed point)."""
    refuse_jit_trace(*arrays)
    if is_traced(*arrays):
        return False, False
    return check_values, stop_early


def value_checks(batch: Batch, check_values: bool, metric: Array | None = None,
                 **per_token: Array | None) -> list[Deferred] | None:
    """The value checks of x, the ``metric`` and the per-token arrays, still on the device
    (None without ``check_values``): the only place they are made. ``_overflow.guarded``
    reads them with its overflow check, in one host synchronisation (a bad value cannot
    crash the computation before; see _overflow)."""
    if not check_values:
        return None
    prims = batch.prims
    checks = [finite_tokens_deferred(prims, batch.x, batch.mean)]  # from the batch's means
    if metric is not None:  # the metric likewise, from its own means
        checks.append(finite_tokens_deferred(prims, *flat_with_mean(prims.xp, metric),
                                             "metric"))
    checks += [token_values_deferred(prims, values, name)
               for name, values in per_token.items() if values is not None]
    return checks


def namespace_of(**arrays: Array | None) -> Namespace:
    """The common namespace of the given arrays; a clear TypeError if they mix libraries."""
    given = {name: a for name, a in arrays.items() if a is not None}
    try:
        return array_namespace(*given.values())
    except TypeError as error:
        kinds = ", ".join(f"{name}: {type(a).__module__}.{type(a).__name__}"
                          for name, a in given.items())
        raise TypeError(f"all arrays must come from one array library, got {kinds}") from error


def check_same_device(xp: Namespace, reference: str, **arrays: Array | None) -> None:
    """Raise ValueError if any of ``arrays`` lives on another device than ``reference``."""
    ref = arrays[reference]
    ref_device = device(ref)
    for name, a in arrays.items():
        if a is not None and a is not ref and device(a) != ref_device:
            raise ValueError(
                f"{name} is on device {device(a)!r} but {reference} is on {ref_device!r}; "
                f"move them to one device first ({backend_name(xp)})"
            )


def check_tokens(xp: Namespace, x: Array, name: str = "x", check_values: bool = True) -> None:
    """``x`` must be a real floating array of shape (..., N, M), finite unless opted out."""
    if x.ndim < 2:
        raise ValueError(f"{name} must have shape (..., N, M), got a {x.ndim}-d array")
    if not is_real_floating(xp, x.dtype):
        raise TypeError(f"{name} must have a real floating dtype, got {x.dtype}")
    if check_values and not primitives_for(xp).all_finite(xp, x):
        raise _non_finite(name)


def check_finite_tokens(xp: Namespace, x: Array, mean: Array, name: str = "x") -> None:
    """``x`` (B, N, M) holds no NaN or infinity, given its per-problem ``mean`` (B, 1, M).

    Every entry of ``x`` enters one mean, and a sum that meets a NaN or an infinity is not
    finite (IEEE 754), so a finite mean proves ``x`` finite from B M values instead of
    B N M. Only a non-finite mean (a bad value, or a sum that overflowed) makes us scan ``x``.
    """
    all_finite = primitives_for(xp).all_finite
    if not (all_finite(xp, mean) or all_finite(xp, x)):
        raise _non_finite(name)


@dataclass(frozen=True)
class Deferred:
    """A value check whose verdict stays on the device until ``_overflow.guarded`` reads it
    together with the others: one host synchronisation for all of them.

    ``passed`` is a 0-d boolean array. ``confirm`` is the check done on the host: it raises
    the check's error, or returns where the input is fine after all (a non-finite mean can
    be the overflowing sum of finite tokens).
    """

    passed: Array
    confirm: Callable[[], None]


def finite_tokens_deferred(prims: Primitives, x: Array, mean: Array,
                           name: str = "x") -> Deferred:
    """:func:`check_finite_tokens`, deferred: the verdict of the means alone."""
    xp = prims.xp
    return Deferred(prims.all_valid(xp, mean, False),
                    lambda: check_finite_tokens(xp, x, mean, name))


def token_values_deferred(prims: Primitives, values: Array, name: str) -> Deferred:
    """Per-token values (of a checked shape and dtype) finite and non-negative, deferred."""
    def confirm() -> None:
        raise ValueError(f"{name} must be finite and non-negative; it contains a negative, "
                         "NaN or infinite value")

    return Deferred(prims.all_valid(prims.xp, values, True), confirm)


def _non_finite(name: str) -> ValueError:
    return ValueError(f"{name} contains NaN or infinity (check_values=False skips this check)")


def check_count(value: Any, name: str) -> int:
    """``k`` or ``max_iter``: a non-negative integer (bools are refused)."""
    if type(value) is int and value >= 0:  # the common case, without the ABC check below
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a non-negative integer, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value}")
    return int(value)


def check_token_values(
    xp: Namespace, values: Array | None, name: str, shape: tuple[int, ...],
    check_values: bool = True,
) -> None:
    """Per-token values (scores, sizes, weights): real, shape (..., N), finite, >= 0."""
    if values is None:
        return
    if not (is_real_floating(xp, values.dtype) or xp.isdtype(values.dtype, "integral")):
        raise TypeError(f"{name} must have a real numeric dtype, got {values.dtype}")
    if tuple(values.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} (the shape of x without its last "
                         f"axis), got {tuple(values.shape)}")
    if check_values:  # eager (reconstruction_error): read at once
        check = token_values_deferred(primitives_for(xp), values, name)
        if not bool(check.passed):
            check.confirm()


def check_init_indices(xp: Namespace, init: Array, batch_shape: tuple[int, ...], n: int,
                       k: int, check_values: bool = True) -> None:
    """Starting indices (..., k): integers in [0, N), distinct within each problem."""
    if not xp.isdtype(init.dtype, "integral"):
        raise TypeError(f"init must be 'topk', 'random', 'spread' or an integer array, "
                        f"got dtype {init.dtype}")
    expected = (*batch_shape, k)
    if tuple(init.shape) != expected:
        raise ValueError(f"init must have shape {expected}, got {tuple(init.shape)}")
    if not check_values:
        return
    if not bool(xp.all((init >= 0) & (init < n))):
        raise ValueError(f"init indices must lie in [0, {n}) (N = {n})")
    ordered = xp.sort(init, axis=-1)
    if k > 1 and bool(xp.any(ordered[..., 1:] == ordered[..., :-1])):
        raise ValueError("init indices must be distinct within each problem")


def check_is_array(value: Any, name: str) -> None:
    """``value`` must be an array of an array-API library (not a list, scalar or None)."""
    if not is_array_api_obj(value):
        raise TypeError(f"{name} must be an array of a library supporting the array API "
                        f"(NumPy, PyTorch, JAX, CuPy, ...), got {type(value).__name__}")


def check_metric(xp: Namespace, metric: Array | None, shape: tuple[int, ...]) -> None:
    """ToMe's ``metric``: a real floating array (..., N, D) with the shape (..., N) of x."""
    if metric is None:
        return
    check_tokens(xp, metric, "metric", check_values=False)
    if tuple(metric.shape[:-1]) != shape:
        raise ValueError(f"metric must have shape (..., N, D) with {shape} (the shape of x "
                         f"without its last axis) before D, got {tuple(metric.shape)}")
