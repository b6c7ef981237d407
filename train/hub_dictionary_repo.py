"""What the branch a dictionary push targets holds: :class:`DictionaryRepo`, looked at (read only) first.

Nothing there, or this same dictionary (a ``config.json`` of format ``crosscache.dictionary/1`` with the
same weights sha256: a re-push, which updates the card): the push goes ahead. Another crosscache
dictionary, or files that are not one (a model's own ``README.md`` and weights): refused, naming what is
there, unless ``force`` (:func:`refuse_unless_allowed`). A branch the push creates starts as a copy of
``main``; what it inherits is replaced on the branch only, so that needs no ``force``. ``--private`` into
an existing public repo is refused: ``create_repo(private=True)`` leaves an existing repo as it is.

The model-repo counterpart of :mod:`shared.hub_repo_state` (which classifies dataset repos against a
cache's manifest).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shared.hub_push_common import GITATTRIBUTES, list_branch_files, read_repo_json
from shared.hub_spec import HubError, shown_files

__all__ = ["REPO_TYPE", "DictionaryRepo", "deletions", "inspect_repo", "refuse_unless_allowed"]

REPO_TYPE = "model"
"""Dictionaries go to Hugging Face *model* repos (caches to dataset repos)."""

_CONFIG_NAME = "config.json"
_FORMAT_FAMILY = "crosscache.dictionary/"
_FORCE_HELP = "another --repo, or a --revision naming a new branch"
_OWN_DIR = "analysis/"
"""The report folder a push brings: a re-push that brings a report replaces the old one whole."""


def _describe(config: dict[str, Any]) -> str:
    """A one-line identification of a dictionary from its ``config.json``: kind, latents, slots, weights."""
    cfg = config.get("config") if isinstance(config.get("config"), dict) else {}
    names = [str(n) for n in cfg.get("slot_names", [])]
    act = str(cfg.get("activation")) + (f" k={cfg['k']}" if cfg.get("k") else "")
    return (f"{cfg.get('arch')} {act}, {cfg.get('n_latents')} latents on {shown_files(names, 3)}; weights sha256 "
            f"{str(config.get('weights_sha256'))[:12]}...")


@dataclass
class DictionaryRepo:
    """What the target branch held when the push looked, and what it means for the push."""

    state: str
    """``missing`` (no such repo: created), ``empty`` (nothing but ``.gitattributes``), ``same`` (this same
    dictionary: a re-push), ``other`` (another crosscache dictionary) or ``foreign`` (files that are not one)."""
    files: list[str] = field(default_factory=list)
    """Every file of the branch (for a ``new_branch``: of ``main``, which it is created from)."""
    config: dict[str, Any] | None = None
    """The crosscache dictionary ``config.json`` found there (``same`` and ``other``)."""
    new_branch: bool = False
    problem: str | None = None
    """Why a ``config.json`` found there is not a crosscache dictionary's (state ``foreign``)."""
    private: bool | None = None
    """Whether the existing repo is private, looked up for a ``--private`` push only."""

    @property
    def replaces(self) -> bool:
        """Whether the push replaces content that is not this dictionary."""
        return self.state in ("other", "foreign")

    @property
    def content(self) -> list[str]:
        return [f for f in self.files if f != GITATTRIBUTES]

    def describe_held(self) -> str:
        """What is there, as a noun phrase (``another crosscache dictionary (...)``)."""
        if self.state == "other":
            assert self.config is not None
            return f"another crosscache dictionary ({_describe(self.config)})"
        held = f"{len(self.content)} file(s) that are not a crosscache dictionary ({shown_files(self.content, 6)})"
        return held + (f"; {self.problem}" if self.problem else "")

    def describe(self) -> str:
        """What the branch holds, in words."""
        if self.state == "missing":
            return "the repo does not exist: it is created"
        if self.state == "empty":
            held = "is empty"
        elif self.state == "same":
            assert self.config is not None
            held = f"holds this same dictionary ({_describe(self.config)}): a re-push, which updates the card"
        else:
            held = f"holds {self.describe_held()}"
        if self.new_branch:
            return (f"the branch does not exist: it is created from main, which {held}"
                    + ("; on the new branch that is replaced, main is not changed" if self.replaces else ""))
        return f"it {held}"


def inspect_repo(api: Any, repo: str, revision: str | None, weights_sha256: str, *, private: bool) -> DictionaryRepo:
    """Look (read only) at branch ``revision`` of model repo ``repo`` and classify it against the dictionary
    whose weights have ``weights_sha256``; for a ``private`` push into a repo that exists, also whether it is private."""
    contents = _inspect_branch(api, repo, revision, weights_sha256)
    if private and contents.state != "missing":
        contents.private = getattr(api.repo_info(repo, repo_type=REPO_TYPE), "private", None)
    return contents


def _inspect_branch(api: Any, repo: str, revision: str | None, weights_sha256: str) -> DictionaryRepo:
    branch = list_branch_files(api, repo, revision, REPO_TYPE)
    files, new_branch = branch.files, branch.new_branch
    if branch.state != "files":
        return DictionaryRepo(branch.state, files, new_branch=new_branch)
    if _CONFIG_NAME not in files:
        return DictionaryRepo("foreign", files, new_branch=new_branch)
    try:
        config = read_repo_json(api, repo, _CONFIG_NAME, REPO_TYPE, branch, revision)
    except ValueError as e:
        return DictionaryRepo("foreign", files, new_branch=new_branch, problem=f"its {_CONFIG_NAME} does not read ({e})")
    fmt = config.get("format") if isinstance(config, dict) else None
    if not (isinstance(fmt, str) and fmt.startswith(_FORMAT_FAMILY)):
        return DictionaryRepo("foreign", files, new_branch=new_branch,
                              problem=f"its {_CONFIG_NAME} is not a crosscache dictionary's (format {fmt!r})")
    state = "same" if config.get("weights_sha256") == weights_sha256 else "other"
    return DictionaryRepo(state, files, config=config, new_branch=new_branch)


def deletions(contents: DictionaryRepo | None, uploads: list[str]) -> list[str]:
    """Files of the branch the push's commit deletes: when replacing, all but ``.gitattributes`` and what
    is uploaded; otherwise only the old report's files when the push brings a new report (files it does
    not bring stay: a re-push from a bare export keeps the curves and report an earlier push published)."""
    if contents is None:
        return []
    keep = set(uploads) | {GITATTRIBUTES}
    if contents.replaces:
        return [f for f in contents.files if f not in keep]
    if any(u.startswith(_OWN_DIR) for u in uploads):
        return [f for f in contents.files if f.startswith(_OWN_DIR) and f not in keep]
    return []


def refuse_unless_allowed(contents: DictionaryRepo, where: str, *, private: bool, force: bool, dry_run: bool) -> None:
    """Raise :class:`HubError` when the push would publish into an existing public repo a ``--private`` push,
    or replace what the branch holds without ``force`` (a new branch replaces what it inherits freely)."""
    repo = where.split("@", 1)[0]
    dry = " (dry run: nothing was uploaded)" if dry_run else ""
    if private and contents.state != "missing" and contents.private is not True:
        seen = "is public" if contents.private is False else "exists, and the Hub did not say whether it is private"
        raise HubError(
            f"refusing to push to {where} with --private: the repo {repo} already {seen}, so the dictionary would be "
            f"published for anyone to read. Make the repo private in its settings "
            f"(https://huggingface.co/{repo}/settings) and run again, or drop --private to publish it publicly{dry}"
        )
    if not contents.replaces or contents.new_branch or force:
        return
    raise HubError(
        f"refusing to push to {where}: it holds {contents.describe_held()}, and the push would replace it. Pass "
        f"--force to replace it (the dictionary's files are committed over it and every other file is deleted in the "
        f"same commit; the old files stay in the repo's git history), or push to {_FORCE_HELP}{dry}"
    )
