"""Uploading caches to the Hub: :func:`push_cache` verifies a cache and pushes exactly its files.

The files (manifest, card, token table, normalization tensors, the shards the manifest lists)
go to a *dataset* repo; :class:`PushPlan` lists them, and is what a dry run returns (having only
looked at the repo, read only, unless offline).
:func:`~shared.hub_push_common.token_status` says whether ``huggingface_hub`` finds a token, never the token.
Import these from :mod:`shared.hub`.

Before uploading anything, the push looks at what the target branch holds
(:class:`~shared.hub_repo_state.RepoContents`). Nothing, this same cache (a re-push), or the data
files of an interrupted push: it goes ahead. Anything else is replaced only with ``force``
(``--force``), or on a branch the push creates from ``main`` (:mod:`shared.hub_push_plan`).

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
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from shared.cache_format import (
    CARD_NAME,
    MANIFEST_NAME,
    SHARD_DIR,
    TOKENIZER_NAME,
    TOKENS_NAME,
    CacheError,
    Manifest,
)
from shared.card import render_card
from shared.folder_lock import FolderBusyError, holder_summary
from shared.hub_download import _shard_patterns, resolve_cache
from shared.hub_fetch import _normalization_file
from shared.hub_push_common import look_read_only, push_errors
from shared.hub_push_plan import PushPlan, _deletes_manifest_first, _deletions, _refuse_unless_allowed
from shared.hub_repo_state import _describe, _inspect
from shared.hub_spec import (
    _COMMIT_RE,
    _REPO_HELP,
    REPO_TYPE,
    HubError,
    _is_repo_id,
    is_hub_spec,
    shown_files,
)
from shared.redact import redact_machine
from shared.tokenizer_file import find_tokenizer_json, listed_tokenizer_file, vocab_fingerprint

# How a note saying that no tokenizer.json goes up starts (replaced when the repo's is kept).
_NO_TOKENIZER = f"no {TOKENIZER_NAME} published"


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
    if (holder := holder_summary(cache_dir)) is not None:  # its files may change while they are uploaded
        raise FolderBusyError(f"refusing to push {cache_dir}: a harvest ({holder}) is writing it now; push when it ends")
    report = verify_cache(cache_dir, checksums=True, progress=progress)
    if not report.ok:
        raise CacheError(
            f"refusing to push {cache_dir}: it failed verification with {len(report.problems)} problem(s):\n"
            + "\n".join(f"  - {p}" for p in report.problems)
            + "\nfix the cache (finish or re-run its harvest, under torchrun if it was a multi-process one) until "
            f"`python run_harvest.py verify {cache_dir}` passes"
        )
    manifest = Manifest.load(cache_dir)
    if "partial_of" in manifest.extra:
        src = manifest.extra["partial_of"]
        raise CacheError(
            f"refusing to push {cache_dir}: it is a partial download ({len(manifest.shards)} of "
            f"{src.get('n_shards')} shards) of hf://{src.get('repo')}; push the full cache instead"
        )
    norm_file = _normalization_file(manifest)
    if norm_file and not (cache_dir / norm_file).is_file():
        raise CacheError(f"refusing to push {cache_dir}: the manifest's normalization file {norm_file} is missing")

    data = [TOKENS_NAME]
    if norm_file:  # only the side file the cache reads: a leftover one (norm_scale) is a stray
        data.append(norm_file)
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


_RERUN = "run the same command again: the upload resumes where it stopped"


def _look_for_dry_run(plan: PushPlan) -> None:
    """A dry run's look at the repo (read only): fills ``plan.contents`` and ``plan.deletes``, or
    says in ``plan.notes`` why it could not look; raises the refusal a push would raise."""

    def look(api: Any) -> None:
        plan.contents = _inspect(api, plan.repo, plan.revision, plan.manifest, private=plan.private)

    if look_read_only(plan.where, plan.notes, look):
        _settle_tokenizer(plan)
        plan.deletes = _deletions(plan, plan.contents.files if plan.contents else [])
        _refuse_unless_allowed(plan)


def _linked_folders(cache_dir: Path, files: list[str]) -> list[str]:
    """The folders inside ``cache_dir`` on the way to ``files`` that are symbolic links (``shards/`` moved
    to another disk): ``upload_folder`` lists a folder without entering linked folders, so their files
    would be left out of the upload."""
    folders = {Path(f).parent for f in files} - {Path(".")}
    linked = {q.as_posix() for d in folders for q in (d, *d.parents) if q != Path(".") and (cache_dir / q).is_symlink()}
    return sorted(linked)


@contextmanager
def _upload_folder_of(plan: PushPlan) -> Iterator[tuple[Path, list[str] | None]]:
    """The folder to hand the uploader, and the stray files in it to ignore: the cache itself; or, when a
    folder on the way to its data files is a symbolic link (which the uploader does not enter), a
    temporary folder of links to exactly those files (then no strays)."""
    files = [f for f, _ in plan.data_files]
    if not _linked_folders(plan.cache_dir, files):
        listed = set(files)
        strays = [
            glob.escape(q.relative_to(plan.cache_dir).as_posix())
            for q in (plan.cache_dir / SHARD_DIR).rglob("*")
            if q.is_file() and q.relative_to(plan.cache_dir).as_posix() not in listed
        ]
        yield plan.cache_dir, strays or None
        return
    with tempfile.TemporaryDirectory(prefix="crosscache-push-") as tmp:
        for f in files:
            (Path(tmp) / f).parent.mkdir(parents=True, exist_ok=True)
            os.symlink((plan.cache_dir / f).resolve(), Path(tmp) / f)
        yield Path(tmp), None


def _missing_after_upload(plan: PushPlan, repo_files: list[str]) -> None:
    """Refuse to commit the manifest over data that did not all arrive: a manifest listing shards the
    repo lacks would read as a finished cache with missing shards."""
    have = set(repo_files)
    missing = [f for f, _ in plan.data_files if f not in have]
    if missing:
        raise HubError(
            f"the upload to {plan.where} left out {len(missing)} of the cache's {len(plan.data_files)} data files "
            f"({shown_files(missing, 6)}), so the manifest was not committed (the repo reads as an unfinished "
            f"push). Check that they are plain files readable under {plan.cache_dir} and push again"
        )


def _upload(plan: PushPlan) -> None:
    import importlib.util

    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    api = HfApi()  # token: HF_TOKEN or the saved login, read by huggingface_hub itself
    where = plan.where
    # Data patterns: the shard folder as one glob, then every other file in it (temp files of a
    # killed writer, shards no manifest lists) excluded by name: exactly the listed files go up.
    data_patterns = [glob.escape(f) for f, _ in plan.data_files if not f.startswith(f"{SHARD_DIR}/")]
    data_patterns += _shard_patterns([f for f, _ in plan.data_files if f.startswith(f"{SHARD_DIR}/")])
    with push_errors(where, checks="check the cache", rerun=_RERUN), _upload_folder_of(plan) as (folder, strays):
        # Look before touching anything: a refused push leaves the repo as it was (no branch made).
        contents = plan.contents = _inspect(api, plan.repo, plan.revision, plan.manifest, private=plan.private)
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
                repo_id=plan.repo, repo_type=REPO_TYPE, folder_path=folder,
                revision=plan.revision, allow_patterns=data_patterns, ignore_patterns=strays,
            )
        else:  # 2.x: upload_folder itself is resumable and batches commits (with hf_xet)
            if importlib.util.find_spec("hf_xet") is None:
                plan.notes.append("hf_xet is not installed: the data went up in one commit, and an interrupted "
                                  "upload restarts; `pip install hf_xet` makes it resumable")
            api.upload_folder(
                repo_id=plan.repo, repo_type=REPO_TYPE, folder_path=folder,
                revision=plan.revision, allow_patterns=data_patterns, ignore_patterns=strays,
                commit_message=f"crosscache: upload data ({len(plan.data_files)} files)",
            )
        # The switch-over commit: the manifest, card and tokenizer.json, and the removal of what this
        # cache does not use (shards of an older push, a stale normalization or tokenizer file; when
        # replacing, the rest).
        repo_files = api.list_repo_files(plan.repo, repo_type=REPO_TYPE, revision=plan.revision)
        _missing_after_upload(plan, repo_files)
        stale = _deletions(plan, repo_files)
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
    if contents.replaces:
        if contents.state == "other":
            assert contents.manifest is not None
            old = f"the different crosscache cache ({_describe(contents.manifest)})"
        else:
            old = f"the files that are not a crosscache cache ({contents.files_shown})"
        plan.notes.append(f"replaced {old} that {'main' if contents.new_branch else where} held"
                          + (f", on the new branch {plan.revision} only" if contents.new_branch else ""))
    plan.commit_url = getattr(info, "commit_url", None)
