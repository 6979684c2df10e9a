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
    environment["PYTHONPATH"] = conftest.checkout_first(environment.get("PYTHONPATH"))
    if require:
        environment[conftest.REQUIRE_CUDA] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-p", "tests.conftest", "-rs", test], cwd=ROOT, env=environment,
                          capture_output=True, text=True, check=False)


#: A test file of every kind of outcome, run with this suite's conftest as a plugin.
SKIPS = """
import pytest

@pytest.fixture
def gpu():
    pytest.skip("torch-cuda: no CUDA GPU on this machine")

def test_without_cupy():
    pytest.skip("cupy is not installed (No module named 'cupy')")

def test_at_setup(gpu):
    pass

def test_without_a_capability():
    pytest.skip("cupy has no bfloat16")

def test_without_jax():
    pytest.skip("jax is not installed")

def test_that_runs():
    pass
"""


def test_the_gpu_check_turns_cuda_skips_into_failures(tmp_path):
    # The same tests skip by default and, under the GPU check's variable, fail where the GPU
    # or CuPy is missing (at setup: an error); other skips stay skips. Stand-in tests, so
    # that this holds on a machine with a GPU too.
    (tmp_path / "test_skips.py").write_text(SKIPS)
    plain = _pytest(str(tmp_path / "test_skips.py"), require=False)
    assert plain.returncode == 0, plain.stdout[-2000:]
    assert "1 passed, 4 skipped" in plain.stdout, plain.stdout[-2000:]
    required = _pytest(str(tmp_path / "test_skips.py"), require=True)
    assert required.returncode == 1, required.stdout[-2000:]
    assert "1 failed, 1 passed, 2 skipped, 1 error" in required.stdout, required.stdout[-2000:]
    assert required.stdout.count(f"{conftest.REQUIRE_CUDA}=1, and this test skipped") == 2
