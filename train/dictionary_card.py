"""The model card (``README.md``) that ``run_train.py push`` uploads with a dictionary.

:func:`read_facts` gathers what the card says from the run: the export's ``config.json`` (the
dictionary config and its metadata: slots, eval metrics, train config), the run's own ``config.json``
(the cache it trained on: spec, resolved folder, models, rows, normalization), the last training line
of ``metrics.jsonl`` (dead fraction) and, where the cache is still on this machine, its manifest (the
dataset). :func:`render_dictionary_card` writes it: YAML front matter (``library_name``, tags), what
the dictionary is, the cache, the training, the final eval metrics, and how to load it.

The run's ``config.json`` and the cache's manifest hold this machine's paths; every string from them
is shown through :func:`shared.redact.redact_text` (home folder ``~/...``, user ``<user>``, host
``<host>``), as the cache push publishes a manifest. ``hf://`` ids are shown as they are: they name a
Hub repo, not a folder of this machine.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.config import read_json_object
from shared.hub_spec import HUB_PREFIX
from shared.redact import MachineNames, redact_text
from train.export import training_cache_manifest

__all__ = ["DictionaryFacts", "dictionary_kind", "read_facts", "render_dictionary_card"]

_COMMIT_IN_PATH = re.compile(r"[0-9a-f]{40}")


@dataclass
class DictionaryFacts:
    """What the card describes. ``config`` is the published ``config.json`` (already redacted); ``run_info``
    and ``manifest`` are local files, shown only through redaction."""

    config: dict[str, Any]
    run_info: dict[str, Any] = field(default_factory=dict)
    """The run's ``config.json`` ({} when pushing a bare export folder)."""
    dead_frac: float | None = None
    """Fraction of dead latents at the last logged training step (None: no metrics.jsonl)."""
    manifest: dict[str, Any] = field(default_factory=dict)
    """The training cache's manifest, when it is still where the run found it, else the export's record of
    it (``metadata.harvest``: its keys for the dictionary's models and hooks), else {}."""
    extras: list[str] = field(default_factory=list)
    """Optional files uploaded beside the dictionary (``curves.png``, ``analysis/report.md`` ...)."""

    @property
    def dictionary(self) -> dict[str, Any]:
        return self.config.get("config", {})

    @property
    def metadata(self) -> dict[str, Any]:
        return self.config.get("metadata", {})


def read_facts(export_dir: Path, run_dir: Path | None, config: dict[str, Any], extras: list[str]) -> DictionaryFacts:
    """The facts of the dictionary in ``export_dir`` (published ``config``), with what its run folder adds."""
    facts = DictionaryFacts(config=config, extras=list(extras))
    if run_dir is None:  # a bare export: what it recorded of the harvest
        recorded = facts.metadata.get("harvest")
        facts.manifest = dict(recorded) if isinstance(recorded, dict) else {}
        return facts
    facts.run_info = read_json_object(run_dir / "config.json")
    facts.dead_frac = _last_dead_frac(run_dir / "metrics.jsonl")
    facts.manifest = training_cache_manifest(facts.run_info, facts.metadata)
    return facts


def _last_dead_frac(path: Path) -> float | None:
    """``dead_frac`` of the last training line of ``metrics.jsonl`` (eval lines carry none)."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            row = json.loads(line)
        except ValueError:  # a line cut off by a kill: the one before it stands
            continue
        if isinstance(row, dict) and isinstance(row.get("dead_frac"), (int, float)):
            return float(row["dead_frac"])
    return None


# ---- what the dictionary is ---------------------------------------------------------------------------
def _split_slot(name: str) -> tuple[str, str]:
    """'model/hook' -> (model, hook): hook names hold no '/', model ids may."""
    model, _, hook = name.rpartition("/")
    return model, hook


def dictionary_kind(cfg: dict[str, Any]) -> tuple[str, list[str]]:
    """(what the dictionary is in words, Hub tags) of a dictionary config (``DictionaryConfig`` as JSON)."""
    names = list(cfg.get("slot_names", []))
    ins, outs = list(cfg.get("in_slots", [])), list(cfg.get("out_slots", []))
    models = {_split_slot(names[i])[0] for i in ins + outs if 0 <= i < len(names)}
    arch = cfg.get("arch")
    if arch == "clt":
        return "cross-layer transcoder (CLT)", ["transcoder", "cross-layer-transcoder"]
    if arch == "directional":
        if len(ins) == 1 and len(outs) == 1:
            return ("skip transcoder" if cfg.get("skip") else "transcoder"), ["transcoder"]
        return "directional crosscoder", ["crosscoder", "transcoder"]
    if len(ins) == 1:
        return "sparse autoencoder (SAE)", ["sparse-autoencoder"]
    if len(models) >= 2:
        return "model-diffing crosscoder", ["crosscoder", "model-diffing"]
    return "cross-layer crosscoder", ["crosscoder"]


def _activation(cfg: dict[str, Any]) -> str:
    act, k = cfg.get("activation"), cfg.get("k")
    return {
        "relu": "`relu` (trained with the decoder-norm-weighted L1 penalty)",
        "jumprelu": "`jumprelu` (a learned threshold per latent)",
        "topk": f"`topk`, k = {k} per token",
        "batchtopk": f"`batchtopk`, k = {k} per token on average in training; inference uses the learned threshold, "
                     "so each token is encoded on its own",
    }.get(str(act), f"`{act}`")


def _num(x: Any, digits: int = 3) -> str:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return "n/a"
    return f"{x:,}" if isinstance(x, int) else f"{x:.{digits}f}"


# ---- the card -----------------------------------------------------------------------------------------
def render_dictionary_card(facts: DictionaryFacts, *, repo: str, revision: str | None,
                           names: MachineNames | None = None) -> str:
    """Markdown model card for the dictionary of ``facts``, pushed to ``repo`` (branch ``revision``).

    ``names``: this machine's names, redacted from every string that comes from local files
    (default: :meth:`MachineNames.here`).
    """
    names = MachineNames.here() if names is None else names

    def shown(value: Any) -> str:
        text = str(value)
        return text if text.startswith(HUB_PREFIX) else redact_text(text, names)

    cfg, meta, info = facts.dictionary, facts.metadata, facts.run_info
    kind, kind_tags = dictionary_kind(cfg)
    tags = ["crosscache", "sparse-dictionary", *kind_tags, str(cfg.get("activation")), "interpretability"]
    slot_names = [shown(n) for n in cfg.get("slot_names", [])]
    models = list(dict.fromkeys(_split_slot(n)[0] for n in slot_names))
    hooks = list(dict.fromkeys(_split_slot(n)[1] for n in slot_names))
    spec = f"{HUB_PREFIX}{repo}" + (f"@{revision}" if revision else "")

    cache = info.get("cache") if isinstance(info.get("cache"), dict) else {}
    if not cache and isinstance(meta.get("harvest"), dict):  # a bare export: what it recorded of the harvest
        cache = meta["harvest"]
    source = str(cache.get("spec") or meta.get("cache") or "")
    on_hub = source.startswith(HUB_PREFIX)
    front = ["---", "library_name: crosscache", "tags:", *[f"- {t}" for t in dict.fromkeys(tags)]]
    if on_hub:  # links the card to the dataset repo the cache is in
        front += ["datasets:", f"- {source[len(HUB_PREFIX):].split('@', 1)[0].removeprefix('datasets/')}"]
    front.append("---")

    def slot_rows(slots: list[int]) -> str:
        rows = []
        for i in slots:
            model, hook = _split_slot(slot_names[i]) if 0 <= i < len(slot_names) else ("?", "?")
            rows.append(f"`{model}` / `{hook}`")
        return "<br>".join(rows)

    shared = int(cfg.get("shared_latents") or 0)
    n_latents = cfg.get("n_latents")
    latents = f"{_num(n_latents)}"
    if cfg.get("arch") == "clt" and cfg.get("in_slots"):
        latents += f" ({_num(int(n_latents) // len(cfg['in_slots']))} per layer)"
    if shared:
        latents += (f"; the first {shared} are shared latents (one decoder for all models in training, Feb 2025 "
                    "diffing update; stored per model in this raw-space export)")
    sha = str(facts.config.get("weights_sha256", ""))
    what = f"""| | |
|---|---|
| kind | {kind} |
| architecture | `{cfg.get('arch')}` |
| activation | {_activation(cfg)} |
| latents | {latents} |
| d_model | {cfg.get('d_model')} |
| input slots (model / hook) | {slot_rows(list(cfg.get('in_slots', [])))} |
| output slots (model / hook) | {slot_rows(list(cfg.get('out_slots', [])))} |
| skip connection | {'yes (a learned linear map from the input slots to the output slots)' if cfg.get('skip') else 'no'} |
| format | `{facts.config.get('format')}`, weights sha256 `{sha}` |"""

    # The cache it was trained on.
    if on_hub:
        commit = (_COMMIT_IN_PATH.findall(str(cache.get("path") or "")) or [None])[-1]
        at = source.split("@", 1)[1] if "@" in source else None
        if commit is None and at and _COMMIT_IN_PATH.fullmatch(at):
            commit = at
        where = f"`{source}`" + (f" at commit `{commit}`" if commit else "")
    elif source:
        where = f"`{shown(source)}` (a local cache, not on the Hub)"
    else:
        where = "not recorded"
    tc = meta.get("train_config") if isinstance(meta.get("train_config"), dict) else {}
    if tc.get("max_shards"):
        where += f" (its first {tc['max_shards']} shards)"
    # The dictionary's own models and hooks: a run's record lists all of its cache's, an export's
    # metadata.harvest only the dictionary's; the same dictionary gets the same card from either.
    cache_models = [m for m in cache.get("models", []) if isinstance(m, dict) and shown(m.get("name")) in models]
    model_text = (", ".join(f"`{shown(m.get('name'))}`" + (f" @ `{m['revision']}`" if m.get("revision") else "")
                            for m in cache_models) if cache_models else ", ".join(f"`{m}`" for m in models))
    ds = facts.manifest.get("dataset") if isinstance(facts.manifest.get("dataset"), dict) else {}
    dataset = (f"`{shown(ds.get('name'))}`" + (f" (split `{ds['split']}`)" if ds.get("split") else "")
               if ds.get("name") else
               "not recorded (the cache's manifest names none)" if facts.manifest else
               "not recorded (an export older than metadata.harvest, pushed without its cache)")
    norm = cache.get("normalization") or meta.get("normalization_folded")
    data = f"""| | |
|---|---|
| cache | {where} |
| models | {model_text} |
| hooks | {', '.join(f'`{h}`' for h in hooks)} |
| dataset | {dataset} |
| tokens in the cache | {_num(cache.get('n_rows')) if cache.get('n_rows') else 'not recorded'} |
| context size | {cache.get('context_size') or 'not recorded'} |
| normalization | `{norm}`, folded into these weights: the dictionary takes **raw** activations |"""

    steps, batch = tc.get("steps"), tc.get("batch_size")  # batch_size is per process
    world = meta.get("world_size", info.get("world_size", 1))
    world = world if isinstance(world, int) and world >= 1 else 1
    per_process = f", {_num(batch)} per process x {world} processes" if world > 1 and isinstance(batch, int) else ""
    if isinstance(batch, int):
        batch *= world
    seen = _num(steps * batch) if isinstance(steps, int) and isinstance(batch, int) else "n/a"
    coeff = info.get("sparsity_coeff", tc.get("sparsity_coeff"))
    training = f"""| | |
|---|---|
| steps | {_num(steps)} (step {_num(meta.get('step'))} exported) |
| batch size | {_num(batch)} tokens ({seen} tokens seen{per_process}) |
| learning rate | {tc.get('lr')} (Adam, betas {tc.get('betas')}) |
| seed | {tc.get('seed')} |"""
    if cfg.get("activation") in ("relu", "jumprelu") and coeff is not None:
        training += f"\n| sparsity coefficient λ | {coeff} |"

    ev = meta.get("eval") if isinstance(meta.get("eval"), dict) else {}
    # Per output slot (one slot: the overall figure says it all). The eval keys name the slots as the
    # published config does: both went through the same redaction.
    out_names = [cfg["slot_names"][i] for i in cfg.get("out_slots", []) if 0 <= i < len(slot_names)]
    ev_rows = "\n".join(f"| explained variance, `{shown(n)}` | {_num(ev.get(f'eval/ev/{n}'))} |"
                         for n in out_names) if len(out_names) > 1 else ""
    dead_window = info.get("dead_tokens")
    dead = (f"{_num(facts.dead_frac)} (no firing in the last {_num(dead_window)} training tokens)"
            if facts.dead_frac is not None and dead_window else _num(facts.dead_frac) if facts.dead_frac is not None
            else "not recorded (pushed from an export folder: the run's metrics.jsonl was not there)")
    metrics = f"""| | |
|---|---|
| explained variance, overall | {_num(ev.get('eval/ev/overall'))} |
{ev_rows + chr(10) if ev_rows else ''}| L0 (mean active latents per token) | {_num(ev.get('eval/l0/mean'), 1)} |
| dead latents (fraction, end of training) | {dead} |"""
    if not ev:
        metrics += "\n\nNo held-out evaluation was recorded for this run."

    n_in = len(cfg.get("in_slots", []))
    extras = ""
    if "curves.png" in facts.extras:
        extras += "\n## Training curves\n\n![training curves: loss, L0, explained variance, dead latents, LR, λ](curves.png)\n"
    if "analysis/report.md" in facts.extras:
        extras += ("\n## Analysis\n\nThe run's analysis report (`run_train.py analyze`): "
                   "[analysis/report.md](analysis/report.md), with every number in `analysis/report.json`.\n")
    files = ["- `model.safetensors`: the weights (safetensors, never pickle).",
             "- `config.json`: format, dictionary config, metadata (slots, eval, training config), weights sha256."]
    about = {"curves.png": "training curves", "analysis/report.md": "the analysis report",
             "analysis/report.json": "every number of the report, with per-latent arrays"}
    files += [f"- `{f}`" + (f": {about[f]}." if f in about else "") for f in facts.extras]

    return "\n".join(front) + f"""

# {kind[0].upper() + kind[1:]}: {', '.join(f'`{m}`' for m in models)} @ {', '.join(f'`{h}`' for h in hooks)}

A sparse dictionary trained with crosscache on a cache of harvested activations. The cache's
normalization is folded into the weights: it encodes **raw** activations of the models below
and reconstructs raw activations.

## The dictionary

{what}

## Training data

{data}

## Training

{training}

## Evaluation

Final evaluation on the cache's held-out split. These figures are on the cache's **normalized**
activations, as the dictionary was trained; on raw activations (what this export takes) the
explained variance differs somewhat with `mean_std` normalization, or for several slots of
different scales.

{metrics}
{extras}
## Loading

```python
from train.export import load_dictionary               # crosscache
dictionary = load_dictionary("{spec}")   # config.json + model.safetensors, sha256 checked
latents_BL = dictionary.encode(x_BXiD)                  # x: raw activations [batch, {n_in}, {cfg.get('d_model')}]
```

`x_BXiD` stacks the input slots in the order of the table above; `dictionary(x_BXiD).recon_BXoD`
reconstructs the output slots. Without crosscache: `model.safetensors` is a plain state dict, and
`config.json` says how it is laid out.

## Files

{chr(10).join(files)}
"""
