"""Built-in text corpora that every CPython carries, so tests and the demo need no network.

- ``docs``: the prose of ``pydoc_data.topics`` (the language reference topics), cut into
  documents of about ``DOC_CHARS`` characters at paragraph boundaries.
- ``code``: Python source of the standard library (tests and site-packages excluded), cut the
  same way at blank lines.
- ``mixed``: both, interleaved so that each source contributes the same number of characters;
  it ends when the smaller source (prose) runs out.

Every document is a dict ``{"text": str, "source": "docs" | "code", "doc_id": str}``. The
train/eval split is by topic (prose) or by file (code), decided by a stable hash, so held-out
documents come from topics and files the toy models never saw.
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path
from typing import Literal

__all__ = ["BUILTIN_NAMES", "builtin_documents", "prose_topics", "stdlib_source_files"]

BUILTIN_NAMES = ("docs", "code", "mixed")
Split = Literal["train", "eval", "all"]

DOC_CHARS = 2000
"""Target document length. Small enough that prose and code interleave finely in ``mixed``."""

EVAL_FRACTION = 0.1
"""Share of topics / files held out for evaluation (by stable hash)."""

_EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def _is_eval(key: str) -> bool:
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < EVAL_FRACTION


def _keep(key: str, split: Split) -> bool:
    if split == "all":
        return True
    return _is_eval(key) == (split == "eval")


def _chunk(text: str, target: int = DOC_CHARS) -> list[str]:
    """Cut text at blank lines into pieces of roughly ``target`` characters (never empty)."""
    pieces, current, size = [], [], 0
    for para in text.split("\n\n"):
        current.append(para)
        size += len(para) + 2
        if size >= target:
            pieces.append("\n\n".join(current))
            current, size = [], 0
    if current and "\n\n".join(current).strip():
        pieces.append("\n\n".join(current))
    return [p for p in pieces if p.strip()]


def prose_topics() -> dict[str, str]:
    """Topic name -> prose text from ``pydoc_data.topics`` (ships with CPython)."""
    from pydoc_data.topics import topics

    return dict(sorted(topics.items()))


def stdlib_source_files() -> list[Path]:
    """The standard library's ``.py`` files, sorted, without tests and third-party packages."""
    root = Path(os.__file__).resolve().parent
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _EXCLUDED_DIRS]  # prune: never walk site-packages at all
        files.extend(Path(folder) / n for n in names if n.endswith(".py"))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _docs(split: Split) -> list[dict]:
    out = []
    for topic, text in prose_topics().items():
        if not _keep("docs/" + topic, split):
            continue
        for i, piece in enumerate(_chunk(text)):
            out.append({"text": piece, "source": "docs", "doc_id": f"docs/{topic}/{i}"})
    return out


def _code(split: Split) -> list[dict]:
    root = Path(os.__file__).resolve().parent
    out = []
    for path in stdlib_source_files():
        rel = path.relative_to(root).as_posix()
        if not _keep("code/" + rel, split):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a handful of stdlib files are not UTF-8; skipping them is harmless
        for i, piece in enumerate(_chunk(text)):
            out.append({"text": piece, "source": "code", "doc_id": f"code/{rel}/{i}"})
    return out


def builtin_documents(name: str, split: Split = "train", seed: int = 0) -> list[dict]:
    """Documents of a built-in corpus in a seeded order.

    ``name`` is ``docs``, ``code`` or ``mixed`` (``builtin:`` prefix allowed). ``split`` is
    ``train`` (about 90%), ``eval`` (the held-out topics/files) or ``all``.
    """
    name = name.removeprefix("builtin:")
    if name not in BUILTIN_NAMES:
        raise ValueError(
            f"unknown built-in dataset 'builtin:{name}'; choose one of "
            + ", ".join(f"builtin:{n}" for n in BUILTIN_NAMES)
        )
    if split not in ("train", "eval", "all"):
        raise ValueError(f"split must be 'train', 'eval' or 'all' for built-in data, got {split!r}")
    rng = random.Random(f"{name}-{split}-{seed}")
    if name == "docs":
        docs = _docs(split)
        rng.shuffle(docs)
        return docs
    if name == "code":
        docs = _code(split)
        rng.shuffle(docs)
        return docs
    prose, code = _docs(split), _code(split)
    rng.shuffle(prose)
    rng.shuffle(code)
    # Interleave by characters: take from whichever source is behind; stop when prose runs out.
    mixed, chars = [], {"docs": 0, "code": 0}
    pi = ci = 0
    while pi < len(prose) and ci < len(code):
        if chars["docs"] <= chars["code"]:
            doc, pi = prose[pi], pi + 1
        else:
            doc, ci = code[ci], ci + 1
        chars[doc["source"]] += len(doc["text"])
        mixed.append(doc)
    return mixed
