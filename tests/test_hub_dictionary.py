"""Dictionaries on the Hugging Face Hub: ``run_train.py push`` (train/hub_dictionary.py) and ``hf://`` loading.

Nothing here reaches the Hub. Pushes go to :class:`FakeModelHub`, the in-memory stand-in of
tests/test_hub_push_safety.py patched onto ``HfApi``, for *model* repos (every call is checked to ask for
one); :func:`materialize` then lays a branch out in the Hugging Face cache as ``huggingface_hub`` caches a
model snapshot (``models--OWNER--NAME/{refs,snapshots,blobs}``, checked with ``scan_cache_dir``), and
``load_dictionary("hf://...")`` reads it offline. The re-download of a damaged file runs the real
``huggingface_hub`` download code against a small HTTP server on 127.0.0.1 serving model repos as the
Hub does (LFS files carry their sha256 as ``X-Linked-Etag``), like tests/test_hub_download_checks.py.

Two tiny real runs are trained once (a model-diffing BatchTopK crosscoder with shared latents, with
k = 2 and 3), as user ``alice`` on host ``lab-gpu7`` with a home folder in the test's tmp folder, so
that what is published can be searched for the home folder, the user and the host.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import torch

import run_train
import tests.test_hub as _test_hub
from conftest import serve_as_hub
import tests.test_hub_push_safety as safety
from shared.hub import HubError, resolve_cache
from tests.cache_factory import make_cache
from tests.test_hub import COMMIT_A, FAKE_TOKEN, _cache, publish
from train.config import TrainConfig
from train.export import load_dictionary, load_metadata
from train.hub_dictionary import push_dictionary
from train.trainer import train_many

REPO = "bob/toy-cc"  # not alice's name: every byte published is searched for "alice"
USER, HOST = "alice", "lab-gpu7"
D = 8

hf_home = _test_hub.hf_home  # the fixture: an empty, offline Hugging Face cache in tmp_path, a fake token


# --------------------------------------------------------------------------------------------
# the runs, trained once as alice


def _alice_env(mp: pytest.MonkeyPatch, home: Path) -> None:
    for var, value in {"HOME": str(home), "USER": USER, "LOGNAME": USER}.items():
        mp.setenv(var, value)
    mp.setattr(socket, "gethostname", lambda: f"{HOST}.example.org")


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("machine") / "home" / USER


@pytest.fixture(scope="module")
def runs(home) -> dict[str, Path]:
    """Two finished runs (k = 2 and 3) of a sweep folder, with curves.png and an analysis report."""
    with pytest.MonkeyPatch.context() as mp:
        _alice_env(mp, home)
        cache = home / "caches" / "c"
        make_cache(cache, n_shards=4, rows_per_shard=128, n_models=2, n_hooks=1, d_model=D, dtype=torch.float32,
                   tag=False, model_names=[str(home / "models" / "base"), str(home / "models" / "ft")])
        man = json.loads((cache / "manifest.json").read_text())
        man["dataset"]["name"] = f"/data/{HOST}/corpus.jsonl"
        (cache / "manifest.json").write_text(json.dumps(man, indent=1) + "\n")
        sweep = home / "runs" / "sweep"
        # A sweep shares one loader stream (and seed): the members differ in k.
        cfgs = [TrainConfig(cache=str(cache), out=str(sweep / name), arch="crosscoder", activation="batchtopk", k=k,
                            latents=16, shared_latents=2, steps=12, batch_size=64, lr=3e-3, log_every=4,
                            checkpoint_every=1000, eval_batches=1, progress=False, device="cpu")
                for name, k in (("a", 2), ("b", 3))]
        train_many(cfgs)
    run = sweep / "a"
    report = run / "analysis"
    report.mkdir()
    (report / "report.md").write_text(f"# Report\n\nrun {run}, cache {cache} on /data/{HOST}/x\n\n![r](r_hist.png)\n")
    (report / "report.json").write_text(json.dumps({"run": str(run), "cache": str(cache)}, indent=1) + "\n")
    shutil.copy(run / "curves.png", report / "r_hist.png")
    (report / ".report.md.tmp-7").write_text("half")  # a writer's temp file: never published
    (report / "notes.txt").write_text("mine")
    return {"a": run, "b": sweep / "b", "sweep": sweep, "cache": cache}


@pytest.fixture(autouse=True)
def as_alice(home, monkeypatch) -> None:
    _alice_env(monkeypatch, home)


def _tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------
# a stand-in for the Hub's model repos


class FakeModelHub(safety.FakeHub):
    """tests/test_hub_push_safety.py's in-memory Hub, for model repos: a call for another repo type fails."""

    def create_repo(self, api, repo_id, *, repo_type=None, private=False, exist_ok=False, **kw):
        self.log.append(("create_repo", repo_id))
        if repo_id not in self.files:
            self.put(repo_id, {}, private=private)


@pytest.fixture
def fake_hub(hf_home, monkeypatch) -> FakeModelHub:
    import huggingface_hub
    from huggingface_hub import constants

    hub = FakeModelHub()
    hub.home = hf_home

    def patched(method):
        def call(api, *args, **kwargs):
            assert kwargs.get("repo_type") == "model", (method.__name__, kwargs)  # dictionaries are model repos
            return method(api, *args, **kwargs)
        return call

    for name in ("list_repo_files", "hf_hub_download", "repo_info", "create_repo", "create_branch", "create_commit"):
        monkeypatch.setattr(huggingface_hub.HfApi, name, patched(getattr(hub, name)))
    for name in ("upload_folder", "upload_large_folder"):  # one commit only
        monkeypatch.setattr(huggingface_hub.HfApi, name, lambda *a, **k: pytest.fail("not one commit"), raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # anything not faked fails fast
    return hub


def materialize(hub: FakeModelHub, repo: str = REPO, branch: str = "main") -> Path:
    """Lay ``branch`` of ``repo`` out in the local HF cache as ``huggingface_hub`` caches a model snapshot."""
    assert hub.home is not None
    commit = hub.heads[repo][branch]
    return _lay_out(hub.home / "hub", repo, commit, hub.files[repo][branch], (branch,))


def _lay_out(hub_dir: Path, repo: str, commit: str, files: dict[str, bytes], refs=("main",)) -> Path:
    repo_dir = hub_dir / f"models--{repo.replace('/', '--')}"
    for rel, data in files.items():
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo_dir / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / ref).write_text(commit)
    return repo_dir / "snapshots" / commit


def _commits(hub: FakeModelHub) -> list:
    return [detail for name, detail in hub.log if name == "create_commit"]


# --------------------------------------------------------------------------------------------
# dry run, and what a push uploads


def test_dry_run_prints_card_and_files_and_uploads_nothing(runs, hf_home, monkeypatch, capsys):
    import huggingface_hub

    calls = []
    for name in ("create_repo", "create_branch", "create_commit", "list_repo_files", "upload_folder"):
        monkeypatch.setattr(huggingface_hub.HfApi, name, lambda *a, _n=name, **k: calls.append(_n))
    before = _tree(runs["a"])
    assert run_train.main(["push", str(runs["a"]), "--repo", REPO, "--dry-run"]) == 0
    out = capsys.readouterr()
    assert calls == [] and _tree(runs["a"]) == before  # nothing reached the Hub, nothing written locally
    listed = [line.split()[0] for line in out.out.split("--- files for")[1].splitlines()[1:] if line.startswith("  ")]
    assert listed == ["README.md", "config.json", "model.safetensors", "curves.png", "analysis/report.md",
                      "analysis/report.json", "analysis/r_hist.png"]
    card = out.out.split("--- files for")[0]
    meta = load_metadata(runs["a"] / "export")
    for needle in ("library_name: crosscache", "- crosscoder", "- model-diffing", "- batchtopk",
                   "# Model-diffing crosscoder: `~/models/base`, `~/models/ft` @ `blocks.0.hook_resid_post`",
                   "k = 2 per token", "the first 2 are shared latents", "`~/caches/c` (a local cache, not on the Hub)",
                   "`/data/<host>/corpus.jsonl`", "| tokens in the cache | 512 |", "| steps | 12 ",
                   "| batch size | 64 tokens (768 tokens seen) |", "| learning rate | 0.003 ", "| seed | 0 |",
                   f"| explained variance, overall | {meta['eval']['eval/ev/overall']:.3f} |",
                   "explained variance, `~/models/ft/blocks.0.hook_resid_post`", "L0 (mean active latents",
                   "dead latents (fraction, end of training) | 0.", "**normalized**", f'load_dictionary("hf://{REPO}")',
                   "![training curves", "[analysis/report.md](analysis/report.md)"):
        assert needle in card, needle
    assert card.startswith("---\nlibrary_name: crosscache\ntags:\n")
    assert "offline mode is on" in out.err and "dry run: nothing uploaded" in out.out
    assert "auth: a Hugging Face token is available" in out.out and FAKE_TOKEN not in out.out + out.err
    assert str(runs["a"].parents[2]) not in card and USER not in card and HOST not in card


def test_push_uploads_exactly_the_files_in_one_commit_and_nothing_of_the_machine(runs, fake_hub, home, capsys):
    before = _tree(runs["a"])
    assert run_train.main(["push", str(runs["a"]), "--repo", REPO]) == 0
    out = capsys.readouterr()
    assert "pushed 7 files" in out.out and f"https://huggingface.co/{REPO}" in out.out
    writes = [(n, d) for n, d in fake_hub.log if n in safety.WRITES]
    assert [n for n, _ in writes] == ["create_repo", "create_commit"]  # one commit holds the whole dictionary
    published = fake_hub.files[REPO]["main"]
    assert set(published) == {".gitattributes", "README.md", "config.json", "model.safetensors", "curves.png",
                              "analysis/report.md", "analysis/report.json", "analysis/r_hist.png"}
    export = runs["a"] / "export"
    assert published["model.safetensors"] == (export / "model.safetensors").read_bytes()
    assert published["curves.png"] == (runs["a"] / "curves.png").read_bytes()
    for name, data in published.items():
        for secret in (str(home), USER, HOST, FAKE_TOKEN):
            assert secret.encode() not in data, (name, secret)
    report = json.loads(published["analysis/report.json"])
    assert report == {"run": "~/runs/sweep/a", "cache": "~/caches/c"}
    assert "/data/<host>/x" in published["analysis/report.md"].decode()
    config = json.loads(published["config.json"])
    assert config["weights_sha256"] == hashlib.sha256(published["model.safetensors"]).hexdigest()
    assert "note:" in out.err and "published as ~/..., <user>, <host>" in out.err
    assert _tree(runs["a"]) == before  # the run is left as it was
    assert FAKE_TOKEN not in out.out + out.err + repr(fake_hub.log)


def test_a_bare_export_is_published_redacted_and_still_loads(runs, fake_hub, hf_home, home, tmp_path):
    """An export whose config.json names this machine (written before exports were made shareable, or on
    another machine) is published redacted; its weights and checksum are unchanged."""
    bare = tmp_path / "export"
    shutil.copytree(runs["a"] / "export", bare)
    config = json.loads((bare / "config.json").read_text())
    config["metadata"]["cache"] = str(home / "caches" / "c")
    (bare / "config.json").write_text(json.dumps(config))
    plan = push_dictionary(bare, REPO)
    assert [f for f, _ in plan.files] == ["README.md", "config.json", "model.safetensors"]
    assert plan.redacted == ["config.json: metadata.cache"]
    published = json.loads(fake_hub.files[REPO]["main"]["config.json"])
    assert published["metadata"]["cache"] == "~/caches/c"
    assert "not recorded (pushed from an export folder" in plan.card
    # No run folder: the cache's facts come from the export's metadata.harvest (redacted as it was written).
    assert "| dataset | `/data/<host>/corpus.jsonl` (split" in plan.card and HOST not in plan.card
    assert "| context size | 33 |" in plan.card and "| tokens in the cache | 512 |" in plan.card
    materialize(fake_hub)
    assert load_metadata(f"hf://{REPO}")["cache"] == "~/caches/c"
    assert torch.equal(load_dictionary(f"hf://{REPO}").W_enc_XiDL, load_dictionary(bare).W_enc_XiDL)
    # The card says why the dataset is unknown: a record naming none (another tool's cache), or no record.
    from train.dictionary_card import read_facts, render_dictionary_card

    def dataset_row(harvest):
        cfg = json.loads(json.dumps(config))
        cfg["metadata"].pop("harvest", None)
        if harvest is not None:
            cfg["metadata"]["harvest"] = harvest
        card = render_dictionary_card(read_facts(bare, None, cfg, []), repo=REPO, revision=None)
        return next(line for line in card.splitlines() if line.startswith("| dataset |"))
    assert "the cache's manifest names none" in dataset_row({**config["metadata"]["harvest"], "dataset": {}})
    assert "an export older than metadata.harvest" in dataset_row(None)


# --------------------------------------------------------------------------------------------
# what the repo holds: refused without --force, replaced with it


def test_the_card_names_the_dictionarys_own_models_and_hooks_from_a_run_or_a_bare_export(tmp_path):
    """A run's record lists every model and hook of its cache, an export's metadata.harvest only the dictionary's:
    the card listed the cache's from a run and the dictionary's from a copied export/. Now the dictionary's."""
    from train.dictionary_card import read_facts, render_dictionary_card

    cache = tmp_path / "cache"
    make_cache(cache, n_shards=3, rows_per_shard=64, n_models=2, n_hooks=2, d_model=D, dtype=torch.float32)
    man = json.loads((cache / "manifest.json").read_text())
    model, hook = man["models"][1]["name"], man["hooks"][1]
    run = tmp_path / "run"
    train_many([TrainConfig(cache=str(cache), out=str(run), models=[model], hooks=[hook], latents=16, steps=2,
                            batch_size=32, checkpoint_every=1000, progress=False, device="cpu")])
    bare = tmp_path / "export"
    shutil.copytree(run / "export", bare)
    config = json.loads((bare / "config.json").read_text())
    cards = [render_dictionary_card(read_facts(run / "export", run, config, []), repo=REPO, revision=None),
             render_dictionary_card(read_facts(bare, None, config, []), repo=REPO, revision=None)]
    rows = [{line.split(" | ")[0]: line for line in card.splitlines() if line.startswith(("| hooks |", "| models |"))}
            for card in cards]
    assert rows[0] == rows[1] and len(rows[0]) == 2, rows
    assert rows[0]["| hooks"] == f"| hooks | `{hook}` |"
    assert f"`{model}`" in rows[0]["| models"] and man["models"][0]["name"] not in rows[0]["| models"]


def test_another_dictionary_is_refused_without_force_and_replaced_with_it(runs, fake_hub, monkeypatch, capsys):
    push_dictionary(runs["a"], REPO)
    before, n_log = fake_hub.state(REPO), len(fake_hub.log)
    assert run_train.main(["push", str(runs["b"]), "--repo", REPO]) == 2
    err = capsys.readouterr().err
    assert f"refusing to push to {REPO}: it holds another crosscache dictionary (crosscoder batchtopk k=2" in err
    assert "--force" in err and "--revision" in err and "Traceback" not in err
    with safety.online(monkeypatch):  # a dry run looks (read only) and says the same
        assert run_train.main(["push", str(runs["b"]), "--repo", REPO, "--dry-run"]) == 2
    assert "dry run: nothing was uploaded" in capsys.readouterr().err
    assert [n for n, _ in fake_hub.log[n_log:] if n in safety.WRITES] == [] and fake_hub.state(REPO) == before

    plan = push_dictionary(runs["b"], REPO, force=True)
    assert plan.contents is not None and plan.contents.state == "other"
    assert sorted(plan.deletes) == ["analysis/r_hist.png", "analysis/report.json", "analysis/report.md"]
    assert set(fake_hub.files[REPO]["main"]) == {".gitattributes", "README.md", "config.json", "model.safetensors",
                                                 "curves.png"}
    assert fake_hub.files[REPO]["main"]["model.safetensors"] == (runs["b"] / "export/model.safetensors").read_bytes()
    assert any("replaced another crosscache dictionary" in n for n in plan.notes)


def test_unrelated_files_are_refused_without_force_and_replaced_with_it(runs, fake_hub):
    theirs = {"README.md": b"# My model\n", "pytorch_model.bin": b"\x80\x02",
              "config.json": b'{"model_type": "gpt2"}'}
    fake_hub.put(REPO, theirs)
    before = fake_hub.state(REPO)
    with pytest.raises(HubError) as err:
        push_dictionary(runs["a"], REPO)
    msg = str(err.value)
    assert "3 file(s) that are not a crosscache dictionary" in msg and "format None" in msg
    for name in theirs:
        assert name in msg
    assert fake_hub.writes() == [] and fake_hub.state(REPO) == before
    # A new branch starts as a copy of main: replacing what it inherits there needs no --force, main stays.
    push_dictionary(runs["a"], REPO, revision="crosscache")
    assert fake_hub.state(REPO)["main"] == before["main"]
    assert "pytorch_model.bin" not in fake_hub.files[REPO]["crosscache"]
    plan = push_dictionary(runs["a"], REPO, force=True)
    assert sorted(plan.deletes) == ["pytorch_model.bin"]
    assert json.loads(fake_hub.files[REPO]["main"]["config.json"])["format"] == "crosscache.dictionary/1"


def test_a_repush_of_the_same_dictionary_updates_the_card(runs, fake_hub, monkeypatch, capsys):
    push_dictionary(runs["a"], REPO)
    branch = fake_hub.files[REPO]["main"]
    branch["analysis/old_figure.png"] = b"from an older report"  # the old report's: replaced by the new one
    branch["notes.md"] = b"the owner's own notes"  # not the push's: kept
    branch["README.md"] = b"an older card"
    with safety.online(monkeypatch):
        assert run_train.main(["push", str(runs["a"]), "--repo", REPO, "--dry-run"]) == 0
    assert f"{REPO}: it holds this same dictionary" in capsys.readouterr().out
    fake_hub.log.clear()
    plan = push_dictionary(runs["a"], REPO)
    assert plan.contents is not None and plan.contents.state == "same"
    assert plan.deletes == ["analysis/old_figure.png"]
    assert len(_commits(fake_hub)) == 1
    branch = fake_hub.files[REPO]["main"]
    assert branch["README.md"] == plan.card.encode() and branch["notes.md"] == b"the owner's own notes"


def test_private_push_into_an_existing_public_repo_is_refused(runs, fake_hub, monkeypatch, capsys):
    fake_hub.put(REPO, {})  # made on the website: public, empty
    before = fake_hub.state(REPO)
    with pytest.raises(HubError, match=rf"--private: the repo {REPO} already is public.*huggingface\.co/{REPO}/settings"):
        push_dictionary(runs["a"], REPO, private=True)
    with safety.online(monkeypatch):
        assert run_train.main(["push", str(runs["a"]), "--repo", REPO, "--private", "--dry-run"]) == 2
    assert "already is public" in capsys.readouterr().err
    assert fake_hub.writes() == [] and fake_hub.state(REPO) == before
    push_dictionary(runs["a"], "bob/new", private=True)  # a new repo is created private
    assert fake_hub.private["bob/new"] is True


# --------------------------------------------------------------------------------------------
# what is refused before anything is looked at


def test_a_run_without_export_a_sweep_and_the_normalized_dictionary_are_refused(runs, tmp_path, capsys):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(runs["a"], unfinished, ignore=shutil.ignore_patterns("export"))
    assert run_train.main(["push", str(unfinished), "--repo", REPO, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "has no export/ yet: training has not finished" in err and "re-run the same `python run_train.py`" in err
    assert run_train.main(["push", str(runs["sweep"]), "--repo", REPO, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "is a sweep folder of 2 runs" in err
    assert f"python run_train.py push {runs['a']} --repo USER/NAME-a" in err and f"{runs['b']} --repo" in err
    assert run_train.main(["push", str(runs["a"] / "dictionary"), "--repo", REPO, "--dry-run"]) == 2
    assert "normalized activations" in capsys.readouterr().err
    for bad in ("toy-cc", "bob/toy--cc"):
        with pytest.raises(ValueError, match="USER/NAME"):
            push_dictionary(runs["a"], bad, dry_run=True)
    with pytest.raises(ValueError, match="branch"):
        push_dictionary(runs["a"], REPO, revision=COMMIT_A, dry_run=True)


def test_commands_that_read_a_local_run_say_so_for_a_hub_dictionary(capsys):
    """`analyze hf://...` said "hf:/bob/x is not a training run" (Path folded the spec): now what reads it."""
    for argv, needle in ((["analyze", f"hf://{REPO}"], f"hf://{REPO}: analyze reads a run folder on this machine"),
                         (["lm-eval", f"hf://{REPO}"], f"hf://{REPO}: lm-eval reads a run folder on this machine"),
                         (["push", f"hf://{REPO}", "--repo", REPO], f"hf://{REPO} is already on the Hub")):
        assert run_train.main(argv) == 2
        err = capsys.readouterr().err
        assert needle in err and "hf:/b" not in err, err


def test_tampered_weights_are_refused(runs, fake_hub, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs["a"], run)
    weights = run / "export" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x10  # one bit of the last tensor: the file still parses
    weights.write_bytes(bytes(data))
    assert run_train.main(["push", str(run), "--repo", REPO]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors does not match the weights_sha256 its config.json records" in err
    assert f"delete {run / 'export'} and re-run the same `python run_train.py` command" in err
    assert fake_hub.log == []  # refused before the repo was even looked at


# --------------------------------------------------------------------------------------------
# reading it back: hf://


def test_hf_load_gives_the_same_weights_and_latents(runs, fake_hub, hf_home):
    from huggingface_hub import scan_cache_dir

    push_dictionary(runs["a"], REPO)
    push_dictionary(runs["b"], REPO, revision="k3")
    snap = materialize(fake_hub)
    materialize(fake_hub, branch="k3")
    (repo,) = scan_cache_dir(hf_home / "hub").repos
    assert (repo.repo_id, repo.repo_type) == (REPO, "model") and {r.commit_hash for r in repo.revisions} >= {snap.name}

    local = load_dictionary(runs["a"] / "export")
    hub = load_dictionary(f"hf://{REPO}")
    assert hub.state_dict().keys() == local.state_dict().keys()
    assert all(torch.equal(v, local.state_dict()[k]) for k, v in hub.state_dict().items())
    x_BXiD = torch.randn(64, 2, D, generator=torch.Generator().manual_seed(3))
    assert torch.equal(hub.encode(x_BXiD), local.encode(x_BXiD))
    assert torch.equal(hub(x_BXiD).recon_BXoD, local(x_BXiD).recon_BXoD)
    assert load_metadata(f"hf://{REPO}") == json.loads(fake_hub.files[REPO]["main"]["config.json"])["metadata"]
    other = load_dictionary(f"hf://{REPO}@k3")
    assert torch.equal(other.W_enc_XiDL, load_dictionary(runs["b"] / "export").W_enc_XiDL)
    assert not torch.equal(other.W_enc_XiDL, hub.W_enc_XiDL)


def test_offline_a_damaged_cached_blob_is_removed_with_a_clear_error(runs, fake_hub, hf_home):
    push_dictionary(runs["a"], REPO)
    snap = materialize(fake_hub)
    blob = Path(os.path.realpath(snap / "model.safetensors"))
    data = bytearray(blob.read_bytes())
    data[-3] ^= 0x10
    blob.write_bytes(bytes(data))
    with pytest.raises(HubError, match=r"damaged.*have been removed: model\.safetensors.*HF_HUB_OFFLINE=1"):
        load_dictionary(f"hf://{REPO}")
    assert not blob.exists() and not (snap / "model.safetensors").exists()  # huggingface_hub would reuse it
    materialize(fake_hub)  # what a download online puts back
    assert torch.equal(load_dictionary(f"hf://{REPO}").W_enc_XiDL, load_dictionary(runs["a"] / "export").W_enc_XiDL)


def test_wrong_repo_kind_is_a_clear_error(runs, hf_home, tmp_path):
    publish(hf_home / "hub", "bob/acts", _cache(tmp_path / "c"), COMMIT_A)  # a cache: a dataset repo
    with pytest.raises(HubError, match=r"bob/acts is a dataset repo \(a crosscache cache\?\), not a model repo"):
        load_dictionary("hf://bob/acts")
    with pytest.raises(ValueError, match="names a dataset repo, where crosscache keeps caches"):
        load_dictionary("hf://datasets/bob/acts")
    _lay_out(hf_home / "hub", "bob/gpt", COMMIT_A, {"config.json": b'{"model_type": "gpt2"}', "README.md": b"#"})
    with pytest.raises(HubError, match=r"not a crosscache dictionary.*model_type 'gpt2'"):
        load_metadata("hf://bob/gpt")
    with pytest.raises(HubError, match=r"cannot download bob/nothing.*HF_HUB_OFFLINE=1"):
        load_dictionary("hf://bob/nothing")
    # A model repo whose main holds no dictionary: it may be on the branch it was pushed to.
    _lay_out(hf_home / "hub", "bob/onbranch", COMMIT_A, {"README.md": b"#"})
    with pytest.raises(HubError, match=r"has no config\.json.*one pushed with --revision is on that branch: "
                                       r"hf://bob/onbranch@BRANCH\."):
        load_dictionary("hf://bob/onbranch")
    with pytest.raises(HubError, match=r"has no config\.json") as named:
        load_dictionary("hf://bob/onbranch@main")
    assert "@BRANCH" not in str(named.value)
    with pytest.raises(ValueError, match="bad Hub dictionary"):
        load_dictionary("hf://bob")
    # The other way round: a model repo opened as a cache said "dataset repo not found".
    with pytest.raises(HubError, match=r"cannot download bob/gpt.*\(note: bob/gpt is a model repo \(a crosscache "
                                       r"dictionary\?\), not a dataset repo"):  # a hint: the real error stands
        resolve_cache("hf://bob/gpt")
    with pytest.raises(HubError, match=r"cannot download bob/nothing"):
        resolve_cache("hf://bob/nothing")


# --------------------------------------------------------------------------------------------
# online: a damaged download is fetched once more, from a Hub served on 127.0.0.1


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    """Model repos as the Hub serves them to ``snapshot_download``: revision info, tree, ``/resolve/``."""

    server: _Server

    def log_message(self, *args) -> None:
        pass

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, write=True) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if write:
            self.wfile.write(body)

    def _answer(self, body: bool) -> None:
        srv = self.server
        path = unquote(urlsplit(self.path).path)
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/(.+)", path):
            if m[1] not in srv.files:
                return self._send(404, headers={"X-Error-Code": "RepoNotFound"})
            return self._send(200, json.dumps({"id": m[1], "sha": COMMIT_A, "private": False}).encode(),
                              {"Content-Type": "application/json"})
        if m := re.fullmatch(r"/api/datasets/([^/]+/[^/]+)(?:/revision/.+)?", path):
            if m[1] not in srv.datasets:
                return self._send(404, headers={"X-Error-Code": "RepoNotFound"})
            return self._send(200, json.dumps({"id": m[1], "sha": COMMIT_A, "private": False}).encode(),
                              {"Content-Type": "application/json"})
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)", path):
            if m[1] not in srv.files:
                return self._send(404, headers={"X-Error-Code": "RepoNotFound"})
            tree = [{"type": "file", "path": p, "size": len(d), "oid": _git_blob_sha1(d),
                     **({"lfs": {"oid": hashlib.sha256(d).hexdigest(), "size": len(d), "pointerSize": 134}}
                        if p.endswith(".safetensors") else {})} for p, d in sorted(srv.files[m[1]].items())]
            return self._send(200, json.dumps(tree).encode(), {"Content-Type": "application/json"})
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m is None or m[1] not in srv.files or m[3] not in srv.files[m[1]]:
            return self._send(404, headers={"X-Error-Code": "EntryNotFound"})
        rel, data = m[3], srv.files[m[1]][m[3]]
        headers = {"X-Repo-Commit": COMMIT_A}
        if rel.endswith(".safetensors"):
            sha = hashlib.sha256(data).hexdigest()
            headers.update({"X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data)), "ETag": f'"{sha}"'})
        else:
            headers["ETag"] = f'"{_git_blob_sha1(data)}"'
        if body:
            srv.gets[rel] += 1
        self._send(200, srv.in_transit.get(rel, data), headers, write=body)  # HEAD: the headers GET would send
        return None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    files: dict[str, dict[str, bytes]]  # model repos: repo -> {path: bytes}
    datasets: set[str]  # dataset repos that exist (asked about by name only)
    in_transit: dict[str, bytes]
    gets: Counter


@pytest.fixture
def http_hub(hf_home, monkeypatch) -> _Server:
    server = _Server(("127.0.0.1", 0), _Handler)
    server.files, server.datasets, server.in_transit, server.gets = {}, set(), {}, Counter()
    serve_as_hub(server, monkeypatch)
    yield server
    server.shutdown()
    server.server_close()


def test_a_damaged_download_is_downloaded_again_once(runs, http_hub, hf_home):
    export = runs["a"] / "export"
    http_hub.files[REPO] = {"config.json": (export / "config.json").read_bytes(), "README.md": b"# card\n",
                            "model.safetensors": (export / "model.safetensors").read_bytes()}
    local = load_dictionary(runs["a"] / "export")
    first = load_dictionary(f"hf://{REPO}")
    assert torch.equal(first.W_enc_XiDL, local.W_enc_XiDL)
    snap = hf_home / "hub" / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT_A
    assert sorted(p.name for p in snap.iterdir()) == ["config.json", "model.safetensors"]  # only those two
    assert http_hub.gets["model.safetensors"] == 1

    blob = Path(os.path.realpath(snap / "model.safetensors"))  # a bit flips on disk
    data = bytearray(blob.read_bytes())
    data[-3] ^= 0x10
    blob.write_bytes(bytes(data))
    assert torch.equal(load_dictionary(f"hf://{REPO}").W_enc_XiDL, local.W_enc_XiDL)
    assert http_hub.gets["model.safetensors"] == 2  # downloaded once more, then right

    # Damaged on its way every time (a proxy): one more download, then a clear error.
    bad = bytearray(http_hub.files[REPO]["model.safetensors"])
    bad[-3] ^= 0x10
    http_hub.in_transit["model.safetensors"] = bytes(bad)
    blob = Path(os.path.realpath(snap / "model.safetensors"))
    blob.write_bytes(bytes(bad))
    with pytest.raises(HubError, match=r"fails its sha256 check against config\.json even after downloading it again"):
        load_dictionary(f"hf://{REPO}")
    assert http_hub.gets["model.safetensors"] == 3
    # Online, a name that is a dataset repo (a cache) is said to be one; a name that is nothing is not found.
    http_hub.datasets.add("bob/acts")
    with pytest.raises(HubError, match=r"bob/acts is a dataset repo \(a crosscache cache\?\)"):
        load_dictionary("hf://bob/acts")
    with pytest.raises(HubError, match=r"model repo bob/missing not found on the Hub.*dictionaries are \*model\* repos"):
        load_dictionary("hf://bob/missing")
