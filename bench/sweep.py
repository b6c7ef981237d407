#!/usr/bin/env python
"""Benchmark: a 4-member sweep from one loader stream against the members trained one by one.

One run, same machine, same cache:
- sweep: `train_many(members)`, the training loop's wall time;
- alone: each member trained by itself from the cache (`train(member)`), loop times summed;
- compute-only: each member's training steps on in-memory batches (no loader, no IO), summed.
Target: sweep <= 1.1 x compute-only sum (the IO is paid once, and hidden).
Prints one table and appends it to bench/RESULTS.md.

    python bench/sweep.py [--steps 150] [--quick] [--no-record]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
from einops import rearrange  # noqa: E402

from train.config import TrainConfig  # noqa: E402
from train.dictionary import Dictionary  # noqa: E402
from train.losses import loss_terms  # noqa: E402
from train.slots import resolve_slots  # noqa: E402
from train.trainer import build_dictionary_config, train, train_many  # noqa: E402
from shared.cache import open_cache  # noqa: E402


def members(base: TrainConfig, root: Path) -> list[TrainConfig]:
    """Four dictionaries of the kind a researcher sweeps: activation, k, λ, latents."""
    return [
        dataclasses.replace(base, out=str(root / "relu"), activation="relu"),
        dataclasses.replace(base, out=str(root / "relu-l1"), activation="relu", sparsity_coeff=4.0),
        dataclasses.replace(base, out=str(root / "topk"), activation="topk", k=32),
        dataclasses.replace(base, out=str(root / "batchtopk"), activation="batchtopk", k=32, latents=2 * base.latents),
    ]


def compute_only_seconds(cfg: TrainConfig, batches: list[torch.Tensor]) -> float:
    """The member's training steps on in-memory batches: the same calls the trainer makes."""
    cache = open_cache(cfg.cache)
    spec = resolve_slots(cache.manifest, arch=cfg.arch, models=cfg.models, hooks=cfg.hooks, in_hooks=cfg.in_hooks,
                         out_hooks=cfg.out_hooks)
    torch.manual_seed(cfg.seed)
    model = Dictionary(build_dictionary_config(cfg, spec, cache.manifest.d_model))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.betas)
    in_idx, out_idx = torch.tensor(spec.in_slots), torch.tensor(spec.out_slots)
    since = torch.zeros(cfg.latents, dtype=torch.int64)
    t = time.perf_counter()
    for step, acts_BMPD in enumerate(batches):
        x = rearrange(acts_BMPD, "b m p d -> b (m p) d")
        x_in, x_out = x.index_select(1, in_idx), x.index_select(1, out_idx)
        for g in opt.param_groups:
            g["lr"] = cfg.lr_at(step)
        dead = since >= cfg.resolved_dead_tokens()
        out = model(x_in)
        terms = loss_terms(model, x_in, x_out, out, sparsity_coeff=cfg.sparsity_at(step), dead_mask_L=dead)
        torch.stack([torch.isfinite(v).all() for v in terms.values()]).all().item()
        terms["total"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_inference_state(out)
        since = torch.where((out.latents_BL > 0).any(0), 0, since + x.shape[0])
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--latents", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=200_000, help="rows of the toy-pair cache harvested for the bench")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    steps = 20 if args.quick else args.steps

    from harvest.config import HarvestConfig
    from harvest.harvester import harvest

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        harvest(HarvestConfig(tokens=args.tokens, out=str(root / "cache"), progress=False))
        base = TrainConfig(cache=str(root / "cache"), out=str(root / "x"), latents=args.latents, steps=steps,
                           batch_size=args.batch_size, log_every=50, checkpoint_every=10**9, progress=False,
                           device="cpu")
        sweep = train_many(members(base, root / "sweep"))[0].loop_seconds
        alone = [train(dataclasses.replace(m, out=str(root / "alone" / Path(m.out).name))).loop_seconds
                 for m in members(base, root / "sweep")]
        cache = open_cache(base.cache)
        shard = cache.shard(0)
        g = torch.Generator().manual_seed(0)
        batches = [shard.acts[torch.randint(0, shard.n_rows, (args.batch_size,), generator=g)].float()
                   for _ in range(steps)]
        compute = [compute_only_seconds(m, batches) for m in members(base, root / "sweep")]

    ratio = sweep / sum(compute)
    rows = [
        ("members", "relu λ2, relu λ4, topk k32, batchtopk k32 (2x latents)"),
        ("steps x batch", f"{steps} x {args.batch_size} (2 models x 1 hook x d 128, {args.latents} latents)"),
        ("sweep (one stream), loop s", f"{sweep:.2f}"),
        ("members alone from the cache, sum s", f"{sum(alone):.2f}  ({', '.join(f'{a:.2f}' for a in alone)})"),
        ("compute-only (in-memory), sum s", f"{sum(compute):.2f}  ({', '.join(f'{c:.2f}' for c in compute)})"),
        ("sweep / compute-only sum", f"{ratio:.3f}  (target <= 1.1)"),
        ("sweep / alone sum", f"{sweep / sum(alone):.3f}"),
    ]
    table = "| measure | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    print(table)
    if not args.no_record:
        machine = f"{platform.node() or 'unknown'}: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write(f"\n## sweep — {dt.date.today().isoformat()} — {machine}\n\n"
                    f"`python bench/sweep.py {' '.join(sys.argv[1:])}`\n\n{table}\n")


if __name__ == "__main__":
    main()
