"""One job per output folder (shared/folder_lock.py): a second harvest, training, sweep or analysis
into a folder another process holds is refused at once, naming that process; after ``kill -9`` of
the holder the folder is usable again with no cleanup. The holder is always a real process."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, small_harvest_config
from harvest.harvester import harvest
from shared.cache import verify_cache
from shared.folder_lock import BUSY_EXIT_CODE, LOCK_NAME, FolderBusyError, FolderLock, FolderLockError
from train.config import TrainConfig
from train.trainer import train, train_many

_HOLD = """
import os, sys, time
sys.path.insert(0, {root!r})
from shared.folder_lock import FolderLock
FolderLock(sys.argv[1], what=sys.argv[2]).acquire()
child = os.fork() if sys.argv[3] == "fork" else None
if child == 0:  # a forked worker that outlives its parent
    time.sleep(600)
    os._exit(0)
print("locked", child, flush=True)
time.sleep(600)
"""


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def _hold(folder: Path, what: str, fork: bool = False) -> tuple[subprocess.Popen, int | None]:
    """A real process holding ``folder``'s lock (and, with ``fork``, the pid of a child it forked after)."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLD.format(root=str(ROOT)), str(folder), what,
                             "fork" if fork else "-"], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().split()
    assert line and line[0] == "locked", "the holder did not take the lock"
    return proc, int(line[1]) if fork else None


def _kill_9(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _cfg(cache, out, **kw) -> TrainConfig:
    args = {"cache": str(cache), "out": str(out), "latents": 32, "steps": 4, "batch_size": 128, "lr": 3e-3,
            "log_every": 2, "checkpoint_every": 1000, "progress": False, "device": "cpu"}
    return TrainConfig(**{**args, **kw})


def _assert_names_the_holder(message: str, folder: Path, what: str, holder: subprocess.Popen) -> None:
    assert f"the {what} {folder} is in use by another job (pid {holder.pid} on this host, started " in message
    assert "command `-c " in message  # the holder's command line (here `python -c ...`)
    assert "Wait for the other job to finish" in message and f"`kill {holder.pid}`" in message
    assert "choose another --out" in message


def test_a_second_harvest_into_a_held_cache_folder_is_refused_and_a_kill_9_frees_it(toy_dirs, tmp_path):
    out = tmp_path / "cache"
    holder, _ = _hold(out, "cache folder")
    try:
        cfg = small_harvest_config(out, tokens=600, context_size=32, hooks=["blocks.1.hook_resid_post"])
        with pytest.raises(FolderBusyError) as refused:
            harvest(cfg)
        _assert_names_the_holder(str(refused.value), out, "cache folder", holder)
        cli = subprocess.run([sys.executable, str(ROOT / "run_harvest.py"), "--models", "toy-base", "--tokens", "600",
                              "--device", "cpu", "--no-progress", "--out", str(out)],
                             env=_env(), capture_output=True, text=True, timeout=300, check=False)
        assert cli.returncode == BUSY_EXIT_CODE == 75 and "Traceback" not in cli.stderr
        _assert_names_the_holder(cli.stderr, out, "cache folder", holder)
        assert "estimated cache size" not in cli.stdout  # refused before the models load
        assert [p.name for p in out.iterdir()] == [LOCK_NAME]  # nothing written
    finally:
        _kill_9(holder)
    # The killed holder's lock file is still there (with its details); the OS lock is gone with it.
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == holder.pid
    assert harvest(cfg).complete
    assert not (out / LOCK_NAME).exists()  # released and removed: never part of the cache
    assert verify_cache(out).ok


def test_a_second_training_into_a_held_run_folder_is_refused_and_a_kill_9_frees_it(toy_cache, tmp_path):
    run = tmp_path / "run"
    holder, _ = _hold(run, "run folder")
    try:
        with pytest.raises(FolderBusyError) as refused:
            train(_cfg(toy_cache, run))
        _assert_names_the_holder(str(refused.value), run, "run folder", holder)
        cli = subprocess.run([sys.executable, str(ROOT / "run_train.py"), "--cache", str(toy_cache), "--out", str(run),
                              "--latents", "32", "--steps", "4", "--device", "cpu", "--no-progress"],
                             env=_env(), capture_output=True, text=True, timeout=300, check=False)
        assert cli.returncode == BUSY_EXIT_CODE == 75 and "Traceback" not in cli.stderr
        _assert_names_the_holder(cli.stderr, run, "run folder", holder)
        assert [p.name for p in run.iterdir()] == [LOCK_NAME]  # no config.json, no checkpoint
    finally:
        _kill_9(holder)
    result = train(_cfg(toy_cache, run))  # a folder holding only a dead job's lock file is a new run's
    assert result.steps == 4 and (run / "export" / "config.json").is_file()
    assert not (run / LOCK_NAME).exists()


def test_a_sweep_is_refused_when_one_member_folder_is_held_and_leaves_no_folder(toy_cache, tmp_path):
    base = _cfg(toy_cache, tmp_path / "sweep")
    members = [dataclasses.replace(base, out=str(tmp_path / "sweep" / n), lr=lr) for n, lr in (("a", 3e-3), ("b", 1e-3))]
    holder, _ = _hold(tmp_path / "sweep" / "b", "run folder")
    try:
        with pytest.raises(FolderBusyError, match=f"the run folder {tmp_path / 'sweep' / 'b'} is in use"):
            train_many(members)
        assert not (tmp_path / "sweep" / "a").exists()  # the lock it took on member a is released, its folder gone
    finally:
        _kill_9(holder)
    assert [r.steps for r in train_many(members)] == [4, 4]


def test_a_second_analysis_into_a_held_report_folder_is_refused(toy_cache, tmp_path):
    from train.analysis import analyze, analyze_cli
    from train.analysis_config import AnalysisConfig

    run = tmp_path / "run"
    train(_cfg(toy_cache, run))
    holder, _ = _hold(run / "analysis", "report folder")
    try:
        with pytest.raises(FolderBusyError, match=f"the report folder {run / 'analysis'} is in use .*pid {holder.pid}"):
            analyze(AnalysisConfig(run=str(run), progress=False))
        assert analyze_cli([str(run), "--no-progress"]) == BUSY_EXIT_CODE  # a scheduler can tell "retry later"
        assert [p.name for p in (run / "analysis").iterdir()] == [LOCK_NAME]
    finally:
        _kill_9(holder)


def test_analyze_and_lm_eval_of_a_run_still_training_say_try_again_later(toy_cache, tmp_path, capsys):
    """A run still training has no dictionary/ or export/ yet: exit 75 (retry later), not 2 (bad command)."""
    import shutil

    from train.analysis import analyze_cli
    from train.lm_eval import lm_eval_cli

    run = tmp_path / "run"
    train(_cfg(toy_cache, run))
    shutil.rmtree(run / "export")
    shutil.rmtree(run / "dictionary")
    holder, _ = _hold(run, "run folder")
    try:
        assert analyze_cli([str(run), "--no-progress"]) == BUSY_EXIT_CODE
        assert "is still training" in capsys.readouterr().err
        assert lm_eval_cli([str(run), "--no-progress"]) == BUSY_EXIT_CODE
        assert "then run lm-eval again" in capsys.readouterr().err
    finally:
        _kill_9(holder)
    assert lm_eval_cli([str(run), "--no-progress"]) == 2  # not training any more: re-run its command
    assert "has no dictionary/ yet: the run has not finished; re-run its run_train.py command" in capsys.readouterr().err


def test_a_child_forked_by_the_holder_does_not_keep_the_lock_after_a_kill_9(tmp_path):
    """A forked worker shares the lock's open file; it must not keep the folder locked once its parent is killed."""
    holder, child = _hold(tmp_path / "out", "cache folder", fork=True)
    assert child
    try:
        with pytest.raises(FolderBusyError):
            FolderLock(tmp_path / "out").acquire()
        _kill_9(holder)
        with FolderLock(tmp_path / "out") as lock:
            assert lock.held
            assert json.loads((tmp_path / "out" / LOCK_NAME).read_text())["pid"] == os.getpid()
    finally:
        os.kill(child, signal.SIGKILL)


def test_release_removes_the_lock_file_and_the_folders_it_created_when_empty(tmp_path):
    with FolderLock(tmp_path / "a" / "b" / "c"):
        assert (tmp_path / "a" / "b" / "c" / LOCK_NAME).is_file()
    assert not (tmp_path / "a").exists()  # nothing was written: nothing is left
    with FolderLock(tmp_path / "a" / "b"):
        (tmp_path / "a" / "b" / "result.txt").write_text("kept")
    assert [p.name for p in (tmp_path / "a" / "b").iterdir()] == ["result.txt"]
    (tmp_path / "file").write_text("")
    with pytest.raises(FolderLockError, match=f"--out {tmp_path / 'file'} exists and is not a folder"):
        FolderLock(tmp_path / "file").acquire()


def test_a_folder_that_cannot_be_locked_runs_unlocked(tmp_path, monkeypatch, capsys):
    """A filesystem without flock: a warning, and the job goes on. A folder this process may not write
    (a finished cache on a read-only mount): it cannot corrupt it, so it goes on silently."""
    from shared import folder_lock

    def no_flock(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    with monkeypatch.context() as patch:
        patch.setattr(folder_lock.fcntl, "flock", no_flock)
        with FolderLock(tmp_path / "nfs", what="cache folder") as lock:
            assert not lock.held
    assert "warning: cannot lock the cache folder" in capsys.readouterr().err
    (tmp_path / "ro").mkdir()

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    with monkeypatch.context() as patch:
        patch.setattr(folder_lock.os, "open", read_only)
        with FolderLock(tmp_path / "ro") as lock:
            assert not lock.held
    assert capsys.readouterr().err == "" and (tmp_path / "ro").is_dir()


def test_unlocked_release_removes_the_lock_file_it_wrote_and_the_folders_it_created(tmp_path, monkeypatch, capsys):
    """Without flock (a warning says so) a job still cleans up as a locked one does: its lock file, and the
    folders it created that are left empty. A file another unlocked job has written over is that job's."""
    from shared import folder_lock

    def no_flock(fd: int, op: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(folder_lock.fcntl, "flock", no_flock)
    with FolderLock(tmp_path / "a" / "b", what="cache folder") as lock:
        assert not lock.held
        assert json.loads((tmp_path / "a" / "b" / LOCK_NAME).read_text())["pid"] == os.getpid()  # for a person
    assert not (tmp_path / "a").exists()  # a failed harvest leaves no --out it created
    assert "warning: cannot lock the cache folder" in capsys.readouterr().err
    with FolderLock(tmp_path / "a" / "b"):
        (tmp_path / "a" / "b" / "result.txt").write_text("kept")
    assert [p.name for p in (tmp_path / "a" / "b").iterdir()] == ["result.txt"]
    with FolderLock(tmp_path / "c"):
        (tmp_path / "c" / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere"}))  # a second job's now
    assert json.loads((tmp_path / "c" / LOCK_NAME).read_text())["host"] == "elsewhere"
    # A forked child (a worker) that exits through release() removes nothing of its parent's.
    with FolderLock(tmp_path / "d") as lock:
        child = os.fork()
        if child == 0:
            lock.release()
            os._exit(0)
        assert os.waitpid(child, 0)[1] == 0
        assert (tmp_path / "d" / LOCK_NAME).is_file()
    assert not (tmp_path / "d").exists()


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(proc.stdout)


def _another_users_lock_file(folder: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, int]:
    """``folder`` (writable) holding the lock file another user's job left when it was killed: mode 0644,
    not theirs to write. Made here with mode 0444; as root, which ignores file modes, opening that very
    file (that inode) for writing is refused with EACCES, as the kernel refuses another user. Returns the
    file and the dead pid it names."""
    import socket

    folder.mkdir(parents=True, exist_ok=True)
    path, dead = folder / LOCK_NAME, _dead_pid()
    path.write_text(json.dumps({"pid": dead, "host": socket.gethostname(), "started_unix": time.time() - 60,
                                "started": "earlier", "command": "run_harvest.py --out team"}) + "\n")
    path.chmod(0o444)
    if os.geteuid() == 0:
        theirs, real_open = path.stat().st_ino, os.open

        def open_as_another_user(file, flags, mode=0o777, *, dir_fd=None):
            if flags & os.O_ACCMODE != os.O_RDONLY and Path(file) == path:
                try:
                    refused = os.stat(path).st_ino == theirs
                except FileNotFoundError:
                    refused = False
                if refused:
                    raise PermissionError(errno.EACCES, "Permission denied", str(file))
            return real_open(file, flags, mode, dir_fd=dir_fd)

        monkeypatch.setattr(os, "open", open_as_another_user)
    else:
        with pytest.raises(PermissionError):
            os.open(path, os.O_RDWR)
    return path, dead


def test_a_lock_file_of_another_user_is_locked_and_replaced_not_ignored(tmp_path, monkeypatch, capsys):
    """A team folder holding the lock file of another user's killed job: this job locks it (read-only; flock
    needs no write access) and replaces it by its own, so a second job is refused naming this one."""
    folder = tmp_path / "team"
    path, _ = _another_users_lock_file(folder, monkeypatch)
    with FolderLock(folder, what="cache folder") as lock:
        assert lock.held
        assert json.loads(path.read_text())["pid"] == os.getpid()  # this job's own file now
        with pytest.raises(FolderBusyError, match=rf"the cache folder {folder} is in use by another job "
                                                  rf"\(pid {os.getpid()} on this host"):
            FolderLock(folder, what="cache folder").acquire()
    assert not path.exists()  # removed at the end, as this job's own
    assert capsys.readouterr().err == ""


def test_a_lock_file_of_another_user_that_cannot_be_replaced_is_held_read_only(tmp_path, monkeypatch, capsys):
    """Where the file cannot be replaced (a folder with the sticky bit), the job holds the read-only lock; a
    second job is refused, told that the holder could not be named and how to find it."""
    folder = tmp_path / "team"
    path, dead = _another_users_lock_file(folder, monkeypatch)
    real_unlink = Path.unlink

    def sticky(self: Path, missing_ok: bool = False) -> None:
        if self == path:
            raise PermissionError(errno.EPERM, "Operation not permitted", str(self))
        real_unlink(self, missing_ok)

    monkeypatch.setattr(Path, "unlink", sticky)
    with FolderLock(folder, what="cache folder") as lock:
        assert lock.held
        assert f"note: {path} belongs to user " in capsys.readouterr().err
        with pytest.raises(FolderBusyError) as refused:
            FolderLock(folder, what="cache folder").acquire()
        msg = str(refused.value)
        assert (f"the cache folder {folder} is in use by another job (a process the lock file could not name: "
                f"it names pid {dead}, which has exited") in msg
        assert f"`fuser -v {path}` names it" in msg and "choose another --out" in msg
    assert json.loads(path.read_text())["pid"] == dead  # not this job's to remove


def test_a_lock_file_of_another_user_that_cannot_be_locked_is_refused_clearly(tmp_path, monkeypatch):
    """NFS emulates flock with a POSIX write lock, refused on a read-only descriptor: the job stops and says
    how to go on, instead of running unlocked."""
    import fcntl

    from shared import folder_lock

    folder = tmp_path / "team"
    path, _ = _another_users_lock_file(folder, monkeypatch)
    real_flock = folder_lock.fcntl.flock

    def nfs_flock(fd: int, op: int) -> None:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EBADF, "Bad file descriptor")
        real_flock(fd, op)

    monkeypatch.setattr(folder_lock.fcntl, "flock", nfs_flock)
    with pytest.raises(FolderLockError) as refused:
        FolderLock(folder, what="cache folder").acquire()
    msg = str(refused.value)
    assert f"cannot lock the cache folder {folder}: its lock file {path} belongs to user " in msg
    assert "this filesystem locks only files a process may write" in msg
    assert f"If no job is writing there (`fuser -v {path}`" in msg and "choose another --out" in msg


def test_a_folder_this_process_may_not_write_runs_unlocked_whoever_owns_the_lock_file(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "finished"
    path, dead = _another_users_lock_file(folder, monkeypatch)
    if os.geteuid() == 0:  # root may write any folder: as another user, this one would be refused
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == folder
                            else real_access(p, mode, **kw))
    folder.chmod(0o555)
    try:
        with FolderLock(folder) as lock:
            assert not lock.held
    finally:
        folder.chmod(0o755)
    assert capsys.readouterr().err == "" and json.loads(path.read_text())["pid"] == dead


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="acting as another user needs root")
@pytest.mark.parametrize("sticky", [False, True], ids=["team-folder", "sticky-folder"])
def test_another_user_locks_a_lock_file_it_may_not_write(sticky):
    """For real: a forked child turned user ``nobody`` locks the lock file root's killed job left in a
    folder everyone may write (the kernel refuses it write access); root's next job is refused."""
    import pwd  # noqa: F401 (imported before the child drops privileges: it can no longer read the venv)
    import shutil
    import socket
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="crosscache-lock-", dir="/tmp"))
    try:
        base.chmod(0o755)
        folder = base / "team"
        folder.mkdir()
        folder.chmod(0o1777 if sticky else 0o777)
        dead = _dead_pid()
        (folder / LOCK_NAME).write_text(json.dumps({"pid": dead, "host": socket.gethostname()}) + "\n")
        (folder / LOCK_NAME).chmod(0o644)
        r, w = os.pipe()
        child = os.fork()
        if child == 0:  # the other user's job
            try:
                os.setgid(65534)
                os.setuid(65534)
                lock = FolderLock(folder).acquire()
                os.write(w, f"{int(lock.held)}\n".encode())
                time.sleep(120)
            finally:
                os._exit(0)
        os.close(w)
        try:
            assert os.read(r, 16) == b"1\n"  # held, not run unlocked
            with pytest.raises(FolderBusyError) as refused:
                FolderLock(folder).acquire()
            named = f"pid {child} on this host" if not sticky else f"could not name: it names pid {dead}"
            assert named in str(refused.value)
            assert (folder / LOCK_NAME).stat().st_uid == (0 if sticky else 65534)
        finally:
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
            os.close(r)
        with FolderLock(folder) as lock:
            assert lock.held
    finally:
        shutil.rmtree(base)


# ---- torchrun: rank 0 holds the lock for the job; when it is refused, every rank stops at once ----------------


def _torchrun(script: str, args: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    t = time.time()
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(ROOT / script), *args], env=_env(), capture_output=True, text=True, timeout=600, check=False)
    return res, time.time() - t


@pytest.mark.slow
def test_torchrun_training_and_harvest_into_a_held_folder_stop_every_rank(toy_cache, tmp_path):
    run, out = tmp_path / "run", tmp_path / "cache"
    holders = [_hold(run, "run folder")[0], _hold(out, "cache folder")[0]]
    try:
        res, seconds = _torchrun("run_train.py", ["--cache", str(toy_cache), "--out", str(run), "--latents", "32",
                                                  "--steps", "4", "--device", "cpu", "--no-progress",
                                                  "--dist-timeout", "120"])
        assert res.returncode != 0 and seconds < 100, res.stderr[-3000:]  # no rank waited out the timeout
        assert f"the run folder {run} is in use by another job (pid {holders[0].pid}" in res.stderr
        assert "rank 1: stopping: rank 0 could not lock the run folder" in res.stderr
        assert [p.name for p in run.iterdir()] == [LOCK_NAME]
        res, seconds = _torchrun("run_harvest.py", ["--models", "toy-base", "--tokens", "600", "--device", "cpu",
                                                    "--no-progress", "--dist-timeout", "120", "--out", str(out)])
        assert res.returncode != 0 and seconds < 100, res.stderr[-3000:]
        assert f"the cache folder {out} is in use by another job (pid {holders[1].pid}" in res.stderr
        assert "rank 1: stopping: rank 0 failed while checking --out: FolderBusyError" in res.stderr
        assert [p.name for p in out.iterdir()] == [LOCK_NAME]
    finally:
        for h in holders:
            _kill_9(h)


def test_verify_and_push_of_a_cache_a_harvest_is_writing(toy_cache, tmp_path, capsys):
    """verify names the harvest at work (its problems may be work in progress, not damage to repair);
    push refuses: the files could change while they are uploaded."""
    import shutil

    import run_harvest
    from shared.cache_format import Manifest
    from shared.hub import push_cache

    cache = tmp_path / "cache"
    shutil.copytree(toy_cache, cache)
    (cache / Manifest.load(cache).shards[-1].file).unlink()  # as if the harvest were rewriting it
    holder, _ = _hold(cache, "cache folder")
    try:
        assert run_harvest.main(["verify", str(cache), "--no-checksums"]) == BUSY_EXIT_CODE  # try again later
        err = capsys.readouterr().err
        assert f"note: a harvest (pid {holder.pid}, started " in err and "verify again when it ends" in err
        assert "to repair" not in err
        with pytest.raises(FolderBusyError, match=f"refusing to push {cache}: a harvest \\(pid {holder.pid}, started "
                                                  ".*\\) is writing it now"):
            push_cache(cache, "alice/toy-diff", dry_run=True)
        assert run_harvest.main(["push", str(cache), "--repo", "alice/toy-diff", "--dry-run"]) == BUSY_EXIT_CODE
    finally:
        _kill_9(holder)
    assert run_harvest.main(["verify", str(cache), "--no-checksums"]) == 1
    assert "to repair" in capsys.readouterr().err
