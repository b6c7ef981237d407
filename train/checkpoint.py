"""Training checkpoints: weights, optimizer, loader position, RNG and counters, written atomically.

A checkpoint is a folder ``<run>/checkpoints/step-000500/`` with
- ``model.safetensors``: the dictionary's state dict (safetensors, never pickle);
- ``optimizer.pt``: the optimizer state dict (tensors and numbers only; loaded with
  ``torch.load(weights_only=True)``, which refuses arbitrary objects);
- ``state.safetensors``: trainer tensors (dead-latent counters, torch RNG state);
- ``state.json``: step, tokens, loader state, the config's resume signature.
It is built under a temporary name, fsynced, and renamed into place, so a killed save never
leaves a folder that looks complete. Only the last ``keep`` checkpoints are kept.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from shared.shard_io import fsync_dir

__all__ = ["save_checkpoint", "prune_checkpoints", "checkpoint_steps", "latest_checkpoint", "load_checkpoint",
           "CHECKPOINT_DIR"]

CHECKPOINT_DIR = "checkpoints"


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
    final = root / f"step-{step:07d}"
    tmp = root / f".step-{step:07d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().to("cpu").contiguous() for k, v in model_state.items()}, tmp / "model.safetensors")
    torch.save(optimizer_state, tmp / "optimizer.pt")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp / "state.safetensors")
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    for f in tmp.iterdir():
        _fsync_file(f)
    fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    if keep is not None:
        prune_checkpoints(run_dir, keep)
    return final


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints of a run."""
    root = Path(run_dir) / CHECKPOINT_DIR
    for old in sorted(p for p in root.iterdir() if p.name.startswith("step-"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def checkpoint_steps(run_dir: str | Path) -> list[int]:
    """Steps of the complete checkpoints of a run, ascending."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    return sorted(int(p.name.split("-")[1]) for p in root.iterdir()
                  if p.name.startswith("step-") and (p / "state.json").is_file())


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return None
    done = sorted(p for p in root.iterdir() if p.name.startswith("step-") and (p / "state.json").is_file())
    return done[-1] if done else None


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Read a checkpoint folder: ``model``, ``optimizer``, ``tensors`` and ``state`` entries."""
    path = Path(path)
    return {
        "model": load_file(path / "model.safetensors", device=str(device)),
        "optimizer": torch.load(path / "optimizer.pt", map_location=device, weights_only=True),
        "tensors": load_file(path / "state.safetensors"),
        "state": json.loads((path / "state.json").read_text()),
    }
