"""Multi-process harvesting: real ``torchrun --nproc-per-node 2`` runs (gloo, CPU) on the toy pair."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, small_harvest_config
from harvest.distributed import assign_chunks
from harvest.harvester import harvest
from harvest.models import HarvestInputError
from shared.cache import open_cache, verify_cache
from shared.cache_format import CacheError, Manifest

# `torchrun` itself; --standalone picks a free port, so concurrent runs on one machine never clash.
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
# Small shards and chunks (64 rows, 2 shards a chunk) so that a kill lands mid-harvest.
CFG = dict(tokens=12_000, shard_size=0.0625, shuffle_shards=2, batch_size=8, calibration_tokens=1000)


def _cli_args(cfg) -> list[str]:
    return ["--models", *cfg.models, "--hooks", *cfg.hooks, "--dataset", cfg.dataset, "--tokens", str(cfg.tokens),
            "--context-size", str(cfg.context_size), "--batch-size", str(cfg.batch_size),
            "--shard-size", str(cfg.shard_size), "--shuffle-shards", str(cfg.shuffle_shards),
            "--calibration-tokens", str(cfg.calibration_tokens), "--device", "cpu", "--no-progress",
            "--out", cfg.out]


def _env() -> dict[str, str]:
    # torchrun gives each worker OMP_NUM_THREADS=1; the reference runs with one thread too, so
    # the comparison below can ask for identical bytes.
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def _torchrun(cfg, *extra: str, log: Path | None = None, nproc: int = 2) -> subprocess.Popen:
    cmd = [*TORCHRUN, "--nproc-per-node", str(nproc), str(ROOT / "run_harvest.py"), *_cli_args(cfg), *extra]
    sink = open(log, "w") if log else subprocess.PIPE  # noqa: SIM115 - closed with the process
    return subprocess.Popen(cmd, env=_env(), stdout=sink, stderr=subprocess.STDOUT, text=True, cwd=ROOT)


def _rows(cache_dir: Path) -> dict[tuple[int, int], tuple[int, bytes]]:
    """Every row of a cache: (seq, pos) -> (token, activation bytes)."""
    cache = open_cache(cache_dir)
    rows: dict[tuple[int, int], tuple[int, bytes]] = {}
    for i in range(cache.n_shards):
        with cache.shard(i) as sh:
            for seq, pos, tok, acts in zip(sh.seq.tolist(), sh.pos.tolist(), sh.token.tolist(), sh.acts):
                assert (seq, pos) not in rows, f"row {(seq, pos)} written twice"
                rows[(seq, pos)] = (tok, acts.contiguous().view(torch.uint8).numpy().tobytes())
    return rows


def _assert_same_cache(ref: Path, got: Path) -> None:
    m_ref, m_got = Manifest.load(ref), Manifest.load(got)
    assert m_got.complete and m_got.n_rows == m_ref.n_rows
    assert not list(got.glob("manifest.rank*.json")), "per-rank manifests left after the merge"
    report = verify_cache(got)
    assert report.ok, report.problems
    assert _rows(got) == _rows(ref)
    # By design each shard holds the very bytes of the one-process shard of the same index.
    assert [s.sha256 for s in m_got.shards] == [s.sha256 for s in m_ref.shards]
    assert (ref / "tokens.arrow").read_bytes() == (got / "tokens.arrow").read_bytes()
    assert (ref / "tokenizer.json").read_bytes() == (got / "tokenizer.json").read_bytes()  # rank 0's, written once
    assert m_got.tokenizer == m_ref.tokenizer and m_got.tokenizer["file"] == "tokenizer.json"
    assert m_got.normalization == m_ref.normalization
    assert m_got.extra["harvest"]["signature"] == m_ref.extra["harvest"]["signature"]
    assert {Path(s.file).name.split("-")[1] for s in m_got.shards} == {"rank0", "rank1"}


@pytest.fixture(scope="module")
def reference(toy_dirs, tmp_path_factory) -> Path:
    """The same harvest by one (plain, not torchrun) process, single-threaded like the workers."""
    out = tmp_path_factory.mktemp("dist") / "one"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        harvest(small_harvest_config(out, **CFG))
    finally:
        torch.set_num_threads(threads)
    return out


def test_assign_chunks_is_contiguous_and_balanced():
    rows = [100] * 9 + [40]
    runs = assign_chunks(rows, list(range(10)), 2)
    assert runs == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    runs = assign_chunks(rows, [2, 3, 7, 8, 9], 3)
    assert sorted(c for r in runs for c in r) == [2, 3, 7, 8, 9] and all(runs)
    assert assign_chunks([10, 10], [0, 1], 4) == [[0], [], [1], []]
    assert assign_chunks([10], [0], 2) == [[0], []]  # a lone chunk is rank 0's (it calibrates on it)
    assert assign_chunks([10], [], 2) == [[], []]


@pytest.mark.slow
def test_two_processes_hold_the_rows_of_one(reference, tmp_path):
    cfg = small_harvest_config(tmp_path / "two", **CFG)
    proc = _torchrun(cfg)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert "with 2 processes" in out
    _assert_same_cache(reference, tmp_path / "two")
    run = Manifest.load(tmp_path / "two").created_by["last_run"]
    assert run["world_size"] == 2 and 0 <= run["writer_wait_seconds"] <= run["seconds"]
    assert 0 < run["forward_loop_cpu_seconds"] <= run["forward_and_write_seconds"] + 0.01
    before = (tmp_path / "two" / "manifest.json").read_bytes()
    assert harvest(cfg).complete  # a one-process run sees a finished cache and leaves it as it is
    assert (tmp_path / "two" / "manifest.json").read_bytes() == before

    # Damaged: a shard of each rank deleted or truncated, the token table gone. A re-run repairs it.
    shards = Manifest.load(tmp_path / "two").shards
    (tmp_path / "two" / shards[3].file).unlink()
    with open(tmp_path / "two" / shards[-2].file, "r+b") as f:
        f.truncate(10)
    (tmp_path / "two" / "tokens.arrow").unlink()
    proc = _torchrun(cfg)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert "repairing" in out and "2 shards damaged" in out and "tokens.arrow missing" in out
    _assert_same_cache(reference, tmp_path / "two")


def _worker_pid(agent_pid: int, rank: int) -> int | None:
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (d / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == agent_pid and f"RANK={rank}".encode() in env:
            return int(d.name)
    return None


def _listed(path: Path) -> int:
    try:
        return len(json.loads(path.read_text())["shards"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


@pytest.mark.slow
def test_a_killed_rank_stops_the_job_and_a_rerun_completes_it(reference, tmp_path):
    cfg = small_harvest_config(tmp_path / "crashed", **CFG)
    log = tmp_path / "log.txt"
    timeout = 60
    proc = _torchrun(cfg, "--dist-timeout", str(timeout), log=log)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and _listed(tmp_path / "crashed" / "manifest.rank1.json") < 3:
        time.sleep(0.01)
    victim = _worker_pid(proc.pid, 1)
    assert proc.poll() is None and victim is not None, "harvest finished before it could be killed; make it longer"
    os.kill(victim, signal.SIGKILL)
    killed_at = time.time()
    proc.wait(timeout=timeout + 45)
    assert time.time() - killed_at < timeout, "the job outlived the documented timeout"
    text = log.read_text()
    assert proc.returncode != 0
    assert "rank      : 1" in text and "SIGKILL" in text, text  # torchrun names the dead rank
    assert "error: rank 0:" in text and "re-run the same command" in text, text  # rank 0 says why it stopped

    crashed = tmp_path / "crashed"
    partial = Manifest.load(crashed)
    assert not partial.complete
    with pytest.raises(CacheError, match="incomplete"):
        open_cache(crashed)
    # A plain one-process run does not pick up a multi-process harvest half way; verify says how to finish it.
    with pytest.raises(HarvestInputError, match="multi-process harvest"):
        harvest(cfg)
    check = subprocess.run([sys.executable, str(ROOT / "run_harvest.py"), "verify", str(crashed)], capture_output=True,
                           text=True, timeout=120, env=_env())
    assert check.returncode == 1 and "harvest not complete" in check.stderr
    assert "resume it under torchrun with the same flags, `torchrun --nproc-per-node N run_harvest.py " in check.stderr

    rerun = _torchrun(cfg)
    out, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, out
    assert "resuming" in out
    _assert_same_cache(reference, crashed)
    assert not [p for p in crashed.rglob("*") if ".tmp-" in p.name]


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.slow
def test_a_hung_rank_makes_the_others_stop_after_the_timeout(toy_dirs, tmp_path):
    cfg = small_harvest_config(tmp_path / "hung", **{**CFG, "tokens": 4000})
    log = tmp_path / "log.txt"
    timeout = 10
    proc = _torchrun(cfg, "--dist-timeout", str(timeout), log=log)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and _listed(tmp_path / "hung" / "manifest.rank1.json") < 1:
        time.sleep(0.01)
    victim, rank0 = _worker_pid(proc.pid, 1), _worker_pid(proc.pid, 0)
    assert proc.poll() is None and victim and rank0, "harvest finished before rank 1 could be stopped"
    os.kill(victim, signal.SIGSTOP)  # alive but silent: torchrun cannot tell
    stopped_at = time.time()
    try:
        while _alive(rank0) and time.time() - stopped_at < 120:
            time.sleep(0.05)
        waited = time.time() - stopped_at
    finally:
        os.kill(victim, signal.SIGCONT)  # let torchrun's SIGTERM through
    proc.wait(timeout=60)
    text = log.read_text()
    assert proc.returncode != 0
    assert waited < timeout + 60, waited  # rank 0's own rows, then the timeout
    assert f"error: rank 0: no answer within --dist-timeout {timeout}s while waiting for the other ranks" in text, text


def test_wait_for_ranks_waits_while_they_move_and_names_the_stalled(tmp_path):
    from harvest.rank_progress import RankProgress, progress_name, wait_for_ranks

    now = [0.0]

    def clock() -> float:  # each poll is 1 s later
        now[0] += 1.0
        return now[0]

    mine, moving, stuck = (RankProgress(tmp_path, r, every_s=0) for r in range(3))
    mine.done()
    moving.moving(0)
    stuck.moving(0)
    # Rank 1 moves on every poll (this rank rewrites its file from the clock), rank 2 never: after 5 polls
    # without a change rank 2 is named, while rank 1 (not done) kept the wait going until then.
    real = clock

    def clock_moving_rank1() -> float:
        t = real()
        moving.moving(int(t))
        return t

    assert wait_for_ranks(tmp_path, 0, 3, 5.0, poll_s=0, clock=clock_moving_rank1) == [2]
    assert now[0] >= 6
    stuck.done()
    moving.done()
    assert wait_for_ranks(tmp_path, 0, 3, 5.0, poll_s=0, clock=clock) == []
    (tmp_path / progress_name(2)).unlink()  # never written (or removed): unchanged, so stalled in time
    assert wait_for_ranks(tmp_path, 0, 3, 5.0, poll_s=0, clock=clock) == [2]


SLOW_RANK1 = """
import os, sys, time
sys.path.insert(0, {root!r})
import run_harvest
from harvest import harvester, rank_progress
if os.environ["RANK"] == "1":  # rank 1 runs slower than rank 0 (an older device), by more than --dist-timeout
    writing = []  # from its write phase on (before it, the ranks meet at collectives under the timeout)
    real_init, real_batches = rank_progress.RankProgress.__init__, harvester._Forward._batches
    def init(self, *a, **k):
        writing.append(True)
        real_init(self, *a, **k)
    def slow(self, a, b):
        for batch in real_batches(self, a, b):
            if writing:
                time.sleep(1)
            yield batch
    rank_progress.RankProgress.__init__, harvester._Forward._batches = init, slow
sys.exit(run_harvest.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_ranks_that_drift_apart_by_more_than_the_timeout_still_merge(toy_dirs, tmp_path):
    """The ranks meet only at the start and the merge: rank 0, done first, waited for rank 1 in a collective
    under --dist-timeout, and a long harvest whose ranks drift stopped at its very end. Rank 0 now waits
    while rank 1's progress file moves."""
    script = tmp_path / "slow_rank1.py"
    script.write_text(SLOW_RANK1.format(root=str(ROOT)))
    cfg = small_harvest_config(tmp_path / "drift", **{**CFG, "tokens": 20_000})
    # A killed run's "done" left behind must not end rank 0's wait early.
    (tmp_path / "drift").mkdir()
    (tmp_path / "drift" / "manifest.rank1.progress").write_text("done")
    # Rank 1's forward batches (8 x 64 tokens) are a second late each once it writes (12 s in all), in groups of
    # 8 batches (4096 tokens, 8 s): its progress moves with every batch, not only when a group's rows are sent.
    cmd = [*TORCHRUN, "--nproc-per-node", "2", str(script), *_cli_args(cfg), "--capture-group-tokens", "4096",
           "--dist-timeout", "4"]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    got = tmp_path / "drift"
    assert Manifest.load(got).complete and Manifest.load(got).n_rows == 20_000
    assert verify_cache(got).ok
    assert not list(got.glob("manifest.rank*"))  # rank manifests and progress files: gone with the merge
