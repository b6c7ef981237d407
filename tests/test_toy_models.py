"""Tests of the toy model trio (built once per machine into the cache, then reused)."""

from __future__ import annotations

import json

import pytest

from harvest.toy_models import TOY_NAMES, ensure_toy_model, is_toy_name, toy_models_dir


@pytest.fixture(scope="module")
def folders():
    return {name: ensure_toy_model(name) for name in TOY_NAMES}


@pytest.fixture(scope="module")
def losses(folders):
    return {name: json.loads((f / "toy_info.json").read_text())["heldout_loss"] for name, f in folders.items()}


def test_names():
    assert TOY_NAMES == ("toy-base", "toy-code", "toy-prose")
    assert is_toy_name("toy-code") and not is_toy_name("gpt2")


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError) as err:
        ensure_toy_model("nope")
    for name in TOY_NAMES:
        assert name in str(err.value)


def test_build_layout(folders):
    root = toy_models_dir()
    summary = json.loads((root / "losses.json").read_text())
    assert set(summary) == set(TOY_NAMES)
    for name, folder in folders.items():
        assert folder == root / name
        info = json.loads((folder / "toy_info.json").read_text())
        assert info["tokens_trained"] > 0 and info["seed"] == 0
        assert info["config"]["num_hidden_layers"] == 4
        assert summary[name]["code"] == pytest.approx(info["heldout_loss"]["code"])
    # Both fine-tunes see the same amount of data: toy-prose is a fair control.
    assert summary["toy-code"]["tokens_trained"] == summary["toy-prose"]["tokens_trained"]


def test_tokenizer_shared_and_adds_no_bos(folders):
    from transformers import AutoTokenizer

    toks = {name: AutoTokenizer.from_pretrained(f) for name, f in folders.items()}
    vocab = toks["toy-base"].get_vocab()
    assert len(vocab) == 4096
    for tok in toks.values():
        assert tok.get_vocab() == vocab
        assert tok.bos_token_id == 0 and tok.eos_token_id == 0 and tok.pad_token_id == 1
        ids = tok("def f(x):\n    return x")["input_ids"]
        assert ids and 0 not in ids  # no BOS/EOS added behind the caller's back
        assert tok.decode(ids) == "def f(x):\n    return x"  # byte-level: lossless round trip


def test_tokenizer_config_names_a_class_transformers_4_has_too(folders, tmp_path, monkeypatch):
    """transformers 5 saves "TokenizersBackend", which transformers 4 (circuit-tracer's pin) cannot load; the
    build names PreTrainedTokenizerFast, and a build from before that is mended on first use."""
    import shutil

    for folder in folders.values():
        assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    old = tmp_path / "toys"
    shutil.copytree(toy_models_dir(), old)
    config = old / "toy-code" / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "tokenizer_class": "TokenizersBackend"}))
    monkeypatch.setenv("CROSSCACHE_TOY_DIR", str(old))
    assert ensure_toy_model("toy-code") == old / "toy-code"
    assert json.loads(config.read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_loads_with_transformers(folders):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folders["toy-code"])
    assert model.config.num_hidden_layers == 4 and model.config.hidden_size == 128
    with torch.no_grad():
        logits = model(torch.tensor([[0, 5, 6, 7]])).logits
    assert logits.shape == (1, 4, 4096)


def test_loads_with_transformer_bridge(folders):
    import torch
    from transformer_lens.model_bridge import TransformerBridge

    for name, folder in folders.items():
        bridge = TransformerBridge.boot_transformers(str(folder), device="cpu")
        with torch.no_grad():
            _, cache = bridge.run_with_cache(torch.tensor([[0, 10, 20, 30, 40]]))
        assert "blocks.2.hook_resid_post" in cache, name
        assert cache["blocks.2.hook_resid_post"].shape == (1, 5, 128)


def test_heldout_losses_tell_the_story(losses):
    base, code, prose = losses["toy-base"], losses["toy-code"], losses["toy-prose"]
    # The code fine-tune learned code...
    assert code["code"] < base["code"] - 1.0
    # ...the prose-only control did not (much)...
    assert prose["code"] > base["code"] - 0.5
    assert prose["code"] > code["code"] + 1.0
    # ...and all three still model prose about equally well.
    prose_losses = [v["prose"] for v in losses.values()]
    assert max(prose_losses) - min(prose_losses) < 0.5
    assert all(v["prose"] < 6.0 for v in losses.values())  # well below uniform (ln 4096 = 8.3)


def test_build_is_locked_and_atomic(tmp_path, monkeypatch):
    """Concurrent callers build once; a build that dies leaves nothing that looks complete."""
    import threading
    import time

    import harvest.toy_models as tm

    calls = []

    def fake_build(out, *, progress):
        calls.append(out)
        time.sleep(0.2)  # long enough for the other threads to queue on the lock
        if len(calls) == 1:
            (out / "toy-base").mkdir()
            raise RuntimeError("killed mid-build")
        for name in TOY_NAMES:
            (out / name).mkdir()
        (out / "losses.json").write_text("{}")

    monkeypatch.setattr(tm, "_build_into", fake_build)
    monkeypatch.setenv("CROSSCACHE_TOY_DIR", str(tmp_path / "toys"))
    with pytest.raises(RuntimeError):
        ensure_toy_model("toy-base")
    assert not (tmp_path / "toys").exists()
    assert not list(tmp_path.glob(".toys.tmp-*"))

    results = []
    threads = [threading.Thread(target=lambda: results.append(ensure_toy_model("toy-code")))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 2  # one failed build, then exactly one successful one
    assert results == [tmp_path / "toys" / "toy-code"] * 3
