"""One timing of ``pool(x, 98, "wkmedoids", scores=s)`` next to one batched ``x @ x^T``.

The Gram matrix is the floor for K-Medoids: its pairwise distances cost O(B N^2 M), and the
iterations after it only O(B (N^2 + N K)). Run: ``python benchmarks/pool_vs_gram.py``
(``--batches 1 64 --shape 0 197 384``: issue 23's shapes; B of ``--shape`` is then ignored).
The asv suite of this folder tracks performance over time; this script answers one question
in one run: how far above the floor is the whole operator, per backend? The two calls take
turns, so the ratio holds on a loaded machine where the milliseconds do not. ``--calls``
counts instead of timing: the Python function calls (cProfile) and, on PyTorch, the torch
function calls (a ``TorchFunctionMode``) of one pool call, figures no load changes;
``--cpu-time`` times process CPU time instead of the wall clock.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time
from collections.abc import Callable

import numpy as np

import tokenpool_ops


def best_ms(calls: dict[str, Callable[[], object]], repeat: int,
            sync: Callable[[], None], cpu_time: bool = False) -> dict[str, float]:
    """Best milliseconds of each call (``cpu_time``: the median process CPU time of 20
    calls in a row, per call). The calls take turns, one run each per round, so a machine
    whose speed drifts (other jobs, clocks) slows them alike."""
    for call in calls.values():
        call()  # warm-up: allocations, thread pools, lazy imports
    sync()
    clock, runs = (time.process_time, 20) if cpu_time else (time.perf_counter, 1)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeat):
        for name, call in calls.items():
            start = clock()
            for _ in range(runs):
                call()
            sync()
            times[name].append((clock() - start) / runs)
    pick = statistics.median if cpu_time else min
    return {name: 1e3 * pick(seconds) for name, seconds in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(64, 196, 384),
                        metavar=("B", "N", "M"))
    parser.add_argument("--k", type=int, default=98)
    parser.add_argument("--batches", type=int, nargs="+", metavar="B",
                        help="time these batch sizes in turn (replaces the B of --shape)")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--calls", action="store_true",
                        help="count the function calls of one pool call instead of timing")
    parser.add_argument("--cpu-time", action="store_true",
                        help="median process CPU time per call instead of the best wall "
                             "clock: a loaded machine inflates it less (run it with one "
                             "thread: OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 "
                             "NUMBA_NUM_THREADS=1, or spinning threads count too)")
    args = parser.parse_args()
    for b in args.batches or [args.shape[0]]:
        if args.calls:
            count_calls((b, *args.shape[1:]), args.k)
        else:
            time_shape((b, *args.shape[1:]), args.k, args.repeat, args.cpu_time)


def count_calls(shape: tuple[int, ...], k: int) -> None:
    """Python function calls (cProfile's count, builtins included) of one pool call, and
    on PyTorch the calls a TorchFunctionMode sees (operators and tensor attributes)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape).astype(np.float32)
    s = rng.random(shape[:2]).astype(np.float32)
    rows: list[tuple[str, object, object]] = [("numpy", x, s)]
    try:
        import torch

        rows.append(("torch-cpu", torch.from_numpy(x), torch.from_numpy(s)))
    except ImportError:
        torch = None
    print(f"x: float32 {tuple(shape)}, k={k}: calls of one pool(x, k, 'wkmedoids', scores=s)")
    print(f"{'backend':<11}{'python calls':>14}{'torch calls':>13}")
    for name, xa, sa in rows:
        def call(xa: object = xa, sa: object = sa) -> object:
            return tokenpool_ops.pool(xa, k, "wkmedoids", scores=sa)

        call()  # warm-up: lazy imports and first-call caches are not the per-call cost
        profile = cProfile.Profile()
        profile.runcall(call)
        python_calls = pstats.Stats(profile).total_calls  # type: ignore[attr-defined]
        torch_calls = "" if name == "numpy" else str(_torch_calls(torch, call))
        print(f"{name:<11}{python_calls:>14}{torch_calls:>13}")


def _torch_calls(torch: object, call: Callable[[], object]) -> int:
    from torch.overrides import TorchFunctionMode

    class Counter(TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            Counter.calls += 1
            return func(*args, **(kwargs or {}))

    with Counter():
        call()
    return Counter.calls


def time_shape(shape: tuple[int, ...], k: int, repeat: int, cpu_time: bool = False) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape).astype(np.float32)
    s = rng.random(shape[:2]).astype(np.float32)

    rows = [("numpy", x, s, lambda a: a @ np.swapaxes(a, -1, -2), lambda: None)]
    try:
        import torch

        rows.append(("torch-cpu", torch.from_numpy(x), torch.from_numpy(s),
                     lambda a: a @ a.mT, lambda: None))
        if torch.cuda.is_available():
            rows.append(("torch-cuda", torch.from_numpy(x).cuda(), torch.from_numpy(s).cuda(),
                         lambda a: a @ a.mT, torch.cuda.synchronize))
    except ImportError:
        print("torch is not installed: timing numpy only")

    how = f"median CPU time of {repeat} x 20 calls" if cpu_time else f"best of {repeat}"
    print(f"x: float32 {tuple(shape)}, k={k}, {how}, in turn")
    print(f"{'backend':<11}{'pool wkmedoids ms':>19}{'x @ x.T ms':>12}{'ratio':>8}")
    for name, xa, sa, gram, sync in rows:
        best = best_ms({"pool": lambda xa=xa, sa=sa: tokenpool_ops.pool(
                            xa, k, "wkmedoids", scores=sa),
                        "gram": lambda xa=xa, gram=gram: gram(xa)}, repeat, sync, cpu_time)
        pool_ms, gram_ms = best["pool"], best["gram"]
        print(f"{name:<11}{pool_ms:>19.3f}{gram_ms:>12.3f}{pool_ms / gram_ms:>8.2f}")


if __name__ == "__main__":
    main()
