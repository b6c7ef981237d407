"""SAELens export of dictionaries on a norm's output (train/export_saelens.py, train/norm_affine.py).

The MLP's input (``ln2.hook_out`` = ``mlp.hook_in``) is written as HookedSAETransformer's ``mlp.hook_in``, as it
is. Other norms' outputs (``ln1.hook_out``, ``ln_final.hook_out``) have no hook there: SAELens taps the norm's
``hook_normalized``, the input before the norm's weight and bias, and the export folds the norm into the
dictionary. Checked here on the toy model, with the truth taken independently: the harvest records
``ln1.hook_normalized`` beside ``ln1.hook_out`` for the same tokens, and the norm's weight and bias are the toy
model's own parameters.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import small_harvest_config
from test_export_saelens import saelens_forward

import run_train
from shared.cache import open_cache
from train.config import TrainConfig
from train.dictionary import Dictionary, DictionaryConfig
from train.export import load_dictionary
from train.export_saelens import SAELensExportError, export_saelens, saelens_hook, to_saelens
from train.norm_affine import NormAffine, NormAffineError, fit_norm_affines, normalized_hook

LN_OUT, LN_NORMALIZED, ATTN_OUT = "blocks.1.ln1.hook_out", "blocks.1.ln1.hook_normalized", "blocks.1.hook_attn_out"
MLP_IN, MLP_OUT = "blocks.1.ln2.hook_out", "blocks.1.hook_mlp_out"
HOOKS = (LN_OUT, LN_NORMALIZED, ATTN_OUT, MLP_IN, MLP_OUT)
CASES = {  # run name -> (TrainConfig overrides, SAELens architecture)
    "tc_relu_skip": ({"arch": "directional", "in_hooks": [LN_OUT], "out_hooks": [ATTN_OUT], "skip": True},
                     "skip_transcoder"),
    "tc_batchtopk_skip": ({"arch": "directional", "in_hooks": [LN_OUT], "out_hooks": [ATTN_OUT], "skip": True,
                           "activation": "batchtopk", "k": 4}, "jumprelu_skip_transcoder"),
    "sae_jumprelu": ({"hooks": [LN_OUT], "activation": "jumprelu"}, "jumprelu"),
    "sae_topk": ({"hooks": [LN_OUT], "activation": "topk", "k": 4}, "topk"),
    "sae_normalized": ({"hooks": [LN_NORMALIZED]}, "standard"),  # a hook both have: written as it is
    "tc_mlp_in": ({"arch": "directional", "in_hooks": [MLP_IN], "out_hooks": [MLP_OUT], "skip": True},
                  "skip_transcoder"),  # HookedSAETransformer's mlp.hook_in: as it is
}
FOLDED = [n for n in CASES if n not in ("sae_normalized", "tc_mlp_in")]


@pytest.fixture(scope="module")
def runs(toy_dirs, tmp_path_factory) -> dict[str, Path]:
    from harvest.harvester import harvest
    from train.trainer import train_many

    root = tmp_path_factory.mktemp("sl_fold")
    cache = root / "cache"
    harvest(small_harvest_config(cache, models=["toy-base"], hooks=list(HOOKS), tokens=600, dtype="float32",
                                 calibration_tokens=300))
    cfgs = [TrainConfig(cache=str(cache), out=str(root / name), models=["toy-base"], latents=32, steps=12,
                        batch_size=128, lr=3e-3, log_every=4, checkpoint_every=1000, eval_batches=1, progress=False,
                        device="cpu", **kw) for name, (kw, _) in CASES.items()]
    train_many(cfgs)
    return {"cache": cache, **{name: root / name for name in CASES}}


@pytest.fixture(scope="module")
def rows(runs) -> dict[str, torch.Tensor]:
    """Raw rows [N, D] of each hook, the same tokens for all (stored float32: bf16 rounding of two hooks would
    differ)."""
    c = open_cache(runs["cache"])
    raw_NMHD = c.normalization().undo(c.shard(0).acts[:300].float())
    return {h: raw_NMHD[:, 0, c.manifest.hooks.index(h)] for h in HOOKS}


@pytest.fixture(scope="module")
def norms() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The toy model's own blocks.1.ln1 and blocks.1.ln2 weight and bias."""
    from harvest.models import load_models

    lm = load_models(["toy-base"], [LN_OUT], context_size=64, device=torch.device("cpu"), model_dtype=torch.float32,
                     progress=False)
    out = {}
    for norm in ("ln1", "ln2"):
        ln = lm.bridges[0].get_submodule(f"blocks.1.{norm}").original_component
        out[norm] = (ln.weight.detach().double(), ln.bias.detach().double())
    return out


def test_the_fit_reads_the_norms_own_weight_and_bias(norms):
    fits = fit_norm_affines("toy-base", [LN_OUT, "blocks.1.mlp.hook_in"], d_model=128)
    for hook, norm in ((LN_OUT, "ln1"), ("blocks.1.mlp.hook_in", "ln2")):
        fit, (w, b) = fits[hook], norms[norm]
        assert fit.normalized_hook == f"blocks.1.{norm}.hook_normalized"
        assert fit.max_rel_residual < 1e-6
        torch.testing.assert_close(fit.weight_D, w, rtol=0, atol=1e-6)
        torch.testing.assert_close(fit.bias_D, b, rtol=0, atol=1e-6)
        assert bool(b.any()) and fit.record()["bias"] == "fitted"
    with pytest.raises(NormAffineError, match="128 wide, the dictionary 64"):
        fit_norm_affines("toy-base", [LN_OUT], d_model=64)


@pytest.mark.parametrize("name", FOLDED)
def test_saelens_on_the_normalized_input_gives_our_latents_and_outputs(runs, rows, norms, tmp_path, name):
    """SAELens's forward on ln1.hook_normalized rows == ours on the ln1.hook_out rows of the same tokens."""
    out = export_saelens(runs[name], tmp_path / "sl")
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == CASES[name][1]
    assert cfg["metadata"]["hook_name"] == LN_NORMALIZED
    assert cfg["metadata"]["model_from_pretrained_kwargs"] == {"fold_ln": True}  # 2.x and 3.x agree on it then
    folded = cfg["metadata"]["crosscache"]["norm_folded"]
    assert folded["input"]["hook"] == LN_OUT and folded["model"] == "toy-base"
    transcoder = name.startswith("tc")
    assert (folded["output"] is None) == transcoder
    if transcoder:
        assert cfg["metadata"]["hook_name_out"] == ATTN_OUT

    model = load_dictionary(runs[name] / "export")
    with torch.no_grad():
        res = model(rows[LN_OUT][:, None], inference=True)
    sl_latents, sl_out = saelens_forward(out, rows[LN_NORMALIZED])
    active = res.latents_BL > 0
    assert active.any() and torch.equal(sl_latents > 0, active)
    scale = (model.score_weight_L(torch.float32).detach() if model.cfg.activation in ("topk", "batchtopk")
             else torch.ones(model.cfg.n_latents))  # SAELens latent = ours x our TopK score's factor
    torch.testing.assert_close(sl_latents, res.latents_BL * scale, rtol=1e-4, atol=1e-4)
    ours_out = res.recon_BXoD[:, 0]
    if transcoder:
        torch.testing.assert_close(sl_out, ours_out, rtol=1e-4, atol=1e-4)
    else:  # SAELens reconstructs the normalized input; the model then applies the norm's weight and bias
        w, b = norms["ln1"]
        torch.testing.assert_close(sl_out.double() * w + b, ours_out.double(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,row_hook,hooks,kwargs", [
    # a hook both have: as it is, with fold_ln (transformer-lens 2.x's unfolded LayerNorm fires it after w, b)
    ("sae_normalized", LN_NORMALIZED, (LN_NORMALIZED, None), {"fold_ln": True}),
    # the MLP's input: HookedSAETransformer's mlp.hook_in holds it, unprocessed model
    ("tc_mlp_in", MLP_IN, ("blocks.1.mlp.hook_in", MLP_OUT), {}),
])
def test_hooks_saelens_has_are_written_without_a_fold(runs, rows, tmp_path, name, row_hook, hooks, kwargs):
    out = export_saelens(runs[name], tmp_path / "sl")
    meta = json.loads((out / "cfg.json").read_text())["metadata"]
    assert (meta["hook_name"], meta.get("hook_name_out")) == hooks
    assert meta["model_from_pretrained_kwargs"] == kwargs and meta["crosscache"]["norm_folded"] is None
    model = load_dictionary(runs[name] / "export")
    with torch.no_grad():
        res = model(rows[row_hook][:, None], inference=True)
    sl_latents, sl_out = saelens_forward(out, rows[row_hook])
    torch.testing.assert_close(sl_latents, res.latents_BL, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sl_out, res.recon_BXoD[:, 0], rtol=1e-5, atol=1e-5)


def test_the_norm_is_read_from_a_model_given_by_path_with_the_same_weights(runs, toy_dirs, tmp_path, capsys):
    folder = tmp_path / "sl"
    assert run_train.main(["export-saelens", str(runs["tc_relu_skip"]), "--out", str(folder),
                           "--model", str(toy_dirs["toy-base"])]) == 0
    by_name = export_saelens(runs["tc_relu_skip"], tmp_path / "by_name")
    assert (folder / "sae_weights.safetensors").read_bytes() == (by_name / "sae_weights.safetensors").read_bytes()


def test_an_export_copied_away_folds_the_same_and_checks_the_recorded_weights(runs, tmp_path, capsys):
    """No run folder, no cache: the model and its weights fingerprint come from the export's metadata.harvest."""
    import shutil

    away = tmp_path / "away"
    shutil.copytree(runs["tc_relu_skip"] / "export", away)
    here = export_saelens(runs["tc_relu_skip"], tmp_path / "here")
    there = export_saelens(away, tmp_path / "there")
    assert (here / "sae_weights.safetensors").read_bytes() == (there / "sae_weights.safetensors").read_bytes()
    assert run_train.main(["export-saelens", str(away), "--out", str(tmp_path / "x"), "--model", "toy-prose"]) == 2
    assert "other weights than the harvest recorded" in capsys.readouterr().err


def test_a_model_with_other_weights_is_refused_and_nothing_written(runs, tmp_path, capsys):
    """toy-code has toy-base's architecture and other weights: its ln1 is not the one the dictionary saw."""
    assert run_train.main(["export-saelens", str(runs["tc_relu_skip"]), "--out", str(tmp_path / "sl"),
                           "--model", "toy-code"]) == 2
    err = capsys.readouterr().err
    assert "other weights than the harvest recorded" in err and "fingerprint" in err
    assert not (tmp_path / "sl").exists()


def test_a_bad_device_is_refused_by_name(runs, tmp_path, capsys):
    assert run_train.main(["export-saelens", str(runs["tc_relu_skip"]), "--out", str(tmp_path / "sl"),
                           "--device", "tpu"]) == 2
    assert "tpu" in capsys.readouterr().err and not (tmp_path / "sl").exists()


def test_a_harvest_run_in_bfloat16_is_recognised_as_the_same_weights(toy_dirs, tmp_path):
    """The harvest fingerprints the model as it ran it (--model-dtype bfloat16); the export loads it in float32 to
    fit the norm, and must still recognise the weights (rounded to bfloat16, they match)."""
    from harvest.harvester import harvest
    from train.trainer import train_many

    cache = tmp_path / "cache"
    harvest(small_harvest_config(cache, models=["toy-base"], hooks=[LN_OUT], tokens=300, calibration_tokens=200,
                                 model_dtype="bfloat16"))
    run = tmp_path / "run"
    train_many([TrainConfig(cache=str(cache), out=str(run), models=["toy-base"], hooks=[LN_OUT], latents=16, steps=2,
                            batch_size=64, log_every=1, checkpoint_every=1000, eval_batches=1, progress=False,
                            device="cpu")])
    out = export_saelens(run, tmp_path / "sl")
    assert json.loads((out / "cfg.json").read_text())["metadata"]["hook_name"] == LN_NORMALIZED


def test_a_model_that_cannot_be_loaded_is_refused_and_nothing_written(runs, tmp_path):
    with pytest.raises(NormAffineError, match="needs the model"):
        export_saelens(runs["tc_relu_skip"], tmp_path / "sl", model_path=str(tmp_path / "no-such-model"))
    assert not (tmp_path / "sl").exists()


@pytest.mark.parametrize("hook,normalized,written", [
    ("blocks.3.ln2.hook_out", "blocks.3.ln2.hook_normalized", "blocks.3.mlp.hook_in"),  # no fold needed there
    ("blocks.3.mlp.hook_in", "blocks.3.ln2.hook_normalized", "blocks.3.mlp.hook_in"),
    ("blocks.0.ln1.hook_out", "blocks.0.ln1.hook_normalized", "blocks.0.ln1.hook_normalized"),
    ("ln_final.hook_out", "ln_final.hook_normalized", "ln_final.hook_normalized"),
    ("blocks.0.ln_final.hook_out", None, None),
    ("ln2.hook_out", None, None),
    ("blocks.3.hook_mlp_out", None, "blocks.3.hook_mlp_out"),
])
def test_normalized_hook_names(hook, normalized, written):
    """Where a norm's output is, and the hook the export writes for it (a fold only where it is hook_normalized)."""
    assert normalized_hook(hook) == normalized
    if written:
        assert saelens_hook(hook) == (written, "none")
    else:
        with pytest.raises(SAELensExportError):
            saelens_hook(hook)


def test_a_zero_norm_weight_on_the_output_side_is_refused():
    """An SAE's output must be divided by the norm's weight: a zero there has no inverse."""
    D = 8
    model = Dictionary(DictionaryConfig(arch="crosscoder", activation="relu", d_model=D, n_latents=16,
                                        in_slots=[0], out_slots=[0], slot_names=["m/blocks.0.ln2.hook_out"]))
    w = torch.ones(D, dtype=torch.float64)
    w[3] = 0
    affine = NormAffine("blocks.0.ln2.hook_out", "blocks.0.ln2.hook_normalized", w, torch.zeros(D, dtype=torch.float64),
                        0.0)
    to_saelens(model, norm_in=affine)  # the input side only multiplies: fine
    with pytest.raises(SAELensExportError, match="weight is 0 in 1 coordinates"):
        to_saelens(model, norm_in=affine, norm_out=affine)
