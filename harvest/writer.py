"""The shard writer: device->host copies, the write-time shuffle, atomic shard writes.

The forward loop hands over the rows of each group of forward batches (already normalized and
cast to the storage dtype). Each row is copied straight to its place in the current chunk's buffer
(``shuffle_shards`` shards of rows), at the position the chunk's permutation gives (a generator
seeded by ``(seed, chunk)``): the buffer fills already shuffled, and each shard is a contiguous
slice of it. When the chunk is full, ``write_threads`` threads check its shards for inf/NaN and
write them atomically (sha256, write, fsync) while the next chunk fills; the chunk's shards are
then listed in the manifest in order, and it is saved. Two chunk buffers alternate. The
permutation depends only on the seed and the chunk index, so a resumed harvest rewrites
byte-identical shards.

CPU rows are copied in the forward loop's own thread (:class:`ShardWriter`). CUDA rows start
their copy into pinned host memory at once, on a side stream (the forward's stream never waits
for it), and a writer thread waits for the copy and takes them (:class:`ShardWriterThread`).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_all
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from harvest.models import HarvestInputError
from shared.cache import CacheWriter, nonfinite_rows
from shared.cache_format import ShardRecord, shard_file_name
from shared.shard_io import nonfinite_count

__all__ = ["Piece", "ShardWriter", "ShardWriterThread", "chunk_permutation", "copy_to_host_async",
           "default_write_threads", "drain", "shard_writer_for", "writer_wait_note"]


# Rows a CUDA harvest lets wait for the writer thread, in pinned host memory: eight groups of
# pythia-70m-sized pairs at batch 32 (64 MiB each), or two at the 256 MiB group cap. A disk that
# falls behind then costs this much host memory at most, not a number of groups of any size.
MAX_PENDING_BYTES = 512 * 2**20


def default_write_threads() -> int:
    """Shard-writing threads when none are asked for: a quarter of the CPUs, 1 to 4. One core
    hashes ~1 GB/s (sha256) and also writes and fsyncs, so one thread caps a harvest below that
    in rows; on small machines more threads would only take cores from the forward pass."""
    return max(1, min(4, (os.cpu_count() or 1) // 4))


@dataclass
class Piece:
    """Rows handed over together (a group of forward batches) that belong to one chunk, in stream order."""

    chunk: int
    offset: int  # first row's index within the chunk
    acts_NMPD: torch.Tensor  # storage dtype, any device (a pinned host copy for CUDA rows)
    seq_N: torch.Tensor
    pos_N: torch.Tensor
    token_N: torch.Tensor
    ready: torch.cuda.Event | None = None  # recorded after the copy into acts_NMPD, if one is in flight


def _nbytes(piece: Piece) -> int:
    """The bytes of a piece's rows (a view's own, not its base's)."""
    return piece.acts_NMPD.numel() * piece.acts_NMPD.element_size()


def chunk_permutation(seed: int, chunk: int, n: int) -> torch.Tensor:
    """The write-time shuffle of chunk ``chunk`` (``n`` rows); depends on nothing else."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + chunk)
    return torch.randperm(n, generator=g)


def drain(items: list) -> Iterator:
    """Yield a list's items and remove each as it goes, so held rows are freed once sent."""
    items.reverse()
    while items:
        yield items.pop()


def copy_to_host_async(acts: torch.Tensor, stream: torch.cuda.Stream) -> tuple[torch.Tensor, torch.cuda.Event]:
    """Queue CUDA rows' copy into pinned host memory on ``stream``, after the work that made them,
    and return that host tensor and an event recorded after the copy. A copy on the forward's own
    stream would sit between its kernels (and a pageable one blocks)."""
    stream.wait_stream(torch.cuda.current_stream(acts.device))
    with torch.cuda.stream(stream):
        host = torch.empty(acts.shape, dtype=acts.dtype, pin_memory=True)
        host.copy_(acts, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record(stream)
    acts.record_stream(stream)  # the caller drops acts now: its memory waits for the copy
    return host, ready


def writer_wait_note(wait_seconds: float, forward_seconds: float) -> str | None:
    """A line for the end of a harvest when its forward passes spent over a tenth of their time,
    and at least a second, waiting for the shard writer: then writing (hashing, the disk), not the
    models, set the pace. Below a second, the last shards' flush alone passes a tenth of a tiny
    harvest, and says nothing about the disk."""
    if forward_seconds <= 0 or wait_seconds < 1.0 or wait_seconds <= 0.1 * forward_seconds:
        return None
    return (f"the forward passes waited {wait_seconds:.1f} s ({wait_seconds / forward_seconds:.0%} of the harvest) "
            "for the shard writer: writing (sha256, the disk), not the models, bounds this harvest. A faster disk "
            "for --out helps; so may more --write-threads when the CPUs are idle")


def _scatter_rows(out: torch.Tensor, idx: np.ndarray, rows: torch.Tensor) -> None:
    """``out[idx] = rows`` along dim 0 as whole-row copies, on the CPU: numpy's indexing is ~8x
    cheaper here than torch's (which competes with the forward pass for the same cores)."""
    rows = rows.to("cpu", out.dtype)
    if out.dtype == torch.bfloat16:  # numpy has no bfloat16: move the same bytes as int16
        out, rows = out.view(torch.int16), rows.view(torch.int16)
    out.numpy()[idx] = rows.numpy()


def _inverse(perm: np.ndarray) -> np.ndarray:
    """``dest`` with ``dest[perm[k]] = k``: where each stream row of a chunk goes in its buffer."""
    dest = np.empty_like(perm)
    dest[perm] = np.arange(len(perm), dtype=perm.dtype)
    return dest


class ShardWriter:
    """Takes a harvest's rows in stream order and writes them as shuffled shards, in the caller's
    thread: each row is copied to its place in the current chunk's buffer as it arrives; a full
    chunk's shards are written by a pool of ``write_threads`` while the next chunk fills, and listed
    in order once all are written. The caller waits only when a chunk fills before the previous
    one is written (the time is :attr:`wait_seconds`).

    For rows on the CPU. Taking rows in the caller's thread beats handing them to a thread there:
    the copy costs the caller ~1% of a forward pass, while a writer thread waking up per batch on
    cores the forward's intra-op threads fill cost a 2-core harvest 10-15% (10 alternating rounds:
    9.6 s against 8.4 s, median). CUDA rows must wait for their copy to the host:
    :class:`ShardWriterThread` takes them on its own thread. :func:`shard_writer_for` picks one.
    """

    def __init__(
        self,
        writer: CacheWriter,
        *,
        chunk_rows: list[int],
        shard_rows: int,
        shuffle_shards: int,
        seed: int,
        row_shape: tuple[int, int, int],
        dtype: torch.dtype,
        rank: int | None = None,
        write_threads: int | None = None,
        model_names: list[str] | None = None,
        hooks: list[str] | None = None,
        model_dtype: str | None = None,
    ) -> None:
        self.writer = writer
        self.chunk_rows = chunk_rows  # rows in each chunk (the last may be short)
        self.shard_rows = shard_rows
        self.shuffle_shards = shuffle_shards
        self.seed = seed
        self.row_shape = row_shape
        self.dtype = dtype
        self.rank = rank
        # What an inf/NaN refusal names: the slots, and --model-dtype as a cause when it is float16.
        self.model_names, self.hooks, self.model_dtype = model_names, hooks, model_dtype
        self.bytes_written = 0
        self.rows_written = 0
        self.flush_seconds = 0.0  # write_all: from the last rows sent to the last shard listed
        # Time the caller spent blocked waiting for the writing (sha256, disk) to catch up, the
        # final flush aside. Near 0: writing kept up with the forward passes.
        self.wait_seconds = 0.0
        self._stop = threading.Event()
        self._refused = threading.Event()  # a shard held inf/NaN: the chunk's other jobs write nothing
        self._pool = ThreadPoolExecutor(write_threads or default_write_threads(), "crosscache-shard-write")
        self._chunk: int | None = None  # the chunk filling now, and its buffer
        self._buf: dict | None = None
        self._writing: list[Future] = []  # the chunk being written: one future per shard, in order
        self._writing_buf: dict | None = None  # its buffer, free again once it is listed
        self._spare_buf: dict | None = None  # a written chunk's buffer, for the next chunk

    @property
    def total_wait_seconds(self) -> float:
        """All the caller waited for the writing: blocked while handing over rows, then the final flush."""
        return self.wait_seconds + self.flush_seconds

    # -- caller side -------------------------------------------------------------------------
    def put_rows(self, first_row: int, acts_NMPD: torch.Tensor, seq_N: torch.Tensor, pos_N: torch.Tensor,
                 token_N: torch.Tensor) -> None:
        """Take stream rows ``first_row, first_row + 1, ...`` (they may cross chunk boundaries)."""
        for piece in self._pieces(first_row, acts_NMPD, seq_N, pos_N, token_N, None):
            self.wait_seconds += self._take(piece)
        self._list_written(wait=False)  # list a written chunk soon: a crash then loses less

    def _pieces(self, first_row: int, acts_NMPD: torch.Tensor, seq_N: torch.Tensor, pos_N: torch.Tensor,
                token_N: torch.Tensor, ready: torch.cuda.Event | None) -> Iterator[Piece]:
        """The rows cut where they cross a chunk boundary."""
        chunk_size = self.shard_rows * self.shuffle_shards
        i = 0
        while i < acts_NMPD.shape[0]:
            chunk, offset = divmod(first_row + i, chunk_size)
            n = min(acts_NMPD.shape[0] - i, chunk_size - offset)
            yield Piece(chunk, offset, acts_NMPD[i : i + n], seq_N[i : i + n], pos_N[i : i + n], token_N[i : i + n],
                        ready)
            i += n

    def write_all(self, items: Iterable[tuple], send: Callable[..., None]) -> None:
        """``send(*item)`` for every item (it hands over rows), then :meth:`close`. On any error,
        including KeyboardInterrupt, :meth:`abort` and re-raise: the shards already written stay listed."""
        try:
            for item in items:
                send(*item)
            t = time.perf_counter()
            self.close()
            self.flush_seconds = time.perf_counter() - t
        except BaseException:
            self.abort()
            raise

    def close(self) -> None:
        """Write and list everything taken (a last, partial chunk is complete by then), and stop the pool."""
        try:
            self._list_written(wait=True)
        finally:
            self._pool.shutdown(wait=True)

    def abort(self) -> None:
        """Stop without writing the chunk in progress (shards already listed stay listed)."""
        self._stop.set()
        self._pool.shutdown(wait=True)  # a shard write in progress finishes (atomic); queued ones do nothing

    # -- taking rows and writing chunks --------------------------------------------------------
    def _take(self, piece: Piece) -> float:
        """Copy a piece's rows to their places in its chunk's buffer; start writing the chunk when it
        is full. Returns the seconds that waited for the previous chunk's shards to be written."""
        if self._chunk != piece.chunk:
            self._chunk, self._buf = piece.chunk, self._chunk_buffer(piece.chunk)
        buf = self._buf
        assert buf is not None
        end = piece.offset + piece.acts_NMPD.shape[0]
        idx = buf["dest"][piece.offset : end]
        for key, rows in (("acts", piece.acts_NMPD), ("seq", piece.seq_N), ("pos", piece.pos_N),
                          ("token", piece.token_N)):
            _scatter_rows(buf[key], idx, rows)
        buf["filled"] += end - piece.offset
        if buf["filled"] < self.chunk_rows[piece.chunk]:
            return 0.0
        t = time.perf_counter()
        self._list_written(wait=True)  # at most one chunk in the writers' hands
        waited = time.perf_counter() - t
        self._start_chunk(piece.chunk, buf)
        self._chunk, self._buf = None, None
        return waited

    def _nonfinite_error(self, rel_file: str, acts_NMPD: torch.Tensor, seq_N: torch.Tensor, pos_N: torch.Tensor,
                         token_N: torch.Tensor) -> HarvestInputError:
        """The error for a shard's rows holding inf or NaN: which slots, the first such token, the likely cause."""
        bad_N, slots = nonfinite_rows(acts_NMPD, self.model_names, self.hooks)
        n = int(bad_N.sum())
        rows = bad_N.nonzero().flatten().tolist()
        first = min(rows, key=lambda r: (int(seq_N[r]), int(pos_N[r])))  # the shard is shuffled: the earliest token
        kinds = " and ".join(k for k, f in (("inf", torch.isinf), ("NaN", torch.isnan)) if bool(f(acts_NMPD).any()))
        storage = str(self.dtype).removeprefix("torch.")
        causes = []
        if self.dtype == torch.float16 and "NaN" not in kinds:
            causes.append("float16 storage holds magnitudes up to 65,504 and stores a larger normalized activation as "
                          "inf: use --dtype bfloat16 (the same size, float32's range) or float32")
        flag = self.model_dtype == "float16"
        causes.append("the models' own activations are inf or NaN at these tokens"
                      + (" (--model-dtype float16 overflows): use --model-dtype bfloat16 or float32" if flag
                         else ": check the model's weights"))
        return HarvestInputError(
            f"{n} of the {len(bad_N):,} rows of shard {rel_file} hold {kinds} in {', '.join(slots)} as stored "
            f"({storage}), the first at sequence {int(seq_N[first])} position {int(pos_N[first])} (token "
            f"{int(token_N[first])}); the harvest stops and keeps no shard of their chunk (training would stop on "
            "them). "
            + ("Either " + "; or ".join(causes) if len(causes) > 1 else causes[0][0].upper() + causes[0][1:])
            + (f". Harvest again with that flag into a new --out (or delete {self.writer.dir})"
               if flag or len(causes) > 1 else ""))

    def _chunk_buffer(self, chunk: int) -> dict:
        """An empty buffer for chunk ``chunk``, with ``dest``: where each of its stream rows goes.
        Reuses the buffer of the last chunk whose shards are all written (its pages are already
        faulted in: a fresh 512 MiB buffer costs ~130k page faults)."""
        n = self.chunk_rows[chunk]
        spare, self._spare_buf = self._spare_buf, None
        if spare is None or spare["acts"].shape[0] < n:
            spare = {
                "acts": torch.empty((n, *self.row_shape), dtype=self.dtype),
                "seq": torch.empty(n, dtype=torch.int64),
                "pos": torch.empty(n, dtype=torch.int32),
                "token": torch.empty(n, dtype=torch.int32),
            }
        buf = {key: spare[key][:n] for key in ("acts", "seq", "pos", "token")}
        buf.update(dest=_inverse(chunk_permutation(self.seed, chunk, n).numpy()), filled=0, whole=spare)
        return buf

    def _start_chunk(self, chunk: int, buf: dict) -> None:
        n = self.chunk_rows[chunk]
        first_shard = chunk * self.shuffle_shards
        self._writing_buf = buf["whole"]
        self._writing = [
            self._pool.submit(self._write_shard, shard_file_name(first_shard + j, self.rank), buf,
                              start, min(start + self.shard_rows, n))
            for j, start in enumerate(range(0, n, self.shard_rows))
        ]

    def _write_shard(self, rel_file: str, buf: dict, start: int, end: int) -> ShardRecord | None:
        """Pool job: write one shard, rows ``[start, end)`` of the (shuffled) chunk buffer (None once
        the writer is aborted, or another shard of the chunk was refused)."""
        if self._stop.is_set() or self._refused.is_set():
            return None
        acts_NMPD, seq_N, pos_N, token_N = (buf[k][start:end] for k in ("acts", "seq", "pos", "token"))
        if nonfinite_count(acts_NMPD):
            # Every row is checked (the calibration check sees only the raw calibration sample): a
            # float16 overflow in storage, or models that turn inf/NaN later in the stream, were
            # written silently, passed verify and only stopped training. Checked here, not as rows
            # arrive: the pool's threads share the cost, and the forward loop and the CUDA writer
            # thread, each a single thread on a harvest's critical path, never pay it.
            self._refused.set()
            raise self._nonfinite_error(rel_file, acts_NMPD, seq_N, pos_N, token_N)
        return self.writer.write_shard_file(rel_file, acts_NMPD, seq_N, pos_N, token_N)

    def _list_written(self, *, wait: bool) -> None:
        """List the shards of the chunk being written, in order, and save the manifest once: now
        if ``wait``, else only if every shard is done. A failed shard write re-raises here."""
        if not self._writing or not (wait or all(f.done() for f in self._writing)):
            return
        futures, self._writing = self._writing, []
        wait_all(futures)
        self._spare_buf, self._writing_buf = self._writing_buf, None  # no job reads it any more
        error = next((e for e in (f.exception() for f in futures) if e is not None), None)
        if error is not None:
            if self._refused.is_set():  # rows with inf/NaN: remove the chunk's shards already written
                for record in (f.result() for f in futures if f.exception() is None):
                    if record is not None:
                        (self.writer.dir / record.file).unlink(missing_ok=True)
            raise error
        records = [f.result() for f in futures]
        if any(r is None for r in records):  # aborted: the chunk is rewritten on resume
            return
        for j, record in enumerate(records):
            # The manifest once per chunk: a resume restarts from whole chunks, so listing a
            # chunk's first shards earlier gains nothing (and cost ~3.5 ms of fsyncs per shard).
            self.writer.add_record(record, save=j == len(records) - 1)
            self.bytes_written += record.bytes
            self.rows_written += record.n_rows


class ShardWriterThread(ShardWriter):
    """A :class:`ShardWriter` that takes rows on its own thread, for rows on a CUDA device: each
    group's rows start their copy into pinned host memory at once, on a side stream, and go on a
    queue; the thread waits for the copy, never the forward loop. The caller blocks only when the
    rows waiting for the thread would pass ``max_pending_bytes`` (:attr:`wait_seconds`); a piece
    larger than that is still taken alone. Errors re-raise in the caller's thread."""

    def __init__(self, writer: CacheWriter, *, max_pending_bytes: int = MAX_PENDING_BYTES, **kwargs: Any) -> None:
        super().__init__(writer, **kwargs)
        self.max_pending_bytes = max_pending_bytes
        self._queue: queue.Queue[Piece | None] = queue.Queue()  # bounded by bytes, through _room
        self._pending_bytes = 0  # rows queued or being taken by the thread
        self._room = threading.Condition()
        self._error: BaseException | None = None
        self._copy_stream: torch.cuda.Stream | None = None
        self._thread = threading.Thread(target=self._run, name="crosscache-shard-writer", daemon=True)
        self._thread.start()

    # -- caller side -------------------------------------------------------------------------
    def put(self, piece: Piece) -> None:
        """Queue rows for writing. Blocks while the rows already waiting and these would pass
        ``max_pending_bytes`` (the time blocked adds to :attr:`wait_seconds`)."""
        self._raise_if_failed()
        nbytes = _nbytes(piece)
        with self._room:
            if self._pending_bytes and self._pending_bytes + nbytes > self.max_pending_bytes:
                t = time.perf_counter()
                try:
                    while self._pending_bytes and self._pending_bytes + nbytes > self.max_pending_bytes:
                        self._raise_if_failed()  # a writer that died never makes room
                        self._room.wait(timeout=0.5)
                finally:
                    self.wait_seconds += time.perf_counter() - t
            self._pending_bytes += nbytes
        self._queue.put(piece)

    def put_rows(self, first_row: int, acts_NMPD: torch.Tensor, seq_N: torch.Tensor, pos_N: torch.Tensor,
                 token_N: torch.Tensor) -> None:
        """Queue stream rows ``first_row, first_row + 1, ...``, split where they cross a chunk boundary."""
        acts_NMPD, ready = self._start_copy_to_host(acts_NMPD)
        for piece in self._pieces(first_row, acts_NMPD, seq_N, pos_N, token_N, ready):
            self.put(piece)

    def _start_copy_to_host(self, acts: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        if acts.device.type != "cuda":
            return acts, None
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(acts.device)
        return copy_to_host_async(acts, self._copy_stream)

    def close(self) -> None:
        """Flush everything queued, wait for the threads, and re-raise any error they hit."""
        self._queue.put(None)  # a writer that died on an error leaves it unread: join returns all the same
        self._thread.join()
        self._raise_if_failed()

    def abort(self) -> None:
        """Stop without writing the chunk in progress (shards already written stay listed)."""
        self._stop.set()
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass
        self._queue.put(None)
        self._thread.join(timeout=60)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    # -- writer thread -----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                piece = self._next_piece()
                if piece is None or self._stop.is_set():
                    self._list_written(wait=True)  # lists it only if all its shards were written
                    return
                if piece.ready is not None:
                    piece.ready.synchronize()  # this thread waits for the copy, never the forward loop
                nbytes = _nbytes(piece)
                self._take(piece)  # its waits on a chunk are not the caller's
                del piece  # frees a pinned staging buffer for reuse before the caller is let in
                with self._room:
                    self._pending_bytes -= nbytes
                    self._room.notify()
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            self._error = e
        finally:
            with self._room:
                self._room.notify_all()  # a caller waiting for room sees the error at once
            self._pool.shutdown(wait=True)  # no shard write outlives the writer

    def _next_piece(self) -> Piece | None:
        """The next queued piece; while waiting, list the chunk being written as soon as it is done
        (so a crash after it loses nothing it wrote)."""
        while True:
            try:
                return self._queue.get(timeout=0.05 if self._writing else None)
            except queue.Empty:
                self._list_written(wait=False)


def shard_writer_for(device: torch.device, writer: CacheWriter, **kwargs: Any) -> ShardWriter:
    """The shard writer for rows made on ``device``: a :class:`ShardWriterThread` for CUDA rows
    (their copies to the host finish on its thread), a :class:`ShardWriter` otherwise (rows are
    taken in the caller's thread). Both write the same bytes."""
    if device.type == "cuda":
        return ShardWriterThread(writer, **kwargs)
    return ShardWriter(writer, **kwargs)
