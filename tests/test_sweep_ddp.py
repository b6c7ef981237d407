"""Many dictionaries from one stream (sweeps) and DDP training under torchrun (gloo, 2 processes)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from shared.cache import open_cache
from train.config import TrainConfig
from train.export import load_dictionary
from train.metrics import TIMING_KEYS, read_metrics
from train.sweep import expand_sweep
from train.trainer import SweepError, train, train_many


def _cfg(cache, out, **kw) -> TrainConfig:
    args = dict(cache=str(cache), out=str(out), latents=64, steps=30, batch_size=128, lr=3e-3, log_every=5,
                checkpoint_every=10, progress=False, device="cpu")
    args.update(kw)
    return TrainConfig(**args)


def _metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_metrics(run)]


def test_sweep_file_expands_grid_and_members(tmp_path):
    f = tmp_path / "sweep.yaml"
    f.write_text("grid:\n  activation: [relu, topk]\n  latents: [32, 64]\nmembers:\n  - {}\n  - {lr: 0.01, name: fast}\n")
    base = _cfg(tmp_path / "c", tmp_path / "sweep", k=None)
    with pytest.raises(ValueError, match="needs --k"):
        expand_sweep(f, base)
    f.write_text("grid:\n  latents: [32, 64]\nmembers:\n  - {activation: relu}\n  - {activation: topk, k: 8}\n")
    cfgs = expand_sweep(f, base)
    assert [Path(c.out).name for c in cfgs] == ["activation-relu_latents-32", "activation-relu_latents-64",
                                                "activation-topk_k-8_latents-32", "activation-topk_k-8_latents-64"]
    assert {(c.activation, c.latents, c.k) for c in cfgs} == {("relu", 32, None), ("relu", 64, None),
                                                             ("topk", 32, 8), ("topk", 64, 8)}
    f.write_text("members:\n  - {latentz: 3}\n")
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['latentz'\]"):
        expand_sweep(f, base)
    # YAML 1.1 reads 1e-4 as a string: a learning-rate grid still gives float configs.
    f.write_text("grid:\n  lr: [1e-4, 3e-4]\n")
    assert [c.lr for c in expand_sweep(f, base)] == [1e-4, 3e-4]


def test_named_member_crossed_with_a_grid_gets_a_folder_per_point(tmp_path):
    """The README's sweep example: a named member crossed with a 2x2 grid is four runs."""
    f = tmp_path / "sweep.yaml"
    f.write_text("grid:\n  activation: [relu, jumprelu]\n  latents: [2048, 4096]\n"
                 "members:\n  - {}\n  - {lr: 3.0e-4, name: slow}\n")
    cfgs = expand_sweep(f, _cfg(tmp_path / "c", tmp_path / "sweep", k=None))
    points = ["activation-relu_latents-2048", "activation-relu_latents-4096", "activation-jumprelu_latents-2048",
              "activation-jumprelu_latents-4096"]
    assert [Path(c.out).name for c in cfgs] == points + [f"slow_{p}" for p in points]
    assert [c.lr for c in cfgs[4:]] == [3.0e-4] * 4 and cfgs[5].activation == "relu" and cfgs[5].latents == 4096
    f.write_text("grid:\n  latents: [2048]\nmembers:\n  - {lr: 3.0e-4, name: slow}\n")  # one point: the name as given
    assert [Path(c.out).name for c in expand_sweep(f, _cfg(tmp_path / "c", tmp_path / "sweep", k=None))] == ["slow"]


def test_sweep_members_equal_their_single_runs(toy_cache, tmp_path):
    """Each member of a sweep ends exactly where it would have trained alone (same stream)."""
    base = _cfg(toy_cache, tmp_path / "sweep")
    members = [
        dataclasses.replace(base, out=str(tmp_path / "sweep" / "a"), activation="batchtopk", k=8),
        dataclasses.replace(base, out=str(tmp_path / "sweep" / "b"), activation="relu", latents=32,
                            hooks=["blocks.2.hook_resid_post"]),
        dataclasses.replace(base, out=str(tmp_path / "sweep" / "c"), arch="directional", skip=True,
                            in_hooks=["blocks.1.hook_resid_post"], out_hooks=["blocks.2.hook_resid_post"]),
    ]
    train_many(members)
    for m in members:
        alone = dataclasses.replace(m, out=str(tmp_path / "alone" / Path(m.out).name))
        train(alone)
        assert _metrics(Path(m.out)) == _metrics(Path(alone.out))
        a, b = load_dictionary(Path(m.out) / "export"), load_dictionary(Path(alone.out) / "export")
        for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items()):
            torch.testing.assert_close(v, w, rtol=0, atol=0, msg=k)


def test_sweep_resume_continues_every_member(toy_cache, tmp_path):
    base = _cfg(toy_cache, tmp_path / "sweep")
    members = [dataclasses.replace(base, out=str(tmp_path / "sweep" / n), latents=lat) for n, lat in (("a", 32), ("b", 64))]
    train_many(members)
    ref = {m.out: _metrics(Path(m.out)) for m in members}
    # Simulate a crash after step 20: drop the final checkpoint and exports of both members.
    for m in members:
        shutil.rmtree(Path(m.out) / "checkpoints" / "step-0000030")
        shutil.rmtree(Path(m.out) / "export")
    # ... and one member lost its step-20 checkpoint too (killed while saving): resume from 10.
    shutil.rmtree(Path(members[1].out) / "checkpoints" / "step-0000020")
    train_many(members)
    for m in members:
        assert _metrics(Path(m.out)) == ref[m.out]


def _two_schedules(toy_cache: Path, root: Path, steps: int, **kw) -> list[TrainConfig]:
    """A sweep of two members checkpointing every 10 and every 25 steps."""
    base = _cfg(toy_cache, root, steps=steps, log_every=10, **kw)
    return [dataclasses.replace(base, out=str(root / "a"), checkpoint_every=10),
            dataclasses.replace(base, out=str(root / "b"), checkpoint_every=25, latents=32)]


def _crash_after_checkpoint(monkeypatch, members: list[TrainConfig], step: int) -> None:
    """Train ``members`` until member a has just saved (and pruned to) ``step``, then crash there."""
    import train.trainer as trainer
    from train.checkpoint import checkpoint_steps

    real_prune = trainer.prune_checkpoints

    def prune_then_crash(run_dir, keep, protect=()):
        real_prune(run_dir, keep, protect)
        if Path(run_dir).name == "a" and checkpoint_steps(run_dir)[-1] == step:
            raise RuntimeError(f"simulated crash right after a's step-{step} checkpoint")

    with monkeypatch.context() as patch:
        patch.setattr(trainer, "prune_checkpoints", prune_then_crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            train_many(members)


def test_sweep_members_checkpoint_on_their_own_schedules_and_stay_resumable(toy_cache, tmp_path, monkeypatch):
    """Each member's --checkpoint-every is its own. A resume needs a step every member holds, so
    pruning keeps the newest such step even past --keep-checkpoints."""
    from train.checkpoint import checkpoint_steps

    ref = _two_schedules(toy_cache, tmp_path / "ref", 70, keep_checkpoints=1)
    train_many(ref)
    members = _two_schedules(toy_cache, tmp_path / "run", 70, keep_checkpoints=1)
    _crash_after_checkpoint(monkeypatch, members, 60)
    # a saved 10, 20, ... and keeps its newest; b saved 25 and 50. 50 is the newest step both hold.
    assert checkpoint_steps(members[0].out) == [50, 60]
    assert checkpoint_steps(members[1].out) == [50]
    train_many(members)
    for m, r in zip(members, ref):
        assert _metrics(Path(m.out)) == _metrics(Path(r.out))


def test_a_sweep_with_no_common_checkpoint_says_it_starts_again(toy_cache, tmp_path, monkeypatch, capsys):
    """Killed before its members shared a checkpoint step, a sweep can only start again: it says so
    (it used to, silently) and reproduces the uninterrupted result."""
    ref = _two_schedules(toy_cache, tmp_path / "ref", 30)
    train_many(ref)
    members = _two_schedules(toy_cache, tmp_path / "run", 30)
    _crash_after_checkpoint(monkeypatch, members, 20)  # b's first checkpoint would be at 25
    capsys.readouterr()
    train_many(members)
    err = capsys.readouterr().err
    assert "no checkpoint step is held by every member" in err and "steps [10, 20]" in err and ": none" in err
    for m, r in zip(members, ref):
        assert _metrics(Path(m.out)) == _metrics(Path(r.out))


def test_a_member_added_then_removed_leaves_no_gap(toy_cache, tmp_path, monkeypatch):
    """A member added to a sweep restarts every member from step 0 and drops their metrics lines, but their
    older checkpoints (a higher step) outlived the restart: with the member removed again, the next run
    resumed from them, and the metrics lines between were gone."""
    from train.checkpoint import checkpoint_steps

    ref = _two_schedules(toy_cache, tmp_path / "ref", 60, keep_checkpoints=5)
    train_many(ref)
    members = _two_schedules(toy_cache, tmp_path / "run", 60, keep_checkpoints=5)
    _crash_after_checkpoint(monkeypatch, members, 50)
    added = dataclasses.replace(members[0], out=str(tmp_path / "run" / "c"), latents=48)
    _crash_after_checkpoint(monkeypatch, [members[0], added, members[1]], 20)  # the restart, stopped at 20
    assert max(checkpoint_steps(members[0].out)) == 20
    train_many(members)
    for m, r in zip(members, ref):
        assert _metrics(Path(m.out)) == _metrics(Path(r.out))
        assert [s["step"] for s in read_metrics(m.out) if "loss/total" in s] == list(range(10, 61, 10))


def test_sweep_members_share_a_stream_when_defaults_resolve_alike(toy_cache, tmp_path):
    """eval_shards left out in one member and given as its default in the other, or device auto and
    the device it picks, is one stream: not refused as different (it was, comparing the flags as written)."""
    from train.loader import default_eval_shards

    n = default_eval_shards(open_cache(toy_cache).n_shards)
    base = _cfg(toy_cache, tmp_path, steps=2, log_every=1)
    cfgs = [dataclasses.replace(base, out=str(tmp_path / "a"), device="auto"),
            dataclasses.replace(base, out=str(tmp_path / "b"), eval_shards=n, device="cpu")]
    assert [r.steps for r in train_many(cfgs)] == [2, 2]
    with pytest.raises(SweepError, match="eval_shards"):
        train_many([dataclasses.replace(c, out=str(tmp_path / "x" / str(i)), eval_shards=i + 1)
                    for i, c in enumerate(cfgs)])


def test_sweep_bad_members_fail_before_training(toy_cache, tmp_path):
    base = _cfg(toy_cache, tmp_path / "s")
    with pytest.raises(SweepError, match="cannot share member 0's loader stream: batch_size: 128 vs 64"):
        train_many([base, dataclasses.replace(base, out=str(tmp_path / "s2"), batch_size=64)])
    with pytest.raises(SweepError, match="cache: "):
        train_many([base, dataclasses.replace(base, out=str(tmp_path / "s2"), cache=str(tmp_path))])
    with pytest.raises(SweepError, match="distinct --out"):
        train_many([base, dataclasses.replace(base, latents=32)])
    with pytest.raises(SweepError, match=r"sweep member 1 \(.*s2\): progress: False vs True in member 0: one progress "
                                         r"bar shows the whole sweep; give every member the same progress"):
        train_many([base, dataclasses.replace(base, out=str(tmp_path / "s2"), progress=True)])
    from train.slots import SlotError

    with pytest.raises(SlotError, match="not in cache"):
        train_many([base, dataclasses.replace(base, out=str(tmp_path / "s3"), hooks=["blocks.7.hook_resid_post"])])
    assert not (tmp_path / "s" / "checkpoints").exists()


def _torchrun(args: list[str], nproc: int, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                           "--standalone", str(ROOT / "run_train.py"), *args],
                          env=env, capture_output=True, text=True, timeout=timeout)


DDP_COMMON = ["--latents", "64", "--steps", "6", "--log-every", "1", "--lr", "1e-3", "--checkpoint-every", "3",
              "--device", "cpu", "--no-progress", "--eval-shards", "2"]
ACTIVATION_ARGS = {"topk": ["--activation", "topk", "--k", "8"], "jumprelu": ["--activation", "jumprelu"]}
DDP_ARGS = [*DDP_COMMON, *ACTIVATION_ARGS["topk"]]


@pytest.mark.slow
@pytest.mark.parametrize("activation", ["topk", "jumprelu"])
def test_ddp_two_processes_match_one_process_with_the_same_global_batch(toy_cache, tmp_path, activation):
    """README: N ranks x batch B == one process x N*B, weights and eval lines. JumpReLU's
    data-dependent bias init and every eval score the global batch's rows, not one rank's."""
    args = [*DDP_COMMON, *ACTIVATION_ARGS[activation], "--eval-every", "3"]
    one = subprocess.run([sys.executable, str(ROOT / "run_train.py"), "--cache", str(toy_cache), "--out",
                          str(tmp_path / "one"), "--batch-size", "256", *args],
                         env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"),
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr
    two = _torchrun(["--cache", str(toy_cache), "--out", str(tmp_path / "two"), "--batch-size", "128", *args], 2)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = load_dictionary(tmp_path / "one" / "export"), load_dictionary(tmp_path / "two" / "export")
    for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(v, w, rtol=1e-4, atol=1e-5, msg=k)
    evals = [[r for r in read_metrics(tmp_path / run) if "eval/recon" in r] for run in ("one", "two")]
    assert [r["step"] for r in evals[0]] == [r["step"] for r in evals[1]] == [3, 6]
    for x, y in zip(*evals):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-5), (x["step"], k)
    # Only rank 0 wrote: one metrics file, one line per step, one set of checkpoints.
    lines = [r for r in read_metrics(tmp_path / "two") if "loss/total" in r]
    assert [r["step"] for r in lines] == list(range(1, 7))
    assert lines[-1]["tokens"] == 6 * 256
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["step-0000003", "step-0000006"]


@pytest.mark.slow
def test_ddp_matches_one_process_across_an_unevenly_split_epoch_tail(tmp_path):
    """An epoch's last batch of 33 rows splits 17/16 over two ranks. Each rank's loss is a mean over
    its own rows and DDP averages the ranks' gradients, so without weighing each rank by its share
    the tail steps differed from one process (weights off by 1e-3 after two epochs)."""
    from cache_factory import make_cache

    cache = tmp_path / "cache"
    man = make_cache(cache, n_shards=5, rows_per_shard=[256, 256, 256, 289, 256], n_models=1, n_hooks=2, d_model=16,
                     dtype=torch.float32)  # 1,057 training rows (the last shard is the eval split): 4 x 256 + 33
    # A skip transcoder: its W_skip [1, D, 1, D] got a gradient whose strides DDP warned about on every rank.
    args = ["--cache", str(cache), "--arch", "directional", "--in-hooks", man.hooks[0], "--out-hooks", man.hooks[1],
            "--skip", "--activation", "relu", "--latents", "32", "--steps", "10", "--lr", "3e-3",
            "--log-every", "1", "--checkpoint-every", "1000", "--device", "cpu", "--no-progress", "--eval-shards", "1"]
    one = subprocess.run([sys.executable, str(ROOT / "run_train.py"), *args, "--out", str(tmp_path / "one"),
                          "--batch-size", "256"], env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"),
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr
    two = _torchrun([*args, "--out", str(tmp_path / "two"), "--batch-size", "128"], 2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "Grad strides do not match" not in two.stderr
    assert [r["tokens"] for r in read_metrics(tmp_path / "two") if "loss/total" in r][4] == 4 * 256 + 33
    a, b = load_dictionary(tmp_path / "one" / "export"), load_dictionary(tmp_path / "two" / "export")
    for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(v, w, rtol=1e-4, atol=2e-6, msg=k)
    assert b.W_skip_XiDXoD.abs().max() > 0
    # The export records the processes (train_config's batch_size is per process); a card counts the global batch.
    from train.dictionary_card import read_facts, render_dictionary_card
    from train.export import load_metadata

    assert load_metadata(tmp_path / "two" / "export")["world_size"] == 2
    config = json.loads((tmp_path / "two" / "export" / "config.json").read_text())
    card = render_dictionary_card(read_facts(tmp_path / "two" / "export", tmp_path / "two", config, []),
                                  repo="u/r", revision=None)
    assert "| batch size | 256 tokens (2,560 tokens seen, 128 per process x 2 processes) |" in card


@pytest.mark.slow
def test_ddp_resume_after_a_lost_rank(toy_cache, tmp_path):
    """A finished DDP run, truncated back to its step-3 checkpoint, resumes under torchrun to the same weights."""
    args = ["--cache", str(toy_cache), "--batch-size", "128", *DDP_ARGS]
    ref = _torchrun([*args, "--out", str(tmp_path / "ref")], 2)
    assert ref.returncode == 0, ref.stderr[-3000:]
    shutil.copytree(tmp_path / "ref", tmp_path / "res")
    shutil.rmtree(tmp_path / "res" / "checkpoints" / "step-0000006")
    shutil.rmtree(tmp_path / "res" / "export")
    # One process cannot resume it (its stream is two ranks'): the refusal names the launch that can.
    alone = subprocess.run([sys.executable, str(ROOT / "run_train.py"), *args, "--out", str(tmp_path / "res")],
                           env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"), capture_output=True,
                           text=True, timeout=300, check=False)
    assert alone.returncode == 2 and "Traceback" not in alone.stderr, alone.stderr
    assert "trained with 2 process(es); this command runs 1" in alone.stderr
    assert "resume it with `torchrun --nproc-per-node 2 run_train.py ...`" in alone.stderr
    res = _torchrun([*args, "--out", str(tmp_path / "res")], 2)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming" in res.stdout
    assert _metrics(tmp_path / "res") == _metrics(tmp_path / "ref")


def _long_ddp_run(toy_cache: Path, run: Path, *, dist_timeout: int) -> tuple[subprocess.Popen, list]:
    """A 2-rank torchrun training that would run for ages, once its first checkpoint is on disk: the
    torchrun process and its two workers (psutil processes, rank order)."""
    import time as _time

    import psutil

    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                             str(ROOT / "run_train.py"), "--cache", str(toy_cache),
                             "--out", str(run), "--batch-size", "64", "--latents", "64", "--steps", "100000",
                             "--checkpoint-every", "5", "--dist-timeout", str(dist_timeout), "--device", "cpu",
                             "--no-progress"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = _time.time() + 300
    while _time.time() < deadline and not list(run.glob("checkpoints/step-*")):
        assert proc.poll() is None, proc.communicate()
        _time.sleep(0.1)
    workers = sorted((c for c in psutil.Process(proc.pid).children(recursive=True)
                      if "run_train.py" in " ".join(c.cmdline())), key=lambda c: c.environ().get("RANK", ""))
    assert len(workers) == 2
    return proc, workers


@pytest.mark.slow
def test_ddp_a_dead_rank_stops_the_others(toy_cache, tmp_path):
    import time as _time

    run = tmp_path / "run"
    proc, workers = _long_ddp_run(toy_cache, run, dist_timeout=30)
    workers[1].kill()
    t = _time.time()
    out, err = proc.communicate(timeout=180)
    assert proc.returncode != 0 and _time.time() - t < 120
    assert "run_train.py FAILED" in err or "ChildFailedError" in err or "Error" in err
    assert list(run.glob("checkpoints/step-*"))  # what was saved is still there


@pytest.mark.slow
def test_ddp_a_hung_rank_stops_the_others_with_a_clear_error(toy_cache, tmp_path):
    """A rank that hangs (SIGSTOP) makes rank 0 fail after --dist-timeout with an error naming
    the step, the cause and the fix, not the backend's traceback."""
    import signal

    proc, (rank0, hung) = _long_ddp_run(toy_cache, tmp_path / "run", dist_timeout=10)
    hung.send_signal(signal.SIGSTOP)
    try:
        rank0.wait(timeout=120)  # the collective's timeout, then the error
    finally:
        hung.kill()  # otherwise torchrun waits 30 s for a stopped process to take its SIGTERM
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "error: rank 0: no answer from the other rank(s) within --dist-timeout 10s at step " in err, err[-3000:]
    assert "another rank died, failed or hangs" in err and "--nproc-per-node 2" in err
    assert "[rank0]: Traceback" not in err


SLOW_RANK0 = """
import os, sys, time
sys.path.insert(0, {root!r})
import run_train
import train.trainer as trainer
if os.environ["RANK"] == "0":  # rank 0's solo work (a save, an eval) takes longer than --dist-timeout
    for name in ("save_checkpoint", "evaluate"):
        def slow(*a, _real=getattr(trainer, name), **k):
            time.sleep({sleep})
            return _real(*a, **k)
        setattr(trainer, name, slow)
    real_write_config = trainer._Member.write_config
    def slow_write_config(self):  # its solo set-up before the loop too (removing a killed save's temporaries)
        time.sleep({setup_sleep})
        return real_write_config(self)
    trainer._Member.write_config = slow_write_config
sys.exit(run_train.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_ddp_rank0_saving_or_evaluating_longer_than_the_timeout_is_no_failure(toy_cache, tmp_path):
    """The other ranks waited for rank 0's checkpoint save, eval and export under --dist-timeout: a large
    dictionary's save took longer, and a healthy run was stopped, blaming a dead rank. They now wait up to
    SOLO_WAIT_S; --dist-timeout still bounds every collective of the training steps. Its set-up before
    the loop (the run folder) too."""
    script = tmp_path / "slow_rank0.py"
    script.write_text(SLOW_RANK0.format(root=str(ROOT), sleep=7, setup_sleep=7))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    run = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                          str(script), "--cache", str(toy_cache), "--out", str(run),
                          "--batch-size", "64", "--latents", "64", "--steps", "2", "--eval-every", "1",
                          "--checkpoint-every", "1000", "--dist-timeout", "4", "--device", "cpu", "--no-progress"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [r["step"] for r in read_metrics(run) if "eval/recon" in r] == [1, 2]  # an eval in the loop, and the last
    assert (run / "export" / "model.safetensors").is_file()


@pytest.mark.slow
def test_sigterm_outside_the_training_loop_is_reported(toy_cache, tmp_path):
    """torchrun sends SIGTERM to every rank when one fails; outside the training loop (set-up, the final
    export) a rank died of it silently. It now says where it was and how to resume (exit 130)."""
    script = tmp_path / "slow_setup.py"
    script.write_text(f"""
import sys, time
sys.path.insert(0, {str(ROOT)!r})
import run_train
import train.trainer as trainer
real = trainer._resume
def slow(*a, **k):
    print("resuming", flush=True)
    time.sleep(60)
    return real(*a, **k)
trainer._resume = slow
sys.exit(run_train.main(sys.argv[1:]))
""")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(script), "--cache", str(toy_cache), "--out", str(tmp_path / "run"),
                             "--latents", "64", "--steps", "2", "--device", "cpu", "--no-progress"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "resuming\n"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    assert "stopped by SIGTERM at setting up. The checkpoints saved so far are kept: re-run the same command" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_sigterm_reaches_a_rank_waiting_for_rank0(toy_cache, tmp_path):
    """A rank waiting for rank 0's solo work (up to hours) still handles torchrun's SIGTERM at once: the
    wait is polled, not blocked in the backend, so the signal is not held until the barrier returns."""
    import time as _time

    import psutil

    script = tmp_path / "slow_rank0.py"
    script.write_text(SLOW_RANK0.format(root=str(ROOT), sleep=120, setup_sleep=0).replace('("save_checkpoint", "evaluate")',
                                                                           '("evaluate",)'))
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                             str(script), "--cache", str(toy_cache), "--out", str(run),
                             "--batch-size", "64", "--latents", "64", "--steps", "2", "--checkpoint-every", "1000",
                             "--dist-timeout", "30", "--device", "cpu", "--no-progress"],
                            env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = _time.time() + 300
    while _time.time() < deadline and not (run / "checkpoints" / "step-0000002").is_dir():
        assert proc.poll() is None, proc.communicate()
        _time.sleep(0.1)
    _time.sleep(3)  # rank 0 is in its (120 s) final eval, rank 1 waits for it
    rank1 = next(c for c in psutil.Process(proc.pid).children(recursive=True)
                 if "slow_rank0.py" in " ".join(c.cmdline()) and c.environ().get("RANK") == "1")
    sent = _time.time()
    rank1.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=100)
    assert _time.time() - sent < 60, "the signal waited for the barrier"
    assert "rank 1: stopped by SIGTERM at the final eval and export" in err, err[-3000:]
