"""Background batch production: a producer thread, a bounded queue, shutdown, copy threads, and
recycled host buffers.

:class:`Prefetcher` runs ``produce(put, stop)`` in a daemon thread and iterates the items of the
lists (chunks) it puts. At most ``depth`` chunks wait in the queue, so the producer runs at most
that far ahead; one hand-off per chunk rather than per item keeps thread switches rare. The end
of the stream and any exception raised in the thread reach the consumer (the exception is
re-raised in the consuming thread). Closing it (explicitly, or by garbage collection when the
consumer drops it: break, exception, end of scope) sets ``stop`` and joins the thread. The thread
never holds the :class:`Prefetcher`, so dropping the last reference is enough to stop it.

:class:`CopyPool` runs the producer's copy jobs inline or on a few threads (numpy copies release
the GIL).

:class:`HostBufferPool` hands the producer batch buffers ``[n, *row_shape]`` and takes one back
for reuse only once nothing outside the pool references its memory (no tensor, view, numpy
array or storage object of the consumer's). Reused buffers stay in the CPU cache and skip the
page faults and zeroing of fresh memory: fresh ones cost the loader benchmark ~25% more CPU time.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

__all__ = ["Prefetcher", "CopyPool", "HostBufferPool"]

Put = Callable[[list], bool]
"""``put(items)`` queues a chunk of items; False once the consumer has stopped (the producer should return)."""

_END = object()  # queue item: the stream is finished


class _Failure:  # queue item: the thread failed with ``error``
    def __init__(self, error: BaseException) -> None:
        self.error = error


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> bool:
    """Blocking put that gives up once ``stop`` is set (so the thread can always exit)."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.05)
        except queue.Full:
            continue
        # Hand the GIL to a consumer waiting for this chunk now: it takes its batches while we
        # wait, instead of cutting into our next copy at each of the GIL releases numpy makes
        # (one per run copied). Loader read throughput +15% (bench/loader.py); no-op if nobody waits.
        time.sleep(0)
        return True
    return False


def _run(produce: Callable[[Put, threading.Event], None], q: queue.Queue, stop: threading.Event) -> None:
    """Thread body: ``produce``, then ``_END``, or the exception it raised."""
    try:
        produce(lambda item: _put(q, item, stop), stop)
        _put(q, _END, stop)
    except BaseException as e:  # noqa: BLE001 -- handed to the consumer, which re-raises it
        _put(q, _Failure(e), stop)


class Prefetcher:
    """Iterate the items of the chunks ``produce(put, stop)`` puts, up to ``depth`` chunks ahead in a thread.

    ``produce`` must not reference this object (the thread would keep it alive, and garbage
    collection could no longer stop the thread).
    """

    def __init__(self, produce: Callable[[Put, threading.Event], None], depth: int, name: str) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._pending: deque = deque()  # items of the current chunk not yet returned
        self._stop = threading.Event()
        self._thread: threading.Thread | None = threading.Thread(
            target=_run, args=(produce, self._queue, self._stop), name=name, daemon=True
        )
        self._thread.start()

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self) -> Any:
        if self._pending:
            return self._pending.popleft()
        if self._thread is None:
            raise StopIteration
        item = None
        while item is None:
            try:
                item = self._queue.get(timeout=0.1)
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():  # cannot happen; never hang
                    self.close()
                    raise RuntimeError(f"{self._thread_name()} thread ended without a result") from None
        if item is _END or isinstance(item, _Failure):
            self.close()
            if item is _END:
                raise StopIteration
            raise item.error
        self._pending.extend(item)
        return self._pending.popleft()

    def _thread_name(self) -> str:
        return "prefetch" if self._thread is None else self._thread.name

    def close(self) -> None:
        """Stop and join the thread (idempotent); prefetched items are dropped."""
        self._pending.clear()
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


class CopyPool:
    """Runs copy jobs ``(fn, *args)``: inline with one thread, else on ``threads`` named threads."""

    def __init__(self, threads: int, name: str) -> None:
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix=name) if threads > 1 else None

    def run(self, jobs: list[tuple]) -> None:
        if self._pool is None:
            for fn, *args in jobs:
                fn(*args)
        else:
            list(self._pool.map(lambda job: job[0](*job[1:]), jobs))  # re-raises a job's exception

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


_use_count: Callable[[int], int] | None = getattr(torch._C, "_storage_Use_Count", None)


class HostBufferPool:
    """Batch buffers ``[n, *row_shape]`` (``n <= capacity_rows``) for one producer thread.

    :meth:`take` reuses a buffer whose memory nothing outside the pool references, else allocates
    one. The pool keeps the ``size`` most recently allocated buffers (older ones, still held by
    the consumer, are left to it), so it adds at most ``size`` buffers to peak memory. Without
    torch's storage use count (a private API) or with ``pin`` (pinned blocks are already cached
    by torch, and an asynchronous device copy may still be reading one) it always allocates.
    """

    def __init__(self, capacity_rows: int, row_shape: tuple[int, ...], dtype: torch.dtype, size: int,
                 pin: bool = False) -> None:
        self.capacity_rows, self.row_shape, self.dtype, self.pin = capacity_rows, row_shape, dtype, pin
        self.size = size if (_use_count is not None and not pin) else 0
        self._entries: list[tuple[torch.Tensor, tuple[int, int]]] = []  # (buffer, references when free)

    @staticmethod
    def _references(buf: torch.Tensor) -> tuple[int, int]:
        # Views, arrays and tensors over the buffer raise the storage's use count; a storage object
        # the consumer kept is the one untyped_storage() returns, so its refcount rises instead.
        storage = buf.untyped_storage()
        return _use_count(storage._cdata), sys.getrefcount(storage)  # type: ignore[misc]

    def take(self, n_rows: int) -> torch.Tensor:
        """A buffer ``[n_rows, *row_shape]`` the caller may overwrite (contents undefined)."""
        assert 0 < n_rows <= self.capacity_rows, (n_rows, self.capacity_rows)
        for buf, free in self._entries:
            if self._references(buf) == free:
                return buf[:n_rows]
        buf = torch.empty((self.capacity_rows, *self.row_shape), dtype=self.dtype, pin_memory=self.pin)
        if self.size:
            self._entries.append((buf, self._references(buf)))
            if len(self._entries) > self.size:
                self._entries.pop(0)  # the oldest buffer, still held by the consumer: it keeps it
        return buf[:n_rows]
