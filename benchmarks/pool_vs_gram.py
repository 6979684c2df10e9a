"""One timing of ``pool(x, 98, "wkmedoids", scores=s)`` next to one batched ``x @ x^T``.

The Gram matrix is the floor for K-Medoids: its pairwise distances cost O(B N^2 M), and the
iterations after it only O(B (N^2 + N K)). Run: ``python benchmarks/pool_vs_gram.py``.
The asv suite of this folder tracks performance over time; this script answers one question
in one run: how far above the floor is the whole operator, per backend?
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np

import tokenpool_ops


def best_ms(call: Callable[[], object], repeat: int, sync: Callable[[], None]) -> float:
    call()  # warm-up: allocations, thread pools, lazy imports
    sync()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(64, 196, 384),
                        metavar=("B", "N", "M"))
    parser.add_argument("--k", type=int, default=98)
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = rng.normal(size=args.shape).astype(np.float32)
    s = rng.random(args.shape[:2]).astype(np.float32)

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

    print(f"x: float32 {tuple(args.shape)}, k={args.k}, best of {args.repeat}")
    print(f"{'backend':<11}{'pool wkmedoids ms':>19}{'x @ x.T ms':>12}{'ratio':>8}")
    for name, xa, sa, gram, sync in rows:
        pool_ms = best_ms(lambda xa=xa, sa=sa: tokenpool_ops.pool(xa, args.k, "wkmedoids",
                                                                  scores=sa),
                          args.repeat, sync)
        gram_ms = best_ms(lambda xa=xa, gram=gram: gram(xa), args.repeat, sync)
        print(f"{name:<11}{pool_ms:>19.2f}{gram_ms:>12.2f}{pool_ms / gram_ms:>8.2f}")


if __name__ == "__main__":
    main()
