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

A lock file this process may not write (another user's, in a shared folder, or left by their killed
job) is opened read-only and locked all the same (``flock`` needs no write access); once locked, it
is replaced by a file of this job's own, so that it names this job and is removed at the end. Where
it cannot be replaced (a folder with the sticky bit), the job keeps the read-only lock and a second
job's refusal says the holder could not be named. Only a job that cannot write the folder itself (a
read-only copy of a finished cache) runs unlocked, silently: it cannot corrupt it.

``flock`` works on local filesystems and, on Linux, on NFS (as a POSIX lock); where the filesystem
refuses it, a warning says so and the job runs unlocked. It still writes the lock file (its details
tell a person who else is there) and on release removes it, if no other job has written over it, and
the folders it created that are left empty, as a locked job does.
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

__all__ = ["BUSY_EXIT_CODE", "LOCK_NAME", "FolderBusyError", "FolderLock", "FolderLockError", "exit_code_for",
           "holder_summary", "lock_holder"]

LOCK_NAME = ".crosscache.lock"
"""The lock file's name inside the locked folder (hidden; never part of a cache or a run)."""

# flock refused by the filesystem itself (some FUSE and network mounts): nothing to lock with.
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
# Opening the lock file for writing refused: the folder cannot be written (a re-run of a finished
# harvest or training on a read-only copy only reads: it runs unlocked), or the file is another user's.
_READ_ONLY = {errno.EACCES, errno.EPERM, errno.EROFS}


class FolderLockError(RuntimeError):
    """A folder cannot be locked for writing (it is a file, or it cannot be created)."""


class FolderBusyError(FolderLockError):
    """Another job holds the folder's lock: it is writing there now."""


BUSY_EXIT_CODE = 75
"""Exit status of a command refused because another job holds its folder: ``EX_TEMPFAIL`` from
``sysexits.h`` (try again later), so a scheduler or a retry loop can tell it from a bad command (2)."""


def exit_code_for(error: FolderLockError) -> int:
    """The CLI exit status for a lock refusal: :data:`BUSY_EXIT_CODE` if the folder is busy, else 2."""
    return BUSY_EXIT_CODE if isinstance(error, FolderBusyError) else 2


_held: set[FolderLock] = set()  # locks this process acquired, held or unlocked (referenced until released)


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
        self._stamp: tuple[int, int, bytes] | None = None  # unlocked: (device, inode, details) of the file it wrote
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
        _held.add(self)  # unlocked too: a forked child must not remove the file or folders (_forget)
        return self

    def release(self) -> None:
        """Release the lock, remove its file, and remove the folders it created that are empty."""
        if not self._acquired:
            return
        self._acquired = False
        _held.discard(self)
        fd, self._fd = self._fd, None
        stamp, self._stamp = self._stamp, None
        if stamp is not None:  # unlocked: the file this job wrote, unless another job has written over it
            _remove_if_unchanged(self.path, stamp)
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
        fd, self._fd, self._made, self._stamp, self._acquired = self._fd, None, [], None, False
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
        displaced: int | None = None  # another user's lock file, locked read-only while this job replaces it
        try:
            for _ in range(20):
                writable = True
                try:
                    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # never O_TRUNC: the holder's details
                except FileNotFoundError:  # a job that just released the folder removed it: make it again
                    self._made += [p for p in self._make_folder() if p not in self._made]
                    continue
                except OSError as e:
                    if e.errno not in _READ_ONLY:
                        raise
                    if e.errno == errno.EROFS or not _may_write(self.folder):
                        return None  # this process cannot write the folder: it cannot corrupt it either
                    # The folder is writable but the lock file is not: another user's. Running unlocked would
                    # let two users' jobs write the folder at once; flock needs no write access.
                    try:
                        fd = os.open(self.path, os.O_RDONLY)
                    except FileNotFoundError:  # its holder released and removed it meanwhile
                        continue
                    except OSError as e2:
                        raise FolderLockError(self._foreign_message(
                            f"this process may not even read it ({e2.strerror})")) from None
                    writable = False
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _read_holder(fd)
                    os.close(fd)
                    raise FolderBusyError(self._busy_message(holder)) from None
                except OSError as e:
                    if e.errno in _NO_FLOCK:
                        print(f"warning: cannot lock the {self.what} {self.folder} ({e.strerror}): this filesystem "
                              "does not support flock, so nothing stops a second job from writing there at the "
                              "same time", file=sys.stderr)
                        if writable:  # its details are for a person to read; release removes the file
                            try:
                                self._stamp = _write_holder(fd)
                            except OSError:  # not written: left as it was, and not this job's to remove
                                pass
                        os.close(fd)
                        return None
                    os.close(fd)
                    if e.errno == errno.EBADF and not writable:
                        # NFS emulates flock with a POSIX write lock, which needs a descriptor open for writing.
                        raise FolderLockError(self._foreign_message(
                            "this filesystem locks only files a process may write")) from None
                    raise
                if not _same_file(fd, self.path):
                    os.close(fd)  # its holder released and removed it between our open and flock: lock the new one
                    continue
                if writable:
                    try:
                        _write_holder(fd)
                    except OSError as e:  # the flock holds either way; the details are for a person to read
                        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                            os.close(fd)
                            raise
                        # A full disk: the job may be what frees it (a resume removes a killed save's leftovers).
                        print(f"warning: the disk of {self.folder} is full: this job holds its lock, but could not "
                              f"write its details into {self.path.name}", file=sys.stderr)
                    return fd
                # Another user's file, now locked by this job: no live job holds it. Replace it by a file of this
                # job's own (which names it, and which release removes), keeping the old one locked meanwhile: a
                # job that opened the old one finds, once it gets its lock, that the name leads elsewhere.
                try:
                    self.path.unlink()
                except OSError:  # a folder with the sticky bit: only the file's owner may remove it
                    print(f"note: {self.path} belongs to {_owner(self.path)} and cannot be replaced: this job holds "
                          f"the lock of the {self.what} {self.folder}, but a second job into it cannot be told which "
                          "job holds it", file=sys.stderr)
                    return fd
                if displaced is not None:
                    os.close(displaced)
                displaced = fd
        finally:
            if displaced is not None:
                os.close(displaced)
        raise FolderLockError(f"could not lock the {self.what} {self.folder}: {self.path} kept being replaced; "
                              "is another job starting and stopping there in a loop?")

    def _foreign_message(self, reason: str) -> str:
        """Why a lock file this process may not write cannot be locked either, and what to do."""
        return (f"cannot lock the {self.what} {self.folder}: its lock file {self.path} belongs to {_owner(self.path)}, "
                f"and {reason}. If no job is writing there (`fuser -v {self.path}`, on the host that ran it, names "
                f"one), remove {self.path} and run again; or choose another {self.option}")

    def _busy_message(self, holder: dict) -> str:
        here = socket.gethostname()
        pid, host = holder.get("pid"), holder.get("host")
        if pid is None:  # it has the lock but has not written its details yet (a fraction of a second)
            who, stop = "a process that is just starting", "stop it"
        elif (not host or host == here) and int(pid) != os.getpid() and not _alive(int(pid)):
            # The file names a job that has exited: it was killed, and the lock is held by a process it
            # started, or by another user's job that locked the file read-only and could not name itself.
            who = (f"a process the lock file could not name: it names pid {pid}, which has exited; the holder is "
                   f"a process pid {pid} started, or another user's job that may not write {LOCK_NAME}, and "
                   f"`fuser -v {self.path}` names it")
            stop = "stop it (a harvest or training resumes when its command is re-run)"
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


def _write_holder(fd: int) -> tuple[int, int, bytes]:
    """Write this job's details into the lock file open as ``fd``; return its (device, inode, content)."""
    now = time.time()
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started_unix": now,
            "started": dt.datetime.fromtimestamp(now).astimezone().isoformat(timespec="seconds"),
            "command": shlex.join(sys.argv)[:2000]}
    details = (json.dumps(info) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, details, 0)
    st = os.fstat(fd)
    return st.st_dev, st.st_ino, details


def _remove_if_unchanged(path: Path, stamp: tuple[int, int, bytes]) -> None:
    """Remove ``path`` if it is still the file ``stamp`` (:func:`_write_holder`'s) describes, holding the
    details written then. Unlocked (no flock), a second job may have written its own details over them
    since: then the file is that job's to remove."""
    dev, ino, details = stamp
    try:
        st = os.stat(path)
        if (st.st_dev, st.st_ino) == (dev, ino) and path.read_bytes() == details:
            path.unlink()
    except OSError:
        pass


def _may_write(folder: Path) -> bool:
    """Whether this process may create files in ``folder`` (as its effective user, ACLs included)."""
    if os.access in os.supports_effective_ids:
        return os.access(folder, os.W_OK | os.X_OK, effective_ids=True)
    return os.access(folder, os.W_OK | os.X_OK)


def _owner(path: Path) -> str:
    """``user NAME`` (or ``uid N``) owning ``path``, for messages."""
    try:
        uid = os.stat(path).st_uid
    except OSError:
        return "another user"
    try:
        import pwd

        return f"user {pwd.getpwuid(uid).pw_name}"
    except (ImportError, KeyError):  # no password database, or an unnamed uid (containers)
        return f"uid {uid}"


def lock_holder(folder: str | Path) -> dict | None:
    """Whether another job holds ``folder``'s lock now: the holder's details (pid, host, started,
    command; ``{}`` if unreadable), or None if no job does (or the filesystem has no ``flock``).
    Looks only: a non-blocking shared ``flock``, released at once (a held lock is exclusive, so it
    refuses it); never takes the folder."""
    if fcntl is None:
        return None
    try:
        fd = os.open(Path(folder) / LOCK_NAME, os.O_RDONLY)
    except OSError:  # no lock file: no job there
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(fd)
        except OSError:  # no flock on this filesystem: nothing to tell from
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def holder_summary(folder: str | Path) -> str | None:
    """Who holds ``folder``'s lock now, in a few words (``pid N[ on host H], started S``; ``a job``
    when the holder has not named itself yet), or None if no job does. Looks only (:func:`lock_holder`)."""
    holder = lock_holder(folder)
    if holder is None:
        return None
    if holder.get("pid") is None:
        return "a job"
    host = holder.get("host")
    who = f"pid {holder['pid']}" + (f" on host {host}" if host not in (None, socket.gethostname()) else "")
    return who + (f", started {holder['started']}" if holder.get("started") else "")


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
