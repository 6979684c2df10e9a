"""Root pytest configuration: Numba bounds checking, doctests of optional modules need
their optional libraries, and skips summarised by reason."""

from __future__ import annotations

import importlib.util
import os
from collections import Counter
from pathlib import Path
from typing import Any

# The Numba kernels run with bounds checking in the tests, so that an index out of range
# fails as an IndexError instead of corrupting memory. Numba's cache does not key on that
# flag, so the checked builds get a cache folder of their own. (Set before numba is imported.)
os.environ["NUMBA_BOUNDSCHECK"] = "1"
os.environ["NUMBA_CACHE_DIR"] = str(Path(__file__).parent / ".pytest_cache" / "numba-boundscheck")

# tokenpool_ops/{nn,_patching,timm,transformers,visualize}.py import torch (and timm or
# transformers); without them their doctests cannot be collected, and tests/test_nn_timm.py
# and tests/test_transformers.py skip with their reasons instead.
collect_ignore = [
    f"tokenpool_ops/{name}.py"
    for name, needs in (("nn", ("torch",)), ("_patching", ("torch",)),
                        ("timm", ("torch", "timm")), ("transformers", ("torch", "transformers")),
                        ("visualize", ("torch", "timm", "PIL")))
    if any(importlib.util.find_spec(module) is None for module in needs)
]
# The trainer and the FLOP counter read timm models.
if any(importlib.util.find_spec(module) is None for module in ("torch", "timm")):
    collect_ignore.append("reference_models")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """One line per skip reason with its count, so that a failure is not buried under
    skips (``-ra`` would print one line per skipped test; pyproject asks for ``-rfEx``)."""
    reasons = Counter(_skip_reason(report) for report in terminalreporter.stats.get("skipped", []))
    if reasons:
        terminalreporter.section("skips by reason", sep="-")
        for reason, count in sorted(reasons.items(), key=lambda item: (-item[1], item[0])):
            terminalreporter.write_line(f"{count:5d} skipped: {reason}")


def _skip_reason(report: Any) -> str:
    """The reason a test was skipped: the message of its skip (or an xfail's reason)."""
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (path, line, "Skipped: why")
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(getattr(report, "wasxfail", longrepr))
