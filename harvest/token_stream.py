"""The token stream: documents from a dataset, packed into fixed-length sequences with BOS.

Sources (``--dataset``):
- ``builtin:docs`` / ``builtin:code`` / ``builtin:mixed``: corpora every CPython carries
  (see :mod:`harvest.corpora`), with a ``source`` column;
- a local ``.txt`` (documents separated by blank lines), ``.jsonl``/``.json``, ``.csv``/``.tsv`` or
  ``.parquet`` file, the text ones also compressed (``.gz``, ``.bz2``, ``.xz``, ``.zst``); a folder of them,
  split by file names as ``datasets.load_dataset(folder)`` splits it; a folder written by ``save_to_disk``;
- a Hugging Face dataset id, streamed (``--split``, ``--text-column``).
A row with an ``input_ids`` column is taken as pre-tokenized (ids of the models' tokenizer).

Packing: each document's tokens are followed by EOS (unless they end with it) and appended to a buffer; every
``context_size - 1`` tokens become one sequence ``[BOS] + tokens``. Documents with different
metadata (e.g. ``source``) go to separate buffers, so a sequence's metadata is exact.
Pre-tokenized rows that already are ``[BOS] + context_size - 1`` tokens are kept as they are
when nothing of their metadata value waits in a buffer (else they are packed like any document,
so the stream keeps its order).
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from harvest.models import HarvestInputError

__all__ = ["TokenPlan", "iter_documents", "build_token_plan", "empty_documents_note", "local_file_format"]

LOCAL_SUFFIXES = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv",
                  ".tsv": "tsv"}
"""Local dataset files by name: suffix -> format (a ``datasets`` builder, but ``tsv``: csv with tabs)."""
COMPRESSED_SUFFIXES = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd"}
"""Compression a local text file (not parquet) may carry, as corpora ship (the Pile: ``.jsonl.zst``); datasets
decompresses it as it streams."""
_BUILDER_ARGS: dict[str, tuple[str, dict[str, Any]]] = {
    # utf-8-sig: a byte-order mark at a file's start (Excel writes one in CSV) is not text; plain utf-8 kept it
    # as U+FEFF, and in CSV it would rename the first column.
    "text": ("text", {"sample_by": "paragraph", "encoding": "utf-8-sig"}),
    "json": ("json", {}),
    "parquet": ("parquet", {}),
    "csv": ("csv", {"encoding": "utf-8-sig"}),
    "tsv": ("csv", {"encoding": "utf-8-sig", "sep": "\t"}),
}
LOCAL_FILE_KINDS = "/".join(LOCAL_SUFFIXES) + " (the text ones also compressed: " + "/".join(COMPRESSED_SUFFIXES) + ")"
SHUFFLE_BUFFER = 10_000
"""Documents held by the seeded streaming shuffle of file and Hub datasets."""
TOKENIZE_BATCH = 256
MAX_OPEN_META_VALUES = 1024
"""Metadata values that may hold a partly filled sequence at once. Documents are packed per value of the
meta columns, so a column with a value per document (an id, a URL) would keep every document's tail
(and every short document) in memory, never packed: refused past this many."""
_NAN = float("nan")
"""The one NaN that stands for every NaN metadata value (a missing float): documents with it pack together."""
PADDED_SHARE = 20
"""Mask-less pre-tokenized rows are refused as padded when at least one in this many ends or starts with a
run of one special token (``PADDING_RUN``; a tokenizer's ``padding="max_length"`` output): a few such rows
(empty documents joined by another packer) are text, but a padded dataset pads most of its rows."""


@dataclass
class TokenPlan:
    """The sequences a harvest runs, and how many rows each contributes."""

    input_ids: list[np.ndarray]  # each int32 [context_size]
    metadata: dict[str, list[Any]] = field(default_factory=dict)
    rows_per_seq: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # rows each seq contributes
    empty_docs: int = 0  # documents read with no tokens (no text in the text column): skipped
    pretokenized: bool = False  # the rows held input_ids (empty_docs are then rows of no ids)

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


SAVED_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
"""Files ``datasets.Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` leave in their folder."""


def local_file_format(path: str | Path) -> str | None:
    """The format of a local dataset file by its name (``a.jsonl``, ``a.jsonl.zst``, ``a.csv.gz``): a value of
    :data:`LOCAL_SUFFIXES`, or None for a name of no such file (a compressed parquet file among them)."""
    name = _uncompressed_name(path)
    kind = LOCAL_SUFFIXES.get(Path(name).suffix)
    return None if kind == "parquet" and name != Path(path).name else kind


def _uncompressed_name(path: str | Path) -> str:
    """A file's name without a compression suffix (``a.jsonl.gz`` -> ``a.jsonl``)."""
    name = Path(path).name
    return name.removesuffix(Path(name).suffix) if Path(name).suffix in COMPRESSED_SUFFIXES else name


def _open_bytes(file: str) -> Any:
    """A local dataset file opened for reading its bytes, decompressed as its name says."""
    compression = COMPRESSED_SUFFIXES.get(Path(file).suffix)
    if compression == "zstd":
        try:
            import zstandard
        except ImportError:
            raise HarvestInputError(f"dataset file {file} is zstd-compressed, which needs the zstandard package "
                                    "(pip install zstandard; it is in requirements.txt)") from None
        return io.BufferedReader(zstandard.open(file, "rb"))  # its reader alone cannot be read by lines
    opener = {"gzip": gzip.open, "bz2": bz2.open, "xz": lzma.open}.get(compression or "", open)
    return opener(file, "rb")


def _csv_string_features(file: str, sep: str) -> Any:
    """Every column of a CSV file's header as a string column. CSV cells are untyped, and pandas guesses a type per
    block of rows: a column of numbers was no text, and a column read as int in one block and str in the next
    mixed types. Empty cells stay null."""
    import csv

    import datasets

    try:
        with _open_bytes(file) as raw:
            header = next(csv.reader(io.TextIOWrapper(raw, encoding="utf-8-sig", newline=""), delimiter=sep), [])
    except UnicodeDecodeError as e:
        raise HarvestInputError(f"reading dataset file {file} failed: it is not UTF-8 text ({e}); convert it, e.g. "
                                "iconv -f latin1 -t utf-8 FILE > FILE.utf8.csv") from e
    return datasets.Features({name: datasets.Value("string") for name in header})


def _local_files(path: Path, split: str) -> tuple[str, list[str]]:
    """The format (see :data:`LOCAL_SUFFIXES`) and files of one split of a local file or folder.

    A folder is read as ``datasets.load_dataset(folder)`` reads it: files in subfolders too, and split
    by their names (``train.jsonl``/``test.jsonl``, ``data/train-00000-of-00001.parquet``), so a
    folder holding a test split never leaks it into ``train``. Files of other kinds (README.md,
    .gitattributes of a Hub snapshot) are left out."""
    if path.is_file():
        if local_file_format(path) is None:  # no suffix, an .xml: a bare KeyError below, else
            raise HarvestInputError(f"dataset file {path}: not a {LOCAL_FILE_KINDS} file (by its name); "
                                    "convert it, or rename it if it is one of them")
        splits = {"train": [path]}
    else:
        from datasets.data_files import DataFilesDict, get_data_patterns

        try:
            patterns = get_data_patterns(str(path))
        except Exception:  # noqa: BLE001 - datasets raises EmptyDatasetError for a folder of no files
            patterns = {}
        found = DataFilesDict.from_patterns(patterns, base_path=str(path)) if patterns else {}
        splits = {str(name): [Path(f) for f in files if local_file_format(f) is not None]
                  for name, files in found.items()}
        splits = {name: sorted(files) for name, files in splits.items() if files}
        if not splits:
            raise HarvestInputError(f"dataset folder {path} holds no {LOCAL_FILE_KINDS} files")
    if split not in splits and len(splits) == 1 and split == "train":
        split = next(iter(splits))  # the folder's only files, named like another split (eval.jsonl): all there is
    if split not in splits:
        if len(splits) == 1:
            raise HarvestInputError(
                f"--split {split!r}: dataset {path} has one split, {next(iter(splits))!r}; drop --split, or name "
                "the files by split (train.jsonl, test.jsonl) as Hugging Face datasets does")
        raise HarvestInputError(f"--split {split!r}: dataset folder {path} has the splits {sorted(splits)} "
                                "(by file name); pass one of them")
    files = splits[split]
    kinds = {local_file_format(p) for p in files}
    if len(kinds) > 1:
        raise HarvestInputError(
            f"dataset {path}: expected files of one kind among {', '.join(LOCAL_SUFFIXES)}, got "
            + ", ".join(sorted({"".join(p.suffixes[-2:]) if p.suffix in COMPRESSED_SUFFIXES else p.suffix
                                for p in files}))
        )
    return kinds.pop(), [str(p) for p in files]


def _saved_dataset(path: Path, split: str) -> Any | None:
    """A folder written by ``save_to_disk``, as an iterable dataset of ``split``; None when it holds no rows."""
    import json

    import datasets

    def unreadable(e: Exception) -> HarvestInputError:
        return HarvestInputError(f"dataset folder {path} looks like a save_to_disk folder but does not load "
                                 f"({type(e).__name__}: {e})")

    if (path / "dataset_dict.json").is_file():
        try:
            splits = [str(s) for s in json.loads((path / "dataset_dict.json").read_text())["splits"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise unreadable(e) from None
        if split not in splits:
            raise HarvestInputError(f"--split {split!r}: the saved dataset {path} has the splits {sorted(splits)}; "
                                    "pass one of them")
        # Only that split's folder: load_from_disk reads every split, and fails on an empty one (no .arrow file).
        path = path / split
    elif split != "train":
        raise HarvestInputError(f"--split {split!r}: the saved dataset {path} is one split, read as 'train'; "
                                "drop --split")
    try:
        if json.loads((path / "state.json").read_text()).get("_data_files") == []:
            return None  # save_to_disk of no rows writes no data file, which load_from_disk cannot read
    except (OSError, ValueError, AttributeError):
        pass  # no readable state.json: load_from_disk says what is wrong
    try:
        saved = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - datasets' errors for a damaged save
        raise unreadable(e) from None
    return saved.to_iterable_dataset()


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
    json_lines: list[str] = []  # local .jsonl/.json files read: where a parse error is looked for
    if path.is_dir() and any((path / m).is_file() for m in SAVED_DATASET_MARKERS):
        ds = _saved_dataset(path, split)
        if ds is None:
            return  # no documents: the caller says so
    elif path.exists():
        kind, files = _local_files(path, split)
        files = [f for f in files if not _holds_no_rows(f, kind)]  # datasets fails on them, unclearly
        if not files:
            return  # no documents: the caller says so
        builder, kwargs = _BUILDER_ARGS[kind]
        if builder == "csv":
            kwargs = {**kwargs, "features": _csv_string_features(files[0], kwargs.get("sep", ","))}
        ds = datasets.load_dataset(builder, data_files=files, split="train", streaming=True, **kwargs)
        if kind == "text":  # paragraphs split on blank lines keep any extra newline; spaces-only lines are none
            ds = ds.map(_tidy_paragraph)
        json_lines = files if kind == "json" else []
    elif local_file_format(path) is not None or dataset.startswith((".", "/", "~")):
        raise HarvestInputError(f"dataset file {dataset} does not exist")
    else:
        try:
            ds = datasets.load_dataset(dataset, split=split, streaming=True)
        except Exception as e:  # noqa: BLE001 - datasets raises many types; all mean "cannot open"
            raise HarvestInputError(
                f"cannot open Hugging Face dataset {dataset!r} (split {split!r}): {e}. Check the id "
                f"and split, or pass a local {'/'.join(LOCAL_SUFFIXES)} file or builtin:mixed"
            ) from e
    try:
        yield from ds.shuffle(seed=seed, buffer_size=SHUFFLE_BUFFER)
    except UnicodeDecodeError as e:
        raise HarvestInputError(f"reading dataset {dataset!r} failed: it is not UTF-8 text ({e}); convert it, "
                                "e.g. iconv -f latin1 -t utf-8 FILE > FILE.utf8.txt") from e
    except Exception as e:  # noqa: BLE001 - datasets raises many types while reading; all mean bad data
        # pyarrow's "in row N" counts from 0 within the block it parsed, not the file: name the line ourselves
        # (files are read again only for a parse error: a column mismatch would have every file scanned for nothing).
        parse_error = "JSON parse error" in str(e)
        if parse_error and (where := next(filter(None, map(_bad_json_line, json_lines)), None)):
            raise HarvestInputError(f"reading dataset {dataset!r} failed: {where}; fix or remove that line") from e
        raise HarvestInputError(f"reading dataset {dataset!r} failed: {type(e).__name__}: {_short(e)}") from e


_JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
               type(None): "null"}


def _bad_json_line(file: str) -> str | None:
    """Where the first line of a JSON Lines file that is not a JSON object lies, and why (``FILE line N
    (1-based): ...``); None when every line is one (blank lines are allowed), or for a ``.json`` file whose
    first line is not an object (one JSON document, not JSON Lines: its lines are no rows)."""
    import json

    lines_only = _uncompressed_name(file).endswith(".jsonl")  # a .json file may be either
    with _open_bytes(file) as f:
        for number, raw in enumerate(f, 1):
            line = raw.strip()
            if not line:
                continue
            shown = _short(line.decode("utf-8", "replace"), 80)
            try:
                row = json.loads(line)
            except ValueError as e:  # JSONDecodeError, and UnicodeDecodeError for bytes that are not UTF-8
                row = e
            if not lines_only and not isinstance(row, dict):
                return None
            lines_only = True  # a .json file whose first line is an object: JSON Lines
            if isinstance(row, ValueError):
                return f"{file} line {number} is not valid JSON ({row}): {shown}"
            if not isinstance(row, dict):
                kind = _JSON_KINDS.get(type(row), "a value")
                return f"{file} line {number} is {kind}, not an object of columns: {shown}"
    return None


def _tidy_paragraph(row: dict[str, Any]) -> dict[str, Any]:
    """A ``.txt`` document without the newlines around it; blank (spaces only) is empty, so skipped."""
    text = row["text"].strip("\r\n")
    return {"text": text if text.strip() else ""}


def _short(value: Any, limit: int = 300) -> str:
    """``value`` as text, cut to ``limit`` characters (an error quoting a whole document or id list is unreadable)."""
    text = str(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text):,} characters)"


def _holds_no_rows(file: str, kind: str) -> bool:
    """Whether a local dataset file is empty: no bytes but whitespace (once decompressed), or a parquet file of
    0 rows."""
    if os.path.getsize(file) == 0:
        return True
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(file).metadata.num_rows == 0
        except Exception as e:  # noqa: BLE001 - pyarrow's errors for a file that is not parquet
            raise HarvestInputError(f"dataset file {file} is not a readable parquet file ({e})") from None
    try:
        with _open_bytes(file) as f:
            while chunk := f.read(1 << 16):
                if chunk.strip():
                    return False
    except (FileNotFoundError, PermissionError, HarvestInputError):
        raise
    except Exception as e:  # noqa: BLE001 - each decompressor has its own errors (BadGzipFile, LZMAError, ZstdError)
        raise HarvestInputError(f"dataset file {file} does not decompress as its name says "
                                f"({type(e).__name__}: {e}); check the file, or rename it") from None
    return True


_KIND_NAMES = {"b": "bools", "U": "strings", "S": "bytes", "O": "nulls or mixed values"}  # numpy dtype kinds


def _pretokenized_ids(doc: dict[str, Any], n_vocab: int) -> list[int]:
    """One row's ``input_ids`` as ints: null is empty (skipped, as null text is); with an ``attention_mask``
    column, only the ids it marks (padding is not text). Floats that are not whole numbers, nested lists,
    ids outside ``[0, n_vocab)`` and other values are refused rather than cast."""
    raw = doc["input_ids"]
    if raw is None:
        return []
    try:  # one array per row: checked in a few vectorized operations, not per id
        ids = np.asarray(raw) if not isinstance(raw, (str, bytes, dict)) else None
    except ValueError:  # numpy refuses ragged nested lists
        ids = np.empty((0, 0))
    if ids is not None and ids.dtype.kind in "iuf" and isinstance(raw, list) and bool in set(map(type, raw)):
        ids = np.asarray(raw, dtype=object)  # JSON true/false among numbers: numpy made them 1/0 ids
    if ids is None or ids.ndim != 1 or ids.dtype.kind not in "iuf":
        what = ("a nested list (one row per document: flatten it)" if ids is not None and ids.ndim > 1
                else _KIND_NAMES.get(ids.dtype.kind, f"{ids.dtype} values") if ids is not None and ids.ndim == 1
                else type(raw).__name__)
        raise HarvestInputError(f"pre-tokenized input_ids must be a list of ints per row; a row holds {what}: "
                                f"{_short(repr(raw), 80)}")
    if ids.dtype.kind == "f":
        odd = ids[~np.isfinite(ids) | (ids != np.round(ids))]
        if odd.size:
            raise HarvestInputError(f"pre-tokenized input_ids hold {float(odd[0])!r}, not a whole number; the ids "
                                    "must be the models' own token ids")
    mask = doc.get("attention_mask")
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != ids.shape:
            raise HarvestInputError(f"a row's attention_mask has {mask.size} entries for {ids.size} input_ids")
        ids = ids[mask.astype(bool)]
    # Checked before the cast to int64, which turns an id past 2**63 (uint64, or a float) into a negative one.
    bad = ids[(ids < 0) | (ids >= n_vocab)]
    if bad.size:  # else a bare IndexError in the forward, later
        raise HarvestInputError(
            f"pre-tokenized input_ids hold id {int(bad[0])} ({bad.size} such id(s) in one document), outside the "
            f"models' vocabulary [0, {n_vocab}); the ids must come from the models' own tokenizer"
        )
    return ids.astype(np.int64).tolist()


def _doc_tokens(batch: list[dict[str, Any]], tokenizer: Any, text_column: str, n_vocab: int) -> list[list[int]]:
    if "input_ids" in batch[0]:
        return [_pretokenized_ids(d, n_vocab) for d in batch]
    if text_column not in batch[0]:
        raise HarvestInputError(
            f"dataset rows have no text column {text_column!r} (columns: {sorted(batch[0])}); "
            "pass --text-column NAME, or provide an input_ids column"
        )
    odd = [d[text_column] for d in batch if not isinstance(d[text_column], (str, type(None)))]
    if odd:
        bad = odd[0]
        raise HarvestInputError(
            f"text column {text_column!r} holds {type(bad).__name__} values (e.g. {_short(repr(bad), 80)}), not "
            f"text; pass --text-column NAME of a column of strings (columns: {sorted(batch[0])}), or give "
            "pre-tokenized data as an input_ids column"
        )
    texts = [d[text_column] or "" for d in batch]
    docs = tokenizer(texts, add_special_tokens=False)["input_ids"]
    top = max((max(ids) for ids in docs if ids), default=-1)
    if top >= n_vocab:  # an embedding table smaller than the tokenizer: an IndexError mid-harvest, else
        raise HarvestInputError(
            f"the text tokenizes to id {top} ({tokenizer.convert_ids_to_tokens(top)!r}), past the smallest embedding "
            f"table of the models ({n_vocab} rows): a model's tokenizer has tokens its embeddings lack (resize them: "
            "model.resize_token_embeddings(len(tokenizer)), then save), or leave out the text that holds them")
    return docs


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
    read, new_values = 0, 0  # tokens put in buffers; documents that opened a buffer of their own value
    special = {int(i) for i in getattr(tokenizer, "all_special_ids", [])}
    special |= {i for i in (bos_id, eos_id) if i is not None}
    padded: list[tuple[int, int, int, str]] = []  # mask-less pre-tokenized rows that look padded: (row, id, run, end)
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
            plan.pretokenized = "input_ids" in batch[0]
            meta_names = meta_columns if meta_columns is not None else (["source"] if "source" in batch[0] else [])
            for name in meta_names:
                _check_meta_column(batch, name)
            plan.metadata = {n: [] for n in meta_names}
        for doc, ids in zip(batch, _doc_tokens(batch, tokenizer, text_column, n_vocab)):
            n_docs += 1
            if not ids:  # null, missing or empty text: packing it would add a lone EOS
                plan.empty_docs += 1
                continue
            prepacked = bos_id is not None and len(ids) == context_size and ids[0] == bos_id
            if (plan.pretokenized and not prepacked and doc.get("attention_mask") is None
                    and (run := _padding_run(ids, special, bos_id))):
                padded.append((n_docs, *run))
            # NaN != NaN, so each document's NaN opened a buffer of its own (its tail never packed): one NaN.
            values = [_meta_value(doc, n) for n in meta_names]
            key = tuple(_NAN if isinstance(v, float) and v != v else v for v in values)
            try:
                hash(key)  # documents are packed per metadata value
            except TypeError:
                odd, value = next((n, v) for n, v in zip(meta_names, key) if not isinstance(v, Hashable))
                fields = (f"; name one of its fields, as in --meta-columns {odd}.{next(iter(value), 'FIELD')}"
                          if isinstance(value, dict) else "")
                raise HarvestInputError(
                    f"meta column {odd!r} holds {type(value).__name__} values; a meta column must hold one "
                    f"string or number per document{fields}. Leave it out with --meta-columns NAME ..."
                ) from None
            if prepacked and not buffers.get(key):
                done = emit(ids, key, meta_names)  # already a packed sequence (none waits before it)
            else:
                if bos_id is not None and ids and ids[0] == bos_id:
                    ids = ids[1:]
                if not ids:  # a document of a lone BOS: nothing to pack
                    plan.empty_docs += 1
                    continue
                new_values += key not in buffers
                buf = buffers.setdefault(key, [])
                eos = [eos_id] if eos_id is not None and ids[-1] != eos_id else []  # none after an EOS of its own
                read += len(ids) + len(eos)
                buf.extend(ids)
                buf.extend(eos)
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
    if len(padded) >= 2 and len(padded) * PADDED_SHARE >= n_docs - plan.empty_docs:
        raise HarvestInputError(_padded_message(padded, n_docs - plan.empty_docs, tokenizer))
    held = sum(len(b) for b in buffers.values())

    def waiting(also: str) -> str:  # what the meta columns' partly filled sequences hold, if any
        return (f"; {also}{held:,} tokens sit in partly filled sequences of {len(buffers):,} values of --meta-columns "
                f"{' '.join(meta_names or [])} (documents are packed per value)" if held and meta_names else "")

    if meta_names and n_docs >= 16 and 2 * new_values > n_docs and 10 * held > read:
        # Below MAX_OPEN_META_VALUES, yet most documents had a value of their own: their tails never packed.
        raise HarvestInputError(_too_many_values_message(meta_names, buffers, n_docs, body, dropped=(held, read)))
    if total == 0:
        raise HarvestInputError(
            f"dataset {dataset!r} yielded {n_docs} documents{_empty_note(plan, text_column)} but not one full "
            f"sequence of {context_size} tokens{waiting('')}; lower --context-size or use a bigger dataset"
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


PADDING_RUN = 3
"""A run of one special id this long or longer ending or starting a row (after its BOS) looks like padding.
Shorter runs are what packers make of document boundaries: SAELens's defaults put a separator and a BOS
side by side (2), and a document ending in EOS before another's BOS does the same."""


def _padding_run(ids: list[int], special: set[int], bos_id: int | None) -> tuple[int, int, str] | None:
    """``(id, length, "end" | "start")`` of the longer run of one special id (``PADDING_RUN`` or more) that
    ends or starts a row (a leading BOS aside): padding (pad, or EOS standing in for it), not text."""
    best = None
    head = ids[1:] if bos_id is not None and len(ids) > 1 and ids[0] == bos_id else ids
    for end, seq in (("end", ids[::-1]), ("start", head)):
        if not seq or seq[0] not in special:
            continue
        first = seq[0]
        n = next((i for i, x in enumerate(seq) if x != first), len(seq))
        if n >= PADDING_RUN and (best is None or n > best[1]):
            best = (first, n, end)
    return best


def _padded_message(padded: list[tuple[int, int, int, str]], n_rows: int, tokenizer: Any) -> str:
    row, tok, run, end = max(padded, key=lambda p: p[2])
    name = tokenizer.convert_ids_to_tokens(tok) if hasattr(tokenizer, "convert_ids_to_tokens") else tok
    return (f"pre-tokenized rows look padded: {len(padded):,} of the {n_rows:,} rows read end or start with a run "
            f"of one special token (row {row} {end}s with {run} x id {tok}, {name!r}), and there is no "
            "attention_mask column. Packed as they are, the padding would sit between documents and every later "
            "token would attend to it. Add an attention_mask column (1 for text, 0 for padding; the harvest drops "
            "the masked ids), or strip the padding from input_ids")


def _empty_note(plan: TokenPlan, text_column: str) -> str:
    if not plan.empty_docs:
        return ""
    what = "no input_ids" if plan.pretokenized else f"no text in column {text_column!r}"
    return f" ({plan.empty_docs:,} of them with {what})"


def empty_documents_note(plan: TokenPlan, text_column: str) -> str | None:
    """What the harvest says of documents it skipped for having no tokens; None when there were none."""
    if not plan.empty_docs:
        return None
    if plan.pretokenized:
        return f"note: skipped {plan.empty_docs:,} rows with null or empty input_ids"
    return (f"note: skipped {plan.empty_docs:,} documents with no text in column {text_column!r} (null, missing "
            "or empty); if that is most of them, check --text-column")


def _meta_value(doc: dict[str, Any], name: str) -> Any:
    """A document's value of meta column ``name``: its column of that name, else, for a dotted name, the field
    of a nested column (``meta.pile_set_name``: the Pile's ``{"meta": {"pile_set_name": ...}}``), None where a
    document lacks that field."""
    if name in doc:
        return doc[name]
    value: Any = doc
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _check_meta_column(batch: list[dict[str, Any]], name: str) -> None:
    """Refuse a meta column that the dataset's first documents have neither as a column nor, for a dotted name,
    as a field of a nested column (a field some documents lack is null there), naming what there is."""
    if name in batch[0]:
        return
    parts = name.split(".")
    if len(parts) == 1 or parts[0] not in batch[0]:
        raise HarvestInputError(f"meta column {name!r} not in dataset columns {sorted(batch[0])}"
                                + (" (a nested column's field is named COLUMN.FIELD)" if len(parts) > 1 else ""))
    parent = ".".join(parts[:-1])
    fields: set[str] = set()
    for doc in batch:
        if isinstance(value := _meta_value(doc, parent), dict):
            if parts[-1] in value:
                return
            fields |= set(value)
    raise HarvestInputError(f"meta column {name!r}: none of the first {len(batch)} documents has it; "
                            + (f"column {parent!r} has the fields {sorted(fields)}" if fields
                               else f"{parent!r} holds no nested fields there"))


def _too_many_values_message(meta_names: list[str], buffers: dict[tuple, list[int]], n_docs: int,
                             body: int, dropped: tuple[int, int] | None = None) -> str:
    example = ", ".join(_short(repr(k if len(k) > 1 else k[0]), 60) for k in list(buffers)[:3])
    why = (f"past the limit of {MAX_OPEN_META_VALUES:,}" if dropped is None else
           f"and would be dropped: {dropped[0]:,} of the {dropped[1]:,} tokens read ({dropped[0] / dropped[1]:.0%})")
    return (f"--meta-columns {' '.join(meta_names)}: {len(buffers):,} distinct values among the first {n_docs:,} "
            f"documents (e.g. {example}) each hold a partly filled sequence, {why}. A sequence never mixes "
            f"documents with different metadata, so a column with a value per document (an id, a URL) would "
            f"keep only documents' whole {body}-token pieces and drop every tail and every shorter document. "
            "Name columns with few values (source, language), or pass --meta-columns alone for none")


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

