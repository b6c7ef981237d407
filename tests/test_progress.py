"""Progress bars: redrawn in place in a terminal, whole lines at an interval in a log file."""

from __future__ import annotations

import io
import sys

import pytest

from shared.progress import INTERVAL_ENV, tqdm, transformers_bars_as_ours


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def run_bar(stream, n: int = 500, **kwargs) -> str:
    for _ in tqdm(range(n), file=stream, desc="work", unit="tok", **kwargs):
        pass
    return stream.getvalue()


def test_a_log_file_gets_the_first_and_last_state_as_lines(monkeypatch):
    monkeypatch.setenv(INTERVAL_ENV, "1000")
    out = run_bar(io.StringIO())
    assert "\r" not in out
    lines = out.splitlines()
    assert len(lines) == 2 and out.endswith("\n")
    assert lines[0].startswith("work:   0%") and "0/500" in lines[0]
    assert lines[1].startswith("work: 100%") and "500/500" in lines[1]
    assert all(line == line.rstrip() for line in lines)  # no padding left from the redraws


def test_a_log_file_gets_a_line_per_interval(monkeypatch):
    monkeypatch.setenv(INTERVAL_ENV, "0")  # every update is due
    lines = run_bar(io.StringIO(), n=50).splitlines()
    assert "\r" not in "".join(lines)
    assert len(lines) > 10 and all(line.startswith("work:") for line in lines)
    assert lines[-1].startswith("work: 100%")


def test_a_terminal_gets_tqdms_own_redraws(monkeypatch):
    monkeypatch.setenv(INTERVAL_ENV, "1000")  # not used in a terminal
    out = run_bar(Terminal(), mininterval=0)
    assert out.count("\r") > 10 and out.count("\n") <= 1


def test_a_jupyter_kernel_counts_as_a_terminal(monkeypatch):
    monkeypatch.setitem(sys.modules, "ipykernel", object())
    assert "\r" in run_bar(io.StringIO(), mininterval=0)


def test_a_bar_that_clears_itself_leaves_no_blank_lines(monkeypatch):
    monkeypatch.setenv(INTERVAL_ENV, "1000")
    out = run_bar(io.StringIO(), leave=False)
    assert "\r" not in out and "" not in out.splitlines()


def test_a_disabled_bar_writes_nothing():
    assert run_bar(io.StringIO(), disable=True) == ""


@pytest.mark.parametrize("value", ["soon", "-1", "nan", "inf"])
def test_a_bad_interval_is_refused_by_name(monkeypatch, value):
    monkeypatch.setenv(INTERVAL_ENV, value)
    with pytest.raises(ValueError, match=f"{INTERVAL_ENV}=.*seconds >= 0"):
        run_bar(io.StringIO())


def run_transformers_bar(stream, n: int = 50) -> str:
    """A bar as transformers makes one when it loads weights (its own default interval)."""
    from transformers.utils.logging import tqdm as transformers_tqdm

    for _ in transformers_tqdm(range(n), file=stream, desc="Loading weights"):
        pass
    return stream.getvalue()


def test_transformers_bars_follow_ours_inside_the_context_only(monkeypatch):
    from transformers.utils import logging as hf_logging

    monkeypatch.setenv(INTERVAL_ENV, "1000")
    assert "\r" in run_transformers_bar(io.StringIO())  # transformers' own: redraws, even in a file
    with transformers_bars_as_ours():
        lines = run_transformers_bar(io.StringIO()).splitlines()
        assert "\r" in run_transformers_bar(Terminal())  # a terminal keeps its redraws
    assert len(lines) == 2 and lines[-1].startswith("Loading weights: 100%")
    assert hf_logging._tqdm_hook is None  # restored
    assert "\r" in run_transformers_bar(io.StringIO())


def test_transformers_bars_left_disabled_and_a_callers_hook_kept(monkeypatch):
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        with transformers_bars_as_ours():
            assert run_transformers_bar(io.StringIO()) == ""
    finally:
        hf_logging.enable_progress_bar()
    mine = []
    previous = hf_logging.set_tqdm_hook(lambda factory, args, kwargs: mine.append(1) or factory(*args, **kwargs))
    try:
        with transformers_bars_as_ours():
            assert "\r" in run_transformers_bar(io.StringIO()) and mine == [1]
    finally:
        hf_logging.set_tqdm_hook(previous)


def test_loading_a_model_writes_whole_lines_to_a_log(toy_dirs, monkeypatch):
    import torch

    from harvest.models import load_models

    monkeypatch.setenv(INTERVAL_ENV, "1000")
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    load_models(["toy-base"], ["blocks.0.hook_resid_post"], context_size=32, device=torch.device("cpu"),
                model_dtype=torch.float32)
    out = log.getvalue()
    assert "\r" not in out and "Loading weights: 100%" in out
