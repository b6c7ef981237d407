"""Splicing into a transformer-lens bridge's forward pass: capture and replace hook points, and the
closed loop of ``run_train.py lm-eval --loop closed`` (:mod:`train.lm_eval`).

Closed loop: one forward pass per model in which each input hook captures the activation of the
spliced model and each output hook is replaced by the dictionary's reconstruction from the inputs
captured before it. :func:`check_closed_loop` says, from the hook names' place in a transformer-lens
4 block, where that is defined; :func:`closed_loop_forward` runs it.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from einops import einsum, rearrange

from train.analysis_run import RunError

__all__ = ["capture_hook", "check_closed_loop", "closed_loop_forward", "clt_slot_recon", "forward_with_hooks",
           "replace_at_kept", "replace_hook"]


def forward_with_hooks(bridge: Any, tokens_BP: torch.Tensor,
                       hooks: dict[str, Any] | list[tuple[str, Any]]) -> torch.Tensor:
    """Logits of one forward with ``hooks`` (point name -> forward hook; or (name, hook) pairs, where hooks on
    one point run in list order) registered for its duration."""
    pairs = hooks.items() if isinstance(hooks, dict) else hooks
    handles = [bridge.hook_dict[name].register_forward_hook(fn) for name, fn in pairs]
    try:
        return bridge(tokens_BP)
    finally:
        for handle in handles:
            handle.remove()


def capture_hook(store: dict[str, torch.Tensor], name: str, point: Any) -> Any:
    """A forward hook that stores the point's value (per-head points flattened, as harvested) in ``store[name]``."""
    from harvest.models import hook_value

    def hook(_module: Any, _inputs: Any, out: torch.Tensor) -> None:
        store[name] = hook_value(point, out).detach().float()
    return hook


def replace_at_kept(out: torch.Tensor, new_BPD: torch.Tensor, keep_BP: torch.Tensor) -> torch.Tensor:
    """A hook point's output with ``new_BPD`` where ``keep_BP`` holds (kept tokens) and its own value elsewhere."""
    # OPT's MLP-side points fire on flattened [batch*pos, d] rows: the same elements, reshaped.
    new = new_BPD.to(out.dtype).reshape(out.shape)
    keep = keep_BP.reshape(*out.shape[:-1], 1)
    return torch.where(keep, new, out)


def replace_hook(new_BPD: torch.Tensor, keep_BP: torch.Tensor) -> Any:
    """A forward hook that puts ``new_BPD`` where ``keep_BP`` holds (kept tokens) and leaves the rest."""
    def hook(_module: Any, _inputs: Any, out: torch.Tensor) -> torch.Tensor:
        return replace_at_kept(out, new_BPD, keep_BP)
    return hook


# ---- closed loop ---------------------------------------------------------------------------------------
# Where a transformer-lens 4 hook point fires in a forward: a block's stages in order (the observed order of
# TransformerBridge, parallel-attention blocks included: they fire attention's points, then ln2's and the MLP's).
_STAGES = (("hook_resid_pre",), ("ln1.",),
           ("hook_attn_in", "hook_q_input", "hook_k_input", "hook_v_input", "attn.", "hook_attn_out"),
           ("hook_resid_mid", "hook_mlp_in"), ("ln2.",), ("mlp.", "hook_mlp_out"), ("hook_resid_post",))
_STAGE_EXIT = ("hook_attn_out", "hook_mlp_out")  # the last point of their stage
_ALIASES = {"hook_in": "hook_resid_pre", "hook_out": "hook_resid_post", "attn.hook_out": "hook_attn_out",
            "mlp.hook_out": "hook_mlp_out", "embed.hook_out": "hook_embed"}  # one point, two names


def _canonical(hook: str) -> str:
    m = re.fullmatch(r"(blocks\.\d+\.)(.+)", hook)
    return m.group(1) + _ALIASES.get(m.group(2), m.group(2)) if m else _ALIASES.get(hook, hook)


def _hook_position(hook: str) -> tuple[int, int, int] | None:
    """(layer, stage, 0 entry / 1 inside / 2 exit of the stage's sublayer) of a canonical hook name; None: not placed.
    Points inside one sublayer (``attn.hook_q``, ``attn.hook_z``) share a position: their order is not known here."""
    if hook == "hook_embed":
        return (-1, 0, 0)
    if hook.startswith("ln_final."):
        return (1 << 30, 0, 0 if hook.endswith(".hook_in") else 2 if hook.endswith(".hook_out") else 1)
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", hook)
    if m is None:
        return None
    layer, point = int(m.group(1)), m.group(2)
    for stage, names in enumerate(_STAGES):
        for name in names:
            if name.endswith("."):
                if point.startswith(name):
                    rest = point[len(name):]
                    return (layer, stage, 0 if rest == "hook_in" else 2 if rest == "hook_out" else 1)
            elif point == name:
                return (layer, stage, 2 if name in _STAGE_EXIT else 0)
    return None


def _fires_before(a: str, b: str) -> bool | None:
    """Whether hook point ``a`` fires no later than ``b`` in a forward (the same point: yes, its capture runs
    first); None where the names do not tell."""
    a, b = _canonical(a), _canonical(b)
    if a == b:
        return True
    pa, pb = _hook_position(a), _hook_position(b)
    if pa is None or pb is None or pa == pb:
        return None
    return pa < pb


def _closed_loop_reads(cfg: Any, j: int) -> list[int]:
    """The input slots (indices into ``in_slots``) that output slot ``j``'s reconstruction reads: a clt's layers
    <= j (layer i's latents read input i alone; output j decodes layers <= j; its skip reads input j), a
    directional dictionary's every input (one encoder over all of them)."""
    return list(range(j + 1)) if cfg.arch == "clt" else list(range(cfg.n_in))


def check_closed_loop(cfg: Any, slots: list[tuple[str, str]]) -> None:
    """Refuse (ValueError) a dictionary (``DictionaryConfig``) for which ``--loop closed`` is not defined:
    ``slots`` is the (model, hook) of every slot of its ``x_BXD``. Closed loop needs one model and, for every
    output slot, each input its reconstruction reads to fire before that output hook in the forward pass."""
    fix = "; evaluate it with --loop open (every reconstruction from the clean activations)"
    if cfg.arch == "crosscoder":
        raise ValueError(f"--loop closed is not defined for arch crosscoder: its encoder reads every slot it "
                         f"reconstructs ({', '.join('/'.join(slots[s]) for s in cfg.in_slots)}), so no forward pass "
                         f"can feed it the spliced activations before it writes them{fix}")
    models = {slots[s][0] for s in [*cfg.in_slots, *cfg.out_slots]}
    if len(models) > 1:
        raise ValueError(f"--loop closed splices each model in a forward pass of its own, but this dictionary reads "
                         f"and writes the slots of several models ({', '.join(sorted(models))}): a model's "
                         f"reconstruction would read another model's activations{fix}")
    if cfg.arch == "clt" and cfg.activation == "topk":
        raise ValueError("--loop closed needs each layer's latents to depend on its own input only, but a topk CLT "
                         "keeps the k largest latents of all layers together, so layer j's reconstruction depends on "
                         "later layers' inputs (relu, jumprelu and batchtopk, a per-latent threshold at inference, "
                         f"do not){fix}")
    ins, outs = [slots[s][1] for s in cfg.in_slots], [slots[s][1] for s in cfg.out_slots]
    for j, out in enumerate(outs):
        for i in _closed_loop_reads(cfg, j):
            before = _fires_before(ins[i], out)
            if not before:
                why = "fires after it" if before is False else "fires at a point whose order these names do not tell"
                raise ValueError(f"--loop closed needs every input a reconstruction reads to fire before the output "
                                 f"hook it replaces: output {out} reads input {ins[i]}, which {why}{fix}")


def clt_slot_recon(dictionary: Any, latents_by_layer: list[torch.Tensor], x_j_ND: torch.Tensor, j: int) -> torch.Tensor:
    """Output slot ``j`` [N, D] of a clt's reconstruction: the ``recon_BXoD[:, j]`` of ``dictionary(x_in_NXiD)``
    from what it reads, the latents of layers <= j (``latents_by_layer[i]`` = ``dictionary.encode_layer(x_i, i)``,
    [N, latents_per_layer]; later entries are not read) and, for a skip connection, input j ``x_j_ND``."""
    cfg = dictionary.cfg
    latents_NXL = torch.stack(latents_by_layer[: j + 1], dim=1)
    W_dec_XLD = dictionary.W_dec_XiLXoD[: j + 1, :, j]  # the causal mask is 1 on layers <= j
    recon_ND = einsum(latents_NXL, W_dec_XLD, "n x l, x l d -> n d") + dictionary.b_dec_XoD[j]
    if cfg.skip:
        recon_ND = recon_ND + x_j_ND @ dictionary.W_skip_XiDD[j]
    return recon_ND


def closed_loop_forward(bridge: Any, dictionary: Any, tokens_BP: torch.Tensor, keep_BP: torch.Tensor,
                         in_hooks: list[str], out_hooks: list[str],
                         recons: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """Logits of one closed-loop forward of ``bridge``: the input hooks (of ``in_slots``, in order) capture
    what the spliced model computes, and each output hook ``out_hooks[j]`` is replaced at kept tokens by its
    reconstruction from the inputs captured before it (:func:`check_closed_loop` says which it reads).
    ``recons`` (optional): filled with each output slot's reconstruction [B, P, D], at every token."""
    cfg = dictionary.cfg
    store: dict[str, torch.Tensor] = {}  # this forward's inputs only: nothing stale can be read
    memo: dict[str, torch.Tensor] = {}  # directional: its encoder reads every input, so one forward serves all outputs
    clt_latents: dict[int, torch.Tensor] = {}  # clt: each layer encoded once, when the first output reading it fires

    def splice(j: int) -> Any:
        def hook(_module: Any, _inputs: Any, out: torch.Tensor) -> torch.Tensor:
            reads = _closed_loop_reads(cfg, j)
            missing = [in_hooks[i] for i in reads if in_hooks[i] not in store]
            if missing:
                raise RunError(f"--loop closed: input hook(s) {missing} had not fired when output hook {out_hooks[j]} "
                               "did (this architecture runs its block in another order, or never fires them, as "
                               "hook_resid_mid in parallel-attention blocks); evaluate with --loop open")
            b = store[in_hooks[reads[0]]].shape[0]
            if cfg.arch == "clt":
                for i in reads:
                    if i not in clt_latents:
                        clt_latents[i] = dictionary.encode_layer(rearrange(store[in_hooks[i]], "b p d -> (b p) d"), i)
                x_j_ND = rearrange(store[in_hooks[j]], "b p d -> (b p) d")
                recon_ND = clt_slot_recon(dictionary, [clt_latents[i] for i in reads], x_j_ND, j)
                recon_BPD = rearrange(recon_ND, "(b p) d -> b p d", b=b)
            else:
                if "recon_BPXD" not in memo:
                    x_in_NXiD = torch.stack([rearrange(store[h], "b p d -> (b p) d") for h in in_hooks], dim=1)
                    memo["recon_BPXD"] = rearrange(dictionary(x_in_NXiD).recon_BXoD, "(b p) x d -> b p x d", b=b)
                recon_BPD = memo["recon_BPXD"][:, :, j]
            if recons is not None:
                recons[j] = recon_BPD
            return replace_at_kept(out, recon_BPD, keep_BP)
        return hook

    # Captures first: where an input and an output are one point, the input is what arrives there.
    hooks = [(h, capture_hook(store, h, bridge.hook_dict[h])) for h in in_hooks]
    hooks += [(h, splice(j)) for j, h in enumerate(out_hooks)]
    return forward_with_hooks(bridge, tokens_BP, hooks)
