"""The harvest on the architectures researchers use, not only the toy GPT-NeoX: every hook kind of a
tiny random-weight GPT-2, Llama, Qwen2, Qwen3, Mistral, Gemma, Gemma-2, Gemma-3, Phi, Phi-3, OPT and
GPT-NeoX (built by :mod:`arch_models`) must reproduce a plain ``transformers`` forward of the same
folder on the same token ids, for a base model and a perturbed copy harvested together (aligned
rows). Hooks that would be something other than their names say are refused with the reason."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from arch_models import build_arch_model, perturb_model
from conftest import small_harvest_config

from harvest.harvester import harvest
from harvest.models import HarvestInputError, load_models
from shared.cache import open_cache

N_LAYERS = 3  # arch_models.LAYERS
LAST = N_LAYERS - 1


@dataclass(frozen=True)
class Arch:
    """Where the HF model keeps what each hook should equal (attribute paths)."""

    layers: str  # the decoder layers (a ModuleList)
    attn_out: str  # module whose output is added to the residual stream by attention
    mlp_out: str  # ... by the MLP
    ln2: str | None  # the pre-MLP norm (None: attention and MLP share ln1, as Phi)
    mlp_in: str  # module whose input is the MLP's input
    parallel: bool = False  # attention and MLP both read the block's input (no hook_resid_mid)
    tokenizer: dict | None = None  # replaces keys of the toy tokenizer_config.json


ARCHS = {
    "gpt2": Arch("transformer.h", "attn", "mlp", "ln_2", "mlp"),
    "llama": Arch("model.layers", "self_attn", "mlp", "post_attention_layernorm", "mlp"),
    # Qwen2's tokenizer declares no BOS: its EOS is fed as BOS (transformer-lens's convention).
    "qwen2": Arch("model.layers", "self_attn", "mlp", "post_attention_layernorm", "mlp", tokenizer={"bos_token": None}),
    "mistral": Arch("model.layers", "self_attn", "mlp", "post_attention_layernorm", "mlp"),
    "gemma": Arch("model.layers", "self_attn", "mlp", "post_attention_layernorm", "mlp"),
    # Gemma-2 normalizes attention and MLP outputs before adding them: hook_attn_out/hook_mlp_out are
    # the post-norms' outputs (what is added), ln2 its pre-MLP norm.
    "gemma2": Arch("model.layers", "post_attention_layernorm", "post_feedforward_layernorm",
                   "pre_feedforward_layernorm", "mlp"),
    "gemma3": Arch("model.layers", "post_attention_layernorm", "post_feedforward_layernorm",
                   "pre_feedforward_layernorm", "mlp"),
    "qwen3": Arch("model.layers", "self_attn", "mlp", "post_attention_layernorm", "mlp"),
    "phi3": Arch("model.layers", "self_attn", "mlp", "post_attention_layernorm", "mlp"),
    # Mixtures of experts: hook_mlp_out is the router-weighted sum of the chosen experts (the whole
    # sparse block's output), mlp.hook_in its input (what the router and experts read).
    "mixtral": Arch("model.layers", "self_attn", "mlp", "post_attention_layernorm", "mlp"),
    "qwen3_moe": Arch("model.layers", "self_attn", "mlp", "post_attention_layernorm", "mlp"),
    "olmoe": Arch("model.layers", "self_attn", "mlp", "post_attention_layernorm", "mlp"),
    "opt": Arch("model.decoder.layers", "self_attn", "fc2", "final_layer_norm", "fc1"),
    "phi": Arch("model.layers", "self_attn", "mlp", None, "mlp", parallel=True),
    "gpt_neox": Arch("gpt_neox.layers", "attention", "mlp", "post_attention_layernorm", "mlp", parallel=True),
}

def hooks_for(arch: str) -> list[str]:
    spec = ARCHS[arch]
    hooks = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_post", f"blocks.{LAST}.hook_resid_post",
             "blocks.1.hook_attn_out", "blocks.1.hook_mlp_out", "blocks.1.mlp.hook_in"]
    if spec.ln2:
        hooks += ["blocks.1.hook_mlp_in", "blocks.1.ln2.hook_normalized", "blocks.1.ln2.hook_out"]
    if not spec.parallel:
        hooks += ["blocks.1.hook_resid_mid"]
    if arch == "opt":
        hooks.remove("blocks.1.ln2.hook_normalized")  # fires flattened: refused (test_opt_flattened_hook_is_refused)
    return hooks


@pytest.fixture(scope="session")
def arch_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("archs")


def arch_folder(root: Path, toy_dirs, arch: str, *, perturbed: bool = False) -> Path:
    """The arch's model folder (built on first use), or its perturbed copy (a stand-in fine-tune)."""
    base = root / arch
    if not base.exists():
        build_arch_model(arch, base, toy_dirs["toy-base"], tokenizer_config=ARCHS[arch].tokenizer if arch in ARCHS else None)
    if not perturbed:
        return base
    tuned = root / f"{arch}-tuned"
    return tuned if tuned.exists() else perturb_model(base, tuned)


def _get(module, path: str):
    for part in path.split("."):
        module = getattr(module, part)
    return module


def _normalized(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the norm computes before its weight and bias."""
    eps = getattr(norm, "eps", None) or norm.variance_epsilon
    if isinstance(norm, torch.nn.LayerNorm):
        x = x - x.mean(-1, keepdim=True)
    return x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()


def hf_activations(arch: str, folder: Path, sequences: dict[int, list[int]]) -> dict[int, dict[str, torch.Tensor]]:
    """Every hook of :func:`hooks_for`, per sequence, from plain transformers forwards: ``{seq: {hook: [pos, d]}}``."""
    from transformers import AutoModelForCausalLM

    spec = ARCHS[arch]
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    acts: dict[str, torch.Tensor] = {}

    def keep(name, *, inp=False, fn=None):
        def hook(_module, args, kwargs, out=None):
            x = (args[0] if args else kwargs["hidden_states"]) if inp else (out[0] if isinstance(out, tuple) else out)
            x = x.reshape(-1, x.shape[-1])  # [pos, d] (batch 1; OPT's MLP runs on [batch*pos, d] already)
            acts[name] = (fn(x) if fn else x).detach().clone()
        return hook

    handles = []
    for L, layer in enumerate(_get(model, spec.layers)):
        b = f"blocks.{L}."
        handles += [layer.register_forward_pre_hook(keep(b + "hook_resid_pre", inp=True), with_kwargs=True),
                    layer.register_forward_hook(keep(b + "hook_resid_post"), with_kwargs=True),
                    _get(layer, spec.attn_out).register_forward_hook(keep(b + "hook_attn_out"), with_kwargs=True),
                    _get(layer, spec.mlp_out).register_forward_hook(keep(b + "hook_mlp_out"), with_kwargs=True),
                    _get(layer, spec.mlp_in).register_forward_pre_hook(keep(b + "mlp.hook_in", inp=True), with_kwargs=True)]
        if spec.ln2:
            ln2 = _get(layer, spec.ln2)
            handles += [ln2.register_forward_pre_hook(keep(b + "hook_mlp_in", inp=True), with_kwargs=True),
                        ln2.register_forward_pre_hook(keep(b + "hook_resid_mid", inp=True), with_kwargs=True),
                        ln2.register_forward_pre_hook(keep(b + "ln2.hook_normalized", inp=True,
                                                           fn=lambda x, n=ln2: _normalized(n, x)), with_kwargs=True),
                        ln2.register_forward_hook(keep(b + "ln2.hook_out"), with_kwargs=True)]
    result = {}
    for s, ids in sequences.items():
        with torch.no_grad():
            out = model(torch.tensor([ids]), output_hidden_states=True)
        # The trap this avoids: transformers' last hidden state is after the final norm, not the last
        # block's output (hook_resid_post of the last layer); the others are the blocks' inputs.
        assert not torch.allclose(out.hidden_states[-1][0], acts[f"blocks.{LAST}.hook_resid_post"], atol=1e-3)
        assert torch.equal(out.hidden_states[1][0], acts["blocks.0.hook_resid_post"])
        result[s], acts = acts, {}
    for h in handles:
        h.remove()
    return result


def _rows(cache_dir: Path):
    cache = open_cache(cache_dir)
    shards = [cache.shard(i) for i in range(cache.n_shards)]
    return cache, *(torch.cat([getattr(s, name).clone() for s in shards]) for name in ("acts", "seq", "pos"))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_rows_reproduce_transformers(arch, arch_root, toy_dirs, tmp_path):
    """A base model and its perturbed copy harvested together, float32 and unnormalized: every row of
    every hook equals transformers' own activation at that row's sequence and position."""
    folders = [arch_folder(arch_root, toy_dirs, arch), arch_folder(arch_root, toy_dirs, arch, perturbed=True)]
    hooks = hooks_for(arch)
    out = tmp_path / "cache"
    manifest = harvest(small_harvest_config(out, models=[str(f) for f in folders], hooks=hooks, tokens=240,
                                            context_size=32, batch_size=8, dtype="float32", normalize="none",
                                            calibration_tokens=64))
    assert manifest.tokenizer["bos_token_id"] == 0  # qwen2: no BOS declared, its EOS (id 0) stands in
    # Recorded for the circuit-tracer export (hook_resid_mid never fires in a parallel block).
    assert [m["parallel_attn_mlp"] for m in manifest.models] == [ARCHS[arch].parallel] * 2
    cache, acts, seq, pos = _rows(out)
    ids = cache.token_table().column("input_ids").to_pylist()
    assert acts.shape == (240, 2, len(hooks), 64) and (pos > 0).all() and all(s[0] == 0 for s in ids)
    for m, folder in enumerate(folders):
        refs = hf_activations(arch, folder, {s: ids[s] for s in sorted(set(seq.tolist()))})
        for p, hook in enumerate(hooks):
            ref = torch.stack([refs[s][hook][q] for s, q in zip(seq.tolist(), pos.tolist())])
            err = ((acts[:, m, p] - ref).abs().amax(-1) / ref.abs().amax(-1)).max().item()
            assert err < 1e-4, f"{arch} model {m} {hook}: relative error {err:.2e}"
    # Aligned rows of two different models (not one model twice).
    assert not torch.allclose(acts[:, 0], acts[:, 1], atol=1e-3)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_stop_at_layer_gives_the_same_rows(arch, arch_root, toy_dirs, tmp_path):
    """Hooks in block 0 only: the forward stops after block 0 (stop_at_layer=1) and the rows equal the
    full forward's."""
    folder = arch_folder(arch_root, toy_dirs, arch)
    manifest = harvest(small_harvest_config(tmp_path / "c", models=[str(folder)], hooks=["blocks.0.hook_resid_post"],
                                            tokens=120, context_size=32, batch_size=8, dtype="float32",
                                            normalize="none", calibration_tokens=64))
    assert manifest.extra["harvest"]["stop_at_layer"] == 1
    cache, acts, seq, pos = _rows(tmp_path / "c")
    ids = cache.token_table().column("input_ids").to_pylist()
    refs = hf_activations(arch, folder, {s: ids[s] for s in sorted(set(seq.tolist()))})
    ref = torch.stack([refs[s]["blocks.0.hook_resid_post"][q] for s, q in zip(seq.tolist(), pos.tolist())])
    torch.testing.assert_close(acts[:, 0, 0], ref, rtol=1e-5, atol=1e-5)


def _refusal(names: list[str], hooks: list[str]) -> str:
    with pytest.raises(HarvestInputError) as err:
        load_models(names, hooks, context_size=32, device=torch.device("cpu"), model_dtype=torch.float32,
                    progress=False)
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message
    return message


@pytest.mark.parametrize("arch", ["gpt2", "gemma2"])
def test_hook_normalized_is_explained(arch, arch_root, toy_dirs, capsys):
    """ln2.hook_normalized is the norm before its weight and bias (checked above against transformers),
    not the MLP's input its name suggests: the harvest says so and names the hook that is."""
    load_models([str(arch_folder(arch_root, toy_dirs, arch))], ["blocks.1.ln2.hook_normalized"], context_size=32,
                device=torch.device("cpu"), model_dtype=torch.float32, progress=False)
    printed = capsys.readouterr().out
    assert "blocks.1.ln2.hook_normalized is the normalized input before the norm's weight and bias" in printed
    assert "the MLP's, for ln2) is blocks.1.ln2.hook_out" in printed


# The norm attention reads through, as transformers names it.
_ATTN_NORM = {"gpt2": "transformer.h.1.ln_1", "llama": "model.layers.1.input_layernorm",
              "gemma2": "model.layers.1.input_layernorm"}


@pytest.mark.parametrize("arch", list(_ATTN_NORM))
def test_the_saelens_norm_fold_reads_the_norms_own_parameters(arch, arch_root, toy_dirs):
    """export-saelens folds ln1 into a dictionary on ln1.hook_out (train.norm_affine fits it on a forward): the
    weight and bias it finds are the transformers module's own, LayerNorm with bias (GPT-2), RMSNorm (Llama)
    and Gemma-2's, which scales by 1 + weight."""
    from transformers import AutoModelForCausalLM

    from train.norm_affine import fit_norm_affines

    folder = arch_folder(arch_root, toy_dirs, arch)
    fit = fit_norm_affines(str(folder), ["blocks.1.ln1.hook_out"])["blocks.1.ln1.hook_out"]
    norm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).get_submodule(_ATTN_NORM[arch])
    w = norm.weight.detach().double() + (1.0 if arch.startswith("gemma") else 0.0)
    b = norm.bias.detach().double() if getattr(norm, "bias", None) is not None else torch.zeros_like(w)
    assert fit.normalized_hook == "blocks.1.ln1.hook_normalized" and fit.max_rel_residual < 1e-6
    assert float((w - 1).abs().mean()) > 0.01  # random weights: the fold is not the identity
    torch.testing.assert_close(fit.weight_D, w, rtol=0, atol=1e-5)
    torch.testing.assert_close(fit.bias_D, b, rtol=0, atol=1e-5)
    assert (fit.record()["bias"] == "fitted") == (arch == "gpt2")


def test_unsupported_architecture_is_named(arch_root, toy_dirs):
    """An architecture transformer-lens's bridge does not know (BioGPT) is refused by name, in one line."""
    from arch_models import copy_tokenizer
    from transformers import BioGptConfig, BioGptForCausalLM

    folder = arch_root / "biogpt"
    if not folder.exists():
        BioGptForCausalLM(BioGptConfig(vocab_size=4096, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=128, max_position_embeddings=64)).save_pretrained(folder)
        copy_tokenizer(toy_dirs["toy-base"], folder)
    message = _refusal([str(folder)], ["blocks.0.hook_resid_post"])
    assert "BioGptForCausalLM" in message and "biogpt" in message and "not an architecture" in message


def test_a_layout_the_bridge_fails_on_is_refused_in_one_line(arch_root, toy_dirs):
    """Falcon's new decoder architecture (Falcon-40B's grouped KV heads) makes transformer-lens's bridge raise a
    RuntimeError while it splits the fused QKV weight: a traceback before, one line naming the model now."""
    from arch_models import copy_tokenizer
    from transformers import FalconConfig, FalconForCausalLM

    folder = arch_root / "falcon_new"
    if not folder.exists():
        torch.manual_seed(0)
        FalconForCausalLM(FalconConfig(vocab_size=4096, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       num_kv_heads=2, max_position_embeddings=64, new_decoder_architecture=True,
                                       bias=True, alibi=False, bos_token_id=0, eos_token_id=0,
                                       pad_token_id=1)).save_pretrained(folder)
        copy_tokenizer(toy_dirs["toy-base"], folder)
    try:
        message = _refusal([str(folder)], ["blocks.0.hook_resid_post"])
    except pytest.fail.Exception:  # a transformer-lens that loads this layout: nothing to refuse
        pytest.skip("this transformer-lens loads Falcon's new decoder architecture")
    assert "fails to load model" in message and "FalconForCausalLM" in message and "not supported" in message


def test_resid_mid_on_parallel_attention_says_why(arch_root, toy_dirs):
    """GPT-NeoX with use_parallel_residual (its default) has no residual between attention and MLP."""
    message = _refusal([str(arch_folder(arch_root, toy_dirs, "gpt_neox"))], ["blocks.1.hook_resid_mid"])
    assert "attention and MLP run in parallel" in message and "blocks.L.mlp.hook_in" in message


def test_bidirectional_encoder_is_refused(arch_root, toy_dirs):
    """BERT loads through the bridge, but each of its rows reads later tokens (and, packed, the next
    document): not the causal rows the cache promises. Refused by what the load-time probe sees."""
    from arch_models import copy_tokenizer
    from transformers import BertConfig, BertForMaskedLM

    folder = arch_root / "bert"
    if not folder.exists():
        torch.manual_seed(0)
        BertForMaskedLM(BertConfig(vocab_size=4096, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=128, max_position_embeddings=64,
                                   pad_token_id=1)).save_pretrained(folder)
        copy_tokenizer(toy_dirs["toy-base"], folder)
    message = _refusal([str(folder)], ["blocks.0.hook_resid_post"])
    assert "BertForMaskedLM" in message and "later tokens" in message and "causal" in message


def test_phi_mlp_in_names_the_mlp_input(arch_root, toy_dirs):
    """Phi's blocks have no ln2 (attention and MLP read one norm): hook_mlp_in never fires, and the
    error says which hook is the MLP's input (checked above to equal it)."""
    message = _refusal([str(arch_folder(arch_root, toy_dirs, "phi"))], ["blocks.1.hook_mlp_in"])
    assert "never fired" in message and "blocks.1.mlp.hook_in" in message and "PhiForCausalLM" in message


@pytest.mark.parametrize("hook", ["blocks.1.mlp.gate.hook_out", "blocks.1.mlp.hook_expert_weights"])
def test_moe_router_hooks_are_refused_by_width(arch_root, toy_dirs, hook):
    """A mixture of experts' router hooks hold expert scores or choices, not d_model-wide rows."""
    message = _refusal([str(arch_folder(arch_root, toy_dirs, "mixtral"))], [hook])
    assert hook in message and "d_model=64" in message and "hook_mlp_out" in message


def test_opt_flattened_hook_is_refused(arch_root, toy_dirs):
    """OPT's ln2.hook_normalized fires on [batch*pos, d] rows that transformer-lens does not restore:
    refused as such, not as a hook of the wrong width."""
    message = _refusal([str(arch_folder(arch_root, toy_dirs, "opt"))], ["blocks.1.ln2.hook_normalized"])
    assert "flattened rows" in message and "blocks.L.ln2.hook_out" in message


@pytest.mark.parametrize("arch, hooks", [
    # ln1 there is the norm after attention: its output is the MLP's input, not the attention's (accepted before).
    ("opt_post_ln", ["blocks.1.hook_resid_mid", "blocks.1.hook_mlp_in", "blocks.1.ln2.hook_out",
                     "blocks.1.ln1.hook_out"]),
    ("openai_gpt", ["blocks.1.hook_mlp_in", "blocks.1.ln2.hook_normalized", "blocks.1.ln1.hook_normalized"]),
])
def test_post_ln_refuses_hooks_that_are_not_the_mlp_input(arch, hooks, arch_root, toy_dirs):
    """opt-350m's and GPT-1's LayerNorms follow attention and MLP; transformer-lens's ln2 is the norm
    after the MLP, so these hooks would be the block's output before that norm, named as the MLP's input."""
    folder = arch_folder(arch_root, toy_dirs, arch)
    for hook in hooks:
        message = _refusal([str(folder)], [hook])
        assert hook in message and "post-LN" in message and "blocks.L.mlp.hook_in" in message
    ok = ["blocks.1.hook_resid_pre", "blocks.1.hook_mlp_out", "blocks.1.mlp.hook_in"]
    if arch == "openai_gpt":
        ok.append("blocks.1.hook_resid_mid")  # transformer-lens maps it to mlp.hook_in (after ln_1): right
        # The bridge never fires GPT-1's block outputs (its blocks return a list): said so, not a crash.
        assert "never fired" in _refusal([str(folder)], ["blocks.1.hook_resid_post"])
    loaded = load_models([str(folder)], ok, context_size=32, device=torch.device("cpu"), model_dtype=torch.float32,
                         progress=False)
    assert loaded.d_model == 64
