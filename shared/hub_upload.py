"""Uploading caches to the Hub: :func:`push_cache` verifies a cache and pushes exactly its files.

The files (manifest, card, token table, normalization tensors, the shards the manifest lists)
go to a *dataset* repo; :class:`PushPlan` lists them, and is what a dry run returns (having only
looked at the repo, read only, unless offline).
:func:`token_status` says whether ``huggingface_hub`` finds a token, never the token.
Import these from :mod:`shared.hub`.

Before uploading anything, the push looks at what the target branch holds (:class:`RepoContents`).
Nothing, this same cache (a re-push), or the data files of an interrupted push without a manifest:
it goes ahead. A different crosscache cache, or files that are not a cache (a dataset's own
``README.md``, ``data.csv``): it is refused, naming what is there, unless ``force`` (``--force``)
says to replace it. A branch the push creates starts as a copy of ``main``; what it inherits is
replaced on the branch only, so that needs no ``force``.

What is published is the cache as a reader elsewhere needs it, and nothing of the pusher's machine:
the uploaded ``manifest.json`` and card are generated from the local manifest with paths under the
home folder written ``~/...`` and the user and host names replaced (:mod:`shared.redact`), and the
cache's ``tokenizer.json`` goes with it; for a cache harvested before the harvest saved one, a
``tokenizer.json`` found on this machine whose vocabulary matches the manifest's is published in its
place, listed in the uploaded manifest; when none is found on a re-push, the one an earlier push
published with this same cache is kept in the repo and listed again. The local cache is never
changed. ``--private`` applies when the repo is created: pushing with it into an existing public
repo is refused.

Upload order follows the cache's own rule (write data, then the manifest): the shards, token
table and normalization go up first, resumably (``HfApi.upload_folder`` on huggingface_hub 2.x:
with ``hf_xet``, the default, it commits a large folder in batches and a re-run resumes;
``HfApi.upload_large_folder`` on 1.x, which keeps its resume state in ``<cache>/.cache/huggingface/``),
and ``manifest.json`` with ``README.md`` (and ``tokenizer.json``) are committed last. New data lands
under the same names an older cache in the repo uses, so when a push replaces a different cache, the
old ``manifest.json`` is first deleted in a commit of its own. A repo whose push was interrupted therefore has no
manifest (first push, or a replacement) or this cache's own (a re-push), so it never reads as a
cache with missing shards, nor as an old manifest over new data; re-running the push finishes it.
"""

from __future__ import annotations

import glob
import hashlib
import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
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
from shared.card import render_card
from shared.hub_download import _shard_patterns, resolve_cache
from shared.hub_spec import (
    _COMMIT_RE,
    _REPO_HELP,
    REPO_TYPE,
    HubError,
    _is_repo_id,
    _network_cause,
    is_hub_spec,
    shown_files,
)
from shared.redact import redact_machine
from shared.tokenizer_file import find_tokenizer_json, listed_tokenizer_file, vocab_fingerprint

GITATTRIBUTES = ".gitattributes"
"""Created by the Hub with every repo; a push keeps it and never counts it as content."""

# Data files a crosscache push uploads before its manifest: what an interrupted push leaves.
_SHARD_RE = re.compile(rf"{SHARD_DIR}/acts(?:-rank\d+)?-\d+\.safetensors")

_FORCE_HELP = "another --repo, or a --revision naming a new branch"

# How a note saying that no tokenizer.json goes up starts (replaced when the repo's is kept).
_NO_TOKENIZER = f"no {TOKENIZER_NAME} published"


def _is_cache_data(path: str) -> bool:
    return path in (TOKENS_NAME, NORMALIZATION_NAME) or bool(_SHARD_RE.fullmatch(path))


def _describe(manifest: Manifest) -> str:
    """A one-line identification of a cache: models, hooks, rows, shards."""
    hooks = ", ".join(manifest.hooks[:3]) + (f" and {len(manifest.hooks) - 3} more" if len(manifest.hooks) > 3 else "")
    return (f"{', '.join(manifest.model_names)} @ {hooks}; {manifest.n_rows:,} rows in "
            f"{len(manifest.shards)} shard{'s' * (len(manifest.shards) != 1)}")


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


@dataclass
class PushPlan:
    """What :func:`push_cache` uploads (or, with ``dry_run``, would upload)."""

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

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    @property
    def url(self) -> str:
        return f"https://huggingface.co/datasets/{self.repo}" + (f"/tree/{self.revision}" if self.revision else "")

    @property
    def where(self) -> str:
        """``USER/NAME`` or ``USER/NAME@BRANCH``: the target, as messages name it."""
        return self.repo + (f"@{self.revision}" if self.revision else "")

    def file_list(self) -> str:
        """One line per file with its size, then the totals."""
        width = max(len(path) for path, _ in self.files)
        lines = [f"  {path:<{width}}  {size:>15,} bytes" for path, size in self.files]
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


def token_status() -> str:
    """Whether ``huggingface_hub`` finds a token (``HF_TOKEN`` or a saved login); never the token."""
    try:
        from huggingface_hub import get_token
    except ImportError:
        return "huggingface_hub is not installed: `pip install huggingface_hub` before pushing"
    if get_token():
        return "a Hugging Face token is available (HF_TOKEN or `hf auth login`)"
    return "no Hugging Face token found: run `hf auth login` or set HF_TOKEN before pushing"


def push_cache(
    cache_dir: str | Path,
    repo: str,
    *,
    private: bool = False,
    revision: str | None = None,
    dry_run: bool = False,
    progress: bool = False,
    force: bool = False,
) -> PushPlan:
    """Verify a cache and upload it to the Hub dataset repo ``repo`` (``USER/NAME``).

    Refuses (:class:`CacheError`, listing every problem) a cache that is incomplete, fails
    :func:`shared.cache.verify_cache`, or is a partial-download view. Uploads exactly the
    manifest's files (never temp or stray files) plus a card rendered from the manifest, to
    branch ``revision`` (created from ``main`` if missing) of a repo created if missing
    (``private`` applies on creation; into an existing public repo it is refused, :class:`HubError`).
    Shards under ``shards/`` that the manifest does not list, and a ``normalization.safetensors`` or
    ``tokenizer.json`` it does not use, are deleted from the repo; but a re-push of a cache without a
    ``tokenizer.json`` of its own, from a machine where none is found, keeps the one an earlier push
    published (:attr:`PushPlan.kept`).

    The manifest and card uploaded are generated, the local files left as they are: paths under the
    home folder published as ``~/...``, the user and host names as ``<user>`` / ``<host>``
    (:mod:`shared.redact`), and for a cache without its own ``tokenizer.json``, one found on this
    machine with the cache's vocabulary listed and uploaded with it (:attr:`PushPlan.notes` says so).

    Before uploading, it looks at the branch (:attr:`PushPlan.contents`): when it holds a
    different crosscache cache, or files that are not a cache, the push is refused
    (:class:`HubError`, naming what is there) unless ``force``, which replaces it: a cache's
    ``manifest.json`` is deleted first in a commit of its own, and whatever the new cache does not
    use is deleted in the final commit. ``dry_run`` uploads nothing: it returns the plan, and
    looks at the repo (read only) unless offline, raising the same refusal a push would.
    """
    from shared.cache import verify_cache

    if not _is_repo_id(repo):
        raise ValueError(f"--repo {repo!r} is not a Hub dataset repo id: expected {_REPO_HELP}, e.g. alice/toy-diff")
    if revision is not None and (not revision.strip() or _COMMIT_RE.fullmatch(revision)):
        raise ValueError(f"--revision {revision!r} must be a branch name to push to (not a commit hash)")
    cache_dir = resolve_cache(cache_dir) if is_hub_spec(cache_dir) else Path(cache_dir)
    report = verify_cache(cache_dir, checksums=True, progress=progress)
    if not report.ok:
        raise CacheError(
            f"refusing to push {cache_dir}: it failed verification with {len(report.problems)} problem(s):\n"
            + "\n".join(f"  - {p}" for p in report.problems)
            + f"\nfix the cache (finish or re-run its harvest) until `python run_harvest.py verify {cache_dir}` passes"
        )
    manifest = Manifest.load(cache_dir)
    if "partial_of" in manifest.extra:
        src = manifest.extra["partial_of"]
        raise CacheError(
            f"refusing to push {cache_dir}: it is a partial download ({len(manifest.shards)} of "
            f"{src.get('n_shards')} shards) of hf://{src.get('repo')}; push the full cache instead"
        )
    norm_file = manifest.normalization.get("file")
    if norm_file and not (cache_dir / str(norm_file)).is_file():
        raise CacheError(f"refusing to push {cache_dir}: the manifest's normalization file {norm_file} is missing")

    data = [TOKENS_NAME]
    if (cache_dir / NORMALIZATION_NAME).is_file():
        data.append(NORMALIZATION_NAME)
    data += [s.file for s in manifest.shards]
    # What is published is generated from the local manifest (left as it is): no path of this machine's
    # home folder, user or host name, and the tokenizer.json it lists.
    published, redacted = redact_machine(json.loads((cache_dir / MANIFEST_NAME).read_text()))
    notes: list[str] = []
    tokenizer = _tokenizer_to_publish(cache_dir, manifest, published, notes)
    final = {TOKENIZER_NAME: tokenizer} if tokenizer is not None else {}
    final[MANIFEST_NAME], card = _manifest_and_card(published, repo, revision)
    final[CARD_NAME] = card.encode()
    if redacted:
        notes.append(f"{len(redacted)} field(s) of the published {MANIFEST_NAME} and {CARD_NAME} name this machine's "
                     f"home folder, user or host: published as ~/..., <user>, <host> ({shown_files(redacted, 6)}); "
                     "the local cache is not changed")
    plan = PushPlan(
        cache_dir=cache_dir,
        repo=repo,
        revision=revision,
        private=private,
        card=card,
        data_files=[(f, (cache_dir / f).stat().st_size) for f in data],
        final_data=final,
        n_rows=manifest.n_rows,
        dry_run=dry_run,
        force=force,
        manifest=manifest,
        notes=notes,
        redacted=redacted,
        published=published,
    )
    if dry_run:
        _look_for_dry_run(plan)
    else:
        _upload(plan)
    return plan


def _manifest_and_card(published: dict[str, Any], repo: str, revision: str | None) -> tuple[bytes, str]:
    """The ``manifest.json`` bytes and the card uploaded for the published manifest ``published``."""
    return (json.dumps(published, indent=1).encode() + b"\n",
            render_card(Manifest.from_json(published), hub_repo=repo, hub_revision=revision))


def _tokenizer_to_publish(cache_dir: Path, manifest: Manifest, published: dict[str, Any],
                          notes: list[str]) -> bytes | None:
    """The ``tokenizer.json`` to publish with the cache, or None; says in ``notes`` what was done.

    The cache's own file when its manifest lists one (``verify`` has checked it). A cache harvested
    before the harvest saved one gets the ``tokenizer.json`` found on this machine for the tokenizer
    its manifest names, if that file's vocabulary is the cache's (``tokenizer.sha256``): it is then
    listed in ``published`` (the manifest to upload), never in the local cache's manifest.
    """
    own = listed_tokenizer_file(manifest.tokenizer)
    if own is not None:
        return (cache_dir / own).read_bytes()
    name = manifest.tokenizer.get("name")
    unreadable = "readers elsewhere show the token ids of top contexts as <id>"
    found = find_tokenizer_json(manifest.tokenizer)
    if found is None:
        notes.append(f"{_NO_TOKENIZER}: the cache has none of its own (harvested before crosscache "
                     f"saved one) and none was found on this machine for its tokenizer {name!r} (its path, its name, "
                     f"the Hugging Face cache); {unreadable}. Re-harvest it to include the tokenizer")
        return None
    path, how = found
    expected = manifest.tokenizer.get("sha256")
    data = path.read_bytes()
    fingerprint = vocab_fingerprint(data)  # of the very bytes published
    if not expected or fingerprint != expected:
        why = ("the manifest records no vocabulary sha256 to check it against" if not expected
               else "its vocabulary is not the one the cache was harvested with" if fingerprint
               else "it does not load as a tokenizer")
        notes.append(f"{_NO_TOKENIZER}: the cache has none of its own, and {path} (found through {how}) "
                     f"was left out: {why}; {unreadable}")
        return None
    published.setdefault("tokenizer", {}).update(file=TOKENIZER_NAME, file_sha256=hashlib.sha256(data).hexdigest())
    notes.append(f"the cache has no {TOKENIZER_NAME} of its own (harvested before crosscache saved one): publishing "
                 f"{path} (found through {how}; its vocabulary matches the cache's) as {TOKENIZER_NAME}, listed in "
                 "the published manifest; the local cache is not changed")
    return data


def _settle_tokenizer(plan: PushPlan) -> None:
    """Once the branch has been looked at: on a re-push of a cache without a ``tokenizer.json`` of its
    own, settle the one an earlier push published with it (found on that machine then).

    With none found to publish now, the repo's is kept (not deleted) and listed in the new manifest
    as the repo's manifest lists it (``file``, ``file_sha256``): a re-push from another machine must not
    take away what readers use to show tokens as text. One found now that differs from it (the same
    vocabulary: it was checked) replaces it, as the cache's own file would; a note says so.
    """
    c, manifest = plan.contents, plan.manifest
    if c is None or c.state != "same" or c.manifest is None or manifest is None:
        return
    if listed_tokenizer_file(manifest.tokenizer) is not None:
        return  # the cache's own tokenizer.json goes up
    theirs = c.manifest.tokenizer
    file = listed_tokenizer_file(theirs)
    if file is None or file not in c.files or theirs.get("sha256") != manifest.tokenizer.get("sha256"):
        return
    where = "main" if c.new_branch else plan.where
    if TOKENIZER_NAME in plan.final_data:
        if hashlib.sha256(plan.final_data[TOKENIZER_NAME]).hexdigest() != theirs.get("file_sha256"):
            plan.notes.append(f"the {TOKENIZER_NAME} found here differs from the one an earlier push published to "
                              f"{where} (the vocabulary is the same): it replaces it")
        return
    plan.published.setdefault("tokenizer", {}).update({k: theirs[k] for k in ("file", "file_sha256") if k in theirs})
    plan.final_data[MANIFEST_NAME], plan.card = _manifest_and_card(plan.published, plan.repo, plan.revision)
    plan.final_data[CARD_NAME] = plan.card.encode()
    plan.kept = [file]
    plan.notes = [n for n in plan.notes if not n.startswith(_NO_TOKENIZER)]
    plan.notes.append(f"the cache has no {TOKENIZER_NAME} of its own and none to publish was found on this machine: "
                      f"the {file} an earlier push published to {where} with this same cache is kept, and listed in "
                      "the published manifest as before")


def _inspect(api: Any, plan: PushPlan) -> RepoContents:
    """Look (read only) at what the branch ``plan`` pushes to holds, and classify it; for a ``--private``
    push into a repo that exists, also whether it is private (``--private`` cannot change that)."""
    contents = _inspect_branch(api, plan)
    if plan.private and contents.state != "missing":
        contents.private = getattr(api.repo_info(plan.repo, repo_type=REPO_TYPE), "private", None)
    return contents


def _inspect_branch(api: Any, plan: PushPlan) -> RepoContents:
    """What the branch ``plan`` pushes to holds (read only), classified."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    assert plan.manifest is not None
    new_branch = False
    try:
        files = api.list_repo_files(plan.repo, repo_type=REPO_TYPE, revision=plan.revision)
    except GatedRepoError:
        raise  # exists, but this token may not read it: the HTTP error says so
    except RepositoryNotFoundError:
        return RepoContents("missing")
    except RevisionNotFoundError:
        if plan.revision is None:  # a repo without even its first commit
            return RepoContents("empty")
        if plan.revision.startswith("refs/"):
            raise  # pull-request refs are not created by a push: the HTTP error names it
        # The push creates the branch from main: main's files are what the branch starts with.
        new_branch = True
        files = api.list_repo_files(plan.repo, repo_type=REPO_TYPE)
    files = sorted(files)
    if not [f for f in files if f != GITATTRIBUTES]:
        return RepoContents("empty", files, new_branch=new_branch)
    if MANIFEST_NAME in files:
        try:
            # A temporary folder, not the HF cache: this copy only decides whether the push may go on.
            with tempfile.TemporaryDirectory() as tmp:
                path = api.hf_hub_download(plan.repo, MANIFEST_NAME, repo_type=REPO_TYPE,
                                           revision=None if new_branch else plan.revision, local_dir=tmp)
                obj = json.loads(Path(path).read_text())
            remote = Manifest.from_json(obj, where=f"hf://{plan.repo}/{MANIFEST_NAME}")
        except (ValueError, CacheError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            return RepoContents("foreign", files, new_branch=new_branch,
                                problem=f"its {MANIFEST_NAME} is not a crosscache manifest ({e})")
        state = "same" if _same_cache(remote, plan.manifest) else "other"
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
        held = f"a different crosscache cache ({_describe(c.manifest)}; this cache: {_describe(plan.manifest)})"
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


def _look_for_dry_run(plan: PushPlan) -> None:
    """A dry run's look at the repo (read only): fills ``plan.contents`` and ``plan.deletes``, or
    says in ``plan.notes`` why it could not look; raises the refusal a push would raise."""
    try:
        from huggingface_hub import HfApi, constants
        from huggingface_hub.errors import HfHubHTTPError
    except ImportError:
        plan.notes.append(f"huggingface_hub is not installed: what {plan.where} holds was not looked at")
        return
    if constants.is_offline_mode():  # a dry run offline checks the cache only: it never reaches the Hub
        plan.notes.append(f"offline mode is on (HF_HUB_OFFLINE=1): what {plan.where} holds was not looked at; "
                          "a push looks before uploading anything")
        return
    try:
        plan.contents = _inspect(HfApi(), plan)
    except Exception as e:
        if not (isinstance(e, HfHubHTTPError) or _network_cause(e) is not None):
            raise
        plan.notes.append(f"could not look at what {plan.where} holds ({type(e).__name__}: {e}); "
                          "a push looks again before uploading anything")
        return
    _settle_tokenizer(plan)
    plan.deletes = _deletions(plan, plan.contents.files)
    _refuse_unless_allowed(plan)


def _upload(plan: PushPlan) -> None:
    import importlib.util

    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    api = HfApi()  # token: HF_TOKEN or the saved login, read by huggingface_hub itself
    where = plan.where
    listed = {f for f, _ in plan.data_files}
    # Data patterns: the shard folder as one glob, then every other file in it (temp files of a
    # killed writer, shards no manifest lists) excluded by name: exactly the listed files go up.
    data_patterns = [glob.escape(f) for f, _ in plan.data_files if not f.startswith(f"{SHARD_DIR}/")]
    data_patterns += _shard_patterns([f for f, _ in plan.data_files if f.startswith(f"{SHARD_DIR}/")])
    strays = [
        glob.escape(p.relative_to(plan.cache_dir).as_posix())
        for p in (plan.cache_dir / SHARD_DIR).rglob("*")
        if p.is_file() and p.relative_to(plan.cache_dir).as_posix() not in listed
    ]
    try:
        # Look before touching anything: a refused push leaves the repo as it was (no branch made).
        contents = plan.contents = _inspect(api, plan)
        _refuse_unless_allowed(plan)
        _settle_tokenizer(plan)
        api.create_repo(plan.repo, repo_type=REPO_TYPE, private=plan.private, exist_ok=True)
        if plan.revision and not plan.revision.startswith("refs/"):
            api.create_branch(plan.repo, branch=plan.revision, repo_type=REPO_TYPE, exist_ok=True)
        if _deletes_manifest_first(plan):
            # The new data goes up under the names the old cache uses: with its manifest still
            # there, an interrupted push would leave the old manifest over new data (every shard a
            # sha256 mismatch, or new rows trained under the old normalization). With none, the
            # repo reads as an unfinished push until the final commit.
            api.create_commit(
                plan.repo,
                repo_type=REPO_TYPE,
                revision=plan.revision,
                operations=[CommitOperationDelete(path_in_repo=MANIFEST_NAME)],
                commit_message="crosscache: remove the old manifest before replacing the cache",
            )
        if hasattr(api, "upload_large_folder"):  # huggingface_hub 1.x: the resumable uploader
            api.upload_large_folder(
                repo_id=plan.repo, repo_type=REPO_TYPE, folder_path=plan.cache_dir,
                revision=plan.revision, allow_patterns=data_patterns, ignore_patterns=strays or None,
            )
        else:  # 2.x: upload_folder itself is resumable and batches commits (with hf_xet)
            if importlib.util.find_spec("hf_xet") is None:
                plan.notes.append("hf_xet is not installed: the data went up in one commit, and an interrupted "
                                  "upload restarts; `pip install hf_xet` makes it resumable")
            api.upload_folder(
                repo_id=plan.repo, repo_type=REPO_TYPE, folder_path=plan.cache_dir,
                revision=plan.revision, allow_patterns=data_patterns, ignore_patterns=strays or None,
                commit_message=f"crosscache: upload data ({len(plan.data_files)} files)",
            )
        # The switch-over commit: the manifest, card and tokenizer.json, and the removal of what this
        # cache does not use (shards of an older push, a stale normalization or tokenizer file; when
        # replacing, the rest).
        stale = _deletions(plan, api.list_repo_files(plan.repo, repo_type=REPO_TYPE, revision=plan.revision))
        info = api.create_commit(
            plan.repo,
            repo_type=REPO_TYPE,
            revision=plan.revision,
            operations=[
                *[CommitOperationAdd(path_in_repo=name, path_or_fileobj=data)
                  for name, data in plan.final_data.items()],
                *[CommitOperationDelete(path_in_repo=f) for f in stale],
            ],
            commit_message=f"crosscache: manifest and card ({plan.n_rows:,} rows)",
        )
        plan.deletes = stale
    except OfflineModeIsEnabled:
        raise HubError(
            f"cannot push to {where}: offline mode is on (HF_HUB_OFFLINE=1). Unset it and run again, "
            "or use --dry-run to check the cache and see what would be uploaded"
        ) from None
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            fix = "log in with `hf auth login` or set HF_TOKEN to a token with write access to the repo"
        elif status == 404:
            fix = "check the repo name and that your token (`hf auth login` or HF_TOKEN) can write to it"
        else:
            fix = "run the same command again: the upload resumes where it stopped"
        raise HubError(f"push to {where} failed ({type(e).__name__}: {e}); {fix}") from None
    except Exception as e:
        if _network_cause(e) is None:
            raise
        raise HubError(
            f"push to {where} failed: the Hub could not be reached ({type(e).__name__}: {e}); check the "
            "connection and run the same command again: the upload resumes where it stopped"
        ) from None
    if contents.replaces:
        if contents.state == "other":
            assert contents.manifest is not None
            old = f"the different crosscache cache ({_describe(contents.manifest)})"
        else:
            old = f"the files that are not a crosscache cache ({contents.files_shown})"
        plan.notes.append(f"replaced {old} that {'main' if contents.new_branch else where} held"
                          + (f", on the new branch {plan.revision} only" if contents.new_branch else ""))
    plan.commit_url = getattr(info, "commit_url", None)
