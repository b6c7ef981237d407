"""Export: fold the cache's normalization into a dictionary's weights; save and load it.

The trainer sees normalized activations ``x' = x · a + c`` per slot and dim (``norm_scale``:
a = scale[m, p], c = 0; ``mean_std``: a = 1/std, c = −mean/std; ``none``: a = 1, c = 0, see
``shared.normalization``). :func:`fold_normalization` returns a dictionary that takes *raw*
activations and returns raw reconstructions, with the same latents:

- encoder: ``W_enc' = a_in · W_enc``, ``b_enc' = b_enc + Σ_{x,d} c_in · W_enc``;
- decoder: ``W_dec' = W_dec / a_out``, ``b_dec' = (b_dec − c_out) / a_out``;
- skip: ``W_skip' = a_in · W_skip / a_out``, and ``Σ c_in · W_skip / a_out`` joins ``b_dec'``;
- thresholds (jumprelu θ) are unchanged because pre-activations are unchanged; topk/batchtopk
  rank by a score that uses decoder norms, so ``score_scale_L`` absorbs the change of norms and
  the BatchTopK threshold keeps its meaning;
- tied shared decoders are untied (``tie_shared_decoder=False``): the models' raw scales differ.

Analysis of decoder norms (relative norms for model diffing) belongs on the *normalized*
dictionary, where each model's activations have the same scale.

On disk (``save_dictionary``): a folder with ``model.safetensors`` (the state dict; never
pickle) and ``config.json`` ``{"format", "config", "metadata", "weights_sha256"}``; each file is
written atomically and the config (written last) pins the weights' checksum, so a torn
overwrite is detected on load. ``load_dictionary`` and ``load_metadata`` also take ``hf://USER/NAME[@REV]``,
a dictionary ``run_train.py push`` put in a Hub model repo (:mod:`train.hub_dictionary_fetch`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from einops import einsum
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from harvest.token_stream import local_file_format
from shared.config import config_to_json, read_json_object
from shared.hub_spec import is_hub_spec
from shared.normalization import Normalization
from shared.redact import redact_machine
from shared.shard_io import atomic_write_bytes, fsync_dir
from train.dictionary import Dictionary, DictionaryConfig

if TYPE_CHECKING:
    from train.hub_dictionary_fetch import FetchedDictionary

__all__ = ["SlotNorm", "fold_normalization", "save_dictionary", "load_dictionary", "load_hub_dictionary",
           "load_metadata", "names_local_path", "parallel_attn_mlp", "training_cache_manifest", "EXPORT_FORMAT"]

EXPORT_FORMAT = "crosscache.dictionary/1"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


@dataclass
class SlotNorm:
    """Per-slot affine normalization ``x_norm = x_raw · scale_XD + shift_XD`` (float32 [X, D])."""

    scale_XD: torch.Tensor
    shift_XD: torch.Tensor

    @staticmethod
    def from_normalization(norm: Normalization, slots: list[int], d_model: int) -> "SlotNorm":
        """The factors of ``slots`` (indices into x_BXD, slot = m·P + p) of a cache's normalization."""
        n_models, n_hooks = norm.scale_MP.shape
        if any(not 0 <= s < n_models * n_hooks for s in slots):
            raise ValueError(f"slots {slots} out of range for a normalization of {n_models} models x {n_hooks} hooks")
        m = torch.tensor([s // n_hooks for s in slots])
        p = torch.tensor([s % n_hooks for s in slots])
        if norm.method == "mean_std":
            assert norm.mean_MPD is not None and norm.std_MPD is not None
            std_XD = norm.std_MPD[m, p].to(torch.float32)
            return SlotNorm(1.0 / std_XD, -norm.mean_MPD[m, p].to(torch.float32) / std_XD)
        scale_XD = norm.scale_MP[m, p].to(torch.float32)[:, None].expand(len(slots), d_model).clone()
        return SlotNorm(scale_XD, torch.zeros(len(slots), d_model))

    @staticmethod
    def identity(n_slots: int, d_model: int) -> "SlotNorm":
        return SlotNorm(torch.ones(n_slots, d_model), torch.zeros(n_slots, d_model))


def _as_slot_norm(norm: SlotNorm | Normalization, slots: list[int], d_model: int, name: str) -> SlotNorm:
    sn = SlotNorm.from_normalization(norm, slots, d_model) if isinstance(norm, Normalization) else norm
    want = (len(slots), d_model)
    if tuple(sn.scale_XD.shape) != want or tuple(sn.shift_XD.shape) != want:
        raise ValueError(f"{name}: expected scale/shift of shape {list(want)}, got "
                         f"{list(sn.scale_XD.shape)} / {list(sn.shift_XD.shape)}")
    if not bool((sn.scale_XD != 0).all()):
        raise ValueError(f"{name}: a scale is zero; the normalization cannot be undone")
    return sn


@torch.no_grad()
def fold_normalization(
    model: Dictionary, norm_in: SlotNorm | Normalization, norm_out: SlotNorm | Normalization
) -> Dictionary:
    """A new dictionary on raw activations, equal to ``model`` on normalized ones.

    ``norm_in`` / ``norm_out``: :class:`SlotNorm` of the input / output slots, or the cache's
    :class:`~shared.normalization.Normalization` (``cache.normalization()``), from which the
    in/out slots' factors are picked by ``model.cfg.in_slots`` / ``out_slots``. The result is in
    ``model``'s train/eval mode.
    """
    cfg = model.cfg
    ref = model.b_enc_L
    f64 = dict(dtype=torch.float64, device=ref.device)
    sin = _as_slot_norm(norm_in, cfg.in_slots, cfg.d_model, "norm_in")
    sout = _as_slot_norm(norm_out, cfg.out_slots, cfg.d_model, "norm_out")
    a_in, c_in = sin.scale_XD.to(**f64), sin.shift_XD.to(**f64)
    a_out, c_out = sout.scale_XD.to(**f64), sout.shift_XD.to(**f64)

    new_cfg = dataclasses.replace(cfg, tie_shared_decoder=False) if model.n_tied else cfg
    with torch.random.fork_rng(devices=[]):  # the throwaway init must not move the trainer's RNG
        folded = Dictionary(new_cfg).to(device=ref.device, dtype=ref.dtype)
    fresh = folded.state_dict()  # copy what folding leaves alone (thresholds, score scales)
    folded.load_state_dict({k: v for k, v in model.state_dict().items()
                            if k in fresh and fresh[k].shape == v.shape}, strict=False)

    def put(name: str, value: torch.Tensor) -> None:
        getattr(folded, name).copy_(value.to(ref.dtype))

    W_enc = model.W_enc_XiDL.to(torch.float64)
    put("W_enc_XiDL", W_enc * a_in[:, :, None])
    if cfg.arch == "clt":
        shift_L = einsum(c_in, W_enc, "x d, x d l -> x l").reshape(-1)
        put("W_dec_XiLXoD", model.W_dec_XiLXoD.to(torch.float64) / a_out[None, None])
    else:
        shift_L = einsum(c_in, W_enc, "x d, x d l -> l")
        put("W_dec_LXoD", model.decoder_weight().to(torch.float64) / a_out)  # untied if it was tied
    put("b_enc_L", model.b_enc_L.to(torch.float64) + shift_L)

    b_dec = model.b_dec_XoD.to(torch.float64) - c_out
    if cfg.skip and cfg.arch == "clt":
        S = model.W_skip_XiDD.to(torch.float64)
        put("W_skip_XiDD", a_in[:, :, None] * S / a_out[:, None, :])
        b_dec = b_dec + einsum(c_in, S, "x d, x d e -> x e")
    elif cfg.skip:
        S = model.W_skip_XiDXoD.to(torch.float64)
        put("W_skip_XiDXoD", a_in[:, :, None, None] * S / a_out[None, None])
        b_dec = b_dec + einsum(c_in, S, "xi d, xi d xo e -> xo e")
    put("b_dec_XoD", b_dec / a_out)

    if cfg.activation in ("topk", "batchtopk") and cfg.topk_score == "pre_x_dec_norm":
        # Keep each latent's ranking score: score_scale' = score_scale · w_normalized / w_raw.
        w_old = model.decoder_norms().sum(-1).to(torch.float64)
        w_new = folded.decoder_norms().sum(-1).to(torch.float64)
        ratio = torch.where(w_new > 0, w_old / w_new.clamp_min(1e-300), torch.ones_like(w_new))
        put("score_scale_L", model.score_scale_L.to(torch.float64) * ratio)
    return folded.train(model.training)  # the same mode, so the default inference rule is the same too


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_dictionary(path: str | Path, model: Dictionary, metadata: dict[str, Any], *, shareable: bool = False) -> None:
    """Write ``path/model.safetensors`` and ``path/config.json`` (atomic, config last).

    ``metadata`` (JSON-serialisable: e.g. normalization folded or not, cache id, step, metrics)
    is stored verbatim under ``"metadata"``. ``shareable``: a folder meant to be handed on (a run's
    ``export/``): paths under this machine's home folder are written ``~/...`` and user and host
    names ``<user>``/``<host>`` in the config and metadata (:func:`shared.redact.redact_machine`),
    as ``push`` publishes a manifest. The run's own ``config.json`` keeps them as they were.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    blob = safetensors_save(tensors, metadata={"format": EXPORT_FORMAT})
    payload = {"format": EXPORT_FORMAT, "config": config_to_json(model.cfg), "metadata": metadata,
               "weights_sha256": _sha256(blob)}
    if shareable:
        payload = redact_machine(payload)[0]
    try:
        text = json.dumps(payload, indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"save_dictionary: metadata must be JSON-serialisable (no NaN/inf): {e}") from e
    atomic_write_bytes(path / WEIGHTS_NAME, blob)
    atomic_write_bytes(path / CONFIG_NAME, (text + "\n").encode())
    fsync_dir(path)


def _read_config(path: Path) -> dict[str, Any]:
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: not a saved dictionary (see save_dictionary)")
    data = json.loads(cfg_path.read_text())
    if data.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{cfg_path}: format {data.get('format')!r}, expected {EXPORT_FORMAT!r}")
    return data


def load_metadata(path: str | Path) -> dict[str, Any]:
    """The ``metadata`` dict stored by :func:`save_dictionary`, of a folder or of ``hf://USER/NAME[@REV]``
    (only its ``config.json`` is downloaded)."""
    if is_hub_spec(path):
        from train.hub_dictionary_fetch import fetch_dictionary

        return dict(fetch_dictionary(str(path), weights=False).config["metadata"])
    return dict(_read_config(Path(path))["metadata"])


def load_dictionary(path: str | Path, device: str | torch.device = "cpu") -> Dictionary:
    """Rebuild a dictionary saved by :func:`save_dictionary` (safetensors only, never pickle).

    ``path``: a folder, or ``hf://USER/NAME[@REV]``: its ``config.json`` and ``model.safetensors`` are
    downloaded into the Hugging Face cache (``HF_HUB_OFFLINE=1``: the copy there) and the weights checked
    against the config's sha256, a damaged copy downloaded once more (:mod:`train.hub_dictionary_fetch`).
    Returned in eval mode: ``encode``/``forward`` then default to the inference rule (batchtopk:
    the learned per-row threshold, not the top k·B of the batch). Call ``.train()`` to train it on.
    """
    if is_hub_spec(path):
        return load_hub_dictionary(str(path), device)[0]
    path = Path(path)
    data = _read_config(path)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found (config.json is there: an interrupted save?)")
    blob = weights.read_bytes()
    if _sha256(blob) != data.get("weights_sha256"):
        raise ValueError(f"{weights}: checksum does not match {CONFIG_NAME} (torn or edited export); save again")
    return _build(path, data, blob, device)


def load_hub_dictionary(spec: str, device: str | torch.device = "cpu") -> tuple[Dictionary, FetchedDictionary]:
    """:func:`load_dictionary` of ``hf://USER/NAME[@REV]``, with what the fetch found: the parsed ``config.json``
    (metadata, weights sha256) and the commit the files came from, for converters that record their source.

    Errors are :func:`train.hub_dictionary_fetch.fetch_dictionary`'s (``ValueError`` for a bad spec,
    :class:`~shared.hub_spec.HubError` for a repo that cannot be had or is no dictionary).
    """
    from train.hub_dictionary_fetch import fetch_dictionary

    fetched = fetch_dictionary(spec)
    assert fetched.weights is not None  # checked against the config's sha256
    return _build(fetched.folder, fetched.config, fetched.weights, device), fetched


def training_cache_manifest(run_info: dict[str, Any], metadata: dict[str, Any]) -> dict[str, Any]:
    """The manifest of the cache a dictionary trained on, for the facts its run folder does not repeat
    (context size, dataset, excluded tokens): read from the cache if it is still where the run's
    ``config.json`` (``run_info``) or the export's ``metadata`` says, else the export's own record of
    it (``metadata.harvest``: the manifest's keys for the dictionary's models and hooks), else {}."""
    cache = run_info.get("cache") if isinstance(run_info.get("cache"), dict) else {}
    for where in (cache.get("path"), metadata.get("cache")):
        if isinstance(where, str) and where and not is_hub_spec(where):
            manifest = read_json_object(Path(where).expanduser() / "manifest.json")  # export/ writes ~/...
            if manifest:
                return manifest
    recorded = metadata.get("harvest")
    return dict(recorded) if isinstance(recorded, dict) else {}


def names_local_path(name: str) -> bool:
    """Whether a model or dataset name the harvest recorded reads as a path on the machine that harvested
    (absolute, ./relative, ~/..., <user> as published, or a data file's suffix), not a Hub id. By its text
    alone: what exists in this process's folder says nothing of the harvest's (a folder named gpt2 here is no
    sign). The exports write a Hub id as the model or dataset other tools load; a path they cannot."""
    return name.startswith((".", "/", "~", "<")) or local_file_format(name) is not None


def parallel_attn_mlp(entry: dict[str, Any] | None) -> bool:
    """Whether the model of a manifest ``models`` entry runs attention and MLP in parallel (HookedTransformer then
    never fires ``hook_resid_mid``): as the harvest recorded it (newer caches), else as its HF config declares
    it when its folder is on this machine, else False."""
    if isinstance((entry or {}).get("parallel_attn_mlp"), bool):
        return bool(entry["parallel_attn_mlp"])  # type: ignore[index]
    folder = (entry or {}).get("path")
    cfg_file = Path(folder).expanduser() / "config.json" if folder else None
    if cfg_file is None or not cfg_file.is_file():
        return False
    cfg = json.loads(cfg_file.read_text())
    return bool(cfg.get("model_type") in ("gptj", "phi", "cohere") or cfg.get("use_parallel_residual")
                or cfg.get("parallel_attn"))


def _build(path: Path, data: dict[str, Any], blob: bytes, device: str | torch.device) -> Dictionary:
    """The dictionary of a parsed ``config.json`` (``data``) and its checked weights (``blob``), read from ``path``."""
    weights = path / WEIGHTS_NAME
    try:
        cfg = DictionaryConfig(**data["config"])
    except TypeError as e:
        raise ValueError(f"{path / CONFIG_NAME}: config does not fit DictionaryConfig: {e}") from e
    with torch.random.fork_rng(devices=[]):  # weights come from the file; leave the caller's RNG alone
        model = Dictionary(cfg)
    tensors = safetensors_load(blob)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{weights}: tensors do not fit the config in {CONFIG_NAME}: {e}") from e
    return model.to(device).eval()
