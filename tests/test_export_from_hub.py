"""Converting a dictionary from the Hub: ``export-saelens hf://...`` and ``export-circuit-tracer hf://...``.

Nothing here reaches the Hub. Three tiny real runs (two per-layer transcoders, one with a BatchTopK
skip, and a 2-layer CLT, one loader stream) are pushed with ``run_train.py push``'s own code to
tests/test_hub_dictionary.py's in-memory model Hub, laid out in an offline Hugging Face cache
(``materialize``), and converted from ``hf://``; the result is compared with the conversion of the
local run. One conversion runs the real
``huggingface_hub`` download code against that file's HTTP server on 127.0.0.1.

``HOME`` is a folder in the test's tmp folder holding the cache, so the cache path the export
publishes (``~/caches/c``) resolves here, as it does for a researcher converting their own pushed
dictionary (whatever the user name in pytest's tmp path).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

import run_train
import tests.test_hub as _test_hub
import tests.test_hub_dictionary as _hub_dict
from tests.cache_factory import make_cache
from tests.test_hub import COMMIT_A
from tests.test_hub_dictionary import materialize
from train.config import TrainConfig
from train.export_circuit_tracer import export_circuit_tracer
from train.export_saelens import export_saelens
from train.hub_dictionary import push_dictionary
from train.trainer import train_many

# The fixtures of tests/test_hub_dictionary.py: an offline HF cache, the in-memory model Hub, the HTTP Hub.
hf_home = _test_hub.hf_home
fake_hub = _hub_dict.fake_hub
http_hub = _hub_dict.http_hub

D, N_LAYERS = 16, 2
MODEL, REVISION = "org/tiny-llm@v2", "v2"  # a Hub id with a revision, as a harvest names it
MLP_IN = [f"blocks.{l}.hook_mlp_in" for l in range(N_LAYERS)]  # a hook SAELens and circuit-tracer both tap
MLP_OUT = [f"blocks.{l}.hook_mlp_out" for l in range(N_LAYERS)]
# Provenance: where the files came from (differs between a local run and its pushed copy by design); and
# the written file's sha256, which differs between any two exports: safetensors writes the header's
# __metadata__ keys in an order that varies from call to call (the tensors are compared instead).
SAELENS_SOURCE_FIELDS = ("run", "export", "hub_commit", "weights_sha256")
CT_SOURCE_FIELDS = ("run", "hub_commit")


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("machine") / "home"


@pytest.fixture(autouse=True)
def at_home(home, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(home))


@pytest.fixture(scope="module")
def runs(home) -> dict[str, Path]:
    """A batchtopk skip transcoder (layer 0), a relu one (layer 1) and a relu CLT (layers 0..1), from one stream."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(home))
        cache = home / "caches" / "c"
        make_cache(cache, n_shards=2, rows_per_shard=256, n_models=1, n_hooks=2 * N_LAYERS, d_model=D,
                   dtype=torch.float32, tag=False, model_names=[MODEL], hook_names=MLP_IN + MLP_OUT)
        manifest = json.loads((cache / "manifest.json").read_text())
        manifest["models"][0].update(revision=REVISION, n_layers=N_LAYERS, d_model=D)  # as a harvest records them
        (cache / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        root = home / "runs"
        common = dict(cache=str(cache), latents=32, steps=12, batch_size=128, lr=3e-3, log_every=6,
                      checkpoint_every=1000, eval_batches=1, progress=False, device="cpu")
        train_many([
            TrainConfig(out=str(root / "tc"), arch="directional", in_hooks=MLP_IN[:1], out_hooks=MLP_OUT[:1],
                        activation="batchtopk", k=4, skip=True, **common),
            TrainConfig(out=str(root / "clt"), arch="clt", in_hooks=MLP_IN, out_hooks=MLP_OUT, **common),
            TrainConfig(out=str(root / "tc1"), arch="directional", in_hooks=MLP_IN[1:], out_hooks=MLP_OUT[1:],
                        **common),
        ])
    return {"tc": root / "tc", "tc1": root / "tc1", "clt": root / "clt", "cache": cache}


def _pushed(hub, run: Path, repo: str) -> str:
    """Push ``run`` to ``repo`` (the in-memory Hub), lay it out in the offline HF cache; its commit."""
    push_dictionary(run, repo)
    materialize(hub, repo)
    return hub.heads[repo]["main"]


def _same_tensors(a: Path, b: Path) -> None:
    """The same tensors (names, dtypes, values) and header metadata: safetensors' header key order varies by run."""
    with safe_open(a, "pt") as fa, safe_open(b, "pt") as fb:
        assert fa.metadata() == fb.metadata() and sorted(fa.keys()) == sorted(fb.keys())
        for k in fa.keys():
            ta, tb = fa.get_tensor(k), fb.get_tensor(k)
            assert ta.dtype == tb.dtype and torch.equal(ta, tb), (a.name, k)


def _without(cfg: dict, block: dict, fields: tuple[str, ...]) -> dict:
    """``cfg`` (as parsed) with ``fields`` of its provenance ``block`` (an object inside it) dropped."""
    for f in fields:
        block.pop(f)
    return cfg


# ---- SAELens --------------------------------------------------------------------------------------
def test_saelens_from_hub_matches_the_local_run(runs, fake_hub, tmp_path, capsys):
    commit = _pushed(fake_hub, runs["tc"], "bob/tc")
    local = export_saelens(runs["tc"], tmp_path / "local")
    assert run_train.main(["export-saelens", "hf://bob/tc", "--out", str(tmp_path / "hub")]) == 0
    out = capsys.readouterr()
    assert "wrote SAELens jumprelu_skip_transcoder" in out.out and "note:" not in out.out  # context size found
    hub = tmp_path / "hub"
    _same_tensors(hub / "sae_weights.safetensors", local / "sae_weights.safetensors")

    mine, theirs = (json.loads((d / "cfg.json").read_text()) for d in (local, hub))
    prov = theirs["metadata"]["crosscache"]
    assert (prov["export"], prov["hub_commit"], prov["run"]) == ("hf://bob/tc", commit, None)
    assert mine["metadata"]["crosscache"]["hub_commit"] is None
    assert prov["weights_sha256"] == hashlib.sha256((hub / "sae_weights.safetensors").read_bytes()).hexdigest()
    assert mine["metadata"]["context_size"] == 33 and mine["metadata"]["crosscache"]["model_revision"] == REVISION
    assert (mine["metadata"]["hook_name"], mine["metadata"]["hook_name_out"]) == (  # the tensor hook_mlp_in holds,
        "blocks.0.hook_resid_mid", "blocks.0.hook_mlp_out")  # where HookedTransformer fires it
    assert _without(theirs, prov, SAELENS_SOURCE_FIELDS) == _without(mine, mine["metadata"]["crosscache"],
                                                                     SAELENS_SOURCE_FIELDS)

    # A commit pins it: the same files, and the spec recorded as given.
    assert export_saelens(f"hf://bob/tc@{commit}", tmp_path / "pinned") == tmp_path / "pinned"
    pinned = json.loads((tmp_path / "pinned" / "cfg.json").read_text())["metadata"]["crosscache"]
    assert (pinned["export"], pinned["hub_commit"]) == (f"hf://bob/tc@{commit}", commit)
    _same_tensors(tmp_path / "pinned" / "sae_weights.safetensors", hub / "sae_weights.safetensors")


def test_saelens_downloads_from_the_hub_and_records_the_commit(runs, http_hub, hf_home, tmp_path, capsys):
    """The real huggingface_hub download (HTTP on 127.0.0.1): only config.json and the weights are fetched."""
    export = runs["tc"] / "export"
    http_hub.files["bob/tc"] = {"config.json": (export / "config.json").read_bytes(), "README.md": b"# card\n",
                                "curves.png": b"\x89PNG",
                                "model.safetensors": (export / "model.safetensors").read_bytes()}
    assert run_train.main(["export-saelens", "hf://bob/tc", "--out", str(tmp_path / "sl")]) == 0
    prov = json.loads((tmp_path / "sl" / "cfg.json").read_text())["metadata"]["crosscache"]
    assert (prov["export"], prov["hub_commit"]) == ("hf://bob/tc", COMMIT_A)
    assert set(http_hub.gets) == {"config.json", "model.safetensors"}
    # Online, a repo that is not there is the fetch's own clear error, through the CLI.
    assert run_train.main(["export-saelens", "hf://bob/missing", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err  # huggingface_hub's progress bars come first
    assert err.splitlines()[-1].startswith("error: hf://bob/missing: model repo bob/missing not found on the Hub")
    assert "Traceback" not in err
    assert not (tmp_path / "x").exists()


# ---- circuit-tracer ---------------------------------------------------------------------------------
def test_circuit_tracer_from_hub_matches_the_local_run(runs, fake_hub, tmp_path, capsys):
    """The push uploads no run config.json; the export's metadata.harvest gives the depth and revision."""
    commit = _pushed(fake_hub, runs["clt"], "bob/clt")
    local = export_circuit_tracer(runs["clt"], tmp_path / "local")
    hub = tmp_path / "hub"
    assert run_train.main(["export-circuit-tracer", "hf://bob/clt", "--out", str(hub)]) == 0
    assert "wrote cross_layer_transcoder for org/tiny-llm (2 layers" in capsys.readouterr().out

    files = sorted(p.name for p in local.iterdir())
    assert sorted(p.name for p in hub.iterdir()) == files and len(files) == 1 + 2 * N_LAYERS
    for name in files:
        if name.endswith(".safetensors"):
            _same_tensors(hub / name, local / name)
    mine, theirs = (yaml.safe_load((d / "config.yaml").read_text()) for d in (local, hub))
    run = theirs["crosscache"]["runs"][0]
    assert (run["run"], run["hub_commit"]) == ("hf://bob/clt", commit)
    assert mine["crosscache"]["runs"][0]["hub_commit"] is None
    assert (theirs["model_name"], theirs["scan"], theirs["crosscache"]["model_revision"]) == \
        ("org/tiny-llm", "crosscache/clt", REVISION)
    assert _without(theirs, run, CT_SOURCE_FIELDS) == _without(mine, mine["crosscache"]["runs"][0], CT_SOURCE_FIELDS)


def _old_style_run(run: Path, dest: Path) -> Path:
    """A copy of ``run`` whose export predates ``metadata.harvest`` (as a dictionary pushed before it was)."""
    shutil.copytree(run, dest)
    cfg_file = dest / "export" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    del cfg["metadata"]["harvest"]
    cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return dest


def test_an_older_hub_export_needs_n_layers(runs, fake_hub, tmp_path, capsys):
    _pushed(fake_hub, _old_style_run(runs["clt"], tmp_path / "old"), "bob/old-clt")
    hub = tmp_path / "hub"
    assert run_train.main(["export-circuit-tracer", "hf://bob/old-clt", "--out", str(hub)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: hf://bob/old-clt: nothing records how many layers org/tiny-llm@v2 has")
    assert "--n-layers N" in err and "Traceback" not in err and not hub.exists()
    assert run_train.main(["export-circuit-tracer", "hf://bob/old-clt", "--out", str(hub), "--n-layers", "2"]) == 0
    same = export_circuit_tracer(runs["clt"], tmp_path / "local")
    for name in ("W_enc_0.safetensors", "W_dec_1.safetensors"):
        _same_tensors(hub / name, same / name)
    # The revision then comes from the Hub id's @REV, as the harvest parsed it.
    assert yaml.safe_load((hub / "config.yaml").read_text())["crosscache"]["model_revision"] == REVISION


def test_an_export_copied_away_from_its_run_and_cache_still_converts(runs, home, tmp_path, monkeypatch):
    """export/ alone, on a machine without the cache (HOME elsewhere: ~/caches/c is not there): both
    converters take the depth, revision, context size and dataset from metadata.harvest."""
    monkeypatch.setenv("HOME", str(tmp_path / "elsewhere"))
    clt, tc = tmp_path / "clt-export", tmp_path / "tc-export"
    shutil.copytree(runs["clt"] / "export", clt)
    shutil.copytree(runs["tc"] / "export", tc)
    ct = yaml.safe_load((export_circuit_tracer(clt, tmp_path / "ct") / "config.yaml").read_text())
    assert (ct["model_kind"], ct["crosscache"]["n_layers"], ct["crosscache"]["model_revision"]) == \
        ("cross_layer_transcoder", N_LAYERS, REVISION)
    meta = json.loads((export_saelens(tc, tmp_path / "sl") / "cfg.json").read_text())["metadata"]
    assert (meta["context_size"], meta["crosscache"]["model_revision"]) == (33, REVISION)
    # Without the record, nothing on this machine gives them.
    old = shutil.copytree(_old_style_run(runs["tc"], tmp_path / "old-tc") / "export", tmp_path / "old-tc-export")
    meta = json.loads((export_saelens(old, tmp_path / "sl-old") / "cfg.json").read_text())["metadata"]
    assert (meta["context_size"], meta["crosscache"]["model_revision"]) == (None, None)


def test_a_transcoder_set_mixes_hub_and_local_runs(runs, fake_hub, tmp_path):
    """Layer 0 from the Hub, layer 1 a local run."""
    commit = _pushed(fake_hub, runs["tc"], "bob/tc")
    local = export_circuit_tracer([runs["tc"], runs["tc1"]], tmp_path / "local")
    mixed = export_circuit_tracer(["hf://bob/tc", runs["tc1"]], tmp_path / "mixed")
    for l in range(N_LAYERS):
        _same_tensors(mixed / f"layer_{l}.safetensors", local / f"layer_{l}.safetensors")
    mine, theirs = (yaml.safe_load((d / "config.yaml").read_text()) for d in (local, mixed))
    assert [(r["run"], r["hub_commit"]) for r in theirs["crosscache"]["runs"]] == [
        ("hf://bob/tc", commit), ("~/runs/tc1", None)]
    assert (mine["scan"], theirs["scan"]) == ("crosscache/runs", "crosscache/tc")  # the sweep folder; the repo
    for cfg in (mine, theirs):
        cfg.pop("scan")
    assert _without(theirs, theirs["crosscache"]["runs"][0], CT_SOURCE_FIELDS) == \
        _without(mine, mine["crosscache"]["runs"][0], CT_SOURCE_FIELDS)
    assert theirs["model_kind"] == "transcoder_set" and theirs["crosscache"]["model_revision"] == REVISION


# ---- bad specs --------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["export-saelens", "export-circuit-tracer"])
@pytest.mark.parametrize("spec,message", [
    ("hf://bob", "error: bad Hub dictionary 'hf://bob': expected hf://USER/NAME or hf://USER/NAME@REVISION"),
    ("hf://datasets/bob/acts", "error: hf://datasets/bob/acts names a dataset repo, where crosscache keeps caches"),
    ("hf://bob/nothing", "error: hf://bob/nothing: cannot download bob/nothing: the Hub cannot be reached and the "
                         "local Hugging Face cache has no complete copy of it. Offline mode is on (HF_HUB_OFFLINE=1)"),
])
def test_bad_or_unavailable_specs_are_clear_errors_through_the_cli(hf_home, tmp_path, capsys, command, spec, message):
    assert run_train.main([command, spec, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and "Traceback" not in err
    assert not (tmp_path / "out").exists()
