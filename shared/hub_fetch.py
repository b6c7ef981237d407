"""Fetching a Hub dataset repo's files into the local Hugging Face cache: the download direction's Hub access.

:func:`_snapshot` is ``huggingface_hub.snapshot_download`` with what it raises turned into :class:`HubError`,
a message that names the fix (:func:`_hub_errors`: no such repo or revision, no access, the Hub busy or out
of reach, offline with no copy cached). :func:`_repo_files` lists a repo's files, :func:`_normalization_file`
names the side file a manifest adds to what is fetched, and :func:`_offline_fix` and :func:`_other_revisions`
word the advice that download errors end with. :func:`_snapshot`, :func:`_hub_errors` and
:func:`_other_revisions` take ``repo_type``: ``dataset`` (the default) for caches, ``model`` for the
dictionaries of :mod:`train.hub_dictionary_fetch`; it also words their messages.

:mod:`shared.hub_download` fetches a cache through here, and :mod:`shared.hub_integrity` a damaged
file once more.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from shared.cache_format import NORMALIZATION_NAME, Manifest
from shared.hub_spec import REPO_TYPE, HubError, _network_cause


def _normalization_file(manifest: Manifest) -> str | None:
    """The normalization side file a ``mean_std`` cache reads: the one its manifest lists, else
    ``normalization.safetensors`` (as :meth:`Normalization.from_manifest` falls back); None for the others."""
    name = manifest.normalization.get("file")
    if name:
        return str(name)
    return NORMALIZATION_NAME if manifest.normalization.get("method") == "mean_std" else None


def _repo_files(repo: str, commit: str) -> list[str] | None:
    """The repo's files at ``commit``: the listing ``snapshot_download`` keeps on disk (huggingface_hub
    2.x; it lists the whole repo even for one file), else asked of the Hub; None if neither answers."""
    try:
        from huggingface_hub import get_cached_repo_tree
        from huggingface_hub.errors import CachedRepoTreeNotFoundError
    except ImportError:  # huggingface_hub 1.x: no listing on disk
        pass
    else:
        try:
            return [f.path for f in get_cached_repo_tree(repo, repo_type=REPO_TYPE, revision=commit)]
        except CachedRepoTreeNotFoundError:
            pass
    from huggingface_hub import HfApi, constants

    if constants.is_offline_mode():  # offline nothing is downloaded, so nothing unlisted either
        return None
    try:
        return list(HfApi().list_repo_files(repo, repo_type=REPO_TYPE, revision=commit))
    except Exception:  # noqa: BLE001 - only an optimisation: the download that follows reports real errors
        return None


def _repo_url(repo: str, repo_type: str = REPO_TYPE) -> str:
    """The repo's page on the Hub (dataset repos live under ``/datasets/``, model repos at the top)."""
    return f"https://huggingface.co/{'datasets/' if repo_type == 'dataset' else ''}{repo}"


def _offline_fix() -> str:
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return (
            "Offline mode is on (HF_HUB_OFFLINE=1): unset it to download, or point HF_HUB_CACHE (or HF_HOME) "
            f"at a Hugging Face cache that holds the files (now {constants.HF_HUB_CACHE})."
        )
    # huggingface_hub keeps each finished file, but writes a download to a temporary file that it
    # deletes when the download fails: a file cut off mid-way starts from zero on the next run.
    return (
        f"Check your connection to {constants.ENDPOINT} and run the same command again: files already "
        "downloaded are kept, a file cut off mid-way is downloaded again from its start."
    )


def _repo_exists(repo: str, repo_type: str) -> bool:
    """Whether a repo of this name and type (``dataset`` or ``model``) exists: in the local HF cache when
    offline, else asked of the Hub. Only to word an error better: False when it cannot tell."""
    from huggingface_hub import HfApi, constants

    prefix = "datasets" if repo_type == "dataset" else "models"
    if (Path(constants.HF_HUB_CACHE) / f"{prefix}--{repo.replace('/', '--')}").is_dir():
        return True
    if _is_offline():
        return False
    try:
        return bool(HfApi().repo_exists(repo, repo_type=repo_type))
    except Exception:  # noqa: BLE001 - the original error stands otherwise
        return False


def _is_offline() -> bool:
    from huggingface_hub import constants

    return constants.is_offline_mode()


@contextmanager
def _hub_errors(spec: str, repo: str, revision: str | None, *, repo_type: str = REPO_TYPE) -> Iterator[None]:
    """Turn what ``huggingface_hub`` raises into :class:`HubError` (a message naming the fix)."""
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f"@{revision}" if revision else ""
    kind = f"{repo_type} repo"
    holds = "caches are *dataset* repos" if repo_type == "dataset" else "dictionaries are *model* repos"
    try:
        yield
    except RevisionNotFoundError:
        raise HubError(
            f"{spec}: revision {revision!r} not found in {kind} {repo}; see its branches and tags at "
            f"{_repo_url(repo, repo_type)}/tree/main, or drop @{revision} for the main branch"
        ) from None
    except RepositoryNotFoundError:  # also gated repos
        raise HubError(
            f"{spec}: {kind} {repo} not found on the Hub, or it is private/gated and no token with access "
            f"was found. Check the name ({holds}) and log in (`hf auth login`, or set HF_TOKEN)"
        ) from None
    except LocalEntryNotFoundError:  # offline (or unreachable) and no (complete) copy cached
        raise HubError(
            f"{spec}: cannot download {repo}{at}: the Hub cannot be reached and the local Hugging Face cache "
            f"has no complete copy of it. {_offline_fix()}"
        ) from None
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status == 429 or (isinstance(status, int) and status >= 500):  # busy or down: worth a retry
            raise HubError(
                f"{spec}: the Hub could not serve {repo}{at} right now (HTTP {status}). {_offline_fix()}"
            ) from None
        raise HubError(f"{spec}: the Hub refused the download ({type(e).__name__}: {e})") from None
    except Exception as e:
        cause = _network_cause(e)
        if cause is None:
            raise
        detail = str(cause) if len(str(cause)) <= 200 else str(cause)[:200] + "..."
        raise HubError(
            f"{spec}: downloading {repo}{at} failed: the Hub could not be reached or the connection to it was "
            f"lost ({type(cause).__name__}: {detail}). {_offline_fix()}"
        ) from None


def _snapshot(
    spec: str,
    repo: str,
    revision: str | None,
    patterns: list[str],
    *,
    ignore: list[str] | None = None,
    force: bool = False,
    repo_type: str = REPO_TYPE,
) -> Path:
    """``snapshot_download`` of ``patterns`` (less ``ignore``; ``force``: fetch again even if cached) from a
    repo of ``repo_type``, with its errors turned into :class:`HubError`."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ImportError(f"{spec}: Hub caches need huggingface_hub (pip install huggingface_hub)") from None
    with _hub_errors(spec, repo, revision, repo_type=repo_type):
        return Path(snapshot_download(repo, repo_type=repo_type, revision=revision, allow_patterns=patterns,
                                      ignore_patterns=ignore, force_download=force))


def _other_revisions(repo: str, holding: str = "", repo_type: str = REPO_TYPE) -> str:
    return (f"or use another revision{holding} (hf://{repo}@REVISION; its branches and tags: "
            f"{_repo_url(repo, repo_type)}/tree/main)")
