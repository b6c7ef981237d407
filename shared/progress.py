"""Progress bars that also read well in a log file.

In a terminal or a notebook a tqdm bar redraws itself in place, about ten times a second. Written to
a file (a SLURM job's log, ``nohup``, ``make test > log``), every redraw is kept, joined by carriage
returns: an hour's training left ~4 MB of one "line" (a redraw per 0.1 s, ~110 bytes each) that
``less`` shows as ``^M`` runs, and the messages around it were hard to find. Where the bar's stream is not a terminal, :func:`tqdm` prints
the bar as a whole line at most every :data:`LOG_INTERVAL_S` seconds instead (and its last state
when it ends), so a job's log reads as a timeline of tokens, tokens/s and ETA.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

__all__ = ["INTERVAL_ENV", "LOG_INTERVAL_S", "log_interval_s", "tqdm", "transformers_bars_as_ours",
           "writes_to_terminal"]

# A line every 30 s: a two-hour job logs ~240 lines of progress, and a stalled one shows within half a minute.
LOG_INTERVAL_S = 30.0
INTERVAL_ENV = "CROSSCACHE_PROGRESS_INTERVAL"


def log_interval_s() -> float:
    """Seconds between a log file's progress lines: ``CROSSCACHE_PROGRESS_INTERVAL`` if set, else 30."""
    raw = os.environ.get(INTERVAL_ENV)
    if raw is None or not raw.strip():
        return LOG_INTERVAL_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{INTERVAL_ENV}={raw!r}: expected a number of seconds >= 0 (the default is "
                         f"{LOG_INTERVAL_S:g})")
    return value


def writes_to_terminal(stream: Any) -> bool:
    """Whether a bar on ``stream`` is redrawn in place: a terminal, or a Jupyter kernel's stream (not a
    TTY, yet it honours carriage returns)."""
    if "ipykernel" in sys.modules:
        return True
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class _LineStream:
    """A text stream for tqdm that turns each in-place redraw (``"\\r" + bar + padding``) into one line,
    and drops the blank redraws that clear a bar. It has no ``encoding``, so tqdm draws the bar in
    ASCII (``#``): a log is read with tools that may not decode UTF-8 block characters."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False


def tqdm(iterable: Any = None, **kwargs: Any) -> Any:
    """A ``tqdm.tqdm`` bar (same arguments) that prints whole lines, at most every :func:`log_interval_s`
    seconds, where its stream (``file``, default stderr) is not a terminal; in a terminal, as tqdm draws it."""
    from tqdm import tqdm as tqdm_bar

    stream = kwargs.get("file") or sys.stderr
    if not kwargs.get("disable") and not writes_to_terminal(stream):
        interval = log_interval_s()
        kwargs["file"] = _LineStream(stream)
        # maxinterval too: tqdm's monitor thread otherwise forces a redraw every 10 s.
        kwargs.setdefault("mininterval", interval)
        kwargs.setdefault("maxinterval", max(interval, kwargs["mininterval"]))
        # No terminal width to read: a fixed one (a bar of ~50 characters), not tqdm's 10-character bar.
        kwargs["dynamic_ncols"] = False
        kwargs.setdefault("ncols", 100)
    return tqdm_bar(iterable, **kwargs)


@contextmanager
def transformers_bars_as_ours() -> Iterator[None]:
    """While inside, transformers' own bars (its "Loading weights" bar, one per model load) follow
    :func:`tqdm`'s rule: whole lines in a log file, drawn as before in a terminal or a notebook. Left as
    they are where transformers has no ``set_tqdm_hook`` or a hook is set already (the caller's own)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    set_hook = getattr(hf_logging, "set_tqdm_hook", None)
    if set_hook is None:
        yield
        return

    def hook(factory: Any, args: tuple, kwargs: dict) -> Any:
        stream = kwargs.get("file") or sys.stderr
        if not hf_logging.is_progress_bar_enabled() or len(args) > 1 or writes_to_terminal(stream):
            return factory(*args, **kwargs)  # disabled (an empty shim), or drawn as transformers draws it
        return tqdm(*args, **kwargs)

    previous = set_hook(hook)
    if previous is not None:  # the caller's own hook: theirs stays
        set_hook(previous)
    try:
        yield
    finally:
        set_hook(previous)
