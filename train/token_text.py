"""Token ids -> text for the report's top-activating contexts: the cache's tokenizer (read offline)
and the window of text around a firing token.

A window is decoded as a whole and then cut at the firing token, never decoded token by token and
joined: a byte-level BPE token can hold part of a UTF-8 character (``é`` is two tokens in GPT-2's
vocabulary, each of which alone decodes to U+FFFD), and a SentencePiece decoder drops the leading
space of whatever it decodes (``▁brown`` alone is ``brown``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shared.tokenizer_file import find_tokenizer_json, listed_tokenizer_file, tokenizer_file_problem

__all__ = ["TokenDecoder", "contexts", "load_token_decoder", "no_decoder_note"]

# Tokens decoded beyond each end of a shown window: a UTF-8 character is at most 4 bytes, so a character
# that a window's edge splits (one byte-level token per byte at worst) is whole within 3 more tokens.
_MARGIN = 3
_SPLIT = "\ufffd"  # what a decoder makes of the bytes of a character it got only part of


class TokenDecoder:
    """Token ids -> text with a ``tokenizers.Tokenizer``: ``decoder(i)`` for one id, and
    :meth:`decode_batch` for whole windows (special tokens kept: they are part of what the model read)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        # Without a decoder, tokenizers joins tokens with spaces: the space is a separator, not the token's.
        self.joins_with_space = tokenizer.decoder is None

    def __call__(self, i: int) -> str:
        return self._tok.decode([i], skip_special_tokens=False)

    def decode_batch(self, seqs: list[list[int]]) -> list[str]:
        return self._tok.decode_batch(seqs, skip_special_tokens=False)


def load_token_decoder(tokenizer_meta: dict[str, Any], cache_dir: str | Path | None = None) -> TokenDecoder | None:
    """A :class:`TokenDecoder` from the cache manifest's tokenizer: the cache's own ``tokenizer.json``
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
    for file in candidates:
        try:
            from tokenizers import Tokenizer

            return TokenDecoder(Tokenizer.from_file(str(file)))
        except Exception:  # noqa: BLE001, S112 - missing, damaged, or no tokenizers library: try the next, else ids
            continue
    return None


def no_decoder_note(tokenizer_meta: dict[str, Any], cache_dir: str | Path | None = None) -> str:
    """Why :func:`load_token_decoder` found no tokenizer, for the report's notes: the cache's own file named
    when it is listed (a damaged copy is the cache's fault, not the model name's), the manifest's tokenizer
    ``name``/``path`` only when it gives one."""
    own = listed_tokenizer_file(tokenizer_meta)
    why = []
    if own is not None and cache_dir is not None:
        problem = tokenizer_file_problem(cache_dir, tokenizer_meta)
        why.append(f"the cache's own {own} is unusable ({problem})" if problem
                   else f"the cache's own {Path(cache_dir) / own} does not load as a tokenizers tokenizer.json")
    names = [str(v) for v in (tokenizer_meta.get("name"), tokenizer_meta.get("path")) if v]
    if names:
        why.append(f"no tokenizer.json for {' or '.join(map(repr, names))} was found offline")
    elif own is None:
        why.append("the manifest's tokenizer object lists no file, path or name to find one by")
    return "; ".join(why) + ": contexts show token ids as <id>"


def _clean(text: str) -> str:
    return text.replace("\r", "").replace("\n", "⏎").replace("\t", "⇥").replace("```", "ʼʼʼ")


def _boundary(full: str, prefix: str) -> tuple[int, int]:
    """Where a token boundary falls in ``full`` (a decoded window), given ``prefix``, the decoded tokens
    before it (same start): ``(lo, hi)`` character offsets, equal unless the boundary splits a character,
    which then is ``full[lo:hi]`` (the prefix ends in U+FFFD where ``full`` has the whole character)."""
    if full.startswith(prefix):
        return len(prefix), len(prefix)
    n = 0
    for a, b in zip(prefix, full):
        if a != b:
            break
        n += 1
    if n < len(full) and prefix[n:].strip(_SPLIT) == "":
        return n, n + 1
    return n, n  # the decoder rewrote text across the boundary (e.g. WordPiece cleanup): best effort


def contexts(windows: list[tuple[list[int], int]], decoder: TokenDecoder | None, before: int, after: int
             ) -> list[dict[str, Any]]:
    """Text around position ``pos`` of each ``(ids, pos)`` sequence: ``before`` tokens, the token, ``after``
    tokens (BOS, position 0, is left out). Decoded a window at a time (one batch for all windows) and cut
    at the token's edges; a character the token shares with a neighbour is shown whole, within the token."""
    spans = [(max(1, pos - before), min(len(ids), pos + 1 + after)) for ids, pos in windows]
    if decoder is None:
        parts = [tuple("".join(f"<{t}>" for t in part) for part in (ids[lo:pos], [ids[pos]], ids[pos + 1: hi]))
                 for (ids, pos), (lo, hi) in zip(windows, spans)]
    else:
        seqs: list[list[int]] = []
        for (ids, pos), (lo, hi) in zip(windows, spans):
            a = max(1, lo - _MARGIN)  # decoded from a bit further out, so characters at the window's edges are whole
            seqs += [ids[a: min(len(ids), hi + _MARGIN)], ids[a:lo], ids[a:pos], ids[a: pos + 1], ids[a:hi]]
        texts = decoder.decode_batch(seqs)
        parts = [_cut(texts[5 * i: 5 * i + 5], decoder.joins_with_space) for i in range(len(windows))]
    return [{"before": b, "token": t, "after": f, "token_id": int(ids[pos]),
             # Whether the sequence goes on past what is shown (report.md marks that with "…").
             "cut_before": lo > 1, "cut_after": hi < len(ids)}
            for (b, t, f), (ids, pos), (lo, hi) in zip(parts, windows, spans)]


def _cut(texts: list[str], joins_with_space: bool) -> tuple[str, str, str]:
    """(before, token, after) of one window from ``texts``: the window decoded with its margins, then the
    same start decoded up to the window's start, the token, past the token and the window's end."""
    full, *prefixes = texts
    (start, _), (tok_lo, _), (_, tok_hi), (_, end) = (_boundary(full, p) for p in prefixes)
    if joins_with_space:  # the space before a token is the join's: it goes with the text before
        start += full[start: start + 1] == " "
        tok_lo += full[tok_lo: tok_lo + 1] == " "
    tok_lo = max(start, tok_lo)
    tok_hi = max(tok_lo, tok_hi)
    end = max(tok_hi, end)
    return _clean(full[start:tok_lo]), _clean(full[tok_lo:tok_hi]), _clean(full[tok_hi:end])
