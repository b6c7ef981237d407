"""Uploading caches to the Hub: :func:`push_cache` verifies a cache and pushes exactly its files.

The files (manifest, card, token table, normalization tensors, the shards the manifest lists)
go to a *dataset* repo; :class:`PushPlan` lists them, and is all a dry run does.
:func:`token_status` says whether ``huggingface_hub`` finds a token, never the token.
Import these from :mod:`shared.hub`.

Upload order follows the cache's own rule (write data, then the manifest): the shards, token
table and normalization go up first, resumably (``HfApi.upload_folder`` on huggingface_hub 2.x:
with ``hf_xet``, the default, it commits a large folder in batches and a re-run resumes;
``HfApi.upload_large_folder`` on 1.x, which keeps its resume state in ``<cache>/.cache/huggingface/``),
and ``manifest.json`` with ``README.md`` are committed last. A repo whose push was interrupted has
no manifest (first push) or the previous one, so it never reads as a cache with missing shards.
"""

from __future__ import annotations

import glob
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
from shared.hub_download import _shard_patterns, resolve_cache
from shared.hub_spec import _COMMIT_RE, _REPO_HELP, REPO_TYPE, HubError, _is_repo_id, is_hub_spec


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
