#!/usr/bin/env python
"""Benchmark: training-step throughput per architecture and activation, against a matmul ceiling.

Per (architecture, activation), one process, in-memory batches (this measures compute, not the
loader; bench/loader.py compares the two):
- step: the trainer's per-step calls, in its order (train/trainer.py): slot ``index_select``, LR set,
  dead mask, forward (autocast where the trainer uses it), ``loss_terms``, the finiteness check,
  backward, ``clip_grad_norm_``, ``Adam.step``, ``zero_grad``, ``update_inference_state``, the
  dead-latent counter. The model is a real ``Dictionary`` built by ``build_dictionary_config`` from a
  ``TrainConfig`` (JumpReLU gets the trainer's bias calibration);
- ceiling: plain ``torch.matmul`` of exactly the GEMMs the step runs (same shapes, transposes, dtype,
  threads, device), back to back. FLOPs/step are counted from that list, so efficiency =
  achieved FLOP/s / ceiling FLOP/s = ceiling time / step time. What the step spends beyond the
  ceiling is everything that is not a GEMM (activation, top-k, losses, norms, clipping, Adam).
Step and ceiling alternate over ``--rounds``; step time is the median, efficiency the median of the
per-round ratios. Each row also names the non-GEMM op with the most self time (torch.profiler, two
steps; ``--profile`` prints the whole table), and checks the GEMM list against torch's
``FlopCounterMode`` on the real step (a mismatch is an error: the dictionary changed, update
``step_gemms``). ``--compile`` compiles the dictionary as the trainer's ``--compile`` does.

FLOP count (inputs need no gradient, so an encoder's backward is its weight gradient only):
  encoder 2·2·B·d_in·L (forward + weight grad); decoder 3·2·B·L·d_out (forward + grad of the
  latents + weight grad); skip 2·2·B·d_in·d_out; aux-K (dead latents present) another 3·2·B·L·d_out.
  A CLT's encoder is block-diagonal (layer i reads only its slot: 2·B·D·L per GEMM) and its decoder
  is a dense GEMM over the masked [L, n·D] weight (of which (n+1)/(2n) is causally useful; the
  executed FLOPs are counted).

CPU sizes (default): d_model 128 (the toy width), 4096 latents, batch 1024, float32, k 32, 1 thread
(see --threads); crosscoder = 2 models x 1 hook, directional = a skip transcoder (1 slot in, 1 out),
clt = 4 layers (no skip); plus crosscoder topk/batchtopk with 25% of latents dead (aux-K on).
GPU (``--device cuda``): d_model 2304, 16,384 latents, batch 4096, bf16 autocast as the trainer
does; target for the diffing crosscoder: efficiency >= 0.50 of the measured bf16 matmul rate.
Prints one table and appends it to bench/RESULTS.md.

    python bench/train.py [--quick] [--device cpu|cuda] [--dtype float32|bfloat16] [--compile] [--profile]
                          [--archs ...] [--activations ...] [--threads N] [--no-record]
    GPU case: python bench/train.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from train.config import TrainConfig  # noqa: E402
from train.dictionary import ACTIVATIONS, ARCHS, Dictionary  # noqa: E402
from train.losses import loss_terms  # noqa: E402
from train.slots import SlotSpec  # noqa: E402
from train.trainer import JUMPRELU_INIT_RATE, build_dictionary_config  # noqa: E402

SIZES = {"cpu": (128, 4096, 1024), "cuda": (2304, 16_384, 4096)}  # d_model, latents, batch
QUICK_SIZES = {"cpu": (128, 1024, 256), "cuda": (2304, 4096, 1024)}


def slot_spec(arch: str, layers: int) -> tuple[SlotSpec, dict]:
    """Slots of each benchmarked architecture, and the TrainConfig fields naming them."""
    if arch == "crosscoder":  # model diffing: 2 models x 1 hook, in = out
        return SlotSpec(["base", "ft"], ["blocks.2.hook_resid_post"], [0, 1], [0, 1]), {}
    if arch == "directional":  # a skip transcoder: MLP input -> MLP output
        hooks = ["blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"]
        return SlotSpec(["m"], hooks, [0], [1]), {"in_hooks": hooks[:1], "out_hooks": hooks[1:], "skip": True}
    ins = [f"blocks.{i}.ln2.hook_normalized" for i in range(layers)]
    outs = [f"blocks.{i}.hook_mlp_out" for i in range(layers)]
    return (SlotSpec(["m"], ins + outs, list(range(layers)), list(range(layers, 2 * layers))),
            {"in_hooks": ins, "out_hooks": outs})


@dataclass
class Gemm:
    name: str
    a: tuple[int, ...]  # operand shapes as the step lays them out; a transposed operand is a view
    b: tuple[int, ...]
    ta: bool = False
    tb: bool = False

    @property
    def flops(self) -> int:
        m, k = (self.a[-1], self.a[-2]) if self.ta else self.a[-2:]
        n = self.b[-2] if self.tb else self.b[-1]
        batch = self.a[0] if len(self.a) == 3 else 1
        return 2 * batch * m * k * n


def step_gemms(model: Dictionary, batch: int, aux: bool) -> list[Gemm]:
    """The GEMMs one training step runs (forward + backward), in the layouts torch uses."""
    c = model.cfg
    B, D, L, d_in, d_out = batch, c.d_model, c.n_latents, c.n_in * c.d_model, c.n_out * c.d_model
    if c.arch == "clt":  # per layer: [B, D] @ [D, L/n], as one batched GEMM
        n, lp = c.n_in, c.latents_per_layer
        enc = [Gemm("enc fwd", (n, B, D), (n, D, lp)), Gemm("enc wgrad", (n, B, D), (n, B, lp), ta=True)]
    else:
        enc = [Gemm("enc fwd", (B, d_in), (d_in, L)), Gemm("enc wgrad", (B, d_in), (B, L), ta=True)]
    dec = [Gemm("dec fwd", (B, L), (L, d_out)), Gemm("dec dgrad", (B, d_out), (L, d_out), tb=True),
           Gemm("dec wgrad", (B, L), (B, d_out), ta=True)]
    out = enc + dec + ([Gemm("aux-K " + g.name, g.a, g.b, g.ta, g.tb) for g in dec] if aux else [])
    if c.skip:
        if c.arch == "clt":
            out += [Gemm("skip fwd", (c.n_in, B, D), (c.n_in, D, D)),
                    Gemm("skip wgrad", (c.n_in, B, D), (c.n_in, B, D), ta=True)]
        else:
            out += [Gemm("skip fwd", (B, d_in), (d_in, d_out)), Gemm("skip wgrad", (B, d_in), (B, d_out), ta=True)]
    return out


def formula(model: Dictionary, aux: bool) -> str:
    c = model.cfg
    if c.arch == "clt":
        s = f"4B·D·L + 6B·L·({c.n_in}D)"
    else:
        s = "4B·d_in·L + 6B·L·d_out"
    if aux:
        s += " + 6B·L·d_out (aux-K)"
    if c.skip:
        s += " + 4B·d_in·d_out" if c.arch != "clt" else " + 4B·D·D·n"
    return s


def make_ceiling(gemms: list[Gemm], device: torch.device, dtype: torch.dtype) -> Callable[[], None]:
    def operand(shape: tuple[int, ...], t: bool) -> torch.Tensor:
        x = torch.randn(shape, device=device, dtype=dtype)
        return x.transpose(-1, -2) if t else x

    ops = [(operand(g.a, g.ta), operand(g.b, g.tb)) for g in gemms]

    def run() -> None:
        for a, b in ops:
            torch.matmul(a, b)

    return run


def make_step(arch: str, activation: str, *, d_model: int, latents: int, batch: int, k: int, layers: int,
              device: torch.device, dtype: torch.dtype, aux_dead_frac: float, compile: bool = False):
    """Build a Dictionary, Adam and in-memory batches; return (model, step(i)) running the trainer's step."""
    spec, fields = slot_spec(arch, layers)
    tcfg = TrainConfig(arch=arch, activation=activation, k=k if activation in ("topk", "batchtopk") else None,
                       latents=latents, batch_size=batch, steps=10_000, device=str(device), **fields)
    torch.manual_seed(0)
    model = Dictionary(build_dictionary_config(tcfg, spec, d_model)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=tcfg.lr, betas=tcfg.betas)
    n_slots = len(spec.slot_names)
    # Two batches in the cache's normalization (E|x| ~ sqrt(d)), already on the device.
    data = [torch.randn(batch, n_slots, d_model, device=device) for _ in range(2)]
    in_idx = torch.tensor(spec.in_slots, device=device)
    out_idx = torch.tensor(spec.out_slots, device=device)
    if activation == "jumprelu":  # the trainer's data-dependent init
        model.calibrate_encoder_bias(data[0].index_select(1, in_idx),
                                     firing_rate=min(JUMPRELU_INIT_RATE, 10_000 / latents))
    # Where the trainer autocasts (bf16 on CUDA); on CPU only when asked for.
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext())
    fwd = torch.compile(model) if compile else model  # as the trainer's --compile: the model, not the losses
    mid = tcfg.steps // 2  # LR and λ at full value
    lr, lam = tcfg.lr_at(mid), tcfg.sparsity_at(mid)
    since_fired_L = torch.zeros(latents, dtype=torch.int64, device=device)
    pinned_dead_L = torch.zeros(latents, dtype=torch.bool, device=device)
    pinned_dead_L[: int(aux_dead_frac * latents)] = True  # aux-K rows: these latents stay dead

    def step(i: int) -> None:
        nonlocal since_fired_L
        x_BXD = data[i % len(data)]
        x_in_BXiD, x_out_BXoD = x_BXD.index_select(1, in_idx), x_BXD.index_select(1, out_idx)
        for group in opt.param_groups:
            group["lr"] = lr
        dead_L = (since_fired_L >= tcfg.resolved_dead_tokens()) | pinned_dead_L
        with autocast:
            out = fwd(x_in_BXiD)
            terms = loss_terms(model, x_in_BXiD, x_out_BXoD, out, sparsity_coeff=lam, dead_mask_L=dead_L)
        bad = [name for name, value in terms.items() if not torch.isfinite(value).all()]
        if bad:
            raise RuntimeError(f"non-finite loss terms {bad}")
        terms["total"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_inference_state(out)
        fired_L = (out.latents_BL > 0).any(dim=0)
        since_fired_L = torch.where(fired_L, 0, since_fired_L + x_BXD.shape[0])

    return model, step


def bench_one(arch: str, activation: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
              aux: bool) -> dict:
    model, step = make_step(arch, activation, d_model=args.d_model, latents=args.latents, batch=args.batch,
                            k=args.k, layers=args.clt_layers, device=device, dtype=dtype,
                            aux_dead_frac=args.aux_dead_frac if aux else 0.0, compile=args.compile)
    gemms = step_gemms(model, args.batch, aux)
    ceiling = make_ceiling(gemms, device, dtype)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    def timed(fn: Callable[[int], None]) -> float:
        sync()
        t = time.perf_counter()
        for i in range(args.steps):
            fn(i)
        sync()
        return (time.perf_counter() - t) / args.steps

    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:  # first step: warm-up, and a check of the GEMM list
        step(0)
    flops = sum(g.flops for g in gemms)
    if counter.get_total_flops() != flops:
        raise AssertionError(f"{arch}/{activation}: torch counts {counter.get_total_flops():,} GEMM FLOPs per step, "
                             f"the ceiling's list {flops:,} ({counter.get_flop_counts()['Global']}); update step_gemms")
    for i in range(args.warmup):  # allocator, autocast caches, BLAS/cuBLAS heuristics
        step(i)
        ceiling()
    sync()
    steps, ceils = [], []
    for r in range(args.rounds):  # alternate, so background load hits both alike; pair them per round
        order = [("step", step), ("ceil", lambda i: ceiling())]
        for name, fn in order if r % 2 == 0 else order[::-1]:
            (steps if name == "step" else ceils).append(timed(fn))
    top_op = profile(step, device, 1 if args.quick else 2,
                     f"{arch} / {activation}{' + aux-K' if aux else ''}" if args.profile else None)
    step_s, ceil_s = statistics.median(steps), statistics.median(ceils)
    res = {"arch": arch, "activation": activation + (f" + aux-K ({args.aux_dead_frac:.0%} dead)" if aux else ""),
           "shape": shape_text(model), "formula": formula(model, aux), "flops": flops, "top_op": top_op,
           "step_s": step_s, "ceil_s": ceil_s, "steps": steps, "ceils": ceils,
           # efficiency from the pairs of one round (drift in background load cancels), median over rounds
           "eff": statistics.median(c / s for c, s in zip(ceils, steps))}
    del model, step, ceiling
    if args.compile:
        torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def shape_text(model: Dictionary) -> str:
    c = model.cfg
    if c.arch == "clt":
        return f"{c.n_in}x[{c.d_model} -> {c.latents_per_layer}] -> {c.n_out}x{c.d_model}"
    return f"{c.n_in * c.d_model} -> {c.n_latents} -> {c.n_out * c.d_model}" + (" +skip" if c.skip else "")


GEMM_OPS = {"aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::matmul", "aten::einsum"}


def profile(step: Callable[[int], None], device: torch.device, n: int, title: str | None) -> str:
    """Profile ``n`` steps; return the non-GEMM aten op with the most self time (CUDA: kernel time),
    as 'op (calls/step, share of the step's op time)'. With ``title``, print the profiler's table."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    cuda = device.type == "cuda"
    with prof(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as p:
        for i in range(n):
            step(i)
        if cuda:
            torch.cuda.synchronize(device)
    rows = p.key_averages()
    if title:
        key = "self_device_time_total" if cuda else "self_cpu_time_total"
        print(f"\n### profile: {title}\n{rows.table(sort_by=key, row_limit=12)}", flush=True)
    self_time = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    ops = [e for e in rows if e.key.startswith("aten::")]
    total = sum(self_time(e) for e in (ops if cuda else rows)) or 1  # CPU: all self time (Python, autograd too)
    top = max((e for e in ops if e.key not in GEMM_OPS), key=self_time)
    return f"{top.key} ({top.count / n:.0f}/step, {self_time(top) / total:.0%})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                    help="compute dtype: autocast + ceiling GEMMs (default float32 on CPU, bfloat16 on CUDA)")
    ap.add_argument("--d-model", type=int, default=None)
    ap.add_argument("--latents", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--k", type=int, default=32, help="topk / batchtopk k")
    ap.add_argument("--clt-layers", type=int, default=4)
    ap.add_argument("--archs", nargs="+", default=list(ARCHS), choices=ARCHS)
    ap.add_argument("--activations", nargs="+", default=list(ACTIVATIONS), choices=ACTIVATIONS)
    ap.add_argument("--aux-dead-frac", type=float, default=0.25,
                    help="extra crosscoder topk/batchtopk rows with this share of latents dead (aux-K on); 0: none")
    ap.add_argument("--rounds", type=int, default=5, help="step/ceiling alternations; medians are reported")
    ap.add_argument("--steps", type=int, default=None,
                    help="steps (and ceiling passes) timed per round (default 2 on CPU, 10 on CUDA)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads; CPU default 1: on a shared, loaded machine a 2-thread OpenMP "
                         "pool ran GEMMs and elementwise ops 5-10x slower and erratically; 0: torch's default")
    ap.add_argument("--compile", action="store_true", help="torch.compile the dictionary, as the trainer's --compile")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler op table per row")
    ap.add_argument("--quick", action="store_true", help="smoke run (~20 s on CPU): smaller sizes, 2 rounds")
    ap.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    args = ap.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda asked for, but CUDA is not available")
    if args.threads is None and device.type == "cpu":
        args.threads = 1  # see --threads
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    d, lat, b = (QUICK_SIZES if args.quick else SIZES)["cuda" if device.type == "cuda" else "cpu"]
    args.d_model, args.latents, args.batch = args.d_model or d, args.latents or lat, args.batch or b
    args.steps = args.steps or (10 if device.type == "cuda" else 2)
    if args.quick:
        args.rounds, args.steps, args.warmup = 2, 1 if device.type == "cpu" else 3, 1

    configs = [(a, act, False) for a in args.archs for act in args.activations]
    if args.aux_dead_frac > 0 and "crosscoder" in args.archs:
        configs += [("crosscoder", act, True) for act in ("topk", "batchtopk") if act in args.activations]
    results = []
    for arch, act, aux in configs:
        r = bench_one(arch, act, args, device, dtype, aux)
        results.append(r)
        print(f"  {arch:11s} {r['activation']:28s} step {r['step_s'] * 1e3:8.1f} ms  "
              f"ceiling {r['ceil_s'] * 1e3:8.1f} ms  eff {r['eff']:.2f}", file=sys.stderr, flush=True)

    gpu = device.type == "cuda"
    header = ("| arch | activation | d_in -> L -> d_out | FLOPs/step (formula) | GFLOP/step | step ms (median; runs) "
              "| tokens/s | achieved GFLOP/s | matmul ceiling GFLOP/s | efficiency | top non-GEMM op (calls, share) |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in results:
        eff = r["eff"]
        target = "  (target >= 0.50)" if gpu and r["arch"] == "crosscoder" else ""
        lines.append(
            f"| {r['arch']} | {r['activation']} | {r['shape']} | {r['formula']} | {r['flops'] / 1e9:.2f} | "
            f"{r['step_s'] * 1e3:.1f} ({', '.join(f'{s * 1e3:.0f}' for s in r['steps'])}) | "
            f"{args.batch / r['step_s']:,.0f} | {r['flops'] / r['step_s'] / 1e9:.1f} | "
            f"{r['flops'] / r['ceil_s'] / 1e9:.1f} | {eff:.2f}{target} | {r['top_op']} |")
    table = "\n".join(lines)
    threads = torch.get_num_threads()
    setup = (f"B = batch {args.batch}, D = d_model {args.d_model}, L = latents {args.latents}, k {args.k}, "
             f"{str(dtype).removeprefix('torch.')}{' autocast' if dtype != torch.float32 else ''}"
             f"{', torch.compile' if args.compile else ''}, "
             f"{threads} thread(s); crosscoder 2 models x 1 hook, directional = skip transcoder 1 -> 1, "
             f"clt {args.clt_layers} layers; {args.rounds} rounds x {args.steps} steps after {args.warmup} warm-up.\n"
             "FLOPs count GEMMs only: 4 = forward + weight grad (inputs need no grad), 6 = forward + grad of the "
             "latents + weight grad; the clt decoder is the dense masked GEMM actually run. Ceiling = the same "
             "GEMMs as plain torch.matmul, same dtype/threads, alternated with the steps; efficiency = "
             "ceiling time / step time of the same round, median over rounds.")
    print(setup + "\n\n" + table)
    if not args.no_record:
        machine = f"{platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
        if gpu:
            machine += f", {torch.cuda.get_device_name(device)}"
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write(f"\n## train step — {dt.datetime.now().isoformat(timespec='minutes')} — {machine}\n\n"
                    f"`python bench/train.py {' '.join(sys.argv[1:])}` (torch {torch.__version__})\n\n"
                    f"{setup}\n\n{table}\n")


if __name__ == "__main__":
    main()
