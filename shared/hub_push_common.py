"""What the two Hub pushes share: the cache push (:mod:`shared.hub_upload`, a dataset repo) and the
dictionary push (:mod:`train.hub_dictionary`, a model repo).

- :class:`PushTarget`: the target's names (``USER/NAME@BRANCH``, its URL) and the file-list lines of a plan;
- :func:`list_branch_files` and :func:`read_repo_json`: the read-only look at what the target branch holds
  (each push then classifies it against what it uploads);
- :func:`look_read_only`: a dry run's look at the repo, which never fails on an offline machine;
- :func:`push_errors`: what ``huggingface_hub`` raises during a push, turned into :class:`HubError` with the fix;
- :func:`add_push_options` and :func:`print_push_result`: the two CLIs' common flags and output;
- :func:`token_status`: whether a token is found (never the token).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from shared.hub_spec import HubError, _network_cause, shown_files

__all__ = [
    "GITATTRIBUTES", "PushTarget", "BranchFiles", "list_branch_files", "read_repo_json", "look_read_only",
    "push_errors", "add_push_options", "print_push_result", "token_status",
]

GITATTRIBUTES = ".gitattributes"
"""Every Hub repo starts with one; it is never the content a push classifies, replaces or deletes."""


def token_status() -> str:
    """Whether ``huggingface_hub`` finds a token (``HF_TOKEN`` or a saved login); never the token."""
    try:
        from huggingface_hub import get_token
    except ImportError:
        return "huggingface_hub is not installed: `pip install huggingface_hub` before pushing"
    if get_token():
        return "a Hugging Face token is available (HF_TOKEN or `hf auth login`)"
    return "no Hugging Face token found: run `hf auth login` or set HF_TOKEN before pushing"


class PushTarget:
    """Names and file lines of a push plan; the plan dataclass has ``repo``, ``revision`` and ``files``."""

    repo: str
    revision: str | None
    URL_PREFIX: ClassVar[str] = "https://huggingface.co/"
    """The repo page's prefix: ``.../datasets/`` for a dataset repo."""

    @property
    def files(self) -> list[tuple[str, int]]:  # pragma: no cover - every plan defines it
        raise NotImplementedError

    @property
    def where(self) -> str:
        """``USER/NAME`` or ``USER/NAME@BRANCH``: the target, as messages name it."""
        return self.repo + (f"@{self.revision}" if self.revision else "")

    @property
    def url(self) -> str:
        return self.URL_PREFIX + self.repo + (f"/tree/{self.revision}" if self.revision else "")

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    def file_lines(self) -> list[str]:
        """One line per file with its size (a plan's :meth:`file_list` adds its totals line)."""
        width = max(len(path) for path, _ in self.files)
        return [f"  {path:<{width}}  {size:>15,} bytes" for path, size in self.files]


@dataclass
class BranchFiles:
    """What the target branch holds, before a push classifies it."""

    state: Literal["missing", "empty", "files"]
    """``missing``: no such repo; ``empty``: no commit, or nothing but ``.gitattributes``; ``files``: content."""
    files: list[str] = field(default_factory=list)
    """Every file of the branch, sorted (for a :attr:`new_branch`: of ``main``, which it is created from)."""
    new_branch: bool = False


def list_branch_files(api: Any, repo: str, revision: str | None, repo_type: str) -> BranchFiles:
    """List (read only) the files of branch ``revision`` of ``repo``; a branch the push would create
    lists ``main``'s files, which it starts with."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    new_branch = False
    try:
        files = api.list_repo_files(repo, repo_type=repo_type, revision=revision)
    except GatedRepoError:
        raise  # exists, but this token may not read it: the HTTP error says so
    except RepositoryNotFoundError:
        return BranchFiles("missing")
    except RevisionNotFoundError:
        if revision is None:  # a repo without even its first commit
            return BranchFiles("empty")
        if revision.startswith("refs/"):
            raise  # pull-request refs are not created by a push: the HTTP error names it
        new_branch = True
        files = api.list_repo_files(repo, repo_type=repo_type)
    files = sorted(files)
    state: Literal["empty", "files"] = "files" if [f for f in files if f != GITATTRIBUTES] else "empty"
    return BranchFiles(state, files, new_branch=new_branch)


def read_repo_json(api: Any, repo: str, name: str, repo_type: str, branch: BranchFiles, revision: str | None) -> Any:
    """File ``name`` of the branch listed in ``branch``, parsed as JSON (``ValueError`` when it does not parse).

    Downloaded into a temporary folder, not the HF cache: this copy only decides whether the push may go on.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = api.hf_hub_download(repo, name, repo_type=repo_type,
                                   revision=None if branch.new_branch else revision, local_dir=tmp)
        return json.loads(Path(path).read_text())  # JSONDecodeError and UnicodeDecodeError are ValueErrors


def look_read_only(where: str, notes: list[str], look: Callable[[Any], None]) -> bool:
    """A dry run's look at the repo: ``look(HfApi())`` runs it; whether it ran to the end.

    It is skipped, with a line in ``notes`` saying why, without ``huggingface_hub`` or offline
    (``HF_HUB_OFFLINE=1``: a dry run then checks the local side only, and never reaches the Hub), and cut
    short, likewise, by an HTTP or connection error. A refusal ``look`` raises (``HubError``) goes through.
    """
    try:
        from huggingface_hub import HfApi, constants
        from huggingface_hub.errors import HfHubHTTPError
    except ImportError:
        notes.append(f"huggingface_hub is not installed: what {where} holds was not looked at")
        return False
    if constants.is_offline_mode():
        notes.append(f"offline mode is on (HF_HUB_OFFLINE=1): what {where} holds was not looked at; "
                     "a push looks before uploading anything")
        return False
    try:
        look(HfApi())
    except Exception as e:
        if not (isinstance(e, HfHubHTTPError) or _network_cause(e) is not None):
            raise
        notes.append(f"could not look at what {where} holds ({type(e).__name__}: {e}); "
                     "a push looks again before uploading anything")
        return False
    return True


@contextmanager
def push_errors(where: str, *, checks: str, rerun: str) -> Iterator[None]:
    """Turn what ``huggingface_hub`` raises during a push to ``where`` into :class:`HubError` naming the fix.

    ``checks``: what ``--dry-run`` does offline instead (``check the cache``); ``rerun``: the advice for
    an error worth retrying (``run the same command again: ...``). Anything that is not a Hub or
    connection error is raised as is.
    """
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        yield
    except OfflineModeIsEnabled:
        raise HubError(
            f"cannot push to {where}: offline mode is on (HF_HUB_OFFLINE=1). Unset it and run again, "
            f"or use --dry-run to {checks} and see what would be uploaded"
        ) from None
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            fix = "log in with `hf auth login` or set HF_TOKEN to a token with write access to the repo"
        elif status == 404:
            fix = "check the repo name and that your token (`hf auth login` or HF_TOKEN) can write to it"
        else:
            fix = rerun
        raise HubError(f"push to {where} failed ({type(e).__name__}: {e}); {fix}") from None
    except Exception as e:
        if _network_cause(e) is None:
            raise
        raise HubError(
            f"push to {where} failed: the Hub could not be reached ({type(e).__name__}: {e}); check the "
            f"connection and {rerun}"
        ) from None


def add_push_options(parser: argparse.ArgumentParser, *, repo_type: str, thing: str, dry_run_checks: str) -> None:
    """``--repo``, ``--revision``, ``--private``, ``--dry-run``, ``--force``: the flags both pushes take.

    ``repo_type``: ``dataset`` or ``model``; ``thing``: what is pushed (``cache``, ``dictionary``);
    ``dry_run_checks``: what a dry run checks locally (``verify``, ``check the run``)."""
    parser.add_argument("--repo", required=True, help=f"{repo_type} repo USER/NAME (created if missing)")
    parser.add_argument("--revision", help="branch to push to (created from main if missing; default main)")
    parser.add_argument("--private", action="store_true",
                        help="create the repo private; an existing public repo is refused (it keeps its "
                        "visibility: make it private in its settings first, or drop --private)")
    parser.add_argument("--dry-run", action="store_true",
                        help=f"{dry_run_checks}, print the card, the file list and what the repo holds (looked at, "
                        "read only, unless offline); upload nothing")
    parser.add_argument("--force", action="store_true",
                        help=f"replace what the repo (branch) holds when it is not this {thing}: a different "
                        f"crosscache {thing}, or files that are not one. Without it such a push is refused")


def print_push_result(plan: Any, *, dry_run: bool, then: list[str] | None = None) -> int:
    """Print a push's notes (stderr) and outcome: for a dry run the card, the file list, what the repo
    holds and whether a token is found; else what went up, the commit and what was deleted, then ``then``.
    ``plan``: a cache or dictionary push plan. Returns the exit status, 0."""
    import sys

    for note in plan.notes:
        print(f"note: {note}", file=sys.stderr)
    if dry_run:
        print(plan.card)
        print(f"--- files for {plan.url} ---")
        print(plan.file_list())
        print(f"--- repo ---\n{plan.repo_summary()}")
        print(f"auth: {token_status()}")
        print("dry run: nothing uploaded")
        return 0
    print(f"pushed {len(plan.files)} files ({plan.total_bytes:,} bytes) to {plan.url}"
          + (f"\ncommit: {plan.commit_url}" if plan.commit_url else ""))
    if plan.deletes:
        print(f"deleted from the repo: {shown_files(plan.deletes, 10)}")
    for line in then or []:
        print(line)
    return 0
