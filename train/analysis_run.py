"""The finished run an analysis reads (:class:`RunData`, :func:`load_run`), the caches it can be read on
(:func:`cache_mismatch`: the run's models and hooks, normalized as in training; :func:`run_slots`: its
slots there, laid out as in training) and its model-diffing roles (:class:`DiffSpec`, :func:`diff_spec`:
which output slots are the base and which the fine-tune model).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DiffSpec", "RunData", "RunError", "cache_mismatch", "cache_model_names", "check_cache",
           "diff_spec", "load_run", "open_run_cache", "run_slots"]


# ---- the run ---------------------------------------------------------------------------------------
def still_training(run_dir: Path, lacks: str, command: str) -> None:
    """Raise :class:`~shared.folder_lock.FolderBusyError` (exit 75, try again later, not 2) when the run
    folder that ``lacks`` its output is locked by the training that will write it."""
    from shared.folder_lock import FolderBusyError, holder_summary

    holder = holder_summary(run_dir)
    if holder is not None:
        raise FolderBusyError(f"{run_dir} is still training (its folder is locked by {holder}): it has no {lacks} "
                              f"until the run finishes; wait for it to finish, then run {command} again")


class RunError(ValueError):
    """The folder is not a finished training run (no config.json or no dictionary/), or a cache cannot
    be read for it."""


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
    """Whether a cache's model name is the run's: the same, or one of them as ``push`` publishes the other
    from this machine (a path under this machine's home folder written ``~/...``): a run trained on a local
    cache read from its ``hf://`` copy, or a run trained from ``hf://`` read from the local original."""
    from shared.redact import MachineNames, redact_text

    if run_name == cache_name:
        return True
    here = MachineNames.here()
    return redact_text(run_name, here) == cache_name or redact_text(cache_name, here) == run_name


def _same_rows(run: RunData, manifest: Any) -> bool:
    """Whether ``manifest`` lists the very shards the run trained on (same bytes, hence the same models
    and hooks in the same order, whatever the models are called in it)."""
    rec = run.info.get("cache", {})
    rec_models = [m.get("name") for m in rec.get("models", [])]
    return (bool(rec.get("shards_sha256")) and rec["shards_sha256"] == manifest.shards_fingerprint
            and len(rec_models) == len(manifest.model_names) and list(rec.get("hooks", [])) == list(manifest.hooks))


def cache_model_names(run: RunData, manifest: Any) -> dict[str, str]:
    """The run's model names -> the cache's. For the cache the run trained on (the same shards, say its
    ``hf://`` copy pushed from another machine, where a home folder reads ``~/...``), by position in the
    cache the run recorded; otherwise by name (the same, or published with this machine's home as ``~``)."""
    if _same_rows(run, manifest):
        rec_models = [m.get("name") for m in run.info["cache"]["models"]]
        return {m: manifest.model_names[rec_models.index(m)] for m in run.models_used if m in rec_models}
    found = {}
    for name in run.models_used:
        match = next((c for c in manifest.model_names if _same_model(name, c)), None)
        if match is not None:
            found[name] = match
    return found


def run_slots(run: RunData, manifest: Any, cache_dir: str = "") -> Any:
    """The slots of a cache that the run's dictionary reads, laid out as in training
    (:class:`train.slots.SlotSpec`): the run's own models (as the cache names them) and hooks, in the
    run's order, whatever order the cache holds them in and whatever else it holds. Raises
    :class:`RunError` if they do not come out as the slots the run recorded."""
    from train.slots import SlotError, resolve_slots

    tc = run.info["config"]
    names = cache_model_names(run, manifest)
    try:
        spec = resolve_slots(manifest, arch=tc["arch"], models=[names.get(m, m) for m in run.models_used],
                             hooks=run.hooks_used, in_hooks=tc.get("in_hooks"), out_hooks=tc.get("out_hooks"),
                             cache_dir=cache_dir)
    except SlotError as e:
        raise RunError(f"cache {cache_dir} cannot be read for run {run.run_dir}: {e}") from None
    back = {c: r for r, c in names.items()}
    got = ([f"{back.get(m, m)}/{h}" for m in spec.models for h in spec.hooks], spec.in_slots, spec.out_slots)
    cfg = run.model.cfg if run.model is not None else None
    want = ([f"{m}/{h}" for m, h in run.slot_pairs],
            list(run.info.get("in_slots", cfg.in_slots if cfg else [])),
            list(run.info.get("out_slots", cfg.out_slots if cfg else [])))
    if got != want:
        raise RunError(f"cache {cache_dir} gives run {run.run_dir} the slots {got[0]} (in {got[1]}, out {got[2]}), "
                       f"not the ones it trained on: {want[0]} (in {want[1]}, out {want[2]})")
    return spec


def cache_mismatch(run: RunData, manifest: Any, cache_dir: str | Path | None = None
                   ) -> tuple[str | None, str | None]:
    """How a cache differs from the one ``run`` trained on: (why it cannot be read for this run: a model
    or hook the run uses is missing, another width, another normalization of the run's slots; None if it
    can be, and a note on what else differs: other shards or rows, another storage dtype, a mean/std that
    could not be compared; None if nothing). Runs that recorded less (older versions) are checked on less.
    ``cache_dir`` (the cache's folder) is where a ``mean_std`` cache keeps its mean and std; without it
    they are compared only as far as the manifest tells (:func:`check_cache` compares them in full)."""
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
        other, note = _normalization_mismatch(run, manifest, names, cache_dir)
        hard += other
        soft += note
    if rec.get("shards_sha256") and rec["shards_sha256"] != manifest.shards_fingerprint:
        soft.append(f"other shards ({manifest.n_rows:,} rows; the run's cache had {int(rec.get('n_rows', 0)):,}): "
                    "another harvest of the same models and hooks")
    elif rec.get("n_rows") is not None and int(rec["n_rows"]) != manifest.n_rows:
        soft.append(f"{manifest.n_rows:,} rows, the run trained on a cache of {int(rec['n_rows']):,}")
    if rec.get("dtype") and rec["dtype"] != manifest.dtype:
        soft.append(f"dtype {manifest.dtype}, the run's {rec['dtype']}")
    return ("; ".join(hard) or None), ("; ".join(soft) or None)


def check_cache(run: RunData, cache: Any) -> None:
    """Raise :class:`RunError` unless the opened ``cache`` can be read for ``run`` (:func:`cache_mismatch`
    with the cache's folder, so a ``mean_std`` cache's mean and std are compared too)."""
    other, _ = cache_mismatch(run, cache.manifest, cache.dir)
    if other:
        raise RunError(f"{cache.dir} is not the cache run {run.run_dir} was trained on: it has {other}")


def _normalization_mismatch(run: RunData, manifest: Any, names: dict[str, str], cache_dir: str | Path | None
                            ) -> tuple[list[str], list[str]]:
    """(Why the run's slots are normalized otherwise in this cache than in the run's: its inputs would be
    scaled otherwise than in training; a note where that could not be checked). Runs record the scale of
    every slot of their cache and a digest of their own slots' normalization (:meth:`~shared.normalization.Normalization.slots_sha256`:
    mean and std included); older runs only the side file's sha256, comparable when the cache's layout is
    the recorded one."""
    from shared.cache_format import CacheError
    from shared.normalization import Normalization

    rec = run.info.get("cache", {})
    rec_models = [m.get("name") for m in rec.get("models", [])]
    rec_hooks = list(rec.get("hooks", []))
    scale = rec.get("normalization_scale")
    cache_scale = manifest.normalization.get("scale")
    if scale is not None and rec_models and rec_hooks and cache_scale is not None:
        for m, h in run.slot_pairs:  # the slot that differs is named
            if m in rec_models and h in rec_hooks and m in names and h in manifest.hooks:
                then = scale[rec_models.index(m)][rec_hooks.index(h)]
                now = cache_scale[manifest.model_names.index(names[m])][list(manifest.hooks).index(h)]
                if then != now:
                    return [f"normalization scale {now:.6g} for {m}/{h}, the run's {then:.6g} (another harvest)"], []
    method = manifest.normalization.get("method")
    if _same_rows(run, manifest):  # the very rows the run trained on, normalized as they were
        return [], []
    digest = rec.get("normalization_slots_sha256")
    if digest:
        if method == "mean_std" and cache_dir is None:
            return [], []  # its mean and std are in the side file: check_cache compares them
        try:
            norm = Normalization.from_manifest(cache_dir if cache_dir is not None else ".", manifest.normalization)
        except CacheError as e:
            return [f"a normalization that cannot be read ({e})"], []
        if norm.slots_sha256(manifest.model_names, list(manifest.hooks),
                             [(names[m], h) for m, h in run.slot_pairs]) != digest:
            what = "mean/std (normalization.safetensors)" if method == "mean_std" else "scale"
            return [f"another normalization {what} of the run's slots than the run's cache (another harvest)"], []
        return [], []
    if method != "mean_std":
        return [], []
    side, now = rec.get("normalization_sha256"), manifest.normalization.get("sha256")
    same_layout = (len(rec_models) == len(manifest.model_names) and rec_hooks == list(manifest.hooks)
                   and all(_same_model(r, c) for r, c in zip(rec_models, manifest.model_names)))
    if side and now and same_layout:
        return ([] if side == now else ["another normalization.safetensors (mean/std) than the run's cache"]), []
    return [], [("its mean and std (normalization.safetensors) could not be compared with those the run trained "
                 "with: the run recorded only its cache's whole side file (it was trained by an older crosscache), and "
                 "this cache holds other models or hooks, or another order. If it is another harvest, the "
                 "dictionary's inputs are scaled otherwise than in training and the numbers below are off")]


def load_run(run_dir: str | Path, command: str = "analyze") -> RunData:
    """Read ``config.json`` and ``dictionary/`` of a run (raises :class:`RunError` naming what is missing, or
    :class:`~shared.folder_lock.FolderBusyError` while it is still training; ``command`` is the one to retry)."""
    from train.export import EXPORT_FORMAT, load_dictionary

    if str(run_dir).startswith("hf://"):  # Path() would fold it into "hf:/..." and say it is no run
        raise RunError(f"{run_dir}: {command} reads a run folder on this machine (its config.json, dictionary/ and "
                       "cache), not a dictionary on the Hub; export-saelens, export-circuit-tracer and "
                       "train.export.load_dictionary read hf:// dictionaries")
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise RunError(f"{run_dir} is not a training run: no config.json (train one with run_train.py --out DIR)")
    info = json.loads((run_dir / "config.json").read_text())
    if isinstance(info, dict) and info.get("format") == EXPORT_FORMAT:  # a run's export/ or dictionary/
        parent = run_dir.resolve().parent
        where = (f"pass the run folder that holds it: {parent}" if (parent / "config.json").is_file()
                 else "pass the folder of the run that trained it (its --out)")
        raise RunError(f"{run_dir} is a saved dictionary ({EXPORT_FORMAT}), not a run folder: analyze reads a run's "
                       f"config.json (its cache, slots and eval split) and its dictionary/; {where}")
    if not (run_dir / "dictionary" / "config.json").is_file():
        still_training(run_dir, "dictionary/", command)
        raise RunError(f"{run_dir} has no dictionary/ yet: the run has not finished; re-run its run_train.py "
                       "command to resume and export it")
    model = load_dictionary(run_dir / "dictionary").eval()
    names = [model.cfg.slot_names[s] for s in model.cfg.out_slots]
    return RunData(run_dir, info, model, names)


def open_run_cache(run: RunData, given: str | None, notes: list[str]) -> tuple[Any, Any] | None:
    """The run's cache and its token table: ``given`` (``--cache``; an error if it cannot be opened or
    is another cache), else the first of :meth:`RunData.cache_candidates` that opens and matches. None,
    with a note, when none does: the report then comes from the weights alone."""
    from shared.cache import open_cache
    from shared.cache_format import CacheError

    problems: list[str] = []
    for where in [given] if given else run.cache_candidates():
        try:
            # A run trained on the first N shards of a Hub cache reads the same view (its eval split).
            cache = open_cache(where, max_shards=run.max_shards if where.startswith("hf://") else None)
            tokens = cache.token_table()
        except (CacheError, OSError, ValueError) as e:  # gone, moved, incomplete, corrupt
            if given:
                raise RunError(f"--cache {given} cannot be opened ({type(e).__name__}: {e})") from e
            problems.append(f"{where} cannot be opened ({type(e).__name__}: {e})")
            continue
        other, differs = cache_mismatch(run, cache.manifest, cache.dir)  # the dir: a mean_std cache's mean/std
        if other:
            if given:
                raise RunError(f"--cache {given} is not the cache run {run.run_dir} was trained on: it has {other}")
            problems.append(f"{where} holds another cache now ({other})")
            continue
        if differs:
            notes.append(f"the cache read ({where}) differs from the one the run trained on: {differs}")
        run.cache_used = where
        return cache, tokens
    notes.append(f"the run's cache was not found: {'; '.join(problems)}. Sections that need activations (firing, "
                 "top contexts, metadata, latent scaling) are skipped and everything below comes from the weights "
                 "alone; pass --cache DIR (or hf://USER/NAME) to say where the cache is now")
    return None


@dataclass
class DiffSpec:
    """Which output slots (Xo indices, same hook order) are the base and the fine-tune model."""

    base: str
    ft: str
    base_slots: list[int]
    ft_slots: list[int]


def diff_spec(run: RunData, base: str | None = None, ft: str | None = None) -> tuple[DiffSpec | None, str]:
    """The diffing roles of a run and a note for the report (``""`` if none), or ``(None, why not)``.

    Defaults: the first and second model of the slots; with only one of ``base`` / ``ft`` given, the other
    is the first other model. A crosscoder of three or more models is diffed on that pair; the note names
    the models left out."""
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
    others = [m for m in models if m not in (base, ft)]
    note = (f"this crosscoder reads {len(models)} models {models}: the diffing sections compare {ft} (fine-tune) "
            f"with {base} (base) and leave out {others}; --base-model / --ft-model choose another pair"
            if others else "")
    return DiffSpec(base, ft, b, f), note
