"""Stage 2 trainer: known answers (planted dictionary), every architecture, resume, signals, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, small_harvest_config
from planted import make_planted_cache, recovery
from shared.cache import open_cache
from train.config import TrainConfig
from train.export import load_dictionary
from train.metrics import TIMING_KEYS, read_metrics
from train.slots import SlotError
from train.trainer import NonFiniteLossError, RunMismatchError, train


def _cfg(cache, out, **kw) -> TrainConfig:
    args = dict(cache=str(cache), out=str(out), latents=64, steps=40, batch_size=256, lr=3e-3, log_every=10,
                checkpoint_every=1000, progress=False, device="cpu")
    args.update(kw)
    return TrainConfig(**args)


@pytest.fixture(scope="module")
def planted_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("planted") / "cache"
    return path, make_planted_cache(path)


# ---- known answers ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("activation,extra", [("relu", {}), ("jumprelu", {}), ("topk", {"k": 3}),
                                              ("batchtopk", {"k": 3})])
def test_planted_dictionary_is_recovered(planted_cache, tmp_path, activation, extra):
    """Rows are sparse sums of known atoms: shared, A-only and B-only (tests/planted.py)."""
    cache, planted = planted_cache
    steps = 800 if activation != "batchtopk" else 1000
    train(_cfg(cache, tmp_path / activation, activation=activation, steps=steps, batch_size=512, **extra))
    model = load_dictionary(tmp_path / activation / "dictionary")
    best, which = recovery(model.decoder_weight().detach(), planted)
    assert (best >= 0.9).float().mean() >= 0.9, best
    norms_LX = model.decoder_norms().detach()
    r = norms_LX[:, 1] / norms_LX.sum(dim=1)  # relative decoder norm of model B (the "fine-tune")
    for i, kind in enumerate(planted.kind):
        if best[i] < 0.9:
            continue
        ri = r[which[i]].item()
        if kind == "A":
            assert ri < 0.2, (i, kind, ri)
        elif kind == "B":
            assert ri > 0.8, (i, kind, ri)
        else:
            assert 0.2 < ri < 0.8, (i, kind, ri)


@pytest.fixture(scope="module")
def clt_cache(toy_dirs, tmp_path_factory):
    from harvest.harvester import harvest

    out = tmp_path_factory.mktemp("clt") / "cache"
    harvest(small_harvest_config(out, models=["toy-base"], tokens=3000, hooks=[
        "blocks.0.hook_mlp_in", "blocks.0.hook_mlp_out", "blocks.1.hook_mlp_in", "blocks.1.hook_mlp_out"]))
    return out


ARCHS = {
    "crosscoder": {},
    "directional": {"in_hooks": ["blocks.1.hook_resid_post"], "out_hooks": ["blocks.2.hook_resid_post"], "skip": True},
    "clt": {"models": ["toy-base"], "in_hooks": ["blocks.0.hook_mlp_in", "blocks.1.hook_mlp_in"],
            "out_hooks": ["blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out"], "skip": True},
}


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("activation,extra", [("relu", {}), ("jumprelu", {}), ("topk", {"k": 8}),
                                              ("batchtopk", {"k": 8})])
def test_every_architecture_trains_on_the_toy_pair(toy_cache, clt_cache, tmp_path, arch, activation, extra):
    cache = clt_cache if arch == "clt" else toy_cache
    res = train(_cfg(cache, tmp_path / "run", arch=arch, activation=activation, steps=60, log_every=5,
                     **ARCHS[arch], **extra))
    rows = [r for r in read_metrics(tmp_path / "run") if "loss/recon" in r]
    assert rows[-1]["loss/recon"] < 0.7 * rows[0]["loss/recon"], [r["loss/recon"] for r in rows]
    assert rows[-1]["ev/overall"] > rows[0]["ev/overall"]
    assert res.eval_metrics["eval/ev/overall"] > 0.3
    for f in ["config.json", "metrics.jsonl", "curves.png", "export/model.safetensors", "dictionary/config.json"]:
        assert (tmp_path / "run" / f).exists(), f


def test_export_runs_on_raw_activations(toy_cache, tmp_path):
    train(_cfg(toy_cache, tmp_path / "run", activation="batchtopk", k=8, steps=30))
    trained = load_dictionary(tmp_path / "run" / "dictionary")
    exported = load_dictionary(tmp_path / "run" / "export")
    cache = open_cache(toy_cache)
    acts = cache.shard(0).acts[:200].float()
    raw = cache.normalization().undo(acts)
    x_norm, x_raw = acts.flatten(1, 2), raw.flatten(1, 2)
    with torch.no_grad():
        a, b = trained(x_norm, inference=True), exported(x_raw, inference=True)
    torch.testing.assert_close(a.latents_BL, b.latents_BL, rtol=1e-4, atol=1e-4)
    scale = cache.normalization().scale_MP.flatten()[None, :, None]
    torch.testing.assert_close(a.recon_BXoD / scale, b.recon_BXoD, rtol=1e-4, atol=1e-3)


def test_export_keeps_this_machines_home_folder_out(toy_cache, tmp_path, monkeypatch):
    """export/ is the folder researchers hand on: the cache and run paths under the home folder are
    written ~/..., as push publishes a manifest; dictionary/ and the run's config keep them."""
    import json
    import shutil

    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    cache = home / "caches" / "diff"
    shutil.copytree(toy_cache, cache)
    run = home / "runs" / "r"
    train(_cfg(cache, run, steps=4))
    exported = (run / "export" / "config.json").read_text()
    assert str(home) not in exported
    meta = json.loads(exported)["metadata"]
    assert meta["cache"] == "~/caches/diff" and meta["train_config"]["out"] == "~/runs/r"
    assert str(cache) in (run / "dictionary" / "config.json").read_text()
    assert str(cache) in (run / "config.json").read_text()
    load_dictionary(run / "export")  # the weights' checksum still matches


def test_eval_metrics_are_pooled_over_rows_whatever_the_batch_sizes(toy_cache, tmp_path):
    """Eval EV and L0 are those of all eval rows together: a short last batch (here one row, whose
    own EV was -1e14) weighs what its rows weigh. Checked against a recomputation from the shards."""
    from train.loader import default_eval_shards
    from train.metrics import ReconStats, batch_metrics

    cache = open_cache(toy_cache)
    eval_ids = range(cache.n_shards - default_eval_shards(cache.n_shards), cache.n_shards)
    rows = torch.cat([cache.shard(i).acts.float() for i in eval_ids]).flatten(1, 2)  # [N, X, D], normalized
    run = tmp_path / "run"
    result = train(_cfg(toy_cache, run, batch_size=rows.shape[0] - 1, steps=3, eval_batches=2))
    model = load_dictionary(run / "dictionary").eval()
    with torch.no_grad():
        out = model(rows, inference=True)
    err, var = (rows - out.recon_BXoD).pow(2).sum(), (rows - rows.mean(0)).pow(2).sum()
    assert result.eval_metrics["eval/ev/overall"] == pytest.approx((1 - err / var).item(), abs=1e-4)
    assert result.eval_metrics["eval/l0/mean"] == pytest.approx((out.latents_BL > 0).sum(1).float().mean().item(),
                                                                abs=1e-3)
    # The pieces: any split of the rows gives the figures of the whole; one row alone has no EV.
    whole, parts = ReconStats(["a", "b"]), ReconStats(["a", "b"])
    l0_N = (out.latents_BL > 0).sum(1)
    whole.update(l0_N, rows, out.recon_BXoD)
    for sl in (slice(0, 1), slice(1, 100), slice(100, None)):
        parts.update(l0_N[sl], rows[sl], out.recon_BXoD[sl])
    for key, value in whole.metrics().items():
        assert parts.metrics()[key] == pytest.approx(value, rel=1e-9), key
    one = batch_metrics(out.latents_BL[:1], rows[:1], out.recon_BXoD[:1], ["a", "b"])
    assert one["ev/overall"] is None and one["ev/a"] is None and one["l0/mean"] > 0


# ---- crash, signals, resume ------------------------------------------------------------------

RESUME_ARGS = ["--activation", "batchtopk", "--k", "8", "--latents", "128", "--steps", "300", "--batch-size", "128",
               "--lr", "3e-3", "--log-every", "10", "--checkpoint-every", "20", "--keep-checkpoints", "3",
               "--device", "cpu", "--no-progress", "--dead-tokens", "2000"]


def _train_cli(args, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(ROOT / "run_train.py"), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _comparable(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_metrics(run)]


def _wait_for_checkpoint(run: Path, proc, min_step: int) -> None:
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        ck = sorted((run / "checkpoints").glob("step-*")) if (run / "checkpoints").exists() else []
        if ck and int(ck[-1].name.split("-")[1]) >= min_step:
            return
        time.sleep(0.01)
    raise AssertionError(f"no checkpoint >= {min_step} before the run ended: {proc.communicate()}")


@pytest.fixture(scope="module")
def reference_run(toy_cache, tmp_path_factory):
    run = tmp_path_factory.mktemp("ref") / "run"
    proc = _train_cli([*RESUME_ARGS, "--cache", str(toy_cache), "--out", str(run)])
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return run


@pytest.mark.slow
def test_resume_after_kill_9_reproduces_the_metrics(toy_cache, reference_run, tmp_path):
    run = tmp_path / "run"
    proc = _train_cli([*RESUME_ARGS, "--cache", str(toy_cache), "--out", str(run)])
    _wait_for_checkpoint(run, proc, 60)
    proc.kill()
    proc.communicate()
    assert not (run / "export").exists()
    proc = _train_cli([*RESUME_ARGS, "--cache", str(toy_cache), "--out", str(run)])
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert "resuming" in out
    assert _comparable(run) == _comparable(reference_run)
    a, b = load_dictionary(run / "export"), load_dictionary(reference_run / "export")
    for (k, v), (k2, v2) in zip(a.state_dict().items(), b.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    assert len(list((run / "checkpoints").glob("step-*"))) == 3  # keep the last K


@pytest.mark.slow
def test_sigterm_checkpoints_and_resumes(toy_cache, reference_run, tmp_path):
    run = tmp_path / "run"
    proc = _train_cli([*RESUME_ARGS, "--cache", str(toy_cache), "--out", str(run)])
    _wait_for_checkpoint(run, proc, 20)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err)
    assert "checkpoint saved" in err
    step = json.loads(sorted((run / "checkpoints").glob("step-*"))[-1].joinpath("state.json").read_text())["step"]
    assert step < 300
    proc = _train_cli([*RESUME_ARGS, "--cache", str(toy_cache), "--out", str(run)])
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert _comparable(run) == _comparable(reference_run)


# ---- bad input -----------------------------------------------------------------------------------


def test_bad_input_errors(toy_cache, tmp_path):
    with pytest.raises(SlotError, match=r"hook \['blocks\.9\.hook_resid_post'\] not in cache"):
        train(_cfg(toy_cache, tmp_path / "a", hooks=["blocks.9.hook_resid_post"]))
    with pytest.raises(SlotError, match=r"did you mean 'blocks\.2\.hook_resid_post' for 'blocks\.2\.hook_resid_pos'\? "
                                        r"It holds hooks"):
        train(_cfg(toy_cache, tmp_path / "a", hooks=["blocks.2.hook_resid_pos"]))
    with pytest.raises(SlotError, match=r"model \['toy-prose'\] not in cache .* holds models \['toy-base', 'toy-code'\]"):
        train(_cfg(toy_cache, tmp_path / "b", models=["toy-prose"]))
    with pytest.raises(SlotError, match="a cross-layer transcoder reads one model"):
        train(_cfg(toy_cache, tmp_path / "c", arch="clt", in_hooks=["blocks.1.hook_resid_post"],
                   out_hooks=["blocks.2.hook_resid_post"]))
    with pytest.raises(SlotError, match="one input and one output hook per layer"):
        train(_cfg(toy_cache, tmp_path / "d", arch="clt", models=["toy-base"], in_hooks=["blocks.1.hook_resid_post"],
                   out_hooks=["blocks.2.hook_resid_post"]))
    with pytest.raises(ValueError, match=r"k must be in \[1, latents=64\)"):
        _cfg(toy_cache, tmp_path / "e", activation="topk", k=64)
    with pytest.raises(ValueError, match="needs --k"):
        _cfg(toy_cache, tmp_path / "e", activation="batchtopk")
    with pytest.raises(ValueError, match="sparsity_coeff must be a finite number >= 0"):
        _cfg(toy_cache, tmp_path / "e", sparsity_coeff=-1.0)
    with pytest.raises(ValueError, match="aux_k_coeff must be"):
        _cfg(toy_cache, tmp_path / "e", aux_k_coeff=-0.1)
    with pytest.raises(ValueError, match="--arch directional needs --in-hooks and --out-hooks"):
        _cfg(toy_cache, tmp_path / "e", arch="directional")
    for frac in ("sparsity_warmup_frac", "warmup_frac", "decay_frac"):
        with pytest.raises(ValueError, match=rf"{frac} is a fraction of the steps: it must lie in \[0, 1\], got 5"):
            _cfg(toy_cache, tmp_path / "e", **{frac: 5})
    for timeout in (0, -1.0):
        with pytest.raises(ValueError, match=r"dist_timeout must be a finite number > 0, got -?[01]"):
            _cfg(toy_cache, tmp_path / "e", dist_timeout=timeout)


def test_resumed_run_refuses_another_width_or_config(tmp_path):
    from cache_factory import make_cache

    make_cache(tmp_path / "c16", d_model=16)
    make_cache(tmp_path / "c32", d_model=32)
    train(_cfg(tmp_path / "c16", tmp_path / "run", steps=5))
    with pytest.raises(RunMismatchError, match="d_model=16 .* d_model=32"):
        train(_cfg(tmp_path / "c32", tmp_path / "run", steps=5))
    with pytest.raises(RunMismatchError, match="holds a different run .*latents: 64 there vs 32 now"):
        train(_cfg(tmp_path / "c16", tmp_path / "run", steps=5, latents=32))
    # A default given by value is the same run (audit helper-45: these three were refused as different runs).
    cfg = _cfg(tmp_path / "c16", tmp_path / "run", steps=5)
    same = {"dec_init_norm": 1.0 if cfg.activation in ("topk", "batchtopk") else 0.1, "k_aux": 16 // 2,
            "dead_tokens": cfg.resolved_dead_tokens(1)}
    for field, value in same.items():
        train(_cfg(tmp_path / "c16", tmp_path / "run", steps=5, **{field: value}))
    with pytest.raises(RunMismatchError, match="dec_init_norm: 0.1 there vs 0.2 now"):
        train(_cfg(tmp_path / "c16", tmp_path / "run", steps=5, dec_init_norm=0.2))


def test_resume_of_an_hf_run_after_the_repo_moved_names_the_commit(tmp_path):
    """An hf:// cache without @REV follows its branch. Once a new push lands there, the run's loader
    state no longer fits: the refusal names both commits and the pin that resumes, which works."""
    from cache_factory import make_cache

    from shared.cache_format import Manifest
    from train.run_dir import check_run_dir
    from train.slots import resolve_slots

    old, new = "a" * 40, "b" * 40
    for commit in (old, new):
        make_cache(tmp_path / "snapshots" / commit, d_model=16)
    cache = tmp_path / "snapshots" / old
    train(_cfg(cache, tmp_path / "run", steps=5))
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    saved["config"]["cache"] = "hf://alice/c"  # as if trained from the Hub: the folder is its snapshot
    (tmp_path / "run" / "config.json").write_text(json.dumps(saved))
    man = Manifest.load(cache)
    spec = resolve_slots(man, arch="crosscoder", models=None, hooks=None, in_hooks=None, out_hooks=None)

    def check(spec_now: str, resolved: Path) -> bool:
        cfg = _cfg(spec_now, tmp_path / "run", steps=5)
        return check_run_dir(cfg, tmp_path / "run", man.d_model, spec, len(man.shards), resolved)

    assert check("hf://alice/c", cache)  # the same commit: resumes
    with pytest.raises(RunMismatchError, match=f"at commit {old[:12]}; hf://alice/c resolves to commit {new[:12]} "
                                               f"now .* Resume with --cache hf://alice/c@{old}"):
        check("hf://alice/c", tmp_path / "snapshots" / new)
    assert check(f"hf://alice/c@{old[:10]}", cache)  # the pin it suggests (or a prefix) is the same run
    with pytest.raises(RunMismatchError, match=f"hf://alice/c@{new} resolves to commit {new[:12]}"):
        check(f"hf://alice/c@{new}", tmp_path / "snapshots" / new)


def test_non_finite_loss_stops_with_a_checkpoint(tmp_path):
    from shared.cache import CacheWriter
    from shared.cache_format import Manifest, shard_file_name
    from shared.token_table import write_token_table

    m = Manifest(models=[{"name": "a"}], hooks=["h"], d_model=8, dtype="float32", context_size=2, n_rows=0,
                 shards=[], normalization={"method": "none", "scale": [[1.0]], "file": None},
                 excluded_tokens={}, dataset={}, tokenizer={}, created_by={}, complete=False)
    w = CacheWriter(tmp_path / "cache", m)
    x = torch.randn(512, 1, 1, 8)
    x[300, 0, 0, 0] = 1e30  # squares overflow float32
    w.add_shard(shard_file_name(0), x, torch.arange(512), torch.ones(512), torch.ones(512))
    write_token_table(tmp_path / "cache", [[0, 1]] * 512)
    w.finish()
    with pytest.raises(NonFiniteLossError, match=r"loss term\(s\) \[.recon., .*\] of .* became non-finite at step \d+"):
        train(_cfg(tmp_path / "cache", tmp_path / "run", steps=20, batch_size=64, eval_shards=0, latents=16))
    assert list((tmp_path / "run" / "checkpoints").glob("step-*"))


def test_cli_config_file_and_wandb_offline(toy_cache, tmp_path):
    """A config file with flags over it, and wandb (offline) logging neither the API key nor this
    machine: no home folder (the cache is under it), host name or command line in what it would upload."""
    import shutil
    import socket

    home = tmp_path / "home"
    cache = home / "caches" / "toy"
    shutil.copytree(toy_cache, cache)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"cache: {cache}\nlatents: 32\nsteps: 10\nbatch-size: 128\nlog_every: 5\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), WANDB_MODE="offline", WANDB_API_KEY="secret-key-never-logged",
               HOME=str(home))
    res = subprocess.run([sys.executable, str(ROOT / "run_train.py"), "--config", str(cfg), "--out", str(tmp_path / "r"),
                          "--steps", "8", "--wandb-project", "crosscache-test", "--no-progress"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    saved = json.loads((tmp_path / "r" / "config.json").read_text())["config"]
    assert saved["steps"] == 8 and saved["latents"] == 32 and saved["batch_size"] == 128
    assert list((tmp_path / "r" / "wandb").glob("offline-run-*"))
    for f in (tmp_path / "r").rglob("*"):
        if f.is_file() and f.stat().st_size < 5_000_000:
            assert b"secret-key-never-logged" not in f.read_bytes(), f
    host = socket.gethostname().encode()
    uploaded = [f for f in (tmp_path / "r" / "wandb").rglob("*") if f.is_file() and "logs" not in f.parts]
    assert any(f.suffix == ".wandb" for f in uploaded)
    for f in uploaded:
        data = f.read_bytes()
        assert str(home).encode() not in data and b"run_train.py" not in data, f
        assert len(host) < 3 or host not in data, f
    assert b"~/caches/toy" in next(f for f in uploaded if f.suffix == ".wandb").read_bytes()  # the config, redacted
    bad = subprocess.run([sys.executable, str(ROOT / "run_train.py"), "--cache", str(tmp_path / "nope")],
                         env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "error:" in bad.stderr and "Traceback" not in bad.stderr
