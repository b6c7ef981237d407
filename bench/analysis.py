#!/usr/bin/env python
"""Benchmark: ``run_train.py analyze`` on the demo run, and on a 16,384-latent dictionary over
1M eval tokens (CPU), with the analysis's peak memory.

1. Demo: the toy-code run of ``make demo`` (``runs/demo-toy-code``; built through ``demo.py``'s
   steps when missing, which resume), analysed into a temporary folder.
2. Large: a synthetic cache (tests/cache_factory.py; 2 models x 1 hook x d 128, bf16) whose
   held-out split holds >= 1M rows, a ReLU crosscoder of 16,384 latents trained for a few steps
   on it (the timing does not depend on what it learned), analysed over exactly 1M eval rows.
Each analysis runs in a child process so its peak resident memory (VmHWM) is its own: the
top-context search streams (a running top-k per latent), so memory stays far below the
rows x latents matrix (1M x 16,384 x 4 bytes = 65.5 GB) that holding all activations would take.
Prints one table and appends it to bench/RESULTS.md.

    python bench/analysis.py [--quick] [--no-record]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

CHILD = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
from train.analysis import AnalysisConfig, analyze
t = time.perf_counter()
rep = analyze(AnalysisConfig(run={run!r}, out={out!r}, eval_tokens={eval_tokens!r}, progress=True))
seconds = time.perf_counter() - t
try:  # VmHWM: this process image's peak RSS (ru_maxrss would include the parent's, inherited at fork)
    hwm = next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmHWM:"))
except (OSError, StopIteration):
    hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("BENCH " + json.dumps({{"seconds": seconds, "rows": rep["eval"]["rows"], "latents": rep["run_config"]["latents"],
      "l0": rep["eval"]["l0_mean"], "maxrss_kb": hwm}}))
"""


def timed_analysis(run: Path, out: Path, eval_tokens: int | None) -> dict:
    code = CHILD.format(root=str(ROOT), run=str(run), out=str(out), eval_tokens=eval_tokens)
    proc = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, check=True)
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH "))
    return json.loads(line[6:])


def demo_run() -> Path:
    import demo

    run = ROOT / "runs" / "demo-toy-code"
    if not (run / "dictionary" / "config.json").is_file():
        cache = demo.harvest_pair("toy-code", ROOT / "caches" / "toy-diff", True)
        demo.train_run(cache, run, True, 0)
    return run


def large_run(tmp: Path, eval_rows: int, latents: int) -> Path:
    from shared.cache import open_cache
    from shared.token_table import write_token_table
    from einops import rearrange

    from tests.cache_factory import make_cache
    from train.config import TrainConfig
    from train.export import load_dictionary, load_metadata, save_dictionary
    from train.loader import ActivationLoader
    from train.trainer import train

    rows_per_shard = 32_768
    eval_shards = -(-eval_rows // rows_per_shard)
    cache = tmp / "cache"
    make_cache(cache, n_shards=eval_shards + 2, rows_per_shard=rows_per_shard, n_models=2, n_hooks=1, d_model=128,
               seq_len=64, tag=False, model_names=["base", "ft"])
    table = open_cache(cache).token_table()  # add a metadata column, as a harvest of builtin:mixed has
    ids = table.column("input_ids").to_pylist()
    write_token_table(cache, ids, {"source": ["code" if i % 2 else "docs" for i in range(len(ids))]})
    run = tmp / "run"
    train(TrainConfig(cache=str(cache), out=str(run), latents=latents, steps=10, batch_size=1024, device="cpu",
                      eval_shards=eval_shards, eval_batches=1, progress=False))
    # Ten steps leave half the latents firing on every row; a trained dictionary fires a few dozen per
    # token. Set the encoder bias so each latent fires on ~L0/L of the rows (L0 = 64), as trained ones do.
    model = load_dictionary(run / "dictionary")
    x = next(iter(ActivationLoader(cache, 8192, split="train", eval_shards=eval_shards)))
    model.calibrate_encoder_bias(rearrange(x, "b m p d -> b (m p) d"), firing_rate=64 / latents)
    save_dictionary(run / "dictionary", model, load_metadata(run / "dictionary"))
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100k eval rows instead of 1M (a smoke test)")
    parser.add_argument("--latents", type=int, default=16_384)
    parser.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    args = parser.parse_args()
    eval_rows = 100_000 if args.quick else 1_000_000
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-analysis-") as tmp_s:
        tmp = Path(tmp_s)
        run = demo_run()
        d = timed_analysis(run, tmp / "demo-report", None)
        rows.append((f"demo run `{run.relative_to(ROOT)}` ({d['latents']} latents, L0 {d['l0']:.0f}), whole eval split",
                     d))
        t = time.perf_counter()
        big = large_run(tmp, eval_rows, args.latents)
        setup_s = time.perf_counter() - t
        b = timed_analysis(big, tmp / "big-report", eval_rows)
        rows.append((f"synthetic: {b['latents']:,} latents (L0 {b['l0']:.0f}), 2 models x 1 hook x d 128 (bf16 cache)",
                     b))

    dense_gb = eval_rows * args.latents * 4 / 1e9
    lines = ["| measure | value |", "|---|---|"]
    for name, r in rows:
        lines.append(f"| {name} | {r['rows']:,} rows in {r['seconds']:.1f} s ({r['rows'] / r['seconds']:,.0f} rows/s), "
                     f"peak RSS {r['maxrss_kb'] / 1024:,.0f} MiB |")
    lines.append(f"| all latent activations of the large case, if held | {dense_gb:.1f} GB (float32) |")
    lines.append(f"| large case set-up (cache + 10 training steps, not timed above) | {setup_s:.1f} s |")
    table = "\n".join(lines)
    print(table)
    if args.no_record:
        return
    stamp = dt.datetime.now().strftime("%Y-%m-%dT%H:%M")
    machine = f"{platform.platform()}, {platform.machine()}, {os.cpu_count()} CPUs"
    cmd = "python bench/analysis.py " + " ".join(sys.argv[1:])
    section = (f"\n## analysis — {stamp} — {machine}\n\n`{cmd.strip()}` (torch {torch.__version__}; each analysis "
               f"in a child process, load average at start {os.getloadavg()[0]:.1f})\n\n{table}\n")
    with open(ROOT / "bench" / "RESULTS.md", "a") as f:
        f.write(section)
    print(f"appended to {ROOT / 'bench' / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
