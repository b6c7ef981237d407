"""An exclusive lock on an output folder: two jobs never write one folder at once.

A harvest holds the lock of its cache folder, a training run the lock of each run folder it
writes (every member's, in a sweep) and an analysis the lock of its report folder, from before
they look into the folder until they end. A second job into a held folder is refused at once
(:class:`FolderBusyError`), naming the job that holds it. Under torchrun only the rank that
writes a folder's bookkeeping takes its lock (rank 0); the other ranks are part of the same job.

The lock is an OS lock (``flock``) on ``<folder>/.crosscache.lock``, so the kernel drops it when
its process ends, however it ends (``kill -9`` included): a re-run after a crash needs no cleanup.
The file also records the holder (pid, host, start time, command) for the refusal message; a file
left by a killed job is taken over. On release the file is removed, and so is every folder the
lock created that the job left empty (a job that failed before writing anything leaves nothing).
The file is never listed in a manifest, so it is never part of a cache.

``flock`` works on local filesystems and, on Linux, on NFS (as a POSIX lock); where the filesystem
refuses it, a warning says so and the job runs unlocked.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing_extensions import Self

try:
    import fcntl
except ImportError:  # Windows: no flock (the rest of the project needs POSIX too)
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME", "FolderBusyError", "FolderLock", "FolderLockError"]

LOCK_NAME = ".crosscache.lock"
"""The lock file's name inside the locked folder (hidden; never part of a cache or a run)."""

# flock refused by the filesystem itself (some FUSE and network mounts): nothing to lock with.
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
# A folder this process may not write: it cannot corrupt it, so it runs unlocked (a re-run of a
# finished harvest or training on a read-only copy only reads).
_READ_ONLY = {errno.EACCES, errno.EPERM, errno.EROFS}


class FolderLockError(RuntimeError):
    """A folder cannot be locked for writing (it is a file, or it cannot be created)."""


class FolderBusyError(FolderLockError):
    """Another job holds the folder's lock: it is writing there now."""


_held: set[FolderLock] = set()  # locks this process holds (a held lock stays referenced until released)


def _forget_in_child() -> None:
    # A forked child (a multiprocessing worker) shares the lock's open file: were it to keep it, the
    # lock would outlive a killed job for as long as the child lives. Closing the child's copy does
    # not release the parent's lock (flock drops only when every copy is closed).
    for lock in list(_held):
        lock._forget()
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


class FolderLock:
    """The exclusive lock of one folder, for as long as this process holds it.

    ``with FolderLock("runs/x", what="run folder"):`` creates the folder if needed, takes the lock
    or raises :class:`FolderBusyError`, and releases it at the end (removing the lock file, and
    the folders it created if they are left empty). ``what`` and ``option`` name the folder in
    messages ("run folder", "--out").
    """

    def __init__(self, folder: str | Path, *, what: str = "folder", option: str = "--out") -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.what, self.option = what, option
        self._fd: int | None = None
        self._made: list[Path] = []  # folders acquire() created
        self._acquired = False

    @property
    def held(self) -> bool:
        """Whether this process holds the OS lock (False when running unlocked, see the module doc)."""
        return self._fd is not None

    def acquire(self) -> Self:
        """Create the folder if needed and take the lock; raise :class:`FolderBusyError` if it is held."""
        if self._acquired:
            raise RuntimeError(f"{self.path} is already held by this FolderLock")
        self._made = self._make_folder()
        try:
            self._fd = self._lock()
        except BaseException:
            self._remove_made()
            raise
        self._acquired = True
        if self._fd is not None:
            _held.add(self)
        return self

    def release(self) -> None:
        """Release the lock, remove its file, and remove the folders it created that are empty."""
        if not self._acquired:
            return
        self._acquired = False
        _held.discard(self)
        fd, self._fd = self._fd, None
        if fd is not None:
            # Removed while still held: a job that opened this file meanwhile finds, once it gets the
            # lock, that the name no longer leads to it, and locks a new file (see _lock).
            if _same_file(fd, self.path):
                try:
                    self.path.unlink()
                except OSError:
                    pass
            os.close(fd)
        self._remove_made()

    def __enter__(self) -> Self:
        return self if self._acquired else self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    # -- internals -----------------------------------------------------------------------------

    def _forget(self) -> None:
        """In a forked child: drop this process's copy of the lock without releasing or removing anything."""
        fd, self._fd, self._made, self._acquired = self._fd, None, [], False
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def _make_folder(self) -> list[Path]:
        """Create the folder (and missing parents); return those that were created."""
        if self.folder.exists() and not self.folder.is_dir():
            raise FolderLockError(f"{self.option} {self.folder} exists and is not a folder; choose a folder")
        missing = []
        for p in (self.folder, *self.folder.parents):
            if p.exists():
                break
            missing.append(p)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            if e.errno in _READ_ONLY:
                return []  # runs unlocked: see _lock
            raise FolderLockError(f"cannot create the {self.what} {self.folder} ({e.strerror}); "
                                  f"choose another {self.option}") from None
        return missing

    def _lock(self) -> int | None:
        """Open, lock and stamp the lock file; its descriptor, or None when running unlocked."""
        if fcntl is None:
            return None
        for _ in range(20):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # never O_TRUNC: the holder's details
            except FileNotFoundError:  # a job that just released the folder removed it: make it again
                self._made += [p for p in self._make_folder() if p not in self._made]
                continue
            except OSError as e:
                if e.errno in _READ_ONLY:
                    return None
                raise
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise FolderBusyError(self._busy_message(holder)) from None
            except OSError as e:
                os.close(fd)
                if e.errno in _NO_FLOCK:
                    print(f"warning: cannot lock the {self.what} {self.folder} ({e.strerror}): this filesystem "
                          "does not support flock, so nothing stops a second job from writing there at the "
                          "same time", file=sys.stderr)
                    return None
                raise
            if _same_file(fd, self.path):
                _write_holder(fd)
                return fd
            os.close(fd)  # its holder released and removed it between our open and flock: lock the new one
        raise FolderLockError(f"could not lock the {self.what} {self.folder}: {self.path} kept being replaced; "
                              "is another job starting and stopping there in a loop?")

    def _busy_message(self, holder: dict) -> str:
        here = socket.gethostname()
        pid, host = holder.get("pid"), holder.get("host")
        if pid is None:  # it has the lock but has not written its details yet (a fraction of a second)
            who, stop = "a process that is just starting", "stop it"
        else:
            on = f" on host {host}" if host and host != here else ""
            who = f"pid {pid}{on or ' on this host'}"
            if holder.get("started_unix") is not None:
                who += f", started {holder.get('started')}, {_age(time.time() - float(holder['started_unix']))} ago"
            if holder.get("command"):
                cmd = str(holder["command"])
                who += f"; command `{cmd[:300]}{' ...' if len(cmd) > 300 else ''}`"
            stop = f"stop it (`kill {pid}`{on}; a harvest or training resumes when its command is re-run)"
            if not on and int(pid) == os.getpid():
                who += " (this very process: it already holds this folder, e.g. a job started earlier in it)"
            elif not on and not _alive(int(pid)):
                who += (f"; pid {pid} has exited, but a process it started still holds the lock "
                        f"(`fuser -v {self.path}` names it)")
        return (f"the {self.what} {self.folder} is in use by another job ({who}). Two jobs writing one folder "
                f"corrupt each other's files, so this one stopped before touching it. Wait for the other job "
                f"to finish, or {stop}, or choose another {self.option}")

    def _remove_made(self) -> None:
        for p in sorted(self._made, key=lambda q: len(q.absolute().parts), reverse=True):
            try:
                p.rmdir()
            except OSError:  # holds something (the job wrote there, or another job did): keep it and its parents
                break
        self._made = []


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _write_holder(fd: int) -> None:
    now = time.time()
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started_unix": now,
            "started": dt.datetime.fromtimestamp(now).astimezone().isoformat(timespec="seconds"),
            "command": shlex.join(sys.argv)[:2000]}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)


def _read_holder(fd: int) -> dict:
    try:
        info = json.loads(os.pread(fd, 8192, 0).decode(errors="replace") or "{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
