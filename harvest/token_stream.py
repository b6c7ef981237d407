"""The token stream: documents from a dataset, packed into fixed-length sequences with BOS.

Sources (``--dataset``):
- ``builtin:docs`` / ``builtin:code`` / ``builtin:mixed``: corpora every CPython carries
  (see :mod:`harvest.corpora`), with a ``source`` column;
- a local ``.txt`` (documents separated by blank lines), ``.jsonl``/``.json`` or ``.parquet``
  file, or a folder of them;
- a Hugging Face dataset id, streamed (``--split``, ``--text-column``).
A row with an ``input_ids`` column is taken as pre-tokenized (ids of the models' tokenizer).

Packing: each document's tokens are followed by EOS and appended to a buffer; every
``context_size - 1`` tokens become one sequence ``[BOS] + tokens``. Documents with different
metadata (e.g. ``source``) go to separate buffers, so a sequence's metadata is exact.
Pre-tokenized rows that already are ``[BOS] + context_size - 1`` tokens are kept as they are.
"""

from __future__ import annotations

import os
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from harvest.models import HarvestInputError

__all__ = ["TokenPlan", "iter_documents", "build_token_plan"]

LOCAL_SUFFIXES = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
SHUFFLE_BUFFER = 10_000
"""Documents held by the seeded streaming shuffle of file and Hub datasets."""
TOKENIZE_BATCH = 256
MAX_OPEN_META_VALUES = 1024
"""Metadata values that may hold a partly filled sequence at once. Documents are packed per value of the
meta columns, so a column with a value per document (an id, a URL) would keep every document's tail
(and every short document) in memory, never packed: refused past this many."""


@dataclass
class TokenPlan:
    """The sequences a harvest runs, and how many rows each contributes."""

    input_ids: list[np.ndarray]  # each int32 [context_size]
    metadata: dict[str, list[Any]] = field(default_factory=dict)
    rows_per_seq: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # rows each seq contributes
    empty_docs: int = 0  # documents read with no tokens (no text in the text column): skipped

    @property
    def n_sequences(self) -> int:
        return len(self.input_ids)

    @property
    def n_rows(self) -> int:
        return int(self.rows_per_seq.sum())

    @property
    def row_start(self) -> np.ndarray:
        """Index of each sequence's first row in the unshuffled row stream."""
        return np.concatenate([[0], np.cumsum(self.rows_per_seq)[:-1]]).astype(np.int64)


def _local_files(path: Path) -> tuple[str, list[str]]:
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in LOCAL_SUFFIXES)
    if not files:
        raise HarvestInputError(f"dataset folder {path} holds no {'/'.join(LOCAL_SUFFIXES)} files")
    kinds = {LOCAL_SUFFIXES.get(p.suffix) for p in files}
    if None in kinds or len(kinds) > 1:
        raise HarvestInputError(
            f"dataset {path}: expected files of one kind among {', '.join(LOCAL_SUFFIXES)}, got "
            + ", ".join(sorted({p.suffix or '(no suffix)' for p in files}))
        )
    return kinds.pop(), [str(p) for p in files]  # type: ignore[return-value]


def iter_documents(dataset: str, split: str = "train", seed: int = 0) -> Iterator[dict[str, Any]]:
    """Documents (dicts) in a seeded order, from a built-in, local file(s), or the Hub."""
    if dataset.startswith("builtin:"):
        from harvest.corpora import builtin_documents

        try:
            yield from builtin_documents(dataset, split=split, seed=seed)  # type: ignore[arg-type]
        except ValueError as e:
            raise HarvestInputError(str(e)) from None
        return
    import datasets

    path = Path(dataset).expanduser()
    if path.exists():
        builder, files = _local_files(path)
        files = [f for f in files if not _holds_no_rows(f, builder)]  # datasets fails on them, unclearly
        if not files:
            return  # no documents: the caller says so
        if split != "train":
            raise HarvestInputError(
                f"--split {split!r}: local dataset files have one split, 'train'; drop --split, or split the files"
            )
        kwargs: dict[str, Any] = {"sample_by": "paragraph"} if builder == "text" else {}
        ds = datasets.load_dataset(builder, data_files=files, split="train", streaming=True, **kwargs)
    elif path.suffix in LOCAL_SUFFIXES or dataset.startswith((".", "/", "~")):
        raise HarvestInputError(f"dataset file {dataset} does not exist")
    else:
        try:
            ds = datasets.load_dataset(dataset, split=split, streaming=True)
        except Exception as e:  # noqa: BLE001 - datasets raises many types; all mean "cannot open"
            raise HarvestInputError(
                f"cannot open Hugging Face dataset {dataset!r} (split {split!r}): {e}. Check the id "
                "and split, or pass a local .txt/.jsonl/.parquet file or builtin:mixed"
            ) from e
    try:
        yield from ds.shuffle(seed=seed, buffer_size=SHUFFLE_BUFFER)
    except Exception as e:  # noqa: BLE001 - datasets raises many types while reading; all mean bad data
        raise HarvestInputError(f"reading dataset {dataset!r} failed: {type(e).__name__}: {e}") from e


def _holds_no_rows(file: str, builder: str) -> bool:
    """Whether a local dataset file is empty: no bytes but whitespace, or a parquet file of 0 rows."""
    if os.path.getsize(file) == 0:
        return True
    if builder == "parquet":
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(file).metadata.num_rows == 0
        except Exception as e:  # noqa: BLE001 - pyarrow's errors for a file that is not parquet
            raise HarvestInputError(f"dataset file {file} is not a readable parquet file ({e})") from None
    with open(file, "rb") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return False
    return True


def _doc_tokens(batch: list[dict[str, Any]], tokenizer: Any, text_column: str, n_vocab: int) -> list[list[int]]:
    if "input_ids" in batch[0]:
        docs = [list(map(int, d["input_ids"])) for d in batch]
        for ids in docs:
            if ids and (min(ids) < 0 or max(ids) >= n_vocab):  # else a bare IndexError in the forward, later
                bad = [i for i in ids if not 0 <= i < n_vocab]
                raise HarvestInputError(
                    f"pre-tokenized input_ids hold id {bad[0]} ({len(bad)} such id(s) in one document), outside the "
                    f"models' vocabulary [0, {n_vocab}); the ids must come from the models' own tokenizer"
                )
        return docs
    if text_column not in batch[0]:
        raise HarvestInputError(
            f"dataset rows have no text column {text_column!r} (columns: {sorted(batch[0])}); "
            "pass --text-column NAME, or provide an input_ids column"
        )
    odd = [d[text_column] for d in batch if not isinstance(d[text_column], (str, type(None)))]
    if odd:
        bad = odd[0]
        raise HarvestInputError(
            f"text column {text_column!r} holds {type(bad).__name__} values (e.g. {bad!r}), not text; pass "
            f"--text-column NAME of a column of strings (columns: {sorted(batch[0])}), or give pre-tokenized "
            "data as an input_ids column"
        )
    texts = [d[text_column] or "" for d in batch]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def build_token_plan(
    *,
    dataset: str,
    split: str,
    text_column: str,
    meta_columns: list[str] | None,
    seed: int,
    tokenizer: Any,
    context_size: int,
    bos_id: int | None,
    eos_id: int | None,
    excluded_ids: list[int],
    n_rows: int,
    n_vocab: int | None = None,
) -> TokenPlan:
    """Pack documents into sequences until they hold ``n_rows`` non-excluded tokens.

    ``n_vocab``: ids the models can embed (default ``len(tokenizer)``); pre-tokenized ids outside
    ``[0, n_vocab)`` are refused.

    The last sequence may contribute only part of its rows, so the plan holds exactly
    ``n_rows`` rows. Raises :class:`HarvestInputError` for an empty or too small dataset.
    """
    excluded = np.array(sorted(excluded_ids), dtype=np.int64)
    n_vocab = len(tokenizer) if n_vocab is None else n_vocab
    body = context_size - (1 if bos_id is not None else 0)
    plan = TokenPlan([])
    counts: list[int] = []
    buffers: dict[tuple, list[int]] = {}
    total, n_docs = 0, 0
    docs = iter_documents(dataset, split, seed)

    def emit(ids: list[int], key: tuple, meta_names: list[str]) -> bool:
        nonlocal total
        arr = np.asarray(ids, dtype=np.int32)
        included = int((~np.isin(arr, excluded)).sum())
        if included == 0:
            return False
        take = min(included, n_rows - total)
        plan.input_ids.append(arr)
        for name, value in zip(meta_names, key):
            plan.metadata[name].append(value)
        counts.append(take)
        total += take
        return total >= n_rows

    meta_names: list[str] | None = None
    done = False
    while not done:
        batch = [d for _, d in zip(range(TOKENIZE_BATCH), docs)]
        if not batch:
            break
        if meta_names is None:
            meta_names = meta_columns if meta_columns is not None else (["source"] if "source" in batch[0] else [])
            for name in meta_names:
                if name not in batch[0]:
                    raise HarvestInputError(f"meta column {name!r} not in dataset columns {sorted(batch[0])}")
            plan.metadata = {n: [] for n in meta_names}
        for doc, ids in zip(batch, _doc_tokens(batch, tokenizer, text_column, n_vocab)):
            n_docs += 1
            if not ids:  # null, missing or empty text: packing it would add a lone EOS
                plan.empty_docs += 1
                continue
            key = tuple(doc[n] for n in meta_names)
            try:
                hash(key)  # documents are packed per metadata value
            except TypeError:
                odd = next(n for n, v in zip(meta_names, key) if not isinstance(v, Hashable))
                raise HarvestInputError(
                    f"meta column {odd!r} holds {type(doc[odd]).__name__} values; a meta column must hold one "
                    "string or number per document. Leave it out with --meta-columns NAME ..."
                ) from None
            if bos_id is not None and len(ids) == context_size and ids[0] == bos_id:
                done = emit(ids, key, meta_names)  # already a packed sequence
            else:
                if bos_id is not None and ids and ids[0] == bos_id:
                    ids = ids[1:]
                buf = buffers.setdefault(key, [])
                buf.extend(ids)
                if eos_id is not None:
                    buf.append(eos_id)
                while len(buf) >= body and not done:
                    seq = ([bos_id] if bos_id is not None else []) + buf[:body]
                    del buf[:body]
                    done = emit(seq, key, meta_names)
                if not buf:
                    del buffers[key]
                elif len(buffers) > MAX_OPEN_META_VALUES:
                    raise HarvestInputError(_too_many_values_message(meta_names, buffers, n_docs, body))
            if done:
                break
    if n_docs == 0:
        raise HarvestInputError(f"dataset {dataset!r} (split {split!r}) yielded no documents")
    held = sum(len(b) for b in buffers.values())

    def waiting(also: str) -> str:  # what the meta columns' partly filled sequences hold, if any
        return (f"; {also}{held:,} tokens sit in partly filled sequences of {len(buffers):,} values of --meta-columns "
                f"{' '.join(meta_names or [])} (documents are packed per value)" if held and meta_names else "")

    if total == 0:
        raise HarvestInputError(
            f"dataset {dataset!r} yielded {n_docs} documents but not one full sequence of "
            f"{context_size} tokens{waiting('')}; lower --context-size or use a bigger dataset"
        )
    if total < n_rows:
        raise HarvestInputError(
            f"dataset {dataset!r} (split {split!r}) holds only {total:,} usable tokens in "
            f"{len(counts):,} sequences of {context_size}{waiting('another ')}; --tokens asks for {n_rows:,}. "
            f"Lower --tokens to at most {total:,} or use a bigger dataset"
        )
    _check_metadata_types(plan.metadata)
    plan.rows_per_seq = np.asarray(counts, dtype=np.int64)
    return plan


def _too_many_values_message(meta_names: list[str], buffers: dict[tuple, list[int]], n_docs: int,
                             body: int) -> str:
    example = ", ".join(repr(k if len(k) > 1 else k[0]) for k in list(buffers)[:3])
    return (f"--meta-columns {' '.join(meta_names)}: {len(buffers):,} distinct values among the first {n_docs:,} "
            f"documents (e.g. {example}) each hold a partly filled sequence, past the limit of "
            f"{MAX_OPEN_META_VALUES:,}. A sequence never mixes documents with different metadata, so a column "
            f"with a value per document (an id, a URL) would keep only documents' whole {body}-token pieces and "
            "drop every tail and every shorter document. Name columns with few values (source, language), or "
            "pass --meta-columns alone for none")


def _check_metadata_types(metadata: dict[str, list[Any]]) -> None:
    """Each metadata column becomes one typed Arrow column of ``tokens.arrow``: refuse, before any
    forward pass, a column whose documents disagree on the type (``"s0"`` in one, ``1`` in another)."""
    import pyarrow as pa

    for name, values in metadata.items():
        try:
            pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as e:
            kinds: dict[str, Any] = {}
            for v in values:
                if v is not None:
                    kinds.setdefault(type(v).__name__, v)
            shown = ", ".join(f"{k} (e.g. {v!r})" for k, v in kinds.items())
            raise HarvestInputError(
                f"meta column {name!r} mixes value types across documents: {shown} ({e}). A meta column must hold "
                "one type (missing values may be null): convert it in the dataset, or leave it out with "
                "--meta-columns NAME ..."
            ) from None

