"""Checks of user input. Every error names the argument at fault."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ._compat import Array, Namespace, array_namespace, backend_name, device, is_array_api_obj
from .backends import primitives_for


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
    for name, a in arrays.items():
        if a is not None and device(a) != device(ref):
            raise ValueError(
                f"{name} is on device {device(a)!r} but {reference} is on {device(ref)!r}; "
                f"move them to one device first ({backend_name(xp)})"
            )


def check_tokens(xp: Namespace, x: Array, name: str = "x", check_values: bool = True) -> None:
    """``x`` must be a real floating array of shape (..., N, M), finite unless opted out."""
    if x.ndim < 2:
        raise ValueError(f"{name} must have shape (..., N, M), got a {x.ndim}-d array")
    if not xp.isdtype(x.dtype, "real floating"):
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
    """A value check whose verdict stays on the device until :func:`settle` reads it together
    with the others: one host synchronisation for all of them.

    ``passed`` is a 0-d boolean array. ``confirm`` is the check done on the host: it raises
    the check's error, or returns where the input is fine after all (a non-finite mean can
    be the overflowing sum of finite tokens).
    """

    passed: Array
    confirm: Callable[[], None]


def finite_tokens_deferred(xp: Namespace, x: Array, mean: Array, name: str = "x") -> Deferred:
    """:func:`check_finite_tokens`, deferred: the verdict of the means alone."""
    return Deferred(xp.all(xp.isfinite(mean)), lambda: check_finite_tokens(xp, x, mean, name))


def token_values_deferred(xp: Namespace, values: Array, name: str) -> Deferred:
    """Per-token values (of a checked shape and dtype) finite and non-negative, deferred."""
    valid = values >= 0  # False for NaN too
    if xp.isdtype(values.dtype, "real floating"):
        valid = valid & xp.isfinite(values)

    def confirm() -> None:
        raise ValueError(f"{name} must be finite and non-negative; it contains a negative, "
                         "NaN or infinite value")

    return Deferred(xp.all(valid), confirm)


def settle(xp: Namespace, checks: Sequence[Deferred] | None) -> None:
    """Read the verdicts of ``checks`` in one host read and raise the error of the first
    that failed (None or none: nothing to read)."""
    settle_counting(xp, checks or [], [])


def settle_counting(xp: Namespace, checks: Sequence[Deferred], flags: Sequence[Array],
                    count: Array | None = None) -> tuple[list[bool], int | None]:
    """:func:`settle`, also reading the 0-d boolean ``flags`` and a non-negative 0-d integer
    ``count`` in the same read (packed above the verdict bits): the flags and the count
    (None without one)."""
    verdicts = [check.passed for check in checks] + list(flags)
    if not verdicts and count is None:
        return [], None
    dtype = xp.int32 if count is None else xp.int64  # int64: JAX without x64 has no counts
    mask = sum(xp.astype(v, dtype) * (1 << i) for i, v in enumerate(verdicts))
    if count is not None:
        mask = mask + xp.astype(count, dtype) * (1 << len(verdicts))
    bits = int(mask)  # the one synchronisation
    read = [bool(bits >> i & 1) for i in range(len(verdicts))]
    for check, passed in zip(checks, read, strict=False):
        if not passed:
            check.confirm()
    return read[len(checks):], (None if count is None else bits >> len(verdicts))


def _non_finite(name: str) -> ValueError:
    return ValueError(f"{name} contains NaN or infinity (check_values=False skips this check)")


def check_count(value: Any, name: str) -> int:
    """``k`` or ``max_iter``: a non-negative integer (bools are refused)."""
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
    if not (xp.isdtype(values.dtype, "real floating") or xp.isdtype(values.dtype, "integral")):
        raise TypeError(f"{name} must have a real numeric dtype, got {values.dtype}")
    if tuple(values.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} (the shape of x without its last "
                         f"axis), got {tuple(values.shape)}")
    if check_values:
        settle(xp, [token_values_deferred(xp, values, name)])


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
