"""A run folder (``--out``) and the run it holds: what a new command may do there.

A folder without ``config.json`` must be empty (a new run). One with a ``config.json`` but no
checkpoint or export holds an attempt that stopped before its first checkpoint: any config may
start afresh there. Otherwise the command must be the same run (its resume signature, the width
and the slots it resolves to on the cache) and it resumes.
"""

from __future__ import annotations

import json
from pathlib import Path

from train.checkpoint import checkpoint_steps
from train.config import TrainConfig
from train.loader import default_eval_shards
from train.slots import SlotSpec

__all__ = ["SLOT_FIELDS", "RunMismatchError", "check_run_dir", "has_results", "slot_summary"]


class RunMismatchError(ValueError):
    """The run folder holds a different run (config or cache width)."""


SLOT_FIELDS = ("models", "hooks", "in_hooks", "out_hooks")
"""Config fields a resume compares through the slots they resolve to, not as spelled: leaving
``--models`` out and naming the cache's only model are the same run."""


def has_results(run_dir: Path) -> bool:
    """Whether a run folder holds anything a new run must not overwrite: a checkpoint or an export."""
    return bool(checkpoint_steps(run_dir)) or (run_dir / "export").exists() or (run_dir / "dictionary").exists()


def slot_summary(names: list[str], in_slots: list[int], out_slots: list[int]) -> str:
    ins, outs = [names[i] for i in in_slots], [names[i] for i in out_slots]
    return f"slots {ins}" if ins == outs else f"slots {ins} -> {outs}"


def _effective_signature(cfg: TrainConfig, n_shards: int) -> dict:
    """The resume signature with defaults resolved: leaving a flag out and giving its default
    value (λ, held-out shards of a cache of ``n_shards``) are the same run."""
    sig = cfg.resume_signature()
    sig["sparsity_coeff"] = cfg.resolved_sparsity_coeff
    sig["eval_shards"] = default_eval_shards(n_shards) if cfg.eval_shards is None else cfg.eval_shards
    return sig


def check_run_dir(cfg: TrainConfig, run_dir: Path, d_model: int, spec: SlotSpec, n_shards: int) -> bool:
    """Refuse a folder holding a different run. True if it holds this run (resume). Reads only.

    A folder whose ``config.json`` has no checkpoint or export beside it (an attempt stopped before
    its first checkpoint) holds nothing to resume or lose: it is started afresh, whatever its config.
    """
    cfg_path = run_dir / "config.json"
    if not cfg_path.exists():
        if run_dir.exists() and any(run_dir.iterdir()):
            raise RunMismatchError(f"--out {run_dir} is not empty and holds no run config; choose a new folder")
        return False
    if not has_results(run_dir):
        return False
    saved = json.loads(cfg_path.read_text())
    prev = TrainConfig(**{k: tuple(v) if k == "betas" else v for k, v in saved["config"].items()})
    mine, theirs = _effective_signature(cfg, n_shards), _effective_signature(prev, n_shards)
    diffs = [f"{k}: {theirs[k]!r} there vs {mine[k]!r} now" for k in mine
             if k not in SLOT_FIELDS and theirs[k] != mine[k]]
    if diffs:
        raise RunMismatchError(f"--out {run_dir} holds a different run ({'; '.join(diffs[:6])}); use another "
                               "--out, delete it, or repeat the original command to resume")
    if saved.get("d_model") != d_model:
        raise RunMismatchError(f"--out {run_dir} was trained on d_model={saved.get('d_model')} activations; the "
                               f"cache {cfg.cache} has d_model={d_model}: use a cache of the same width")
    # The resolved slots, not the flags: the same flags on another cache can mean other slots.
    theirs_slots = slot_summary(saved["slots"], saved["in_slots"], saved["out_slots"])
    mine_slots = slot_summary(spec.slot_names, spec.in_slots, spec.out_slots)
    if theirs_slots != mine_slots:
        raise RunMismatchError(
            f"--out {run_dir} was trained on {theirs_slots}; the cache {cfg.cache} with these --models/--hooks gives "
            f"{mine_slots}: resume with the cache and slots it was trained on, or use another --out")
    return True
