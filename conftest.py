"""Root pytest configuration: doctests of optional modules need their optional libraries."""

from __future__ import annotations

import importlib.util

# tokenpool_ops/{nn,timm,visualize}.py import torch (and timm); without them their doctests
# cannot be collected, and tests/test_nn_timm.py skips with its reason instead.
collect_ignore = [
    f"tokenpool_ops/{name}.py"
    for name, needs in (("nn", ("torch",)), ("timm", ("torch", "timm")),
                        ("visualize", ("torch", "timm", "PIL")))
    if any(importlib.util.find_spec(module) is None for module in needs)
]
