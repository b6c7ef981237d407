"""Downloading Hub caches: :func:`resolve_cache` turns ``hf://USER/NAME[@REV]`` into a local folder.

It downloads through ``huggingface_hub`` into its cache; ``max_shards=N`` fetches only the first
N shards and returns a partial view (below). Import it from :mod:`shared.hub`.

Partial downloads (``max_shards``): the Hub snapshot then lacks most shards its manifest
lists, so :func:`resolve_cache` returns a *view*: a small folder
``<repo folder in the HF cache>/crosscache-partial/<commit>-first<N>/`` holding a manifest that
lists only the first N shards (``n_rows`` corrected, ``partial_of`` recording the repo, commit
and the full ``n_shards`` / ``n_rows``), a card for it, and symlinks (hardlinks or copies where
symlinks are not allowed) to the downloaded token table, normalization tensors and shards.
The view is a complete, verifiable cache; it is rebuilt only if missing or damaged, and
removing the repo from the HF cache (``hf cache rm``) removes it too.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
from pathlib import Path

from shared.cache_format import (
    CARD_NAME,
    MANIFEST_NAME,
    NORMALIZATION_NAME,
    SHARD_DIR,
    TOKENS_NAME,
    CacheError,
    Manifest,
)
from shared.card import render_card
from shared.hub_spec import _COMMIT_RE, REPO_TYPE, HubError, is_hub_spec, parse_hub_spec

PARTIAL_DIR = "crosscache-partial"
"""Folder, inside a repo's folder of the HF cache, that holds partial-download views."""


def resolve_cache(spec: str | Path, *, max_shards: int | None = None) -> Path:
    """A local cache folder for ``spec``: a path as is, or ``hf://USER/NAME[@REV]`` downloaded.

    Downloads go through ``huggingface_hub.snapshot_download`` (repo type ``dataset``) into its
    cache (``HF_HUB_CACHE`` / ``HF_HOME``); with ``HF_HUB_OFFLINE=1`` a copy already there is
    used. Only the manifest, card, token table, normalization tensors and the listed shards
    are fetched. ``max_shards=N`` fetches only the first N shards (manifest order) and returns
    a view listing just those (see the module docstring); N >= the shard count is the whole cache.

    Raises ``ValueError`` for a bad spec or ``max_shards`` (and for ``max_shards`` with a local
    folder: it limits downloads only), :class:`HubError` when the repo, revision or files
    cannot be had, :class:`CacheError` when the repo holds no valid manifest.
    """
    if max_shards is not None and (isinstance(max_shards, bool) or not isinstance(max_shards, int) or max_shards < 1):
        raise ValueError(f"max_shards must be a whole number >= 1 (or None for all shards), got {max_shards!r}")
    if not is_hub_spec(spec):
        if max_shards is not None:
            raise ValueError(
                f"max_shards={max_shards} applies to Hub caches (hf://USER/NAME) only: it limits what is "
                f"downloaded; {spec} is a local folder and is used whole"
            )
        return Path(spec)
    repo, revision = parse_hub_spec(str(spec))
    first = _snapshot(spec, repo, revision, [MANIFEST_NAME])
    if not (first / MANIFEST_NAME).is_file():
        raise CacheError(
            f"{spec}: the dataset repo {repo} has no {MANIFEST_NAME}: it is not a crosscache cache, or its "
            "first push has not finished (the manifest is uploaded last); re-run `run_harvest.py push`"
        )
    manifest = Manifest.load(first)
    # Pin the commit the manifest came from, so a push landing meanwhile cannot mix two caches.
    commit = first.name if _COMMIT_RE.fullmatch(first.name) else revision
    n_all = len(manifest.shards)
    partial = max_shards is not None and max_shards < n_all
    shards = manifest.shards[:max_shards] if partial else manifest.shards
    patterns = [glob.escape(f) for f in (MANIFEST_NAME, CARD_NAME, TOKENS_NAME, NORMALIZATION_NAME)]
    # A push leaves exactly the manifest's shards under shards/, so the whole cache is "shards/*".
    patterns += [glob.escape(s.file) for s in shards] if partial else _shard_patterns([s.file for s in shards])
    snapshot = _snapshot(spec, repo, commit, patterns)
    needed = [TOKENS_NAME] + [s.file for s in shards]
    if manifest.normalization.get("file"):
        needed.append(str(manifest.normalization["file"]))
    missing = [f for f in needed if not (snapshot / f).is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise HubError(
            f"{spec}: {len(missing)} file(s) the manifest needs are neither in the local Hugging Face cache nor "
            f"downloadable: {shown}. {_offline_fix()}"
        )
    if not partial:
        return snapshot
    return _partial_view(snapshot, manifest, max_shards, repo, revision)


def _shard_patterns(files: list[str]) -> list[str]:
    """Patterns for ``files`` (all of a cache's shards): ``shards/*`` where they all live there.

    huggingface_hub tests every file against every pattern, so thousands of exact names would
    cost millions of matches; callers exclude unlisted files separately where it matters.
    """
    if all(f.startswith(f"{SHARD_DIR}/") for f in files):
        return [f"{SHARD_DIR}/*"]
    return [glob.escape(f) for f in files]


def _offline_fix() -> str:
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return (
            "Offline mode is on (HF_HUB_OFFLINE=1): unset it to download, or point HF_HUB_CACHE (or HF_HOME) "
            f"at a Hugging Face cache that holds the files (now {constants.HF_HUB_CACHE})."
        )
    return f"Check your connection to {constants.ENDPOINT} and run again (downloads resume)."


def _snapshot(spec: str, repo: str, revision: str | None, patterns: list[str]) -> Path:
    """``snapshot_download`` of ``patterns`` with its errors turned into :class:`HubError`."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ImportError(f"{spec}: Hub caches need huggingface_hub (pip install huggingface_hub)") from None
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(snapshot_download(repo, repo_type=REPO_TYPE, revision=revision, allow_patterns=patterns))
    except RevisionNotFoundError:
        raise HubError(
            f"{spec}: revision {revision!r} not found in dataset repo {repo}; see its branches and tags at "
            f"https://huggingface.co/datasets/{repo}/tree/main, or drop @{revision} for the main branch"
        ) from None
    except RepositoryNotFoundError:  # also gated repos
        raise HubError(
            f"{spec}: dataset repo {repo} not found on the Hub, or it is private/gated and no token with access "
            "was found. Check the name (caches are *dataset* repos) and log in (`hf auth login`, or set HF_TOKEN)"
        ) from None
    except LocalEntryNotFoundError:  # offline (or unreachable) and no (complete) copy cached
        at = f"@{revision}" if revision else ""
        raise HubError(
            f"{spec}: cannot download {repo}{at}: the Hub cannot be reached and the local Hugging Face cache "
            f"has no complete copy of it. {_offline_fix()}"
        ) from None
    except HfHubHTTPError as e:
        raise HubError(f"{spec}: the Hub refused the download ({type(e).__name__}: {e})") from None


def _link(target: Path, link: Path) -> None:
    """``link`` -> ``target``'s real file: a relative symlink, else a hardlink, else a copy."""
    real = Path(os.path.realpath(target))
    link.parent.mkdir(parents=True, exist_ok=True)
    try:
        link.symlink_to(os.path.relpath(real, link.parent))
    except OSError:
        try:
            os.link(real, link)
        except OSError:
            shutil.copyfile(real, link)


def _view_ok(view: Path, manifest_bytes: bytes, files: list[str]) -> bool:
    try:
        same = (view / MANIFEST_NAME).read_bytes() == manifest_bytes
    except OSError:
        return False
    return same and all((view / f).is_file() for f in files)


def _partial_view(snapshot: Path, manifest: Manifest, n: int, repo: str, revision: str | None) -> Path:
    """A cache folder listing the first ``n`` shards of ``snapshot`` (see the module docstring)."""
    commit = snapshot.name
    view = snapshot.parents[1] / PARTIAL_DIR / f"{commit}-first{n}"
    picked = manifest.shards[:n]
    obj = manifest.to_json()
    obj["shards"] = [s.to_json() for s in picked]
    obj["n_rows"] = sum(s.n_rows for s in picked)
    obj["partial_of"] = {
        "repo": repo,
        "revision": revision,
        "commit": commit,
        "n_shards": len(manifest.shards),
        "n_rows": manifest.n_rows,
    }
    data = json.dumps(obj, indent=1).encode() + b"\n"
    files = [TOKENS_NAME] + [s.file for s in picked]
    if (snapshot / NORMALIZATION_NAME).is_file():
        files.append(NORMALIZATION_NAME)
    if _view_ok(view, data, files):
        return view
    # Build beside the final name, then rename: readers never see a half-built view.
    tmp = view.with_name(f".{view.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for rel in files:
        _link(snapshot / rel, tmp / rel)
    (tmp / MANIFEST_NAME).write_bytes(data)
    (tmp / CARD_NAME).write_text(render_card(Manifest.from_json(obj)))
    if view.exists():  # damaged (a link to a deleted blob): its content is deterministic, rebuild it
        shutil.rmtree(view, ignore_errors=True)
    try:
        os.rename(tmp, view)
    except OSError:  # another process built it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
        if not _view_ok(view, data, files):
            raise HubError(f"could not build the partial view {view} of {repo}; remove it and run again") from None
    return view
