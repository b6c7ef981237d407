"""Damaged checkpoints: found by their recorded checksums (or by failing to parse, for checkpoints
from before checksums), reported by file, and skipped for the newest intact one, so the resumed
run still reproduces the uninterrupted run. Also the order of checkpoint folders past step 9,999,999."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from shared.cache_format import CacheError
from tests.cache_factory import make_cache
from train.checkpoint import (
    CHECKPOINT_FILES,
    CHECKSUMS_FILE,
    CheckpointError,
    checkpoint_steps,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    verify_checkpoint,
)
from train.config import TrainConfig
from train.export import load_dictionary
from train.metrics import TIMING_KEYS, read_metrics
from train.trainer import train, train_many

STEPS, EVERY = 12, 4


def _cfg(cache: Path, out: Path, **kw) -> TrainConfig:
    args: dict = {"cache": str(cache), "out": str(out), "activation": "topk", "k": 4, "latents": 32, "steps": STEPS,
                  "batch_size": 64, "lr": 3e-3, "log_every": 2, "checkpoint_every": EVERY, "keep_checkpoints": 3,
                  "progress": False, "device": "cpu"}
    args.update(kw)
    return TrainConfig(**args)


def _metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_metrics(run)]


def _same_weights(a: Path, b: Path) -> None:
    x, y = load_dictionary(a / "export"), load_dictionary(b / "export")
    for (k, v), (_, w) in zip(x.state_dict().items(), y.state_dict().items()):
        assert torch.equal(v, w), k


def _step_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:07d}"


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def _flip_byte(path: Path) -> None:
    """Change one byte in the middle: same size, so only the checksum can tell."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "cache"
    make_cache(path, n_shards=4, rows_per_shard=256)
    return path


@pytest.fixture(scope="module")
def reference(cache, tmp_path_factory) -> Path:
    """The uninterrupted run: checkpoints at steps 4, 8 and 12."""
    run = tmp_path_factory.mktemp("ref") / "run"
    train(_cfg(cache, run))
    assert checkpoint_steps(run) == [4, 8, 12]
    return run


def _crashed_copy(reference: Path, dest: Path) -> Path:
    """The reference run as if killed after its step-12 checkpoint, before the export."""
    shutil.copytree(reference, dest)
    shutil.rmtree(dest / "export")
    shutil.rmtree(dest / "dictionary")
    return dest


# ---- what a checkpoint records, and verify_checkpoint ----------------------------------------


def test_a_checkpoint_records_size_and_sha256_of_every_file(reference):
    path = _step_dir(reference, 12)
    record = json.loads((path / CHECKSUMS_FILE).read_text())
    assert set(record["files"]) == set(CHECKPOINT_FILES)
    for name, rec in record["files"].items():
        assert rec["bytes"] == (path / name).stat().st_size
    assert verify_checkpoint(path) == []


def test_verify_names_the_file_and_what_is_wrong(reference, tmp_path):
    path = tmp_path / "step-0000012"
    shutil.copytree(_step_dir(reference, 12), path)
    _flip_byte(path / "optimizer.pt")
    _truncate(path / "model.safetensors")
    (path / "state.safetensors").unlink()
    problems = verify_checkpoint(path)
    assert any(p.startswith("model.safetensors: ") and "(truncated)" in p for p in problems), problems
    assert any(p.startswith("optimizer.pt: sha256 does not match") and "same size" in p for p in problems), problems
    assert "state.safetensors: missing" in problems
    with pytest.raises(CheckpointError, match=r"checkpoint .*step-0000012 is damaged: .*model.safetensors"):
        load_checkpoint(path)


def _as_saved_before_checksums(path: Path) -> None:
    """A checkpoint as crosscache saved it before checksums: no checksums.json, nor state.json's marker."""
    (path / CHECKSUMS_FILE).unlink()
    state = json.loads((path / "state.json").read_text())
    del state["checksums"]
    (path / "state.json").write_text(json.dumps(state, indent=1))


def test_a_lost_checksums_file_is_damage_not_an_old_checkpoint(cache, reference, tmp_path, capsys):
    """Deleting checksums.json turned the check off (any file could then be altered unseen): state.json
    now says the checkpoint was saved with one, so its loss is damage, and the resume falls back."""
    run = _crashed_copy(reference, tmp_path / "run")
    (_step_dir(run, 12) / CHECKSUMS_FILE).unlink()
    _flip_byte(_step_dir(run, 12) / "model.safetensors")
    assert verify_checkpoint(_step_dir(run, 12))[0].startswith(f"{CHECKSUMS_FILE}: missing (this checkpoint was saved")
    train(_cfg(cache, run))
    assert "resuming from step 8" in capsys.readouterr().err
    assert _metrics(run) == _metrics(reference)
    _same_weights(run, reference)


@pytest.mark.parametrize("name", CHECKPOINT_FILES)
def test_a_checkpoint_without_checksums_still_reports_a_damaged_file_by_name(reference, tmp_path, name):
    """Checkpoints written before checksums were recorded: a file that does not parse is named,
    never a raw safetensors/pickle/json traceback."""
    path = tmp_path / "step-0000012"
    shutil.copytree(_step_dir(reference, 12), path)
    _as_saved_before_checksums(path)
    assert verify_checkpoint(path) == []
    _truncate(path / name)
    with pytest.raises(CheckpointError, match=rf"is damaged: {name}: unreadable \(\w+"):
        load_checkpoint(path)


# ---- resume falls back to the newest intact checkpoint ------------------------------------------


@pytest.mark.parametrize("name", [*CHECKPOINT_FILES, CHECKSUMS_FILE])
@pytest.mark.parametrize("damage", [_truncate, _flip_byte], ids=["truncated", "byte-flipped"])
def test_a_damaged_newest_checkpoint_falls_back_and_reproduces_the_run(cache, reference, tmp_path, capsys, name,
                                                                       damage):
    run = _crashed_copy(reference, tmp_path / "run")
    damage(_step_dir(run, 12) / name)
    res = train(_cfg(cache, run))
    err = capsys.readouterr().err
    assert f"step-0000012 is damaged: {name}" in err and "resuming from step 8" in err, err
    assert res.steps == STEPS and not res.already_complete
    assert _metrics(run) == _metrics(reference)  # lines past step 8 were dropped and written again
    _same_weights(run, reference)
    assert checkpoint_steps(run) == [4, 8, 12] and verify_checkpoint(_step_dir(run, 12)) == []  # rewritten


def test_the_cli_falls_back_past_two_damaged_checkpoints(cache, reference, tmp_path):
    run = _crashed_copy(reference, tmp_path / "run")
    _truncate(_step_dir(run, 12) / "state.json")
    _flip_byte(_step_dir(run, 8) / "model.safetensors")
    res = _cli(cache, run)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    assert "step-0000012 is damaged: state.json: " in res.stderr and "(truncated)" in res.stderr
    assert "step-0000008 is damaged: model.safetensors: sha256 does not match" in res.stderr
    assert "resuming from step 4" in res.stderr and "at step 4 of 12" in res.stdout
    assert _metrics(run) == _metrics(reference)
    _same_weights(run, reference)


def _cli(cache: Path, run: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    args = ["--cache", str(cache), "--out", str(run), "--activation", "topk", "--k", "4", "--latents", "32",
            "--steps", str(STEPS), "--batch-size", "64", "--lr", "3e-3", "--log-every", "2", "--checkpoint-every",
            str(EVERY), "--keep-checkpoints", "3", "--device", "cpu", "--no-progress"]
    return subprocess.run([sys.executable, str(ROOT / "run_train.py"), *args], env=env, capture_output=True, text=True,
                          timeout=300, check=False)


def test_the_cli_refuses_when_no_intact_checkpoint_is_left_and_names_the_fix(cache, reference, tmp_path):
    run = _crashed_copy(reference, tmp_path / "run")
    _truncate(_step_dir(run, 12) / "model.safetensors")
    _flip_byte(_step_dir(run, 8) / "optimizer.pt")
    _truncate(_step_dir(run, 4) / "state.safetensors")
    lines = read_metrics(run)
    res = _cli(cache, run)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    for step, name in ((12, "model.safetensors"), (8, "optimizer.pt"), (4, "state.safetensors")):
        assert f"step-{step:07d} is damaged: {name}" in res.stderr, res.stderr
    assert "no intact checkpoint to resume from" in res.stderr and "Restore the damaged file(s)" in res.stderr
    assert "delete the damaged checkpoint folder(s)" in res.stderr
    assert read_metrics(run) == lines and checkpoint_steps(run) == [4, 8, 12]  # nothing touched
    # The fix it names: delete them, and the same command trains the run again from the start.
    for step in (4, 8, 12):
        shutil.rmtree(_step_dir(run, step))
    res = _cli(cache, run)
    assert res.returncode == 0, res.stderr
    assert _metrics(run) == _metrics(reference)


def test_a_sweep_falls_back_to_the_newest_step_every_member_holds_intact(cache, tmp_path, capsys):
    base = [_cfg(cache, tmp_path / "ref" / "a"), _cfg(cache, tmp_path / "ref" / "b", latents=16)]
    train_many(base)
    members = [dataclasses.replace(c, out=str(tmp_path / "res" / Path(c.out).name)) for c in base]
    for ref, m in zip(base, members):
        _crashed_copy(Path(ref.out), Path(m.out))
    _flip_byte(_step_dir(Path(members[1].out), 12) / "model.safetensors")  # only member b's step 12
    train_many(members)
    assert "resuming from step 8, the newest checkpoint intact in every member" in capsys.readouterr().err
    for ref, m in zip(base, members):
        assert _metrics(Path(m.out)) == _metrics(Path(ref.out))
        _same_weights(Path(m.out), Path(ref.out))


def test_a_resume_discards_the_temporaries_of_killed_saves(cache, reference, tmp_path):
    """A save killed before its rename leaves a whole checkpoint under a temp name that no later pid
    overwrites; the resumed run (holding the folder's lock) removes it, and still reproduces the run."""
    run = _crashed_copy(reference, tmp_path / "run")
    stale = [run / "checkpoints" / ".step-0000016.tmp-4000001", run / ".config.json.tmp-4000002",
             run / "export" / ".weights.safetensors.tmp-4000003"]
    stale[0].mkdir()
    (stale[0] / "model.safetensors").write_bytes(b"x" * 4096)
    (run / "export").mkdir()
    for f in stale[1:]:
        f.write_bytes(b"half a file")
    keep = run / "checkpoints" / "notes.tmp-1"  # not an atomic write's name: not ours to delete
    keep.write_text("mine")
    train(_cfg(cache, run))
    assert not any(p.exists() for p in stale) and keep.exists()
    assert _metrics(run) == _metrics(reference)
    _same_weights(run, reference)
    # A folder holding only a killed first save's temporary is a new run's, not "not empty".
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / ".config.json.tmp-4000004").write_text("{")
    assert train(_cfg(cache, fresh, steps=2)).steps == 2 and not (fresh / ".config.json.tmp-4000004").exists()


# ---- metrics.jsonl on resume, a full disk, a moved cache ---------------------------------------


def test_metrics_survive_a_torn_last_line_and_a_failed_rewrite(cache, reference, tmp_path, monkeypatch):
    """A resume rewrote metrics.jsonl in place (a kill mid-way left it empty, or cut off, after which every
    resume died on a JSON error naming no file), and a half-written last line blocked every resume."""
    import shared.shard_io as shard_io
    from train.metrics import MetricsLogger

    run = _crashed_copy(reference, tmp_path / "run")
    before = (run / "metrics.jsonl").read_bytes()
    with monkeypatch.context() as patch:  # the rename of the rewrite fails (a kill there): nothing is lost
        patch.setattr(shard_io.os, "replace", lambda *a: (_ for _ in ()).throw(OSError(5, "I/O error")))
        with pytest.raises(OSError):
            MetricsLogger(run, resume_step=4)
    assert (run / "metrics.jsonl").read_bytes() == before
    with open(run / "metrics.jsonl", "a") as f:  # a crash (or a full disk) mid-line
        f.write('{"step": 14, "tokens": 89')
    train(_cfg(cache, run))
    assert _metrics(run) == _metrics(reference)
    _same_weights(run, reference)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:3] + ["{not json"] + lines[3:]) + "\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 4, is not a metrics line .* Delete that line"):
        MetricsLogger(run, resume_step=8)


def test_a_checkpoint_save_on_a_full_disk_cleans_up_and_says_so(cache, reference, tmp_path, monkeypatch,
                                                                 capsys):
    """torch.save reports a full disk as "unexpected pos"; the half-written temporary folder stayed and kept
    the disk full (so the re-run could not even take the folder's lock)."""
    import train.checkpoint as ckpt
    from shared.shard_io import DiskFullError

    run = tmp_path / "run"

    def full(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 526208 vs 526096")

    real_save, saves = torch.save, []

    def save_until_full(obj, f, *a, **k):
        saves.append(f)
        return (full if len(saves) == 2 else real_save)(obj, f, *a, **k)

    with monkeypatch.context() as patch:
        patch.setattr(ckpt.torch, "save", save_until_full)
        patch.setattr(ckpt.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 10, 10))
        with pytest.raises(DiskFullError, match=r"disk full while saving checkpoint step 8 in .*\(the partial one is "
                                                r"removed; checkpoint step 4 is intact\): free space"):
            train(_cfg(cache, run))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000004"]
    assert verify_checkpoint(_step_dir(run, 4)) == []
    # From the command line: the message and exit status 2, not a traceback.
    import run_train

    with monkeypatch.context() as patch:
        patch.setattr(ckpt.torch, "save", full)
        patch.setattr(ckpt.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 10, 10))
        args = ["--cache", str(cache), "--out", str(tmp_path / "cli"), "--activation", "topk", "--k", "4",
                "--latents", "32", "--steps", str(STEPS), "--batch-size", "64", "--checkpoint-every", str(EVERY),
                "--device", "cpu", "--no-progress"]
        assert run_train.main(args) == 2
    assert "disk full while saving checkpoint step 4" in capsys.readouterr().err
    train(_cfg(cache, run))  # space freed: the same command resumes and reproduces the run
    assert _metrics(run) == _metrics(reference)
    _same_weights(run, reference)


def test_a_full_disk_inside_the_weights_file_cleans_up_and_says_so(cache, reference, tmp_path, monkeypatch, capsys):
    """safetensors' save_file reports a full disk as a SafetensorError (an Exception, not an OSError): the save
    left its temporary folder and the run ended in a traceback. Seen on a real full tmpfs; the errno is in the text."""
    from safetensors import SafetensorError

    import run_train
    import train.checkpoint as ckpt

    real_save_file, saves = ckpt.save_file, []

    def save_file_until_full(tensors, path, *a, **k):
        saves.append(path)
        if len(saves) == 3:  # the second checkpoint's weights: half written, then the disk is full
            Path(path).write_bytes(b"\0" * 100)
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_save_file(tensors, path, *a, **k)

    run = tmp_path / "run"
    args = ["--cache", str(cache), "--out", str(run), "--activation", "topk", "--k", "4", "--latents", "32",
            "--steps", str(STEPS), "--batch-size", "64", "--checkpoint-every", str(EVERY), "--device", "cpu",
            "--no-progress"]
    with monkeypatch.context() as patch:
        patch.setattr(ckpt, "save_file", save_file_until_full)
        assert run_train.main(args) == 2
    err = capsys.readouterr().err
    assert f"disk full while saving checkpoint step {2 * EVERY}" in err and "Traceback" not in err, err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"step-{EVERY:07d}"]  # no temporary left
    # Another failure of the save is not called a full disk, and still leaves no temporary folder.
    with monkeypatch.context() as patch:
        patch.setattr(ckpt, "save_file", lambda *a, **k: (_ for _ in ()).throw(SafetensorError("other")))
        with pytest.raises(SafetensorError, match="other"):
            ckpt.save_checkpoint(tmp_path / "other", 1, model_state={"w": torch.zeros(2)}, optimizer_state={},
                                 tensors={}, state={}, keep=None)
    assert [p.name for p in (tmp_path / "other" / "checkpoints").iterdir()] == []


def test_a_moved_cache_is_checked_against_its_checksums_once(cache, reference, tmp_path, capsys):
    """A moved or copied cache resumes, matched by the checksums its manifest lists; a copy whose shards
    were damaged resumed silently (export off by 0.03). Now its shards are hashed when the path changes."""
    run = _crashed_copy(reference, tmp_path / "run")
    moved = tmp_path / "moved"
    shutil.copytree(cache, moved)
    shard = sorted((moved / "shards").iterdir())[1]
    _flip_byte(shard)
    with pytest.raises(CacheError, match=rf"is a moved or copied cache .* 1 of its 4 shards do not match the "
                                         rf"sha256 its manifest lists: shards/{shard.name}\. Copy them again"):
        train(_cfg(moved, run))
    assert checkpoint_steps(run) == [4, 8, 12]  # refused before anything changed
    shutil.copy2(cache / "shards" / shard.name, shard)
    train(_cfg(moved, run))
    assert _metrics(run) == _metrics(reference)
    _same_weights(run, reference)
    saved = json.loads((run / "config.json").read_text())
    assert saved["cache"]["path"] == str(moved.resolve())  # recorded: the next resume does not hash again


def test_the_folder_lock_is_taken_on_a_full_disk(tmp_path, monkeypatch, capsys):
    """The lock file's details (pid, host) could not be written on a full disk: the job died there, before
    it could remove a killed save's leftovers and so free the space."""
    import errno

    import shared.folder_lock as folder_lock

    def no_space(*a):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(folder_lock.os, "pwrite", no_space)
    with folder_lock.FolderLock(tmp_path / "run", what="run folder"):
        assert "disk of" in capsys.readouterr().err


# ---- the order of checkpoint folders --------------------------------------------------------


def test_checkpoints_are_ordered_by_step_past_9999999(tmp_path):
    """``step-%07d`` names grow an eighth digit at 10,000,000, where name order is no longer step order."""
    for step in (9_999_998, 9_999_999, 10_000_000, 10_000_001):
        (tmp_path / "checkpoints" / f"step-{step:07d}").mkdir(parents=True)
    (tmp_path / "checkpoints" / ".step-10000002.tmp-1").mkdir()  # a save in progress is not a checkpoint
    assert checkpoint_steps(tmp_path) == [9_999_998, 9_999_999, 10_000_000, 10_000_001]
    assert latest_checkpoint(tmp_path).name == "step-10000001"
    prune_checkpoints(tmp_path, 2)
    assert checkpoint_steps(tmp_path) == [10_000_000, 10_000_001]
    prune_checkpoints(tmp_path, 1, protect=[10_000_000])  # a sweep keeps the newest step all members hold
    assert checkpoint_steps(tmp_path) == [10_000_000, 10_000_001]
