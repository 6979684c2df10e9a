"""The one place that talks to array-api-compat.

Everything else imports the namespace helpers from here, so that backend detection lives in a
single module (the pattern of array-api-extra's ``_lib/_compat.py``).
"""

from __future__ import annotations

import sys
from typing import Any

import array_api_compat
import array_api_compat.numpy
import numpy as np
from array_api_compat import (
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
    "index_dtype",
    "is_array_api_obj",
    "is_array_api_strict_namespace",
    "is_cupy_namespace",
    "is_jax_namespace",
    "is_numpy_namespace",
    "is_real_floating",
    "is_torch_namespace",
    "is_traced",
    "take_along_axis",
]

#: Any array of a library that follows the array API standard.
Array = Any
#: An array API namespace, as returned by :func:`array_namespace`.
Namespace = Any


# PyTorch tensors are recognised directly, before array-api-compat's detection helpers: those
# are functools.lru_cache-wrapped, and torch.compile warns at every one it traces (dozens of
# warnings for one compiled TokenPooling). The results are the ones array-api-compat gives.


def _is_tensor(x: object) -> bool:
    torch = sys.modules.get("torch")  # never imports torch for other libraries' arrays
    return torch is not None and isinstance(x, torch.Tensor)


# NumPy arrays too: a pool call asks for namespaces and devices a few times, and each answer
# from array-api-compat tries every library it knows (a tenth of a B = 1 call's time).
def _is_ndarray(x: object) -> bool:
    return type(x) is np.ndarray  # subclasses (np.matrix, masked arrays) go the long way


def array_namespace(*arrays: Array) -> Namespace:
    """The array API namespace of ``arrays`` (TypeError if they mix libraries)."""
    if arrays and _all_of_type(_tensor_type(), arrays):
        return _compat_namespace("torch")
    if arrays and _all_of_type(np.ndarray, arrays):
        return _compat_namespace("numpy")
    return array_api_compat.array_namespace(*arrays)


def _tensor_type() -> type | None:
    torch = sys.modules.get("torch")  # never imports torch for other libraries' arrays
    return None if torch is None else torch.Tensor


def _all_of_type(kind: type | None, arrays: tuple[Array, ...]) -> bool:
    """Whether every array is a ``kind`` (a subclass too for tensors, NumPy's exact type
    only: see _is_ndarray); a loop, not a generator, on the path of every pool call."""
    if kind is None:
        return False
    for a in arrays:
        if not (type(a) is kind or (kind is not np.ndarray and isinstance(a, kind))):
            return False
    return True


def _compat_namespace(library: str) -> Namespace:
    """array-api-compat's namespace of NumPy or PyTorch, looked up in a dict (an import
    statement in a function passes through the import machinery at every call). PyTorch's
    is imported at its first use, as before. Traced code neither reads nor fills the dict
    (see :func:`torch_compiling`)."""
    if library == "torch" and torch_compiling():
        from array_api_compat import torch as traced

        return traced
    namespace = _NAMESPACES.get(library)
    if namespace is None:
        from array_api_compat import torch as namespace

        _NAMESPACES[library] = namespace
    return namespace


def torch_compiling() -> bool:
    """Whether PyTorch is tracing the running code (``torch.compile``, ``torch.export``).

    Traced code reads no module-level memo (answers kept for the next call): dynamo guards
    the compiled code on what it read, so a memo filled after the trace (by the trace's own
    write, or by a later eager call) failed the guard and compiled the code again, at the
    second call of a model compiled before any eager call. Traced, the answer is computed
    afresh: it costs nothing at run time, where the compiled code no longer asks."""
    torch = sys.modules.get("torch")  # never imports torch for other libraries
    return torch is not None and bool(torch.compiler.is_compiling())


#: The namespaces of :func:`_compat_namespace`; NumPy's from the start (NumPy is imported).
_NAMESPACES: dict[str, Namespace] = {"numpy": array_api_compat.numpy}


def is_array_api_obj(x: object) -> bool:
    """Whether ``x`` is an array of a library array-api-compat supports."""
    return _is_tensor(x) or _is_ndarray(x) or array_api_compat.is_array_api_obj(x)


def is_traced(*arrays: Array) -> bool:
    """Whether any of ``arrays`` is being traced rather than computed: a JAX tracer (under
    ``jit``, ``vmap``, ``grad``) or a tensor under ``torch.compile`` / ``torch.export``.
    Traced values cannot be read on the host. None entries are ignored."""
    jax_core = sys.modules.get("jax.core")  # never imports JAX for other libraries' arrays
    tracer = getattr(jax_core, "Tracer", None)
    if tracer is not None and _any_of_type(tracer, arrays):
        return True
    return torch_compiling() and _any_of_type(sys.modules["torch"].Tensor, arrays)


def refuse_jit_trace(*arrays: Array | None) -> None:
    """Raise if ``torch.jit.trace`` is recording a call on tensors among ``arrays``.

    A trace records the PyTorch operators a call runs and replays them for every later
    input. Pooling reads values on the host (checks, convergence) and runs kernels outside
    PyTorch (Numba on NumPy views), which the record would keep as constants: the traced
    input's result for every input, with only TracerWarnings to say so. Refused instead;
    ``torch.export`` and ``torch.compile`` trace it (see README, "torch.compile and
    torch.export")."""
    if torch_compiling():  # dynamo cannot trace the question (and jit is not tracing)
        return
    torch = sys.modules.get("torch")
    if torch is not None and torch.jit.is_tracing() and _any_of_type(torch.Tensor, arrays):
        raise RuntimeError(
            "torch.jit.trace cannot record token pooling: its kernels and host reads would "
            "be replayed as constants, this input's result for every input. Use "
            "torch.export.export or torch.compile(fullgraph=True), which trace it.")


def _any_of_type(kind: type, arrays: tuple[Array, ...]) -> bool:
    for a in arrays:  # a loop: see _all_of_type
        if isinstance(a, kind):
            return True
    return False


def device(x: Array) -> Any:
    """The device ``x`` lives on."""
    if _is_ndarray(x):
        return "cpu"  # as array-api-compat says
    return x.device if _is_tensor(x) else array_api_compat.device(x)


def backend_name(xp: Namespace) -> str:
    """Short name of the library behind ``xp``, used to pick fast paths and in messages."""
    if getattr(xp, "__name__", None) in ("torch", "array_api_compat.torch"):  # see _is_tensor
        return "torch"
    known = _BACKEND_NAMES.get(id(xp))  # a few times a pool call: once per namespace
    if known is not None and known[0] is xp:
        return known[1]
    name = _backend_name(xp)
    _BACKEND_NAMES[id(xp)] = (xp, name)  # kept alive with its name: its id is not reused
    return name


#: Names found by :func:`backend_name`, by namespace id (a plain dict, not functools.cache:
#: torch.compile warns at every lru_cache-wrapped function it traces).
_BACKEND_NAMES: dict[int, tuple[Namespace, str]] = {}


def _backend_name(xp: Namespace) -> str:
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
    itemsize = getattr(dtype, "itemsize", None)  # NumPy's and PyTorch's dtypes: no finfo
    bits = 8 * itemsize if type(itemsize) is int else xp.finfo(dtype).bits
    if bits < 32:
        return xp.float32
    return dtype


def is_real_floating(xp: Namespace, dtype: Any) -> bool:
    """``xp.isdtype(dtype, "real floating")``, answered directly for NumPy's and PyTorch's
    dtypes (array-api-compat's answer for PyTorch is a Python function of a dozen tests,
    asked several times a pool call)."""
    if isinstance(dtype, np.dtype):
        if xp is _NAMESPACES["numpy"]:  # not JAX, CuPy: NumPy dtypes of their own rules
            return dtype.kind == "f"  # np.issubdtype(dtype, np.floating), as NumPy's isdtype
    elif _tensor_type() is not None and type(dtype) is sys.modules["torch"].dtype:
        return bool(dtype.is_floating_point)  # array-api-compat's test for PyTorch
    return bool(xp.isdtype(dtype, "real floating"))


def constant(xp: Namespace, value: float, like: Array) -> Array:
    """A 0-d array holding ``value`` with the dtype and device of ``like``.

    Filled where ``like`` lives (``full``) rather than converted from the Python number
    (``asarray``): on a GPU the conversion is a copy from host memory, which waits for the
    device (and cannot be captured in a CUDA graph). NumPy converts: it is faster there.
    """
    if xp is _NAMESPACES["numpy"]:
        return np.asarray(value, dtype=like.dtype)
    return xp.full((), value, dtype=like.dtype, device=device(like))


def index_dtype(xp: Namespace, like: Array) -> Any:
    """The namespace's default integer dtype for indices on ``like``'s device."""
    return xp.__array_namespace_info__().default_dtypes(device=device(like))["indexing"]


def take_along_axis(xp: Namespace, x: Array, indices: Array, axis: int) -> Array:
    """``take_along_axis`` (array API 2024.12) with the index broadcast to ``x`` first. The
    indices are non-negative (every caller's are): PyTorch's tensors take ``Tensor.gather``
    directly, as array-api-compat's version first maps negative indices (three operations
    more a call: kernels on a GPU)."""
    shape = list(x.shape)
    shape[axis] = indices.shape[axis]
    if _is_tensor(x):
        return x.gather(axis, indices.expand(shape))
    indices = xp.broadcast_to(indices, tuple(shape))
    return xp.take_along_axis(x, indices, axis=axis)
