"""On a machine with a GPU a missing or broken CuPy fails the check, never passes as skips.

* ``tests/conftest.py`` fails the CuPy backend where CuPy is installed but cannot count
  devices while PyTorch sees a GPU (a broken install), and skips it only where there is no
  GPU at all;
* with ``TOKENPOOL_OPS_REQUIRE_CUDA=1``, which ``benchmarks/gpu_check.sh`` sets for its test
  step, every test skipped for want of CuPy, CUDA or a GPU fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests import conftest

ROOT = Path(__file__).resolve().parents[1]


def broken_cupy() -> SimpleNamespace:
    def no_driver() -> int:
        raise RuntimeError("cudaErrorInsufficientDriver")

    return SimpleNamespace(cuda=SimpleNamespace(runtime=SimpleNamespace(
        getDeviceCount=no_driver)))


@pytest.mark.parametrize("gpu", [True, False], ids=["gpu", "no-gpu"])
def test_a_broken_cupy_fails_where_there_is_a_gpu(monkeypatch, gpu):
    monkeypatch.setitem(sys.modules, "cupy", broken_cupy())
    monkeypatch.setattr(conftest, "_torch_sees_a_gpu", lambda: gpu)
    outcome = pytest.fail.Exception if gpu else pytest.skip.Exception
    with pytest.raises(outcome, match="broken" if gpu else "no CUDA GPU"):
        conftest.load_backend("cupy")


def _pytest(test: str, require: bool) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != conftest.REQUIRE_CUDA}
    environment["PYTHONPATH"] = str(ROOT) + os.pathsep + environment.get("PYTHONPATH", "")
    if require:
        environment[conftest.REQUIRE_CUDA] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-rs", test], cwd=ROOT, env=environment, capture_output=True,
                          text=True, check=False)


def test_the_gpu_check_turns_cuda_skips_into_failures():
    # The CuPy and torch-cuda cases of one backend-parametrised test: skipped here (no GPU,
    # no CuPy) by default; failed, with the reason, under the GPU check's variable.
    loaders = [name for name in conftest.LOADERS if name in ("cupy", "torch-cuda")]
    runnable = [name for name in loaders if _loads(name)]
    if runnable:
        pytest.skip(f"{', '.join(runnable)} can run here: nothing is skipped to turn into a "
                    "failure")
    # A test without CuPy or CUDA passes under the variable: only GPU skips become failures.
    assert _pytest("tests/test_pool.py::test_default_method_is_wkmedoids",
                   require=True).returncode == 0
    selection = "tests/test_against_references.py::test_significance_scores_match_eq5_loop"
    plain = _pytest(selection, require=False)
    assert plain.returncode == 0 and "skipped" in plain.stdout, plain.stdout[-2000:]
    required = _pytest(selection, require=True)
    assert required.returncode == 1, required.stdout[-2000:]
    # A skip at setup (the backend fixture) is reported as an error, one per GPU backend.
    failed = required.stdout.count(f"{conftest.REQUIRE_CUDA}=1, and this test skipped")
    assert failed == len(loaders), required.stdout[-2000:]


def _loads(name: str) -> bool:
    try:
        conftest.load_backend(name)
    except pytest.skip.Exception:
        return False
    return True
