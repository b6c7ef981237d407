"""The torch.distributed context of a training run (``torchrun`` sets RANK / WORLD_SIZE / LOCAL_RANK).

One process per device; DDP averages gradients. The backend is gloo on CPU and nccl on CUDA.
Every collective has the configured timeout, so a rank that dies or hangs makes the others fail
instead of hanging forever: :meth:`DistContext.explain_failures` turns the backend's error into a
:class:`DistributedTrainingError` naming the rank, where training was, and the fix (as the
harvest's :mod:`harvest.process_group` does). The one exception: while rank 0 alone saves a checkpoint,
evaluates or exports, the others wait for it up to :data:`SOLO_WAIT_S` (or the timeout, if longer), since
that work grows with the dictionary (a checkpoint of a large CLT is hundreds of GB) and is no sign of a hang
(:meth:`DistContext.wait_for_main`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

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
    solo_waits: int = 0
    """How many :meth:`wait_for_main` calls this rank made (every rank makes the same ones): names the key."""

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
        return DistContext(rank, world, local, timeout_s)

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
        """The others wait for work rank 0 does alone (a checkpoint, an eval, the export) up to :data:`SOLO_WAIT_S`,
        not ``--dist-timeout`` (a large dictionary's save took longer than that). Rank 0 sets a key in the
        process group's store when done, which the others poll: unlike a pending barrier, polling leaves a
        signal (torchrun's SIGTERM) handled at once and nothing to wait for when the process exits."""
        if not self.enabled:
            return
        self.solo_waits += 1
        key = f"crosscache/rank0-done/{self.solo_waits}"
        try:
            store = torch_dist.distributed_c10d._get_default_store()
        except (AttributeError, RuntimeError):  # a torch without it: a barrier, under --dist-timeout
            torch_dist.barrier()
            return
        if self.is_main:
            store.set(key, "1")
            return
        limit = max(self.timeout_s, SOLO_WAIT_S)
        deadline = time.monotonic() + limit
        while not store.check([key]):
            if time.monotonic() > deadline:
                raise DistributedTrainingError(
                    f"rank {self.rank}: no answer from rank 0 within {limit:g}s while it alone saved, evaluated or "
                    f"exported, at {self.where}: it hangs or its disk stalls (see its output). The checkpoints saved "
                    f"so far are kept: re-run the same command (the same --nproc-per-node {self.world_size}) to resume")
            time.sleep(0.1)

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
            why = (f"no answer from the other rank(s) within --dist-timeout {self.timeout_s:g}s"
                   if "timed out" in text.lower() or "timeout" in text.lower() else "lost contact with another rank")
            raise DistributedTrainingError(
                f"rank {self.rank}: {why} at {self.where}: another rank died, failed or hangs (see its output; "
                "torchrun's report names it). The checkpoints saved so far are kept: re-run the same command "
                f"(the same --nproc-per-node {self.world_size}) to resume from the newest. Backend: "
                f"{text.splitlines()[0][:300] if text else type(e).__name__}"
            ) from e

    def close(self) -> None:
        if self.enabled and torch_dist.is_initialized():
            torch_dist.destroy_process_group()
