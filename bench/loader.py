#!/usr/bin/env python
"""Benchmark: the stage-2 loader against a raw sequential read, and training fed by it against
training fed by one in-memory tensor.

One run, one process, on a synthetic cache it writes itself (tests/cache_factory.py):
1. IO: ``ActivationLoader`` (all slots, storage dtype, no cast) against reading the same shard
   files sequentially with ``readinto`` into one buffer; page cache warm, the two alternate over
   ``--rounds`` and the medians are compared. Target ratio >= 0.8. The loader runs with its
   automatic ``run_rows`` (runs of ~32 KiB: the cache is shuffled at write time) and its default
   gather threads, with 1 and 2 threads, and with ``run_rows=1`` (single rows, the loader before
   runs) for comparison. An
   "ideal gather" (the same runs copied by one thread with no loader machinery) shows how much of
   the gap to the sequential read is the machine's rather than the loader's, and the loader's
   producer run alone in the caller's thread how much is the hand-off to a consumer thread. Then the loader alone
   on the CPU at d_model 2304 (2 models x 1 hook, bf16, batch 4096: runs of 3 rows, one batch per
   chunk) with 1, 2 and 4 gather threads.
2. Train: a reference ReLU crosscoder (2 models x 1 hook at the toy width 128, 4096 latents,
   batch 1024, Adam, CPU) stepped on batches from the loader against the same steps on slices
   of one in-memory float32 tensor; segments alternate. Target ratio >= 0.97.
   With CUDA: again at d_model 2304, 16,384 latents, batch 4096, bf16 autocast, with the
   in-memory tensor on the GPU, plus the GB/s the loader sustains while feeding it.
Prints one table and appends it to bench/RESULTS.md.

    python bench/loader.py [--quick] [--rounds 3] [--gather-threads N] [--no-record]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from shared.cache import open_cache  # noqa: E402
from tests.cache_factory import make_cache  # noqa: E402
from train.loader import ActivationLoader  # noqa: E402

TOY_D_MODEL = 128  # hidden size of the toy models (harvest/toy_models.py)


class RefCrosscoder(nn.Module):
    """Minimal acausal ReLU crosscoder with the decoder-norm-weighted L1 of the crosscoder paper."""

    def __init__(self, n_models: int, n_hooks: int, d_model: int, n_latents: int, l1: float = 1e-3) -> None:
        super().__init__()
        scale = (n_models * n_hooks * d_model) ** -0.5
        self.W_enc_MPDL = nn.Parameter(torch.randn(n_models, n_hooks, d_model, n_latents) * scale)
        self.W_dec_LMPD = nn.Parameter(self.W_enc_MPDL.detach().permute(3, 0, 1, 2).clone() * 0.1)
        self.b_enc_L = nn.Parameter(torch.zeros(n_latents))
        self.b_dec_MPD = nn.Parameter(torch.zeros(n_models, n_hooks, d_model))
        self.l1 = l1

    def loss(self, x_BMPD: torch.Tensor) -> torch.Tensor:
        f_BL = torch.relu(torch.einsum("bmpd,mpdl->bl", x_BMPD, self.W_enc_MPDL) + self.b_enc_L)
        x_hat_BMPD = torch.einsum("bl,lmpd->bmpd", f_BL, self.W_dec_LMPD) + self.b_dec_MPD
        dec_norm_L = self.W_dec_LMPD.float().norm(dim=-1).sum(dim=(1, 2))
        recon = (x_hat_BMPD.float() - x_BMPD.float()).pow(2).sum(dim=(1, 2, 3)).mean()
        return recon + self.l1 * (f_BL.float() * dec_norm_L).sum(dim=1).mean()


def seq_read(cache_dir: Path) -> tuple[float, float, int]:
    """Read every shard file front to back into one buffer: (seconds, CPU seconds, bytes)."""
    cache = open_cache(cache_dir)
    files = [cache.dir / s.file for s in cache.manifest.shards]
    buf = memoryview(np.empty(max(s.bytes for s in cache.manifest.shards), np.uint8))
    n, t, c = 0, time.perf_counter(), time.process_time()
    for path in files:
        with open(path, "rb", buffering=0) as f:
            n += f.readinto(buf)
    return time.perf_counter() - t, time.process_time() - c, n


def ideal_gather(cache_dir: Path, window: int, run_rows: int, seed: int = 0) -> float:
    """The copy the loader does with none of its machinery: one thread maps a window of shards at
    a time and copies its runs of ``run_rows`` rows, in a random order, into recycled 2 MiB
    buffers with one numpy call per buffer. Seconds. Bounds what any mmap-based shuffling loader
    can reach on this machine (the loader adds threads, planning, batching and hand-offs)."""
    cache = open_cache(cache_dir)
    man = cache.manifest
    row_bytes = man.row_bytes
    per_buffer = max(1, (2 << 20) // (run_rows * row_bytes))
    buffers = [np.empty(per_buffer * run_rows * row_bytes, np.uint8) for _ in range(4)]
    rng = np.random.default_rng(seed)
    t, k = time.perf_counter(), 0
    for w0 in range(0, cache.n_shards, window):
        readers = [cache.shard(i) for i in range(w0, min(w0 + window, cache.n_shards))]
        runs: list[np.ndarray] = []
        for r in readers:
            flat = r.acts.view(torch.uint8).numpy().reshape(r.n_rows, row_bytes)
            n_full = r.n_rows // run_rows
            runs.extend(flat[: n_full * run_rows].reshape(n_full, run_rows * row_bytes))
        order = [runs[i] for i in rng.permutation(len(runs)).tolist()]
        for c in range(0, len(order), per_buffer):
            part = order[c : c + per_buffer]
            np.concatenate(part, out=buffers[k % 4][: len(part) * run_rows * row_bytes])
            k += 1
        del runs, order, part, flat
        for r in readers:
            r.close()
    return time.perf_counter() - t


def producer_alone(cache_dir: Path, batch: int, window: int) -> float:
    """One epoch of the loader's producer (windows, copy plan, copies into recycled buffers) run in
    the caller's thread, with no consumer thread: each chunk is kept until the next one is made, as
    a consumer would. Seconds. Its gap to the loader is the cost of handing chunks to a consumer
    thread (GIL hand-offs); its gap to the ideal gather is the producer's own Python."""
    loader = ActivationLoader(cache_dir, batch, eval_shards=0, window=window, dtype=torch.bfloat16)
    held: list = []

    def put(items: list) -> bool:
        held[:] = [items]
        return True

    t = time.perf_counter()
    loader._produce(0, 0, put, threading.Event())
    return time.perf_counter() - t


def loader_read(cache_dir: Path, batch: int, window: int, threads: int | None,
                run_rows: int | None = None, device: str = "cpu") -> tuple[float, float, int, int]:
    """Iterate one epoch of the loader: (seconds, CPU seconds, rows, bytes of acts)."""
    loader = ActivationLoader(cache_dir, batch, eval_shards=0, window=window, dtype=torch.bfloat16,
                              gather_threads=threads, run_rows=run_rows, device=device)
    rows = nbytes = 0
    t, c = time.perf_counter(), time.process_time()
    for acts in loader:
        rows += acts.shape[0]
        nbytes += acts.numel() * acts.element_size()
    if device != "cpu":
        torch.cuda.synchronize()
    return time.perf_counter() - t, time.process_time() - c, rows, nbytes


def train_ratio(cache_dir: Path, *, d_model: int, latents: int, batch: int, steps: int, segments: int,
                device: torch.device, window: int, threads: int | None) -> dict[str, float]:
    """Steps/s fed by the loader vs by one in-memory tensor, in alternating segments of ``steps``."""
    torch.manual_seed(0)
    cuda = device.type == "cuda"
    model = RefCrosscoder(2, 1, d_model, latents).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step(x_BMPD: torch.Tensor) -> None:
        with autocast:
            loss = model.loss(x_BMPD)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    total = (segments * steps + 4) * batch
    loader = ActivationLoader(cache_dir, batch, eval_shards=0, window=window, device=device,
                              epochs=-(-total // open_cache(cache_dir).manifest.n_rows) + 1,
                              drop_last=True, gather_threads=threads)
    stream = iter(loader)
    # One float32 tensor already on the device: the best case a loader can be compared with.
    memory = next(iter(ActivationLoader(cache_dir, steps * batch, eval_shards=0, dtype=torch.float32))).to(device)
    for _ in range(2):  # warm-up both paths (allocator, autocast caches, loader thread)
        step(next(stream))
        step(memory[:batch])
    times: dict[str, list[float]] = {"loader": [], "memory": []}
    for _ in range(segments):
        for mode in ("loader", "memory"):
            sync()
            t = time.perf_counter()
            for i in range(steps):
                step(next(stream) if mode == "loader" else memory[i * batch : (i + 1) * batch])
            sync()
            times[mode].append(time.perf_counter() - t)
    del stream
    n = segments * steps
    loader_s, memory_s = sum(times["loader"]), sum(times["memory"])
    row_bytes = 2 * d_model * 2  # bf16 on the host
    return {"loader_sps": n / loader_s, "memory_sps": n / memory_s, "ratio": memory_s / loader_s,
            "loader_gbps": n * batch * row_bytes / loader_s / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: a tiny cache and a few steps")
    ap.add_argument("--rounds", type=int, default=3, help="alternations of the IO comparison")
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--gather-threads", type=int, default=None, help="loader gather threads (default: auto)")
    ap.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    args = ap.parse_args()
    q = args.quick
    rows: list[tuple[str, str]] = []
    threads = args.gather_threads
    with tempfile.TemporaryDirectory() as tmp:
        toy = Path(tmp) / "toy"
        shards, per_shard = (4, 4096) if q else (16, 32768)
        make_cache(toy, n_shards=shards, rows_per_shard=per_shard, n_models=2, n_hooks=1, d_model=TOY_D_MODEL,
                   tag=False, seq_len=128, shuffle_buffer_shards=4)
        man = open_cache(toy).manifest
        row_bytes = 2 * TOY_D_MODEL * 2
        gb = man.n_rows * row_bytes / 1e9
        probe = ActivationLoader(toy, 1024, eval_shards=0, window=args.window, gather_threads=threads)
        loader_threads, auto_runs = probe.gather_threads, probe.run_rows

        # 1. IO: warm the page cache, then alternate.
        seq_read(toy)
        loader_read(toy, 1024, args.window, threads)
        # (gather threads, run_rows): the default, 1 and 2 threads, and single rows (the loader before runs).
        variants = [(loader_threads, None)]
        variants += [(t, None) for t in (1, 2) if t != loader_threads and t <= (os.cpu_count() or 1)]
        variants += [(loader_threads, 1)] if auto_runs != 1 else []
        seq, load, ideal, alone = [], {v: [] for v in variants}, [], []
        for _ in range(1 if q else args.rounds):
            seq.append(seq_read(toy))
            ideal.append(ideal_gather(toy, args.window, auto_runs))
            alone.append(producer_alone(toy, 1024, args.window))
            for t, r in variants:
                load[(t, r)].append(loader_read(toy, 1024, args.window, t, r))
        assert all(r[2] == man.n_rows for runs in load.values() for r in runs), "loader served a wrong row count"
        seq_s, seq_cpu = statistics.median(s[0] for s in seq), statistics.median(s[1] for s in seq)
        file_gb = seq[0][2] / 1e9  # file bytes; acts bytes (gb) are 99.9% of them
        rows += [
            ("cache", f"{shards} shards x {per_shard:,} rows, 2 models x 1 hook x d {TOY_D_MODEL} bf16 ({file_gb:.2f} GB)"),
            ("sequential read (readinto)", f"{man.n_rows / seq_s:,.0f} rows/s, {file_gb / seq_s:.2f} GB/s "
                                           f"({file_gb / max(seq_cpu, 1e-9):.2f} GB per CPU-s)"),
        ]
        ideal_s = statistics.median(ideal)
        rows += [
            (f"ideal gather (runs of {auto_runs} rows from the mmap, one thread, no loader; see ideal_gather)",
             f"{man.n_rows / ideal_s:,.0f} rows/s, {gb / ideal_s:.2f} GB/s; ratio to sequential {seq_s / ideal_s:.3f}"),
        ]
        alone_s = statistics.median(alone)
        rows += [
            ("loader's producer alone (no consumer thread; see producer_alone)",
             f"{man.n_rows / alone_s:,.0f} rows/s, {gb / alone_s:.2f} GB/s; ratio to sequential {seq_s / alone_s:.3f}"),
        ]
        for t, r in variants:
            load_s = statistics.median(x[0] for x in load[(t, r)])
            load_cpu = statistics.median(x[1] for x in load[(t, r)])
            runs = f"run_rows {auto_runs if r is None else r}"
            default = ", default" if (t, r) == variants[0] else ""
            rows += [
                (f"loader (batch 1024, window {args.window}, {runs}, {t} gather thread(s){default})",
                 f"{man.n_rows / load_s:,.0f} rows/s, {gb / load_s:.2f} GB/s ({gb / max(load_cpu, 1e-9):.2f} GB per CPU-s)"),
                (f"ratio loader / sequential, rows/s ({runs}, {t} thread(s))",
                 f"{seq_s / load_s:.3f}  (target >= 0.8; CPU-time ratio {seq_cpu / max(load_cpu, 1e-9):.3f}; "
                 f"loader / ideal gather {ideal_s / load_s:.3f})"),
            ]

        # 1b. Wide rows on the CPU: few rows per run, one batch per chunk (the GPU-scale shape).
        wide = Path(tmp) / "wide"
        d, wide_batch = 2304, 4096
        make_cache(wide, n_shards=4 if q else 16, rows_per_shard=8192, n_models=2, n_hooks=1, d_model=d,
                   tag=False, seq_len=128)
        wide_threads = [1, 2, 4]
        wide_default = ActivationLoader(wide, wide_batch, eval_shards=0, window=args.window).gather_threads
        loader_read(wide, wide_batch, args.window, 1)  # warm the page cache
        wide_load: dict[int, list] = {t: [] for t in wide_threads}
        for r in range(1 if q else args.rounds):
            for t in wide_threads if r % 2 == 0 else wide_threads[::-1]:
                wide_load[t].append(loader_read(wide, wide_batch, args.window, t))
        for t in wide_threads:
            w_s = statistics.median(x[0] for x in wide_load[t])
            w = wide_load[t][0]
            rows.append((f"loader alone (CPU), 2x1x{d} bf16, batch {wide_batch}, {t} gather thread(s)"
                         + (", default" if t == wide_default else ""),
                         f"{w[2] / w_s:,.0f} rows/s, {w[3] / w_s / 1e9:.2f} GB/s"))

        # 2. Training fed by the loader vs by one in-memory tensor (CPU, toy width).
        steps, segments, latents = (3, 1, 512) if q else (15, 3, 4096)
        res = train_ratio(toy, d_model=TOY_D_MODEL, latents=latents, batch=1024, steps=steps, segments=segments,
                          device=torch.device("cpu"), window=args.window, threads=threads)
        rows += [
            (f"train CPU: crosscoder 2x1x{TOY_D_MODEL} -> {latents} latents, batch 1024, {segments}x{steps} steps each",
             f"loader {res['loader_sps']:.2f} steps/s, in-memory {res['memory_sps']:.2f} steps/s"),
            ("ratio loader-fed / in-memory (steps/s)", f"{res['ratio']:.3f}  (target >= 0.97)"),
        ]

        # 3. GPU scale (only where CUDA is available).
        if torch.cuda.is_available():
            batch = wide_batch
            g_steps, g_segments = (3, 1) if q else (30, 3)
            for t in sorted({1, 2, loader_threads}):  # what the loader alone feeds the GPU
                loader_read(wide, batch, args.window, t, device="cuda")
                g = [loader_read(wide, batch, args.window, t, device="cuda") for _ in range(1 if q else args.rounds)]
                g_s = statistics.median(x[0] for x in g)
                rows.append((f"loader alone to GPU, 2x1x{d}, batch {batch}, {t} gather thread(s)",
                             f"{g[0][3] / g_s / 1e9:.2f} GB/s ({g[0][2] / g_s:,.0f} rows/s)"))
            res = train_ratio(wide, d_model=d, latents=2048 if q else 16_384, batch=batch, steps=g_steps,
                              segments=g_segments, device=torch.device("cuda"), window=args.window, threads=threads)
            rows += [
                (f"train GPU ({torch.cuda.get_device_name()}): 2x1x{d} -> 16384 latents, batch {batch}, bf16 autocast",
                 f"loader {res['loader_sps']:.2f} steps/s, in-memory (on GPU) {res['memory_sps']:.2f} steps/s"),
                ("ratio loader-fed / in-memory (GPU)", f"{res['ratio']:.3f}  (target >= 0.97)"),
                ("loader GB/s sustained while training (GPU)", f"{res['loader_gbps']:.2f}"),
            ]
        else:
            rows.append(("GPU run", "skipped: no CUDA device"))

    table = "| measure | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    print(table)
    if not args.no_record:
        machine = f"{platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
        results = ROOT / "bench" / "RESULTS.md"
        if not results.exists():
            results.write_text("# Benchmark results\n\nAppended by the scripts in bench/ (one dated section per run).\n")
        with open(results, "a") as f:
            f.write(f"\n## loader — {dt.datetime.now().isoformat(timespec='minutes')} — {machine}\n\n"
                    f"`python bench/loader.py {' '.join(sys.argv[1:])}` (torch {torch.__version__}, numpy "
                    f"{np.__version__})\n\n{table}\n")


if __name__ == "__main__":
    main()
