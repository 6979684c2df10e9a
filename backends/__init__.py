"""Fast paths: per-library replacements for the generic primitives.

Installed as ``tokenpool_ops.backends``. Each module here maps primitive names to faster
versions for one library; :func:`primitives_for` picks them automatically, and
``fast_paths=False`` on any public function forces the generic array-API code instead. The
tests check every fast path against its generic counterpart.
"""

from __future__ import annotations

if __name__ != "tokenpool_ops.backends":
    # A source checkout also offers this folder as a top-level package. Imported by that
    # name it would be a second copy, and its _torch_ops would register PyTorch's custom
    # operators again: torch frees the first registrations, which the first copy still calls
    # (a use-after-free that crashed a CI run at random, long after the import).
    raise ImportError(f"import this folder as tokenpool_ops.backends, not as {__name__!r}: "
                      f"a second copy would re-register the PyTorch custom operators")

import warnings
from collections.abc import Callable
from typing import Any

from tokenpool_ops._compat import Namespace, backend_name, torch_compiling
from tokenpool_ops._primitives import Primitives

__all__ = ["numba_available", "primitives_for"]


def _fast_paths(name: str) -> dict[str, Callable[..., Any]]:
    # Imported lazily: the numpy module needs nothing extra, the torch module needs torch.
    # PyTorch's include the CUDA kernels for CUDA tensors (through CuPy): no Numba needed.
    # The module is looked up once (an import statement costs a pass through the import
    # machinery at every pool call); its table is read at every call, as tests swap it.
    traced = name == "torch" and torch_compiling()  # no memo read: see torch_compiling
    module: Any = None if traced else _fast_path_modules.get(name)
    if module is None:
        if name == "numpy":
            from . import _numpy as module
        elif name == "torch":
            from . import _torch as module  # type: ignore[no-redef]
        elif name == "cupy":
            from . import _cupy as module  # type: ignore[no-redef]
        else:
            return _NO_PATHS
        if not traced:
            _fast_path_modules[name] = module
    paths: dict[str, Callable[..., Any]] = module.FAST_PATHS
    return paths


#: The modules of the fast paths, by library name, once imported.
_fast_path_modules: dict[str, Any] = {}


#: numba_available's answer once known. A plain dict, not functools.cache: dynamo traces
#: through a cache wrapper and warns about it in every compiled model that asks.
_numba_answer: dict[str, bool] = {}


def numba_available() -> bool:
    """Whether the compiled CPU kernels can run. Numba is a dependency; where it cannot be
    imported (a platform without wheels, a broken install), say once what that costs."""
    if "numba" not in _numba_answer:
        _numba_answer["numba"] = _import_numba()
    return _numba_answer["numba"]


def _import_numba() -> bool:
    try:
        import numba  # noqa: F401
    except Exception as error:  # ImportError, or llvmlite failing to load its library
        warnings.warn(
            f"tokenpool_ops: Numba could not be imported ({error}). K-Medoids and K-Means on "
            "NumPy arrays and PyTorch CPU tensors run on the array-API path instead of the "
            "compiled kernels: about 3x slower for K-Medoids and 6x for K-Means (measured at "
            "64 x 196 tokens of 384 features). Install numba to get them back.",
            RuntimeWarning, stacklevel=2)
        return False
    return True


#: No overrides: one shared table, so that primitives_for's cache recognises it.
_NO_PATHS: dict[str, Callable[..., Any]] = {}
#: The compiled paths of each library, built once (their entries are module functions).
_compiled_by_name: dict[str, dict[str, Callable[..., Any]]] = {}


def _compiled_paths(name: str) -> dict[str, Callable[..., Any]]:
    # The Numba kernels, for the libraries whose arrays Numba can read in place.
    if name not in ("numpy", "torch") or not numba_available():
        return _NO_PATHS
    if name not in _compiled_by_name:
        if name == "numpy":
            from . import _numpy as module
        else:
            from . import _torch as module  # type: ignore[no-redef]
        _compiled_by_name[name] = module.compiled_paths()
    return _compiled_by_name[name]


#: The primitives last built for each library, with the namespace and the two override
#: tables they were built from: a pool call asks for them a few times, and building them
#: (a dataclass of 17 fields) cost a tenth of a B = 1 call. The tables are constants; a
#: table swapped (tests do) has another identity and rebuilds the primitives.
_built: dict[str, tuple[Namespace, object, object, Primitives]] = {}


def primitives_for(xp: Namespace, fast_paths: bool = True) -> Primitives:
    """The primitives to use for namespace ``xp``: fast paths where we have them, the
    library's own first, then the Numba kernels where Numba is installed."""
    if not fast_paths:
        return Primitives(xp)
    name = backend_name(xp)
    fast, compiled = _fast_paths(name), _compiled_paths(name)
    traced = name == "torch" and torch_compiling()  # no memo read: see torch_compiling
    built = None if traced else _built.get(name)
    if built is not None and built[0] is xp and built[1] is fast and built[2] is compiled:
        return built[3]
    overrides = {**fast, **compiled}
    prims = Primitives(xp, name=name, **overrides) if overrides else Primitives(xp)
    if not traced:
        _built[name] = (xp, fast, compiled, prims)
    return prims
