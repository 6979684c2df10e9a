"""Root pytest configuration: Numba bounds checking, and doctests of optional modules need
their optional libraries."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

# The Numba kernels run with bounds checking in the tests, so that an index out of range
# fails as an IndexError instead of corrupting memory. Numba's cache does not key on that
# flag, so the checked builds get a cache folder of their own. (Set before numba is imported.)
os.environ["NUMBA_BOUNDSCHECK"] = "1"
os.environ["NUMBA_CACHE_DIR"] = str(Path(__file__).parent / ".pytest_cache" / "numba-boundscheck")

# tokenpool_ops/{nn,timm,visualize}.py import torch (and timm); without them their doctests
# cannot be collected, and tests/test_nn_timm.py skips with its reason instead.
collect_ignore = [
    f"tokenpool_ops/{name}.py"
    for name, needs in (("nn", ("torch",)), ("timm", ("torch", "timm")),
                        ("visualize", ("torch", "timm", "PIL")))
    if any(importlib.util.find_spec(module) is None for module in needs)
]
# The trainer and the FLOP counter read timm models.
if any(importlib.util.find_spec(module) is None for module in ("torch", "timm")):
    collect_ignore.append("reference_models")
