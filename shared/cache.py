"""Open, verify and write activation caches (format v1).

- :func:`open_cache` reads and validates a manifest and gives memory-mapped shards.
- :func:`verify_cache` checks every shard against the manifest (size, checksum, header).
- :class:`CacheWriter` writes shards atomically and keeps the manifest current, so a crash
  never leaves a half shard listed; the harvester and synthetic-cache tests both use it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from shared.cache_format import (
    CARD_NAME,
    MANIFEST_NAME,
    NORMALIZATION_NAME,
    TOKENS_NAME,
    CacheError,
    Manifest,
    ShardRecord,
)
from shared.card import render_card
from shared.hub_spec import rewrite_advice
from shared.normalization import Normalization
from shared.shard_io import (ShardReader, atomic_write_bytes, discard_temporaries, nonfinite_count, sha256_file,
                             write_shard)
from shared.token_table import TokenIndex, read_token_table, table_problem
from shared.tokenizer_file import tokenizer_file_problem

__all__ = ["Cache", "open_cache", "verify_cache", "CacheWriter", "VerifyReport"]


class Cache:
    """A cache folder opened for reading. Shards open lazily and are memory-mapped."""

    def __init__(self, cache_dir: str | Path, manifest: Manifest) -> None:
        self.dir = Path(cache_dir)
        self.manifest = manifest

    @property
    def n_shards(self) -> int:
        return len(self.manifest.shards)

    def shard(self, index: int) -> ShardReader:
        """Open shard ``index`` (validated against its manifest record on open)."""
        rec = self.manifest.shards[index]
        return ShardReader(
            self.dir / rec.file,
            row_shape=self.manifest.row_shape,
            dtype=self.manifest.torch_dtype,
            n_rows=rec.n_rows,
            expected_bytes=rec.bytes,
        )

    def token_table(self) -> pa.Table:
        return read_token_table(self.dir)

    def normalization(self) -> Normalization:
        man = self.manifest
        return Normalization.from_manifest(self.dir, man.normalization, model_names=man.model_names, hooks=man.hooks)

    def model_index(self, name: str) -> int:
        names = self.manifest.model_names
        if name not in names:
            raise CacheError(f"model {name!r} is not in cache {self.dir}; it holds {names}")
        return names.index(name)

    def hook_index(self, hook: str) -> int:
        hooks = self.manifest.hooks
        if hook not in hooks:
            raise CacheError(f"hook {hook!r} is not in cache {self.dir}; it holds {hooks}")
        return hooks.index(hook)


def open_cache(cache_dir: str | Path, *, allow_incomplete: bool = False, max_shards: int | None = None) -> Cache:
    """Open a cache folder: read and validate the manifest and check every shard file exists.

    ``cache_dir`` may be ``hf://USER/NAME[@REV]``: downloaded first, only its first
    ``max_shards`` shards if given (see :func:`shared.hub.resolve_cache`).
    Raises :class:`CacheError` naming the problem. An unfinished harvest is refused unless
    ``allow_incomplete``.
    """
    if max_shards is not None or (isinstance(cache_dir, str) and cache_dir.startswith("hf://")):
        from shared.hub import resolve_cache  # lazy: huggingface_hub is needed for Hub caches only

        cache_dir = resolve_cache(cache_dir, max_shards=max_shards)
    manifest = Manifest.load(cache_dir)
    if not manifest.complete and not allow_incomplete:
        raise CacheError(
            f"cache {cache_dir} is incomplete ({sum(s.n_rows for s in manifest.shards)} rows "
            "written so far): its harvest was interrupted or is still running; re-run the same "
            "harvest command to finish it"
        )
    missing = [s.file for s in manifest.shards if not (Path(cache_dir) / s.file).is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CacheError(
            f"cache {cache_dir}: {len(missing)} shard(s) listed in the manifest are missing: "
            f"{shown}; " + rewrite_advice(cache_dir, local=f"run `python run_harvest.py verify {cache_dir}` and re-harvest")
        )
    return Cache(cache_dir, manifest)


def checked_token_table(cache_dir: Path, manifest: Manifest, *, checksum: bool = True,
                        sha256: Callable[[Path], str] = sha256_file) -> tuple[pa.Table | None, str | None]:
    """``tokens.arrow`` read, and what is wrong with it: missing, not readable, its sha256 not the manifest's
    ``tokens_sha256`` (with ``checksum``; recorded by harvests since it was added), or damaged inside (a full
    validation: offsets, UTF-8). ``(table, None)`` when it is fine, ``(None, problem)`` otherwise."""
    path = cache_dir / TOKENS_NAME
    want = manifest.extra.get("tokens_sha256")
    if checksum and isinstance(want, str) and path.is_file() and sha256(path) != want.lower():
        return None, f"{TOKENS_NAME}: sha256 mismatch (corrupted)"
    try:
        table = read_token_table(cache_dir)
    except CacheError as e:
        return None, str(e)
    problem = table_problem(table)
    return (None, f"{TOKENS_NAME}: {problem}") if problem else (table, None)


def planned_rows_unlisted(manifest: Manifest) -> int | None:
    """The rows a finished harvest wrote (``harvest.planned_rows``) when its manifest lists another count
    (shard entries removed or added by hand), else None; a partial download's view lists its first shards
    only, and is not counted."""
    harvest = manifest.extra.get("harvest")
    planned = harvest.get("planned_rows") if isinstance(harvest, dict) else None
    if manifest.complete and isinstance(planned, int) and planned != manifest.n_rows and (
            "partial_of" not in manifest.extra):
        return planned
    return None


@dataclass
class VerifyReport:
    """Outcome of :func:`verify_cache`: ``problems`` names each missing or corrupted file.
    ``nonfinite_shards`` lists the shards among them that are intact but were written holding inf
    or NaN: no re-run or re-download repairs those, only a harvest with other dtypes."""

    cache_dir: Path
    n_shards: int = 0
    n_rows: int = 0
    problems: list[str] = field(default_factory=list)
    nonfinite_shards: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_cache(cache_dir: str | Path, *, checksums: bool = True, progress: bool = False) -> VerifyReport:
    """Check every shard against the manifest: present, size, sha256, header shapes and dtypes.

    Also checks that the token table is readable and holds the manifest's ``n_sequences``, each of
    ``context_size`` tokens, that
    the cache's own ``tokenizer.json`` is there and matches its sha256 when the manifest lists one,
    that a ``mean_std`` cache's normalization side file loads, fits and matches its sha256, and that
    every row's ``(seq, pos, token)`` is a position of the token table holding that token.
    ``hf://USER/NAME[@REV]`` is downloaded first (a failed download is a problem); a file that
    download has just hashed against the manifest is not hashed a second time.
    Never raises for a bad shard: every problem is collected in the report.
    """
    fresh = None
    if isinstance(cache_dir, str) and cache_dir.startswith("hf://"):
        from shared.hub import resolve_cache_with_digests  # lazy: huggingface_hub is needed for Hub caches only

        try:
            cache_dir, fresh = resolve_cache_with_digests(cache_dir)
        except (CacheError, ValueError) as e:
            return VerifyReport(Path(cache_dir), problems=[str(e)])

    def sha256(path: Path) -> str:
        # The download check hashed this very file (same inode, size, mtime) against the same manifest
        # moments ago: its digest stands, and a first `verify hf://...` reads each file once, not twice.
        known = fresh.get(path) if fresh is not None else None
        return known if known is not None else sha256_file(path)

    cache_dir = Path(cache_dir)
    report = VerifyReport(cache_dir)
    try:
        manifest = Manifest.load(cache_dir)
    except CacheError as e:
        report.problems.append(str(e))
        return report
    report.n_shards = len(manifest.shards)
    table, tokens_problem = checked_token_table(cache_dir, manifest, checksum=checksums, sha256=sha256)
    if tokens_problem is not None:
        report.problems.append(tokens_problem)
    index = TokenIndex.from_table(table) if table is not None else None
    if not manifest.complete:
        report.problems.append(f"{MANIFEST_NAME}: harvest not complete; re-run it to finish")
    if (planned := planned_rows_unlisted(manifest)) is not None:
        report.problems.append(f"{MANIFEST_NAME}: lists {manifest.n_rows:,} rows, but its harvest wrote {planned:,} "
                               "(harvest.planned_rows): shard entries were removed or added by hand")
    shards = manifest.shards
    if progress:
        from shared.progress import tqdm

        shards = tqdm(shards, desc="verify", unit="shard")
    for rec in shards:
        path = cache_dir / rec.file
        if not path.is_file():
            report.problems.append(f"{rec.file}: missing")
            continue
        size = path.stat().st_size
        if size != rec.bytes:
            report.problems.append(f"{rec.file}: {size} bytes, manifest says {rec.bytes} (truncated or replaced)")
            continue
        if checksums and sha256(path) != rec.sha256:
            report.problems.append(f"{rec.file}: sha256 mismatch (corrupted)")
            continue
        try:
            with ShardReader(path, row_shape=manifest.row_shape, dtype=manifest.torch_dtype, n_rows=rec.n_rows) as shard:
                mismatch = index.mismatch(shard.seq.numpy(), shard.pos.numpy(), shard.token.numpy()) if index else None
                # Reading every value, as hashing does: a shard written with inf/NaN (a float16 overflow, by
                # an older harvest or another tool) has the right sha256, and training stops on it.
                nonfinite = _nonfinite_problem(shard.acts, manifest) if checksums and not mismatch else None
        except CacheError as e:
            report.problems.append(f"{rec.file}: {e}")
            continue
        if mismatch or nonfinite:
            report.problems.append(f"{rec.file}: {mismatch or nonfinite}")
            if nonfinite and not mismatch:
                report.nonfinite_shards.append(rec.file)
            continue
        report.n_rows += rec.n_rows
    tokenizer_problem = tokenizer_file_problem(cache_dir, manifest.tokenizer, checksum=checksums, sha256=sha256)
    if tokenizer_problem is not None:
        report.problems.append(tokenizer_problem)
    if manifest.normalization.get("method") == "mean_std":
        try:
            norm = Normalization.from_manifest(cache_dir, manifest.normalization, model_names=manifest.model_names,
                                               hooks=manifest.hooks)
            assert norm.mean_MPD is not None
            if norm.mean_MPD.shape[-1] != manifest.d_model:
                report.problems.append(f"{NORMALIZATION_NAME}: width {norm.mean_MPD.shape[-1]}, manifest says "
                                       f"d_model {manifest.d_model}")
        except CacheError as e:
            report.problems.append(str(e))
    n_seq = manifest.extra.get("n_sequences")
    if table is not None and n_seq is not None and table.num_rows != n_seq:
        report.problems.append(f"{TOKENS_NAME}: {table.num_rows} sequences, manifest says {n_seq}")
    if index is not None and index.problem:
        report.problems.append(f"{TOKENS_NAME}: {index.problem}")
    if index is not None:
        lengths_S = index.lengths
        other_S = np.nonzero(lengths_S != manifest.context_size)[0]
        if other_S.size:  # rows would index tokens of sequences cut otherwise than the manifest says
            first = int(other_S[0])
            report.problems.append(
                f"{TOKENS_NAME}: {other_S.size} sequence(s) do not hold the manifest's context_size "
                f"{manifest.context_size} tokens (seq {first} holds {int(lengths_S[first])}); every input_ids row is "
                "one whole sequence, BOS included: set context_size to that length, or rewrite the table")
    return report


def nonfinite_rows(acts_NMPD: torch.Tensor, model_names: list[str] | None,
                   hooks: list[str] | None) -> tuple[torch.Tensor, list[str]]:
    """Which rows of activations hold inf or NaN (``bad_N``, bool) and in which slots, as ``model/hook``
    (``models[m]/hooks[p]`` without names), in slot order. For messages: every value is converted to
    float32; :func:`shared.shard_io.nonfinite_count` is the fast test."""
    bad_NMP = ~torch.isfinite(acts_NMPD.float()).all(dim=-1)
    slots = [f"{model_names[m]}/{hooks[p]}" if model_names and hooks else f"models[{m}]/hooks[{p}]"
             for m, p in bad_NMP.any(dim=0).nonzero().tolist()]
    return bad_NMP.flatten(1).any(dim=1), slots


def _nonfinite_problem(acts_NMPD: torch.Tensor, manifest: Manifest) -> str | None:
    """What :func:`verify_cache` says of a shard whose activations hold inf or NaN (None if none do)."""
    n = nonfinite_count(acts_NMPD)
    if not n:
        return None
    bad_N, slots = nonfinite_rows(acts_NMPD, manifest.model_names, manifest.hooks)
    storage = ("--dtype bfloat16 (float16 stores values past 65,504 as inf), or "
               if manifest.dtype == "float16" else "")
    return (f"{n} activation value(s) in {int(bad_N.sum())} row(s) are inf or NaN (in "
            f"{', '.join(slots)}; storage {manifest.dtype}): written so when the cache was made, not damaged since, and "
            f"training stops on them. Harvest again into a new folder with {storage}--model-dtype bfloat16 or float32 "
            "if the models overflowed")


class CacheWriter:
    """Writes shards atomically and records each in the manifest right after its rename.

    Start from a manifest with ``complete=False`` (and, when resuming, the shards already
    listed); call :meth:`add_shard` per shard and :meth:`finish` at the end.
    """

    def __init__(self, cache_dir: str | Path, manifest: Manifest) -> None:
        self.dir = Path(cache_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.manifest = manifest

    def save_manifest(self) -> None:
        data = json.dumps(self.manifest.to_json(), indent=1).encode() + b"\n"
        atomic_write_bytes(self.dir / MANIFEST_NAME, data)

    def add_shard(
        self,
        rel_file: str,
        acts_NMPD: torch.Tensor,
        seq_N: torch.Tensor,
        pos_N: torch.Tensor,
        token_N: torch.Tensor,
        *,
        save: bool = True,
    ) -> ShardRecord:
        """Write one shard (storage dtype must already be applied) and list it in the manifest.

        ``save=False`` leaves the manifest on disk as it is until a later ``save_manifest`` (the
        harvest saves once per shuffle chunk: it resumes from whole chunks anyway)."""
        return self.add_record(self.write_shard_file(rel_file, acts_NMPD, seq_N, pos_N, token_N), save=save)

    def write_shard_file(
        self, rel_file: str, acts_NMPD: torch.Tensor, seq_N: torch.Tensor, pos_N: torch.Tensor, token_N: torch.Tensor
    ) -> ShardRecord:
        """Write one shard atomically without listing it (safe to call from several threads)."""
        if acts_NMPD.dtype != self.manifest.torch_dtype:
            raise ValueError(f"acts dtype {acts_NMPD.dtype} != cache dtype {self.manifest.dtype}")
        if tuple(acts_NMPD.shape[1:]) != self.manifest.row_shape:
            raise ValueError(
                f"acts rows have shape {tuple(acts_NMPD.shape[1:])}, cache rows are {self.manifest.row_shape}"
            )
        return write_shard(self.dir, rel_file, acts_NMPD, seq_N, pos_N, token_N)

    def add_record(self, record: ShardRecord, *, save: bool = True) -> ShardRecord:
        """List a shard :meth:`write_shard_file` wrote (``save``: rewrite the manifest now)."""
        self.manifest.shards.append(record)
        self.manifest.n_rows = sum(s.n_rows for s in self.manifest.shards)
        if save:
            self.save_manifest()
        return record

    def finish(self) -> Manifest:
        """Mark the cache complete, write the final manifest and the dataset card."""
        self.manifest.n_rows = sum(s.n_rows for s in self.manifest.shards)
        self.manifest.complete = True
        atomic_write_bytes(self.dir / CARD_NAME, render_card(self.manifest).encode())
        self.save_manifest()
        return self.manifest


def remove_stale_temp_files(cache_dir: str | Path) -> int:
    """Delete temp files a killed writer left behind anywhere in a cache (they are never listed).
    Returns the count. The caller holds the cache folder's lock (see :func:`discard_temporaries`)."""
    return sum(len(discard_temporaries(root)) for root, _, _ in os.walk(cache_dir))
