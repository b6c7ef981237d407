"""The tokenizer travels with the cache: the harvest saves it as ``tokenizer.json``, resumes keep it
byte-identical, a re-run repairs it, and reports read it before any model folder."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from conftest import comparable_manifest, small_harvest_config

from harvest.harvester import harvest
from shared.cache import open_cache, verify_cache
from shared.cache_format import Manifest
from shared.tokenizer_file import write_tokenizer_file
from tests.cache_factory import add_tokenizer, make_cache, synthetic_tokenizer_json
from train.token_text import load_token_decoder


def test_harvest_saves_the_tokenizer_the_models_were_fed(toy_cache, toy_dirs):
    from transformers import AutoTokenizer

    meta = Manifest.load(toy_cache).tokenizer
    data = (toy_cache / "tokenizer.json").read_bytes()
    assert meta["file"] == "tokenizer.json" and meta["file_sha256"] == hashlib.sha256(data).hexdigest()
    assert verify_cache(toy_cache).ok
    # Read with nothing but the cache (no model folder named): the same text as the model's own tokenizer.
    decode = load_token_decoder({**meta, "path": None, "name": None}, toy_cache)
    assert decode is not None
    ids = open_cache(toy_cache).token_table().column("input_ids")[3].as_py()[1:40]
    reference = AutoTokenizer.from_pretrained(toy_dirs["toy-base"])
    assert "".join(decode(i) for i in ids) == reference.decode(ids)


def test_an_interrupted_harvest_has_it_and_resumes_stay_byte_identical(toy_cache, tmp_path, monkeypatch):
    """Killed after its first manifest, a cache already holds (and lists) tokenizer.json; resumed, it is
    the cache an uninterrupted harvest writes. A partial cache from before caches held their tokenizer
    gets it on resume, byte for byte the same."""
    from harvest import harvester

    out = tmp_path / "cut"

    def killed(*args, **kwargs):
        raise RuntimeError("killed (simulated)")

    with monkeypatch.context() as patch:
        patch.setattr(harvester, "shard_writer_for", killed)
        with pytest.raises(RuntimeError, match="simulated"):
            harvest(small_harvest_config(out))
    partial = Manifest.load(out)
    assert not partial.complete and partial.tokenizer["file"] == "tokenizer.json"
    assert (out / "tokenizer.json").read_bytes() == (toy_cache / "tokenizer.json").read_bytes()

    old = tmp_path / "old"  # the same partial cache as an older crosscache left it
    shutil.copytree(out, old)
    (old / "tokenizer.json").unlink()
    obj = json.loads((old / "manifest.json").read_text())
    del obj["tokenizer"]["file"], obj["tokenizer"]["file_sha256"]
    (old / "manifest.json").write_text(json.dumps(obj, indent=1) + "\n")

    for cache in (out, old):
        assert harvest(small_harvest_config(cache)).complete
        assert (cache / "tokenizer.json").read_bytes() == (toy_cache / "tokenizer.json").read_bytes()
        assert comparable_manifest(cache / "manifest.json") == comparable_manifest(toy_cache / "manifest.json")
        assert verify_cache(cache).ok


def test_a_rerun_rewrites_a_missing_or_damaged_tokenizer(toy_cache, tmp_path, capsys):
    cache = tmp_path / "cache"
    shutil.copytree(toy_cache, cache)
    want = (cache / "tokenizer.json").read_bytes()
    shards = {p: p.stat().st_mtime_ns for p in (cache / "shards").iterdir()}
    for damage in ("missing", "sha256 mismatch (corrupted)"):
        if damage == "missing":
            (cache / "tokenizer.json").unlink()
        else:
            (cache / "tokenizer.json").write_bytes(want.replace(b'"version"', b'"VERSION"'))
        assert verify_cache(cache).problems == [f"tokenizer.json: {damage}"]
        assert harvest(small_harvest_config(cache)).complete
        assert f"repairing {cache}: tokenizer.json: {damage}" in capsys.readouterr().out
        assert (cache / "tokenizer.json").read_bytes() == want and verify_cache(cache).ok
    assert {p: p.stat().st_mtime_ns for p in (cache / "shards").iterdir()} == shards  # no shard rewritten
    assert comparable_manifest(cache / "manifest.json") == comparable_manifest(toy_cache / "manifest.json")


def test_a_slow_tokenizer_is_skipped_cleanly(tmp_path):
    class SlowTokenizer:  # a Python tokenizer: no Rust backend, no tokenizer.json
        is_fast = False

    said: list[str] = []
    assert write_tokenizer_file(tmp_path, SlowTokenizer(), {}, say=said.append) is None
    assert list(tmp_path.iterdir()) == []
    assert "SlowTokenizer) is not a fast tokenizer" in said[0] and "tokenizer path/name" in said[0]


def test_reports_read_the_caches_own_tokenizer_first(tmp_path):
    cache = tmp_path / "cache"
    make_cache(cache, n_shards=1, rows_per_shard=16, d_model=8)
    add_tokenizer(cache)  # the cache's own: t0, t1, ...
    meta = Manifest.load(cache).tokenizer
    elsewhere = tmp_path / "model"  # what the manifest's path names: another tokenizer (w0, w1, ...)
    elsewhere.mkdir()
    (elsewhere / "tokenizer.json").write_bytes(synthetic_tokenizer_json(prefix="w"))
    meta["path"] = str(elsewhere)
    assert load_token_decoder(meta, cache)(5) == "t5"
    assert load_token_decoder(meta)(5) == "w5"  # no cache folder given: the model folder's, as before
    (cache / "tokenizer.json").write_bytes(b"{not a tokenizer")
    assert load_token_decoder(meta, cache)(5) == "w5"  # a damaged own copy: the next one found
    assert load_token_decoder({**meta, "path": None}, cache) is None  # none at all: contexts show ids


def test_harvest_writes_the_tokenizer_before_the_token_table(toy_dirs, tmp_path, monkeypatch):
    """Written first, and removed with the rest when the harvest fails before its first manifest."""
    from harvest import harvester

    out = tmp_path / "out"
    seen: list[bool] = []

    def table_then_fail(folder: Path, *args, **kwargs):
        seen.append((Path(folder) / "tokenizer.json").is_file())
        raise RuntimeError("disk gone (simulated)")

    monkeypatch.setattr(harvester, "write_token_table", table_then_fail)
    with pytest.raises(RuntimeError, match="simulated"):
        harvest(small_harvest_config(out, tokens=300))
    assert seen == [True] and not out.exists()


def test_a_torchrun_harvest_writes_it_once_and_its_resume_adds_it(toy_cache, tmp_path, monkeypatch):
    """Under torchrun, rank 0 writes tokenizer.json (before the token table) and lists it; resuming a
    multi-process cache from before caches held their tokenizer adds it at the merge. One rank, in this
    process; tests/test_harvest_distributed.py compares two real ranks' cache with a one-process one."""
    import socket

    with socket.socket() as sock:  # a free port for the one-rank process group
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "dist"
    assert harvest(small_harvest_config(out)).complete
    assert (out / "tokenizer.json").read_bytes() == (toy_cache / "tokenizer.json").read_bytes()
    assert Manifest.load(out).tokenizer == Manifest.load(toy_cache).tokenizer

    # As an older crosscache left it: unfinished, no tokenizer.json, none listed.
    (out / "tokenizer.json").unlink()
    obj = json.loads((out / "manifest.json").read_text())
    del obj["tokenizer"]["file"], obj["tokenizer"]["file_sha256"]
    obj["complete"] = False
    (out / "manifest.json").write_text(json.dumps(obj, indent=1) + "\n")
    assert harvest(small_harvest_config(out)).complete
    assert (out / "tokenizer.json").read_bytes() == (toy_cache / "tokenizer.json").read_bytes()
    assert Manifest.load(out).tokenizer == Manifest.load(toy_cache).tokenizer and verify_cache(out).ok
