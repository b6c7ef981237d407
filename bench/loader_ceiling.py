#!/usr/bin/env python
"""Benchmark (an experiment, not a product path): what a compiled gather would buy the loader.

The loader's CPU read ratio (bench/loader.py, target >= 0.8) is bound by Python: each run it
copies is a numpy call that releases and retakes the GIL, and its planning (windows, run views,
buffers) runs in the same thread as the copies. This script measures two variants that need C,
so the team can decide on a build step with figures in hand:

- ``compiled``: the loader with each chunk's runs copied by one call into a 6-line C memcpy loop
  (built here with ``cc``, loaded with ctypes, which releases the GIL for the call);
- ``compiled + pipelined``: the same, with the copy on its own thread while the producer plans the
  next chunk (windows are unmapped only once the copies reading them are done).

All variants serve the identical stream (checked). Same cache, page cache warm, one process, the
variants alternate over ``--rounds`` and medians are compared with a sequential ``readinto`` of
the same files. Skipped, with a message, when no C compiler is found. Prints one table and appends
it to bench/RESULTS.md.

    python bench/loader_ceiling.py [--quick] [--rounds 10] [--no-record]
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.loader import TOY_D_MODEL, seq_read  # noqa: E402
from tests.cache_factory import make_cache  # noqa: E402
from train.epoch_stream import Window  # noqa: E402
from train.loader import ActivationLoader  # noqa: E402
from train.prefetch import HostBufferPool, Put  # noqa: E402

GATHER_C = r"""
#include <stdint.h>
#include <string.h>
void gather(int64_t n, const int64_t *src, const int64_t *len, char *dst) {
    for (int64_t i = 0; i < n; i++) { memcpy(dst, (const char *)src[i], (size_t)len[i]); dst += len[i]; }
}
"""


def build_gather(folder: Path) -> ctypes.CDLL | None:
    """Compile and load the C gather; None without a working C compiler."""
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        return None
    (folder / "gather.c").write_text(GATHER_C)
    lib = folder / "libgather.so"
    done = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(lib), str(folder / "gather.c")],
                          capture_output=True, check=False)
    if done.returncode != 0:
        return None
    dll = ctypes.CDLL(str(lib))
    dll.gather.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    dll.gather.restype = None
    return dll


class DeferringWindow(Window):
    """A window that, while ``deferred`` is a list, is handed over on close() instead of unmapped
    (pipelined: the copies reading it may still run)."""

    deferred: list | None = None

    def close(self) -> None:
        if self.deferred is not None and self.perm is not None:
            self.deferred.append(self)
            return
        super().close()


class CompiledWindow(DeferringWindow):
    """A window whose copy plan is (source address, bytes) per run, copied by one C call per job."""

    dll: ctypes.CDLL

    def open(self, cache, seed, epoch, k, n_slots, slot_bytes) -> None:  # type: ignore[no-untyped-def]
        super().open(cache, seed, epoch, k, n_slots, slot_bytes)
        R, size_S = self.run_rows, np.diff(self.offsets)
        assert R > 1, "needs a write-shuffled cache (runs)"
        n_runs_S = -(-size_S // R)
        self.row_bytes = n_slots * slot_bytes
        base_S = np.array([acts.ctypes.data for acts, _, _ in self.arrays], np.int64)
        first_W = np.arange(len(self.perm)) - np.repeat(np.cumsum(n_runs_S) - n_runs_S, n_runs_S)
        len_W = np.minimum(R, np.repeat(size_S, n_runs_S) - first_W * R)
        self.src_U = (np.repeat(base_S, n_runs_S) + first_W * R * self.row_bytes)[self.perm]
        self.len_U = len_W[self.perm] * self.row_bytes

    def copies(self, lo, hi, out, index, slots, pieces) -> list[tuple]:  # type: ignore[no-untyped-def]
        assert index is None and slots is None and out.flags.c_contiguous
        u0, u1 = (int(u) for u in np.searchsorted(self.end_U, [lo, hi - 1], side="right"))
        src, n = self.src_U[u0 : u1 + 1].copy(), self.len_U[u0 : u1 + 1].copy()
        skip = (lo - (int(self.end_U[u0]) - int(n[0]) // self.row_bytes)) * self.row_bytes
        src[0] += skip
        n[0] -= skip
        n[-1] -= (int(self.end_U[u1]) - hi) * self.row_bytes
        return [(_c_gather, self.dll, src, n, out)]

    def close(self) -> None:
        if self.deferred is None:
            self.src_U = self.len_U = None  # type: ignore[assignment]
        super().close()


class TorchCatWindow(DeferringWindow):
    """A window whose runs are torch views (made once per window) copied by one ``torch.cat`` per
    job: torch releases the GIL for the whole call, with no build step."""

    def open(self, cache, seed, epoch, k, n_slots, slot_bytes) -> None:  # type: ignore[no-untyped-def]
        super().open(cache, seed, epoch, k, n_slots, slot_bytes)
        assert self.run_rows > 1 and slot_bytes % 8 == 0
        R, runs_W = self.run_rows, []
        for acts, _, _ in self.arrays:
            x = acts.view(np.int64)  # 8-byte elements: fewer, so torch's copy stays serial per run
            n_full = len(x) // R
            runs_W.extend(torch.from_numpy(x[: n_full * R].reshape(n_full, R, *x.shape[1:])).unbind(0))
            runs_W.extend([torch.from_numpy(x[n_full * R :])] if len(x) % R else [])
        self.runs_U = [runs_W[w] for w in self.perm.tolist()]

    def copies(self, lo, hi, out, index, slots, pieces) -> list[tuple]:  # type: ignore[no-untyped-def]
        assert index is None and slots is None
        runs = self.runs_U
        u0, u1 = (int(u) for u in np.searchsorted(self.end_U, [lo, hi - 1], side="right"))
        s0, s1 = int(self.end_U[u0]) - len(runs[u0]), int(self.end_U[u1]) - len(runs[u1])
        parts = [runs[u0][lo - s0 : hi - s0]] if u0 == u1 else \
            [runs[u0][lo - s0 :], *runs[u0 + 1 : u1], runs[u1][: hi - s1]]
        return [(_torch_cat, parts, torch.from_numpy(out.view(np.int64)))]

    def close(self) -> None:
        if self.deferred is None:
            self.runs_U = []
        super().close()


def _torch_cat(parts: list[torch.Tensor], out: torch.Tensor) -> None:
    torch.cat(parts, out=out)


def _c_gather(dll: ctypes.CDLL, src: np.ndarray, n: np.ndarray, out: np.ndarray) -> None:
    """Copy ``n[i]`` bytes from address ``src[i]`` to ``out``, one run after another (GIL released)."""
    dll.gather(len(src), src.ctypes.data, n.ctypes.data, out.ctypes.data)


def _run_jobs(jobs: list[tuple]) -> None:
    for fn, *args in jobs:
        fn(*args)


class _Collect:
    """Stands in for CopyPool: keeps the jobs instead of running them."""

    def __init__(self) -> None:
        self.jobs: list[tuple] = []

    def run(self, jobs: list[tuple]) -> None:
        self.jobs.extend(jobs)


class VariantLoader(ActivationLoader):
    """The loader with ``dll``: :class:`CompiledWindow` copies; ``pipelined``: the copies run on their own thread."""

    dll: ctypes.CDLL | None = None
    torch_cat = False
    pipelined = False

    def _windows(self, epoch: int) -> list[Window]:
        out = []
        for w in super()._windows(epoch):
            sizes = [int(x) for x in np.diff(w.offsets)]
            if self.torch_cat:
                out.append(TorchCatWindow(w.shards, sizes, w.start, w.run_rows))
            elif self.dll is None:
                out.append(DeferringWindow(w.shards, sizes, w.start, w.run_rows))
            else:
                out.append(CompiledWindow(w.shards, sizes, w.start, w.run_rows))
                out[-1].dll = self.dll
        return out

    def _produce(self, epoch0: int, batch0: int, put: Put, stop: threading.Event) -> None:
        if not self.pipelined:
            return super()._produce(epoch0, batch0, put, stop)
        man = self.cache.manifest
        buffers = HostBufferPool(self._chunk * self.batch_size, (len(self.models), len(self.hooks), man.d_model),
                                 man.torch_dtype, self._depth + 4)
        copier = ThreadPoolExecutor(1, thread_name_prefix="ceiling-copy")
        pending: tuple[Future, list, list] | None = None
        windows: list[Window] = []

        def finish(p: tuple[Future, list, list]) -> bool:
            p[0].result()
            for w in p[2]:
                w.deferred = None
                w.close()
            return put(p[1])

        try:
            for epoch in range(epoch0, self.epochs):
                windows, deferred = self._windows(epoch), []
                for w in windows:
                    w.deferred = deferred  # type: ignore[attr-defined]
                for j0 in range(batch0 if epoch == epoch0 else 0, self.batches_per_epoch, self._chunk):
                    if stop.is_set():
                        return
                    js = range(j0, min(j0 + self._chunk, self.batches_per_epoch))
                    jobs = _Collect()
                    chunk = self._gather(windows, epoch, [self._batch_range(j) for j in js], buffers, jobs)
                    future = copier.submit(_run_jobs, jobs.jobs)
                    closing, deferred[:] = list(deferred), []
                    if pending is not None and not finish(pending):
                        return
                    pending = (future, [(epoch, j, a, i) for j, (a, i) in zip(js, chunk)], closing)
                    del chunk
                for w in windows:
                    w.close()
                if pending is not None:
                    pending[2].extend(deferred)
            if pending is not None:
                finish(pending)
        finally:
            copier.shutdown(wait=True)
            for w in windows:
                w.deferred = None
                w.close()


def one_epoch(loader: ActivationLoader) -> float:
    t = time.perf_counter()
    for acts in loader:
        del acts
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: a tiny cache, 2 rounds")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    args = ap.parse_args()
    rounds = 2 if args.quick else args.rounds
    with tempfile.TemporaryDirectory() as tmp:
        dll = build_gather(Path(tmp))
        if dll is None:
            print("skipped: no working C compiler (cc, gcc or clang) on this machine")
            return
        toy = Path(tmp) / "toy"
        shards, per_shard = (4, 4096) if args.quick else (16, 32768)
        make_cache(toy, n_shards=shards, rows_per_shard=per_shard, n_models=2, n_hooks=1, d_model=TOY_D_MODEL,
                   tag=False, seq_len=128, shuffle_buffer_shards=4)

        def make(kind: str) -> ActivationLoader:
            cls = ActivationLoader if kind == "loader" else \
                type("L", (VariantLoader,), {"dll": dll if "compiled" in kind else None, "pipelined": "pipelined" in kind,
                                             "torch_cat": "torch.cat" in kind})
            return cls(toy, 1024, eval_shards=0, window=8, dtype=torch.bfloat16, gather_threads=1)

        kinds = ["loader", "pipelined (numpy copies)", "torch.cat", "torch.cat + pipelined", "compiled",
                 "compiled + pipelined"]
        streams = {k: torch.cat(list(make(k))).view(torch.int16) for k in kinds}
        for k in kinds[1:]:
            if not torch.equal(streams[k], streams["loader"]):
                raise AssertionError(f"{k} served another stream than the loader")
        del streams
        seq_read(toy)
        times: dict[str, list[float]] = {"sequential read": [], **{k: [] for k in kinds}}
        for _ in range(rounds):
            times["sequential read"].append(seq_read(toy)[0])
            for k in kinds:
                times[k].append(one_epoch(make(k)))
        gb = sum(f.stat().st_size for f in (toy / "shards").iterdir()) / 1e9
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = [("cache", f"{shards} shards x {per_shard:,} rows, 2 x 1 x {TOY_D_MODEL} bf16 ({gb:.2f} GB), "
                      f"batch 1024, window 8, 1 gather thread, {rounds} rounds")]
    for k, s in med.items():
        rows.append((k, f"{s * 1e3:.1f} ms per epoch, {gb / s:.2f} GB/s; ratio to sequential "
                        f"{med['sequential read'] / s:.3f}"))
    table = "| variant | median |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    print(table)
    if not args.no_record:
        machine = f"{platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write(f"\n## loader ceiling (compiled gather) — {dt.datetime.now().isoformat(timespec='minutes')} — "
                    f"{machine}\n\n`python bench/loader_ceiling.py {' '.join(sys.argv[1:])}` (torch "
                    f"{torch.__version__})\n\n{table}\n")


if __name__ == "__main__":
    main()
