"""Importing tokenpool_ops from a source checkout, where backends/ is not inside it.

pyproject.toml installs the top-level ``backends/`` folder as ``tokenpool_ops.backends``. An
installed package has it; an editable install maps it. But Python run in the repository root
finds the source folder ``tokenpool_ops/`` first, and after a non-editable install nothing
maps ``backends/`` into it: the import would fail. Here we load it from beside the source
folder instead, under its package name.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

PACKAGE = "tokenpool_ops"


def attach_backends() -> None:
    """Make ``tokenpool_ops.backends`` importable when this package has no such subfolder
    (an editable install maps the very same folder)."""
    name = f"{PACKAGE}.backends"
    package_dir = Path(__file__).resolve().parent
    if name in sys.modules or (package_dir / "backends").is_dir():
        return
    source = package_dir.parent / "backends" / "__init__.py"
    if not source.is_file():
        raise ImportError(
            f"{name} is missing: {package_dir} is a source folder without the backends/ "
            f"folder beside it. Install the package (pip install .) and run from elsewhere, "
            f"or install it editable (pip install -e .)")
    spec = importlib.util.spec_from_file_location(
        name, source, submodule_search_locations=[str(source.parent)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    sys.modules[PACKAGE].backends = module  # type: ignore[attr-defined]  # as import would
