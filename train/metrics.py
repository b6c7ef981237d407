"""Training metrics: L0, explained variance (overall and per slot), dead latents; logging and plots.

Every metric line goes to ``<run>/metrics.jsonl`` (always) and to wandb when a project is
given. Keys: ``step``, ``tokens``, ``loss/<term>``, ``l0/mean``, ``l0/p10|p50|p90``,
``ev/overall``, ``ev/<model>/<hook>``, ``dead_frac``, ``lr``, ``sparsity_coeff``,
``grad_norm``, ``tokens_per_s``; eval lines add the same under ``eval/``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["batch_metrics", "batch_metrics_from_l0", "MetricsLogger", "plot_metrics", "TIMING_KEYS"]

TIMING_KEYS = ("tokens_per_s", "elapsed_s")
"""Keys that depend on the machine's speed (everything else is reproducible on resume)."""


@torch.no_grad()
def batch_metrics(latents_BL: torch.Tensor, x_out_BXoD: torch.Tensor, recon_BXoD: torch.Tensor,
                  slot_names: list[str]) -> dict[str, float]:
    """L0 statistics and explained variance (1 − FVU) of one batch, overall and per output slot."""
    return batch_metrics_from_l0((latents_BL > 0).sum(dim=1), x_out_BXoD, recon_BXoD, slot_names)


@torch.no_grad()
def batch_metrics_from_l0(l0_B: torch.Tensor, x_out_BXoD: torch.Tensor, recon_BXoD: torch.Tensor,
                          slot_names: list[str]) -> dict[str, float]:
    """:func:`batch_metrics` from each row's count of active latents ``l0_B`` (the latents
    themselves may have been computed, and dropped, a piece of the batch at a time)."""
    l0_B = l0_B.float()
    q = torch.quantile(l0_B, torch.tensor([0.1, 0.5, 0.9], device=l0_B.device))
    x, r = x_out_BXoD.float(), recon_BXoD.float()
    err_X = (x - r).pow(2).sum(dim=(0, 2))
    var_X = (x - x.mean(dim=0, keepdim=True)).pow(2).sum(dim=(0, 2))
    out = {
        "l0/mean": l0_B.mean().item(),
        "l0/p10": q[0].item(), "l0/p50": q[1].item(), "l0/p90": q[2].item(),
        "ev/overall": (1 - err_X.sum() / var_X.sum().clamp_min(1e-12)).item(),
    }
    ev_X = 1 - err_X / var_X.clamp_min(1e-12)
    for name, ev in zip(slot_names, ev_X.tolist()):
        out[f"ev/{name}"] = ev
    return out


class MetricsLogger:
    """Appends metric dicts to ``metrics.jsonl`` (fsynced per line) and, optionally, wandb."""

    def __init__(self, run_dir: Path, *, resume_step: int, wandb_project: str | None = None,
                 wandb_mode: str = "offline", config: dict[str, Any] | None = None, enabled: bool = True) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self._wandb = None
        if not enabled:
            return
        # Lines written after the checkpoint we resume from belong to the lost future: drop them.
        if self.path.exists():
            kept = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        if wandb_project:
            import wandb

            # The API key, if any, comes from the environment (WANDB_API_KEY); nothing here logs it.
            self._wandb = wandb.init(project=wandb_project, mode=wandb_mode, dir=str(run_dir), config=config,
                                     name=run_dir.name, resume="allow", id=_wandb_id(run_dir))

    def log(self, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in metrics.items() if k != "step"}, step=int(metrics["step"]))

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _wandb_id(run_dir: Path) -> str:
    path = run_dir / "wandb_id.txt"
    if path.exists():
        return path.read_text().strip()
    import uuid

    run_id = uuid.uuid4().hex[:12]
    path.write_text(run_id)
    return run_id


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []


def plot_metrics(run_dir: str | Path) -> Path | None:
    """Draw the training curves of a run into ``<run>/curves.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_metrics(run_dir) if "loss/total" in r]
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    panels = [
        ("loss", [k for k in rows[-1] if k.startswith("loss/")], True),
        ("L0", ["l0/mean", "l0/p10", "l0/p90"], False),
        ("explained variance", [k for k in rows[-1] if k.startswith("ev/")], False),
        ("dead latents (fraction)", ["dead_frac"], False),
        ("learning rate", ["lr"], False),
        ("sparsity coefficient λ", ["sparsity_coeff"], False),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (title, keys, log) in zip(axes.flat, panels):
        for key in keys:
            ys = [r.get(key) for r in rows]
            if any(y is not None for y in ys):
                ax.plot(steps, [y if y is not None else float("nan") for y in ys], label=key)
        if log and all((r.get(k) or 0) > 0 for r in rows for k in keys[:1]):
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("step")
        if len(keys) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out
