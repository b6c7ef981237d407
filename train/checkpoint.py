"""Training checkpoints: weights, optimizer, loader position, RNG and counters, written atomically.

A checkpoint is a folder ``<run>/checkpoints/step-000500/`` with
- ``model.safetensors``: the dictionary's state dict (safetensors, never pickle);
- ``optimizer.pt``: the optimizer state dict (tensors and numbers only; loaded with
  ``torch.load(weights_only=True)``, which refuses arbitrary objects);
- ``state.safetensors``: trainer tensors (dead-latent counters, torch RNG state);
- ``state.json``: step, tokens, loader state, the config's resume signature;
- ``checksums.json``: size and sha256 of each file above, written last (``state.json`` says one was
  written, so a checkpoint that lost it is not taken for one from before checksums).
It is built under a temporary name, fsynced, and renamed into place (a save that fails, say on a
full disk, removes its temporary folder), so a killed save never leaves a folder that looks complete:
a ``step-NNNNNNN`` folder is a committed checkpoint, and a file that no longer matches its checksum
was damaged on disk afterwards (:class:`CheckpointError`).
Only the last ``keep`` checkpoints are kept.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from shared.shard_io import DiskFullError, fsync_dir, sha256_file

__all__ = ["CHECKPOINT_DIR", "CHECKPOINT_FILES", "CHECKSUMS_FILE", "CheckpointError", "checkpoint_path",
           "checkpoint_steps", "latest_checkpoint", "load_checkpoint", "prune_checkpoints", "save_checkpoint",
           "verify_checkpoint"]

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_FILES = ("model.safetensors", "optimizer.pt", "state.safetensors", "state.json")
CHECKSUMS_FILE = "checksums.json"
CHECKSUMS_FORMAT = "crosscache.checkpoint-checksums/1"
CHECKSUMS_KEY = "checksums"
"""The key of ``state.json`` naming the checksums format the checkpoint was saved with."""
_STEP_DIR = re.compile(r"step-(\d+)")


class CheckpointError(ValueError):
    """A committed checkpoint is damaged: a file is missing, truncated, altered or unreadable."""


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    """The folder of checkpoint ``step`` of a run."""
    return Path(run_dir) / CHECKPOINT_DIR / f"step-{step:07d}"


def _step_dirs(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every committed checkpoint, ascending by step (the number, not the
    name: ``step-10000000`` sorts after ``step-9999999``). Temporary ``.step-*`` folders are not listed."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.fullmatch(p.name)) and p.is_dir()]
    return sorted(found)


def _record_sha256(files: dict[str, Any]) -> str:
    """The checksum of the checksums, so damage to ``checksums.json`` is not blamed on a file it lists."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    state: dict[str, Any],
    keep: int | None,
) -> Path:
    """Write checkpoint ``step`` atomically; with ``keep``, prune all but the last ``keep``.

    A sweep passes ``keep=None`` and calls :func:`prune_checkpoints` once every member has saved
    the step, so a crash between members never leaves one without the step the others resume from.
    """
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(run_dir, step)
    tmp = root / f".step-{step:07d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save_file({k: v.detach().to("cpu").contiguous() for k, v in model_state.items()}, tmp / "model.safetensors")
        torch.save(optimizer_state, tmp / "optimizer.pt")
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp / "state.safetensors")
        # The marker says checksums.json belongs here: without it, its loss would pass for an old checkpoint.
        (tmp / "state.json").write_text(json.dumps({**state, CHECKSUMS_KEY: CHECKSUMS_FORMAT}, indent=1))
        # Recorded inside the folder before it is committed: damage found later is the disk's or a user's.
        files = {name: {"bytes": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)}
                 for name in CHECKPOINT_FILES}
        record = {"format": CHECKSUMS_FORMAT, "files": files, "record_sha256": _record_sha256(files)}
        (tmp / CHECKSUMS_FILE).write_text(json.dumps(record, indent=1))
        for f in tmp.iterdir():
            _fsync_file(f)
        fsync_dir(tmp)
    # torch.save reports a full disk as a RuntimeError ("unexpected pos"), safetensors' save_file as a
    # SafetensorError (an Exception): whatever failed, the half-written folder goes (else it keeps the disk full).
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not _disk_full(e, root, model_state):
            raise
        older = checkpoint_steps(run_dir)
        kept = f"checkpoint step {older[-1]} is intact" if older else "no earlier checkpoint was saved"
        raise DiskFullError(errno.ENOSPC, f"disk full while saving checkpoint step {step} in {root} (the partial one "
                            f"is removed; {kept}): free space there and re-run the same command to resume") from e
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    if keep is not None:
        prune_checkpoints(run_dir, keep)
    return final


def _disk_full(e: BaseException, root: Path, model_state: dict[str, torch.Tensor]) -> bool:
    """Whether a failed save ran out of space: ENOSPC/EDQUOT, or (torch.save hides the errno) less free
    space left than the checkpoint needs (weights and two Adam moments)."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if f"os error {errno.ENOSPC})" in str(e) or f"os error {errno.EDQUOT})" in str(e):  # safetensors' Rust io error
        return True
    need = 3 * sum(t.numel() * t.element_size() for t in model_state.values())
    try:
        return shutil.disk_usage(root).free < need
    except OSError:
        return False


def prune_checkpoints(run_dir: str | Path, keep: int, protect: Collection[int] = ()) -> None:
    """Delete all but the newest ``keep`` checkpoints of a run, and never the steps in ``protect``
    (a sweep protects the newest steps every member holds, which a resume needs)."""
    for step, path in _step_dirs(run_dir)[:-keep]:
        if step not in protect:
            shutil.rmtree(path, ignore_errors=True)


def checkpoint_steps(run_dir: str | Path) -> list[int]:
    """Steps of the committed checkpoints of a run, ascending (not checked: see :func:`verify_checkpoint`)."""
    return [step for step, _ in _step_dirs(run_dir)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest committed checkpoint of a run, or None (not checked: see :func:`verify_checkpoint`)."""
    found = _step_dirs(run_dir)
    return found[-1][1] if found else None


def verify_checkpoint(path: str | Path) -> list[str]:
    """What is wrong with a checkpoint folder, one line per file (empty: intact).

    Compares each file with the size and sha256 recorded in ``checksums.json``. A checkpoint from
    before checksums were recorded is only checked for its files' presence (loading it may still
    find damage: :func:`load_checkpoint` reports that as a :class:`CheckpointError` too)."""
    path = Path(path)
    try:
        record = json.loads((path / CHECKSUMS_FILE).read_text())
    except FileNotFoundError:
        missing = [f"{name}: missing" for name in CHECKPOINT_FILES if not (path / name).is_file()]
        if _state_marker(path) is not None:  # saved with checksums: its own record is gone, so is the check
            missing.insert(0, f"{CHECKSUMS_FILE}: missing (this checkpoint was saved with one: its files cannot be "
                              "checked)")
        return missing
    except (OSError, ValueError) as e:
        return [f"{CHECKSUMS_FILE}: unreadable ({e})"]
    files = record.get("files") if isinstance(record, dict) and record.get("format") == CHECKSUMS_FORMAT else None
    if not isinstance(files, dict) or set(files) != set(CHECKPOINT_FILES):
        return [f"{CHECKSUMS_FILE}: not a {CHECKSUMS_FORMAT} record of {', '.join(CHECKPOINT_FILES)}"]
    if record.get("record_sha256") != _record_sha256(files):
        return [f"{CHECKSUMS_FILE}: altered on disk (its own checksum does not match)"]
    problems = []
    for name, want in files.items():
        f = path / name
        try:
            size = f.stat().st_size
            if size != want["bytes"]:
                problems.append(f"{name}: {size} bytes, {want['bytes']} recorded ("
                                + ("truncated)" if size < want["bytes"] else "grown)"))
            elif sha256_file(f) != want["sha256"]:
                problems.append(f"{name}: sha256 does not match the one recorded in {CHECKSUMS_FILE} (same size: "
                                "bytes altered on disk)")
        except FileNotFoundError:
            problems.append(f"{name}: missing")
        except (OSError, KeyError, TypeError) as e:
            problems.append(f"{name}: unreadable ({e})")
    return problems


def _state_marker(path: Path) -> str | None:
    """The checksums format ``state.json`` says the checkpoint was saved with (None: before checksums, or
    ``state.json`` unreadable, which loading reports)."""
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError):
        return None
    return state.get(CHECKSUMS_KEY) if isinstance(state, dict) else None


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Read a checkpoint folder: ``model``, ``optimizer``, ``tensors`` and ``state`` entries.

    Checks it first (:func:`verify_checkpoint`); raises :class:`CheckpointError` naming the file
    and what is wrong with it when it is damaged. Loads only safetensors, JSON and
    ``torch.load(weights_only=True)``, never arbitrary pickles."""
    path = Path(path)
    problems = verify_checkpoint(path)
    if problems:
        raise CheckpointError(f"checkpoint {path} is damaged: {'; '.join(problems)}")
    readers = {
        "model": ("model.safetensors", lambda f: load_file(f, device=str(device))),
        "optimizer": ("optimizer.pt", lambda f: torch.load(f, map_location=device, weights_only=True)),
        "tensors": ("state.safetensors", load_file),
        "state": ("state.json", lambda f: json.loads(f.read_text())),
    }
    out = {}
    for key, (name, read) in readers.items():
        try:
            out[key] = read(path / name)
        except Exception as e:  # safetensors, torch's unpickler and json each raise their own types
            why = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:200]  # torch's advice runs on for lines
            raise CheckpointError(
                f"checkpoint {path} is damaged: {name}: unreadable ({type(e).__name__}: {why})") from e
    return out
