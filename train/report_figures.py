"""The PNG figures of an analysis report (matplotlib, Agg backend), drawn from the report dict and the
analysis tensors: r histogram, shared-latent cosines, class focus shares, latent scaling, firing
frequency, decoder-norm profiles.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from train.report_data import CLASS_LABELS

__all__ = ["CLASS_COLORS", "figures"]

# One colour per latent class in every figure (a bar, a point, a line of a class: always its colour).
CLASS_COLORS = {"base_only": "#8172b2", "between": "#cccccc", "shared": "#55a868", "ft_only": "#c44e52",
                "top_r": "#dd8452"}


# ---- figures ----------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figures(out: Path, rep: dict[str, Any], masks: dict[str, torch.Tensor], diff: dict[str, Any] | None,
             data: dict[str, Any] | None, cfg: Any) -> dict[str, str]:
    plt = _plt()
    figs: dict[str, str] = {}
    d = rep["diffing"]
    if d is not None and diff is not None:
        # Classified latents only: tied ones sit at r = 0.5 by construction (the table leaves them out too).
        r = diff["r"][~torch.isnan(diff["r"]) & ~masks["tied"]].numpy()
        fig, ax = plt.subplots(figsize=(7, 3.6))
        ax.hist(r, bins=50, range=(0, 1), color="#4c72b0")
        for x, lab in ((cfg.base_only_max, "base-only"), (cfg.ft_only_min, "fine-tune-only")):
            ax.axvline(x, color="k", ls="--", lw=0.8)
        ax.axvspan(cfg.shared_min, cfg.shared_max, color=CLASS_COLORS["shared"], alpha=0.15, zorder=0,
                   label="shared band")
        if d["top_r_min"] is not None:
            ax.axvline(d["top_r_min"], color=CLASS_COLORS["top_r"], lw=1,
                       label=f"top {d['thresholds']['top_r_percent']:g}% by r")
        ax.set_yscale("log")
        ax.set_xlabel(f"relative decoder norm r = |d_ft| / (|d_base| + |d_ft|)   (0: {d['base_model']} only, "
                      f"1: {d['ft_model']} only)", fontsize=8)
        ax.set_ylabel("latents (log)")
        n_tied = int(masks["tied"].sum())
        ax.set_title(f"Relative decoder norms ({len(r)} latents"
                     + (f"; {n_tied} with a shared decoder, r = 0.5 by construction, not shown)" if n_tied else ")"))
        ax.legend(fontsize=7)
        figs["r_hist"] = _save(fig, out / "r_hist.png")
        cos = diff["cos"][masks["shared"] & ~torch.isnan(diff["cos"])].numpy()
        if len(cos):
            fig, ax = plt.subplots(figsize=(7, 3.2))
            ax.hist(cos, bins=50, range=(-1, 1), color=CLASS_COLORS["shared"])
            ax.set_xlabel("cosine similarity of the base and fine-tune decoder vectors")
            ax.set_ylabel("shared latents")
            ax.set_title(f"Decoder cosine of shared latents (r in [{cfg.shared_min}, {cfg.shared_max}], "
                         f"n = {len(cos)})")
            figs["cos_shared"] = _save(fig, out / "cos_shared.png")
        if rep["focus"] is not None:
            names = [k for k in ("base_only", "between", "shared", "ft_only", "top_r") if d["classes"][k]["n"]]
            vals = [d["classes"][k]["focus_share"] or 0 for k in names]
            fig, ax = plt.subplots(figsize=(7, 3.2))
            ax.bar([CLASS_LABELS[k] + f"\n(n={d['classes'][k]['n']})" for k in names], vals,
                   color=[CLASS_COLORS[k] for k in names])
            ax.axhline(rep["focus"]["base_rate"], color="k", ls="--", lw=0.8, label="share of eval rows")
            ax.set_ylim(0, 1)
            ax.set_ylabel(f"share of activation mass\non {rep['focus']['column']} = {rep['focus']['value']}")
            ax.legend(fontsize=7)
            figs["class_focus"] = _save(fig, out / "class_focus.png")
        ls = d.get("latent_scaling")
        if ls:
            fig, ax = plt.subplots(figsize=(5, 4.2))
            labels = {"shared": "shared (reference sample)", "ft_only": CLASS_LABELS["ft_only"],
                      # each latent is one point: a top-r latent that is fine-tune-only too is drawn as that
                      "top_r": f"top {d['thresholds']['top_r_percent']:g}% by r, r < {cfg.ft_only_min}"}
            for g in ("shared", "top_r", "ft_only"):
                pts = [(e["nu_err"], e["nu_rec"]) for e in ls["latents"] if e["group"] == g
                       and e["nu_err"] is not None and e["nu_rec"] is not None]
                if pts:
                    ax.scatter(*zip(*pts), s=10, color=CLASS_COLORS[g], label=f"{labels[g]} ({len(pts)})")
            ax.axvline(cfg.nu_max, color="k", ls="--", lw=0.8)
            ax.axhline(cfg.nu_max, color="k", ls="--", lw=0.8)
            ax.set_xlabel("ν_ε (base error / fine-tune error)")
            ax.set_ylabel("ν_r (base reconstruction / fine-tune)")
            ax.set_title("Latent scaling (Minder et al. 2025)")
            ax.legend(fontsize=7)
            figs["latent_scaling"] = _save(fig, out / "latent_scaling.png")
    if data is not None:
        stats = data["stats"]
        freq = (stats.fires_L.cpu() / max(stats.rows, 1)).numpy()
        fig, ax = plt.subplots(figsize=(7, 3))
        ax.hist(np.log10(freq[freq > 0]), bins=50, color="#64b5cd")
        ax.set_xlabel(f"log10 firing frequency on the {data['split']} split "
                      f"({int((freq == 0).sum())} latents never fire)")
        ax.set_ylabel("latents")
        figs["firing"] = _save(fig, out / "firing.png")
    prof = rep["profiles"]
    if prof is not None and prof["latents"]:
        mat = np.array([[x or 0 for x in e["profile"]] for e in prof["latents"]])
        fig, ax = plt.subplots(figsize=(1.2 + 0.5 * mat.shape[1], 1.5 + 0.22 * mat.shape[0]))
        im = ax.imshow(mat, aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax.set_xticks(range(mat.shape[1]), [s.replace("/", "\n") for s in prof["slots"]], fontsize=6, rotation=90)
        ax.set_yticks(range(mat.shape[0]), [str(e["latent"]) for e in prof["latents"]], fontsize=6)
        ax.set_ylabel(f"latent (top by {prof['ranked_by']})")
        fig.colorbar(im, ax=ax, label="share of decoder norm")
        figs["profiles"] = _save(fig, out / "profiles.png")
    return figs


def _save(fig: Any, path: Path) -> str:
    fig.savefig(path, dpi=90, bbox_inches="tight")
    _plt().close(fig)
    return path.name
