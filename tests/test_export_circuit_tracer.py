"""Export to circuit-tracer: written files reproduce our dictionaries on raw activations; refusals say why.

One tiny harvest of toy-base at every layer (4) and one sweep of short runs (one loader stream)
serve every test. ``_ct_forward`` re-implements circuit-tracer's inference from the written files
and config.yaml alone, as its transcoder classes compute it (circuit-tracer 0.5.0,
``transcoder/single_layer_transcoder.py`` and ``cross_layer_transcoder.py``):

- transcoder set, layer l: ``acts = f(x_l @ W_enc.T + b_enc)``, ``out_l = acts @ W_dec + b_dec + x_l @ W_skip.T``;
- CLT: ``acts_l = f(x_l @ W_enc_l.T + b_enc_l)``, ``out_t = Σ_{l ≤ t} acts_l @ W_dec_l[:, t − l] + b_dec_t``;
- f is JumpReLU ``pre · (pre > threshold)`` when a threshold is stored, else ReLU.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import small_harvest_config
from einops import einsum
from safetensors.torch import load_file

from shared.cache import open_cache
from train.config import TrainConfig
from train.dictionary import Dictionary
from train.export import load_dictionary, load_metadata, save_dictionary
from train.export_circuit_tracer import CircuitTracerExportError, export_circuit_tracer, export_circuit_tracer_cli

N_LAYERS = 4  # toy-base
MLP_IN = [f"blocks.{l}.ln2.hook_out" for l in range(N_LAYERS)]
MLP_OUT = [f"blocks.{l}.hook_mlp_out" for l in range(N_LAYERS)]
# The per-layer set mixes what circuit-tracer supports, so one set covers it all:
# (activation, skip) per layer; layers 1 and 3 get a zero W_skip, as circuit-tracer calls every layer's.
SET_LAYERS = [("relu", True), ("jumprelu", False), ("batchtopk", True), ("jumprelu", False)]


@pytest.fixture(scope="module")
def runs(toy_dirs, tmp_path_factory) -> dict[str, Path]:
    """Trained runs (one sweep, one stream): CLTs and a per-layer set; plus folders for the refusals."""
    from harvest.harvester import harvest
    from train.trainer import train_many

    root = tmp_path_factory.mktemp("ct")
    cache = root / "cache"
    harvest(small_harvest_config(cache, models=["toy-base"], hooks=MLP_IN + MLP_OUT, tokens=600,
                                 calibration_tokens=300))

    def cfg(name: str, **kw) -> TrainConfig:
        args = {"cache": str(cache), "out": str(root / "runs" / name), "models": ["toy-base"], "latents": 32, "steps": 12,
                    "batch_size": 128, "lr": 3e-3, "log_every": 4, "checkpoint_every": 1000, "eval_batches": 1, "progress": False,
                    "device": "cpu"}
        return TrainConfig(**{**args, **kw})

    clt = {"arch": "clt", "in_hooks": MLP_IN, "out_hooks": MLP_OUT}
    members = {
        "clt_relu": cfg("clt_relu", **clt),
        "clt_jumprelu": cfg("clt_jumprelu", activation="jumprelu", **clt),
        "clt_batchtopk": cfg("clt_batchtopk", activation="batchtopk", k=4, **clt),
    }
    for l, (act, skip) in enumerate(SET_LAYERS):
        members[f"plt/layer{l}"] = cfg(f"plt/layer{l}", arch="directional", in_hooks=[MLP_IN[l]],
                                       out_hooks=[MLP_OUT[l]], activation=act, skip=skip,
                                       **({"k": 4} if act == "batchtopk" else {}))
    train_many(list(members.values()))
    out = {"cache": cache, "plt": root / "runs" / "plt", **{name: Path(c.out) for name, c in members.items()}}

    # Refusals depend on the dictionary's config alone (arch, activation, skip, slots): each folder is
    # a trained run re-saved with the config a run trained that way would have (training every
    # variant would triple the file's time: each run draws its curves.png).
    clt_names = ["toy-base/" + h for h in MLP_IN + MLP_OUT]
    variants = {
        "clt_topk": ("clt_relu", {"activation": "topk", "k": 4}),
        "clt_skip": ("clt_relu", {"skip": True}),
        "clt_resid_mid": ("clt_relu", {"slot_names": [n.replace("ln2.hook_out", "hook_mlp_in") for n in clt_names]}),
        "normalized": ("plt/layer1", {"slot_names": ["toy-base/blocks.1.ln2.hook_normalized", "toy-base/" + MLP_OUT[1]]}),
        "two_layers": ("plt/layer1", {"slot_names": ["toy-base/" + MLP_IN[1], "toy-base/" + MLP_OUT[2]]}),
        "crosscoder": ("plt/layer1", {"arch": "crosscoder", "out_slots": [0]}),
    }
    for name, (src, changes) in variants.items():
        out[name] = _variant(out[src], root / "variants" / name, **changes)
    return out


def _variant(src: Path, dst: Path, **changes) -> Path:
    """A copy of run ``src`` whose export has ``changes`` in its dictionary config (weights kept where they fit)."""
    model = load_dictionary(src / "export")
    new = Dictionary(dataclasses.replace(model.cfg, **changes))
    fits = {k: v for k, v in model.state_dict().items() if k in new.state_dict() and new.state_dict()[k].shape == v.shape}
    new.load_state_dict(fits, strict=False)
    save_dictionary(dst / "export", new, load_metadata(src / "export"))
    shutil.copy(src / "config.json", dst / "config.json")
    return dst


def _raw(cache: Path, slot_names: list[str], n_rows: int = 300) -> torch.Tensor:
    """Raw activations [B, len(slot_names), D] of the cache's first rows, by 'model/hook' name."""
    c = open_cache(cache)
    raw_NMPD = c.normalization().undo(c.shard(0).acts[:n_rows].float())
    idx = [c.manifest.hooks.index(name.rsplit("/", 1)[1]) for name in slot_names]
    return raw_NMPD[:, 0, idx]


def _ct_forward(folder: Path, x_BND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """circuit-tracer's (activations [B, n, F], outputs [B, n, D]) of per-layer inputs x [B, n, D], from the files."""
    kind = yaml.safe_load((folder / "config.yaml").read_text())["model_kind"]

    def act(pre: torch.Tensor, threshold: torch.Tensor | None) -> torch.Tensor:
        return torch.relu(pre) if threshold is None else pre * (pre > threshold)

    n = x_BND.shape[1]
    acts, outs = [], torch.zeros_like(x_BND)
    for l in range(n):
        x = x_BND[:, l]
        if kind == "transcoder_set":
            t = load_file(folder / f"layer_{l}.safetensors")
            a = act(x @ t["W_enc"].T + t["b_enc"], t.get("activation_function.threshold"))
            outs[:, l] = a @ t["W_dec"] + t["b_dec"] + (x @ t["W_skip"].T if "W_skip" in t else 0)
        else:
            e = load_file(folder / f"W_enc_{l}.safetensors")
            a = act(x @ e[f"W_enc_{l}"].T + e[f"b_enc_{l}"], e.get(f"threshold_{l}"))
            W_dec_FTD = load_file(folder / f"W_dec_{l}.safetensors")[f"W_dec_{l}"]  # [F, n - l, D]
            outs[:, l:] += einsum(a, W_dec_FTD, "b f, f t d -> b t d")
            outs[:, l] += e[f"b_dec_{l}"]
        acts.append(a)
    return torch.stack(acts, 1), outs


def _assert_same(ours_latents: torch.Tensor, ours_recon: torch.Tensor, theirs: tuple[torch.Tensor, torch.Tensor]):
    acts, outs = theirs
    assert torch.equal(ours_latents > 0, acts > 0), "different active latents"
    assert (acts > 0).any() and not (acts > 0).all(), "degenerate: the check needs some latents on and some off"
    torch.testing.assert_close(acts, ours_latents, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outs, ours_recon, rtol=1e-4, atol=1e-3 * float(ours_recon.abs().mean()))


# ---- exact reproduction -----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["clt_relu", "clt_jumprelu", "clt_batchtopk"])
def test_clt_export_reproduces_our_dictionary(runs, tmp_path, name):
    out = export_circuit_tracer(runs[name], tmp_path / "ct")
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert (cfg["model_kind"], cfg["model_name"]) == ("cross_layer_transcoder", "toy-base")
    assert (cfg["feature_input_hook"], cfg["feature_output_hook"]) == ("mlp.hook_in", "hook_mlp_out")
    F = cfg["crosscache"]["features_per_layer"]
    for l in range(N_LAYERS):  # exactly the tensors circuit-tracer's loader reads (it loads them strictly)
        enc = load_file(out / f"W_enc_{l}.safetensors")
        want = {f"W_enc_{l}", f"b_enc_{l}", f"b_dec_{l}"} | ({f"threshold_{l}"} if name != "clt_relu" else set())
        assert set(enc) == want
        assert load_file(out / f"W_dec_{l}.safetensors")[f"W_dec_{l}"].shape == (F, N_LAYERS - l, 128)

    model = load_dictionary(runs[name] / "export")
    x_in = _raw(runs["cache"], [model.cfg.slot_names[i] for i in model.cfg.in_slots])
    with torch.no_grad():
        ours = model(x_in, inference=True)
    _assert_same(ours.latents_BL.reshape(len(x_in), N_LAYERS, F), ours.recon_BXoD, _ct_forward(out, x_in))


def test_transcoder_set_reproduces_each_layer_with_skip_and_every_activation(runs, tmp_path):
    out = export_circuit_tracer(runs["plt"], tmp_path / "ct")  # the sweep folder: its 4 members
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert (cfg["model_kind"], cfg["feature_input_hook"], cfg["feature_output_hook"]) == \
        ("transcoder_set", "mlp.hook_in", "hook_mlp_out")
    models = [load_dictionary(runs[f"plt/layer{l}"] / "export") for l in range(N_LAYERS)]
    x_in = torch.stack([_raw(runs["cache"], [m.cfg.slot_names[m.cfg.in_slots[0]]])[:, 0] for m in models], 1)
    lat, rec = [], []
    with torch.no_grad():
        for l, m in enumerate(models):
            o = m(x_in[:, l:l + 1], inference=True)
            lat.append(o.latents_BL)
            rec.append(o.recon_BXoD[:, 0])
    for l, (act, skip) in enumerate(SET_LAYERS):
        t = load_file(out / f"layer_{l}.safetensors")
        assert set(t) == {"W_enc", "W_dec", "b_enc", "b_dec", "W_skip"} | (
            {"activation_function.threshold"} if act != "relu" else set()), l
        assert bool(t["W_skip"].any()) == skip  # trained skip (nonzero after training), else zeros
    _assert_same(torch.stack(lat, 1), torch.stack(rec, 1), _ct_forward(out, x_in))


def test_cli_writes_config_with_provenance_and_no_home_path(runs, tmp_path, capsys):
    out = tmp_path / "ct"
    assert export_circuit_tracer_cli([str(runs["clt_jumprelu"]), "--out", str(out), "--model-name", "org/toy",
                                      "--scan", "toy-clt"]) == 0
    assert "wrote cross_layer_transcoder for org/toy" in capsys.readouterr().out
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert (cfg["model_name"], cfg["scan"]) == ("org/toy", "toy-clt")
    prov = cfg["crosscache"]
    assert prov["model"] == "toy-base" and prov["n_layers"] == N_LAYERS and prov["activations"] == ["jumprelu"]
    assert prov["hooks"] == {"input": "blocks.L.ln2.hook_out", "output": "blocks.L.hook_mlp_out"}
    assert prov["runs"][0]["step"] == 12 and prov["runs"][0]["normalization_folded"] == "norm_scale"
    home = str(Path.home())
    for f in out.iterdir():  # the toy model lives under the home folder; no file may name it
        assert home.encode() not in f.read_bytes(), f


def test_reexport_replaces_a_previous_export_and_refuses_foreign_folders(runs, tmp_path):
    out = tmp_path / "ct"
    export_circuit_tracer(runs["plt"], out)
    export_circuit_tracer(runs["clt_relu"], out)  # a CLT over a set: no layer_* file may stay behind
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(
        [f"W_enc_{l}.safetensors" for l in range(N_LAYERS)] + [f"W_dec_{l}.safetensors" for l in range(N_LAYERS)])
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(CircuitTracerExportError, match="holds other files"):
        export_circuit_tracer(runs["clt_relu"], other)
    assert (other / "notes.txt").read_text() == "mine"


# ---- refusals -----------------------------------------------------------------------------------
@pytest.mark.parametrize("run,match", [
    ("clt_topk", r"topk has no circuit-tracer equivalent.*--activation batchtopk"),
    ("clt_skip", r"CLT with --skip.*load_clt never reads skip"),
    ("clt_resid_mid", r"parallel.*never fires hook_resid_mid.*ln2\.hook_out"),
    ("normalized", r"ln2\.hook_normalized.*before its weight and bias.*ln2\.hook_out"),
    ("crosscoder", r"crosscoder.*--arch clt"),
    ("two_layers", r"same layer's output.*one run per layer"),
])
def test_refusals_name_the_reason_and_the_fix(runs, tmp_path, run, match):
    with pytest.raises(CircuitTracerExportError, match=match):
        export_circuit_tracer(runs[run], tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_parallel_blocks_are_known_from_the_record_without_the_model_folder(runs, tmp_path):
    """An export handed on alone (no run folder; its model folder not on this machine): the harvest's record
    (metadata.harvest, models[].parallel_attn_mlp) still says hook_resid_mid never fires."""
    export = shutil.copytree(runs["clt_resid_mid"] / "export", tmp_path / "export")
    cfg = json.loads((export / "config.json").read_text())
    entry = cfg["metadata"]["harvest"]["models"][0]
    assert entry["parallel_attn_mlp"] is True and entry["n_layers"] == N_LAYERS  # toy-base: GPT-NeoX, parallel
    entry["path"] = str(tmp_path / "gone")
    (export / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CircuitTracerExportError, match=r"parallel.*never fires hook_resid_mid"):
        export_circuit_tracer(export, tmp_path / "ct")


def test_refuses_missing_layers_normalized_dictionary_and_cli_exits_2(runs, tmp_path, capsys):
    some = [runs["plt/layer0"], runs["plt/layer1"]]
    with pytest.raises(CircuitTracerExportError, match=r"every layer 0\.\.3.*got layers \[0, 1\].*run_harvest\.py "
                                                        r"--models toy-base --hooks blocks\.\{0\.\.3\}\.ln2\.hook_out"):
        export_circuit_tracer(some, tmp_path / "ct")
    with pytest.raises(CircuitTracerExportError, match="normalized activations"):
        export_circuit_tracer(runs["clt_relu"] / "dictionary", tmp_path / "ct")
    assert export_circuit_tracer_cli([str(runs["clt_topk"]), "--out", str(tmp_path / "ct")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_n_layers_never_overrides_the_recorded_depth(runs, tmp_path, capsys):
    """--n-layers stands in for a missing record only: a count that contradicts the harvest's record (which
    let two of toy-base's four layers export as a whole 2-layer set) or one below 1 is refused, exit 2."""
    some = [runs["plt/layer0"], runs["plt/layer1"]]
    with pytest.raises(CircuitTracerExportError, match=r"--n-layers\) 2 differs from the 4 layers the harvest recorded"):
        export_circuit_tracer(some, tmp_path / "ct", n_layers=2)
    assert not (tmp_path / "ct").exists()
    assert export_circuit_tracer_cli([str(runs["clt_relu"]), "--out", str(tmp_path / "ct"), "--n-layers", "0"]) == 2
    assert "layer count, >= 1; got 0" in capsys.readouterr().err
    export_circuit_tracer(runs["clt_relu"], tmp_path / "ct", n_layers=N_LAYERS)  # the recorded count is fine
