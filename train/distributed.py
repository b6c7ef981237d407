"""The torch.distributed context of a training run (``torchrun`` sets RANK / WORLD_SIZE / LOCAL_RANK).

One process per device; DDP averages gradients. The backend is gloo on CPU and nccl on CUDA.
Every collective has the configured timeout, so a rank that dies or hangs makes the others fail
instead of hanging forever: :meth:`DistContext.explain_failures` turns the backend's error into a
:class:`DistributedTrainingError` naming the rank, where training was, and the fix (as the
harvest's :mod:`harvest.process_group` does). The one exception: while rank 0 alone saves a checkpoint,
evaluates or exports, the others wait for it up to :data:`SOLO_WAIT_S` (or the timeout, if longer), since
that work grows with the dictionary (a checkpoint of a large CLT is hundreds of GB) and is no sign of a hang.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist

__all__ = ["DistContext", "DistributedTrainingError", "is_collective_failure", "SOLO_WAIT_S"]

SOLO_WAIT_S = 6 * 3600.0
"""How long the other ranks wait while rank 0 alone checkpoints, evaluates or exports (seconds; a longer
``--dist-timeout`` is used instead). A rank 0 that dies meanwhile is reported by torchrun at once."""


class DistributedTrainingError(RuntimeError):
    """Training stopped because another rank died, failed or hung (a collective timed out or lost its peer)."""


def is_collective_failure(e: BaseException) -> bool:
    """Whether ``e`` is the backend's report of a collective that timed out or lost a peer. gloo raises
    a plain RuntimeError whose text names its source file (``gloo/transport/...``); newer torch
    raises ``DistError`` subclasses."""
    dist_error = getattr(torch_dist, "DistError", None)
    if dist_error is not None and isinstance(e, dist_error):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("gloo" in text or "nccl" in text)


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    timeout_s: float = 0.0
    where: str = "setting up"
    """What this rank is doing (the trainer updates it: ``step 12 of 100``), for failure messages."""
    solo_group: Any = None
    """A gloo group with the longer timeout, for :meth:`wait_for_main` (gloo: its barrier needs no device)."""
    waiting_for_main: bool = False

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
        solo = torch_dist.new_group(backend="gloo", timeout=dt.timedelta(seconds=max(timeout_s, SOLO_WAIT_S)))
        return DistContext(rank, world, local, timeout_s, solo_group=solo)

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

    def wait_for_main(self) -> None:
        """A barrier after work rank 0 does alone (a checkpoint, an eval, the export): the others wait for it
        up to :data:`SOLO_WAIT_S`, not ``--dist-timeout`` (a large dictionary's save took longer than that)."""
        if not self.enabled:
            return
        self.waiting_for_main = True
        torch_dist.barrier(group=self.solo_group)
        self.waiting_for_main = False

    @contextlib.contextmanager
    def explain_failures(self) -> Iterator[None]:
        """Turn a collective's timeout or lost peer into a :class:`DistributedTrainingError` that names
        this rank, :attr:`where` it was, the likely cause and the fix (other errors pass unchanged)."""
        try:
            yield
        except RuntimeError as e:
            if not self.enabled or isinstance(e, DistributedTrainingError) or not is_collective_failure(e):
                raise
            text = str(e).strip()
            timed_out = "timed out" in text.lower() or "timeout" in text.lower()
            if timed_out and self.waiting_for_main:
                why = (f"no answer from rank 0 within {max(self.timeout_s, SOLO_WAIT_S):g}s while it alone saved, "
                       "evaluated or exported")
            elif timed_out:
                why = f"no answer from the other rank(s) within --dist-timeout {self.timeout_s:g}s"
            else:
                why = "lost contact with another rank"
            raise DistributedTrainingError(
                f"rank {self.rank}: {why} at {self.where}: another rank died, failed or hangs (see its output; "
                "torchrun's report names it). The checkpoints saved so far are kept: re-run the same command "
                f"(the same --nproc-per-node {self.world_size}) to resume from the newest. Backend: "
                f"{text.splitlines()[0][:300] if text else type(e).__name__}"
            ) from e

    def close(self) -> None:
        if self.enabled and torch_dist.is_initialized():
            torch_dist.destroy_process_group()
