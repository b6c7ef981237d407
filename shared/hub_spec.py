"""Naming Hub caches: ``hf://USER/NAME[@REV]`` specs, dataset repo ids, and :class:`HubError`.

Both directions need these: :mod:`shared.hub_download` parses a spec into a repo and revision,
:mod:`shared.hub_upload` checks the repo id and branch it pushes to. They live here, not in
:mod:`shared.hub`, so that it can re-export both directions without an import cycle.
"""

from __future__ import annotations

import re

from shared.cache_format import CacheError

HUB_PREFIX = "hf://"
REPO_TYPE = "dataset"

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
