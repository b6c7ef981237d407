"""What the branch a push targets holds: :class:`RepoContents`, looked at (read only) before anything goes up.

Nothing, this same cache (a re-push), or the data files of an interrupted push without a manifest:
the push goes ahead. A different crosscache cache, or files that are not a cache (a dataset's own
``README.md``, ``data.csv``): it is refused, naming what is there, unless ``force`` (``--force``)
says to replace it (:func:`shared.hub_push_plan._refuse_unless_allowed`). A branch the push creates
starts as a copy of ``main``; what it inherits is replaced on the branch only, so that needs no ``force``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from shared.cache_format import (
    CARD_NAME,
    MANIFEST_NAME,
    NORMALIZATION_NAME,
    SHARD_DIR,
    TOKENIZER_NAME,
    TOKENS_NAME,
    CacheError,
    Manifest,
)
from shared.hub_push_common import GITATTRIBUTES, list_branch_files, read_repo_json
from shared.hub_spec import REPO_TYPE, shown_files

"""Created by the Hub with every repo; a push keeps it and never counts it as content."""

# Data files a crosscache push uploads before its manifest: what an interrupted push leaves.
_SHARD_RE = re.compile(rf"{SHARD_DIR}/acts(?:-rank\d+)?-\d+\.safetensors")


def _is_cache_data(path: str) -> bool:
    return path in (TOKENS_NAME, NORMALIZATION_NAME) or bool(_SHARD_RE.fullmatch(path))


def _describe(manifest: Manifest) -> str:
    """A one-line identification of a cache: models, hooks, rows, shards."""
    hooks = ", ".join(manifest.hooks[:3]) + (f" and {len(manifest.hooks) - 3} more" if len(manifest.hooks) > 3 else "")
    return (f"{', '.join(manifest.model_names)} @ {hooks}; {manifest.n_rows:,} rows in "
            f"{len(manifest.shards)} shard{'s' * (len(manifest.shards) != 1)}")


def _differences(held: Manifest, ours: Manifest) -> str:
    """What tells two caches with the same models, hooks and rows apart (``"; they differ in ..."``), or ""
    when :func:`_describe` already does."""
    if (held.model_names, held.hooks, held.n_rows, len(held.shards)) != (
            ours.model_names, ours.hooks, ours.n_rows, len(ours.shards)):
        return ""
    norm_a, norm_b = held.normalization, ours.normalization
    seen = [
        ("normalization", f"{norm_a.get('method')} vs {norm_b.get('method')}" if norm_a.get("method") !=
         norm_b.get("method") else "its factors" if norm_a != norm_b else None),
        ("storage dtype", f"{held.dtype} vs {ours.dtype}" if held.dtype != ours.dtype else None),
        ("dataset", "" if held.dataset != ours.dataset else None),
        ("context size", f"{held.context_size} vs {ours.context_size}"
         if held.context_size != ours.context_size else None),
    ]
    parts = [name + (f" ({what})" if what else "") for name, what in seen if what is not None]
    n_shards = sum(a.sha256.lower() != b.sha256.lower() or a.file != b.file for a, b in zip(held.shards, ours.shards))
    if n_shards:
        parts.append(f"the contents of {n_shards} of {len(ours.shards)} shards (sha256)")
    return f"; they differ in {', '.join(parts)}" if parts else ""


@dataclass
class RepoContents:
    """What the target branch of a push held when :func:`push_cache` looked, and what it means."""

    state: str
    """``missing`` (no such repo: it is created), ``empty`` (nothing but ``.gitattributes``),
    ``same`` (a manifest of this same cache: a re-push), ``unfinished`` (cache data files but no
    manifest: an interrupted push, which this one completes), ``other`` (a different crosscache
    cache) or ``foreign`` (files that are not a crosscache cache, or an unreadable manifest)."""
    files: list[str] = field(default_factory=list)
    """Every file of the branch (for a ``new_branch``: of ``main``, which it is created from)."""
    manifest: Manifest | None = None
    """The crosscache manifest found there (``same`` and ``other``)."""
    new_branch: bool = False
    """The branch does not exist yet: the push creates it from ``main`` and replaces what it
    inherits there, on the new branch only (``main`` is not changed), so no ``force`` is needed."""
    problem: str | None = None
    """Why a ``manifest.json`` found there is not a crosscache manifest (state ``foreign``)."""
    private: bool | None = None
    """Whether the existing repo is private, looked up for a ``--private`` push only (None: not looked up,
    or the Hub did not say)."""

    @property
    def replaces(self) -> bool:
        """Whether the push replaces content that is not this cache (``other`` or ``foreign``)."""
        return self.state in ("other", "foreign")

    @property
    def foreign_files(self) -> list[str]:
        """Files that belong to no crosscache cache (everything but the cache's own names)."""
        own = {GITATTRIBUTES, MANIFEST_NAME, CARD_NAME, TOKENIZER_NAME}
        return [f for f in self.files if f not in own and not _is_cache_data(f)]

    @property
    def files_shown(self) -> str:
        """The branch's files for a message: those of no crosscache cache first, a few at most."""
        foreign = self.foreign_files
        return shown_files(foreign + [f for f in self.files if f != GITATTRIBUTES and f not in foreign], 6)

    def describe(self) -> str:
        """What the branch holds, in words (``it holds ...``, ``the repo does not exist ...``)."""
        content = [f for f in self.files if f != GITATTRIBUTES]
        if self.state == "missing":
            return "the repo does not exist: it is created"
        if self.state == "empty":
            held = "is empty"
        elif self.state == "same":
            assert self.manifest is not None
            held = f"holds this same cache ({_describe(self.manifest)}): a re-push, safe to run again"
        elif self.state == "unfinished":
            held = (f"holds {len(content)} data file(s) of a crosscache push but no {MANIFEST_NAME} "
                    "(an interrupted push): this push completes it")
        elif self.state == "other":
            assert self.manifest is not None
            held = f"holds a different crosscache cache ({_describe(self.manifest)})"
        else:
            held = f"holds {len(content)} file(s) that are not a crosscache cache ({self.files_shown})"
            if self.problem:
                held += f"; {self.problem}"
        if self.new_branch:
            return (f"the branch does not exist: it is created from main, which {held}"
                    + ("; on the new branch that is replaced, main is not changed" if self.replaces else ""))
        return f"it {held}"



def _inspect(api: Any, repo: str, revision: str | None, manifest: Manifest | None, *, private: bool) -> RepoContents:
    """Look (read only) at what branch ``revision`` of ``repo`` holds, for a push of the cache of ``manifest``,
    and classify it; for a ``private`` push into a repo that exists, also whether it is private (``--private``
    cannot change that)."""
    contents = _inspect_branch(api, repo, revision, manifest)
    if private and contents.state != "missing":
        contents.private = getattr(api.repo_info(repo, repo_type=REPO_TYPE), "private", None)
    return contents


def _inspect_branch(api: Any, repo: str, revision: str | None, manifest: Manifest | None) -> RepoContents:
    """What branch ``revision`` of ``repo`` holds (read only), classified against the cache of ``manifest``."""
    assert manifest is not None
    branch = list_branch_files(api, repo, revision, REPO_TYPE)
    files, new_branch = branch.files, branch.new_branch
    if branch.state != "files":
        return RepoContents(branch.state, files, new_branch=new_branch)
    if MANIFEST_NAME in files:
        try:
            obj = read_repo_json(api, repo, MANIFEST_NAME, REPO_TYPE, branch, revision)
            remote = Manifest.from_json(obj, where=f"hf://{repo}/{MANIFEST_NAME}")
        except (ValueError, CacheError) as e:
            return RepoContents("foreign", files, new_branch=new_branch,
                                problem=f"its {MANIFEST_NAME} is not a crosscache manifest ({e})")
        state = "same" if _same_cache(remote, manifest) else "other"
        return RepoContents(state, files, manifest=remote, new_branch=new_branch)
    data = [f for f in files if _is_cache_data(f)]
    contents = RepoContents("unfinished", files, new_branch=new_branch)
    # Data files of a push (and the card of a cache whose manifest a replacing push removed),
    # nothing else: an interrupted push. A README.md alone is a dataset's own card.
    if not data or contents.foreign_files:
        contents.state = "foreign"
    return contents


def _same_cache(a: Manifest, b: Manifest) -> bool:
    """Whether two manifests describe the same cache content: the same shards (names, rows, sizes,
    sha256) and the same normalization (its factors, and its side file's sha256).

    Provenance (``created_by``) may differ. Pushing a cache over the same cache rewrites no byte
    that the manifest in the repo relies on, so even an interrupted re-push leaves a valid cache.
    """
    return a.n_rows == b.n_rows and a.shards == b.shards and a.normalization == b.normalization
