"""``tokens.arrow``: the harvested token sequences, one row per sequence (Arrow IPC file).

Columns: ``seq`` int64 (the index shards refer to), ``input_ids`` list<int32> (the whole
sequence as fed to the models, BOS included), then any per-sequence metadata columns
(for example ``source``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pyarrow as pa

from shared.cache_format import TOKENS_NAME, CacheError
from shared.shard_io import fsync_dir

__all__ = ["write_token_table", "read_token_table"]


def write_token_table(
    cache_dir: str | Path,
    input_ids: list[list[int]],
    metadata: dict[str, list[Any]] | None = None,
    *,
    first_seq: int = 0,
) -> Path:
    """Write ``tokens.arrow`` atomically (temp file, fsync, rename). Returns its path."""
    metadata = metadata or {}
    n = len(input_ids)
    for name, values in metadata.items():
        if len(values) != n:
            raise ValueError(f"metadata column {name!r} has {len(values)} values for {n} sequences")
        if name in ("seq", "input_ids"):
            raise ValueError(f"metadata column name {name!r} is reserved")
    columns: dict[str, pa.Array] = {
        "seq": pa.array(range(first_seq, first_seq + n), type=pa.int64()),
        "input_ids": pa.array(input_ids, type=pa.list_(pa.int32())),
    }
    for name, values in metadata.items():
        columns[name] = pa.array(values)
    table = pa.table(columns)
    path = Path(cache_dir) / TOKENS_NAME
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with pa.OSFile(str(tmp), "wb") as sink:
        with pa.ipc.new_file(sink, table.schema) as writer:
            for batch in table.to_batches(max_chunksize=8192):
                writer.write_batch(batch)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


def read_token_table(cache_dir: str | Path, path: str | Path | None = None) -> pa.Table:
    """Memory-map and read ``tokens.arrow`` (or another path) as an Arrow table."""
    path = Path(path) if path is not None else Path(cache_dir) / TOKENS_NAME
    if not path.is_file():
        raise CacheError(f"token table {path} is missing; re-run the harvest to rewrite it")
    try:
        with pa.memory_map(str(path), "r") as source:
            return pa.ipc.open_file(source).read_all()
    except pa.ArrowInvalid as e:
        raise CacheError(f"token table {path} is not a readable Arrow IPC file ({e})") from None

