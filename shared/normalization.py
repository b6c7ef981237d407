"""Per-(model, hook) normalization of activations, estimated on a calibration sample.

Methods (``manifest.normalization.method``):
- ``norm_scale`` (default): one scalar per (model, hook) so that E‖x‖ = √d_model after
  scaling, as in the crosscoder replications. Keeps directions and relative norms, which the
  model-diffing decoder-norm analysis depends on.
- ``mean_std``: per-dimension ``(x - mean) / std``; mean and std live in the side file
  ``normalization.safetensors`` (tensors ``mean`` and ``std``, float32 ``[M, P, D]``).
- ``none``: stored as harvested.

Shards hold normalized values; :meth:`Normalization.undo` maps them back to raw space.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load, save

from shared.cache_format import NORMALIZATION_NAME, CacheError
from shared.hub_spec import rewrite_advice
from shared.shard_io import atomic_write_bytes

__all__ = ["NormMethod", "NORM_METHODS", "Normalization", "NormalizationEstimator"]

NormMethod = Literal["norm_scale", "mean_std", "none"]
NORM_METHODS: tuple[str, ...] = ("norm_scale", "mean_std", "none")

_STD_FLOOR = 1e-6
"""Dimensions with (almost) no variance are divided by this instead of ~0."""


@dataclass
class Normalization:
    """Normalization factors for every (model, hook) slot of a cache."""

    method: NormMethod
    scale_MP: torch.Tensor  # float32 [M, P]; 1.0 for mean_std and none
    mean_MPD: torch.Tensor | None = None
    std_MPD: torch.Tensor | None = None

    @staticmethod
    def estimate(raw_NMPD: torch.Tensor, method: NormMethod) -> "Normalization":
        """Estimate factors from calibration rows (special tokens must already be excluded).

        One sample in memory; :class:`NormalizationEstimator` gives the same factors from chunks."""
        est = NormalizationEstimator(method)
        est.add(raw_NMPD)
        return est.result()

    def slots_sha256(self, model_names: list[str], hooks: list[str], slots: list[tuple[str, str]]) -> str:
        """sha256 of the normalization of some ``(model, hook)`` slots, in the order given: the method,
        then per slot its scale and, for ``mean_std``, its mean and std (float32 bytes). Two caches that
        normalize these slots alike have the same digest, whatever else they hold and in whatever order
        (``model_names``/``hooks``: this cache's, which index ``scale_MP`` etc.)."""
        h = hashlib.sha256(str(self.method).encode())
        for model, hook in slots:
            i, j = model_names.index(model), hooks.index(hook)
            for t in [self.scale_MP[i, j]] + [t[i, j] for t in (self.mean_MPD, self.std_MPD) if t is not None]:
                h.update(t.detach().to("cpu").float().contiguous().numpy().tobytes())
        return h.hexdigest()

    def apply(self, raw_NMPD: torch.Tensor) -> torch.Tensor:
        """Raw activations -> normalized (float32)."""
        x = raw_NMPD.to(torch.float32)
        if self.method == "mean_std":
            assert self.mean_MPD is not None and self.std_MPD is not None
            return (x - self.mean_MPD.to(x.device)) / self.std_MPD.to(x.device)
        return x * self.scale_MP.to(x.device)[..., None]

    def undo(self, norm_NMPD: torch.Tensor) -> torch.Tensor:
        """Normalized activations -> raw (float32)."""
        x = norm_NMPD.to(torch.float32)
        if self.method == "mean_std":
            assert self.mean_MPD is not None and self.std_MPD is not None
            return x * self.std_MPD.to(x.device) + self.mean_MPD.to(x.device)
        return x / self.scale_MP.to(x.device)[..., None]

    def to(self, device: torch.device | str) -> "Normalization":
        """The same factors on ``device`` (so :meth:`apply` moves nothing per call)."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Normalization(self.method, move(self.scale_MP), move(self.mean_MPD), move(self.std_MPD))

    def select(self, models: list[int], hooks: list[int]) -> "Normalization":
        """The factors of a subset of slots, in the order asked."""
        mi, hi = torch.tensor(models), torch.tensor(hooks)
        pick = lambda t: None if t is None else t[mi][:, hi]  # noqa: E731
        return Normalization(self.method, pick(self.scale_MP), pick(self.mean_MPD), pick(self.std_MPD))

    def to_manifest(self, calibration_rows: int) -> dict[str, Any]:
        """The ``normalization`` manifest entry (side-file tensors are written separately; their
        file's sha256 is listed, so a damaged side file is found on load and by ``verify``)."""
        side = self._side_file_bytes()
        return {
            "method": self.method,
            "scale": [[float(s) for s in row] for row in self.scale_MP.tolist()],
            "file": NORMALIZATION_NAME if side is not None else None,
            "sha256": hashlib.sha256(side).hexdigest() if side is not None else None,
            "calibration_rows": int(calibration_rows),
            "target": "E|x| = sqrt(d_model)" if self.method == "norm_scale" else None,
        }

    def _side_file_bytes(self) -> bytes | None:
        """``normalization.safetensors`` as bytes (deterministic for the same factors); None
        for a method without a side file."""
        if self.method != "mean_std":
            return None
        assert self.mean_MPD is not None and self.std_MPD is not None
        return save({"mean": self.mean_MPD.contiguous(), "std": self.std_MPD.contiguous()})

    def write_side_file(self, cache_dir: str | Path) -> None:
        """Write ``normalization.safetensors`` (only for ``mean_std``)."""
        side = self._side_file_bytes()
        if side is not None:
            atomic_write_bytes(Path(cache_dir) / NORMALIZATION_NAME, side)

    @staticmethod
    def from_manifest(cache_dir: str | Path, entry: dict[str, Any], *, model_names: list[str] | None = None,
                      hooks: list[str] | None = None) -> "Normalization":
        """Rebuild from a manifest's ``normalization`` entry (and side file). A side file that is
        missing, unreadable, of other shapes, unlike its listed sha256, or whose mean is not finite or
        std not finite and > 0 raises :class:`CacheError` (``model_names``, ``hooks``: the manifest's,
        to name the slot at fault)."""
        method = entry.get("method")
        if method not in NORM_METHODS:
            raise CacheError(f"manifest normalization.method {method!r} is not one of {NORM_METHODS}")
        scale = torch.tensor(entry["scale"], dtype=torch.float32)
        if method != "mean_std":
            return Normalization(method, scale)
        path = Path(cache_dir) / (entry.get("file") or NORMALIZATION_NAME)
        if not path.is_file():
            fix = rewrite_advice(path, local="restore the file, or delete the cache folder and re-run the harvest")
            raise CacheError(f"{path} is missing: a mean_std cache keeps its mean and std there; {fix}")
        data = path.read_bytes()
        problem = None
        if entry.get("sha256") and hashlib.sha256(data).hexdigest() != str(entry["sha256"]).lower():
            problem = "its sha256 differs from the manifest's"
        else:
            try:
                tensors = load(data)
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
                problem = f"not a readable safetensors file ({e})"
            else:
                mean, std = tensors.get("mean"), tensors.get("std")
                if mean is None or std is None:
                    problem = f"it holds {sorted(tensors)}, not mean and std"
                elif mean.ndim != 3 or mean.shape != std.shape or tuple(mean.shape[:2]) != tuple(scale.shape):
                    problem = (f"mean {list(mean.shape)} and std {list(std.shape)} do not fit the manifest's "
                               f"{list(scale.shape)} (models, hooks)")
                else:
                    problem = _factors_problem(mean.float(), std.float(), model_names, hooks)
        if problem is not None:
            fix = rewrite_advice(path, local="restore the file, or delete the cache folder and re-run the harvest")
            raise CacheError(
                f"{path} is damaged: {problem}. The cache's rows cannot be mapped back to raw activations "
                f"without it; {fix}"
            )
        return Normalization(method, scale, tensors["mean"].float(), tensors["std"].float())


def _factors_problem(mean_MPD: torch.Tensor, std_MPD: torch.Tensor, model_names: list[str] | None,
                     hooks: list[str] | None) -> str | None:
    """What makes mean_std factors unusable, naming the first (model, hook) slot at fault; None if they
    are fine. Rows are divided by std: 0, negative or NaN there turns a slot's rows (and a dictionary
    trained on them, once the normalization is folded in) into inf or NaN."""
    bad_MPD = ~torch.isfinite(mean_MPD) | ~torch.isfinite(std_MPD) | ~(std_MPD > 0)
    if not bad_MPD.any():
        return None
    m, p, d = (int(i) for i in bad_MPD.nonzero()[0])
    slot = (f"{model_names[m]}/{hooks[p]}" if model_names is not None and hooks is not None
            and m < len(model_names) and p < len(hooks) else f"models[{m}]/hooks[{p}]")
    return (f"slot {slot} has mean {float(mean_MPD[m, p, d])} and std {float(std_MPD[m, p, d])} at dimension {d} "
            f"({int(bad_MPD[m, p].sum())} such dimension(s)), but every mean must be finite and every std finite and "
            f"> 0 (rows are divided by it; the harvest floors std at {_STD_FLOOR})")


class NormalizationEstimator:
    """Running estimate of a :class:`Normalization` over calibration rows given in chunks.

    Sums are float64 and chunks are combined exactly (Chan et al.'s pairwise update for mean and
    variance), so the factors do not depend on how the sample is cut. Memory is the sums plus one
    chunk converted to float64 at a time (``max_chunk_bytes``): the harvest used to concatenate
    its calibration rows and copy them twice more (float32, float64), ~4x the sample's size at peak.
    """

    def __init__(self, method: NormMethod, *, max_chunk_bytes: int = 256 << 20) -> None:
        if method not in NORM_METHODS:
            raise ValueError(f"normalize must be one of {NORM_METHODS}, got {method!r}")
        self.method: NormMethod = method
        self.max_chunk_bytes = max_chunk_bytes
        self.n_rows = 0
        self._shape_MPD: tuple[int, int, int] | None = None
        self._norm_sum_MP: torch.Tensor | None = None  # norm_scale: sum of row norms
        self._mean_MPD: torch.Tensor | None = None  # mean_std: running mean ...
        self._m2_MPD: torch.Tensor | None = None  # ... and sum of squared deviations from it

    def add(self, raw_NMPD: torch.Tensor) -> None:
        """Add calibration rows ``[N, M, P, D]`` (any float dtype, any device)."""
        if raw_NMPD.dim() != 4:
            raise ValueError(f"calibration rows must be [N, M, P, D], got shape {tuple(raw_NMPD.shape)}")
        shape = tuple(raw_NMPD.shape[1:])
        if self._shape_MPD is None:
            self._shape_MPD = shape  # type: ignore[assignment]
        elif shape != self._shape_MPD:
            raise ValueError(f"calibration rows of shape {shape} after rows of shape {self._shape_MPD}")
        row_bytes = 8 * max(1, math.prod(shape))
        step = max(1, self.max_chunk_bytes // row_bytes)
        for lo in range(0, raw_NMPD.shape[0], step):
            self._add_chunk(raw_NMPD[lo:lo + step].to(device="cpu", dtype=torch.float64))

    def _add_chunk(self, x_NMPD: torch.Tensor) -> None:
        n = x_NMPD.shape[0]
        if self.method == "norm_scale":
            s = x_NMPD.norm(dim=-1).sum(dim=0)
            self._norm_sum_MP = s if self._norm_sum_MP is None else self._norm_sum_MP + s
        elif self.method == "mean_std":
            mean_MPD = x_NMPD.mean(dim=0)
            m2_MPD = (x_NMPD - mean_MPD).square().sum(dim=0)
            if self._mean_MPD is None or self._m2_MPD is None:
                self._mean_MPD, self._m2_MPD = mean_MPD, m2_MPD
            else:
                total = self.n_rows + n
                delta_MPD = mean_MPD - self._mean_MPD
                self._mean_MPD = self._mean_MPD + delta_MPD * (n / total)
                self._m2_MPD = self._m2_MPD + m2_MPD + delta_MPD.square() * (self.n_rows * n / total)
        self.n_rows += n

    def result(self) -> Normalization:
        """The normalization of every row added so far."""
        if self.n_rows == 0 or self._shape_MPD is None:
            raise ValueError("cannot estimate normalization from an empty calibration sample")
        m, p, d = self._shape_MPD
        if self.method == "norm_scale":
            assert self._norm_sum_MP is not None
            mean_norm_MP = self._norm_sum_MP / self.n_rows
            if (mean_norm_MP == 0).any():
                raise ValueError("an activation slot is all zeros on the calibration sample")
            if not torch.isfinite(mean_norm_MP).all():
                raise ValueError("an activation slot is inf or NaN on the calibration sample")
            return Normalization("norm_scale", (math.sqrt(d) / mean_norm_MP).to(torch.float32))
        if self.method == "mean_std":
            assert self._mean_MPD is not None and self._m2_MPD is not None
            std_MPD = (self._m2_MPD / self.n_rows).sqrt().clamp_min(_STD_FLOOR)
            return Normalization("mean_std", torch.ones(m, p), self._mean_MPD.to(torch.float32),
                                 std_MPD.to(torch.float32))
        return Normalization("none", torch.ones(m, p))
