"""Naming Hub caches: ``hf://USER/NAME[@REV]`` specs, dataset repo ids, and :class:`HubError`.

Both directions need these: :mod:`shared.hub_download` parses a spec into a repo and revision,
:mod:`shared.hub_upload` checks the repo id and branch it pushes to, and both tell a lost connection
from other errors (:func:`_network_cause`). They live here, not in :mod:`shared.hub`, so that it can
re-export both directions without an import cycle.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from shared.cache_format import CacheError

HUB_PREFIX = "hf://"
REPO_TYPE = "dataset"
PARTIAL_DIR = "crosscache-partial"  # beside snapshots/ in huggingface_hub's folder for a repo (shared.hub_partial)

_NAME = r"[A-Za-z0-9](?:[\w.\-]{0,94}[A-Za-z0-9])?"
_REPO_RE = re.compile(rf"{_NAME}/{_NAME}")
_SPEC_RE = re.compile(rf"hf://(?:datasets/)?(?P<repo>{_NAME}/{_NAME})(?:@(?P<revision>[^@\s]+))?")
_COMMIT_RE = re.compile(r"[0-9a-f]{40}")
_SPEC_HELP = "expected hf://USER/NAME or hf://USER/NAME@REVISION (a dataset repo; a branch, tag or commit)"


class HubError(CacheError):
    """A Hub cache could not be downloaded or uploaded; the message says why and the fix."""


def shown_files(files: list[str], limit: int = 5) -> str:
    """The first ``limit`` names, comma-separated, and how many more (for messages)."""
    return ", ".join(files[:limit]) + (f" and {len(files) - limit} more" if len(files) > limit else "")


def is_hub_spec(spec: object) -> bool:
    """Whether ``spec`` names a Hub cache (a ``str`` starting with ``hf://``)."""
    return isinstance(spec, str) and spec.startswith(HUB_PREFIX)


_REPO_HELP = "USER/NAME: letters, digits, '-', '_', '.', not starting or ending with '-' or '.', no '--' or '..'"


def _is_repo_id(repo: str) -> bool:
    return bool(_REPO_RE.fullmatch(repo)) and "--" not in repo and ".." not in repo


def parse_hub_spec(spec: str) -> tuple[str, str | None]:
    """``hf://USER/NAME[@REV]`` -> ``(repo_id, revision or None)``; ``hf://datasets/USER/NAME`` also works."""
    match = _SPEC_RE.fullmatch(spec)
    if match is None or not _is_repo_id(match["repo"]):
        raise ValueError(f"bad Hub cache {spec!r}: {_SPEC_HELP} ({_REPO_HELP}), e.g. hf://alice/toy-diff@v1")
    return match["repo"], match["revision"]


# Exceptions of these HTTP stacks (huggingface_hub 1.x: httpx; 2.x: httpx2; older: requests and
# urllib3) are connection failures, except the few that report a bad URL or an HTTP status.
_NETWORK_FAMILIES = frozenset({"httpx", "httpx2", "httpcore", "httpcore2", "h11", "requests", "urllib3"})
_NOT_NETWORK = frozenset({"HTTPStatusError", "HTTPError", "InvalidURL", "UnsupportedProtocol", "MissingSchema",
                          "InvalidSchema", "InvalidHeader", "LocationParseError", "CookieConflict"})


def _network_cause(error: BaseException) -> BaseException | None:
    """The connection failure behind ``error`` (itself, or in its ``__cause__``/``__context__`` chain), or None."""
    seen: set[int] = set()
    todo = [error]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        family = type(e).__module__.split(".")[0]
        if isinstance(e, (ConnectionError, TimeoutError)) or (
            family in _NETWORK_FAMILIES and type(e).__name__ not in _NOT_NETWORK
        ):
            return e
        # huggingface_hub's own check that a download got all its bytes ("usually due to network issues").
        if isinstance(e, OSError) and str(e).startswith("Consistency check failed"):
            return e
        todo += [c for c in (e.__cause__, e.__context__) if c is not None]
    return None


# huggingface_hub keeps a dataset repo USER/NAME under <hub cache>/datasets--USER--NAME/; a download is
# snapshots/<commit>/ there, and a ``max_shards`` view (shared.hub_partial) is crosscache-partial/<commit>-firstN/.
_DOWNLOAD_RE = re.compile(r"datasets--(?P<user>[^/]+?)--(?P<name>[^/]+)")
_VIEW_RE = re.compile(r"(?P<commit>[0-9a-f]{40})-first(?P<n>[1-9][0-9]*)")


def hub_download_of(path: str | os.PathLike[str]) -> tuple[str, int | None] | None:
    """The ``hf://USER/NAME@COMMIT`` spec a file or folder inside a Hub cache download belongs to, and the
    shard count of a ``max_shards`` view (None for a whole download); None for a path outside one.

    A path is looked at, not followed: a view's files link into the snapshot, and its own name is the
    one to report.
    """
    parts = Path(os.path.abspath(path)).parts
    for i in range(len(parts) - 2):
        repo = _DOWNLOAD_RE.fullmatch(parts[i])
        if repo is None:
            continue
        spec = f"{HUB_PREFIX}{repo['user']}/{repo['name']}"
        if parts[i + 1] == "snapshots" and _COMMIT_RE.fullmatch(parts[i + 2]):
            return f"{spec}@{parts[i + 2]}", None
        view = _VIEW_RE.fullmatch(parts[i + 2])
        if parts[i + 1] == PARTIAL_DIR and view is not None:
            return f"{spec}@{view['commit']}", int(view["n"])
    return None


def rewrite_advice(path: str | os.PathLike[str], local: str | None = "re-run the harvest to rewrite it") -> str | None:
    """How to get a cache file at ``path`` back: for a file of a Hub cache download, open the ``hf://`` spec
    again (which downloads what is missing or damaged); else ``local``, the caller's advice for a harvested
    cache (None: the caller has none)."""
    origin = hub_download_of(path)
    if origin is None:
        return local
    spec, n = origin
    if n is None:
        return (f"it is part of a download of {spec} from the Hugging Face Hub, not a harvest: open {spec} again "
                f"(e.g. `python run_harvest.py verify {spec}`), which downloads what is missing or damaged")
    return (f"it is part of a download of the first {n} shards of {spec} from the Hugging Face Hub, not a harvest: "
            f"run the command again with {spec} and --max-shards {n} (max_shards={n} in Python) rather than this "
            "folder; that downloads what is missing or damaged")
