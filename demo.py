#!/usr/bin/env python
"""The default demo (``make demo``): model diffing end to end, with a known answer and a control.

1. the toy trio (built once into ``~/.cache/crosscache/toy-models/v1``, a few minutes on 2 cores);
2. harvest ``toy-base`` + ``toy-code`` at ``blocks.2.hook_resid_post`` on ``builtin:mixed`` (the
   ``HarvestConfig`` defaults, into ``caches/toy-diff``), and ``toy-base`` + ``toy-prose`` (the
   negative control: fine-tuned on prose only) into ``caches/toy-prose-diff``;
3. train a ReLU/L1 diffing crosscoder on each (``runs/demo-toy-code``, ``runs/demo-toy-prose``);
4. analyse each run (``RUN/analysis/report.md``); print a five-line summary and the reports' paths.

The known answer: ``toy-code`` learned Python code that ``toy-base`` never saw, so the diff's
fine-tune-only latents (relative decoder norm r >= 0.9) should carry their activation mass on
``source == code`` far more than shared latents do, while ``toy-prose`` should have no such class.
Every step resumes: re-running reuses finished caches, runs and reports.

    python demo.py [--root DIR] [--no-progress]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
for var, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(var, value)

# The demo's training settings (see README "The default demo"): a ReLU/L1 crosscoder of 512 latents,
# 600 steps of 256 tokens (under one epoch of the train split), lr 1e-3, λ = 4 (twice TrainConfig's
# default). Measured over seeds: at λ = 2, or with 3x more training, the negative control grows a
# few fine-tune-only latents of its own (toy-prose also processes code differently from the base);
# at these settings it grows 0-1 while toy-code grows 30-45, 0.9+ of their activation mass on code.
TRAIN = dict(latents=512, steps=600, batch_size=256, lr=1e-3, sparsity_coeff=4.0, activation="relu",
             eval_shards=4, checkpoint_every=200, log_every=20)
# A class of fine-tune-only latents "exists" when it has at least this many latents (a stray latent or
# two is not a class) and its share of activation mass on code beats the shared latents' by MARGIN.
MIN_CLASS = 3
MARGIN = 0.2


def _stage(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


def harvest_pair(ft: str, out: Path, progress: bool) -> Path:
    """toy-base + ``ft`` with the HarvestConfig defaults (200k tokens of builtin:mixed, blocks.2.hook_resid_post)."""
    from harvest.config import HarvestConfig
    from harvest.harvester import harvest

    harvest(HarvestConfig(models=["toy-base", ft], out=str(out), progress=progress))  # resumes; no-op when complete
    return out


def train_run(cache: Path, out: Path, progress: bool, seed: int) -> Path:
    from train.config import TrainConfig
    from train.trainer import train

    cfg = TrainConfig(cache=str(cache), out=str(out), progress=progress, seed=seed, **TRAIN)  # type: ignore[arg-type]
    saved = out / "config.json"
    if (out / "dictionary" / "config.json").is_file() and saved.is_file():
        prev = json.loads(saved.read_text())["config"]
        if all(prev.get(k) == v for k, v in cfg.resume_signature().items()):
            print(f"reusing the finished run {out}")
            return out
    train(cfg)  # resumes from the newest checkpoint; refuses a folder holding a different run
    return out


def analyze_run(run: Path, progress: bool) -> dict:
    from shared.config import config_to_json
    from train.analysis import AnalysisConfig, analyze
    from train.report import REPORT_FORMAT

    cfg = AnalysisConfig(run=str(run), progress=progress)
    report_json = run / "analysis" / "report.json"
    weights = run / "dictionary" / "model.safetensors"
    if report_json.is_file() and report_json.stat().st_mtime > weights.stat().st_mtime:
        old = json.loads(report_json.read_text())
        same = {k: v for k, v in config_to_json(cfg).items() if k != "progress"}
        if old.get("format") == REPORT_FORMAT and {k: old["analysis_config"].get(k) for k in same} == same:
            print(f"reusing the report {report_json}")
            return old
    return analyze(cfg)


def verdict(rep: dict) -> tuple[bool, dict]:
    """Whether the report shows a code-heavy class of fine-tune-only latents, and its numbers."""
    cl = rep["diffing"]["classes"]
    ft, shared, top = cl["ft_only"], cl["shared"], cl["top_r"]
    nums = {"n_ft": ft["n"], "ft_code": ft.get("focus_share"), "shared_code": shared.get("focus_share"),
            "top_code": top.get("focus_share"), "n_top": top["n"],
            "rows_code": (rep.get("focus") or {}).get("base_rate"),
            "latents": rep["run_config"]["latents"]}
    exists = (ft["n"] >= MIN_CLASS and nums["ft_code"] is not None and nums["shared_code"] is not None
              and nums["ft_code"] >= nums["shared_code"] + MARGIN)
    return exists, nums


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=".", help="folder that gets caches/ and runs/ (default: here)")
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    progress = not args.no_progress
    root = Path(args.root)
    t0 = time.perf_counter()

    from harvest.toy_models import TOY_NAMES, ensure_toy_model

    _stage("1/4 toy models (built once, reused afterwards)")
    for name in TOY_NAMES:
        print(f"{name}: {ensure_toy_model(name)}")
    _stage("2/4 harvest: toy-base + toy-code (builtin:mixed), then the control toy-base + toy-prose")
    code_cache = harvest_pair("toy-code", root / "caches" / "toy-diff", progress)
    prose_cache = harvest_pair("toy-prose", root / "caches" / "toy-prose-diff", progress)
    _stage("3/4 train ReLU/L1 diffing crosscoders")
    code_run = train_run(code_cache, root / "runs" / "demo-toy-code", progress, args.seed)
    prose_run = train_run(prose_cache, root / "runs" / "demo-toy-prose", progress, args.seed)
    _stage("4/4 analyse")
    code_rep, prose_rep = analyze_run(code_run, progress), analyze_run(prose_run, progress)

    code_ok, c = verdict(code_rep)
    prose_has, p = verdict(prose_rep)
    passed = code_ok and not prose_has
    minutes = (time.perf_counter() - t0) / 60
    thr = code_rep["diffing"]["thresholds"]
    print()
    print(f"demo: diffing crosscoders ({c['latents']} latents, ReLU/L1) on toy-base vs toy-code and vs toy-prose, "
          f"{minutes:.1f} min; share of eval rows that are code: {_f(c['rows_code'])}")
    print(f"toy-code : {c['n_ft']} fine-tune-only latents (r >= {thr['ft_only_min']}), {_f(c['ft_code'])} of their "
          f"activation mass on code vs {_f(c['shared_code'])} for shared latents -> "
          + ("a code-heavy class (expected)" if code_ok else "NO code-heavy class (unexpected)"))
    print(f"toy-prose: {p['n_ft']} fine-tune-only latent{'s' if p['n_ft'] != 1 else ''}, code share "
          f"{_f(p['ft_code'])} vs shared {_f(p['shared_code'])} -> "
          + ("no such class (expected)" if not prose_has else "a class (unexpected)"))
    print(f"top {thr['top_r_percent']:g}% by r ({c['n_top']} latents): {_f(c['top_code'])} on code for toy-code, "
          f"{_f(p['top_code'])} for toy-prose -> " + ("PASS: the diff found code" if passed else "FAIL"))
    ls = code_rep["diffing"].get("latent_scaling", {}).get("groups", {})
    ft_ls, sh_ls = ls.get("ft_only", {}), ls.get("shared", {})
    print(f"latent scaling, toy-code: median nu_eps {_f(ft_ls.get('median_nu_err'))} / nu_r "
          f"{_f(ft_ls.get('median_nu_rec'))} for fine-tune-only latents vs {_f(sh_ls.get('median_nu_err'))} / "
          f"{_f(sh_ls.get('median_nu_rec'))} for shared (0: absent from toy-base, 1: as strong as in toy-code)")
    print(f"report: {code_run / 'analysis' / 'report.md'} (control: {prose_run / 'analysis' / 'report.md'})")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
