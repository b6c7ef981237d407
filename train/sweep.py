"""Sweep files: many dictionaries trained from one loader stream.

A sweep file (YAML or JSON) holds ``members:`` (a list of config overrides) and/or ``grid:``
(a mapping of config field -> list of values, crossed). With both, every member is crossed
with the grid. Each member may set ``name`` (its run folder under the sweep's ``--out``: one
plain folder name, a string without ``/``, not ``..``, at most 200 bytes); otherwise the name is
built from its overrides. A named member crossed with a grid of several points gets one folder
per point, ``<name>_<the point's overrides>``. Everything else comes from the base config (the
command line). A grid value that is not a list is a list of one. Refused before anything is
written: a file that defines no member, and two members that are the same configuration once
the command line's values are filled in (``{}`` and ``{lr: <the base lr>}``); defaults that need the
cache (``k_aux``, ``eval_shards``) are compared once it is open (:func:`check_distinct_members`). Example::

    grid:
      activation: [relu, batchtopk]
      latents: [2048, 4096]
    members:
      - {}
      - {lr: 3.0e-4, name: slow}   # slow_activation-relu_latents-2048, ...
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shared.config import field_keys, load_config_file
from train.config import TrainConfig
from train.dictionary import resolve_dec_init_norm, resolve_k_aux
from train.loader import default_eval_shards

__all__ = ["expand_sweep", "member_name", "first_duplicate", "check_distinct_members"]


_NAME_MAX = 120  # characters of a generated name, its digest included


def member_name(overrides: dict[str, Any]) -> str:
    """A folder name from overrides, e.g. ``activation-batchtopk_k-32``.

    Characters other than ``[A-Za-z0-9._=+-]`` become ``-`` (``models-EleutherAI-pythia-70m``). A name longer
    than 120 characters (a grid over many fields) is cut and ends in a digest of the overrides, so points that
    differ only after the cut still get folders of their own."""
    if not overrides:
        return "base"
    parts = [f"{k}-{'-'.join(map(str, v)) if isinstance(v, (list, tuple)) else v}" for k, v in overrides.items()]
    name = re.sub(r"[^A-Za-z0-9._=+-]+", "-", "_".join(parts))
    if len(name) <= _NAME_MAX:
        return name
    digest = hashlib.sha256(json.dumps(overrides, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{name[: _NAME_MAX - 9]}-{digest}"


def _check_name(path: str | Path, name: Any) -> None:
    """Refuse a member ``name`` that is not one plain folder name: it becomes ``<--out>/<name>``, so
    an absolute path, ``..`` or a separator would train the member outside the sweep's folder."""
    if (not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name
            or Path(name).is_absolute() or len(name.encode()) > 200):
        hint = "" if isinstance(name, str) else f" (quote it in YAML: name: '{name}')"
        raise ValueError(f"sweep file {path}: member name {name!r} must be a plain folder name under --out (a "
                         f"non-empty string of at most 200 bytes, not '.' or '..', without '/' or '\\'){hint}")


def expand_sweep(path: str | Path, base: TrainConfig | Mapping[str, Any]) -> list[TrainConfig]:
    """The member configs of a sweep file, each with ``out = <base.out>/<name>``.

    ``base``: the shared config, or its field values unchecked (what the command line gives). Only each
    member, once its overrides are applied, must be a valid config: ``--activation batchtopk`` with a
    grid over ``k``, or ``--arch directional`` with each member's hooks, is a sweep, not an error."""
    if isinstance(base, TrainConfig):
        base = {f.name: getattr(base, f.name) for f in dataclasses.fields(TrainConfig)}
    base = dict(base)
    base_out = base.get("out", TrainConfig.__dataclass_fields__["out"].default)
    try:
        spec = load_config_file(path)
    except ValueError as e:  # said of a config file: this one is a sweep file
        raise ValueError(str(e).replace(f"config file {path}", f"sweep file {path}", 1)) from None
    unknown = set(spec) - {"members", "grid"}
    if unknown:
        raise ValueError(f"sweep file {path}: unknown top-level key(s) {sorted(unknown)}; use 'members' and/or 'grid'")
    if not spec.get("members") and not spec.get("grid"):  # an empty file, members: [], grid: {}
        raise ValueError(f"sweep file {path} defines no member: give 'members:' (a list of config overrides, "
                         "{} for the command line's config as it is) and/or 'grid:' (field: [values, ...])")
    members = spec.get("members") or [{}]
    grid = spec.get("grid") or {}
    if not isinstance(members, list) or not all(isinstance(m, dict) for m in members):
        raise ValueError(f"sweep file {path}: 'members' must be a list of mappings of config overrides")
    if not isinstance(grid, dict):
        raise ValueError(f"sweep file {path}: 'grid' must map config fields to lists of values")
    grid = field_keys(grid, f"sweep file {path}: grid")  # YAML may spell fields as CLI flags
    for k, v in grid.items():
        if not isinstance(v, list):
            grid[k] = [v]  # a lone value is a list of one, as everywhere in configs
        elif not v:
            raise ValueError(f"sweep file {path}: grid field {k!r} has no values; give it a list of one or more")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    configs, names = [], []
    points = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())] if grid else [{}]
    for member in members:
        for point in points:
            overrides = {**field_keys(member, f"sweep file {path}: a member"), **point}
            given = overrides.pop("name", None)
            if given is not None:
                _check_name(path, given)
            if given is not None and len(points) > 1:  # one folder per grid point, not one name for all of them
                name = f"{given}_{member_name(point)}"
            else:
                name = member_name(overrides) if given is None else given
            _check_name(path, name)  # generated names too (member_name keeps only [A-Za-z0-9._=+-])
            bad = sorted(set(overrides) - fields)
            if bad:
                raise ValueError(f"sweep file {path}: unknown config field(s) {bad} in member {name!r}")
            if "out" in overrides or "cache" in overrides:
                raise ValueError(f"sweep file {path}: members share the base --cache and live under --out; "
                                 f"remove 'out'/'cache' from member {name!r}")
            try:
                configs.append(TrainConfig(**{**base, **overrides, "out": str(Path(base_out) / name)}))
            except ValueError as e:
                hint = ""
                if "--sparsity-coeff is only used by" in str(e) and "sparsity_coeff" not in overrides:
                    # The λ came from the shared flags: say how to keep it for the other members.
                    hint = (f"; the shared --sparsity-coeff {base.get('sparsity_coeff')} does not apply to this member: "
                            "set sparsity_coeff: null in it, or give λ only to the relu/jumprelu members")
                raise ValueError(f"sweep member {name!r}: {e}{hint}") from None
            names.append(name)
    # The same dictionary twice (`{}` and `{lr: <the base lr>}`, or `lr: [1e-3, 0.001]`): trained twice for nothing.
    # Defaults that need the cache (k_aux, eval_shards) are compared once it is open: check_distinct_members.
    if (same := first_duplicate(configs, names)) is not None:
        raise ValueError(f"sweep file {path}: members {same[0]!r} and {same[1]!r} are the same configuration once "
                         "the command line's values are filled in; remove one (or change what they sweep)")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"sweep file {path}: members share the name(s) {dupes}; give them distinct 'name' keys")
    return configs


def _dictionary_key(cfg: TrainConfig, d_model: int | None, n_shards: int | None) -> str:
    """Every field but ``out``, with defaults resolved as a resume resolves them (train.run_dir), so a
    default given by value is the same dictionary. ``k_aux`` and ``eval_shards`` resolve only with the
    cache's ``d_model`` and shard count; without them they are compared as given."""
    fields_now = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "out"}
    fields_now.update(sparsity_coeff=cfg.resolved_sparsity_coeff, dead_tokens=cfg.resolved_dead_tokens(1),
                      dec_init_norm=resolve_dec_init_norm(cfg.dec_init_norm, cfg.activation))
    if d_model is not None:
        fields_now["k_aux"] = resolve_k_aux(cfg.k_aux, d_model)
    if n_shards is not None and cfg.eval_shards is None:
        fields_now["eval_shards"] = default_eval_shards(n_shards)
    return json.dumps(fields_now, sort_keys=True, default=str)


def first_duplicate(cfgs: list[TrainConfig], names: list[str], d_model: int | None = None,
                    n_shards: int | None = None) -> tuple[str, str] | None:
    """The names of the first two members that train the same dictionary, or None."""
    seen: dict[str, str] = {}
    for name, cfg in zip(names, cfgs):
        key = _dictionary_key(cfg, d_model, n_shards)
        if key in seen:
            return seen[key], name
        seen[key] = name
    return None


def check_distinct_members(cfgs: list[TrainConfig], d_model: int, n_shards: int) -> None:
    """Refuse, once the cache is open, two sweep members that differ only by a default given by value
    that needs the cache (``k_aux: <d_model // 2>``, ``eval_shards: <the default for its shard count>``)."""
    same = first_duplicate(cfgs, [Path(c.out).name for c in cfgs], d_model, n_shards)
    if same is not None:
        raise ValueError(
            f"sweep members {same[0]!r} and {same[1]!r} are the same configuration once the defaults are filled in "
            f"for this cache (d_model {d_model}, so k_aux {resolve_k_aux(None, d_model)}; {n_shards} shard(s), so "
            f"eval_shards {default_eval_shards(n_shards)}); remove one (or change what they sweep)")
