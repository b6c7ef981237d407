"""The process group and launcher plumbing of the multi-process harvest (:mod:`harvest.distributed`).

What ``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), the collective timeout
(``--dist-timeout``, env ``CROSSCACHE_DIST_TIMEOUT``), and a gloo process group whose collectives
turn another rank's death, failure or hang into a :class:`DistributedHarvestError` naming the
rank and the step. Kept apart from the orchestration so that it reads as the harvest's steps.
"""

from __future__ import annotations

import datetime as dt
import math
import os
from collections.abc import Callable
from typing import Any

import torch

from harvest.models import HarvestInputError

__all__ = [
    "DEFAULT_DIST_TIMEOUT",
    "DIST_TIMEOUT_ENV",
    "RESUME_HINT",
    "DistributedHarvestError",
    "Group",
    "attempt",
    "dist_timeout_seconds",
    "torchrun_env",
]

DEFAULT_DIST_TIMEOUT = 300.0
"""Seconds a rank waits in a collective (for the other ranks) before it gives up."""
DIST_TIMEOUT_ENV = "CROSSCACHE_DIST_TIMEOUT"
RESUME_HINT = "Shards already written are kept; re-run the same command (any --nproc-per-node) to resume"


class DistributedHarvestError(RuntimeError):
    """A multi-process harvest stopped because of another rank (died, failed, hung, disagreed)."""


def torchrun_env() -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` when launched by torchrun (or alike), else None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError:
        raise HarvestInputError(
            f"RANK={os.environ['RANK']!r} / WORLD_SIZE={os.environ['WORLD_SIZE']!r} / LOCAL_RANK are not "
            "integers; launch multi-process harvests with torchrun"
        ) from None
    if world < 1 or not 0 <= rank < world:
        raise HarvestInputError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return rank, world, local


def dist_timeout_seconds(value: float | None = None) -> float:
    """The collective timeout: ``value``, else ``$CROSSCACHE_DIST_TIMEOUT``, else 300 s."""
    if value is None:
        raw = os.environ.get(DIST_TIMEOUT_ENV)
        if raw is None:
            return DEFAULT_DIST_TIMEOUT
        try:
            value = float(raw)
        except ValueError:
            raise HarvestInputError(f"{DIST_TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if not (value > 0 and math.isfinite(value)):
        raise HarvestInputError(f"--dist-timeout must be a positive number of seconds, got {value}")
    return float(value)


# -- the process group -----------------------------------------------------------------------


class Group:
    """A gloo process group with rank-naming, timeout-explaining collectives."""

    def __init__(self, rank: int, world: int, timeout: float) -> None:
        import torch.distributed as dist

        self.dist, self.timeout = dist, timeout
        td = dt.timedelta(seconds=timeout)
        self._own_default = not dist.is_initialized()
        try:
            if self._own_default:
                dist.init_process_group(backend="gloo", timeout=td)
                self.pg = None  # the default group
            else:  # called from a program that already set up torch.distributed
                self.pg = dist.new_group(backend="gloo", timeout=td)
        except Exception as e:  # noqa: BLE001 - rendezvous errors come in many types
            raise DistributedHarvestError(
                f"rank {rank}: could not join the other {world - 1} rank(s) within {timeout:g}s "
                f"(--dist-timeout): {e}"
            ) from e
        self.rank, self.world = dist.get_rank(self.pg), dist.get_world_size(self.pg)
        if (self.rank, self.world) != (rank, world):
            raise DistributedHarvestError(
                f"process group has rank {self.rank} of {self.world}, but RANK/WORLD_SIZE say {rank} of {world}"
            )

    def _call(self, step: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except RuntimeError as e:  # gloo: timeouts and closed connections (DistBackendError too)
            text = str(e)
            why = ("no answer within --dist-timeout "
                   f"{self.timeout:g}s") if "imed out" in text or "imeout" in text else "lost contact"
            raise DistributedHarvestError(
                f"rank {self.rank}: {why} while {step}: another rank died, failed or hangs (see its "
                f"output; torchrun's report names it). {RESUME_HINT}. [{text.strip()[:300]}]"
            ) from e

    def all_gather(self, obj: Any, step: str) -> list[Any]:
        out: list[Any] = [None] * self.world
        self._call(step, lambda: self.dist.all_gather_object(out, obj, group=self.pg))
        return out

    def broadcast(self, obj: Any, step: str) -> Any:
        box = [obj]
        self._call(step, lambda: self.dist.broadcast_object_list(box, src=0, group=self.pg))
        return box[0]

    def broadcast_tensor(self, t: torch.Tensor, step: str) -> torch.Tensor:
        self._call(step, lambda: self.dist.broadcast(t, src=0, group=self.pg))
        return t

    def agree(self, step: str, error: BaseException | None) -> None:
        """Every rank reports how ``step`` went; if one failed, every rank raises (naming it)."""
        report = None if error is None else f"{type(error).__name__}: {error}"
        reports = self.all_gather(report, step)
        if error is not None:
            raise error
        failed = [(r, msg) for r, msg in enumerate(reports) if msg is not None]
        if failed:
            r, msg = failed[0]
            raise DistributedHarvestError(f"rank {self.rank}: stopping: rank {r} failed while {step}: {msg}")

    def close(self, *, finished: bool) -> None:
        """Leave the group. ``finished``: every rank got through the last step, so they wait for
        each other first; a rank that tears gloo down while a peer still talks to it can die at
        exit (SIGABRT, "terminate called without an active exception") after a complete harvest.
        After a failure nobody waits: the peers may be dead or hung."""
        if finished:
            try:
                self.dist.barrier(group=self.pg)
            except Exception:  # noqa: BLE001 - the cache is complete; nothing left to protect
                pass
        try:
            if self._own_default:
                self.dist.destroy_process_group()
            elif self.pg is not None:
                self.dist.destroy_process_group(self.pg)
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass


def attempt(fn: Callable[[], Any]) -> tuple[Any, BaseException | None]:
    """Run one rank's part of a step; its error is handed to :meth:`Group.agree` (a SIGTERM or a
    lost peer is raised at once: there is nobody left to agree with)."""
    try:
        return fn(), None
    except DistributedHarvestError:
        raise
    except Exception as e:  # noqa: BLE001 - handed to Group.agree
        return None, e

