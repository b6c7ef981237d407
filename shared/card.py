"""The dataset card (``README.md`` in a cache folder, and the Hub dataset card)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shared.cache_format import Manifest

__all__ = ["CARD_MARK", "render_card"]

# A phrase every card holds: a README.md in an output folder is taken for ours only with it.
CARD_MARK = "written by `run_harvest.py`"


def render_card(manifest: "Manifest", *, hub_repo: str | None = None, hub_revision: str | None = None) -> str:
    """Markdown card describing a cache: models, hooks, size, dtype, normalization, how to load.

    With ``hub_repo`` (``USER/NAME``; ``hub_revision`` a branch or tag) the card ends with a
    "Loading from the Hub" section for that repo: the card ``run_harvest.py push`` uploads.
    """
    m = manifest
    models = "\n".join(
        f"| {i} | `{x['name']}` | {x.get('revision') or '-'} |" for i, x in enumerate(m.models)
    )
    hooks = "\n".join(f"| {i} | `{h}` |" for i, h in enumerate(m.hooks))
    row_bytes = m.n_models * m.n_hooks * m.d_model * {"bfloat16": 2, "float16": 2, "float32": 4}[m.dtype]
    norm = m.normalization
    ds = m.dataset
    tokenizer_file = m.tokenizer.get("file")
    tokenizer_line = (f"\n- `{tokenizer_file}`: the tokenizer the models were fed with (`tokenizers` format), to show "
                      "token ids as text." if tokenizer_file else "")
    readers = ["`safetensors.torch.load_file(shard_path)`", '`pyarrow.ipc.open_file("tokens.arrow")`']
    if tokenizer_file:
        readers.append(f'`tokenizers.Tokenizer.from_file("{tokenizer_file}")`')
    without = ", ".join(readers[:-1]) + " and " + readers[-1]
    fed = f"; BOS id {m.tokenizer.get('bos_token_id')}, EOS id {m.tokenizer.get('eos_token_id')} fed to every model"
    own = m.tokenizer.get("own_special_tokens") or {}
    if own:  # models whose tokenizer declares others (a chat fine-tune's EOS): say so beside the ids fed
        fed += " (" + "; ".join(f"`{name}` declares BOS {ids.get('bos_token_id')}, EOS {ids.get('eos_token_id')}"
                                for name, ids in own.items()) + ")"
    card = f"""---
tags:
- activations
- crosscoder
- sparse-autoencoder
- crosscache
---

# Activation cache: {', '.join(x['name'] for x in m.models)} @ {', '.join(m.hooks)}

Aligned, normalized language-model activations in **crosscache format v{m.format_version}**,
{CARD_MARK}. Row *r* of every model is the same token of the same sequence.

| | |
|---|---|
| rows (tokens) | {m.n_rows:,} |
| shards | {len(m.shards)} |
| row shape `(n_models, n_hooks, d_model)` | {m.row_shape} |
| storage dtype | `{m.dtype}` ({row_bytes} bytes per row) |
| context size | {m.context_size} |
| dataset | `{ds.get('name')}` (split `{ds.get('split')}`) |
| normalization | `{norm.get('method')}` (calibrated on {norm.get('calibration_rows')} rows, special tokens excluded) |
| excluded tokens | special tokens: {m.excluded_tokens.get('special')}, ids {m.excluded_tokens.get('token_ids')} |
| tokenizer | `{m.tokenizer.get('name')}` (vocab {m.tokenizer.get('vocab_size')}, sha256 `{str(m.tokenizer.get('sha256'))[:12]}…`){fed} |

## Models (axis M)

| index | model | revision |
|---|---|---|
{models}

## Hooks (axis P)

| index | hook |
|---|---|
{hooks}

## Files

- `manifest.json`: format version, models, hooks, shapes, dtype, normalization, shard list with sha256.
- `shards/*.safetensors`: `acts` `[n_rows, n_models, n_hooks, d_model]`, `seq` int64, `pos` int32, `token` int32.
  Rows are shuffled across sequences; `(seq, pos)` locate each row in `tokens.arrow`.
- `tokens.arrow`: Arrow IPC file, one row per sequence: `seq`, `input_ids` (BOS included), metadata columns.{tokenizer_line}

Shards hold **normalized** activations. Raw activations: `norm_scale` divides by
`normalization.scale[m][p]`; `mean_std` computes `x * std + mean` with the tensors in
`normalization.safetensors`.

## Loading

```python
from shared import open_cache                 # crosscache
cache = open_cache("path/to/cache")
shard = cache.shard(0)                        # memory-mapped
acts_NMPD = shard.acts                        # normalized activations
raw_NMPD = cache.normalization().undo(acts_NMPD)
```

Without crosscache: {without}.
"""
    return card if hub_repo is None else card + _hub_section(hub_repo, hub_revision)


def _hub_section(repo: str, revision: str | None) -> str:
    spec = f"hf://{repo}" + (f"@{revision}" if revision else "")
    rev_arg = f", revision={revision!r}" if revision else ""
    return f"""
## Loading from the Hub

Any crosscache command or function that takes a cache folder also takes `{spec}`; it
downloads through `huggingface_hub` into its local cache (offline use: `HF_HUB_OFFLINE=1`
once downloaded).

```python
from shared import open_cache
cache = open_cache("{spec}")                # the whole cache
quick = open_cache("{spec}", max_shards=2)  # manifest, token table and the first 2 shards only
```

```bash
python run_harvest.py verify {spec}
python run_train.py --cache {spec} ...
```

Without crosscache: `huggingface_hub.snapshot_download("{repo}", repo_type="dataset"{rev_arg})`.
"""
