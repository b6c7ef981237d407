"""Stage 2 trainer inputs: refused commands write nothing, resumes compare resolved slots, sweep
errors name their member, finished runs are not redone, identity slots are refused, non-finite
losses and gradients stop with advice that blames the data when the data is the cause."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from tests.cache_factory import make_cache
from train.checkpoint import load_checkpoint
from train.config import TrainConfig
from train.metrics import read_metrics
from train.slots import SlotError, resolve_slots
from train.trainer import NonFiniteLossError, RunMismatchError, train, train_many

MLP_HOOKS = ["blocks.0.hook_mlp_in", "blocks.0.hook_mlp_out", "blocks.1.hook_mlp_in", "blocks.1.hook_mlp_out"]


def _cfg(cache: Path, out: Path, **kw) -> TrainConfig:
    args: dict = {"cache": str(cache), "out": str(out), "latents": 16, "steps": 5, "batch_size": 64, "lr": 3e-3,
                  "log_every": 1, "checkpoint_every": 1000, "progress": False, "device": "cpu"}
    args.update(kw)
    return TrainConfig(**args)


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> dict[str, Path]:
    """Same width (d_model 16), different slots: one model, another one model, two models."""
    root = tmp_path_factory.mktemp("inputs")
    out = {"base": root / "base", "other": root / "other", "pair": root / "pair"}
    make_cache(out["base"], n_models=1, model_names=["toy-base"])
    make_cache(out["other"], n_models=1, model_names=["toy-code"])
    make_cache(out["pair"], n_models=2, model_names=["toy-base", "toy-code"])
    return out


def _mlp_cache(path: Path) -> Path:
    """One model, MLP in/out hooks at two layers (for a CLT)."""
    make_cache(path, n_models=1, n_hooks=4, hook_names=MLP_HOOKS)
    return path


# ---- 1. a refused command leaves nothing behind ---------------------------------------------


def test_a_command_refused_before_training_writes_nothing(caches, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(ValueError, match="batch_size 5000 is larger than the train split"):
        train(_cfg(caches["base"], run, batch_size=5000))
    with pytest.raises(ValueError, match="eval_shards=4 does not fit a cache of 4 shard"):
        train(_cfg(caches["base"], run, eval_shards=4))
    assert not run.exists()
    assert train(_cfg(caches["base"], run)).steps == 5  # the corrected command is not refused


def test_held_out_shards_of_no_rows_are_refused_naming_eval_shards(tmp_path):
    """A cache whose last shards hold 0 rows would give a run with no eval and no word of it: refused before
    anything is written, with the --eval-shards values that work; a one-shard cache still trains without eval."""
    cache = tmp_path / "cache"
    make_cache(cache, n_shards=4, rows_per_shard=[128, 128, 0, 0], n_models=1)
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=r"held-out split of cache .* \(its last 1 of 4 shards, by default\) "
                                         r"holds 0 rows.*--eval-shards 3 .*or --eval-shards 0"):
        train(_cfg(cache, run))
    with pytest.raises(ValueError, match=r"its last 2 of 4 shards\) holds 0 rows"):
        train(_cfg(cache, run, eval_shards=2))
    assert not run.exists()
    assert train(_cfg(cache, run, eval_shards=3)).eval_metrics["eval/l0/mean"] is not None
    assert train(_cfg(cache, tmp_path / "all", eval_shards=0)).eval_metrics == {}
    make_cache(tmp_path / "one", n_shards=1, rows_per_shard=128, n_models=1)
    assert train(_cfg(tmp_path / "one", tmp_path / "run-one")).eval_metrics == {}


def test_a_sweep_refused_by_a_later_member_writes_nothing(tmp_path):
    cache = _mlp_cache(tmp_path / "cache")
    ok = _cfg(cache, tmp_path / "sweep" / "ok")
    clt = dataclasses.replace(ok, out=str(tmp_path / "sweep" / "clt"), arch="clt", latents=63,
                              in_hooks=MLP_HOOKS[0::2], out_hooks=MLP_HOOKS[1::2])
    with pytest.raises(ValueError, match="63 is not a multiple"):  # the second member's dictionary
        train_many([ok, clt])
    assert not (tmp_path / "sweep").exists()
    # The corrected sweep, and the first member alone with another config, are then accepted.
    train_many([ok, dataclasses.replace(clt, latents=64)])
    assert train(dataclasses.replace(ok, out=str(tmp_path / "alone"), latents=32)).steps == 5


def test_a_folder_without_checkpoints_does_not_block_another_config(caches, tmp_path):
    run = tmp_path / "run"
    train(_cfg(caches["base"], run))
    for sub in ("checkpoints", "export", "dictionary"):  # an attempt stopped before its first checkpoint
        for f in sorted((run / sub).rglob("*"), reverse=True):
            f.rmdir() if f.is_dir() else f.unlink()
        (run / sub).rmdir()
    train(_cfg(caches["base"], run, latents=32))
    assert json.loads((run / "config.json").read_text())["config"]["latents"] == 32
    # ... but a folder holding a checkpoint is never overwritten by another config.
    with pytest.raises(RunMismatchError, match="latents: 32 there vs 16 now"):
        train(_cfg(caches["base"], run))


# ---- 2. a resume compares the slots the flags resolve to ---------------------------------------


def test_resume_compares_resolved_slots_not_flags(caches, tmp_path):
    run = tmp_path / "run"
    train(_cfg(caches["base"], run, steps=6, checkpoint_every=3))
    (run / "export" / "config.json").unlink()  # not finished: the next call resumes
    # Naming the cache's only model is the same run as leaving --models out.
    assert train(_cfg(caches["base"], run, steps=6, checkpoint_every=3, models=["toy-base"])).steps == 6
    # So is giving a default's value: λ (relu: 2.0) and the held-out shards (1 of a 4-shard cache).
    (run / "export" / "config.json").unlink()
    assert train(_cfg(caches["base"], run, steps=6, checkpoint_every=3, sparsity_coeff=2.0, eval_shards=1)).steps == 6
    with pytest.raises(RunMismatchError, match="eval_shards: 1 there vs 2 now"):
        train(_cfg(caches["base"], run, steps=6, checkpoint_every=3, eval_shards=2))
    with pytest.raises(RunMismatchError, match=r"was trained on slots \['toy-base/blocks.0.hook_resid_post'\]; "
                                               r"the cache .* gives slots \['toy-code/blocks.0.hook_resid_post'\]"):
        train(_cfg(caches["other"], run, steps=6, checkpoint_every=3))
    with pytest.raises(RunMismatchError, match=r"gives slots \['toy-base/blocks.0.hook_resid_post', "
                                               r"'toy-code/blocks.0.hook_resid_post'\]"):
        train(_cfg(caches["pair"], run, steps=6, checkpoint_every=3))


def test_cli_refuses_a_resume_on_other_slots_without_a_traceback(caches, tmp_path):
    run = tmp_path / "run"
    train(_cfg(caches["base"], run))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, str(ROOT / "run_train.py"), "--cache", str(caches["pair"]), "--out", str(run),
                          "--latents", "16", "--steps", "5", "--batch-size", "64", "--lr", "3e-3", "--log-every", "1",
                          "--checkpoint-every", "1000", "--device", "cpu", "--no-progress"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "was trained on slots" in res.stderr


def test_resume_with_another_number_of_processes_names_the_launch_that_resumes(caches, tmp_path):
    """The loader's stream depends on the number of ranks: the refusal says how to re-launch."""
    from shared.cache_format import Manifest
    from train.run_dir import check_run_dir

    run = tmp_path / "run"
    cfg = _cfg(caches["base"], run, steps=6, checkpoint_every=3)
    train(cfg)
    man = Manifest.load(caches["base"])
    spec = resolve_slots(man, arch="crosscoder", models=None, hooks=None, in_hooks=None, out_hooks=None)
    assert check_run_dir(cfg, run, man.d_model, spec, len(man.shards), caches["base"], world_size=1)
    with pytest.raises(RunMismatchError, match=r"was trained with 1 process\(es\); this command runs 2\. .*resume it "
                                               r"with `python run_train.py \.\.\. \(one process, no torchrun\)`"):
        check_run_dir(cfg, run, man.d_model, spec, len(man.shards), caches["base"], world_size=2)


# ---- 3. sweep member errors name the member ----------------------------------------------------


def test_sweep_member_build_errors_name_the_member(tmp_path):
    cache = _mlp_cache(tmp_path / "cache")
    ok = _cfg(cache, tmp_path / "sweep" / "ok")
    clt = dataclasses.replace(ok, out=str(tmp_path / "sweep" / "clt"), arch="clt", latents=63,
                              in_hooks=MLP_HOOKS[0::2], out_hooks=MLP_HOOKS[1::2])
    with pytest.raises(ValueError, match="^sweep member 'clt': DictionaryConfig.n_latents: .*63 is not a multiple"):
        train_many([ok, clt])
    bad = dataclasses.replace(ok, out=str(tmp_path / "sweep" / "bad"), hooks=["blocks.9.hook_resid_post"])
    with pytest.raises(SlotError, match=r"^sweep member 'bad': hook \['blocks.9.hook_resid_post'\] not in cache"):
        train_many([ok, bad])
    with pytest.raises(SlotError, match=r"^hook \['blocks.9.hook_resid_post'\] not in cache"):  # a run: no prefix
        train(dataclasses.replace(bad))


# ---- 4. a finished run is not redone -----------------------------------------------------------


def test_rerunning_a_finished_run_does_nothing(caches, tmp_path):
    run = tmp_path / "run"
    first = train(_cfg(caches["base"], run))
    lines = read_metrics(run)
    weights = (run / "export" / "model.safetensors").stat().st_mtime_ns
    again = train(_cfg(caches["base"], run))
    assert again.already_complete and not first.already_complete
    assert again.eval_metrics == first.eval_metrics and again.final_metrics == first.final_metrics
    assert read_metrics(run) == lines
    assert (run / "export" / "model.safetensors").stat().st_mtime_ns == weights
    # Stopped after the final checkpoint but before the export: finishing does not log the eval twice.
    for f in (run / "export").iterdir():
        f.unlink()
    (run / "export").rmdir()
    assert not train(_cfg(caches["base"], run)).already_complete
    assert read_metrics(run) == lines and (run / "export" / "config.json").is_file()


def test_rerunning_a_finished_sweep_does_nothing(caches, tmp_path):
    members = [_cfg(caches["base"], tmp_path / "sweep" / n, latents=lat) for n, lat in (("a", 16), ("b", 32))]
    train_many(members)
    lines = {m.out: read_metrics(m.out) for m in members}
    results = train_many(members)
    assert [r.already_complete for r in results] == [True, True]
    assert [str(r.run_dir) for r in results] == [m.out for m in members]
    assert {m.out: read_metrics(m.out) for m in members} == lines


def test_cli_says_a_finished_run_is_complete(caches, tmp_path):
    run = tmp_path / "run"
    train(_cfg(caches["base"], run))
    n_lines = len(read_metrics(run))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, str(ROOT / "run_train.py"), "--cache", str(caches["base"]), "--out", str(run),
                          "--latents", "16", "--steps", "5", "--batch-size", "64", "--lr", "3e-3", "--log-every", "1",
                          "--checkpoint-every", "1000", "--device", "cpu", "--no-progress"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "already holds the finished run" in res.stdout and "trained" not in res.stdout
    assert len(read_metrics(run)) == n_lines


# ---- 5. an input slot that is also an output slot ----------------------------------------------


def test_directional_refuses_an_output_that_is_also_an_input(tmp_path):
    man = make_cache(tmp_path / "cache", n_models=1, n_hooks=3)
    h0, h1, h2 = man.hooks
    kw = {"models": None, "hooks": None, "cache_dir": str(tmp_path / "cache")}
    with pytest.raises(SlotError, match=r"\['blocks.2.hook_resid_post'\] is both an input and an output.*"
                                        r"--arch crosscoder --hooks blocks.2.hook_resid_post"):
        resolve_slots(man, arch="directional", in_hooks=[h2], out_hooks=[h2], **kw)
    with pytest.raises(SlotError, match=r"\['blocks.1.hook_resid_post'\] is both an input and an output"):
        resolve_slots(man, arch="directional", in_hooks=[h0, h1], out_hooks=[h1, h2], **kw)
    spec = resolve_slots(man, arch="directional", in_hooks=[h0], out_hooks=[h1, h2], **kw)
    assert (spec.in_slots, spec.out_slots) == ([0], [1, 2])


def test_clt_with_a_skip_refuses_an_output_that_is_also_an_input(tmp_path):
    """A CLT with --skip whose layer-l output hook is its input hook learns the identity exactly (it trained to
    EV 0.996 at L0 1 in an audit). Without --skip it is a weakly causal crosscoder: allowed."""
    hooks = {"arch": "clt", "in_hooks": ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"],
             "out_hooks": ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]}
    with pytest.raises(ValueError, match=r"--skip with \['blocks.0.hook_resid_post', 'blocks.1.hook_resid_post'\] "
                                         r"both an --in-hooks and an --out-hooks learns the identity map"):
        _cfg(tmp_path / "cache", tmp_path / "run", skip=True, **hooks)
    _cfg(tmp_path / "cache", tmp_path / "run", **hooks)
    _cfg(tmp_path / "cache", tmp_path / "run", skip=True, arch="clt", in_hooks=["blocks.0.hook_mlp_in"],
         out_hooks=["blocks.0.hook_mlp_out"])


# ---- 6. non-finite losses and gradients ----------------------------------------------------------


def _cache_with_value(path: Path, value: float, shard: int = 0, rows: slice = slice(300, 301)) -> Path:
    """One model, one hook, float32, d_model 8: two shards of N(0, 1) rows, ``rows`` of ``shard`` all ``value``."""
    from shared.cache import CacheWriter
    from shared.cache_format import Manifest, shard_file_name
    from shared.token_table import write_token_table

    m = Manifest(models=[{"name": "a"}], hooks=["h"], d_model=8, dtype="float32", context_size=2, n_rows=0,
                 shards=[], normalization={"method": "none", "scale": [[1.0]], "file": None},
                 excluded_tokens={}, dataset={}, tokenizer={}, created_by={}, complete=False)
    w = CacheWriter(path, m)
    g = torch.Generator().manual_seed(0)
    for s in range(2):
        x = torch.randn(512, 1, 1, 8, generator=g)
        if s == shard:
            x[rows, 0, 0, :] = value
        w.add_shard(shard_file_name(s), x, torch.arange(512), torch.ones(512), torch.ones(512))
    write_token_table(path, [[0, 1]] * 1024)
    w.finish()
    return path


@pytest.mark.parametrize("grad_clip", [1.0, 0.0])
def test_non_finite_gradient_norm_stops_with_a_checkpoint(tmp_path, grad_clip):
    """Rows of 1e17 keep the loss finite (1e34 < float32 max) but overflow the gradient norm.
    Clipping used to turn that into a silent zero step; without clipping it poisoned the weights."""
    cache = _cache_with_value(tmp_path / "cache", 1e17)
    cfg = _cfg(cache, tmp_path / "run", steps=20, eval_shards=0, lr=1e-4, grad_clip=grad_clip)
    with pytest.raises(NonFiniteLossError, match=r"the gradient norm of .* became (inf|nan) at step (\d+) .*"
                                                 r"holds an outlier: its largest \|activation\| is 1e\+17") as err:
        train(cfg)
    # Steps count from 1 as in metrics.jsonl; the checkpoint holds the state after the step before.
    step = int(str(err.value).split(" at step ")[1].split()[0])
    assert f"(after step {step - 1})" in str(err.value)
    ck = load_checkpoint(tmp_path / "run" / "checkpoints" / f"step-{step - 1:07d}")
    assert ck["state"]["step"] == step - 1
    assert all(torch.isfinite(v).all() for v in ck["model"].values())


def test_non_finite_activations_are_blamed_on_the_cache(tmp_path):
    cache = _cache_with_value(tmp_path / "cache", float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"non-finite at step \d+ .* batch holds non-finite activations in "
                                                 r"\['a/h'\]: the cache is the cause.*run_harvest.py verify"):
        train(_cfg(cache, tmp_path / "run", steps=20, eval_shards=0))


def test_a_cache_of_one_shard_has_no_eval_lines(tmp_path):
    """One shard is all train: no held-out split, so no eval line (a bare {"step": N} was written)."""
    make_cache(tmp_path / "cache", n_shards=1, n_models=1)
    train(_cfg(tmp_path / "cache", tmp_path / "run", steps=4, eval_every=2, log_every=1))
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4] and all("loss/total" in line for line in lines)


@pytest.mark.parametrize("value,activation", [(float("inf"), "relu"), (float("nan"), "relu"),
                                              (float("nan"), "jumprelu")])
def test_non_finite_held_out_rows_are_left_out_of_the_eval(tmp_path, value, activation, capsys):
    """NaN/inf rows in the held-out shard made every eval figure NaN; the export (which refuses NaN
    metadata) then failed on every re-run, so the trained weights could never be exported. JumpReLU
    initialises its biases from a held-out batch: those rows made them NaN and the first step stop."""
    cache = _cache_with_value(tmp_path / "cache", value, shard=1, rows=slice(0, 256))
    run = tmp_path / "run"
    result = train(_cfg(cache, run, steps=6, eval_shards=1, eval_every=3, eval_batches=100, activation=activation))
    assert "256 held-out row(s)" in capsys.readouterr().err
    lines = [json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.jsonl"))
             for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [line for line in lines if "eval/recon" in line]
    assert [line["step"] for line in evals] == [3, 6]
    assert all(line["eval/nonfinite_rows"] == 256 and math.isfinite(line["eval/recon"]) for line in evals)
    assert math.isfinite(result.eval_metrics["eval/ev/overall"])
    exported = json.loads((run / "export" / "config.json").read_text())["metadata"]["eval"]
    assert exported == {k: v for k, v in evals[-1].items() if k != "step"}



def test_a_diverging_sweep_member_is_named_and_the_rest_go_on_without_it(caches, tmp_path):
    """One member diverges: the sweep stops (all members saved at the state before the step) and says to drop that
    member from the sweep file; the same command then resumes the others (a changed member would be refused)."""
    from train.sweep import expand_sweep

    sweep, out = tmp_path / "sweep.yaml", tmp_path / "runs"
    base = _cfg(caches["base"], out, steps=6, checkpoint_every=2)
    sweep.write_text("members: [{name: good}, {name: wild, lr: 1.0e+35, grad_clip: 0}]\n")
    with pytest.raises(NonFiniteLossError, match=r"Remove member 'wild' from the sweep file and re-run the same "
                                                 r"command: the other members resume"):
        train_many(expand_sweep(sweep, base))
    sweep.write_text("members: [{name: good}]\n")
    (good,) = train_many(expand_sweep(sweep, base))
    assert good.steps == 6 and (out / "good" / "export" / "model.safetensors").is_file()


def test_tokens_count_the_rows_of_each_batch_across_epochs(caches, tmp_path):
    """``tokens`` (metrics, and the dead-latent counters) adds each batch's real rows: the last
    batch of an epoch is shorter. 3 train shards of 256 rows, batch 100: 7 full batches and one
    of 68 per epoch."""
    run = tmp_path / "run"
    train(_cfg(caches["base"], run, steps=20, batch_size=100, eval_shards=1))
    lines = [r for r in read_metrics(run) if "loss/total" in r]
    sizes = [68 if i % 8 == 7 else 100 for i in range(20)]
    assert [r["tokens"] for r in lines] == [sum(sizes[: r["step"]]) for r in lines]


@pytest.mark.parametrize("world", [2, 3])
def test_global_batch_rows_is_the_sum_over_ranks(caches, world):
    """What the trainer counts as a step's tokens under DDP: every rank's rows of that batch."""
    from train.loader import ActivationLoader

    ranks = [ActivationLoader(caches["base"], 100, rank=r, world_size=world, eval_shards=1) for r in range(world)]
    for j in range(ranks[0].batches_per_epoch):
        spans = [ld._batch_range(j) for ld in ranks]
        assert ranks[0].global_batch_rows(j) == sum(b - a for a, b in spans)
    assert ranks[0].global_batch_rows(ranks[0].batches_per_epoch - 1) < 100 * world  # 768 rows: a short tail


# ---- 7. sweep member names stay under --out -------------------------------------------------------


def _sweep(tmp_path: Path, text: str, **base_kw) -> list[TrainConfig]:
    from train.sweep import expand_sweep

    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return expand_sweep(path, _cfg(tmp_path / "cache", tmp_path / "out", **base_kw))


@pytest.mark.parametrize("text,match", [
    ("", "defines no member"), ("members: []\n", "defines no member"), ("grid: {}\n", "defines no member"),
    ("grid:\n", "defines no member"),
    ("grid: {lr: []}\n", "grid field 'lr' has no values"),
    # The same dictionary twice: {} is the command line's lr; 1e-3 (a string to PyYAML) and 0.001 are one lr.
    ("members: [{}, {lr: 3.0e-3}]\n", "members 'base' and 'lr-0.003' are the same configuration"),
    ("grid: {lr: [1e-3, 0.001]}\n", "members 'lr-1e-3' and 'lr-0.001' are the same configuration"),
    # A default given by value (relu: dec_init_norm 0.1) is the same dictionary, as a resume sees it.
    ("members: [{}, {dec_init_norm: 0.1}]\n", "members 'base' and 'dec_init_norm-0.1' are the same configuration"),
    (f"members: [{{name: {'x' * 201}}}]\n", "at most 200 bytes"),
])
def test_sweep_files_that_train_nothing_or_the_same_twice_are_refused(tmp_path, text, match):
    with pytest.raises(ValueError, match=match):
        _sweep(tmp_path, text)


def test_sweep_members_equal_once_the_cache_fills_in_defaults_are_refused(caches, tmp_path):
    """k_aux's default needs d_model and eval_shards' the shard count, unknown when the sweep file is read:
    `{}` beside `{k_aux: 8}` (d_model 16) or `{eval_shards: <default>}` trained one dictionary twice."""
    from train.loader import default_eval_shards
    from train.sweep import expand_sweep

    base = _cfg(caches["base"], tmp_path / "sweep")
    n_shards = json.loads((caches["base"] / "manifest.json").read_text())["shards"]
    for same in ("k_aux: 8", f"eval_shards: {default_eval_shards(len(n_shards))}"):
        (tmp_path / "s.yaml").write_text(f"members: [{{}}, {{{same}}}]\n")
        cfgs = expand_sweep(tmp_path / "s.yaml", base)  # no cache yet: accepted here
        with pytest.raises(ValueError, match=r"members 'base' and '.*' are the same configuration once the defaults "
                                             r"are filled in for this cache \(d_model 16, so k_aux 8"):
            train_many(cfgs)
        assert not (tmp_path / "sweep").exists()
    (tmp_path / "s.yaml").write_text("members: [{}, {k_aux: 4}]\n")  # another value: two dictionaries
    assert [r.steps for r in train_many(expand_sweep(tmp_path / "s.yaml", base))] == [5, 5]


def test_sweep_shared_flags_need_not_be_a_whole_config(caches, tmp_path, capsys):
    """`--activation batchtopk` with a grid over k was refused ("needs --k") before any member's overrides were
    applied, and so was `--arch directional` with each member's hooks: only each member must be whole."""
    import run_train

    common = ["--cache", str(caches["base"]), "--latents", "16", "--steps", "2", "--batch-size", "64",
              "--no-progress", "--device", "cpu"]
    (tmp_path / "k.yaml").write_text("grid: {k: [2, 4]}\n")
    assert run_train.main(["--sweep", str(tmp_path / "k.yaml"), "--activation", "batchtopk", *common,
                           "--out", str(tmp_path / "k")]) == 0
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == ["k-2", "k-4"]
    # A member the sweep file leaves incomplete is refused by name, and nothing is written.
    (tmp_path / "lr.yaml").write_text("grid: {lr: [1.0e-3, 2.0e-3]}\n")
    assert run_train.main(["--sweep", str(tmp_path / "lr.yaml"), "--activation", "batchtopk", *common,
                           "--out", str(tmp_path / "lr")]) == 2
    assert "error: sweep member 'lr-0.001': " in capsys.readouterr().err and not (tmp_path / "lr").exists()


def test_a_lone_grid_value_is_a_list_of_one(tmp_path):
    (one,) = _sweep(tmp_path, "grid: {lr: 1.0e-3}\n")
    assert one.lr == 1e-3 and Path(one.out).name == "lr-0.001"


@pytest.mark.parametrize("members", ["[{name: 1, lr: 1.0e-3}, {name: 2}]", "[{name: /tmp/elsewhere}]",
                                     "[{name: ../sibling}]", "[{name: a/b}]", "[{name: ..}]", "[{name: '.'}]",
                                     "[{name: ''}]", "[{name: [a]}]"])
def test_sweep_member_names_must_be_plain_folder_names(tmp_path, members):
    """`name: 1` crashed with a TypeError; an absolute path or `..` trained the member outside --out."""
    with pytest.raises(ValueError, match=r"sweep file .*: member name .* must be a plain folder name under --out"):
        _sweep(tmp_path, f"members: {members}\n")


def test_sweep_generated_and_quoted_names_stay_under_out(tmp_path):
    text = "grid: {models: [[x/y], [z]]}\nmembers: [{}, {name: '1', lr: 1.0e-3}]\n"  # a '/' in a value: sanitised
    outs = [Path(c.out) for c in _sweep(tmp_path, text)]
    assert [p.name for p in outs] == ["models-x-y", "models-z", "1_models-x-y", "1_models-z"]
    assert all(p.parent == tmp_path / "out" for p in outs)


def test_long_generated_names_keep_grid_points_apart(tmp_path):
    """Names were cut at 120 characters, so grid points differing only after the cut shared a folder name and
    the sweep was refused with advice (distinct 'name' keys) that a grid cannot follow."""
    text = ("grid:\n  activation: [batchtopk]\n  lr: [1.0e-3]\n  dec_init_norm: [0.05]\n  aux_k_coeff: [0.03125]\n"
            "  sparsity_coeff: [null]\n  warmup_frac: [0.05]\n  decay_frac: [0.25]\n  k: [4, 8]\n")
    outs = [Path(c.out).name for c in _sweep(tmp_path, text)]
    assert len(set(outs)) == 2 and all(len(n) == 120 for n in outs), outs
    assert outs == [Path(c.out).name for c in _sweep(tmp_path, text)]  # stable: a resumed sweep finds its folders
    (short,) = _sweep(tmp_path, "grid: {lr: 1.0e+20}\n")
    assert Path(short.out).name == "lr-1e+20"  # not lr-1e-20


# ---- 8. non-finite hyperparameters, and a λ topk would ignore ---------------------------------------


def _float_fields() -> list[str]:
    import typing

    hints = typing.get_type_hints(TrainConfig)
    return [f.name for f in dataclasses.fields(TrainConfig) if "float" in str(hints[f.name])]


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
@pytest.mark.parametrize("name", _float_fields())
def test_non_finite_float_fields_are_refused_naming_the_flag(tmp_path, name, value):
    """`--dec-init-norm inf`, `--tanh-c inf` and `--jumprelu-bandwidth inf` once passed and failed at step 0
    with advice to lower --lr, leaving a checkpoint that refused the corrected command."""
    given = (value, 0.999) if name == "betas" else value
    flag = name.replace("_", "-")
    with pytest.raises(ValueError, match=rf"^{name} \(--{flag}\) must be a finite number, got"):
        _cfg(tmp_path / "cache", tmp_path / "run", activation="jumprelu", **{name: given})


def test_cli_refuses_an_infinite_hyperparameter_before_writing(caches, tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, str(ROOT / "run_train.py"), "--cache", str(caches["base"]), "--out", str(run),
                          "--latents", "16", "--steps", "5", "--batch-size", "64", "--activation", "jumprelu",
                          "--tanh-c", "inf", "--device", "cpu", "--no-progress"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "error: tanh_c (--tanh-c) must be a finite number, got inf" in res.stderr
    assert not run.exists()


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_an_explicit_sparsity_coeff_is_refused_for_topk(tmp_path, activation):
    """topk/batchtopk have no sparsity loss: a given λ was logged in metrics.jsonl but never applied."""
    with pytest.raises(ValueError, match=rf"--sparsity-coeff is only used by relu/jumprelu, not --activation "
                                         rf"{activation} \(--k sets its sparsity\)"):
        _cfg(tmp_path / "cache", tmp_path / "run", activation=activation, k=4, sparsity_coeff=5.0)
    assert _cfg(tmp_path / "cache", tmp_path / "run", activation=activation, k=4).resolved_sparsity_coeff == 0.0


def test_a_sweep_sharing_a_sparsity_coeff_names_the_topk_member(tmp_path):
    text = "members: [{}, {activation: topk, k: 4}]\n"
    with pytest.raises(ValueError, match=r"^sweep member 'activation-topk_k-4': --sparsity-coeff is only used by "
                                         r"relu/jumprelu.*set sparsity_coeff: null in it"):
        _sweep(tmp_path, text, sparsity_coeff=3.0)
    relu, topk = _sweep(tmp_path, "members: [{}, {activation: topk, k: 4, sparsity_coeff: null}]\n",
                        sparsity_coeff=3.0)
    assert (relu.resolved_sparsity_coeff, topk.resolved_sparsity_coeff) == (3.0, 0.0)


# ---- 9. a resume on another cache --------------------------------------------------------------------


def test_resume_on_another_cache_with_the_same_slots_is_refused_and_a_moved_cache_resumes(caches, tmp_path):
    """Same slots, other rows: refused by the run folder check (naming both caches), not by the loader's
    'different stream' message. The same shards under another path are the same cache."""
    import shutil

    from shared.cache_format import Manifest
    from train.run_dir import check_run_dir

    other = tmp_path / "reharvest"
    make_cache(other, n_models=1, model_names=["toy-base"], seed=1)
    run = tmp_path / "run"
    train(_cfg(caches["base"], run, steps=6, checkpoint_every=3))
    (run / "export" / "config.json").unlink()  # not finished: the next call resumes
    with pytest.raises(RunMismatchError, match=rf"--out {run} was trained on another cache: {caches['base']} .*"
                                               rf"but --cache {other} is .*Re-run with the original --cache to "
                                               r"resume, or choose another --out"):
        train(_cfg(other, run, steps=6, checkpoint_every=3))
    moved = tmp_path / "moved"
    shutil.copytree(caches["base"], moved)
    assert train(_cfg(moved, run, steps=6, checkpoint_every=3)).steps == 6

    # A run recorded before the cache's shards were: the check is skipped (the loader still compares).
    man = Manifest.load(other)
    spec = resolve_slots(man, arch="crosscoder", models=None, hooks=None, in_hooks=None, out_hooks=None)
    info = json.loads((run / "config.json").read_text())
    del info["cache"]["shards_sha256"]
    (run / "config.json").write_text(json.dumps(info))
    assert check_run_dir(_cfg(other, run, steps=6, checkpoint_every=3), run, man.d_model, spec, len(man.shards), other)
    # A topk run recorded with a λ (refused now, and never acting) resumes with the command without it.
    info["config"].update(activation="topk", k=4, sparsity_coeff=5.0)
    (run / "config.json").write_text(json.dumps(info))
    assert check_run_dir(_cfg(other, run, steps=6, checkpoint_every=3, activation="topk", k=4), run, man.d_model,
                         spec, len(man.shards), other)
    # A run whose recorded config is refused now (an inf) is named, not a bare ValueError about it.
    info["config"].update(activation="relu", k=None, sparsity_coeff=None, tanh_c=float("inf"))
    (run / "config.json").write_text(json.dumps(info))
    with pytest.raises(RunMismatchError, match=r"holds a run whose config is no longer accepted \(tanh_c"):
        check_run_dir(_cfg(other, run, steps=6, checkpoint_every=3), run, man.d_model, spec, len(man.shards), other)


def test_a_resume_records_the_options_it_changed_in_config_json(caches, tmp_path):
    """Options outside the resume signature may change on resume and take effect; config.json then
    says so (the values now, and what changed when), instead of keeping the first command's."""
    import shutil

    run = tmp_path / "run"
    train(_cfg(caches["base"], run, steps=6, checkpoint_every=3, log_every=2))
    first = json.loads((run / "config.json").read_text())

    def interrupt_after_step_3() -> None:
        (run / "export" / "config.json").unlink()
        shutil.rmtree(run / "checkpoints" / "step-0000006")

    interrupt_after_step_3()
    assert train(_cfg(caches["base"], run, steps=6, checkpoint_every=3, log_every=2)).steps == 6
    assert json.loads((run / "config.json").read_text()) == first  # the same command changes nothing

    interrupt_after_step_3()
    moved = tmp_path / "moved"
    shutil.copytree(caches["base"], moved)
    assert train(_cfg(moved, run, steps=6, checkpoint_every=3, log_every=1, eval_batches=2)).steps == 6
    info = json.loads((run / "config.json").read_text())
    assert info["config"]["log_every"] == 1 and info["config"]["eval_batches"] == 2
    assert info["config"]["cache"] == str(moved) and info["cache"]["path"] == str(moved.resolve())
    [resume] = info["resumes"]
    assert resume["changed"] == {"cache": [str(caches["base"]), str(moved)], "log_every": [2, 1],
                                 "eval_batches": [first["config"]["eval_batches"], 2],
                                 "cache.path": [str(caches["base"].resolve()), str(moved.resolve())]}
    assert {k: v for k, v in info.items() if k not in ("config", "cache", "resumes")} == \
        {k: v for k, v in first.items() if k not in ("config", "cache")}
    lines = [r["step"] for r in read_metrics(run) if "loss/total" in r]
    assert lines[-3:] == [4, 5, 6]  # --log-every 1 took effect after the resume at step 3


def test_curves_with_a_panel_of_nulls_draw_without_warnings(tmp_path):
    """--batch-size 1 makes every per-batch EV null: the panel says so (matplotlib warned of a legend with no lines)."""
    import warnings

    from train.metrics import plot_metrics

    rows = [{"step": s, "loss/total": 1.0 / (s + 1), "loss/recon": 0.5, "l0/mean": 3.0, "ev/overall": None,
             "ev/m/h": None, "dead_frac": 0.0, "lr": 1e-3, "sparsity_coeff": 1.0} for s in range(3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = plot_metrics(tmp_path)
    assert out is not None and out.stat().st_size > 0


def test_train_runs_on_a_thread_other_than_the_main_one(caches, tmp_path):
    """signal.signal works only on the main thread: a run started from a worker thread (a notebook's
    background job, a test harness) failed with ValueError before its first step."""
    import threading

    box: dict = {}

    def work() -> None:
        try:
            box["result"] = train(_cfg(caches["base"], tmp_path / "run", steps=3))
        except BaseException as e:  # noqa: BLE001 - handed to the assert below
            box["error"] = e

    t = threading.Thread(target=work)
    t.start()
    t.join(timeout=300)
    assert "error" not in box, box.get("error")
    assert box["result"].steps == 3


FEW_FILES = """
import os, resource, sys, types
sys.path.insert(0, {root!r})
import run_train
from shared.cache import open_cache
from train.lm_eval import _held_out_sequences

cache = open_cache({cache!r})
limit = len(os.listdir("/proc/self/fd")) + 40  # fewer descriptors left than the cache has shards
resource.setrlimit(resource.RLIMIT_NOFILE, (limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
# lm-eval's choice of held-out sequences reads every shard's seq column: one shard mapped at a time.
run = types.SimpleNamespace(info={{"config": {{"eval_shards": 3}}}})
seqs, share = _held_out_sequences(cache, run, 4, [])
print("held-out", len(seqs))
# A window of more shards than the limit allows: a clear error, not an EMFILE traceback.
sys.exit(run_train.main(["--cache", {cache!r}, "--out", {out!r}, "--window", "100", "--latents", "16",
                         "--steps", "3", "--batch-size", "32", "--device", "cpu", "--no-progress"]))
"""


def test_more_shards_than_the_open_file_limit(tmp_path):
    """Each mapped shard holds a file descriptor. lm-eval kept every shard of the cache mapped at once (EMFILE
    past `ulimit -n` shards, e.g. 1024); a --window above the limit ended in an EMFILE traceback."""
    cache = tmp_path / "cache"
    make_cache(cache, n_shards=120, rows_per_shard=16, n_models=1, n_hooks=1, d_model=8, dtype=torch.float32)
    script = tmp_path / "few_files.py"
    script.write_text(FEW_FILES.format(root=str(ROOT), cache=str(cache), out=str(tmp_path / "run")))
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert "held-out " in res.stdout, res.stderr[-3000:]
    assert res.returncode == 2, res.stderr[-3000:]
    assert "too many open files (this process's limit, `ulimit -n`, is" in res.stderr
    assert "lower --window, or raise the limit" in res.stderr and "Traceback" not in res.stderr
