"""``analyze --cache``: which slots of another cache a run's dictionary reads, whose normalization it
accepts, how published (``~/...``) model names are matched, and what ``analyze`` says for a folder
that is not a finished run (an export, a run still training) or an eval too small for an EV.

Every cache here is cut from one *universe* of activations (3 models x 3 hooks, fixed rows): a cache
holding some of its models and hooks, in any order, holds exactly the same rows for each (model, hook),
so a run analysed on it must give exactly the numbers of its own cache."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from shared.cache import CacheWriter
from shared.cache_format import Manifest, shard_file_name
from shared.normalization import Normalization
from shared.token_table import write_token_table
from train.analysis import analyze
from train.analysis_config import AnalysisConfig
from train.analysis_run import RunData, RunError, cache_mismatch, cache_model_names, load_run
from train.analysis_stream import StreamStats

D = 8
MODELS = ["base", "ft", "other"]
HOOKS = [f"blocks.{j}.hook_resid_post" for j in range(3)]
N_SEQS, SEQ_LEN, ROWS_PER_SHARD = 40, 17, 128


def _universe() -> dict:
    """Raw activations [N, 3, 3, D] (each (model, hook) its own offset and spread), tokens, row order."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(8, 200, (N_SEQS, SEQ_LEN), generator=g)
    ids[:, 0] = 0
    seq = torch.arange(N_SEQS).repeat_interleave(SEQ_LEN - 1)
    pos = torch.arange(1, SEQ_LEN).repeat(N_SEQS)
    n = len(seq)
    spread = torch.arange(1, 10, dtype=torch.float32).view(1, 3, 3, 1)
    offset = torch.zeros(1, 3, 3, D)
    for m in range(3):
        for h in range(3):
            offset[0, m, h, (3 * m + h) % D] = 2.0 + m - h
    raw = torch.randn(n, 3, 3, D, generator=g) * spread / 3 + offset
    return {"ids": ids, "seq": seq, "pos": pos, "tok": ids[seq, pos], "raw": raw,
            "perm": torch.randperm(n, generator=g)}


def _cache(path: Path, u: dict, models: list[str], hooks: list[str], *, method: str = "none", calib: int = 0,
           names: list[str] | None = None) -> Path:
    """A cache of ``models`` x ``hooks`` of the universe, in that order; the same rows and shards for any
    choice. ``calib`` picks the calibration rows of its normalization (another value: another harvest)."""
    mi, hi = [MODELS.index(m) for m in models], [HOOKS.index(h) for h in hooks]
    norm = Normalization.estimate(u["raw"][calib::2], method).select(mi, hi)  # per slot: the same in any cache
    acts = norm.apply(u["raw"][:, mi][:, :, hi])
    man = Manifest(
        models=[{"name": n, "path": None} for n in (names or models)], hooks=list(hooks), d_model=D,
        dtype="float32", context_size=SEQ_LEN, n_rows=0, shards=[], normalization=norm.to_manifest(len(acts) // 2),
        excluded_tokens={"special": True, "token_ids": [0]}, dataset={"name": "universe"},
        tokenizer={"name": "none", "vocab_size": 256}, created_by={"tool": "tests/test_analyze_cache.py"},
        complete=False, extra={"n_sequences": N_SEQS})
    w = CacheWriter(path, man)
    norm.write_side_file(path)
    perm = u["perm"]
    for s, lo in enumerate(range(0, len(perm), ROWS_PER_SHARD)):
        r = perm[lo:lo + ROWS_PER_SHARD]
        w.add_shard(shard_file_name(s), acts[r].contiguous(), u["seq"][r], u["pos"][r].to(torch.int32),
                    u["tok"][r].to(torch.int32))
    write_token_table(path, u["ids"].tolist(), {"source": ["code" if s % 2 else "docs" for s in range(N_SEQS)]})
    w.finish()
    return path


def _train(out: Path, cache: Path, **kw) -> Path:
    from train.config import TrainConfig
    from train.trainer import train

    args = {"cache": str(cache), "out": str(out), "latents": 16, "steps": 20, "batch_size": 64, "device": "cpu",
            "progress": False, "eval_shards": 2, "log_every": 10}
    args.update(kw)
    train(TrainConfig(**args))
    return out


def _analyze(run: Path, out: Path, cache: Path | str | None = None, **kw) -> dict:
    return analyze(AnalysisConfig(run=str(run), out=str(out), cache=None if cache is None else str(cache),
                                  progress=False, top_k=2, latents_shown=2, **kw))


def _same_eval(a: dict, b: dict) -> None:
    assert a["rows"] == b["rows"]
    assert a["explained_variance"] == pytest.approx(b["explained_variance"], abs=1e-6)
    assert a["explained_variance_per_slot"] == pytest.approx(b["explained_variance_per_slot"], abs=1e-6)
    assert a["l0_mean"] == pytest.approx(b["l0_mean"], abs=1e-3)


@pytest.fixture(scope="module")
def u():
    return _universe()


@pytest.fixture(scope="module")
def crosscoder(u, tmp_path_factory):
    """A crosscoder trained on base+ft at hook 1 (no --models/--hooks: all of its cache's), and its report."""
    tmp = tmp_path_factory.mktemp("crosscoder")
    cache = _cache(tmp / "own", u, ["base", "ft"], [HOOKS[1]], method="norm_scale")
    run = _train(tmp / "run", cache)
    return {"tmp": tmp, "run": run, "cache": cache, "rep": _analyze(run, tmp / "an_own")}


# ---- 1: the run's own slots, in its own layout ---------------------------------------------------------
def test_another_order_or_more_slots_gives_the_runs_own_numbers(u, crosscoder):
    """A cache holding the run's models and hooks in another order, or among others, is read in the run's
    training layout: exactly the numbers of its own cache (not another model's slots in their place)."""
    tmp, own = crosscoder["tmp"], crosscoder["rep"]["eval"]
    assert own["explained_variance"] is not None
    for i, (models, hooks) in enumerate([(["ft", "base"], [HOOKS[1]]),
                                         (["base", "ft"], [HOOKS[0], HOOKS[1]]),
                                         (["other", "ft", "base"], [HOOKS[2], HOOKS[1], HOOKS[0]])]):
        cache = _cache(tmp / f"other{i}", u, models, hooks, method="norm_scale")
        rep = _analyze(crosscoder["run"], tmp / f"an{i}", cache)
        _same_eval(rep["eval"], own)
        assert rep["run_config"]["out_slots"] == crosscoder["rep"]["run_config"]["out_slots"]


def test_a_transcoder_reads_its_own_model_in_a_cache_with_another_first(u, tmp_path):
    cache = _cache(tmp_path / "own", u, ["base"], HOOKS[:2])
    run = _train(tmp_path / "run", cache, arch="directional", in_hooks=[HOOKS[0]], out_hooks=[HOOKS[1]])
    own = _analyze(run, tmp_path / "an_own")["eval"]
    other = _cache(tmp_path / "other", u, ["ft", "base"], [HOOKS[1], HOOKS[0]])
    _same_eval(_analyze(run, tmp_path / "an_other", other)["eval"], own)


def test_slots_that_do_not_come_out_as_recorded_are_refused(crosscoder):
    """The last guard: the slots resolved in a cache must be those the run recorded (names and in/out)."""
    from shared.cache import open_cache
    from train.analysis_run import run_slots

    run = load_run(crosscoder["run"])
    man = open_cache(crosscoder["cache"]).manifest
    assert run_slots(run, man).slot_names == run.info["slots"]
    bad = RunData(run.run_dir, {**run.info, "out_slots": [1, 0]}, run.model, run.out_slot_names)
    with pytest.raises(RunError, match=r"not the ones it trained on"):
        run_slots(bad, man)


# ---- 2: another normalization of the run's slots -------------------------------------------------------
def test_another_mean_std_of_the_runs_slots_is_refused_whatever_the_layout(u, tmp_path):
    """mean_std: the run records a digest of its own slots' mean/std; a cache with other models or hooks
    (so another side file anyway) is refused if those slots' mean/std differ, and read if they match."""
    cache = _cache(tmp_path / "own", u, MODELS, HOOKS[:2], method="mean_std")
    run = _train(tmp_path / "run", cache, models=["base", "ft"], hooks=[HOOKS[1]])
    assert json.loads((run / "config.json").read_text())["cache"]["normalization_slots_sha256"]
    own = _analyze(run, tmp_path / "an_own")["eval"]
    same = _cache(tmp_path / "same", u, ["ft", "base"], [HOOKS[1], HOOKS[2]], method="mean_std")
    _same_eval(_analyze(run, tmp_path / "an_same", same)["eval"], own)
    other = _cache(tmp_path / "other", u, ["base", "ft"], [HOOKS[1]], method="mean_std", calib=1)
    with pytest.raises(RunError, match=r"another normalization mean/std .* of the run's slots"):
        _analyze(run, tmp_path / "an_other", other)
    # The same check where the caller gives no folder to read the side file from: done by the stream.
    from shared.cache import open_cache
    assert cache_mismatch(load_run(run), open_cache(other).manifest, other)[0] is not None

    # A run from before the digest: the whole side file is compared when the layout is the run's cache's;
    # otherwise a note says the mean/std could not be compared (never silently accepted).
    info = json.loads((run / "config.json").read_text())
    del info["cache"]["normalization_slots_sha256"]
    (run / "config.json").write_text(json.dumps(info))
    rep = _analyze(run, tmp_path / "an_old", other)
    assert any("could not be compared" in n for n in rep["notes"]), rep["notes"]
    relayout = _cache(tmp_path / "relayout", u, MODELS, HOOKS[:2], method="mean_std", calib=1)
    with pytest.raises(RunError, match=r"another normalization.safetensors"):
        _analyze(run, tmp_path / "an_old2", relayout)


# ---- 3: names published from another machine ----------------------------------------------------------
def test_published_names_match_by_the_runs_own_rows(crosscoder, tmp_path):
    """A cache pushed from another machine names its models ``~/...``: the same shards (the run's recorded
    fingerprint) are matched by position, both ways; another harvest under other names is not."""
    run = tmp_path / "run"
    shutil.copytree(crosscoder["run"], run, ignore=shutil.ignore_patterns("analysis", "an_*"))
    pushed = tmp_path / "pushed"
    shutil.copytree(crosscoder["cache"], pushed)
    man = json.loads((pushed / "manifest.json").read_text())
    for m in man["models"]:
        m["name"] = f"~/models/{m['name']}"  # as push writes /home/alice/models/... on alice's machine
    (pushed / "manifest.json").write_text(json.dumps(man))
    _same_eval(_analyze(run, tmp_path / "an_pushed", pushed)["eval"], crosscoder["rep"]["eval"])
    # The reverse: a run trained on the pushed copy, read on the original (absolute names).
    info = json.loads((run / "config.json").read_text())
    info["slots"] = [f"~/models/{s}" for s in info["slots"]]
    info["cache"]["models"] = man["models"]
    (run / "config.json").write_text(json.dumps(info))
    run_data = load_run(run)
    original = json.loads((crosscoder["cache"] / "manifest.json").read_text())
    as_manifest = SimpleNamespace(model_names=[m["name"] for m in original["models"]], hooks=original["hooks"],
                                  shards_fingerprint=info["cache"]["shards_sha256"])
    assert cache_model_names(run_data, as_manifest) == {"~/models/base": "base", "~/models/ft": "ft"}
    as_manifest.shards_fingerprint = "another harvest"
    assert cache_model_names(run_data, as_manifest) == {}


def test_a_home_path_matches_its_published_name_both_ways(tmp_path):
    """On this machine, a run trained from ``hf://`` (``~/models/chat``) matches the local original
    (``$HOME/models/chat``) even from another harvest."""
    run = RunData(tmp_path, {"slots": ["~/models/chat/h"], "cache": {"models": [{"name": "~/models/chat"}],
                                                                     "hooks": ["h"], "shards_sha256": "x"}}, None, [])
    local = SimpleNamespace(model_names=["base", str(Path.home() / "models" / "chat")], hooks=["h"],
                            shards_fingerprint="y")
    assert cache_model_names(run, local) == {"~/models/chat": str(Path.home() / "models" / "chat")}


# ---- 4, 5: folders that are not a finished run --------------------------------------------------------
def test_an_export_folder_names_its_run(crosscoder):
    run = crosscoder["run"]
    for sub in ("export", "dictionary"):
        with pytest.raises(RunError, match=rf"is a saved dictionary .*pass the run folder that holds it: {run}$"):
            load_run(run / sub)


def test_a_run_still_training_says_so(crosscoder, tmp_path):
    from shared.folder_lock import LOCK_NAME, FolderBusyError, FolderLock

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(crosscoder["run"] / "config.json", run / "config.json")
    with FolderLock(run, what="run folder"):  # a training job holds its run folder's lock
        # FolderBusyError: the CLIs exit 75 (try again later), not 2 (a bad command)
        with pytest.raises(FolderBusyError, match=rf"still training \(its folder is locked by pid {os.getpid()}.*wait for"):
            load_run(run)
        assert (run / LOCK_NAME).is_file()
    assert not (run / LOCK_NAME).exists()  # looking took nothing: the holder released and removed it
    (run / LOCK_NAME).write_text(json.dumps({"pid": 1}))  # a file a killed job left: no one holds it
    with pytest.raises(RunError, match=r"has not finished; re-run its run_train.py command"):
        load_run(run)


# ---- 6: an explained variance needs rows that vary ---------------------------------------------------------
def test_explained_variance_needs_two_rows_that_vary():
    def stats(x_NXD: torch.Tensor, err: float) -> StreamStats:
        st = StreamStats(4, 2, {}, x_NXD.shape[1], x_NXD.shape[2], None, torch.device("cpu"))
        st.rows = x_NXD.shape[0]
        st.sum_XD += x_NXD.sum(0).double()
        st.sq_X += x_NXD.pow(2).sum(dim=(0, 2)).double()
        st.err_X += err
        return st

    one = stats(torch.tensor([[[1.0, 2.0]]]), 1e-3)
    assert one.explained_variance() == (None, [None])
    flat = stats(torch.tensor([[[1.0, 2.0], [3.0, 3.0]]]).repeat(5, 1, 1), 1e-3)  # constant rows
    assert flat.explained_variance() == (None, [None, None])
    x = torch.tensor([[[0.0, 0.0], [1.0, 1.0]], [[2.0, 0.0], [1.0, 1.0]]])  # slot 0 varies (var 2), slot 1 not
    ev, per = stats(x, 0.5).explained_variance()
    assert ev == pytest.approx(1 - 1.0 / 2.0) and per[0] == pytest.approx(1 - 0.5 / 2.0) and per[1] is None


def test_one_eval_row_notes_that_ev_is_na(crosscoder, tmp_path):
    rep = _analyze(crosscoder["run"], tmp_path / "an", eval_tokens=1)
    assert rep["eval"]["rows"] == 1 and rep["eval"]["explained_variance"] is None
    assert any("explained variance is n/a: it needs at least 2 eval rows" in n for n in rep["notes"]), rep["notes"]


def test_rows_holding_inf_or_nan_are_left_out_with_a_note(u, crosscoder, tmp_path):
    """An eval row the harvest wrote as inf or NaN (an older harvest's float16 overflow) made analyze fail
    with an IndexError in its top-k bookkeeping; it is left out and counted, as training's eval does."""
    from shared.shard_io import ShardReader, write_shard

    cache = _cache(tmp_path / "c", u, ["base", "ft"], [HOOKS[1]], method="norm_scale")
    man = json.loads((cache / "manifest.json").read_text())
    rec = man["shards"][-1]  # held out (eval_shards 2)
    with ShardReader(cache / rec["file"], row_shape=(2, 1, D), dtype=torch.float32, n_rows=rec["n_rows"]) as shard:
        acts, seq, pos, tok = (t.clone() for t in (shard.acts, shard.seq, shard.pos, shard.token))
    acts[5, 1, 0, 3], acts[9, 0, 0, 0] = float("inf"), float("nan")
    new = write_shard(cache, rec["file"], acts, seq, pos, tok)
    rec.update(sha256=new.sha256, bytes=new.bytes)
    (cache / "manifest.json").write_text(json.dumps(man))
    rep = _analyze(crosscoder["run"], tmp_path / "an", cache)
    assert rep["eval"]["rows"] == crosscoder["rep"]["eval"]["rows"] - 2
    ev, own = rep["eval"]["explained_variance"], crosscoder["rep"]["eval"]["explained_variance"]
    assert ev is not None and abs(ev - own) < 0.05, (ev, own)  # the other rows' figure, not NaN
    assert any(n.startswith("2 eval-split row(s) of ") and "hold non-finite (inf or NaN) activations and were left out"
               in n for n in rep["notes"]), rep["notes"]


@pytest.mark.parametrize("damage", ["missing", "flipped"])
def test_a_mean_std_cache_without_its_side_file_is_refused_before_step_0(u, tmp_path, damage):
    """Training went through every step and failed at the export, which folds the mean/std in."""
    from shared.cache_format import CacheError

    cache = _cache(tmp_path / "c", u, MODELS, HOOKS[:1], method="mean_std")
    side = cache / "normalization.safetensors"
    if damage == "missing":
        side.unlink()
    else:
        data = bytearray(side.read_bytes())
        data[-1] ^= 0x01
        side.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=r"normalization.safetensors is (missing|damaged).*delete the cache folder and "
                                         r"re-run the harvest.*refused before step 0"):
        _train(tmp_path / "run", cache)
    assert not (tmp_path / "run").exists()
