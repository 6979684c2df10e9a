"""Flattening any batch shape (..., N, M) to the (B, N, M) stacks the algorithms work on."""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from ._compat import Array, Namespace, backend_name, compute_dtype, device, index_dtype
from ._primitives import Primitives
from ._results import array_fields
from .backends import primitives_for

if TYPE_CHECKING:
    from ._results import Clustering, PoolResult

R = TypeVar("R", "Clustering", "PoolResult")


@dataclass(frozen=True)
class Batch:
    """Tokens as (B, N, M) in the compute dtype, and each problem's mean token.

    Distances are computed from the centred tokens, which keeps the Gram expansion accurate
    for tokens far from the origin. The centred copy is made on demand and not kept, so that
    it is not alive (a (B, N, M) array) while K-Medoids iterates or the means are merged.
    """

    prims: Primitives
    batch_shape: tuple[int, ...]
    x: Array  # (B, N, M), compute dtype
    mean: Array  # (B, 1, M), each problem's mean token
    out_dtype: Any

    @property
    def xp(self) -> Namespace:
        return self.prims.xp

    @property
    def n(self) -> int:
        """Tokens per problem, N."""
        return int(self.x.shape[1])

    def centred(self) -> Array:
        """A fresh copy of the tokens minus their problem's mean, (B, N, M)."""
        return self.x - self.mean

    def flat(self, values: Array | None) -> Array | None:
        """Per-token (..., N) or per-centre (..., K) values as (B, ·), in the compute dtype."""
        if values is None:
            return None
        xp, dtype = self.xp, self.x.dtype
        if values.ndim != 2:  # (B, ·) already when x is (B, N, M): a call less
            values = xp.reshape(values, (self.x.shape[0], values.shape[-1]))
        return values if values.dtype == dtype else xp.astype(values, dtype)  # integer sizes too

    def flat_tokens(self, tokens: Array) -> Array:
        """Other tokens (..., K, M) of the same batch as (B, K, M), in the compute dtype."""
        xp = self.xp
        flat = xp.reshape(tokens, (self.x.shape[0], tokens.shape[-2], tokens.shape[-1]))
        return flat if flat.dtype == self.x.dtype else xp.astype(flat, self.x.dtype)

    def unflat(self, values: Array) -> Array:
        """Back from (B, ...) to the caller's batch shape."""
        if len(self.batch_shape) == 1:  # the caller's batch shape is (B,): nothing to undo
            return values
        return self.xp.reshape(values, (*self.batch_shape, *values.shape[1:]))

    def index_dtype(self) -> Any:
        return index_dtype(self.xp, self.x)

    def ones(self) -> Array:
        """Unit weights (B, N): the sizes of tokens that stand for themselves alone."""
        return self.xp.ones(self.x.shape[:2], dtype=self.x.dtype, device=device(self.x))

    def to_caller(self, result: R) -> R:
        """A result of (B, ...) arrays back in the caller's batch shape, tokens in their
        dtype: the inverse of :func:`flatten`."""
        reshaped = len(self.batch_shape) != 1  # (B,) is the caller's shape already
        changes = {}
        for name in array_fields(result):
            value = getattr(result, name)
            if value is None:
                continue
            if name in ("tokens", "centres") and value.dtype != self.out_dtype:
                changes[name] = self.unflat(self.xp.astype(value, self.out_dtype))
            elif reshaped:
                changes[name] = self.unflat(value)
        # Nothing to change (a B-problem call in the compute dtype): the result as it is.
        return replace(result, **changes) if changes else result  # type: ignore[type-var]

    def widened(self) -> Batch | None:
        """The same problems computed in float64; None where they already are, or where the
        library has no float64 (JAX without x64)."""
        xp = self.xp
        if self.x.dtype == xp.float64:
            return None
        x = xp.astype(self.x, xp.float64)
        if x.dtype != xp.float64:
            return None
        return Batch(self.prims, self.batch_shape, x, xp.mean(x, axis=1, keepdims=True),
                     self.out_dtype)


def no_overflow_warnings(xp: Namespace) -> AbstractContextManager[object]:
    """NumPy's overflow warnings off, where the caller handles non-finite values itself:
    the mean doubles as the finite check of x (validation.check_finite_tokens), and
    overflowed problems are redone in float64 (_overflow). Other libraries do not warn (and
    torch.compile cannot trace ``np.errstate``)."""
    if backend_name(xp) in ("numpy", "array_api_strict"):
        return np.errstate(invalid="ignore", over="ignore")
    return _NOTHING


#: The context of the other libraries: nothing to switch (one instance, reusable).
_NOTHING = nullcontext()


def flatten(xp: Namespace, x: Array, fast_paths: bool = True) -> Batch:
    """Wrap tokens ``x`` (..., N, M) as a :class:`Batch`."""
    flat, mean = flat_with_mean(xp, x)
    return Batch(primitives_for(xp, fast_paths), tuple(x.shape[:-2]), flat, mean, x.dtype)


def flat_with_mean(xp: Namespace, x: Array) -> tuple[Array, Array]:
    """Tokens ``x`` (..., N, M) as (B, N, M) in the compute dtype, and each problem's mean
    token (B, 1, M)."""
    n, m = x.shape[-2], x.shape[-1]
    # Never written to: a view of x, or x itself where it is (B, N, M) in the compute dtype.
    flat = x if x.ndim == 3 else xp.reshape(x, (math.prod(x.shape[:-2]), n, m))
    dtype = compute_dtype(xp, x.dtype)
    if flat.dtype != dtype:
        flat = xp.astype(flat, dtype, copy=False)
    if n == 0:
        mean = xp.zeros((flat.shape[0], 1, m), dtype=flat.dtype, device=device(flat))
    else:
        with no_overflow_warnings(xp):
            mean = xp.mean(flat, axis=1, keepdims=True)
    return flat, mean
