"""Training metrics: L0, explained variance (overall and per slot), dead latents; logging and plots.

Every metric line goes to ``<run>/metrics.jsonl`` (always) and to wandb when a project is
given. Keys: ``step``, ``tokens``, ``loss/<term>``, ``l0/mean``, ``l0/p10|p50|p90``,
``ev/overall``, ``ev/<model>/<hook>``, ``dead_frac``, ``lr``, ``sparsity_coeff``,
``grad_norm``, ``tokens_per_s``; eval lines add the same under ``eval/``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from shared.shard_io import atomic_write_bytes

__all__ = ["batch_metrics", "explained_variance", "finite_or_none", "MetricsLogger", "ReconStats", "plot_metrics",
           "TIMING_KEYS", "VAR_FLOOR"]

TIMING_KEYS = ("tokens_per_s", "elapsed_s")
"""Keys that depend on the machine's speed (everything else is reproducible on resume)."""


VAR_FLOOR = 1e-6
"""A variance below this fraction of the second moment is rounding (the sums are of float32 rows): no
variance, so no explained variance."""


def explained_variance(err_X: torch.Tensor, sum_XD: torch.Tensor, sq_X: torch.Tensor,
                       rows: int) -> tuple[float | None, list[float | None]]:
    """1 − FVU pooled over ``rows`` rows, overall and per output slot, from their sums: squared error
    ``err_X``, ``sum_XD`` (Σx) and ``sq_X`` (Σ‖x‖²). None where it means nothing: fewer than 2 rows, or
    a variance that is (up to rounding) zero, where 1 − err / var would be any number (one row gave −1e14)."""
    err_X, sum_XD, sq_X = err_X.double(), sum_XD.double(), sq_X.double()
    var_X = sq_X - sum_XD.pow(2).sum(-1) / max(rows, 1)
    ok_X = (var_X > VAR_FLOOR * sq_X) & (rows >= 2)
    per = [float(1 - e / v) if ok else None for e, v, ok in zip(err_X.tolist(), var_X.tolist(), ok_X.tolist())]
    var, sq = float(var_X.sum()), float(sq_X.sum())
    overall = float(1 - err_X.sum() / var) if rows >= 2 and var > VAR_FLOOR * sq else None
    return overall, per


class ReconStats:
    """L0 and explained variance pooled over any number of batches (each row counts once, whatever
    the size of its batch): running sums in float64, and every row's L0 for its percentiles."""

    def __init__(self, slot_names: list[str]) -> None:
        self.slot_names = slot_names
        self.rows = 0
        self.err_X: torch.Tensor | None = None
        self.sum_XD: torch.Tensor | None = None
        self.sq_X: torch.Tensor | None = None
        self.recon = 0.0  # Σ over rows of the squared error summed over slots and dims
        self.l0: list[torch.Tensor] = []

    @torch.no_grad()
    def update(self, l0_B: torch.Tensor, x_out_BXoD: torch.Tensor, recon_BXoD: torch.Tensor) -> None:
        """Fold in a batch: each row's count of active latents, its targets and its reconstructions."""
        x, r = x_out_BXoD.double(), recon_BXoD.double()
        err_X, sum_XD, sq_X = (x - r).pow(2).sum(dim=(0, 2)), x.sum(0), x.pow(2).sum(dim=(0, 2))
        if self.err_X is None:
            self.err_X, self.sum_XD, self.sq_X = err_X, sum_XD, sq_X
        else:
            assert self.sum_XD is not None and self.sq_X is not None
            self.err_X, self.sum_XD, self.sq_X = self.err_X + err_X, self.sum_XD + sum_XD, self.sq_X + sq_X
        self.recon += float(err_X.sum())
        self.rows += x.shape[0]
        self.l0.append(l0_B.float())

    def metrics(self) -> dict[str, float | None]:
        """``l0/mean``, ``l0/p10|p50|p90``, ``ev/overall``, ``ev/<slot>`` (None where undefined), ``recon``
        (mean squared error per row, summed over slots and dims)."""
        if not self.rows:
            return {}
        assert self.err_X is not None and self.sum_XD is not None and self.sq_X is not None
        l0_N = torch.cat(self.l0)
        q = torch.quantile(l0_N, torch.tensor([0.1, 0.5, 0.9], device=l0_N.device)).tolist()
        overall, per = explained_variance(self.err_X, self.sum_XD, self.sq_X, self.rows)
        out: dict[str, float | None] = {"l0/mean": l0_N.mean().item(), "l0/p10": q[0], "l0/p50": q[1],
                                        "l0/p90": q[2], "ev/overall": overall}
        out.update({f"ev/{name}": ev for name, ev in zip(self.slot_names, per)})
        out["recon"] = self.recon / self.rows
        return out


@torch.no_grad()
def batch_metrics(latents_BL: torch.Tensor, x_out_BXoD: torch.Tensor, recon_BXoD: torch.Tensor,
                  slot_names: list[str]) -> dict[str, float | None]:
    """L0 statistics and explained variance (1 − FVU) of one batch, overall and per output slot
    (None for a batch of one row, or of rows without variance)."""
    stats = ReconStats(slot_names)
    stats.update((latents_BL > 0).sum(dim=1), x_out_BXoD, recon_BXoD)
    out = stats.metrics()
    del out["recon"]
    return out


def finite_or_none(metrics: dict[str, Any]) -> dict[str, Any]:
    """``metrics`` with NaN and ±inf floats as None: metrics.jsonl stays strict JSON (bare NaN is not JSON, and
    the export's metadata refuses it), and a figure that is undefined reads as such, as ``ev`` already does."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}


class MetricsLogger:
    """Appends metric dicts to ``metrics.jsonl`` (fsynced per line) and, optionally, wandb."""

    def __init__(self, run_dir: Path, *, resume_step: int, wandb_project: str | None = None,
                 wandb_mode: str = "offline", config: dict[str, Any] | None = None, enabled: bool = True) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self._wandb = None
        if not enabled:
            return
        # Lines written after the checkpoint we resume from belong to the lost future: drop them. The
        # rewrite is atomic: a kill during it once left the file empty (every line lost) or cut off.
        if self.path.exists():
            kept = [line for line in _metric_lines(self.path) if line.get("step", 0) <= resume_step]
            atomic_write_bytes(self.path, "".join(json.dumps(line) + "\n" for line in kept).encode())
        if wandb_project:
            import wandb

            # The API key, if any, comes from the environment (WANDB_API_KEY); nothing here logs it.
            # wandb's own metadata (host name, command line, program and Python paths, git remote and
            # commit, a copy of the code) would name this machine and its user: off. System metrics stay.
            private = wandb.Settings(x_disable_meta=True, x_disable_machine_info=True, disable_git=True,
                                     disable_code=True, save_code=False)
            self._wandb = wandb.init(project=wandb_project, mode=wandb_mode, dir=str(run_dir), config=config,
                                     name=run_dir.name, resume="allow", id=_wandb_id(run_dir), settings=private)

    def log(self, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(finite_or_none(metrics), allow_nan=False) + "\n")
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
    """The lines of ``<run>/metrics.jsonl`` (none if it is missing); see :func:`_metric_lines`."""
    path = Path(run_dir) / "metrics.jsonl"
    return _metric_lines(path) if path.exists() else []


def _metric_lines(path: Path) -> list[dict[str, Any]]:
    """The metric lines of ``path``. A last line cut off (a crash or a full disk mid-write) is left out,
    since the step it logged is past the last checkpoint and is logged again on resume; any other line
    that does not read is an error naming it."""
    lines = path.read_text(errors="replace").splitlines()
    out = []
    for i, text in enumerate(lines):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
            if not isinstance(line, dict):
                raise ValueError(f"a {type(line).__name__}, not an object")
        except ValueError as e:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}, line {i + 1}, is not a metrics line ({e}): {text[:80]!r}. Delete that line "
                             "(or restore the file) and run again") from None
        out.append(line)
    return out


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
        if len(keys) > 1 and ax.lines:  # no line: every value was null (e.g. EV of one-row batches)
            ax.legend(fontsize=7)
        elif not ax.lines:
            ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes, color="gray")
    fig.tight_layout()
    out = Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out
