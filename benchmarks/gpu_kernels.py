"""The CUDA kernels' part of benchmarks/gpu_check.sh, for a machine with a GPU.

    python benchmarks/gpu_kernels.py probe        # library versions; exit 1 without a CUDA GPU
    python benchmarks/gpu_kernels.py launch-each  # one small launch of every instantiation

``launch-each`` is what compute-sanitizer (memcheck, racecheck) runs: each instantiation the
glue names (``backends._cupy.kernel_names``) once, on B=2 problems of N=24 tokens, M=40
features, K=5, with the distances in shared memory and in the global workspace, and the
merge with its objective; the tokens are a view past one prefix token of (B, 1 + N, M)
sequences, as a pooling ViT block passes them (``x_stride`` (1 + N) M). CuPy's memory pool
is switched off, so that every buffer is its own allocation and memcheck sees its exact
bounds. The tests run :func:`launches` on the CPU with the host build of the kernels
(tests/test_cuda_kernel.py).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import itertools
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from tokenpool_ops.backends import _cupy

#: (B, N, M, K) of each launch: small, so that the sanitizers finish in seconds.
SHAPE = (2, 24, 40, 5)
MAX_ITER = 3


def _bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """bfloat16 as its bits (uint16), rounded down: neither NumPy nor CuPy has the type."""
    return (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


def launches(np_like: Any, launch: _cupy.KMedoidsLauncher, launch_merge: _cupy.MergeLauncher
             ) -> Iterator[str]:
    """Launches every instantiation once, with inputs made by ``np_like`` (``cupy`` on a GPU,
    ``numpy`` with the host build), and yields its name after its launch."""
    b, n, m, k = SHAPE
    rng = np.random.default_rng(0)
    values = rng.normal(size=(b, n, m)).astype(np.float32)
    sequences = np.concatenate([rng.normal(size=(b, 1, m)), values], axis=1)
    mean = np_like.asarray(values.mean(axis=1, keepdims=True))
    init = np_like.asarray(np.stack([rng.permutation(n)[:k] for _ in range(b)]))
    weights = np_like.asarray(rng.random((b, n)).astype(np.float32))
    for dtype_name in _cupy.CXX_TYPES:
        # bfloat16 travels as its bits; the arguments are made for float16, of the same size.
        stand_in = "float16" if dtype_name == "bfloat16" else dtype_name
        x = np_like.asarray(sequences.astype(stand_in))[:, 1:]
        bits = (np_like.asarray(_bfloat16_bits(sequences))[:, 1:] if dtype_name == "bfloat16"
                else x)
        for shared_matrix, rows in itertools.product((True, False), _cupy.TILE_ROWS):
            plan = _cupy.KMedoidsPlan(
                _cupy.kernel_name(dtype_name, shared_matrix, rows), shared_matrix,
                _cupy.kmedoids_shared_bytes(n, k, dtype_name, shared_matrix, rows), rows)
            args = _cupy.kernel_arguments(np_like, x, mean, init, weights, MAX_ITER, plan)
            launch(dataclasses.replace(args, x=bits), plan, MAX_ITER)
            yield plan.kernel
        merge = _cupy.merge_arguments(np_like, x, mean, args.labels, k, weights, weights,
                                      weights, True)
        launch_merge(dataclasses.replace(merge, x=bits, kernel=_cupy.merge_name(dtype_name)),
                     True)
        yield _cupy.merge_name(dtype_name)


def launch_each() -> int:
    import cupy

    cupy.cuda.set_allocator(None)  # see the module's docstring
    device = cupy.cuda.Device()
    print(f"one launch of each instantiation, (B, N, M, K) = {SHAPE}, device {device.id}:")
    start = time.perf_counter()
    with device:
        for name in launches(cupy, functools.partial(_cupy._launch, device.id),
                             functools.partial(_cupy._launch_merge, device.id)):
            device.synchronize()  # an error is reported at its own launch
            print(f"  {name}: done at {time.perf_counter() - start:.2f} s", flush=True)
    print(f"(kernels compiled or read from {_cupy.cache_dir()})")
    return 0


def probe() -> int:
    """Prints the libraries' versions; 0 when torch or CuPy sees a CUDA GPU, else 1."""
    for name in ("torch", "cupy", "numba", "timm", "jax"):
        try:
            print(f"{name} {importlib.import_module(name).__version__}")
        except Exception as error:  # missing, or failing to load
            print(f"{name}: not available ({type(error).__name__})")
    return 0 if _gpu_count("torch") or _gpu_count("cupy") else 1


def _gpu_count(library: str) -> int:
    try:
        module = importlib.import_module(library)
        if library == "torch":
            return int(module.cuda.device_count())
        return int(module.cuda.runtime.getDeviceCount())
    except Exception:  # the library is missing or sees no driver
        return 0


COMMANDS: dict[str, Callable[[], int]] = {"probe": probe, "launch-each": launch_each}

if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in COMMANDS:
        sys.exit(f"usage: {sys.argv[0]} {'|'.join(COMMANDS)}")
    sys.exit(COMMANDS[sys.argv[1]]())
