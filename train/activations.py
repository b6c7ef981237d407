"""Activation functions of the dictionary family, as pure functions of pre-activations.

- ``relu``: plain ReLU (the crosscoder paper).
- ``jumprelu``: ``pre · H(pre − θ)``, θ per latent, trained through a straight-through
  estimator (STE) with a rectangle kernel of bandwidth ε (Rajamanoharan et al. 2024, "Jumping
  Ahead"; Anthropic's Jan 2025 update). :func:`step` is the matching Heaviside for L0 terms.
- ``topk``: per token, keep the k largest scores (Gao et al. 2024).
- ``batchtopk``: keep the k·B largest scores over the whole batch (Bussmann et al. 2024,
  "BatchTopK Sparse Autoencoders"); at inference a learned threshold makes it per-token.

The θ trap: the trainable parameter is log θ. The STE below returns ∂/∂θ; θ = exp(log θ) is
computed *outside* the autograd Function, so autograd multiplies by θ exactly once
(∂/∂log θ = θ · ∂/∂θ). Passing log θ into the Function and returning the θ-gradient as its
gradient (as some peer code does) silently drops that factor.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["rectangle", "jumprelu", "step", "topk_mask", "batchtopk_mask"]


def rectangle(z: torch.Tensor) -> torch.Tensor:
    """The rectangle kernel: 1 where −½ < z < ½, else 0 (same dtype as ``z``)."""
    return ((z > -0.5) & (z < 0.5)).to(z.dtype)


class _JumpReLU(torch.autograd.Function):
    """``pre · H(pre − θ)``; gradient to ``pre`` is H(pre − θ), to θ the rectangle-kernel STE."""

    @staticmethod
    def forward(ctx: Any, pre_BL: torch.Tensor, theta_L: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre_BL, theta_L)
        ctx.bandwidth = bandwidth
        return pre_BL * (pre_BL > theta_L)

    @staticmethod
    def backward(ctx: Any, grad_BL: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:  # type: ignore[override]
        pre_BL, theta_L = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre_BL = grad_BL * (pre_BL > theta_L)
        # ð/ðθ [pre · H(pre − θ)] := −(θ/ε) · K((pre − θ)/ε), K the rectangle (Jumping Ahead, eq. 11).
        dtheta_BL = -(theta_L / eps) * rectangle((pre_BL - theta_L) / eps)
        grad_theta_L = (grad_BL * dtheta_BL).reshape(-1, theta_L.shape[-1]).sum(0)
        return grad_pre_BL, grad_theta_L, None


class _Step(torch.autograd.Function):
    """``H(pre − θ)``; no gradient to ``pre``, −(1/ε)·K((pre − θ)/ε) to θ (Jumping Ahead, eq. 12)."""

    @staticmethod
    def forward(ctx: Any, pre_BL: torch.Tensor, theta_L: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre_BL, theta_L)
        ctx.bandwidth = bandwidth
        return (pre_BL > theta_L).to(pre_BL.dtype)

    @staticmethod
    def backward(ctx: Any, grad_BL: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:  # type: ignore[override]
        pre_BL, theta_L = ctx.saved_tensors
        eps = ctx.bandwidth
        dtheta_BL = -(1.0 / eps) * rectangle((pre_BL - theta_L) / eps)
        grad_theta_L = (grad_BL * dtheta_BL).reshape(-1, theta_L.shape[-1]).sum(0)
        return torch.zeros_like(pre_BL), grad_theta_L, None


def jumprelu(pre_BL: torch.Tensor, log_threshold_L: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """JumpReLU of ``pre_BL`` [..., L] with thresholds θ = exp(``log_threshold_L``) [L].

    Gradient to ``log_threshold_L``: θ · (−(θ/ε)·K((pre − θ)/ε)) · upstream, summed over the batch.
    """
    theta_L = log_threshold_L.exp()  # in the autograd graph: the chain rule's factor θ comes from here
    return _JumpReLU.apply(pre_BL, theta_L, float(bandwidth))  # type: ignore[no-any-return]


def step(pre_BL: torch.Tensor, log_threshold_L: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """Heaviside ``H(pre − θ)`` [..., L] with the rectangle-kernel STE to θ (for L0-style terms)."""
    theta_L = log_threshold_L.exp()
    return _Step.apply(pre_BL, theta_L, float(bandwidth))  # type: ignore[no-any-return]


def topk_mask(score_BL: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask [B, L] of the ``k`` largest scores of each row (exactly k per row)."""
    idx_BK = score_BL.topk(k, dim=-1, sorted=False).indices
    return torch.zeros_like(score_BL, dtype=torch.bool).scatter_(-1, idx_BK, True)


def batchtopk_mask(score_BL: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask [B, L] of the ``k·B`` largest scores of the whole batch (BatchTopK paper)."""
    b, n = score_BL.shape
    flat = score_BL.reshape(-1)
    idx = flat.topk(min(k * b, b * n), sorted=False).indices
    return torch.zeros_like(flat, dtype=torch.bool).scatter_(0, idx, True).reshape(b, n)
