"""Synthetic activation caches in format v1, for tests and benchmarks of stage 2.

:func:`make_cache` writes a real cache (manifest, shards, ``tokens.arrow``, card) through
:class:`shared.cache.CacheWriter`, so whatever reads it reads exactly what a harvest writes.
Rows are *tagged*: the first six dimensions of every ``acts[row, m, p]`` spell out which
token (``seq``, ``pos``) and which slot (``m``, ``p``) the row is, with small integers that
bf16, fp16 and fp32 all store exactly. A test can then check, from a served batch alone,
that it got the rows and the slots it asked for (:func:`decode_tags`, :func:`check_tags`).

Layout emulates the harvester: sequences of ``seq_len`` tokens (positions ``1..seq_len``;
BOS at position 0 is excluded, as in a real harvest) are laid out in order, then permuted in
buffers spanning ``shuffle_buffer_shards`` shards before being cut into shards (the write-time
shuffle), which the manifest records as the harvester does (``write_shuffle``).
``shuffle_buffer_shards=0`` leaves rows in sequence order and records no ``write_shuffle``: the
worst case for a loader's own shuffle.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from shared.cache import CacheWriter
from shared.cache_format import Manifest, dtype_name, shard_file_name
from shared.token_table import write_token_table

__all__ = ["TAG_DIMS", "make_cache", "decode_tags", "check_tags", "shard_rows", "synthetic_tokenizer_json",
           "add_tokenizer"]

TAG_DIMS = 6
"""Dimensions 0..5 of each row hold tags: seq high/low byte, pos high/low byte, model, hook."""

BOS_ID = 0


def _tags_NMP6(seq_N: torch.Tensor, pos_N: torch.Tensor, n_models: int, n_hooks: int) -> torch.Tensor:
    """Tag values ``[N, M, P, 6]`` (float32 small integers, exact in every storage dtype)."""
    n = seq_N.shape[0]
    out = torch.empty(n, n_models, n_hooks, TAG_DIMS)
    out[..., 0] = (seq_N >> 8).float()[:, None, None]
    out[..., 1] = (seq_N & 255).float()[:, None, None]
    out[..., 2] = (pos_N >> 8).float()[:, None, None]
    out[..., 3] = (pos_N & 255).float()[:, None, None]
    out[..., 4] = torch.arange(n_models, dtype=torch.float32)[None, :, None]
    out[..., 5] = torch.arange(n_hooks, dtype=torch.float32)[None, None, :]
    return out


def make_cache(
    path: str | Path,
    *,
    n_shards: int = 4,
    rows_per_shard: int | Sequence[int] = 256,
    n_models: int = 2,
    n_hooks: int = 1,
    d_model: int = 16,
    dtype: torch.dtype = torch.bfloat16,
    seq_len: int = 32,
    shuffle_buffer_shards: int = 4,
    tag: bool = True,
    seed: int = 0,
    model_names: Sequence[str] | None = None,
    hook_names: Sequence[str] | None = None,
) -> Manifest:
    """Write a complete synthetic cache at ``path`` and return its manifest.

    Args:
        n_shards: number of shard files.
        rows_per_shard: rows of every shard, or one count per shard (sizes may differ).
        n_models, n_hooks, d_model: the row shape ``(M, P, D)``.
        dtype: storage dtype (bf16, fp16 or fp32).
        seq_len: tokens harvested per sequence (the last sequence may be shorter).
        shuffle_buffer_shards: write-time shuffle span in shards (0: rows stay in sequence order).
        tag: write tags in dims ``0..5`` (needs ``d_model >= 6``); other dims are N(0, 1) noise.
        seed: seeds the noise, the token ids and the write-time shuffle.
        model_names, hook_names: names in the manifest (default ``model0..``, ``blocks.{j}.hook_resid_post``).

    Tags need ``seq < 65536`` and ``seq_len < 65536``. The manifest's ``normalization`` is
    ``none`` and ``n_sequences`` is recorded, so :func:`shared.cache.verify_cache` passes. With a
    write-time shuffle the manifest's ``write_shuffle`` is ``{"buffer_rows": N, "seed": seed}``,
    ``N`` being the rows of a full buffer (the fewest of any buffer but the last, which may hold
    fewer, like the harvester's last chunk).
    """
    sizes = [rows_per_shard] * n_shards if isinstance(rows_per_shard, int) else list(rows_per_shard)
    if len(sizes) != n_shards or any(s < 0 for s in sizes):
        raise ValueError(f"rows_per_shard must be one count >= 0 or {n_shards} of them, got {rows_per_shard!r}")
    if tag and d_model < TAG_DIMS:
        raise ValueError(f"tagged rows need d_model >= {TAG_DIMS}, got {d_model}")
    models = list(model_names or [f"model{i}" for i in range(n_models)])
    hooks = list(hook_names or [f"blocks.{j}.hook_resid_post" for j in range(n_hooks)])
    if len(models) != n_models or len(hooks) != n_hooks:
        raise ValueError("model_names / hook_names must have n_models / n_hooks entries")
    n_rows = sum(sizes)
    n_seqs = max(1, math.ceil(n_rows / seq_len))
    if tag and (n_seqs >= 1 << 16 or seq_len >= 1 << 16):
        raise ValueError(f"tags hold seq and pos below 65536; {n_seqs} sequences of {seq_len} is too many")
    rng = np.random.default_rng(seed)

    # Rows in harvest order: every non-BOS position of sequence 0, then sequence 1, ...
    row = np.arange(n_rows)
    seq_all, pos_all = row // seq_len, row % seq_len + 1
    vocab = 512
    input_ids = [[BOS_ID] + rng.integers(1, vocab, seq_len).tolist() for _ in range(n_seqs)]
    ids_SL = np.asarray(input_ids, dtype=np.int64)

    # Write-time shuffle: permute buffers spanning `shuffle_buffer_shards` shards, then cut.
    order = np.arange(n_rows)
    extra: dict = {"n_sequences": n_seqs}
    if shuffle_buffer_shards > 0:
        cuts = np.cumsum([0] + sizes)
        buffer_rows = []
        for b0 in range(0, n_shards, shuffle_buffer_shards):
            lo, hi = cuts[b0], cuts[min(b0 + shuffle_buffer_shards, n_shards)]
            order[lo:hi] = lo + rng.permutation(hi - lo)
            buffer_rows.append(int(hi - lo))
        full = buffer_rows[:-1] or buffer_rows  # the last buffer may be a partial one
        extra["write_shuffle"] = {"buffer_rows": max(1, min(full)), "seed": seed}

    manifest = Manifest(
        models=[{"name": name, "revision": None} for name in models],
        hooks=hooks,
        d_model=d_model,
        dtype=dtype_name(dtype),
        context_size=seq_len + 1,
        n_rows=0,
        shards=[],
        normalization={
            "method": "none",
            "scale": [[1.0] * n_hooks for _ in range(n_models)],
            "file": None,
            "calibration_rows": 0,
            "target": None,
        },
        excluded_tokens={"special": True, "token_ids": [BOS_ID]},
        dataset={"name": "synthetic", "split": "train"},
        tokenizer={"name": "synthetic", "vocab_size": vocab, "sha256": None},
        created_by={"tool": "tests.cache_factory", "seed": seed},
        complete=False,
        extra=extra,
    )
    writer = CacheWriter(path, manifest)
    start = 0
    for i, size in enumerate(sizes):
        pick = order[start : start + size]
        start += size
        seq_N = torch.from_numpy(seq_all[pick]).to(torch.int64)
        pos_N = torch.from_numpy(pos_all[pick]).to(torch.int32)
        token_N = torch.from_numpy(ids_SL[seq_all[pick], pos_all[pick]]).to(torch.int32)
        acts = torch.from_numpy(rng.standard_normal((size, n_models, n_hooks, d_model), dtype=np.float32))
        if tag:
            acts[..., :TAG_DIMS] = _tags_NMP6(seq_N, pos_N, n_models, n_hooks)
        writer.add_shard(shard_file_name(i), acts.to(dtype), seq_N, pos_N, token_N)
    write_token_table(path, input_ids)
    return writer.finish()


def decode_tags(acts_BMPD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Read tags back: ``(seq_BMP, pos_BMP, model_BMP, hook_BMP)`` as int64 (cache-side indices)."""
    t = acts_BMPD[..., :TAG_DIMS].to(torch.float32).round().to(torch.int64)
    return t[..., 0] * 256 + t[..., 1], t[..., 2] * 256 + t[..., 3], t[..., 4], t[..., 5]


def check_tags(
    acts_BMPD: torch.Tensor,
    index_B2: torch.Tensor,
    model_ids: Sequence[int],
    hook_ids: Sequence[int],
) -> None:
    """Assert every row of a batch is the (seq, pos) its index says, in the slots asked for.

    ``model_ids`` / ``hook_ids`` are the cache indices of the selected models / hooks, in the
    order the batch holds them.
    """
    seq, pos, m, p = decode_tags(acts_BMPD.cpu())
    b, n_m, n_p = seq.shape
    assert (n_m, n_p) == (len(model_ids), len(hook_ids)), (acts_BMPD.shape, model_ids, hook_ids)
    index_B2 = index_B2.cpu()
    assert torch.equal(seq, index_B2[:, 0, None, None].expand(b, n_m, n_p)), "acts rows do not match index seq"
    assert torch.equal(pos, index_B2[:, 1, None, None].expand(b, n_m, n_p)), "acts rows do not match index pos"
    assert torch.equal(m, torch.tensor(list(model_ids))[None, :, None].expand(b, n_m, n_p)), "wrong model slots"
    assert torch.equal(p, torch.tensor(list(hook_ids))[None, None, :].expand(b, n_m, n_p)), "wrong hook slots"


def shard_rows(path: str | Path, shard_indices: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """All ``(seq, pos)`` pairs held by the given shards (default: all), read from the files."""
    from shared.cache import open_cache

    cache = open_cache(path)
    out: list[tuple[int, int]] = []
    for i in range(cache.n_shards) if shard_indices is None else shard_indices:
        with cache.shard(i) as reader:
            out.extend(zip(reader.seq.tolist(), reader.pos.tolist()))
    return out


def synthetic_tokenizer_json(vocab: int = 512, prefix: str = "t") -> bytes:
    """A real ``tokenizer.json`` (word-level) for a synthetic cache's ids: id ``i`` is the word ``{prefix}{i}``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"{prefix}{i}": i for i in range(vocab)}, unk_token=f"{prefix}0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok.to_str(pretty=True).encode()


def add_tokenizer(cache: str | Path, *, folder: str | Path | None = None, prefix: str = "t") -> bytes:
    """Give a :func:`make_cache` cache a tokenizer: its manifest's ``tokenizer.sha256`` becomes the
    vocabulary's fingerprint. With ``folder=None`` the file goes into the cache as ``tokenizer.json``,
    listed (``file``, ``file_sha256``), as a harvest writes it; else into ``folder``, named by the
    manifest's ``tokenizer.path`` only (a cache harvested before caches held their tokenizer).
    Returns the file's bytes."""
    import hashlib
    import json

    from shared.tokenizer_file import vocab_fingerprint

    data = synthetic_tokenizer_json(prefix=prefix)
    path = Path(cache) / "manifest.json"
    obj = json.loads(path.read_text())
    obj["tokenizer"]["sha256"] = vocab_fingerprint(data)
    target = Path(cache) if folder is None else Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    (target / "tokenizer.json").write_bytes(data)
    if folder is None:
        obj["tokenizer"].update(file="tokenizer.json", file_sha256=hashlib.sha256(data).hexdigest())
    else:
        obj["tokenizer"]["path"] = str(target)
    path.write_text(json.dumps(obj, indent=1) + "\n")
    return data
