"""A run folder (``--out``) and the run it holds: what a new command may do there.

A folder without ``config.json`` must be empty (a new run). One with a ``config.json`` but no
checkpoint or export holds an attempt that stopped before its first checkpoint: any config may
start afresh there. Otherwise the command must be the same run (its resume signature, the width
and the slots it resolves to on the cache) and it resumes.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path
from typing import Any

from shared.cache_format import CacheError, Manifest
from shared.folder_lock import LOCK_NAME
from shared.shard_io import atomic_write_bytes, is_temporary, sha256_file
from train.checkpoint import checkpoint_steps
from train.config import RESUME_FIELDS, TrainConfig
from train.dictionary import resolve_dec_init_norm, resolve_k_aux
from train.loader import default_eval_shards
from train.slots import SlotSpec

__all__ = ["SLOT_FIELDS", "RunMismatchError", "check_moved_cache", "check_run_dir", "has_results", "moved_from",
           "record_resume", "slot_summary"]


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


def _effective_signature(cfg: TrainConfig, n_shards: int, d_model: int, world_size: int) -> dict:
    """The resume signature with defaults resolved: leaving a flag out and giving its default
    value (λ, held-out shards of a cache of ``n_shards``, the decoder's initial norm, aux-K's
    latents for ``d_model``, the dead-latent window for ``world_size`` processes) are the same run."""
    sig = cfg.resume_signature()
    sig["sparsity_coeff"] = cfg.resolved_sparsity_coeff
    sig["eval_shards"] = default_eval_shards(n_shards) if cfg.eval_shards is None else cfg.eval_shards
    sig["dec_init_norm"] = resolve_dec_init_norm(cfg.dec_init_norm, cfg.activation)
    sig["k_aux"] = resolve_k_aux(cfg.k_aux, d_model)
    sig["dead_tokens"] = cfg.resolved_dead_tokens(world_size)
    return sig


def _commit_in(path: str | None) -> str | None:
    """The commit of a resolved ``hf://`` cache folder (``.../snapshots/<sha>`` or a view of it)."""
    found = re.findall(r"[0-9a-f]{40}", path or "")
    return found[-1] if found else None


def _check_same_hub_commit(spec: str, saved_path: str | None, cache_dir: Path | None, run_dir: Path) -> None:
    """An ``hf://`` cache without ``@REV`` follows its branch: after a new push it resolves to another
    commit, whose rows the run's loader state does not describe. Name that and the pin that resumes."""
    if not str(spec).startswith("hf://") or saved_path is None or cache_dir is None:
        return
    then, now = _commit_in(saved_path), _commit_in(str(cache_dir.resolve()))
    if then and now and then != now:
        base = str(spec).split("@", 1)[0]
        raise RunMismatchError(
            f"--out {run_dir} was trained on {base} at commit {then[:12]}; {spec} resolves to commit "
            f"{now[:12]} now (the repo has moved on). Resume with --cache {base}@{then}, or use another --out"
        )


def _check_same_cache(saved_cache: dict, cache_dir: Path | None, shards_sha256: str | None, run_dir: Path,
                      spec: str) -> None:
    """Refuse another cache's rows: the run's loader position and its learned dictionary describe the
    shards it was trained on. Compared by content (the shards' digests), not by path, so a cache that
    was moved or copied resumes. Runs from before ``shards_sha256`` was recorded are not checked here."""
    then = saved_cache.get("shards_sha256")
    if not then:
        return
    if shards_sha256 is None:
        if cache_dir is None:
            return
        shards_sha256 = Manifest.load(cache_dir).shards_fingerprint  # the manifest open_cache read
    if shards_sha256 != then:
        now = str(cache_dir.resolve()) if cache_dir is not None else spec
        raise RunMismatchError(
            f"--out {run_dir} was trained on another cache: {saved_cache.get('path') or saved_cache.get('spec')} "
            f"(shards {then[:12]}), but --cache {spec} is {now} (shards {shards_sha256[:12]}). Re-run with the "
            "original --cache to resume, or choose another --out")


def moved_from(run_dir: Path, cache_dir: Path, spec: str) -> str | None:
    """The folder a resumed run's local cache was at when it was recorded, if the cache has been moved or
    copied since (None: same place, an ``hf://`` cache, whose downloads are checked, or nothing recorded)."""
    if str(spec).startswith("hf://"):
        return None
    try:
        then = (json.loads((run_dir / "config.json").read_text()).get("cache") or {}).get("path")
    except (OSError, ValueError, AttributeError):
        return None
    return then if then and then != str(cache_dir.resolve()) else None


def check_moved_cache(manifest: Manifest, cache_dir: Path, moved: dict[str, str], *, progress: bool) -> None:
    """Hash every shard of a cache that was moved or copied since a run was trained on it (``moved``: run
    folder -> the cache's old folder), against the manifest: a copy is matched to the run by the checksums
    its manifest lists, so the files themselves must hold them. Raises :class:`CacheError` naming the
    shards that do not, before anything is trained."""
    from shared.progress import tqdm

    total = sum(s.bytes for s in manifest.shards)
    bad = []
    with tqdm(total=total, unit="B", unit_scale=True, desc="check moved cache", disable=not progress) as bar:
        for shard in manifest.shards:
            path = cache_dir / shard.file
            try:
                if sha256_file(path) != shard.sha256:
                    bad.append(shard.file)
            except OSError as e:
                bad.append(f"{shard.file} ({e.strerror or e})")
            bar.update(shard.bytes)
    if bad:
        run, old = next(iter(moved.items()))
        raise CacheError(
            f"--cache {cache_dir} is a moved or copied cache (run {run} was trained on it at {old}), and "
            f"{len(bad)} of its {len(manifest.shards)} shards do not match the sha256 its manifest lists: "
            f"{', '.join(bad[:6])}{' ...' if len(bad) > 6 else ''}. Copy them again from the original (`python "
            f"run_harvest.py verify {cache_dir}` checks the whole cache), then resume")


def _launch_command(world_size: int) -> str:
    return ("python run_train.py ... (one process, no torchrun)" if world_size == 1
            else f"torchrun --nproc-per-node {world_size} run_train.py ...")


def check_run_dir(cfg: TrainConfig, run_dir: Path, d_model: int, spec: SlotSpec, n_shards: int,
                  cache_dir: Path | None = None, world_size: int = 1, *, shards_sha256: str | None = None) -> bool:
    """Refuse a folder holding a different run. True if it holds this run (resume). Reads only.
    ``cache_dir``: where ``cfg.cache`` resolved now (an ``hf://`` spec names a commit-pinned folder).
    ``world_size``: processes of this command (a run resumes with the number it started with).
    ``shards_sha256``: the opened cache's ``Manifest.shards_fingerprint`` (default: read from
    ``cache_dir``'s manifest); a run recorded on other shards is refused.

    A folder whose ``config.json`` has no checkpoint or export beside it (an attempt stopped before
    its first checkpoint) holds nothing to resume or lose: it is started afresh, whatever its config.
    """
    cfg_path = run_dir / "config.json"
    if not cfg_path.exists():
        # The lock file is this job's own (rank 0 takes the lock before any rank looks here); a
        # temporary is a killed save's (this job discards it).
        if run_dir.exists() and any(p.name != LOCK_NAME and not is_temporary(p.name) for p in run_dir.iterdir()):
            raise RunMismatchError(f"--out {run_dir} is not empty and holds no run config; choose a new folder")
        return False
    if not has_results(run_dir):
        return False
    saved = json.loads(cfg_path.read_text())
    recorded = dict(saved["config"])
    if recorded.get("activation") in ("topk", "batchtopk"):
        # A λ it was given (refused now) never acted: the run resumes as if it had none.
        recorded["sparsity_coeff"] = None
    try:
        prev = TrainConfig(**{k: tuple(v) if k == "betas" else v for k, v in recorded.items()})
    except ValueError as e:  # written before a check that now refuses it (a NaN/inf value, a λ with topk)
        raise RunMismatchError(f"--out {run_dir} holds a run whose config is no longer accepted ({e}); it cannot "
                               "be resumed: use another --out, or delete it") from None
    mine = _effective_signature(cfg, n_shards, d_model, world_size)
    theirs = _effective_signature(prev, n_shards, d_model, world_size)
    diffs = [f"{k}: {theirs[k]!r} there vs {mine[k]!r} now" for k in mine
             if k not in SLOT_FIELDS and theirs[k] != mine[k]]
    if diffs:
        raise RunMismatchError(f"--out {run_dir} holds a different run ({'; '.join(diffs[:6])}); use another "
                               "--out, delete it, or repeat the original command to resume")
    _check_same_hub_commit(cfg.cache, saved.get("cache", {}).get("path"), cache_dir, run_dir)
    then = saved.get("world_size")  # None: a config.json from before it was recorded (the loader still checks)
    if then is not None and then != world_size:  # the saved loader position is in a stream of `then` ranks
        raise RunMismatchError(
            f"--out {run_dir} was trained with {then} process(es); this command runs {world_size}. Its data stream "
            f"depends on the number of processes: resume it with `{_launch_command(then)}` (--nproc-per-node "
            f"{then}), or use another --out")
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
    # Last: another cache with other slots or width is named by the checks above, more precisely.
    _check_same_cache(saved.get("cache") or {}, cache_dir, shards_sha256, run_dir, cfg.cache)
    return True


def record_resume(run_dir: Path, run_info: dict[str, Any]) -> dict[str, list] | None:
    """Bring a resumed run's ``config.json`` up to the command that resumed it, and say what changed.

    A resume must repeat the run's math and stream (the signature), but may change how it is run:
    ``--device``, ``--autocast``, ``--eval-every``, ``--log-every``, the cache's path (a moved
    cache), ... Those take effect, so the file records them, and appends ``{"at", "changed":
    {field: [before, now]}}`` to ``resumes``: the figures after a resume can be read knowing what
    ran them. Slot fields keep the run's spelling (a resume compares what they resolve to).
    Returns the changes (None: nothing changed, nothing written)."""
    path = run_dir / "config.json"
    saved = json.loads(path.read_text())
    before, now = saved["config"], run_info["config"]
    changed: dict[str, list] = {k: [before.get(k), v] for k, v in now.items()
                                if k not in RESUME_FIELDS and k not in SLOT_FIELDS and before.get(k) != v}
    for key in ("device",):
        if saved.get(key) != run_info.get(key):
            changed[key] = [saved.get(key), run_info.get(key)]
    old_cache, new_cache = saved.get("cache") or {}, run_info.get("cache") or {}
    if old_cache.get("path") != new_cache.get("path"):
        changed["cache.path"] = [old_cache.get("path"), new_cache.get("path")]
    if not changed:
        return None
    saved["config"] = {**before, **{k: v for k, v in now.items() if k in changed}}
    if "device" in changed:
        saved["device"] = run_info.get("device")
    if "cache.path" in changed:
        saved.setdefault("cache", {})["path"] = new_cache.get("path")
    at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    saved.setdefault("resumes", []).append({"at": at, "changed": changed})
    atomic_write_bytes(path, (json.dumps(saved, indent=1) + "\n").encode())
    return changed
