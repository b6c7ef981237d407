"""Stage 2: train dictionaries on a cache. The loop reads top to bottom in :func:`train_many`.

One loader stream feeds every dictionary ("member"): each batch is read and moved to the
device once, and every member steps on it (a sweep; a single run is a sweep of one). Per step
and member: set LR and λ, forward, loss terms, finiteness check, backward (DDP all-reduces),
clip, gradient-norm finiteness check (every member's, before any steps), Adam step,
inference-state update (BatchTopK threshold), dead-latent counters, log.
Each member checkpoints on its own ``checkpoint_every``; re-running the same command resumes from
the newest step every member saved intact (a damaged checkpoint is reported and skipped) and
reproduces the uninterrupted run's metrics; re-running a finished run (its export written) does
nothing. A non-finite loss or gradient norm stops the run with a checkpoint of the state before
that step. Under torchrun, a collective that times out or loses a peer stops the run with an
error naming the step (:meth:`DistContext.explain_failures`).
SIGINT/SIGTERM finish the current step, save a checkpoint and exit. Under torchrun, ranks read
disjoint parts of each epoch and only rank 0 writes. Each run folder is locked for the whole run
(:mod:`shared.folder_lock`): a second job into it is refused before it reads or writes anything there.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from einops import rearrange

from shared.cache import Cache, open_cache
from shared.cache_format import CacheError
from shared.config import config_to_json
from shared.devices import resolve_device
from shared.folder_lock import FolderBusyError, FolderLock, FolderLockError
from shared.redact import redact_machine
from shared.shard_io import atomic_write_bytes, discard_temporaries
from train.checkpoint import (
    CHECKPOINT_DIR,
    CheckpointError,
    checkpoint_path,
    checkpoint_steps,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from train.config import TrainConfig
from train.dictionary import Dictionary, DictionaryConfig
from train.distributed import DistContext
from train.export import fold_normalization, save_dictionary
from train.loader import ActivationLoader, default_eval_shards
from train.losses import loss_terms
from train.metrics import MetricsLogger, ReconStats, batch_metrics, finite_or_none, plot_metrics, read_metrics
from train.run_dir import RunMismatchError, check_moved_cache, check_run_dir, moved_from, record_resume
from train.slots import SlotSpec, resolve_slots
from train.sweep import check_distinct_members

__all__ = ["train", "train_many", "TrainResult", "NonFiniteLossError", "TrainingInterrupted", "RunMismatchError",
           "SweepError", "build_dictionary_config", "STREAM_FIELDS", "SWEEP_WIDE_FIELDS"]

JUMPRELU_INIT_RATE = 0.2
"""Largest share of tokens a JumpReLU latent fires on at initialisation."""

OUTLIER_RATIO = 1e6
"""A batch whose largest |activation| exceeds its median this many times holds an outlier: a
non-finite loss or gradient is then blamed on the data. Real residual streams have "massive
activations" of ~1e3-1e4x the median (Sun et al. 2024), so this leaves them to the optimizer."""

STREAM_FIELDS = ("cache", "max_shards", "steps", "batch_size", "seed", "window", "eval_shards", "device",
                 "dist_timeout")
"""Fields every member of a sweep must share: they define the one loader stream (and its length)."""

SWEEP_WIDE_FIELDS = {"progress": "one progress bar shows the whole sweep"}
"""Other fields a sweep has once, not per member (why). Every other field is each member's own."""


class NonFiniteLossError(RuntimeError):
    """A loss term or the gradient norm became NaN or inf; a checkpoint of the last good state was saved."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM arrived; a checkpoint was saved. Re-run the same command to resume."""


class SweepError(ValueError):
    """Sweep members that cannot share one loader stream."""


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_metrics: dict[str, Any]
    eval_metrics: dict[str, Any]
    loop_seconds: float = 0.0  # wall time of the training loop in this call (the whole sweep's, for members)
    already_complete: bool = False  # the run had finished before this call, which did nothing


def build_dictionary_config(cfg: TrainConfig, spec: SlotSpec, d_model: int) -> DictionaryConfig:
    return DictionaryConfig(
        arch=cfg.arch, activation=cfg.activation, d_model=d_model, n_latents=cfg.latents,
        in_slots=spec.in_slots, out_slots=spec.out_slots, slot_names=spec.slot_names, k=cfg.k, skip=cfg.skip,
        shared_latents=cfg.shared_latents, shared_sparsity_ratio=cfg.shared_sparsity_ratio,
        dec_init_norm=cfg.dec_init_norm, jumprelu_bandwidth=cfg.jumprelu_bandwidth, tanh_c=cfg.tanh_c,
        pre_act_coeff=cfg.pre_act_coeff, aux_k_coeff=cfg.aux_k_coeff, k_aux=cfg.k_aux,
    )


def _slots_normalization_sha256(cache: Cache, spec: SlotSpec) -> str:
    """The digest of the normalization of a run's own slots, which ``analyze --cache`` compares with
    another cache's (its side file was checked before the run started: :func:`_train_many`)."""
    return cache.normalization().slots_sha256(cache.manifest.model_names, list(cache.manifest.hooks),
                                              [(m, h) for m in spec.models for h in spec.hooks])


def _completed(cfg: TrainConfig) -> TrainResult | None:
    """The result of a run that already finished (its final export is written), else None."""
    run_dir = Path(cfg.out)
    export_cfg = run_dir / "export" / "config.json"  # save_dictionary writes it last
    if not export_cfg.is_file():
        return None
    meta = json.loads(export_cfg.read_text()).get("metadata", {})
    if meta.get("step") != cfg.steps:
        return None
    train_lines = [r for r in read_metrics(run_dir) if "loss/total" in r]
    return TrainResult(run_dir, cfg.steps, train_lines[-1] if train_lines else {}, meta.get("eval", {}),
                       already_complete=True)


@contextlib.contextmanager
def _member_errors(cfg: TrainConfig, named: bool) -> Iterator[None]:
    """Prefix a sweep member's configuration errors with its name (a single run needs none)."""
    try:
        yield
    except ValueError as e:
        if not named:
            raise
        raise type(e)(f"sweep member {Path(cfg.out).name!r}: {e}") from None


class _Plan(NamedTuple):
    """One member, resolved and checked against the cache and its run folder; nothing written yet."""

    cfg: TrainConfig
    spec: SlotSpec
    dict_cfg: DictionaryConfig
    resuming: bool
    done: TrainResult | None  # the member finished before this call


def _eval_rows(cache: Cache, cfg: TrainConfig) -> int:
    """Rows in the held-out split (the loader's rule: the last shards in manifest order)."""
    n_eval = default_eval_shards(cache.n_shards) if cfg.eval_shards is None else cfg.eval_shards
    return sum(s.n_rows for s in cache.manifest.shards[cache.n_shards - n_eval:]) if n_eval else 0


def _check_eval_split(cache: Cache, cfg: TrainConfig) -> None:
    """Refuse held-out shards that hold no rows: the run would be evaluated on nothing, and say nothing of it
    (a one-shard cache, or ``--eval-shards 0``, holds none out on purpose: that is not refused)."""
    n = cache.n_shards
    k = default_eval_shards(n) if cfg.eval_shards is None else cfg.eval_shards
    if not 0 < k < n or _eval_rows(cache, cfg):
        return
    rows = [s.n_rows for s in cache.manifest.shards]
    more = next((j for j in range(k + 1, n) if sum(rows[n - j:])), None)  # the fewest last shards holding rows
    raise ValueError(
        f"the held-out split of cache {cache.dir} (its last {k} of {n} shards"
        f"{', by default' if cfg.eval_shards is None else ''}) holds 0 rows, so the run would have no eval; pass "
        + (f"--eval-shards {more} to hold out the last {more} shards (they hold rows), or " if more else "")
        + "--eval-shards 0 to train on every shard with no held-out eval")


def _held_out_batch(cache: Cache, cfg: TrainConfig, dist: DistContext) -> int:
    """Rows per batch of the JumpReLU calibration and of eval: the *global* batch (batch size x
    ranks), capped by the held-out split, so that N ranks with batch B read exactly the rows one
    process with batch N*B reads (README: same weights, same eval lines)."""
    global_batch = cfg.batch_size * dist.world_size
    eval_rows = _eval_rows(cache, cfg)
    return min(global_batch, eval_rows) if eval_rows else global_batch


class _Member:
    """One dictionary of a (possibly one-member) sweep: its model, optimizer, counters, folder."""

    def __init__(self, cfg: TrainConfig, spec: SlotSpec, dict_cfg: DictionaryConfig, resuming: bool, cache: Cache,
                 union: list[str], device: torch.device, dist: DistContext) -> None:
        """Build the model and optimizer; nothing is written until :meth:`write_config`."""
        man = cache.manifest
        self.cfg, self.run_dir, self.dist = cfg, Path(cfg.out), dist
        self.spec, self.dict_cfg, self.resuming = spec, dict_cfg, resuming
        names = self.spec.slot_names
        self.in_idx = torch.tensor([union.index(names[s]) for s in self.spec.in_slots], device=device)
        self.out_idx = torch.tensor([union.index(names[s]) for s in self.spec.out_slots], device=device)
        self.out_names = [names[s] for s in self.spec.out_slots]
        self.run_info = {
            "config": config_to_json(cfg), "dictionary": config_to_json(self.dict_cfg), "d_model": man.d_model,
            "d_in": len(self.spec.in_slots) * man.d_model, "slots": names, "in_slots": self.spec.in_slots,
            "out_slots": self.spec.out_slots, "sparsity_coeff": cfg.resolved_sparsity_coeff,
            "dead_tokens": cfg.resolved_dead_tokens(dist.world_size), "device": str(device), "world_size": dist.world_size,
            # What makes another cache this run's (analyze --cache): the same normalization of its slots
            # (scale, or the mean_std side file; and a digest of its own slots' scale, mean and std, which
            # holds for a cache with more models or hooks, or another order) and, for the same rows, the
            # same shards.
            "cache": {"path": str(cache.dir.resolve()), "spec": cfg.cache, "models": man.models, "hooks": man.hooks,
                      "n_rows": man.n_rows, "dtype": man.dtype, "context_size": man.context_size,
                      "normalization": man.normalization["method"],
                      "normalization_scale": man.normalization.get("scale"),
                      "normalization_sha256": man.normalization.get("sha256"),
                      "normalization_slots_sha256": _slots_normalization_sha256(cache, spec),
                      "shards_sha256": man.shards_fingerprint},
        }
        torch.manual_seed(cfg.seed)  # same seed, same init on every rank
        try:
            self.model = Dictionary(self.dict_cfg).to(device)
        except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
            if not isinstance(e, MemoryError) and "alloc" not in str(e).lower() and "out of memory" not in str(e):
                raise
            n_in, n_out = len(self.in_idx), len(self.out_idx)
            need = cfg.latents * man.d_model * (n_in + n_out) * 4 * 4  # weights, grads and two Adam moments
            raise ValueError(f"--latents {cfg.latents:,} does not fit in memory on {device}: the dictionary's "
                             f"encoder and decoder ({n_in} in, {n_out} out slots of d_model {man.d_model}) need about "
                             f"{need / 2**30:,.1f} GiB with gradients and Adam state; lower --latents") from None
        self.ddp: torch.nn.Module = self.model
        if dist.enabled:
            # einsum's backward may give a gradient other strides on its size-1 dims (W_skip of one input and one
            # output slot: [1, D, 1, D]); DDP's reducer then warns, on every rank, that it copies it slowly.
            for p in self.model.parameters():
                p.register_hook(functools.partial(_with_strides, strides=p.stride()))
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.fwd = torch.compile(self.ddp) if cfg.compile else self.ddp
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, betas=cfg.betas)
        self.since_fired_L = torch.zeros(cfg.latents, dtype=torch.int64, device=device)  # tokens since it fired
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cfg.autocast and device.type == "cuda"
                         else contextlib.nullcontext())
        self.logger: MetricsLogger | None = None
        self.last: dict[str, Any] = {}

    def write_config(self) -> None:
        """Create the run folder and save ``config.json`` (rank 0); a resume records there the options
        it changed (:func:`~train.run_dir.record_resume`)."""
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            # A save killed before its rename left `.step-N.tmp-<pid>/` (a whole checkpoint) or a temp
            # file: no live writer owns one while this job holds the folder's lock.
            discard_temporaries(self.run_dir, self.run_dir / CHECKPOINT_DIR, self.run_dir / "export")
            if not self.resuming:
                (self.run_dir / "wandb_id.txt").unlink(missing_ok=True)  # a stale attempt's wandb run is not ours
                atomic_write_bytes(self.run_dir / "config.json", (json.dumps(self.run_info, indent=1) + "\n").encode())
            else:
                record_resume(self.run_dir, self.run_info)

    def calibrate_jumprelu(self, cache: Cache, union: list[str], spec_models: list[str], spec_hooks: list[str],
                           device: torch.device) -> None:
        """Data-dependent init (Jan 2025 update): each latent fires on 10k/L of the tokens at step 0,
        capped at 20% for small dictionaries (crosscode uses 0.2-0.8 there; at rate 1 every latent fires
        everywhere and the planted-dictionary test collapses). Uses the eval split's first batch, so the
        training stream is untouched."""
        eval_rows = _eval_rows(cache, self.cfg)
        # Every rank computes the same init from the same rows (rank 0's view of the split).
        calib = ActivationLoader(cache, _held_out_batch(cache, self.cfg, self.dist), models=spec_models,
                                 hooks=spec_hooks, seed=self.cfg.seed, split="eval" if eval_rows else "train",
                                 eval_shards=self.cfg.eval_shards, device=device)
        x_BXiD = rearrange(next(iter(calib)), "b m p d -> b (m p) d").index_select(1, self.in_idx)
        # Rows the eval leaves out (NaN/inf) would make every bias NaN, and the first step stop blaming the lr.
        x_BXiD = x_BXiD[finite_rows(x_BXiD)]
        if not len(x_BXiD):
            raise CacheError(f"the held-out batch JumpReLU initialises from holds only non-finite activations: "
                             f"`python run_harvest.py verify {self.cfg.cache}` finds shards corrupted on disk; values "
                             "the harvest itself wrote as NaN/inf need a re-harvest")
        self.model.calibrate_encoder_bias(x_BXiD, firing_rate=min(JUMPRELU_INIT_RATE, 10_000 / self.cfg.latents))

    def state(self, step: int, tokens: int, loader: ActivationLoader) -> dict[str, Any]:
        return dict(model_state=self.model.state_dict(), optimizer_state=self.opt.state_dict(),
                    tensors={"since_fired_L": self.since_fired_L, "rng": torch.get_rng_state()},
                    state={"step": step, "tokens": tokens, "loader": loader.state_dict(),
                           "signature": self.cfg.resume_signature()})

    def load(self, step: int, device: torch.device) -> dict[str, Any]:
        """Restore checkpoint ``step``; raises :class:`CheckpointError` (before changing anything) if it is damaged."""
        path = checkpoint_path(self.run_dir, step)
        ck = load_checkpoint(path, device)
        try:
            self.model.load_state_dict(ck["model"])
        except RuntimeError as e:  # _check_run_dir compares the slots; this catches what it cannot see
            raise RunMismatchError(f"checkpoint {path} does not fit this run's dictionary: {e}") from None
        self.opt.load_state_dict(ck["optimizer"])
        self.since_fired_L.copy_(ck["tensors"]["since_fired_L"].to(device))
        torch.set_rng_state(ck["tensors"]["rng"])
        return ck["state"]


def _resume(members: list[_Member], device: torch.device,
            dist: DistContext) -> tuple[int, int, dict[str, Any] | None]:
    """Load the newest step every member holds intact (a sweep commits steps all together):
    ``(step, tokens, saved state)``, or ``(0, 0, None)`` for a fresh start.

    A damaged checkpoint (a file truncated or altered after it was committed) is reported and the
    next older common step tried; the run then reproduces the steps after it, and rank 0 removes
    the checkpoints past it (they are rewritten when the run gets there). Raises
    :class:`CheckpointError` when no intact common step is left."""
    resumable = [set(checkpoint_steps(m.run_dir)) if m.resuming else set() for m in members]
    common = sorted(set.intersection(*resumable) if all(resumable) else set(), reverse=True)
    if not common and any(resumable):  # a sweep resumes only at a step all its members saved
        if dist.is_main:
            held = "; ".join(f"{m.run_dir}: {f'steps {sorted(r)}' if r else 'none'}"
                             for m, r in zip(members, resumable))
            print(f"warning: no checkpoint step is held by every member of this sweep ({held}), so it starts again "
                  "from step 0 (and reproduces the same result); the members' checkpoints and metrics lines are "
                  "discarded, as a resume discards those past its step. Members added to a sweep, or killed before "
                  "their first common checkpoint, do this; a shared --checkpoint-every gives common steps",
                  file=sys.stderr)
            for m in members:  # else an older, higher step outlives the restart and a later resume takes it up
                for step in checkpoint_steps(m.run_dir):
                    shutil.rmtree(checkpoint_path(m.run_dir, step), ignore_errors=True)
        dist.wait_for_main()  # removing a large dictionary's checkpoints may outlast --dist-timeout
    damaged: list[str] = []
    for step in common:
        try:
            for m in members:  # if a later member's is damaged, the earlier ones are reloaded at an older step
                state = m.load(step, device)
        except CheckpointError as e:
            damaged.append(str(e))
            continue
        if damaged and dist.is_main:
            for d in damaged:
                print(f"warning: {d}", file=sys.stderr)
            print(f"warning: resuming from step {step}, the newest checkpoint intact in "
                  f"{'every member' if len(members) > 1 else members[0].run_dir}; the damaged ones past it are "
                  "removed (the run writes them again when it gets there)", file=sys.stderr)
        dist.barrier()  # every rank has read its checkpoints before rank 0 removes any
        if dist.is_main:
            for m in members:  # the abandoned future, as metrics.jsonl's lines past `step` are
                for later in (s for s in checkpoint_steps(m.run_dir) if s > step):
                    shutil.rmtree(checkpoint_path(m.run_dir, later), ignore_errors=True)
        dist.wait_for_main()
        return step, int(state["tokens"]), state
    if damaged:
        folders = sorted({str(checkpoint_path(m.run_dir, s)) for m in members for s in common})
        raise CheckpointError(
            f"no intact checkpoint to resume from: {' | '.join(damaged)}. Restore the damaged file(s) from a copy, "
            f"or delete the damaged checkpoint folder(s) ({', '.join(folders)}) to train the run again from step 0")
    return 0, 0, None


def train(cfg: TrainConfig) -> TrainResult:
    """Train (or resume) the dictionary ``cfg`` describes; export it and plot its curves."""
    return train_many([cfg])[0]


def _stream_value(cfg: TrainConfig, field: str, n_shards: int) -> Any:
    """``cfg``'s value of a stream field with its default resolved: members leaving ``eval_shards``
    out and giving its default, or ``device: auto`` and the device it picks, share one stream."""
    if field == "eval_shards" and cfg.eval_shards is None:
        return default_eval_shards(n_shards)
    if field == "device":
        return str(resolve_device(cfg.device))
    return getattr(cfg, field)


def _check_sweep(cfgs: list[TrainConfig], n_shards: int) -> None:
    """Refuse a sweep whose members cannot share one loader stream (``n_shards``: the cache's)."""
    first = cfgs[0]
    for i, c in enumerate(cfgs[1:], 1):
        diffs = [f"{f}: {getattr(first, f)!r} vs {getattr(c, f)!r}" for f in STREAM_FIELDS
                 if _stream_value(first, f, n_shards) != _stream_value(c, f, n_shards)]
        if diffs:
            raise SweepError(f"sweep member {i} ({c.out}) cannot share member 0's loader stream: "
                             f"{'; '.join(diffs)}. Members must share {', '.join(STREAM_FIELDS)}")
        for f, why in SWEEP_WIDE_FIELDS.items():
            if getattr(first, f) != getattr(c, f):
                raise SweepError(f"sweep member {i} ({c.out}): {f}: {getattr(first, f)!r} vs {getattr(c, f)!r} in "
                                 f"member 0: {why}; give every member the same {f}")
    outs = [str(Path(c.out).resolve()) for c in cfgs]
    if len(set(outs)) != len(outs):
        raise SweepError(f"sweep members need distinct --out folders, got {outs}")


def train_many(cfgs: list[TrainConfig]) -> list[TrainResult]:
    """Train every configuration on one shared loader stream (each batch read once).

    Every member is validated (slots, dictionary, run folder, loader) before anything is written.
    Members that already finished are skipped (``already_complete``); the rest resume from their
    newest common checkpoint. Raises :class:`NonFiniteLossError` when a loss term or a gradient
    norm becomes NaN/inf (with ``--grad-clip 0`` too), after saving the state before that step.
    """
    if not cfgs:
        raise SweepError("a sweep needs at least one member")
    first = cfgs[0]
    if len({(c.cache, c.max_shards) for c in cfgs}) > 1:  # before opening member 0's cache for the rest
        _check_sweep(cfgs, 1)
    cache = open_cache(first.cache, max_shards=first.max_shards)
    _check_sweep(cfgs, cache.n_shards)
    if len(cfgs) > 1:
        check_distinct_members(cfgs, cache.manifest.d_model, cache.n_shards)
    device = resolve_device(first.device)
    dist = DistContext.from_env(device, first.dist_timeout)
    device = dist.device_for(device)

    def on_sigterm(signum: int, _frame: Any) -> None:
        # Outside the training loop (set-up, resume, the final eval and export), which has its own handler that
        # finishes the step and checkpoints. torchrun sends it when another rank failed: without this the rank
        # died silently, leaving no line of its own.
        rank = f"rank {dist.rank}: " if dist.enabled else ""
        raise TrainingInterrupted(
            f"{rank}stopped by SIGTERM at {dist.where}"
            + (" (torchrun stops every rank when one fails; its report names it)" if dist.enabled else "")
            + ". The checkpoints saved so far are kept: re-run the same command to resume")

    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_sigterm) if on_main else None
    try:
        with dist.explain_failures(), _run_folder_locks(cfgs, dist, device):
            return _train_many(cfgs, cache, device, dist)
    finally:
        if on_main:  # the error on its way out (the caller prints it) is not cut short while the group closes
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        dist.close()
        if on_main:
            signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _run_folder_locks(cfgs: list[TrainConfig], dist: DistContext, device: torch.device) -> Iterator[None]:
    """Hold the lock of every member's run folder for the whole run, taken before any is looked at.

    Rank 0 takes them (it is the only rank that writes run folders); the other ranks learn whether
    it could, so that every rank stops when another job holds one (raises :class:`FolderBusyError`)."""
    with contextlib.ExitStack() as held:
        error: FolderLockError | None = None
        if dist.is_main:
            try:
                for c in cfgs:
                    held.enter_context(FolderLock(c.out, what="run folder"))
            except FolderLockError as e:
                error = e
        if dist.enabled:
            failed, busy = dist.any(torch.tensor([error is not None, isinstance(error, FolderBusyError)],
                                                 device=device)).tolist()
            if failed and error is None:  # busy: the same exit status on every rank (a scheduler retries)
                error = (FolderBusyError if busy else FolderLockError)(
                    f"rank {dist.rank}: stopping: rank 0 could not lock the run folder(s) (its error names the "
                    "folder and the job holding it)")
        if error is not None:
            raise error
        yield


def _train_many(cfgs: list[TrainConfig], cache: Cache, device: torch.device, dist: DistContext) -> list[TrainResult]:
    man = cache.manifest
    # Everything that can refuse the run (slots, dictionary configs, run folders, loaders) is
    # checked before anything is written, so a refused command leaves no folder behind that
    # would refuse the corrected one.
    plans = []
    for c in cfgs:
        with _member_errors(c, named=len(cfgs) > 1):
            _check_eval_split(cache, c)
            spec = resolve_slots(man, arch=c.arch, models=c.models, hooks=c.hooks, in_hooks=c.in_hooks,
                                 out_hooks=c.out_hooks, cache_dir=c.cache)
            dict_cfg = build_dictionary_config(c, spec, man.d_model)
            resuming = check_run_dir(c, Path(c.out), man.d_model, spec, len(man.shards), cache.dir, dist.world_size,
                                     shards_sha256=man.shards_fingerprint)
        plans.append(_Plan(c, spec, dict_cfg, resuming, _completed(c) if resuming else None))
    # A finished run is not trained, evaluated, exported or logged again: re-running its command is a no-op.
    active = [p for p in plans if p.done is None]
    if not active:
        dist.barrier()
        return [p.done for p in plans if p.done is not None]
    # A cache moved or copied since a run was trained on it matched by its manifest's checksums: check that
    # its files hold them (once: the resume records the new folder).
    moved = {p.cfg.out: old for p in active
             if p.resuming and (old := moved_from(Path(p.cfg.out), cache.dir, p.cfg.cache))}
    if moved:
        check_moved_cache(man, cache.dir, moved, progress=active[0].cfg.progress and dist.is_main)
    try:  # the export at the end folds the normalization in: a missing or damaged mean_std file refuses the run now
        cache.normalization()
    except CacheError as e:
        raise CacheError(f"{e} (the run would end by exporting the dictionary in raw units, which needs it; refused "
                         "before step 0)") from None
    first = active[0].cfg
    specs = [p.spec for p in active]
    # The loader serves the union of every member's models and hooks, in cache order.
    models = [m for m in man.model_names if any(m in s.models for s in specs)]
    hooks = [h for h in man.hooks if any(h in s.hooks for s in specs)]
    union = [f"{m}/{h}" for m in models for h in hooks]

    loader_kw = dict(models=models, hooks=hooks, seed=first.seed, window=first.window, eval_shards=first.eval_shards,
                     rank=dist.rank, world_size=dist.world_size)
    probe = ActivationLoader(cache, first.batch_size, **loader_kw)
    # The read-run length follows the *global* batch, so N ranks with batch B read the same
    # stream as one process with batch N*B (and give the same weights).
    global_probe = ActivationLoader(cache, first.batch_size * dist.world_size,
                                    **{**loader_kw, "rank": 0, "world_size": 1})
    loader = ActivationLoader(cache, first.batch_size, epochs=math.ceil(first.steps / probe.batches_per_epoch),
                              device=device, run_rows=global_probe.run_rows, **loader_kw)
    del probe, global_probe
    members = [_Member(p.cfg, p.spec, p.dict_cfg, p.resuming, cache, union, device, dist) for p in active]
    dist.barrier()  # every rank has looked at the run folders before rank 0 writes into them
    for m in members:
        m.write_config()
    dist.wait_for_main()  # rank 0 alone: a killed save's temporaries it removes can be a large dictionary's

    step, tokens, state = _resume(members, device, dist)
    if state is not None:
        loader.load_state_dict(state["loader"])
        if dist.is_main:
            print(f"resuming {', '.join(str(m.run_dir) for m in members)} at step {step} of {first.steps}")
    else:
        for m in members:
            if m.cfg.activation == "jumprelu":
                m.calibrate_jumprelu(cache, union, models, hooks, device)
    for m in members:
        m.logger = MetricsLogger(m.run_dir, resume_step=step, wandb_project=m.cfg.wandb_project,
                                 wandb_mode=m.cfg.wandb_mode, config=redact_machine(m.run_info)[0],
                                 enabled=dist.is_main)

    stop: dict[str, int] = {}

    def on_signal(signum: int, _frame: Any) -> None:
        stop["signal"] = signum  # finish this step, checkpoint, exit

    # Signals reach only the main thread (signal.signal refuses any other): a run on another thread has none.
    handlers = ({s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
                if threading.current_thread() is threading.main_thread() else {})

    def checkpoint(due: list[_Member] | None = None) -> list[Path]:
        """Save the ``due`` members (default: all) at ``step`` (rank 0), then prune them. A resume needs a step
        every member holds, so each keeps its newest ``keep`` such steps besides its own newest
        ``keep`` (members may checkpoint on different schedules)."""
        due = members if due is None else due
        paths = []
        if dist.is_main:
            paths = [save_checkpoint(m.run_dir, step, keep=None, **m.state(step, tokens, loader)) for m in due]
            common = sorted(set.intersection(*(set(checkpoint_steps(m.run_dir)) for m in members)))
            for m in due:  # prune only once every due member holds the step
                prune_checkpoints(m.run_dir, m.cfg.keep_checkpoints, protect=common[-m.cfg.keep_checkpoints:])
        dist.wait_for_main()
        return paths

    from shared.progress import tqdm

    bar = tqdm(total=first.steps, initial=step, unit="step", desc="train" if len(members) == 1 else
               f"sweep x{len(members)}", disable=not (first.progress and dist.is_main), dynamic_ncols=True)
    t_start, tokens_start = time.perf_counter(), tokens
    it = iter(loader)
    try:
        while step < first.steps:
            dist.where = f"step {step + 1} of {first.steps}"
            x_BXD = rearrange(next(it), "b m p d -> b (m p) d")  # read and moved once for every member
            # Rows of this batch on every rank (the last of an epoch may hold fewer on some ranks).
            batch_tokens = loader.global_batch_rows(step % loader.batches_per_epoch)
            # The stop every rank agrees on: set from an all-reduced flag, never from the local
            # signal handler, which may fire on one rank after this step's all-reduce.
            stop_now = False
            bad_terms: list[tuple[int, list[str]]] = []
            outs = []
            for i, m in enumerate(members):
                x_in_BXiD, x_out_BXoD = x_BXD.index_select(1, m.in_idx), x_BXD.index_select(1, m.out_idx)
                lr, lam = m.cfg.lr_at(step), m.cfg.sparsity_at(step)
                for group in m.opt.param_groups:
                    group["lr"] = lr
                dead_L = m.since_fired_L >= m.cfg.resolved_dead_tokens(dist.world_size)
                with m.autocast:
                    out = m.fwd(x_in_BXiD)
                    terms = loss_terms(m.model, x_in_BXiD, x_out_BXoD, out, sparsity_coeff=lam, dead_mask_L=dead_L)
                finite = torch.stack([torch.isfinite(v).all() for v in terms.values()])
                flags = dist.any(torch.cat([~finite, torch.tensor([bool(stop)], device=finite.device)]))
                if flags[:-1].any():
                    bad_terms.append((i, [n for n, f in zip(terms, flags[:-1].tolist()) if f]))
                    continue
                if flags[-1]:
                    stop.setdefault("signal", signal.SIGTERM)
                    stop_now = True
                outs.append((m, out, terms, x_out_BXoD, dead_L, lr, lam))
            if bad_terms:
                paths = checkpoint()  # the state before this step: nothing stepped yet
                i, names = bad_terms[0]
                raise NonFiniteLossError(  # steps are counted from 1, as in metrics.jsonl and the progress bar
                    f"loss term(s) {names} of {members[i].run_dir} became non-finite at step {step + 1} "
                    f"(lr {members[i].cfg.lr_at(step):.3g}, λ {members[i].cfg.sparsity_at(step):.3g}); the state "
                    f"before this step (after step {step}) is saved in {paths[i] if paths else members[i].run_dir}. "
                    + _non_finite_advice(members[i], x_BXD, union, sweep=len(members) > 1))
            # Every member's gradients are checked before any member steps, so a stop leaves all of
            # them at the state before this step. An inf norm would otherwise be clipped to a zero
            # gradient (a silent no-op step) and a NaN one would poison the weights.
            # Every term is a mean over this rank's rows, and DDP averages the ranks' gradients: right when
            # the ranks hold equal rows. An epoch's last batch may split unevenly (17 and 16 rows): weigh
            # each rank by its share, so the step is the one batch of all ranks' rows gives.
            share = x_BXD.shape[0] * dist.world_size / batch_tokens
            grad_norms = []
            for m, out, terms, *_ in outs:
                (terms["total"] * share if share != 1 else terms["total"]).backward()  # DDP averages here
                # The norm before clipping; max_norm inf (--grad-clip 0) leaves the gradients untouched.
                grad_norms.append(torch.nn.utils.clip_grad_norm_(m.model.parameters(), m.cfg.grad_clip or math.inf))
            bad_grads = dist.any(~torch.isfinite(torch.stack(grad_norms)))  # outs holds every member here
            if bad_grads.any():
                paths = checkpoint()  # nothing stepped yet: the state before this step
                j = int(bad_grads.nonzero()[0])
                m = outs[j][0]
                i = members.index(m)
                raise NonFiniteLossError(
                    f"the gradient norm of {m.run_dir} became {float(grad_norms[j])} at step {step + 1} (lr "
                    f"{m.cfg.lr_at(step):.3g}, λ {m.cfg.sparsity_at(step):.3g}; the loss was finite); the state before "
                    f"this step (after step {step}) is saved in {paths[i] if paths else m.run_dir}. "
                    + _non_finite_advice(m, x_BXD, union, sweep=len(members) > 1))
            for (m, out, terms, x_out_BXoD, dead_L, lr, lam), grad_norm in zip(outs, grad_norms):
                m.opt.step()
                m.opt.zero_grad(set_to_none=True)
                m.model.update_inference_state(out)
                fired_L = dist.any((out.latents_BL > 0).any(dim=0))
                m.since_fired_L = torch.where(fired_L, 0, m.since_fired_L + batch_tokens)
                if (step + 1) % m.cfg.log_every == 0 or step + 1 == first.steps:
                    elapsed = time.perf_counter() - t_start
                    m.last = {"step": step + 1, "tokens": tokens + batch_tokens,
                              **{f"loss/{k}": v.item() for k, v in terms.items()},
                              **batch_metrics(out.latents_BL, x_out_BXoD, out.recon_BXoD, m.out_names),
                              "dead_frac": dead_L.float().mean().item(), "lr": lr, "sparsity_coeff": lam,
                              "grad_norm": float(grad_norm),
                              "tokens_per_s": (tokens + batch_tokens - tokens_start) / max(elapsed, 1e-9)}
                    m.logger.log(m.last)
            step += 1
            tokens += batch_tokens
            bar.update(1)
            if len(members) == 1 and members[0].last:
                last = members[0].last
                ev = last["ev/overall"]  # None for a batch with nothing to explain (one row)
                bar.set_postfix_str(f"loss {last['loss/total']:.3g} L0 {last['l0/mean']:.1f} "
                                    f"EV {'n/a' if ev is None else f'{ev:.3f}'} {last['tokens_per_s']:,.0f} tok/s",
                                    refresh=False)
            evaluating = [m for m in members if m.cfg.eval_every and step % m.cfg.eval_every == 0 and step < first.steps]
            for m in evaluating:
                if dist.is_main and (eval_metrics := evaluate(m, cache, models, hooks, device)):  # {}: no eval split
                    m.logger.log({"step": step, **eval_metrics})
            if evaluating:
                dist.wait_for_main()  # not the next step's collective, whose --dist-timeout rank 0's eval may pass
            if stop_now:
                paths = checkpoint()
                raise TrainingInterrupted(f"signal {stop['signal']} at step {step}: checkpoint saved to "
                                          f"{', '.join(map(str, paths)) or 'rank 0'}; re-run the same command to resume")
            due = [m for m in members if step % m.cfg.checkpoint_every == 0 or step == first.steps]
            if due:  # each member on its own --checkpoint-every
                checkpoint(due)
    finally:
        bar.close()
        for s, h in handlers.items():
            signal.signal(s, h)
        if hasattr(it, "close"):
            it.close()

    loop_seconds = time.perf_counter() - t_start
    dist.where = "the final eval and export"
    trained = {}
    for m in members:
        eval_metrics = evaluate(m, cache, models, hooks, device) if dist.is_main else {}
        if dist.is_main:
            line = {"step": step, **eval_metrics}
            # A run stopped after its final checkpoint but before its export resumes right here:
            # the final eval line it may have written already is not written twice. A cache with no
            # held-out split (one shard) has no eval line.
            if eval_metrics and set(line) not in [set(r) for r in read_metrics(m.run_dir) if r.get("step") == step]:
                m.logger.log(line)
            plot_metrics(m.run_dir)  # before the export, which marks the run finished: a kill between them redoes both
            export(m, cache, step, eval_metrics)
        m.logger.close()
        trained[m.cfg.out] = TrainResult(m.run_dir, step, m.last, eval_metrics, loop_seconds)
    dist.wait_for_main()
    return [p.done or trained[p.cfg.out] for p in plans]


def finite_rows(x_B: torch.Tensor) -> torch.Tensor:
    """Which rows (the first dim) hold only finite values."""
    return torch.isfinite(x_B).flatten(1).all(dim=1)


def _with_strides(grad: torch.Tensor, *, strides: tuple[int, ...]) -> torch.Tensor:
    """``grad`` laid out as its (contiguous) parameter: the layout DDP's gradient buckets have."""
    return grad if grad.stride() == strides else grad.clone(memory_format=torch.contiguous_format)


@torch.no_grad()
def _non_finite_advice(m: _Member, x_BXD: torch.Tensor, union: list[str], *, sweep: bool = False) -> str:
    """What to do about a non-finite loss or gradient. Blames the batch when it holds non-finite
    activations or an outlier (no learning rate fixes those), else the optimizer settings."""
    idx_X = torch.cat([m.in_idx, m.out_idx]).unique()
    x_BXD = x_BXD.index_select(1, idx_X)
    bad_X = ~torch.isfinite(x_BXD).all(dim=2).all(dim=0)
    verify = f"`python run_harvest.py verify {m.cfg.cache}` finds shards corrupted on disk"
    if bad_X.any():
        names = [union[i] for i in idx_X[bad_X].tolist()]
        return (f"This step's batch holds non-finite activations in {names}: the cache is the cause, not the "
                f"optimizer ({verify}; values the harvest itself wrote as NaN/inf need a re-harvest).")
    abs_N = x_BXD.abs().float().flatten()
    amax, median = abs_N.max().item(), abs_N.median().item()
    ratio = amax / max(median, 1e-30)
    if ratio > OUTLIER_RATIO:
        return (f"This step's batch holds an outlier: its largest |activation| is {amax:.3g}, {ratio:.2g}x its "
                f"median: the cache is the likely cause, not the optimizer ({verify}; otherwise re-harvest).")
    # The stop is deterministic: the saved state, this batch and the settings (part of the run's
    # signature, so a resume cannot change them) give the same step again.
    data = (f"If it fails at this step whatever the lr, suspect the data: the batch's largest |activation| is "
            f"{amax:.3g} ({ratio:.2g}x its median; {verify}).")
    if sweep:  # a member changed in the sweep file is refused; a renamed one restarts every member from 0
        return (f"Remove member {m.run_dir.name!r} from the sweep file and re-run the same command: the other "
                f"members resume from the step saved now. Train that member again on its own, in a new --out, with a "
                f"lower --lr or a --grad-clip (resuming it unchanged would repeat this step). " + data)
    return "Train again in a new --out with a lower --lr or a --grad-clip (resuming would repeat this step). " + data


@torch.no_grad()
def evaluate(m: _Member, cache: Cache, models: list[str], hooks: list[str], device: torch.device) -> dict[str, Any]:
    """Inference-mode metrics on the held-out split (``eval/`` keys); empty if there is none.

    Rank 0 scores ``eval_batches`` batches of the *global* batch size, the rows a one-process run
    with the same global batch scores, so eval lines do not depend on the number of ranks."""
    if _eval_rows(cache, m.cfg) == 0:
        return {}
    loader = ActivationLoader(cache, _held_out_batch(cache, m.cfg, m.dist), models=models, hooks=hooks, split="eval",
                              seed=m.cfg.seed, eval_shards=m.cfg.eval_shards, device=device)
    # Pooled over every eval row (not a mean of per-batch figures, which a short last batch skews:
    # a 1-row batch gave an EV of -1e14).
    stats = ReconStats(m.out_names)
    model = m.model
    was_training = model.training
    model.eval()
    skipped = 0
    for i, acts_BMPD in enumerate(loader):
        if i >= m.cfg.eval_batches:
            break
        x_BXD = rearrange(acts_BMPD, "b m p d -> b (m p) d")
        x_in, x_out = x_BXD.index_select(1, m.in_idx), x_BXD.index_select(1, m.out_idx)
        # A row the harvest wrote as NaN/inf (or a shard damaged after its checksum was taken) would make every
        # figure NaN, and the export, which refuses NaN metadata, would fail on every re-run: such rows are
        # left out, counted and reported; training on the other split stops at such a row instead.
        finite_B = finite_rows(x_in) & finite_rows(x_out)
        if not bool(finite_B.all()):
            skipped += int((~finite_B).sum())
            x_in, x_out = x_in[finite_B], x_out[finite_B]
        # Inference is per row: a forward per rank-sized piece scores the global batch without
        # holding N ranks' latents at once on rank 0.
        for piece_BXiD, target_BXoD in zip(x_in.split(m.cfg.batch_size), x_out.split(m.cfg.batch_size)):
            out = model(piece_BXiD, inference=True)
            stats.update((out.latents_BL > 0).sum(dim=1), target_BXoD, out.recon_BXoD)
            del out  # its latents: one piece's at a time
    model.train(was_training)
    out_metrics = {f"eval/{k}": v for k, v in stats.metrics().items()}
    if skipped:
        out_metrics["eval/nonfinite_rows"] = skipped
        print(f"warning: {skipped} held-out row(s) of {m.cfg.cache} hold non-finite activations and were left out of "
              f"the eval of {m.run_dir}; `python run_harvest.py verify {m.cfg.cache}` finds shards corrupted on "
              f"disk, values the harvest itself wrote as NaN/inf need a re-harvest", file=sys.stderr)
    return finite_or_none(out_metrics)


def harvest_provenance(cache: Cache, spec: SlotSpec) -> dict[str, Any]:
    """The cache manifest's keys about the dictionary's own models and hooks, for a dictionary handed on
    without its run folder or cache (an ``export/`` copied away, or pushed to the Hub): the models' depth,
    revision and weights fingerprint (the circuit-tracer export checks layer coverage against ``n_layers``),
    the context size, dataset and excluded tokens (the SAELens export's metadata), the tokenizer."""
    man = cache.manifest
    by_name = {entry["name"]: entry for entry in man.models}
    return {"models": [by_name[name] for name in spec.models], "hooks": list(spec.hooks), "d_model": man.d_model,
            "n_rows": man.n_rows, "context_size": man.context_size, "dataset": man.dataset,
            "excluded_tokens": man.excluded_tokens,
            "tokenizer": {k: man.tokenizer.get(k) for k in ("name", "vocab_size", "sha256")},
            "normalization": man.normalization["method"]}


def export(m: _Member, cache: Cache, step: int, eval_metrics: dict[str, Any]) -> None:
    """Save the trained dictionary twice: as trained (normalized space) and folded (raw activations)."""
    cfg, spec = m.cfg, m.spec
    # train_config's batch_size is per process: world_size says how many (the global batch is their product).
    meta = {"step": step, "cache": cfg.cache, "slots": spec.slot_names, "models": spec.models, "hooks": spec.hooks,
            "eval": eval_metrics, "train_config": config_to_json(cfg), "world_size": m.dist.world_size,
            "harvest": harvest_provenance(cache, spec)}
    model = m.model.eval()
    save_dictionary(m.run_dir / "dictionary", model, {**meta, "space": "normalized"})
    man = cache.manifest
    norm = cache.normalization().select([man.model_names.index(x) for x in spec.models],
                                        [man.hooks.index(h) for h in spec.hooks])
    folded = fold_normalization(model, norm, norm)
    save_dictionary(m.run_dir / "export", folded, {**meta, "space": "raw", "normalization_folded": norm.method},
                    shareable=True)
