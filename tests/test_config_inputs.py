"""Configs and command lines given bad input, from an outside audit: each is refused on construction (or
before anything runs) with a message naming the field and the fix, never a traceback or a silent default."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import run_harvest
import run_train
from harvest.config import HarvestConfig
from shared.config import load_config_file
from train.analysis_config import AnalysisConfig
from train.config import TrainConfig
from train.lm_eval import LMEvalConfig
from train.sweep import expand_sweep


def _train(**kw) -> TrainConfig:
    return TrainConfig(**{"activation": "topk", "k": 4, "latents": 32, **kw})


@pytest.mark.parametrize(("text", "match"), [
    ("steps: 20\n1: 2\n", r"key 1 \(int\) is not a field name.*quote the key"),
    ("yes: 3\n", r"key True \(bool\) is not a field name"),
    ("steps: 20\nsteps: 30\n", r"gives 'steps' \(line 2\) twice"),
    ("eval-every: 5\neval_every: 10\n", r"field 'eval_every' is given twice \(as 'eval-every' and as 'eval_every'\)"),
])
def test_config_file_keys_are_field_names_given_once(tmp_path, text, match):
    """A YAML key read as a number or boolean crashed (AttributeError); a key given twice kept the last."""
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_config_file(path)
    (tmp_path / "cfg.json").write_text('{"steps": 20, "steps": 30}')
    with pytest.raises(ValueError, match=r"gives 'steps' twice"):
        load_config_file(tmp_path / "cfg.json")


def test_a_runs_config_json_as_config_says_where_its_fields_are(tmp_path, capsys):
    """It said "unknown TrainConfig field(s): 'config', 'd_model' (did you mean 'models'?)"."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"config": {"steps": 20}, "slots": ["a/h"], "d_model": 8}))
    assert run_train.main(["--config", str(path), "--steps", "3"]) == 2
    err = capsys.readouterr().err
    assert "looks like a run folder's config.json: its TrainConfig fields are under \"config\"" in err


def test_sweep_keys_and_betas(tmp_path, capsys):
    """A non-text grid key, and betas written as one number, crashed with a traceback."""
    sweep = tmp_path / "sweep.yaml"
    base = {"activation": "topk", "k": 4, "latents": 32, "out": str(tmp_path / "s")}
    sweep.write_text("grid:\n  1: [1]\n")
    with pytest.raises(ValueError, match=r"sweep file .*: grid: key 1 \(int\) is not a field name"):
        expand_sweep(sweep, base)
    sweep.write_text("members:\n  - {betas: 0.5}\n")
    with pytest.raises(ValueError, match=r"sweep member .*betas: expected a list, got 0\.5"):
        expand_sweep(sweep, base)
    sweep.write_text("members:\n  - {lr: 0.01, lr: 0.02}\n")
    with pytest.raises(ValueError, match=r"sweep file .* gives 'lr' \(line 2\) twice"):
        expand_sweep(sweep, base)
    sweep.write_text("grid:\n  betas: [[0.0, 0.999], [0.9, 0.999]]\n")
    assert [c.betas for c in expand_sweep(sweep, base)] == [(0.0, 0.999), (0.9, 0.999)]
    # YAML merge keys are not duplicates: a member may override what it merges.
    sweep.write_text("members:\n  - &small {latents: 16, lr: 0.01}\n  - <<: *small\n    lr: 0.02\n")
    assert [(c.latents, c.lr) for c in expand_sweep(sweep, base)] == [(16, 0.01), (16, 0.02)]


@pytest.mark.parametrize(("kw", "match"), [
    ({"dist_timeout": 1e30}, r"dist_timeout must be at most 1e\+08 seconds"),
    ({"seed": 10**23}, r"seed \(--seed\) must be an integer in \[0, 2\*\*63 - 1\]"),
    ({"seed": -1}, r"seed \(--seed\) must be an integer in \[0, 2\*\*63 - 1\]"),
    ({"shared_latents": -3}, r"shared_latents \(--shared-latents\) must lie in \[0, latents=32\)"),
    ({"shared_latents": 32}, r"shared_latents \(--shared-latents\) must lie in \[0, latents=32\)"),
    ({"k_aux": -1}, r"k_aux \(--k-aux\) must be >= 1"),
    ({"latents": 10**23}, r"latents \(--latents\) must be at most 2\*\*31 - 1"),
    ({"steps": 10**23}, r"steps \(--steps\) must be at most 2\*\*31 - 1"),
    ({"eval_shards": -1}, r"eval_shards \(--eval-shards\) must be >= 0"),
    ({"wandb_project": " "}, r"wandb_project \(--wandb-project\) is empty"),
    ({"out": ""}, r"out: an empty path"),
    ({"cache": "  "}, r"cache: an empty path"),
])
def test_train_config_refuses_on_construction(kw, match):
    """These constructed (a huge seed or timeout then failed with an overflow naming no flag; negative
    shared latents, k_aux or eval_shards were refused later under internal names)."""
    with pytest.raises(ValueError, match=match):
        _train(**kw)


def test_harvest_config_refuses_empty_paths_and_a_huge_timeout():
    for kw, match in [({"out": ""}, r"out: an empty path"), ({"dataset": ""}, r"dataset: an empty path"),
                      ({"models": ["toy-base", ""]}, r"models\[1\]: an empty path"),
                      ({"dist_timeout": 1e30}, r"dist_timeout must be .* at most 1e\+08")]:
        with pytest.raises(ValueError, match=match):
            HarvestConfig(**kw)


def test_a_quoted_tilde_is_the_home_folder():
    """`--out '~/x'` (or `out: ~/x` in a YAML file) made a folder named `~` in the working folder."""
    home = os.path.expanduser("~")
    assert _train(out="~/runs/x", cache="~/c").out == f"{home}/runs/x"
    cfg = HarvestConfig(out="~/caches/x", models=["~/models/a", "toy-code"], dataset="~/data.jsonl")
    assert (cfg.out, cfg.models, cfg.dataset) == (f"{home}/caches/x", [f"{home}/models/a", "toy-code"],
                                                  f"{home}/data.jsonl")
    assert HarvestConfig(dataset="builtin:mixed").dataset == "builtin:mixed"  # not a path: as it was
    assert AnalysisConfig(run="~/r").run == f"{home}/r"


def test_lm_eval_out_names_a_file_and_focus_a_column(tmp_path):
    """An --out that is a folder ran the whole evaluation, then died (IsADirectoryError); `--out new/`
    wrote a file named `new`. `--focus =code` (no column) gave no focus and no note."""
    for out in (str(tmp_path), str(tmp_path / "new") + "/"):
        with pytest.raises(ValueError, match=r"out \(--out\) .* is a folder; it names the result JSON file"):
            LMEvalConfig(run="r", out=out)
    assert LMEvalConfig(run="r", out=str(tmp_path / "x.json")).out_path == tmp_path / "x.json"
    with pytest.raises(ValueError, match=r"focus must be COLUMN=VALUE"):
        AnalysisConfig(run="r", focus="=code")


def test_export_saelens_checks_its_flags_before_reading(tmp_path, capsys):
    """--context-size -5 was written into cfg.json; --out "" wrote into the working folder."""
    from train.export_saelens import export_saelens

    with pytest.raises(ValueError, match=r"--context-size must be a whole number >= 1"):
        export_saelens(tmp_path / "no-run", tmp_path / "out", context_size=-5)
    with pytest.raises(ValueError, match=r"--out is empty"):
        export_saelens(tmp_path / "no-run", "")
    assert run_train.main(["export-saelens", str(tmp_path / "no-run"), "--out", str(tmp_path / "o"),
                           "--context-size", "0"]) == 2
    assert "--context-size must be a whole number >= 1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("main", "argv", "needle"), [
    (run_train.main, ["analyse", "runs/x"], "unknown command 'analyse' (did you mean 'analyze'?)"),
    (run_train.main, ["lm_eval", "runs/x"], "unknown command 'lm_eval' (did you mean 'lm-eval'?)"),
    (run_harvest.main, ["verfy", "caches/x"], "unknown command 'verfy' (did you mean 'verify'?)"),
])
def test_a_misspelt_command_is_named_with_the_commands(main, argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "the commands are" in err


@pytest.mark.parametrize(("main", "argv"), [(run_train.main, ["--lat", "32"]), (run_harvest.main, ["--tok", "10"])])
def test_flags_are_not_abbreviated(main, argv, capsys):
    """argparse took `--lat 32` for `--latents 32`: a flag added later could silently change an old script."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and f"unrecognized arguments: {argv[0]}" in capsys.readouterr().err


@pytest.mark.parametrize(("main", "argv", "flag"), [
    (run_harvest.main, ["--models", "toy-base", "--models", "toy-code"], "--models"),
    (run_train.main, ["--cache", "c", "--hooks", "a", "b", "--hooks", "c"], "--hooks"),
])
def test_a_list_flag_given_twice_is_refused(main, argv, flag, capsys):
    """argparse kept only the last list: `--models a --models b` harvested b alone."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"{flag} given twice" in err and f"list every value after one {flag}" in err


def test_a_scalar_flag_given_twice_keeps_the_last():
    """A script's defaults followed by an override (`$BASE --lr 1e-3 --lr 3e-4`) is a common pattern."""
    import argparse

    from shared.config import add_dataclass_arguments, config_from_namespace
    from train.config import TrainConfig

    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, TrainConfig)
    ns = parser.parse_args(["--cache", "c", "--lr", "1e-3", "--lr", "3e-4", "--hooks", "a", "b"])
    cfg = config_from_namespace(TrainConfig, ns)
    assert cfg.lr == 3e-4 and cfg.hooks == ["a", "b"]


def test_nothing_written_for_a_refused_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_harvest.main(["--out", "", "--tokens", "100"]) == 2
    assert run_train.main(["--out", "", "--steps", "2"]) == 2
    assert list(Path(tmp_path).iterdir()) == []


def test_a_dictionary_too_large_for_memory_is_named(tmp_path, monkeypatch, capsys):
    """--latents 10000000000 died with torch's "can't allocate memory" traceback."""
    import train.trainer as trainer
    from tests.cache_factory import make_cache

    cache = tmp_path / "cache"
    make_cache(cache, n_shards=2, rows_per_shard=64, d_model=8)

    def no_memory(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(trainer, "Dictionary", no_memory)
    args = ["--cache", str(cache), "--out", str(tmp_path / "run"), "--latents", "1000000", "--steps", "2",
            "--batch-size", "16", "--device", "cpu", "--no-progress"]
    assert run_train.main(args) == 2
    assert "--latents 1,000,000 does not fit in memory on cpu" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
