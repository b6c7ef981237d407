"""lm-eval (train/lm_eval.py): a trained dictionary spliced into the toy models it was trained on.

The plumbing is checked with exact identities: a stand-in dictionary that gives back its input must
leave every model's loss as it is (spliced = clean, KL 0), and one that gives zeros must equal the
zero ablation. The clean loss is recomputed with a plain ``transformers`` forward.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT
from train.config import TrainConfig
from train.lm_eval import LMEvalConfig, evaluate_lm, format_table
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


def test_the_share_of_evaluated_tokens_in_the_training_split_is_counted_and_kept_low(runs, tmp_path):
    """Sequences were called held out when any row was in the eval split; the harvest's write shuffle puts most of
    a sequence's rows in training shards. The sequences with the most rows in the eval split come first, and the
    result says how many of their rows the training split holds (counted here from the shards)."""
    from shared.cache import open_cache
    from train.loader import default_eval_shards

    r = evaluate_lm(LMEvalConfig(run=str(runs["directional"]), sequences=6, progress=False, out=str(tmp_path / "r.json")))
    cache = open_cache(json.loads((runs["directional"] / "config.json").read_text())["cache"]["path"])
    n_eval = default_eval_shards(cache.n_shards)
    seqs = [cache.shard(i).seq.numpy() for i in range(cache.n_shards)]
    in_eval = np.concatenate(seqs[cache.n_shards - n_eval:])
    in_train = np.concatenate(seqs[: cache.n_shards - n_eval])
    picked = r["sequence_ids"]
    rows_eval, rows_train = np.isin(in_eval, picked).sum(), np.isin(in_train, picked).sum()
    assert r["training_split_share"] == pytest.approx(rows_train / (rows_eval + rows_train))
    # No eval-split sequence left out has a larger share of its rows in the eval split than one taken.
    share = {int(q): (in_eval == q).sum() / ((in_eval == q).sum() + (in_train == q).sum()) for q in np.unique(in_eval)}
    assert min(share[q] for q in picked) >= max(v for q, v in share.items() if q not in picked)
    if r["training_split_share"] > 0:
        assert any("training split" in n for n in r["notes"])
        assert "of their tokens in the training split" in format_table(r)[0]


def test_a_run_without_an_eval_split_says_its_sequences_were_trained_on(toy_cache, tmp_path):
    """With --eval-shards 0 every evaluated token was trained on, but the table read "eval-split sequences, 0% of
    their tokens in the training split"."""
    run = tmp_path / "no-eval"
    train(TrainConfig(cache=str(toy_cache), out=str(run), latents=32, steps=4, batch_size=256, eval_shards=0,
                      progress=False, device="cpu", models=["toy-code"], hooks=["blocks.2.hook_resid_post"]))
    r = evaluate_lm(LMEvalConfig(run=str(run), sequences=3, progress=False, out=str(tmp_path / "r.json")))
    assert r["training_split_share"] == 1.0 and len(r["sequence_ids"]) == 3
    assert format_table(r)[0].endswith("3 sequences the dictionary was trained on (the run held out no shards)")
    assert any("held out no shards" in n for n in r["notes"])


def test_loss_recovered_over_a_gap_of_noise_is_na_with_the_reason():
    """A hook zero ablation barely moves gave loss recovered 11.6 (a 0.0003-nat gap), shown without a word."""
    from train.lm_eval import _recovered_note, _Totals

    for zero, said in ((1.0003, "raised the loss by only 0.0003 nats (< 0.01)"), (0.9, "lowered the loss (by 0.1000")):
        r = _Totals(clean=1.0, spliced=0.99, zero=zero, n=1).summary(["h"])
        assert r["loss_recovered"] is None and said in _recovered_note("m", r)
    r = _Totals(clean=1.0, spliced=1.5, zero=3.0, n=1).summary(["h"])
    assert r["loss_recovered"] == pytest.approx(0.75) and _recovered_note("m", r) is None


def test_the_table_numbers_model_names_that_would_read_the_same_cut():
    row = dict(ce_clean=1.0, ce_spliced=1.1, ce_zero_ablation=2.0, delta_ce=0.1, loss_recovered=0.9, kl_spliced=0.01)
    same_end = ["/a/run-one/checkpoints-final-llama-64", "/b/run-two/checkpoints-final-llama-64"]
    lines = format_table({"sequences": 2, "training_split_share": 0.5, "models": {m: row for m in same_end}})
    assert [line[:3] for line in lines[2:4]] == ["1: ", "2: "] and lines[4:] == [f"1: {same_end[0]}", f"2: {same_end[1]}"]
    lines = format_table({"sequences": 2, "training_split_share": 0.5, "models": {"toy-base": row, "toy-code": row}})
    assert [line.split()[0] for line in lines[2:]] == ["toy-base", "toy-code"]


def test_fresh_sequences_are_the_ones_a_longer_harvest_would_have_written_next(runs, toy_cache, toy_dirs, tmp_path):
    """--sequences-from fresh evaluates the sequences the harvest's token stream gives after the cache's last one:
    checked against a longer harvest of the same dataset and seed, whose token table holds them, and against a
    plain transformers forward of those tokens."""
    import pyarrow.ipc
    from transformers import AutoModelForCausalLM

    from harvest.harvester import harvest
    from tests.conftest import small_harvest_config

    r = evaluate_lm(LMEvalConfig(run=str(runs["directional"]), sequences=5, batch_size=2, sequences_from="fresh",
                                 progress=False, out=str(tmp_path / "r.json")))
    n_cached = json.loads((toy_cache / "manifest.json").read_text())["n_sequences"]
    assert r["sequences_from"] == "fresh" and r["training_split_share"] == 0.0
    assert r["sequence_ids"] == list(range(n_cached, n_cached + 5))
    assert r["activation_check_median_rel_error"] < 0.01  # still checked, on eval-split sequences
    assert "5 fresh sequences (never harvested)" in format_table(r)[0]
    assert not any("training split" in n for n in r["notes"])
    longer = tmp_path / "longer"
    harvest(small_harvest_config(longer, models=["toy-code"], tokens=6000 + 5 * 64))
    table = pyarrow.ipc.open_file(longer / "tokens.arrow").read_all()
    ids = torch.tensor([table.column("input_ids")[i].as_py() for i in range(n_cached, n_cached + 5)])
    model = AutoModelForCausalLM.from_pretrained(toy_dirs["toy-code"]).eval()
    with torch.no_grad():
        logits = model(ids).logits
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert r["models"]["toy-code"]["ce_clean"] == pytest.approx(float(ce), abs=2e-4)


def test_fresh_sequences_fall_back_to_the_eval_split_with_a_note(runs, toy_cache, tmp_path):
    import shutil

    for dataset, why in ((str(tmp_path / "gone.txt"), "could not be read again"),
                         ("builtin:docs", "no longer gives the cache's sequences")):
        moved = tmp_path / f"cache-{why[:8].replace(' ', '-')}"
        shutil.copytree(toy_cache, moved)
        man = json.loads((moved / "manifest.json").read_text())
        man["dataset"]["name"] = dataset
        (moved / "manifest.json").write_text(json.dumps(man))
        r = evaluate_lm(LMEvalConfig(run=str(runs["directional"]), cache=str(moved), sequences=3, sequences_from="fresh",
                                     progress=False, out=str(tmp_path / "r.json")))
        assert r["sequences_from"] == "eval" and len(r["sequence_ids"]) == 3
        assert any(why in n and "evaluated sequences of the eval split instead" in n for n in r["notes"]), r["notes"]


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

    from train import splice

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
    out = splice.replace_hook(torch.full_like(x, -1.0), keep)(None, None, x)
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


def test_the_activation_check_leaves_out_cache_rows_that_are_not_finite():
    """A cache row written as inf or NaN gave a NaN relative error and a NaN median, which `> 0.05` never
    refuses: models that no longer matched the cache passed. Such rows are left out; activations that are
    not finite now count as wrong."""
    from train.lm_eval import ACTIVATION_CHECK_MAX, _activation_error

    x_BPXD = torch.randn(1, 4, 2, 8)
    found = {(7, p): x_BPXD[0, p].clone() for p in range(1, 4)}
    found[(7, 1)][0, 3] = float("inf")
    found[(7, 2)][1, 0] = float("nan")
    assert _activation_error(found, [7], x_BPXD) == 0.0  # the one finite row matches exactly
    other_BPXD = x_BPXD + 1.0  # another model: refused, whatever the cache's bad rows
    assert _activation_error(found, [7], other_BPXD) > ACTIVATION_CHECK_MAX
    now_BPXD = x_BPXD.clone()
    now_BPXD[0, 3, 0, 0] = float("nan")  # the models overflow now
    assert _activation_error(found, [7], now_BPXD) == float("inf")


def test_cli_prints_the_table_and_refuses_an_unfinished_run(runs, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "run_train.py"), "lm-eval", str(runs["directional"]),
                           "--sequences", "2", "--no-progress", "--out", str(tmp_path / "r.json")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "CE clean" in proc.stdout and "toy-code" in proc.stdout and f"result: {tmp_path / 'r.json'}" in proc.stdout
    # Another name than lm_eval.json: no report reads it (the note named an analyze command that did not show it).
    assert (f"analyze reads a result only as lm_eval.json in its report folder, so no report shows r.json; write it "
            f"as {tmp_path / 'lm_eval.json'}") in proc.stdout
    # Away from the run's analysis folder: analyze reads it only with --out naming its folder.
    from train.lm_eval import LMEvalConfig, _report_note

    note = _report_note(LMEvalConfig(run=str(runs["directional"]), out=str(tmp_path / "lm_eval.json")))
    assert note == (f"analyze reads this result only from its report folder: `python run_train.py analyze "
                    f"{runs['directional']} --out {tmp_path}` includes it")
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


# ---- closed loop (--loop closed) -------------------------------------------------------------------------------
CLT_IN = [f"blocks.{i}.ln2.hook_out" for i in (0, 1)]  # the MLP's exact input
CLT_OUT = [f"blocks.{i}.hook_mlp_out" for i in (0, 1)]


@pytest.fixture(scope="module")
def clt_run(toy_dirs, tmp_path_factory) -> Path:
    """A CLT over layers 0 and 1 of toy-code (MLP input -> MLP output), on a cache of its own."""
    from conftest import small_harvest_config
    from harvest.harvester import harvest

    root = tmp_path_factory.mktemp("lm_eval_clt")
    harvest(small_harvest_config(root / "cache", models=["toy-code"], hooks=CLT_IN + CLT_OUT, tokens=3000))
    train(TrainConfig(cache=str(root / "cache"), out=str(root / "clt"), arch="clt", in_hooks=CLT_IN, out_hooks=CLT_OUT,
                      latents=256, steps=20, batch_size=256, lr=3e-3, log_every=10, checkpoint_every=1000,
                      progress=False, device="cpu"))
    return root / "clt"


@pytest.fixture(scope="module")
def toy_code_bridge(toy_dirs):
    """toy-code loaded as lm-eval loads it, with the CLT's hooks."""
    from harvest.models import load_models

    return load_models(["toy-code"], CLT_IN + CLT_OUT, context_size=32, device=torch.device("cpu"),
                       model_dtype=torch.float32, progress=False).bridges[0]


def _tokens(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """3 sequences of 32 token ids, BOS (id 0) first; and the kept tokens (all but BOS)."""
    g = torch.Generator().manual_seed(seed)
    tokens_BP = torch.randint(2, 4096, (3, 32), generator=g)
    tokens_BP[:, 0] = 0
    return tokens_BP, tokens_BP != 0


def _clean(bridge, tokens_BP: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    from train.splice import capture_hook, forward_with_hooks

    store: dict[str, torch.Tensor] = {}
    logits = forward_with_hooks(bridge, tokens_BP, {h: capture_hook(store, h, bridge.hook_dict[h]) for h in CLT_IN})
    return logits, store


def _open_recon(dictionary, store: dict[str, torch.Tensor]) -> torch.Tensor:
    """The open loop's reconstruction [B, P, Xo, D] from clean inputs."""
    x_in_BPXD = torch.stack([store[h] for h in CLT_IN], dim=2)
    return dictionary(x_in_BPXD.flatten(0, 1)).recon_BXoD.unflatten(0, x_in_BPXD.shape[:2])


def test_one_transcoder_gives_the_same_figures_in_both_loops(runs, tmp_path):
    """One input hook upstream of one output hook: nothing is spliced before the input, so closed = open."""
    cfg = dict(run=str(runs["directional"]), sequences=4, batch_size=3, progress=False)
    opened = evaluate_lm(LMEvalConfig(**cfg, out=str(tmp_path / "open.json")))
    closed = evaluate_lm(LMEvalConfig(**cfg, loop="closed", out=str(tmp_path / "closed.json")))
    assert (opened["loop"], closed["loop"]) == ("open", "closed")
    assert closed["method"].startswith("closed loop:") and opened["method"].startswith("open loop:")
    o, c = opened["models"]["toy-code"], closed["models"]["toy-code"]
    assert c["ce_spliced"] > c["ce_clean"] + 1e-3  # something was spliced
    for key in ("ce_clean", "ce_spliced", "ce_zero_ablation", "kl_spliced"):
        assert c[key] == pytest.approx(o[key], abs=1e-5), key


def test_a_clt_closed_loop_differs_from_the_open_loop(clt_run, tmp_path):
    """Layer 1's input is computed from layer 0's splice in closed loop: another spliced loss, the same clean
    and zero-ablated ones."""
    cfg = dict(run=str(clt_run), sequences=4, progress=False)
    opened = evaluate_lm(LMEvalConfig(**cfg, out=str(tmp_path / "open.json")))["models"]["toy-code"]
    closed = evaluate_lm(LMEvalConfig(**cfg, loop="closed", out=str(tmp_path / "closed.json")))["models"]["toy-code"]
    assert closed["hooks"] == opened["hooks"] == CLT_OUT
    assert closed["ce_clean"] == pytest.approx(opened["ce_clean"], abs=1e-6)
    assert closed["ce_zero_ablation"] == pytest.approx(opened["ce_zero_ablation"], abs=1e-6)
    assert abs(closed["ce_spliced"] - opened["ce_spliced"]) > 1e-4
    assert closed["ce_clean"] < closed["ce_spliced"] < closed["ce_zero_ablation"]
    assert json.loads((tmp_path / "closed.json").read_text())["loop"] == "closed"


def test_a_clt_closed_loop_feeds_layer_1_the_spliced_layer_0(clt_run, toy_code_bridge):
    """Layer 0's input is upstream of every splice: its reconstruction is the open loop's; layer 1's input comes
    from the model with layer 0 spliced, so its reconstruction is not."""
    from train.export import load_dictionary
    from train.splice import closed_loop_forward

    dictionary = load_dictionary(clt_run / "export")
    tokens_BP, keep_BP = _tokens()
    with torch.inference_mode():
        open_BPXD = _open_recon(dictionary, _clean(toy_code_bridge, tokens_BP)[1])
        recons: dict[int, torch.Tensor] = {}
        closed_loop_forward(toy_code_bridge, dictionary, tokens_BP, keep_BP, CLT_IN, CLT_OUT, recons)
    torch.testing.assert_close(recons[0], open_BPXD[:, :, 0], rtol=1e-5, atol=1e-6)
    gap = (recons[1] - open_BPXD[:, :, 1]).norm(dim=-1)  # [B, P]
    assert float(gap[:, 0].max()) < 1e-5  # BOS: nothing before it was replaced
    assert float(gap[:, 1:].min()) > 1e-4


def test_the_closed_loop_with_nothing_replaced_reconstructs_as_the_dictionary(clt_run, toy_code_bridge):
    """The closed-loop machinery (hooks, per-layer encoding, decoding of layers <= j) with every token excluded:
    nothing is replaced, so every input is clean and every reconstruction is Dictionary.forward's."""
    from train.export import load_dictionary
    from train.splice import closed_loop_forward

    dictionary = load_dictionary(clt_run / "export")
    tokens_BP, keep_BP = _tokens(1)
    with torch.inference_mode():
        clean_logits, store = _clean(toy_code_bridge, tokens_BP)
        recons: dict[int, torch.Tensor] = {}
        logits = closed_loop_forward(toy_code_bridge, dictionary, tokens_BP, torch.zeros_like(keep_BP), CLT_IN,
                                      CLT_OUT, recons)
        want_BPXD = _open_recon(dictionary, store)
    assert torch.equal(logits, clean_logits)
    assert sorted(recons) == [0, 1] and float(want_BPXD.norm()) > 0
    for j in recons:
        torch.testing.assert_close(recons[j], want_BPXD[:, :, j], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("act", ["relu", "jumprelu", "batchtopk"])
def test_a_clt_output_slot_is_the_forwards_whatever_the_later_layers_hold(act):
    """The closed loop's per-slot reconstruction (layers <= j encoded and decoded) against Dictionary.forward on
    the same inputs, with every path of the formula non-zero (biases, skip) and garbage in the later layers."""
    from train.dictionary import Dictionary, DictionaryConfig
    from train.splice import clt_slot_recon

    names = [f"m/blocks.{i}.ln2.hook_out" for i in range(3)] + [f"m/blocks.{i}.hook_mlp_out" for i in range(3)]
    cfg = DictionaryConfig(arch="clt", activation=act, d_model=8, n_latents=30, in_slots=[0, 1, 2],
                           out_slots=[3, 4, 5], slot_names=names, skip=True, k=4 if act == "batchtopk" else None)
    torch.manual_seed(0)
    model = Dictionary(cfg).eval()
    with torch.no_grad():
        for p in (model.b_enc_L, model.b_dec_XoD, model.W_skip_XiDD):
            p.copy_(torch.randn_like(p) * 0.3)
        if act == "batchtopk":
            model.threshold.fill_(0.05)
        if act == "jumprelu":
            model.log_threshold_L.copy_(torch.randn_like(model.log_threshold_L) - 2)
        x_in_NXiD = torch.randn(64, 3, 8)
        full = model(x_in_NXiD)
        assert 0 < float((full.latents_BL > 0).float().mean()) < 1  # some latents fire, some do not
        latents = [model.encode_layer(x_in_NXiD[:, i], i) for i in range(3)]
        torch.testing.assert_close(torch.cat(latents, dim=1), full.latents_BL, rtol=1e-5, atol=1e-6)
        for j in range(3):
            garbage = [*latents[: j + 1], *(torch.randn_like(z) * 100 for z in latents[j + 1:])]  # never read
            torch.testing.assert_close(clt_slot_recon(model, garbage, x_in_NXiD[:, j], j), full.recon_BXoD[:, j],
                                       rtol=1e-5, atol=1e-5)


def test_encode_layer_is_refused_where_a_layers_latents_read_more_than_its_input():
    from train.dictionary import Dictionary, DictionaryConfig

    names = ["m/blocks.0.ln2.hook_out", "m/blocks.1.ln2.hook_out", "m/blocks.0.hook_mlp_out", "m/blocks.1.hook_mlp_out"]
    topk = Dictionary(DictionaryConfig(arch="clt", activation="topk", k=2, d_model=4, n_latents=8, in_slots=[0, 1],
                                       out_slots=[2, 3], slot_names=names))
    cross = Dictionary(DictionaryConfig(arch="crosscoder", activation="relu", d_model=4, n_latents=8, in_slots=[0, 1], out_slots=[0, 1],
                                        slot_names=names[:2]))
    for model in (topk, cross):
        with pytest.raises(ValueError, match="encode_layer needs a clt whose layers encode independently"):
            model.encode_layer(torch.zeros(3, 4), 0)
    relu = Dictionary(DictionaryConfig(arch="clt", activation="relu", d_model=4, n_latents=8, in_slots=[0, 1], out_slots=[2, 3],
                                       slot_names=names))
    with pytest.raises(ValueError, match=r"a layer in \[0, 2\)"):
        relu.encode_layer(torch.zeros(3, 4), 2)


def _cfg(arch: str, ins: list[str], outs: list[str], activation: str = "relu", models=("m",), d_model: int = 4):
    """A DictionaryConfig of ``ins`` -> ``outs`` of ``models`` and its slots' (model, hook) pairs."""
    from train.dictionary import DictionaryConfig

    hooks = list(dict.fromkeys(ins + outs))
    slots = [(m, h) for m in models for h in hooks]
    names = [f"{m}/{h}" for m, h in slots]
    in_slots = [names.index(f"{m}/{h}") for m in models for h in ins]
    out_slots = [names.index(f"{m}/{h}") for m in models for h in outs]
    cfg = DictionaryConfig(arch=arch, activation=activation, d_model=d_model, n_latents=8 * len(ins), in_slots=in_slots,
                           out_slots=out_slots, slot_names=names, k=2 if activation == "topk" else None)
    return cfg, slots


def test_closed_loop_is_defined_only_where_the_forward_order_is_causal():
    from train.splice import check_closed_loop

    mlp_in, mlp_out = CLT_IN, CLT_OUT  # layers 0 and 1
    ok = [
        _cfg("clt", mlp_in, mlp_out),
        _cfg("clt", ["blocks.0.hook_resid_mid", "blocks.1.hook_resid_mid"], mlp_out, "jumprelu"),
        # Two names of one point (blocks.L.hook_in is hook_resid_pre): an input may be the point it writes.
        _cfg("clt", ["blocks.0.hook_resid_pre", "blocks.1.hook_in"], ["blocks.0.hook_in", "blocks.1.attn.hook_out"]),
        _cfg("directional", ["blocks.1.hook_resid_post"], ["blocks.2.hook_resid_post"], "topk"),
        _cfg("directional", ["blocks.0.ln2.hook_out", "blocks.0.hook_resid_pre"], mlp_out),
    ]
    for cfg, slots in ok:
        check_closed_loop(cfg, slots)
    after = "which fires after it"
    refused = [
        (_cfg("crosscoder", ["blocks.1.hook_resid_post"], ["blocks.1.hook_resid_post"]),
         "not defined for arch crosscoder"),
        (_cfg("directional", ["blocks.2.hook_resid_post"], ["blocks.1.hook_resid_post"]),
         f"output blocks.1.hook_resid_post reads input blocks.2.hook_resid_post, {after}"),
        # Directional: one encoder over all inputs, so the second input must also precede the first output.
        (_cfg("directional", mlp_in, mlp_out),
         f"output blocks.0.hook_mlp_out reads input blocks.1.ln2.hook_out, {after}"),
        # Within a block: the MLP's output fires before the block's output (the residual after it).
        (_cfg("clt", ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"], mlp_out),
         f"output blocks.0.hook_mlp_out reads input blocks.0.hook_resid_post, {after}"),
        (_cfg("clt", mlp_in, mlp_out, "topk"), "a topk CLT keeps the k largest latents of all layers together"),
        (_cfg("directional", ["blocks.1.hook_resid_post"], ["blocks.2.hook_resid_post"], models=("base", "ft")),
         "reads and writes the slots of several models"),
        (_cfg("directional", ["blocks.0.attn.hook_q"], ["blocks.0.attn.hook_z"]),
         "whose order these names do not tell"),
        (_cfg("directional", ["blocks.0.hook_weird"], mlp_out), "whose order these names do not tell"),
    ]
    for (cfg, slots), message in refused:
        with pytest.raises(ValueError, match=re.escape(message) + r".*evaluate it with --loop open"):
            check_closed_loop(cfg, slots)


def test_closed_loop_is_refused_for_a_crosscoder_and_an_acausal_run(runs, toy_cache, tmp_path, capsys):
    """Refused before any model loads, with the reason and --loop open; nothing is written."""
    from train.lm_eval import lm_eval_cli

    out = tmp_path / "r.json"
    with pytest.raises(ValueError, match=r"not defined for arch crosscoder.*--loop open"):
        evaluate_lm(LMEvalConfig(run=str(runs["crosscoder"]), loop="closed", progress=False, out=str(out)))
    acausal = tmp_path / "acausal"  # layer 2 -> layer 1: its input fires after the hook it writes
    train(TrainConfig(cache=str(toy_cache), out=str(acausal), arch="directional", models=["toy-code"],
                      in_hooks=["blocks.2.hook_resid_post"], out_hooks=["blocks.1.hook_resid_post"], latents=32,
                      steps=2, batch_size=64, log_every=1, checkpoint_every=1000, progress=False, device="cpu"))
    capsys.readouterr()
    assert lm_eval_cli([str(acausal), "--loop", "closed", "--no-progress", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert ("error: --loop closed needs every input a reconstruction reads to fire before the output hook it replaces: "
            "output blocks.1.hook_resid_post reads input blocks.2.hook_resid_post, which fires after it") in err
    assert "--loop open" in err and not out.exists()


def test_an_input_hook_that_never_fires_is_an_error(toy_code_bridge):
    """hook_mlp_in is gated off in transformer-lens unless asked for: a closed loop reading it must say so, not
    reconstruct from nothing."""
    from train.analysis_run import RunError
    from train.dictionary import Dictionary
    from train.splice import check_closed_loop, closed_loop_forward

    cfg, slots = _cfg("directional", ["blocks.0.hook_mlp_in"], ["blocks.0.hook_mlp_out"], d_model=128)
    check_closed_loop(cfg, slots)  # the names say it fires first (it does, where it fires)
    torch.manual_seed(0)
    model = Dictionary(cfg).eval()
    tokens_BP, keep_BP = _tokens()
    with pytest.raises(RunError, match=r"input hook\(s\) \['blocks.0.hook_mlp_in'\] had not fired when output hook "
                                       r"blocks.0.hook_mlp_out did.*--loop open"), torch.inference_mode():
        closed_loop_forward(toy_code_bridge, model, tokens_BP, keep_BP, ["blocks.0.hook_mlp_in"],
                             ["blocks.0.hook_mlp_out"])


def test_the_loop_flag_round_trips_into_the_result_and_its_rerun_command(runs, tmp_path, capsys):
    from train.lm_eval import lm_eval_cli
    from train.report_lm_eval import lm_eval_block

    assert lm_eval_cli([str(runs["directional"]), "--loop", "closed", "--sequences", "2", "--no-progress",
                        "--out", str(tmp_path / "lm_eval.json")]) == 0
    stdout = capsys.readouterr().out
    assert stdout.splitlines()[0].startswith("closed loop") and "CE clean" in stdout.splitlines()[1]
    result = json.loads((tmp_path / "lm_eval.json").read_text())
    assert result["loop"] == result["config"]["loop"] == "closed"
    # analyze's command to write it again keeps the flag (report_lm_eval derives it from the saved config).
    assert " --loop closed" in lm_eval_block(runs["directional"], tmp_path)["command"]
    with pytest.raises(SystemExit):
        lm_eval_cli([str(runs["directional"]), "--loop", "sideways"])
    assert "invalid choice: 'sideways'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="loop: expected one of 'open', 'closed', got 'sideways'"):
        LMEvalConfig(loop="sideways")


def test_held_out_shards_of_no_rows_count_as_no_held_out_split(tmp_path):
    """Runs trained before training refused them may hold out shards of 0 rows: evaluated as trained-on
    sequences, with the note, instead of an evaluation of no sequences."""
    from types import SimpleNamespace

    from shared.cache import open_cache
    from tests.cache_factory import make_cache
    from train.lm_eval import _held_out_sequences

    make_cache(tmp_path / "c", n_shards=3, rows_per_shard=[64, 64, 0])
    notes: list[str] = []
    run = SimpleNamespace(info={"config": {"eval_shards": 1}})
    seqs, share = _held_out_sequences(open_cache(tmp_path / "c"), run, 3, notes)
    assert len(seqs) == 3 and share == 1.0
    assert any("held out no shards with rows" in n for n in notes)
