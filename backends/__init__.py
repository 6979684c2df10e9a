"""Fast paths: per-library replacements for the generic primitives.

Installed as ``tokenpool_ops.backends``. Each module here maps primitive names to faster
versions for one library; :func:`primitives_for` picks them automatically, and
``fast_paths=False`` on any public function forces the generic array-API code instead. The
tests check every fast path against its generic counterpart.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from tokenpool_ops._compat import Namespace, backend_name
from tokenpool_ops._primitives import Primitives

__all__ = ["primitives_for"]


def _fast_paths(name: str) -> dict[str, Callable[..., Any]]:
    # Imported lazily: the numpy module needs nothing extra, the torch module needs torch.
    if name == "numpy":
        from . import _numpy

        return _numpy.FAST_PATHS
    if name == "torch":
        from . import _torch

        return _torch.FAST_PATHS
    return {}


def _compiled_paths(name: str) -> dict[str, Callable[..., Any]]:
    # The Numba kernels, for the libraries whose arrays Numba can read in place.
    if name not in ("numpy", "torch") or importlib.util.find_spec("numba") is None:
        return {}
    if name == "numpy":
        from . import _numpy

        return _numpy.compiled_paths()
    from . import _torch

    return _torch.compiled_paths()


def primitives_for(xp: Namespace, fast_paths: bool = True) -> Primitives:
    """The primitives to use for namespace ``xp``: fast paths where we have them, the
    library's own first, then the Numba kernels where Numba is installed."""
    generic = Primitives(xp)
    if not fast_paths:
        return generic
    name = backend_name(xp)
    overrides = {**_fast_paths(name), **_compiled_paths(name)}
    return replace(generic, name=name, **overrides) if overrides else generic
