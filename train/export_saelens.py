"""Export a trained SAE or transcoder to the SAELens format (``SAE.load_from_disk(path)``).

Input is our raw-space export (``RUN/export``, see :mod:`train.export`), or the same export as
``run_train.py push`` put it on the Hub (``hf://USER/NAME[@REV]``): normalization is already
folded in, so the SAELens copy reads raw activations and sets ``normalize_activations="none"``.
The cache's context size, dataset and excluded tokens come from its manifest when the cache is on
this machine where the run found it, else from the export's own record of the harvest
(``metadata.harvest``), which a pushed repo (no run folder) carries too.
Output is a folder with ``sae_weights.safetensors`` and ``cfg.json`` (written atomically, config
last), as SAELens 6.x saves its own inference SAEs (checked against ``sae_lens`` 6.54.12).

What maps to what (one input slot, one output slot; L latents, D = d_model):

====================================  =====================================  =====================
ours (``Dictionary``)                 SAELens tensor                         shape
====================================  =====================================  =====================
``W_enc_XiDL[0]`` · c                 ``W_enc``                              [d_in, d_sae]
``b_enc_L`` · c                       ``b_enc``                              [d_sae]
``W_dec_LXoD[:, 0]`` / c              ``W_dec``                              [d_sae, d_in | d_out]
``b_dec_XoD[0]``                      ``b_dec``                              [d_in | d_out]
``exp(log_threshold_L)`` (jumprelu)   ``threshold``                          [d_sae]
``threshold`` θ (batchtopk)           ``threshold`` (θ for every latent)     [d_sae]
``W_skip_XiDXoD[0, :, 0, :]``ᵀ        ``W_skip`` (skip transcoders)          [d_out, d_in]
====================================  =====================================  =====================

c is 1 except for topk/batchtopk, whose ranking score is ``relu(pre) · c_l`` with
``c_l = Σ_out ‖W_dec_l‖ · score_scale_l`` (``topk_score="pre_x_dec_norm"``; ``score_scale_l``
only for ``"pre"``). SAELens's TopK ranks the plain pre-activation; its
``rescale_acts_by_decoder_norm`` option ranks by the *raw-space* decoder norm, which is not our
score once a ``mean_std`` normalization is folded in (``score_scale_l`` then differs per latent).
So c is folded into the weights instead, as SAELens itself does when it saves a TopK SAE trained
with that option: ReLU and threshold gates are positively homogeneous, so ``pre · c`` selects the
same latents and ``(pre · c) · (W_dec / c)`` gives the same reconstruction. The price: SAELens's
latent activations are our latents × c_l, i.e. our ranking score (a latent's activation times its
decoder norm in the normalized space it was trained in), not our latent values.

Architectures: crosscoder relu → ``standard``, jumprelu → ``jumprelu``, topk → ``topk``
(``rescale_acts_by_decoder_norm=False``), batchtopk → ``jumprelu`` with our learned inference
threshold θ on every latent (SAELens saves its own BatchTopK SAEs as JumpReLU the same way; with
c folded in, ``pre·c > θ`` is exactly our per-token rule ``score > θ``). A directional run with
one hook in and one out → ``transcoder`` / ``skip_transcoder`` (relu) or ``jumprelu_transcoder`` /
``jumprelu_skip_transcoder`` (jumprelu, batchtopk). Refused, with the reason: CLTs, multi-slot
crosscoders (several models or hooks), shared latents, a transcoder across two models, and topk
transcoders (SAELens has no TopK transcoder class).

Hook names: SAELens attaches to transformer-lens 2/3's HookedTransformer, so the harvest's (transformer-lens 4)
names are written only where that model has the same hook (:func:`saelens_hook`); ``attn.hook_z`` gets
``reshape_activations: hook_z``; the MLP's input (``ln2.hook_out`` = ``mlp.hook_in``) is written
``mlp.hook_in``, which SAELens's HookedSAETransformer adds to every MLP; ``hook_mlp_in`` is written
``hook_resid_mid`` (or ``hook_resid_pre``, parallel attention and MLP), which holds it and always fires.
The output of ln1 or ln_final has no hook there: their ``hook_normalized`` holds the normalized input n
before the norm's weight w and bias b. The export reads w and b off the model (:mod:`train.norm_affine`,
fitted on a forward, checked against the harvest's weights fingerprint) and writes the dictionary for n:
``W_enc ← w ⊙ W_enc``, ``b_enc ← b_enc + b · W_enc`` (and ``W_skip ← W_skip · diag(w)``, its constant
``b · W_skipᵀ`` into ``b_dec``); where SAELens writes the slot (an SAE's output), ``W_dec ← W_dec / w``,
``b_dec ← (b_dec − b) / w``, so it reconstructs n as the model feeds it on through w and b.

SAELens's ``apply_b_dec_to_input`` is False: our encoder does not subtract ``b_dec``. The model's
activations are those of transformer-lens's unprocessed weights (the harvest does not fold layer
norms or centre weights), which SAELens loads with ``from_pretrained_no_processing(model_name,
**model_from_pretrained_kwargs)``. Those kwargs are ``{}``, or ``{"fold_ln": true}`` where SAELens taps a
``hook_normalized``: transformer-lens 2.x's unprocessed LayerNorm fires it *after* its weight and bias
(3.x before), a folded norm has neither, so it is the normalized input in every version SAELens accepts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_save

from shared.config import read_json_object
from shared.hub_spec import HubError, is_hub_spec
from shared.redact import MachineNames, redact_machine, redact_text
from shared.shard_io import atomic_write_bytes, fsync_dir
from train.dictionary import Dictionary
from train.export import CONFIG_NAME as EXPORT_CONFIG_NAME
from train.export import (EXPORT_FORMAT, load_dictionary, load_hub_dictionary, load_metadata, names_local_path,
                          parallel_attn_mlp, training_cache_manifest)
from train.norm_affine import NormAffine, fit_norm_affines, normalized_hook

__all__ = [
    "SAELENS_CFG_NAME",
    "SAELENS_VERSION",
    "SAELENS_WEIGHTS_NAME",
    "SAELensExportError",
    "SAELensWeights",
    "check_exportable",
    "export_saelens",
    "export_saelens_cli",
    "latent_scale",
    "to_saelens",
]

SAELENS_VERSION = "6.54.12"
"""The SAELens version whose format this writes (stored as ``metadata.sae_lens_version``; SAELens
reads configs below 6.0 as its legacy format, so this must stay >= 6)."""
SAELENS_CFG_NAME = "cfg.json"
SAELENS_WEIGHTS_NAME = "sae_weights.safetensors"
PROVENANCE_FORMAT = "crosscache.saelens/1"

_DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float16",
                torch.bfloat16: "bfloat16"}
_OUR_EXPORT = "use our own export instead: train.export.load_dictionary(RUN/export) runs it on raw activations"


class SAELensExportError(ValueError):
    """A dictionary SAELens has no format for; the message says why and what to use instead."""


@dataclass(frozen=True)
class SAELensWeights:
    """One dictionary in SAELens terms: the ``architecture``, the state dict SAELens loads
    (strictly: exactly these names), the architecture's cfg fields, and the factor c [L] folded
    into the latents (SAELens latent = our latent · c)."""

    architecture: str
    tensors: dict[str, torch.Tensor]
    cfg_fields: dict[str, Any]
    latent_scale_L: torch.Tensor


# Hooks SAELens finds under the same name: it runs the model as transformer-lens 2/3's HookedTransformer
# (the harvest names hooks as transformer-lens 4's bridge does; these are common to both). A norm's
# hook_normalized (its input centred and scaled, before its weight and bias) is that in both, given fold_ln.
_SAME_HOOKS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
               "attn.hook_z", "mlp.hook_pre", "mlp.hook_post", "ln1.hook_normalized", "ln2.hook_normalized")


def saelens_hook(hook: str, *, parallel_attn_mlp: bool | None = None) -> tuple[str, str]:
    """The HookedTransformer hook SAELens attaches to for our ``hook`` (a transformer-lens 4 name), and its
    ``reshape_activations``. Raises :class:`SAELensExportError` where no hook there holds the same tensor,
    naming why.

    - ``ln2.hook_out`` / ``mlp.hook_in`` (the MLP's input) → ``mlp.hook_in``, which SAELens's
      ``HookedSAETransformer`` adds to every MLP (its own circuit-tracer transcoders use it).
    - ``hook_mlp_in`` → ``hook_resid_mid`` (``hook_resid_pre`` when attention and MLP run in parallel,
      ``parallel_attn_mlp``): the same tensor, while ``HookedTransformer`` fires ``hook_mlp_in`` only with
      ``use_hook_mlp_in`` set, which SAELens never sets (an SAE there would silently never run).
    - ``ln1.hook_out``, ``ln_final.hook_out`` (other norms' outputs) → the norm's ``hook_normalized``, with the
      norm's weight and bias folded into the dictionary by the export (:mod:`train.norm_affine`)."""
    m = re.match(r"(blocks\.\d+\.)(.+)$", hook)
    prefix, point = (m.group(1), m.group(2)) if m else ("", hook)
    if point in ("attn.hook_q", "attn.hook_k", "attn.hook_v"):
        raise SAELensExportError(
            f"{hook}: SAELens flattens heads only at hook_z (reshape_activations 'hook_z'); an SAE on {point} would be "
            "fed [..., n_heads, d_head] against a d_model-wide W_enc")
    if (point in _SAME_HOOKS and prefix) or (not prefix and point in ("hook_embed", "hook_pos_embed",
                                                                       "ln_final.hook_normalized")):
        return hook, "hook_z" if point == "attn.hook_z" else "none"
    if prefix and point in ("ln2.hook_out", "mlp.hook_in"):
        return f"{prefix}mlp.hook_in", "none"
    if prefix and point == "hook_mlp_in":
        if parallel_attn_mlp is None:
            raise SAELensExportError(
                f"{hook}: HookedTransformer fires hook_mlp_in only with use_hook_mlp_in set, which SAELens never sets; "
                "the same tensor is hook_resid_mid, or hook_resid_pre where attention and MLP run in parallel, and "
                "the cache's record does not say which this model does (a harvest older than that record)")
        return f"{prefix}{'hook_resid_pre' if parallel_attn_mlp else 'hook_resid_mid'}", "none"
    folded = normalized_hook(hook)
    if folded is not None:
        return folded, "none"
    raise SAELensExportError(
        f"{hook}: SAELens runs the model as transformer-lens 2/3's HookedTransformer, which has no hook {point!r} "
        f"(hooks it shares with the harvest's names: {', '.join(_SAME_HOOKS)}; also mapped: ln2.hook_out and "
        "mlp.hook_in to mlp.hook_in, hook_mlp_in to hook_resid_mid, ln1/ln_final.hook_out to the norm's "
        "hook_normalized with its weight and bias folded in)")


def _slot_model_hook(name: str) -> tuple[str, str]:
    """'model/hook' split at the last '/' (HF ids and folders contain one)."""
    model, _, hook = name.rpartition("/")
    return model, hook


def check_exportable(model: Dictionary) -> None:
    """Raise :class:`SAELensExportError` unless SAELens has a format that runs ``model`` exactly."""
    cfg = model.cfg
    if cfg.arch == "clt":
        raise SAELensExportError(
            f"a cross-layer transcoder ({cfg.n_in} layers) writes each latent into several layers; SAELens "
            f"{SAELENS_VERSION} has no CLT format (one encoder and one decoder per SAE). {_OUR_EXPORT}")
    if cfg.shared_latents:
        raise SAELensExportError(
            f"this dictionary has {cfg.shared_latents} shared latents (one decoder tied across models); SAELens "
            f"has no multi-model format. {_OUR_EXPORT}")
    ins = [cfg.slot_names[s] for s in cfg.in_slots]
    outs = [cfg.slot_names[s] for s in cfg.out_slots]
    if cfg.n_in != 1 or cfg.n_out != 1:
        what = (f"a crosscoder over {len(ins)} slots {ins}" if cfg.arch == "crosscoder"
                else f"a directional dictionary from {ins} to {outs}")
        raise SAELensExportError(
            f"{what}: SAELens SAEs and transcoders read one hook of one model and write "
            f"one; it has no crosscoder format. Train one SAE per slot (--models M --hooks H) or a transcoder "
            f"(--in-hooks H1 --out-hooks H2) to export, or {_OUR_EXPORT}")
    (m_in, _), (m_out, _) = _slot_model_hook(ins[0]), _slot_model_hook(outs[0])
    if m_in != m_out:
        raise SAELensExportError(
            f"this transcoder reads model {m_in!r} and writes model {m_out!r}; SAELens's config names one model. "
            f"{_OUR_EXPORT}")
    if cfg.arch == "directional" and cfg.activation == "topk":
        raise SAELensExportError(
            f"SAELens {SAELENS_VERSION} has no TopK transcoder (its transcoders are relu or jumprelu, with or "
            "without skip). Train the transcoder with --activation batchtopk (exported exactly as a JumpReLU "
            f"transcoder) or jumprelu, or {_OUR_EXPORT}")
    if cfg.activation == "batchtopk" and float(model.threshold) < 0:
        raise SAELensExportError(
            "this BatchTopK dictionary has no learned inference threshold (it never trained a step), so it "
            "cannot run per token, in SAELens or here; export a trained run")


@torch.no_grad()
def latent_scale(model: Dictionary) -> torch.Tensor:
    """c [L] (float64): the factor our topk/batchtopk score puts on ``relu(pre)``; ones otherwise."""
    cfg = model.cfg
    if cfg.activation not in ("topk", "batchtopk"):
        return torch.ones(cfg.n_latents, dtype=torch.float64)
    return model.score_weight_L(torch.float64).cpu()


@torch.no_grad()
def to_saelens(model: Dictionary, *, norm_in: NormAffine | None = None,
               norm_out: NormAffine | None = None) -> SAELensWeights:
    """The SAELens architecture, tensors and cfg fields of a raw-space ``model`` (see the module doc).

    ``norm_in`` / ``norm_out``: the input / output slot is a norm's output ``y = n · w + b``, and SAELens is to
    read / write the normalized ``n`` instead: the map is folded into the encoder (and ``W_skip``) / divided
    out of the decoder, so that SAELens on ``n`` gives our latents, and our output as ``n``."""
    check_exportable(model)
    cfg = model.cfg
    dtype = model.b_enc_L.dtype
    if dtype not in _DTYPE_NAMES:
        raise SAELensExportError(f"weights of dtype {dtype} have no SAELens dtype name ({sorted(_DTYPE_NAMES.values())})")

    def f64(t: torch.Tensor) -> torch.Tensor:  # fold in float64; stored in the model's dtype at the end
        return t.detach().to("cpu", torch.float64)

    c_L = latent_scale(model)
    # A latent with c = 0 (a zero decoder row) scores 0 and writes nothing: give it zero weights,
    # so SAELens's pre-activation is 0 and it never fires (ours could only tie at score 0).
    live_L = c_L > 0
    inv_c_L = torch.where(live_L, 1.0 / torch.where(live_L, c_L, torch.ones_like(c_L)), torch.zeros_like(c_L))
    W_enc_DL = f64(model.W_enc_XiDL)[0] * c_L
    b_enc_L = f64(model.b_enc_L) * c_L
    W_dec_LD = f64(model.decoder_weight())[:, 0] * inv_c_L[:, None]
    tensors: dict[str, torch.Tensor] = {"W_enc": W_enc_DL, "b_enc": b_enc_L, "W_dec": W_dec_LD,
                                        "b_dec": f64(model.b_dec_XoD)[0]}

    transcoder = cfg.arch == "directional"
    if cfg.activation == "jumprelu":
        tensors["threshold"] = f64(model.log_threshold_L).exp()
    elif cfg.activation == "batchtopk":
        # Our inference rule is relu(pre)·c > θ; SAELens's JumpReLU fires on pre' > threshold
        # with pre' = pre·c folded above. θ >= 0 (checked), so the two gates are the same.
        tensors["threshold"] = torch.full_like(b_enc_L, float(model.threshold))
    if cfg.skip:
        # Ours: x_in · W_skip [D_in, D_out]; SAELens: x @ W_skip.T with W_skip [d_out, d_in].
        tensors["W_skip"] = f64(model.W_skip_XiDXoD)[0, :, 0, :].T.contiguous()
    if norm_in is not None:
        # x = n·w + b: x @ W_enc = n @ (w ⊙ W_enc) + b @ W_enc; the skip's constant b @ W_skip.T joins b_dec.
        w, b = norm_in.weight_D, norm_in.bias_D
        tensors["b_enc"] = tensors["b_enc"] + b @ tensors["W_enc"]
        tensors["W_enc"] = w[:, None] * tensors["W_enc"]
        if cfg.skip:
            tensors["b_dec"] = tensors["b_dec"] + b @ tensors["W_skip"].T
            tensors["W_skip"] = tensors["W_skip"] * w[None, :]
    if norm_out is not None:
        # SAELens writes n = (y − b) / w where we write y.
        w, b = norm_out.weight_D, norm_out.bias_D
        small = w.abs() <= 1e-6 * float(w.abs().max())
        if bool(small.any()):
            raise SAELensExportError(
                f"{norm_out.hook}: the norm's weight is 0 in {int(small.sum())} coordinates (or the normalized input "
                "was 0 there throughout the fit's probe, a dead dimension), so the normalized "
                f"{norm_out.normalized_hook} SAELens would reconstruct cannot be had from ours there")
        tensors["W_dec"] = tensors["W_dec"] / w
        tensors["b_dec"] = (tensors["b_dec"] - b) / w
        if cfg.skip:
            tensors["W_skip"] = tensors["W_skip"] / w[:, None]

    gated = cfg.activation in ("jumprelu", "batchtopk")
    fields: dict[str, Any] = {}
    if transcoder:
        architecture = {(False, False): "transcoder", (False, True): "skip_transcoder",
                        (True, False): "jumprelu_transcoder", (True, True): "jumprelu_skip_transcoder"}[
            (gated, cfg.skip)]
        fields["d_out"] = cfg.d_model
    elif cfg.activation == "topk":
        architecture = "topk"
        fields.update(k=cfg.k, rescale_acts_by_decoder_norm=False)  # c is already in the weights
    else:
        architecture = "jumprelu" if gated else "standard"
    return SAELensWeights(architecture, {k: v.to(dtype).contiguous() for k, v in tensors.items()}, fields, c_L)


# ---- reading a run ---------------------------------------------------------------------------


def _resolve(path: Path) -> tuple[Path, Path | None]:
    """(export folder, run folder or None) of a run folder or an export folder."""
    if (path / "export" / EXPORT_CONFIG_NAME).is_file():
        return path / "export", path
    cfg_path = path / EXPORT_CONFIG_NAME
    if cfg_path.is_file() and json.loads(cfg_path.read_text()).get("format") == EXPORT_FORMAT:
        parent_cfg = path.parent / "config.json"
        run = path.parent if parent_cfg.is_file() and "dictionary" in json.loads(parent_cfg.read_text()) else None
        return path, run
    raise FileNotFoundError(
        f"{path} is neither a run folder with an export/ (train it to the end first: the export is written "
        f"after the last step) nor an export folder ({EXPORT_CONFIG_NAME} of format {EXPORT_FORMAT!r})")


def _weights_sha256(export_dir: Path) -> str | None:
    return read_json_object(export_dir / EXPORT_CONFIG_NAME).get("weights_sha256")


@dataclass(frozen=True)
class _Source:
    """The dictionary to convert and where it came from, as ``cfg.json``'s provenance names it."""

    model: Dictionary
    metadata: dict[str, Any]
    export: str
    """The export folder, or the ``hf://`` spec as given."""
    run_dir: Path | None
    """The run folder (None: a bare export folder, or a Hub dictionary, whose push uploads no run folder)."""
    weights_sha256: str | None
    hub_commit: str | None
    """The Hub commit the files came from (None: a local folder, or the Hub did not name one)."""


def _open_source(src: str | Path) -> _Source:
    """The dictionary of a run folder, an export folder or ``hf://USER/NAME[@REV]`` (downloaded, checked)."""
    if is_hub_spec(src):
        model, fetched = load_hub_dictionary(str(src))
        return _Source(model, dict(fetched.config.get("metadata") or {}), str(src), None,
                       fetched.config.get("weights_sha256"), fetched.commit)
    export_dir, run_dir = _resolve(Path(src))
    return _Source(load_dictionary(export_dir), load_metadata(export_dir), str(export_dir), run_dir,
                   _weights_sha256(export_dir), None)


def export_saelens(run_or_export_dir: str | Path, out_dir: str | Path, *, context_size: int | None = None,
                   model_path: str | None = None, device: str = "cpu", model_name: str | None = None) -> Path:
    """Write ``out_dir/{sae_weights.safetensors,cfg.json}`` from a run's raw-space export; return ``out_dir``.

    ``run_or_export_dir``: a run folder (its ``export/`` is used), an export folder, or a dictionary
    ``run_train.py push`` put on the Hub, ``hf://USER/NAME[@REV]`` (a ``str``; downloaded and checked by
    :func:`train.export.load_hub_dictionary`, whose errors it raises: ``ValueError`` for a bad spec,
    :class:`~shared.hub_spec.HubError` for a repo it cannot have). ``cfg.json`` records the source (the
    folder, or the spec and the commit the files came from).
    ``context_size``: recorded as ``metadata.context_size``; by default the training cache's
    (read from its manifest when the cache is still where the run found it, else from the export's
    ``metadata.harvest``; None only for an export written before that was recorded, whose cache is gone).
    ``model_path``: where to load the model from when a slot is ln1's or ln_final's output, whose
    weight and bias are then read off the model and folded in (:mod:`train.norm_affine`); by default the
    model the harvest loaded (its ``--models`` name). Its weights must be the ones the cache recorded.
    ``device``: where that model loads and runs (whole, in float32: ``cuda`` for a model too large for RAM).
    ``model_name``: ``metadata.model_name``, the model SAELens loads with transformer-lens (default: the
    harvested model's name; a model harvested from a local folder needs the name transformer-lens knows it by).
    Raises :class:`SAELensExportError` for dictionaries SAELens cannot hold (see the module doc), and
    :class:`~train.norm_affine.NormAffineError` when a norm to fold cannot be read off the model.
    Every string written goes through :func:`shared.redact.redact_machine`: no home path or user
    name lands in ``cfg.json``.
    """
    if not str(out_dir).strip():
        raise ValueError("--out is empty (it would mean the current folder): give the folder to write into")
    if model_name is not None and not model_name.strip():
        raise ValueError("--model-name is empty: give the name transformer-lens knows the model by, or leave it out")
    if context_size is not None and (isinstance(context_size, bool) or not isinstance(context_size, int)
                                     or context_size < 1):
        raise ValueError(f"--context-size must be a whole number >= 1 (the tokens per sequence SAELens feeds the "
                         f"model), got {context_size!r}")
    out = Path(os.path.expanduser(str(out_dir)))
    source = _open_source(run_or_export_dir)
    model, meta, run_dir = source.model, source.metadata, source.run_dir
    if meta.get("space") == "normalized":
        raise SAELensExportError(f"{source.export} is the dictionary on normalized activations; export the raw-space "
                                 "one in the run's export/ folder (normalization folded in)")
    local = [] if is_hub_spec(source.export) else [Path(source.export), *([run_dir] if run_dir else [])]
    if out.resolve() in {p.resolve() for p in local}:
        raise ValueError(f"--out {out} is the run or export folder itself; give a new folder")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder (new, or one to overwrite the SAELens files in)")
    check_exportable(model)
    cfg = model.cfg

    run_cfg = read_json_object(run_dir / "config.json") if run_dir else {}
    manifest = training_cache_manifest(run_cfg, meta)
    harvested, hook_in = _slot_model_hook(cfg.slot_names[cfg.in_slots[0]])
    hook_out = _slot_model_hook(cfg.slot_names[cfg.out_slots[0]])[1]
    # Slot names may be written redacted (~/...) while the manifest keeps the folder: compare both so.
    names = MachineNames.here()
    man_model = next((m for m in manifest.get("models", []) if isinstance(m.get("name"), str)
                      and redact_text(m["name"], names) == redact_text(harvested, names)), {})
    if not man_model or hook_in not in manifest.get("hooks", []):
        manifest, man_model = {}, {}  # the folder now holds another harvest: trust nothing in it
    parallel = parallel_attn_mlp(man_model)
    sl_hook_in, reshape = saelens_hook(hook_in, parallel_attn_mlp=parallel)
    sl_hook_out = saelens_hook(hook_out, parallel_attn_mlp=parallel)[0] if cfg.arch == "directional" else None
    # ln1/ln_final's output has no HookedTransformer hook: SAELens reads / writes the norm's hook_normalized, and
    # the norm's weight and bias, read off the model, are folded in (an SAE's one slot is its input and output).
    to_fold = [h for h in dict.fromkeys([hook_in, hook_out])
               if normalized_hook(h) and saelens_hook(h, parallel_attn_mlp=parallel)[0] == normalized_hook(h)]
    norms = {}
    if to_fold:
        if not man_model.get("weights_fingerprint"):
            print(f"note: no weights fingerprint recorded for {harvested!r}; the norm is read from "
                  f"{model_path or harvested!r} unchecked: it must be the model the cache was harvested from")
        norms = fit_norm_affines(str(Path(model_path or harvested).expanduser()), to_fold, d_model=cfg.d_model,
                                 recorded_fingerprint=man_model.get("weights_fingerprint"), device=device)
    sl = to_saelens(model, norm_in=norms.get(hook_in), norm_out=norms.get(hook_out))
    # SAELens loads the model with from_pretrained_no_processing(name, **model_from_pretrained_kwargs). An
    # unprocessed transformer-lens 2.x LayerNorm fires hook_normalized after its weight and bias (3.x: before);
    # with fold_ln the norm has neither, so hook_normalized is the normalized input in every version SAELens
    # takes (>= 2.16), and folding changes no other hook we write.
    taps_norm = any(h and h.endswith(".hook_normalized") for h in (sl_hook_in, sl_hook_out))
    model_kwargs: dict[str, Any] = {"fold_ln": True} if taps_norm else {}
    excluded = manifest["excluded_tokens"] if isinstance(manifest.get("excluded_tokens"), dict) else {}
    dataset = str(manifest.get("dataset", {}).get("name") or "")
    if context_size is None:  # the cache's; runs record it too (since session 14), for a cache moved away
        recorded = run_cfg.get("cache") if isinstance(run_cfg.get("cache"), dict) else {}
        context_size = manifest.get("context_size", recorded.get("context_size"))

    metadata: dict[str, Any] = {
        "sae_lens_version": SAELENS_VERSION,
        "sae_lens_training_version": None,  # not trained by SAELens
        "model_name": model_name or harvested,
        "model_class_name": "HookedTransformer",
        "model_from_pretrained_kwargs": model_kwargs,
        "hook_name": sl_hook_in,
        "hook_head_index": None,
        "context_size": context_size,
        "prepend_bos": True,  # harvested sequences start with BOS (its row is excluded, as below)
        # SAELens: a list of ids, or a bool for all special tokens. The ids the harvest dropped (special ones
        # included); a manifest that records only the flag (or nothing: another tool's cache) gives that.
        "exclude_special_tokens": (list(excluded["token_ids"]) if isinstance(excluded.get("token_ids"), list)
                                   else bool(excluded.get("special", False))),
        # SAELens hands dataset_path to datasets.load_dataset; our built-in corpora are not there, and a local
        # file or folder is a path on the harvesting machine (crosscache.dataset keeps it).
        "dataset_path": None if dataset.startswith("builtin:") or names_local_path(dataset) else (dataset or None),
        "training_architecture": {"relu": "standard"}.get(cfg.activation, cfg.activation),
        "crosscache": {
            "format": PROVENANCE_FORMAT,
            "run": str(run_dir) if run_dir else None,
            "export": source.export,  # a folder, or the hf:// spec as given
            "hub_commit": source.hub_commit,  # what the spec resolved to (a branch moves; a commit does not)
            "export_weights_sha256": source.weights_sha256,
            "step": meta.get("step"),
            "cache": meta.get("cache"),
            "dataset": dataset or None,
            "model_revision": man_model.get("revision"),
            "model": harvested,  # as harvested
            "model_from_local_folder": bool(man_model.get("path")) or names_local_path(harvested),
            "arch": cfg.arch,
            "activation": cfg.activation,
            "k": cfg.k,
            "topk_score": cfg.topk_score if cfg.activation in ("topk", "batchtopk") else None,
            "skip": cfg.skip,
            "normalization_folded": meta.get("normalization_folded"),
            # The norm's weight and bias folded in where our slot is its output and SAELens's hook its normalized
            # input (None: no norm output among the slots).
            "norm_folded": ({"input": norms[hook_in].record() if hook_in in norms else None,
                             "output": norms[hook_out].record() if hook_out in norms else None,
                             "model": redact_text(str(model_path or harvested), names)} if norms else None),
            "latent_scale": ("SAELens latent = crosscache latent x c, c = sum of decoder norms in the normalized "
                             "training space (the TopK score); folded into W_enc, b_enc, W_dec"
                             if bool((sl.latent_scale_L != 1).any()) else "none: latents equal crosscache's"),
            # Per-slot keys (eval/ev/<model>/<hook>) repeat eval/ev/overall for one output slot:
            # keep the slot-free keys (eval/ev/overall, eval/l0/mean, ...: at most two "/").
            "eval": {k: v for k, v in meta.get("eval", {}).items() if k.count("/") <= 2},
        },
    }
    if cfg.arch == "directional":
        metadata["hook_name_out"] = sl_hook_out
        metadata["hook_head_index_out"] = None
    sae_cfg: dict[str, Any] = {
        "architecture": sl.architecture,
        "d_in": cfg.d_model,
        "d_sae": cfg.n_latents,
        **sl.cfg_fields,
        "dtype": _DTYPE_NAMES[model.b_enc_L.dtype],
        "device": "cpu",
        "apply_b_dec_to_input": False,  # our encoder reads x, not x - b_dec
        "normalize_activations": "none",  # the cache's normalization is folded into the weights
        "reshape_activations": reshape,  # "hook_z": SAELens flattens attn.hook_z's heads, as the harvest did
        "metadata": metadata,
    }
    sae_cfg, _ = redact_machine(sae_cfg, names)

    # One metadata key: safetensors writes several in hash-map order, which varies from save to save,
    # and the bytes (their sha256 in cfg.json) would then differ for the same dictionary.
    blob = safetensors_save(sl.tensors, metadata={"format": "pt"})
    sae_cfg["metadata"]["crosscache"]["weights_sha256"] = hashlib.sha256(blob).hexdigest()
    text = json.dumps(sae_cfg, indent=2, allow_nan=False) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / SAELENS_WEIGHTS_NAME, blob)
    atomic_write_bytes(out / SAELENS_CFG_NAME, text.encode())  # last: a folder with cfg.json is complete
    fsync_dir(out)
    return out


def export_saelens_cli(argv: list[str]) -> int:
    """``run_train.py export-saelens RUN_DIR|hf://USER/NAME[@REV] --out DIR``: prints what it wrote; errors exit 2."""
    parser = argparse.ArgumentParser(allow_abbrev=False, 
        prog="run_train.py export-saelens",
        description="Convert a trained SAE or transcoder (its raw-space export/, or a dictionary `run_train.py push` "
                    "put on the Hub) to a SAELens folder (cfg.json + sae_weights.safetensors) for sae_lens's "
                    "SAE.load_from_disk.")
    parser.add_argument("run", help="run folder (the --out of run_train.py), its export/ folder, or "
                                    "hf://USER/NAME[@REV] (a dictionary pushed with `run_train.py push`: branch, tag "
                                    "or commit)")
    parser.add_argument("--out", required=True, help="folder to write cfg.json and sae_weights.safetensors into")
    parser.add_argument("--context-size", type=int, default=None,
                        help="metadata.context_size (default: the training cache's, from its manifest)")
    parser.add_argument("--model", default=None,
                        help="for a slot on ln1's or ln_final's output: the model to read the norm's "
                             "weight and bias from, a local folder or Hub id with the weights the cache was harvested "
                             "from (default: the harvest's --models name)")
    parser.add_argument("--model-name", default=None,
                        help="metadata.model_name, the model SAELens loads with transformer-lens (default: the "
                             "harvested model's name); e.g. the Hub id a local model folder holds")
    parser.add_argument("--device", default="cpu",
                        help="where that model loads and runs, whole and in float32 (cpu, cuda, auto; default cpu)")
    args = parser.parse_args(argv)
    try:
        out = export_saelens(args.run, args.out, context_size=args.context_size, model_path=args.model,
                             device=args.device, model_name=args.model_name)
    except (ValueError, FileNotFoundError, HubError, ImportError) as e:  # HubError: an hf:// dictionary not had
        print(f"error: {e}", file=sys.stderr)
        return 2
    written = json.loads((out / SAELENS_CFG_NAME).read_text())
    print(f"wrote SAELens {written['architecture']} ({written['d_in']} -> {written['d_sae']} latents) to {out}")
    if written["metadata"].get("context_size") is None:
        where = ("the export was written before exports recorded their harvest, and its training cache is "
                 "not on this machine")
        print(f"note: context_size unknown ({where}); pass --context-size")
    if args.model_name is None and written["metadata"]["crosscache"]["model_from_local_folder"]:
        print(f"note: the model was harvested from a local folder, and SAELens loads model_name "
              f"{written['metadata']['model_name']!r} with transformer-lens, which knows models by name: pass "
              "--model-name (e.g. the Hub id the folder holds) unless that name works")
    return 0
