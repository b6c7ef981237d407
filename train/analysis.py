"""Analysis of a trained run: model diffing (relative decoder norms, latent scaling), top contexts,
firing by metadata, decoder-norm profiles across slots. ``python run_train.py analyze RUN_DIR``.

This module runs the analysis (:func:`analyze`) and holds its CLI; the parts live in
:mod:`train.analysis_config` (options), :mod:`train.analysis_run` (the run and its diffing roles),
:mod:`train.diffing` (the math) and :mod:`train.analysis_stream` (the pass over the eval split).
Every name of ``__all__`` is importable from here.

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
import sys
import time
from typing import Any

import torch

from shared.config import add_dataclass_arguments, config_from_namespace
from shared.devices import resolve_device
from shared.folder_lock import FolderLock, FolderLockError, exit_code_for
from train.analysis_config import AnalysisConfig
from train.analysis_run import DiffSpec, RunData, RunError, diff_spec, load_run, open_run_cache
from train.analysis_stream import StreamStats, meta_table, stream_eval
from train.diffing import classify, relative_norms, scaling_betas

__all__ = ["AnalysisConfig", "RunData", "DiffSpec", "analyze", "analyze_cli", "load_run", "diff_spec",
           "relative_norms", "classify", "scaling_betas", "StreamStats", "RunError"]


# ---- the whole analysis ----------------------------------------------------------------------------
def analyze(cfg: AnalysisConfig) -> dict[str, Any]:
    """Analyse the run ``cfg.run``; write report.md, report.json and figures to ``cfg.out_dir``.

    Returns the report dict (as written to report.json, plus ``paths``). Refused
    (:class:`~shared.folder_lock.FolderBusyError`) while another analysis writes that folder."""
    t0 = time.perf_counter()
    run = load_run(cfg.run)
    # Held until the last file is written: two analyses into one folder would mix their figures and numbers.
    with FolderLock(cfg.out_dir, what="report folder"):
        return _analyze(cfg, run, t0)


def _analyze(cfg: AnalysisConfig, run: RunData, t0: float) -> dict[str, Any]:
    """:func:`analyze` once the run is loaded and its report folder locked."""
    from train import report as rep

    model = run.model
    L = model.cfg.n_latents
    notes: list[str] = []
    spec, why = diff_spec(run, cfg.base_model, cfg.ft_model)
    if why:  # why there is no diffing, or which pair of a 3+ model crosscoder it compares
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
        if note := _scaling_cap_note(masks, scal_ids, cfg):
            notes.append(note)
        if len(scal_ids):
            diff["scaling_ids"] = scal_ids
            scaling = (scal_ids, dec_LXoD[scal_ids], spec)

    data: dict[str, Any] | None = None
    opened = open_run_cache(run, cfg.cache, notes)
    if opened is not None:
        cache, tokens = opened
        device = resolve_device(cfg.device)
        meta, meta_notes = meta_table(tokens, cfg.meta_columns)
        notes.extend(meta_notes)
        if scaling is not None:
            scaling = (scaling[0].to(device), scaling[1].to(device), scaling[2])
        stats, split, stream_notes = stream_eval(run, cache, cfg, meta, scaling, device, tokens)
        notes.extend(stream_notes)
        data = {"stats": stats, "split": split, "tokens": tokens, "meta": meta,
                "tokenizer": rep.load_token_decoder(cache.manifest.tokenizer, cache.dir)}
        if data["tokenizer"] is None:
            from train.token_text import no_decoder_note

            notes.append(no_decoder_note(cache.manifest.tokenizer, cache.dir))
        if diff is not None and scaling is not None:
            diff["betas"] = scaling_betas({k: v.cpu() for k, v in stats.sc.items()})
            diff["scaling_rows"] = stats.sc["ff"].cpu()
        model.cpu()

    report = rep.build_report(cfg, run, norms_LXo, masks, diff, data, notes, elapsed_s=time.perf_counter() - t0)
    report["paths"] = rep.write_report(cfg, run, report, norms_LXo, masks, diff, data)
    return report


def _scaling_set(r_L: torch.Tensor, masks: dict[str, torch.Tensor], cfg: AnalysisConfig) -> torch.Tensor:
    """Latents that get latent-scaling betas, each once: fine-tune-only and top-r latents by descending r,
    then a reference sample of up to 64 of the other shared latents (evenly spaced by index; a top-r latent
    can be shared too, e.g. in every BatchTopK run, where r stays near 0.5); ``scaling_max_latents`` in all."""
    cap = cfg.scaling_max_latents
    n_ref = min(64, cap // 4)
    rr = torch.nan_to_num(r_L, nan=-1.0)
    cand = torch.nonzero(masks["ft_only"] | masks["top_r"]).flatten()
    chosen = cand[torch.argsort(rr[cand], descending=True, stable=True)][: cap - n_ref].tolist()
    # Not the ft-only / top-r candidates (also those the cap left out): the reference is latents of neither.
    shared = torch.nonzero(masks["shared"] & ~masks["ft_only"] & ~masks["top_r"]).flatten().tolist()
    room = cap - len(chosen)
    if shared and room > 0:
        chosen += shared[:: max(1, len(shared) // min(room, 64))][: min(room, 64)]
    return torch.tensor(chosen, dtype=torch.int64)


def _scaling_cap_note(masks: dict[str, torch.Tensor], scal_ids: torch.Tensor, cfg: AnalysisConfig) -> str | None:
    """A note when ``scaling_max_latents`` left fine-tune-only or top-r latents (the candidates of
    :func:`_scaling_set`) without betas, counting each class."""
    chosen = torch.zeros_like(masks["ft_only"])
    chosen[scal_ids] = True
    left_out = []
    for label, mask in (("fine-tune-only", masks["ft_only"]), ("other top-r", masks["top_r"] & ~masks["ft_only"])):
        n, n_fit = int(mask.sum()), int((mask & chosen).sum())
        if n_fit != n:
            left_out.append(f"{n_fit} of {n} {label} latents")
    if not left_out:
        return None
    return (f"latent scaling: {' and '.join(left_out)} got betas (those of highest r; "
            f"--scaling-max-latents {cfg.scaling_max_latents}); raise it to fit them all")


# ---- CLI ---------------------------------------------------------------------------------------------
def analyze_cli(argv: list[str]) -> int:
    """``run_train.py analyze RUN_DIR [flags]``: prints the headline and the report's path."""
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="run_train.py analyze",
                                     description="Analyse a trained run: report.md, report.json and figures.")
    parser.add_argument("run", help="run folder (the --out of run_train.py)")
    add_dataclass_arguments(parser, AnalysisConfig)
    args = parser.parse_args(argv)
    try:
        cfg = dataclasses.replace(config_from_namespace(AnalysisConfig, args), run=args.run)
        report = analyze(cfg)
    except FolderLockError as e:
        print(f"error: {e}", file=sys.stderr)
        return exit_code_for(e)
    except (RunError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in report["headline"]:
        print(line)
    for note in report["notes"]:  # e.g. a --focus value the token table lacks: said here too, not only in report.md
        print(f"note: {note}")
    print(f"report: {report['paths']['report_md']}")
    return 0
