"""Token ids -> text for the report's top-activating contexts: the cache's tokenizer (read offline)
and the window of text around a firing token.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from shared.tokenizer_file import find_tokenizer_json, listed_tokenizer_file, tokenizer_file_problem

__all__ = ["load_token_decoder"]


def load_token_decoder(tokenizer_meta: dict[str, Any], cache_dir: str | Path | None = None
                       ) -> Callable[[int], str] | None:
    """A token-id -> text function from the cache manifest's tokenizer: the cache's own ``tokenizer.json``
    (in ``cache_dir``, when the manifest lists one), else the one in its local folder or in the Hugging Face
    cache (offline). None when there is none (contexts then show ids)."""
    candidates: list[Path] = []
    own = listed_tokenizer_file(tokenizer_meta)
    # The cache's own copy first: it is the very tokenizer the models were fed with, and it travels
    # with the cache (a model folder named in the manifest may be on another machine, or changed).
    # One that is not the file the manifest lists (swapped, damaged) would decode wrong text: skipped.
    if cache_dir is not None and own is not None and tokenizer_file_problem(cache_dir, tokenizer_meta) is None:
        candidates.append(Path(cache_dir) / own)
    found = find_tokenizer_json(tokenizer_meta)
    if found is not None:
        candidates.append(found[0])
    tok = None
    for file in candidates:
        try:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(file))
            break
        except Exception:  # noqa: BLE001, S112 - missing, damaged, or no tokenizers library: try the next, else ids
            continue
    if tok is None:
        return None
    memo: dict[int, str] = {}

    def decode(i: int) -> str:
        if i not in memo:
            memo[i] = tok.decode([i], skip_special_tokens=False)
        return memo[i]

    return decode


def _clean(text: str) -> str:
    return text.replace("\r", "").replace("\n", "⏎").replace("\t", "⇥").replace("```", "ʼʼʼ")


def _context(ids: list[int], pos: int, decode: Callable[[int], str] | None, before: int, after: int
             ) -> dict[str, Any]:
    """Text around position ``pos`` of a sequence; BOS (position 0) is left out."""
    def text(tokens: list[int]) -> str:
        if decode is None:
            return "".join(f"<{t}>" for t in tokens)
        return _clean("".join(decode(t) for t in tokens))

    lo = max(1, pos - before)
    return {"before": text(ids[lo:pos]), "token": text([ids[pos]]), "after": text(ids[pos + 1: pos + 1 + after]),
            "token_id": int(ids[pos]),
            # Whether the sequence goes on past what is shown (report.md marks that with "…").
            "cut_before": lo > 1, "cut_after": pos + 1 + after < len(ids)}
