#!/usr/bin/env bash
# Build the wheel, check that no top-level "backends" module is in it, install it (no extras)
# into a fresh virtual environment, check that the compiled kernels are active there, and
# import it both from outside the source tree and from the repository root (where the
# source folder tokenpool_ops/ shadows the installed package).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
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
assert "tokenpool_ops/backends/cuda/kmedoids.cu" in names, "CUDA sources missing from the wheel"
print(f"wheel ok: {len(names)} files, top level {top}")
PY

python3 -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet "$wheel"
check='
import importlib.util, warnings
import numpy as np
warnings.simplefilter("error")  # a missing Numba would warn: make it fail here
import tokenpool_ops, tokenpool_ops.backends
from tokenpool_ops.backends import primitives_for
import array_api_compat.numpy as xp
import sys
if sys.argv[1] == "outside":  # in the repository root, its own backends/ folder is found
    assert importlib.util.find_spec("backends") is None, "a top-level backends module is installed"
assert primitives_for(xp).kmedoids is not None, "the Numba kernels are not active"
out = tokenpool_ops.pool(np.random.default_rng(0).normal(size=(2, 10, 3)), 4)
assert out.shape == (2, 4, 3)
print("ok:", tokenpool_ops.__file__, "with", tokenpool_ops.backends.__file__)
'
(cd "$work" && "$work/venv/bin/python" -c "$check" outside)
(cd "$repo" && "$work/venv/bin/python" -c "$check" root)
