"""Token ids -> text for the report's top-activating contexts: the cache's tokenizer (read offline)
and the window of text around a firing token.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["load_token_decoder"]


def load_token_decoder(tokenizer_meta: dict[str, Any]) -> Callable[[int], str] | None:
    """A token-id -> text function from the cache manifest's tokenizer: ``tokenizer.json`` in its local
    folder or in the Hugging Face cache (offline). None when there is none (contexts then show ids)."""
    path, name = tokenizer_meta.get("path"), tokenizer_meta.get("name")
    file: str | None = None
    if path and (Path(path) / "tokenizer.json").is_file():
        file = str(Path(path) / "tokenizer.json")
    elif name and not Path(name).exists():
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(name, "tokenizer.json")
            file = found if isinstance(found, str) else None
        except Exception:  # not a valid repo id, no hub library: show ids
            file = None
    if file is None:
        return None
    try:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(file)
    except Exception:
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
