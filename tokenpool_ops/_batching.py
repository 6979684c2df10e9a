"""Flattening any batch shape (..., N, M) to the (B, N, M) stacks the algorithms work on."""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._compat import Array, Namespace, backend_name, compute_dtype, device, index_dtype
from ._primitives import Primitives
from .backends import primitives_for


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

    def centred(self) -> Array:
        """A fresh copy of the tokens minus their problem's mean, (B, N, M)."""
        return self.x - self.mean

    def flat(self, values: Array | None) -> Array | None:
        """Per-token (..., N) or per-centre (..., K) values as (B, ·), in the compute dtype."""
        if values is None:
            return None
        flat = self.xp.reshape(values, (self.x.shape[0], values.shape[-1]))
        return self.xp.astype(flat, self.x.dtype, copy=False)  # integer sizes too

    def flat_tokens(self, tokens: Array) -> Array:
        """Other tokens (..., K, M) of the same batch as (B, K, M), in the compute dtype."""
        xp = self.xp
        flat = xp.reshape(tokens, (self.x.shape[0], tokens.shape[-2], tokens.shape[-1]))
        return xp.astype(flat, self.x.dtype)

    def unflat(self, values: Array) -> Array:
        """Back from (B, ...) to the caller's batch shape."""
        return self.xp.reshape(values, (*self.batch_shape, *values.shape[1:]))

    def index_dtype(self) -> Any:
        return index_dtype(self.xp, self.x)

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
    return nullcontext()


def flatten(xp: Namespace, x: Array, fast_paths: bool = True) -> Batch:
    """Wrap tokens ``x`` (..., N, M) as a :class:`Batch`."""
    batch_shape = tuple(x.shape[:-2])
    n, m = x.shape[-2], x.shape[-1]
    flat = xp.astype(xp.reshape(x, (math.prod(batch_shape), n, m)), compute_dtype(xp, x.dtype),
                     copy=False)  # never written to: a view is enough
    if n == 0:
        mean = xp.zeros((flat.shape[0], 1, m), dtype=flat.dtype, device=device(flat))
    else:
        with no_overflow_warnings(xp):
            mean = xp.mean(flat, axis=1, keepdims=True)
    return Batch(primitives_for(xp, fast_paths), batch_shape, flat, mean, x.dtype)
