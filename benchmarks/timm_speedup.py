"""Forward time of a Token-Pooling DeiT-S against the plain model, next to their FLOP ratio.

DeiT-S (random weights), keep schedule of sparsity level 1, wkmedoids, batch 32, no_grad;
best of 3 after a warm-up. FLOPs are counted by torch.utils.flop_counter (matrix products and
attention, the clustering's matrix products included) and by the analytic per-block count of
the paper's Table 1 (pooling excluded).

    python benchmarks/timm_speedup.py [--batch 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from tokenpool_ops.timm import patch_timm

KEEP = [196, 195, 193, 188, 169, 140, 121, 110, 73, 38, 7, 0]


def block_macs(n: int, m: int, dim: int, mlp_ratio: float = 4.0) -> float:
    """Multiply-adds of a block with n tokens into attention and m into the MLP (pooling
    between them): QKV and projection 4 n d^2, attention 2 n^2 d, MLP 2 r m d^2."""
    return 4 * n * dim**2 + 2 * n * n * dim + 2 * mlp_ratio * m * dim**2


def analytic_ratio(keep: list[int], prefix: int = 1, n: int = 196, dim: int = 384) -> float:
    full = sum(block_macs(n + prefix, n + prefix, dim) for _ in keep)
    pooled, tokens = 0.0, n
    for k in keep:
        after = min(tokens, k)
        pooled += block_macs(tokens + prefix, after + prefix, dim)
        tokens = after
    return pooled / full


def best_time(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    with torch.no_grad():
        model(x)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return min(times)


def flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--method", default="wkmedoids")
    args = parser.parse_args()

    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 224, 224)
    plain = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    pooled = patch_timm(timm.create_model("deit_small_patch16_224", pretrained=False).eval(),
                        KEEP, method=args.method)
    t_plain, t_pooled = best_time(plain, x, args.repeats), best_time(pooled, x, args.repeats)
    f_plain, f_pooled = flops(plain, x[:1]), flops(pooled, x[:1])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}")
    print(f"plain   DeiT-S: {t_plain * 1e3:8.1f} ms  {f_plain / 1e9:6.2f} GFLOP/image")
    print(f"pooled  DeiT-S: {t_pooled * 1e3:8.1f} ms  {f_pooled / 1e9:6.2f} GFLOP/image "
          f"({args.method}, keep {KEEP})")
    print(f"time ratio {t_pooled / t_plain:.3f}; FLOP ratio {f_pooled / f_plain:.3f} "
          f"(counted), {analytic_ratio(KEEP):.3f} (Table 1 formula, pooling excluded)")


if __name__ == "__main__":
    main()
