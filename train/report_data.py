"""Every number of an analysis report, JSON-ready: :func:`build_report` turns the tensors of
:mod:`train.analysis` into the dict that is written as ``report.json`` (and that ``report.md`` and the
figures are drawn from), plus the rounding and number formats the report uses throughout.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

import numpy as np
import torch

from shared.config import config_to_json
from train.token_text import contexts

__all__ = ["CLASS_LABELS", "REPORT_FORMAT", "build_report", "cli_flags"]

REPORT_FORMAT = "crosscache.analysis/1"
CLASS_LABELS = {"base_only": "base-only", "between": "in between", "shared": "shared", "ft_only": "fine-tune-only",
                "top_r": "top by r"}


# ---- helpers -----------------------------------------------------------------------------------------
def _num(x: Any, digits: int = 4) -> float | None:
    """A JSON-safe rounded float (None for NaN/inf/None)."""
    if x is None:
        return None
    x = float(x)
    return round(x, digits) if math.isfinite(x) else None


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _floor(x: float, digits: int) -> float:
    """``x`` rounded down to ``digits`` decimals, for a class's lower bound (rounded to nearest, 0.99196 read
    0.992, which that latent is not). round() first: 0.992 * 1e3 is 991.9999..."""
    return math.floor(round(x * 10**digits, 6)) / 10**digits


def cosine_summary(cos_N: torch.Tensor) -> dict[str, Any]:
    """``n``, ``median``, ``mean`` and ``frac_above_0.9`` of the shared latents' decoder cosines (None when
    there are none). The median of an even count is the mean of the middle two, as numpy's (the latent-scaling
    medians): torch's ``median()`` returns the lower one."""
    if not len(cos_N):
        return {"n": 0, "median": None, "mean": None, "frac_above_0.9": None}
    cos_N = cos_N.double()
    return {"n": len(cos_N), "median": _num(cos_N.quantile(0.5)), "mean": _num(cos_N.mean()),
            "frac_above_0.9": _num((cos_N > 0.9).double().mean())}


def _int(x: Any) -> str:
    return f"{int(x):,}"


def _share(num: torch.Tensor, den: torch.Tensor) -> float | None:
    d = float(den)
    return _num(float(num) / d) if d > 0 else None


def cli_flags(given: dict[str, Any], defaults: dict[str, Any], skip: tuple[str, ...] = ()) -> str:
    """The command-line flags of the config values ``given`` that differ from ``defaults`` (both as saved in
    JSON), as typed: ``" --top-k 5 --no-progress"``; the fields in ``skip`` left out (e.g. those that change no
    number: device, progress)."""
    out = []
    for key, value in given.items():
        if key in skip or value == defaults.get(key):
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else f"--no-{key.replace('_', '-')}")
        elif isinstance(value, list):
            out.append(" ".join([flag, *map(str, value)]))
        else:
            out.append(f"{flag} {value}")
    return "".join(" " + x for x in out)


# ---- report.json ---------------------------------------------------------------------------------------
def build_report(cfg: Any, run: Any, norms_LXo: torch.Tensor, masks: dict[str, torch.Tensor],
                 diff: dict[str, Any] | None, data: dict[str, Any] | None, notes: list[str],
                 elapsed_s: float) -> dict[str, Any]:
    """Every number of the report, JSON-ready."""
    mc = run.model.cfg
    tc = run.info.get("config", {})
    L = mc.n_latents
    rep: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "run": str(run.run_dir),
        "created": dt.datetime.now().isoformat(timespec="seconds"),
        "analysis_config": config_to_json(cfg),
        "run_config": {
            "arch": mc.arch, "activation": mc.activation, "latents": L, "k": mc.k, "d_model": mc.d_model,
            "slots": list(mc.slot_names), "out_slots": list(run.out_slot_names), "shared_latents": mc.shared_latents,
            "steps": tc.get("steps"), "batch_size": tc.get("batch_size"), "lr": tc.get("lr"),
            "sparsity_coeff": run.info.get("sparsity_coeff", tc.get("sparsity_coeff")), "cache": run.cache_used or run.cache_path,
        },
        "notes": list(notes),
        "eval": None, "diffing": None, "latents": None, "shown_latents": [], "profiles": None,
    }
    stats = data["stats"] if data else None
    focus_col, focus_val = (cfg.focus.split("=", 1) if cfg.focus else (None, None))
    focus_idx = None
    if stats is not None:
        fires, mass = stats.fires_L.cpu(), stats.mass_L.cpu()
        ev, ev_X = stats.explained_variance()  # None (n/a) for < 2 rows or no variance
        rep["eval"] = {
            "split": data["split"], "rows": stats.rows,
            "explained_variance": _num(ev),
            "explained_variance_per_slot": {n: _num(e) for n, e in zip(run.out_slot_names, ev_X)},
            "l0_mean": _num(stats.nnz / max(stats.rows, 1), 3),
            "firing_latents": int((fires > 0).sum()), "silent_latents": int((fires == 0).sum()),
            "row_share": {c: {str(v): _share(stats.meta_rows[c][i], stats.meta_rows[c].sum())
                              for i, v in enumerate(vals)} for c, (vals, _) in data["meta"].items()},
        }
        per_latent: dict[str, Any] = {"fires": fires.long().tolist(), "mass": [_num(x, 3) for x in mass.tolist()],
                                      "max": [_num(x, 3) for x in stats.max_L.cpu().tolist()]}
        if focus_col in data["meta"]:
            vals = [str(v) for v in data["meta"][focus_col][0]]
            if focus_val in vals:
                focus_idx = vals.index(focus_val)
                fm = stats.meta_mass[focus_col][:, focus_idx].cpu()
                per_latent["focus_share"] = [_num(a / b) if b > 0 else None for a, b in zip(fm.tolist(), mass.tolist())]
                rep["eval"]["focus_base_rate"] = rep["eval"]["row_share"][focus_col][focus_val]
            else:
                rep["notes"].append(f"focus {cfg.focus}: column {focus_col!r} has no value {focus_val!r} "
                                    f"(values {vals})")
        elif focus_col:
            rep["notes"].append(f"focus {cfg.focus}: tokens.arrow has no column {focus_col!r}; no focus share")
        rep["latents"] = per_latent
        # latents that put >= 0.9 of their activation mass on one value of a metadata column
        rep["eval"]["specialised"] = {
            c: {str(v): int(((stats.meta_mass[c][:, i].cpu() >= 0.9 * mass) & (fires > 0)).sum())
                for i, v in enumerate(vals)} for c, (vals, _) in data["meta"].items()}
    rep["focus"] = ({"column": focus_col, "value": focus_val,
                     "base_rate": rep["eval"]["focus_base_rate"]} if focus_idx is not None else None)

    def class_stats(mask: torch.Tensor) -> dict[str, Any]:
        out: dict[str, Any] = {"n": int(mask.sum())}
        if diff is not None:
            r = diff["r"][mask]
            out["mean_r"] = _num(r.mean()) if len(r) else None
        if stats is not None:
            m = mask.to(stats.fires_L.device)
            out["n_firing"] = int((stats.fires_L[m] > 0).sum())
            total = stats.mass_L[m].sum()
            out["mass"] = _num(total, 2)
            meta = data["meta"]  # type: ignore[index]
            out["mass_share"] = {c: {str(v): _share(stats.meta_mass[c][m, i].sum(), total) for i, v in enumerate(vals)}
                                 for c, (vals, _) in meta.items()}
            fires = stats.fires_L[m].sum()
            out["firing_share"] = {c: {str(v): _share(stats.meta_fires[c][m, i].sum(), fires)
                                       for i, v in enumerate(vals)} for c, (vals, _) in meta.items()}
            out["focus_share"] = out["mass_share"][focus_col][focus_val] if focus_idx is not None else None
        return out

    if diff is not None:
        r, cos = diff["r"], diff["cos"]
        # The classified latents: tied ones (one shared decoder) sit at r = 0.5 by construction.
        counts, edges = np.histogram(r[~torch.isnan(r) & ~masks["tied"]].numpy(), bins=50, range=(0.0, 1.0))
        shared = masks["shared"] & ~torch.isnan(cos)
        cs = cos[shared]
        d: dict[str, Any] = {
            "base_model": diff["base_model"], "ft_model": diff["ft_model"],
            # The space r is measured in: the cache's normalization of the activations the dictionary trained on.
            "normalization": (run.info.get("cache") or {}).get("normalization"),
            "thresholds": {"base_only_max": cfg.base_only_max, "shared_min": cfg.shared_min,
                           "shared_max": cfg.shared_max, "ft_only_min": cfg.ft_only_min,
                           "top_r_frac": cfg.top_r_frac, "top_r_percent": _num(100 * cfg.top_r_frac, 2)},
            "counts": {k: int(v.sum()) for k, v in masks.items()},
            "classes": {k: class_stats(masks[k]) for k in ("base_only", "between", "shared", "ft_only", "top_r")},
            "r_histogram": {"edges": [_num(e) for e in edges], "counts": counts.tolist()},
            "cos_shared": cosine_summary(cs),
            "per_latent": {"r": [_num(x) for x in r.tolist()], "cos": [_num(x) for x in cos.tolist()]},
            "top_r_min": _floor(float(r[masks["top_r"]].min()), 4) if masks["top_r"].any() else None,
        }
        if "betas" in diff:
            d["latent_scaling"] = _scaling_json(diff, masks, cfg)
        if d["normalization"] == "none":
            rep["notes"].append("the cache is not normalized (harvested with --normalize none): r compares decoder "
                                "norms in each model's raw units, so it leans towards the model whose activations "
                                "are larger; harvest with --normalize norm_scale (the default) to compare the models "
                                "on one scale")
        rep["diffing"] = d

    rep["profiles"] = _profiles(run, norms_LXo, stats, cfg)
    # What splicing the dictionary into its models costs, if lm-eval ran on this very export. Imported here:
    # train.report_lm_eval formats with this module's helpers.
    from train.report_lm_eval import lm_eval_block, lm_eval_headline, lm_eval_note

    rep["lm_eval"] = lm_eval_block(run.run_dir, cfg.out_dir)
    if note := lm_eval_note(rep["lm_eval"]):
        rep["notes"].append(note)
    rep["shown_latents"] = _shown_latents(cfg, run, masks, diff, data, focus_col, focus_idx)
    rep["headline"] = _headline(rep, run, cfg)
    if line := lm_eval_headline(rep["lm_eval"]):
        rep["headline"].append(line)
    rep["elapsed_s"] = _num(elapsed_s, 2)
    return rep


def _scaling_json(diff: dict[str, Any], masks: dict[str, torch.Tensor], cfg: Any) -> dict[str, Any]:
    ids = diff["scaling_ids"].tolist()
    assert len(set(ids)) == len(ids), "a latent twice in the latent-scaling set"  # each is one row and one point
    b = {k: v.tolist() for k, v in diff["betas"].items()}
    rows = diff["scaling_rows"]
    latents = []
    for i, j in enumerate(ids):
        group = "ft_only" if masks["ft_only"][j] else ("top_r" if masks["top_r"][j] else "shared")
        entry = {"latent": j, "group": group, "r": _num(diff["r"][j]), "sum_f2": _num(rows[i], 3)}
        entry.update({k: _num(v[i]) for k, v in b.items()})
        nu_e, nu_r = entry["nu_err"], entry["nu_rec"]
        # The shared sample is the reference ν is read against: only fine-tune-only and top-r latents are flagged.
        entry["flagged"] = group != "shared" and bool((nu_e is not None and nu_e > cfg.nu_max)
                                                      or (nu_r is not None and nu_r > cfg.nu_max))
        latents.append(entry)

    def summary(group: str) -> dict[str, Any]:
        es = [e for e in latents if e["group"] == group or (group == "top_r" and masks["top_r"][e["latent"]])]
        out: dict[str, Any] = {"n": len(es)}
        for k in ("nu_err", "nu_rec", "nu_act", "beta_err_base", "beta_rec_base"):
            vals = [e[k] for e in es if e[k] is not None]
            out[f"median_{k}"] = _num(float(np.median(vals))) if vals else None
        out["n_flagged"] = sum(e["flagged"] for e in es)
        return out

    return {"nu_max": cfg.nu_max, "groups": {g: summary(g) for g in ("ft_only", "top_r", "shared")},
            "latents": latents}


def _profiles(run: Any, norms_LXo: torch.Tensor, stats: Any, cfg: Any) -> dict[str, Any] | None:
    """Decoder-norm profile across output slots, for multi-hook crosscoders and CLT/directional runs
    with several output slots (a 2-model x 1-hook diff is covered by r)."""
    mc = run.model.cfg
    hooks = list(dict.fromkeys(n.rsplit("/", 1)[-1] for n in run.out_slot_names))
    if not ((mc.arch == "crosscoder" and len(hooks) > 1) or (mc.arch != "crosscoder" and mc.n_out > 1)):
        return None
    total = norms_LXo.sum(1, keepdim=True)
    prof = torch.where(total > 0, norms_LXo / total.clamp_min(1e-12), torch.zeros_like(norms_LXo))
    score = stats.mass_L.cpu() if stats is not None else norms_LXo.sum(1).double()
    order = torch.argsort(score, descending=True, stable=True)[: cfg.profile_latents].tolist()
    alive = total[:, 0] > 0
    top_slot = prof.argmax(1)
    out = {"slots": list(run.out_slot_names), "ranked_by": "activation mass" if stats is not None else "decoder norm",
           "argmax_counts": {n: int(((top_slot == i) & alive).sum()) for i, n in enumerate(run.out_slot_names)},
           "mean_profile": [_num(x) for x in prof[alive].mean(0).tolist()] if alive.any() else None,
           "latents": [{"latent": j, "profile": [_num(x) for x in prof[j].tolist()],
                        "norms": [_num(x) for x in norms_LXo[j].tolist()]} for j in order]}
    if mc.arch == "clt":
        out["source_layer"] = {str(j): j // mc.latents_per_layer for j in order}
    return out


def _shown_latents(cfg: Any, run: Any, masks: dict[str, torch.Tensor], diff: dict[str, Any] | None,
                   data: dict[str, Any] | None, focus_col: str | None, focus_idx: int | None) -> list[dict[str, Any]]:
    """The latents shown with contexts: per class (diffing) or overall, the most active firing ones."""
    if data is None:
        return []
    stats = data["stats"]
    mass, fires = stats.mass_L.cpu(), stats.fires_L.cpu()
    groups: list[tuple[str, torch.Tensor]]
    if diff is not None:
        groups = [(g, masks[g]) for g in ("ft_only", "top_r", "base_only", "shared")]
    else:
        groups = [("all", torch.ones_like(fires, dtype=torch.bool))]
    tokens = data["tokens"]
    seq_col = tokens.column("seq").to_numpy()
    row_of_seq = {int(s): i for i, s in enumerate(seq_col)}
    ids_col = tokens.column("input_ids")
    meta_cols = list(data["meta"])
    meta_vals = {c: tokens.column(c).to_pylist() for c in meta_cols}
    top_val = stats.top_val_KL.cpu()
    top_seq, top_pos = stats.top_seq_KL.cpu(), stats.top_pos_KL.cpu()
    shown: list[dict[str, Any]] = []
    windows: list[tuple[list[int], int]] = []  # (ids, pos) of every context, decoded in one batch at the end
    done: set[int] = set()
    for group, mask in groups:
        cand = torch.nonzero(mask & (fires > 0)).flatten()
        key = diff["r"][cand].double() if group == "top_r" and diff is not None else mass[cand]
        cand = cand[torch.argsort(key, descending=True, stable=True)][: cfg.latents_shown].tolist()
        for j in cand:
            entry: dict[str, Any] = {"latent": j, "group": group, "fires": int(fires[j]), "mass": _num(mass[j], 3),
                                     "fire_rate": _num(fires[j] / max(stats.rows, 1), 5)}
            if diff is not None:
                entry["r"] = _num(diff["r"][j])
                entry["cos"] = _num(diff["cos"][j])
            if focus_idx is not None:
                entry["focus_share"] = _share(stats.meta_mass[focus_col][j, focus_idx], mass[j])
            ctxs = []
            for kk in range(top_val.shape[0]):
                v = float(top_val[kk, j])
                if v <= 0 or int(top_seq[kk, j]) < 0:
                    break
                s, p = int(top_seq[kk, j]), int(top_pos[kk, j])
                row = row_of_seq[s]
                windows.append((ids_col[row].as_py(), p))
                ctxs.append({"value": _num(v, 3), "seq": s, "pos": p,
                             "meta": {m: meta_vals[m][row] for m in meta_cols}})
            entry["contexts"] = ctxs
            entry["repeat"] = j in done
            done.add(j)
            shown.append(entry)
    texts = iter(contexts(windows, data["tokenizer"], cfg.context_before, cfg.context_after))
    for entry in shown:
        for c in entry["contexts"]:
            c.update(next(texts))
            c["meta"] = c.pop("meta")  # last, as report.json has always had it
    return shown


def _headline(rep: dict[str, Any], run: Any, cfg: Any) -> list[str]:
    mc = run.model.cfg
    lines = []
    d, ev, focus = rep["diffing"], rep["eval"], rep["focus"]
    if d is not None:
        c = d["classes"]
        line = (f"{d['ft_model']} vs {d['base_model']}: {c['ft_only']['n']} fine-tune-only latents "
                f"(r >= {cfg.ft_only_min}) and {c['base_only']['n']} base-only (r <= {cfg.base_only_max}) "
                f"of {mc.n_latents}")
        if focus is not None:
            fo, sh, tr = c["ft_only"].get("focus_share"), c["shared"].get("focus_share"), c["top_r"].get("focus_share")
            line += (f"; share of activation mass on {focus['column']} = {focus['value']}: "
                     f"fine-tune-only {_fmt(fo, 2)}, shared {_fmt(sh, 2)}, "
                     f"top {d['thresholds']['top_r_percent']:g}% by r {_fmt(tr, 2)} "
                     f"(rows: {_fmt(focus['base_rate'], 2)})")
        lines.append(line)
    else:
        lines.append(f"{mc.arch} ({mc.activation}), {mc.n_latents} latents over {len(run.out_slot_names)} "
                     "output slot(s)")
    if ev is not None:
        lines.append(f"eval ({ev['split']} split, {ev['rows']:,} rows): explained variance "
                     f"{_fmt(ev['explained_variance'])}, L0 {_fmt(ev['l0_mean'], 1)}, "
                     f"{ev['silent_latents']} latents never fire")
    return lines
