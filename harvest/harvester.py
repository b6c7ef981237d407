"""Stage 1: run the models over one token stream and write an aligned, normalized cache.

Order of work (each step's output is on disk before the next needs it, so a killed harvest
resumes from what is there):
1. lock the output folder for the whole harvest (:mod:`shared.folder_lock`: another job writing
   there is refused) and check it (a different harvest there is refused; a finished one is kept);
2. load the models and check hooks, tokenizers, widths, context size (no data forward yet);
3. estimate the cache size against free disk;
4. pack the token stream into sequences and write ``tokens.arrow``;
5. forward the first ``calibration_tokens`` rows, estimate normalization, write the manifest
   (``complete: false``);
6. forward the rest chunk by chunk while the shard writer shuffles rows and writes shards;
7. mark the manifest complete and write the dataset card.
"""

from __future__ import annotations

import datetime as dt
import math
import platform
import shutil
import sys
import time
from itertools import chain
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from harvest.config import HarvestConfig
from harvest.models import (HarvestInputError, LoadedModels, check_same_weights, hook_value, load_models,
                            resolve_device)
from harvest.rank_manifests import damaged_shards, remove_unlisted_shards, shard_index
from harvest.token_stream import TokenPlan, build_token_plan, empty_documents_note
from harvest.writer import drain, shard_writer_for, writer_wait_note
from shared.cache import CacheWriter, checked_token_table, planned_rows_unlisted, remove_stale_temp_files
from shared.cache_format import (
    CARD_NAME,
    MANIFEST_NAME,
    NORMALIZATION_NAME,
    SHARD_DIR,
    TOKENIZER_NAME,
    TOKENS_NAME,
    CacheError,
    Manifest,
    dtype_from_name,
)
from shared.card import CARD_MARK
from shared.config import config_to_json
from shared.folder_lock import LOCK_NAME, FolderLock
from shared.normalization import Normalization, NormalizationEstimator
from shared.shard_io import ShardReader, sha256_file
from shared.token_table import TokenIndex, read_token_table, write_token_table
from shared.tokenizer_file import (foreign_tokenizer_file, tokenizer_file_problem, tokenizer_json_bytes,
                                   write_tokenizer_file)

__all__ = ["CacheDamage", "HarvestLayout", "estimate_cache_bytes", "find_damage", "harvest", "plan_for_resume",
           "plan_from_config", "token_table_problem"]

_OWN_FILES = {MANIFEST_NAME, TOKENS_NAME, NORMALIZATION_NAME, TOKENIZER_NAME, SHARD_DIR}


def estimate_cache_bytes(n_rows: int, n_models: int, n_hooks: int, d_model: int, dtype: str, context_size: int,
                         *, tokenizer_bytes: int = 0) -> int:
    """Bytes a cache will take: activations + per-row index + token table (approximate), plus
    ``tokenizer_bytes`` for its ``tokenizer.json`` (a few MB for a large vocabulary)."""
    itemsize = dtype_from_name(dtype).itemsize
    acts = n_rows * n_models * n_hooks * d_model * itemsize
    index = n_rows * (8 + 4 + 4)
    tokens = int(n_rows * 4 * context_size / max(context_size - 1, 1)) + 4096
    return acts + index + tokens + tokenizer_bytes


@dataclass(frozen=True)
class HarvestLayout:
    """How rows are cut: shards of ``shard_rows``, chunks of ``shuffle_shards`` shards."""

    n_rows: int
    shard_rows: int
    shuffle_shards: int

    @property
    def chunk_size(self) -> int:
        return self.shard_rows * self.shuffle_shards

    @property
    def n_chunks(self) -> int:
        return math.ceil(self.n_rows / self.chunk_size)

    def chunk_rows(self) -> list[int]:
        return [min(self.chunk_size, self.n_rows - c * self.chunk_size) for c in range(self.n_chunks)]


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000:
            return f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def _shards(n: int) -> str:
    return f"{n} shard{'s' * (n != 1)}"


def _own_file(path: Path) -> bool:
    """Whether a file in ``--out`` (which holds no manifest) may be left by a harvest of ours: a
    README.md only if it is our dataset card, since the harvest would overwrite it."""
    if ".tmp-" in path.name or path.name == LOCK_NAME:  # LOCK_NAME: this harvest's lock (or a killed one's)
        return True
    if path.name == CARD_NAME:
        return path.is_file() and CARD_MARK in path.read_text(errors="replace")[:4096]
    return path.name in _OWN_FILES


def _existing_manifest(out: Path, cfg: HarvestConfig) -> Manifest | None:
    """The manifest of a resumable harvest of the same config, or None for a fresh start."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise HarvestInputError(f"--out {out} exists and is not a folder")
    if not (out / MANIFEST_NAME).is_file():
        foreign = [p.name for p in out.iterdir() if not _own_file(p)]
        if foreign:
            raise HarvestInputError(
                f"--out {out} is not empty and holds no cache manifest (found {sorted(foreign)[:5]}); "
                "choose an empty or new folder"
            )
        return None  # only leftovers of a harvest killed before its first manifest: start over
    manifest = Manifest.load(out)
    previous = manifest.extra.get("harvest", {}).get("signature")
    ours = cfg.content_signature()
    if previous != ours:
        diffs = (
            [f"{k}: {previous.get(k)!r} there vs {ours[k]!r} now" for k in ours if previous.get(k) != ours[k]]
            if isinstance(previous, dict)
            else ["no harvest signature in its manifest"]
        )
        raise HarvestInputError(
            f"--out {out} holds a different harvest ({'; '.join(diffs[:6])}). Use another --out, "
            "delete the folder, or repeat the original command to resume it"
        )
    return manifest


def discard_unstarted(out: Path, *, created: bool) -> None:
    """Clean up after a harvest that failed before saving its first manifest: nothing in ``out``
    can be resumed then. Removes the token table, the normalization side file and temp files, and
    the folder itself if the harvest ``created`` it and it is left empty (an empty folder left
    behind looks like a cache). Once a manifest exists this does nothing: the harvest resumes."""
    if not out.is_dir() or (out / MANIFEST_NAME).exists():
        return
    for name in (TOKENS_NAME, NORMALIZATION_NAME, TOKENIZER_NAME):
        (out / name).unlink(missing_ok=True)
    remove_stale_temp_files(out)
    for folder in [out / SHARD_DIR] + ([out] if created else []):
        try:
            folder.rmdir()
        except OSError:  # absent, or holds something this harvest did not write: leave it
            pass


def _plan_from_table(out: Path, manifest: Manifest, excluded: list[int]) -> TokenPlan:
    """Rebuild the plan of an interrupted harvest from its token table (no re-tokenizing)."""
    table = read_token_table(out)
    ids = [np.asarray(x, dtype=np.int32) for x in table.column("input_ids").to_pylist()]
    meta_names = [c for c in table.column_names if c not in ("seq", "input_ids")]
    excluded_arr = np.asarray(excluded, dtype=np.int64)
    counts = np.array([int((~np.isin(x, excluded_arr)).sum()) for x in ids], dtype=np.int64)
    target = int(manifest.extra["harvest"]["planned_rows"])
    surplus = int(counts.sum()) - target
    if surplus < 0 or (len(counts) and surplus >= counts[-1]):
        raise CacheError(f"{out / TOKENS_NAME} does not match the manifest's planned rows; delete {out} and re-run")
    counts[-1] -= surplus
    return TokenPlan(ids, {n: table.column(n).to_pylist() for n in meta_names}, counts)


@dataclass
class CacheDamage:
    """What a re-run of the harvest must repair in the cache it resumes or finds complete."""

    shards: list[str]  # each listed shard that is missing or has another size, with what is wrong
    first_chunk: int | None  # the first chunk holding one: it and every later chunk are rewritten
    token_table: str | None  # why tokens.arrow cannot be read (it is then built again), if it cannot
    tokenizer: str | None = None  # what is wrong with the tokenizer.json the manifest lists (written again)
    listing: str | None = None  # a finished manifest listing fewer rows than the harvest wrote (entries removed)

    def __bool__(self) -> bool:
        return bool(self.shards) or self.token_table is not None or self.tokenizer is not None or bool(self.listing)

    def describe(self) -> str:
        parts = []
        if self.shards:
            shown = "; ".join(self.shards[:3]) + (f"; and {len(self.shards) - 3} more" if len(self.shards) > 3 else "")
            parts.append(f"{_shards(len(self.shards))} damaged ({shown})")
        if self.token_table is not None:
            parts.append(self.token_table)
        if self.tokenizer is not None:
            parts.append(self.tokenizer)
        if self.listing is not None:
            parts.append(self.listing)
        return ", ".join(parts)


def find_damage(out: Path, manifest: Manifest, shuffle_shards: int) -> CacheDamage:
    """Check what a cache lists against the disk: every shard's presence and size (a stat each,
    no hashing) and that the token table reads. A harvest is deterministic, so a re-run rewrites
    whatever is found here byte for byte."""
    bad = damaged_shards(out, manifest.shards)
    first = min((shard_index(r.file) // shuffle_shards for r, _ in bad), default=None)
    listing = None
    if (planned := planned_rows_unlisted(manifest)) is not None:
        # Shard entries removed by hand: rewrite from the chunk of the first index no entry holds.
        held = sorted(shard_index(r.file) for r in manifest.shards)
        gap = next((i for i, idx in enumerate(held) if idx != i), len(held))
        first = gap // shuffle_shards if first is None else min(first, gap // shuffle_shards)
        listing = f"{MANIFEST_NAME} lists {manifest.n_rows:,} of the {planned:,} rows harvested (shard entries removed)"
    return CacheDamage([f"{r.file}: {why}" for r, why in bad], first, token_table_problem(out, manifest),
                       tokenizer_file_problem(out, manifest.tokenizer), listing)


def token_table_problem(out: Path, manifest: Manifest) -> str | None:
    """Why ``out/tokens.arrow`` cannot be used as it is (missing, unreadable, damaged inside, or not the file
    whose sha256 a finished harvest recorded), or None. A harvest rebuilds it from the seeded dataset."""
    if not (out / TOKENS_NAME).is_file():
        return f"{TOKENS_NAME} missing"
    problem = checked_token_table(out, manifest)[1]
    return None if problem is None else f"{TOKENS_NAME} unreadable or damaged ({problem})"


def plan_from_config(cfg: HarvestConfig, models: LoadedModels, *, say: Callable[[str], None] = print) -> TokenPlan:
    """The harvest's token plan, built from its dataset (seeded: the same config gives the same plan)."""
    plan = build_token_plan(
        dataset=cfg.dataset, split=cfg.split, text_column=cfg.text_column, meta_columns=cfg.meta_columns,
        seed=cfg.seed, tokenizer=models.tokenizer, context_size=cfg.context_size, bos_id=models.bos_id,
        eos_id=models.eos_id, excluded_ids=models.excluded_ids, n_rows=cfg.tokens, n_vocab=models.n_vocab,
    )
    if note := empty_documents_note(plan, cfg.text_column):
        say(note)
    return plan


def plan_for_resume(out: Path, manifest: Manifest, cfg: HarvestConfig, models: LoadedModels, *,
                    rebuild: bool, write: bool) -> TokenPlan:
    """The token plan of a harvest being resumed: read back from ``tokens.arrow``, or with
    ``rebuild`` (the table is missing or unreadable) built again from the dataset, which is
    seeded, and checked against the rows already written. ``write``: save a rebuilt plan as
    ``tokens.arrow``."""
    if not rebuild:
        return _plan_from_table(out, manifest, models.excluded_ids)
    plan = plan_from_config(cfg, models)
    _check_plan_against_shards(out, manifest, plan)
    if write:
        write_token_table(out, [x.tolist() for x in plan.input_ids], plan.metadata)
    return plan


def _check_plan_against_shards(out: Path, manifest: Manifest, plan: TokenPlan) -> None:
    """Refuse a rebuilt token plan that is not the one the cache was harvested from (the dataset
    changed since): its sequence count, and the token of every row of the first intact shard listed."""
    expected = manifest.extra.get("n_sequences")
    damaged = {r.file for r, _ in damaged_shards(out, manifest.shards)}
    rec = next((r for r in manifest.shards if r.file not in damaged), None)
    problem = None
    if expected is not None and plan.n_sequences != expected:
        problem = f"{plan.n_sequences} sequences, the manifest lists {expected}"
    elif rec is not None:
        with ShardReader(out / rec.file, row_shape=(len(manifest.models), len(manifest.hooks), manifest.d_model),
                         dtype=dtype_from_name(manifest.dtype), n_rows=rec.n_rows, expected_bytes=rec.bytes) as shard:
            if TokenIndex.from_sequences(plan.input_ids).mismatch(shard.seq.numpy(), shard.pos.numpy(),
                                                                  shard.token.numpy()):
                problem = f"its tokens differ from those in {rec.file}"
    if problem is not None:
        raise CacheError(
            f"{out / TOKENS_NAME} cannot be rebuilt: the dataset {manifest.dataset.get('name')!r} now gives another "
            f"token plan ({problem}). Restore {TOKENS_NAME} or the dataset, or delete {out} and re-run"
        )


def check_free_disk(cfg: HarvestConfig, out: Path, row_shape: tuple[int, int, int], row_bytes: int,
                    written: int, *, tokenizer: Any = None, say: Callable[[str], None] = print,
                    suffix: str = "") -> None:
    """Print the estimated cache size and refuse to start when it exceeds free disk.

    ``written``: bytes of shards already on disk (a resume needs only the rest); ``tokenizer``: the
    harvest's, whose ``tokenizer.json`` the cache holds too."""
    tokenizer_bytes = len(tokenizer_json_bytes(tokenizer) or b"") if tokenizer is not None else 0
    estimate = estimate_cache_bytes(cfg.tokens, *row_shape, cfg.dtype, cfg.context_size,
                                    tokenizer_bytes=tokenizer_bytes)
    probe_dir = out if out.exists() else next(q for q in out.absolute().parents if q.exists())
    free = shutil.disk_usage(probe_dir).free
    say(f"estimated cache size: {_fmt_bytes(estimate)} ({cfg.tokens:,} rows x {row_bytes} bytes); "
        f"free disk at {probe_dir}: {_fmt_bytes(free)}{suffix}")
    if estimate - written > free:
        raise HarvestInputError(
            f"not enough disk: the cache needs about {_fmt_bytes(estimate - written)} more, {probe_dir} has "
            f"{_fmt_bytes(free)} free. Free space, lower --tokens"
            + (", use --dtype bfloat16" if cfg.dtype == "float32" else "") + ", or pick another --out"
        )


# A group of forward batches (see ``HarvestConfig.capture_group_tokens``) also ends once its held
# hook outputs reach this many bytes (in the models' dtype): small beside any device's memory, and a
# big model's batch past it is taken alone.
CAPTURE_GROUP_BYTES = 256 * 2**20


@dataclass
class _Batch:
    """One forward batch's hook outputs, held until its group's rows are taken."""

    lo: int  # its first sequence
    tokens_BS: np.ndarray
    flat_N: np.ndarray  # included positions, flat over [B, S]
    first_row: int
    outs_MP: list[list[torch.Tensor]]  # [model][hook] -> [B, S, D]


class _Forward:
    """Runs every model on batches of planned sequences and yields the included rows.

    Consecutive batches are grouped until they hold ``cfg.capture_group_tokens`` tokens or
    :data:`CAPTURE_GROUP_BYTES` of hook outputs, and each yielded item holds one group's rows.
    Grouping changes when rows are taken, never which rows or their bytes."""

    def __init__(self, models: LoadedModels, plan: TokenPlan, cfg: HarvestConfig, device: torch.device) -> None:
        self.models, self.plan, self.hooks = models, plan, cfg.hooks
        self.device, self.batch_size = device, cfg.batch_size
        self.group_tokens, self.group_bytes = cfg.capture_group_tokens, CAPTURE_GROUP_BYTES
        self.row_start = plan.row_start
        self.row_end = self.row_start + plan.rows_per_seq
        # A lookup table of excluded ids: one gather per batch, ~10x cheaper than np.isin (which
        # sorts; 63 of the ~345 us of this loop's per-batch overhead). Its last entry (False) stands
        # for every id past the largest excluded one.
        self.excluded = np.zeros(max(models.excluded_ids, default=-1) + 2, dtype=bool)
        self.excluded[models.excluded_ids] = True
        # Resolved once: bridge.hook_dict rebuilds its alias table on every access (~3% of a
        # launch-bound GPU harvest's main thread when it ran per batch).
        self.hook_points = [[bridge.hook_dict[h] for h in self.hooks] for bridge in models.bridges]
        # Called with each forward batch's first sequence: a multi-process harvest's sign of life for the ranks
        # waiting at its merge (harvest.rank_progress), more often than a group's rows are sent.
        self.on_batch: Callable[[int], None] | None = None

    def batch_end(self, row: int) -> int:
        """The first row after the forward batch holding row ``row - 1``: cut a row range there and
        the batch on the cut is not forwarded twice (0 for ``row <= 0``)."""
        if row <= 0:
            return 0
        s = int(np.searchsorted(self.row_end, row - 1, side="right"))  # the sequence holding row - 1
        e = min((s // self.batch_size + 1) * self.batch_size, self.plan.n_sequences)
        return int(self.row_start[e]) if e < self.plan.n_sequences else int(self.row_end[-1])

    def calibrate(self, calib_rows: int, end: int, method: str) -> tuple[list[tuple], Normalization]:
        """Forward rows ``[0, end)`` (``end``: a :meth:`batch_end` at or past ``calib_rows``) and estimate
        the normalization on exactly the first ``calib_rows`` of them. The forwarded items are returned
        to be written afterwards, so calibration costs no extra forward."""
        held = list(self.rows(0, end))
        # Streamed over the held items: one concatenated float32 copy of the sample plus the
        # estimate's float64 one cost ~3x the held rows again at peak (6.4 GB for 3 models x 26 hooks).
        estimator = NormalizationEstimator(method)
        finite_MP: torch.Tensor | None = None
        for _, acts_NMPD, *_ in held:
            part_NMPD = acts_NMPD[:calib_rows - estimator.n_rows]
            if part_NMPD.shape[0] == 0:
                break
            part_finite_MP = torch.isfinite(part_NMPD).all(dim=3).all(dim=0).cpu()
            finite_MP = part_finite_MP if finite_MP is None else finite_MP & part_finite_MP
            estimator.add(part_NMPD)
        assert finite_MP is not None  # end >= calib_rows > 0: the held rows reach the sample's end
        if not finite_MP.all():
            # Caught here, before a shard is written: normalized by an infinite norm, the slot would be
            # stored as zeros and NaN, and only training would notice.
            slots = [f"{r.name} {h}" for (m, p) in (~finite_MP).nonzero().tolist()
                     for r, h in [(self.models.resolved[m], self.hooks[p])]]
            dtype = next(self.models.bridges[0].parameters()).dtype
            fix = ("the activations overflow float16: use --model-dtype bfloat16 or float32"
                   if dtype == torch.float16 else "check the model's weights, or try --model-dtype float32")
            raise HarvestInputError(f"activations of {', '.join(slots)} are inf or NaN on the calibration sample "
                                    f"(model dtype {str(dtype).removeprefix('torch.')}); {fix}")
        return held, estimator.result()

    def rows(self, a: int, b: int):
        """Yield ``(first_row, acts_NMPD, seq_N, pos_N, token_N)`` covering rows [a, b) in order, a
        group of batches per item."""
        group: list[_Batch] = []
        held_tokens = held_bytes = 0
        for batch in self._batches(a, b):
            group.append(batch)
            held_tokens += batch.tokens_BS.size
            # The memory held, not the tensor's own bytes: a hook output may be a view of a larger one.
            held_bytes += sum(t.untyped_storage().nbytes() for outs in batch.outs_MP for t in outs)
            if held_tokens >= self.group_tokens or held_bytes >= self.group_bytes:
                item, group, held_tokens, held_bytes = self._take(group), [], 0, 0
                yield item
        if group:
            yield self._take(group)

    def _batches(self, a: int, b: int):
        """Forward each batch holding rows of [a, b) and yield its hook outputs (batches with none
        of those rows are skipped)."""
        s0 = int(np.searchsorted(self.row_end, a, side="right"))
        s1 = int(np.searchsorted(self.row_start, b, side="left"))
        # Batches are fixed slices of the plan ([k*B, (k+1)*B)), whatever [a, b) is, so a
        # resumed harvest runs the very same batches and writes byte-identical shards.
        for lo in range((s0 // self.batch_size) * self.batch_size, s1, self.batch_size):
            hi = min(lo + self.batch_size, self.plan.n_sequences)
            # Row selection happens on the host (the tokens are there), so the device never
            # syncs for a boolean mask; the device only gathers with a precomputed index. numpy,
            # not torch: on these small arrays its per-call overhead is a fraction of torch's,
            # and with a small model on a GPU this loop's Python is what bounds the harvest.
            tokens_BS = np.stack(self.plan.input_ids[lo:hi]).astype(np.int64)
            mask_BS = ~self.excluded[np.minimum(tokens_BS, len(self.excluded) - 1)]
            rank_BS = mask_BS.cumsum(axis=1)  # 1-based rank of each included position
            row_BS = self.row_start[lo:hi, None] + rank_BS - 1
            mask_BS &= (rank_BS <= self.plan.rows_per_seq[lo:hi, None]) & (row_BS >= a) & (row_BS < b)
            flat_N = np.flatnonzero(mask_BS)
            if flat_N.size == 0:
                continue
            tokens_dev_BS = torch.from_numpy(tokens_BS).to(self.device, non_blocking=True)
            outs_MP = []
            for bridge, points in zip(self.models.bridges, self.hook_points):
                # Forward hooks on the hook points around the plain forward pass: the same path as a
                # bare forward. (run_with_cache's per-call machinery cost ~18% of the harvest.)
                captured: dict[str, torch.Tensor] = {}
                # hook_value: the output as transformer-lens's own hooks see it (OPT's MLP points fire
                # [batch*pos, d] rows).
                handles = [point.register_forward_hook(
                    lambda _mod, _inp, out, h=h, point=point: captured.__setitem__(h, hook_value(point, out)))
                    for h, point in zip(self.hooks, points)]
                try:
                    with torch.inference_mode():
                        bridge(tokens_dev_BS, stop_at_layer=self.models.stop_at_layer)
                finally:
                    for handle in handles:
                        handle.remove()
                missing = [h for h in self.hooks if h not in captured]
                if missing:
                    raise RuntimeError(f"hook(s) {missing} did not fire in the forward pass")
                outs_MP.append([captured[h] for h in self.hooks])  # only the hooked outputs stay alive
            if self.on_batch is not None:
                self.on_batch(lo)
            yield _Batch(lo, tokens_BS, flat_N, int(row_BS.flat[flat_N[0]]), outs_MP)

    def _take(self, group: list[_Batch]) -> tuple:
        """A group's included rows: ``(first_row, acts_NMPD, seq_N, pos_N, token_N)``, its hook
        outputs gathered with one index (per model and hook: a concatenation and a gather)."""
        offsets = np.cumsum([0] + [g.tokens_BS.size for g in group[:-1]])
        flat_N = np.concatenate([g.flat_N + off for g, off in zip(group, offsets)])
        flat_dev_N = torch.from_numpy(flat_N).to(self.device, non_blocking=True)
        with torch.inference_mode():
            rows = []
            for m in range(len(self.hook_points)):
                for p in range(len(self.hooks)):
                    outs = [g.outs_MP[m][p] for g in group]  # [B, S, D] each, S the same for all
                    held_BSD = torch.cat(outs) if len(outs) > 1 else outs[0]
                    rows.append(held_BSD.flatten(0, 1).index_select(0, flat_dev_N))
            acts_NMPD = torch.stack(rows, dim=1).unflatten(1, (len(self.hook_points), len(self.hooks)))
        seq_N = np.concatenate([g.flat_N // g.tokens_BS.shape[1] + g.lo for g in group])
        pos_N = np.concatenate([g.flat_N % g.tokens_BS.shape[1] for g in group])
        token_N = np.concatenate([g.tokens_BS.ravel()[g.flat_N] for g in group])
        return (group[0].first_row, acts_NMPD, *(torch.from_numpy(x) for x in (seq_N, pos_N, token_N)))


def harvest(cfg: HarvestConfig, *, dist_timeout: float | None = None) -> Manifest:
    """Run a harvest (or resume / finish an interrupted one) and return the final manifest.

    Under ``torchrun`` (``RANK``/``WORLD_SIZE`` set) this is one rank of a multi-process
    harvest (:mod:`harvest.distributed`); ``dist_timeout`` is then how many seconds a rank
    waits for the others in a collective (default ``$CROSSCACHE_DIST_TIMEOUT`` or 300).
    """
    from harvest.distributed import harvest_distributed
    from harvest.process_group import torchrun_env

    if torchrun_env() is not None:
        return harvest_distributed(cfg, dist_timeout=dist_timeout if dist_timeout is not None else cfg.dist_timeout)
    # Held from before --out is looked at to the end: a second harvest into the folder (a resume
    # started twice) is refused at once instead of interleaving its shards and manifest with ours.
    with FolderLock(cfg.out, what="cache folder"):
        return _harvest_one_process(cfg)


def _harvest_one_process(cfg: HarvestConfig) -> Manifest:
    """The one-process harvest; the caller holds the lock of ``cfg.out``."""
    from harvest.rank_manifests import RANK_MANIFEST_GLOB

    out = Path(cfg.out)
    existing = _existing_manifest(out, cfg)
    damage = find_damage(out, existing, cfg.shuffle_shards) if existing is not None else None
    if existing is not None and existing.complete and not damage:
        print(f"{out}: harvest already complete ({existing.n_rows:,} rows in {_shards(len(existing.shards))})")
        return existing
    if existing is not None and any(out.glob(RANK_MANIFEST_GLOB)):
        raise HarvestInputError(
            f"--out {out} holds an interrupted multi-process harvest (manifest.rank*.json); resume it under "
            "torchrun with the same flags (`torchrun --nproc-per-node N run_harvest.py ...`, N = 1 works too)"
        )
    device = resolve_device(cfg.device)
    models = load_models(
        cfg.models, cfg.hooks, context_size=cfg.context_size, device=device,
        model_dtype=dtype_from_name(cfg.model_dtype), exclude_special=cfg.exclude_special,
        exclude_token_ids=cfg.exclude_token_ids, allow_vocab_extension=cfg.allow_vocab_extension,
        progress=cfg.progress,
    )
    if existing is not None:
        check_same_weights(existing.models, models.manifest_models())
    for note in (models.vocab_extension_note(), models.special_tokens_note()):
        if note:
            print(note)
    m, p, d = len(cfg.models), len(cfg.hooks), models.d_model
    storage = dtype_from_name(cfg.dtype)
    row_bytes = m * p * d * storage.itemsize

    check_free_disk(cfg, out, (m, p, d), row_bytes, sum(s.bytes for s in existing.shards) if existing else 0,
                    tokenizer=models.tokenizer)
    # Before anything is written or cleaned up: a failed start removes the harvest's own files.
    if (foreign := foreign_tokenizer_file(out, models.tokenizer, existing.tokenizer if existing else {})):
        raise HarvestInputError(foreign)

    created = not out.exists()  # False: the lock made it; releasing the lock removes it if left empty
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(out)
    layout = HarvestLayout(cfg.tokens, cfg.shard_rows(row_bytes), cfg.shuffle_shards)
    forward = None
    t0 = time.perf_counter()
    try:  # until the first manifest is saved, a failure leaves nothing to resume
        # First of all, so that an interrupted cache can show its tokens as text too.
        tokenizer_file = write_tokenizer_file(out, models.tokenizer, existing.tokenizer if existing else {})
        if existing is not None:
            assert damage is not None
            plan = plan_for_resume(out, existing, cfg, models, rebuild=damage.token_table is not None, write=True)
            norm = Normalization.from_manifest(out, existing.normalization)
            # Whole chunks already listed, up to the first damaged one: the rest is (re)written.
            start_chunk = layout.n_chunks if existing.complete else len(existing.shards) // layout.shuffle_shards
            if damage.first_chunk is not None:
                start_chunk = min(start_chunk, damage.first_chunk)
            existing.shards = existing.shards[: start_chunk * layout.shuffle_shards]
            existing.n_rows, existing.complete = sum(s.n_rows for s in existing.shards), False
            if damage.shards:  # later chunks' files are rewritten (perhaps under another name): drop them
                remove_unlisted_shards(out, existing.shards)
            existing.tokenizer.update(tokenizer_file or {})  # a cache harvested before tokenizer.json gets it
            manifest, held = existing, []
            t_forward, cpu_forward = time.perf_counter(), time.thread_time()
            if damage:
                print(f"repairing {out}: {damage.describe()}; rewriting chunks {start_chunk}-{layout.n_chunks - 1}"
                      if start_chunk < layout.n_chunks else f"repairing {out}: {damage.describe()}")
            print(f"resuming {out}: {_shards(len(manifest.shards))} already written, from chunk {start_chunk} of {layout.n_chunks}")
        else:
            plan = plan_from_config(cfg, models)
            write_token_table(out, [x.tolist() for x in plan.input_ids], plan.metadata)
            # Calibration: the first rows of the (seeded, shuffled-by-document) stream. Their
            # activations are kept and written afterwards, so calibration costs no extra forward.
            forward = _Forward(models, plan, cfg, device)
            calib_rows = min(cfg.calibration_tokens, cfg.tokens)
            # Forward whole batches: the rows after calib_rows in its last batch are kept too, so that
            # batch is not forwarded again (it cost ~4% of a 100k-token harvest).
            calib_end = min(forward.batch_end(calib_rows), cfg.tokens)
            t_forward, cpu_forward = time.perf_counter(), time.thread_time()
            held, norm = forward.calibrate(calib_rows, calib_end, cfg.normalize)
            norm.write_side_file(out)
            manifest = _new_manifest(cfg, models, plan, norm, calib_rows, layout, tokenizer_file=tokenizer_file)
            start_chunk = 0
        forward = forward or _Forward(models, plan, cfg, device)
        writer = CacheWriter(out, manifest)
        writer.save_manifest()
    except BaseException:
        discard_unstarted(out, created=created)
        raise

    done_rows = start_chunk * layout.chunk_size
    bar = progress_bar(cfg.tokens, initial=done_rows, desc="harvest", disable=not cfg.progress, started=t_forward)
    shard_writer = shard_writer_for(
        device, writer, chunk_rows=layout.chunk_rows(), shard_rows=layout.shard_rows,
        shuffle_shards=layout.shuffle_shards, seed=cfg.seed, row_shape=(m, p, d), dtype=storage,
        write_threads=cfg.write_threads, model_names=[r.name for r in models.resolved], hooks=list(cfg.hooks),
        model_dtype=cfg.model_dtype,
    )
    norm_dev = norm.to(device)  # the factors move once, not per batch

    def send(first: int, acts_NMPD: torch.Tensor, seq: torch.Tensor, pos: torch.Tensor, tok: torch.Tensor) -> None:
        shard_writer.put_rows(first, norm_dev.apply(acts_NMPD).to(storage), seq, pos, tok)
        bar.update(acts_NMPD.shape[0])
        bar.set_postfix_str(f"{shard_writer.bytes_written / 1e9:.2f} GB written", refresh=False)

    resume_from = start_chunk * layout.chunk_size if existing is not None else calib_end
    try:
        shard_writer.write_all(chain(drain(held), forward.rows(resume_from, cfg.tokens)), send)
    finally:
        # Shards are counted once listed, mostly after their rows were sent: show the final figure.
        bar.set_postfix_str(f"{shard_writer.bytes_written / 1e9:.2f} GB written", refresh=False)
        bar.close()
    end, loop_cpu = time.perf_counter(), time.thread_time() - cpu_forward
    seconds, forward_seconds = end - t0, end - t_forward
    manifest.created_by["finished_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    # Timings of this run (a resumed run reports its own); kept with the timestamps.
    manifest.created_by["last_run"] = {"seconds": round(seconds, 3), "forward_and_write_seconds": round(forward_seconds, 3),
                                       "rows": final_rows_this_run(manifest, start_chunk, layout), "device": str(device),
                                       "final_flush_seconds": round(shard_writer.flush_seconds, 3),
                                       "writer_wait_seconds": round(shard_writer.total_wait_seconds, 3),
                                       "forward_loop_cpu_seconds": round(loop_cpu, 3)}
    # The token table's digest, once it is final: verify and a re-run then see damage inside it too.
    writer.manifest.extra["tokens_sha256"] = sha256_file(out / TOKENS_NAME)
    final = writer.finish()
    print(f"harvested {final.n_rows:,} rows into {_shards(len(final.shards))} at {out} "
          f"({manifest.created_by['last_run']['rows'] / max(seconds, 1e-9):,.0f} tokens/s this run)")
    if note := writer_wait_note(manifest.created_by["last_run"]["writer_wait_seconds"], forward_seconds):
        print(note)
    return final


def progress_bar(total: int, *, initial: int, desc: str, disable: bool, started: float) -> Any:
    """The harvest's tqdm bar (tokens, tokens/s, ETA), its clock started at ``started`` (a
    ``time.perf_counter`` time: the first forward). The calibration rows, forwarded before the bar
    exists, reach it all at once; with the clock started at the bar and tqdm's smoothed rate, that
    showed a burst of hundreds of thousands of tokens/s. The rate shown is the average since
    ``started``."""
    from shared.progress import tqdm

    bar = tqdm(total=total, initial=initial, unit="tok", unit_scale=True, desc=desc, disable=disable,
               dynamic_ncols=True, smoothing=0)
    if not bar.disable:  # a disabled bar has no clock
        bar.start_t -= time.perf_counter() - started  # tqdm's clock is time.time(): shift it by the interval
    return bar


def final_rows_this_run(manifest: Manifest, start_chunk: int, layout: HarvestLayout) -> int:
    """Rows this run wrote: those past the chunks it found whole (all of them when a resume only
    rebuilt the token table, and the last chunk, being short, holds fewer than ``chunk_size``)."""
    total = sum(s.n_rows for s in manifest.shards)
    return total - min(start_chunk * layout.chunk_size, total)


def _new_manifest(cfg: HarvestConfig, models: LoadedModels, plan: TokenPlan, norm: Normalization,
                  calib_rows: int, layout: HarvestLayout, *, tokenizer_file: dict[str, str] | None = None) -> Manifest:
    import transformers

    import shared

    return Manifest(
        models=models.manifest_models(),
        hooks=list(cfg.hooks),
        d_model=models.d_model,
        dtype=cfg.dtype,
        context_size=cfg.context_size,
        n_rows=0,
        shards=[],
        normalization=norm.to_manifest(calib_rows),
        excluded_tokens={"special": cfg.exclude_special, "token_ids": models.excluded_ids},
        dataset={
            "name": cfg.dataset, "split": cfg.split, "text_column": cfg.text_column,
            "meta_columns": list(plan.metadata), "seed": cfg.seed,
        },
        # tokenizer_file: the cache's own tokenizer.json (write_tokenizer_file), when there is one
        tokenizer={**models.manifest_tokenizer(), **(tokenizer_file or {})},
        created_by={
            "tool": "crosscache", "version": shared.__version__,
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "command": " ".join(Path(sys.argv[0]).name.split() + sys.argv[1:]),
        },
        complete=False,
        extra={
            "n_sequences": plan.n_sequences,
            # Rows of each buffer of `buffer_rows` consecutive stream rows were permuted before being
            # cut into shards: neighbouring rows of a shard come from different sequences.
            "write_shuffle": {"buffer_rows": layout.chunk_size, "seed": cfg.seed},
            "harvest": {
                "signature": cfg.content_signature(),
                "config": config_to_json(cfg),
                "planned_rows": cfg.tokens,
                "shard_rows": layout.shard_rows,
                "shuffle_chunk_rows": layout.chunk_size,
                "stop_at_layer": models.stop_at_layer,
            },
        },
    )
