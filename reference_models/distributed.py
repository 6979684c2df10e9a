"""torchrun helpers: process group set-up, reductions, and a parameter sync check.

A run started by ``torchrun`` finds ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in its
environment and joins a process group: NCCL when it trains on CUDA, gloo on the CPU.
Without them it is a single process of world size 1, and every helper here is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .errors import ConfigError

__all__ = [
    "DistInfo",
    "all_gather_objects",
    "all_reduce_sum",
    "assert_params_in_sync",
    "cleanup",
    "init_distributed",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: its rank, the world size and its device."""

    rank: int
    world: int
    local_rank: int
    local_world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 alone prints, logs and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def _pick_device(name: str, local_rank: int) -> torch.device:
    """``auto``: this process's GPU when there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is no torch device (auto, cpu, cuda)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: this machine has no CUDA GPU")
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    return device


def init_distributed(device_name: str) -> DistInfo:
    """Join the torchrun process group if there is one (NCCL on CUDA, gloo on the CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    device = _pick_device(device_name, local_rank)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if backend == "nccl"
                                else None)
    return DistInfo(rank, world, local_rank, local_world, device)


def cleanup() -> None:
    """Leave the process group (torchrun warns about leaked groups otherwise)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over ranks, in float64 so counts stay exact."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` without a process group."""
    if not dist.is_initialized():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def assert_params_in_sync(model: nn.Module) -> None:
    """Raise RuntimeError unless every rank holds bit-identical parameters (``--check-sync``).

    All ranks compare their flattened parameters with rank 0's. A debugging aid for the
    tests: gradients that were not all-reduced show up after one step.
    """
    if not dist.is_initialized():
        return
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    reference = flat.clone()
    dist.broadcast(reference, src=0)
    same = torch.tensor([int(torch.equal(flat, reference))], device=flat.device)
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    if not bool(same.item()):
        raise RuntimeError("--check-sync: parameters differ between ranks")
