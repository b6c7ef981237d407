"""Crash resume, disk full, verify, and clear errors for bad input."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, comparable_manifest, fill_disk_after, small_harvest_config
from harvest.harvester import harvest
from harvest.models import HarvestInputError
from shared.cache_format import Manifest

# Many tiny shards and chunks so that a kill lands mid-harvest.
CRASH_ARGS = ["--models", "toy-base", "toy-code", "--hooks", "blocks.2.hook_resid_post", "--tokens", "40000",
              "--context-size", "64", "--shard-size", "0.0625", "--shuffle-shards", "2", "--batch-size", "8",
              "--calibration-tokens", "1000", "--capture-group-tokens", "2048", "--device", "cpu", "--no-progress"]


def _run_cli(args, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(ROOT / "run_harvest.py"), *args], env=env, capture_output=True,
                          text=True, timeout=600, **kw)


@pytest.mark.slow
def test_resume_after_kill_9_is_byte_identical(toy_dirs, tmp_path):
    ref, crashed = tmp_path / "ref", tmp_path / "crashed"
    done = _run_cli([*CRASH_ARGS, "--out", str(ref)])
    assert done.returncode == 0, done.stderr

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, str(ROOT / "run_harvest.py"), *CRASH_ARGS, "--out", str(crashed)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    listed = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            listed = len(json.loads((crashed / "manifest.json").read_text())["shards"])
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            listed = 0
        if listed >= 5:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "harvest finished before it could be killed; make it longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = Manifest.load(crashed)
    assert not partial.complete and 5 <= len(partial.shards) < len(Manifest.load(ref).shards)

    resumed = _run_cli([*CRASH_ARGS, "--out", str(crashed)])
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    m_ref, m_res = Manifest.load(ref), Manifest.load(crashed)
    assert [s.sha256 for s in m_ref.shards] == [s.sha256 for s in m_res.shards]
    for s in m_ref.shards:
        assert (ref / s.file).read_bytes() == (crashed / s.file).read_bytes()
    assert (ref / "tokens.arrow").read_bytes() == (crashed / "tokens.arrow").read_bytes()
    assert comparable_manifest(ref / "manifest.json") == comparable_manifest(crashed / "manifest.json")
    assert not [p for p in crashed.rglob("*") if ".tmp-" in p.name]


@pytest.mark.slow
def test_ctrl_c_is_one_line_and_keeps_what_was_written(toy_dirs, tmp_path):
    """Ctrl-C printed a KeyboardInterrupt traceback (from every rank under torchrun); now one line, exit 130."""
    out = tmp_path / "cache"
    # SIGINT back to its default in the child: a test run started in the background by a shell without job
    # control (`.ci/run &`) inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler.
    proc = subprocess.Popen([sys.executable, str(ROOT / "run_harvest.py"), *CRASH_ARGS, "--out", str(out)],
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            if len(json.loads((out / "manifest.json").read_text())["shards"]) >= 2:
                break
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass
        time.sleep(0.01)
    assert proc.poll() is None, "harvest finished before it could be interrupted; make it longer"
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]  # 1.4 s on 2 idle cores, 8 s beside 8 busy loops
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted: the shards written so far are kept; re-run the same command to resume" in err
    assert "Traceback" not in err
    assert Manifest.load(out).shards  # what was written is kept, for the re-run to resume


@pytest.mark.parametrize("write_threads", [1, 3])
def test_disk_full_loses_nothing_and_resumes(toy_dirs, tmp_path, monkeypatch, write_threads):
    import shared.shard_io as shard_io

    cfg = small_harvest_config(tmp_path / "full", models=["toy-base"], hooks=["blocks.2.hook_resid_post"],
                               tokens=3000, shard_size=0.0625, shuffle_shards=2, calibration_tokens=500,
                               write_threads=write_threads)
    fill_disk_after(monkeypatch, 4)
    with pytest.raises(shard_io.DiskFullError, match="disk full"):
        harvest(cfg)
    partial = Manifest.load(cfg.out)
    assert len(partial.shards) == 4 and not partial.complete
    assert not [p for p in Path(cfg.out).rglob("*") if ".tmp-" in p.name]
    monkeypatch.undo()
    final = harvest(cfg)
    ref = harvest(small_harvest_config(tmp_path / "ref", **{k: getattr(cfg, k) for k in
                                       ("models", "hooks", "tokens", "shard_size", "shuffle_shards", "calibration_tokens")}))
    assert [s.sha256 for s in final.shards] == [s.sha256 for s in ref.shards]


def test_write_threads_write_the_same_cache(toy_dirs, tmp_path):
    """Shards written by several threads while the next chunk fills: the same bytes, listed in
    the same order, as one thread writing them one after another."""
    one = harvest(small_harvest_config(tmp_path / "one", write_threads=1))
    many = harvest(small_harvest_config(tmp_path / "many", write_threads=4))
    assert len(one.shards) > 2 * 4  # several chunks of shuffle_shards=4
    assert [(s.file, s.sha256) for s in one.shards] == [(s.file, s.sha256) for s in many.shards]
    a, b = (comparable_manifest(tmp_path / name / "manifest.json") for name in ("one", "many"))
    assert (a["harvest"]["config"].pop("write_threads"), b["harvest"]["config"].pop("write_threads")) == (1, 4)
    assert a == b


def _snapshot(cache: Path) -> dict[str, bytes]:
    """Every file of a cache but its manifest, by relative path."""
    return {str(p.relative_to(cache)): p.read_bytes() for p in sorted(cache.rglob("*"))
            if p.is_file() and p.name != "manifest.json"}


def test_rerun_repairs_damaged_shards_and_token_table(toy_cache, tmp_path, capsys):
    """A re-run of the same harvest on a cache with listed shards deleted or truncated, or its
    token table gone, rewrites them: the cache comes back byte for byte, finished or interrupted."""
    import shutil

    from harvest.harvester import find_damage
    from shared.cache import CacheWriter, verify_cache

    ref = Manifest.load(toy_cache)
    want, want_manifest = _snapshot(toy_cache), comparable_manifest(toy_cache / "manifest.json")
    assert len(ref.shards) > 12  # several chunks of 4 shards

    def damaged_copy(name: str) -> Path:
        cache = tmp_path / name
        shutil.copytree(toy_cache, cache)
        return cache

    def rerun(cache: Path) -> str:
        harvest(small_harvest_config(cache))
        assert _snapshot(cache) == want
        assert comparable_manifest(cache / "manifest.json") == want_manifest
        assert verify_cache(cache).ok
        return capsys.readouterr().out

    # A finished cache: a shard of chunk 1 deleted, one of chunk 2 truncated.
    cache = damaged_copy("finished")
    (cache / ref.shards[5].file).unlink()
    with open(cache / ref.shards[9].file, "r+b") as f:
        f.truncate(100)
    damage = find_damage(cache, Manifest.load(cache), 4)
    assert damage.first_chunk == 1 and len(damage.shards) == 2 and damage.token_table is None
    out = rerun(cache)
    assert "repairing" in out and "2 shards damaged" in out and "already complete" not in out
    assert "from chunk 1 of" in out

    # A finished cache without its token table: rebuilt from the dataset, no shard rewritten.
    cache = damaged_copy("no-table")
    (cache / "tokens.arrow").unlink()
    mtimes = {s.file: (cache / s.file).stat().st_mtime_ns for s in ref.shards}
    out = rerun(cache)
    assert "tokens.arrow missing" in out
    assert mtimes == {s.file: (cache / s.file).stat().st_mtime_ns for s in ref.shards}
    # No row was written (the last chunk is short: its rows once counted negative, "-1,810 tokens/s").
    assert Manifest.load(cache).created_by["last_run"]["rows"] == 0 and " (0 tokens/s this run)" in out

    # An interrupted cache (3 chunks listed) whose listed shard of chunk 0 is gone, and whose
    # token table is unreadable: rewritten from chunk 0.
    cache = damaged_copy("interrupted")
    m = Manifest.load(cache)
    m.shards, m.complete = m.shards[:12], False
    m.n_rows = sum(s.n_rows for s in m.shards)
    CacheWriter(cache, m).save_manifest()
    (cache / ref.shards[0].file).unlink()  # the token check reads the first intact shard
    (cache / "tokens.arrow").write_bytes(b"not arrow")
    out = rerun(cache)
    assert "unreadable" in out and "from chunk 0 of" in out


def test_a_damaged_token_table_is_found_by_verify_and_rebuilt_by_a_rerun(toy_cache, tmp_path, capsys, monkeypatch):
    """One flipped bit in tokens.arrow's footer made verify and the repair die with pyarrow's OSError; one in
    its data (a BOS id, a `source` value) passed verify. A harvest now records the table's sha256."""
    import errno
    import shutil

    import pyarrow as pa

    from shared.cache import verify_cache
    from shared.shard_io import DiskFullError
    from shared.token_table import write_token_table

    want = _snapshot(toy_cache)
    sha = Manifest.load(toy_cache).extra["tokens_sha256"]
    assert sha == hashlib.sha256((toy_cache / "tokens.arrow").read_bytes()).hexdigest()
    for name, offset in [("data", 600), ("footer", -200)]:
        cache = tmp_path / name
        shutil.copytree(toy_cache, cache)
        data = bytearray((cache / "tokens.arrow").read_bytes())
        data[offset] ^= 0x08
        (cache / "tokens.arrow").write_bytes(bytes(data))
        problems = verify_cache(cache).problems
        assert len(problems) == 1 and problems[0].startswith("tokens.arrow: sha256 mismatch") or (
            "is not a readable Arrow IPC file" in problems[0]), problems
        harvest(small_harvest_config(cache))
        assert _snapshot(cache) == want and verify_cache(cache).ok
        assert "repairing" in capsys.readouterr().out
    # A full disk while the table is written: the harvest's message, not pyarrow's traceback; no temp left.
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "Error writing bytes to file")

    monkeypatch.setattr(pa.ipc, "new_file", full)
    with pytest.raises(DiskFullError, match=r"disk full while writing .*tokens\.arrow: free space"):
        write_token_table(tmp_path / "data", [[0, 1, 2]])
    assert not [p for p in (tmp_path / "data").iterdir() if p.name.startswith(".tokens.arrow.tmp")]


def test_verify_names_shard_entries_removed_from_the_manifest(toy_cache, tmp_path, capsys):
    """The last shard's entry dropped and n_rows lowered to match passed verify (and a re-run said the
    harvest was complete): the rows the harvest wrote are recorded as harvest.planned_rows."""
    import shutil

    from shared.cache import CacheWriter, verify_cache

    cache = tmp_path / "c"
    shutil.copytree(toy_cache, cache)
    m = Manifest.load(cache)
    m.shards = m.shards[:-1]
    m.n_rows = sum(s.n_rows for s in m.shards)
    CacheWriter(cache, m).save_manifest()
    assert verify_cache(cache).problems == [f"manifest.json: lists {m.n_rows:,} rows, but its harvest wrote 6,000 "
                                            "(harvest.planned_rows): shard entries were removed or added by hand"]
    # A re-run said "harvest already complete"; it now rewrites from the first chunk missing an entry.
    harvest(small_harvest_config(cache))
    assert _snapshot(cache) == _snapshot(toy_cache) and verify_cache(cache).ok
    assert "shard entries removed" in capsys.readouterr().out


def test_token_table_of_a_changed_dataset_is_not_rebuilt(toy_dirs, tmp_path):
    """The token table is rebuilt only when the dataset still gives the harvested tokens."""
    from shared.cache_format import CacheError

    text = tmp_path / "docs.txt"
    text.write_text("\n\n".join(f"Document {i}: the quick brown fox jumps over the lazy dog." * 3 for i in range(400)))
    cfg = small_harvest_config(tmp_path / "cache", dataset=str(text), tokens=3000, calibration_tokens=500)
    harvest(cfg)
    (tmp_path / "cache" / "tokens.arrow").unlink()
    text.write_text("\n\n".join(f"Another text {i}, with other words in it, and numbers {i * 7}." * 3 for i in range(400)))
    with pytest.raises(CacheError, match="cannot be rebuilt"):
        harvest(cfg)
    assert not (tmp_path / "cache" / "tokens.arrow").exists()


def test_verify_cli_names_a_flipped_byte(toy_cache, tmp_path):
    import shutil

    from shared.cache import CacheWriter

    copy = tmp_path / "copy"
    shutil.copytree(toy_cache, copy)
    ok = _run_cli(["verify", str(copy)])
    assert ok.returncode == 0 and "OK" in ok.stdout
    # Its stderr is a pipe, as a job's log file is: the bar's last state as a line, no redraws joined by "\r".
    assert "\r" not in ok.stderr and any(line.startswith("verify: 100%") for line in ok.stderr.splitlines())
    victim = Manifest.load(copy).shards[3]
    data = bytearray((copy / victim.file).read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / victim.file).write_bytes(bytes(data))
    (copy / Manifest.load(copy).shards[5].file).unlink()
    bad = _run_cli(["verify", str(copy)])
    assert bad.returncode == 1
    assert victim.file in bad.stderr and "sha256" in bad.stderr
    assert Manifest.load(copy).shards[5].file in bad.stderr and "missing" in bad.stderr
    assert "to repair: delete each shard reported corrupted" in bad.stderr
    # The advised command writes into the folder checked, not the one the copy was harvested into.
    m = Manifest.load(copy)
    m.created_by["command"] = f"run_harvest.py --models toy-base --out {toy_cache} --tokens 6000"
    CacheWriter(copy, m).save_manifest()
    hint = _run_cli(["verify", str(copy)]).stderr
    assert f"(`python run_harvest.py --models toy-base --tokens 6000 --out {copy}`)" in hint and str(toy_cache) not in hint
    # The repair it advises: delete the corrupted shard, re-run the harvest.
    (copy / victim.file).unlink()
    harvest(small_harvest_config(copy))
    assert _run_cli(["verify", str(copy)]).returncode == 0
    assert (copy / victim.file).read_bytes() == (toy_cache / victim.file).read_bytes()


# ---- bad input ---------------------------------------------------------------------------


def _tiny_model(path: Path, toy_dir: Path, *, d_model=128, other_tokenizer=False) -> Path:
    """A random GPT-NeoX folder; same tokenizer as the toys unless asked otherwise."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=4096, hidden_size=d_model, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=4 * d_model, max_position_embeddings=512, bos_token_id=0, eos_token_id=0)
    GPTNeoXForCausalLM(cfg).save_pretrained(path)
    if other_tokenizer:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.train_from_iterator(["some other corpus entirely"] * 50, trainers.BpeTrainer(
            vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>").save_pretrained(path)
    else:
        AutoTokenizer.from_pretrained(toy_dir).save_pretrained(path)
    return path


def _bad(tmp_path, match, **overrides):
    with pytest.raises(HarvestInputError, match=match):
        harvest(small_harvest_config(tmp_path / "out", **overrides))
    return True


def test_unknown_hook_lists_close_names(toy_dirs, tmp_path):
    with pytest.raises(HarvestInputError, match=r"unknown hook 'blocks\.2\.hook_resid_pots'") as e:
        harvest(small_harvest_config(tmp_path / "o", hooks=["blocks.2.hook_resid_pots"]))
    assert "blocks.2.hook_resid_post" in str(e.value)
    _bad(tmp_path, "unknown hook 'blocks.9.hook_resid_post'", hooks=["blocks.9.hook_resid_post"])
    _bad(tmp_path, "shape", hooks=["blocks.1.mlp.hook_pre"])  # 512 wide, not d_model


def test_models_that_differ_are_refused_before_any_forward(toy_dirs, tmp_path):
    narrow = _tiny_model(tmp_path / "narrow", toy_dirs["toy-base"], d_model=64)
    _bad(tmp_path, r"different widths \(d_model: toy-base=128, .*=64\)", models=["toy-base", str(narrow)])
    other = _tiny_model(tmp_path / "othertok", toy_dirs["toy-base"], other_tokenizer=True)
    _bad(tmp_path, "do not share a tokenizer", models=["toy-base", str(other)])
    same = _tiny_model(tmp_path / "same", toy_dirs["toy-base"])
    assert harvest(small_harvest_config(tmp_path / "ok", models=["toy-base", str(same)], tokens=300)).complete
    _bad(tmp_path, "no config.json", models=[str(tmp_path)])
    # A path that does not exist is named as a missing folder, not as an invalid Hub id.
    _bad(tmp_path, "model folder .*nope does not exist", models=[str(tmp_path / "nope")])
    _bad(tmp_path, "model folder .*typo does not exist", models=["./typo"])


def test_model_folders_that_cannot_be_harvested_are_named(toy_dirs, tmp_path):
    """Real checkpoints go wrong in ways the toy models do not: each gets one clear error before any
    shard is written (before: tracebacks, an empty tokenizer, or a cache of zeros and NaN)."""
    from transformers import AutoTokenizer, GPTNeoXForCausalLM, T5Config, T5ForConditionalGeneration

    # A fine-tune saved without its tokenizer.
    bare = _tiny_model(tmp_path / "bare", toy_dirs["toy-base"])
    for f in bare.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            f.unlink()
    _bad(tmp_path, "has no tokenizer files .*copy the base model's tokenizer", models=[str(bare)])
    # An architecture the bridge does not know: named in one line, not its list of ~180 names.
    alien = _tiny_model(tmp_path / "alien", toy_dirs["toy-base"])
    cfg = json.loads((alien / "config.json").read_text())
    (alien / "config.json").write_text(json.dumps({**cfg, "architectures": ["BioGptForCausalLM"], "model_type": "biogpt"}))
    _bad(tmp_path, r"\(BioGptForCausalLM, model_type 'biogpt'\) is not an architecture transformer-lens", models=[str(alien)])
    # Encoder-decoder: its hooks were suggested, then the forward crashed in stop_at_layer.
    t5 = tmp_path / "t5"
    T5ForConditionalGeneration(T5Config(vocab_size=4096, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                                        decoder_start_token_id=0, pad_token_id=0, eos_token_id=0)).save_pretrained(t5)
    AutoTokenizer.from_pretrained(toy_dirs["toy-base"]).save_pretrained(t5)
    _bad(tmp_path, "is an encoder-decoder model", models=[str(t5)], hooks=["encoder_blocks.0.hook_resid_post"])
    # A tokenizer declaring no BOS/EOS: transformer-lens makes one up, past the vocabulary.
    nobos = _tiny_model(tmp_path / "nobos", toy_dirs["toy-base"])
    tj, tc = (json.loads((nobos / f).read_text()) for f in ("tokenizer.json", "tokenizer_config.json"))
    for added in tj["added_tokens"]:
        tj["model"]["vocab"][f"<s{added['id']}>"] = tj["model"]["vocab"].pop(added["content"])
        added["content"] = f"<s{added['id']}>"
    for k in ("bos_token", "eos_token", "pad_token", "unk_token"):
        tc.pop(k, None)
    tc.pop("added_tokens_decoder", None)
    (nobos / "tokenizer.json").write_text(json.dumps(tj))
    (nobos / "tokenizer_config.json").write_text(json.dumps(tc))
    _bad(tmp_path, r"special token ids \{'bos': 4096.* declares no bos_token/eos_token", models=[str(nobos)])
    # float16 overflow: caught on the calibration sample, not stored as zeros and NaN that verify passes.
    huge = _tiny_model(tmp_path / "huge", toy_dirs["toy-base"])
    model = GPTNeoXForCausalLM.from_pretrained(huge)
    with torch.no_grad():
        model.gpt_neox.layers[0].mlp.dense_4h_to_h.bias[3] = 1e5  # past float16's 65,504
    model.save_pretrained(huge)
    _bad(tmp_path, r"inf or NaN on the calibration sample \(model dtype float16\); the activations overflow float16: "
         "use --model-dtype bfloat16", models=[str(huge)], model_dtype="float16", hooks=["blocks.1.hook_resid_post"])
    assert not (tmp_path / "out" / "manifest.json").exists()


def _chat_fine_tune(path: Path, toy_dir: Path, *, chat_bos_eos: bool = False) -> Path:
    """toy-base as a chat fine-tune saves it: two tokens added to its tokenizer, embeddings resized;
    ``chat_bos_eos``: they become its BOS and EOS (as trl's setup_chat_format makes them)."""
    from transformers import AutoTokenizer, GPTNeoXForCausalLM

    tok = AutoTokenizer.from_pretrained(toy_dir)
    if chat_bos_eos:
        tok.add_special_tokens({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>"})
    else:
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    model = GPTNeoXForCausalLM.from_pretrained(toy_dir)
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_a_vocabulary_that_extends_another_is_accepted_only_when_asked(toy_dirs, tmp_path):
    """Base vs chat fine-tune: the chat model's vocabulary adds tokens with new ids. Refused by
    default (naming the flag); allowed, the base's tokenizer tokenizes whatever the model order."""
    from harvest.models import vocab_extension
    from shared.cache import open_cache

    chat = _chat_fine_tune(tmp_path / "chat", toy_dirs["toy-base"])
    _bad(tmp_path, r"do not share a tokenizer .*extends toy-base's with the same ids \(.*chat's adds 2 "
         r"\(<\|im_start\|>, <\|im_end\|>\)\).*--allow-vocab-extension", models=[str(chat), "toy-base"])
    kw = dict(tokens=600, context_size=32, hooks=["blocks.1.hook_resid_post"])
    m = harvest(small_harvest_config(tmp_path / "both", models=[str(chat), "toy-base"], allow_vocab_extension=True, **kw))
    assert m.tokenizer["path"] == str(toy_dirs["toy-base"]) and m.tokenizer["vocab_size"] == 4096
    assert m.tokenizer["extended_by"] == {str(chat): {"n_added": 2, "added": ["<|im_start|>", "<|im_end|>"]}}
    alone = harvest(small_harvest_config(tmp_path / "alone", models=["toy-base"], **kw))
    assert alone.tokenizer["sha256"] == m.tokenizer["sha256"]
    both_ids = open_cache(tmp_path / "both").token_table().column("input_ids").to_pylist()
    assert both_ids == open_cache(tmp_path / "alone").token_table().column("input_ids").to_pylist()
    # The base slot holds toy-base's own rows: the same as harvesting it alone.
    def rows_by_token(folder: Path, slot: int) -> torch.Tensor:
        cache = open_cache(folder)
        shards = [cache.shard(i) for i in range(cache.n_shards)]
        key = torch.cat([s.seq * 1000 + s.pos for s in shards])
        return torch.cat([s.acts[:, slot] for s in shards])[key.argsort()]

    assert torch.equal(rows_by_token(tmp_path / "both", 1), rows_by_token(tmp_path / "alone", 0))
    # Pre-tokenized data may not hold an added id (an untrained row, or none, in the base model).
    pre = tmp_path / "pre.jsonl"
    pre.write_text("\n".join(json.dumps({"input_ids": [5, 4096, 7] * 20}) for _ in range(20)))
    _bad(tmp_path, r"id 4096 .*\[0, 4096\)", models=["toy-base", str(chat)], allow_vocab_extension=True,
         dataset=str(pre), **kw)
    # A chat fine-tune whose own BOS/EOS are added tokens: only the base's BOS/EOS are fed.
    trl = _chat_fine_tune(tmp_path / "trl", toy_dirs["toy-base"], chat_bos_eos=True)
    m = harvest(small_harvest_config(tmp_path / "trl-out", models=["toy-base", str(trl)], allow_vocab_extension=True,
                                     **kw))
    assert m.tokenizer["bos_token_id"] == alone.tokenizer["bos_token_id"]
    assert open_cache(tmp_path / "trl-out").token_table().column("input_ids").to_pylist() == both_ids
    # Only containment with the same ids counts.
    assert vocab_extension([{"a": 0, "b": 1}, {"a": 0, "b": 1, "c": 2}]) == (0, [[], ["c"]])
    assert vocab_extension([{"a": 0, "b": 1}, {"a": 1, "b": 0, "c": 2}]) is None
    assert vocab_extension([{"a": 0, "b": 1}, {"a": 0, "c": 1, "d": 2}]) is None


def test_special_tokens_of_every_model_are_excluded_whatever_their_order(toy_dirs, tmp_path):
    from harvest.models import load_models

    nopad = _tiny_model(tmp_path / "nopad", toy_dirs["toy-base"])
    tc = json.loads((nopad / "tokenizer_config.json").read_text())
    tc.pop("pad_token", None)
    (nopad / "tokenizer_config.json").write_text(json.dumps(tc))
    kw = dict(context_size=64, device=torch.device("cpu"), model_dtype=torch.float32)
    one = load_models([str(nopad), "toy-base"], ["blocks.0.hook_resid_post"], **kw).excluded_ids
    two = load_models(["toy-base", str(nopad)], ["blocks.0.hook_resid_post"], **kw).excluded_ids
    assert one == two == load_models(["toy-base"], ["blocks.0.hook_resid_post"], **kw).excluded_ids


def test_models_declaring_other_bos_eos_are_fed_the_first_models_and_told(toy_dirs, tmp_path, capsys):
    """The same vocabulary, another BOS/EOS declared (a base and its chat fine-tune often end documents
    differently): every model was fed the first model's, silently, so --models' order changed the cache."""
    from shared.cache import open_cache

    other = _tiny_model(tmp_path / "other-bos", toy_dirs["toy-base"])
    tc = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps({**tc, "bos_token": "<|padding|>"}))
    kw = dict(tokens=600, context_size=32, hooks=["blocks.1.hook_resid_post"])
    for models, fed_bos in ((["toy-base", str(other)], 0), ([str(other), "toy-base"], 1)):
        out = tmp_path / f"fed-{fed_bos}"
        m = harvest(small_harvest_config(out, models=models, **kw))
        said = capsys.readouterr().out
        first, second = models
        assert (f"special tokens: the models' tokenizers differ in BOS/EOS; every model is fed {first}'s (the first "
                f"model's; list another first in --models to feed its own)") in said
        own = {str(other): {"bos_token_id": 1, "eos_token_id": 0}, "toy-base": {"bos_token_id": 0, "eos_token_id": 0}}
        assert f"{second} declares BOS {'<|endoftext|>' if fed_bos else '<|padding|>'!r}" in said
        assert m.tokenizer["bos_token_id"] == fed_bos and m.tokenizer["own_special_tokens"] == {second: own[second]}
        ids = open_cache(out).token_table().column("input_ids").to_pylist()
        assert {seq[0] for seq in ids} == {fed_bos}
        mine = own[second]
        assert (f"; BOS id {fed_bos}, EOS id 0 fed to every model (`{second}` declares BOS {mine['bos_token_id']}, "
                f"EOS 0) |") in (out / "README.md").read_text()  # the dataset card says it too
    # Models that agree: no note, no key.
    m = harvest(small_harvest_config(tmp_path / "agree", models=["toy-base", "toy-code"], **kw))
    assert "special tokens:" not in capsys.readouterr().out and "own_special_tokens" not in m.tokenizer


def test_context_dataset_and_output_errors(toy_dirs, tmp_path):
    _bad(tmp_path, "exceeds model 'toy-base'.s maximum of 512", context_size=1024)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    _bad(tmp_path, "yielded no documents", dataset=str(empty))
    _bad(tmp_path, "does not exist", dataset=str(tmp_path / "missing.jsonl"))
    _bad(tmp_path, "holds only .* usable tokens", dataset="builtin:docs", split="eval", tokens=10_000_000)
    _bad(tmp_path, "not enough disk", tokens=10**13)
    _bad(tmp_path, r"--exclude-token-ids \[4096, 99999\] lie outside the models' vocabulary \[0, 4096\)",
         exclude_token_ids=[7, 4096, 99999])
    _bad(tmp_path, "unknown device 'tpu'; use auto, cpu, cuda or cuda:N", device="tpu")
    _bad(tmp_path, "unknown model 'toy-bsae': did you mean 'toy-base'", models=["toy-bsae", "toy-code"])
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(HarvestInputError, match="not empty and holds no cache manifest"):
        harvest(small_harvest_config(foreign))
    # A README.md is the harvest's own (its card, left when its manifest was deleted) only if it
    # reads like one; the user's own notes are never overwritten.
    (foreign / "notes.txt").unlink()
    (foreign / "README.md").write_text("# my notes on this experiment\n")
    with pytest.raises(HarvestInputError, match=r"not empty and holds no cache manifest \(found \['README.md'\]\)"):
        harvest(small_harvest_config(foreign))
    assert (foreign / "README.md").read_text() == "# my notes on this experiment\n"
    from harvest.harvester import _own_file
    from shared.card import CARD_MARK

    (foreign / "README.md").write_text(f"# Activation cache\n\nAligned ... {CARD_MARK}.\n")
    assert _own_file(foreign / "README.md")


@contextlib.contextmanager
def _one_rank_torchrun(monkeypatch):
    """The environment torchrun gives a one-process job (a free port), so harvest() runs distributed here."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with monkeypatch.context() as patch:
        for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(port)}.items():
            patch.setenv(key, value)
        yield


def test_a_harvest_that_fails_before_its_first_manifest_leaves_nothing(toy_dirs, tmp_path, monkeypatch):
    """No folder a failed harvest created is left behind (empty, or with a token table it could
    never resume from); a folder the user made stays, emptied of what the harvest wrote. Under
    torchrun too (one rank, in this process)."""
    from harvest.harvester import _Forward

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    out = tmp_path / "new" / "out"
    with pytest.raises(HarvestInputError, match="yielded no documents"):
        harvest(small_harvest_config(out, dataset=str(empty)))
    assert not out.exists()

    def fail_after_the_token_table(cfg) -> None:
        def calibrate(self, *args, **kwargs):
            assert (Path(cfg.out) / "tokens.arrow").is_file()
            raise RuntimeError("out of memory (simulated)")

        with monkeypatch.context() as patch:
            patch.setattr(_Forward, "calibrate", calibrate)
            with pytest.raises(RuntimeError, match="simulated"):
                harvest(cfg)

    fail_after_the_token_table(small_harvest_config(out))
    assert not out.exists()

    mine = tmp_path / "mine"
    mine.mkdir()
    fail_after_the_token_table(small_harvest_config(mine))
    assert mine.is_dir() and not list(mine.iterdir())
    assert harvest(small_harvest_config(mine, tokens=300)).complete  # usable as before

    with _one_rank_torchrun(monkeypatch):
        fail_after_the_token_table(small_harvest_config(tmp_path / "dist"))
    assert not (tmp_path / "dist").exists()


def test_a_tokenizer_json_the_harvest_did_not_write_is_neither_overwritten_nor_deleted(toy_dirs, tmp_path,
                                                                                      monkeypatch):
    """A ``tokenizer.json`` alone in ``--out`` passes for a killed harvest's leftover: the harvest
    used to overwrite it, and delete it when the start failed. Another tokenizer's is refused and
    kept (under torchrun too); the harvest's own leftover (same bytes) is taken as it is."""
    from shared.cache_format import TOKENIZER_NAME

    out = tmp_path / "out"
    out.mkdir()
    theirs = b'{"version": "1.0", "note": "my own tokenizer"}'
    (out / TOKENIZER_NAME).write_bytes(theirs)
    with pytest.raises(HarvestInputError, match=r"tokenizer.json is not this harvest's .*move it out"):
        harvest(small_harvest_config(out))
    assert (out / TOKENIZER_NAME).read_bytes() == theirs and sorted(p.name for p in out.iterdir()) == [TOKENIZER_NAME]

    with _one_rank_torchrun(monkeypatch):
        with pytest.raises(HarvestInputError, match="not this harvest's"):
            harvest(small_harvest_config(out))
    assert (out / TOKENIZER_NAME).read_bytes() == theirs

    # The harvest's own file, left by a start killed before its first manifest, is reused.
    done = harvest(small_harvest_config(tmp_path / "ref", tokens=300))
    ours = (tmp_path / "ref" / TOKENIZER_NAME).read_bytes()
    (out / TOKENIZER_NAME).write_bytes(ours)
    again = harvest(small_harvest_config(out, tokens=300))
    assert again.complete and [s.sha256 for s in again.shards] == [s.sha256 for s in done.shards]
    assert (out / TOKENIZER_NAME).read_bytes() == ours


def test_output_folder_with_a_different_harvest_is_refused(toy_cache):
    with pytest.raises(HarvestInputError, match=r"holds a different harvest \(hooks: "):
        harvest(small_harvest_config(toy_cache, hooks=["blocks.0.hook_resid_post"]))


def test_cli_reports_errors_without_traceback(toy_dirs, tmp_path):
    res = _run_cli(["--hooks", "blocks.2.hook_resid_pots", "--out", str(tmp_path / "x"), "--no-progress"])
    assert res.returncode == 2
    assert "error: unknown hook" in res.stderr and "Traceback" not in res.stderr


def test_rows_past_float16_or_non_finite_stop_the_harvest(toy_dirs, tmp_path):
    """A float32 model whose activations pass float16's 65,504, stored as float16: the rows became inf in
    the shards (the calibration check sees only the raw sample), verify passed them and only training
    stopped. Now the harvest stops before writing them, naming the slot, the token and the fix."""
    from safetensors.torch import load_file, save_file

    huge = _tiny_model(tmp_path / "huge", toy_dirs["toy-base"])
    weights = load_file(huge / "model.safetensors")
    weights["gpt_neox.embed_in.weight"] = weights["gpt_neox.embed_in.weight"] * 1e7  # raw rows ~1e5-1e6, finite
    save_file(weights, huge / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    cfg = small_harvest_config(out, models=[str(huge)], hooks=["blocks.1.hook_resid_post"], normalize="none",
                               dtype="float16", tokens=1000, calibration_tokens=500)
    with pytest.raises(HarvestInputError, match=r"hold inf in .*huge/blocks\.1\.hook_resid_post as stored \(float16\), "
                       r"the first at sequence \d+ position \d+ \(token \d+\).*use --dtype bfloat16"):
        harvest(cfg)
    assert not list(out.glob("shards/*.safetensors"))  # nothing written, nothing listed
    # The same rows fit bfloat16: the check does not fire on finite rows.
    ok = harvest(small_harvest_config(tmp_path / "bf16", models=[str(huge)], hooks=["blocks.1.hook_resid_post"],
                                      normalize="none", dtype="bfloat16", tokens=1000, calibration_tokens=500))
    assert ok.complete and ok.n_rows == 1000


@pytest.mark.parametrize("threaded", [False, True], ids=["in-thread", "writer-thread"])
def test_writer_refuses_nan_rows_and_names_the_model_dtype(tmp_path, threaded):
    """NaN rows past the calibration sample (float16 models overflow on a rare token): refused, with the
    --model-dtype fix, and no shard of their chunk is kept; earlier chunks stay written and listed."""
    from harvest.writer import ShardWriter, ShardWriterThread
    from shared.cache import CacheWriter
    from tests.cache_factory import make_cache

    manifest = make_cache(tmp_path / "src", n_shards=1, rows_per_shard=8, d_model=4, tag=False, model_names=["a", "b"],
                          hook_names=["h"])
    manifest.shards, manifest.n_rows, manifest.complete = [], 0, False
    cache = CacheWriter(tmp_path / "cache", manifest)
    kind = ShardWriterThread if threaded else ShardWriter
    names = dict(model_names=["a", "b"], hooks=["h"], model_dtype="float16")
    w = kind(cache, chunk_rows=[16, 8], shard_rows=4, shuffle_shards=4, seed=0, row_shape=(2, 1, 4),
             dtype=torch.bfloat16, write_threads=2, **names)
    acts = torch.zeros(24, 2, 1, 4, dtype=torch.bfloat16)
    acts[19, 1, 0, 2] = float("nan")
    ids = torch.arange(24)
    w.put_rows(0, acts[:16], ids[:16], ids[:16], ids[:16])  # a finite chunk: written and listed
    with pytest.raises(HarvestInputError, match=r"1 of the 4 rows of shard shards/acts-\d+\.safetensors hold NaN in b/h as "
                       r"stored \(bfloat16\), the first at sequence 19 position 19 \(token 19\).*keeps no shard of "
                       r"their chunk.*--model-dtype float16 overflows"):
        w.write_all([(16, acts[16:], ids[16:], ids[16:], ids[16:])], w.put_rows)
    assert [s.n_rows for s in cache.manifest.shards] == [4, 4, 4, 4]  # the first chunk only
    assert sorted(p.name for p in (tmp_path / "cache" / "shards").iterdir()) == \
        sorted(Path(s.file).name for s in cache.manifest.shards)

    # Two bad rows in one shard: the earliest token is named, whatever the shuffle put first.
    acts[13, 1, 0, 2], acts[10, 0, 0, 0] = float("nan"), float("inf")
    manifest.shards, manifest.n_rows = [], 0
    w = ShardWriter(CacheWriter(tmp_path / "cache2", manifest), chunk_rows=[8], shard_rows=8, shuffle_shards=1, seed=3,
                    row_shape=(2, 1, 4), dtype=torch.bfloat16, write_threads=1, **names)
    with pytest.raises(HarvestInputError, match=r"2 of the 8 rows .*hold inf and NaN in a/h, b/h .* the first at "
                       r"sequence 10 position 10"):
        w.write_all([(0, acts[8:16], ids[8:16], ids[8:16], ids[8:16])], w.put_rows)


def test_a_ranks_writer_refuses_nan_rows_too(tmp_path):
    """Under torchrun each rank's shards go through a RankShardLog, not a CacheWriter: a refused chunk raised an
    AttributeError there (no ``dir``) while removing the chunk's other shards, instead of the inf/NaN error."""
    from harvest.rank_manifests import RankShardLog
    from harvest.writer import ShardWriter

    log = RankShardLog(tmp_path, 1, 2, signature={}, dtype=torch.bfloat16, row_shape=(2, 1, 4), records=[])
    w = ShardWriter(log, chunk_rows=[16], shard_rows=4, shuffle_shards=4, seed=0, row_shape=(2, 1, 4),
                    dtype=torch.bfloat16, rank=1, write_threads=2, model_names=["a", "b"], hooks=["h"],
                    model_dtype="bfloat16")
    acts = torch.zeros(16, 2, 1, 4, dtype=torch.bfloat16)
    acts[5, 1, 0, 0] = float("nan")
    ids = torch.arange(16)
    with pytest.raises(HarvestInputError, match=r"1 of the 4 rows of shard shards/acts-rank1-\d+\.safetensors hold NaN "
                       r"in b/h .* the first at sequence 5 position 5"):
        w.write_all([(0, acts, ids, ids, ids)], w.put_rows)
    assert not list((tmp_path / "shards").glob("*.safetensors")) and log.records == []


def test_writer_that_died_does_not_hang_close(tmp_path):
    """The writer thread fails on a piece while the caller waits for room in the queue: the
    caller's put() and close() re-raise its error instead of blocking forever on room that a dead
    thread never makes."""
    import threading

    from harvest.writer import Piece, ShardWriterThread

    class Unused:  # no shard is ever written: the thread fails on its first piece
        def write_shard_file(self, *a, **kw):
            raise AssertionError("not reached")

    gate = threading.Event()
    w = ShardWriterThread(Unused(), chunk_rows=[4], shard_rows=4, shuffle_shards=1, seed=0, row_shape=(1, 1, 8),
                          dtype=torch.bfloat16, max_pending_bytes=1, write_threads=2)
    take = w._take
    w._take = lambda piece: (gate.wait(10), take(piece))  # the thread holds the first piece until the gate opens
    bad = Piece(0, 0, torch.zeros(4, 1, 1, 3, dtype=torch.bfloat16), *(torch.zeros(4, dtype=torch.int64),) * 3)
    w.put(bad)  # wrong width: the copy into the chunk buffer raises in the thread
    result: list[BaseException] = []

    def second_put_then_close() -> None:
        result.append(pytest.raises((RuntimeError, ValueError), w.put, bad).value)  # waits for room
        result.append(pytest.raises((RuntimeError, ValueError), w.close).value)

    t = threading.Thread(target=second_put_then_close, daemon=True)
    t.start()
    time.sleep(0.2)
    assert t.is_alive() and not result  # the second piece waits: the first still holds the queue's room
    gate.set()
    t.join(timeout=10)
    assert not t.is_alive(), "put() or close() hung on a dead writer"
    assert len(result) == 2 and all("size" in str(e) or "shape" in str(e) for e in result)


def test_writer_thread_bounds_waiting_rows_by_bytes():
    """While the writer thread is held up, the caller may queue rows up to ``max_pending_bytes``
    and then blocks; a piece larger than the bound is still taken when nothing waits. All rows
    are written once the thread goes on."""
    import threading

    from harvest.writer import ShardWriterThread
    from shared.cache_format import ShardRecord

    gate = threading.Event()

    class Gated:
        def __init__(self) -> None:
            self.rows = 0

        def write_shard_file(self, rel_file, *tensors):
            gate.wait(10)
            self.rows += len(tensors[0])
            return ShardRecord(file=rel_file, n_rows=len(tensors[0]), sha256="-", bytes=0)

        def add_record(self, record, save):
            pass

    row_bytes = 8 * 4  # float32 rows of width 8
    cap = Gated()
    # Chunks of 4 rows, pieces of 2 rows (64 B): chunk 0's shard blocks on the gate, so the thread
    # stops on chunk 1's last piece (it waits for chunk 0) and the queue fills behind it.
    w = ShardWriterThread(cap, chunk_rows=[4] * 8, shard_rows=4, shuffle_shards=1, seed=0, row_shape=(1, 1, 8),
                          dtype=torch.float32, write_threads=1, max_pending_bytes=3 * 2 * row_bytes)
    acts, ids = torch.zeros(32, 1, 1, 8), torch.zeros(32, dtype=torch.int64)
    sent: list[int] = []

    def send() -> None:
        for a in range(0, 32, 2):
            w.put_rows(a, acts[a : a + 2], ids[a : a + 2], ids[a : a + 2], ids[a : a + 2])
            sent.append(a)
        w.close()

    t = threading.Thread(target=send, daemon=True)
    t.start()
    time.sleep(0.3)
    # Taken by the thread: chunk 0 (2 pieces) and chunk 1's first; held in its hands: chunk 1's
    # last; then 2 more queued fill the 3-piece bound. The next put waits.
    assert len(sent) == 6 and w._pending_bytes == 3 * 2 * row_bytes, (sent, w._pending_bytes)
    assert t.is_alive()
    gate.set()
    t.join(timeout=10)
    assert not t.is_alive() and cap.rows == 32 and w._pending_bytes == 0 and w.wait_seconds > 0.2

    big = ShardWriterThread(Gated(), chunk_rows=[4], shard_rows=4, shuffle_shards=1, seed=0, row_shape=(1, 1, 8),
                            dtype=torch.float32, write_threads=1, max_pending_bytes=1)
    big.put_rows(0, acts[:4], ids[:4], ids[:4], ids[:4])  # 4 rows > 1 byte: taken alone, no wait
    big.close()
    assert big.rows_written == 4 and big.wait_seconds == 0.0


@pytest.mark.parametrize("threaded", [False, True])
@pytest.mark.parametrize("write_threads", [1, 3])
def test_writer_shards_are_the_documented_shuffle(write_threads, threaded):
    """Each shard holds its chunk's rows in the order ``chunk_permutation`` gives, computed here
    independently of the writer: pieces cross chunk boundaries, the last chunk is short, and
    chunk buffers are reused (bfloat16 acts travel as raw bytes, so every bit must survive).
    The same for rows taken in the caller's thread and on a writer thread."""
    from harvest.writer import ShardWriter, ShardWriterThread, chunk_permutation
    from shared.cache_format import ShardRecord

    class Capture:  # stands in for CacheWriter: keeps what would be written
        def __init__(self) -> None:
            self.files: dict[str, tuple[torch.Tensor, ...]] = {}
            self.listed: list[str] = []

        def write_shard_file(self, rel_file, *tensors):
            self.files[rel_file] = tuple(t.clone() for t in tensors)
            return ShardRecord(file=rel_file, n_rows=len(tensors[0]), sha256="-", bytes=0)

        def add_record(self, record, save):
            self.listed.append(record.file)

    shard_rows, shuffle_shards, n = 5, 3, 38  # chunks of 15, 15 and 8 rows
    chunk_rows = [15, 15, 8]
    gen = torch.Generator().manual_seed(1)
    acts = torch.randn(n, 2, 1, 4, generator=gen).to(torch.bfloat16)
    seq, pos, tok = torch.arange(n) * 7, torch.arange(n, dtype=torch.int32) % 11, torch.arange(n, dtype=torch.int32) + 100
    cap = Capture()
    w = (ShardWriterThread if threaded else ShardWriter)(
        cap, chunk_rows=chunk_rows, shard_rows=shard_rows, shuffle_shards=shuffle_shards, seed=9,
        row_shape=(2, 1, 4), dtype=torch.bfloat16, write_threads=write_threads)
    cuts = [0, 4, 13, 20, 31, 38]  # pieces of the stream, some across chunk boundaries
    w.write_all(((a, acts[a:b], seq[a:b], pos[a:b], tok[a:b]) for a, b in itertools.pairwise(cuts)), w.put_rows)

    expected_files = []
    first = 0
    for chunk, rows in enumerate(chunk_rows):
        perm = chunk_permutation(9, chunk, rows) + first  # stream rows of the chunk, in shard order
        for j, start in enumerate(range(0, rows, shard_rows)):
            idx = perm[start : start + shard_rows]
            name = next(f for f in cap.files if f.endswith(f"{chunk * shuffle_shards + j:05d}.safetensors"))
            got = cap.files[name]
            assert torch.equal(got[0].view(torch.int16), acts[idx].view(torch.int16)), name
            assert torch.equal(got[1], seq[idx]) and torch.equal(got[2], pos[idx]) and torch.equal(got[3], tok[idx])
            expected_files.append(name)
        first += rows
    assert cap.listed == expected_files  # listed in order, each once


@pytest.mark.parametrize("threaded", [False, True])
def test_writer_counts_the_time_the_forward_loop_waits_for_it(threaded):
    """When writing is slower than the rows arrive, the caller blocks (on a full queue, or on the
    previous chunk when rows are taken in its own thread), and that time (with the final flush) is
    what the harvest reports as ``writer_wait_seconds``; a note then says writing bounds the
    harvest. A writer that keeps up costs the caller no wait."""
    import time

    from harvest.writer import ShardWriter, ShardWriterThread, writer_wait_note
    from shared.cache_format import ShardRecord

    class Slow:  # stands in for CacheWriter: each shard takes ``delay`` seconds to "write"
        def __init__(self, delay: float) -> None:
            self.delay = delay

        def write_shard_file(self, rel_file, *tensors):
            time.sleep(self.delay)
            return ShardRecord(file=rel_file, n_rows=len(tensors[0]), sha256="-", bytes=0)

        def add_record(self, record, save):
            pass

    def run(delay: float) -> ShardWriter:
        n = 48  # 12 chunks of one 4-row shard; pieces of 2 rows
        kw = {"max_pending_bytes": 1} if threaded else {}
        w = (ShardWriterThread if threaded else ShardWriter)(
            Slow(delay), chunk_rows=[4] * 12, shard_rows=4, shuffle_shards=1, seed=0, row_shape=(1, 1, 8),
            dtype=torch.float32, write_threads=1, **kw)
        acts, ids = torch.zeros(n, 1, 1, 8), torch.zeros(n, dtype=torch.int64)
        w.write_all(((a, acts[a : a + 2], ids[a : a + 2], ids[a : a + 2], ids[a : a + 2]) for a in range(0, n, 2)),
                    w.put_rows)
        return w

    slow = run(0.05)
    # 12 shards of 50 ms, one chunk at a time: the caller waits most of ~0.6 s, not the last chunk's 50 ms only
    assert slow.wait_seconds > 0.3, slow.wait_seconds
    assert slow.flush_seconds > 0.03  # the last chunk's shard
    fast = run(0.0)
    assert fast.wait_seconds < 0.2
    assert writer_wait_note(0.05, 10.0) is None and writer_wait_note(2.0, 10.0) is not None
    assert writer_wait_note(0.5, 0.7) is None  # a tiny harvest's final flush says nothing of the disk


def test_rows_taken_in_the_callers_thread_stop_cleanly_on_an_error():
    """A failed shard write re-raises in the caller; write_all then aborts: the chunks listed before
    stay listed, nothing after them is, and no pool thread is left running."""
    import threading

    from harvest.writer import ShardWriter
    from shared.cache_format import ShardRecord

    class FailsOnThird:
        def __init__(self) -> None:
            self.calls, self.listed = 0, []

        def write_shard_file(self, rel_file, *tensors):
            self.calls += 1
            if self.calls == 3:
                raise OSError("disk on fire")
            return ShardRecord(file=rel_file, n_rows=len(tensors[0]), sha256="-", bytes=0)

        def add_record(self, record, save):
            self.listed.append(record.file)

    cap = FailsOnThird()
    w = ShardWriter(cap, chunk_rows=[4] * 6, shard_rows=4, shuffle_shards=1, seed=0, row_shape=(1, 1, 8),
                    dtype=torch.float32, write_threads=1)
    acts, ids = torch.zeros(24, 1, 1, 8), torch.zeros(24, dtype=torch.int64)
    with pytest.raises(OSError, match="disk on fire"):
        w.write_all(((a, acts[a : a + 4], ids[a : a + 4], ids[a : a + 4], ids[a : a + 4]) for a in range(0, 24, 4)),
                    w.put_rows)
    assert len(cap.listed) == 2 and all("00000" in f or "00001" in f for f in cap.listed)
    assert not [t for t in threading.enumerate() if t.name.startswith("crosscache-shard-write")]


def test_a_resume_with_other_weights_is_refused_and_loses_nothing(toy_dirs, tmp_path):
    """A model folder retrained in place between a crash and the resume: the resume would write the new
    model's rows beside the old one's, under the old normalization. It is refused, naming the model,
    and the shards already written stay listed; with the original weights back, it resumes."""
    import shutil

    from safetensors.torch import load_file, save_file

    model = tmp_path / "ft"
    shutil.copytree(toy_dirs["toy-code"], model)
    cfg = small_harvest_config(tmp_path / "c", models=["toy-base", str(model)], hooks=["blocks.1.hook_resid_post"],
                               tokens=3000, shard_size=0.0625, shuffle_shards=2, calibration_tokens=500)
    harvest(cfg)
    done = Manifest.load(cfg.out)
    assert all(len(m["weights_fingerprint"]) == 64 for m in done.models)
    # As a crash leaves it: the manifest lists the first chunks, not complete.
    man = json.loads((Path(cfg.out) / "manifest.json").read_text())
    man["shards"], man["complete"] = man["shards"][:4], False
    man["n_rows"] = sum(s["n_rows"] for s in man["shards"])
    (Path(cfg.out) / "manifest.json").write_text(json.dumps(man))
    weights = next(model.glob("*.safetensors"))
    original = weights.read_bytes()
    tensors = load_file(weights)
    name = next(k for k in tensors if "layers.0.mlp" in k and k.endswith("weight"))
    tensors[name] = tensors[name] * 3
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(HarvestInputError, match=rf"model '{model}' has other weights than when this cache was "
                                                r"started .*harvest into a new --out"):
        harvest(cfg)
    assert Manifest.load(cfg.out).shards == Manifest.load(cfg.out).shards[:4] and len(Manifest.load(cfg.out).shards) == 4
    weights.write_bytes(original)
    resumed = harvest(cfg)
    assert [s.sha256 for s in resumed.shards] == [s.sha256 for s in done.shards]


def test_disk_check_counts_the_tokenizer_file(toy_dirs, tmp_path, monkeypatch):
    """The cache's tokenizer.json (MBs for a large vocabulary) is part of the size the disk check
    needs: free space that fits the rows but not the tokenizer file is refused before anything runs."""
    import shutil
    from collections import namedtuple

    from transformers import AutoTokenizer

    from harvest import harvester
    from shared.tokenizer_file import tokenizer_json_bytes

    tok = AutoTokenizer.from_pretrained(toy_dirs["toy-base"])
    tok_bytes = len(tokenizer_json_bytes(tok))
    assert tok_bytes > 10_000
    cfg = small_harvest_config(tmp_path / "out")
    rows_only = harvester.estimate_cache_bytes(cfg.tokens, 2, 2, 128, cfg.dtype, cfg.context_size)
    assert harvester.estimate_cache_bytes(cfg.tokens, 2, 2, 128, cfg.dtype, cfg.context_size,
                                          tokenizer_bytes=tok_bytes) == rows_only + tok_bytes
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**12, 0, rows_only + tok_bytes // 2))
    said: list[str] = []
    harvester.check_free_disk(cfg, tmp_path / "out", (2, 2, 128), 512, 0, say=said.append)  # no tokenizer: fits
    with pytest.raises(HarvestInputError, match="not enough disk"):
        harvester.check_free_disk(cfg, tmp_path / "out", (2, 2, 128), 512, 0, tokenizer=tok, say=said.append)
