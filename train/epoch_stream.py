"""The epoch stream: which rows of a cache's split one epoch serves, in which order, and the copy
plan that moves them.

The stream (the same on every rank, a function of ``seed`` and the epoch alone): shuffle the
split's shards (seeded by ``(seed, epoch)``), cut that order into windows of ``window`` shards,
cut each shard into *runs* of ``run_rows`` consecutive rows (never spanning shards; a shard's
last run may be shorter), and permute each window's runs (seeded by ``(seed, epoch, window)``).
The concatenation is the epoch stream; every row of the split is in it once.

Runs because copying 512-byte rows one by one from random places is bound by memory latency; a
run is one sequential copy. They are safe only in a cache shuffled at write time (the manifest's
``write_shuffle``), where neighbouring rows of a shard come from different sequences. By default
(:func:`auto_run_rows`) runs are about ``RUN_BYTES``, capped so a batch draws from many runs, and
single rows when the manifest records no write-time shuffle: there a run would be consecutive
tokens of one sequence.

A piece of the stream (a batch, see :mod:`train.loader`) lands in stream order when
``run_rows > 1`` (a copy per run) and ordered by shard and row when ``run_rows == 1`` (sorted
single-row reads keep page access local).

:class:`Window` holds one window of an epoch: its runs' permutation, its shards' memory maps
while open, and the copy jobs that fill a host buffer from a range of its stream positions.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from shared.cache import Cache
from shared.shard_io import ShardReader

__all__ = ["RUN_BYTES", "RUN_MIX", "Window", "auto_run_rows", "stream_rng"]

# Automatic runs of about 32 KiB: each run costs ~1 us of Python besides its copy, and 16 KiB runs
# measured ~20% slower per epoch than 32 KiB ones (bench/RESULTS.md).
RUN_BYTES = 32 * 1024
RUN_MIX = 8  # automatic runs add at most ~1/RUN_MIX to a batch's same-sequence pairs (auto_run_rows)


def auto_run_rows(row_bytes: int, batch_size: int, window_rows: int, write_shuffle: Any) -> int:
    """``run_rows`` when it is None: 1 without a valid manifest ``write_shuffle``, else at least 1 and
    ``min(RUN_BYTES // row_bytes, 1 + (batch_size-1) * Nb // (RUN_MIX * max(Nb, window_rows)))``,
    ``Nb`` being its ``buffer_rows``.

    Why the second cap: a run's rows come from one write buffer, so two of them share a sequence
    with the odds ``p`` of two rows of that buffer. A share ``(R-1)/(batch_size-1)`` of a batch's
    row pairs lie within one run, while mixing a window gives same-buffer odds of about
    ``p * Nb / max(Nb, window_rows)``: runs add about ``1/RUN_MIX`` to the same-sequence pairs of
    single-row mixing (measured: +12% for the benchmark's cache, +14% in the tests).
    """
    if not isinstance(write_shuffle, dict) or not isinstance(write_shuffle.get("buffer_rows"), int) \
            or write_shuffle["buffer_rows"] < 1:
        return 1
    n_buf = write_shuffle["buffer_rows"]
    by_mix = 1 + (batch_size - 1) * n_buf // (RUN_MIX * max(n_buf, window_rows))
    return max(1, min(RUN_BYTES // max(1, row_bytes), by_mix))


def stream_rng(*key: int) -> np.random.Generator:
    """The generator of one shuffle of the stream: key ``(seed, epoch, 0)`` orders the shards, ``(seed,
    epoch, k + 1)`` permutes window ``k``'s runs."""
    return np.random.default_rng(np.random.SeedSequence(list(key)))


class Window:
    """A window of one epoch: its shards (manifest indices), its runs, and where it sits in the stream."""

    def __init__(self, shards: list[int], sizes: list[int], start: int, run_rows: int) -> None:
        self.shards, self.run_rows = shards, run_rows
        self.offsets = np.cumsum([0, *sizes])  # window-local row of each shard's first row
        self.start, self.end = start, start + int(self.offsets[-1])
        self.perm: np.ndarray | None = None  # window-order run ids, in stream order
        self.end_U: np.ndarray | None = None  # window-stream position just past each run
        self.readers: list[ShardReader] = []
        self.arrays: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (acts, seq, pos) views
        self._runs: dict[int, list[np.ndarray]] = {}  # i -> views of arrays[s][i], one per run, stream order

    def open(self, cache: Cache, seed: int, epoch: int, k: int, n_slots: int, slot_bytes: int) -> None:
        # Runs in window order: shard by shard, ascending. With run_rows=1 run w is window-local
        # row w, so this is exactly the single-row permutation.
        R, size_S = self.run_rows, np.diff(self.offsets)
        n_runs_S = -(-size_S // R)
        self.perm = stream_rng(seed, epoch, k + 1).permutation(int(n_runs_S.sum()))
        if R > 1:
            first_W = np.arange(len(self.perm)) - np.repeat(np.cumsum(n_runs_S) - n_runs_S, n_runs_S)  # in shard
            len_W = np.minimum(R, np.repeat(size_S, n_runs_S) - first_W * R)
            self.end_U = np.cumsum(len_W[self.perm])
        for i in self.shards:
            r = cache.shard(i)
            self.readers.append(r)
            # Byte views of [N, M*P, D] rows: one code path for every storage dtype.
            acts = r.acts.view(torch.uint8).numpy().reshape(r.n_rows, n_slots, slot_bytes)
            self.arrays.append((acts, r.seq.numpy(), r.pos.numpy()))

    def runs(self, lo: int, hi: int, i: int) -> list[np.ndarray]:
        """Views of array ``i`` (0: acts, 1: seq, 2: pos) holding window-stream positions ``[lo, hi)``, in order."""
        assert self.perm is not None and self.end_U is not None, "window not open"
        if i not in self._runs:  # once per window, views made in C: a batch then only slices a list
            R, runs_W = self.run_rows, []
            for arrays in self.arrays:
                x, n_full = arrays[i], len(arrays[i]) // R
                runs_W.extend(x[: n_full * R].reshape(n_full, R, *x.shape[1:]))
                runs_W.extend([x[n_full * R :]] if len(x) % R else [])
            self._runs[i] = [runs_W[w] for w in self.perm.tolist()]
        runs = self._runs[i]
        u0, u1 = (int(u) for u in np.searchsorted(self.end_U, [lo, hi - 1], side="right"))
        s0, s1 = int(self.end_U[u0]) - len(runs[u0]), int(self.end_U[u1]) - len(runs[u1])  # run starts
        if u0 == u1:
            return [runs[u0][lo - s0 : hi - s0]]
        return [runs[u0][lo - s0 :], *runs[u0 + 1 : u1], runs[u1][: hi - s1]]

    def copies(
        self, lo: int, hi: int, out: np.ndarray, index: torch.Tensor | None, slots: np.ndarray | None, pieces: int
    ) -> list[tuple]:
        """About ``pieces`` jobs ``(fn, *args)`` filling ``out`` (and ``index``) from window-stream
        positions ``[lo, hi)``: runs in stream order, a slice copy each; single rows sorted, one
        ``take`` per shard."""
        assert self.perm is not None, "window not open"
        jobs: list[tuple] = []
        if self.run_rows > 1:
            acts = self.runs(lo, hi, 0)
            seq, pos = (self.runs(lo, hi, 1), self.runs(lo, hi, 2)) if index is not None else ([], [])
            step, o = -(-len(acts) // pieces), 0
            for k in range(0, len(acts), step):
                n = sum(len(v) for v in acts[k : k + step]) if step < len(acts) else hi - lo
                jobs.append((_copy_runs, acts[k : k + step], seq[k : k + step], pos[k : k + step], out[o : o + n],
                             None if index is None else index[o : o + n], slots))
                o += n
            return jobs
        local = np.sort(self.perm[lo:hi])
        cuts = np.searchsorted(local, self.offsets)  # where each shard's rows start in `local`
        step = max(256, -(-(hi - lo) // pieces))
        for s, (src, seq_N, pos_N) in enumerate(self.arrays):
            for i0 in range(int(cuts[s]), int(cuts[s + 1]), step):
                i1 = min(i0 + step, int(cuts[s + 1]))
                jobs.append((_copy_rows, src, seq_N, pos_N, local[i0:i1] - self.offsets[s], out[i0:i1],
                             None if index is None else index[i0:i1], slots))
        return jobs

    def close(self) -> None:
        self._runs.clear()
        self.arrays.clear()  # drop views first: a live view keeps the mapping from closing
        self.perm = self.end_U = None
        for r in self.readers:
            r.close()
        self.readers.clear()


def _copy_rows(
    src: np.ndarray, seq: np.ndarray, pos: np.ndarray, rows: np.ndarray,
    out: np.ndarray, index: torch.Tensor | None, slots: np.ndarray | None,
) -> None:
    """Row job: ``out[i] = src[rows[i]]`` (selected slots only), ``index[i] = (seq, pos)``."""
    if slots is None:  # whole rows: one contiguous copy per row; numpy releases the GIL here
        np.take(src, rows, axis=0, out=out, mode="clip")
    else:
        out[:] = src[rows[:, None], slots[None, :]]
    if index is not None:
        index[:, 0] = torch.from_numpy(seq[rows])
        index[:, 1] = torch.from_numpy(pos[rows].astype(np.int64))


def _copy_runs(
    acts: list[np.ndarray], seq: list[np.ndarray], pos: list[np.ndarray],
    out: np.ndarray, index: torch.Tensor | None, slots: np.ndarray | None,
) -> None:
    """Run job: the ``acts`` views one after another into ``out`` (selected slots only); their
    ``seq`` and ``pos`` into ``index``."""
    if slots is None:
        np.concatenate(acts, axis=0, out=out)  # one memcpy per run
    else:
        o = 0
        for v in acts:
            np.take(v, slots, axis=1, out=out[o : o + len(v)])
            o += len(v)
    if index is not None:
        index[:, 0] = torch.from_numpy(np.concatenate(seq))
        index[:, 1] = torch.from_numpy(np.concatenate(pos).astype(np.int64))
