"""The lm-eval result in an analysis report (train/report_lm_eval.py): shown, with its own numbers, only when
it was computed on the export the run has now; a missing result gets the command that writes it, and a stale
one (the run re-exported since) is flagged with its figures left out.

The result is written here as lm-eval writes it (its per-model summary from ``train.lm_eval._Totals``), on the
planted run of test_analysis (no language model to load); tests/test_lm_eval.py runs the real lm-eval first.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from tests.test_analysis import _json_numbers, _numbers, _planted_cache, _planted_run
from train.analysis import analyze
from train.analysis_config import AnalysisConfig
from train.export import load_dictionary, load_metadata, save_dictionary
from train.lm_eval import LMEvalConfig, _Totals

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("report_lm_eval")
    _planted_cache(tmp / "cache")
    return _planted_run(tmp, tmp / "cache")


@pytest.fixture
def run(planted_run, tmp_path) -> Path:
    """A copy of the planted run, so that each test has its own analysis folder and export."""
    return Path(shutil.copytree(planted_run, tmp_path / "run"))


def _export_sha(run: Path) -> str:
    return json.loads((run / "export" / "config.json").read_text())["weights_sha256"]


def _write_result(run: Path, sha: str | None, path: Path | None = None) -> dict:
    """An lm_eval.json as lm-eval writes it (12 sequences of 17 tokens: 192 predictions per model)."""
    result = {
        "format": "crosscache.lm_eval/1", "run": str(run), "arch": "crosscoder", "sequences": 12, "context_size": 17,
        "sequence_ids": list(range(12)), "created": "2025-06-01T12:00:00",
        "models": {"model0": _Totals(clean=1003.52, spliced=1021.44, zero=1811.2, kl=7.68, n=192).summary([HOOK]),
                   "model1": _Totals(clean=851.2, spliced=879.36, zero=1690.88, kl=9.6, n=192).summary([HOOK])},
        "activation_check_median_rel_error": 0.00213, "method": "open loop: ...", "notes": [],
        "config": dataclasses.asdict(LMEvalConfig(run=str(run), sequences=12, progress=False)),
    }
    if sha is not None:
        result["export_weights_sha256"] = sha
    path = path or run / "analysis" / "lm_eval.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result))
    return result


def _section(md: str) -> str:
    return md.split("## What the models lose (lm-eval)", 1)[1].split("\n## ", 1)[0]


def _analyze(run: Path, **kw) -> tuple[dict, str]:
    rep = analyze(AnalysisConfig(run=str(run), progress=False, **kw))
    return rep, Path(rep["paths"]["report_md"]).read_text()


def test_a_current_result_is_tabled_with_its_own_numbers(run):
    result = _write_result(run, _export_sha(run))
    rep, md = _analyze(run)
    block = json.loads(Path(rep["paths"]["report_json"]).read_text())["lm_eval"]
    assert block["status"] == "current" and block["sequences"] == 12
    for m, want in result["models"].items():  # report.json carries the figures of lm_eval.json
        got = block["models"][m]
        assert got["tokens"] == 192 and got["hooks"] == [HOOK]
        for key in ("ce_clean", "ce_spliced", "delta_ce", "ce_zero_ablation", "loss_recovered", "kl_spliced"):
            assert got[key] == pytest.approx(want[key], abs=1e-6), (m, key)
    section = _section(md)
    # model0: clean 5.2267, spliced 5.3200, zero 9.4333 -> recovered 0.978; KL 0.04. model1: 4.4333, 4.5800, 8.8067.
    assert "| `model0` | 5.2267 | 5.3200 | +0.0933 | 9.4333 | 0.978 | 0.0400 | 12 | 192 |" in section
    assert "| `model1` | 4.4333 | 4.5800 | +0.1467 | 8.8067 | 0.966 | 0.0500 | 12 | 192 |" in section
    assert "Open loop" in section and f"`{run / 'analysis' / 'lm_eval.json'}`" in section
    assert any("lm-eval" in h and "+0.0933" in h and "open loop" in h for h in rep["headline"])
    assert block["loop"] == "open"  # a result from before --loop has no key: it was open loop
    nums = _json_numbers(block)
    for value, dec in _numbers(section):  # every number of the section is in report.json's block
        assert any(abs(value - x) <= 0.5 * 10 ** -dec + 1e-9 for x in nums), value


def test_a_closed_loop_result_is_said_to_be_one(run):
    """lm-eval --loop closed: the headline, the section and the re-run command say so (older results: open)."""
    result = _write_result(run, _export_sha(run))
    result.update(loop="closed", config=dataclasses.asdict(LMEvalConfig(run=str(run), sequences=12, loop="closed",
                                                                        progress=False)))
    (run / "analysis" / "lm_eval.json").write_text(json.dumps(result))
    rep, md = _analyze(run)
    block = json.loads(Path(rep["paths"]["report_json"]).read_text())["lm_eval"]
    assert block["loop"] == "closed" and "--loop closed" in block["command"]
    section = _section(md)
    assert "Closed loop: one forward pass per model" in section and "Open loop" not in section
    assert any("lm-eval" in h and "closed loop" in h for h in rep["headline"])


def test_a_missing_result_names_the_command(run):
    rep, md = _analyze(run)
    assert rep["lm_eval"]["status"] == "missing" and "models" not in rep["lm_eval"]
    lines = [ln for ln in _section(md).splitlines() if ln.strip()]
    assert len(lines) == 1 and f"`python run_train.py lm-eval {run}`" in lines[0]


def _assert_stale(run: Path, reason: str) -> None:
    """The report flags the result as stale, with the lm-eval command (its flags repeated), and shows none of
    its figures, in report.md or report.json."""
    rep, md = _analyze(run)
    block = json.loads(Path(rep["paths"]["report_json"]).read_text())["lm_eval"]
    assert block["status"] == "stale" and "models" not in block and reason in block["reason"], block
    section = _section(md)
    assert "is stale" in section and "not shown" in section
    assert f"`python run_train.py lm-eval {run} --sequences 12`" in section
    assert "5.2267" not in md and "0.0933" not in md and not re.search(r"^\| `model0` \|", section, re.M)
    assert any("not shown" in n for n in rep["notes"]) and not any("lm-eval" in h for h in rep["headline"])


def test_a_stale_result_is_flagged_and_its_figures_left_out(run):
    """lm-eval ran, then the run was re-exported (other weights, as when a run is resumed): stale. A result of an
    lm-eval that recorded no export cannot be matched to this one: not shown either."""
    _write_result(run, _export_sha(run))
    model = load_dictionary(run / "export")
    with torch.no_grad():
        model.b_dec_XoD.add_(0.5)
    save_dictionary(run / "export", model, load_metadata(run / "export"), shareable=True)
    _assert_stale(run, "re-exported since")
    _write_result(run, None)
    _assert_stale(run, "does not record which export")


def test_a_report_elsewhere_reads_the_result_beside_it(run, tmp_path):
    """analyze --out DIR reads DIR/lm_eval.json (lm-eval --out DIR/lm_eval.json) before the run's default."""
    _write_result(run, "0" * 64)  # stale, at the default place
    elsewhere = tmp_path / "report"
    _write_result(run, _export_sha(run), elsewhere / "lm_eval.json")
    rep, md = _analyze(run, out=str(elsewhere))
    assert rep["lm_eval"]["status"] == "current" and rep["lm_eval"]["path"] == str(elsewhere / "lm_eval.json")
    assert "| `model0` | 5.2267 |" in _section(md)
