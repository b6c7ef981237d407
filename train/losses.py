"""Loss terms of the dictionary family, each returned separately and summed into ``total``.

- ``recon``: Σ over output slots and dims of the squared error, mean over the batch.
- ``sparsity``:
  - relu: decoder-norm-weighted L1, ``Σ_i λ_i f_i w_i`` (crosscoder paper);
  - jumprelu: ``Σ_i λ_i tanh(c · f_i · w_i)`` (Jan 2025 update);
  - topk / batchtopk: 0 (the k is the sparsity).
  ``w_i = Σ_slots ‖W_dec[i, slot]‖``; ``λ_i = λ`` except ``shared_sparsity_ratio · λ`` for the
  shared latents (Feb 2025 update).
- ``pre_act`` (jumprelu): ``λ_p Σ_i ReLU(θ_i − pre_i) · w_i`` (Jan 2025 update), which pulls
  dead latents' pre-activations up to their thresholds.
- ``aux_k`` (topk / batchtopk): α · squared error of reconstructing the detached residual
  ``x_out − recon`` from the top ``k_aux`` dead latents (Gao et al. 2024, sec. A.2), decoder only
  (no bias, no skip). It is part of ``total``, so its gradient reaches the dead latents' encoder
  and decoder (peer code has returned it without backpropagating it).

Every term is a mean over the batch, so all scale alike with batch size.
"""

from __future__ import annotations

import torch
from einops import einsum

from train.dictionary import Dictionary, DictOutput

__all__ = ["loss_terms", "sparsity_weights"]


def sparsity_weights(model: Dictionary, sparsity_coeff: float) -> torch.Tensor:
    """Per-latent sparsity coefficient λ_i [L]: ``shared_sparsity_ratio · λ`` for shared latents."""
    cfg = model.cfg
    lam_L = torch.full((cfg.n_latents,), float(sparsity_coeff), device=model.b_enc_L.device)
    lam_L[: cfg.shared_latents] *= cfg.shared_sparsity_ratio
    return lam_L


def _aux_k(model: Dictionary, x_out_BXoD: torch.Tensor, out: DictOutput, dead_mask_L: torch.Tensor) -> torch.Tensor:
    cfg = model.cfg
    n_dead = int(dead_mask_L.sum())
    if n_dead == 0:
        return out.recon_BXoD.new_zeros(())
    k_aux = min(cfg.resolved_k_aux, n_dead)
    residual_BXoD = (x_out_BXoD - out.recon_BXoD).detach()
    # Rank only dead latents (live ones at -inf); k_aux <= n_dead, so every pick is dead.
    dead_pre_BL = out.pre_BL.masked_fill(~dead_mask_L.to(out.pre_BL.device), float("-inf"))
    top = dead_pre_BL.topk(k_aux, dim=-1, sorted=False)
    aux_latents_BL = torch.zeros_like(out.pre_BL).scatter(-1, top.indices, torch.relu(top.values))
    aux_recon_BXoD = einsum(aux_latents_BL, model.decoder_weight(), "b l, l x d -> b x d")
    return cfg.aux_k_coeff * (residual_BXoD - aux_recon_BXoD).pow(2).sum((1, 2)).mean()


def loss_terms(
    model: Dictionary,
    x_in_BXiD: torch.Tensor,
    x_out_BXoD: torch.Tensor,
    out: DictOutput,
    *,
    sparsity_coeff: float,
    dead_mask_L: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """All loss terms of one training step: ``recon``, ``sparsity``, ``pre_act``, ``aux_k``, ``total``.

    Args:
        model: the dictionary that produced ``out``.
        x_in_BXiD: the input slots (unused by the current terms; kept so every term can see them).
        x_out_BXoD: the target slots [B, Xo, D].
        out: ``model(x_in_BXiD)`` in training mode.
        sparsity_coeff: λ at this step (the trainer ramps it up); ignored by topk/batchtopk.
        dead_mask_L: bool [L], True for latents dead over the trainer's token window (topk /
            batchtopk aux-K); None or all-False: ``aux_k`` is 0 and contributes no gradient.
    Terms not used by the activation are zero tensors (uniform keys for logging).
    """
    cfg = model.cfg
    if sparsity_coeff < 0:
        raise ValueError(f"sparsity_coeff must be >= 0, got {sparsity_coeff!r}")
    if tuple(x_out_BXoD.shape) != tuple(out.recon_BXoD.shape):
        raise ValueError(f"x_out_BXoD must match the reconstruction {tuple(out.recon_BXoD.shape)} "
                         f"(the out_slots), got {tuple(x_out_BXoD.shape)}")
    zero = out.recon_BXoD.new_zeros(())
    recon = (out.recon_BXoD - x_out_BXoD).pow(2).sum((1, 2)).mean()
    sparsity, pre_act, aux_k = zero, zero, zero

    if cfg.activation in ("relu", "jumprelu"):
        w_L = model.decoder_norms().sum(-1)
        lam_L = sparsity_weights(model, sparsity_coeff).to(w_L.dtype)
        if cfg.activation == "relu":
            sparsity = (out.latents_BL * w_L * lam_L).sum(-1).mean()
        else:
            sparsity = (lam_L * torch.tanh(cfg.tanh_c * out.latents_BL * w_L)).sum(-1).mean()
            theta_L = model.log_threshold_L.exp()
            pre_act = cfg.pre_act_coeff * (torch.relu(theta_L - out.pre_BL) * w_L).sum(-1).mean()
    elif dead_mask_L is not None:
        if tuple(dead_mask_L.shape) != (cfg.n_latents,) or dead_mask_L.dtype != torch.bool:
            raise ValueError(f"dead_mask_L must be a bool tensor of shape [{cfg.n_latents}], "
                             f"got {dead_mask_L.dtype} {tuple(dead_mask_L.shape)}")
        aux_k = _aux_k(model, x_out_BXoD, out, dead_mask_L)

    total = recon + sparsity + pre_act + aux_k
    return {"recon": recon, "sparsity": sparsity, "pre_act": pre_act, "aux_k": aux_k, "total": total}
