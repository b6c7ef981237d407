"""Reading dictionaries from the Hub: ``hf://USER/NAME[@REV]`` -> the checked ``config.json`` and weights.

:func:`train.export.load_dictionary` and :func:`train.export.load_metadata` call :func:`fetch_dictionary`
for an ``hf://`` spec. It downloads from the *model* repo (dictionaries live there; caches in dataset
repos) through ``huggingface_hub`` into its cache (``HF_HUB_CACHE`` / ``HF_HOME``; with
``HF_HUB_OFFLINE=1`` the copy already there), and only ``config.json`` and ``model.safetensors``:
never the card, the curves or the analysis report a push adds.

``config.json`` is fetched first and its commit pinned, so a push landing meanwhile cannot pair one
dictionary's config with another's weights. The weights are then checked against the sha256 the
config records: ``huggingface_hub`` checks only a file's size, and would link a damaged blob again
for good. A damaged copy is removed from the Hugging Face cache (blob included) and downloaded once
more, as :mod:`shared.hub_integrity` does for caches (its helpers do it here too); offline it is
removed and the error says to run again online.

A spec naming a dataset repo (a cache), or a model repo that is not a crosscache dictionary (a
transformers model), is refused with a message saying so.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.hub_fetch import _is_offline, _offline_fix, _other_revisions, _repo_exists, _snapshot
from shared.hub_integrity import _download_again, _lfs_sha256
from shared.hub_spec import _COMMIT_RE, HUB_PREFIX, HubError, parse_hub_spec

__all__ = ["FetchedDictionary", "fetch_dictionary", "parse_dictionary_spec"]

REPO_TYPE = "model"
"""Dictionaries are pushed to (and read from) Hugging Face *model* repos."""

# The names train.export writes (repeated, not imported: train.export imports this module lazily).
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
EXPORT_FORMAT = "crosscache.dictionary/1"
_FORMAT_FAMILY = "crosscache.dictionary/"


@dataclass
class FetchedDictionary:
    """A dictionary downloaded from the Hub: its snapshot folder, parsed config and (checked) weights."""

    folder: Path
    """The snapshot folder in the Hugging Face cache (``.../models--USER--NAME/snapshots/<commit>``)."""
    config: dict[str, Any]
    """``config.json`` as a dict (``format``, ``config``, ``metadata``, ``weights_sha256``)."""
    weights: bytes | None
    """``model.safetensors``, whose sha256 matched the config's; None when only the config was asked for."""
    repo: str
    commit: str | None
    """The commit the files came from (None if ``huggingface_hub`` did not name it)."""


def parse_dictionary_spec(spec: str) -> tuple[str, str | None]:
    """``hf://USER/NAME[@REV]`` -> ``(repo_id, revision or None)`` for a dictionary (a *model* repo).

    ``hf://datasets/...`` names a dataset repo, where caches live: refused, saying so.
    """
    if spec.startswith(f"{HUB_PREFIX}datasets/"):
        raise ValueError(f"{spec} names a dataset repo, where crosscache keeps caches; dictionaries are in model "
                         f"repos: hf://USER/NAME[@REV] (open a cache with shared.open_cache or --cache {spec})")
    try:
        return parse_hub_spec(spec)
    except ValueError:
        raise ValueError(f"bad Hub dictionary {spec!r}: expected hf://USER/NAME or hf://USER/NAME@REVISION (a model "
                         "repo that `run_train.py push` wrote; a branch, tag or commit), e.g. hf://alice/toy-diff-cc"
                         ) from None


def fetch_dictionary(spec: str, *, weights: bool = True) -> FetchedDictionary:
    """Download (or find in the Hugging Face cache) the dictionary ``spec`` names and check it.

    ``weights=False`` fetches ``config.json`` only (enough for the metadata). Raises ``ValueError``
    for a bad spec, :class:`~shared.hub_spec.HubError` when the repo cannot be had, is a dataset repo
    or not a crosscache dictionary, or its weights stay damaged after one fresh download.
    """
    repo, revision = parse_dictionary_spec(spec)
    try:
        first = _snapshot(spec, repo, revision, [CONFIG_NAME], repo_type=REPO_TYPE)
    except HubError as e:
        if not _repo_exists(repo, "model") and _repo_exists(repo, "dataset"):  # a hint; the error stands
            raise HubError(f"{e} (note: {_dataset_message(spec, repo)})") from None
        raise e from None
    # Pin the commit config.json came from, so the weights are that config's.
    commit = first.name if _COMMIT_RE.fullmatch(first.name) else revision
    config = _read_config(spec, repo, commit, first)
    if not weights:
        return FetchedDictionary(first, config, None, repo, commit)
    folder = _snapshot(spec, repo, commit, [CONFIG_NAME, WEIGHTS_NAME], repo_type=REPO_TYPE)
    blob = _checked_weights(spec, repo, commit, folder, str(config.get("weights_sha256")))
    return FetchedDictionary(folder, config, blob, repo, commit)


def _dataset_message(spec: str, repo: str) -> str:
    return (f"{spec}: {repo} is a dataset repo (a crosscache cache?), not a model repo: crosscache pushes "
            f"dictionaries to model repos (`python run_train.py push RUN --repo USER/NAME`) and caches to dataset "
            f"repos. To read it as a cache: shared.open_cache({spec!r}) or `run_train.py --cache {spec}`")


def _read_config(spec: str, repo: str, commit: str | None, folder: Path) -> dict[str, Any]:
    """The repo's ``config.json``, checked to be a crosscache dictionary's; a copy that does not parse
    is downloaded once more first (the damage may be in the local copy only)."""
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise HubError(
            f"{spec}: the model repo {repo} has no {CONFIG_NAME}: it is not a crosscache dictionary (those hold "
            f"{CONFIG_NAME} and {WEIGHTS_NAME}, written by `python run_train.py push`)"
            + ("" if "@" in spec else f"; one pushed with --revision is on that branch: hf://{repo}@BRANCH")
            + "." + (f" {hint}" if (hint := _offline_hint()) else "")
        )
    refetched = False
    while True:
        try:
            data = json.loads(path.read_bytes())
            break
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            if refetched or _is_offline():
                where = ("a fresh download is no better: the copy on the Hub is damaged" if refetched else
                         "if only the local copy is damaged, run again without HF_HUB_OFFLINE=1 to download it anew")
                raise HubError(f"{spec}: the repo's {CONFIG_NAME} is not valid JSON ({e}); {where}. Ask the repo's "
                               f"owner to push the dictionary again, {_other_revisions(repo, '', REPO_TYPE)}") from None
            _download_again(spec, repo, commit, folder, [CONFIG_NAME], repo_type=REPO_TYPE)
            refetched = True
    fmt = data.get("format") if isinstance(data, dict) else None
    if fmt == EXPORT_FORMAT:
        return data
    if isinstance(fmt, str) and fmt.startswith(_FORMAT_FAMILY):
        raise HubError(f"{spec}: this dictionary is in format {fmt!r}; this crosscache reads {EXPORT_FORMAT!r}: "
                       f"upgrade crosscache to read it, {_other_revisions(repo, '', REPO_TYPE)}")
    kind = ""
    if isinstance(data, dict) and (data.get("model_type") or data.get("architectures")):
        kind = f" (model_type {data.get('model_type')!r}: a transformers model?)"
    raise HubError(f"{spec}: the model repo {repo} is not a crosscache dictionary: its {CONFIG_NAME} has format "
                   f"{fmt!r}, expected {EXPORT_FORMAT!r}{kind}. Dictionaries are pushed with `python run_train.py "
                   "push RUN --repo USER/NAME`")


def _offline_hint() -> str:
    return _offline_fix() if _is_offline() else ""


def _sha256_of(path: Path) -> tuple[bytes | None, str | None]:
    """The file's bytes and their sha256 (None, None: missing or unreadable)."""
    try:
        data = path.read_bytes()
    except OSError:
        return None, None
    return data, hashlib.sha256(data).hexdigest()


def _checked_weights(spec: str, repo: str, commit: str | None, folder: Path, want: str) -> bytes:
    """``model.safetensors`` of ``folder`` once its sha256 is ``want``; a damaged copy is removed from the
    HF cache and downloaded once more (offline: removed, and the error says to run again online)."""
    path = folder / WEIGHTS_NAME
    data, got = _sha256_of(path)
    if got == want and data is not None:
        return data
    if not path.is_file() and _is_offline():
        raise HubError(f"{spec}: {WEIGHTS_NAME} is not in the local Hugging Face cache (only {CONFIG_NAME} is). "
                       f"{_offline_fix()}")
    _download_again(spec, repo, commit, folder, [WEIGHTS_NAME], repo_type=REPO_TYPE)
    data, got = _sha256_of(path)
    if got == want and data is not None:
        return data
    if got is None:
        problem = "it could not be downloaded again (the Hub may be unreachable)"
    elif got == _lfs_sha256(path):
        problem = (f"the Hub holds weights with sha256 {got[:12]}... (its own checksum agrees), the config records "
                   f"{want[:12]}...: the repo's files do not belong together")
    else:
        problem = f"sha256 {got[:12]}..., expected {want[:12]}..., for the second download too"
    raise HubError(
        f"{spec}: {WEIGHTS_NAME} fails its sha256 check against {CONFIG_NAME} even after downloading it again: "
        f"{problem}. If the repo does not match its config, ask the repo's owner to push the dictionary again "
        f"(`python run_train.py push`), {_other_revisions(repo, '', REPO_TYPE)}; otherwise the data is damaged on "
        "its way (a proxy, a failing disk): run the same command again later or from another network."
    )
