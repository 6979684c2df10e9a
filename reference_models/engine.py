"""One epoch of training and one evaluation; nothing else (as DeiT's engine.py).

Both reduce their sums over ranks, so every rank returns the same global numbers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from .distributed import all_reduce_sum, assert_params_in_sync
from .models import set_pool_seed

__all__ = ["autocast", "evaluate", "train_one_epoch", "unwrap"]


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under DDP and ``torch.compile`` wrappers (where patch_timm's state is)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def autocast(device: torch.device, amp_dtype: torch.dtype | None) -> AbstractContextManager[Any]:
    """Mixed precision on CUDA (``amp_dtype``); plain float32 elsewhere."""
    if amp_dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def train_one_epoch(
    model: nn.Module, criterion: nn.Module, loader: DataLoader[Any],
    optimizer: torch.optim.Optimizer, scheduler: Any, *, device: torch.device,
    num_updates: int, mixup: Callable[..., Any] | None, amp_dtype: torch.dtype | None,
    scaler: torch.amp.GradScaler, clip_grad: float | None, ema: Any | None,
    pool_seed: int, check_sync: bool = False, progress: bool = False,
    desc: str = "train",
) -> dict[str, float]:
    """Train for one pass over ``loader``; return the mean loss over all ranks and speed.

    ``num_updates`` counts optimizer steps before this epoch: it drives the per-step
    learning rate, the EMA warm-up and the seed of the random downsamplers (``pool_seed``
    plus the step), so a resumed run repeats exactly what the uninterrupted one did.
    """
    model.train()
    inner = unwrap(model)
    loss_sum, seen = 0.0, 0
    start = time.perf_counter()
    for images, targets in tqdm(loader, desc=desc, disable=not progress, leave=False):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if mixup is not None:
            images, targets = mixup(images, targets)
        set_pool_seed(inner, pool_seed + num_updates)
        with autocast(device, amp_dtype):
            loss = criterion(model(images), targets)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss is {loss.item()} at update {num_updates}")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if clip_grad is not None:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        scaler.step(optimizer)
        scaler.update()
        num_updates += 1
        if ema is not None:
            ema.update(inner, step=num_updates)
        scheduler.step_update(num_updates)
        if check_sync:
            assert_params_in_sync(model)
        loss_sum += loss.item() * images.shape[0]
        seen += images.shape[0]
    seconds = time.perf_counter() - start
    total_loss, total_seen = all_reduce_sum([loss_sum, float(seen)], device)
    return {"train_loss": total_loss / max(total_seen, 1.0), "train_images": total_seen,
            "images_per_s": total_seen / max(seconds, 1e-9), "num_updates": num_updates}


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader[Any], *, device: torch.device,
             amp_dtype: torch.dtype | None, pool_seed: int, progress: bool = False,
             desc: str = "val") -> dict[str, float]:
    """Cross-entropy and top-1 accuracy (percent) over the whole validation set.

    Each rank evaluates its own shard; the sums are reduced, so the result is the same as
    one process evaluating every image once.
    """
    model.eval()
    set_pool_seed(unwrap(model), pool_seed)
    criterion = nn.CrossEntropyLoss(reduction="sum")
    loss_sum, correct, seen = 0.0, 0.0, 0.0
    for images, targets in tqdm(loader, desc=desc, disable=not progress, leave=False):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            logits = model(images)
        loss_sum += criterion(logits.float(), targets).item()
        correct += (logits.argmax(dim=-1) == targets).sum().item()
        seen += targets.shape[0]
    loss_sum, correct, seen = all_reduce_sum([loss_sum, correct, seen], device)
    return {"val_loss": loss_sum / max(seen, 1.0), "val_acc1": 100.0 * correct / max(seen, 1.0),
            "val_images": seen}
