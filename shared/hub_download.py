"""Downloading Hub caches: :func:`resolve_cache` turns ``hf://USER/NAME[@REV]`` into a local folder.

It downloads through ``huggingface_hub`` into its cache; ``max_shards=N`` fetches only the first
N shards and returns a partial view. Import it from :mod:`shared.hub`.

What is fetched: the manifest, the card, the token table, the normalization side file if the
manifest lists one, and the shards the manifest lists; never other files a repo may hold.
Every downloaded file is then checked against its sha256, once.

This module puts the download together; each part lives in a module of its own:

- :mod:`shared.hub_fetch`: ``snapshot_download``, with its errors turned into :class:`HubError`;
- :mod:`shared.hub_integrity`: checking downloads against their sha256, remembering those that matched;
- :mod:`shared.hub_partial`: the partial-download views that ``max_shards`` returns.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path

from shared.cache_format import (
    CARD_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    SHARD_DIR,
    TOKENS_NAME,
    CacheError,
    Manifest,
)
from shared.hub_fetch import (
    _is_offline,
    _normalization_file,
    _offline_fix,
    _other_revisions,
    _repo_exists,
    _repo_files,
    _snapshot,
)
from shared.hub_integrity import FreshDigests, _check_downloads, _download_again
from shared.hub_partial import _partial_view
from shared.hub_spec import _COMMIT_RE, HubError, is_hub_spec, parse_hub_spec, shown_files
from shared.tokenizer_file import listed_tokenizer_file


def resolve_cache(spec: str | Path, *, max_shards: int | None = None) -> Path:
    """A local cache folder for ``spec``: a path as is, or ``hf://USER/NAME[@REV]`` downloaded.

    Downloads go through ``huggingface_hub.snapshot_download`` (repo type ``dataset``) into its
    cache (``HF_HUB_CACHE`` / ``HF_HOME``); with ``HF_HUB_OFFLINE=1`` a copy already there is
    used. Only the manifest, card, token table, the normalization tensors the manifest lists and
    the shards it lists are fetched. ``max_shards=N`` fetches only the first N shards (manifest
    order) and returns a view listing just those (see :mod:`shared.hub_partial`); N >= the shard
    count is the whole cache. Every downloaded file is checked against its sha256 once (see
    :mod:`shared.hub_integrity`); a damaged one is downloaded again.

    Raises ``ValueError`` for a bad spec or ``max_shards`` (and for ``max_shards`` with a local
    folder: it limits downloads only), :class:`HubError` when the repo, revision or files
    cannot be had or a file stays damaged, :class:`CacheError` when the repo holds no valid
    manifest.
    """
    return resolve_cache_with_digests(spec, max_shards=max_shards)[0]


def resolve_cache_with_digests(spec: str | Path, *, max_shards: int | None = None) -> tuple[Path, FreshDigests]:
    """:func:`resolve_cache`, and the digests of the files this call hashed (:class:`FreshDigests`; empty for
    a local folder, or when every file had been checked by an earlier call)."""
    if max_shards is not None and (isinstance(max_shards, bool) or not isinstance(max_shards, int) or max_shards < 1):
        raise ValueError(f"max_shards must be a whole number >= 1 (or None for all shards), got {max_shards!r}")
    if not is_hub_spec(spec):
        if max_shards is not None:
            raise ValueError(
                f"max_shards={max_shards} applies to Hub caches (hf://USER/NAME) only: it limits what is "
                f"downloaded; {spec} is a local folder and is used whole"
            )
        return Path(spec), FreshDigests()
    spec = str(spec)
    repo, revision = parse_hub_spec(spec)
    try:
        first = _snapshot(spec, repo, revision, [MANIFEST_NAME])
    except HubError as e:
        if not _repo_exists(repo, "dataset") and _repo_exists(repo, "model"):  # a hint; the error stands
            raise HubError(
                f"{e} (note: {repo} is a model repo (a crosscache dictionary?), not a dataset repo: crosscache "
                f"pushes caches to dataset repos and dictionaries to model repos; to use it as a dictionary: "
                f"`run_train.py export-saelens {spec} --out DIR` or train.load_dictionary({spec!r}))"
            ) from None
        raise
    if not (first / MANIFEST_NAME).is_file():
        raise CacheError(
            f"{spec}: the dataset repo {repo} has no {MANIFEST_NAME}: it is not a crosscache cache, or a push to "
            "it has not finished (the manifest goes up last; a push replacing another cache deletes the old one "
            "first); re-run that `run_harvest.py push`"
        )
    # Pin the commit the manifest came from, so a push landing meanwhile cannot mix two caches.
    commit = first.name if _COMMIT_RE.fullmatch(first.name) else revision
    manifest = _hub_manifest(spec, repo, commit, first)
    n_all = len(manifest.shards)
    partial = max_shards is not None and max_shards < n_all
    shards = manifest.shards[:max_shards] if partial else manifest.shards
    norm_file = _normalization_file(manifest)
    tok_file = listed_tokenizer_file(manifest.tokenizer)  # the cache's own tokenizer.json, when it lists one
    side = [TOKENS_NAME] + ([norm_file] if norm_file else []) + ([tok_file] if tok_file else [])
    shard_files = [s.file for s in shards]
    patterns = [glob.escape(f) for f in (MANIFEST_NAME, CARD_NAME, *side)]
    ignore = None
    if partial:
        patterns += [glob.escape(f) for f in shard_files]
    else:
        # A push leaves exactly the manifest's shards under shards/, but a repo may hold more (an
        # upload by other means, a stray): "shards/*" minus the files the manifest does not list.
        shard_patterns = _shard_patterns(shard_files)
        patterns += shard_patterns
        ignore = _unlisted_patterns(repo, commit, shard_patterns, {MANIFEST_NAME, CARD_NAME, *side, *shard_files})
    snapshot = _snapshot(spec, repo, commit, patterns, ignore=ignore)
    needed = side + shard_files
    missing = [f for f in needed if not (snapshot / f).is_file()]
    if missing:
        listing = None if _is_offline() or commit is None else _repo_files(repo, commit)
        absent = [f for f in missing if listing is not None and f not in listing]
        if absent:  # not a connection problem: running again cannot help
            raise HubError(
                f"{spec}: the repo (commit {commit}) lacks {len(absent)} file(s) its manifest lists: "
                f"{shown_files(absent)}. The cache on the Hub is incomplete: ask the repo's owner to push it "
                f"again (`python run_harvest.py push`), {_other_revisions(repo)}"
            )
        raise HubError(
            f"{spec}: {len(missing)} file(s) the manifest needs are neither in the local Hugging Face cache nor "
            f"downloadable: {shown_files(missing)}. {_offline_fix()}"
        )
    fresh = _check_downloads(spec, repo, commit, snapshot, manifest, shards)
    if not partial:
        return snapshot, fresh
    return _partial_view(snapshot, manifest, max_shards, repo, revision), fresh


def _shard_patterns(files: list[str]) -> list[str]:
    """Patterns for ``files`` (all of a cache's shards): ``shards/*`` where they all live there.

    huggingface_hub tests every file against every pattern, so thousands of exact names would
    cost millions of matches; callers exclude unlisted files separately where it matters.
    """
    if all(f.startswith(f"{SHARD_DIR}/") for f in files):
        return [f"{SHARD_DIR}/*"]
    return [glob.escape(f) for f in files]


def _unlisted_patterns(repo: str, commit: str | None, shard_patterns: list[str], wanted: set[str]) -> list[str] | None:
    """``ignore_patterns`` for the files under ``shards/`` that the manifest does not list.

    Only needed where ``shard_patterns`` is the ``shards/*`` glob; None when there are none, or
    when the repo's file list cannot be had (then ``shards/*`` alone is used, as before).
    """
    if shard_patterns != [f"{SHARD_DIR}/*"] or commit is None:
        return None
    files = _repo_files(repo, commit)
    if files is None:
        return None
    unlisted = [glob.escape(f) for f in files if f.startswith(f"{SHARD_DIR}/") and f not in wanted]
    return unlisted or None


# --------------------------------------------------------------------------------------------
# the manifest of someone else's cache


def _hub_manifest(spec: str, repo: str, commit: str | None, folder: Path) -> Manifest:
    """The repo's manifest, read from ``folder`` (its snapshot), with errors that name ``spec``.

    The cache is someone else's: the advice is to upgrade crosscache, ask the repo's owner or use
    another revision, not to re-harvest. A manifest that does not read is downloaded once more
    first: the damage may be in the local copy only.
    """
    refetched = False
    while True:
        try:
            obj = json.loads((folder / MANIFEST_NAME).read_bytes())
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            problem = f"it is not valid JSON ({e})"
        else:
            version = obj.get("format_version") if isinstance(obj, dict) else None
            if version is not None and version != FORMAT_VERSION:
                raise CacheError(_format_message(spec, repo, version))
            try:
                return Manifest.from_json(obj, where=MANIFEST_NAME)
            except CacheError as e:
                problem = str(e)
        if refetched or _is_offline():
            break
        _download_again(spec, repo, commit, folder, [MANIFEST_NAME])
        refetched = True
    at = f" (commit {commit})" if commit else ""
    if refetched:
        where = "a fresh download of it is no better, so the copy on the Hub is damaged"
    else:  # offline: the local copy may be what is damaged
        where = ("if only the local copy is damaged, run again without HF_HUB_OFFLINE=1 to download it anew; "
                 "otherwise the copy on the Hub is damaged")
    raise CacheError(
        f"{spec}: the repo's {MANIFEST_NAME}{at} is not a valid crosscache manifest: {problem}. {where}: ask the "
        f"repo's owner to push the cache again (`python run_harvest.py push`), {_other_revisions(repo)}"
    )


def _format_message(spec: str, repo: str, version: object) -> str:
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        return (
            f"{spec}: this cache is in format v{version}, newer than this crosscache reads (v{FORMAT_VERSION}): "
            f"upgrade crosscache to read it, {_other_revisions(repo, f' that holds a v{FORMAT_VERSION} cache')}"
        )
    return (
        f"{spec}: this cache's manifest has format_version {version!r}, which this crosscache does not read (it "
        f"reads v{FORMAT_VERSION}): ask the repo's owner to push it in format v{FORMAT_VERSION}, "
        f"{_other_revisions(repo)}"
    )
