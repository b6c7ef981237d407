"""Export a trained CLT or a set of per-layer transcoders to circuit-tracer's folder format.

circuit-tracer (decoderesearch/circuit-tracer; PyPI ``circuit-tracer`` 0.5.0 read for this module)
builds attribution graphs from a *replacement model*: at every layer ``l`` of the model it reads
``blocks.{l}.<feature_input_hook>``, encodes it with that layer's transcoder and replaces
``blocks.{l}.<feature_output_hook>`` (the MLP's output) with the decoded features plus an error
term. Its loaders take a folder holding ``config.yaml`` and safetensors files:

- ``model_kind: transcoder_set``: ``layer_{l}.safetensors`` per layer with ``W_enc`` [F, D],
  ``W_dec`` [F, D], ``b_enc`` [F], ``b_dec`` [D], optional ``activation_function.threshold`` [F]
  (JumpReLU; absent: ReLU) and ``W_skip`` [D, D] (skip = ``x @ W_skip.T``);
  ``acts = act(x @ W_enc.T + b_enc)``, ``out = acts @ W_dec + b_dec (+ skip)``.
- ``model_kind: cross_layer_transcoder``: ``W_enc_{l}.safetensors`` holding ``W_enc_{l}`` [F, D],
  ``b_enc_{l}`` [F], ``b_dec_{l}`` [D], optional ``threshold_{l}`` [F], and ``W_dec_{l}.safetensors``
  holding ``W_dec_{l}`` [F, n_layers − l, D]: layer l's features write to layers l..n−1, and
  ``out[t] = Σ_{l ≤ t} acts_l @ W_dec_l[:, t − l] + b_dec_t``.

Mapping from our raw-space export (``train.export``; normalization already folded in):

| ours | circuit-tracer |
|---|---|
| clt ``W_enc_XiDL[l]`` [D, F] | ``W_enc_{l}`` = its transpose [F, D] |
| clt ``b_enc_L[l·F:(l+1)·F]`` | ``b_enc_{l}`` |
| clt ``b_dec_XoD[l]`` | ``b_dec_{l}`` |
| clt ``W_dec_XiLXoD[l, :, l:]`` (the causal mask's nonzero part) | ``W_dec_{l}`` [F, n − l, D] |
| directional (1 in, 1 out) ``W_enc_XiDL[0]`` / ``W_dec_LXoD[:, 0]`` | ``layer_{l}``: ``W_enc`` (transposed) / ``W_dec`` |
| directional ``b_enc_L`` / ``b_dec_XoD[0]`` | ``b_enc`` / ``b_dec`` |
| directional ``W_skip_XiDXoD[0, :, 0]`` [D_in, D_out] | ``W_skip`` = its transpose [D_out, D_in] |
| jumprelu ``exp(log_threshold_L)`` | ``activation_function.threshold`` / ``threshold_{l}`` |
| batchtopk, inference threshold θ on ``relu(pre)·w`` | JumpReLU threshold ``θ / w`` (``w = 0``: +inf) |

Why batchtopk becomes JumpReLU exactly: at inference a latent is kept iff ``relu(pre)·w > θ``
with ``w > 0`` its ranking weight (summed decoder norm × ``score_scale`` for ``topk_score =
pre_x_dec_norm``, ``score_scale`` for ``pre``) and θ ≥ 0, i.e. iff ``pre > θ / w``, and then its
value is ``pre``: a JumpReLU whose threshold absorbs the decoder-norm score, weights untouched, so
latent values equal ours (up to rounding at the threshold itself).

A source may be a dictionary ``run_train.py push`` put on the Hub (``hf://USER/NAME[@REV]``, fetched by
:mod:`train.hub_dictionary_fetch`). A push uploads the export (``config.json``, ``model.safetensors``),
a card, curves and the analysis report, but not the run's ``config.json``: the harvested model's layer
count, revision and parallel-attention flag come from the export's ``metadata.harvest`` (the cache
manifest's entries for the dictionary's models), as they do for an ``export/`` folder copied away
from its run. An export from before that was recorded needs ``n_layers`` (``--n-layers``), the
revision is then read from a Hub id's ``@REV``; a model folder's name calls for ``--model-name``.
``config.yaml`` records the spec and the commit the files came from.

Refused, each with the reason and the command that gives a convertible run: crosscoders;
``topk`` (no circuit-tracer loader builds a TopK activation, and its TopK neither applies ReLU
nor uses our decoder-norm score); a CLT with ``--skip`` (``load_clt`` never reads skip weights);
runs that do not cover every layer 0..n−1 of the model (the replacement model encodes at every
layer); hooks that are not an MLP input → MLP output pair of the same layer, with one hook name
for all layers; ``ln2.hook_normalized`` (transformer-lens 4, which harvests, fires it before ln2's
weight and bias; circuit-tracer accepts transformer-lens >= 2.16, and 2.x's ``HookedTransformer``
fires it after them on LayerNorm models, 3.x before: its meaning would depend on the install);
``hook_mlp_in`` / ``hook_resid_mid`` on a parallel-residual model (GPT-NeoX/Pythia, GPT-J,
Phi), whose ``HookedTransformer`` blocks never fire ``hook_resid_mid``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from einops import rearrange
from safetensors.torch import save as safetensors_save

import shared
from shared.hub_spec import HubError, is_hub_spec
from shared.redact import redact_machine
from shared.shard_io import atomic_write_bytes, fsync_dir
from train.dictionary import Dictionary
from train.export import (CONFIG_NAME, load_dictionary, load_hub_dictionary, load_metadata, names_local_path,
                          parallel_attn_mlp)

__all__ = ["CT_EXPORT_FORMAT", "CircuitTracerExportError", "export_circuit_tracer", "export_circuit_tracer_cli"]

CT_EXPORT_FORMAT = "crosscache.circuit_tracer/1"
CT_CONFIG = "config.yaml"

# Our (transformer-lens 4) hook suffix -> the name circuit-tracer's HookedTransformer backend taps.
# ln2.hook_out is the MLP's exact input: circuit-tracer wraps every block's MLP and fires mlp.hook_in
# on that input. hook_mlp_in (TL4: the residual before ln2) is HookedTransformer's hook_resid_mid.
INPUT_HOOKS = {"ln2.hook_out": "mlp.hook_in", "mlp.hook_in": "mlp.hook_in",
               "hook_mlp_in": "hook_resid_mid", "hook_resid_mid": "hook_resid_mid"}
# hook_mlp_out is after the post-MLP norm on Gemma-2/3 in both transformer-lens generations;
# mlp.hook_out is the MLP's own output (circuit-tracer's wrapper fires it before that norm).
OUTPUT_HOOKS = {"hook_mlp_out": "hook_mlp_out", "mlp.hook_out": "mlp.hook_out"}
_HOOK = re.compile(r"blocks\.(\d+)\.(.+)$")


class CircuitTracerExportError(ValueError):
    """The run cannot be written in circuit-tracer's format exactly; the message says why and what would."""


@dataclass
class _Source:
    """One trained dictionary: its raw-space export, where it came from, and what its run folder says of its cache."""

    key: str
    """The export folder, or the ``hf://`` spec as given: one dictionary each."""
    where: str
    """What messages and ``config.yaml`` call it: the run folder (the export's parent), or the ``hf://`` spec."""
    model: Dictionary
    metadata: dict[str, Any]
    cache_info: dict[str, Any] | None
    """The run config.json's "cache" (models with n_layers, spec), else the export's metadata.harvest; None: neither."""
    hub_commit: str | None = None
    """The Hub commit an ``hf://`` dictionary's files came from (None: a local folder)."""

    @property
    def on_hub(self) -> bool:
        return is_hub_spec(self.key)


# ---- reading runs ---------------------------------------------------------------------------------
def _is_export(path: Path) -> bool:
    """Whether ``path`` is a folder :func:`train.export.save_dictionary` wrote (not a run folder)."""
    if not (path / CONFIG_NAME).is_file():
        return False
    try:
        return str(json.loads((path / CONFIG_NAME).read_text()).get("format", "")).startswith("crosscache.dictionary/")
    except (json.JSONDecodeError, AttributeError):
        return False


def _expand(path: Path) -> list[Path]:
    """Export folders of ``path``: a run folder, its export/, or a sweep folder of runs."""
    if not path.is_dir():
        raise CircuitTracerExportError(f"{path}: no such folder (pass a run folder, its export/, or a sweep folder)")
    if _is_export(path):
        return [path]
    if (path / "export").is_dir():
        return [path / "export"]
    if (path / CONFIG_NAME).is_file() or (path / "checkpoints").is_dir():
        raise CircuitTracerExportError(f"{path} has no export/ yet: training has not finished (re-run the same "
                                       "run_train.py command to finish it)")
    members = sorted(p / "export" for p in path.iterdir() if (p / "export").is_dir())
    if not members:
        raise CircuitTracerExportError(f"{path} is not a run folder (no export/), nor a sweep folder of runs")
    return members


def _load_source(export_dir: Path) -> _Source:
    meta = load_metadata(export_dir)
    if meta.get("space") != "raw":
        raise CircuitTracerExportError(
            f"{export_dir} holds the dictionary on normalized activations; circuit-tracer feeds raw ones. Pass the "
            f"run folder ({export_dir.parent}) or its export/, where the normalization is folded in")
    run_cfg = export_dir.parent / CONFIG_NAME
    cache_info = None
    if run_cfg.is_file():
        cache_info = json.loads(run_cfg.read_text()).get("cache")
    if cache_info is None:  # an export/ copied away from its run: what the export recorded of the harvest
        cache_info = _recorded_harvest(meta)
    return _Source(str(export_dir), str(export_dir.parent), load_dictionary(export_dir), meta, cache_info)


def _recorded_harvest(meta: dict[str, Any]) -> dict[str, Any] | None:
    """The export's ``metadata.harvest`` (its models' depth, revision, ...), else None (older exports)."""
    recorded = meta.get("harvest")
    return recorded if isinstance(recorded, dict) and isinstance(recorded.get("models"), list) else None


def _load_hub_source(spec: str) -> _Source:
    """A dictionary ``run_train.py push`` put on the Hub: its ``config.json`` and weights (downloaded, checked).

    A push uploads the export, a card, curves and the analysis report, never the run's ``config.json``: the
    model's depth and revision come from the export's ``metadata.harvest``; a dictionary exported before it was
    recorded has none, and ``n_layers`` / ``model_name`` then supply them.
    """
    model, fetched = load_hub_dictionary(spec)
    meta = dict(fetched.config.get("metadata") or {})
    if meta.get("space") != "raw":
        raise CircuitTracerExportError(f"{spec} holds a dictionary on normalized activations; circuit-tracer feeds "
                                       "raw ones: push the run (or its export/), where the normalization is folded in")
    return _Source(spec, spec, model, meta, _recorded_harvest(meta), fetched.commit)


def _sources(run: str | Path) -> list[_Source]:
    """The dictionaries ``run`` names: ``hf://USER/NAME[@REV]`` (one: a repo holds one), or a folder's (see _expand)."""
    if is_hub_spec(run):
        return [_load_hub_source(str(run))]
    return [_load_source(e) for e in _expand(Path(run))]


def _split_slot(name: str) -> tuple[str, int, str]:
    """'model/blocks.L.suffix' -> (model, L, suffix); hooks outside blocks get layer -1."""
    model, hook = name.rsplit("/", 1)
    m = _HOOK.match(hook)
    return (model, int(m.group(1)), m.group(2)) if m else (model, -1, hook)


def _model_entry(src: _Source, model: str) -> dict[str, Any] | None:
    for entry in (src.cache_info or {}).get("models", []):
        if entry.get("name") == model:
            return dict(entry)
    return None


# ---- checks with the fix ------------------------------------------------------------------------
def _commands(model: str, n: int, in_sfx: str, out_sfx: str) -> str:
    last = n - 1
    ins = f"blocks.{{0..{last}}}.{in_sfx}"
    outs = f"blocks.{{0..{last}}}.{out_sfx}"
    return (f"harvest every layer (bash expands the braces): python run_harvest.py --models {model} --hooks {ins} "
            f"{outs} --out CACHE; then either python run_train.py --cache CACHE --arch clt --models {model} "
            f"--in-hooks {ins} --out-hooks {outs} --out RUN, or one transcoder per layer: for L in $(seq 0 {last}); "
            f"do python run_train.py --cache CACHE --arch directional --models {model} --in-hooks blocks.$L.{in_sfx} "
            f"--out-hooks blocks.$L.{out_sfx} --out RUNS/layer$L; done")


def _hook_pair(in_sfx: str, out_sfx: str, where: str, model: str, n: int, parallel: bool) -> tuple[str, str]:
    good_in = "ln2.hook_out"
    fix = _commands(model, n, good_in, out_sfx if out_sfx in OUTPUT_HOOKS else "hook_mlp_out")
    if in_sfx == "ln2.hook_normalized":
        raise CircuitTracerExportError(
            f"{where}: input hook ln2.hook_normalized is ln2's input normalized before its weight and bias in "
            "transformer-lens 4 (the harvest), but circuit-tracer runs transformer-lens >= 2.16, whose 2.x "
            "HookedTransformer fires ln2.hook_normalized after them on LayerNorm models (3.x before): what the "
            "transcoder reads would depend on the install. Use the MLP's exact input, blocks.L.ln2.hook_out "
            f"(circuit-tracer's mlp.hook_in, the same in every version): {fix}")
    if in_sfx not in INPUT_HOOKS or out_sfx not in OUTPUT_HOOKS:
        raise CircuitTracerExportError(
            f"{where}: circuit-tracer's transcoders replace each layer's MLP, reading its input and writing its "
            f"output; got {in_sfx} -> {out_sfx}. Inputs it taps: {sorted(INPUT_HOOKS)} (ln2.hook_out is the MLP's "
            f"exact input); outputs: {sorted(OUTPUT_HOOKS)}. {fix}")
    if parallel and INPUT_HOOKS[in_sfx] == "hook_resid_mid":
        raise CircuitTracerExportError(
            f"{where}: {model} runs attention and MLP in parallel, and transformer-lens's HookedTransformer (which "
            f"circuit-tracer runs) never fires hook_resid_mid there, so an export reading {in_sfx} could not be "
            f"traced. Use the MLP's exact input blocks.L.ln2.hook_out: {fix}")
    return INPUT_HOOKS[in_sfx], OUTPUT_HOOKS[out_sfx]


def _coverage(layers: list[int], n_layers: int, where: str, model: str, in_sfx: str, out_sfx: str) -> None:
    if layers != list(range(n_layers)):
        raise CircuitTracerExportError(
            f"{where}: circuit-tracer's replacement model encodes at every layer 0..{n_layers - 1} of {model} "
            f"(it taps blocks.l.<input hook> for each l < n_layers and indexes the transcoders by l), so the "
            f"export needs all {n_layers} layers, once each, in order; got layers {layers}. "
            + _commands(model, n_layers, in_sfx if in_sfx in INPUT_HOOKS else "ln2.hook_out",
                        out_sfx if out_sfx in OUTPUT_HOOKS else "hook_mlp_out"))


def _threshold_L(model: Dictionary, where: str) -> torch.Tensor | None:
    """The JumpReLU threshold circuit-tracer needs for ``model``'s activation (None: plain ReLU)."""
    cfg = model.cfg
    match cfg.activation:
        case "relu":
            return None
        case "jumprelu":
            return model.log_threshold_L.detach().exp()
        case "batchtopk":
            theta = float(model.threshold)
            if theta < 0:
                raise CircuitTracerExportError(f"{where}: the batchtopk inference threshold was never learned "
                                               "(the run did not finish a training step); train it again")
            w_L = model.score_weight_L(torch.float64)
            # relu(pre)·w > θ  <=>  pre > θ/w for w > 0 (θ >= 0); w = 0 never fires, whatever pre is.
            safe_L = torch.where(w_L > 0, w_L, torch.ones_like(w_L))
            return torch.where(w_L > 0, theta / safe_L, torch.full_like(w_L, float("inf"))).to(torch.float32)
        case "topk":
            raise CircuitTracerExportError(
                f"{where}: activation topk has no circuit-tracer equivalent: its loaders build JumpReLU (when a "
                "threshold is stored) or ReLU, never TopK, and its TopK module keeps the k largest raw pre-"
                "activations without ReLU rather than our decoder-norm-weighted scores. Train with --activation "
                "batchtopk (exported exactly as JumpReLU, per token), jumprelu or relu")
    raise AssertionError(cfg.activation)


# ---- building the files ---------------------------------------------------------------------------
def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float32).contiguous()


def _clt_files(src: _Source, where: str) -> tuple[dict[str, dict[str, torch.Tensor]], int]:
    model, cfg = src.model, src.model.cfg
    if cfg.skip:
        raise CircuitTracerExportError(
            f"{where}: a CLT with --skip cannot be exported: circuit-tracer's load_clt never reads skip weights "
            "from its files (0.5.0 declares W_skip but does not load it; upstream has no CLT skip). Train the CLT "
            "without --skip, or per-layer transcoders with --skip (--arch directional, one run per layer)")
    n, F = cfg.n_in, cfg.latents_per_layer
    W_dec_XiLXoD = rearrange(model.decoder_weight().detach(), "(xi l) xo d -> xi l xo d", xi=n)  # mask applied
    thr_L = _threshold_L(model, where)
    files: dict[str, dict[str, torch.Tensor]] = {}
    for l in range(n):
        part = slice(l * F, (l + 1) * F)
        enc = {f"W_enc_{l}": _f32(model.W_enc_XiDL[l].T), f"b_enc_{l}": _f32(model.b_enc_L[part]),
               f"b_dec_{l}": _f32(model.b_dec_XoD[l])}
        if thr_L is not None:
            enc[f"threshold_{l}"] = _f32(thr_L[part])
        files[f"W_enc_{l}.safetensors"] = enc
        files[f"W_dec_{l}.safetensors"] = {f"W_dec_{l}": _f32(W_dec_XiLXoD[l, :, l:])}
    return files, F


def _layer_file(src: _Source, where: str, skip_width: int | None) -> dict[str, torch.Tensor]:
    model = src.model
    tensors = {"W_enc": _f32(model.W_enc_XiDL[0].T), "W_dec": _f32(model.decoder_weight()[:, 0]),
               "b_enc": _f32(model.b_enc_L), "b_dec": _f32(model.b_dec_XoD[0])}
    thr_L = _threshold_L(model, where)
    if thr_L is not None:
        tensors["activation_function.threshold"] = _f32(thr_L)
    if model.cfg.skip:
        tensors["W_skip"] = _f32(model.W_skip_XiDXoD[0, :, 0, :].T)  # theirs: x @ W_skip.T
    elif skip_width is not None:
        # circuit-tracer takes the set's skip flag from layer 0 and calls every layer's skip: a zero
        # matrix is exactly "no skip" for the layers trained without one.
        tensors["W_skip"] = torch.zeros(skip_width, skip_width)
    return tensors


# ---- the export -----------------------------------------------------------------------------------
def export_circuit_tracer(
    runs: str | Path | Sequence[str | Path],
    out_dir: str | Path,
    *,
    model_name: str | None = None,
    scan: str | None = None,
    n_layers: int | None = None,
) -> Path:
    """Write ``out_dir`` in circuit-tracer's format from one CLT run or per-layer transcoder runs.

    ``runs``: a CLT run (folder or its export/), or the directional runs of a transcoder set, one
    per layer (folders, their export/, or a sweep folder holding them); any of them may be a dictionary
    ``run_train.py push`` put on the Hub, ``hf://USER/NAME[@REV]`` (a ``str``; downloaded and checked by
    :func:`train.export.load_hub_dictionary`, whose errors it raises: ``ValueError`` for a bad spec,
    :class:`~shared.hub_spec.HubError` for a repo it cannot have). ``model_name`` (default: the
    harvested model's name) is what circuit-tracer loads with transformer-lens; ``scan`` names the
    feature set in its graph files; ``n_layers`` is needed only when neither a run folder nor the
    export's ``metadata.harvest`` records the model's depth (an export written before that record). Raises :class:`CircuitTracerExportError` (a ValueError) naming
    what cannot be exported and the harvest/train commands that would give an exportable run. Returns
    ``out_dir``.
    """
    given = [runs] if isinstance(runs, (str, Path)) else list(runs)  # str kept: Path("hf://x") is "hf:/x"
    if n_layers is not None and not n_layers >= 1:
        raise CircuitTracerExportError(f"n_layers (--n-layers) is the model's layer count, >= 1; got {n_layers}")
    if not given:
        raise CircuitTracerExportError("no run given")
    sources = [s for run in given for s in _sources(run)]
    archs = sorted({s.model.cfg.arch for s in sources})
    where0 = sources[0].where
    if "crosscoder" in archs:
        raise CircuitTracerExportError(
            f"{where0}: a crosscoder (or SAE) reconstructs its own input; circuit-tracer needs transcoders that map "
            "each layer's MLP input to its output: --arch clt, or --arch directional per layer")
    if archs == ["clt"] and len(sources) > 1:
        raise CircuitTracerExportError(f"one CLT per export; got {len(sources)} CLT runs")
    if len(archs) > 1:
        raise CircuitTracerExportError("export a CLT alone, or a set of per-layer directional runs, not both")

    # One model, one (input, output) hook name, layers 0..n-1.
    per_layer: list[tuple[int, str, str, _Source, str]] = []  # (layer, in suffix, out suffix, source, where)
    models: set[str] = set()
    for s in sources:
        cfg, where = s.model.cfg, s.where
        ins = [_split_slot(cfg.slot_names[i]) for i in cfg.in_slots]
        outs = [_split_slot(cfg.slot_names[i]) for i in cfg.out_slots]
        models |= {m for m, _, _ in ins + outs}
        if cfg.arch == "directional" and (len(ins) != 1 or len(outs) != 1 or ins[0][1] != outs[0][1]):
            raise CircuitTracerExportError(
                f"{where}: a circuit-tracer transcoder reads one layer's MLP input and writes the same layer's "
                f"output; this directional run maps {[cfg.slot_names[i] for i in cfg.in_slots]} -> "
                f"{[cfg.slot_names[i] for i in cfg.out_slots]}. Train one run per layer (--in-hooks "
                "blocks.L.ln2.hook_out --out-hooks blocks.L.hook_mlp_out), or a CLT")
        per_layer += [(li, si, so, s, where) for (_, li, si), (_, _, so) in zip(ins, outs)]
    if len(models) != 1:
        raise CircuitTracerExportError(f"the runs read several models {sorted(models)}; circuit-tracer traces one "
                                       "(train with --models NAME)")
    model = models.pop()
    per_layer.sort(key=lambda t: t[0])
    entry = next((e for s in sources if (e := _model_entry(s, model)) is not None), None)
    recorded = (entry or {}).get("n_layers")
    # --n-layers stands in for a missing record; it must not override one (a wrong count would pass the
    # coverage check for a model whose other layers have no transcoder).
    if n_layers is not None and recorded is not None and n_layers != recorded:
        raise CircuitTracerExportError(
            f"{where0}: n_layers (--n-layers) {n_layers} differs from the {recorded} layers the harvest recorded for "
            f"{model}; --n-layers is only for exports that record none: leave it out")
    depth = n_layers if n_layers is not None else recorded
    in_sfxs, out_sfxs = sorted({t[1] for t in per_layer}), sorted({t[2] for t in per_layer})
    if depth is None:
        hub = [s.where for s in sources if s.on_hub]
        why = (f"{hub[0]} was exported before exports recorded the harvest, and a push uploads no run folder"
               if hub else "its config.json is missing and the export predates metadata.harvest")
        raise CircuitTracerExportError(
            f"{where0}: nothing records how many layers {model} has ({why}); pass n_layers (--n-layers N, "
            "the model's layer count: num_hidden_layers in its config) so the export can be checked to cover "
            "every layer")
    if len(in_sfxs) != 1 or len(out_sfxs) != 1:
        raise CircuitTracerExportError(
            f"circuit-tracer uses one input and one output hook name at every layer; the runs use inputs "
            f"{in_sfxs} and outputs {out_sfxs}. " + _commands(model, depth, "ln2.hook_out", "hook_mlp_out"))
    in_sfx, out_sfx = in_sfxs[0], out_sfxs[0]
    ct_in, ct_out = _hook_pair(in_sfx, out_sfx, where0, model, depth, parallel_attn_mlp(entry))
    _coverage([t[0] for t in per_layer], depth, where0, model, in_sfx, out_sfx)

    if archs == ["clt"]:
        kind = "cross_layer_transcoder"
        files, width = _clt_files(sources[0], where0)
    else:
        kind = "transcoder_set"
        widths = {t[3].model.cfg.n_latents for t in per_layer}
        if len(widths) != 1:
            raise CircuitTracerExportError(f"circuit-tracer's transcoder set needs the same number of latents at "
                                           f"every layer; the runs have {sorted(widths)} (--latents)")
        width = widths.pop()
        skip_width = sources[0].model.cfg.d_model if any(t[3].model.cfg.skip for t in per_layer) else None
        files = {f"layer_{li}.safetensors": _layer_file(s, where, skip_width) for li, _, _, s, where in per_layer}

    config = _config(kind, model, entry, ct_in, ct_out, in_sfx, out_sfx, per_layer, width, model_name, scan)
    _write(Path(out_dir), files, config)
    return Path(out_dir)


def _config(kind: str, model: str, entry: dict[str, Any] | None, ct_in: str, ct_out: str, in_sfx: str, out_sfx: str,
            per_layer: list[tuple[int, str, str, _Source, str]], width: int, model_name: str | None,
            scan: str | None) -> dict[str, Any]:
    """config.yaml: circuit-tracer's keys first, then our provenance under ``crosscache`` (it ignores it)."""
    folder = names_local_path(model)  # a local folder (or one published redacted: ~/..., <user>)
    if entry is not None:
        revision, from_folder = entry.get("revision"), bool(entry.get("path"))
    else:  # no run folder (a Hub dictionary): a Hub id's "@REV" is the revision the harvest loaded, as it parses it
        revision, from_folder = (None if folder else model.partition("@")[2] or None), folder
    name = model_name or (model.split("@")[0] if revision and not folder else model)
    seen: dict[str, _Source] = {s.key: s for _, _, _, s, _ in per_layer}
    runs = []
    for s in seen.values():
        meta = s.metadata
        runs.append({"run": s.where, "hub_commit": s.hub_commit, "arch": s.model.cfg.arch,
                     "activation": s.model.cfg.activation,
                     "skip": s.model.cfg.skip, "step": meta.get("step"), "slots": meta.get("slots"),
                     "normalization_folded": meta.get("normalization_folded"),
                     "eval": {k: v for k, v in (meta.get("eval") or {}).items() if k in ("eval/ev/overall", "eval/l0/mean")},
                     "cache": (s.cache_info or {}).get("spec", meta.get("cache"))})
    acts = sorted({s.model.cfg.activation for s in seen.values()})
    provenance = {
        "format": CT_EXPORT_FORMAT, "tool": "crosscache", "version": shared.__version__,
        "model": model, "model_revision": revision, "model_from_local_folder": from_folder,
        "n_layers": len(per_layer), "features_per_layer": width,
        "hooks": {"input": f"blocks.L.{in_sfx}", "output": f"blocks.L.{out_sfx}"},
        "activations": acts,
        "notes": ["weights are in raw activation space (the cache's normalization is folded in)"]
        + (["batchtopk exported as JumpReLU: threshold = inference threshold / ranking weight"]
           if "batchtopk" in acts else []),
        "runs": runs,
    }
    config = {"model_kind": kind, "model_name": name, "feature_input_hook": ct_in, "feature_output_hook": ct_out,
              "scan": scan or f"crosscache/{_set_name(list(seen.values()))}",
              "crosscache": provenance}
    return redact_machine(config)[0]


def _set_name(sources: list[_Source]) -> str:
    """The run's folder name (a Hub dictionary's: its repo's NAME), or for per-layer runs their common parent's
    (a sweep folder)."""
    def name(s: _Source) -> str:
        return s.key.split("@", 1)[0].rstrip("/").rsplit("/", 1)[-1] if s.on_hub else Path(s.where).name

    if len(sources) == 1 or any(s.on_hub for s in sources):
        return name(sources[0])
    parents = {Path(s.where).resolve().parent for s in sources}
    return name(sources[0]) if len(parents) != 1 else parents.pop().name


def _write(out_dir: Path, files: dict[str, dict[str, torch.Tensor]], config: dict[str, Any]) -> None:
    """Tensors first, config.yaml last; a previous export of ours in ``out_dir`` is replaced whole."""
    ours = re.compile(r"(layer|W_enc|W_dec)_\d+\.safetensors$")
    if out_dir.exists():
        entries = [p for p in out_dir.iterdir() if not p.name.startswith(".")]
        previous = out_dir / CT_CONFIG
        is_ours = previous.is_file() and CT_EXPORT_FORMAT in previous.read_text()
        foreign = [p.name for p in entries if p.name != CT_CONFIG and not ours.match(p.name)]
        if entries and (not is_ours or foreign):
            raise CircuitTracerExportError(
                f"{out_dir} holds other files ({sorted(p.name for p in entries)[:5]}); circuit-tracer reads every "
                "layer_*/W_enc_* file of the folder, so export into an empty or new folder")
        previous.unlink(missing_ok=True)  # until the new config lands, the folder is not loadable
        for p in entries:
            if ours.match(p.name) and p.name not in files:
                p.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, tensors in files.items():
        atomic_write_bytes(out_dir / name, safetensors_save(tensors, metadata={"format": "pt"}))
    atomic_write_bytes(out_dir / CT_CONFIG, yaml.safe_dump(config, sort_keys=False, allow_unicode=True).encode())
    fsync_dir(out_dir)


# ---- CLI ------------------------------------------------------------------------------------------
def export_circuit_tracer_cli(argv: list[str]) -> int:
    """``run_train.py export-circuit-tracer RUN [RUN ...] --out DIR``; refusals: ``error: ...``, exit 2."""
    parser = argparse.ArgumentParser(allow_abbrev=False, 
        prog="run_train.py export-circuit-tracer",
        description="Write a CLT run, or per-layer transcoder runs (one per layer, or a sweep folder of them), "
                    "as a folder circuit-tracer loads (config.yaml + safetensors).")
    parser.add_argument("runs", nargs="+", help="run folder(s), their export/, a sweep folder of runs, or "
                                                "hf://USER/NAME[@REV] (a dictionary pushed with `run_train.py push`)")
    parser.add_argument("--out", required=True, help="output folder (new, empty, or a previous export of this tool)")
    parser.add_argument("--model-name", help="model circuit-tracer loads (default: the harvested model's name); "
                                             "a Hub id transformer-lens knows, e.g. google/gemma-2-2b")
    parser.add_argument("--scan", help="feature-set name circuit-tracer puts in its graph files "
                                       "(default: crosscache/<run folder name>)")
    parser.add_argument("--n-layers", type=int, help="the model's layer count, when nothing records it (an export "
                                                     "from before exports recorded the harvest)")
    args = parser.parse_args(argv)
    try:
        out = export_circuit_tracer(args.runs, args.out, model_name=args.model_name, scan=args.scan,
                                    n_layers=args.n_layers)
    except (ValueError, FileNotFoundError, HubError, ImportError) as e:  # CircuitTracerExportError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = yaml.safe_load((out / CT_CONFIG).read_text())
    print(f"wrote {cfg['model_kind']} for {cfg['model_name']} ({cfg['crosscache']['n_layers']} layers x "
          f"{cfg['crosscache']['features_per_layer']} features, {cfg['feature_input_hook']} -> "
          f"{cfg['feature_output_hook']}) to {out}")
    if args.model_name is None and cfg["crosscache"]["model_from_local_folder"]:
        print(f"note: the model was harvested from a local folder, and circuit-tracer loads model_name "
              f"{cfg['model_name']!r} with transformer-lens, which knows models by name: pass --model-name "
              "(e.g. the Hub id the folder holds) unless that name works")
    return 0
