"""The fused CUDA K-Medoids kernel against the generic GPU paths (issue #10's grid).

As an asv suite (``time_pool``), and as a script that prints one table, which
``benchmarks/gpu_check.sh`` runs for issue #19's shape:
``python benchmarks/benchmarks/bench_cuda.py [--cases 256x197/98,64x577/144]`` (all cases
by default).

Columns, all ``pool(x, k, "wkmedoids", scores=s)`` with the default checks unless noted,
float32 tokens of M = 384 features, the device awaited inside each timed call, median ms:

* ``kernel``: the clustering alone (``backends._cupy.run_kmedoids``, CuPy arrays);
* ``torch kernel`` / ``torch generic``: PyTorch CUDA tensors, fast paths on / off;
* ``torch kernel nochk``: the same with ``check_values=False, stop_early=False``;
* ``cupy kernel`` / ``cupy generic``: CuPy arrays, fast paths on / off;
* ``ToMe``: the ToMe-style bipartite merge of ``benchmarks/compare_peers.py`` (r = N - k).

A column that could not run (a library or the GPU missing, or the kernel not used) says
why. ToMe merges at most half the tokens in one step (r is capped at N // 2), so at
K < N / 2 it keeps more tokens than K.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

import tokenpool_ops

#: (B, N, K) of issue #10: ViT-S/16 at 224 (N = 197), ViT-B/16 at 384 (577), and 1025.
CASES = [(64, 197, 49), (64, 197, 98), (256, 197, 49), (256, 197, 98), (64, 577, 144),
         (64, 1025, 256)]
FEATURES = 384
COLUMNS = ["kernel", "torch kernel", "torch kernel nochk", "torch generic", "cupy kernel",
           "cupy generic", "ToMe"]


def _inputs(b: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((b, n, FEATURES), dtype=np.float32)
    return x, rng.random((b, n), dtype=np.float32)


def _tome() -> Callable[..., Any] | None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    try:
        from compare_peers import tome_merge
    except ImportError:
        return None
    return tome_merge


def _libraries() -> tuple[Any, Any, str, str]:
    """(cupy or None, torch or None, why the CuPy columns cannot run, why the torch ones
    cannot); decided before any input is made, so that a machine without a GPU skips fast."""
    try:
        import cupy

        cupy_missing = "" if cupy.cuda.runtime.getDeviceCount() > 0 else "no CUDA GPU"
    except ImportError:
        cupy, cupy_missing = None, "no CuPy"
    except Exception as error:  # CuPy installed, but no driver or no device
        cupy, cupy_missing = None, f"no CUDA GPU ({type(error).__name__})"
    try:
        import torch

        torch_missing = "" if torch.cuda.is_available() else "no CUDA GPU"
    except ImportError:
        torch, torch_missing = None, "no torch"
    return cupy, torch, cupy_missing, torch_missing


def _calls(b: int, n: int, k: int) -> dict[str, Callable[[], object] | str]:
    """Each column's call on fresh device inputs, or why it cannot run."""
    from tokenpool_ops.backends import _cupy

    cupy, torch, cupy_missing, torch_missing = _libraries()
    calls: dict[str, Callable[[], object] | str] = {
        column: torch_missing if column.startswith(("torch", "ToMe")) else cupy_missing
        for column in COLUMNS}
    if cupy_missing and torch_missing:
        return calls
    x, scores = _inputs(b, n)
    if not cupy_missing:
        xc, sc = cupy.asarray(x), cupy.asarray(scores)
        mean = xc.mean(axis=1, keepdims=True)
        init = cupy.argsort(-sc, axis=1)[:, :k]
        calls["kernel"] = lambda: _cupy.run_kmedoids(xc, mean, init, sc, 10, True)
        calls["cupy kernel"] = lambda: tokenpool_ops.pool(xc, k, "wkmedoids", scores=sc)
        calls["cupy generic"] = lambda: tokenpool_ops.pool(xc, k, "wkmedoids", scores=sc,
                                                           fast_paths=False)
    if not torch_missing:
        xt, st = torch.as_tensor(x, device="cuda"), torch.as_tensor(scores, device="cuda")
        calls["torch kernel"] = lambda: tokenpool_ops.pool(xt, k, "wkmedoids", scores=st)
        calls["torch kernel nochk"] = lambda: tokenpool_ops.pool(
            xt, k, "wkmedoids", scores=st, check_values=False, stop_early=False)
        calls["torch generic"] = lambda: tokenpool_ops.pool(xt, k, "wkmedoids", scores=st,
                                                            fast_paths=False)
        tome = _tome()
        calls["ToMe"] = (lambda: tome(xt, n - k)) if tome else "compare_peers not found"
    return calls


#: The shapes of the kernel's distance fill (backends/_cupy.py, TILE_ROWS), by tile rows.
TILE_SHAPES = {1: "4 x 4 tiles", 2: "8 x 4 pair tiles"}


def fill_shapes(cases: list[tuple[int, int, int]]) -> Iterator[str]:
    """Which instantiation, and so which tile shape of the distance fill, the kernel runs
    for each case on the current device (the glue picks the shape by architecture)."""
    from tokenpool_ops.backends import _cupy

    cupy, _, cupy_missing, _ = _libraries()
    if cupy_missing:
        yield f"kernel fill: not known ({cupy_missing})"
        return
    device = cupy.cuda.Device()
    rows = _cupy._tile_rows(device.id)
    for b, n, k in cases:
        plan = _cupy.kmedoids_plan(n, k, "float32", _cupy._max_shared_bytes(device.id), rows)
        used = f"{TILE_SHAPES[rows]}, {plan.kernel}" if plan else "kernel declines"
        yield f"kernel fill at {b}x{n}/{k}, sm_{device.compute_capability}: {used}"


def _uses_kernel(call: Callable[[], object]) -> bool:
    """Whether one call of ``call`` ran the kernel."""
    from tokenpool_ops.backends import _cupy

    plain, runs = _cupy.run_kmedoids, []

    def counted(*args: Any) -> Any:
        runs.append(1)
        return plain(*args)

    _cupy.run_kmedoids = counted
    try:
        call()
    finally:
        _cupy.run_kmedoids = plain
    return bool(runs)


def _wait() -> None:
    for name in ("torch", "cupy"):
        module = sys.modules.get(name)
        if name == "torch" and module is not None and module.cuda.is_available():
            module.cuda.synchronize()
        elif name == "cupy" and module is not None:
            module.cuda.Device().synchronize()


def median_ms(call: Callable[[], object], repeat: int = 15, budget_s: float = 1.0) -> float:
    """Median of up to ``repeat`` timed calls, fewer where a call is slow (the whole table
    must fit in the GPU check's time limit)."""
    for _ in range(2):  # compile, allocate, warm the caches
        start = time.perf_counter()
        call()
        _wait()
    repeat = max(3, min(repeat, int(budget_s / max(time.perf_counter() - start, 1e-6))))
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        _wait()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _row(b: int, n: int, k: int) -> str:
    cells, timings = [], {}
    for column, call in _calls(b, n, k).items():
        if isinstance(call, str):
            cells.append(call)
            continue
        if "kernel" in column and column != "kernel" and not _uses_kernel(call):
            cells.append("kernel not used")
            continue
        timings[column] = median_ms(call)
        cells.append(f"{timings[column]:.3f}")
    speedup = ("" if "torch kernel" not in timings or "torch generic" not in timings
               else f"{timings['torch generic'] / timings['torch kernel']:.1f}x")
    return f"| {b} | {n} | {k} | " + " | ".join(cells) + f" | {speedup} |"


def table(cases: list[tuple[int, int, int]] = CASES) -> Iterator[str]:
    """The table, one line at a time: a run cut short by a time limit keeps its rows."""
    yield "| B | N | K | " + " | ".join(COLUMNS) + " | speed-up vs torch generic |"
    yield "|---:|---:|---:|" + "---:|" * (len(COLUMNS) + 1)
    for b, n, k in cases:
        yield _row(b, n, k)


def parse_cases(text: str) -> list[tuple[int, int, int]]:
    """``"256x197/98,64x577/144"`` -> [(256, 197, 98), (64, 577, 144)]."""
    cases = []
    for case in text.split(","):
        shape, k = case.strip().split("/")
        b, n = shape.split("x")
        cases.append((int(b), int(n), int(k)))
    return cases


class PoolOnGpu:
    """asv: every column of the table, per case."""

    params = (COLUMNS, [f"{b}x{n}/{k}" for b, n, k in CASES])
    param_names = ("implementation", "B x N / K")
    timeout = 300.0

    def setup(self, implementation: str, case: str) -> None:
        shape, k = case.split("/")
        b, n = (int(v) for v in shape.split("x"))
        call = _calls(b, n, int(k))[implementation]
        if isinstance(call, str):
            raise NotImplementedError(call)  # asv: skipped
        self.call = call
        median_ms(call, repeat=1)

    def time_pool(self, implementation: str, case: str) -> None:
        self.call()
        _wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--cases", type=parse_cases, default=CASES,
                        help="B x N / K cases, e.g. 256x197/98,64x577/144 (default: all)")
    options = parser.parse_args()
    for line in fill_shapes(options.cases):
        print(line)
    print(f"\nwkmedoids pool, float32, M = {FEATURES}, median ms (device awaited):\n")
    for line in table(options.cases):
        print(line, flush=True)
        print(line, file=sys.stderr, flush=True)  # progress, where stdout is captured
