"""How far each rank of a multi-process harvest has got, for the ranks waiting at the merge.

The ranks meet only at the start and at the merge, where a rank that finished its share waits for the
slowest. Ranks drift (uneven devices, a shared disk): over a long harvest by more than ``--dist-timeout``,
so a plain collective at the merge stopped healthy ranks at the very end. Instead, each rank rewrites a
small file, ``manifest.rank{r}.progress`` beside its rank manifest, with a number that grows as it works (its
forward batches, the rows it sends; at most every few seconds), and ``done`` when its share is written. A finished rank waits while every other rank is done
or still moving; one whose file has not changed for ``--dist-timeout`` (a hang) ends the wait with an
error naming it. The folder is shared by the ranks by design (one cache).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["PROGRESS_GLOB", "RankProgress", "progress_name", "wait_for_ranks"]

PROGRESS_GLOB = "manifest.rank*.progress"
DONE = "done"


def progress_name(rank: int) -> str:
    return f"manifest.rank{rank}.progress"


class RankProgress:
    """This rank's progress file. ``every_s``: the least time between two writes (the file is tiny, but a
    write per batch on a network disk is not free); below the timeout, so a live rank never looks stalled."""

    def __init__(self, out: Path, rank: int, every_s: float) -> None:
        self.path = out / progress_name(rank)
        self.every_s = every_s
        self._last = -float("inf")

    def _write(self, text: str) -> None:
        # Not atomic on purpose: a reader that sees a torn write sees a change, which is what it looks for.
        self.path.write_text(text)
        self._last = time.monotonic()

    def moving(self, row: int) -> None:
        """The rank has got as far as ``row`` (a row it sent, a sequence it forwarded: any number that moves)."""
        if time.monotonic() - self._last >= self.every_s:
            self._write(f"row {row}")

    def done(self) -> None:
        self._write(DONE)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:  # not written yet, or removed by a rank 0 that already merged
        return None


def wait_for_ranks(out: Path, rank: int, world: int, timeout_s: float, *, poll_s: float = 1.0,
                   clock: Callable[[], float] = time.monotonic) -> list[int]:
    """Wait until every other rank's progress file says ``done``, as long as each one not done keeps
    changing; return the ranks that stalled (their file unchanged for ``timeout_s`` on this rank's
    clock, a missing file counting as unchanged) as soon as one has, or ``[]`` once all are done."""
    others = [r for r in range(world) if r != rank]
    seen: dict[int, tuple[str | None, float]] = {}  # rank -> (what its file said, when that was first seen)
    while True:
        now = clock()
        pending, stalled = [], []
        for r in others:
            text = _read(out / progress_name(r))
            if text == DONE:
                continue
            pending.append(r)
            before = seen.get(r)
            if before is None or before[0] != text:
                seen[r] = (text, now)
            elif now - before[1] >= timeout_s:
                stalled.append(r)
        if stalled or not pending:  # one hangs (no need to wait for the others), or all are done
            return stalled
        time.sleep(poll_s)
