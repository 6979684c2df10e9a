"""Shared fixtures: every test taking ``backend`` runs on each installed array library.

A library that is not installed (or a GPU that is absent) is a skip with its reason, printed
by ``pytest -ra``. array-api-strict runs on its non-default fake device, so that any array
created on the wrong device fails loudly without a GPU.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# Every run of the README's test command draws the same examples ("ci", the default), so it
# is green on every run or on none. "dev" draws new examples each run (pick them with
# --hypothesis-seed=N); "explore" searches longer and keeps failures in .hypothesis/.
_QUIET = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
settings.register_profile("ci", derandomize=True, deadline=None, max_examples=25,
                          print_blob=True, suppress_health_check=_QUIET)
settings.register_profile("dev", deadline=None, max_examples=25, print_blob=True,
                          suppress_health_check=_QUIET)
settings.register_profile("explore", deadline=None, max_examples=250, print_blob=True,
                          suppress_health_check=_QUIET)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


#: The checkout's root, which subprocesses of the tests import tokenpool_ops from.
ROOT = Path(__file__).resolve().parents[1]


def checkout_first(pythonpath: str | None) -> str:
    """A PYTHONPATH with this checkout first and the caller's own entries after it (packages
    put beside the interpreter's, as on a lent GPU machine, stay importable)."""
    return os.pathsep.join(filter(None, [str(ROOT), pythonpath]))


def cuda_or_skip() -> Any:
    """``torch.device("cuda")``, or the test skips with the reason the GPU check's hook
    below turns into a failure: each GPU test has a CPU test of the same logic beside it."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine: the CPU tests above prove the same logic")
    return torch.device("cuda")


@dataclass(frozen=True)
class Backend:
    """One array library (and device) under test, with converters to and from NumPy."""

    name: str
    xp: Any  # array-API-compatible namespace
    device: Any
    _to_numpy: Callable[[Any], np.ndarray]

    def asarray(self, values: Any, dtype: Any = None) -> Any:
        values = np.asarray(values)
        if dtype is None:  # keep NumPy's dtype: float32 stays float32, Python floats float64
            dtype = getattr(self.xp, {"u": "int64"}.get(values.dtype.kind, values.dtype.name))
        return self.xp.asarray(values, dtype=dtype, device=self.device)

    def to_numpy(self, array: Any) -> np.ndarray:
        return np.asarray(self._to_numpy(array))

    def assert_like(self, array: Any, shape: tuple[int, ...], dtype: Any) -> None:
        """The array is of this library, on this device, with this shape and dtype."""
        from array_api_compat import array_namespace, device

        assert array_namespace(array) == self.xp
        assert same_device(device(array), self.device)
        assert tuple(array.shape) == tuple(shape)
        assert array.dtype == dtype


def same_device(a: Any, b: Any) -> bool:
    """Whether two devices are one: torch.device("cuda") and cuda:0 are, on device 0."""
    return _with_index(a) == _with_index(b)


def _with_index(device: Any) -> Any:
    """torch.device("cuda") is the current CUDA device: give it that index, so that it equals
    the device of a tensor on it (cuda:0)."""
    if getattr(device, "type", None) == "cuda" and getattr(device, "index", 0) is None:
        torch = importlib.import_module("torch")
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _numpy() -> Backend:
    import array_api_compat.numpy as xp

    return Backend("numpy", xp, "cpu", np.asarray)


def _torch(device: str) -> Backend:
    torch = importlib.import_module("torch")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("torch-cuda: no CUDA GPU on this machine")
    import array_api_compat.torch as xp

    return Backend(f"torch-{device}", xp, torch.device(device),
                   lambda a: a.detach().cpu().numpy())


def _jax() -> Backend:
    jax = importlib.import_module("jax")
    jax.config.update("jax_enable_x64", True)  # the tests compare float64 results
    import jax.numpy as jnp

    return Backend("jax", jnp, jax.devices("cpu")[0], np.asarray)


def _strict() -> Backend:
    xp = importlib.import_module("array_api_strict")
    cpu = xp.Device("CPU_DEVICE")
    return Backend("array_api_strict", xp, xp.Device("device1"),
                   lambda a: np.asarray(a.to_device(cpu)))


#: Set by benchmarks/gpu_check.sh: on a machine with a GPU every CuPy and CUDA test must run,
#: so a skip that says CuPy or the GPU is missing fails instead (see the hook below).
REQUIRE_CUDA = "TOKENPOOL_OPS_REQUIRE_CUDA"


def _torch_sees_a_gpu() -> bool:
    try:
        return bool(importlib.import_module("torch").cuda.is_available())
    except ImportError:
        return False


def _cupy() -> Backend:
    cupy = importlib.import_module("cupy")
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # no driver, or a CuPy that cannot load its CUDA libraries
        if _torch_sees_a_gpu():  # then there is a GPU: CuPy is broken, not idle
            pytest.fail(f"cupy is installed but broken: PyTorch sees a CUDA GPU and CuPy "
                        f"fails ({type(error).__name__}: {error})")
        pytest.skip(f"cupy: no CUDA GPU on this machine ({error})")
    if count == 0:
        pytest.skip("cupy: no CUDA GPU on this machine (0 devices)")
    import array_api_compat.cupy as xp

    return Backend("cupy", xp, cupy.cuda.Device(0), lambda a: a.get())


LOADERS: dict[str, Callable[[], Backend]] = {
    "numpy": _numpy,
    "torch-cpu": lambda: _torch("cpu"),
    "jax": _jax,
    "array_api_strict": _strict,
    "cupy": _cupy,
    "torch-cuda": lambda: _torch("cuda"),
}


def load_backend(name: str) -> Backend:
    """The backend called ``name``, or a skip that says why it is missing."""
    try:
        return LOADERS[name]()
    except ImportError as error:
        pytest.skip(f"{name} is not installed ({error})")


@pytest.fixture(params=list(LOADERS), scope="session")
def backend(request: pytest.FixtureRequest) -> Backend:
    return load_backend(request.param)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20211004)


@pytest.fixture(scope="session")
def backend_named() -> Callable[[str], Backend]:
    """For tests that choose their backends themselves: ``backend_named("torch-cpu")``."""
    return load_backend


@pytest.fixture(scope="session")
def devices_match() -> Callable[[Any, Any], bool]:
    """The device comparison of ``Backend.assert_like``, for its own test."""
    return same_device


#: What the skips say when the GPU or CuPy is missing (a skip for a capability, such as
#: "cupy has no bfloat16", stays a skip).
_GPU_MISSING = ("no cuda gpu", "cupy is not installed")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """With TOKENPOOL_OPS_REQUIRE_CUDA=1 (the GPU check), a test skipped for want of CuPy,
    CUDA or a GPU fails: there, a missing or broken CuPy must not pass as a skip."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get(REQUIRE_CUDA) != "1" or not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if any(phrase in reason.lower() for phrase in _GPU_MISSING):
        report.outcome = "failed"
        report.longrepr = f"{REQUIRE_CUDA}=1, and this test skipped: {reason}"
