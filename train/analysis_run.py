"""The finished run an analysis reads (:class:`RunData`, :func:`load_run`) and its model-diffing roles
(:class:`DiffSpec`, :func:`diff_spec`: which output slots are the base and which the fine-tune model).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DiffSpec", "RunData", "RunError", "cache_mismatch", "diff_spec", "load_run"]


# ---- the run ---------------------------------------------------------------------------------------
class RunError(ValueError):
    """The folder is not a finished training run (no config.json or no dictionary/)."""


@dataclass
class RunData:
    """A finished run: its saved config and the normalized-space dictionary."""

    run_dir: Path
    info: dict[str, Any]  # config.json of the run
    model: Any  # train.dictionary.Dictionary (normalized space)
    out_slot_names: list[str]  # 'model/hook' of each output slot (Xo order)
    cache_used: str | None = None  # the cache the analysis read activations from (set once it is opened)

    @property
    def arch(self) -> str:
        return self.model.cfg.arch

    @property
    def cache_path(self) -> str:
        """Where the run's cache was when it trained (its resolved folder, else its --cache spec)."""
        return str(self.info.get("cache", {}).get("path") or self.info["config"]["cache"])

    def cache_candidates(self) -> list[str]:
        """Where to look for the run's cache, in order: the folder it trained on, then its ``--cache``
        spec as given (a relative folder from here, or ``hf://``: resolved anew)."""
        recorded, spec = self.info.get("cache", {}).get("path"), self.info.get("config", {}).get("cache")
        return list(dict.fromkeys(str(c) for c in (recorded, spec) if c))


def cache_mismatch(run: RunData, manifest: Any) -> tuple[str | None, str | None]:
    """How a cache's manifest differs from the one ``run`` trained on: (why it cannot be the run's
    cache: other models, hooks, width or normalization; None if it can, and a note on what else
    differs: rows or storage dtype, None if nothing). Runs that recorded less are checked on less."""
    rec = run.info.get("cache", {})
    hard, soft = [], []
    names = [m.get("name") for m in rec.get("models", [])]
    if names and names != manifest.model_names:
        hard.append(f"models {manifest.model_names}, the run's {names}")
    if rec.get("hooks") and list(rec["hooks"]) != list(manifest.hooks):
        hard.append(f"hooks {list(manifest.hooks)}, the run's {rec['hooks']}")
    if run.info.get("d_model") is not None and int(run.info["d_model"]) != manifest.d_model:
        hard.append(f"d_model {manifest.d_model}, the run's {run.info['d_model']}")
    method = manifest.normalization.get("method")
    if rec.get("normalization") and rec["normalization"] != method:
        hard.append(f"normalization {method}, the run's {rec['normalization']}")
    if rec.get("n_rows") is not None and int(rec["n_rows"]) != manifest.n_rows:
        soft.append(f"{manifest.n_rows:,} rows, the run trained on a cache of {int(rec['n_rows']):,}")
    if rec.get("dtype") and rec["dtype"] != manifest.dtype:
        soft.append(f"dtype {manifest.dtype}, the run's {rec['dtype']}")
    return ("; ".join(hard) or None), ("; ".join(soft) or None)


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
