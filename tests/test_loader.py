"""Tests of train.loader.ActivationLoader: exactly-once epochs, ranks, determinism, resume,
shuffle quality (single rows and runs), thread shutdown, buffer recycling, peak memory, and
every bad input the issue names."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.cache import open_cache
from shared.cache_format import MANIFEST_NAME, CacheError
from tests.cache_factory import check_tags, make_cache, shard_rows
from train.loader import CHUNK_BYTES, ActivationLoader, auto_run_rows, default_eval_shards, default_gather_threads

REPO = Path(__file__).resolve().parents[1]
SIZES = [100, 130, 90, 110, 120, 75]  # uneven shards: batches straddle shards and windows


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cache")
    make_cache(path, n_shards=len(SIZES), rows_per_shard=SIZES, n_models=2, n_hooks=3, d_model=8)
    return path


def rows_of(batches: list) -> list[tuple[int, int]]:
    return [tuple(r) for _, index in batches for r in index.tolist()]


def epoch_chunks(loader: ActivationLoader, batches: list) -> list[list]:
    n = loader.batches_per_epoch
    return [batches[i : i + n] for i in range(0, len(batches), n)]


def loader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("ActivationLoader")]


def wait_no_loader_threads(timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while loader_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not loader_threads(), f"leaked loader threads: {loader_threads()}"


def run_with_timeout(fn, timeout: float = 30.0) -> None:
    """Run ``fn`` in a watchdog thread, so a hang fails the test instead of freezing it."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "consumer hung"
    if errors:
        raise errors[0]


# ---- exactly once, splits, ranks ----


def test_exactly_once_per_epoch(cache: Path) -> None:
    loader = ActivationLoader(cache, 32, window=2, epochs=3, with_index=True, eval_shards=1)
    batches = list(loader)
    assert len(batches) == len(loader) == 3 * loader.batches_per_epoch
    expected = Counter(shard_rows(cache, range(len(SIZES) - 1)))
    orders = []
    for chunk in epoch_chunks(loader, batches):
        assert Counter(rows_of(chunk)) == expected  # every row once, nothing else
        orders.append(rows_of(chunk))
        assert [len(a) for a, _ in chunk[:-1]] == [32] * (len(chunk) - 1)
    assert orders[0] != orders[1] != orders[2]  # reshuffled each epoch
    for acts, index in batches:
        check_tags(acts, index, [0, 1], [0, 1, 2])
        assert acts.dtype == torch.float32


def test_eval_split_is_held_out_and_seed_independent(cache: Path) -> None:
    n = len(SIZES)
    assert default_eval_shards(1) == 0 and default_eval_shards(2) == 1 and default_eval_shards(60) == 3
    for seed in (0, 7):
        train = rows_of(list(ActivationLoader(cache, 16, split="train", seed=seed, with_index=True)))
        ev = rows_of(list(ActivationLoader(cache, 16, split="eval", seed=seed, with_index=True)))
        assert Counter(ev) == Counter(shard_rows(cache, [n - 1]))  # the last shard
        assert not set(train) & set(ev)
        assert Counter(train + ev) == Counter(shard_rows(cache))
    ev2 = rows_of(list(ActivationLoader(cache, 16, split="eval", eval_shards=2, with_index=True)))
    assert Counter(ev2) == Counter(shard_rows(cache, [n - 2, n - 1]))


@pytest.mark.parametrize("run_rows", [None, 1, 16])
@pytest.mark.parametrize("batch_size", [17, 40])
def test_ranks_disjoint_covering_and_aligned(cache: Path, batch_size: int, run_rows: int | None) -> None:
    world = 3
    kw = dict(window=2, epochs=2, with_index=True, eval_shards=0, seed=3, run_rows=run_rows)
    single = list(ActivationLoader(cache, batch_size, **kw))
    ranks = [list(ActivationLoader(cache, batch_size, rank=r, world_size=world, **kw)) for r in range(world)]
    lens = {len(b) for b in ranks}
    assert len(lens) == 1  # DDP: every rank steps the same number of times
    loaders = [ActivationLoader(cache, batch_size, rank=r, world_size=world, **kw) for r in range(world)]
    assert loaders[0].dropped_rows_per_epoch == 0  # 625 rows: tails 625 mod 51 = 13, mod 120 = 25 (>= 3)
    for e in range(2):
        per_rank = [Counter(rows_of(epoch_chunks(loaders[0], b)[e])) for b in ranks]
        union = sum(per_rank, Counter())
        assert union == Counter(shard_rows(cache))  # covering, and each row once: disjoint
    # Rank r's batch j is batch j*world + r of the single-rank stream (same rows).
    n_full = loaders[0]._n_full
    for r in range(world):
        for j in range(n_full):
            assert sorted(rows_of([ranks[r][j]])) == sorted(rows_of([single[j * world + r]]))


def test_ranks_tiny_tail_is_dropped_with_warning(tmp_path: Path) -> None:
    make_cache(tmp_path, n_shards=2, rows_per_shard=[50, 51], d_model=8)  # 101 = 2 * (2 * 25) + 1
    with pytest.warns(UserWarning, match="not served") as caught:
        loaders = [ActivationLoader(tmp_path, 25, rank=r, world_size=2, eval_shards=0, with_index=True)
                   for r in range(2)]
    assert len([w for w in caught if "not served" in str(w.message)]) == 1  # said by rank 0 only
    assert loaders[0].dropped_rows_per_epoch == 1 and len(loaders[0]) == len(loaders[1]) == 2
    served = rows_of(list(loaders[0])) + rows_of(list(loaders[1]))
    assert len(served) == len(set(served)) == 100


def test_drop_last(cache: Path) -> None:
    loader = ActivationLoader(cache, 64, drop_last=True, eval_shards=0, with_index=True)
    batches = list(loader)
    assert len(batches) == 625 // 64 and all(len(a) == 64 for a, _ in batches)
    assert len(set(rows_of(batches))) == 64 * len(batches)


def test_model_hook_selection_in_order_asked(cache: Path) -> None:
    hooks = ["blocks.2.hook_resid_post", "blocks.0.hook_resid_post"]
    loader = ActivationLoader(cache, 50, models=["model1", "model0"], hooks=hooks, with_index=True, dtype=torch.bfloat16)
    for acts, index in loader:
        assert acts.shape[1:] == (2, 2, 8) and acts.dtype == torch.bfloat16
        check_tags(acts, index, [1, 0], [2, 0])
    assert ActivationLoader(cache, 50, hooks=["blocks.1.hook_resid_post"]).normalization().scale_MP.shape == (2, 1)
    # A lone name is a list of one (not its characters).
    lone = ActivationLoader(cache, 50, models="model1", hooks="blocks.2.hook_resid_post", with_index=True)
    acts, index = next(iter(lone))
    assert acts.shape[1:] == (1, 1, 8)
    check_tags(acts, index, [1], [2])


def test_values_equal_the_stored_rows(cache: Path) -> None:
    from shared.cache import open_cache

    c = open_cache(cache)
    stored = {}
    for i in range(c.n_shards):
        with c.shard(i) as r:
            for k, (s, p) in enumerate(zip(r.seq.tolist(), r.pos.tolist())):
                stored[(s, p)] = r.acts[k].clone()
    for acts, index in ActivationLoader(c, 64, with_index=True, dtype=torch.float64):
        for row, (s, p) in zip(acts, index.tolist()):
            assert torch.equal(row, stored[(s, p)].to(torch.float64))


# ---- determinism and resume ----


def test_same_seed_same_stream(cache: Path) -> None:
    def stream(seed: int) -> list:
        return list(ActivationLoader(cache, 32, seed=seed, window=3, epochs=2, with_index=True))

    a, b, c = stream(5), stream(5), stream(6)
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b, strict=True))
    assert rows_of(a) != rows_of(c)


@pytest.mark.parametrize("run_rows", [1, 7, None])  # None: long runs here (see the assert)
@pytest.mark.parametrize("hooks", [["blocks.1.hook_resid_post"], None])  # a slot subset, all slots
def test_gather_threads_serve_the_same_stream(tmp_path: Path, run_rows: int | None, hooks: list | None) -> None:
    make_cache(tmp_path, n_shards=3, rows_per_shard=[2000, 1700, 2300], n_hooks=2, d_model=8)
    kw = dict(window=2, eval_shards=0, with_index=True, hooks=hooks, run_rows=run_rows)
    one = ActivationLoader(tmp_path, 1500, gather_threads=1, **kw)
    assert run_rows is not None or one.run_rows > 100
    many = list(ActivationLoader(tmp_path, 1500, gather_threads=3, **kw))  # jobs cut below one shard-run
    for (x, i), (y, j) in zip(list(one), many, strict=True):
        assert torch.equal(x, y) and torch.equal(i, j)
        check_tags(y, j, [0, 1], [1] if hooks else [0, 1])


@pytest.mark.parametrize("run_rows", [None, 1, 16])
@pytest.mark.parametrize("consumed", [1, 5, 10, 14])  # 10: first batch of epoch 1 (10 per epoch)
def test_resume_mid_epoch_continues_identical_stream(cache: Path, consumed: int, run_rows: int | None) -> None:
    kw = dict(window=2, epochs=2, with_index=True, seed=1, prefetch=3, run_rows=run_rows)
    full = list(ActivationLoader(cache, 60, **kw))
    first = ActivationLoader(cache, 60, **kw)
    it = iter(first)
    head = [next(it) for _ in range(consumed)]
    time.sleep(0.05)  # let the thread prefetch ahead: prefetched batches must not count
    state = json.loads(json.dumps(first.state_dict()))
    del it
    assert state["epoch"] * first.batches_per_epoch + state["batch"] == consumed
    second = ActivationLoader(cache, 60, **kw)
    second.load_state_dict(state)
    rest = list(second)
    assert len(head) + len(rest) == len(full)
    for x, y in zip(head + rest, full, strict=True):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
    # Breaking out and iterating the same loader again also continues where it stopped.
    again = list(first)
    assert rows_of(again) == rows_of(rest)


def test_finished_loader_yields_nothing_and_rewinds(cache: Path) -> None:
    loader = ActivationLoader(cache, 64, with_index=True)
    first = rows_of(list(loader))
    assert list(loader) == []
    loader.rewind()
    assert rows_of(list(loader)) == first


def test_state_from_another_stream_is_refused(cache: Path) -> None:
    state = ActivationLoader(cache, 32, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed"):
        ActivationLoader(cache, 32, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size"):
        ActivationLoader(cache, 16, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="out of range"):
        ActivationLoader(cache, 32, seed=1).load_state_dict({**state, "batch": 10_000})
    with pytest.raises(ValueError, match="format"):
        ActivationLoader(cache, 32, seed=1).load_state_dict({"epoch": 0})
    with pytest.raises(ValueError, match="run_rows"):
        ActivationLoader(cache, 32, seed=1, run_rows=5).load_state_dict(state)


def test_integers_of_numpy_and_torch_and_dtype_names_are_accepted(cache: Path) -> None:
    loader = ActivationLoader(cache, np.int64(32), seed=torch.tensor(1), window=np.int32(4), dtype="bfloat16")
    assert (loader.batch_size, loader.seed, loader.window) == (32, 1, 4)
    assert type(loader.batch_size) is int and next(iter(loader)).dtype == torch.bfloat16
    assert ActivationLoader(cache, 32, dtype="torch.float16").dtype == torch.float16


def test_one_shard_cache_has_no_eval_split(tmp_path: Path) -> None:
    make_cache(tmp_path, n_shards=1, rows_per_shard=40)
    with pytest.raises(ValueError, match=r"is one shard, so it holds nothing out: split='eval' needs at least 2"):
        ActivationLoader(tmp_path, 8, split="eval")


def test_state_positions_are_whole_numbers_within_the_loaders_epochs(cache: Path) -> None:
    """int() took 5.5, "5" and True; an epoch past the loader's then served nothing while len() said more."""
    loader = ActivationLoader(cache, 32, seed=1, epochs=2)
    state = loader.state_dict()
    for bad in ({"batch": 5.5}, {"batch": "5"}, {"batch": True}, {"epoch": 7}, {"epoch": 2, "batch": 3},
                {"epoch": -1}):
        with pytest.raises(ValueError, match="out of range for this loader"):
            loader.load_state_dict({**state, **bad})
    list(loader)  # a finished loader's state (epoch == epochs, batch 0) loads, and serves nothing more
    done = loader.state_dict()
    assert (done["epoch"], done["batch"]) == (2, 0)
    again = ActivationLoader(cache, 32, seed=1, epochs=2)
    again.load_state_dict(done)
    assert list(again) == []


def test_state_without_run_rows_is_a_single_row_stream(cache: Path) -> None:
    state = ActivationLoader(cache, 32, seed=1, run_rows=1).state_dict()
    assert state["run_rows"] == 1
    del state["run_rows"]  # as saved before runs existed
    ActivationLoader(cache, 32, seed=1, run_rows=1).load_state_dict(state)
    with pytest.raises(ValueError, match="run_rows: state 1"):
        ActivationLoader(cache, 32, seed=1, run_rows=3).load_state_dict(state)


# ---- runs ----


def test_factory_records_write_shuffle(tmp_path: Path) -> None:
    make_cache(tmp_path / "a", n_shards=5, rows_per_shard=[10, 20, 30, 40, 5], shuffle_buffer_shards=2, seed=3)
    assert open_cache(tmp_path / "a").manifest.extra["write_shuffle"] == {"buffer_rows": 30, "seed": 3}
    make_cache(tmp_path / "b", n_shards=2, rows_per_shard=8, shuffle_buffer_shards=4)
    assert open_cache(tmp_path / "b").manifest.extra["write_shuffle"]["buffer_rows"] == 16
    make_cache(tmp_path / "c", n_shards=2, rows_per_shard=8, shuffle_buffer_shards=0)
    assert "write_shuffle" not in open_cache(tmp_path / "c").manifest.extra


def test_default_gather_threads(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert default_gather_threads(CHUNK_BYTES - 1) == 1  # several batches per chunk: one thread
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert default_gather_threads(CHUNK_BYTES) == 2  # a chunk or more per batch: two
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert default_gather_threads(CHUNK_BYTES) == 1
    assert ActivationLoader(cache, 32).gather_threads == 1
    assert ActivationLoader(cache, 32, gather_threads=3).gather_threads == 3


def test_automatic_run_rows(tmp_path: Path) -> None:
    shuffled = {"buffer_rows": 4096, "seed": 0}
    assert auto_run_rows(512, 1024, 4096, None) == 1  # no write-time shuffle: single rows
    assert auto_run_rows(512, 1024, 4096, {"seed": 0}) == 1  # malformed: single rows
    assert auto_run_rows(512, 1024, 4096, shuffled) == 64  # 32 KiB
    assert auto_run_rows(9216, 1024, 4096, shuffled) == 3  # wide rows: 27 KiB
    assert auto_run_rows(512, 64, 4096, shuffled) == 8  # small batches: capped by mixing
    assert auto_run_rows(512, 1024, 10**6, {"buffer_rows": 1000}) == 1  # tiny write buffers
    make_cache(tmp_path / "s", n_shards=4, rows_per_shard=256, d_model=8)
    make_cache(tmp_path / "u", n_shards=4, rows_per_shard=256, d_model=8, shuffle_buffer_shards=0)
    assert ActivationLoader(tmp_path / "s", 64, eval_shards=0).run_rows > 1
    assert ActivationLoader(tmp_path / "u", 64, eval_shards=0).run_rows == 1
    with pytest.warns(UserWarning, match="consecutive tokens"):
        assert ActivationLoader(tmp_path / "u", 64, eval_shards=0, run_rows=8).run_rows == 8


def _location(path: Path) -> dict[tuple[int, int], tuple[int, int]]:
    """(seq, pos) -> (shard, row) of every row of a cache."""
    cache = open_cache(path)
    out = {}
    for i in range(cache.n_shards):
        with cache.shard(i) as r:
            out.update({(s, p): (i, k) for k, (s, p) in enumerate(zip(r.seq.tolist(), r.pos.tolist()))})
    return out


@pytest.mark.parametrize(("run_rows", "batch_size"), [(7, 32), (16, 50), (64, 17), (1000, 60)])
def test_runs_exactly_once_and_contiguous(cache: Path, run_rows: int, batch_size: int) -> None:
    # 7 and 64 do not divide the shard sizes (short last runs); 1000: one run per shard.
    loader = ActivationLoader(cache, batch_size, window=2, epochs=2, eval_shards=0, with_index=True, run_rows=run_rows)
    batches = list(loader)
    where = _location(cache)
    for chunk in epoch_chunks(loader, batches):
        assert Counter(rows_of(chunk)) == Counter(shard_rows(cache))
        assert [len(a) for a, _ in chunk[:-1]] == [batch_size] * (len(chunk) - 1)
        # Runs are copied whole, in stream order: a new run starts only where the stream jumps.
        stream = [where[r] for r in rows_of(chunk)]
        jumps = sum(b != (a[0], a[1] + 1) for a, b in zip(stream, stream[1:]))
        runs = sum(-(-n // run_rows) for n in SIZES)
        assert jumps <= runs - 1
    for acts, index in batches:
        check_tags(acts, index, [0, 1], [0, 1, 2])


def test_run_rows_one_is_sorted_single_rows(cache: Path) -> None:
    where = _location(cache)
    for _, index in ActivationLoader(cache, 40, window=2, with_index=True, run_rows=1):
        located = [where[r] for r in map(tuple, index.tolist())]
        shards = [s for s, _ in located]
        blocks = [s for k, s in enumerate(shards) if k == 0 or s != shards[k - 1]]
        assert len(blocks) == len(set(blocks))  # grouped by shard
        for s in blocks:
            rows = [k for t, k in located if t == s]
            assert rows == sorted(rows)  # ascending within a shard


def _reference_stream(path: Path, seed: int, epoch: int, window: int, run_rows: int) -> list[list[tuple[int, int]]]:
    """The epoch stream as train.epoch_stream's docstring defines it, as its runs of ``(shard, row)``."""
    from train.epoch_stream import stream_rng

    sizes = [s.n_rows for s in open_cache(path).manifest.shards]
    order = stream_rng(seed, epoch, 0).permutation(len(sizes)).tolist()
    runs: list[list[tuple[int, int]]] = []
    for k, w0 in enumerate(range(0, len(order), window)):
        window_runs = [[(i, r) for r in range(r0, min(r0 + run_rows, sizes[i]))]
                       for i in order[w0 : w0 + window] for r0 in range(0, sizes[i], run_rows)]
        runs += [window_runs[u] for u in stream_rng(seed, epoch, k + 1).permutation(len(window_runs)).tolist()]
    return runs


@pytest.mark.parametrize(("run_rows", "batch_size", "world"), [(7, 100, 1), (7, 45, 2), (16, 130, 1), (3, 64, 3)])
@pytest.mark.parametrize("gather_threads", [1, 3])
def test_run_batches_are_the_documented_stream(
    cache: Path, run_rows: int, batch_size: int, world: int, gather_threads: int
) -> None:
    """Each batch is exactly its piece of the stream train.epoch_stream defines (computed here
    independently of the loader), in stream order, on every rank and with any gather threads."""
    where = _location(cache)
    epochs, window = 2, 3
    runs = [_reference_stream(cache, 4, e, window, run_rows) for e in range(epochs)]
    for rank in range(world):
        loader = ActivationLoader(cache, batch_size, window=window, epochs=epochs, eval_shards=0, seed=4,
                                  with_index=True, run_rows=run_rows, rank=rank, world_size=world,
                                  gather_threads=gather_threads)
        batches = list(loader)
        for e, chunk in enumerate(epoch_chunks(loader, batches)):
            stream = [row for run in runs[e] for row in run]
            for j, (acts, index) in enumerate(chunk):
                a, b = loader._batch_range(j)
                assert [where[r] for r in map(tuple, index.tolist())] == stream[a:b]
                check_tags(acts, index, [0, 1], [0, 1, 2])


def test_recycled_buffers_never_change_under_the_consumer(tmp_path: Path, one_batch_chunks: None) -> None:
    make_cache(tmp_path, n_shards=4, rows_per_shard=2048, d_model=64, dtype=torch.bfloat16)
    # bf16 on the CPU: the batches handed out *are* views of the loader's recycled host buffers.
    loader = ActivationLoader(tmp_path, 256, eval_shards=0, epochs=3, dtype=torch.bfloat16, prefetch=2)
    held: list = []  # (what the consumer keeps, how to read the batch back from it, a copy)
    storages = set()
    for i, acts in enumerate(loader):
        storages.add(acts.untyped_storage().data_ptr())
        if i % 7 == 0:  # keep some, in every way one can hold memory
            off, shape = acts.storage_offset(), acts.shape
            keep, read = [
                (acts, lambda k: k),
                (acts[3:], lambda k: k),
                (acts.view(torch.int16).numpy(), lambda k: torch.from_numpy(k).view(torch.bfloat16)),
                (acts.untyped_storage(), lambda k, o=off, s=shape: torch.empty(0, dtype=torch.bfloat16).set_(k, o, s)),
            ][i // 7 % 4]
            held.append((keep, read, read(keep).clone()))
        for keep, read, copy in held:
            assert torch.equal(read(keep), copy), "a batch the consumer holds was overwritten"
    assert len(storages) > len(held)  # held buffers were never reused, yet others were
    # A consumer that drops each batch gets a handful of buffers, recycled.
    loader.rewind()
    assert len({acts.untyped_storage().data_ptr() for acts in loader}) <= loader._depth + 3


# ---- shuffle quality ----


def same_seq_pair_share(batches: list[list[tuple[int, int]]]) -> float:
    pairs = same = 0
    for rows in batches:
        counts = Counter(s for s, _ in rows)
        n = len(rows)
        pairs += n * (n - 1) // 2
        same += sum(c * (c - 1) // 2 for c in counts.values())
    return same / pairs


def test_shuffle_quality(tmp_path: Path) -> None:
    # Harvest-like: 64-token sequences, write-time shuffle spanning 4 shards only.
    make_cache(tmp_path, n_shards=16, rows_per_shard=512, seq_len=64, shuffle_buffer_shards=4, d_model=8)
    rows = shard_rows(tmp_path)
    counts = Counter(s for s, _ in rows)
    n = len(rows)
    uniform = sum(c * (c - 1) for c in counts.values()) / (n * (n - 1))
    loader = ActivationLoader(tmp_path, 256, eval_shards=0, epochs=2, with_index=True)
    served = [[tuple(r) for r in index.tolist()] for _, index in loader]
    assert same_seq_pair_share(served) <= 2 * uniform
    # The test has teeth: serving the shards in file order would fail it.
    in_order = [rows[i : i + 256] for i in range(0, n, 256)]
    assert same_seq_pair_share(in_order) > 2 * uniform


def uniform_share(path: Path) -> float:
    counts = Counter(s for s, _ in shard_rows(path))
    n = sum(counts.values())
    return sum(c * (c - 1) for c in counts.values()) / (n * (n - 1))


def served_share(path: Path, **kw) -> tuple[float, int]:
    loader = ActivationLoader(path, 256, eval_shards=0, epochs=2, with_index=True, **kw)
    return same_seq_pair_share([[tuple(r) for r in index.tolist()] for _, index in loader]), loader.run_rows


def test_shuffle_quality_with_runs_on_a_write_shuffled_cache(tmp_path: Path) -> None:
    make_cache(tmp_path, n_shards=16, rows_per_shard=512, seq_len=64, shuffle_buffer_shards=4, d_model=8)
    uniform = uniform_share(tmp_path)
    share, run_rows = served_share(tmp_path)
    assert run_rows > 1  # automatic runs are on: the manifest records the write-time shuffle
    assert share <= 2 * uniform
    # Teeth: runs of a whole shard (a batch from one or two write buffers) fail the bound.
    assert served_share(tmp_path, run_rows=512)[0] > 2 * uniform


def test_shuffle_quality_on_an_unshuffled_cache(tmp_path: Path) -> None:
    # Rows in sequence order (no write-time shuffle): only single rows are safe.
    make_cache(tmp_path, n_shards=16, rows_per_shard=512, seq_len=64, shuffle_buffer_shards=0, d_model=8)
    uniform = uniform_share(tmp_path)
    share, run_rows = served_share(tmp_path, window=16)
    assert run_rows == 1 and share <= 2 * uniform
    # Teeth: forced runs would be consecutive tokens of one sequence.
    with pytest.warns(UserWarning, match="consecutive tokens"):
        assert served_share(tmp_path, window=16, run_rows=16)[0] > 2 * uniform


# ---- threads ----


@pytest.fixture
def one_batch_chunks(monkeypatch) -> None:
    """Gather one batch per chunk, so a small test cache takes many hand-offs (the default ~4 MiB
    chunk would hold its whole epoch, and the thread could finish before the consumer looks)."""
    import train.loader

    monkeypatch.setattr(train.loader, "CHUNK_BYTES", 1)


@pytest.mark.parametrize("gather_threads", [1, 3])
def test_thread_stops_on_break(cache: Path, gather_threads: int, one_batch_chunks: None) -> None:
    wait_no_loader_threads()
    loader = ActivationLoader(cache, 8, prefetch=2, gather_threads=gather_threads)
    for i, _ in enumerate(loader):
        assert 1 <= len(loader_threads()) <= 1 + gather_threads
        if i == 2:
            break
    wait_no_loader_threads(timeout=1.0)
    assert loader.state_dict()["batch"] == 3


def test_thread_stops_on_exception_in_consumer(cache: Path) -> None:
    loader = ActivationLoader(cache, 8, prefetch=2, gather_threads=2)

    def consume() -> None:
        for _ in loader:
            raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        run_with_timeout(consume)
    wait_no_loader_threads(timeout=1.0)


def test_thread_stops_on_garbage_collection_and_new_iter(cache: Path) -> None:
    loader = ActivationLoader(cache, 8, prefetch=2)
    it = iter(loader)
    next(it)
    it2 = iter(loader)  # a new iterator stops the previous one
    assert len(loader_threads()) == 1
    # ...which then says so: ending quietly would look like the end of the data.
    with pytest.raises(RuntimeError, match="newer iter"):
        next(it)
    next(it2)
    loader.rewind()
    with pytest.raises(RuntimeError, match="repositioned"):
        next(it2)
    with pytest.raises(RuntimeError, match="newer iter"):
        for _pair in zip(loader, loader):  # the second iter stops the first before its first batch
            pass
    del it, it2
    gc.collect()
    wait_no_loader_threads(timeout=1.0)


def test_error_in_thread_reaches_consumer(tmp_path: Path) -> None:
    make_cache(tmp_path, n_shards=3, rows_per_shard=64, d_model=8)
    loader = ActivationLoader(tmp_path, 16, eval_shards=0, window=1)
    for f in (tmp_path / "shards").iterdir():  # damaged after construction, before reading
        f.write_bytes(f.read_bytes()[:-8])

    def consume() -> None:
        list(loader)

    with pytest.raises(CacheError, match="bytes"):
        run_with_timeout(consume)
    wait_no_loader_threads(timeout=1.0)


# ---- memory ----

_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from train.loader import ActivationLoader

    def status_kib(key):  # VmHWM is this process's own peak (ru_maxrss inherits the parent's)
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key + ":"))

    def mapped():
        return {l.split()[-1] for l in open("/proc/self/maps") if "acts-" in l}

    loader = ActivationLoader(sys.argv[1], 512, window=2, eval_shards=0, prefetch=2, dtype=torch.bfloat16)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak to the current RSS
    base = status_kib("VmRSS")
    max_mapped = n = 0
    for acts in loader:
        n += len(acts)
        max_mapped = max(max_mapped, len(mapped()))
    growth = (status_kib("VmHWM") - base) * 1024
    print(json.dumps({"growth": growth, "rows": n, "max_mapped": max_mapped, "after": len(mapped())}))
    """
)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_peak_memory_bounded_by_window(tmp_path: Path) -> None:
    # 16 shards of 8.5 MB: the cache is 8x the 2-shard window.
    man = make_cache(tmp_path, n_shards=16, rows_per_shard=8192, n_models=2, d_model=256, tag=False)
    cache_bytes, window_bytes = sum(s.bytes for s in man.shards), 2 * man.shards[0].bytes
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=120, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["rows"] == man.n_rows
    assert res["max_mapped"] <= 2 and res["after"] == 0  # finished windows are unmapped
    # One window's pages plus a constant (prefetched batches, malloc arenas of the loader's threads),
    # not the cache: without releasing windows the growth would be the whole 136 MB. The constant was
    # 24 MiB; a CI run under load measured 42.9 MB growth (17 MB window + 25.9 MB), so 32 MiB; the
    # cache/3 bound below is what separates bounded from unbounded.
    assert res["growth"] < window_bytes + 32 * 2**20, res
    assert res["growth"] < cache_bytes / 3, res


# ---- bad input ----


def test_bad_cache_folders(tmp_path: Path) -> None:
    with pytest.raises(CacheError, match="does not exist"):
        ActivationLoader(tmp_path / "nowhere", 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CacheError, match="manifest.json not found") as err:
        ActivationLoader(tmp_path / "empty", 8)
    assert f"--out {tmp_path / 'empty'}` first" in str(err.value)  # the fix names the folder
    make_cache(tmp_path / "c", n_shards=3, rows_per_shard=32, d_model=8)
    (tmp_path / "c" / "shards" / "acts-00001.safetensors").unlink()
    with pytest.raises(CacheError, match="missing"):
        ActivationLoader(tmp_path / "c", 8)


def test_shard_disagreeing_with_manifest(tmp_path: Path) -> None:
    make_cache(tmp_path, n_shards=3, rows_per_shard=32, d_model=8)
    shard = tmp_path / "shards" / "acts-00000.safetensors"
    good = shard.read_bytes()
    shard.write_bytes(good + b"\0" * 4)  # size
    with pytest.raises(CacheError, match="manifest says"):
        ActivationLoader(tmp_path, 8, eval_shards=0)
    shard.write_bytes(good.replace(b'"I32"', b'"F32"', 1))  # header (same size): pos dtype
    with pytest.raises(CacheError, match="dtype"):
        ActivationLoader(tmp_path, 8, eval_shards=0)
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    manifest["shards"][0]["n_rows"] += 1
    manifest["n_rows"] += 1
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(manifest))
    shard.write_bytes(good)
    with pytest.raises(CacheError, match="rows"):
        ActivationLoader(tmp_path, 8, eval_shards=0)


def test_verify_checks_checksums(tmp_path: Path) -> None:
    make_cache(tmp_path, n_shards=2, rows_per_shard=32, d_model=8)
    assert len(list(ActivationLoader(tmp_path, 8, verify=True))) == 4
    shard = tmp_path / "shards" / "acts-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # same size, valid header, wrong payload
    shard.write_bytes(bytes(data))
    ActivationLoader(tmp_path, 8)  # only a checksum can tell
    with pytest.raises(CacheError, match="sha256"):
        ActivationLoader(tmp_path, 8, verify=True)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(models=["model9"]), r"model 'model9' is not in the cache; it holds \['model0', 'model1'\]"),
        (dict(hooks=["blocks.7.hook_mlp_out"]), "hook 'blocks.7.hook_mlp_out' is not in the cache; it holds"),
        (dict(batch_size=10_000), "larger than the train split"),
        (dict(window=0), "window must be an integer >= 1"),
        (dict(window=-3), "window must be an integer >= 1"),
        (dict(batch_size=0), "batch_size"),
        (dict(rank=2, world_size=2), "rank"),
        (dict(split="test"), "split"),
        (dict(split="eval", eval_shards=0), "eval_shards"),
        (dict(eval_shards=6), "eval_shards"),
        (dict(dtype=torch.int32), "floating"),
        (dict(models=["model0", "model0"]), "must not repeat"),
        (dict(models=[]), "must each name at least one"),
        (dict(hooks=()), "must each name at least one"),
        (dict(batch_size=400, world_size=2, drop_last=True), "no batch"),
        (dict(run_rows=0), "run_rows must be None or an integer >= 1"),
        (dict(run_rows=2.5), "run_rows"),
        # A set has no order (it differs between processes): ranks would serve their slots in different orders.
        (dict(models={"model0", "model1"}), r"models must be a name or a list of names, in the order to serve"),
        (dict(hooks=1), "hooks must be a name or a list of names"),
        (dict(models=b"model0"), "models must be a name or a list of names"),
        (dict(batch_size=True), r"batch_size must be an integer >= 1, got True"),  # bool is an int to Python
        (dict(rank=True, world_size=2), "rank must be an integer >= 0, got True"),
        (dict(seed=1.0), "seed must be an integer >= 0"),
        (dict(batch_size=torch.tensor([8])), "batch_size must be an integer"),
        (dict(dtype="float64x"), "dtype must be a floating torch dtype"),
        (dict(dtype="int32"), "dtype must be a floating torch dtype"),
        (dict(device="meta"), "device 'meta' holds no data"),
        (dict(batch_size=1, world_size=10_000, rank=0), "use fewer ranks, or a bigger cache"),
    ],
)
def test_bad_arguments(cache: Path, kwargs: dict, match: str) -> None:
    kwargs = {"batch_size": 8, **kwargs}
    with pytest.raises(ValueError, match=match):
        ActivationLoader(cache, **kwargs)


# ---- CUDA (skipped without a GPU) ----


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_pinned_non_blocking(cache: Path) -> None:
    loader = ActivationLoader(cache, 32, device="cuda", dtype=torch.float32, with_index=True)
    cpu = list(ActivationLoader(cache, 32, with_index=True))
    for (acts, index), (ref, ref_index) in zip(loader, cpu, strict=True):
        assert acts.is_cuda and acts.dtype == torch.float32
        assert torch.equal(acts.cpu(), ref) and torch.equal(index, ref_index)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_staging_keeps_the_stream_position_and_stops(cache: Path) -> None:
    """The batch staged ahead on the device is not consumed: a mid-epoch state resumes at the
    first batch not returned, and breaking out still stops the thread."""
    kw = dict(window=2, epochs=2, with_index=True, seed=3, run_rows=16)
    full = list(ActivationLoader(cache, 60, **kw))
    first = ActivationLoader(cache, 60, device="cuda", **kw)
    head = []
    for i, (acts, index) in enumerate(first):
        head.append((acts.cpu(), index))
        if i == 6:
            break
    wait_no_loader_threads(timeout=1.0)
    state = first.state_dict()
    assert state["epoch"] * first.batches_per_epoch + state["batch"] == 7
    second = ActivationLoader(cache, 60, device="cuda", **kw)
    second.load_state_dict(state)
    rest = [(acts.cpu(), index) for acts, index in second]
    for (x, i), (y, j) in zip(head + rest, full, strict=True):
        assert torch.equal(x, y.float()) and torch.equal(i, j)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_survive_a_busy_consumer_stream(cache: Path) -> None:
    """Each batch is complete on the consumer's stream even while that stream is busy (the copy
    ran on a side stream; the consumer waited on its event) and after its memory is recycled."""
    ref = [b.float() for b in ActivationLoader(cache, 32, seed=5)]
    big = torch.randn(2048, 2048, device="cuda")
    got = []
    for acts in ActivationLoader(cache, 32, seed=5, device="cuda", dtype=torch.float32):
        for _ in range(3):
            big = (big @ big).clamp_(-1, 1)  # keep the consumer stream busy past the next copy
        got.append(acts.sum(dim=-1).cpu())  # read on the consumer stream, then drop the batch
    for x, y in zip(got, ref, strict=True):
        torch.testing.assert_close(x, y.sum(dim=-1))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_error_in_thread_comes_after_the_batches_before_it(tmp_path: Path, device: str, one_batch_chunks: None) -> None:
    """A shard failing mid-epoch: every batch before it is served (on CUDA too, where the next
    batch is staged ahead), then the error; the position counts the served batches."""
    make_cache(tmp_path, n_shards=3, rows_per_shard=64, d_model=8)
    loader = ActivationLoader(tmp_path, 64, eval_shards=0, window=1, run_rows=1, device=device)
    second = loader._windows(0)[1].shards[0]  # one shard per window and per batch
    bad = tmp_path / open_cache(tmp_path).manifest.shards[second].file
    bad.write_bytes(bad.read_bytes()[:-8])
    served = []
    with pytest.raises(CacheError, match="bytes"):
        for acts in loader:
            served.append(acts)
    assert len(served) == 1 and loader.state_dict()["batch"] == 1
    wait_no_loader_threads(timeout=1.0)
