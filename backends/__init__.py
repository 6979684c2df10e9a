"""Fast paths: per-library replacements for the generic primitives.

Installed as ``tokenpool_ops.backends``. Each module here maps primitive names to faster
versions for one library; :func:`primitives_for` picks them automatically, and
``fast_paths=False`` on any public function forces the generic array-API code instead. The
tests check every fast path against its generic counterpart.
"""

from __future__ import annotations

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


def primitives_for(xp: Namespace, fast_paths: bool = True) -> Primitives:
    """The primitives to use for namespace ``xp``: fast paths where we have them."""
    generic = Primitives(xp)
    if not fast_paths:
        return generic
    name = backend_name(xp)
    overrides = _fast_paths(name)
    return replace(generic, name=name, **overrides) if overrides else generic
