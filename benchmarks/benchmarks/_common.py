"""Backends, parameter grids and input builders shared by the asv suites.

Not a suite itself (no ``time_``/``peakmem_`` names). Environment variables:

``TOKENPOOL_ASV_GRID``
    ``full`` (default): B in {1, 64, 256}, N in {197, 577}, M in {192, 384, 768}.
    ``ci``: B in {1}, N in {197}, M in {192}, k = N/4 only: the smoke grid, every backend
    and method once, a few minutes on 2 cores.
    ``compare``: B in {1, 64}, N in {197}, M in {384}: issue 23's shapes, for comparing two
    commits' results (``asv compare``) in minutes rather than hours.
``TOKENPOOL_ASV_MEM_FRACTION``
    Skip a case whose estimated working set exceeds this fraction of the free host (or
    device) memory; default 0.5.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

GRID = os.environ.get("TOKENPOOL_ASV_GRID", "full").strip().lower()
if GRID not in ("full", "ci", "compare"):
    raise ValueError(f"TOKENPOOL_ASV_GRID must be 'full', 'ci' or 'compare', got {GRID!r}")

BACKENDS = ["numpy", "torch-cpu", "jax-cpu", "cupy", "torch-cuda"]
METHODS = ["kmeans", "kmedoids", "wkmeans", "wkmedoids", "topk", "random", "importance", "tome"]
if GRID == "ci":
    BATCHES, TOKENS, FEATURES, K_FRACTIONS = [1], [197], [192], ["N/4"]
elif GRID == "compare":
    BATCHES, TOKENS, FEATURES, K_FRACTIONS = [1, 64], [197], [384], ["N/4", "N/2"]
else:
    BATCHES, TOKENS, FEATURES = [1, 64, 256], [197, 577], [192, 384, 768]
    K_FRACTIONS = ["N/4", "N/2"]
MEM_FRACTION = float(os.environ.get("TOKENPOOL_ASV_MEM_FRACTION", "0.5"))
#: asv's per-benchmark timeout (seconds): the largest CPU cases take tens of seconds a call.
TIMEOUT = 900.0


def k_of(n: int, fraction: str) -> int:
    return {"N/4": n // 4, "N/2": n // 2}[fraction]


@dataclass
class Backend:
    """How to move a NumPy array onto a backend and how to wait for its device."""

    name: str
    put: Callable[[np.ndarray], Any]
    gram: Callable[[Any], Any]
    wait: Callable[[Any], None]
    free_bytes: Callable[[], int]


def _host_free_bytes() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def load_backend(name: str) -> Backend:
    """The backend, or NotImplementedError (asv: skip) when it is not available here."""
    try:
        if name == "numpy":
            return Backend(name, lambda a: a, lambda a: a @ np.swapaxes(a, -1, -2),
                           lambda out: None, _host_free_bytes)
        if name in ("torch-cpu", "torch-cuda"):
            import torch

            if name == "torch-cuda":
                if not torch.cuda.is_available():
                    raise NotImplementedError("torch-cuda: no CUDA device")
                return Backend(name, lambda a: torch.from_numpy(a).cuda(),
                               lambda a: a @ a.mT, lambda out: torch.cuda.synchronize(),
                               lambda: int(torch.cuda.mem_get_info()[0]))
            return Backend(name, torch.from_numpy, lambda a: a @ a.mT, lambda out: None,
                           _host_free_bytes)
        if name == "jax-cpu":
            import jax
            import jax.numpy as jnp

            cpu = jax.devices("cpu")[0]

            def wait(out: Any) -> None:
                jax.block_until_ready(out)

            return Backend(name, lambda a: jax.device_put(a, cpu),
                           lambda a: a @ jnp.swapaxes(a, -1, -2), wait, _host_free_bytes)
        if name == "cupy":
            import cupy

            if cupy.cuda.runtime.getDeviceCount() < 1:
                raise NotImplementedError("cupy: no CUDA device")

            def wait_cupy(out: Any) -> None:
                cupy.cuda.get_current_stream().synchronize()

            return Backend(name, cupy.asarray, lambda a: a @ cupy.swapaxes(a, -1, -2),
                           wait_cupy, lambda: int(cupy.cuda.Device().mem_info[0]))
    except NotImplementedError:
        raise
    except Exception as err:  # ImportError, or a CUDA runtime that will not start
        raise NotImplementedError(f"{name}: {type(err).__name__}: {err}") from err
    raise ValueError(f"unknown backend {name!r}")


def estimated_bytes(b: int, n: int, m: int) -> int:
    """Generous working set of one pool call: a few copies of x and of the (B, N, N) matrix."""
    return 4 * (4 * b * n * m + 4 * b * n * n)


def check_fits(backend: Backend, b: int, n: int, m: int) -> None:
    need = estimated_bytes(b, n, m)
    free = backend.free_bytes()
    if need > MEM_FRACTION * free:
        raise NotImplementedError(f"needs ~{need / 2**20:.0f} MiB, "
                                  f"{free / 2**20:.0f} MiB free: skipped")


def make_inputs(b: int, n: int, m: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded float32 tokens (B, N, M) and significance scores (B, N)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, n, m), dtype=np.float32)
    scores = rng.random((b, n), dtype=np.float32)
    return x, scores
