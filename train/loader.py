"""Stage-2 data path: a shuffled, prefetching loader over memory-mapped activation shards.

The epoch stream (the same on every rank, a function of ``seed`` and the epoch alone):
shuffle the split's shards (seeded by ``(seed, epoch)``), cut that order into windows of
``window`` shards, and permute the rows of each window together (seeded by ``(seed, epoch,
window)``). The concatenation is the epoch stream; every row of the split is in it once.

Batches are consecutive pieces of that stream. Rank ``r`` of ``w`` takes batches ``r, r+w,
r+2w, ...`` of ``batch_size`` rows (one "round" is ``w`` batches); the rows left after the last
full round (``T = rows mod (w * batch_size)``) are dealt as one final batch per rank of
``floor(T/w)`` or ``ceil(T/w)`` rows. So all ranks yield the same number of batches (DDP's
all-reduce never waits for a rank that finished early) and together serve every row once.
Remainders:

- ``world_size == 1``: the last batch of an epoch is shorter; nothing is dropped.
- ``world_size > 1`` and ``0 < T < world_size``: a final round would leave some rank empty, so
  those ``T`` rows (fewer than ``world_size``; which ones changes each epoch) are not served,
  with a warning at construction. ``dropped_rows_per_epoch`` says how many.
- ``drop_last=True``: every batch has exactly ``batch_size`` rows; the ``T`` rows are not served.

Memory: only the windows a batch touches are mapped, and a window is unmapped as soon as this
rank's batches have passed it: peak memory is about one window's pages plus ``prefetch``
batches, whatever the cache size. Within a batch rows are ordered by shard and row (the
batch's *content* is random; sorted reads keep page access local).

Threading: one background thread per active iterator builds batches into host buffers in the
storage dtype (pinned when the device is CUDA) and puts them on a bounded queue of ``prefetch``
batches; the row copies (numpy ``take``, which releases the GIL) may fan out to a small pool of
``gather_threads``. The consuming thread copies each batch to the device with
``non_blocking=True`` and casts it there. Breaking out of the loop, an exception in its body,
or garbage collection of the iterator stops and joins the threads.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import queue
import threading
import warnings
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.cache import Cache, open_cache, verify_cache
from shared.cache_format import CacheError
from shared.normalization import Normalization
from shared.shard_io import ShardReader

__all__ = ["ActivationLoader", "default_eval_shards", "STATE_FORMAT"]

STATE_FORMAT = "crosscache.ActivationLoader/1"
_STREAM_KEYS = ("seed", "batch_size", "window", "world_size", "split", "drop_last", "split_fingerprint")


def default_eval_shards(n_shards: int) -> int:
    """Shards held out for ``split="eval"`` when ``eval_shards`` is None: 5% (at least one) of a
    cache with two or more shards, none for a one-shard cache. They are the *last* shards in
    manifest order, chosen independently of ``seed``, so train and eval never overlap."""
    return 0 if n_shards < 2 else max(1, round(0.05 * n_shards))


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(list(key)))


def _lookup(kind: str, name: str, names: list[str]) -> int:
    if name not in names:
        raise ValueError(f"{kind} {name!r} is not in the cache; it holds {names}")
    return names.index(name)


class _Window:
    """A window of one epoch: its shards (manifest indices) and where it sits in the stream."""

    def __init__(self, shards: list[int], sizes: list[int], start: int) -> None:
        self.shards = shards
        self.offsets = np.cumsum([0, *sizes])  # window-local row id of each shard's first row
        self.start, self.end = start, start + int(self.offsets[-1])
        self.perm: np.ndarray | None = None  # window-local row ids in stream order
        self.readers: list[ShardReader] = []
        self.arrays: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (acts, seq, pos) views

    def open(self, cache: Cache, seed: int, epoch: int, k: int, n_slots: int, slot_bytes: int) -> None:
        self.perm = _rng(seed, epoch, k + 1).permutation(self.end - self.start)
        for i in self.shards:
            r = cache.shard(i)
            self.readers.append(r)
            # Byte views of [N, M*P, D] rows: one code path for every storage dtype.
            acts = r.acts.view(torch.uint8).numpy().reshape(r.n_rows, n_slots, slot_bytes)
            self.arrays.append((acts, r.seq.numpy(), r.pos.numpy()))

    def copies(
        self, lo: int, hi: int, out: np.ndarray, index: torch.Tensor | None, slots: np.ndarray | None, pieces: int
    ) -> list[tuple]:
        """:func:`_copy_rows` jobs for window-stream positions ``[lo, hi)``, about ``pieces`` of them."""
        assert self.perm is not None, "window not open"
        local = np.sort(self.perm[lo:hi])
        cuts = np.searchsorted(local, self.offsets)  # where each shard's rows start in `local`
        step = max(256, -(-(hi - lo) // pieces))
        jobs = []
        for s, (src, seq, pos) in enumerate(self.arrays):
            for i0 in range(int(cuts[s]), int(cuts[s + 1]), step):
                i1 = min(i0 + step, int(cuts[s + 1]))
                rows = local[i0:i1] - self.offsets[s]
                jobs.append((src, seq, pos, rows, out[i0:i1], None if index is None else index[i0:i1], slots))
        return jobs

    def close(self) -> None:
        self.arrays.clear()  # drop views first: a live view keeps the mapping from closing
        self.perm = None
        for r in self.readers:
            r.close()
        self.readers.clear()


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
        rank, world_size: this process's part of every epoch (DDP).
        device, dtype: where batches go and the dtype they are cast to *on the device*.
        with_index: also yield ``index_B2`` (int64, on the CPU): each row's ``(seq, pos)``.
        eval_shards: shards held out for eval, the last ones in manifest order (default
            :func:`default_eval_shards`; 0 serves every shard as train).
        drop_last: serve only full batches (see the module docstring for remainders).
        prefetch: batches the background thread may prepare ahead.
        gather_threads: threads copying each batch's rows (default: a quarter of the CPUs, 1 to 4).
        verify: check every shard's sha256 against the manifest before serving.
    """

    def __init__(
        self,
        cache: str | Path | Cache,
        batch_size: int,
        *,
        models: Sequence[str] | None = None,
        hooks: Sequence[str] | None = None,
        split: str = "train",
        seed: int = 0,
        epochs: int = 1,
        window: int = 8,
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
        if gather_threads is None:  # random row reads are latency-bound: threads add GB/s
            gather_threads = max(1, min(4, (os.cpu_count() or 1) // 4))
        for name, value, low in (("batch_size", batch_size, 1), ("window", window, 1), ("epochs", epochs, 1),
                                 ("world_size", world_size, 1), ("prefetch", prefetch, 1), ("seed", seed, 0),
                                 ("gather_threads", gather_threads, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype, got {dtype}")
        self.batch_size, self.seed, self.epochs, self.window = batch_size, seed, epochs, window
        self.rank, self.world_size, self.split, self.drop_last = rank, world_size, split, drop_last
        self.device, self.dtype = torch.device(device), dtype
        self.with_index, self.prefetch, self.gather_threads = with_index, prefetch, gather_threads
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device} asked for but CUDA is not available")

        # Slot selection: names -> cache indices, in the order asked.
        self.models = list(man.model_names if models is None else models)
        self.hooks = list(man.hooks if hooks is None else hooks)
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
        if not 0 <= k < n or (k == 0 and split == "eval"):
            raise ValueError(
                f"eval_shards={eval_shards} does not fit a cache of {n} shard(s): need 0 <= eval_shards < {n}"
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
                f"{world_size} ranks with drop_last={drop_last}; use a smaller batch_size"
            )
        if self.dropped_rows_per_epoch and not drop_last:
            warnings.warn(
                f"{self._tail} row(s) per epoch ({self.split_rows} mod {round_rows}) are fewer than "
                f"world_size={world_size} and are not served, so every rank yields the same batch count",
                stacklevel=2,
            )
        self._epoch, self._batch = 0, 0  # position: next batch the consumer will receive
        self._active: weakref.ref[_LoaderIterator] | None = None

    def __len__(self) -> int:
        """Batches one full iteration yields on this rank (all ``epochs``)."""
        return self.batches_per_epoch * self.epochs

    def normalization(self) -> Normalization:
        """The cache's normalization factors for the served slots (to fold into exported weights)."""
        return self.cache.normalization().select(self.model_ids, self.hook_ids)

    def _windows(self, epoch: int) -> list[_Window]:
        order = _rng(self.seed, epoch, 0).permutation(len(self.shard_ids))
        shards = [self.shard_ids[i] for i in order]
        sizes = [self.cache.manifest.shards[i].n_rows for i in shards]
        out, start = [], 0
        for w0 in range(0, len(shards), self.window):
            out.append(_Window(shards[w0 : w0 + self.window], sizes[w0 : w0 + self.window], start))
            start = out[-1].end
        return out

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
        self, windows: list[_Window], epoch: int, a: int, b: int, pin: bool, pool: ThreadPoolExecutor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rows ``[a, b)`` of the epoch stream into fresh host tensors (storage dtype)."""
        man = self.cache.manifest
        shape = (b - a, len(self.models), len(self.hooks), man.d_model)
        acts = torch.empty(shape, dtype=man.torch_dtype, pin_memory=pin)
        out = acts.view(torch.uint8).numpy().reshape(b - a, len(self._slots), self._slot_bytes)
        index = torch.empty((b - a, 2), dtype=torch.int64) if self.with_index else None
        filled = 0
        k = bisect.bisect_right([w.start for w in windows], a) - 1  # the window holding row a
        while filled < b - a:
            win = windows[k]
            if win.perm is None:
                win.open(self.cache, self.seed, epoch, k, man.n_models * man.n_hooks, self._slot_bytes)
            lo, hi = max(a, win.start) - win.start, min(b, win.end) - win.start
            part = slice(filled, filled + hi - lo)
            slots = None if self._all_slots else self._slots
            pieces = 1 if pool is None else 2 * self.gather_threads
            jobs = win.copies(lo, hi, out[part], None if index is None else index[part], slots, pieces)
            if pool is None:
                for job in jobs:
                    _copy_rows(*job)
            else:
                list(pool.map(lambda job: _copy_rows(*job), jobs))
            del jobs  # the jobs hold views of the mapping, which would keep it from closing
            filled += hi - lo
            if win.end <= b:  # this rank's later batches start past it: release its pages now
                win.close()
            k += 1
        return acts, index

    def _produce(self, epoch0: int, batch0: int, q: queue.Queue, stop: threading.Event) -> None:
        """Background thread: put ``(epoch, j, acts, index)`` items, then ``_END`` (or an error)."""
        pin = self.device.type == "cuda"
        windows: list[_Window] = []
        pool = None
        if self.gather_threads > 1:
            pool = ThreadPoolExecutor(self.gather_threads, thread_name_prefix="ActivationLoader-gather")
        try:
            for epoch in range(epoch0, self.epochs):
                windows = self._windows(epoch)
                for j in range(batch0 if epoch == epoch0 else 0, self.batches_per_epoch):
                    if stop.is_set():
                        return
                    a, b = self._batch_range(j)
                    if not _put(q, (epoch, j, *self._gather(windows, epoch, a, b, pin, pool)), stop):
                        return
                for win in windows:
                    win.close()
            _put(q, _END, stop)
        except BaseException as e:  # noqa: BLE001 -- handed to the consumer, which re-raises it
            _put(q, _Failure(e), stop)
        finally:
            if pool is not None:
                pool.shutdown(wait=True)
            for win in windows:
                win.close()

    def __iter__(self) -> "_LoaderIterator":
        """Start from the current position (a fresh loader: the start; a finished one yields nothing).

        Only one iterator is live at a time: a new one stops the previous one's thread.
        """
        self._close_active()
        it = _LoaderIterator(self)
        self._active = weakref.ref(it)
        return it

    def _close_active(self) -> None:
        old = self._active() if self._active is not None else None
        if old is not None:
            old.close()

    def _advance(self, epoch: int, j: int) -> None:
        assert (epoch, j) == (self._epoch, self._batch), "loader stream out of order"
        self._epoch, self._batch = (epoch + 1, 0) if j + 1 == self.batches_per_epoch else (epoch, j + 1)

    def _to_device(self, acts: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cpu":
            return acts.to(self.dtype)
        # Host buffer is pinned: the copy overlaps compute; the cast runs on the device, after it.
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
        diff = [f"{k}: state {state.get(k)!r}, loader {getattr(self, k)!r}"
                for k in _STREAM_KEYS if state.get(k) != getattr(self, k)]
        if diff:
            raise ValueError(
                f"loader state is from a different stream ({'; '.join(diff)}); build the loader with the "
                "settings and cache the state was taken with"
            )
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if epoch < 0 or not 0 <= batch < self.batches_per_epoch:
            raise ValueError(f"loader state position epoch={epoch}, batch={batch} is out of range")
        self._close_active()
        self._epoch, self._batch = epoch, batch

    def rewind(self) -> None:
        """Go back to the start of epoch 0 (for example to replay the same eval batches)."""
        self.load_state_dict({**self.state_dict(), "epoch": 0, "batch": 0})


def _copy_rows(
    src: np.ndarray, seq: np.ndarray, pos: np.ndarray, rows: np.ndarray,
    out: np.ndarray, index: torch.Tensor | None, slots: np.ndarray | None,
) -> None:
    """One gather job: ``out[i] = src[rows[i]]`` (selected slots only), ``index[i] = (seq, pos)``."""
    if slots is None:  # whole rows: one contiguous copy per row; numpy releases the GIL here
        np.take(src, rows, axis=0, out=out, mode="clip")
    else:
        out[:] = src[rows[:, None], slots[None, :]]
    if index is not None:
        index[:, 0] = torch.from_numpy(seq[rows])
        index[:, 1] = torch.from_numpy(pos[rows].astype(np.int64))


_END = object()  # queue item: the stream is finished


class _Failure:  # queue item: the thread failed with ``error``
    def __init__(self, error: BaseException) -> None:
        self.error = error


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> bool:
    """Blocking put that gives up once ``stop`` is set (so the thread can always exit)."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.05)
            return True
        except queue.Full:
            pass
    return False


class _LoaderIterator:
    """One pass from the loader's position; owns the background thread.

    The thread holds the loader, the queue and the stop event but never this object, so when
    the consumer drops it (break, exception, end of scope) ``__del__`` runs and stops the thread.
    """

    def __init__(self, loader: ActivationLoader) -> None:
        self.loader = loader
        self._queue: queue.Queue = queue.Queue(maxsize=loader.prefetch)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if loader._epoch < loader.epochs:
            self._thread = threading.Thread(
                target=loader._produce, args=(loader._epoch, loader._batch, self._queue, self._stop),
                name="ActivationLoader", daemon=True,
            )
            self._thread.start()

    def __iter__(self) -> "_LoaderIterator":
        return self

    def __next__(self) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self._thread is None:
            raise StopIteration
        item = None
        while item is None:
            try:
                item = self._queue.get(timeout=0.1)
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():  # cannot happen; never hang
                    self.close()
                    raise RuntimeError("ActivationLoader thread ended without a result") from None
        if item is _END or isinstance(item, _Failure):
            self.close()
            if item is _END:
                raise StopIteration
            raise item.error
        epoch, j, acts, index = item
        self.loader._advance(epoch, j)
        acts_BMPD = self.loader._to_device(acts)
        return (acts_BMPD, index) if self.loader.with_index else acts_BMPD

    def close(self) -> None:
        """Stop and join the background thread (idempotent)."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop.set()
        while True:  # unblock a pending put and free prefetched buffers
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if thread is not threading.current_thread():
            thread.join(timeout=30)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 -- at interpreter exit module globals may be gone
            pass
