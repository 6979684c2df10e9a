"""Finite in, finite out: problems whose arithmetic overflowed are redone in float64.

Squared distances of float32 tokens overflow once the tokens reach about 1e19, and weighted
sums once weights times tokens reach about 3e38. Such an overflow always surfaces as an
infinity or a NaN in that problem's results: every distance is assembled as
``(|a|^2 + |b|^2) - 2 a.b`` or from the differences themselves (never in an order where an
overflowed ``-2 a.b`` is clamped to a finite zero), and every objective is a sum of
non-negative terms. So one finite check of the results finds every overflowed problem
(one device synchronisation, made only when values are checked).

Those problems are computed again in float64, where any float32 input fits: its squares,
weights times tokens and their sums stay below 1e160. The redone problems replace the
overflowed ones; the others keep their float32 results bit for bit. What float64 cannot
hold either (float64 input beyond 1e150, or a float32 objective beyond 3.4e38 once it is cast
back) raises an OverflowError that names the problem and its largest value.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from ._batching import Batch, no_overflow_warnings
from ._compat import Array, Namespace, is_real_floating
from ._primitives import Primitives
from ._results import array_fields
from ._validation import Deferred

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

#: PoolResult or Clustering: a dataclass of (B, ...) arrays (or None) and ``n_iter``.
Result = TypeVar("Result", bound="DataclassInstance")


def _arrays(result: Any) -> dict[str, Array]:
    arrays = {}
    for name in array_fields(result):
        value = getattr(result, name)
        if value is not None:
            arrays[name] = value
    return arrays


def guarded(batch: Batch, compute: Callable[[Batch], Result], checks: list[Deferred] | None,
            returned: tuple[str, ...] | None = None, overflows: bool = True,
            **values: Array | None) -> Result:
    """``compute(batch)``, with the value ``checks`` of the input (None: values unchecked)
    read together with the finite check of the result, in one host read, and overflowed
    problems redone in float64 (finite input gives finite output): the one reader of the
    checks. ``returned``: the fields the caller sees (all when None); ``values``: the
    per-token inputs, named in an OverflowError. ``overflows=False`` for results that
    cannot overflow (the trivial ones): only the checks are read."""
    if not overflows:
        settle(batch.prims, checks)
        return compute(batch)
    if checks is None:
        return read_iterations(compute(batch))
    with no_overflow_warnings(batch.xp):
        return without_overflow(batch, compute, compute(batch), returned, values, checks)


def finite_problems(xp: Namespace, result: Any, exact: bool = True) -> Array | None:
    """(B,) True where every floating value of a problem's result is finite (None when
    the result holds no floating array).

    ``exact=False`` reads per-problem sums instead, one pass without a boolean temporary: a
    sum meeting a NaN or an infinity is not finite, but a sum of finite values can overflow
    too. Such a false alarm only makes that problem be redone in float64.
    """
    finite = None
    for value in _arrays(result).values():
        if not xp.isdtype(value.dtype, "real floating"):
            continue
        axes = tuple(range(1, value.ndim))
        if exact:
            per_problem = xp.all(xp.isfinite(value), axis=axes) if axes else xp.isfinite(value)
        else:
            per_problem = xp.isfinite(xp.sum(value, axis=axes) if axes else value)
        finite = per_problem if finite is None else finite & per_problem
    return finite


def finite_total(prims: Primitives, result: Any) -> Array | None:
    """0-d: whether the sum of all floating values of the result is finite (None when it
    holds no floating array). One reduction per field, whatever the batch: the check that
    every call makes. A problem that is not finite in :func:`finite_problems` (exact=False)
    makes the total not finite (its sum is infinite or NaN, and so is the total); a total
    of finite problems that overflowed is a false alarm, which that per-problem check then
    clears. The verdict is the backend's ``finite_sum`` (on the host, a host value: no
    tensor read follows)."""
    xp = prims.xp
    floating = [value for value in _arrays(result).values()
                if is_real_floating(xp, value.dtype)]
    return prims.finite_sum(xp, floating) if floating else None


def without_overflow(batch: Batch, compute: Callable[[Batch], Result], result: Result,
                     returned: tuple[str, ...] | None = None,
                     values: dict[str, Array | None] | None = None,
                     pending: list[Deferred] | None = None) -> Result:
    """``result`` of ``compute(batch)``, with its overflowed problems computed in float64.

    The ``pending`` checks of the input are read with the finite check of the result, in
    one host synchronisation, and raise first. An overflow anywhere is redone; one that
    float64 does not cure raises an OverflowError if it is in a field of ``returned`` (all
    but ``history`` when None). The history may keep +inf where an intermediate objective
    exceeds the dtype (its correctly rounded value); ``values`` (scores, sizes) are named in
    the error message.
    """
    xp = batch.xp
    total = finite_total(batch.prims, result)
    flags = [] if total is None else [total]  # None: no floating result
    verdicts, n_iter = settle_counting(batch.prims, pending or [], flags,
                                       unread_iterations(result))
    computed, result = result, with_iterations(result, n_iter)
    if all(verdicts):
        return result
    finite = finite_problems(xp, computed, exact=False)
    if finite is None or bool(xp.all(finite)):  # the total overflowed, no problem did
        return result
    wide = batch.widened()
    wide_result = None if wide is None else read_iterations(compute(wide))
    if wide_result is not None:
        redone = _cast_floats(xp, wide_result, batch.x.dtype)
        result = _where_problems(xp, finite, result, redone)
    seen = replace(result, **{name: None for name in _arrays(result)
                              if name == "history" or (returned and name not in returned)})
    finite = finite_problems(xp, seen)
    if finite is None or bool(xp.all(finite)):
        return result
    raise _overflow_error(batch, seen, finite, wide_result, values)


def settle(prims: Primitives, checks: Sequence[Deferred] | None) -> None:
    """Read the verdicts of ``checks`` in one host read and raise the error of the first
    that failed (None or none: nothing to read)."""
    settle_counting(prims, checks or [], [])


def settle_counting(prims: Primitives, checks: Sequence[Deferred], flags: Sequence[Array],
                    count: Array | None = None) -> tuple[list[bool], int | None]:
    """:func:`settle`, also reading the 0-d boolean ``flags`` and a non-negative 0-d integer
    ``count`` in the same read (``prims.read_flags``): the flags and the count (None
    without one)."""
    read, n_iter = prims.read_flags(prims.xp, [check.passed for check in checks] + list(flags),
                                    count)
    for check, passed in zip(checks, read, strict=False):
        if not passed:
            check.confirm()
    return read[len(checks):], n_iter


def unread_iterations(result: Any) -> Array | None:
    """The iteration count a fused kernel left on the device (a 0-d array), else None."""
    n_iter = result.n_iter
    return None if isinstance(n_iter, int) else n_iter


def with_iterations(result: Result, n_iter: int | None) -> Result:
    """``result`` with its unread iteration count replaced by ``n_iter`` (read elsewhere)
    and its history cut to n_iter + 1 entries (the kernel wrote max_iter + 1, converged
    problems repeating their final value); unchanged when ``n_iter`` is None."""
    if n_iter is None:
        return result
    history = result.history  # type: ignore[attr-defined]
    return replace(result, n_iter=n_iter, history=history[:, : n_iter + 1])


def read_iterations(result: Result) -> Result:
    """``result`` with an unread iteration count read (one host read) and applied."""
    count = unread_iterations(result)
    return result if count is None else with_iterations(result, int(count))


def _cast_floats(xp: Namespace, result: Result, dtype: Any) -> Result:
    return replace(result, **{name: xp.astype(value, dtype) for name, value
                              in _arrays(result).items()
                              if xp.isdtype(value.dtype, "real floating")})


def _where_problems(xp: Namespace, keep: Array, first: Result, second: Result) -> Result:
    """Per problem, ``first`` where ``keep`` else ``second``; histories padded to one length
    (a problem that converged repeats its final value) and the larger ``n_iter``."""
    first_arrays, second_arrays = _arrays(first), _arrays(second)
    length = max(first.n_iter, second.n_iter) + 1  # type: ignore[attr-defined]
    merged = {}
    for name, a in first_arrays.items():
        b = second_arrays[name]
        if name == "history":
            a, b = _padded(xp, a, length), _padded(xp, b, length)
        mask = xp.reshape(keep, (keep.shape[0],) + (1,) * (a.ndim - 1))
        merged[name] = xp.where(mask, a, b)
    return replace(first, n_iter=length - 1, **merged)


def _padded(xp: Namespace, history: Array, length: int) -> Array:
    missing = length - history.shape[1]
    if missing == 0:
        return history
    last = xp.broadcast_to(history[:, -1:], (history.shape[0], missing))
    return xp.concat([history, last], axis=1)


def _overflow_error(batch: Batch, result: Any, finite: Array, wide_result: Any,
                    values: dict[str, Array | None] | None) -> OverflowError:
    """Name the first problem that overflowed, the field and, where float64 held it, its
    value; and the largest input magnitudes of that problem."""
    xp = batch.xp
    bad = next(b for b in range(finite.shape[0]) if not bool(finite[b]))
    index = tuple(int(i) for i in np.unravel_index(bad, batch.batch_shape))
    name = next(name for name, value in _arrays(result).items()
                if xp.isdtype(value.dtype, "real floating")
                and not bool(xp.all(xp.isfinite(value[bad, ...]))))
    inputs = ", ".join(f"{label} {float(xp.max(xp.abs(a[bad, ...]))):.3g}"
                       for label, a in {"x": batch.x, **(values or {})}.items()
                       if a is not None and a.shape[1] > 0)
    dtype = str(batch.x.dtype).rsplit(".", 1)[-1]  # torch.float32 -> float32
    if wide_result is None:
        what, advice = f"overflows {dtype}", ""
    else:
        reached = float(xp.max(xp.abs(getattr(wide_result, name)[bad, ...])))
        what = (f"reaches {reached:.3g} (computed in float64), beyond the range of "
                f"{dtype} in which it is returned")
        advice = ", or pass float64 tokens"
    return OverflowError(f"problem {index}: the {name} {what}. Largest input magnitudes: "
                         f"{inputs}. Scale x, scores or sizes down{advice}")
