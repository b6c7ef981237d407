"""Cache format v1: the manifest schema, file layout and dtype names (the contract between stages).

The prose spec lives in README.md ("Cache format v1"); this module is its executable form.

Dimension key (shape suffixes used across the project):
    N rows of a shard, B batch, M models, P hooks (hookpoints), D d_model, L latents,
    S sequence positions, Xi / Xo input / output crosscoding slots.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "TOKENS_NAME",
    "CARD_NAME",
    "NORMALIZATION_NAME",
    "TOKENIZER_NAME",
    "SHARD_DIR",
    "STORAGE_DTYPES",
    "CacheError",
    "ShardRecord",
    "Manifest",
    "shard_file_name",
    "dtype_from_name",
    "dtype_name",
]

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
TOKENS_NAME = "tokens.arrow"
TOKEN_TABLE_COLUMNS = ("seq", "input_ids")
"""tokens.arrow's own columns; metadata columns take other names."""
CARD_NAME = "README.md"
NORMALIZATION_NAME = "normalization.safetensors"
TOKENIZER_NAME = "tokenizer.json"
"""The cache's own copy of the tokenizer the models were fed with (listed as ``tokenizer.file``)."""
SHARD_DIR = "shards"

STORAGE_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}
"""Storage dtype names allowed in ``manifest.dtype`` and their torch dtypes."""

# safetensors header dtype codes for the tensors a shard holds.
SAFETENSORS_DTYPE_CODES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "I64": torch.int64,
    "I32": torch.int32,
}


class CacheError(Exception):
    """A cache on disk is missing, malformed, or disagrees with its manifest.

    The message names the file and field at fault and, where there is one, the fix.
    """


def shard_file_name(index: int, rank: int | None = None) -> str:
    """Relative path of shard ``index``; per-rank harvests add ``-rank{r}`` so names never clash."""
    suffix = "" if rank is None else f"-rank{rank}"
    return f"{SHARD_DIR}/acts{suffix}-{index:05d}.safetensors"


def dtype_from_name(name: str) -> torch.dtype:
    """Storage dtype for a manifest dtype name, with a clear error for anything else."""
    try:
        return STORAGE_DTYPES[name]
    except KeyError:
        raise ValueError(
            f"unknown storage dtype {name!r}; expected one of {', '.join(STORAGE_DTYPES)}"
        ) from None


def dtype_name(dtype: torch.dtype) -> str:
    """Inverse of :func:`dtype_from_name`."""
    for name, dt in STORAGE_DTYPES.items():
        if dt == dtype:
            return name
    raise ValueError(f"dtype {dtype} is not a storage dtype ({', '.join(STORAGE_DTYPES)})")


@dataclass(frozen=True)
class ShardRecord:
    """One entry of ``manifest.shards``: a shard file (relative path), its rows, bytes and checksum."""

    file: str
    n_rows: int
    sha256: str
    bytes: int

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_json(obj: dict[str, Any], where: str) -> "ShardRecord":
        try:
            if not isinstance(obj["file"], str):
                raise TypeError(f"file must be a string, got {type(obj['file']).__name__}")
            return ShardRecord(
                file=obj["file"],
                n_rows=int(obj["n_rows"]),
                sha256=str(obj["sha256"]).lower(),  # we write lowercase hex; another tool may write uppercase
                bytes=int(obj["bytes"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CacheError(f"{where}: malformed shard entry {obj!r} ({e})") from None


_REQUIRED = (
    "format_version",
    "models",
    "hooks",
    "d_model",
    "dtype",
    "context_size",
    "n_rows",
    "shards",
    "normalization",
    "excluded_tokens",
    "dataset",
    "tokenizer",
    "created_by",
)


def _checked_relative_path(file: Any, what: str, where: str, example: str) -> str:
    """``file`` as a plain relative path inside the cache folder, normalized (``a//b``, ``./a/b`` -> ``a/b``,
    so two spellings of one file compare equal); raise :class:`CacheError` naming ``what`` otherwise."""
    parts = Path(file).parts if isinstance(file, str) else ()
    # A reader opens <cache>/<file>: a name reaching outside the folder would read (or push) another file.
    if not parts or Path(file).is_absolute() or "\\" in file or any(p in ("..", ".") for p in parts):
        raise CacheError(f"{where}: {what} {file!r} must be a relative path inside the cache folder, with no "
                         f"'..' (e.g. {example!r}); move the file into the folder and list it relative to it")
    return "/".join(parts)


def _checked_tokenizer(entry: Any, where: str) -> dict[str, Any]:
    """The manifest's ``tokenizer`` object, checked where it lists the cache's own tokenizer file:
    ``file`` a plain relative name inside the cache folder; ``file_sha256``, if given, 64 hex digits
    (another tool's cache may list the file alone: it is then checked for presence only)."""
    if not isinstance(entry, dict):
        raise CacheError(f"{where}: tokenizer must be an object, got {type(entry).__name__}")
    file = entry.get("file")
    if file is None:
        return dict(entry)
    _checked_relative_path(file, "tokenizer.file", where, TOKENIZER_NAME)
    sha = entry.get("file_sha256")
    if sha is not None and not (isinstance(sha, str) and re.fullmatch(r"[0-9a-fA-F]{64}", sha)):
        raise CacheError(f"{where}: tokenizer.file_sha256 must be the 64-hex sha256 of {file}, got {sha!r}")
    return dict(entry, file_sha256=sha.lower()) if sha is not None else dict(entry)


def _check_names(models: list[Any], hooks: list[Any], where: str) -> None:
    """Every ``models`` entry an object with a ``name`` (its other keys are optional), and no model or hook
    name twice: a name picks one index of the ``acts`` axes, so a repeated one is ambiguous."""
    for i, m in enumerate(models):
        if not (isinstance(m, dict) and isinstance(m.get("name"), str) and m["name"]):
            raise CacheError(f"{where}: models[{i}] must be an object with a non-empty string \"name\" (e.g. "
                             f"{{\"name\": \"gpt2\"}}; other keys are optional), got {str(m)[:80]}")
    for kind, names in (("model", [m["name"] for m in models]), ("hook", [str(h) for h in hooks])):
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise CacheError(f"{where}: {kind} name(s) {twice} appear more than once in {kind}s; each names one "
                             f"index of the acts {kind} axis, so give every {kind} a distinct name")


def _checked_normalization(entry: Any, n_models: int, n_hooks: int, where: str) -> dict[str, Any]:
    """The manifest's ``normalization`` object, checked: a known ``method``, and ``scale`` a list per
    model of a list per hook of numbers. ``scale`` may be left out for ``mean_std`` and ``none``
    (it is 1.0 for every slot there)."""
    from shared.normalization import NORM_METHODS  # normalization imports this module

    if not isinstance(entry, dict):
        raise CacheError(f"{where}: normalization must be an object, got {type(entry).__name__}")
    method = entry.get("method")
    if method not in NORM_METHODS:
        raise CacheError(f"{where}: normalization.method {method!r} is not one of {', '.join(NORM_METHODS)}")
    if entry.get("file") is not None:
        _checked_relative_path(entry["file"], "normalization.file", where, NORMALIZATION_NAME)
    entry = dict(entry)
    if "scale" not in entry and method != "norm_scale":
        entry["scale"] = [[1.0] * n_hooks for _ in range(n_models)]
    scale = entry.get("scale")
    if not (isinstance(scale, list) and len(scale) == n_models
            and all(isinstance(row, list) and len(row) == n_hooks
                    and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in row) for row in scale)):
        raise CacheError(
            f"{where}: normalization.scale must be a list per model ({n_models}) of a list per hook ({n_hooks}) of "
            f"numbers, got {str(scale)[:80]}"
        )
    bad = [(m, p, x) for m, row in enumerate(scale) for p, x in enumerate(row) if not (math.isfinite(x) and x > 0)]
    if bad:  # rows scaled by 0 or inf are zeros or NaN: the harvest saw inf/NaN activations
        m, p, x = bad[0]
        raise CacheError(
            f"{where}: normalization.scale[{m}][{p}] is {x}, not a positive number: that slot's rows are zeros or "
            "NaN (the model's activations were inf or NaN when it was harvested, as when float16 overflows). "
            "Re-harvest with --model-dtype bfloat16 or float32"
        )
    return entry


@dataclass
class Manifest:
    """``manifest.json``: everything needed to read, verify and interpret a cache.

    Required keys are typed fields; any further keys round-trip through ``extra``.
    ``complete`` is false while a harvest is running (shards listed so far are whole and
    verified; more will come) and true once it has finished.
    """

    models: list[dict[str, Any]]
    hooks: list[str]
    d_model: int
    dtype: str
    context_size: int
    n_rows: int
    shards: list[ShardRecord]
    normalization: dict[str, Any]
    excluded_tokens: dict[str, Any]
    dataset: dict[str, Any]
    tokenizer: dict[str, Any]
    created_by: dict[str, Any]
    complete: bool = True
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_models(self) -> int:
        return len(self.models)

    @property
    def n_hooks(self) -> int:
        return len(self.hooks)

    @property
    def model_names(self) -> list[str]:
        return [m["name"] for m in self.models]

    @property
    def shards_fingerprint(self) -> str:
        """sha256 over the shards' own sha256s in manifest order: the identity of the cache's rows
        (the same for a copy, a move or a byte-identical re-harvest; a run records it)."""
        return hashlib.sha256("\n".join(s.sha256 for s in self.shards).encode()).hexdigest()

    @property
    def row_shape(self) -> tuple[int, int, int]:
        """Shape of one row of ``acts``: ``(n_models, n_hooks, d_model)``."""
        return (self.n_models, self.n_hooks, self.d_model)

    @property
    def row_bytes(self) -> int:
        """Bytes of one row of ``acts`` in storage."""
        return self.n_models * self.n_hooks * self.d_model * self.torch_dtype.itemsize

    @property
    def torch_dtype(self) -> torch.dtype:
        return dtype_from_name(self.dtype)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format_version": self.format_version, "complete": self.complete}
        for f in dataclasses.fields(self):
            if f.name in ("format_version", "complete", "extra"):
                continue
            value = getattr(self, f.name)
            out[f.name] = [s.to_json() for s in value] if f.name == "shards" else value
        out.update(self.extra)
        return out

    @staticmethod
    def from_json(obj: dict[str, Any], where: str = MANIFEST_NAME) -> "Manifest":
        """Parse and validate a manifest object; raise :class:`CacheError` naming what is wrong."""
        if not isinstance(obj, dict):
            raise CacheError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        missing = [k for k in _REQUIRED if k not in obj]
        if missing:
            raise CacheError(f"{where}: missing required key(s) {missing}")
        version = obj["format_version"]
        if version != FORMAT_VERSION:
            raise CacheError(
                f"{where}: format_version {version!r} is not supported (this code reads "
                f"version {FORMAT_VERSION}); upgrade crosscache or re-harvest the cache"
            )
        if obj["dtype"] not in STORAGE_DTYPES:
            raise CacheError(
                f"{where}: dtype {obj['dtype']!r} is not one of {', '.join(STORAGE_DTYPES)}"
            )
        models, hooks = obj["models"], obj["hooks"]
        if not (isinstance(models, list) and isinstance(hooks, list) and models and hooks):
            raise CacheError(f"{where}: a cache needs at least one model and one hook (models: a list of objects, "
                             "hooks: a list of names)")
        _check_names(models, hooks, where)
        complete = obj.get("complete", True)
        if not isinstance(complete, bool):  # bool("false") is True: a string would pass an unfinished cache
            raise CacheError(f"{where}: complete must be true or false (a JSON bool), got {complete!r}")
        shards = [ShardRecord.from_json(s, where) for s in obj["shards"]]
        seen: dict[str, int] = {}
        for i, rec in enumerate(shards):
            rel = _checked_relative_path(rec.file, f"shards[{i}].file", where, shard_file_name(i))
            if rel in seen:  # its rows would be served twice, and an eval shard could also be a training one
                raise CacheError(f"{where}: shards[{seen[rel]}] and shards[{i}] list the same file {rel!r}; list "
                                 "each shard file once (and n_rows as the sum of the remaining shards' rows)")
            seen[rel] = i
        n_listed = sum(s.n_rows for s in shards)
        if complete and n_listed != obj["n_rows"]:
            raise CacheError(
                f"{where}: shards hold {n_listed} rows but n_rows says {obj['n_rows']}"
            )
        if complete and n_listed == 0:  # a running harvest lists no shard at first: only a finished one is refused
            raise CacheError(f"{where}: the cache holds no rows (shards lists {len(shards)} file(s) of 0 rows); list "
                             "the shard files that hold its rows (a cache must hold at least one), or harvest it again")
        n_models, n_hooks, d_model = len(obj["models"]), len(obj["hooks"]), int(obj["d_model"])
        for i, m in enumerate(obj["models"]):
            if m.get("d_model") not in (None, d_model):
                raise CacheError(f"{where}: models[{i}] has d_model {m['d_model']}, the cache's d_model is {d_model}")
        normalization = _checked_normalization(obj["normalization"], n_models, n_hooks, where)
        known = set(_REQUIRED) | {"complete"}
        return Manifest(
            models=list(obj["models"]),
            hooks=[str(h) for h in obj["hooks"]],
            d_model=int(obj["d_model"]),
            dtype=str(obj["dtype"]),
            context_size=int(obj["context_size"]),
            n_rows=int(obj["n_rows"]),
            shards=shards,
            normalization=normalization,
            excluded_tokens=dict(obj["excluded_tokens"]),
            dataset=dict(obj["dataset"]),
            tokenizer=_checked_tokenizer(obj["tokenizer"], where),
            created_by=dict(obj["created_by"]),
            complete=complete,
            format_version=int(version),
            extra={k: v for k, v in obj.items() if k not in known},
        )

    @staticmethod
    def load(cache_dir: str | Path) -> "Manifest":
        """Read ``<cache_dir>/manifest.json``."""
        path = Path(cache_dir) / MANIFEST_NAME
        if not Path(cache_dir).is_dir():
            raise CacheError(f"cache folder {cache_dir} does not exist")
        if not path.is_file():
            raise CacheError(
                f"{path} not found: {cache_dir} is not an activation cache (or its harvest "
                f"never wrote a shard); run `python run_harvest.py ... --out {cache_dir}` first"
            )
        try:
            obj = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CacheError(f"{path}: not valid JSON ({e})") from None
        return Manifest.from_json(obj, where=str(path))
