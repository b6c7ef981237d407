"""Resolve model names, load them with transformer-lens 4, and check they can be harvested together.

Everything here runs before the first forward pass on data: unknown hooks, tokenizers or
widths that differ, or a context longer than a model accepts fail here with a clear error.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from shared.progress import transformers_bars_as_ours

__all__ = ["ResolvedModel", "resolve_model", "load_models", "LoadedModels", "stop_layer_for", "HarvestInputError",
           "hook_value", "weights_fingerprint", "check_same_weights"]


class HarvestInputError(ValueError):
    """Bad harvest input (hook, model, tokenizer, width, context, dataset), with the fix."""


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model name points: a local HF folder (toy or path) or a Hub id."""

    name: str
    load_from: str  # local folder or HF id
    path: str | None  # resolved local folder, None for a Hub id
    revision: str | None


def resolve_model(name: str) -> ResolvedModel:
    """Map a toy name, a local folder, or ``HF_ID[@REVISION]`` to what to load."""
    from harvest.toy_models import TOY_NAMES, ensure_toy_model, is_toy_name

    if is_toy_name(name):
        path = ensure_toy_model(name)
        return ResolvedModel(name, str(path), str(path), None)
    local = Path(name).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise HarvestInputError(
                f"model folder {local} has no config.json; expected a Hugging Face model folder "
                "(save_pretrained output)"
            )
        if not any((local / f).is_file() for f in _TOKENIZER_FILES) and not any(local.glob("*.tiktoken")):
            # Fine-tune checkpoints are often saved without one. transformers then fails deep in the
            # load, or (GPT-2) builds an empty tokenizer that tokenizes every document to nothing.
            raise HarvestInputError(
                f"model folder {local} has no tokenizer files (none of {', '.join(_TOKENIZER_FILES)}); copy the "
                "base model's tokenizer into it (tokenizer.save_pretrained(folder))"
            )
        return ResolvedModel(name, str(local.resolve()), str(local.resolve()), None)
    if name.startswith((".", "/", "~")) or name.endswith("/") or name.count("/") > 1 or "\\" in name:
        # Not a Hub id ("org/name"): the user meant a folder, so say that, not "invalid repo id".
        raise HarvestInputError(f"model folder {local} does not exist (from {name!r}); check the path")
    close = difflib.get_close_matches(name, TOY_NAMES, n=1, cutoff=0.75)
    if close:  # a Hub id this close to a toy name is almost surely a typo; offline, the Hub's error hides it
        raise HarvestInputError(f"unknown model {name!r}: did you mean {close[0]!r}? (toy models: {', '.join(TOY_NAMES)})")
    base, _, revision = name.partition("@")
    return ResolvedModel(name, base, None, revision or None)


_ADDED_SHOWN = 50
"""Added tokens the manifest lists per model (a chat template adds a few; a new language, thousands)."""

_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer.model", "spiece.model",
                    "sentencepiece.bpe.model")
"""Files of which a model folder needs one for its tokenizer to load (or a ``*.tiktoken``)."""


def _model_type(r: ResolvedModel, bridge: Any = None) -> str:
    """A model's architecture as its config names it (for error messages): the loaded model's config,
    else a local folder's config.json."""
    config = getattr(getattr(bridge, "original_model", None), "config", None)
    if config is not None:
        cfg = {"architectures": getattr(config, "architectures", None), "model_type": getattr(config, "model_type", "?")}
    else:
        try:
            cfg = json.loads((Path(r.path) / "config.json").read_text()) if r.path else {}
        except (OSError, ValueError):
            return "unknown architecture"
    return f"{', '.join(cfg.get('architectures') or ['?'])}, model_type {cfg.get('model_type', '?')!r}"


def _own_size(r: ResolvedModel) -> int:
    """How many tokens the model's own tokenizer has, before transformer-lens adds any (it adds an
    ``<|endoftext|>`` to a tokenizer that declares no BOS/EOS: a token the model never saw)."""
    from transformers import AutoTokenizer

    try:
        return len(AutoTokenizer.from_pretrained(r.load_from, revision=r.revision))
    except (OSError, ValueError):  # the bridge loaded it; whatever fails here is not worth a refusal
        return 1 << 62


_GATES = {
    "hook_mlp_in": "set_use_hook_mlp_in",
    "hook_attn_in": "set_use_attn_in",
    "hook_q_input": "set_use_split_qkv_input",
    "hook_k_input": "set_use_split_qkv_input",
    "hook_v_input": "set_use_split_qkv_input",
    "attn.hook_result": "set_use_attn_result",
}
"""Hook-name suffix -> the transformer-lens setter that must be on for that hook to fire."""


def stop_layer_for(hooks: list[str], n_layers: int) -> int | None:
    """``stop_at_layer`` that still runs every block a hook needs (None: run the whole model)."""
    last = -1
    for hook in hooks:
        m = re.match(r"blocks\.(\d+)\.", hook)
        if m:
            last = max(last, int(m.group(1)))
        elif hook.startswith(("ln_final", "unembed", "hook_unembed")):
            return None
    return min(last + 1, n_layers) if last >= 0 else 1


def hook_value(point: Any, out: Any) -> Any:
    """The activation a hook point's forward hook (``register_forward_hook``) receives, as
    transformer-lens's own hooks see it: the raw output passed through the point's
    ``hook_conversion`` when it is not ``[batch, pos, ...]`` already. OPT runs its MLP on flattened
    ``[batch*pos, d]`` rows, so its ln2, MLP and ``hook_resid_mid``/``hook_mlp_in``/``hook_mlp_out``
    points fire 2-D and their conversion restores ``(batch, pos)``; a 3-D output is left alone (the
    attention points' conversion keeps per-call state, not worth paying for a no-op)."""
    conversion = getattr(point, "hook_conversion", None)
    if conversion is None or not isinstance(out, torch.Tensor) or out.dim() >= 3:
        return out
    return conversion.convert(out)


_PRE_NORM_SIDE = re.compile(r"blocks\.(\d+)\.(hook_mlp_in|hook_resid_mid|ln[12]\.\w+)$")
"""Hooks whose meaning (the MLP's input, the residual between attention and MLP, the norm before attention)
assumes pre-norm blocks: ln1 before attention, ln2 before the MLP."""


def _post_norm_points(bridge: Any, hooks: list[str]) -> list[str]:
    """Hook points the probe also captures to tell post-norm blocks (see :func:`_post_norm_hooks`)."""
    layers = sorted({int(m.group(1)) for h in hooks if (m := _PRE_NORM_SIDE.match(h))})
    return [p for L in layers for p in (f"blocks.{L}.ln2.hook_in", f"blocks.{L}.mlp.hook_in", f"blocks.{L}.hook_mlp_out")
            if p in bridge.hook_dict]


def _post_norm_hooks(r: ResolvedModel, bridge: Any, hooks: list[str], captured: dict[str, Any]) -> str | None:
    """An error for hooks a post-norm block (opt-350m's ``do_layer_norm_before=False``, GPT-1) would
    silently harvest as something else. transformer-lens maps ln2 to the norm after the MLP there (its
    input is the MLP's input plus its output: the residual add), so ``ln2.*``, and
    ``hook_mlp_in``/``hook_resid_mid`` where they are ln2's input, are not the MLP's input; and ln1 to the
    norm after attention, so ``ln1.*`` is not the attention's input."""
    bad = []
    for hook in hooks:
        m = _PRE_NORM_SIDE.match(hook)
        if not m:
            continue
        block = f"blocks.{m.group(1)}"
        ln2_in, mlp_in, mlp_out = (captured.get(f"{block}.{p}") for p in ("ln2.hook_in", "mlp.hook_in", "hook_mlp_out"))
        if not (all(isinstance(t, torch.Tensor) and t.shape == ln2_in.shape for t in (ln2_in, mlp_in, mlp_out))
                and torch.allclose(ln2_in, mlp_in + mlp_out, rtol=1e-3, atol=1e-5)):
            continue  # ln2 precedes the MLP
        reads_ln2_input = {
            "hook_mlp_in": not getattr(bridge.get_submodule(block), "mlp_reads_resid_directly", False),
            "hook_resid_mid": bridge.hook_dict[hook] is bridge.hook_dict.get(f"{block}.ln2.hook_in"),
        }.get(m.group(2), True)
        if reads_ln2_input:
            bad.append(hook)
    if not bad:
        return None
    return (f"hook(s) {bad} of model {r.name!r} ({_model_type(r, bridge)}) are not what their names say: its blocks "
            "normalize after attention and after the MLP (post-LN, as opt-350m and GPT-1), and transformer-lens's ln1 "
            "is the norm after attention (its output is the MLP's input, not the attention's), ln2 the norm after "
            "the MLP (its hooks and hook_mlp_in/hook_resid_mid hold the MLP's input plus output before that norm). "
            "The MLP reads blocks.L.mlp.hook_in; the residual stream is blocks.L.hook_resid_pre/post")


def _capture(bridge: Any, names: list[str], tokens_BP: torch.Tensor, stop: int | None) -> dict[str, Any]:
    """What the hook points ``names`` see in one forward of ``tokens_BP``, run the way the harvest
    runs it (forward hooks on the hook points, ``stop_at_layer``); a point that never fires is absent."""
    captured: dict[str, Any] = {}
    handles = [bridge.hook_dict[h].register_forward_hook(
        lambda _mod, _inp, out, h=h, point=bridge.hook_dict[h]: captured.__setitem__(h, hook_value(point, out)))
        for h in dict.fromkeys(names)]
    try:
        with torch.inference_mode():
            bridge(tokens_BP, stop_at_layer=stop)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def _reads_later_tokens(bridge: Any, hooks: list[str], stop: int | None, probe_BP: torch.Tensor) -> bool:
    """Whether position 0 of any harvested hook changes when the token after it does: two
    sequences that differ only at position 1, forwarded one at a time the way the harvest forwards
    them. A causal model computes position 0 the same way from the same inputs both times."""
    first = int(probe_BP[0, 0])
    a, b = (_capture(bridge, hooks, torch.tensor([[first, second]], device=probe_BP.device), stop)
            for second in (1, 2))
    for h, acts in a.items():
        a_D, b_D = acts[0, 0].float(), b[h][0, 0].float()
        if (a_D - b_D).norm() > 1e-3 * a_D.norm() + 1e-6:
            return True
    return False


def _hook_note(bridge: Any, hook: str) -> str | None:
    """What a ``*.hook_normalized`` hook of a norm with a weight or bias is, since its name suggests the
    norm's output: transformer-lens 4 fires it on ``(x - mean) / scale`` (LayerNorm) or ``x / scale``
    (RMSNorm) before the weight and bias, on every architecture; the next layer reads ``*.hook_out``."""
    if not hook.endswith(".hook_normalized"):
        return None
    norm = hook[: -len(".hook_normalized")]
    try:
        original = getattr(bridge.get_submodule(norm), "original_component", None)
    except AttributeError:
        return None
    if getattr(original, "weight", None) is None and getattr(original, "bias", None) is None:
        return None  # a parameter-free norm: normalized and output are the same
    return (f"note: {hook} is the normalized input before the norm's weight and bias (transformer-lens 4's "
            f"convention); the input the next layer reads (the MLP's, for ln2) is {norm}.hook_out")


def _close_hooks(hook: str, names: list[str]) -> list[str]:
    close = difflib.get_close_matches(hook, names, n=5, cutoff=0.6)
    return close or sorted(n for n in names if n.split(".")[-1] == hook.split(".")[-1])[:5]


def vocab_extension(vocabs: list[dict[str, int]]) -> tuple[int, list[list[str]]] | None:
    """Whether one vocabulary is contained in every other with the same ids (a chat fine-tune that
    added ``<|im_start|>``... to its base's): the index of that smallest vocabulary and, per
    vocabulary, the tokens it adds to it in id order. None when there is no such vocabulary."""
    i = min(range(len(vocabs)), key=lambda k: len(vocabs[k]))
    inner = vocabs[i].items()
    if not all(inner <= v.items() for v in vocabs):
        return None
    return i, [sorted(set(v) - set(vocabs[i]), key=v.__getitem__) for v in vocabs]


def _added_summary(added_tokens: dict[str, list[str]]) -> str:
    return "; ".join(f"{name}'s adds {len(a)} ({', '.join(a[:5])}{', ...' if len(a) > 5 else ''})"
                     for name, a in added_tokens.items())


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of the vocabulary (token -> id), the identity that row alignment relies on."""
    from shared.tokenizer_file import vocab_sha256

    return vocab_sha256(tokenizer.get_vocab())


_FINGERPRINT_SAMPLES = 4096
"""Values sampled per parameter tensor (evenly spaced): training or editing a model changes nearly
every weight, so a sample shows it, at a cost of milliseconds even for a 7B model."""


def weights_fingerprint(model: Any, as_dtype: torch.dtype | None = None) -> str:
    """A sha256 over every parameter's name, shape and an evenly spaced sample of its values (as
    float32): the same weights give the same fingerprint on any device; a model retrained or edited
    in place (a fine-tune folder rebuilt, a Hub branch that moved) gives another. ``as_dtype``: the
    fingerprint the same weights give when loaded in that dtype (values rounded to it first)."""
    import hashlib

    h = hashlib.sha256()
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            flat = param.detach().reshape(-1)
            step = max(1, flat.numel() // _FINGERPRINT_SAMPLES)
            sample = flat[::step][:_FINGERPRINT_SAMPLES]
            sample = (sample if as_dtype is None else sample.to(as_dtype)).float().cpu().contiguous()
            h.update(f"{name}:{tuple(param.shape)}:".encode())
            h.update(sample.numpy().tobytes())
    return h.hexdigest()


def check_same_weights(recorded: list[dict[str, Any]], loaded: list[dict[str, Any]]) -> None:
    """Refuse a resume whose models' weights differ from those the cache's rows came from (manifest
    ``models[].weights_fingerprint``; caches from before it was recorded are not checked): the new
    rows would be another model's, under the first rows' normalization, and nothing would tell."""
    for then, now in zip(recorded, loaded):
        a, b = then.get("weights_fingerprint"), now.get("weights_fingerprint")
        if a and b and a != b:
            raise HarvestInputError(
                f"model {now['name']!r} has other weights than when this cache was started (fingerprint "
                f"{a[:12]} then, {b[:12]} now: retrained or edited in place, or a Hub branch that moved). "
                "Resuming would mix two models' activations in one cache: restore the original weights (or "
                "pin them, NAME@REVISION), or harvest into a new --out")


@dataclass
class LoadedModels:
    """Bridges ready to harvest, plus what the manifest records about them."""

    bridges: list[Any]
    resolved: list[ResolvedModel]
    tokenizer: Any
    d_model: int
    stop_at_layer: int | None
    excluded_ids: list[int]
    bos_id: int | None
    eos_id: int | None
    n_vocab: int  # token ids the models can embed: the smallest embedding table (pre-tokenized data is checked against it)
    tokenizer_model: int = 0  # index of the model whose tokenizer tokenizes (not 0 only with a vocabulary extension)
    added_tokens: dict[str, list[str]] = field(default_factory=dict)  # model name -> tokens it adds to that tokenizer
    # model name -> its own BOS/EOS ids, for the models whose tokenizer declares others than the ones fed
    own_special_ids: dict[str, dict[str, int | None]] = field(default_factory=dict)

    def manifest_models(self) -> list[dict[str, Any]]:
        return [
            {
                "name": r.name,
                "path": r.path,
                "revision": r.revision,
                "d_model": int(b.cfg.d_model),
                "n_layers": int(b.cfg.n_layers),
                # Attention and MLP in parallel (GPT-J, NeoX with use_parallel_residual, ...): hook_resid_mid
                # never fires in a HookedTransformer then (the circuit-tracer export checks it).
                "parallel_attn_mlp": bool(getattr(b.cfg, "parallel_attn_mlp", False)),
                "weights_fingerprint": weights_fingerprint(getattr(b, "original_model", b)),
            }
            for r, b in zip(self.resolved, self.bridges)
        ]

    def vocab_extension_note(self) -> str | None:
        """What the harvest prints when it tokenizes with one model's tokenizer that others extend."""
        if not self.added_tokens:
            return None
        return (f"vocabulary extension: tokenizing with {self.resolved[self.tokenizer_model].name}'s tokenizer "
                f"({_added_summary(self.added_tokens)}: never in the data)")

    def special_tokens_note(self) -> str | None:
        """What the harvest prints when the models' tokenizers declare different BOS/EOS tokens (a base and its
        chat fine-tune often end documents differently): every model is fed one tokenizer's, so rows at the
        same position hold the same tokens in every model."""
        if not self.own_special_ids:
            return None
        t = self.tokenizer

        def named(ids: dict[str, int | None], tok: Any) -> str:
            return ", ".join(f"{k.split('_')[0].upper()} {'none' if i is None else repr(tok.convert_ids_to_tokens(i))}"
                             f"{'' if i is None else f' ({i})'}" for k, i in ids.items())

        fed = named({"bos_token_id": self.bos_id, "eos_token_id": self.eos_id}, t)
        tokenizer_of = {r.name: b.tokenizer for r, b in zip(self.resolved, self.bridges)}
        own = "; ".join(f"{name} declares {named(ids, tokenizer_of[name])}" for name, ids in self.own_special_ids.items())
        which = self.resolved[self.tokenizer_model].name
        how = ("the first model's; list another first in --models to feed its own" if not self.added_tokens
               else "the tokenizer the others extend")
        return (f"special tokens: the models' tokenizers differ in BOS/EOS; every model is fed {which}'s ({how}): "
                f"{fed}. {own}")

    def manifest_tokenizer(self) -> dict[str, Any]:
        t = self.tokenizer
        meta = {
            "name": getattr(t, "name_or_path", None),
            "path": self.resolved[self.tokenizer_model].path,
            "vocab_size": len(t),
            "sha256": tokenizer_fingerprint(t),
            "bos_token_id": self.bos_id,
            "eos_token_id": self.eos_id,
            "pad_token_id": t.pad_token_id,
        }
        if self.own_special_ids:  # readers ignore it; it says which models were fed BOS/EOS they do not declare
            meta["own_special_tokens"] = self.own_special_ids
        if self.added_tokens:  # readers ignore it; it says why the models' tokenizers differ
            meta["extended_by"] = {
                name: {"n_added": len(added), "added": added[:_ADDED_SHOWN]} for name, added in self.added_tokens.items()
            }
        return meta


def resolve_device(device: str) -> torch.device:
    """:func:`shared.devices.resolve_device`, raising :class:`HarvestInputError`."""
    from shared.devices import resolve_device as resolve

    try:
        return resolve(device)
    except ValueError as e:
        raise HarvestInputError(str(e)) from None


def load_models(
    names: list[str],
    hooks: list[str],
    *,
    context_size: int,
    device: torch.device,
    model_dtype: torch.dtype,
    exclude_special: bool = True,
    exclude_token_ids: list[int] | None = None,
    allow_vocab_extension: bool = False,
    progress: bool = True,
) -> LoadedModels:
    """Load every model and check hooks, tokenizers, widths and context size (no data forward).
    ``allow_vocab_extension``: accept vocabularies that extend one of them with the same ids (see
    :func:`vocab_extension`) and tokenize with that one. ``progress=False`` also silences
    transformers' weight-loading bars."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers.utils import logging as hf_logging

    resolved = [resolve_model(n) for n in names]
    bridges = []
    for r in resolved:
        bars_were_on = hf_logging.is_progress_bar_enabled()
        if not progress:
            hf_logging.disable_progress_bar()
        try:
            with transformers_bars_as_ours():
                bridge = TransformerBridge.boot_transformers(
                    r.load_from, device=device, dtype=model_dtype, revision=r.revision
                )
        except OSError as e:
            raise HarvestInputError(
                f"cannot load model {r.name!r}: {str(e).rstrip('. ')}. Give a toy name (toy-base, toy-code, "
                "toy-prose), a local Hugging Face folder, or a Hub id reachable from here."
            ) from e
        except ValueError as e:
            if "supported architecture" in str(e):  # its list of ~180 supported names is left out
                raise HarvestInputError(
                    f"model {r.name!r} ({_model_type(r)}) is not an architecture transformer-lens's "
                    "TransformerBridge supports; see its list of supported architectures"
                ) from e
            raise HarvestInputError(f"cannot load model {r.name!r}: {str(e).splitlines()[0]}") from e
        except (RuntimeError, KeyError, TypeError, AttributeError, IndexError, NotImplementedError,
                AssertionError) as e:  # transformer-lens failing on a layout it does not handle
            first = str(e).splitlines()[0] if str(e) else ""
            raise HarvestInputError(
                f"transformer-lens's TransformerBridge fails to load model {r.name!r} ({_model_type(r)}): "
                f"{type(e).__name__}: {first[:300]}. This configuration of the architecture is probably not "
                "supported by the installed transformer-lens") from e
        finally:
            if bars_were_on:
                hf_logging.enable_progress_bar()
        bridge.eval()
        if getattr(bridge.cfg, "is_encoder_decoder", False) or getattr(
                getattr(getattr(bridge, "original_model", None), "config", None), "is_encoder_decoder", False):
            # Their blocks are encoder_blocks/decoder_blocks, which stop_at_layer cannot cut, and a
            # decoder needs decoder inputs the harvest does not make.
            raise HarvestInputError(
                f"model {r.name!r} ({_model_type(r)}) is an encoder-decoder model; the harvest runs "
                "decoder-only language models"
            )
        bridges.append(bridge)

    # Hooks must exist in every model; suggest close names.
    for r, b in zip(resolved, bridges):
        names_available = list(b.hook_dict.keys())
        for hook in hooks:
            if hook not in b.hook_dict:
                close = _close_hooks(hook, names_available)
                parallel = hook.endswith("hook_resid_mid") and bool(getattr(b.cfg, "parallel_attn_mlp", False))
                raise HarvestInputError(
                    f"unknown hook {hook!r} for model {r.name!r}"
                    + (": its attention and MLP run in parallel on the same input, so no residual lies between "
                       "them (the MLP reads blocks.L.mlp.hook_in)" if parallel else "")
                    + f". Close names: {close}. Layers run 0..{b.cfg.n_layers - 1}."
                )

    # Some hooks are gated off in transformer-lens until a setter turns them on; turn on
    # exactly the gates the requested hooks need (each costs some forward-pass work).
    for b in bridges:
        for setter in sorted({_GATES[s] for h in hooks for s in _GATES if h.endswith(s)}):
            getattr(b, setter)(True)

    # Same tokenizer (vocabulary), or rows would not be the same tokens. A vocabulary that only
    # extends another (a chat fine-tune's added tokens) may be allowed: the smaller tokenizer's ids
    # then mean the same token in every model.
    fps = [tokenizer_fingerprint(b.tokenizer) for b in bridges]
    which, added_tokens = 0, {}
    if len(set(fps)) > 1:
        sizes = [len(b.tokenizer) for b in bridges]
        differ = ("models do not share a tokenizer (vocabularies differ: "
                  + ", ".join(f"{r.name}: {s} tokens, sha256 {f[:10]}" for r, s, f in zip(resolved, sizes, fps)) + ")")
        ext = vocab_extension([b.tokenizer.get_vocab() for b in bridges])
        if ext is None:
            raise HarvestInputError(differ + "; crosscoding needs the same tokens in every model: harvest them separately")
        which, added = ext
        added_tokens = {r.name: a for r, a in zip(resolved, added) if a}
        base = resolved[which].name
        what = _added_summary(added_tokens)
        if not allow_vocab_extension:
            raise HarvestInputError(
                f"{differ}. Every other vocabulary extends {base}'s with the same ids ({what}), as a chat "
                f"fine-tune's does: pass --allow-vocab-extension to tokenize with {base}'s tokenizer, whose ids "
                "mean the same token in every model (the added tokens then never occur in the data)"
            )
    widths = [int(b.cfg.d_model) for b in bridges]
    if len(set(widths)) > 1:
        raise HarvestInputError(
            "models have different widths (d_model: "
            + ", ".join(f"{r.name}={w}" for r, w in zip(resolved, widths))
            + "); format v1 stores one d_model for all slots: harvest them into separate caches"
        )
    for r, b in zip(resolved, bridges):
        n_ctx = int(getattr(b.cfg, "n_ctx", 0) or 0)
        if n_ctx and context_size > n_ctx:
            raise HarvestInputError(
                f"context_size {context_size} exceeds model {r.name!r}'s maximum of {n_ctx} positions; "
                f"use --context-size {n_ctx} or less"
            )

    tokenizer = bridges[which].tokenizer
    bos_id, eos_id = _fed_special_ids(tokenizer)
    # Models whose own BOS/EOS differ (a chat fine-tune's EOS): fed these all the same, said and recorded.
    own_special_ids = {r.name: dict(zip(("bos_token_id", "eos_token_id"), ids)) for r, b in zip(resolved, bridges)
                       if (ids := _fed_special_ids(b.tokenizer)) != (bos_id, eos_id)}
    excluded = set(exclude_token_ids or [])
    n_vocab = min(int(b.cfg.d_vocab) for b in bridges)
    if added_tokens:
        # Ids past the shared vocabulary are an added token in one model and an untrained (padding)
        # embedding row, or nothing, in another: pre-tokenized data must not hold them.
        shared = max(tokenizer.get_vocab().values()) + 1
        if shared > n_vocab:
            raise HarvestInputError(
                f"{resolved[which].name}'s tokenizer has ids up to {shared - 1}, past the smallest embedding "
                f"table ({n_vocab} rows): some model cannot embed every token"
            )
        n_vocab = shared
    outside = sorted(i for i in excluded if not 0 <= i < n_vocab)
    if outside:  # a typo would otherwise exclude nothing, silently
        raise HarvestInputError(f"--exclude-token-ids {outside} lie outside the models' vocabulary [0, {n_vocab})")
    for r, b in zip(resolved, bridges):
        t = b.tokenizer
        # BOS and EOS are fed to the models (sequence starts, document ends); pad never is, and a
        # fine-tune's tokenizer may add one past the embedding table harmlessly.
        special = {"bos": t.bos_token_id, "eos": t.eos_token_id}
        # Each against its own model: a chat fine-tune's BOS/EOS may be a token it added (never fed
        # with --allow-vocab-extension, where the shared tokenizer's BOS/EOS are).
        limit = min(int(b.cfg.d_vocab), _own_size(r))
        wrong = {k: v for k, v in special.items() if v is not None and not 0 <= int(v) < limit}
        if wrong:
            # A tokenizer that declares no BOS/EOS gets one invented by transformer-lens, past the
            # embedding table (an IndexError), or inside a padded one (a token the model never saw).
            raise HarvestInputError(
                f"tokenizer of model {r.name!r} gives special token ids {wrong} outside its own tokens and the "
                f"models' vocabulary [0, {limit}): it probably declares no bos_token/eos_token, and transformer-lens "
                "made one up that the model never saw. Set them in the folder's "
                "tokenizer_config.json (for example \"eos_token\": \"<|endoftext|>\")"
            )
    fed = {k: v for k, v in {"bos": bos_id, "eos": eos_id}.items() if v is not None and not 0 <= int(v) < n_vocab}
    if fed:  # every model embeds the BOS/EOS the harvest feeds (each model's own are checked above)
        raise HarvestInputError(
            f"the tokenizer of {resolved[which].name!r} gives special token ids {fed} past the smallest embedding "
            f"table ({n_vocab} rows): some model cannot embed them; set bos_token/eos_token in its tokenizer_config.json"
        )
    if exclude_special:
        # Every model's special tokens (the vocabularies are the same, but a fine-tune may declare a
        # pad or chat token the base does not), so the excluded set does not depend on model order.
        for b in bridges:
            excluded |= set(int(i) for i in b.tokenizer.all_special_ids)
        if bos_id is not None:
            excluded.add(int(bos_id))
    stop = stop_layer_for(hooks, int(bridges[0].cfg.n_layers))

    # Widths per hook: a two-token probe (not data) catches e.g. mlp.hook_pre (d_mlp wide). It runs the
    # way the harvest forwards data (forward hooks on the hook points, stop_at_layer), so it sees the
    # tensors the harvest will capture.
    probe = torch.tensor([[bos_id if bos_id is not None else 0] * 2], device=device)
    d_model = widths[0]
    for r, b in zip(resolved, bridges):
        captured = _capture(b, hooks + _post_norm_points(b, hooks), probe, stop)
        for hook in hooks:
            if hook not in captured:
                alternative = ""
                if hook.endswith(".hook_mlp_in"):  # parallel blocks with one shared norm (Phi) have no ln2
                    alternative = f" (the MLP's input is {hook[: -len('hook_mlp_in')]}mlp.hook_in)"
                raise HarvestInputError(
                    f"hook {hook!r} of model {r.name!r} ({_model_type(r, b)}) never fired in a forward pass (gated off "
                    f"or unused by this architecture){alternative}; choose another hook"
                )
            out = captured[hook]
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            if isinstance(out, torch.Tensor) and shape == (probe.numel(), d_model):
                raise HarvestInputError(
                    f"hook {hook!r} of model {r.name!r} ({_model_type(r, b)}) fires on flattened rows "
                    f"[batch*pos, d_model] = {shape}, without (batch, pos): this architecture runs that part of "
                    "the block on flattened tokens and transformer-lens does not restore them for this hook; "
                    "choose another hook (the ln2 output is blocks.L.ln2.hook_out)"
                )
            if not isinstance(out, torch.Tensor) or len(shape) != 3 or shape[-1] != d_model:
                raise HarvestInputError(
                    f"hook {hook!r} of model {r.name!r} gives activations of shape {shape}, not "
                    f"[batch, pos, d_model={d_model}] as v1 caches need for every hook: choose "
                    "residual-stream-width hooks (hook_resid_*, hook_mlp_out, hook_attn_out)"
                )
        if problem := _post_norm_hooks(r, b, hooks, captured):
            raise HarvestInputError(problem)
        if _reads_later_tokens(b, hooks, stop, probe):
            raise HarvestInputError(
                f"model {r.name!r} ({_model_type(r, b)}) reads later tokens: its activations at a position change "
                "with the tokens after it (a bidirectional encoder, as BERT). The harvest runs causal language "
                "models, whose row at position t depends only on tokens up to t (packed documents, the token table "
                "and the reports assume it); choose a decoder-only model"
            )
    if notes := list(dict.fromkeys(n for h in hooks if (n := _hook_note(bridges[0], h)))):
        from harvest.process_group import torchrun_env

        if (torchrun_env() or (0,))[0] == 0:  # once, not once per rank
            print("\n".join(notes))
    return LoadedModels(bridges, resolved, tokenizer, d_model, stop, sorted(excluded), bos_id, eos_id, n_vocab,
                        tokenizer_model=which, added_tokens=added_tokens, own_special_ids=own_special_ids)


def _fed_special_ids(tokenizer: Any) -> tuple[int | None, int | None]:
    """The BOS and EOS ids a harvest with this tokenizer feeds: its own, each standing in for the other when it
    declares only one (transformer-lens's convention for a tokenizer with no BOS)."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else bos
    return bos, eos
