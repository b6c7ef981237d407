"""Multi-process harvesting under ``torchrun``: one cache, written by N processes at once.

    torchrun --nproc-per-node N run_harvest.py [harvest flags] [--dist-timeout SECONDS]

:func:`harvest.harvester.harvest` switches to :func:`harvest_distributed` when it finds the
variables ``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``). Every rank must see the
same ``--out`` folder (one machine, or a shared filesystem).

How the work is split (every step is a deterministic function of the config, so a re-run of
the same command resumes):

1. rank 0 locks ``--out`` for the whole job (:mod:`shared.folder_lock`: a second job into it
   stops here, every rank of it) and inspects it (fresh, resumable, or finished); it tells the others;
2. every rank loads the models (on ``cuda:LOCAL_RANK`` when the device is CUDA);
3. rank 0 checks free disk and, when resuming, collects the shards already written from
   ``manifest.json`` and every ``manifest.rank{r}.json``: only chunks (write-shuffle buffers,
   see :class:`~harvest.harvester.HarvestLayout`) whose shards are all there are kept; shards
   of partly written chunks are deleted;
4. every rank builds the (seeded) token plan itself, or reads it back from ``tokens.arrow``
   when resuming; rank 0 writes ``tokens.arrow``; the ranks compare the plans' sha256;
5. the chunks still to write are cut into ``world_size`` contiguous runs of about equal rows;
   rank r writes the chunks of run r. Batches stay fixed slices of the plan and a chunk's
   shuffle depends only on (seed, chunk), so every shard holds the very bytes a one-process
   harvest writes for it; only the file name differs (``shards/acts-rank{r}-{index}``);
6. normalization: rank 0 forwards the calibration rows (the first rows of the stream, which
   lie in its own chunks unless ``calibration_tokens`` exceeds its share), estimates the
   factors, writes ``manifest.json`` (``complete: false``) and broadcasts the factors. The
   other ranks forward as many rows of their own chunks meanwhile and hold them until the
   factors arrive. Calibration rows are written once, by the rank that owns their chunk;
7. each rank writes its shards and lists each one, right after its atomic rename, in its
   own ``manifest.rank{r}.json`` (written atomically), so a crash of one rank loses nothing
   that was written;
8. at the end rank 0 merges every record into ``manifest.json`` (shards in global index
   order, the order a one-process harvest lists them), marks it complete, writes the card
   and deletes the per-rank manifests.

A rank that fails or dies: ``torchrun`` stops the others at once (each says so, naming its
rank); where no launcher does, the others give up when a collective has waited longer than
the timeout (``--dist-timeout``, env ``CROSSCACHE_DIST_TIMEOUT``, default 300 s), with a
message naming the step. Re-running the same command (any number of processes) resumes.

The ranks only exchange a few small CPU objects (status, plan digests, normalization factors,
shard records), so the process group is gloo on every device: its timeouts raise a Python
error, where NCCL's watchdog would abort the process.

This module is the orchestration; the process group and launcher plumbing live in
:mod:`harvest.process_group`, the per-rank manifests and the resume bookkeeping in
:mod:`harvest.rank_manifests`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import signal
import sys
import threading
import time
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harvest.config import HarvestConfig
from harvest.models import HarvestInputError, check_same_weights, load_models, resolve_device
from harvest.process_group import (
    RESUME_HINT,
    DistributedHarvestError,
    Group,
    attempt,
    dist_timeout_seconds,
    torchrun_env,
)
from harvest.rank_manifests import RANK_MANIFEST_GLOB, RankShardLog, collect_written, shard_index
from harvest.rank_progress import PROGRESS_GLOB, RankProgress, wait_for_ranks
from harvest.token_stream import TokenPlan
from harvest.writer import drain, shard_writer_for, writer_wait_note
from shared.cache import CacheWriter, remove_stale_temp_files
from shared.cache_format import TOKENS_NAME, CacheError, Manifest, ShardRecord, dtype_from_name
from shared.folder_lock import FolderLock, FolderLockError
from shared.normalization import Normalization
from shared.shard_io import sha256_file
from shared.token_table import write_token_table
from shared.tokenizer_file import foreign_tokenizer_file, write_tokenizer_file

__all__ = ["assign_chunks", "harvest_distributed"]


# -- work split ------------------------------------------------------------------------------


def assign_chunks(chunk_rows: list[int], todo: list[int], world: int) -> list[list[int]]:
    """Cut the chunks still to write (``todo``, ascending) into ``world`` contiguous runs of
    about equal rows (within one chunk); run r is rank r's. Rank r takes the chunks that start
    in its r-th share of the rows, so the first chunk (the calibration rows, on a fresh
    harvest) is always rank 0's. A pure function of its arguments."""
    total = sum(chunk_rows[c] for c in todo)
    runs: list[list[int]] = [[] for _ in range(world)]
    before = 0
    for c in todo:
        runs[min(world - 1, world * before // max(total, 1))].append(c)
        before += chunk_rows[c]
    return runs


def _row_ranges(chunks: list[int], chunk_size: int, n_rows: int) -> list[tuple[int, int]]:
    """Maximal contiguous row ranges ``[a, b)`` covered by ``chunks``."""
    ranges: list[tuple[int, int]] = []
    for c in chunks:
        a, b = c * chunk_size, min((c + 1) * chunk_size, n_rows)
        if ranges and ranges[-1][1] == a:
            ranges[-1] = (ranges[-1][0], b)
        else:
            ranges.append((a, b))
    return ranges


def _procs(n: int) -> str:
    return f"{n} process" + ("" if n == 1 else "es")


def _plan_digest(plan: TokenPlan) -> str:
    h = hashlib.sha256()
    for ids in plan.input_ids:
        h.update(np.ascontiguousarray(ids, dtype=np.int32).tobytes())
    h.update(np.asarray(plan.rows_per_seq, dtype=np.int64).tobytes())
    h.update(json.dumps(plan.metadata, sort_keys=True, default=str).encode())
    return h.hexdigest()


# -- the harvest -----------------------------------------------------------------------------


def _rank_device(spec: str, local_rank: int) -> torch.device:
    device = resolve_device(spec)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def _norm_size(method: str, m: int, p: int, d: int) -> int:
    return 1 + m * p + (2 * m * p * d if method == "mean_std" else 0)


def _pack_norm(norm: Normalization | None, method: str, m: int, p: int, d: int) -> torch.Tensor:
    """[status, scale (M*P), mean (M*P*D), std (M*P*D)] as float32; status 0 = rank 0 failed."""
    flat = torch.zeros(_norm_size(method, m, p, d), dtype=torch.float32)
    if norm is not None:
        parts = [torch.ones(1), norm.scale_MP.float().flatten()]
        if method == "mean_std":
            assert norm.mean_MPD is not None and norm.std_MPD is not None
            parts += [norm.mean_MPD.float().flatten(), norm.std_MPD.float().flatten()]
        flat = torch.cat(parts).contiguous()
    return flat


def _unpack_norm(flat: torch.Tensor, method: str, m: int, p: int, d: int) -> Normalization:
    scale = flat[1 : 1 + m * p].reshape(m, p).clone()
    if method == "mean_std":
        k = 1 + m * p
        mean = flat[k : k + m * p * d].reshape(m, p, d).clone()
        std = flat[k + m * p * d :].reshape(m, p, d).clone()
        return Normalization("mean_std", scale, mean, std)
    return Normalization(method, scale)  # type: ignore[arg-type]


def harvest_distributed(cfg: HarvestConfig, *, dist_timeout: float | None = None) -> Manifest:
    """The multi-process harvest (one call per rank; see the module docstring)."""
    env = torchrun_env()
    if env is None:
        raise HarvestInputError("harvest_distributed needs RANK and WORLD_SIZE (launch with torchrun)")
    rank, world, local_rank = env
    timeout = dist_timeout_seconds(dist_timeout)
    group = Group(rank, world, timeout)
    on_main = threading.current_thread() is threading.main_thread()
    previous = None

    def on_sigterm(signum: int, frame: Any) -> None:
        raise DistributedHarvestError(
            f"rank {rank}: stopped by SIGTERM (torchrun stops every rank when one fails; its report "
            f"names the rank that failed first). {RESUME_HINT}"
        )

    if on_main:
        previous = signal.signal(signal.SIGTERM, on_sigterm)
    # rank 0: --out, and whether this run created it (cleaned up if the run fails before its first manifest)
    made: list[tuple[Path, bool]] = []
    # Rank 0 takes it (the ranks of one job share the folder by design) and keeps it until the end,
    # released after a failed run's leftovers are discarded.
    lock = FolderLock(cfg.out, what="cache folder")
    finished = False
    try:
        manifest = _run(cfg, group, local_rank, made, lock)
        finished = True
        return manifest
    except BaseException as e:
        from harvest.harvester import discard_unstarted

        for out, created in made:
            discard_unstarted(out, created=created)
        named = str(e).startswith(f"rank {rank}")
        if isinstance(e, (HarvestInputError, CacheError, DistributedHarvestError, FolderLockError)) and not named:
            raise type(e)(f"rank {rank}: {e}") from e
        raise
    finally:
        if on_main:
            signal.signal(signal.SIGTERM, previous)
        group.close(finished=finished)
        lock.release()


def _run(cfg: HarvestConfig, group: Group, local_rank: int, made: list[tuple[Path, bool]],
         lock: FolderLock) -> Manifest:
    """One rank's harvest. Rank 0 takes ``lock`` (on ``--out``) first and appends ``(--out, whether
    it created that folder)`` to ``made``."""
    from harvest.harvester import (
        CacheDamage, HarvestLayout, _existing_manifest, _Forward, _new_manifest, _shards, find_damage, plan_for_resume,
        plan_from_config, check_free_disk, progress_bar, token_table_problem,
    )

    rank, world = group.rank, group.world
    is0 = rank == 0
    out = Path(cfg.out)
    say = print if is0 else (lambda *a, **k: None)

    # 1. rank 0 decides: fresh, resume, or already complete.
    existing: Manifest | None = None
    damage: CacheDamage | None = None

    def check_out() -> Manifest | None:
        nonlocal damage
        lock.acquire()  # before --out is looked at: a second job into it stops here, and so do its ranks
        for p in out.glob(PROGRESS_GLOB):  # a killed run's: a stale "done" would end a wait at the merge early
            p.unlink(missing_ok=True)
        found = _existing_manifest(out, cfg)
        if found is not None:
            damage = find_damage(out, found, cfg.shuffle_shards)
            if damage:  # rewritten below: damaged chunks (collect_written) and the token table
                say(f"repairing {out}: {damage.describe()}")
                found.complete = False
        return found

    if is0:
        existing, err = attempt(check_out)
    else:
        err = None
    group.agree("checking --out", err)
    state = group.broadcast(
        ("complete" if existing.complete else "resume") if existing is not None else "fresh", "checking --out"
    )
    if state == "complete":
        if is0:
            assert existing is not None
            for p in [*out.glob(RANK_MANIFEST_GLOB), *out.glob(PROGRESS_GLOB)]:
                p.unlink(missing_ok=True)  # left by a run stopped right after its merge
            say(f"{out}: harvest already complete ({existing.n_rows:,} rows in {_shards(len(existing.shards))})")
        return Manifest.load(out)

    # 2. every rank loads the models.
    device: torch.device | None = None

    def load() -> Any:
        nonlocal device
        device = _rank_device(cfg.device, local_rank)
        return load_models(
            cfg.models, cfg.hooks, context_size=cfg.context_size, device=device,
            model_dtype=dtype_from_name(cfg.model_dtype), exclude_special=cfg.exclude_special,
            exclude_token_ids=cfg.exclude_token_ids, allow_vocab_extension=cfg.allow_vocab_extension,
            progress=cfg.progress,
        )

    models, err = attempt(load)
    group.agree("loading the models", err)
    assert device is not None
    for note in (models.vocab_extension_note(), models.special_tokens_note()):
        if note:
            say(note)
    m, p, d = len(cfg.models), len(cfg.hooks), models.d_model
    storage = dtype_from_name(cfg.dtype)
    row_bytes = m * p * d * storage.itemsize
    layout = HarvestLayout(cfg.tokens, cfg.shard_rows(row_bytes), cfg.shuffle_shards)
    chunk_rows = layout.chunk_rows()

    # 3. rank 0: disk check, stale temp files, and (resuming) the chunks already whole.
    done: list[int] = []
    records: dict[int, list[ShardRecord]] = {}
    carried: list[ShardRecord] = []

    tokenizer_file: dict[str, str] = {}  # rank 0: the manifest keys of the cache's own tokenizer.json

    def prepare() -> dict:
        nonlocal carried
        kept_bytes = 0
        by_rank: dict[int, list[ShardRecord]] = {}
        chunks: list[int] = []
        if existing is not None:
            check_same_weights(existing.models, models.manifest_models())  # before anything is removed
            chunks, by_rank, carried, kept_bytes = collect_written(out, existing, layout, world)
        check_free_disk(cfg, out, (m, p, d), row_bytes, kept_bytes, tokenizer=models.tokenizer, say=say,
                        suffix=f"; {_procs(world)}")
        # Before `made` lists --out: a failed start discards the harvest's own files, not this one.
        if (foreign := foreign_tokenizer_file(out, models.tokenizer, existing.tokenizer if existing else {})):
            raise HarvestInputError(foreign)
        made.append((out, not out.exists()))  # it exists (the lock made it); lock.release() removes it if left empty
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(out)
        # Before the token table, as in harvester.harvest: an interrupted cache has it too.
        tokenizer_file.update(write_tokenizer_file(out, models.tokenizer, existing.tokenizer if existing else {},
                                                   say=say) or {})
        if existing is not None:  # a cache harvested before tokenizer.json: listed from the merge on
            existing.tokenizer.update(tokenizer_file)
        return {"done": chunks, "records": {r: [x.to_json() for x in v] for r, v in by_rank.items()}}

    info, err = attempt(prepare) if is0 else (None, None)
    group.agree("preparing --out", err)
    info = group.broadcast(info, "preparing --out")
    t0 = time.perf_counter()
    done = list(info["done"])
    records = {int(r): [ShardRecord.from_json(x, "rank manifest") for x in v] for r, v in info["records"].items()}

    # 4. the token plan: built by every rank (it is seeded), or read back when resuming.
    def plan_step() -> TokenPlan:
        if state == "resume":  # the token table is built again where it is missing or unreadable
            found = Manifest.load(out)
            return plan_for_resume(out, found, cfg, models, rebuild=token_table_problem(out, found) is not None,
                                   write=is0)
        plan = plan_from_config(cfg, models, say=say)
        if is0:
            write_token_table(out, [x.tolist() for x in plan.input_ids], plan.metadata)
        return plan

    plan, err = attempt(plan_step)
    group.agree("building the token plan", err)
    digests = group.all_gather(_plan_digest(plan), "comparing token plans")
    if len(set(digests)) != 1:
        odd = [r for r, h in enumerate(digests) if h != digests[0]]
        raise DistributedHarvestError(
            f"rank {rank}: rank(s) {odd} built a different token plan than rank 0; every rank must read "
            "the same dataset and see the same --out folder (a shared filesystem)"
        )

    # 5. the split.
    todo = [c for c in range(layout.n_chunks) if c not in set(done)]
    mine = assign_chunks(chunk_rows, todo, world)[rank]
    ranges = _row_ranges(mine, layout.chunk_size, cfg.tokens)
    my_rows = sum(b - a for a, b in ranges)
    if state == "resume":
        say(f"resuming {out}: {len(done)} of {layout.n_chunks} chunks already written; "
            f"{len(todo)} chunks left for {_procs(world)}")

    forward = _Forward(models, plan, cfg, device)
    log = RankShardLog(out, rank, world, signature=cfg.content_signature(), dtype=storage, row_shape=(m, p, d),
                       records=records.get(rank, []))
    manifest = existing
    calib_rows = min(cfg.calibration_tokens, cfg.tokens)
    calib_end = min(forward.batch_end(calib_rows), cfg.tokens)  # whole batches (see harvester.harvest)
    held: list[tuple] = []
    own_items = (item for a, b in ranges for item in forward.rows(a, b))
    t_forward, cpu_forward = time.perf_counter(), time.thread_time()

    # 6. normalization factors: one set for all ranks.
    if state == "resume":
        norm = Normalization.from_manifest(out, Manifest.load(out).normalization)
    else:
        norm_err: BaseException | None = None
        if is0:
            def calibrate() -> Normalization:
                nonlocal manifest
                items, estimate = forward.calibrate(calib_rows, calib_end, cfg.normalize)
                held.extend(items)
                estimate.write_side_file(out)
                manifest = _new_manifest(cfg, models, plan, estimate, calib_rows, layout,
                                         tokenizer_file=tokenizer_file or None)
                CacheWriter(out, manifest).save_manifest()
                return estimate

            norm0, norm_err = attempt(calibrate)
            flat = _pack_norm(norm0, cfg.normalize, m, p, d)
            # rank 0's own rows beyond the calibration rows come next
            own_items = (item for a, b in ranges if b > calib_end for item in forward.rows(max(a, calib_end), b))
        else:
            # Forward our own first rows meanwhile (as many as rank 0 calibrates on) and hold them.
            def prefetch() -> None:
                n = 0
                while n < calib_rows:
                    item = next(own_items, None)
                    if item is None:
                        return
                    held.append(item)
                    n += item[1].shape[0]

            _, norm_err = attempt(prefetch)
            flat = _pack_norm(None, cfg.normalize, m, p, d)
        group.broadcast_tensor(flat, "waiting for rank 0's normalization factors")
        if norm_err is not None:
            raise norm_err
        if flat[0].item() != 1.0:
            raise DistributedHarvestError(f"rank {rank}: stopping: rank 0 failed while calibrating the normalization")
        norm = _unpack_norm(flat, cfg.normalize, m, p, d)

    # 7. write our chunks.
    bar = progress_bar(my_rows, initial=0, desc=f"harvest (rank 0 of {world})", disable=not (cfg.progress and is0),
                       started=t_forward)
    shard_writer = shard_writer_for(
        device, log, chunk_rows=chunk_rows, shard_rows=layout.shard_rows, shuffle_shards=layout.shuffle_shards,
        seed=cfg.seed, row_shape=(m, p, d), dtype=storage, rank=rank, write_threads=cfg.write_threads,
        model_names=[r.name for r in models.resolved], hooks=list(cfg.hooks), model_dtype=cfg.model_dtype,
    )
    norm_dev = norm.to(device)  # the factors move once, not per batch
    # What the ranks that finish first watch while they wait at the merge (see harvest.rank_progress).
    progress = RankProgress(out, rank, every_s=min(10.0, group.timeout / 4))
    progress.moving(0)
    forward.on_batch = progress.moving  # per forward batch: a group of them may take longer than the timeout

    def send(first: int, acts_NMPD: torch.Tensor, seq: torch.Tensor, pos: torch.Tensor, tok: torch.Tensor) -> None:
        # Keep only rows of our own ranges (rank 0's calibration rows may reach into others').
        n_all = acts_NMPD.shape[0]
        for a, b in ranges:
            lo, hi = max(a, first) - first, min(b, first + n_all) - first
            if lo < hi:
                shard_writer.put_rows(first + lo, norm_dev.apply(acts_NMPD[lo:hi]).to(storage), seq[lo:hi],
                                      pos[lo:hi], tok[lo:hi])
                bar.update(hi - lo)
        bar.set_postfix_str(f"{shard_writer.bytes_written / 1e9:.2f} GB written", refresh=False)
        progress.moving(first + n_all)

    try:
        shard_writer.write_all(chain(drain(held), own_items), send)
    finally:
        # Shards are counted once listed, mostly after their rows were sent: show the final figure.
        bar.set_postfix_str(f"{shard_writer.bytes_written / 1e9:.2f} GB written", refresh=False)
        bar.close()

    # 8. merge: once every rank is done (an error naming the rank that stalls for --dist-timeout).
    progress.done()
    if stalled := wait_for_ranks(out, rank, world, group.timeout):
        raise DistributedHarvestError(
            f"rank {rank}: no answer within --dist-timeout {group.timeout:g}s while waiting for the other ranks to "
            f"finish their shards: rank(s) {stalled} made no progress in that time (died, failed or hang: see their "
            f"output; torchrun's report names them). {RESUME_HINT}")
    gathered = group.all_gather({"records": [r.to_json() for r in log.records], "rows": shard_writer.rows_written,
                                 "flush": shard_writer.flush_seconds, "writer_wait": shard_writer.total_wait_seconds,
                                 "loop_cpu": time.thread_time() - cpu_forward},
                                "waiting for the other ranks to finish their shards")
    final: Manifest | None = None

    def merge() -> Manifest:
        assert manifest is not None
        recs = list(carried)
        for g in gathered:
            recs += [ShardRecord.from_json(x, "rank manifest") for x in g["records"]]
        by_index: dict[int, ShardRecord] = {}
        for rec in recs:
            idx = shard_index(rec.file)
            if idx in by_index:
                raise CacheError(f"shard {idx} was written twice ({by_index[idx].file}, {rec.file})")
            by_index[idx] = rec
        want = {c * layout.shuffle_shards + j for c in range(layout.n_chunks)
                for j in range(math.ceil(chunk_rows[c] / layout.shard_rows))}
        if set(by_index) != want:
            missing = sorted(want - set(by_index))
            raise CacheError(f"merging the ranks' manifests: shard(s) {missing[:10]} missing. {RESUME_HINT}")
        manifest.shards = [by_index[i] for i in sorted(by_index)]
        end = time.perf_counter()
        manifest.created_by["finished_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        manifest.created_by["last_run"] = {
            "seconds": round(end - t0, 3), "forward_and_write_seconds": round(end - t_forward, 3),
            "rows": sum(g["rows"] for g in gathered), "device": str(device), "world_size": world,
            # the rank that waited longest for its writing (the final flush included)
            "final_flush_seconds": round(max(g["flush"] for g in gathered), 3),
            "writer_wait_seconds": round(max(g["writer_wait"] for g in gathered), 3),
            "forward_loop_cpu_seconds": round(max(g["loop_cpu"] for g in gathered), 3),  # the busiest loop
        }
        manifest.extra["tokens_sha256"] = sha256_file(out / TOKENS_NAME)  # as harvester.harvest records it
        merged = CacheWriter(out, manifest).finish()
        for path in [*out.glob(RANK_MANIFEST_GLOB), *out.glob(PROGRESS_GLOB)]:
            path.unlink(missing_ok=True)
        return merged

    if is0:
        final, err = attempt(merge)
    else:
        err = None
    group.agree("merging the manifests", err)
    if is0:
        assert final is not None
        seconds = time.perf_counter() - t0
        print(f"harvested {final.n_rows:,} rows into {_shards(len(final.shards))} at {out} with {_procs(world)} "
              f"({final.created_by['last_run']['rows'] / max(seconds, 1e-9):,.0f} tokens/s this run)")
        run = final.created_by["last_run"]
        if note := writer_wait_note(run["writer_wait_seconds"], run["forward_and_write_seconds"]):
            print(f"{note} (the slowest rank)")
        return final
    return Manifest.load(out)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use run_harvest.py (under torchrun)")
