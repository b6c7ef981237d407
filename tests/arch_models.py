"""Tiny random-weight models of the architectures researchers harvest, as local HF folders.

The toy trio (:mod:`harvest.toy_models`) is GPT-NeoX only. These builders give GPT-2, Llama,
Qwen2, Mistral, Gemma, Gemma-2, OPT, Phi, ... folders of 2-3 layers and width 64, with the toy
tokenizer (4096 tokens) copied in, so a harvest of each runs in seconds on a CPU and can be
compared with a plain ``transformers`` forward. Weights are seeded: a rebuild is identical.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["ARCHS", "build_arch_model", "copy_tokenizer", "perturb_model"]

VOCAB = 4096
D = 64
HEADS = 4
LAYERS = 3
FF = 128
POSITIONS = 128
_IDS = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1}  # the toy tokenizer's <|endoftext|>, <|padding|>
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=POSITIONS, n_embd=D, n_layer=LAYERS,
                                      n_head=HEADS, n_inner=FF, **_IDS))


def _llama_like(model: str, config: str, **kw: Any) -> Any:
    """A Llama-style ``transformers`` model (``model`` built from ``config``, class names) of this
    module's sizes, with 2 KV heads for 4 query heads (grouped-query attention); ``kw`` adds or overrides."""
    import transformers

    sizes = dict(vocab_size=VOCAB, hidden_size=D, intermediate_size=FF, num_hidden_layers=LAYERS,
                 num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=POSITIONS, **_IDS)
    return getattr(transformers, model)(getattr(transformers, config)(**{**sizes, **kw}))


def _llama():
    # Grouped-query attention (2 KV heads for 4 query heads), as Llama-3 has.
    return _llama_like("LlamaForCausalLM", "LlamaConfig")


def _qwen2():
    return _llama_like("Qwen2ForCausalLM", "Qwen2Config", tie_word_embeddings=True)


def _mistral():
    # A sliding window shorter than the harvest's context (Mistral-7B-v0.1 has 4096 of 32k), so a
    # bridge that ignored it would give different rows past position 16.
    return _llama_like("MistralForCausalLM", "MistralConfig", sliding_window=16)


def _gemma():
    # Multi-query attention (one KV head, as gemma-2b); embeddings scaled by sqrt(d_model).
    return _llama_like("GemmaForCausalLM", "GemmaConfig", num_key_value_heads=1, head_dim=D // HEADS)


def _gemma2():
    # Norms before and after attention and MLP, logit soft-capping, local/global layers with a
    # sliding window shorter than the harvest's context.
    return _llama_like("Gemma2ForCausalLM", "Gemma2Config", head_dim=D // HEADS, query_pre_attn_scalar=D // HEADS,
                       sliding_window=16)


def _gemma3():
    # Gemma-2's layout plus q/k norms; five local (sliding-window) layers per global one.
    return _llama_like("Gemma3ForCausalLM", "Gemma3TextConfig", head_dim=D // HEADS, query_pre_attn_scalar=D // HEADS,
                       sliding_window=16)


def _qwen3():
    return _llama_like("Qwen3ForCausalLM", "Qwen3Config", head_dim=D // HEADS)


def _phi3():
    # Fused qkv and gate/up projections.
    return _llama_like("Phi3ForCausalLM", "Phi3Config")


def _mixtral():
    # Mixture of experts: 4 experts, 2 per token (Mixtral-8x7B has 8 and 2); the MLP output is the
    # router-weighted sum of the chosen experts' outputs.
    return _llama_like("MixtralForCausalLM", "MixtralConfig", num_local_experts=4, num_experts_per_tok=2)


def _qwen3_moe():
    # Qwen3-MoE: q/k norms, 8 small experts, 2 per token; layer 1 a dense MLP (mlp_only_layers), as
    # some MoE checkpoints mix dense and sparse blocks.
    return _llama_like("Qwen3MoeForCausalLM", "Qwen3MoeConfig", head_dim=D // HEADS, num_experts=8,
                       num_experts_per_tok=2, moe_intermediate_size=FF // 2, norm_topk_prob=True,
                       mlp_only_layers=[1])


def _olmoe():
    # OLMoE: q/k norms, 8 experts, 2 per token, softmax router without renormalisation.
    return _llama_like("OlmoeForCausalLM", "OlmoeConfig", num_experts=8, num_experts_per_tok=2)


def _opt():
    from transformers import OPTConfig, OPTForCausalLM

    return OPTForCausalLM(OPTConfig(vocab_size=VOCAB, hidden_size=D, ffn_dim=FF, num_hidden_layers=LAYERS,
                                    num_attention_heads=HEADS, max_position_embeddings=POSITIONS,
                                    word_embed_proj_dim=D, **_IDS))


def _opt_post_ln():
    from transformers import OPTConfig, OPTForCausalLM

    # As opt-350m: LayerNorm after attention and MLP (post-LN), embeddings narrower than the
    # residual stream (project_in / project_out).
    return OPTForCausalLM(OPTConfig(vocab_size=VOCAB, hidden_size=D, ffn_dim=FF, num_hidden_layers=LAYERS,
                                    num_attention_heads=HEADS, max_position_embeddings=POSITIONS,
                                    word_embed_proj_dim=D // 2, do_layer_norm_before=False, **_IDS))


def _openai_gpt():
    from transformers import OpenAIGPTConfig, OpenAIGPTLMHeadModel

    # GPT-1: post-LN blocks (LayerNorm after attention and after the MLP).
    return OpenAIGPTLMHeadModel(OpenAIGPTConfig(vocab_size=VOCAB, n_positions=POSITIONS, n_embd=D, n_layer=LAYERS,
                                                n_head=HEADS, **_IDS))


def _phi():
    from transformers import PhiConfig, PhiForCausalLM

    # Parallel attention and MLP on one shared LayerNorm, partial rotary embeddings.
    return PhiForCausalLM(PhiConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=FF, num_hidden_layers=LAYERS,
                                    num_attention_heads=HEADS, partial_rotary_factor=0.5,
                                    max_position_embeddings=POSITIONS, **_IDS))


def _gpt_neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=FF,
                                            num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                            max_position_embeddings=POSITIONS, rotary_pct=0.25, **_IDS))


ARCHS: dict[str, Callable[[], Any]] = {
    "gpt2": _gpt2,
    "llama": _llama,
    "qwen2": _qwen2,
    "mistral": _mistral,
    "gemma": _gemma,
    "gemma2": _gemma2,
    "gemma3": _gemma3,
    "qwen3": _qwen3,
    "phi3": _phi3,
    "mixtral": _mixtral,
    "qwen3_moe": _qwen3_moe,
    "olmoe": _olmoe,
    "opt": _opt,
    "opt_post_ln": _opt_post_ln,
    "openai_gpt": _openai_gpt,
    "phi": _phi,
    "gpt_neox": _gpt_neox,
}
"""Architecture name -> a builder of a freshly initialized (random) causal LM."""


def build_arch_model(arch: str, out: Path, tokenizer_dir: Path, *, seed: int = 0,
                     tokenizer_config: dict[str, Any] | None = None) -> Path:
    """Build ``arch`` with seeded random weights into the folder ``out`` (save_pretrained,
    safetensors) with the tokenizer of ``tokenizer_dir`` copied in. ``tokenizer_config``: keys
    that replace those of the copied tokenizer_config.json (``{"bos_token": None}`` makes a
    tokenizer without BOS, as Qwen2's)."""
    torch.manual_seed(seed)
    model = ARCHS[arch]()
    with torch.no_grad():  # larger weights than HF's 0.02 init: activations far from zero, distinct per layer
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.1)
            else:
                p.add_(torch.randn_like(p) * 0.1)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    copy_tokenizer(tokenizer_dir, out, tokenizer_config)
    return out


def copy_tokenizer(tokenizer_dir: Path, out: Path, tokenizer_config: dict[str, Any] | None = None) -> None:
    """Copy the tokenizer files of ``tokenizer_dir`` into the model folder ``out``, with the keys of
    ``tokenizer_config`` replacing those of its tokenizer_config.json."""
    for name in _TOKENIZER_FILES:
        shutil.copy(tokenizer_dir / name, out / name)
    if tokenizer_config:
        cfg = json.loads((out / "tokenizer_config.json").read_text())
        cfg.update(tokenizer_config)
        (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))


def perturb_model(src: Path, out: Path, *, seed: int = 1, scale: float = 0.05) -> Path:
    """A copy of the folder ``src`` whose every weight has seeded noise of std ``scale`` added
    (a stand-in for a fine-tune of it)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, out)
    gen = torch.Generator().manual_seed(seed)
    tensors = load_file(src / "model.safetensors")
    noisy = {k: v + scale * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in tensors.items()}
    save_file(noisy, out / "model.safetensors", metadata={"format": "pt"})
    return out
