"""A norm's weight and bias, read off the model as it runs: ``output = normalized · weight + bias``.

Tools built on transformer-lens 2/3 (SAELens) tap a norm at ``*.hook_normalized``, the normalized input
before the norm's weight and bias, where the harvest records the norm's output (``ln1.hook_out``,
``ln_final.hook_out``; ``ln2.hook_out`` = ``mlp.hook_in`` has a hook of its own in SAELens). A dictionary
trained on the output runs exactly on the normalized input once the norm's elementwise affine map is folded
into its weights (see :mod:`train.export_saelens`). This module finds that map.

It is fitted, not read from the parameters: the model is run (transformer-lens 4's bridge, as the harvest
runs it) on a few random sequences, both hooks are captured, and ``weight``, ``bias`` are the per-coordinate
least-squares fit of the output on the normalized input. So conventions such as Gemma's ``(1 + weight)``
need no special case, and a norm that is *not* elementwise affine in the normalized input (or a
hook_normalized that holds something else) is caught by the fit's residual and refused.
"""

from __future__ import annotations

import contextlib
import io
import re
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["NORM_OUTPUTS", "NormAffine", "NormAffineError", "fit_norm_affines", "normalized_hook"]

NORM_OUTPUTS = {"ln1.hook_out": "ln1", "ln2.hook_out": "ln2", "mlp.hook_in": "ln2", "ln_final.hook_out": "ln_final"}
"""Hook points (transformer-lens 4 names) that hold a norm's output, and the norm's name."""

FIT_TOLERANCE = 1e-4
"""Largest accepted residual of the fit, relative to the output row's norm (float32 captures fit to ~1e-7)."""

_PROBE_SEQUENCES, _PROBE_TOKENS = 8, 64  # 512 rows: far more than the 2 per coordinate a fit needs


class NormAffineError(ValueError):
    """The norm's map cannot be had (model not loadable, other weights, not elementwise affine)."""


@dataclass(frozen=True)
class NormAffine:
    """``hook`` = ``normalized_hook`` · ``weight_D`` + ``bias_D`` (elementwise, float64)."""

    hook: str
    normalized_hook: str
    weight_D: torch.Tensor
    bias_D: torch.Tensor
    max_rel_residual: float
    """Worst row of the fit: ‖output − (normalized · weight + bias)‖ / ‖output‖."""

    def record(self) -> dict[str, Any]:
        """What an export writes about the fold (JSON)."""
        return {"hook": self.hook, "normalized_hook": self.normalized_hook,
                "bias": "zero" if not bool(self.bias_D.any()) else "fitted",
                "fit_max_rel_residual": self.max_rel_residual}


def normalized_hook(hook: str) -> str | None:
    """``blocks.L.<norm>.hook_normalized`` for a hook holding that norm's output (``blocks.L.ln2.hook_out``,
    ``blocks.L.mlp.hook_in``, ``ln_final.hook_out``); None for any other hook."""
    m = re.match(r"(blocks\.\d+\.)?(.+)$", hook)
    prefix, point = (m.group(1) or "", m.group(2)) if m else ("", hook)
    norm = NORM_OUTPUTS.get(point)
    if norm is None or (norm == "ln_final") == bool(prefix):
        return None
    return f"{prefix}{norm}.hook_normalized"


def _fit(y_ND: torch.Tensor, n_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Per-coordinate least squares ``y ≈ n · w + b``; b is exactly 0 when a fit through the origin is as good
    (RMSNorm, LayerNorm without bias). Returns (w, b, worst relative row residual)."""
    def worst(w: torch.Tensor, b: torch.Tensor) -> float:
        res = (y_ND - (n_ND * w + b)).norm(dim=-1) / y_ND.norm(dim=-1).clamp_min(1e-30)
        return float(res.max())

    w0 = (n_ND * y_ND).sum(0) / (n_ND * n_ND).sum(0).clamp_min(1e-300)
    zero = torch.zeros_like(w0)
    r0 = worst(w0, zero)
    n_mean, y_mean = n_ND.mean(0), y_ND.mean(0)
    var = ((n_ND - n_mean) ** 2).sum(0)
    if bool((var <= 0).any()):  # a coordinate constant over the probe: no bias can be told from its weight
        if r0 <= FIT_TOLERANCE:
            return w0, zero, r0
        raise NormAffineError(f"the normalized input is constant in {int((var <= 0).sum())} coordinates over "
                              "the probe: the norm's weight there cannot be read off")
    w = ((n_ND - n_mean) * (y_ND - y_mean)).sum(0) / var
    b = y_mean - w * n_mean
    r = worst(w, b)
    # No bias (RMSNorm, LayerNorm(bias=False)): the origin fit is as good as the full one, up to float32 noise.
    if r0 <= max(2 * r, 1e-6):
        return w0, zero, r0
    return w, b, r


def fit_norm_affines(model_name: str, hooks: list[str], *, d_model: int | None = None,
                     recorded_fingerprint: str | None = None, device: str = "cpu") -> dict[str, NormAffine]:
    """The map of each norm-output hook in ``hooks`` (see :data:`NORM_OUTPUTS`) of ``model_name`` (a toy name,
    a local folder or a Hub id, as the harvest loads it), in float32.

    ``d_model``: the width the dictionary reads; a model of another width is refused.
    ``recorded_fingerprint``: the weights fingerprint the cache recorded for this model (at the dtype the
    harvest ran it in: float32, bfloat16 or float16 are tried); a model whose weights differ now is refused
    (its norm is not the one the dictionary was trained behind). ``device``: where the
    model loads and runs (``cpu``, ``cuda``, ``auto``): the whole model is loaded, in float32. Raises
    :class:`NormAffineError` naming the problem."""
    from harvest.models import (HarvestInputError, _capture, load_models, resolve_device, stop_layer_for,
                                weights_fingerprint)

    targets = {h: normalized_hook(h) for h in hooks}
    if any(t is None for t in targets.values()):
        raise NormAffineError(f"not a norm's output: {[h for h, t in targets.items() if t is None]}")
    names = list(dict.fromkeys([*targets, *targets.values()]))  # type: ignore[list-item]
    try:
        dev = resolve_device(device)
    except HarvestInputError as e:
        raise NormAffineError(str(e)) from None
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the harvest's notes on hook_normalized: not news here
            lm = load_models([model_name], names, context_size=_PROBE_TOKENS, device=dev, model_dtype=torch.float32,
                             progress=False)
    except HarvestInputError as e:
        raise NormAffineError(f"reading the norm's weight and bias needs the model: {e} (or pass --model PATH: a "
                              "folder or Hub id with the weights the cache was harvested from)") from e
    bridge = lm.bridges[0]
    if d_model is not None and int(bridge.cfg.d_model) != d_model:
        raise NormAffineError(f"model {model_name!r} is {int(bridge.cfg.d_model)} wide, the dictionary {d_model}: not "
                              "the model the cache was harvested from")
    if recorded_fingerprint:
        weights = getattr(bridge, "original_model", bridge)
        # The harvest fingerprints the model as it ran it; loaded here in float32, the same weights match
        # once rounded to the harvest's dtype.
        seen = [weights_fingerprint(weights, dt) for dt in (None, torch.bfloat16, torch.float16)]
        now = seen[0]
        if recorded_fingerprint not in seen:
            raise NormAffineError(
                f"model {model_name!r} has other weights than the harvest recorded (fingerprint "
                f"{recorded_fingerprint[:12]} then, {now[:12]} now): its norm is not the one this dictionary was "
                "trained behind. Give the model the cache was harvested from")
    gen = torch.Generator().manual_seed(0)
    tokens_BP = torch.randint(0, lm.n_vocab, (_PROBE_SEQUENCES, _PROBE_TOKENS), generator=gen)
    if lm.bos_id is not None:
        tokens_BP[:, 0] = lm.bos_id
    stop = stop_layer_for(names, int(bridge.cfg.n_layers))  # the blocks after the last norm do not matter
    captured = _capture(bridge, names, tokens_BP.to(dev), stop)
    out: dict[str, NormAffine] = {}
    for hook, target in targets.items():
        missing = [h for h in (hook, target) if captured.get(h) is None]
        if missing:
            raise NormAffineError(f"{', '.join(missing)} never fired in {model_name!r}: no fold for {hook}")
        y_ND, n_ND = (captured[h].detach().to("cpu", torch.float64).reshape(-1, captured[h].shape[-1])
                      for h in (hook, target))
        if y_ND.shape != n_ND.shape:
            raise NormAffineError(f"{hook} is {y_ND.shape[-1]} wide but {target} {n_ND.shape[-1]}")
        w, b, residual = _fit(y_ND, n_ND)
        if residual > FIT_TOLERANCE:
            raise NormAffineError(
                f"{hook} of {model_name!r} is not {target} x weight + bias, elementwise (worst relative residual "
                f"{residual:.2g} > {FIT_TOLERANCE:g}), so no weights fold it; train on a hook SAELens has instead")
        out[hook] = NormAffine(hook, target, w, b, residual)  # type: ignore[arg-type]
    return out
