"""The one place that talks to array-api-compat.

Everything else imports the namespace helpers from here, so that backend detection lives in a
single module (the pattern of array-api-extra's ``_lib/_compat.py``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from array_api_compat import (
    array_namespace,
    device,
    is_array_api_obj,
    is_array_api_strict_namespace,
    is_cupy_namespace,
    is_jax_namespace,
    is_numpy_namespace,
    is_torch_namespace,
)

__all__ = [
    "Array",
    "Namespace",
    "array_namespace",
    "backend_name",
    "compute_dtype",
    "constant",
    "device",
    "exponential_noise",
    "index_dtype",
    "is_array_api_obj",
    "is_array_api_strict_namespace",
    "is_cupy_namespace",
    "is_jax_namespace",
    "is_numpy_namespace",
    "is_torch_namespace",
    "take_along_axis",
]

#: Any array of a library that follows the array API standard.
Array = Any
#: An array API namespace, as returned by :func:`array_namespace`.
Namespace = Any


def backend_name(xp: Namespace) -> str:
    """Short name of the library behind ``xp``, used to pick fast paths and in messages."""
    for name, test in (
        ("numpy", is_numpy_namespace),
        ("torch", is_torch_namespace),
        ("cupy", is_cupy_namespace),
        ("jax", is_jax_namespace),
        ("array_api_strict", is_array_api_strict_namespace),
    ):
        if test(xp):
            return name
    return "unknown"


def compute_dtype(xp: Namespace, dtype: Any) -> Any:
    """The dtype we compute in: half precision is accumulated in float32."""
    if xp.finfo(dtype).bits < 32:
        return xp.float32
    return dtype


def constant(xp: Namespace, value: float, like: Array) -> Array:
    """A 0-d array holding ``value`` with the dtype and device of ``like``."""
    return xp.asarray(value, dtype=like.dtype, device=device(like))


def index_dtype(xp: Namespace, like: Array) -> Any:
    """The namespace's default integer dtype for indices on ``like``'s device."""
    return xp.__array_namespace_info__().default_dtypes(device=device(like))["indexing"]


def take_along_axis(xp: Namespace, x: Array, indices: Array, axis: int) -> Array:
    """``take_along_axis`` (array API 2024.12) with the index broadcast to ``x`` first."""
    shape = list(x.shape)
    shape[axis] = indices.shape[axis]
    indices = xp.broadcast_to(indices, tuple(shape))
    return xp.take_along_axis(x, indices, axis=axis)


def exponential_noise(
    xp: Namespace, seed: int, shape: tuple[int, ...], *, dtype: Any, device: Any
) -> Array:
    """Standard exponential variates drawn on the host from ``seed``, moved to ``device``.

    Drawing (and taking the logarithm) on the host with NumPy's PCG64 gives every backend the
    very same numbers, so the seeded methods agree bit for bit across libraries.
    """
    rng = np.random.default_rng(seed)
    e = rng.standard_exponential(shape)
    return xp.asarray(e.astype(np.float32 if dtype == xp.float32 else np.float64),
                      dtype=dtype, device=device)
