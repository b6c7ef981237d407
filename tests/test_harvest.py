"""Stage 1 end to end on the toy pair: what the cache holds, and that it is the models' own activations."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import comparable_manifest, small_harvest_config
from harvest.harvester import harvest
from shared.cache import open_cache, verify_cache
from shared.cache_format import Manifest


def _all_rows(cache_dir):
    cache = open_cache(cache_dir)
    acts, seq, pos, tok = [], [], [], []
    for i in range(cache.n_shards):
        s = cache.shard(i)
        acts.append(s.acts.clone()), seq.append(s.seq.clone()), pos.append(s.pos.clone()), tok.append(s.token.clone())
    return cache, torch.cat(acts), torch.cat(seq), torch.cat(pos), torch.cat(tok)


def test_manifest_has_the_required_keys(toy_cache, toy_dirs):
    obj = json.loads((toy_cache / "manifest.json").read_text())
    for key in ["format_version", "models", "hooks", "d_model", "dtype", "context_size", "n_rows", "shards",
                "normalization", "excluded_tokens", "dataset", "tokenizer", "created_by"]:
        assert key in obj, key
    assert obj["format_version"] == 1 and obj["complete"] is True and obj["dtype"] == "bfloat16"
    assert [m["name"] for m in obj["models"]] == ["toy-base", "toy-code"]
    assert obj["models"][0]["path"] == str(toy_dirs["toy-base"])
    assert obj["n_rows"] == 6000 == sum(s["n_rows"] for s in obj["shards"])
    assert all(s["file"].startswith("shards/") and len(s["sha256"]) == 64 for s in obj["shards"])
    norm = obj["normalization"]
    assert norm["method"] == "norm_scale" and len(norm["scale"]) == 2 and len(norm["scale"][0]) == 2
    assert obj["tokenizer"]["vocab_size"] == 4096 and len(obj["tokenizer"]["sha256"]) == 64
    assert 0 in obj["excluded_tokens"]["token_ids"]
    run = obj["created_by"]["last_run"]  # this run's timings, with the wait on the writer
    assert run["rows"] == 6000 and 0 <= run["final_flush_seconds"] <= run["writer_wait_seconds"] <= run["seconds"]
    # the forward loop's own CPU time: it ran the models (not 0), and one thread cannot outrun the clock
    assert 0 < run["forward_loop_cpu_seconds"] <= run["forward_and_write_seconds"] + 0.01
    assert (toy_cache / "README.md").read_text().count("toy-code") >= 1
    assert verify_cache(toy_cache).ok


def test_rows_are_aligned_and_exclude_special_tokens(toy_cache):
    cache, acts, seq, pos, tok = _all_rows(toy_cache)
    table = cache.token_table()
    ids = table.column("input_ids").to_pylist()
    assert acts.shape == (6000, 2, 2, 128)
    # Every row is unique and points at its token in tokens.arrow.
    keys = seq * 1000 + pos.long()
    assert keys.unique().numel() == 6000
    assert all(ids[s][p] == t for s, p, t in zip(seq.tolist(), pos.tolist(), tok.tolist()))
    # BOS (position 0) and every special token are absent.
    assert (pos > 0).all()
    excluded = set(cache.manifest.excluded_tokens["token_ids"])
    assert not excluded & set(tok.tolist())
    # Exactly the planned positions: every non-special token of every sequence but the last.
    seqs = sorted(set(seq.tolist()))
    for s in seqs[:-1]:
        expected = {p for p, t in enumerate(ids[s]) if t not in excluded}
        assert set(pos[seq == s].tolist()) == expected
    # Shards are shuffled across many sequences, not runs of one document.
    first = open_cache(toy_cache).shard(0)
    assert first.seq.unique().numel() > 10 and not torch.all(first.seq[1:] >= first.seq[:-1])
    # Both sources of builtin:mixed are there, and each sequence has one source.
    assert set(table.column("source").to_pylist()) == {"docs", "code"}


def test_norm_scale_gives_sqrt_d_mean_norm(toy_cache):
    _, acts, *_ = _all_rows(toy_cache)
    mean_norm_MP = acts.float().norm(dim=-1).mean(0)
    target = 128**0.5
    assert ((mean_norm_MP - target).abs() / target < 0.05).all(), mean_norm_MP


def test_rows_reproduce_the_models_own_activations(toy_cache, toy_dirs):
    """Recompute a random sample of rows with a plain transformers forward pass."""
    from transformers import AutoModelForCausalLM

    cache, acts, seq, pos, tok = _all_rows(toy_cache)
    raw = cache.normalization().undo(acts)
    ids = cache.token_table().column("input_ids").to_pylist()
    sample = torch.randperm(len(seq), generator=torch.Generator().manual_seed(1))[:64]
    for m, name in enumerate(["toy-base", "toy-code"]):
        model = AutoModelForCausalLM.from_pretrained(toy_dirs[name], attn_implementation="eager").eval()
        for h, layer in enumerate([1, 2]):  # blocks.L.hook_resid_post == hidden_states[L + 1]
            for r in sample.tolist():
                with torch.no_grad():
                    out = model(torch.tensor([ids[seq[r]]]), output_hidden_states=True)
                ref = out.hidden_states[layer + 1][0, pos[r]]
                got = raw[r, m, h]
                # bf16 keeps 8 bits of mantissa: relative error per element <= 2^-8 of its magnitude.
                torch.testing.assert_close(got, ref, rtol=2**-7, atol=2**-7 * ref.abs().max().item())
            # And the other model's activation differs (the rows are not one model twice).
        assert not torch.allclose(raw[sample, 0], raw[sample, 1], atol=1e-3)


@pytest.mark.parametrize("method", ["mean_std", "none"])
def test_other_normalizations(toy_dirs, tmp_path, method):
    out = tmp_path / method
    harvest(small_harvest_config(out, models=["toy-base"], hooks=["blocks.2.hook_resid_post"], tokens=3000,
                                 normalize=method, dtype="float32", calibration_tokens=3000))
    cache, acts, *_ = _all_rows(out)
    if method == "mean_std":
        assert (out / "normalization.safetensors").is_file()
        assert acts.mean(0).abs().max() < 1e-3 and (acts.std(0, unbiased=False) - 1).abs().max() < 1e-3
    else:
        assert cache.manifest.normalization["scale"] == [[1.0]]
        assert not torch.allclose(acts.norm(dim=-1).mean(), torch.tensor(128**0.5), rtol=0.05)


def test_rerun_of_a_finished_harvest_changes_nothing(toy_cache):
    before = (toy_cache / "manifest.json").read_bytes()
    m = harvest(Manifest_config(toy_cache))
    assert m.complete and (toy_cache / "manifest.json").read_bytes() == before


def Manifest_config(cache_dir):
    """The HarvestConfig a cache was made with, from its manifest."""
    from harvest.config import HarvestConfig

    cfg = Manifest.load(cache_dir).extra["harvest"]["config"]
    return HarvestConfig(**cfg)


def test_forward_stops_after_the_last_harvested_block(toy_dirs, tmp_path, monkeypatch):
    from harvest.models import stop_layer_for

    assert stop_layer_for(["blocks.1.hook_resid_post"], 4) == 2
    assert stop_layer_for(["blocks.0.hook_mlp_out", "blocks.2.hook_resid_pre"], 4) == 3
    assert stop_layer_for(["blocks.3.hook_resid_post"], 4) == 4
    assert stop_layer_for(["ln_final.hook_normalized"], 4) is None
    from transformer_lens.model_bridge import TransformerBridge

    seen, fired = [], []
    real = TransformerBridge.forward

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("stop_at_layer"))
        # Would block 2 run? Listen on its output: it must never fire.
        handle = self.hook_dict["blocks.2.hook_resid_post"].register_forward_hook(lambda *a: fired.append(1))
        try:
            return real(self, *args, **kwargs)
        finally:
            handle.remove()

    monkeypatch.setattr(TransformerBridge, "forward", spy)
    harvest(small_harvest_config(tmp_path / "c", hooks=["blocks.1.hook_resid_post"], tokens=500))
    # Data batches and the load-time probe pass stop_at_layer=2; block 2 never runs in either.
    assert 2 in seen and {s for s in seen if s is not None} == {2} and not fired


def test_every_forward_batch_runs_once(tmp_path, monkeypatch):
    """The batch that holds the end of the calibration rows is not forwarded a second time."""
    from harvest import harvester

    calls = {"n": 0}
    real_load = harvester.load_models

    def counting_load(*args, **kwargs):
        loaded = real_load(*args, **kwargs)
        for bridge in loaded.bridges:
            forward = bridge.forward

            def counted(*a, _forward=forward, **kw):
                calls["n"] += 1
                return _forward(*a, **kw)

            bridge.forward = counted
        return loaded

    monkeypatch.setattr(harvester, "load_models", counting_load)
    # 63 rows per sequence, 16 sequences per batch: 1100 calibration rows end inside the second batch.
    cfg = small_harvest_config(tmp_path / "c", tokens=3000, calibration_tokens=1100, hooks=["blocks.1.hook_resid_post"])
    man = harvest(cfg)
    n_batches = -(-man.extra["n_sequences"] // cfg.batch_size)
    assert n_batches >= 3 and calls["n"] == len(cfg.models) * n_batches
    assert man.n_rows == 3000 and man.normalization["calibration_rows"] == 1100


def test_grouped_batches_write_the_same_cache(toy_dirs, tmp_path, monkeypatch):
    """Rows are taken per group of forward batches (``capture_group_tokens``, and a cap on the bytes
    held): any grouping writes the same shards, and larger groups hand the writer fewer pieces."""
    from harvest import harvester
    from harvest.writer import ShardWriter

    pieces: list[int] = []
    real_put = ShardWriter.put_rows

    def counted_put(self, first_row, acts_NMPD, *rest):
        pieces.append(acts_NMPD.shape[0])
        return real_put(self, first_row, acts_NMPD, *rest)

    monkeypatch.setattr(ShardWriter, "put_rows", counted_put)
    runs = {}
    # 16 sequences of 64 tokens a batch (1008 rows); calibration forwards batches 0-1 (2016 rows),
    # the rest batches 2-5. A 2500-token group holds 3 batches and crosses chunks of 1024 rows.
    for name, group_tokens, bytes_cap in [("alone", 1, None), ("three", 2500, None), ("default", 32_768, None),
                                          ("bytes-capped", 32_768, 1)]:
        if bytes_cap is not None:
            monkeypatch.setattr(harvester, "CAPTURE_GROUP_BYTES", bytes_cap)
        pieces.clear()
        man = harvest(small_harvest_config(tmp_path / name, capture_group_tokens=group_tokens))
        comparable = comparable_manifest(tmp_path / name / "manifest.json")
        assert comparable["harvest"]["config"].pop("capture_group_tokens") == group_tokens
        runs[name] = ([s.sha256 for s in man.shards], comparable, list(pieces))
    shards, manifest, _ = runs["alone"]
    assert len(shards) > 8
    for name, (other_shards, other_manifest, _) in runs.items():
        assert (other_shards, other_manifest) == (shards, manifest), name
    assert [len(runs[k][2]) for k in ("alone", "three", "default", "bytes-capped")] == [6, 1 + 2, 1 + 1, 6]
    assert all(sum(runs[k][2]) == 6000 for k in runs) and max(runs["alone"][2]) <= 1008


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_harvest_matches_cpu(toy_cache, tmp_path):
    """The CUDA path (rows copied to pinned memory on a side stream, several write threads) stores
    the same rows as the CPU harvest, to within the storage dtype and the devices' arithmetic."""
    man = harvest(small_harvest_config(tmp_path / "cuda", device="cuda", write_threads=3))
    assert man.created_by["last_run"]["device"].startswith("cuda") and verify_cache(tmp_path / "cuda").ok
    _, ref, ref_seq, ref_pos, _ = _all_rows(toy_cache)
    _, acts, seq, pos, _ = _all_rows(tmp_path / "cuda")
    assert torch.equal(seq, ref_seq) and torch.equal(pos, ref_pos)  # the same rows in the same places
    err = (acts.float() - ref.float()).norm(dim=-1) / ref.float().norm(dim=-1)
    assert err.max() < 0.03, err.max()
