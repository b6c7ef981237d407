"""Stage-2 data path: a shuffled, prefetching loader over memory-mapped activation shards.

The epoch stream, the order in which one epoch serves the split's rows (shards shuffled per
epoch, mixed in windows of ``window`` shards as runs of ``run_rows`` rows), is defined in
:mod:`train.epoch_stream`; it is the same on every rank, a function of ``seed`` and the epoch.

Batches are consecutive pieces of the stream (one may start or end inside a run). Rank ``r`` of
``w`` takes batches ``r, r+w, r+2w, ...`` of ``batch_size`` rows (one "round" is ``w`` batches);
the ``T = rows mod (w * batch_size)`` rows after the last full round are dealt as one final batch
per rank of ``floor(T/w)`` or ``ceil(T/w)`` rows. So all ranks yield the same number of batches
(DDP's all-reduce never waits for a rank that finished early) and together serve every row once.
Remainders: with ``world_size == 1`` the last batch is shorter and nothing is dropped; with
``world_size > 1`` and ``0 < T < world_size`` those ``T`` rows are not served (a warning at
construction, ``dropped_rows_per_epoch``); ``drop_last=True`` serves only full batches.

Within a batch, rows are in stream order when ``run_rows > 1`` and ordered by shard and row when
``run_rows == 1`` (see :mod:`train.epoch_stream`).

Memory: only the windows a batch touches are mapped, and a window is unmapped as soon as this
rank's batches have passed it: peak memory is about one window's pages plus ``prefetch`` batches
(or one chunk) and a few recycled buffers of about ``CHUNK_BYTES``, whatever the cache size.

Threading (:mod:`train.prefetch`): one background thread per active iterator copies batches, a
chunk of about ``CHUNK_BYTES`` at a time, into host buffers in the storage dtype (pinned for CUDA;
on the CPU recycled once the consumer has dropped them), queues about ``prefetch`` batches (at
least one chunk) ahead, and may fan the copies out to ``gather_threads``. The consumer copies
each batch to the device and casts it there; on CUDA from pinned memory on a side stream, one
batch ahead (:class:`CudaStager`), so the copy overlaps the kernels of the step before. Breaking
out of the loop, an exception in its body, or garbage collection of the iterator stops and joins
the threads.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import operator
import os
import threading
import warnings
import weakref
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.cache import Cache, open_cache, verify_cache
from shared.cache_format import CacheError
from shared.normalization import Normalization
from train.device_staging import CudaStager
from train.epoch_stream import Window, auto_run_rows, stream_rng
from train.prefetch import CopyPool, HostBufferPool, Prefetcher, Put

__all__ = ["ActivationLoader", "auto_run_rows", "default_eval_shards", "default_gather_threads", "STATE_FORMAT"]

STATE_FORMAT = "crosscache.ActivationLoader/1"
_STREAM_KEYS = ("seed", "batch_size", "window", "world_size", "split", "drop_last", "split_fingerprint",
                "run_rows")
_STATE_DEFAULTS = {"run_rows": 1}  # states saved before runs existed describe single-row streams
# Small batches are gathered and queued about this much at a time: each hand-off to the consumer
# costs ~100 us on a 2-core VM, and 4 MiB chunks read ~10% faster than 2 MiB ones (bench/loader.py).
CHUNK_BYTES = 4 * 2**20


def default_eval_shards(n_shards: int) -> int:
    """Shards held out for ``split="eval"`` when ``eval_shards`` is None: 5% (at least one) of a
    cache with two or more shards, none for a one-shard cache. They are the *last* shards in
    manifest order, chosen independently of ``seed``, so train and eval never overlap."""
    return 0 if n_shards < 2 else max(1, round(0.05 * n_shards))


def default_gather_threads(batch_bytes: int) -> int:
    """``gather_threads`` when it is None: 2 for batches of ``CHUNK_BYTES`` or more (on 2+ CPUs), else 1.

    The copy is Python planning plus one memcpy per run, and the threads share the GIL: each run
    copied releases and retakes it. Small batches are many short copies, where a second thread
    mostly adds GIL hand-offs: on the benchmark's toy cache (batch 1024 x 512 B rows) a 16-CPU
    host read 4.06 GB/s with 1 thread, 3.84 with 2 and 2.02 with 4 (the old default there). Big
    batches (one per chunk) have long copies that two threads overlap: batch 4096 x 9216 B read
    5.50 GB/s with 2 threads against 4.14 with 1 and 3.13 with 4 (H100 host, 2026-11-22).
    """
    return 2 if batch_bytes >= CHUNK_BYTES and (os.cpu_count() or 1) >= 2 else 1


def _whole_number(name: str, value: Any, low: int, *, none_ok: bool = False) -> int:
    """``value`` as an int >= ``low``: Python, numpy or 0-d torch integers; bools and floats refused
    (``True`` is an int to Python, and would pass as 1)."""
    bad = isinstance(value, (bool, np.bool_, float, np.floating)) or (isinstance(value, torch.Tensor) and (
        value.dim() > 0 or value.dtype.is_floating_point or value.dtype == torch.bool))
    try:
        number = None if bad else operator.index(value)
    except TypeError:
        number = None
    if number is None or number < low:
        raise ValueError(f"{name} must be {'None or ' if none_ok else ''}an integer >= {low}, got {value!r}")
    return number


def _names(kind: str, value: Any, default: list[str]) -> list[str]:
    """Slot names to serve, in the order asked: None is all of the cache's, a lone name a list of one."""
    if value is None:
        return list(default)
    if isinstance(value, str):
        return [value]
    # A set's order differs between processes (hash seeds): ranks would average gradients of different slots.
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{kind}s must be a name or a list of names, in the order to serve them (the cache's: "
                         f"{default}), got {type(value).__name__} {value!r}")
    return list(value)


def _torch_dtype(dtype: Any) -> torch.dtype:
    """``dtype`` as a floating torch dtype; names such as ``"bfloat16"`` or ``"torch.float32"`` are accepted."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), dtype)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype (torch.float32, torch.bfloat16, ... or its name), "
                         f"got {dtype!r}")
    return dtype


def _lookup(kind: str, name: str, names: list[str]) -> int:
    if name not in names:
        raise ValueError(f"{kind} {name!r} is not in the cache; it holds {names}")
    return names.index(name)


class ActivationLoader:
    """Iterate shuffled batches ``acts_BMPD`` (or ``(acts_BMPD, index_B2)``) from a cache.

    Args:
        cache: a cache folder or an opened :class:`shared.cache.Cache`.
        batch_size: rows per batch on this rank.
        models, hooks: names to serve, in the order asked (default: all, in cache order).
        split: ``"train"`` or ``"eval"`` (the held-out shards, see ``eval_shards``).
        seed: seeds the shard order and the window permutations of every epoch.
        epochs: passes over the split one iteration of the loader makes.
        window: shards mixed together (memory holds about this many shards' pages).
        run_rows: consecutive rows of a shard moved together by the shuffle (see
            :mod:`train.epoch_stream`). None: :func:`auto_run_rows` (about 32 KiB of rows for a cache shuffled at
            write time, 1 otherwise); 1: row by row. Part of the stream's identity (state dicts).
        rank, world_size: this process's part of every epoch (DDP).
        device, dtype: where batches go and the dtype they are cast to *on the device*.
        with_index: also yield ``index_B2`` (int64, on the CPU): each row's ``(seq, pos)``.
        eval_shards: shards held out for eval, the last ones in manifest order (default
            :func:`default_eval_shards`; 0 serves every shard as train).
        drop_last: serve only full batches (see the module docstring for remainders).
        prefetch: batches the background thread may prepare ahead (at least one chunk: batches
            smaller than ``CHUNK_BYTES`` are gathered that many bytes at a time).
        gather_threads: threads copying the rows (default :func:`default_gather_threads`). Any
            value serves the same stream.
        verify: check every shard's sha256 against the manifest before serving.
    """

    def __init__(
        self,
        cache: str | Path | Cache,
        batch_size: int,
        *,
        models: str | Sequence[str] | None = None,
        hooks: str | Sequence[str] | None = None,
        split: str = "train",
        seed: int = 0,
        epochs: int = 1,
        window: int = 8,
        run_rows: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        with_index: bool = False,
        eval_shards: int | None = None,
        drop_last: bool = False,
        prefetch: int = 4,
        gather_threads: int | None = None,
        verify: bool = False,
    ) -> None:
        self.cache = cache if isinstance(cache, Cache) else open_cache(cache)
        man = self.cache.manifest
        batch_size, window, epochs, world_size, prefetch, seed = (
            _whole_number(name, value, low) for name, value, low in (
                ("batch_size", batch_size, 1), ("window", window, 1), ("epochs", epochs, 1),
                ("world_size", world_size, 1), ("prefetch", prefetch, 1), ("seed", seed, 0)))
        if gather_threads is not None:
            gather_threads = _whole_number("gather_threads", gather_threads, 1, none_ok=True)
        if run_rows is not None:
            run_rows = _whole_number("run_rows", run_rows, 1, none_ok=True)
        rank = _whole_number("rank", rank, 0)
        if not rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        dtype = _torch_dtype(dtype)
        if torch.device(device).type == "meta":
            raise ValueError("device 'meta' holds no data: serve batches on 'cpu' or 'cuda'")
        self.batch_size, self.seed, self.epochs, self.window = batch_size, seed, epochs, window
        self.rank, self.world_size, self.split, self.drop_last = rank, world_size, split, drop_last
        self.device, self.dtype = torch.device(device), dtype
        self.with_index, self.prefetch, self.gather_threads = with_index, prefetch, gather_threads
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device} asked for but CUDA is not available")

        # Slot selection: names -> cache indices, in the order asked (a lone name is a list of one).
        self.models = _names("model", models, man.model_names)
        self.hooks = _names("hook", hooks, man.hooks)
        if not self.models or not self.hooks:
            raise ValueError(f"models {self.models} and hooks {self.hooks} must each name at least one "
                             "(None serves all of the cache's)")
        if len(set(self.models)) < len(self.models) or len(set(self.hooks)) < len(self.hooks):
            raise ValueError(f"models {self.models} and hooks {self.hooks} must not repeat a name")
        self.model_ids = [_lookup("model", name, man.model_names) for name in self.models]
        self.hook_ids = [_lookup("hook", hook, man.hooks) for hook in self.hooks]
        self._slots = np.array([m * man.n_hooks + p for m in self.model_ids for p in self.hook_ids])
        self._all_slots = np.array_equal(self._slots, np.arange(man.n_models * man.n_hooks))
        self._slot_bytes = man.d_model * man.torch_dtype.itemsize

        # Split: the last `eval_shards` shards in manifest order are held out (seed-independent).
        n = self.cache.n_shards
        k = default_eval_shards(n) if eval_shards is None else eval_shards
        if n == 1 and split == "eval":
            raise ValueError(f"cache {self.cache.dir} is one shard, so it holds nothing out: split='eval' needs at "
                             "least 2 shards (harvest with a smaller --shard-size)")
        if not 0 <= k < n or (k == 0 and split == "eval"):
            raise ValueError(
                f"eval_shards={k}{' (the default)' if eval_shards is None else ''} does not fit a cache of {n} "
                f"shard(s): need 0 <= eval_shards < {n}"
                + (", and at least 1 for split='eval'" if split == "eval" else "")
            )
        self.eval_shards = k
        self.shard_ids = list(range(n - k)) if split == "train" else list(range(n - k, n))
        records = [man.shards[i] for i in self.shard_ids]
        self.split_rows = sum(r.n_rows for r in records)
        fp = json.dumps([[r.file, r.n_rows, r.sha256] for r in records]).encode()
        self.split_fingerprint = hashlib.sha256(fp).hexdigest()[:16]

        # Fail now, not mid-run: every shard of the split opens and matches its record.
        if verify:
            report = verify_cache(self.cache.dir)
            if not report.ok:
                raise CacheError(f"cache {self.cache.dir} failed verification: " + "; ".join(report.problems))
        for i in self.shard_ids:
            self.cache.shard(i).close()

        # Batch layout of one epoch (see the module docstring).
        if batch_size > self.split_rows:
            raise ValueError(
                f"batch_size {batch_size} is larger than the {split} split ({self.split_rows} rows in "
                f"{len(self.shard_ids)} shards); use a smaller batch or more shards"
            )
        round_rows = batch_size * world_size
        self._n_full, self._tail = divmod(self.split_rows, round_rows)
        serve_tail = not drop_last and self._tail >= world_size
        self.batches_per_epoch = self._n_full + int(serve_tail)
        self.dropped_rows_per_epoch = 0 if serve_tail else self._tail
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"the {split} split's {self.split_rows} rows make no batch of {batch_size} on each of "
                f"{world_size} ranks with drop_last={drop_last}; "
                + ("use a smaller batch_size" if batch_size > 1 else "use fewer ranks, or a bigger cache")
            )
        if self.dropped_rows_per_epoch and not drop_last and rank == 0:  # every rank drops the same rows: say it once
            warnings.warn(
                f"{self._tail} row(s) per epoch ({self.split_rows} mod {round_rows}) are fewer than "
                f"world_size={world_size} and are not served, so every rank yields the same batch count",
                stacklevel=2,
            )
        # Runs: the shuffle's unit (see train.epoch_stream and auto_run_rows).
        write_shuffle = man.extra.get("write_shuffle")
        if run_rows is None:
            window_rows = min(window, len(self.shard_ids)) * self.split_rows // len(self.shard_ids)
            row_bytes = man.n_models * man.n_hooks * self._slot_bytes  # a run is contiguous over all slots
            run_rows = auto_run_rows(row_bytes, batch_size, window_rows, write_shuffle)
        elif run_rows > 1 and write_shuffle is None:
            warnings.warn(
                f"run_rows={run_rows} on a cache the manifest does not record as shuffled at write time "
                "(no 'write_shuffle'): a run may be consecutive tokens of one sequence",
                stacklevel=2,
            )
        self.run_rows = run_rows
        batch_bytes = batch_size * len(self._slots) * self._slot_bytes
        self._chunk = max(1, CHUNK_BYTES // batch_bytes)  # batches gathered per step
        if gather_threads is None:
            self.gather_threads = default_gather_threads(batch_bytes)
        self._depth = max(1, prefetch // self._chunk)  # chunks queued ahead: `prefetch` batches, or one chunk
        self._epoch, self._batch = 0, 0  # position: next batch the consumer will receive
        self._active: weakref.ref[_LoaderIterator] | None = None

    def __len__(self) -> int:
        """Batches one full iteration yields on this rank (all ``epochs``)."""
        return self.batches_per_epoch * self.epochs

    def normalization(self) -> Normalization:
        """The cache's normalization factors for the served slots (to fold into exported weights)."""
        return self.cache.normalization().select(self.model_ids, self.hook_ids)

    def _windows(self, epoch: int) -> list[Window]:
        order = stream_rng(self.seed, epoch, 0).permutation(len(self.shard_ids))
        shards = [self.shard_ids[i] for i in order]
        sizes = [self.cache.manifest.shards[i].n_rows for i in shards]
        out, start = [], 0
        for w0 in range(0, len(shards), self.window):
            out.append(Window(shards[w0 : w0 + self.window], sizes[w0 : w0 + self.window], start, self.run_rows))
            start = out[-1].end
        return out

    def global_batch_rows(self, j: int) -> int:
        """Rows batch ``j`` of an epoch holds on all ranks together: ``batch_size * world_size``,
        or the tail for the final, shorter batch."""
        return self.batch_size * self.world_size if j < self._n_full else self._tail

    def _batch_range(self, j: int) -> tuple[int, int]:
        """Stream positions ``[a, b)`` of this rank's batch ``j`` in an epoch."""
        b, w, r = self.batch_size, self.world_size, self.rank
        if j < self._n_full:
            a = (j * w + r) * b
            return a, a + b
        q, m = divmod(self._tail, w)
        a = self._n_full * w * b + r * q + min(r, m)
        return a, a + q + (r < m)

    def _gather(
        self, windows: list[Window], epoch: int, ranges: list[tuple[int, int]], buffers: HostBufferPool,
        copier: CopyPool,
    ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Stream rows ``[a, b)`` of each range into host tensors ``(acts_BMPD, index_B2)``, one pair
        per range: views of one buffer in the storage dtype (and of one index tensor)."""
        man = self.cache.manifest
        total = sum(b - a for a, b in ranges)
        acts = buffers.take(total)
        out = acts.view(torch.uint8).numpy().reshape(total, len(self._slots), self._slot_bytes)
        index = torch.empty((total, 2), dtype=torch.int64) if self.with_index else None
        # Runs are served in stream order, so adjacent ranges (consecutive batches) copy as one.
        spans: list[list[int]] = []
        for a, b in ranges:
            if spans and spans[-1][1] == a and self.run_rows > 1:
                spans[-1][1] = b
            else:
                spans.append([a, b])
        slots = None if self._all_slots else self._slots
        pieces = 1 if self.gather_threads == 1 else 2 * self.gather_threads
        filled = 0
        for n, (a, b) in enumerate(spans):
            done = spans[n + 1][0] if n + 1 < len(spans) else ranges[-1][1]  # no later span reads before this
            k = bisect.bisect_right([w.start for w in windows], a) - 1  # the window holding row a
            while a < b:
                win = windows[k]
                if win.perm is None:
                    win.open(self.cache, self.seed, epoch, k, man.n_models * man.n_hooks, self._slot_bytes)
                lo, hi = a - win.start, min(b, win.end) - win.start
                part = slice(filled, filled + hi - lo)
                copier.run(win.copies(lo, hi, out[part], None if index is None else index[part], slots, pieces))
                if win.end <= done:  # this rank's later batches start past it: release its pages now
                    win.close()
                filled, a, k = filled + hi - lo, win.end, k + 1
        cuts = np.cumsum([0, *(b - a for a, b in ranges)]).tolist()
        return [(acts[c0:c1], None if index is None else index[c0:c1]) for c0, c1 in zip(cuts, cuts[1:])]

    def _produce(self, epoch0: int, batch0: int, put: Put, stop: threading.Event) -> None:
        """Background thread (:class:`Prefetcher`): put lists of ``(epoch, j, acts, index)``, one per chunk."""
        man = self.cache.manifest
        row_shape = (len(self.models), len(self.hooks), man.d_model)
        buffers = HostBufferPool(self._chunk * self.batch_size, row_shape, man.torch_dtype, self._depth + 3,
                                 pin=self.device.type == "cuda")
        windows: list[Window] = []
        copier = CopyPool(self.gather_threads, "ActivationLoader-gather")
        try:
            for epoch in range(epoch0, self.epochs):
                windows = self._windows(epoch)
                for j0 in range(batch0 if epoch == epoch0 else 0, self.batches_per_epoch, self._chunk):
                    if stop.is_set():
                        return
                    js = range(j0, min(j0 + self._chunk, self.batches_per_epoch))
                    chunk = self._gather(windows, epoch, [self._batch_range(j) for j in js], buffers, copier)
                    if not put([(epoch, j, acts, index) for j, (acts, index) in zip(js, chunk)]):
                        return
                    del chunk  # now held by the queue and the consumer only: recycled once they drop it
                for win in windows:
                    win.close()
        finally:
            copier.close()
            for win in windows:
                win.close()

    def __iter__(self) -> "_LoaderIterator":
        """Start from the current position (a fresh loader: the start; a finished one yields nothing).

        Only one iterator is live at a time: a new one stops the previous one's thread, and the
        previous one then raises instead of ending as if the stream were done.
        """
        self._close_active("a newer iter(loader) started (one iterator per loader at a time; "
                           "for two streams, build two loaders)")
        it = _LoaderIterator(self)
        self._active = weakref.ref(it)
        return it

    def _close_active(self, why: str) -> None:
        old = self._active() if self._active is not None else None
        if old is not None:
            old.close(superseded=why)

    def _advance(self, epoch: int, j: int) -> None:
        assert (epoch, j) == (self._epoch, self._batch), "loader stream out of order"
        self._epoch, self._batch = (epoch + 1, 0) if j + 1 == self.batches_per_epoch else (epoch, j + 1)

    def _to_device(self, acts: torch.Tensor) -> torch.Tensor:
        """A host batch on ``device`` in ``dtype`` (CUDA goes through :class:`CudaStager` instead)."""
        if self.device.type == "cpu":
            return acts if acts.dtype == self.dtype else acts.to(self.dtype)
        return acts.to(self.device, non_blocking=True).to(self.dtype)

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready position (batches *consumed*, prefetched ones excluded) plus what defines the
        stream. The same on every rank, so rank 0's state resumes all ranks."""
        state: dict[str, Any] = {"format": STATE_FORMAT, "epoch": self._epoch, "batch": self._batch}
        state.update({k: getattr(self, k) for k in _STREAM_KEYS})
        state["split_rows"] = self.split_rows
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the exact stream a :meth:`state_dict` describes (the next ``iter`` starts there)."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not an ActivationLoader state: format {state.get('format')!r}, want {STATE_FORMAT!r}")
        diff = [f"{k}: state {state.get(k, _STATE_DEFAULTS.get(k))!r}, loader {getattr(self, k)!r}"
                for k in _STREAM_KEYS if state.get(k, _STATE_DEFAULTS.get(k)) != getattr(self, k)]
        if diff:
            raise ValueError(
                f"loader state is from a different stream ({'; '.join(diff)}); build the loader with the "
                "settings and cache the state was taken with"
            )
        epoch, batch = state.get("epoch"), state.get("batch")
        whole = all(isinstance(v, int) and not isinstance(v, bool) for v in (epoch, batch))
        # epoch == epochs, batch 0: the position after the last batch (a finished loader's state).
        if not (whole and 0 <= epoch <= self.epochs and 0 <= batch < self.batches_per_epoch
                and (epoch < self.epochs or batch == 0)):
            raise ValueError(f"loader state position epoch={epoch!r}, batch={batch!r} is out of range for this loader "
                             f"({self.epochs} epoch(s) of {self.batches_per_epoch} batches)")
        self._close_active("the loader was repositioned (load_state_dict or rewind); iterate it anew")
        self._epoch, self._batch = epoch, batch

    def rewind(self) -> None:
        """Go back to the start of epoch 0 (for example to replay the same eval batches)."""
        self.load_state_dict({**self.state_dict(), "epoch": 0, "batch": 0})


class _LoaderIterator:
    """One pass from the loader's position; owns the :class:`Prefetcher` and so the thread.

    The thread holds the loader but never this object, so when the consumer drops it (break,
    exception, end of scope) the prefetcher is collected with it and stops the thread. On CUDA
    it keeps one batch staged on the device ahead of the one it returns (:class:`CudaStager`);
    the loader's position counts returned batches only, so a staged one is not "consumed".
    """

    def __init__(self, loader: ActivationLoader) -> None:
        self.loader = loader
        self._prefetcher: Prefetcher | None = None
        if loader._epoch < loader.epochs:
            produce = partial(loader._produce, loader._epoch, loader._batch)
            self._prefetcher = Prefetcher(produce, loader._depth, name="ActivationLoader")
        self._stager = CudaStager(loader.device, loader.dtype) if loader.device.type == "cuda" else None
        self._staged: tuple | None = None  # (epoch, j, acts on the device, copy event, index)
        self._error: BaseException | None = None  # raised by the prefetcher while staging ahead
        self._superseded: str | None = None  # why the loader stopped this iterator, if it did

    def __iter__(self) -> "_LoaderIterator":
        return self

    def _next_host(self) -> tuple:
        if self._superseded is not None:
            # Ending quietly would look like the end of the data: zip(loader, loader) would run 0 steps.
            raise RuntimeError(f"this loader iterator was stopped: {self._superseded}")
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        if self._prefetcher is None:
            raise StopIteration
        return next(self._prefetcher)  # StopIteration, or the thread's exception

    def _stage_next(self) -> None:
        assert self._stager is not None
        try:
            epoch, j, acts, index = self._next_host()
        except StopIteration:
            self._staged = None
            return
        except Exception as e:  # noqa: BLE001 -- the batch in hand is still valid: raise at the next call
            self._staged, self._error = None, e
            return
        self._staged = (epoch, j, *self._stager.stage(acts), index)

    def __next__(self) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self._stager is None:
            epoch, j, acts, index = self._next_host()
            acts_BMPD = self.loader._to_device(acts)
        else:
            if self._staged is None:
                epoch, j, acts, index = self._next_host()
                staged = (epoch, j, *self._stager.stage(acts), index)
            else:
                staged = self._staged
            self._stage_next()  # batch j+1's copy overlaps the consumer's work on batch j
            epoch, j, acts_dev, done, index = staged
            acts_BMPD = self._stager.release(acts_dev, done)
        self.loader._advance(epoch, j)
        return (acts_BMPD, index) if self.loader.with_index else acts_BMPD

    def close(self, superseded: str | None = None) -> None:
        """Stop and join the background thread (idempotent); undelivered batches are dropped.
        ``superseded``: the loader stopped this iterator (why); its next ``next`` raises that."""
        if superseded is not None:
            self._superseded = superseded
        self._staged = None
        if self._prefetcher is not None:
            self._prefetcher.close()
