#!/usr/bin/env bash
# Build the wheel, check that no top-level "backends" module is in it, install it into a
# fresh virtual environment and import it from outside the source tree.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

.venv/bin/pip wheel --no-deps --quiet --wheel-dir "$work/dist" .
wheel=$(ls "$work"/dist/*.whl)
.venv/bin/python - "$wheel" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
top = sorted({n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")})
assert top == ["tokenpool_ops"], f"wheel holds top-level entries {top}"
assert "tokenpool_ops/backends/__init__.py" in names, "backends missing from the wheel"
assert "tokenpool_ops/py.typed" in names, "py.typed missing from the wheel"
print(f"wheel ok: {len(names)} files, top level {top}")
PY

python3 -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet "$wheel"
cd "$work"
"$work/venv/bin/python" - <<'PY'
import importlib.util
import numpy as np
import tokenpool_ops, tokenpool_ops.backends
assert importlib.util.find_spec("backends") is None, "a top-level backends module is installed"
out = tokenpool_ops.pool(np.random.default_rng(0).normal(size=(2, 10, 3)), 4, "kmedoids")
assert out.shape == (2, 4, 3)
print("fresh venv ok:", tokenpool_ops.__file__)
PY
