"""The math of model diffing, as pure functions tested on hand-built tensors: relative decoder norms
and cosines, the latent classes, and the latent-scaling betas (formulas in the :mod:`train.analysis`
docstring).
"""

from __future__ import annotations

import math

import torch

from train.analysis_config import AnalysisConfig
from train.analysis_run import DiffSpec

__all__ = ["classify", "relative_norms", "scaling_betas"]


# ---- pure math (tested on hand-built tensors) ------------------------------------------------------
def relative_norms(dec_LXoD: torch.Tensor, spec: DiffSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``(r_L, cos_L)``: relative decoder norm ‖d^ft‖ / (‖d^base‖ + ‖d^ft‖) and the cosine of the two
    decoder vectors (each model's slots concatenated). NaN where both norms are 0."""
    base_LK = dec_LXoD[:, spec.base_slots].flatten(1).double()
    ft_LK = dec_LXoD[:, spec.ft_slots].flatten(1).double()
    nb, nf = base_LK.norm(dim=1), ft_LK.norm(dim=1)
    total = nb + nf
    r = torch.where(total > 0, nf / total.clamp_min(1e-300), torch.full_like(total, math.nan))
    denom = nb * nf
    cos = torch.where(denom > 0, (base_LK * ft_LK).sum(1) / denom.clamp_min(1e-300), torch.full_like(denom, math.nan))
    return r, cos


def classify(r_L: torch.Tensor, cfg: AnalysisConfig, tied_L: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Boolean masks [L] per class: base_only, between, shared, ft_only, top_r (the top ``top_r_frac``
    by r, ties to the lower index), tied (trained with one shared decoder), no_decoder (r undefined).
    Tied and no-decoder latents are in no r class and not in top_r."""
    L = r_L.shape[0]
    tied = torch.zeros(L, dtype=torch.bool) if tied_L is None else tied_L.bool()
    valid = ~torch.isnan(r_L) & ~tied
    rr = torch.nan_to_num(r_L, nan=-1.0)
    masks = {
        "base_only": valid & (rr <= cfg.base_only_max),
        "shared": valid & (rr >= cfg.shared_min) & (rr <= cfg.shared_max),
        "ft_only": valid & (rr >= cfg.ft_only_min),
    }
    masks["between"] = valid & ~(masks["base_only"] | masks["shared"] | masks["ft_only"])
    n_top = min(int(valid.sum()), max(1, math.ceil(cfg.top_r_frac * int(valid.sum())))) if valid.any() else 0
    order = torch.argsort(torch.where(valid, rr, torch.full_like(rr, -2.0)), descending=True, stable=True)
    top = torch.zeros(L, dtype=torch.bool)
    top[order[:n_top]] = True
    masks["top_r"] = top
    masks["tied"] = tied.clone()
    masks["no_decoder"] = torch.isnan(r_L) & ~tied
    return masks


def scaling_betas(sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """β and ν from the streamed sums (see the :mod:`train.analysis` docstring).

    ``sums`` holds, per latent of the scaling set: ``ff`` = Σ f², ``dd`` = ‖d‖², ``dd_base`` / ``dd_ft``
    = ⟨d, d^base⟩ / ⟨d, d^ft⟩ and ``fy_{target}_{model}`` = Σ f ⟨d, y⟩ for target in (err, rec, act),
    where the err sums use the plain error x − x̂ (latent j's own term is added here in closed form:
    Σ f ⟨d, f d^m⟩ = ⟨d, d^m⟩ Σ f²). Latents that never fired get NaN.
    """
    ff, dd = sums["ff"], sums["dd"]
    denom = ff * dd
    ok = denom > 0
    out: dict[str, torch.Tensor] = {}
    for m in ("base", "ft"):
        num = {"err": sums[f"fy_err_{m}"] + sums[f"dd_{m}"] * ff, "rec": sums[f"fy_rec_{m}"],
               "act": sums[f"fy_act_{m}"]}
        for t, v in num.items():
            out[f"beta_{t}_{m}"] = torch.where(ok, v / denom.clamp_min(1e-300), torch.full_like(v, math.nan))
    for t in ("err", "rec", "act"):
        ft = out[f"beta_{t}_ft"]
        out[f"nu_{t}"] = torch.where(ft.abs() > 0, out[f"beta_{t}_base"] / ft, torch.full_like(ft, math.nan))
    return out
