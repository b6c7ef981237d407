"""What a push does to the repo: :class:`PushPlan` lists what it uploads, keeps and deletes, and what it may replace.

A dry run returns the plan and uploads nothing. A push is refused (:func:`_refuse_unless_allowed`,
naming what is there) when the branch holds what is not this cache (a different crosscache cache,
or files that are not a cache: :mod:`shared.hub_repo_state`), unless ``force`` says to replace it;
and when ``--private`` would go into an existing public repo (it applies only when the repo is
created). The final commit deletes what the new cache does not use (:func:`_deletions`); a cache
that is replaced loses its ``manifest.json`` first, in a commit of its own (:func:`_deletes_manifest_first`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from shared.cache_format import CARD_NAME, MANIFEST_NAME, NORMALIZATION_NAME, SHARD_DIR, TOKENIZER_NAME, Manifest
from shared.hub_push_common import GITATTRIBUTES, PushTarget
from shared.hub_repo_state import RepoContents, _describe, _differences
from shared.hub_spec import HubError, shown_files

_FORCE_HELP = "another --repo, or a --revision naming a new branch"


@dataclass
class PushPlan(PushTarget):
    """What :func:`shared.hub_upload.push_cache` uploads (or, with ``dry_run``, would upload)."""

    URL_PREFIX: ClassVar[str] = "https://huggingface.co/datasets/"
    cache_dir: Path
    repo: str
    revision: str | None
    private: bool
    card: str
    """The dataset card uploaded as ``README.md`` (rendered from the manifest, not the local file)."""
    data_files: list[tuple[str, int]]
    """``(path in repo, bytes)`` uploaded first: token table, normalization tensors, shards."""
    final_data: dict[str, bytes]
    """Committed last, in one commit, ``path in repo -> content``: ``tokenizer.json`` (when one is
    published), then ``manifest.json`` (the published one: see :attr:`redacted`) and ``README.md``."""
    n_rows: int
    dry_run: bool
    commit_url: str | None = None
    notes: list[str] = field(default_factory=list)
    force: bool = False
    """Replace what the repo holds when it is not this cache (``--force``)."""
    contents: RepoContents | None = None
    """What the target branch held before the push; ``None`` when it could not be looked at (a dry
    run offline or without huggingface_hub: ``notes`` says why)."""
    deletes: list[str] = field(default_factory=list)
    """Files of the repo that the final commit deletes: the shards, normalization tensors and
    ``tokenizer.json`` the new manifest does not list (nor :attr:`kept`) and, when replacing
    (``contents.replaces``), every other file that is not part of the cache (``.gitattributes`` is
    kept). Not listed: the ``manifest.json`` of what is replaced, deleted first in a commit of its
    own, and committed anew at the end."""
    manifest: Manifest | None = field(default=None, repr=False)
    """The manifest of the cache pushed (the local one, as read from the cache folder)."""
    redacted: list[str] = field(default_factory=list)
    """The manifest fields that were published with the home folder, user or host name replaced."""
    published: dict[str, Any] = field(default_factory=dict, repr=False)
    """The published manifest as a JSON object (``final_data["manifest.json"]`` is its bytes)."""
    kept: list[str] = field(default_factory=list)
    """Files of the repo that the push leaves as they are and the published manifest lists: the
    ``tokenizer.json`` an earlier push published with this same cache, when none is found to publish
    now (a cache without one of its own, re-pushed from another machine)."""

    @property
    def final_files(self) -> list[tuple[str, int]]:
        """``(path in repo, bytes)`` committed last (:attr:`final_data`)."""
        return [(name, len(data)) for name, data in self.final_data.items()]

    @property
    def files(self) -> list[tuple[str, int]]:
        """Every file of the upload, in upload order."""
        return self.data_files + self.final_files

    def content(self, path: str) -> bytes:
        """What the push uploads as ``path`` (a generated file, or the cache's own)."""
        return self.final_data[path] if path in self.final_data else (self.cache_dir / path).read_bytes()

    def file_list(self) -> str:
        """One line per file with its size, then the totals."""
        lines = self.file_lines()
        last = list(self.final_data)
        lines.append(f"{len(self.files)} files, {self.total_bytes:,} bytes ({self.n_rows:,} rows); "
                     f"{', '.join(last[:-1])} and {last[-1]} are committed last")
        return "\n".join(lines)

    def repo_summary(self) -> str:
        """What the push does to the repo: what the branch holds, what is replaced and deleted."""
        if self.contents is None:
            return f"{self.where}: not checked (see the notes); a push checks it before uploading anything"
        lines = [f"{self.where}: {self.contents.describe()}"]
        if self.contents.replaces:
            first = (f"its {MANIFEST_NAME} is deleted in a commit of its own before any data goes up, then "
                     if MANIFEST_NAME in self.contents.files else "")
            why = "--force" if self.needs_force else "new branch"
            lines.append(f"replaced ({why}): {first}the cache's files are uploaded over it, and what the new "
                         "cache does not use is deleted in the final commit (it stays in the repo's history)")
        if self.kept:
            lines.append(f"kept: {', '.join(self.kept)} (published by an earlier push of this cache; listed in the "
                         "new manifest)")
        if self.deletes:
            lines.append(f"deleted: {len(self.deletes)} file(s): {shown_files(self.deletes, 10)}")
        return "\n".join(lines)

    @property
    def needs_force(self) -> bool:
        """Whether this push replaces content of an existing branch, which only ``force`` allows."""
        return self.contents is not None and self.contents.replaces and not self.contents.new_branch


def _deletions(plan: PushPlan, files: list[str]) -> list[str]:
    """The files of the branch (``files``) that the final commit deletes (see :attr:`PushPlan.deletes`)."""
    keep = {f for f, _ in plan.files} | set(plan.kept) | {GITATTRIBUTES}
    replace = plan.contents is not None and plan.contents.replaces
    return [f for f in files if f not in keep
            and (replace or f.startswith(f"{SHARD_DIR}/") or f in (NORMALIZATION_NAME, TOKENIZER_NAME))]


def _deletes_manifest_first(plan: PushPlan) -> bool:
    return plan.contents is not None and plan.contents.replaces and MANIFEST_NAME in plan.contents.files


def _refuse_unless_allowed(plan: PushPlan) -> None:
    """Raise :class:`HubError` when the push would make a repo public that was asked to be private
    (``--private`` into an existing public repo), or would replace what the branch holds without ``force``."""
    c = plan.contents
    dry = " (dry run: nothing was uploaded)" if plan.dry_run else ""
    if c is not None and plan.private and c.state != "missing" and c.private is not True:
        # create_repo(private=True) leaves an existing repo as it is: the cache would go up public.
        seen = "is public" if c.private is False else "exists, and the Hub did not say whether it is private"
        raise HubError(
            f"refusing to push to {plan.where} with --private: the repo {plan.repo} already {seen}, so the cache "
            f"would be published for anyone to read. Make the repo private in its settings "
            f"(https://huggingface.co/datasets/{plan.repo}/settings) and run again, or drop --private to publish "
            f"it publicly{dry}"
        )
    if c is None or not plan.needs_force or plan.force:
        return
    if c.state == "other":
        assert c.manifest is not None and plan.manifest is not None
        held = (f"a different crosscache cache ({_describe(c.manifest)}; this cache: {_describe(plan.manifest)}"
                f"{_differences(c.manifest, plan.manifest)})")
        how = (f"its {MANIFEST_NAME} is deleted first, in a commit of its own, then this cache is uploaded over it "
               "and the old cache's files it does not use are deleted")
    else:
        n_files = len([f for f in c.files if f != GITATTRIBUTES])
        held = f"{n_files} file(s) that are not a crosscache cache ({c.files_shown})"
        if c.problem:
            held += f"; {c.problem}"
        how = f"the cache's card replaces {CARD_NAME} and every file that is not part of the cache is deleted"
    raise HubError(
        f"refusing to push to {plan.where}: it holds {held}, and the push would replace it. "
        f"Pass --force to replace it ({how}; the old files stay in the repo's git history), or push to {_FORCE_HELP}"
        + dry
    )
