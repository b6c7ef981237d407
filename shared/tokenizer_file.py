"""The cache's own ``tokenizer.json``: written by the harvest, checked by ``verify``, read by reports.

A harvest saves the tokenizer the models were fed with into the cache folder as
``tokenizer.json`` and lists it in the manifest's ``tokenizer`` object (``file`` and
``file_sha256``), so a cache read on another machine (or downloaded from the Hub) can show
token ids as text without the model folders it was harvested from. The key is optional:
caches harvested before it (or by a slow tokenizer, which has no ``tokenizer.json``) do not
list one, and readers fall back to :func:`find_tokenizer_json`.

``tokenizers`` and ``huggingface_hub`` are imported inside the functions that need them, so
``shared`` imports without them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shared.cache_format import TOKENIZER_NAME
from shared.shard_io import atomic_write_bytes, sha256_file

__all__ = [
    "find_tokenizer_json",
    "foreign_tokenizer_file",
    "listed_tokenizer_file",
    "tokenizer_file_problem",
    "tokenizer_json_bytes",
    "vocab_fingerprint",
    "vocab_sha256",
    "write_tokenizer_file",
]


def listed_tokenizer_file(tokenizer_meta: dict[str, Any]) -> str | None:
    """The cache's own tokenizer file the manifest's ``tokenizer`` object lists (relative), or None."""
    file = tokenizer_meta.get("file")
    return str(file) if file else None


def tokenizer_json_bytes(tokenizer: Any) -> bytes | None:
    """The ``tokenizer.json`` of a fast (Rust-backed) transformers tokenizer, as its
    ``save_pretrained`` writes it; None for a slow tokenizer, which has none."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not getattr(tokenizer, "is_fast", True):
        return None
    # tokenizers serializes vocabularies in id order: the same tokenizer gives the same bytes in
    # every process, which keeps a resumed harvest byte-identical to an uninterrupted one.
    return backend.to_str(pretty=True).encode()


def foreign_tokenizer_file(cache_dir: str | Path, tokenizer: Any, listed: dict[str, Any]) -> str | None:
    """Why ``<cache_dir>/tokenizer.json`` is not the harvest's to overwrite or delete, or None.

    A file the manifest (``listed``: its ``tokenizer`` object, ``{}`` for a fresh harvest) does not
    list, and whose bytes differ from what ``tokenizer`` writes, was put there by someone else: a
    harvest must refuse rather than replace it, and must not remove it when it fails. A file with
    the same bytes is a killed harvest's leftover (or an exact copy), safe to keep using.
    """
    path = Path(cache_dir) / TOKENIZER_NAME
    if listed_tokenizer_file(listed) == TOKENIZER_NAME or not path.is_file():
        return None
    data = tokenizer_json_bytes(tokenizer)
    if data is not None and hashlib.sha256(data).hexdigest() == sha256_file(path):
        return None
    what = "the harvest's tokenizer has none" if data is None else "it is not the harvest's tokenizer"
    return (f"{path} is not this harvest's ({what}) and no manifest lists it, so the harvest would "
            f"overwrite or delete it: move it out of the folder, or choose another --out")


def write_tokenizer_file(cache_dir: str | Path, tokenizer: Any, listed: dict[str, Any],
                         *, say: Callable[[str], None] = print) -> dict[str, str] | None:
    """Save ``tokenizer`` (the harvest's, as fed to the models) as ``<cache_dir>/tokenizer.json``.

    ``listed`` is the manifest's ``tokenizer`` object when resuming (``{}`` for a fresh harvest).
    A file already there with the sha256 it lists is left as it is; a missing or damaged one is
    written again (atomically). Returns the keys to set in the manifest's ``tokenizer`` object
    (``file``, ``file_sha256``), or None for a slow tokenizer (nothing written; ``say`` tells why).
    """
    data = tokenizer_json_bytes(tokenizer)
    if data is None:
        say(f"note: the tokenizer ({type(tokenizer).__name__}) is not a fast tokenizer and has no "
            f"{TOKENIZER_NAME}: the cache holds none, and readers look for it by the manifest's tokenizer path/name")
        return None
    path = Path(cache_dir) / TOKENIZER_NAME
    sha = hashlib.sha256(data).hexdigest()
    was = listed.get("file_sha256") if listed_tokenizer_file(listed) == TOKENIZER_NAME else None
    if was is not None and path.is_file() and sha256_file(path) == was:
        return {"file": TOKENIZER_NAME, "file_sha256": str(was)}  # a resume: the file is whole
    if not (path.is_file() and sha256_file(path) == sha):
        atomic_write_bytes(path, data)
    if was is not None and was != sha:  # only when the tokenizers library serializes differently now
        say(f"note: {path} was rewritten with a new sha256 (the tokenizers library now writes it differently)")
    return {"file": TOKENIZER_NAME, "file_sha256": sha}


def tokenizer_file_problem(cache_dir: str | Path, tokenizer_meta: dict[str, Any], *, checksum: bool = True,
                           sha256: Callable[[Path], str] = sha256_file) -> str | None:
    """What is wrong with the tokenizer file the manifest lists (missing, or its sha256 differs;
    only presence without ``checksum``), naming it; None when it is fine or none is listed. A file
    listed without ``file_sha256`` (another tool's cache) is checked by what it holds: it must load as
    a tokenizer whose vocabulary has the manifest's ``tokenizer.sha256``."""
    file = listed_tokenizer_file(tokenizer_meta)
    if file is None:
        return None
    path = Path(cache_dir) / file
    if not path.is_file():
        return f"{file}: missing"
    expected = tokenizer_meta.get("file_sha256")
    if not checksum:
        return None
    if expected is not None:
        return f"{file}: sha256 mismatch (corrupted)" if sha256(path).lower() != str(expected).lower() else None
    vocab = vocab_fingerprint(path)
    if vocab is None:
        return f"{file}: does not load as a tokenizers tokenizer.json (corrupted, or another kind of file)"
    want = tokenizer_meta.get("sha256")
    if isinstance(want, str) and vocab != want.lower():
        return (f"{file}: its vocabulary (sha256 {vocab[:12]}) is not the one the manifest's tokenizer.sha256 "
                f"names ({want[:12]}): another tokenizer's file")
    return None


def vocab_fingerprint(tokenizer_json: str | Path | bytes) -> str | None:
    """sha256 of a ``tokenizer.json``'s vocabulary (added tokens included; a path, or the file's bytes),
    computed as the manifest's ``tokenizer.sha256`` is (:func:`harvest.models.tokenizer_fingerprint`);
    None if it does not load."""
    try:
        from tokenizers import Tokenizer

        tok = (Tokenizer.from_str(tokenizer_json.decode()) if isinstance(tokenizer_json, bytes)
               else Tokenizer.from_file(str(tokenizer_json)))
        vocab = tok.get_vocab(with_added_tokens=True)
    except Exception:  # noqa: BLE001 - not a tokenizer file, or no tokenizers library: no fingerprint
        return None
    return vocab_sha256(vocab)


def vocab_sha256(vocab: dict[str, int]) -> str:
    """sha256 of a vocabulary (token -> id): the manifest's ``tokenizer.sha256``, the identity row
    alignment relies on."""
    return hashlib.sha256(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode()).hexdigest()


def find_tokenizer_json(tokenizer_meta: dict[str, Any]) -> tuple[Path, str] | None:
    """A ``tokenizer.json`` on this machine for the tokenizer a manifest names, and where it was
    found: in the folder of its ``path``, the folder its ``name`` names, or the Hugging Face cache
    (offline: nothing is downloaded) for a Hub id ``name``. None when there is none."""
    path, name = tokenizer_meta.get("path"), tokenizer_meta.get("name")
    for folder, how in ((path, "the manifest's tokenizer path"), (name, "the manifest's tokenizer name")):
        if folder and (Path(str(folder)) / TOKENIZER_NAME).is_file():
            return Path(str(folder)) / TOKENIZER_NAME, how
    if name and not Path(str(name)).exists():
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(str(name), TOKENIZER_NAME)
        except Exception:  # noqa: BLE001 - not a valid repo id, or no hub library: nothing found
            found = None
        if isinstance(found, str):
            return Path(found), f"the Hugging Face cache ({name})"
    return None
