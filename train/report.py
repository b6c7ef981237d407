"""Turn the numbers of :mod:`train.analysis` into ``report.json``, PNG figures and ``report.md``.

Every number ``report.md`` shows is in ``report.json`` (rounded the same way or finer); the
markdown is written for a reader who did not run the training: each section says what the
quantity is and how to read it.

This module writes the report folder (:func:`write_report`); the parts live in
:mod:`train.report_data` (every number: the report dict), :mod:`train.report_figures` (PNGs),
:mod:`train.report_markdown` (report.md) and :mod:`train.token_text` (token ids -> text).
"""

from __future__ import annotations

import json
from typing import Any

import torch

from shared.shard_io import atomic_write_bytes
from train.report_data import REPORT_FORMAT, build_report
from train.report_figures import figures
from train.report_markdown import render_markdown
from train.token_text import load_token_decoder

__all__ = ["build_report", "write_report", "load_token_decoder", "REPORT_FORMAT"]


# ---- writing ------------------------------------------------------------------------------------------------
def write_report(cfg: Any, run: Any, rep: dict[str, Any], norms_LXo: torch.Tensor, masks: dict[str, torch.Tensor],
                 diff: dict[str, Any] | None, data: dict[str, Any] | None) -> dict[str, str]:
    """Write figures, report.json and report.md into ``cfg.out_dir``; return their paths."""
    out = cfg.out_dir
    out.mkdir(parents=True, exist_ok=True)
    rep["figures"] = figures(out, rep, masks, diff, data, cfg)
    # The training curves are the run's; a copy beside the report keeps the folder whole when it is moved or shared.
    curves = run.run_dir / "curves.png"
    rep["figures"]["curves"] = None
    if curves.is_file():
        atomic_write_bytes(out / "curves.png", curves.read_bytes())
        rep["figures"]["curves"] = "curves.png"
    paths = {"report_md": str(out / "report.md"), "report_json": str(out / "report.json")}
    atomic_write_bytes(out / "report.json", (json.dumps(rep, indent=1, allow_nan=False) + "\n").encode())
    atomic_write_bytes(out / "report.md", render_markdown(rep, cfg).encode())
    return paths
