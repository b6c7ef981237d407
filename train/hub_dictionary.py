"""Sharing trained dictionaries on the Hub: :func:`push_dictionary` (``run_train.py push RUN --repo USER/NAME``).

A run's ``export/`` (the dictionary with the cache's normalization folded in) goes to a Hugging Face
**model** repo: ``model.safetensors``, ``config.json``, a generated model card ``README.md``
(:mod:`train.dictionary_card`), and, when the run has them, ``curves.png`` and the analysis report
(``analysis/report.md``, ``report.json`` and its figures, as ``run_train.py analyze`` writes them).
Reading it back is ``train.export.load_dictionary("hf://USER/NAME")`` (:mod:`train.hub_dictionary_fetch`).

Checked before anything goes up: the export is complete (a run still training has none: refused with
the fix) and its weights have the sha256 its ``config.json`` records, and load. A sweep folder holds
many dictionaries and a repo one: it is refused, naming the member folders to push one by one.

Nothing of the pusher's machine goes up: ``config.json``, the card and the report's text files are
published through :mod:`shared.redact` (home folder ``~/...``, user ``<user>``, host ``<host>``); the
token is left to ``huggingface_hub`` (``HF_TOKEN`` or ``hf auth login``), never passed or printed.

Like the cache push (:mod:`shared.hub_upload`, whose error wording and token status this reuses), the
push looks at the branch first (:mod:`train.hub_dictionary_repo`): nothing there, or this same dictionary
(same weights sha256: a re-push, which updates the card), goes ahead; another dictionary or unrelated
files are replaced only with ``force``. Everything goes up in one ``create_commit``, so a repo never
shows half a dictionary.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.folder_lock import holder_summary
from shared.hub_push_common import PushTarget, add_push_options, look_read_only, print_push_result, push_errors
from shared.hub_spec import _COMMIT_RE, _REPO_HELP, HubError, _is_repo_id, shown_files
from shared.redact import MachineNames, redact_machine, redact_text
from shared.shard_io import sha256_file
from train.dictionary_card import read_facts, render_dictionary_card
from train.export import CONFIG_NAME, EXPORT_FORMAT, WEIGHTS_NAME, load_dictionary
from train.hub_dictionary_repo import REPO_TYPE, DictionaryRepo, deletions, inspect_repo, refuse_unless_allowed

__all__ = ["DictionaryPushPlan", "find_export", "push_cli", "push_dictionary"]

CARD_NAME = "README.md"
CURVES_NAME = "curves.png"
ANALYSIS_DIR = "analysis"
# What `run_train.py analyze` writes into RUN/analysis/: report.md, report.json and PNG figures.
_ANALYSIS_PATTERNS = ("report.md", "report.json", "*.png")


def _run_hint(run_dir: Path) -> str:
    if (holder := holder_summary(run_dir)) is not None:
        return f"a training job ({holder}) holds it now: push when it has finished"
    return ("re-run the same `python run_train.py` command: it resumes from the newest checkpoint and exports "
            "at the end; then push")


def _is_run(path: Path) -> bool:
    """Whether ``path`` is a run folder (its ``config.json`` holds the resolved dictionary) or was one in the making."""
    if (path / "checkpoints").is_dir() or (path / "export").is_dir():
        return True
    try:
        return "dictionary" in json.loads((path / CONFIG_NAME).read_text())
    except (OSError, ValueError, TypeError):
        return False


def find_export(path: str | Path) -> tuple[Path, Path | None]:
    """(export folder, run folder or None) of a run folder or a bare export folder.

    Raises ``FileNotFoundError`` / ``ValueError`` naming the fix: a run with no export yet (training not
    finished), the normalized-space ``dictionary/``, a sweep folder (its members are listed), or a folder
    that is none of these.
    """
    if str(path).startswith("hf://"):  # Path() would fold it into "hf:/..."
        raise ValueError(f"{path} is already on the Hub: push publishes a run folder or export/ on this machine")
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such folder (pass a run folder, the --out of run_train.py, or its export/)")
    cfg = path / CONFIG_NAME
    try:
        own = json.loads(cfg.read_text()) if cfg.is_file() else None
    except ValueError:
        own = None
    if isinstance(own, dict) and str(own.get("format", "")).startswith("crosscache.dictionary/"):
        if own.get("metadata", {}).get("space") == "normalized":
            raise ValueError(f"{path} holds the dictionary as trained, on normalized activations; push the run folder "
                             f"({path.parent}) or its export/, which takes raw activations (normalization folded in)")
        run = path.parent if _is_run(path.parent) and (path.parent / "export").resolve() == path.resolve() else None
        return path, run
    if (path / "export" / CONFIG_NAME).is_file():
        return path / "export", path
    if (path / "export").is_dir():
        raise FileNotFoundError(f"{path}/export has no {CONFIG_NAME}: its export was interrupted; {_run_hint(path)}")
    if _is_run(path):
        raise FileNotFoundError(f"{path} has no export/ yet: training has not finished; {_run_hint(path)}")
    members = sorted(p for p in path.iterdir() if p.is_dir() and _is_run(p))
    if members:
        done = [p for p in members if (p / "export" / CONFIG_NAME).is_file()]
        todo = [p.name for p in members if p not in done]
        raise ValueError(
            f"{path} is a sweep folder of {len(members)} runs, and a Hub repo holds one dictionary: push each member "
            "to its own repo, e.g. " + "; ".join(f"python run_train.py push {p} --repo USER/NAME-{p.name}"
                                                 for p in (done or members)[:3])
            + (f" (members: {shown_files([p.name for p in members], 10)})" if len(members) > 3 else "")
            + (f". Not finished yet: {shown_files(todo, 10)}" if todo else "")
        )
    raise FileNotFoundError(f"{path} is not a run folder (no config.json of a run, no export/), an export folder "
                            f"({CONFIG_NAME} of format {EXPORT_FORMAT!r}) or a sweep folder of runs")


@dataclass
class DictionaryPushPlan(PushTarget):
    """What :func:`push_dictionary` uploads (or, with ``dry_run``, would upload)."""

    export_dir: Path
    run_dir: Path | None
    repo: str
    revision: str | None
    private: bool
    force: bool
    dry_run: bool
    weights_sha256: str
    card: str
    """The model card uploaded as ``README.md``."""
    uploads: dict[str, bytes | Path] = field(default_factory=dict)
    """``path in repo -> content``: bytes for what is generated or redacted, a local file otherwise."""
    notes: list[str] = field(default_factory=list)
    redacted: list[str] = field(default_factory=list)
    """Where the published files name this machine's home folder, user or host (published redacted)."""
    contents: DictionaryRepo | None = None
    """What the branch held before the push (None: not looked at, a dry run offline; see ``notes``)."""
    deletes: list[str] = field(default_factory=list)
    commit_url: str | None = None

    @property
    def files(self) -> list[tuple[str, int]]:
        """``(path in repo, bytes)`` of every file uploaded, in commit order."""
        return [(p, len(c) if isinstance(c, bytes) else c.stat().st_size) for p, c in self.uploads.items()]

    def content(self, path: str) -> bytes:
        """What the push uploads as ``path``."""
        c = self.uploads[path]
        return c if isinstance(c, bytes) else c.read_bytes()

    def file_list(self) -> str:
        """One line per file with its size, then the totals."""
        lines = self.file_lines()
        lines.append(f"{len(self.files)} files, {self.total_bytes:,} bytes, in one commit")
        return "\n".join(lines)

    def repo_summary(self) -> str:
        """What the push does to the repo: what the branch holds, what is replaced and deleted."""
        if self.contents is None:
            return f"{self.where}: not checked (see the notes); a push checks it before uploading anything"
        lines = [f"{self.where}: {self.contents.describe()}"]
        if self.contents.replaces:
            why = "new branch" if self.contents.new_branch else "--force"
            lines.append(f"replaced ({why}): the dictionary's files are committed over it and every other file is "
                         "deleted in the same commit (it stays in the repo's history)")
        if self.deletes:
            lines.append(f"deleted: {len(self.deletes)} file(s): {shown_files(self.deletes, 10)}")
        return "\n".join(lines)


def _published_json(path: Path, names: MachineNames, where: str, redacted: list[str], **dump: object) -> bytes:
    """``path``'s JSON as published: redacted, the bytes unchanged when nothing needs it."""
    raw = path.read_bytes()
    obj, changed = redact_machine(json.loads(raw), names)
    if not changed:
        return raw
    redacted += [f"{where}: {c}" for c in changed]
    return (json.dumps(obj, **dump) + "\n").encode()  # type: ignore[arg-type]


def _analysis_files(run_dir: Path | None) -> list[Path]:
    folder = run_dir / ANALYSIS_DIR if run_dir else None
    if folder is None or not (folder / "report.md").is_file():
        return []
    found = {p for pattern in _ANALYSIS_PATTERNS for p in folder.glob(pattern) if p.is_file()}
    order = [".md", ".json", ".png"]  # the report, its numbers, its figures
    return sorted(found, key=lambda p: (order.index(p.suffix), p.name))


def push_dictionary(
    path: str | Path,
    repo: str,
    *,
    private: bool = False,
    revision: str | None = None,
    dry_run: bool = False,
    force: bool = False,
) -> DictionaryPushPlan:
    """Check a run's dictionary and upload it to the Hub model repo ``repo`` (``USER/NAME``), in one commit.

    ``path``: a run folder (its ``export/``) or an export folder. Refused (``FileNotFoundError`` /
    ``ValueError``) when there is no finished export, or its weights do not match the sha256 its
    ``config.json`` records. Goes to branch ``revision`` (created from ``main`` if missing) of a repo
    created if missing (``private`` applies on creation; into an existing public repo it is refused,
    :class:`HubError`). When the branch holds another dictionary or files that are not one, the push is
    refused (:class:`HubError`, naming what is there) unless ``force``. ``dry_run`` uploads nothing: it
    returns the plan (card, files) and, unless offline, looks at the repo read only, refusing as a push would.
    """
    if not _is_repo_id(repo):
        raise ValueError(f"--repo {repo!r} is not a Hub model repo id: expected {_REPO_HELP}, e.g. alice/toy-diff-cc")
    if revision is not None and (not revision.strip() or _COMMIT_RE.fullmatch(revision)):
        raise ValueError(f"--revision {revision!r} must be a branch name to push to (not a commit hash)")
    export_dir, run_dir = find_export(path)
    weights = export_dir / WEIGHTS_NAME
    config = json.loads((export_dir / CONFIG_NAME).read_text())
    want = str(config.get("weights_sha256"))
    if not weights.is_file():
        raise FileNotFoundError(f"refusing to push {export_dir}: {WEIGHTS_NAME} is missing (an interrupted export?); "
                                f"delete {export_dir} and {_run_hint(run_dir) if run_dir else 'export it again'}")
    if sha256_file(weights) != want:
        fix = (f"delete {export_dir} and re-run the same `python run_train.py` command: it exports again from the "
               "final checkpoint" if run_dir else "export it again from its run")
        raise ValueError(f"refusing to push {export_dir}: {WEIGHTS_NAME} does not match the weights_sha256 its "
                         f"{CONFIG_NAME} records ({want[:12]}...): the export was edited or torn. To fix: {fix}")
    load_dictionary(export_dir)  # the tensors fit the config: what readers will do with it

    names = MachineNames.here()
    redacted: list[str] = []
    uploads: dict[str, bytes | Path] = {
        CONFIG_NAME: _published_json(export_dir / CONFIG_NAME, names, CONFIG_NAME, redacted, indent=2,
                                     sort_keys=True, allow_nan=False),
        WEIGHTS_NAME: weights,
    }
    extras: dict[str, bytes | Path] = {}
    if run_dir is not None and (run_dir / CURVES_NAME).is_file():
        extras[CURVES_NAME] = run_dir / CURVES_NAME
    for f in _analysis_files(run_dir):
        rel = f"{ANALYSIS_DIR}/{f.name}"
        if f.suffix == ".json":
            extras[rel] = _published_json(f, names, rel, redacted, indent=1, allow_nan=False)
        elif f.suffix == ".md":
            text = f.read_text()
            extras[rel] = redact_text(text, names).encode()
            if extras[rel] != text.encode():
                redacted.append(rel)
        else:
            extras[rel] = f
    published = json.loads(uploads[CONFIG_NAME])
    facts = read_facts(export_dir, run_dir, published, list(extras))
    card = render_dictionary_card(facts, repo=repo, revision=revision, names=names)
    plan = DictionaryPushPlan(export_dir=export_dir, run_dir=run_dir, repo=repo, revision=revision, private=private,
                              force=force, dry_run=dry_run, weights_sha256=want, card=card,
                              uploads={CARD_NAME: card.encode(), **uploads, **extras}, redacted=redacted)
    if redacted:
        plan.notes.append(f"{len(redacted)} field(s) of the published files name this machine's home folder, user or "
                          f"host: published as ~/..., <user>, <host> ({shown_files(redacted, 6)}); the local files "
                          "are not changed")
    if dry_run:
        _look_for_dry_run(plan)
    else:
        _upload(plan)
    return plan


def _look_for_dry_run(plan: DictionaryPushPlan) -> None:
    """A dry run's read-only look at the repo; raises the refusal a push would raise."""

    def look(api: Any) -> None:
        plan.contents = inspect_repo(api, plan.repo, plan.revision, plan.weights_sha256, private=plan.private)

    if look_read_only(plan.where, plan.notes, look) and plan.contents is not None:
        plan.deletes = deletions(plan.contents, list(plan.uploads))
        refuse_unless_allowed(plan.contents, plan.where, private=plan.private, force=plan.force, dry_run=True)


def _upload(plan: DictionaryPushPlan) -> None:
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    api = HfApi()  # token: HF_TOKEN or the saved login, read by huggingface_hub itself
    rerun = ("run the same command again (nothing was committed: the repo's files are as they were, though a "
             "new repo or branch may have been created empty)")
    with push_errors(plan.where, checks="check the run", rerun=rerun):
        # Look before touching anything: a refused push leaves the repo as it was (no repo or branch made).
        contents = plan.contents = inspect_repo(api, plan.repo, plan.revision, plan.weights_sha256,
                                                private=plan.private)
        refuse_unless_allowed(contents, plan.where, private=plan.private, force=plan.force, dry_run=False)
        adds = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=c if isinstance(c, bytes) else str(c))
                for p, c in plan.uploads.items()]
        # huggingface_hub hashed each file as it built its operation: the weights going up must be the ones checked.
        sent = next(op for op in adds if op.path_in_repo == WEIGHTS_NAME).upload_info.sha256.hex()
        if sent != plan.weights_sha256:
            raise ValueError(f"refusing to push {plan.export_dir}: {WEIGHTS_NAME} changed while the push ran "
                             "(is a training job writing it?); run the push again when it is done")
        api.create_repo(plan.repo, repo_type=REPO_TYPE, private=plan.private, exist_ok=True)
        if plan.revision and not plan.revision.startswith("refs/"):
            api.create_branch(plan.repo, branch=plan.revision, repo_type=REPO_TYPE, exist_ok=True)
        plan.deletes = deletions(contents, list(plan.uploads))
        info = api.create_commit(
            plan.repo,
            repo_type=REPO_TYPE,
            revision=plan.revision,
            operations=[*adds, *[CommitOperationDelete(path_in_repo=f) for f in plan.deletes]],
            commit_message=f"crosscache: dictionary (weights sha256 {plan.weights_sha256[:12]})",
        )
    if contents.replaces:
        plan.notes.append(f"replaced {contents.describe_held()} that {'main' if contents.new_branch else plan.where} "
                          "held" + (f", on the new branch {plan.revision} only" if contents.new_branch else ""))
    plan.commit_url = getattr(info, "commit_url", None)


def push_cli(argv: list[str]) -> int:
    """``run_train.py push RUN_DIR --repo USER/NAME [--revision B] [--private] [--dry-run] [--force]``."""
    import argparse

    parser = argparse.ArgumentParser(allow_abbrev=False, 
        prog="run_train.py push",
        description="Check a trained run's dictionary (its export/) and upload it to a Hugging Face model repo in one "
        "commit, with a generated model card, curves.png and the analysis report if the run has them. The token "
        "comes from HF_TOKEN or `hf auth login`.",
    )
    parser.add_argument("run", help="run folder (the --out of run_train.py) or its export/ folder")
    add_push_options(parser, repo_type="model", thing="dictionary", dry_run_checks="check the run")
    args = parser.parse_args(argv)
    try:
        plan = push_dictionary(args.run, args.repo, private=args.private, revision=args.revision,
                               dry_run=args.dry_run, force=args.force)
    except (HubError, ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return print_push_result(plan, dry_run=args.dry_run,
                             then=[f'load it with: load_dictionary("hf://{plan.where}")  # from train.export'])
