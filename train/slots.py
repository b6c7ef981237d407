"""Which cache slots a dictionary reads and writes.

The loader yields ``acts_BMPD`` for the chosen models and hooks; the trainer flattens it to
``x_BXD`` with slot ``x = m * P + p`` and picks ``in_slots`` / ``out_slots`` from it.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from shared.cache_format import Manifest

__all__ = ["SlotSpec", "resolve_slots", "SlotError"]


class SlotError(ValueError):
    """The chosen models/hooks do not exist in the cache or do not fit the architecture."""


@dataclass(frozen=True)
class SlotSpec:
    """Models and hooks to load, and the input/output slot indices into ``x_BXD``."""

    models: list[str]
    hooks: list[str]
    in_slots: list[int]
    out_slots: list[int]

    @property
    def slot_names(self) -> list[str]:
        return [f"{m}/{h}" for m in self.models for h in self.hooks]

    def slot(self, model: str, hook: str) -> int:
        return self.models.index(model) * len(self.hooks) + self.hooks.index(hook)


def _layer(hook: str) -> int | None:
    m = re.match(r"blocks\.(\d+)\.", hook)
    return int(m.group(1)) if m else None


def _check_names(kind: str, asked: list[str], available: list[str], cache_dir: str) -> None:
    missing = [a for a in asked if a not in available]
    if missing:
        # Hooks only: a typo there is common (hook_resid_pos), while a model name near another is another model.
        close = {m: c[0] for m in missing
                 if kind == "hook" and (c := difflib.get_close_matches(m, available, n=1, cutoff=0.6))}
        holds = (f"; did you mean {', '.join(f'{c!r} for {m!r}' for m, c in close.items())}? It holds" if close
                 else "; it holds")
        raise SlotError(f"{kind} {missing} not in cache {cache_dir}{holds} {kind}s {available}")
    if len(set(asked)) != len(asked):
        raise SlotError(f"{kind}s listed twice: {asked}")


def resolve_slots(
    manifest: Manifest,
    *,
    arch: str,
    models: list[str] | None,
    hooks: list[str] | None,
    in_hooks: list[str] | None,
    out_hooks: list[str] | None,
    cache_dir: str = "",
) -> SlotSpec:
    """Resolve and validate the slots of one dictionary against a cache's manifest."""
    model_names = list(models or manifest.model_names)
    _check_names("model", model_names, manifest.model_names, cache_dir)
    if arch == "crosscoder":
        hook_names = list(hooks or manifest.hooks)
        _check_names("hook", hook_names, manifest.hooks, cache_dir)
        n = len(model_names) * len(hook_names)
        return SlotSpec(model_names, hook_names, list(range(n)), list(range(n)))

    assert in_hooks and out_hooks
    _check_names("hook", list(in_hooks), manifest.hooks, cache_dir)
    _check_names("hook", list(out_hooks), manifest.hooks, cache_dir)
    hook_names = list(dict.fromkeys([*in_hooks, *out_hooks]))
    both = [h for h in in_hooks if h in out_hooks]
    if arch == "directional" and both:
        # An output slot that is also an input is reconstructed from itself: the identity map
        # (with --skip, exactly W_skip = I) scores perfectly and learns nothing about in -> out.
        raise SlotError(
            f"--arch directional maps --in-hooks to other --out-hooks, but {both} is both an input and an output "
            f"(the dictionary could learn the identity); to autoencode a hook (an SAE) use --arch crosscoder "
            f"--hooks {' '.join(both)}")
    if arch == "clt":
        if len(model_names) != 1:
            raise SlotError(
                f"a cross-layer transcoder reads one model, the cache holds {model_names}: pass --models NAME")
        in_layers, out_layers = [_layer(h) for h in in_hooks], [_layer(h) for h in out_hooks]
        if (len(in_hooks) != len(out_hooks) or None in in_layers or in_layers != out_layers
                or in_layers != sorted(set(in_layers))):
            raise SlotError(
                "a CLT needs one input and one output hook per layer, in ascending layer order, pairing the "
                f"same layer (e.g. --in-hooks blocks.0.hook_mlp_in blocks.1.hook_mlp_in --out-hooks "
                f"blocks.0.hook_mlp_out blocks.1.hook_mlp_out); got in {in_hooks} (layers {in_layers}) and out "
                f"{out_hooks} (layers {out_layers})")
    spec = SlotSpec(model_names, hook_names, [], [])
    ins = [spec.slot(m, h) for m in model_names for h in in_hooks]
    outs = [spec.slot(m, h) for m in model_names for h in out_hooks]
    return SlotSpec(model_names, hook_names, ins, outs)
