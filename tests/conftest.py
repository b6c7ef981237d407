"""Shared fixtures. No test touches the network: hubs are forced offline here."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def toy_dirs() -> dict[str, Path]:
    """The three toy models (built once per machine into the toy cache folder)."""
    from harvest.toy_models import TOY_NAMES, ensure_toy_model

    return {name: ensure_toy_model(name) for name in TOY_NAMES}


def comparable_manifest(manifest_path: Path) -> dict:
    """A harvest's manifest without what differs between runs of the same harvest (timings, the folder)."""
    import json

    obj = json.loads(manifest_path.read_text())
    obj.pop("created_by")
    obj["harvest"]["config"].pop("out")
    return obj


def small_harvest_config(out: Path, **overrides):
    """A fast harvest of the toy pair: two hooks, short context, many small shards."""
    from harvest.config import HarvestConfig

    kwargs = dict(
        models=["toy-base", "toy-code"],
        hooks=["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"],
        dataset="builtin:mixed",
        tokens=6000,
        context_size=64,
        out=str(out),
        batch_size=16,
        shard_size=0.25,  # 256 KiB: ~256 rows of 2x2x128 bf16 -> ~24 shards
        shuffle_shards=4,
        calibration_tokens=2000,
        progress=False,
        device="cpu",
    )
    kwargs.update(overrides)
    return HarvestConfig(**kwargs)


@pytest.fixture(scope="session")
def toy_cache(toy_dirs, tmp_path_factory) -> Path:
    """A small harvested cache of toy-base + toy-code at two hooks (shared, read-only)."""
    from harvest.harvester import harvest

    out = tmp_path_factory.mktemp("toy_cache") / "cache"
    harvest(small_harvest_config(out))
    return out
