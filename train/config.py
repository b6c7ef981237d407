"""``TrainConfig``: every option of one training run, shared by the Python API and ``run_train.py``.

Each field is a CLI flag of the same name (underscores become dashes); ``--config FILE.yaml``
loads them from a file. Defaults train a ReLU/L1 model-diffing crosscoder on the demo cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Literal

from shared.config import MAX_DIST_TIMEOUT, coerce_field_types, config_to_json, field_help

__all__ = ["TrainConfig", "RESUME_FIELDS", "DEFAULT_SPARSITY"]

DEFAULT_SPARSITY = {"relu": 2.0, "jumprelu": 0.5, "topk": 0.0, "batchtopk": 0.0}
"""λ when --sparsity-coeff is not given. ReLU: decoder-norm-weighted L1 with λ = 2 on inputs
normalized to E|x| = sqrt(d) (ckkissane's crosscoder replication). JumpReLU: the tanh penalty
costs up to λ per active latent whatever its size, so it bites harder than L1: λ = 0.5 recovers
the planted dictionary of tests/test_train.py (L0 2.9 for a true 3), λ = 2 over-sparsifies it
(EV 0.48). TopK/BatchTopK need none (k sets the sparsity)."""


MAX_COUNT = 2**31 - 1
"""Largest ``--steps``, ``--batch-size`` and ``--latents``: far past any run, and below torch's overflow."""
MAX_TRAIN_SEED = 2**63 - 1
"""Largest ``--seed``: ``torch.manual_seed`` takes a 64-bit integer."""


@dataclass(frozen=True)
class TrainConfig:
    """Options of one training run. Validated on construction; saved as ``config.json`` in the run."""

    cache: str = field_help("Activation cache folder (from run_harvest.py), or hf://USER/NAME[@REV] on the Hub.",
                            default="caches/toy-diff", metadata={"path": True})
    max_shards: int | None = field_help(
        "With an hf:// cache: download and use only its first N shards (a quick start).", default=None)
    out: str = field_help("Run folder: checkpoints, metrics.jsonl, plots, exported dictionary.",
                          default="runs/toy-diff", metadata={"path": True})
    arch: Literal["crosscoder", "directional", "clt"] = field_help(
        "crosscoder: reconstruct all chosen slots from all of them (model diffing, SAE); directional: "
        "--in-hooks -> --out-hooks (a transcoder is one in, one out); clt: cross-layer transcoder.",
        default="crosscoder")
    activation: Literal["relu", "jumprelu", "topk", "batchtopk"] = field_help(
        "relu (decoder-norm-weighted L1), jumprelu (Jan 2025 tanh + pre-act losses), topk, batchtopk.",
        default="relu")
    k: int | None = field_help("Active latents per token for topk/batchtopk.", default=None)
    latents: int = field_help("Dictionary size (for clt: all layers together).", default=4096)
    models: list[str] | None = field_help("Models of the cache to use, in order (default: all).", default=None)
    hooks: list[str] | None = field_help("Hooks for a crosscoder (default: all hooks of the cache).", default=None)
    in_hooks: list[str] | None = field_help("Input hooks (directional, clt: one per layer, ascending).", default=None)
    out_hooks: list[str] | None = field_help("Output hooks (directional, clt: one per layer, same order).", default=None)
    skip: bool = field_help("Learned linear skip from inputs to outputs, zero-initialised (directional, clt).",
                            default=False)
    shared_latents: int = field_help(
        "Feb 2025 diffing update: the first S latents share one decoder across models (~1/8 of latents).", default=0)
    shared_sparsity_ratio: float = field_help("Sparsity weight of shared latents relative to λ (0.1-0.2).",
                                              default=0.15)
    steps: int = field_help("Optimizer steps.", default=2000)
    batch_size: int = field_help("Rows (tokens) per step (2048-4096 in published runs; 1024 suits CPU).",
                                 default=1024)
    lr: float = field_help("Adam learning rate (5e-5-1e-4 at Gemma-2-2B scale; small models take more).",
                           default=1e-4)
    betas: tuple[float, float] = field_help("Adam betas ((0.0, 0.999) is common with JumpReLU).",
                                            default=(0.9, 0.999))
    warmup_frac: float = field_help("Linear LR warm-up over this fraction of steps (5%: crosscode).", default=0.05)
    decay_frac: float = field_help("Linear LR decay to 0 over this final fraction of steps (20%).", default=0.2)
    sparsity_coeff: float | None = field_help(
        "λ of the sparsity loss (default per activation: relu 2.0, jumprelu 0.5); not for topk/batchtopk (--k).",
        default=None)
    sparsity_warmup_frac: float = field_help("λ ramps linearly from 0 over this fraction of steps (5%).",
                                             default=0.05)
    pre_act_coeff: float = field_help("λ_p of the JumpReLU pre-activation loss (Jan 2025 update: 3e-6).",
                                      default=3e-6)
    tanh_c: float = field_help("c of the JumpReLU tanh sparsity loss (Jan 2025 update: 4).", default=4.0)
    jumprelu_bandwidth: float = field_help("JumpReLU straight-through rectangle bandwidth ε (crosscode: 2).",
                                           default=2.0)
    aux_k_coeff: float = field_help("α of the aux-K dead-latent loss (topk/batchtopk; Gao et al.: 1/32).",
                                    default=1 / 32)
    k_aux: int | None = field_help("Dead latents aux-K uses (default d_model/2).", default=None)
    dead_tokens: int | None = field_help(
        "A latent is dead after this many tokens without firing (default: min(10M, a quarter of the run)).",
        default=None)
    dec_init_norm: float | None = field_help(
        "Initial per-slot decoder row norm (default 0.1 relu/jumprelu, 1.0 topk/batchtopk).", default=None)
    grad_clip: float = field_help("Clip the gradient norm to this (0: off).", default=1.0)
    seed: int = field_help("Seed for initialisation and the loader's shuffle (0 to 2**63 - 1).", default=0)
    device: str = field_help("auto (cuda if available), cpu, cuda, cuda:1, ...", default="auto")
    autocast: bool = field_help("bf16 autocast on CUDA (ignored on CPU, where it is slower).", default=True)
    compile: bool = field_help("torch.compile the dictionary (opt-in; first steps are slow).", default=False)
    window: int = field_help("Loader mixing window, in shards.", default=8)
    eval_shards: int | None = field_help("Held-out shards for evaluation (default: the loader's 5%, >= 1).",
                                         default=None)
    eval_batches: int = field_help("Eval-split batches (of the global batch size) scored at each eval.", default=8)
    eval_every: int = field_help("Evaluate on the held-out split every N steps (0: only at the end).", default=0)
    log_every: int = field_help("Write a metrics.jsonl line every N steps.", default=20)
    checkpoint_every: int = field_help("Checkpoint every N steps (and on SIGINT/SIGTERM); per sweep member.",
                                       default=500)
    keep_checkpoints: int = field_help(
        "Keep the last K checkpoints (and in a sweep the newest K steps every member saved, which a resume needs).",
        default=2)
    dist_timeout: float = field_help(
        "Seconds a process waits for the others under torchrun before failing (a dead rank stops the rest); "
        "not while rank 0 alone checkpoints, evaluates or exports (up to 6 h).",
        default=300.0)
    wandb_project: str | None = field_help("Log to this wandb project (off when not given).", default=None)
    wandb_mode: Literal["online", "offline"] = field_help("wandb mode when a project is given.", default="offline")
    progress: bool = field_help("Show progress bars.", default=True)

    def __post_init__(self) -> None:
        coerce_field_types(self)
        # Every float field, before the range checks: `x > 0` holds for inf, and a NaN or inf
        # hyperparameter otherwise reaches the loss and stops the run at step 0 with a misleading
        # "lower --lr" (after writing a checkpoint that then refuses the corrected command).
        for f in fields(self):
            value = getattr(self, f.name)
            for v in value if isinstance(value, tuple) else (value,):
                if isinstance(v, float) and not math.isfinite(v):
                    raise ValueError(f"{f.name} (--{f.name.replace('_', '-')}) must be a finite number, got {value}")
        for name in ("steps", "batch_size", "latents", "log_every", "checkpoint_every", "keep_checkpoints", "window",
                     "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("steps", "batch_size", "latents"):  # past this, torch overflows with a C++ traceback
            if getattr(self, name) > MAX_COUNT:
                raise ValueError(f"{name} (--{name.replace('_', '-')}) must be at most 2**31 - 1, got "
                                 f"{getattr(self, name)}")
        # 0 would be a step of 0, a collective that gives up at once, a tanh penalty of 0 and a
        # JumpReLU straight-through window of width 0 (DictionaryConfig refuses the last two too).
        for name in ("lr", "dist_timeout", "tanh_c", "jumprelu_bandwidth"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number > 0, got {value}")
        for name in ("shared_sparsity_ratio", "pre_act_coeff", "aux_k_coeff", "grad_clip", "warmup_frac",
                     "decay_frac", "sparsity_warmup_frac", "eval_every"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        for name in ("warmup_frac", "decay_frac", "sparsity_warmup_frac"):
            if getattr(self, name) > 1:
                raise ValueError(f"{name} is a fraction of the steps: it must lie in [0, 1], got {getattr(self, name)}")
        if self.sparsity_coeff is not None and not (self.sparsity_coeff >= 0 and math.isfinite(self.sparsity_coeff)):
            raise ValueError(f"sparsity_coeff must be a finite number >= 0, got {self.sparsity_coeff}")
        if self.dec_init_norm is not None and not self.dec_init_norm > 0:
            raise ValueError(f"dec_init_norm must be a finite number > 0, got {self.dec_init_norm}")
        if self.warmup_frac + self.decay_frac > 1:
            raise ValueError(f"warmup_frac + decay_frac must be <= 1, got {self.warmup_frac} + {self.decay_frac}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must lie in [0, 1), got {self.betas}")
        if self.activation in ("topk", "batchtopk"):
            if self.k is None:
                raise ValueError(f"--activation {self.activation} needs --k (active latents per token)")
            if not 0 < self.k < self.latents:
                raise ValueError(f"k must be in [1, latents={self.latents}), got k={self.k}")
            # No sparsity loss for them (k sets the sparsity): a given λ would be logged but ignored.
            if self.sparsity_coeff is not None:
                raise ValueError(f"--sparsity-coeff is only used by relu/jumprelu, not --activation {self.activation} "
                                 f"(--k sets its sparsity); leave it out, got {self.sparsity_coeff}")
        elif self.k is not None:
            raise ValueError(f"--k is only used by topk/batchtopk, not --activation {self.activation}")
        if self.arch == "crosscoder" and (self.in_hooks or self.out_hooks):
            raise ValueError("--in-hooks/--out-hooks are for --arch directional or clt; a crosscoder uses --hooks")
        if self.arch != "crosscoder" and not (self.in_hooks and self.out_hooks):
            raise ValueError(f"--arch {self.arch} needs --in-hooks and --out-hooks")
        if self.arch != "crosscoder" and self.hooks:
            raise ValueError(f"--hooks is for crosscoders; --arch {self.arch} uses --in-hooks/--out-hooks")
        if self.arch == "clt" and self.skip and set(self.in_hooks or []) & set(self.out_hooks or []):
            # Reading and writing one hook is a weakly causal crosscoder, which the sparse code keeps from the
            # identity; a skip learns the identity exactly (EV 0.996 at L0 1 in an audit) and the latents nothing.
            both = [h for h in self.in_hooks or [] if h in (self.out_hooks or [])]
            raise ValueError(f"--skip with {both} both an --in-hooks and an --out-hooks learns the identity map; "
                             "leave out --skip (a CLT reading and writing the same hooks is a weakly causal "
                             "crosscoder), or map each layer's MLP input to its output")
        for name in ("models", "hooks"):
            if getattr(self, name) is not None and not getattr(self, name):
                raise ValueError(f"{name}: give at least one name, or leave it out to use all of the cache's")
        if self.max_shards is not None and self.max_shards < 1:
            raise ValueError(f"max_shards must be >= 1, got {self.max_shards}")
        if self.dead_tokens is not None and self.dead_tokens < 1:
            raise ValueError(f"dead_tokens must be >= 1, got {self.dead_tokens}")
        if self.dist_timeout > MAX_DIST_TIMEOUT:
            raise ValueError(f"dist_timeout must be at most {MAX_DIST_TIMEOUT:.0e} seconds (~3 years), got "
                             f"{self.dist_timeout}")
        if not 0 <= self.seed <= MAX_TRAIN_SEED:
            raise ValueError(f"seed (--seed) must be an integer in [0, 2**63 - 1], got {self.seed}")
        if not 0 <= self.shared_latents < self.latents:
            raise ValueError(f"shared_latents (--shared-latents) must lie in [0, latents={self.latents}), got "
                             f"{self.shared_latents}")
        if self.k_aux is not None and self.k_aux < 1:
            raise ValueError(f"k_aux (--k-aux) must be >= 1 (or left out for d_model/2), got {self.k_aux}")
        if self.eval_shards is not None and self.eval_shards < 0:
            raise ValueError(f"eval_shards (--eval-shards) must be >= 0 (0: no held-out split), got {self.eval_shards}")
        if self.wandb_project is not None and not self.wandb_project.strip():
            raise ValueError("wandb_project (--wandb-project) is empty: name a project, or leave it out for no wandb")

    @property
    def resolved_sparsity_coeff(self) -> float:
        return DEFAULT_SPARSITY[self.activation] if self.sparsity_coeff is None else self.sparsity_coeff

    def resolved_dead_tokens(self, world_size: int = 1) -> int:
        """Tokens without firing after which a latent counts as dead (global batch under DDP)."""
        return self.dead_tokens or max(1, min(10_000_000, self.steps * self.batch_size * world_size // 4))

    def lr_at(self, step: int) -> float:
        """Learning rate at ``step`` (0-based): linear warm-up, constant, linear decay to 0."""
        warm = max(1, round(self.warmup_frac * self.steps))
        decay = round(self.decay_frac * self.steps)
        if step < warm:
            return self.lr * (step + 1) / warm
        if decay and step >= self.steps - decay:
            return self.lr * max(0.0, (self.steps - step) / decay)
        return self.lr

    def sparsity_at(self, step: int) -> float:
        """λ at ``step``: linear ramp from 0 over ``sparsity_warmup_frac`` of the run."""
        ramp = round(self.sparsity_warmup_frac * self.steps)
        scale = 1.0 if ramp == 0 else min(1.0, (step + 1) / ramp)
        return self.resolved_sparsity_coeff * scale

    def resume_signature(self) -> dict:
        d = config_to_json(self)
        return {k: d[k] for k in RESUME_FIELDS}


RESUME_FIELDS = (
    "arch", "activation", "k", "latents", "models", "hooks", "in_hooks", "out_hooks", "skip", "shared_latents",
    "shared_sparsity_ratio", "steps", "batch_size", "lr", "betas", "warmup_frac", "decay_frac", "sparsity_coeff",
    "sparsity_warmup_frac", "pre_act_coeff", "tanh_c", "jumprelu_bandwidth", "aux_k_coeff", "k_aux", "dead_tokens",
    "dec_init_norm", "grad_clip", "seed", "window", "eval_shards", "max_shards",
)
"""Fields a resumed run must share with the interrupted one (the stream and the math)."""
