"""The finished run an analysis reads (:class:`RunData`, :func:`load_run`) and its model-diffing roles
(:class:`DiffSpec`, :func:`diff_spec`: which output slots are the base and which the fine-tune model).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DiffSpec", "RunData", "RunError", "cache_mismatch", "cache_model_names", "diff_spec", "load_run"]


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
    def slot_pairs(self) -> list[tuple[str, str]]:
        """(model, hook) of every slot of the dictionary (``config.json``'s 'model/hook' names)."""
        names = self.info.get("slots") or list(self.model.cfg.slot_names)
        return [tuple(n.rsplit("/", 1)) for n in names]  # hook names hold no '/', model ids may

    @property
    def models_used(self) -> list[str]:
        return list(dict.fromkeys(m for m, _ in self.slot_pairs))

    @property
    def hooks_used(self) -> list[str]:
        return list(dict.fromkeys(h for _, h in self.slot_pairs))

    @property
    def cache_path(self) -> str:
        """Where the run's cache was when it trained (its resolved folder, else its --cache spec)."""
        return str(self.info.get("cache", {}).get("path") or self.info["config"]["cache"])

    def cache_candidates(self) -> list[str]:
        """Where to look for the run's cache, in order: the folder it trained on, then its ``--cache``
        spec as given (a relative folder from here, or ``hf://``: pinned to the commit the run trained
        on when the spec names none, as a resume is)."""
        recorded, spec = self.info.get("cache", {}).get("path"), self.info.get("config", {}).get("cache")
        if spec and str(spec).startswith("hf://") and "@" not in str(spec):
            from train.run_dir import _commit_in

            commit = _commit_in(recorded)
            spec = f"{spec}@{commit}" if commit else spec
        return list(dict.fromkeys(str(c) for c in (recorded, spec) if c))

    @property
    def max_shards(self) -> int | None:
        """The ``--max-shards`` the run trained with (its view of an ``hf://`` cache), if any."""
        value = self.info.get("config", {}).get("max_shards")
        return int(value) if value is not None else None


def _same_model(run_name: str, cache_name: str) -> bool:
    """Whether a cache's model name is the run's: the same, or as ``push`` publishes it (a path under
    this machine's home folder written ``~/...``)."""
    from shared.redact import MachineNames, redact_text

    return run_name == cache_name or redact_text(run_name, MachineNames.here()) == cache_name


def cache_model_names(run: RunData, manifest: Any) -> dict[str, str]:
    """The run's model names -> the cache's (the same, or published with the home folder as ``~``)."""
    found = {}
    for name in run.models_used:
        match = next((c for c in manifest.model_names if _same_model(name, c)), None)
        if match is not None:
            found[name] = match
    return found


def cache_mismatch(run: RunData, manifest: Any) -> tuple[str | None, str | None]:
    """How a cache differs from the one ``run`` trained on: (why it cannot be read for this run: a model
    or hook the run uses is missing, another width, another normalization; None if it can be, and a
    note on what else differs: other shards or rows, another storage dtype; None if nothing).
    Runs that recorded less (older versions) are checked on less."""
    rec = run.info.get("cache", {})
    hard, soft = [], []
    names = cache_model_names(run, manifest)
    missing = [m for m in run.models_used if m not in names]
    if missing:
        hard.append(f"no model {missing} of the run's (it holds {manifest.model_names})")
    hooks = [h for h in run.hooks_used if h not in manifest.hooks]
    if hooks:
        hard.append(f"no hook {hooks} of the run's (it holds {list(manifest.hooks)})")
    if run.info.get("d_model") is not None and int(run.info["d_model"]) != manifest.d_model:
        hard.append(f"d_model {manifest.d_model}, the run's {run.info['d_model']}")
    method = manifest.normalization.get("method")
    if rec.get("normalization") and rec["normalization"] != method:
        hard.append(f"normalization {method}, the run's {rec['normalization']}")
    elif not hard:
        hard += _scale_mismatch(run, manifest, names)
    if rec.get("shards_sha256") and rec["shards_sha256"] != manifest.shards_fingerprint:
        soft.append(f"other shards ({manifest.n_rows:,} rows; the run's cache had {int(rec.get('n_rows', 0)):,}): "
                    "another harvest of the same models and hooks")
    elif rec.get("n_rows") is not None and int(rec["n_rows"]) != manifest.n_rows:
        soft.append(f"{manifest.n_rows:,} rows, the run trained on a cache of {int(rec['n_rows']):,}")
    if rec.get("dtype") and rec["dtype"] != manifest.dtype:
        soft.append(f"dtype {manifest.dtype}, the run's {rec['dtype']}")
    return ("; ".join(hard) or None), ("; ".join(soft) or None)


def _scale_mismatch(run: RunData, manifest: Any, names: dict[str, str]) -> list[str]:
    """The used (model, hook) slots whose normalization differs from the run's cache's: its inputs would
    be scaled otherwise than in training (checked where the run recorded it)."""
    rec = run.info.get("cache", {})
    rec_models = [m.get("name") for m in rec.get("models", [])]
    rec_hooks = list(rec.get("hooks", []))
    scale = rec.get("normalization_scale")
    if scale is not None and rec_models and rec_hooks:
        cache_scale = manifest.normalization.get("scale")
        for m in run.models_used:
            for h in run.hooks_used:
                if m not in rec_models or h not in rec_hooks or cache_scale is None:
                    continue
                then = scale[rec_models.index(m)][rec_hooks.index(h)]
                now = cache_scale[manifest.model_names.index(names[m])][list(manifest.hooks).index(h)]
                if then != now:
                    return [f"normalization scale {now:.6g} for {m}/{h}, the run's {then:.6g} (another harvest)"]
    side = rec.get("normalization_sha256")
    if side and manifest.normalization.get("sha256") not in (None, side) and rec_hooks == list(manifest.hooks) \
            and len(rec_models) == len(manifest.model_names):
        return ["another normalization.safetensors (mean/std) than the run's cache"]
    return []


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
