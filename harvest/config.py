"""``HarvestConfig``: every option of stage 1, shared by the Python API and ``run_harvest.py``.

Each field is a CLI flag of the same name (underscores become dashes). Defaults harvest the
demo cache: the toy model pair on the built-in mixed prose+code corpus.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from shared.cache_format import TOKEN_TABLE_COLUMNS
from shared.config import MAX_DIST_TIMEOUT, coerce_field_types, config_to_json, field_help
from shared.normalization import NORM_METHODS

__all__ = ["HarvestConfig", "CONTENT_FIELDS", "MAX_SEED"]

AUTO_SHARDS = 32
"""Shards an automatically sized cache is cut into (unless that makes shards < 1 MiB or > 64 MiB)."""

MAX_SEED = (2**63 - 1 - 2**32) // 1_000_003
"""Largest ``--seed``: the write shuffle seeds ``torch.Generator`` with ``seed * 1_000_003 + chunk``, an
int64. Negative seeds are refused too: the streaming shuffle of file and Hub datasets needs seed >= 0."""


@dataclass(frozen=True)
class HarvestConfig:
    """Options of one harvest. Validated on construction."""

    models: list[str] = field_help(
        "Models to harvest, aligned on the same tokens: toy names (toy-base, toy-code, "
        "toy-prose), local HF folders, or HF ids (NAME@REVISION pins a revision).",
        default_factory=lambda: ["toy-base", "toy-code"], metadata={"path": True},
    )
    hooks: list[str] = field_help(
        "transformer-lens hook names, e.g. blocks.2.hook_resid_post; all must have width d_model.",
        default_factory=lambda: ["blocks.2.hook_resid_post"],
    )
    dataset: str = field_help(
        "builtin:docs | builtin:code | builtin:mixed, a local .txt/.jsonl/.json/.csv/.tsv/.parquet file or a "
        "folder of them (text kinds may be .gz/.bz2/.xz/.zst), or an HF dataset id (streamed).",
        default="builtin:mixed", metadata={"path": True},
    )
    split: str = field_help("Dataset split (built-ins: train, eval, all).", default="train")
    text_column: str = field_help(
        "Column with the text; a column named input_ids (pre-tokenized) is used instead when present.",
        default="text",
    )
    meta_columns: list[str] | None = field_help(
        "Per-document columns copied into tokens.arrow per sequence (default: 'source' when the "
        "dataset has it; the flag alone: none; meta.pile_set_name: a field of a nested column). Sequences never "
        "mix documents with different metadata, "
        "so a column needs few values (source, language), not one per document.",
        default=None, metadata={"nargs": "*"},
    )
    tokens: int = field_help("Rows (tokens) to write, after excluding special tokens.", default=200_000)
    context_size: int = field_help("Tokens per sequence, BOS included.", default=128)
    out: str = field_help("Output cache folder.", default="caches/toy-diff", metadata={"path": True})
    dtype: Literal["bfloat16", "float16", "float32"] = field_help(
        "Storage dtype of the shards (bf16 halves the bytes the trainer streams).", default="bfloat16"
    )
    model_dtype: Literal["float32", "bfloat16", "float16"] = field_help(
        "dtype the models run in.", default="float32"
    )
    device: str = field_help("Device for the forward passes: auto (cuda if available), cpu, cuda, cuda:1, ...", default="auto")
    batch_size: int = field_help("Sequences per forward pass.", default=32)
    normalize: Literal["norm_scale", "mean_std", "none"] = field_help(
        "Per-(model, hook) normalization: norm_scale makes E|x| = sqrt(d_model).", default="norm_scale"
    )
    calibration_tokens: int = field_help(
        "Rows used to estimate the normalization (the first rows of the seeded stream).", default=32_768
    )
    shard_size: float | None = field_help(
        "Target shard size in MiB. Default: the cache's size / 32, clamped to [1, 64] MiB, so a "
        "small cache still has enough shards for a held-out split and the loader's mixing window, "
        "and a large one does not become 100k files.",
        default=None,
    )
    shuffle_shards: int = field_help(
        "Write-time shuffle buffer, in shards: this many shards' rows are permuted together.", default=8
    )
    seed: int = field_help(f"Seed for document order and the write-time shuffle (0 to {MAX_SEED}).", default=0)
    exclude_special: bool = field_help(
        "Exclude BOS, padding and every other special token from the rows (their norms are outliers).",
        default=True,
    )
    exclude_token_ids: list[int] = field_help("Further token ids to exclude.", default_factory=list)
    # Off by default: a different vocabulary is usually a mistake (a wrong model), and a harvest
    # with it allowed never sees the tokens the fine-tune added.
    allow_vocab_extension: bool = field_help(
        "Accept models whose vocabularies extend one of them with the same ids (a chat fine-tune that "
        "added tokens to its base's): that one's tokenizer tokenizes, so every id means the same token "
        "in every model.", default=False)
    write_threads: int | None = field_help(
        "Threads writing shards (sha256, write, fsync), while the next shuffle chunk fills. "
        "Default: a quarter of the CPUs, 1 to 4 (one core's sha256 runs at ~1 GB/s; a GPU harvest of "
        "a small model produces more than that).", default=None)
    # 32k: at batch 256 x 128 (32k tokens) the H100 showed no capture cost, at 32 x 128 ~7% (session 7).
    capture_group_tokens: int = field_help(
        "Tokens forwarded (whole batches) before their rows are selected, normalized and handed to the "
        "shard writer in one go. Per group, not per batch, that is ~10 torch calls and a hand-off to the "
        "writer thread: the cost that bounds a small model's GPU harvest at small batches. The rows and "
        "bytes are the same for any value; a group also ends past 256 MiB of held activations. "
        "1: each batch alone.", default=32_768)
    progress: bool = field_help("Show progress bars.", default=True)
    dist_timeout: float | None = field_help(
        "Under torchrun: seconds a process waits for the others before it stops with an error (a dead rank is "
        "reported by torchrun at once). Default: $CROSSCACHE_DIST_TIMEOUT or 300.", default=None)

    def __post_init__(self) -> None:
        coerce_field_types(self)
        if not self.models:
            raise ValueError("models: give at least one model")
        if len(set(self.models)) != len(self.models):
            raise ValueError(f"models: duplicate names in {self.models}")
        if not self.hooks:
            raise ValueError("hooks: give at least one hook, e.g. blocks.2.hook_resid_post")
        if len(set(self.hooks)) != len(self.hooks):
            raise ValueError(f"hooks: duplicate names in {self.hooks}")
        if self.meta_columns is not None:
            taken = [c for c in self.meta_columns if c in TOKEN_TABLE_COLUMNS]
            if taken:  # before the models load, not when tokens.arrow is written
                raise ValueError(f"meta_columns: {taken} would overwrite tokens.arrow's own column(s) "
                                 f"{list(TOKEN_TABLE_COLUMNS)}; rename the dataset column or leave it out")
            if len(set(self.meta_columns)) != len(self.meta_columns):
                raise ValueError(f"meta_columns: duplicate names in {self.meta_columns}")
        if self.context_size < 2:  # before the generic >= 1 check, so 0 and 1 get the same message
            raise ValueError(f"context_size must be >= 2 (BOS plus at least one token), got {self.context_size}")
        for name in ("tokens", "batch_size", "calibration_tokens", "shuffle_shards",
                     "capture_group_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.write_threads is not None and self.write_threads < 1:
            raise ValueError(f"write_threads must be >= 1 or None, got {self.write_threads}")
        if self.shard_size is not None and not (self.shard_size > 0 and math.isfinite(self.shard_size)):
            raise ValueError(f"shard_size must be a positive number of MiB, got {self.shard_size}")
        if self.normalize not in NORM_METHODS:
            raise ValueError(f"normalize must be one of {NORM_METHODS}, got {self.normalize!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be an integer in [0, {MAX_SEED}], got {self.seed!r}")
        # Checked here too, not only under torchrun: a value that would fail there fails in a test run first.
        if self.dist_timeout is not None and not (0 < self.dist_timeout <= MAX_DIST_TIMEOUT):
            raise ValueError(f"dist_timeout must be a positive number of seconds, at most {MAX_DIST_TIMEOUT:.0e} "
                             f"(~3 years), got {self.dist_timeout}")

    def shard_rows(self, row_bytes: int) -> int:
        """Rows per shard for rows of ``row_bytes`` bytes (see ``shard_size``)."""
        mib = self.shard_size
        if mib is None:
            mib = min(max(self.tokens * row_bytes / 2**20 / AUTO_SHARDS, 1.0), 64.0)
        return max(1, int(mib * 2**20) // row_bytes)

    def content_signature(self) -> dict:
        """The fields that determine the cache's bytes; a resume must match them exactly."""
        d = config_to_json(self)
        return {k: d[k] for k in CONTENT_FIELDS}


CONTENT_FIELDS = (
    "models", "hooks", "dataset", "split", "text_column", "meta_columns", "tokens",
    "context_size", "dtype", "model_dtype", "normalize", "calibration_tokens", "shard_size",
    "shuffle_shards", "seed", "exclude_special", "exclude_token_ids", "batch_size",
)
"""Fields a resumed harvest must share with the interrupted one (batch_size included: it
changes the floating-point summation order, so the bytes). ``device``, ``out``,
``write_threads``, ``capture_group_tokens``, ``progress`` and ``allow_vocab_extension`` (it only
lets a harvest start) may differ."""
