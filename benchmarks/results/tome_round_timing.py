"""Median time of ToMe pool calls with the tokenpool_ops of the checkout given, for the
comparison in benchmarks/results/tome_round_issue23f.md (run each tree in turn):

    PYTHONPATH= python benchmarks/results/tome_round_timing.py <checkout>
"""

from __future__ import annotations

import sys
import time

CASES = [(1, 196, 193), (1, 142, 97), (1, 34, 13), (8, 142, 97), (64, 142, 97)]  # B, N, k


def main() -> None:
    tree = sys.argv[1]
    sys.path.insert(0, tree)
    import torch

    import tokenpool_ops

    assert tokenpool_ops.__file__.startswith(tree), tokenpool_ops.__file__
    torch.manual_seed(0)
    for batch, n, k in CASES:
        x, metric = torch.randn(batch, n, 384), torch.randn(batch, n, 64)
        sizes = torch.rand(batch, n) + 1
        for library in ("torch", "numpy"):
            args = [x, metric, sizes] if library == "torch" else [
                t.numpy() for t in (x, metric, sizes)]

            def call(a: list = args) -> None:
                tokenpool_ops.pool(a[0], k, "tome", metric=a[1], sizes=a[2],
                                   check_values=False)

            for _ in range(5):
                call()
            times = []
            for _ in range(60):
                start = time.perf_counter()
                call()
                times.append(time.perf_counter() - start)
            times.sort()
            print(f"{library} B={batch} n={n} k={k}: median {times[30] * 1e3:.3f} ms")


if __name__ == "__main__":
    main()
