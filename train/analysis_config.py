"""Options of an analysis (``run_train.py analyze``): :class:`AnalysisConfig`, validated on construction.

Its own module so that the diffing math and the streaming pass can read the options without
importing the entry point :mod:`train.analysis`.
"""

from __future__ import annotations

import math

from dataclasses import dataclass
from pathlib import Path

from shared.config import field_help, coerce_field_types

__all__ = ["AnalysisConfig"]


@dataclass(frozen=True)
class AnalysisConfig:
    """Options of ``run_train.py analyze``. Validated on construction; saved in report.json."""

    run: str = field_help("Run folder (from run_train.py).", default="runs/toy-diff",
                          metadata={"cli": False, "path": True})
    out: str | None = field_help("Report folder (default: RUN/analysis).", default=None, metadata={"path": True})
    cache: str | None = field_help(
        "Cache to read activations from: a folder or hf://USER/NAME[@REV]. Default: the folder the run "
        "trained on, else its --cache as given. For a cache that moved or a run trained elsewhere; it must "
        "hold the run's models, hooks, width and normalization.", default=None, metadata={"path": True})
    base_model: str | None = field_help(
        "Model that plays 'base' (default: the run's first model; the first model other than --ft-model when only "
        "that is given).", default=None)
    ft_model: str | None = field_help(
        "Model that plays 'fine-tune' (default: the run's second model; the first model other than --base-model "
        "when only that is given).", default=None)
    base_only_max: float = field_help("r <= this: base-only latent.", default=0.1)
    ft_only_min: float = field_help("r >= this: fine-tune-only latent (the crosscoder paper's r ~ 1).", default=0.9)
    shared_min: float = field_help("r in [shared_min, shared_max]: shared latent.", default=0.3)
    shared_max: float = field_help("Upper end of the shared band (the rest is 'between').", default=0.7)
    top_r_frac: float = field_help(
        "Also report the top fraction of latents by r as a class: it exists for every dictionary, "
        "also when no latent passes ft_only_min (e.g. BatchTopK at toy scale).", default=0.02)
    meta_columns: list[str] | None = field_help(
        "tokens.arrow columns to break firing down by (default: every column with <= 64 values).", default=None)
    focus: str | None = field_help(
        "COLUMN=VALUE whose share of each class's activation mass is the headline number.", default="source=code")
    eval_tokens: int | None = field_help("Stream at most this many eval rows (default: the whole split).",
                                         default=None)
    batch_size: int | None = field_help(
        "Rows per batch (default: 2^24 / (latents + 2 x in+out slots x d_model), clamped to [256, 4096]).",
        default=None)
    top_k: int = field_help("Top-activating contexts kept per latent.", default=10)
    latents_shown: int = field_help("Latents shown with their contexts per class in report.md.", default=6)
    context_before: int = field_help("Tokens shown before the firing token.", default=20)
    context_after: int = field_help("Tokens shown after the firing token.", default=4)
    scaling_max_latents: int = field_help("At most this many latents get latent-scaling betas.", default=512)
    nu_max: float = field_help(
        "Latent scaling: a fine-tune-only latent with nu_eps or nu_r above this is flagged as held by the "
        "base model too (0.5: midway between absent, 0, and as strong as in the fine-tune, 1).", default=0.5)
    profile_latents: int = field_help("Latents drawn in the decoder-norm profile figure.", default=24)
    device: str = field_help("auto (cuda if available), cpu, cuda, ...", default="auto")
    progress: bool = field_help("Show a progress bar.", default=True)

    def __post_init__(self) -> None:
        coerce_field_types(self)
        if not 0 <= self.base_only_max < self.shared_min <= self.shared_max < self.ft_only_min <= 1:
            raise ValueError("thresholds must satisfy 0 <= base_only_max < shared_min <= shared_max < ft_only_min "
                             f"<= 1, got {self.base_only_max}, {self.shared_min}, {self.shared_max}, "
                             f"{self.ft_only_min}")
        if not (self.nu_max >= 0 and math.isfinite(self.nu_max)):  # nu is a share: below 0, every latent is flagged
            raise ValueError(f"nu_max must be a number >= 0, got {self.nu_max}")
        if not 0 < self.top_r_frac <= 1:
            raise ValueError(f"top_r_frac must be in (0, 1], got {self.top_r_frac}")
        for name in ("top_k", "latents_shown", "scaling_max_latents", "profile_latents"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("context_before", "context_after"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.eval_tokens is not None and self.eval_tokens < 1:
            raise ValueError(f"eval_tokens must be >= 1, got {self.eval_tokens}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.focus is not None and ("=" not in self.focus or not self.focus.split("=", 1)[0].strip()):
            raise ValueError(f"focus must be COLUMN=VALUE (e.g. source=code), got {self.focus!r}")

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path(self.run) / "analysis"
