"""lm-eval (train/lm_eval.py): a trained dictionary spliced into the toy models it was trained on.

The plumbing is checked with exact identities: a stand-in dictionary that gives back its input must
leave every model's loss as it is (spliced = clean, KL 0), and one that gives zeros must equal the
zero ablation. The clean loss is recomputed with a plain ``transformers`` forward.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from train.config import TrainConfig
from train.lm_eval import LMEvalConfig, evaluate_lm
from train.trainer import train


@pytest.fixture(scope="module")
def runs(toy_cache, tmp_path_factory) -> dict[str, Path]:
    """A crosscoder of all four slots (2 models x 2 hooks) and a directional run layer 1 -> layer 2 of toy-code."""
    root = tmp_path_factory.mktemp("lm_eval")
    common = dict(cache=str(toy_cache), latents=128, steps=60, batch_size=256, lr=3e-3, log_every=20,
                  checkpoint_every=1000, progress=False, device="cpu")
    out = {"crosscoder": root / "cc", "directional": root / "tc"}
    train(TrainConfig(out=str(out["crosscoder"]), activation="batchtopk", k=8, **common))
    train(TrainConfig(out=str(out["directional"]), arch="directional", models=["toy-code"],
                      in_hooks=["blocks.1.hook_resid_post"], out_hooks=["blocks.2.hook_resid_post"], **common))
    return out


class _Stub(torch.nn.Module):
    """Stands in for the exported dictionary: reconstructs its input slots as ``fn`` says."""

    def __init__(self, real: torch.nn.Module, fn) -> None:
        super().__init__()
        self.cfg, self.fn = real.cfg, fn

    def forward(self, x_in_NXiD: torch.Tensor):
        from types import SimpleNamespace

        return SimpleNamespace(recon_BXoD=self.fn(x_in_NXiD))


def _with_stub(monkeypatch, fn) -> None:
    import train.export

    real_load = train.export.load_dictionary
    monkeypatch.setattr(train.export, "load_dictionary", lambda path, device="cpu": _Stub(real_load(path, device), fn))


def test_a_trained_crosscoder_costs_each_model_a_little_loss(runs, tmp_path):
    r = evaluate_lm(LMEvalConfig(run=str(runs["crosscoder"]), sequences=12, batch_size=5, progress=False,
                                 out=str(tmp_path / "r.json")))
    assert set(r["models"]) == {"toy-base", "toy-code"}
    assert r["activation_check_median_rel_error"] < 0.01  # bf16 storage rounding
    for m in r["models"].values():
        assert m["hooks"] == ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
        assert m["tokens"] == 12 * 63
        # A crosscoder's reconstruction of one model reads the other too: at toy scale the base model's
        # loss can come out a little *lower* spliced (the fine-tune's code latents help it). So: close to
        # clean, far from the ablation, and a changed distribution.
        assert abs(m["delta_ce"]) < 1 and m["ce_spliced"] < m["ce_zero_ablation"] - 1
        assert 0.7 < m["loss_recovered"] < 1.1 and m["kl_spliced"] > 0
    assert json.loads((tmp_path / "r.json").read_text())["models"] == r["models"]


def test_the_clean_loss_is_the_models_own(runs, toy_dirs, tmp_path):
    """The clean cross-entropy equals a plain transformers forward of the same held-out sequences."""
    import pyarrow.ipc
    from transformers import AutoModelForCausalLM

    r = evaluate_lm(LMEvalConfig(run=str(runs["directional"]), sequences=6, progress=False, out=str(tmp_path / "r.json")))
    assert list(r["models"]) == ["toy-code"] and r["models"]["toy-code"]["hooks"] == ["blocks.2.hook_resid_post"]
    cache = json.loads((runs["directional"] / "config.json").read_text())["cache"]["path"]
    table = pyarrow.ipc.open_file(Path(cache) / "tokens.arrow").read_all()
    row = {s: i for i, s in enumerate(table.column("seq").to_pylist())}
    ids = torch.tensor([table.column("input_ids")[row[s]].as_py() for s in r["sequence_ids"]])
    model = AutoModelForCausalLM.from_pretrained(toy_dirs["toy-code"]).eval()
    with torch.no_grad():
        logits = model(ids).logits
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert r["models"]["toy-code"]["ce_clean"] == pytest.approx(float(ce), abs=2e-4)
    assert r["models"]["toy-code"]["ce_clean"] < r["models"]["toy-code"]["ce_spliced"]


def test_splicing_the_input_back_changes_nothing_and_zeros_match_the_ablation(runs, monkeypatch, tmp_path):
    cfg = LMEvalConfig(run=str(runs["crosscoder"]), sequences=4, batch_size=3, progress=False, out=str(tmp_path / "r.json"))
    _with_stub(monkeypatch, lambda x: x.clone())  # a crosscoder reconstructs its inputs: identity is exact
    same = evaluate_lm(cfg)["models"]
    _with_stub(monkeypatch, torch.zeros_like)
    zero = evaluate_lm(cfg)["models"]
    for m in ("toy-base", "toy-code"):
        assert same[m]["ce_spliced"] == pytest.approx(same[m]["ce_clean"], abs=1e-5)
        assert same[m]["kl_spliced"] == pytest.approx(0, abs=1e-5)
        assert zero[m]["ce_spliced"] == pytest.approx(zero[m]["ce_zero_ablation"], abs=1e-6)
        assert zero[m]["loss_recovered"] == pytest.approx(0, abs=1e-6)


def test_excluded_tokens_stay_clean(runs, toy_cache, monkeypatch, tmp_path):
    """Scrambled reconstructions change the loss; with every token id excluded (a copy of the cache whose
    manifest says so) nothing is replaced and the loss is the clean one: only kept tokens are spliced."""
    import shutil

    from train import lm_eval

    _with_stub(monkeypatch, lambda x: x.roll(1, dims=-1))  # every dimension takes its neighbour's value
    cfg = dict(run=str(runs["crosscoder"]), sequences=3, progress=False, out=str(tmp_path / "r.json"))
    wild = evaluate_lm(LMEvalConfig(**cfg))
    assert all(m["ce_spliced"] > m["ce_clean"] + 0.1 for m in wild["models"].values())

    every = tmp_path / "cache"
    shutil.copytree(toy_cache, every)
    man = json.loads((every / "manifest.json").read_text())
    man["excluded_tokens"]["token_ids"] = list(range(man["tokenizer"]["vocab_size"]))
    (every / "manifest.json").write_text(json.dumps(man))
    spared = evaluate_lm(LMEvalConfig(**cfg, cache=str(every)))
    assert all(m["ce_spliced"] == pytest.approx(m["ce_clean"], abs=1e-6) for m in spared["models"].values())

    # The hook itself: position 0 (not kept) keeps its value, the others take the new one.
    keep = torch.ones(1, 5, dtype=torch.bool)
    keep[0, 0] = False
    x = torch.arange(10, dtype=torch.float32).reshape(1, 5, 2)
    out = lm_eval._replace_hook(torch.full_like(x, -1.0), keep)(None, None, x)
    assert torch.equal(out[0, 0], x[0, 0]) and bool((out[0, 1:] == -1).all())


def test_models_that_no_longer_match_the_cache_are_refused(runs, toy_cache, toy_dirs, tmp_path):
    """A cache whose toy-code entry points at another model's folder: the activations disagree, refused."""
    import shutil

    moved = tmp_path / "cache"
    shutil.copytree(toy_cache, moved)
    man = json.loads((moved / "manifest.json").read_text())
    code = next(m for m in man["models"] if m["name"] == "toy-code")
    code["path"] = str(toy_dirs["toy-prose"])
    (moved / "manifest.json").write_text(json.dumps(man))
    from train.analysis_run import RunError

    with pytest.raises(RunError, match=r"do not reproduce the cache's activations .*Evaluate with the models the cache "
                                       r"was harvested from"):
        evaluate_lm(LMEvalConfig(run=str(runs["directional"]), cache=str(moved), sequences=2, progress=False,
                                 out=str(tmp_path / "r.json")))


def test_cli_prints_the_table_and_refuses_an_unfinished_run(runs, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "run_train.py"), "lm-eval", str(runs["directional"]),
                           "--sequences", "2", "--no-progress", "--out", str(tmp_path / "r.json")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "CE clean" in proc.stdout and "toy-code" in proc.stdout and f"result: {tmp_path / 'r.json'}" in proc.stdout
    # Away from the run's analysis folder: analyze reads it only with --out naming its folder.
    assert f"`python run_train.py analyze {runs['directional']} --out {tmp_path}` includes it" in proc.stdout
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    import shutil

    for name in ("config.json", "dictionary"):
        src = runs["directional"] / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, unfinished / name)
    proc = subprocess.run([sys.executable, str(ROOT / "run_train.py"), "lm-eval", str(unfinished), "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "has no export/" in proc.stderr, proc.stderr


def test_analyze_shows_the_result_for_this_export_and_lm_eval_says_the_report_predates_it(runs, tmp_path, capsys):
    """analyze, then lm-eval (to RUN/analysis/lm_eval.json): lm-eval records the export's weights sha256 and says
    the report predates it, naming the analyze command that wrote it; analyze again tables its numbers."""
    import shutil

    from train.analysis import analyze
    from train.analysis_config import AnalysisConfig
    from train.lm_eval import lm_eval_cli

    run = tmp_path / "run"
    shutil.copytree(runs["directional"], run)
    before = analyze(AnalysisConfig(run=str(run), progress=False, top_k=3))
    assert before["lm_eval"]["status"] == "missing"
    assert lm_eval_cli([str(run), "--sequences", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert (f"{run / 'analysis' / 'report.md'} predates this result and does not show it: run "
            f"`python run_train.py analyze {run} --top-k 3` to refresh it") in out, out
    result = json.loads((run / "analysis" / "lm_eval.json").read_text())
    assert result["export_weights_sha256"] == json.loads((run / "export" / "config.json").read_text())["weights_sha256"]

    after = analyze(AnalysisConfig(run=str(run), progress=False, top_k=3))
    want, got = result["models"]["toy-code"], after["lm_eval"]["models"]["toy-code"]
    assert after["lm_eval"]["status"] == "current" and got["tokens"] == want["tokens"] == 2 * 63
    assert got["ce_spliced"] == pytest.approx(want["ce_spliced"], abs=1e-6)
    md = Path(after["paths"]["report_md"]).read_text()
    assert (f"| `toy-code` | {want['ce_clean']:.4f} | {want['ce_spliced']:.4f} | {want['delta_ce']:+.4f} | "
            f"{want['ce_zero_ablation']:.4f} |") in md
