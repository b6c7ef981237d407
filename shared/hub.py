"""Caches on the Hugging Face Hub: push a verified cache, open ``hf://USER/NAME[@REV]``.

- :func:`push_cache` verifies a cache and uploads exactly its files (manifest, card, token
  table, normalization tensors, the shards the manifest lists) to a *dataset* repo.
- :func:`resolve_cache` turns ``hf://USER/NAME[@REV]`` into a local folder by downloading
  through ``huggingface_hub`` into its cache; ``max_shards=N`` fetches only the first N shards.
  :func:`resolve_cache_with_digests` also returns the sha256 it computed (so ``verify`` need not
  hash those files again).

``huggingface_hub`` is imported inside the functions that need it, so ``shared`` imports
without it. Authentication is left to ``huggingface_hub`` (``HF_TOKEN`` or ``hf auth login``):
the hub modules never pass, print, log or write the token (:func:`token_status` says only
whether there is one).

The code is split by direction; this module is the entry point, import from here:

- :mod:`shared.hub_spec`: ``hf://`` specs, repo ids, :class:`HubError`;
- :mod:`shared.hub_download`: :func:`resolve_cache`, put together from
  :mod:`shared.hub_fetch` (``snapshot_download``, its errors as :class:`HubError`),
  :mod:`shared.hub_integrity` (sha256 checks of downloads, :class:`FreshDigests`) and
  :mod:`shared.hub_partial` (partial-download views);
- :mod:`shared.hub_upload`: :func:`push_cache`, with
  :mod:`shared.hub_push_plan` (:class:`PushPlan`, what a push may replace) and
  :mod:`shared.hub_repo_state` (what the target branch holds);
- :mod:`shared.hub_push_common`: what the cache push and the dictionary push
  (:mod:`train.hub_dictionary`) share: :func:`token_status`, the read-only look at the branch,
  push errors as :class:`HubError`, the CLI flags and output.
"""

from __future__ import annotations

from shared.hub_download import resolve_cache, resolve_cache_with_digests
from shared.hub_integrity import FreshDigests
from shared.hub_push_plan import PushPlan
from shared.hub_spec import HUB_PREFIX, HubError, is_hub_spec, parse_hub_spec
from shared.hub_push_common import token_status
from shared.hub_upload import push_cache

__all__ = [
    "HUB_PREFIX",
    "FreshDigests",
    "HubError",
    "PushPlan",
    "is_hub_spec",
    "parse_hub_spec",
    "push_cache",
    "resolve_cache",
    "resolve_cache_with_digests",
    "token_status",
]
