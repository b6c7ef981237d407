"""Per-rank manifests and resume bookkeeping of the multi-process harvest (:mod:`harvest.distributed`).

While a multi-process harvest runs, each rank lists the shards it has written in its own
``manifest.rank{r}.json`` (:class:`RankShardLog`), so a crash of one rank loses nothing written.
On resume, rank 0 reads ``manifest.json`` and every per-rank manifest back, keeps the chunks whose
shards are all there and deletes the rest (:func:`collect_written`). The file names and the
shard-name pattern (``acts[-rankR]-NNNNN.safetensors``) live here too.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from shared.cache import CacheWriter
from shared.cache_format import SHARD_DIR, CacheError, Manifest, ShardRecord
from shared.shard_io import atomic_write_bytes, write_shard

__all__ = [
    "RANK_MANIFEST_GLOB",
    "RankShardLog",
    "collect_written",
    "damaged_shards",
    "rank_manifest_name",
    "remove_unlisted_shards",
    "shard_index",
]

RANK_MANIFEST_GLOB = "manifest.rank*.json"
_RANK_MANIFEST_RE = re.compile(r"^manifest\.rank(\d+)\.json$")
_SHARD_RE = re.compile(r"^acts(?:-rank(\d+))?-(\d+)\.safetensors$")


def rank_manifest_name(rank: int) -> str:
    return f"manifest.rank{rank}.json"


def shard_index(rel_file: str) -> int:
    m = _SHARD_RE.match(Path(rel_file).name)
    if m is None:
        raise CacheError(f"shard file name {rel_file!r} is not acts[-rankR]-NNNNN.safetensors")
    return int(m.group(2))


def damaged_shards(out: Path, shards: list[ShardRecord]) -> list[tuple[ShardRecord, str]]:
    """The listed shards that are missing or whose size differs from the manifest's, each with
    what is wrong. A size check only (a stat per shard): a shard with a flipped byte is found by
    ``verify`` (sha256); deleting it makes the next re-run of the harvest rewrite it."""
    bad = []
    for rec in shards:
        path = out / rec.file
        if not path.is_file():
            bad.append((rec, "missing"))
        elif (size := path.stat().st_size) != rec.bytes:
            bad.append((rec, f"{size:,} bytes, the manifest lists {rec.bytes:,}"))
    return bad


def remove_unlisted_shards(out: Path, listed: list[ShardRecord]) -> int:
    """Delete the shard files in ``out/shards`` that ``listed`` does not name (left by a chunk
    that is rewritten, possibly under another file name); returns how many."""
    keep = {Path(r.file).name for r in listed}
    removed = 0
    shard_dir = out / SHARD_DIR
    if shard_dir.is_dir():
        for p in shard_dir.iterdir():
            if _SHARD_RE.match(p.name) and p.name not in keep:
                p.unlink(missing_ok=True)
                removed += 1
    return removed


class RankShardLog:
    """One rank's shard writer: writes shards atomically and lists each, right after its
    rename, in ``manifest.rank{r}.json`` (itself written atomically). Used by
    :class:`~harvest.writer.ShardWriter` in place of a :class:`CacheWriter`."""

    def __init__(self, out: Path, rank: int, world: int, *, signature: dict, dtype: torch.dtype,
                 row_shape: tuple[int, int, int], records: list[ShardRecord]) -> None:
        self.out, self.rank, self.world = out, rank, world
        self.dir = out  # the cache folder, by the name CacheWriter gives it (the shard writer uses it)
        self.signature, self.dtype, self.row_shape = signature, dtype, row_shape
        self.records = list(records)

    def save(self) -> None:
        obj = {"rank": self.rank, "world_size": self.world, "signature": self.signature,
               "shards": [r.to_json() for r in self.records]}
        atomic_write_bytes(self.out / rank_manifest_name(self.rank), json.dumps(obj, indent=1).encode() + b"\n")

    def add_shard(self, rel_file: str, acts_NMPD: torch.Tensor, seq_N: torch.Tensor, pos_N: torch.Tensor,
                  token_N: torch.Tensor, *, save: bool = True) -> ShardRecord:
        """Write one shard and record it (``save``: rewrite the rank manifest now; see CacheWriter.add_shard)."""
        return self.add_record(self.write_shard_file(rel_file, acts_NMPD, seq_N, pos_N, token_N), save=save)

    def write_shard_file(self, rel_file: str, acts_NMPD: torch.Tensor, seq_N: torch.Tensor, pos_N: torch.Tensor,
                         token_N: torch.Tensor) -> ShardRecord:
        """Write one shard atomically without recording it (safe to call from several threads)."""
        if acts_NMPD.dtype != self.dtype or tuple(acts_NMPD.shape[1:]) != self.row_shape:
            raise ValueError(f"acts {acts_NMPD.dtype} {tuple(acts_NMPD.shape)} do not match the cache's rows")
        return write_shard(self.out, rel_file, acts_NMPD, seq_N, pos_N, token_N)

    def add_record(self, record: ShardRecord, *, save: bool = True) -> ShardRecord:
        """Record a shard :meth:`write_shard_file` wrote (``save``: rewrite the rank manifest now)."""
        self.records.append(record)
        if save:
            self.save()
        return record


def _read_rank_manifest(path: Path, signature: dict) -> list[ShardRecord]:
    try:
        obj = json.loads(path.read_text())
        shards = obj["shards"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CacheError(f"{path}: unreadable per-rank manifest ({e}); delete the cache folder and re-run") from None
    if obj.get("signature") != signature:
        raise CacheError(
            f"{path} belongs to a different harvest than manifest.json; delete the cache folder and re-run"
        )
    return [ShardRecord.from_json(s, str(path)) for s in shards]


def collect_written(
    out: Path, manifest: Manifest, layout: Any, world: int
) -> tuple[list[int], dict[int, list[ShardRecord]], list[ShardRecord], int]:
    """Rank 0, resuming: keep every whole chunk already written; delete the rest.

    Returns (complete chunks, records by active rank, records to carry over as they are
    (``manifest.json``'s own and those of ranks >= world), bytes kept)."""
    signature = manifest.extra["harvest"]["signature"]
    sources: dict[Path, list[ShardRecord]] = {out / "manifest.json": list(manifest.shards)}
    for path in sorted(out.glob(RANK_MANIFEST_GLOB)):
        if _RANK_MANIFEST_RE.match(path.name):
            sources[path] = _read_rank_manifest(path, signature)
    chunk_rows = layout.chunk_rows()
    found: dict[int, dict[int, ShardRecord]] = {}
    bad: set[int] = set()  # chunks with a missing, duplicated or damaged shard
    for recs in sources.values():
        for rec in recs:
            idx = shard_index(rec.file)
            c, j = divmod(idx, layout.shuffle_shards)
            recs_c = found.setdefault(c, {})
            path = out / rec.file
            ok = (c < layout.n_chunks and rec.n_rows == min(layout.shard_rows, chunk_rows[c] - j * layout.shard_rows)
                  and idx not in recs_c and path.is_file() and path.stat().st_size == rec.bytes)
            recs_c.setdefault(idx, rec)
            if not ok:
                bad.add(c)
    complete = sorted(c for c, recs_c in found.items() if c not in bad
                      and len(recs_c) == math.ceil(chunk_rows[c] / layout.shard_rows))
    keep = {id(r) for c in complete for r in found[c].values()}
    by_rank: dict[int, list[ShardRecord]] = {}
    carried: list[ShardRecord] = []
    for path, recs in sources.items():
        kept = [r for r in recs if id(r) in keep]
        m = _RANK_MANIFEST_RE.match(path.name)
        if m is not None and int(m.group(1)) < world:
            by_rank[int(m.group(1))] = kept
        else:
            carried.extend(kept)
        if m is not None and kept != recs:
            obj = json.loads(path.read_text())
            obj["shards"] = [r.to_json() for r in kept]
            atomic_write_bytes(path, json.dumps(obj, indent=1).encode() + b"\n")
    # Shard files no whole chunk lists (partly written chunks, or renamed but never listed)
    # would be rewritten under another rank's name: delete them.
    remove_unlisted_shards(out, [r for c in complete for r in found[c].values()])
    if len(manifest.shards) != len(kept_main := [r for r in manifest.shards if id(r) in keep]):
        manifest.shards = kept_main
        manifest.n_rows = sum(r.n_rows for r in manifest.shards)
        CacheWriter(out, manifest).save_manifest()
    kept_bytes = sum(r.bytes for recs in sources.values() for r in recs if id(r) in keep)
    return complete, by_rank, carried, kept_bytes
