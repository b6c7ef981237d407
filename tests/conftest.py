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
# Under pytest-xdist (`make test` runs one worker per core) the workers share the cores: each gets its share of
# torch's threads, or their thread pools oversubscribe the machine (a 4 s in-process training took 24 s on 2
# cores). Set before torch is imported, so each worker's torch and every subprocess a test starts get it.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

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


def serve_as_hub(server, monkeypatch) -> str:
    """Serve ``server`` (an HTTP server on 127.0.0.1) on a daemon thread and point ``huggingface_hub``,
    online, at it; returns its URL. The caller shuts it down."""
    import threading
    import types

    from huggingface_hub import constants, file_download

    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    # huggingface_hub waits 1 s before each of its 5 retries of a broken download: not here.
    monkeypatch.setattr(file_download, "time", types.SimpleNamespace(sleep=lambda s: None))
    return url


def fill_disk_after(monkeypatch, n_ok: int) -> None:
    """A disk that fills up: shard files opened for writing after the first ``n_ok`` fail every write
    with ENOSPC (through ``shared.shard_io``'s ``open``; ``monkeypatch.undo()`` frees the space)."""
    import errno

    import shared.shard_io as shard_io

    real_open = open
    opened = {"n": 0}

    class FullFile:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    def fake_open(path, mode="r", *a, **kw):
        f = real_open(path, mode, *a, **kw)
        if "shards" in str(path) and "w" in mode:
            opened["n"] += 1
            if opened["n"] > n_ok:
                return FullFile(f)
        return f

    monkeypatch.setattr(shard_io, "open", fake_open, raising=False)


@pytest.fixture(scope="session")
def toy_cache(toy_dirs, tmp_path_factory) -> Path:
    """A small harvested cache of toy-base + toy-code at two hooks (shared, read-only)."""
    from harvest.harvester import harvest

    out = tmp_path_factory.mktemp("toy_cache") / "cache"
    harvest(small_harvest_config(out))
    return out
