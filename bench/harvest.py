#!/usr/bin/env python
"""Benchmark: harvest throughput against bare forward passes of the same models.

One run, same process, same batches, same dtype, stopped at the same layer:
- bare: each model's forward (`bridge(tokens, stop_at_layer=k)`), no hooks, nothing kept;
- harvest: the real `harvest()` (hooks, row selection, normalization, device->host copies,
  write-time shuffle, shard writes, sha256, manifest), timed from its first forward pass.
Bare passes and harvests alternate; each harvest is compared with the mean of the bare passes
just before and after it, and the median of those ratios is reported (machines are noisy).
A third pass, "capture" (the harvest's device work with no writer: hooks, row selection,
normalization, the cast and the host copy; nothing shuffled, hashed or written), splits the gap
into what capturing rows costs and what writing them costs. A fourth, "writer alone", hands the
same number of rows from memory to the harvest's shard writer with no model (scatter into the
shuffle chunk, sha256, write, fsync): if it is slower than the bare passes, this machine cannot
write rows as fast as the models make them, and no harvest on it can reach the target. Each
harvest also reports how long its forward loop waited for the writer, and how long that loop's
thread was off the CPU (wall minus its CPU time): on a launch-bound GPU harvest, that time less
the writer wait was lost to other threads holding the GIL, or to device syncs that yield (CUDA
syncs spin by default, so they count as CPU). Each round's caches are deleted, so a
long run (``--tokens 8000000`` on a GPU, 16 GB a harvest) needs room for one harvest at a time.
Prints one table and appends it to bench/RESULTS.md. Target: ratio >= 0.90 (CPU, toy pair),
>= 0.95 on a GPU with a pythia-70m-sized model. The toy pair reads ``builtin:mixed`` (~276k
usable tokens); the pythia-70m-sized pair (random weights) reads random token ids written to a
local parquet file, so a GPU run can be long enough to measure (default 2M tokens).
``--profile-batches N`` adds a second table: N batches of the bare and capture passes under
torch.profiler, and the ops whose CPU time per batch the capture adds (on a launch-bound GPU,
the loop's CPU time is its speed).

    python bench/harvest.py [--tokens N] [--model-size toy|pythia-70m] [--device auto] [--batch-size 32] [--quick]
                            [--ab-pin-writer]
                            [--profile-batches N]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections import deque
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from harvest.config import HarvestConfig  # noqa: E402
from harvest.harvester import HarvestLayout, _Forward, _plan_from_table, harvest  # noqa: E402
from harvest.models import LoadedModels, load_models, resolve_device  # noqa: E402
from harvest.writer import ShardWriter, copy_to_host_async, default_write_threads  # noqa: E402
from shared.cache import CacheWriter  # noqa: E402
from shared.cache_format import Manifest, dtype_from_name  # noqa: E402
from shared.normalization import Normalization  # noqa: E402
from shared.token_table import read_token_table  # noqa: E402


def random_pythia70m_pair(folder: Path) -> list[str]:
    """Two random-weight models with pythia-70m's shape (d 512, 6 layers, 8 heads) and the toy tokenizer."""
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

    from harvest.toy_models import ensure_toy_model

    tok = AutoTokenizer.from_pretrained(ensure_toy_model("toy-base"))
    paths = []
    for i in range(2):
        path = folder / f"pythia70m-random-{i}"
        if not (path / "config.json").exists():
            torch.manual_seed(i)
            cfg = GPTNeoXConfig(vocab_size=50304, hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
                                intermediate_size=2048, max_position_embeddings=2048, bos_token_id=0, eos_token_id=0,
                                rotary_pct=0.25)
            GPTNeoXForCausalLM(cfg).save_pretrained(path)
            tok.save_pretrained(path)
        paths.append(str(path))
    return paths


def random_token_dataset(path: Path, tokens: int, context_size: int, low: int = 2, high: int = 4096) -> str:
    """A pre-tokenized parquet (``input_ids``, one document per row) of random ids in ``[low, high)``
    (the toy tokenizer's ids, past its two special ones), with room for ``tokens`` rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    doc = 4 * context_size
    n_docs = -(-tokens * 11 // 10 // (doc - 1)) + 1  # 10% spare: BOS and the packing's cuts
    ids = np.random.default_rng(0).integers(low, high, size=(n_docs, doc), dtype=np.int32)
    pq.write_table(pa.table({"input_ids": list(ids)}), path)
    return str(path)


def fresh_models(cfg: HarvestConfig) -> tuple[torch.device, LoadedModels]:
    """The harvest's models, loaded afresh as ``harvest()`` loads them."""
    device = resolve_device(cfg.device)
    return device, load_models(cfg.models, cfg.hooks, context_size=cfg.context_size, device=device,
                               model_dtype=dtype_from_name(cfg.model_dtype), exclude_special=cfg.exclude_special,
                               exclude_token_ids=cfg.exclude_token_ids,
                               allow_vocab_extension=cfg.allow_vocab_extension)


def bare_forward_seconds(cfg: HarvestConfig, cache_dir: Path, *, max_batches: int | None = None,
                         around: AbstractContextManager | None = None) -> tuple[float, float]:
    """Time each model's plain forward over the harvest's own batches (no hooks), from freshly loaded
    models: (wall seconds, CPU seconds of this thread, the loop's). ``max_batches``: only the first
    ones; ``around``: a context entered around the timed loop alone (a profiler)."""
    device, models = fresh_models(cfg)
    ids = read_token_table(cache_dir).column("input_ids").to_pylist()
    batches = [torch.tensor(np.array(ids[i : i + cfg.batch_size])) for i in range(0, len(ids), cfg.batch_size)]
    batches = batches[:max_batches]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode(), around or nullcontext():
        # No warm-up pass: the harvest's clock also starts before its models' first (slower, by
        # ~40 ms each on the toy models) forward, so both start from freshly loaded models.
        sync()
        t, cpu = time.perf_counter(), time.thread_time()
        for batch in batches:
            # The harvest's own transfer: a blocking copy would sync the stream every batch and
            # drain the GPU's queue, making the baseline slower than the harvest (~13% on an H100
            # at batch 32, session 11) and every ratio look better than it is.
            x = batch.to(device, non_blocking=True)
            for bridge in models.bridges:
                bridge(x, stop_at_layer=models.stop_at_layer)
        sync()
        return time.perf_counter() - t, time.thread_time() - cpu


def capture_seconds(cfg: HarvestConfig, cache_dir: Path, *, max_batches: int | None = None,
                    around: AbstractContextManager | None = None) -> tuple[float, float]:
    """The harvest's own per-batch work with no writer, from freshly loaded models: each batch's
    forward with the hooks, then per group of batches (``capture_group_tokens``) row selection,
    normalization, the cast to the storage dtype and, on CUDA, the copy into pinned host memory on a
    side stream (at most 8 groups in flight, as the writer's queue allows). Nothing is shuffled,
    hashed or written. (wall seconds, CPU seconds of the loop's thread); ``max_batches`` and
    ``around`` as for :func:`bare_forward_seconds`."""
    device, models = fresh_models(cfg)
    manifest = Manifest.load(cache_dir)
    plan = _plan_from_table(cache_dir, manifest, models.excluded_ids)
    norm = Normalization.from_manifest(cache_dir, manifest.normalization).to(device)
    storage = dtype_from_name(cfg.dtype)
    forward = _Forward(models, plan, cfg, device)
    end = cfg.tokens  # the rows of the first max_batches batches
    if max_batches is not None and max_batches * cfg.batch_size < plan.n_sequences:
        end = int(plan.row_start[max_batches * cfg.batch_size])
    cuda = device.type == "cuda"
    stream = torch.cuda.Stream(device) if cuda else None
    in_flight: deque = deque()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with around or nullcontext():
        sync()
        t, cpu = time.perf_counter(), time.thread_time()
        for _first, acts_NMPD, *_ in forward.rows(0, end):
            rows_NMPD = norm.apply(acts_NMPD).to(storage)
            if stream is not None:
                in_flight.append(copy_to_host_async(rows_NMPD, stream))  # (host rows, their copy's event)
                if len(in_flight) > 8:
                    in_flight.popleft()[1].synchronize()
        sync()
        return time.perf_counter() - t, time.thread_time() - cpu


def profile_capture(cfg: HarvestConfig, cache_dir: Path, n_batches: int, top: int = 15) -> str:
    """What capturing adds to a forward loop, op by op: the first ``n_batches`` batches of the bare
    pass and of the capture pass under ``torch.profiler`` (CPU, and on CUDA the runtime calls such
    as kernel launches and copies), self CPU time per batch of each op. On a launch-bound GPU the
    loop's CPU time is its speed, so the ops the capture adds (and what they cost) are the gap.
    Python outside torch ops (row selection in numpy, hook closures) shows only in the walls.
    Returns a markdown table: the ``top`` ops whose time grew most, then totals."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    n_batches = min(n_batches, -(-read_token_table(cache_dir).num_rows // cfg.batch_size))  # as many as there are
    per_batch: dict[str, dict[str, tuple[float, float]]] = {}  # pass -> op -> (calls, self CPU us) per batch
    walls: dict[str, float] = {}
    for name, run in (("bare", bare_forward_seconds), ("capture", capture_seconds)):
        prof = profile(activities=activities)  # entered around the timed loop only, not the model loading
        walls[name] = run(cfg, cache_dir, max_batches=n_batches, around=prof)[0] / n_batches * 1e6
        per_batch[name] = {e.key: (e.count / n_batches, e.self_cpu_time_total / n_batches)
                           for e in prof.key_averages()}
    bare, capture = per_batch["bare"], per_batch["capture"]
    grown = sorted(set(bare) | set(capture),
                   key=lambda k: capture.get(k, (0, 0))[1] - bare.get(k, (0, 0))[1], reverse=True)[:top]
    lines = ["| op (self CPU per batch) | calls bare | calls capture | µs bare | µs capture | µs added |",
             "|---|---|---|---|---|---|"]
    for k in grown:
        (cb, tb), (cc, tc) = bare.get(k, (0, 0)), capture.get(k, (0, 0))
        lines.append(f"| `{k}` | {cb:.1f} | {cc:.1f} | {tb:.1f} | {tc:.1f} | {tc - tb:+.1f} |")
    tot_b, tot_c = (sum(t for _, t in d.values()) for d in (bare, capture))
    lines.append(f"| all ops ({n_batches} batches profiled) | {sum(c for c, _ in bare.values()):.0f} | {sum(c for c, _ in capture.values()):.0f} "
                 f"| {tot_b:.1f} | {tot_c:.1f} | {tot_c - tot_b:+.1f} |")
    lines.append(f"| wall per batch (profiled) | | | {walls['bare']:.1f} | {walls['capture']:.1f} "
                 f"| {walls['capture'] - walls['bare']:+.1f} |")
    return "\n".join(lines)


def writer_alone_seconds(cfg: HarvestConfig, cache_dir: Path, out: Path) -> tuple[float, float]:
    """The harvest's write path alone: ``cfg.tokens`` rows of the harvested cache's shape, handed to
    a :class:`ShardWriter` in forward-batch-sized pieces from host memory as fast as it takes
    them (the chunk-buffer scatter, sha256, write and fsync of every shard, the manifest per chunk),
    with the harvest's shard layout and write threads, into a fresh folder beside the harvest's.
    No model runs. Returns the seconds from the first piece to the last shard listed (the fastest
    this machine's CPUs and disk can write a harvest's rows) and the CPU seconds of the thread that
    took the pieces (the chunk-buffer scatter): a CUDA harvest's writer thread does that work alone,
    so rows made faster than that thread's rate wait for it, however many write threads hash."""
    manifest = Manifest.load(cache_dir)
    manifest.shards, manifest.n_rows, manifest.complete = [], 0, False
    storage = manifest.torch_dtype
    layout = HarvestLayout(cfg.tokens, cfg.shard_rows(manifest.row_bytes), cfg.shuffle_shards)
    piece = cfg.batch_size * cfg.context_size
    # One block of rows, read for every piece: the bytes do not change the cost of any step.
    acts_NMPD = torch.randn(piece, *manifest.row_shape).to(storage)
    seq_N, pos_N, token_N = (torch.zeros(piece, dtype=dt) for dt in (torch.int64, torch.int32, torch.int32))
    writer = ShardWriter(CacheWriter(out, manifest), chunk_rows=layout.chunk_rows(), shard_rows=layout.shard_rows,
                         shuffle_shards=layout.shuffle_shards, seed=cfg.seed, row_shape=manifest.row_shape,
                         dtype=storage, write_threads=cfg.write_threads)
    def pieces():
        for a in range(0, cfg.tokens, piece):
            n = min(piece, cfg.tokens - a)
            yield a, acts_NMPD[:n], seq_N[:n], pos_N[:n], token_N[:n]

    taking = 0.0

    def put_rows(*piece_rows: Any) -> None:
        nonlocal taking
        c = time.thread_time()
        writer.put_rows(*piece_rows)
        taking += time.thread_time() - c

    t = time.perf_counter()
    writer.write_all(pieces(), put_rows)
    return time.perf_counter() - t, taking


@contextmanager
def writer_off_the_loop_core() -> Iterator[None]:
    """Within: this (the forward loop's) thread on one core, and the shard writer's threads, started
    here, on the others, so on a launch-bound GPU host the writer never takes the loop's core (session 11's
    experiment: 0.80 vs 0.74 over 3 rounds, not conclusive). Linux only; needs at least 2 allowed cores."""
    import harvest.writer as writer

    allowed = os.sched_getaffinity(0)
    loop_core = min(allowed)
    others = allowed - {loop_core}
    if not others:
        raise SystemExit("--ab-pin-writer needs at least 2 CPUs this process may run on")
    pool, run = writer.ThreadPoolExecutor, writer.ShardWriterThread._run

    def pinned_pool(*args: Any, **kwargs: Any) -> Any:
        return pool(*args, initializer=lambda: os.sched_setaffinity(0, others), **kwargs)

    def pinned_run(self: Any) -> None:
        os.sched_setaffinity(0, others)  # 0: the calling thread
        run(self)

    writer.ThreadPoolExecutor, writer.ShardWriterThread._run = pinned_pool, pinned_run
    os.sched_setaffinity(0, {loop_core})
    try:
        yield
    finally:
        writer.ThreadPoolExecutor, writer.ShardWriterThread._run = pool, run
        os.sched_setaffinity(0, allowed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=None, help="rows to harvest (default 200k toy, 2M pythia-70m)")
    ap.add_argument("--model-size", choices=["toy", "pythia-70m"], default="toy")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--context-size", type=int, default=128)
    ap.add_argument("--write-threads", type=int, default=None, help="harvest write threads (default: auto)")
    ap.add_argument("--capture-group-tokens", type=int, default=HarvestConfig.capture_group_tokens,
                    help="the harvests' --capture-group-tokens (default: the harvest's default)")
    ap.add_argument("--ab-capture-group-tokens", type=int, default=None, metavar="N",
                    help="also run, in every round right after the harvest, one with --capture-group-tokens N "
                         "(1: each batch taken alone, the path before session 9), against the same bare passes")
    ap.add_argument("--ab-pin-writer", action="store_true",
                    help="also run, in every round right after the harvest, one with the forward loop's thread on one "
                         "core and the shard writer's threads on the others (Linux; for launch-bound GPU hosts), "
                         "against the same bare passes")
    ap.add_argument("--repeats", type=int, default=5, help="harvests, each between two bare passes")
    ap.add_argument("--quick", action="store_true", help="smoke run: 20k tokens")
    ap.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    ap.add_argument("--profile-batches", type=int, default=0,
                    help="also profile this many batches of the bare and capture passes (torch.profiler) and "
                         "print the ops the capture adds, with their CPU time per batch (default 0: off)")
    args = ap.parse_args()
    tokens = 20_000 if args.quick else args.tokens or (200_000 if args.model_size == "toy" else 2_000_000)

    with tempfile.TemporaryDirectory() as tmp:
        models = ["toy-base", "toy-code"] if args.model_size == "toy" else random_pythia70m_pair(Path(tmp))
        hook = "blocks.2.hook_resid_post" if args.model_size == "toy" else "blocks.3.hook_resid_post"
        dataset = "builtin:mixed" if args.model_size == "toy" else \
            random_token_dataset(Path(tmp) / "random-tokens.parquet", tokens, args.context_size)
        cfg = HarvestConfig(models=models, hooks=[hook], dataset=dataset, tokens=tokens,
                            context_size=args.context_size, out=str(Path(tmp) / "cache"), device=args.device,
                            batch_size=args.batch_size, write_threads=args.write_threads,
                            capture_group_tokens=args.capture_group_tokens, progress=False)
        # Warm the page cache and the toy build; measured harvests go to fresh folders.
        harvest(HarvestConfig(**{**cfg.__dict__, "tokens": min(tokens, 5000), "out": str(Path(tmp) / "warm")}))
        harvest_runs, bare_runs, pair_ratios, flushes = [], [], [], []
        capture_runs, capture_ratios, waits, alone_runs, taking_runs = [], [], [], [], []
        off_cpu_bare, off_cpu_harvest = [], []  # the forward loop's thread: wall minus its CPU time
        cpu_bare, cpu_capture, cpu_harvest = [], [], []  # and that CPU time
        ab_runs: list[float] = []  # harvests with --ab-capture-group-tokens, each right after the main one
        ab_ratios: list[float] = []
        pin_runs: list[float] = []  # harvests with --ab-pin-writer, likewise
        pin_ratios: list[float] = []
        bare_before = None
        for r in range(args.repeats):  # interleaved, so background load hits both alike
            run_cfg = HarvestConfig(**{**cfg.__dict__, "out": str(Path(tmp) / f"cache{r}")})
            harvest(run_cfg)
            manifest = Manifest.load(run_cfg.out)
            run, row_bytes = manifest.created_by["last_run"], manifest.row_bytes
            harvest_runs.append(float(run["forward_and_write_seconds"]))
            flushes.append(float(run["final_flush_seconds"]))
            waits.append(float(run["writer_wait_seconds"]))
            off_cpu_harvest.append(harvest_runs[-1] - float(run["forward_loop_cpu_seconds"]))
            cpu_harvest.append(float(run["forward_loop_cpu_seconds"]))
            if args.ab_capture_group_tokens is not None:
                ab_cfg = HarvestConfig(**{**run_cfg.__dict__, "out": str(Path(tmp) / f"ab{r}"),
                                          "capture_group_tokens": args.ab_capture_group_tokens})
                harvest(ab_cfg)
                ab_runs.append(float(Manifest.load(ab_cfg.out).created_by["last_run"]["forward_and_write_seconds"]))
                shutil.rmtree(ab_cfg.out)
            if args.ab_pin_writer:
                pin_cfg = HarvestConfig(**{**run_cfg.__dict__, "out": str(Path(tmp) / f"pin{r}")})
                with writer_off_the_loop_core():
                    harvest(pin_cfg)
                pin_runs.append(float(Manifest.load(pin_cfg.out).created_by["last_run"]["forward_and_write_seconds"]))
                shutil.rmtree(pin_cfg.out)
            if bare_before is None:  # the same batches as every harvest here (same seed and dataset)
                bare_before = bare_forward_seconds(run_cfg, Path(run_cfg.out))[0]
            bare_after, bare_cpu = bare_forward_seconds(run_cfg, Path(run_cfg.out))
            n_batches = -(-read_token_table(run_cfg.out).num_rows // args.batch_size)  # each pass's forward batches
            bare_runs.append(bare_after)
            off_cpu_bare.append(bare_after - bare_cpu)
            cpu_bare.append(bare_cpu)
            # Each harvest against the mean of the bare passes just before and after it: this VM's
            # speed drifts by 10-20% over a minute, and neighbours in time see the same drift.
            pair_ratios.append((bare_before + bare_after) / 2 / harvest_runs[-1])
            if ab_runs:
                ab_ratios.append((bare_before + bare_after) / 2 / ab_runs[-1])
            if pin_runs:
                pin_ratios.append((bare_before + bare_after) / 2 / pin_runs[-1])
            capture_wall, capture_cpu = capture_seconds(run_cfg, Path(run_cfg.out))
            capture_runs.append(capture_wall)
            cpu_capture.append(capture_cpu)
            capture_ratios.append(bare_after / capture_runs[-1])  # its neighbour in time
            alone, taking = writer_alone_seconds(run_cfg, Path(run_cfg.out), Path(tmp) / "writer")
            alone_runs.append(alone)
            taking_runs.append(taking)
            if args.profile_batches and r == args.repeats - 1:
                profiled = profile_capture(run_cfg, Path(run_cfg.out), args.profile_batches)
            shutil.rmtree(Path(tmp) / "writer")  # a GPU run's rows are GBs
            shutil.rmtree(run_cfg.out)  # so long runs (--tokens) fit on the disk
            bare_before = bare_after
        harvest_s, bare = statistics.median(harvest_runs), statistics.median(bare_runs)
        device = run["device"]

    ratio = statistics.median(pair_ratios)
    ab_rows = [] if not ab_runs else [(
        (f"A/B: harvest with --capture-group-tokens {args.ab_capture_group_tokens} instead of "
         f"{args.capture_group_tokens}, ratio to bare (median over harvests, each against the bare passes around it)"),
        (f"{statistics.median(ab_ratios):.3f}  (per harvest: {', '.join(f'{x:.3f}' for x in ab_ratios)}; "
         f"runs: {', '.join(f'{s:.2f}s' for s in ab_runs)})"))]
    if pin_runs:
        ab_rows.append((
            ("A/B: harvest with the forward loop's thread on one core and the writer's threads on the others, ratio "
             "to bare (median over harvests, each against the bare passes around it)"),
            (f"{statistics.median(pin_ratios):.3f}  (per harvest: {', '.join(f'{x:.3f}' for x in pin_ratios)}; "
             f"pinned / plain per round: {', '.join(f'{a / b:.3f}' for a, b in zip(pin_ratios, pair_ratios))})")))
    target = 0.90 if device == "cpu" else 0.95
    rows = [
        ("rows", f"{tokens:,}"),
        ("models x hooks", f"{len(models)} x 1 ({args.model_size}, {hook})"),
        ("dataset, batch, write threads, capture group",
         f"{'builtin:mixed' if args.model_size == 'toy' else 'random ids'}, {args.batch_size} x {args.context_size}, "
         f"{args.write_threads or default_write_threads()}, {args.capture_group_tokens:,} tokens"),
        ("bare forward tokens/s (median)", f"{tokens / bare:,.0f}  (runs: {', '.join(f'{s:.2f}s' for s in bare_runs)})"),
        ("harvest tokens/s (median)", f"{tokens / harvest_s:,.0f}  (runs: {', '.join(f'{s:.2f}s' for s in harvest_runs)})"),
        ("of which the final flush (last chunk's shards after the last forward), median",
         f"{statistics.median(flushes):.2f}s"),
        ("ratio harvest / bare (median over harvests, each against the bare passes around it)",
         f"{ratio:.3f}  (target >= {target}; per harvest: {', '.join(f'{x:.3f}' for x in pair_ratios)}; "
         f"ratio of the medians {bare / harvest_s:.3f})"),
        ("capture only (hooks, row selection, normalization, cast, host copy; no writer) tokens/s (median)",
         f"{tokens / statistics.median(capture_runs):,.0f}  (runs: {', '.join(f'{s:.2f}s' for s in capture_runs)})"),
        ("ratio capture / bare (median, each against the bare pass before it): the cost of capturing rows",
         f"{statistics.median(capture_ratios):.3f}  (per run: {', '.join(f'{x:.3f}' for x in capture_ratios)})"),
        ("ratio harvest / capture (of the medians): the cost of writing them (shuffle, sha256, disk, final flush, "
         "the writer's share of the CPU)", f"{statistics.median(capture_runs) / harvest_s:.3f}"),
        ("forward loop waiting for the writer (a full queue or a chunk not yet written, then the final flush), median",
         f"{statistics.median(waits):.2f}s  (runs: {', '.join(f'{s:.2f}s' for s in waits)})"),
        (("forward loop's thread off the CPU (wall minus its CPU time; median): time it waited for the writer, for the "
          "GIL while other threads held it, or for a device sync that yields"),
         (f"bare {statistics.median(off_cpu_bare):.2f}s, harvest {statistics.median(off_cpu_harvest):.2f}s  "
          f"(harvest runs: {', '.join(f'{s:.2f}s' for s in off_cpu_harvest)})")),
        (("forward loop's CPU time per batch (median): on a launch-bound GPU this is its speed; harvest above "
          "capture is what the writer's threads cost the loop while it runs on the CPU"),
         ", ".join(f"{name} {statistics.median(xs) / n_batches * 1e3:.2f} ms"
                   for name, xs in (("bare", cpu_bare), ("capture", cpu_capture), ("harvest", cpu_harvest)))),
        *ab_rows,
        ("writer alone (the same rows from memory: shuffle, sha256, write, fsync; no model) tokens/s (median)",
         (f"{tokens / statistics.median(alone_runs):,.0f}  ({tokens * row_bytes / statistics.median(alone_runs) / 1e9:.2f} "
          f"GB/s; runs: {', '.join(f'{s:.2f}s' for s in alone_runs)})")),
        (("ratio writer alone / bare (of the medians): below 1, this machine cannot write rows as fast as the models "
          "make them, and the harvest is bound by writing"), f"{bare / statistics.median(alone_runs):.3f}"),
        (("writer alone, the CPU of the thread taking the rows (the chunk-buffer scatter; on a GPU a harvest's writer "
          "thread does this alone, so it caps the rows a harvest takes), median"),
         (f"{statistics.median(taking_runs):.2f}s  ({tokens * row_bytes / max(statistics.median(taking_runs), 1e-9) / 1e9:.2f} "
          f"GB/s of rows; runs: {', '.join(f'{s:.2f}s' for s in taking_runs)})")),
    ]
    machine = f"{platform.node() or 'unknown'}: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, device {device}"
    if device.startswith("cuda"):
        machine += f" ({torch.cuda.get_device_name()})"
    table = "| measure | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    if args.profile_batches:
        table += ("\n\nWhat capturing adds, op by op (the first batches of the last round under torch.profiler, "
                  f"which adds its own cost to every op):\n\n{profiled}")
    print(table)
    if not args.no_record:
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write(f"\n## harvest — {dt.date.today().isoformat()} — {machine}\n\n"
                    f"`python bench/harvest.py {' '.join(sys.argv[1:])}` (torch {torch.__version__})\n\n{table}\n")


if __name__ == "__main__":
    main()
