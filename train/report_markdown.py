"""``report.md``: the analysis report rendered as Markdown from the report dict (``report.json``), for
a reader who did not run the training: each section says what the quantity is and how to read it.
"""

from __future__ import annotations

from typing import Any

from shared.config import config_to_json
from train.report_data import CLASS_LABELS, _floor, _fmt, _int, cli_flags
from train.report_lm_eval import lm_eval_markdown

__all__ = ["analyze_command", "render_markdown"]


def analyze_command(rep: dict[str, Any]) -> str:
    """The analyze command that wrote ``rep`` (report.json's dict): the flags that differ from their
    defaults, as typed, so running it again repeats the report."""
    from train.analysis_config import AnalysisConfig

    given = rep.get("analysis_config", {})
    defaults = config_to_json(AnalysisConfig(run=given.get("run", ".")))
    flags = cli_flags(given, defaults, skip=("run", "progress", "device"))  # the last two change no number
    return f"python run_train.py analyze {rep['run']}{flags}"


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
    L += ["", f"Written `{rep['created']}` by `{analyze_command(rep)}`. Every number here is in "
          "`report.json` beside this file, with per-latent arrays.", "", "## Summary", ""]
    L += [f"- {h}" for h in rep["headline"]]
    if rep["notes"]:
        L += ["", "## Notes", ""] + [f"- {n}" for n in rep["notes"]]
    if d:
        th, cl = d["thresholds"], d["classes"]
        L += ["", "## Relative decoder norms", "",
              f"For each latent, r = ‖d_ft‖ / (‖d_base‖ + ‖d_ft‖) compares the norms of its decoder vectors into "
              f"`{d['ft_model']}` (fine-tune) and `{d['base_model']}` (base), {_space_words(d.get('normalization'))}. r near 0: the "
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
                  "top_r": "≥ n/a" if d["top_r_min"] is None else f"≥ {_floor(d['top_r_min'], 3):.3f}"}
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
    L += lm_eval_markdown(rep["lm_eval"])
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
          f"direction (genuinely fine-tune-only); near 1: it does. Flagged: ν_ε or ν_r above {cfg.nu_max}. A latent "
          "both fine-tune-only and top by r counts in both rows; the shared reference sample is other shared "
          "latents.", "",
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
         "The firing token is between « and » (a character it shares with a neighbouring token, as byte-level "
         "vocabularies split é, is shown whole between them); ⏎ is a newline, ⇥ a tab.", ""]
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
            cut_before, cut_after = ("…" if c.get(k, True) else "" for k in ("cut_before", "cut_after"))
            L.append(f"{c['value']:>8.3f}  {meta:<6} {cut_before}{c['before']}«{c['token']}»{c['after']}{cut_after}")
        L += ["```", ""]
    return L


def _space_words(method: str | None) -> str:
    """Where r is measured, by the cache's normalization (None: a report from before it was recorded)."""
    return {
        "norm_scale": "on the normalized activations the dictionary was trained on (each model's activations scaled "
                      "to the same mean norm)",
        "mean_std": "on the normalized activations the dictionary was trained on (each dimension of each model's "
                    "activations standardized to mean 0 and standard deviation 1)",
        "none": "on the raw activations the dictionary was trained on (not normalized: r leans towards the model "
                "whose activations are larger)",
    }.get(method or "", "on the activations the dictionary was trained on")
