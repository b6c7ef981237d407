"""Stage 2: train one dictionary on a cache. The loop reads top to bottom in :func:`train`.

Per step: set LR and λ, forward, loss terms, finiteness check, backward, clip, Adam step,
inference-state update (BatchTopK threshold), dead-latent counters, log, checkpoint.
Resuming (re-running the same command) restores weights, optimizer, loader position, RNG and
counters from the newest checkpoint and reproduces the uninterrupted run's metrics.
SIGINT/SIGTERM finish the current step, save a checkpoint and exit.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from einops import rearrange

from shared.cache import open_cache
from shared.config import config_to_json
from shared.shard_io import atomic_write_bytes
from train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from train.config import TrainConfig
from train.dictionary import Dictionary, DictionaryConfig
from train.export import fold_normalization, save_dictionary
from train.loader import ActivationLoader
from train.losses import loss_terms
from train.metrics import MetricsLogger, batch_metrics, plot_metrics
from train.slots import SlotSpec, resolve_slots

__all__ = ["train", "TrainResult", "NonFiniteLossError", "TrainingInterrupted", "RunMismatchError",
           "build_dictionary_config"]


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or inf; a checkpoint of the last good state was saved."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM arrived; a checkpoint was saved. Re-run the same command to resume."""


class RunMismatchError(ValueError):
    """The run folder holds a different run (config or cache width)."""


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_metrics: dict[str, Any]
    eval_metrics: dict[str, Any]


def build_dictionary_config(cfg: TrainConfig, spec: SlotSpec, d_model: int) -> DictionaryConfig:
    return DictionaryConfig(
        arch=cfg.arch, activation=cfg.activation, d_model=d_model, n_latents=cfg.latents,
        in_slots=spec.in_slots, out_slots=spec.out_slots, slot_names=spec.slot_names, k=cfg.k, skip=cfg.skip,
        shared_latents=cfg.shared_latents, shared_sparsity_ratio=cfg.shared_sparsity_ratio,
        dec_init_norm=cfg.dec_init_norm, jumprelu_bandwidth=cfg.jumprelu_bandwidth, tanh_c=cfg.tanh_c,
        pre_act_coeff=cfg.pre_act_coeff, aux_k_coeff=cfg.aux_k_coeff, k_aux=cfg.k_aux,
    )


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available; use --device cpu")
    return dev


def _prepare_run_dir(cfg: TrainConfig, run_dir: Path, d_model: int) -> Path | None:
    """Refuse a folder holding a different run; return the checkpoint to resume from, if any."""
    cfg_path = run_dir / "config.json"
    if cfg_path.exists():
        saved = json.loads(cfg_path.read_text())
        prev = TrainConfig(**{k: tuple(v) if k == "betas" else v for k, v in saved["config"].items()})
        diffs = [f"{k}: {getattr(prev, k)!r} there vs {getattr(cfg, k)!r} now"
                 for k in prev.resume_signature() if prev.resume_signature()[k] != cfg.resume_signature()[k]]
        if diffs:
            raise RunMismatchError(f"--out {run_dir} holds a different run ({'; '.join(diffs[:6])}); use another "
                                   "--out, delete it, or repeat the original command to resume")
        if saved.get("d_model") != d_model:
            raise RunMismatchError(f"--out {run_dir} was trained on d_model={saved.get('d_model')} activations; the "
                                   f"cache {cfg.cache} has d_model={d_model}: use a cache of the same width")
        return latest_checkpoint(run_dir)
    if run_dir.exists() and any(run_dir.iterdir()):
        raise RunMismatchError(f"--out {run_dir} is not empty and holds no run config; choose a new folder")
    return None


def train(cfg: TrainConfig) -> TrainResult:
    """Train (or resume) the dictionary ``cfg`` describes; export it and plot its curves."""
    run_dir = Path(cfg.out)
    cache = open_cache(cfg.cache)
    man = cache.manifest
    spec = resolve_slots(man, arch=cfg.arch, models=cfg.models, hooks=cfg.hooks, in_hooks=cfg.in_hooks,
                         out_hooks=cfg.out_hooks, cache_dir=cfg.cache)
    dict_cfg = build_dictionary_config(cfg, spec, man.d_model)
    device = _device(cfg.device)
    resume_from = _prepare_run_dir(cfg, run_dir, man.d_model)
    run_dir.mkdir(parents=True, exist_ok=True)
    run_info = {
        "config": config_to_json(cfg), "dictionary": config_to_json(dict_cfg), "d_model": man.d_model,
        "d_in": len(spec.in_slots) * man.d_model, "slots": spec.slot_names, "in_slots": spec.in_slots,
        "out_slots": spec.out_slots, "sparsity_coeff": cfg.resolved_sparsity_coeff,
        "dead_tokens": cfg.resolved_dead_tokens, "device": str(device),
        "cache": {"path": str(Path(cfg.cache).resolve()), "models": man.models, "hooks": man.hooks,
                  "n_rows": man.n_rows, "dtype": man.dtype, "normalization": man.normalization["method"]},
    }
    if resume_from is None:
        atomic_write_bytes(run_dir / "config.json", (json.dumps(run_info, indent=1) + "\n").encode())

    torch.manual_seed(cfg.seed)
    model = Dictionary(dict_cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.betas)
    probe = ActivationLoader(cache, cfg.batch_size, models=spec.models, hooks=spec.hooks, seed=cfg.seed,
                             window=cfg.window, eval_shards=cfg.eval_shards)
    epochs = math.ceil(cfg.steps / probe.batches_per_epoch)
    loader = ActivationLoader(cache, cfg.batch_size, models=spec.models, hooks=spec.hooks, seed=cfg.seed,
                              epochs=epochs, window=cfg.window, eval_shards=cfg.eval_shards, device=device)
    in_idx = torch.tensor(spec.in_slots, device=device)
    out_idx = torch.tensor(spec.out_slots, device=device)
    since_fired_L = torch.zeros(cfg.latents, dtype=torch.int64, device=device)  # tokens since each latent fired
    step, tokens = 0, 0

    if resume_from is not None:
        ck = load_checkpoint(resume_from, device)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        loader.load_state_dict(ck["state"]["loader"])
        since_fired_L.copy_(ck["tensors"]["since_fired_L"].to(device))
        torch.set_rng_state(ck["tensors"]["rng"])
        step, tokens = int(ck["state"]["step"]), int(ck["state"]["tokens"])
        print(f"resuming {run_dir} from {resume_from.name} (step {step} of {cfg.steps})")
    elif cfg.activation == "jumprelu":
        # Data-dependent init (Jan 2025 update): each latent fires on ~10k/L of the tokens at step 0.
        # The eval split's first batch is used so the training stream is untouched.
        calib = ActivationLoader(cache, cfg.batch_size, models=spec.models, hooks=spec.hooks, seed=cfg.seed,
                                 split="eval" if probe.eval_shards else "train", eval_shards=cfg.eval_shards,
                                 device=device)
        x_BXD = rearrange(next(iter(calib)), "b m p d -> b (m p) d")
        model.calibrate_encoder_bias(x_BXD[:, in_idx], firing_rate=min(1.0, 10_000 / cfg.latents))
        del calib

    logger = MetricsLogger(run_dir, resume_step=step, wandb_project=cfg.wandb_project, wandb_mode=cfg.wandb_mode,
                           config=run_info)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cfg.autocast and device.type == "cuda"
                else contextlib.nullcontext())
    fwd = torch.compile(model) if cfg.compile else model
    stop: dict[str, int] = {}

    def on_signal(signum: int, _frame: Any) -> None:
        stop["signal"] = signum  # finish this step, checkpoint, exit

    handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    def checkpoint() -> Path:
        return save_checkpoint(
            run_dir, step, model_state=model.state_dict(), optimizer_state=opt.state_dict(),
            tensors={"since_fired_L": since_fired_L, "rng": torch.get_rng_state()},
            state={"step": step, "tokens": tokens, "loader": loader.state_dict(),
                   "signature": cfg.resume_signature()},
            keep=cfg.keep_checkpoints)

    from tqdm import tqdm

    bar = tqdm(total=cfg.steps, initial=step, unit="step", desc="train", disable=not cfg.progress,
               dynamic_ncols=True)
    last: dict[str, Any] = {}
    t_start, tokens_start = time.perf_counter(), tokens
    it = iter(loader)
    try:
        while step < cfg.steps:
            x_BXD = rearrange(next(it), "b m p d -> b (m p) d")
            x_in_BXiD, x_out_BXoD = x_BXD.index_select(1, in_idx), x_BXD.index_select(1, out_idx)
            lr, lam = cfg.lr_at(step), cfg.sparsity_at(step)
            for group in opt.param_groups:
                group["lr"] = lr
            dead_L = since_fired_L >= cfg.resolved_dead_tokens
            with autocast:
                out = fwd(x_in_BXiD)
                terms = loss_terms(model, x_in_BXiD, x_out_BXoD, out, sparsity_coeff=lam, dead_mask_L=dead_L)
            bad = [name for name, value in terms.items() if not torch.isfinite(value).all()]
            if bad:
                path = checkpoint()
                raise NonFiniteLossError(
                    f"loss term(s) {bad} became non-finite at step {step} (lr {lr:.3g}, λ {lam:.3g}); the state "
                    f"before this step is saved in {path}. Lower --lr or raise --grad-clip, then resume.")
            terms["total"].backward()
            grad_norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip
                         else torch.tensor(float("nan")))
            opt.step()
            opt.zero_grad(set_to_none=True)
            model.update_inference_state(out)
            fired_L = (out.latents_BL > 0).any(dim=0)
            since_fired_L = torch.where(fired_L, 0, since_fired_L + x_BXD.shape[0])
            step += 1
            tokens += x_BXD.shape[0]
            bar.update(1)

            if step % cfg.log_every == 0 or step == cfg.steps:
                elapsed = time.perf_counter() - t_start
                last = {"step": step, "tokens": tokens, **{f"loss/{k}": v.item() for k, v in terms.items()},
                        **batch_metrics(out.latents_BL, x_out_BXoD, out.recon_BXoD, [spec.slot_names[s] for s in spec.out_slots]),
                        "dead_frac": dead_L.float().mean().item(), "lr": lr, "sparsity_coeff": lam,
                        "grad_norm": float(grad_norm), "tokens_per_s": (tokens - tokens_start) / max(elapsed, 1e-9)}
                logger.log(last)
                bar.set_postfix_str(f"loss {last['loss/total']:.3g} L0 {last['l0/mean']:.1f} "
                                    f"EV {last['ev/overall']:.3f} {last['tokens_per_s']:,.0f} tok/s", refresh=False)
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                logger.log({"step": step, **evaluate(model, cache, cfg, spec, device)})
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                checkpoint()
            if stop:
                path = checkpoint()
                raise TrainingInterrupted(f"signal {stop['signal']} at step {step}: checkpoint saved to {path}; "
                                          "re-run the same command to resume")
    finally:
        bar.close()
        for s, h in handlers.items():
            signal.signal(s, h)
        it.close() if hasattr(it, "close") else None

    eval_metrics = evaluate(model, cache, cfg, spec, device)
    logger.log({"step": step, **eval_metrics})
    logger.close()
    export(model, loader, run_dir, cfg, spec, step, eval_metrics)
    plot_metrics(run_dir)
    return TrainResult(run_dir, step, last, eval_metrics)


@torch.no_grad()
def evaluate(model: Dictionary, cache: Any, cfg: TrainConfig, spec: SlotSpec, device: torch.device) -> dict[str, Any]:
    """Inference-mode metrics on the held-out split (``eval/`` keys); empty if there is none."""
    try:
        loader = ActivationLoader(cache, cfg.batch_size, models=spec.models, hooks=spec.hooks, split="eval",
                                  seed=cfg.seed, eval_shards=cfg.eval_shards, device=device)
    except ValueError:
        return {}
    sums: dict[str, float] = {}
    n = 0
    was_training = model.training
    model.eval()
    in_idx = torch.tensor(spec.in_slots, device=device)
    out_idx = torch.tensor(spec.out_slots, device=device)
    for i, acts_BMPD in enumerate(loader):
        if i >= cfg.eval_batches:
            break
        x_BXD = rearrange(acts_BMPD, "b m p d -> b (m p) d")
        x_in, x_out = x_BXD.index_select(1, in_idx), x_BXD.index_select(1, out_idx)
        out = model(x_in, inference=True)
        m = batch_metrics(out.latents_BL, x_out, out.recon_BXoD, [spec.slot_names[s] for s in spec.out_slots])
        m["recon"] = (x_out - out.recon_BXoD).pow(2).sum(dim=(1, 2)).mean().item()
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + v
        n += 1
    model.train(was_training)
    return {f"eval/{k}": v / n for k, v in sums.items()} if n else {}


def export(model: Dictionary, loader: ActivationLoader, run_dir: Path, cfg: TrainConfig, spec: SlotSpec,
           step: int, eval_metrics: dict[str, Any]) -> None:
    """Save the trained dictionary twice: as trained (normalized space) and folded (raw activations)."""
    meta = {"step": step, "cache": str(Path(cfg.cache).resolve()), "slots": spec.slot_names,
            "models": spec.models, "hooks": spec.hooks, "eval": eval_metrics, "train_config": config_to_json(cfg)}
    model = model.eval()
    save_dictionary(run_dir / "dictionary", model, {**meta, "space": "normalized"})
    norm = loader.normalization()
    folded = fold_normalization(model, norm, norm)
    save_dictionary(run_dir / "export", folded, {**meta, "space": "raw", "normalization_folded": norm.method})
