"""The torch.distributed context of a training run (``torchrun`` sets RANK / WORLD_SIZE / LOCAL_RANK).

One process per device; DDP averages gradients. The backend is gloo on CPU and nccl on CUDA.
Every collective has the configured timeout, so a rank that dies makes the others fail with a
clear error instead of hanging forever.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

__all__ = ["DistContext"]


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @staticmethod
    def from_env(device: torch.device, timeout_s: float) -> "DistContext":
        """Join the process group torchrun describes in the environment (no-op for one process)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return DistContext()
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if not torch_dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            torch_dist.init_process_group(backend, timeout=dt.timedelta(seconds=timeout_s))
        return DistContext(rank, world, local)

    def device_for(self, device: torch.device) -> torch.device:
        """One GPU per process: cuda -> cuda:LOCAL_RANK."""
        if device.type == "cuda" and self.enabled and device.index is None:
            return torch.device("cuda", self.local_rank)
        return device

    def any(self, flags: torch.Tensor) -> torch.Tensor:
        """Element-wise OR of bool/0-1 flags over ranks (everyone learns of a NaN or a signal)."""
        if not self.enabled:
            return flags
        out = flags.to(torch.float32).clone()
        torch_dist.all_reduce(out, op=torch_dist.ReduceOp.MAX)
        return out > 0

    def barrier(self) -> None:
        if self.enabled:
            torch_dist.barrier()

    def close(self) -> None:
        if self.enabled and torch_dist.is_initialized():
            torch_dist.destroy_process_group()
