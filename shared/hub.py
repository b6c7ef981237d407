"""Caches on the Hugging Face Hub: push a verified cache, open ``hf://USER/NAME[@REV]``.

- :func:`push_cache` verifies a cache and uploads exactly its files (manifest, card, token
  table, normalization tensors, the shards the manifest lists) to a *dataset* repo.
- :func:`resolve_cache` turns ``hf://USER/NAME[@REV]`` into a local folder by downloading
  through ``huggingface_hub`` into its cache; ``max_shards=N`` fetches only the first N shards.

``huggingface_hub`` is imported inside the functions that need it, so ``shared`` imports
without it. Authentication is left to ``huggingface_hub`` (``HF_TOKEN`` or ``hf auth login``):
this module never passes, prints, logs or writes the token (:func:`token_status` says only
whether there is one).

Upload order follows the cache's own rule (write data, then the manifest): the shards, token
table and normalization go up first, resumably (``HfApi.upload_folder`` on huggingface_hub 2.x:
with ``hf_xet``, the default, it commits a large folder in batches and a re-run resumes;
``HfApi.upload_large_folder`` on 1.x, which keeps its resume state in ``<cache>/.cache/huggingface/``),
and ``manifest.json`` with ``README.md`` are committed last. A repo whose push was interrupted has
no manifest (first push) or the previous one, so it never reads as a cache with missing shards.

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
import re
import shutil
from dataclasses import dataclass, field
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

__all__ = [
    "HUB_PREFIX",
    "HubError",
    "PushPlan",
    "is_hub_spec",
    "parse_hub_spec",
    "push_cache",
    "resolve_cache",
    "token_status",
]

HUB_PREFIX = "hf://"
PARTIAL_DIR = "crosscache-partial"
"""Folder, inside a repo's folder of the HF cache, that holds partial-download views."""

REPO_TYPE = "dataset"

_NAME = r"[A-Za-z0-9](?:[\w.\-]{0,94}[A-Za-z0-9])?"
_REPO_RE = re.compile(rf"{_NAME}/{_NAME}")
_SPEC_RE = re.compile(rf"hf://(?:datasets/)?(?P<repo>{_NAME}/{_NAME})(?:@(?P<revision>[^@\s]+))?")
_COMMIT_RE = re.compile(r"[0-9a-f]{40}")
_SPEC_HELP = "expected hf://USER/NAME or hf://USER/NAME@REVISION (a dataset repo; a branch, tag or commit)"


class HubError(CacheError):
    """A Hub cache could not be downloaded or uploaded; the message says why and the fix."""


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


# ---------------------------------------------------------------------------------------------
# Download


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


# ---------------------------------------------------------------------------------------------
# Upload


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
    final_files: list[tuple[str, int]]
    """``(path in repo, bytes)`` committed last: ``manifest.json`` and ``README.md``."""
    n_rows: int
    dry_run: bool
    commit_url: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def files(self) -> list[tuple[str, int]]:
        """Every file of the upload, in upload order."""
        return self.data_files + self.final_files

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    @property
    def url(self) -> str:
        return f"https://huggingface.co/datasets/{self.repo}" + (f"/tree/{self.revision}" if self.revision else "")

    def file_list(self) -> str:
        """One line per file with its size, then the totals."""
        width = max(len(path) for path, _ in self.files)
        lines = [f"  {path:<{width}}  {size:>15,} bytes" for path, size in self.files]
        lines.append(f"{len(self.files)} files, {self.total_bytes:,} bytes ({self.n_rows:,} rows); "
                     f"{MANIFEST_NAME} and {CARD_NAME} are committed last")
        return "\n".join(lines)


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
) -> PushPlan:
    """Verify a cache and upload it to the Hub dataset repo ``repo`` (``USER/NAME``).

    Refuses (:class:`CacheError`, listing every problem) a cache that is incomplete, fails
    :func:`shared.cache.verify_cache`, or is a partial-download view. Uploads exactly the
    manifest's files (never temp or stray files) plus a card rendered from the manifest, to
    branch ``revision`` (created from ``main`` if missing) of a repo created if missing
    (``private`` applies on creation). Shards under ``shards/`` that the manifest does not list
    are deleted from the repo. ``dry_run`` returns the plan and touches nothing.
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
    card = render_card(manifest, hub_repo=repo, hub_revision=revision)
    plan = PushPlan(
        cache_dir=cache_dir,
        repo=repo,
        revision=revision,
        private=private,
        card=card,
        data_files=[(f, (cache_dir / f).stat().st_size) for f in data],
        final_files=[(MANIFEST_NAME, (cache_dir / MANIFEST_NAME).stat().st_size), (CARD_NAME, len(card.encode()))],
        n_rows=manifest.n_rows,
        dry_run=dry_run,
    )
    if not dry_run:
        _upload(plan)
    return plan


def _is_network_error(e: BaseException) -> bool:
    # huggingface_hub's HTTP stack differs across versions (httpx, httpx2); match by family.
    family = type(e).__module__.split(".")[0]
    return isinstance(e, (ConnectionError, TimeoutError)) or family in ("httpx", "httpx2", "requests", "urllib3")


def _upload(plan: PushPlan) -> None:
    import importlib.util

    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    api = HfApi()  # token: HF_TOKEN or the saved login, read by huggingface_hub itself
    where = f"{plan.repo}" + (f"@{plan.revision}" if plan.revision else "")
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
        api.create_repo(plan.repo, repo_type=REPO_TYPE, private=plan.private, exist_ok=True)
        if plan.revision and not plan.revision.startswith("refs/"):
            api.create_branch(plan.repo, branch=plan.revision, repo_type=REPO_TYPE, exist_ok=True)
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
        # The switch-over commit: the manifest and card, and the removal of shards of an older
        # push that this manifest no longer lists.
        stale = [
            f for f in api.list_repo_files(plan.repo, repo_type=REPO_TYPE, revision=plan.revision)
            if f.startswith(f"{SHARD_DIR}/") and f not in listed
        ]
        info = api.create_commit(
            plan.repo,
            repo_type=REPO_TYPE,
            revision=plan.revision,
            operations=[
                CommitOperationAdd(path_in_repo=MANIFEST_NAME, path_or_fileobj=str(plan.cache_dir / MANIFEST_NAME)),
                CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=plan.card.encode()),
                *[CommitOperationDelete(path_in_repo=f) for f in stale],
            ],
            commit_message=f"crosscache: manifest and card ({plan.n_rows:,} rows)",
        )
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
        if not _is_network_error(e):
            raise
        raise HubError(
            f"push to {where} failed: the Hub could not be reached ({type(e).__name__}: {e}); check the "
            "connection and run the same command again: the upload resumes where it stopped"
        ) from None
    plan.commit_url = getattr(info, "commit_url", None)
