"""SAELens export (train/export_saelens.py): tiny real runs, exported, then run through SAELens's
inference forward re-implemented here from the format alone, against our Dictionary on raw rows.

The cache is synthetic with a ``mean_std`` normalization (per-dimension mean and std, different
for the two hooks): the hardest case to fold, since the TopK score's per-latent scale then
differs between latents and only folding it into the weights keeps SAELens's ranking ours.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from cache_factory import make_cache
from safetensors.torch import load_file

import run_train
from shared.cache import open_cache
from shared.normalization import Normalization
from train.config import TrainConfig
from train.dictionary import Dictionary, DictionaryConfig
from train.export import load_dictionary, save_dictionary
from train.export_saelens import SAELensExportError, export_saelens
from train.trainer import train_many

D, L, K = 16, 32, 4
HOOK_IN, HOOK_OUT = "blocks.0.hook_mlp_in", "blocks.0.hook_mlp_out"
HOME = str(Path.home())
MODEL = str(Path.home() / "models" / "tiny-llm")  # a local model folder: the export must not write it as is

TRANSCODER = {"arch": "directional", "in_hooks": [HOOK_IN], "out_hooks": [HOOK_OUT]}
SAE = {"hooks": [HOOK_IN]}
CASES: dict[str, tuple[dict, str]] = {  # run name -> (TrainConfig overrides, SAELens architecture)
    "relu": ({**SAE, "activation": "relu"}, "standard"),
    "jumprelu": ({**SAE, "activation": "jumprelu"}, "jumprelu"),
    "topk": ({**SAE, "activation": "topk", "k": K}, "topk"),
    "batchtopk": ({**SAE, "activation": "batchtopk", "k": K}, "jumprelu"),
    "transcoder": ({**TRANSCODER, "activation": "relu"}, "transcoder"),
    "skip_transcoder": ({**TRANSCODER, "activation": "relu", "skip": True}, "skip_transcoder"),
    "batchtopk_transcoder": ({**TRANSCODER, "activation": "batchtopk", "k": K}, "jumprelu_transcoder"),
    "batchtopk_skip_transcoder": ({**TRANSCODER, "activation": "batchtopk", "k": K, "skip": True},
                                  "jumprelu_skip_transcoder"),
}
TENSORS = {"standard": set(), "topk": set(), "transcoder": set(), "jumprelu": {"threshold"},
           "jumprelu_transcoder": {"threshold"}, "skip_transcoder": {"W_skip"},
           "jumprelu_skip_transcoder": {"threshold", "W_skip"}}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("saelens") / "cache"
    make_cache(path, n_shards=4, rows_per_shard=256, n_models=1, n_hooks=2, d_model=D, dtype=torch.float32,
               tag=False, model_names=[MODEL], hook_names=[HOOK_IN, HOOK_OUT])
    gen = torch.Generator().manual_seed(1)
    norm = Normalization("mean_std", torch.ones(1, 2), torch.randn(1, 2, D, generator=gen),
                         0.3 + 2.0 * torch.rand(1, 2, D, generator=gen))
    norm.write_side_file(path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["normalization"] = norm.to_manifest(calibration_rows=256)
    manifest["models"][0]["parallel_attn_mlp"] = False  # hook_mlp_in is then hook_resid_mid for SAELens
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


@pytest.fixture(scope="module")
def runs(cache, tmp_path_factory) -> dict[str, Path]:
    """Every case trained from one loader stream (train_many), 20 steps each."""
    root = tmp_path_factory.mktemp("saelens_runs")
    cfgs = [TrainConfig(cache=str(cache), out=str(root / name), latents=L, steps=20, batch_size=128, lr=3e-3,
                        log_every=10, checkpoint_every=1000, eval_batches=1, progress=False, device="cpu", **kw)
            for name, (kw, _) in CASES.items()]
    train_many(cfgs)
    return {name: root / name for name in CASES}


@pytest.fixture(scope="module")
def raw_rows(cache) -> torch.Tensor:
    """256 raw-space rows [N, hooks, D] (the cache stores them normalized)."""
    c = open_cache(cache)
    return c.normalization().undo(c.shard(0).acts[:256].float())[:, 0]


def saelens_forward(folder: Path, x_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAELens 6.x inference, from cfg.json and sae_weights.safetensors alone: (latents, output).

    ``encode``: pre = (x − b_dec·apply_b_dec_to_input) @ W_enc + b_enc; standard/transcoders: relu;
    jumprelu*: relu(pre)·(pre > threshold); topk: the k largest pre, relu'd, others 0.
    ``decode``: latents @ W_dec + b_dec; skip transcoders' forward adds x @ W_skip.T.
    """
    cfg = json.loads((folder / "cfg.json").read_text())
    W = load_file(folder / "sae_weights.safetensors")
    assert cfg["normalize_activations"] == "none" and cfg["reshape_activations"] == "none"
    arch = cfg["architecture"]
    x = x_BD.to(getattr(torch, cfg["dtype"]))
    sae_in = x - W["b_dec"] if cfg["apply_b_dec_to_input"] else x
    pre = sae_in @ W["W_enc"] + W["b_enc"]
    if arch == "topk":
        vals, idx = pre.topk(cfg["k"], dim=-1, sorted=False)
        acts = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
    elif arch.startswith("jumprelu"):
        acts = pre.relu() * (pre > W["threshold"])
    else:
        acts = pre.relu()
    out = acts @ W["W_dec"] + W["b_dec"]
    if "W_skip" in W:
        out = out + x @ W["W_skip"].T
    return acts, out


def ours(model: Dictionary, x_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        res = model(x_BD[:, None], inference=True)
    return res.latents_BL, res.recon_BXoD[:, 0]


def score_factor(model: Dictionary) -> torch.Tensor:
    """What our topk/batchtopk multiply relu(pre) by to rank latents (ones for relu/jumprelu)."""
    if model.cfg.activation not in ("topk", "batchtopk"):
        return torch.ones(model.cfg.n_latents)
    return (model.decoder_norms().sum(-1) * model.score_scale_L).detach()


@pytest.mark.parametrize("name", list(CASES))
def test_saelens_forward_reproduces_the_dictionary(runs, raw_rows, tmp_path, name):
    overrides, arch = CASES[name]
    out = export_saelens(runs[name], tmp_path / "sl")
    cfg = json.loads((out / "cfg.json").read_text())
    tensors = load_file(out / "sae_weights.safetensors")
    model = load_dictionary(runs[name] / "export")
    transcoder = overrides.get("arch") == "directional"

    assert cfg["architecture"] == arch
    assert set(tensors) == {"W_enc", "b_enc", "W_dec", "b_dec"} | TENSORS[arch]
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"]) == (D, L, "float32")
    assert cfg["apply_b_dec_to_input"] is False
    assert tuple(tensors["W_enc"].shape) == (D, L) and tuple(tensors["W_dec"].shape) == (L, D)
    meta = cfg["metadata"]
    assert meta["hook_name"] == "blocks.0.hook_resid_mid" and meta["context_size"] == 33 and meta["prepend_bos"] is True
    assert int(meta["sae_lens_version"].split(".")[0]) >= 6  # older reads as SAELens's legacy format
    assert meta["model_from_pretrained_kwargs"] == {}  # the unprocessed model, as harvested
    assert meta["crosscache"]["norm_folded"] is None
    assert meta["crosscache"]["step"] == 20 and meta["crosscache"]["activation"] == overrides["activation"]
    if transcoder:
        assert cfg["d_out"] == D and meta["hook_name_out"] == HOOK_OUT
    if arch == "topk":
        assert cfg["k"] == K and cfg["rescale_acts_by_decoder_norm"] is False

    x_in = raw_rows[:, 0]
    sl_acts, sl_out = saelens_forward(out, x_in)
    our_acts, our_out = ours(model, x_in)
    assert 0 < (our_acts > 0).sum(-1).float().mean() < L  # a real sparse code, not all on or off
    assert torch.equal(sl_acts > 0, our_acts > 0)
    c_L = score_factor(model)
    if overrides["activation"] in ("topk", "batchtopk"):
        assert float(c_L.std() / c_L.mean()) > 0.01  # mean_std: the per-latent scale really matters here
    torch.testing.assert_close(sl_acts, our_acts * c_L, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sl_out, our_out, rtol=1e-4, atol=1e-4)
    if overrides.get("skip"):
        assert tensors["W_skip"].abs().max() > 0  # the trained skip is really exercised


def test_no_home_path_in_cfg_and_provenance(runs, tmp_path):
    out = export_saelens(runs["topk"] / "export", tmp_path / "sl")  # the export folder works too
    text = (out / "cfg.json").read_text()
    meta = json.loads(text)["metadata"]
    assert meta["model_name"] == "~/models/tiny-llm"
    if len(Path(HOME).parts) >= 2:
        assert HOME not in text
    assert meta["crosscache"]["run"] is not None and meta["crosscache"]["export_weights_sha256"]


def test_the_same_dictionary_exports_to_the_same_bytes(runs, tmp_path):
    """Exports of one dictionary are byte-identical, so cfg.json's weights_sha256 names the weights: the
    safetensors header's metadata had two keys, which safetensors writes in hash-map order (it varied)."""
    outs = [export_saelens(runs["topk"], tmp_path / f"sl{i}") for i in range(6)]
    blobs = {(o / "sae_weights.safetensors").read_bytes() for o in outs}
    shas = {json.loads((o / "cfg.json").read_text())["metadata"]["crosscache"]["weights_sha256"] for o in outs}
    assert len(blobs) == 1 and len(shas) == 1


def _saved(tmp_path: Path, name: str, **cfg_kw) -> Path:
    """An export folder of an untrained dictionary with config ``cfg_kw`` (refusals need no training)."""
    kw = {"arch": "crosscoder", "activation": "relu", "d_model": D, "n_latents": L, "in_slots": [0],
          "out_slots": [0], "slot_names": [f"m/{HOOK_IN}"], **cfg_kw}
    path = tmp_path / name
    save_dictionary(path, Dictionary(DictionaryConfig(**kw)), {"space": "raw", "step": 0})
    return path


TWO_MODELS = {"in_slots": [0, 1], "out_slots": [0, 1], "slot_names": ["a/h", "b/h"]}
REFUSALS: dict[str, tuple[dict, str]] = {  # case -> (DictionaryConfig fields, part of the reason)
    "model diffing crosscoder": (TWO_MODELS, "no crosscoder format"),
    "shared latents": ({**TWO_MODELS, "shared_latents": 4}, "shared latents"),
    "clt": ({"arch": "clt", "in_slots": [0, 1], "out_slots": [2, 3], "slot_names": ["m/i0", "m/i1", "m/o0", "m/o1"]},
            "no CLT format"),
    "two output hooks": ({"arch": "directional", "in_slots": [0], "out_slots": [1, 2],
                          "slot_names": ["m/a", "m/b", "m/c"]}, "no crosscoder format"),
    "across models": ({"arch": "directional", "in_slots": [0], "out_slots": [1], "slot_names": ["a/h", "b/h"]},
                      "names one model"),
    "topk transcoder": ({"arch": "directional", "activation": "topk", "k": K, "in_slots": [0], "out_slots": [1],
                         "slot_names": ["m/a", "m/b"]}, "no TopK transcoder"),
    "untrained batchtopk": ({"activation": "batchtopk", "k": K}, "no learned inference threshold"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_unsupported_dictionaries_are_refused_with_the_reason(tmp_path, case):
    kw, reason = REFUSALS[case]
    src = _saved(tmp_path, "export", **kw)
    with pytest.raises(SAELensExportError, match=reason) as err:
        export_saelens(src, tmp_path / "sl")
    if case != "untrained batchtopk":
        assert "load_dictionary" in str(err.value) or "batchtopk" in str(err.value)  # says what to use instead
    assert not (tmp_path / "sl").exists()  # nothing half-written


def test_cli(runs, tmp_path, capsys):
    assert run_train.main(["export-saelens", str(runs["relu"]), "--out", str(tmp_path / "sl"),
                           "--context-size", "64"]) == 0
    printed = capsys.readouterr().out
    assert "standard" in printed
    # The model was harvested from a folder: transformer-lens would not know model_name, and the note says so.
    assert "note: the model was harvested from a local folder" in printed and "--model-name" in printed
    meta = json.loads((tmp_path / "sl" / "cfg.json").read_text())["metadata"]
    assert meta["context_size"] == 64 and meta["crosscache"]["model_from_local_folder"] is True
    assert run_train.main(["export-saelens", str(runs["relu"]), "--out", str(tmp_path / "named"),
                           "--model-name", "meta-llama/Llama-3.2-1B"]) == 0
    assert "note: the model" not in capsys.readouterr().out
    meta = json.loads((tmp_path / "named" / "cfg.json").read_text())["metadata"]
    assert meta["model_name"] == "meta-llama/Llama-3.2-1B" and meta["crosscache"]["model"] == "~/models/tiny-llm"
    assert run_train.main(["export-saelens", str(runs["relu"]), "--out", str(tmp_path / "x"),
                           "--model-name", " "]) == 2
    assert "--model-name is empty" in capsys.readouterr().err
    # The cache moved away: the context size the run recorded is used.
    moved = tmp_path / "moved"
    shutil.copytree(runs["relu"], moved)
    info = json.loads((moved / "config.json").read_text())
    info["cache"]["path"] = str(tmp_path / "gone")
    (moved / "config.json").write_text(json.dumps(info))
    export_cfg = json.loads((moved / "export" / "config.json").read_text())
    export_cfg["metadata"]["cache"] = str(tmp_path / "gone")
    (moved / "export" / "config.json").write_text(json.dumps(export_cfg))
    assert run_train.main(["export-saelens", str(moved), "--out", str(tmp_path / "sl2")]) == 0
    assert json.loads((tmp_path / "sl2" / "cfg.json").read_text())["metadata"]["context_size"] == 33
    # exclude_special_tokens: the ids the harvest dropped; a record with only the flag, or none (another
    # tool's cache), gives the flag (absent: nothing excluded, SAELens's default), never a guess of True.
    harvested_ids = export_cfg["metadata"]["harvest"]["excluded_tokens"]["token_ids"]
    assert harvested_ids and meta["exclude_special_tokens"] == harvested_ids
    for record, written in (({}, False), ({"special": True}, True), ({"special": False, "token_ids": []}, [])):
        export_cfg["metadata"]["harvest"]["excluded_tokens"] = record
        (moved / "export" / "config.json").write_text(json.dumps(export_cfg))
        assert run_train.main(["export-saelens", str(moved), "--out", str(tmp_path / "sl3")]) == 0
        assert json.loads((tmp_path / "sl3" / "cfg.json").read_text())["metadata"]["exclude_special_tokens"] == written
    # errors: a refused dictionary, the normalized-space copy, a folder that is no run
    bad = _saved(tmp_path, "cc", **TWO_MODELS)
    for src in (bad, runs["relu"] / "dictionary", tmp_path):
        assert run_train.main(["export-saelens", str(src), "--out", str(tmp_path / "x")]) == 2
        assert capsys.readouterr().err.startswith("error: ")


@pytest.mark.parametrize("name,local", [("~/data/corpus.txt", True), ("/data/shards", True), ("./x", True),
                                        ("<user>/data.jsonl", True), ("corpus.parquet", True),
                                        ("pile/00.jsonl.zst", True), ("corpus.csv", True),
                                        ("HuggingFaceFW/fineweb", False), ("monology/pile-uncopyrighted", False)])
def test_dataset_path_is_a_hub_id_or_null(name, local, tmp_path, monkeypatch):
    """SAELens hands dataset_path to datasets.load_dataset: a path on the harvesting machine is not written.
    Decided by the name alone: a folder of that name where the export runs says nothing of the harvest's."""
    from train.export import names_local_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / name.split("/")[0]).mkdir(exist_ok=True)
    assert names_local_path(name) is local


@pytest.mark.parametrize("hook,written", [
    ("blocks.0.hook_resid_mid", ("blocks.0.hook_resid_mid", "none")),
    # HookedTransformer fires hook_mlp_in only with use_hook_mlp_in, which SAELens never sets: the same tensor is
    # hook_resid_mid (see the parallel case below).
    ("blocks.0.hook_mlp_in", ("blocks.0.hook_resid_mid", "none")),
    ("blocks.1.attn.hook_z", ("blocks.1.attn.hook_z", "hook_z")),  # SAELens flattens the heads, as we did
    # The MLP's input: HookedSAETransformer's mlp.hook_in holds it, exactly (no fold).
    ("blocks.1.ln2.hook_out", ("blocks.1.mlp.hook_in", "none")),
    ("blocks.1.mlp.hook_in", ("blocks.1.mlp.hook_in", "none")),
    # Other norms' outputs: their hook_normalized, the norm folded in (tests/test_export_saelens_norm_fold.py).
    ("blocks.1.ln1.hook_out", ("blocks.1.ln1.hook_normalized", "none")),
    ("ln_final.hook_out", ("ln_final.hook_normalized", "none")),
    ("blocks.1.ln2.hook_normalized", ("blocks.1.ln2.hook_normalized", "none")),
    ("ln_final.hook_normalized", ("ln_final.hook_normalized", "none")),
    ("blocks.1.attn.hook_q", "flattens heads only at hook_z"),
    ("blocks.1.mlp.hook_out", "has no hook 'mlp.hook_out'"),
])
def test_hook_names_are_written_as_saelens_hookedtransformer_has_them(hook, written):
    """The export wrote transformer-lens 4's names (ln2.hook_out), which SAELens's HookedTransformer lacks, and
    reshape_activations 'none' for hook_z, whose heads SAELens then fed unflattened."""
    from train.export_saelens import saelens_hook

    if isinstance(written, tuple):
        assert saelens_hook(hook, parallel_attn_mlp=False) == written
    else:
        with pytest.raises(SAELensExportError, match=written):
            saelens_hook(hook, parallel_attn_mlp=False)


def test_hook_mlp_in_is_written_where_it_fires():
    """hook_resid_mid never fires when attention and MLP run in parallel (GPT-NeoX, GPT-J): hook_resid_pre holds
    the MLP's input there; unknown, it is refused rather than guessed."""
    from train.export_saelens import saelens_hook

    assert saelens_hook("blocks.2.hook_mlp_in", parallel_attn_mlp=True) == ("blocks.2.hook_resid_pre", "none")
    with pytest.raises(SAELensExportError, match="use_hook_mlp_in"):
        saelens_hook("blocks.2.hook_mlp_in")


def test_a_transcoder_on_a_norms_output_needs_its_model_and_nothing_is_written_without(tmp_path):
    """ln1's weight and bias are folded in, read off the model; a model that cannot be loaded is refused."""
    from train.norm_affine import NormAffineError

    src = _saved(tmp_path, "export", arch="directional", in_slots=[0], out_slots=[1],
                 slot_names=["m/blocks.0.ln1.hook_out", "m/blocks.0.hook_attn_out"])
    with pytest.raises(NormAffineError, match="(?s)reading the norm's weight and bias needs the model.*--model PATH"):
        export_saelens(src, tmp_path / "sl")
    assert not (tmp_path / "sl").exists()


def test_out_on_a_file_is_refused_before_any_work(runs, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert run_train.main(["export-saelens", str(runs["relu"]), "--out", str(tmp_path / "afile")]) == 2
    assert "is a file" in capsys.readouterr().err and (tmp_path / "afile").read_text() == "x"
