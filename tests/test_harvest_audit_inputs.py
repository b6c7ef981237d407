"""Audit fixes: a full disk is a one-line CLI error, --seed is range-checked up front, and a
non-string --text-column is refused with a clear message."""

from __future__ import annotations

import json

import pytest

from conftest import fill_disk_after, small_harvest_config
from harvest.models import HarvestInputError


def test_cli_disk_full_prints_one_error_line(toy_dirs, tmp_path, monkeypatch, capsys):
    import run_harvest

    fill_disk_after(monkeypatch, 0)
    out = tmp_path / "full"
    argv = ["--models", "toy-base", "--hooks", "blocks.2.hook_resid_post", "--dataset", "builtin:mixed",
            "--tokens", "1500", "--context-size", "64", "--batch-size", "16", "--shard-size", "0.0625",
            "--shuffle-shards", "2", "--calibration-tokens", "500", "--device", "cpu", "--no-progress",
            "--out", str(out)]
    assert run_harvest.main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "disk full while writing" in lines[0] and "re-run" in lines[0]
    assert "Traceback" not in err and "[Errno" not in lines[0]


def test_seed_range_is_checked(tmp_path):
    from harvest.config import MAX_SEED

    assert small_harvest_config(tmp_path, seed=MAX_SEED).seed == MAX_SEED
    assert small_harvest_config(tmp_path, seed=0).seed == 0
    for bad in (MAX_SEED + 1, 10**13, -1):
        with pytest.raises(ValueError, match=rf"seed must be an integer in \[0, {MAX_SEED}\]"):
            small_harvest_config(tmp_path, seed=bad)


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf")])
def test_dist_timeout_is_checked_without_torchrun_too(tmp_path, bad):
    """It was checked only under torchrun: `--dist-timeout 0` passed a one-process try of the command."""
    assert small_harvest_config(tmp_path, dist_timeout=30).dist_timeout == 30
    with pytest.raises(ValueError, match="dist_timeout must be a positive number of seconds"):
        small_harvest_config(tmp_path, dist_timeout=bad)


def test_max_seed_fits_the_write_shuffle():
    from harvest.config import MAX_SEED
    from harvest.writer import chunk_permutation

    assert len(chunk_permutation(MAX_SEED, 2**32, 4)) == 4  # no int64 overflow at the largest seed


def test_cli_refuses_a_huge_seed(tmp_path, capsys):
    import run_harvest

    argv = ["--seed", str(2 * 10**13), "--device", "cpu", "--no-progress", "--out", str(tmp_path / "c")]
    assert run_harvest.main(argv) == 2
    assert "seed must be an integer in [0," in capsys.readouterr().err


def test_non_string_text_column_is_refused(toy_dirs, tmp_path):
    from transformers import AutoTokenizer

    from harvest.token_stream import build_token_plan

    tok = AutoTokenizer.from_pretrained(toy_dirs["toy-base"])
    path = tmp_path / "ints.jsonl"
    path.write_text("".join(json.dumps({"text": f"doc {i} about imports.", "lang_id": i + 1}) + "\n" for i in range(20)))
    with pytest.raises(HarvestInputError) as e:
        build_token_plan(dataset=str(path), split="train", text_column="lang_id", meta_columns=None, seed=0,
                         tokenizer=tok, context_size=16, bos_id=0, eos_id=0, excluded_ids=[0], n_rows=50)
    msg = str(e.value)
    assert "'lang_id'" in msg and "int" in msg and "--text-column" in msg and "input_ids" in msg


@pytest.mark.parametrize("name", ["seq", "input_ids"])
def test_meta_columns_named_like_the_token_tables_own_are_refused_up_front(tmp_path, capsys, name):
    """`--meta-columns seq` was a ValueError traceback (exit 1) when tokens.arrow was written, after the models
    loaded and the dataset was read."""
    import run_harvest

    assert run_harvest.main(["--meta-columns", name, "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert f"meta_columns: ['{name}'] would overwrite tokens.arrow's own column(s)" in err and "Traceback" not in err
    assert not (tmp_path / "c").exists()


def test_meta_columns_flag_alone_means_none(toy_dirs, tmp_path):
    """`--meta-columns` with no name (it was an argparse error): a dataset's `source` column is then not used."""
    import argparse

    from harvest.config import HarvestConfig
    from harvest.harvester import harvest
    from shared.config import add_dataclass_arguments, config_from_namespace
    from shared.token_table import read_token_table

    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, HarvestConfig)
    assert config_from_namespace(HarvestConfig, parser.parse_args(["--meta-columns"]), None).meta_columns == []
    cfg = small_harvest_config(tmp_path, meta_columns=[])
    harvest(cfg)
    assert read_token_table(cfg.out).column_names == ["seq", "input_ids"]
