"""Turn the numbers of :mod:`train.analysis` into ``report.json``, PNG figures and ``report.md``.

Every number ``report.md`` shows is in ``report.json`` (rounded the same way or finer); the
markdown is written for a reader who did not run the training: each section says what the
quantity is and how to read it.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from shared.config import config_to_json
from shared.shard_io import atomic_write_bytes

__all__ = ["build_report", "write_report", "load_token_decoder", "REPORT_FORMAT"]

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


def _int(x: Any) -> str:
    return f"{int(x):,}"


def _share(num: torch.Tensor, den: torch.Tensor) -> float | None:
    d = float(den)
    return _num(float(num) / d) if d > 0 else None


def load_token_decoder(tokenizer_meta: dict[str, Any]) -> Callable[[int], str] | None:
    """A token-id -> text function from the cache manifest's tokenizer: ``tokenizer.json`` in its local
    folder or in the Hugging Face cache (offline). None when there is none (contexts then show ids)."""
    path, name = tokenizer_meta.get("path"), tokenizer_meta.get("name")
    file: str | None = None
    if path and (Path(path) / "tokenizer.json").is_file():
        file = str(Path(path) / "tokenizer.json")
    elif name and not Path(name).exists():
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(name, "tokenizer.json")
            file = found if isinstance(found, str) else None
        except Exception:  # not a valid repo id, no hub library: show ids
            file = None
    if file is None:
        return None
    try:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(file)
    except Exception:
        return None
    memo: dict[int, str] = {}

    def decode(i: int) -> str:
        if i not in memo:
            memo[i] = tok.decode([i], skip_special_tokens=False)
        return memo[i]

    return decode


def _clean(text: str) -> str:
    return text.replace("\r", "").replace("\n", "⏎").replace("\t", "⇥").replace("```", "ʼʼʼ")


def _context(ids: list[int], pos: int, decode: Callable[[int], str] | None, before: int, after: int
             ) -> dict[str, str]:
    """Text around position ``pos`` of a sequence; BOS (position 0) is left out."""
    def text(tokens: list[int]) -> str:
        if decode is None:
            return "".join(f"<{t}>" for t in tokens)
        return _clean("".join(decode(t) for t in tokens))

    lo = max(1, pos - before)
    return {"before": text(ids[lo:pos]), "token": text([ids[pos]]), "after": text(ids[pos + 1: pos + 1 + after]),
            "token_id": int(ids[pos])}


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
            "sparsity_coeff": run.info.get("sparsity_coeff", tc.get("sparsity_coeff")), "cache": run.cache_path,
        },
        "notes": list(notes),
        "eval": None, "diffing": None, "latents": None, "shown_latents": [], "profiles": None,
    }
    stats = data["stats"] if data else None
    focus_col, focus_val = (cfg.focus.split("=", 1) if cfg.focus else (None, None))
    focus_idx = None
    if stats is not None:
        fires, mass = stats.fires_L.cpu(), stats.mass_L.cpu()
        var_X = stats.sq_X - stats.sum_XD.pow(2).sum(-1) / max(stats.rows, 1)
        ev = 1 - stats.err_X.sum() / var_X.sum().clamp_min(1e-12)
        rep["eval"] = {
            "split": data["split"], "rows": stats.rows,
            "explained_variance": _num(ev),
            "explained_variance_per_slot": {
                n: _num(1 - e / max(float(v), 1e-12))
                for n, e, v in zip(run.out_slot_names, stats.err_X.tolist(), var_X.tolist())},
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
        counts, edges = np.histogram(r[~torch.isnan(r)].numpy(), bins=50, range=(0.0, 1.0))
        shared = masks["shared"] & ~torch.isnan(cos)
        cs = cos[shared]
        d: dict[str, Any] = {
            "base_model": diff["base_model"], "ft_model": diff["ft_model"],
            "thresholds": {"base_only_max": cfg.base_only_max, "shared_min": cfg.shared_min,
                           "shared_max": cfg.shared_max, "ft_only_min": cfg.ft_only_min,
                           "top_r_frac": cfg.top_r_frac, "top_r_percent": _num(100 * cfg.top_r_frac, 2)},
            "counts": {k: int(v.sum()) for k, v in masks.items()},
            "classes": {k: class_stats(masks[k]) for k in ("base_only", "between", "shared", "ft_only", "top_r")},
            "r_histogram": {"edges": [_num(e) for e in edges], "counts": counts.tolist()},
            "cos_shared": {"n": int(shared.sum()), "median": _num(cs.median()) if len(cs) else None,
                           "mean": _num(cs.mean()) if len(cs) else None,
                           "frac_above_0.9": _num((cs > 0.9).double().mean()) if len(cs) else None},
            "per_latent": {"r": [_num(x) for x in r.tolist()], "cos": [_num(x) for x in cos.tolist()]},
            "top_r_min": _num(r[masks["top_r"]].min()) if masks["top_r"].any() else None,
        }
        if "betas" in diff:
            d["latent_scaling"] = _scaling_json(diff, masks, cfg)
        rep["diffing"] = d

    rep["profiles"] = _profiles(run, norms_LXo, stats, cfg)
    rep["shown_latents"] = _shown_latents(cfg, run, masks, diff, data, focus_col, focus_idx)
    rep["headline"] = _headline(rep, run, cfg)
    rep["elapsed_s"] = _num(elapsed_s, 2)
    return rep


def _scaling_json(diff: dict[str, Any], masks: dict[str, torch.Tensor], cfg: Any) -> dict[str, Any]:
    ids = diff["scaling_ids"].tolist()
    b = {k: v.tolist() for k, v in diff["betas"].items()}
    rows = diff["scaling_rows"]
    latents = []
    for i, j in enumerate(ids):
        group = "ft_only" if masks["ft_only"][j] else ("top_r" if masks["top_r"][j] else "shared")
        entry = {"latent": j, "group": group, "r": _num(diff["r"][j]), "sum_f2": _num(rows[i], 3)}
        entry.update({k: _num(v[i]) for k, v in b.items()})
        nu_e, nu_r = entry["nu_err"], entry["nu_rec"]
        entry["flagged"] = bool((nu_e is not None and nu_e > cfg.nu_max) or (nu_r is not None and nu_r > cfg.nu_max))
        latents.append(entry)

    def summary(group: str) -> dict[str, Any]:
        es = [e for e in latents if e["group"] == group or (group == "top_r" and masks["top_r"][e["latent"]])]
        out: dict[str, Any] = {"n": len(es)}
        for k in ("nu_err", "nu_rec", "nu_act", "beta_err_base", "beta_rec_base"):
            vals = [e[k] for e in es if e[k] is not None]
            out[f"median_{k}"] = _num(float(np.median(vals))) if vals else None
        out["n_flagged"] = sum(e["flagged"] for e in es if group != "shared")
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
                ids = ids_col[row].as_py()
                c = {"value": _num(v, 3), "seq": s, "pos": p,
                     **_context(ids, p, data["tokenizer"], cfg.context_before, cfg.context_after)}
                c["meta"] = {m: meta_vals[m][row] for m in meta_cols}
                ctxs.append(c)
            entry["contexts"] = ctxs
            entry["repeat"] = j in done
            done.add(j)
            shown.append(entry)
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


# ---- figures ----------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _figures(out: Path, rep: dict[str, Any], masks: dict[str, torch.Tensor], diff: dict[str, Any] | None,
             data: dict[str, Any] | None, cfg: Any) -> dict[str, str]:
    plt = _plt()
    figs: dict[str, str] = {}
    d = rep["diffing"]
    if d is not None and diff is not None:
        r = diff["r"][~torch.isnan(diff["r"])].numpy()
        fig, ax = plt.subplots(figsize=(7, 3.6))
        ax.hist(r, bins=50, range=(0, 1), color="#4c72b0")
        for x, lab in ((cfg.base_only_max, "base-only"), (cfg.ft_only_min, "fine-tune-only")):
            ax.axvline(x, color="k", ls="--", lw=0.8)
        ax.axvspan(cfg.shared_min, cfg.shared_max, color="#dddddd", zorder=0, label="shared band")
        if d["top_r_min"] is not None:
            ax.axvline(d["top_r_min"], color="#c44e52", lw=1, label=f"top {d['thresholds']['top_r_percent']:g}% by r")
        ax.set_yscale("log")
        ax.set_xlabel(f"relative decoder norm r = |d_ft| / (|d_base| + |d_ft|)   (0: {d['base_model']} only, "
                      f"1: {d['ft_model']} only)", fontsize=8)
        ax.set_ylabel("latents (log)")
        ax.set_title(f"Relative decoder norms ({len(r)} latents)")
        ax.legend(fontsize=7)
        figs["r_hist"] = _save(fig, out / "r_hist.png")
        cos = diff["cos"][masks["shared"] & ~torch.isnan(diff["cos"])].numpy()
        if len(cos):
            fig, ax = plt.subplots(figsize=(7, 3.2))
            ax.hist(cos, bins=50, range=(-1, 1), color="#55a868")
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
                   color=["#8172b2", "#cccccc", "#55a868", "#c44e52", "#dd8452"][: len(names)])
            ax.axhline(rep["focus"]["base_rate"], color="k", ls="--", lw=0.8, label="share of eval rows")
            ax.set_ylim(0, 1)
            ax.set_ylabel(f"share of activation mass\non {rep['focus']['column']} = {rep['focus']['value']}")
            ax.legend(fontsize=7)
            figs["class_focus"] = _save(fig, out / "class_focus.png")
        ls = d.get("latent_scaling")
        if ls:
            fig, ax = plt.subplots(figsize=(5, 4.2))
            for g, col in (("shared", "#55a868"), ("top_r", "#dd8452"), ("ft_only", "#c44e52")):
                pts = [(e["nu_err"], e["nu_rec"]) for e in ls["latents"] if e["group"] == g
                       and e["nu_err"] is not None and e["nu_rec"] is not None]
                if pts:
                    ax.scatter(*zip(*pts), s=10, color=col, label=f"{CLASS_LABELS[g]} ({len(pts)})")
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


# ---- writing ------------------------------------------------------------------------------------------------
def write_report(cfg: Any, run: Any, rep: dict[str, Any], norms_LXo: torch.Tensor, masks: dict[str, torch.Tensor],
                 diff: dict[str, Any] | None, data: dict[str, Any] | None) -> dict[str, str]:
    """Write figures, report.json and report.md into ``cfg.out_dir``; return their paths."""
    out = cfg.out_dir
    out.mkdir(parents=True, exist_ok=True)
    rep["figures"] = _figures(out, rep, masks, diff, data, cfg)
    curves = run.run_dir / "curves.png"
    rep["figures"]["curves"] = (str(Path("..") / "curves.png") if out.resolve().parent == run.run_dir.resolve()
                                else str(curves.resolve())) if curves.is_file() else None
    paths = {"report_md": str(out / "report.md"), "report_json": str(out / "report.json")}
    atomic_write_bytes(out / "report.json", (json.dumps(rep, indent=1, allow_nan=False) + "\n").encode())
    atomic_write_bytes(out / "report.md", render_markdown(rep, cfg).encode())
    return paths


def render_markdown(rep: dict[str, Any], cfg: Any) -> str:
    """report.md: sections in reading order; every number comes from ``rep`` (report.json)."""
    rc, ev, d, figs = rep["run_config"], rep["eval"], rep["diffing"], rep.get("figures", {})
    focus = rep["focus"]
    fl = f"{focus['column']} = {focus['value']}" if focus else None
    L: list[str] = [f"# Analysis of run `{rep['run']}`", ""]
    k = f", k = {rc['k']}" if rc["k"] else ""
    L.append(f"A {rc['activation']} {rc['arch']} with {_int(rc['latents'])} latents{k}, trained for {rc['steps']} "
             f"steps (batch {rc['batch_size']}, lr {rc['lr']}, sparsity coefficient {rc['sparsity_coeff']}) on the "
             f"activation cache `{rc['cache']}`. Output slots: " + ", ".join(f"`{s}`" for s in rc["out_slots"]) + ".")
    if ev:
        L.append(f"Activation statistics come from the cache's {ev['split']} split ({_int(ev['rows'])} token rows, "
                 "read back through each row's sequence and position).")
    L += ["", f"Written `{rep['created']}` by `python run_train.py analyze {rep['run']}`. Every number here is in "
          "`report.json` beside this file, with per-latent arrays.", "", "## Summary", ""]
    L += [f"- {h}" for h in rep["headline"]]
    if rep["notes"]:
        L += ["", "## Notes", ""] + [f"- {n}" for n in rep["notes"]]
    if d:
        th, cl = d["thresholds"], d["classes"]
        L += ["", "## Relative decoder norms", "",
              f"For each latent, r = ‖d_ft‖ / (‖d_base‖ + ‖d_ft‖) compares the norms of its decoder vectors into "
              f"`{d['ft_model']}` (fine-tune) and `{d['base_model']}` (base), on the normalized activations the "
              "dictionary was trained on (each model's activations scaled to the same mean norm). r near 0: the "
              "latent writes only to the base model; near 0.5: to both alike; near 1: only to the fine-tune "
              "(roles: the run's first and second model unless `--base-model` / `--ft-model` say otherwise). A "
              "latent's *activation mass* is the sum of its activation values over the rows; a class's share of "
              f"mass on a metadata value says where its activity is, to compare with the share of rows.", ""]
        if figs.get("r_hist"):
            L += [f"![relative decoder norms]({figs['r_hist']})", ""]
        head = "| class | r | latents | firing on eval | mean r |" + (f" share of mass on {fl} |" if fl else "")
        L += [head, "|---|---|---|---|---|" + ("---|" if fl else "")]
        ranges = {"base_only": f"≤ {th['base_only_max']}", "between": "other",
                  "shared": f"{th['shared_min']} to {th['shared_max']}", "ft_only": f"≥ {th['ft_only_min']}",
                  "top_r": f"≥ {_fmt(d['top_r_min'])}"}
        for c in ("base_only", "between", "shared", "ft_only", "top_r"):
            x = cl[c]
            name = CLASS_LABELS[c] if c != "top_r" else f"top {th['top_r_percent']:g}% by r"
            row = (f"| {name} | {ranges[c]} | {_int(x['n'])} | {x.get('n_firing', 'n/a')} | {_fmt(x.get('mean_r'))} |")
            L.append(row + (f" {_fmt(x.get('focus_share'))} |" if fl else ""))
        if fl:
            L += ["", f"Share of eval rows with {fl}: {_fmt(focus['base_rate'])}."]
        cnt = d["counts"]
        if cnt.get("tied") or cnt.get("no_decoder"):
            L += ["", f"Not classified: {cnt.get('tied', 0)} latents trained with one shared decoder (r = 0.5 by "
                  f"construction) and {cnt.get('no_decoder', 0)} with an all-zero decoder."]
        if figs.get("class_focus"):
            L += ["", f"![share of activation mass by class]({figs['class_focus']})"]
        if ev and any(cl[c].get("mass_share") for c in cl):
            L += ["", "### Activation mass by metadata", "",
                  "Share of each class's activation mass (and, in brackets, of its firings) per value of each "
                  "metadata column of the token table; the last row is the share of eval rows.", ""]
            for col, rows in ev["row_share"].items():
                vals = list(rows)
                L += [f"`{col}`:", "", "| class | " + " | ".join(vals) + " |", "|---|" + "---|" * len(vals)]
                for c in ("base_only", "between", "shared", "ft_only", "top_r"):
                    ms, fs = cl[c]["mass_share"][col], cl[c]["firing_share"][col]
                    name = CLASS_LABELS[c] if c != "top_r" else f"top {th['top_r_percent']:g}% by r"
                    L.append(f"| {name} | " + " | ".join(f"{_fmt(ms[v])} ({_fmt(fs[v])})" for v in vals) + " |")
                L += ["| rows | " + " | ".join(_fmt(rows[v]) for v in vals) + " |", ""]
        cs = d["cos_shared"]
        L += ["", "## Decoder cosine similarity of shared latents", "",
              "Cosine of the base and fine-tune decoder vectors of the shared latents: near 1, the latent writes "
              "the same direction into both models; lower, the fine-tune moved it.", "",
              f"{cs['n']} shared latents: median {_fmt(cs['median'])}, mean {_fmt(cs['mean'])}, share above 0.9: "
              f"{_fmt(cs['frac_above_0.9'])}.", ""]
        if figs.get("cos_shared"):
            L += [f"![decoder cosine]({figs['cos_shared']})", ""]
        L += _scaling_md(d, cfg, figs)
    if ev and ev["row_share"]:
        L += ["", "## Firing by metadata", "",
              "Per metadata column of the token table: the share of eval rows with each value, and how many latents "
              "put at least 0.9 of their activation mass on it (specialised latents)."
              + (" Per latent class, see the table under Relative decoder norms." if d else ""), ""]
        for col, rows in ev["row_share"].items():
            L += [f"`{col}`:", "", "| value | share of rows | specialised latents |", "|---|---|---|"]
            L += [f"| {v} | {_fmt(share)} | {ev['specialised'][col][v]} |" for v, share in rows.items()] + [""]
    if rep["profiles"]:
        pr = rep["profiles"]
        L += ["", "## Decoder-norm profiles across slots", "",
              "Each latent's decoder norm per output slot, as a share of its total: which slots (layers, models) it "
              f"writes to. The figure shows the top {len(pr['latents'])} latents by {pr['ranked_by']}.", "",
              "| slot | latents writing most to it | mean share |", "|---|---|---|"]
        for i, s in enumerate(pr["slots"]):
            mean = pr["mean_profile"][i] if pr["mean_profile"] else None
            L.append(f"| `{s}` | {pr['argmax_counts'][s]} | {_fmt(mean)} |")
        if figs.get("profiles"):
            L += ["", f"![decoder-norm profiles]({figs['profiles']})"]
    if rep["shown_latents"]:
        L += _contexts_md(rep, fl)
    if ev:
        L += ["", "## Reconstruction and firing", "",
              f"Explained variance {_fmt(ev['explained_variance'])} overall (" +
              ", ".join(f"`{s}` {_fmt(v)}" for s, v in ev["explained_variance_per_slot"].items()) +
              f"); mean L0 {_fmt(ev['l0_mean'], 1)}; {ev['firing_latents']} latents fire, {ev['silent_latents']} never "
              f"fire on these rows.", ""]
        if figs.get("firing"):
            L += [f"![firing frequency]({figs['firing']})", ""]
    if figs.get("curves"):
        L += ["", "## Training curves", "", f"![training curves]({figs['curves']})", ""]
    return "\n".join(L).rstrip() + "\n"


def _scaling_md(d: dict[str, Any], cfg: Any, figs: dict[str, str]) -> list[str]:
    ls = d.get("latent_scaling")
    L = ["", "## Latent scaling", ""]
    if not ls:
        return L + ["Not computed: it needs the activations (see Notes) and at least one latent to fit."]
    L += ["A fine-tune-only latent may be an artefact of the L1 sparsity loss rather than something only the "
          "fine-tune has ([Minder et al. 2025](https://arxiv.org/abs/2504.02922)). Latent scaling fits, over the "
          "rows where latent j fires (activation f), the scale β that best explains a target by β·f·d_j, where d_j "
          "is the latent's fine-tune decoder vector: β = Σ f⟨d_j, y⟩ / (‖d_j‖² Σ f²). Targets, per model: its "
          "activation minus the reconstruction by all *other* latents (ε), its full reconstruction (r), its "
          "activation (x). ν = β(base) / β(fine-tune). ν near 0: the base model does not hold the latent's "
          f"direction (genuinely fine-tune-only); near 1: it does. Flagged: ν_ε or ν_r above {cfg.nu_max}.", "",
          "| latents | n | median ν_ε | median ν_r | median ν_x | flagged |", "|---|---|---|---|---|---|"]
    names = {"ft_only": "fine-tune-only", "top_r": f"top {d['thresholds']['top_r_percent']:g}% by r",
             "shared": "shared (reference sample)"}
    for g, s in ls["groups"].items():
        flagged = s["n_flagged"] if g != "shared" else "—"
        L.append(f"| {names[g]} | {s['n']} | {_fmt(s['median_nu_err'])} | {_fmt(s['median_nu_rec'])} | "
                 f"{_fmt(s['median_nu_act'])} | {flagged} |")
    rows = [e for e in ls["latents"] if e["group"] != "shared"][:20]
    if rows:
        L += ["", "| latent | r | β_ε base | β_ε ft | ν_ε | β_r base | β_r ft | ν_r | ν_x | flagged |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        for e in rows:
            L.append(f"| {e['latent']} | {_fmt(e['r'])} | {_fmt(e['beta_err_base'])} | {_fmt(e['beta_err_ft'])} | "
                     f"{_fmt(e['nu_err'])} | {_fmt(e['beta_rec_base'])} | {_fmt(e['beta_rec_ft'])} | "
                     f"{_fmt(e['nu_rec'])} | {_fmt(e['nu_act'])} | {'yes' if e['flagged'] else 'no'} |")
    if figs.get("latent_scaling"):
        L += ["", f"![latent scaling]({figs['latent_scaling']})"]
    return L


def _contexts_md(rep: dict[str, Any], fl: str | None) -> list[str]:
    d = rep["diffing"]
    L = ["", "## Top-activating contexts", "",
         "For each latent, the rows where it fires most (activation value first, then the sequence's metadata). "
         "The firing token is between « and »; ⏎ is a newline, ⇥ a tab.", ""]
    titles = {"ft_only": "Fine-tune-only latents (most active)", "base_only": "Base-only latents (most active)",
              "shared": "Shared latents (most active)", "all": "Most active latents",
              "top_r": f"Top {d['thresholds']['top_r_percent']:g}% by r (highest r first)" if d else "Top by r"}
    group = None
    for e in rep["shown_latents"]:
        if e["group"] != group:
            group = e["group"]
            L += [f"### {titles[group]}", ""]
        bits = [f"r {_fmt(e['r'])}"] if "r" in e else []
        bits.append(f"fires on {_int(e['fires'])} rows (rate {e['fire_rate']})")
        if fl and e.get("focus_share") is not None:
            bits.append(f"{_fmt(e['focus_share'])} of its mass on {fl}")
        L.append(f"**latent {e['latent']}**: " + ", ".join(bits))
        if e["repeat"]:
            L += ["(contexts shown above)", ""]
            continue
        L += ["", "```text"]
        for c in e["contexts"]:
            meta = " ".join(str(v) for v in c["meta"].values())
            L.append(f"{c['value']:>8.3f}  {meta:<6} …{c['before']}«{c['token']}»{c['after']}…")
        L += ["```", ""]
    return L
