"""Analysis of a trained run: model diffing (relative decoder norms, latent scaling), top contexts,
firing by metadata, decoder-norm profiles across slots. ``python run_train.py analyze RUN_DIR``.

What is computed (everything lands in ``report.json``; ``train.report`` draws the figures and
writes ``report.md``):

- **Weights only** (the *normalized-space* dictionary in ``RUN/dictionary``, where every slot's
  activations have E‖x‖ = √d, so decoder norms compare across models):
  relative decoder norm ``r_j = ‖d_j^ft‖ / (‖d_j^base‖ + ‖d_j^ft‖)`` (a model's decoder of latent j
  is its output slots' rows concatenated, so several hooks count together), the cosine of the two
  decoder vectors, the latent classes (thresholds in :class:`AnalysisConfig`), and each latent's
  decoder-norm profile across output slots.
- **One streaming pass over the eval split** (rows served with their ``(seq, pos)``): per latent
  firing count, activation mass (Σ of activation values), max, the top-k activations with their
  ``(seq, pos)`` (a running top-k merged per batch from the batch's nonzero activations: memory
  is O(L·k), never O(rows·L)), mass
  and firing per value of each metadata column of ``tokens.arrow`` (e.g. ``source``), the
  dictionary's explained variance and L0, and the latent-scaling sums below.
- **Latent scaling** (Minder et al., 2025, "Overcoming Sparsity Artifacts in Crosscoders to
  Interpret Chat-Tuning", arXiv:2504.02922; earlier title "Robustly identifying concepts
  introduced during chat fine-tuning using crosscoders"): for a latent j with fine-tune decoder
  vector d = d_j^ft and activation f_i = f_j(x_i) on eval row i, the least-squares scale of
  ``β·f_i·d`` against a target y_i is ``β = Σ_i f_i ⟨d, y_i⟩ / (‖d‖² Σ_i f_i²)`` (rows where the
  latent is 0 add nothing). Targets, for model m ∈ {base, ft} (its output slots concatenated,
  normalized space, as the crosscoder sees them):
    * error ``ε^m_i = x^m_i − x̂^m_i + f_i d_j^m``: the model's activation minus the reconstruction
      by every *other* latent (latent j's own term added back). β^{ε,ft} = 1 + (the fine-tune's
      error along d), so ≈ 1.
    * reconstruction ``y = x̂^m_i`` (all latents and the decoder bias).
    * activation ``y = x^m_i``.
  and ``ν^ε = β^{ε,base} / β^{ε,ft}``, ``ν^r = β^{r,base} / β^{r,ft}``, ``ν^x = β^{x,base} / β^{x,ft}``.
  ν ≈ 0: the base model holds none of the latent's direction (a genuine fine-tune-only latent);
  ν ≈ 1: the base model holds as much of it as the fine-tune; the L1 artefacts the paper names are
  Complete Shrinkage (high ν^ε: the base's share of the latent was left in its error) and Latent
  Decoupling (high ν^r: other latents reconstruct it in the base). Computed for the fine-tune-only
  latents, the top latents by r, and a reference sample of shared latents.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import rearrange

from shared.config import add_dataclass_arguments, config_from_namespace, field_help
from shared.devices import resolve_device

__all__ = ["AnalysisConfig", "RunData", "DiffSpec", "analyze", "analyze_cli", "load_run", "diff_spec",
           "relative_norms", "classify", "scaling_betas", "StreamStats", "RunError"]


class RunError(ValueError):
    """The folder is not a finished training run (no config.json or no dictionary/)."""


@dataclass(frozen=True)
class AnalysisConfig:
    """Options of ``run_train.py analyze``. Validated on construction; saved in report.json."""

    run: str = field_help("Run folder (from run_train.py).", default="runs/toy-diff", metadata={"cli": False})
    out: str | None = field_help("Report folder (default: RUN/analysis).", default=None)
    base_model: str | None = field_help("Model that plays 'base' (default: the run's first model).", default=None)
    ft_model: str | None = field_help("Model that plays 'fine-tune' (default: the run's second model).", default=None)
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
    batch_size: int | None = field_help("Rows per batch (default: 2^24 / latents, clamped to [256, 4096]).",
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
        if not 0 <= self.base_only_max < self.shared_min <= self.shared_max < self.ft_only_min <= 1:
            raise ValueError("thresholds must satisfy 0 <= base_only_max < shared_min <= shared_max < ft_only_min "
                             f"<= 1, got {self.base_only_max}, {self.shared_min}, {self.shared_max}, "
                             f"{self.ft_only_min}")
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
        if self.focus is not None and "=" not in self.focus:
            raise ValueError(f"focus must be COLUMN=VALUE (e.g. source=code), got {self.focus!r}")

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path(self.run) / "analysis"


# ---- the run ---------------------------------------------------------------------------------------
@dataclass
class RunData:
    """A finished run: its saved config and the normalized-space dictionary."""

    run_dir: Path
    info: dict[str, Any]  # config.json of the run
    model: Any  # train.dictionary.Dictionary (normalized space)
    out_slot_names: list[str]  # 'model/hook' of each output slot (Xo order)

    @property
    def arch(self) -> str:
        return self.model.cfg.arch

    @property
    def cache_path(self) -> str:
        return str(self.info.get("cache", {}).get("path") or self.info["config"]["cache"])


def load_run(run_dir: str | Path) -> RunData:
    """Read ``config.json`` and ``dictionary/`` of a run (raises :class:`RunError` naming what is missing)."""
    from train.export import load_dictionary

    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise RunError(f"{run_dir} is not a training run: no config.json (train one with run_train.py --out DIR)")
    if not (run_dir / "dictionary" / "config.json").is_file():
        raise RunError(f"{run_dir} has no dictionary/ yet: the run has not finished; re-run its run_train.py "
                       "command to resume and export it")
    info = json.loads((run_dir / "config.json").read_text())
    model = load_dictionary(run_dir / "dictionary").eval()
    names = [model.cfg.slot_names[s] for s in model.cfg.out_slots]
    return RunData(run_dir, info, model, names)


@dataclass
class DiffSpec:
    """Which output slots (Xo indices, same hook order) are the base and the fine-tune model."""

    base: str
    ft: str
    base_slots: list[int]
    ft_slots: list[int]


def diff_spec(run: RunData, base: str | None = None, ft: str | None = None) -> tuple[DiffSpec | None, str]:
    """The diffing roles of a run, or ``(None, why not)``. Defaults: first and second model of the slots."""
    if run.arch != "crosscoder":
        return None, f"this run is a {run.arch}, not a crosscoder: model-diffing sections do not apply"
    pairs = [tuple(n.rsplit("/", 1)) if "/" in n else (n, "") for n in run.out_slot_names]
    models = list(dict.fromkeys(m for m, _ in pairs))
    if len(models) < 2:
        return None, (f"this crosscoder reads one model ({models[0]}): model-diffing sections need two models "
                      "(base and fine-tune) in its slots")
    for role, name in (("base_model", base), ("ft_model", ft)):
        if name is not None and name not in models:
            raise ValueError(f"{role} {name!r} is not a model of this run; it has {models}")
    if len(models) > 2 and (base is None or ft is None):
        return None, (f"this crosscoder reads {len(models)} models {models}: pass --base-model and --ft-model to "
                      "choose the pair to diff")
    base = base or (models[0] if ft != models[0] else models[1])
    ft = ft or next(m for m in models if m != base)
    if base == ft:
        raise ValueError(f"base_model and ft_model are both {base!r}; choose two different models")
    hooks_b = [h for m, h in pairs if m == base]
    hooks_f = [h for m, h in pairs if m == ft]
    if hooks_b != hooks_f:
        return None, f"models {base} and {ft} have different hooks in this run ({hooks_b} vs {hooks_f})"
    b = [i for i, (m, _) in enumerate(pairs) if m == base]
    f = [i for i, (m, _) in enumerate(pairs) if m == ft]
    return DiffSpec(base, ft, b, f), ""


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
    """β and ν from the streamed sums (see the module docstring).

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


# ---- the streaming pass ----------------------------------------------------------------------------
class StreamStats:
    """Accumulates per-latent statistics over batches of the eval split, in memory O(L·(k + V)).

    Per batch only the nonzero activations are touched (``nonzero`` of [B, L], then index_add /
    scatter), the decoder runs as a sparse matmul when activations are sparse, and the running top-k
    merges only the entries that beat a latent's current k-th value."""

    def __init__(self, n_latents: int, top_k: int, meta: dict[str, tuple[list[Any], np.ndarray]],
                 n_out: int, d_model: int, scaling: tuple[torch.Tensor, torch.Tensor, DiffSpec] | None,
                 device: torch.device) -> None:
        L, f64 = n_latents, dict(dtype=torch.float64, device=device)
        self.L, self.k, self.rows, self.nnz = L, top_k, 0, 0
        self.fires_L = torch.zeros(L, **f64)
        self.mass_L = torch.zeros(L, **f64)
        self.max_L = torch.zeros(L, dtype=torch.float32, device=device)
        # running top-k per latent (value 0 / seq -1: empty slot), rows sorted by value, descending
        self.top_val_KL = torch.zeros(top_k, L, device=device)
        self.top_seq_KL = torch.full((top_k, L), -1, dtype=torch.int64, device=device)
        self.top_pos_KL = torch.full((top_k, L), -1, dtype=torch.int64, device=device)
        # meta column -> (values, value code per seq); activation mass / firings per (latent, value); rows per value
        self.meta = meta
        self.meta_codes = {c: torch.from_numpy(codes).to(device) for c, (_, codes) in meta.items()}
        self.meta_mass = {c: torch.zeros(L, len(v), **f64) for c, (v, _) in meta.items()}
        self.meta_fires = {c: torch.zeros(L, len(v), **f64) for c, (v, _) in meta.items()}
        self.meta_rows = {c: torch.zeros(len(v), **f64) for c, (v, _) in meta.items()}
        self.err_X = torch.zeros(n_out, **f64)
        self.sum_XD = torch.zeros(n_out, d_model, **f64)
        self.sq_X = torch.zeros(n_out, **f64)
        self.scaling = scaling  # (latent ids [J], their decoder [J, Xo, D], roles)
        if scaling is not None:
            ids, dec_JXoD, spec = scaling
            self.d_JK = dec_JXoD[:, spec.ft_slots].flatten(1).float()  # the fine-tune decoder vectors d
            self.sc = {k: torch.zeros(ids.shape[0], **f64) for k in
                       ("ff", "fy_err_base", "fy_err_ft", "fy_rec_base", "fy_rec_ft", "fy_act_base", "fy_act_ft")}
            self.sc["dd"] = self.sc["dd_ft"] = self.d_JK.double().pow(2).sum(1)
            self.sc["dd_base"] = (self.d_JK.double() * dec_JXoD[:, spec.base_slots].flatten(1).double()).sum(1)
        self._dec_LK: torch.Tensor | None = None

    @torch.no_grad()
    def update(self, model: Any, x_in_BXiD: torch.Tensor, x_out_BXoD: torch.Tensor, seq_B: torch.Tensor,
               pos_B: torch.Tensor) -> None:
        """Encode a batch (inference mode), decode it, and fold it into every statistic."""
        f_BL = model.encode(x_in_BXiD, inference=True).float()
        rows_N, lat_N = f_BL.nonzero(as_tuple=True)
        val_N = f_BL[rows_N, lat_N]
        B, (Xo, D) = f_BL.shape[0], (model.cfg.n_out, model.cfg.d_model)
        if model.cfg.skip:
            recon_BXoD = model.decode(f_BL, x_in_BXiD).float()
        else:  # = model.decode: latents @ decoder + b_dec, sparse when the latents are
            if self._dec_LK is None:
                self._dec_LK = model.decoder_weight().detach().float().flatten(1)
            if len(val_N) < f_BL.numel() // 16:
                f_sp = torch.sparse_coo_tensor(torch.stack([rows_N, lat_N]), val_N, f_BL.shape, is_coalesced=True,
                                               check_invariants=False)
                recon_BK = torch.sparse.mm(f_sp, self._dec_LK)
            else:
                recon_BK = f_BL @ self._dec_LK
            recon_BXoD = recon_BK.view(B, Xo, D) + model.b_dec_XoD.float()
        x = x_out_BXoD.float()
        self.err_X += (x - recon_BXoD).pow(2).sum(dim=(0, 2)).double()
        self.sum_XD += x.sum(0).double()
        self.sq_X += x.pow(2).sum(dim=(0, 2)).double()
        self.add_latents(rows_N, lat_N, val_N, seq_B, pos_B)
        if self.scaling is not None:
            self._update_scaling(f_BL, x, recon_BXoD)

    def add_latents(self, rows_N: torch.Tensor, lat_N: torch.Tensor, val_N: torch.Tensor, seq_B: torch.Tensor,
                    pos_B: torch.Tensor) -> None:
        """Fold one batch's nonzero activations (row, latent, value) into counts, mass, max, metadata, top-k."""
        self.rows += seq_B.shape[0]
        self.nnz += lat_N.shape[0]
        self.fires_L += torch.bincount(lat_N, minlength=self.L).double()
        self.mass_L.index_add_(0, lat_N, val_N.double())
        self.max_L.scatter_reduce_(0, lat_N, val_N, "amax")
        for c, codes in self.meta_codes.items():
            v_B = codes[seq_B]
            V = len(self.meta[c][0])
            flat_N = lat_N * V + v_B[rows_N]
            self.meta_mass[c].view(-1).index_add_(0, flat_N, val_N.double())
            self.meta_fires[c].view(-1).index_add_(0, flat_N, torch.ones_like(val_N, dtype=torch.float64))
            self.meta_rows[c] += torch.bincount(v_B, minlength=V).double()
        # top-k: only entries above their latent's current k-th value can enter; the affected latents'
        # old slots and the new entries are sorted once by (latent, value desc) and cut at k per latent
        keep = val_N > self.top_val_KL[-1, lat_N]
        if not keep.any():
            return
        lat, val = lat_N[keep], val_N[keep]
        seq, pos = seq_B[rows_N[keep]], pos_B[rows_N[keep]]
        K = self.k
        A = torch.nonzero(torch.bincount(lat, minlength=self.L)).flatten()  # affected latents, ascending
        all_l = torch.cat([A.repeat_interleave(K), lat])
        all_v = torch.cat([self.top_val_KL[:, A].T.reshape(-1), val])
        all_s = torch.cat([self.top_seq_KL[:, A].T.reshape(-1), seq])
        all_p = torch.cat([self.top_pos_KL[:, A].T.reshape(-1), pos])
        # one float64 key: the latent in the integer part, the value (descending) in the fraction
        vmax = float(all_v.max()) + 1.0
        order = torch.argsort(all_l.double() + 0.5 * (1.0 - all_v.double() / vmax))
        l_sorted = all_l[order]
        counts_L = torch.bincount(l_sorted, minlength=self.L)
        rank = torch.arange(len(order), device=lat.device) - (torch.cumsum(counts_L, 0) - counts_L)[l_sorted]
        top = rank < K  # every affected latent holds >= K entries (its old slots), so each gets exactly K
        r, col, o = rank[top], torch.searchsorted(A, l_sorted[top]), order[top]
        for dst, src in ((self.top_val_KL, all_v), (self.top_seq_KL, all_s), (self.top_pos_KL, all_p)):
            new = torch.empty(K, A.shape[0], dtype=dst.dtype, device=dst.device)
            new[r, col] = src[o]
            dst[:, A] = new

    def _update_scaling(self, f_BL: torch.Tensor, x_BXoD: torch.Tensor, rec_BXoD: torch.Tensor) -> None:
        ids, _, spec = self.scaling  # type: ignore[misc]
        f_BJ = f_BL[:, ids]
        self.sc["ff"] += f_BJ.pow(2).sum(0).double()
        B = f_BL.shape[0]
        # one matmul: <d_j, y> for y in (x_base, x_ft, x̂_base, x̂_ft), rows stacked
        y_4BK = torch.cat([t[:, s].flatten(1) for t in (x_BXoD, rec_BXoD) for s in (spec.base_slots, spec.ft_slots)])
        proj_4BJ = (y_4BK @ self.d_JK.T).view(4, B, -1) * f_BJ
        fx_base, fx_ft, fr_base, fr_ft = proj_4BJ.sum(1).double()
        for m, fx, fr in (("base", fx_base, fr_base), ("ft", fx_ft, fr_ft)):
            self.sc[f"fy_act_{m}"] += fx
            self.sc[f"fy_rec_{m}"] += fr
            self.sc[f"fy_err_{m}"] += fx - fr


def meta_table(token_table: Any, columns: list[str] | None
               ) -> tuple[dict[str, tuple[list[Any], np.ndarray]], list[str]]:
    """Per metadata column: (sorted values, value code of every seq). Returns also notes on skipped columns."""
    names = [c for c in token_table.column_names if c not in ("seq", "input_ids")]
    notes: list[str] = []
    if columns is not None:
        missing = [c for c in columns if c not in names]
        if missing:
            notes.append(f"metadata column(s) {missing} not in tokens.arrow (it has {names})")
        names = [c for c in columns if c in names]
    seq = np.asarray(token_table.column("seq").to_numpy(), dtype=np.int64)
    out: dict[str, tuple[list[Any], np.ndarray]] = {}
    for c in names:
        col = token_table.column(c).to_pylist()
        values = sorted({v for v in col}, key=lambda v: (v is None, str(v)))
        if len(values) > 64:
            notes.append(f"metadata column {c!r} has {len(values)} values (> 64): not broken down")
            continue
        index = {v: i for i, v in enumerate(values)}
        codes = np.zeros(int(seq.max()) + 1 if len(seq) else 0, dtype=np.int64)
        codes[seq] = [index[v] for v in col]
        out[c] = (values, codes)
    return out, notes


def stream_eval(run: RunData, cache: Any, cfg: AnalysisConfig, meta: dict[str, tuple[list[Any], np.ndarray]],
                scaling: tuple[torch.Tensor, torch.Tensor, DiffSpec] | None, device: torch.device
                ) -> tuple[StreamStats, str, list[str]]:
    """One pass over the run's eval split (the train split, with a note, when the cache has none)."""
    from train.loader import ActivationLoader, default_eval_shards
    from train.slots import resolve_slots

    tc = run.info["config"]
    notes: list[str] = []
    spec = resolve_slots(cache.manifest, arch=tc["arch"], models=tc.get("models"), hooks=tc.get("hooks"),
                         in_hooks=tc.get("in_hooks"), out_hooks=tc.get("out_hooks"), cache_dir=str(cache.dir))
    model = run.model.to(device)
    L = model.cfg.n_latents
    batch = cfg.batch_size or int(min(4096, max(256, 2**24 // L)))
    kw = dict(models=spec.models, hooks=spec.hooks, seed=int(tc.get("seed", 0)), with_index=True,
              eval_shards=tc.get("eval_shards"), device=device)
    n = cache.n_shards
    k = default_eval_shards(n) if tc.get("eval_shards") is None else int(tc["eval_shards"])
    split = "eval" if 0 < k < n else "train"
    if split == "train":
        kw["eval_shards"] = 0
        notes.append(f"the cache has no held-out split (eval_shards = {k} of {n} shards); statistics come from the "
                     "train split, which the dictionary was trained on")
    shards = range(n - k, n) if split == "eval" else range(n)
    rows = sum(cache.manifest.shards[i].n_rows for i in shards)
    loader = ActivationLoader(cache, min(batch, rows), split=split, **kw)  # type: ignore[arg-type]
    total = loader.split_rows if cfg.eval_tokens is None else min(cfg.eval_tokens, loader.split_rows)
    stats = StreamStats(L, cfg.top_k, meta, model.cfg.n_out, model.cfg.d_model, scaling, device)
    in_idx = torch.tensor(model.cfg.in_slots, device=device)
    out_idx = torch.tensor(model.cfg.out_slots, device=device)
    from tqdm import tqdm

    bar = tqdm(total=total, unit="tok", unit_scale=True, desc=f"analyze ({split} split)", disable=not cfg.progress,
               dynamic_ncols=True)
    it = iter(loader)
    try:
        for acts_BMPD, index_B2 in it:
            take = min(acts_BMPD.shape[0], total - stats.rows)
            x_BXD = rearrange(acts_BMPD[:take], "b m p d -> b (m p) d")
            idx = index_B2[:take].to(device)
            stats.update(model, x_BXD.index_select(1, in_idx), x_BXD.index_select(1, out_idx), idx[:, 0], idx[:, 1])
            bar.update(take)
            if stats.rows >= total:
                break
    finally:
        bar.close()
        it.close()
    return stats, split, notes


# ---- the whole analysis ----------------------------------------------------------------------------
def analyze(cfg: AnalysisConfig) -> dict[str, Any]:
    """Analyse the run ``cfg.run``; write report.md, report.json and figures to ``cfg.out_dir``.

    Returns the report dict (as written to report.json, plus ``paths``)."""
    from shared.cache import open_cache
    from shared.cache_format import CacheError
    from train import report as rep

    t0 = time.perf_counter()
    run = load_run(cfg.run)
    model = run.model
    L = model.cfg.n_latents
    notes: list[str] = []
    spec, why = diff_spec(run, cfg.base_model, cfg.ft_model)
    if spec is None:
        notes.append(why)
    with torch.no_grad():
        dec_LXoD = model.decoder_weight().detach().float().cpu()
        norms_LXo = dec_LXoD.norm(dim=-1)
    tied = torch.zeros(L, dtype=torch.bool)
    tied[: (model.cfg.shared_latents if spec is not None else 0)] = True

    diff: dict[str, Any] | None = None
    masks: dict[str, torch.Tensor] = {}
    scaling = None
    if spec is not None:
        r_L, cos_L = relative_norms(dec_LXoD, spec)
        masks = classify(r_L, cfg, tied)
        diff = {"base_model": spec.base, "ft_model": spec.ft, "r": r_L, "cos": cos_L}
        scal_ids = _scaling_set(r_L, masks, cfg)
        if len(scal_ids):
            diff["scaling_ids"] = scal_ids
            scaling = (scal_ids, dec_LXoD[scal_ids], spec)

    data: dict[str, Any] | None = None
    try:
        cache = open_cache(run.cache_path)
        tokens = cache.token_table()
    except (CacheError, OSError, ValueError) as e:  # gone, moved, incomplete, corrupt: report from the weights
        notes.append(f"the run's cache {run.cache_path} cannot be opened ({type(e).__name__}: {e}); sections that "
                     "need activations (firing, top contexts, metadata, latent scaling) are skipped and everything "
                     "below comes from the weights alone")
    else:
        device = resolve_device(cfg.device)
        meta, meta_notes = meta_table(tokens, cfg.meta_columns)
        notes.extend(meta_notes)
        if scaling is not None:
            scaling = (scaling[0].to(device), scaling[1].to(device), scaling[2])
        stats, split, stream_notes = stream_eval(run, cache, cfg, meta, scaling, device)
        notes.extend(stream_notes)
        data = {"stats": stats, "split": split, "tokens": tokens, "meta": meta,
                "tokenizer": rep.load_token_decoder(cache.manifest.tokenizer)}
        if data["tokenizer"] is None:
            notes.append(f"no tokenizer.json for {cache.manifest.tokenizer.get('name')!r} offline: contexts show "
                         "token ids as <id>")
        if diff is not None and scaling is not None:
            diff["betas"] = scaling_betas({k: v.cpu() for k, v in stats.sc.items()})
            diff["scaling_rows"] = stats.sc["ff"].cpu()
        model.cpu()

    report = rep.build_report(cfg, run, norms_LXo, masks, diff, data, notes, elapsed_s=time.perf_counter() - t0)
    report["paths"] = rep.write_report(cfg, run, report, norms_LXo, masks, diff, data)
    return report


def _scaling_set(r_L: torch.Tensor, masks: dict[str, torch.Tensor], cfg: AnalysisConfig) -> torch.Tensor:
    """Latents that get latent-scaling betas: fine-tune-only and top-r latents by descending r, then a
    reference sample of up to 64 shared latents (evenly spaced by index); ``scaling_max_latents`` in all."""
    cap = cfg.scaling_max_latents
    n_ref = min(64, cap // 4)
    rr = torch.nan_to_num(r_L, nan=-1.0)
    cand = torch.nonzero(masks["ft_only"] | masks["top_r"]).flatten()
    chosen = cand[torch.argsort(rr[cand], descending=True, stable=True)][: cap - n_ref].tolist()
    shared = torch.nonzero(masks["shared"]).flatten().tolist()
    room = cap - len(chosen)
    if shared and room > 0:
        chosen += shared[:: max(1, len(shared) // min(room, 64))][: min(room, 64)]
    return torch.tensor(chosen, dtype=torch.int64)


# ---- CLI ---------------------------------------------------------------------------------------------
def analyze_cli(argv: list[str]) -> int:
    """``run_train.py analyze RUN_DIR [flags]``: prints the headline and the report's path."""
    parser = argparse.ArgumentParser(prog="run_train.py analyze",
                                     description="Analyse a trained run: report.md, report.json and figures.")
    parser.add_argument("run", help="run folder (the --out of run_train.py)")
    add_dataclass_arguments(parser, AnalysisConfig)
    args = parser.parse_args(argv)
    try:
        cfg = dataclasses.replace(config_from_namespace(AnalysisConfig, args), run=args.run)
        report = analyze(cfg)
    except (RunError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in report["headline"]:
        print(line)
    print(f"report: {report['paths']['report_md']}")
    return 0

