"""``tokens.arrow``: the harvested token sequences, one row per sequence (Arrow IPC file).

Columns: ``seq`` int64 (the index shards refer to), ``input_ids`` list<int32> (the whole
sequence as fed to the models, BOS included), then any per-sequence metadata columns
(for example ``source``).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shared.cache_format import TOKEN_TABLE_COLUMNS, TOKENS_NAME, CacheError
from shared.hub_spec import rewrite_advice
from shared.shard_io import DiskFullError, fsync_dir

__all__ = ["TokenIndex", "position_problem", "read_token_table", "sequence_lengths", "table_problem",
           "write_token_table"]


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
        if name in TOKEN_TABLE_COLUMNS:
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
    try:
        with pa.OSFile(str(tmp), "wb") as sink:
            with pa.ipc.new_file(sink, table.schema) as writer:
                for batch in table.to_batches(max_chunksize=8192):
                    writer.write_batch(batch)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(e.errno, f"disk full while writing {path}: free space on {path.parent} and re-run "
                                "the same command (nothing already written is lost)") from None
        raise
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


def read_token_table(cache_dir: str | Path, path: str | Path | None = None) -> pa.Table:
    """Memory-map and read ``tokens.arrow`` (or another path) as an Arrow table."""
    path = Path(path) if path is not None else Path(cache_dir) / TOKENS_NAME
    if not path.is_file():
        raise CacheError(f"token table {path} is missing; {rewrite_advice(path)}")
    try:
        with pa.memory_map(str(path), "r") as source:
            return pa.ipc.open_file(source).read_all()
    except (pa.ArrowException, OSError) as e:  # a damaged footer is a plain OSError in pyarrow
        raise CacheError(f"token table {path} is not a readable Arrow IPC file ({e}); "
                         f"{rewrite_advice(path)}") from None


def table_problem(table: pa.Table) -> str | None:
    """What a full validation of a token table finds (offsets out of range, text that is not UTF-8: damage
    that reads, then crashes or segfaults whoever reads the column), or None."""
    try:
        table.validate(full=True)
    except (pa.ArrowException, ValueError) as e:
        return f"damaged: {e}"
    return None


def sequence_lengths(table: pa.Table) -> np.ndarray:
    """Tokens of every sequence of ``tokens.arrow``, int64 indexed by its ``seq`` value (-1: no sequence
    has that value). Reads the list offsets only, not the tokens."""
    seq = np.asarray(table.column("seq").to_numpy(), dtype=np.int64)
    lengths = np.asarray(pc.list_value_length(table.column("input_ids")).fill_null(0).to_numpy(), dtype=np.int64)
    out = np.full(len(seq), -1, dtype=np.int64)  # seq is 0..n-1: a value past that names no sequence (-1)
    ok = (seq >= 0) & (seq < len(seq))
    out[seq[ok]] = lengths[ok]
    return out


def position_problem(seq_N: np.ndarray, pos_N: np.ndarray, lengths_S: np.ndarray) -> str | None:
    """What is wrong with rows' ``(seq, pos)`` as indices of the sequences of ``tokens.arrow`` (``lengths_S``:
    :func:`sequence_lengths`): a ``seq`` no sequence has, a negative ``pos``, or one past its sequence's
    end. None when every row names a token. Checked before indexing: numpy would wrap a negative index."""
    n = len(lengths_S)
    if seq_N.size and (seq_N.min() < 0 or seq_N.max() >= n or (lengths_S[seq_N] < 0).any()):
        return f"seq values outside the {TOKENS_NAME} sequences 0..{n - 1}"
    if pos_N.size and pos_N.min() < 0:
        return f"negative pos values (as low as {int(pos_N.min())}; a position counts from 0, the BOS)"
    if pos_N.size and (pos_N >= lengths_S[seq_N]).any():
        return f"pos values past their sequence's length in {TOKENS_NAME}"
    return None


class TokenIndex:
    """Token sequences as one flat array and offsets, to check shard rows' ``(seq, pos, token)``
    against them in a few vectorized operations."""

    def __init__(self, flat: np.ndarray, offsets: np.ndarray, problem: str | None = None) -> None:
        self.flat, self.offsets = flat, offsets
        self.lengths = np.diff(offsets)  # tokens per sequence: once, not per shard checked
        self.problem = problem  # what is wrong with the table itself (its seq column), if anything

    @staticmethod
    def from_table(table: pa.Table) -> TokenIndex:
        """From ``tokens.arrow``, whose ``seq`` column must be 0..n-1 in order."""
        ids = table.column("input_ids").combine_chunks()
        seq = table.column("seq").to_numpy()
        return TokenIndex(ids.values.to_numpy(zero_copy_only=False), ids.offsets.to_numpy(),
                          None if np.array_equal(seq, np.arange(len(seq))) else "its seq column is not 0..n-1 in order")

    @staticmethod
    def from_sequences(input_ids: list[np.ndarray]) -> TokenIndex:
        """From sequences in memory (a token plan), sequence ``i`` being ``seq`` value ``i``."""
        lengths = np.fromiter((len(x) for x in input_ids), dtype=np.int64, count=len(input_ids))
        flat = np.concatenate(input_ids) if input_ids else np.zeros(0, np.int32)
        return TokenIndex(flat, np.concatenate([[0], np.cumsum(lengths)]))

    def mismatch(self, seq: np.ndarray, pos: np.ndarray, token: np.ndarray) -> str | None:
        """What is wrong with a shard's rows against the sequences (None: every row matches)."""
        problem = position_problem(seq, pos, self.lengths)
        if problem is not None:
            return problem
        wrong = int((self.flat[self.offsets[seq] + pos] != token).sum())
        return f"{wrong} row(s) whose token differs from {TOKENS_NAME} input_ids[seq][pos]" if wrong else None
