"""Issue 23, batch 1: what a Token-Pooling DeiT-S costs besides its pool calls.

    PYTHONPATH=. python benchmarks/results/b1_gap_issue23h.py

DeiT-S, level 4, wkmedoids, batch 1, float32, the machine's threads; best of 30 passes, four
rounds with the models in turn: the plain model, the free slice (timm_speedup.py --slice),
the pooled model, and the pooled model with ``pool_with_grad`` replaced by a free slice
(the first k patch tokens, sizes one): everything of a patched block but the pool call
(the scored attention, the size bias, the sizes and the concatenation).
"""

import sys
import time
from typing import Any

import timm
import torch

sys.path.insert(0, "benchmarks")
from timm_speedup import MODEL, SCHEDULES, SlicedViT

import tokenpool_ops.timm as tp_timm
from tokenpool_ops._results import PoolResult
from tokenpool_ops.timm import patch_timm


def free_pool(x: torch.Tensor, k: int, method: str, **options: Any) -> tuple[Any, PoolResult]:
    """The first k tokens, each of size one: pooling that costs nothing."""
    tokens = x[:, :k]
    return tokens, PoolResult(tokens, None, torch.ones(x.shape[0], k), None, None, None, 0)


def best_ms(model: torch.nn.Module, x: torch.Tensor, passes: int = 30) -> float:
    best = float("inf")
    for _ in range(passes):
        start = time.perf_counter()
        model(x)
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main() -> None:
    torch.manual_seed(0)
    plain = timm.create_model(MODEL, pretrained=False).eval()
    pooled = timm.create_model(MODEL, pretrained=False).eval()
    pooled.load_state_dict(plain.state_dict())
    patch_timm(pooled, SCHEDULES["level4"], method="wkmedoids")
    sliced = SlicedViT(plain, SCHEDULES["level4"])
    real_pool = tp_timm.pool_with_grad
    x = torch.randn(1, 3, 224, 224)
    rounds: dict[str, list[float]] = {"plain": [], "slice": [], "pooled": [],
                                      "pooled, free pool": []}
    with torch.no_grad():
        for model in (plain, pooled, sliced):
            model(x)
        for _ in range(4):
            rounds["plain"].append(best_ms(plain, x))
            rounds["slice"].append(best_ms(sliced, x))
            tp_timm.pool_with_grad = real_pool
            rounds["pooled"].append(best_ms(pooled, x))
            tp_timm.pool_with_grad = free_pool
            rounds["pooled, free pool"].append(best_ms(pooled, x))
        tp_timm.pool_with_grad = real_pool
    plain_ms = min(rounds["plain"])
    for name, values in rounds.items():
        print(f"{name:<18} {min(values):6.1f} ms  speed-up {plain_ms / min(values):.2f}  "
              f"(rounds: {', '.join(f'{v:.1f}' for v in values)})")


if __name__ == "__main__":
    main()
