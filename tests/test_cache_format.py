"""Cache format v1 on disk: round trips, golden header bytes, and corrupt or truncated files."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from shared.cache import CacheWriter, open_cache, verify_cache
from shared.cache_format import CacheError, Manifest, shard_file_name
from shared.normalization import Normalization
from shared.shard_io import ShardReader, write_shard
from shared.token_table import read_token_table, write_token_table


def _manifest(n_models=2, n_hooks=1, d=8, dtype="bfloat16") -> Manifest:
    return Manifest(
        models=[{"name": f"m{i}", "path": None} for i in range(n_models)],
        hooks=[f"blocks.{i}.hook_resid_post" for i in range(n_hooks)],
        d_model=d, dtype=dtype, context_size=4, n_rows=0, shards=[],
        normalization={"method": "none", "scale": [[1.0] * n_hooks] * n_models, "file": None},
        excluded_tokens={"special": True, "token_ids": [0]},
        dataset={"name": "synthetic"}, tokenizer={"name": "none", "vocab_size": 10},
        created_by={"tool": "test"}, complete=False,
    )


def _write_cache(tmp_path: Path, n_shards=3, rows=5, dtype=torch.bfloat16, dtype_name="bfloat16") -> Path:
    w = CacheWriter(tmp_path, _manifest(dtype=dtype_name))
    g = torch.Generator().manual_seed(0)
    for i in range(n_shards):
        acts = torch.randn(rows, 2, 1, 8, generator=g).to(dtype)
        seq = torch.arange(rows) + i * rows
        w.add_shard(shard_file_name(i), acts, seq, torch.ones(rows), torch.full((rows,), 7))
    write_token_table(tmp_path, [[0, 1, 2, 3]] * (n_shards * rows))
    w.finish()
    return tmp_path


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_shard_round_trip(tmp_path, dtype):
    acts = torch.randn(6, 2, 3, 4).to(dtype)
    seq, pos, tok = torch.arange(6), torch.arange(6) + 1, torch.arange(6) + 2
    rec = write_shard(tmp_path, "shards/a.safetensors", acts, seq, pos, tok)
    assert rec.n_rows == 6 and rec.bytes == (tmp_path / rec.file).stat().st_size
    r = ShardReader(tmp_path / rec.file, row_shape=(2, 3, 4), dtype=dtype, n_rows=6, expected_bytes=rec.bytes)
    assert torch.equal(r.acts, acts) and torch.equal(r.seq, seq)
    assert r.pos.dtype == torch.int32 and r.token.dtype == torch.int32 and r.seq.dtype == torch.int64
    assert torch.equal(r.pos, pos.int()) and torch.equal(r.token, tok.int())
    # Readable by plain safetensors too (the format is the documented one, not ours).
    from safetensors.torch import load_file

    assert torch.equal(load_file(tmp_path / rec.file)["acts"], acts)


def test_a_view_outliving_close_keeps_the_mapping(tmp_path):
    """close() must not unmap pages a live tensor still points into (reading them would crash):
    it reports the mapping as still in use, and the view stays valid."""
    acts = torch.randn(64, 1, 1, 32)
    rec = write_shard(tmp_path, "shards/a.safetensors", acts, torch.arange(64), torch.ones(64), torch.ones(64))
    r = ShardReader(tmp_path / rec.file, row_shape=(1, 1, 32), dtype=torch.float32)
    view = r.acts[10:20]
    assert r.close() is False
    assert torch.equal(view.clone(), acts[10:20])
    del view
    r2 = ShardReader(tmp_path / rec.file, row_shape=(1, 1, 32), dtype=torch.float32)
    assert r2.close() is True


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n", [0, 1, 37])
def test_shard_bytes_are_what_safetensors_writes(tmp_path, dtype, n):
    """write_shard streams the file itself (no bytes copy); it must stay the library's exact output."""
    import hashlib

    from safetensors.torch import save

    from shared.shard_io import SHARD_METADATA

    acts = torch.randn(n, 2, 3, 8).to(dtype)
    seq, pos = torch.arange(n) * 7, torch.arange(n, dtype=torch.int32)
    rec = write_shard(tmp_path, "s.safetensors", acts, seq, pos, pos * 3)
    ref = save({"acts": acts, "seq": seq, "pos": pos, "token": pos * 3}, metadata=SHARD_METADATA)
    assert (tmp_path / "s.safetensors").read_bytes() == ref
    assert rec.sha256 == hashlib.sha256(ref).hexdigest() and rec.bytes == len(ref)


@pytest.mark.parametrize("extra", [torch.ones(37, dtype=torch.uint8), torch.zeros(3, dtype=torch.float64)])
def test_a_shard_with_a_tensor_of_its_own_is_read(tmp_path, extra):
    """The format lets a writer add tensors (readers ignore them); safetensors orders a file's tensors by
    alignment, so a uint8 one lands after ours, and its bytes were refused as 'unexpected trailing bytes'."""
    from safetensors.torch import save_file

    from shared.shard_io import ShardReader

    acts = torch.randn(37, 2, 3, 8).to(torch.bfloat16)
    seq, pos = torch.arange(37), torch.arange(37, dtype=torch.int32)
    path = tmp_path / "s.safetensors"
    save_file({"acts": acts, "seq": seq, "pos": pos, "token": pos * 3, "keep_mask": extra}, path)
    reader = ShardReader(path, row_shape=(2, 3, 8), dtype=torch.bfloat16, n_rows=37,
                         expected_bytes=path.stat().st_size)
    assert torch.equal(reader.tensors["acts"], acts) and torch.equal(reader.tensors["token"], pos * 3)
    assert "keep_mask" not in reader.tensors
    reader.close()
    # Still refused: bytes no tensor claims, and an extra tensor whose range runs past the file.
    with open(path, "ab") as f:
        f.write(b"\0" * 5)
    with pytest.raises(CacheError, match="5 unexpected trailing bytes"):
        ShardReader(path, row_shape=(2, 3, 8), dtype=torch.bfloat16)


def test_shard_golden_header(tmp_path):
    """The header layout a reader in another language relies on (README: Cache format v1)."""
    acts = torch.zeros(2, 1, 1, 2, dtype=torch.bfloat16)
    rec = write_shard(tmp_path, "s.safetensors", acts, torch.tensor([5, 6]), torch.tensor([1, 2]), torch.tensor([9, 9]))
    raw = (tmp_path / rec.file).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    assert header["__metadata__"] == {"format": "pt"}
    assert header["acts"]["dtype"] == "BF16" and header["acts"]["shape"] == [2, 1, 1, 2]
    assert header["seq"]["dtype"] == "I64" and header["pos"]["dtype"] == "I32" and header["token"]["dtype"] == "I32"
    start = 8 + n
    b, e = header["seq"]["data_offsets"]
    assert struct.unpack("<2q", raw[start + b : start + e]) == (5, 6)
    # Same tensors -> same bytes (resume relies on it).
    rec2 = write_shard(tmp_path, "t.safetensors", acts, torch.tensor([5, 6]), torch.tensor([1, 2]), torch.tensor([9, 9]))
    assert rec2.sha256 == rec.sha256


def test_truncated_and_corrupt_shards_are_named(tmp_path):
    cache = _write_cache(tmp_path)
    m = Manifest.load(cache)
    assert m.row_shape == (2, 1, 8) and m.row_bytes == 2 * 1 * 8 * 2  # bfloat16: 2 bytes a value
    p0, p1, p2 = (cache / s.file for s in m.shards)
    p0.write_bytes(p0.read_bytes()[:-3])  # truncated
    data = bytearray(p1.read_bytes())
    data[-5] ^= 0xFF  # flipped byte in the payload
    p1.write_bytes(bytes(data))
    p2.unlink()  # missing
    report = verify_cache(cache)
    assert not report.ok
    text = "\n".join(report.problems)
    assert m.shards[0].file in text and "truncated" in text
    assert m.shards[1].file in text and "sha256" in text
    assert m.shards[2].file in text and "missing" in text
    with pytest.raises(CacheError, match="missing"):
        open_cache(cache)
    c = Cache_open_without_missing(cache, m)
    with pytest.raises(CacheError, match="bytes but the manifest says"):
        c.shard(0)


def Cache_open_without_missing(cache, m):
    from shared.cache import Cache

    return Cache(cache, m)


def test_corrupt_header_is_refused(tmp_path):
    acts = torch.zeros(2, 1, 1, 2, dtype=torch.bfloat16)
    rec = write_shard(tmp_path, "s.safetensors", acts, torch.tensor([5, 6]), torch.tensor([1, 2]), torch.tensor([9, 9]))
    path = tmp_path / rec.file
    raw = bytearray(path.read_bytes())
    raw[8] = ord("x")  # the header's opening brace
    path.write_bytes(bytes(raw))
    with pytest.raises(CacheError, match="header"):
        ShardReader(path, row_shape=(1, 1, 2), dtype=torch.bfloat16)
    with pytest.raises(CacheError, match="dtype"):
        rec = write_shard(tmp_path, "f.safetensors", acts.float(), torch.tensor([5, 6]), torch.tensor([1, 2]), torch.tensor([9, 9]))
        ShardReader(tmp_path / rec.file, row_shape=(1, 1, 2), dtype=torch.bfloat16)
    with pytest.raises(CacheError, match="rows have shape"):
        ShardReader(tmp_path / rec.file, row_shape=(1, 1, 3), dtype=torch.float32)


def test_manifest_validation(tmp_path):
    with pytest.raises(CacheError, match="not an activation cache"):
        Manifest.load(tmp_path)
    cache = _write_cache(tmp_path / "c")
    obj = json.loads((cache / "manifest.json").read_text())
    for key, value, match in [
        ("format_version", 2, "format_version 2 is not supported"),
        ("dtype", "int8", "dtype 'int8'"),
        ("n_rows", 999, "shards hold 15 rows but n_rows says 999"),
    ]:
        bad = dict(obj, **{key: value})
        with pytest.raises(CacheError, match=match):
            Manifest.from_json(bad)
    bad = dict(obj)
    del bad["hooks"]
    with pytest.raises(CacheError, match="missing required key"):
        Manifest.from_json(bad)
    # Round trip keeps extra keys.
    m = Manifest.from_json(dict(obj, my_key={"a": 1}))
    assert m.to_json()["my_key"] == {"a": 1}


def test_incomplete_cache_is_refused_until_finished(tmp_path):
    w = CacheWriter(tmp_path, _manifest())
    w.add_shard(shard_file_name(0), torch.zeros(3, 2, 1, 8, dtype=torch.bfloat16), torch.arange(3), torch.ones(3), torch.ones(3))
    with pytest.raises(CacheError, match="incomplete"):
        open_cache(tmp_path)
    assert open_cache(tmp_path, allow_incomplete=True).n_shards == 1
    w.finish()
    assert open_cache(tmp_path).manifest.n_rows == 3
    assert (tmp_path / "README.md").read_text().startswith("---")


def test_token_table_round_trip(tmp_path):
    write_token_table(tmp_path, [[0, 5, 6], [0, 7, 8]], {"source": ["docs", "code"]})
    t = read_token_table(tmp_path)
    assert t.column_names == ["seq", "input_ids", "source"]
    assert t.column("input_ids").to_pylist() == [[0, 5, 6], [0, 7, 8]]
    assert t.column("source").to_pylist() == ["docs", "code"]


@pytest.mark.parametrize("method", ["norm_scale", "mean_std", "none"])
def test_normalization_round_trip(tmp_path, method):
    x = torch.randn(500, 2, 3, 16) * torch.tensor([1.0, 5.0])[None, :, None, None] + 3
    norm = Normalization.estimate(x, method)
    y = norm.apply(x)
    assert torch.allclose(norm.undo(y), x, atol=1e-4)
    if method == "norm_scale":
        assert torch.allclose(y.norm(dim=-1).mean(0), torch.full((2, 3), 4.0), rtol=1e-4)
    if method == "mean_std":
        assert y.mean(0).abs().max() < 1e-4 and (y.std(0, unbiased=False) - 1).abs().max() < 1e-3
    norm.write_side_file(tmp_path)
    again = Normalization.from_manifest(tmp_path, norm.to_manifest(500))
    assert torch.allclose(again.apply(x), y)


@pytest.mark.parametrize("method", ["norm_scale", "mean_std"])
def test_normalization_estimated_in_chunks_equals_the_whole_sample(method):
    """The harvest streams its calibration rows through NormalizationEstimator (uneven items, each
    cut into chunks): the factors are those of the whole sample, computed directly in float64."""
    from shared.normalization import NormalizationEstimator

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(1000, 2, 3, 16, generator=g) * torch.linspace(0.5, 40, 16) + 100).to(torch.bfloat16)
    whole = x.to(torch.float64)
    est = NormalizationEstimator(method, max_chunk_bytes=37 * 2 * 3 * 16 * 8)  # 37 rows per chunk
    for lo, hi in [(0, 1), (1, 250), (250, 251), (251, 1000)]:
        est.add(x[lo:hi])
    assert est.n_rows == 1000
    got = est.result()
    if method == "norm_scale":
        want = (16 ** 0.5 / whole.norm(dim=-1).mean(0)).float()
        torch.testing.assert_close(got.scale_MP, want, rtol=1e-6, atol=0)
    else:
        assert got.mean_MPD is not None and got.std_MPD is not None
        torch.testing.assert_close(got.mean_MPD, whole.mean(0).float(), rtol=1e-6, atol=0)
        torch.testing.assert_close(got.std_MPD, whole.std(0, unbiased=False).float(), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="shape"):
        est.add(torch.zeros(3, 2, 3, 8))
    with pytest.raises(ValueError, match="empty"):
        NormalizationEstimator(method).result()


def _mean_std_cache(cache, n_models, d_model, edit=None):
    """A factory cache normalized by mean_std, its side file written from ``n_models`` random slots (``edit``
    may change the factors first); returns the cache's manifest."""
    from tests.cache_factory import make_cache

    m = make_cache(cache, n_shards=2, rows_per_shard=32, n_models=n_models, n_hooks=1, d_model=d_model)
    norm = Normalization.estimate(torch.randn(50, n_models, 1, d_model), "mean_std")
    if edit is not None:
        edit(norm)
    norm.write_side_file(cache)
    m.normalization = norm.to_manifest(50)
    (cache / "manifest.json").write_text(json.dumps(m.to_json()))
    return m


def test_damaged_normalization_side_file_is_named(tmp_path):
    """A mean_std side file that is truncated, altered, of other shapes or incomplete raises a
    CacheError naming the file, on load and in verify; a side file without a listed sha256 (an
    older cache) is still checked for shapes."""
    from safetensors.torch import save_file

    from shared.cache import verify_cache

    x = torch.randn(200, 2, 3, 16)
    norm = Normalization.estimate(x, "mean_std")
    entry = norm.to_manifest(200)
    assert entry["sha256"] and entry["file"] == "normalization.safetensors"
    assert Normalization.estimate(x, "norm_scale").to_manifest(200)["sha256"] is None
    path = tmp_path / "normalization.safetensors"

    def damaged(match: str, entry: dict) -> None:
        with pytest.raises(CacheError, match=match):
            Normalization.from_manifest(tmp_path, entry)

    norm.write_side_file(tmp_path)
    good = path.read_bytes()
    path.write_bytes(good[:100])
    damaged("damaged: its sha256 differs", entry)
    damaged("not a readable safetensors", {**entry, "sha256": None})
    save_file({"mean": torch.zeros(2, 3, 16)}, path)
    damaged("not mean and std", {**entry, "sha256": None})
    save_file({"mean": torch.zeros(3, 2, 16), "std": torch.ones(3, 2, 16)}, path)
    damaged("do not fit", {**entry, "sha256": None})
    path.unlink()
    damaged("missing", entry)

    cache = tmp_path / "cache"
    _mean_std_cache(cache, 1, 16)
    assert verify_cache(cache).ok
    (cache / "normalization.safetensors").write_bytes(b"\0" * 40)
    report = verify_cache(cache)
    assert not report.ok and "normalization.safetensors is damaged" in report.problems[0]


def test_config_cli_and_file(tmp_path):
    import argparse

    from harvest.config import HarvestConfig
    from shared.config import add_dataclass_arguments, config_from_namespace

    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, HarvestConfig)
    cfg_file = tmp_path / "h.yaml"
    cfg_file.write_text("hooks: [blocks.0.hook_resid_post]\ncontext-size: 32\ntokens: 100\n")
    ns = parser.parse_args(["--tokens", "50", "--models", "a", "b", "--no-exclude-special", "--dtype", "float16"])
    cfg = config_from_namespace(HarvestConfig, ns, cfg_file)
    assert cfg.tokens == 50 and cfg.context_size == 32 and cfg.models == ["a", "b"]
    assert cfg.hooks == ["blocks.0.hook_resid_post"] and cfg.exclude_special is False and cfg.dtype == "float16"
    cfg_file.write_text("tokenz: 5\n")
    with pytest.raises(ValueError, match="did you mean 'tokens'"):
        config_from_namespace(HarvestConfig, parser.parse_args([]), cfg_file)
    with pytest.raises(ValueError, match="tokens must be >= 1"):
        HarvestConfig(tokens=0)
    with pytest.raises(ValueError, match="capture_group_tokens must be >= 1"):
        HarvestConfig(capture_group_tokens=0)
    with pytest.raises(SystemExit):
        parser.parse_args(["--dtype", "int8"])
    # A lone name (YAML `models: toy-base`, or the Python API) is a list of one, not its characters.
    cfg_file.write_text("models: toy-base\nhooks: blocks.0.hook_resid_post\n")
    cfg = config_from_namespace(HarvestConfig, parser.parse_args([]), cfg_file)
    assert cfg.models == ["toy-base"] and cfg.hooks == ["blocks.0.hook_resid_post"]


def test_config_files_spelled_loosely_are_converted_or_refused_by_field(tmp_path):
    import argparse

    from shared.config import add_dataclass_arguments, config_from_namespace
    from train.config import TrainConfig

    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, TrainConfig)
    f = tmp_path / "t.yaml"
    # PyYAML reads 1e-4 and 1e3 as strings (YAML 1.1 floats need a dot).
    f.write_text("cache: c\nlr: 1e-4\nsteps: 1e3\nbetas: [0.9, 1e-1]\nlatents: 64.0\n")
    cfg = config_from_namespace(TrainConfig, parser.parse_args([]), f)
    assert (cfg.lr, cfg.steps, cfg.betas, cfg.latents) == (1e-4, 1000, (0.9, 0.1), 64)
    assert type(cfg.steps) is int and type(cfg.lr) is float and type(cfg.latents) is int
    for text, match in [("lr: fast", "lr: expected a number, got 'fast'"),
                        ("steps: 10.5", "steps: expected an integer, got 10.5"),
                        ("steps: true", "steps: expected an integer, got True"),
                        ("betas: [0.9]", "betas: expected 2 values"),
                        ("arch: foo", "arch: expected one of 'crosscoder', 'directional', 'clt'"),
                        ("hooks: 5", "hooks: expected a list, got 5"),
                        ("autocast: 1", "autocast: expected true or false")]:
        f.write_text("cache: c\n" + text + "\n")
        with pytest.raises(ValueError, match=match):
            config_from_namespace(TrainConfig, parser.parse_args([]), f)


def test_lone_names_and_empty_lists_in_train_configs():
    from train.analysis_config import AnalysisConfig
    from train.config import TrainConfig

    assert TrainConfig(cache=Path("caches") / "c", out=Path("runs/x")).cache == str(Path("caches") / "c")
    import numpy as np

    numpy_cfg = TrainConfig(cache="c", latents=np.int64(64), lr=np.float32(0.5), autocast=np.bool_(False))
    assert (type(numpy_cfg.latents), type(numpy_cfg.lr), numpy_cfg.autocast) == (int, float, False)
    cfg = TrainConfig(cache="c", models="base", hooks="blocks.0.hook_resid_post")
    assert cfg.models == ["base"] and cfg.hooks == ["blocks.0.hook_resid_post"]
    assert TrainConfig(cache="c", arch="directional", in_hooks="a", out_hooks="b").in_hooks == ["a"]
    with pytest.raises(ValueError, match="models: give at least one name"):
        TrainConfig(cache="c", models=[])
    assert AnalysisConfig(meta_columns="source").meta_columns == ["source"]


@pytest.mark.parametrize(("cli", "argv"), [
    ("run_harvest", ["--help"]), ("run_harvest", ["verify", "--help"]), ("run_harvest", ["push", "--help"]),
    ("run_train", ["--help"]), ("run_train", ["analyze", "--help"]), ("run_train", ["lm-eval", "--help"]),
    ("run_train", ["export-saelens", "--help"]), ("run_train", ["export-circuit-tracer", "--help"]),
    ("run_train", ["push", "--help"]),
])
def test_every_cli_help_prints(cli, argv, capsys):
    """``--help`` of every command prints and exits 0 (help texts with a literal "%", such as
    "(5%: crosscode)", once made argparse raise instead)."""
    import importlib

    main = importlib.import_module(cli).main
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize(("cli", "argv"), [
    ("run_harvest", []), ("run_harvest", ["verify"]), ("run_harvest", ["push"]),
    ("run_train", []), ("run_train", ["analyze"]), ("run_train", ["lm-eval"]), ("run_train", ["export-saelens"]),
    ("run_train", ["export-circuit-tracer"]), ("run_train", ["push"]),
])
def test_every_cli_flag_is_in_the_readme(cli, argv, capsys):
    """The README's CLI reference names every flag each command accepts (it once missed 11 of analyze's)."""
    import importlib
    import re

    from conftest import ROOT

    with pytest.raises(SystemExit):
        importlib.import_module(cli).main([*argv, "--help"])
    flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", capsys.readouterr().out)) - {"--help"}
    readme = (ROOT / "README.md").read_text()
    assert flags and not sorted(f for f in flags if not re.search(re.escape(f) + r"(?![\w-])", readme))


def _readme_flag_tables() -> list[dict[str, list[str]]]:
    """Each `| flag | default | meaning |` table of the README, as {field name: [flag, default, meaning]}."""
    import re

    from conftest import ROOT

    tables: list[dict[str, list[str]]] = []
    rows: dict[str, list[str]] | None = None
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("| flag |"):
            rows = {}
            tables.append(rows)
        elif rows is not None and line.startswith("|") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            if m := re.match(r"`--([a-z0-9-]+)", cells[0]):
                rows[m.group(1).replace("-", "_")] = cells
        elif not line.startswith("|"):
            rows = None
    return tables


def test_readme_flag_tables_give_the_code_defaults_and_choices():
    """Each CLI reference table (run_harvest.py, run_train.py, analyze, lm-eval) shows the dataclass default
    where it writes one as a literal, and names every choice a flag accepts (the harvest's --model-dtype and
    train's --wandb-mode once did not)."""
    import dataclasses
    import typing

    from harvest.config import HarvestConfig
    from train.analysis_config import AnalysisConfig
    from train.config import TrainConfig
    from train.lm_eval import LMEvalConfig

    tables = _readme_flag_tables()
    assert len(tables) == 4
    for rows, cls in zip(tables, (HarvestConfig, TrainConfig, AnalysisConfig, LMEvalConfig)):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.metadata.get("cli") is False:
                continue
            assert f.name in rows, f"{cls.__name__}.{f.name} has no row in the README table"
            _, default_cell, meaning = rows[f.name]
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            literal = default_cell.startswith("`") and default_cell.endswith("`") and default_cell.count("`") == 2
            if default is None:  # shown as "—" or described ("auto", "`source` if present"), never as a value
                assert not literal, (cls.__name__, f.name, default_cell)
            elif literal:
                shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
                assert default_cell.strip("`") == shown, (cls.__name__, f.name, default_cell, shown)
            tp = hints[f.name]
            if typing.get_origin(tp) is typing.Literal:
                missing = [c for c in typing.get_args(tp) if f"`{c}`" not in meaning and c not in meaning]
                assert not missing, f"README row of --{f.name.replace('_', '-')} does not name {missing}"


def test_config_files_that_do_not_parse_are_named(tmp_path):
    """A config (or sweep) file with a syntax error raises a ValueError naming the file; any
    name but .json is read as YAML, which also reads JSON."""
    from shared.config import load_config_file

    (tmp_path / "bad.yaml").write_text("lr: [1e-3\nsteps: 10\n")
    (tmp_path / "bad.json").write_text('{"lr": }')
    for name, kind in (("bad.yaml", "YAML"), ("bad.json", "JSON")):
        with pytest.raises(ValueError, match=rf"config file .*{name} is not valid {kind}"):
            load_config_file(tmp_path / name)
    (tmp_path / "cfg.conf").write_text('{"steps": 10, "models": ["a"]}')
    assert load_config_file(tmp_path / "cfg.conf") == {"steps": 10, "models": ["a"]}


def test_verify_cross_checks_rows_against_the_token_table(tmp_path):
    """verify names shards whose rows point outside tokens.arrow or hold another token than it."""
    from tests.cache_factory import make_cache

    cache = tmp_path / "cache"
    make_cache(cache, n_shards=2, rows_per_shard=64, n_models=1, n_hooks=1)
    assert verify_cache(cache).ok
    ids = [list(x) for x in read_token_table(cache).column("input_ids").to_pylist()]
    (cache / "tokens.arrow").unlink()
    write_token_table(cache, [ids[0], *[[t + 1 for t in x] for x in ids[1:]]])  # every token but seq 0's shifted
    report = verify_cache(cache)
    assert not report.ok and any("token differs from tokens.arrow input_ids[seq][pos]" in p for p in report.problems)
    (cache / "tokens.arrow").unlink()
    write_token_table(cache, ids[:1])  # one sequence left
    assert any("seq values outside the tokens.arrow sequences 0..0" in p for p in verify_cache(cache).problems)


def test_verify_names_inf_and_nan_activations(tmp_path, capsys):
    """A shard written with inf or NaN (float16 storage past 65,504, a model that overflowed) has the right
    sha256: verify said OK, while training stopped on it and told the user to run verify. It is named now,
    with its slot; --no-checksums, which reads no activations, does not look."""
    from tests.cache_factory import make_cache

    cache = tmp_path / "cache"
    make_cache(cache, n_shards=2, rows_per_shard=64, n_models=2, n_hooks=1, dtype=torch.float16,
               model_names=["base", "chat"])
    assert verify_cache(cache).ok
    man = json.loads((cache / "manifest.json").read_text())
    rec = man["shards"][1]
    with ShardReader(cache / rec["file"], row_shape=(2, 1, 16), dtype=torch.float16, n_rows=rec["n_rows"]) as shard:
        acts, seq, pos, token = (t.clone() for t in (shard.acts, shard.seq, shard.pos, shard.token))
    acts[3, 1, 0, 7] = 70000.0  # inf in float16
    acts[9, 1, 0, 8] = float("nan")
    new = write_shard(cache, rec["file"], acts, seq, pos, token)
    rec.update(sha256=new.sha256, bytes=new.bytes)
    (cache / "manifest.json").write_text(json.dumps(man))
    report = verify_cache(cache)
    assert report.problems == [f"{rec['file']}: 2 activation value(s) in 2 row(s) are inf or NaN (in chat/blocks.0.hook_resid_post; "
                               "storage float16): written so when the cache was made, not damaged since, and training stops "
                               "on them. Harvest again into a new folder with --dtype bfloat16 (float16 stores values past "
                               "65,504 as inf), or --model-dtype bfloat16 or float32 if the models overflowed"]
    assert verify_cache(cache, checksums=False).ok and report.nonfinite_shards == [rec["file"]]

    # The CLI's advice: a re-run or a download writes the same values, so it is not offered for them.
    import run_harvest

    assert run_harvest._verify([str(cache)]) == 1
    err = capsys.readouterr().err
    assert "to repair: 1 shard(s) above are not damaged but were written holding inf or NaN" in err
    assert "re-run the harvest command" not in err and "other" not in err
    damaged = cache / man["shards"][0]["file"]
    damaged.write_bytes(damaged.read_bytes()[:-8])  # truncated too: the new harvest mends both
    assert run_harvest._verify([str(cache)]) == 1
    err = capsys.readouterr().err
    assert "harvest again into a new folder with the dtype flags named above; that also replaces what the other 1 " \
           "problem(s) name" in err and "delete each shard" not in err


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_nonfinite_count_matches_isfinite_on_every_kind_of_value(dtype):
    """The exponent-bit count, block by block, against torch.isfinite: every 16-bit pattern, both signs
    of inf and NaN, the largest finite values and subnormals, values in a last partial block and across
    block edges, and a strided view."""
    from shared.shard_io import _NONFINITE_BLOCK, nonfinite_count

    def reference(x: torch.Tensor) -> int:
        return int((~torch.isfinite(x.double())).sum())

    if dtype != torch.float32:
        every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
        assert nonfinite_count(every) == reference(every) == (2048 if dtype == torch.float16 else 256)
    gen = torch.Generator().manual_seed(0)
    n = 2 * _NONFINITE_BLOCK + 5
    x = torch.randn(n, generator=gen).to(dtype)
    assert nonfinite_count(x) == 0 and nonfinite_count(x[:0]) == 0
    info = torch.finfo(dtype)
    x[:4] = torch.tensor([info.max, -info.max, info.tiny / 4, -info.tiny], dtype=dtype)
    assert nonfinite_count(x) == 0
    bad = [_NONFINITE_BLOCK - 1, _NONFINITE_BLOCK, 2 * _NONFINITE_BLOCK + 4, 17]
    for i, v in zip(bad, [float("inf"), -float("inf"), float("nan"), -float("nan")]):
        x[i] = v
    assert nonfinite_count(x) == reference(x) == 4
    strided = x[: (n // 4) * 4].view(-1, 4)[:, 1:3]
    assert nonfinite_count(strided) == reference(strided)
    assert nonfinite_count(x.view(1, -1, 1)) == 4

def test_manifest_normalization_and_widths_are_checked(tmp_path):
    """scale must be [n_models][n_hooks] numbers (it may be left out for none and mean_std, where
    it is 1.0); a model whose listed d_model differs from the cache's is refused."""
    from tests.cache_factory import make_cache

    man = make_cache(tmp_path / "c", n_shards=1, rows_per_shard=8, n_models=2, n_hooks=1).to_json()
    for method in ("none", "mean_std"):
        m = Manifest.from_json({**man, "normalization": {"method": method, "file": None}})
        assert m.normalization["scale"] == [[1.0], [1.0]]
    for bad, match in (({"method": "norm_scale"}, "normalization.scale must be"),
                       ({"method": "norm_scale", "scale": [1.0, 2.0]}, r"list per model \(2\) of a list per hook \(1\)"),
                       ({"method": "zscore", "scale": [[1.0], [1.0]]}, "normalization.method 'zscore'"),
                       ({"method": "norm_scale", "scale": [[1.0], [0.0]]}, r"scale\[1\]\[0\] is 0.0, not a positive"),
                       ({"method": "norm_scale", "scale": [[float("inf")], [1.0]]}, r"scale\[0\]\[0\] is inf")):
        with pytest.raises(CacheError, match=match):
            Manifest.from_json({**man, "normalization": bad})
    models = [dict(x) for x in man["models"]]
    models[1]["d_model"] = 32
    with pytest.raises(CacheError, match=r"models\[1\] has d_model 32, the cache's d_model is 16"):
        Manifest.from_json({**man, "models": models})


def test_the_caches_own_tokenizer_file_is_checked_when_listed(tmp_path):
    """``tokenizer.file`` is optional: a cache without it verifies as before; when listed, verify names a
    missing or altered tokenizer.json, and a manifest whose entry points outside the folder is refused."""
    from tests.cache_factory import add_tokenizer, make_cache

    cache = tmp_path / "cache"
    make_cache(cache, n_shards=2, rows_per_shard=32, d_model=8)
    assert verify_cache(cache).ok  # no tokenizer.json listed: nothing to check
    data = add_tokenizer(cache)
    tok = Manifest.load(cache).tokenizer
    assert tok["file"] == "tokenizer.json" and len(tok["file_sha256"]) == 64
    assert verify_cache(cache).ok

    (cache / "tokenizer.json").write_bytes(data[:-2] + b"}\n")  # same size, other bytes
    assert verify_cache(cache).problems == ["tokenizer.json: sha256 mismatch (corrupted)"]
    assert verify_cache(cache, checksums=False).ok  # presence only
    (cache / "tokenizer.json").unlink()
    assert verify_cache(cache, checksums=False).problems == ["tokenizer.json: missing"]

    obj = json.loads((cache / "manifest.json").read_text())
    for bad, match in [({"file": "../elsewhere/tokenizer.json"}, "relative path inside the cache folder"),
                       ({"file": "/etc/tokenizer.json"}, "relative path inside the cache folder"),
                       ({"file_sha256": "abc"}, "file_sha256 must be the 64-hex sha256")]:
        with pytest.raises(CacheError, match=match):
            Manifest.from_json({**obj, "tokenizer": {**obj["tokenizer"], **bad}})
    # Another tool may list the file without its sha256: the cache reads, and verify checks what it holds.
    from tests.cache_factory import synthetic_tokenizer_json

    obj["tokenizer"].pop("file_sha256")
    (cache / "manifest.json").write_text(json.dumps(obj))
    assert verify_cache(cache).problems == ["tokenizer.json: missing"]
    (cache / "tokenizer.json").write_bytes(data)
    assert verify_cache(cache).ok
    (cache / "tokenizer.json").write_bytes(data[: len(data) // 2])
    assert verify_cache(cache).problems == ["tokenizer.json: does not load as a tokenizers tokenizer.json "
                                            "(corrupted, or another kind of file)"]
    (cache / "tokenizer.json").write_bytes(synthetic_tokenizer_json(prefix="u"))
    assert verify_cache(cache).problems[0].endswith("is not the one the manifest's tokenizer.sha256 names ("
                                                    f"{obj['tokenizer']['sha256'][:12]}): another tokenizer's file")
    assert verify_cache(cache, checksums=False).ok  # presence only


@pytest.mark.parametrize("tensor, value", [("std", 0.0), ("std", -1.0), ("std", float("nan")), ("std", float("inf")),
                                           ("mean", float("inf"))])
def test_mean_std_factors_that_would_divide_by_zero_or_nan_are_refused(tmp_path, tensor, value):
    """A mean_std side file (another tool's: the harvest floors std at 1e-6) whose std is 0, negative or
    not finite, or whose mean is not finite, is refused on load and by verify, naming the file and the slot."""
    cache = tmp_path / "cache"
    _mean_std_cache(cache, 2, 8, edit=lambda norm: getattr(norm, f"{tensor}_MPD").__setitem__((1, 0, 3), value))
    with pytest.raises(CacheError, match=r"normalization.safetensors is damaged: slot model1/blocks.0.hook_resid_post "
                                         r"has .* at dimension 3 .*every std finite and > 0"):
        open_cache(cache).normalization()
    report = verify_cache(cache)
    assert not report.ok and "slot model1/blocks.0.hook_resid_post" in report.problems[0]


def test_shard_files_listed_twice_or_outside_the_folder_are_refused(tmp_path):
    """A shard listed twice (however its path is spelled) would serve its rows twice, and could be both an eval
    and a training shard; one outside the folder (absolute, ``..``) would be read, and pushed, from elsewhere
    (so would a normalization side file)."""
    from tests.cache_factory import make_cache

    obj = make_cache(tmp_path / "c", n_shards=2, rows_per_shard=8, n_models=1, n_hooks=1).to_json()
    first = obj["shards"][0]
    for again in (first["file"], "./" + first["file"], first["file"].replace("/", "//")):
        bad = {**obj, "shards": [*obj["shards"], {**first, "file": again}], "n_rows": obj["n_rows"] + first["n_rows"]}
        with pytest.raises(CacheError, match=r"shards\[0\] and shards\[2\] list the same file 'shards/acts-00000"):
            Manifest.from_json(bad)
    for outside in ("../elsewhere.safetensors", str(tmp_path / "c" / first["file"]), "shards/../../x.safetensors"):
        bad = {**obj, "shards": [{**first, "file": outside}, obj["shards"][1]]}
        with pytest.raises(CacheError, match=r"shards\[0\].file .* must be a relative path inside the cache folder"):
            Manifest.from_json(bad)
    with pytest.raises(CacheError, match="normalization.file '/etc/n.safetensors' must be a relative path inside"):
        Manifest.from_json({**obj, "normalization": {"method": "mean_std", "file": "/etc/n.safetensors"}})
    (tmp_path / "c" / "manifest.json").write_text(json.dumps({**obj, "shards": [{**first, "file": "../x"},
                                                                                obj["shards"][1]]}))
    assert "must be a relative path inside the cache folder" in verify_cache(tmp_path / "c").problems[0]


def test_manifest_models_complete_and_row_count_are_checked(tmp_path):
    """Problems that used to surface later as a KeyError, a wrong verify OK or a confusing eval message."""
    from tests.cache_factory import make_cache

    obj = make_cache(tmp_path / "c", n_shards=1, rows_per_shard=8, n_models=2, n_hooks=2).to_json()
    models = obj["models"]
    for key, value, match in [
        ("models", [m["name"] for m in models], r"models\[0\] must be an object with a non-empty string \"name\""),
        ("models", [{"d_model": 16}, models[1]], r"models\[0\] must be an object with a non-empty string \"name\""),
        ("models", [models[0], {**models[1], "name": models[0]["name"]}], r"model name\(s\) \['model0'\] appear more"),
        ("hooks", [obj["hooks"][0]] * 2, r"hook name\(s\) \['blocks.0.hook_resid_post'\] appear more than once"),
        ("complete", "false", "complete must be true or false"),
        ("shards", [], "the cache holds no rows"),
    ]:
        bad = dict(obj, **{key: value})
        if key == "shards":
            bad["n_rows"] = 0
        with pytest.raises(CacheError, match=match):
            Manifest.from_json(bad)
    # A harvest that has just started lists no shard yet: an incomplete cache of no rows is fine.
    assert Manifest.from_json({**obj, "shards": [], "n_rows": 0, "complete": False}).shards == []
    assert Manifest.from_json({**obj, "models": [{"name": "a"}, {"name": "b"}]}).model_names == ["a", "b"]


def test_verify_names_negative_positions_and_sequences_of_another_length(tmp_path):
    """A negative pos is called negative (numpy would wrap it); every token sequence must hold context_size tokens."""
    w = CacheWriter(tmp_path, _manifest())
    w.add_shard(shard_file_name(0), torch.zeros(2, 2, 1, 8, dtype=torch.bfloat16), torch.tensor([0, 1]),
                torch.tensor([1, -2]), torch.tensor([1, 2]))
    write_token_table(tmp_path, [[0, 1, 2, 3], [0, 1, 2, 3]])
    w.finish()
    assert verify_cache(tmp_path).problems == [f"{shard_file_name(0)}: negative pos values (as low as -2; a position "
                                                "counts from 0, the BOS)"]
    (tmp_path / "tokens.arrow").unlink()
    write_token_table(tmp_path, [[0, 1, 2, 3], [0, 1, 2, 3, 4]])
    problems = verify_cache(tmp_path).problems
    assert any("tokens.arrow: 1 sequence(s) do not hold the manifest's context_size 4 tokens (seq 1 holds 5)" in p
               for p in problems), problems


def test_sha256_values_in_uppercase_are_accepted(tmp_path):
    """We write lowercase hex; another tool's uppercase digests check the same files."""
    from tests.cache_factory import add_tokenizer

    cache = tmp_path / "cache"
    _mean_std_cache(cache, 1, 8)
    add_tokenizer(cache)
    obj = json.loads((cache / "manifest.json").read_text())
    for s in obj["shards"]:
        s["sha256"] = s["sha256"].upper()
    obj["normalization"]["sha256"] = obj["normalization"]["sha256"].upper()
    obj["tokenizer"]["file_sha256"] = obj["tokenizer"]["file_sha256"].upper()
    (cache / "manifest.json").write_text(json.dumps(obj))
    assert verify_cache(cache).ok, verify_cache(cache).problems
    assert open_cache(cache).normalization().method == "mean_std"
