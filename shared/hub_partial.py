"""Partial views of Hub caches: what :func:`shared.hub_download.resolve_cache` returns for ``max_shards``.

With ``max_shards=N`` the Hub snapshot lacks most shards its manifest lists, so
:func:`~shared.hub_download.resolve_cache` returns a *view*: a small folder
``<repo folder in the HF cache>/crosscache-partial/<commit>-first<N>/`` holding a manifest that
lists only the first N shards (``n_rows`` corrected, ``partial_of`` recording the repo, commit
and the full ``n_shards`` / ``n_rows``), a card for it, and symlinks (hardlinks or copies where
symlinks are not allowed) to the downloaded token table, normalization tensors and shards.
The view is a complete, verifiable cache; it is rebuilt only if missing or damaged, and
removing the repo from the HF cache (``hf cache rm``) removes it too.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from shared.cache_format import CARD_NAME, MANIFEST_NAME, TOKENS_NAME, Manifest
from shared.card import render_card
from shared.hub_fetch import _normalization_file
from shared.hub_spec import PARTIAL_DIR, HubError
from shared.tokenizer_file import listed_tokenizer_file


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


def _view_ok(view: Path, manifest_bytes: bytes, files: list[str], snapshot: Path) -> bool:
    try:
        same = (view / MANIFEST_NAME).read_bytes() == manifest_bytes
    except OSError:
        return False
    for rel in files:
        link = view / rel
        if not link.is_file():
            return False
        # A link must still reach the snapshot's file: a repaired download may live elsewhere now.
        if link.is_symlink() and os.path.realpath(link) != os.path.realpath(snapshot / rel):
            return False
    return same


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
    norm_file = _normalization_file(manifest)
    if norm_file:
        files.append(norm_file)
    tok_file = listed_tokenizer_file(manifest.tokenizer)
    if tok_file:
        files.append(tok_file)
    if _view_ok(view, data, files, snapshot):
        return view
    # One builder at a time (the ranks of a torchrun job open the same view at once): without it, a
    # process that found no view could remove the one another process had just built and is reading.
    with _building(view.parent):
        if _view_ok(view, data, files, snapshot):  # built meanwhile
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
        except OSError:  # a process without the lock (flock unavailable) built it meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
            if not _view_ok(view, data, files, snapshot):
                raise HubError(f"could not build the partial view {view} of {repo}; remove it and run again") from None
    return view


@contextlib.contextmanager
def _building(folder: Path) -> Iterator[None]:
    """An exclusive flock on ``folder/.build.lock`` while a view is (re)built there; where the filesystem has
    no flock, the build goes ahead unlocked (the rename above still keeps every view whole)."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        fd: int | None = os.open(folder / ".build.lock", os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:  # a cache folder this user may not write: build unlocked
        fd = None
    try:
        if fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_EX)  # held for the few ms a build of links takes
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock
