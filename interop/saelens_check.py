#!/usr/bin/env python3
"""Interop check: does `run_train.py export-saelens` output run in SAELens itself, on the model SAELens loads?

Run it with ``make interop-saelens`` (README, "Export to SAELens"), which makes the sae-lens venv and runs the
``all`` role. One file, three roles (as ``circuit_tracer_check.py``, whose comparison helpers it shares):

- ``python3 saelens_check.py all [options]`` (any Python): builds a toy cache and one run per case if asked,
  exports each with export-saelens, runs the two roles below in their own venvs, exits non-zero on any
  disagreement.
- ``<project venv>/bin/python saelens_check.py ours ...`` (cwd = the crosscache checkout): one prompt through
  the harvested model (transformer-lens 4's TransformerBridge, as the harvest runs it), and what SAELens must
  then see and compute, from our side alone: its input at the SAELens hook, the latents (ours x the TopK score
  factor SAELens's weights carry) and its output (for an SAE on a norm's output: our reconstruction mapped
  back through the norm's own weight and bias, read from the model's parameters, not from the export's fit).
- ``<sae-lens venv>/bin/python saelens_check.py sl ...``: ``SAE.load_from_disk`` each export, loads the model
  the way SAELens says to (``HookedSAETransformer.from_pretrained_no_processing(model,
  **metadata.model_from_pretrained_kwargs)``, offline, from the local folder), and compares: the hook's
  activations, ``encode`` / ``forward`` on them, and the latents and reconstruction once attached with
  ``add_sae`` (a transcoder's at its output hook; SAELens's splice leaves a skip transcoder's W_skip out).

Exit codes: 0 all agree; 1 a number disagrees (printed as FAIL); 2 a step could not run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]  # the crosscache checkout
sys.path.insert(0, str(HERE.parent))
from circuit_tracer_check import (Report, _dist_version, _local_model_name, _sh, _tl_model_folder,  # noqa: E402
                                  _with_side)

TOL_MODEL = 1e-5  # HookedTransformer (2.x/3.x) vs our TransformerBridge, same weights and tokens, float32
TOL_SAE = 1e-4  # latents/outputs of the same weights through another float path (folds done in float64)
LAYER = 1
L = f"blocks.{LAYER}."
# case -> (train flags, our input hook, our output hook or None for an SAE); the toy model runs attention and
# MLP in parallel (GPT-NeoX), so HookedTransformer has no hook_resid_mid / hook_mlp_in there.
CASES: dict[str, tuple[list[str], str, str | None]] = {
    "sae_relu_resid": (["--activation", "relu"], L + "hook_resid_post", None),
    "sae_jumprelu_resid": (["--activation", "jumprelu"], L + "hook_resid_post", None),
    "sae_topk_resid": (["--activation", "topk", "--k", "8"], L + "hook_resid_post", None),
    "sae_batchtopk_resid": (["--activation", "batchtopk", "--k", "8"], L + "hook_resid_post", None),
    "sae_relu_hook_z": (["--activation", "relu"], L + "attn.hook_z", None),
    "sae_relu_hook_mlp_in": (["--activation", "relu"], L + "hook_mlp_in", None),  # -> hook_resid_mid / _pre
    "sae_jumprelu_ln2_out": (["--activation", "jumprelu"], L + "ln2.hook_out", None),  # -> mlp.hook_in
    "sae_jumprelu_ln1_out": (["--activation", "jumprelu"], L + "ln1.hook_out", None),  # -> folded, hook_normalized
    "sae_relu_ln2_normalized": (["--activation", "relu"], L + "ln2.hook_normalized", None),
    "tc_relu_skip_ln2_out": (["--activation", "relu", "--skip"], L + "ln2.hook_out", L + "hook_mlp_out"),
    "tc_batchtopk_skip_ln2_out": (["--activation", "batchtopk", "--k", "8", "--skip"], L + "ln2.hook_out",
                                  L + "hook_mlp_out"),
    "tc_jumprelu_mlp_in": (["--activation", "jumprelu"], L + "mlp.hook_in", L + "hook_mlp_out"),
    "tc_relu_skip_ln1_out": (["--activation", "relu", "--skip"], L + "ln1.hook_out", L + "hook_attn_out"),
}
HOOKS = sorted({h for _, i, o in CASES.values() for h in (i, o) if h})


# ======================================================================================================
# role "ours": crosscache's own API (project venv, cwd = checkout)
# ======================================================================================================
def role_ours(argv: list[str]) -> int:
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(Path.cwd()))
    from harvest.corpora import builtin_documents
    from harvest.models import _capture, load_models
    from train.export import load_dictionary
    from train.export_saelens import latent_scale
    from train.norm_affine import normalized_hook

    ap = argparse.ArgumentParser(prog="saelens_check.py ours")
    ap.add_argument("--work", required=True, help="folder with runs/CASE and export_CASE")
    ap.add_argument("--model", default="toy-base")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    work = Path(args.work)
    cases = [c for c in CASES if (work / f"export_{c}" / "cfg.json").is_file()]
    sl_hooks = {c: json.loads((work / f"export_{c}" / "cfg.json").read_text())["metadata"]["hook_name"] for c in cases}
    lm = load_models([args.model], HOOKS + sorted(set(sl_hooks.values())), context_size=128,
                     device=torch.device("cpu"), model_dtype=torch.float32, progress=False)
    bridge = lm.bridges[0]
    text = builtin_documents("docs", "eval")[0]["text"]
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"][: args.tokens - 1]
    tokens = torch.tensor([lm.bos_id] + list(ids), dtype=torch.long)
    cap = {h: v[0].float() for h, v in _capture(bridge, HOOKS + list(sl_hooks.values()), tokens[None], None).items()}
    flat = {h: v.flatten(-2, -1) if v.dim() == 3 else v for h, v in cap.items()}  # hook_z: heads head-major

    out: dict[str, torch.Tensor] = {"tokens": tokens}
    for c in cases:
        _, hook_in, hook_out = CASES[c]
        model = load_dictionary(work / "runs" / c / "export")
        res = model(flat[hook_in][:, None], inference=True)
        recon = res.recon_BXoD[:, 0]
        expected_out = recon
        if hook_out is None and sl_hooks[c] == normalized_hook(hook_in):  # SAELens rebuilds the normalized input
            norm = bridge.get_submodule(normalized_hook(hook_in).rsplit(".", 1)[0]).original_component
            w = norm.weight.float() + (1.0 if "Gemma" in type(norm).__name__ else 0.0)  # Gemma scales by 1 + w
            b = norm.bias.float() if getattr(norm, "bias", None) is not None else torch.zeros_like(w)
            expected_out = (recon - b) / w
        out[f"{c}/x_sl"] = flat[sl_hooks[c]]
        out[f"{c}/latents_sl"] = res.latents_BL * latent_scale(model).float()
        out[f"{c}/out_sl"] = expected_out
        l0 = float((res.latents_BL[1:] > 0).float().sum(-1).mean())
        print(f"[ours] {c}: {hook_in} -> {hook_out or hook_in} (SAELens hook {sl_hooks[c]}), L0 {l0:.1f}")
    save_file({k: v.clone().contiguous() for k, v in out.items()}, args.out,  # clones: rows shared by cases
              metadata={"model": args.model, "cases": json.dumps(cases)})
    return 0


# ======================================================================================================
# role "sl": SAELens (its own venv)
# ======================================================================================================
def _load_model(folder: Path, kwargs: dict):
    """SAELens's way, ``HookedSAETransformer.from_pretrained_no_processing(name, **kwargs)``, on a local folder
    (:func:`circuit_tracer_check._local_model_name`; the weights come from ``hf_model``, converted by
    transformer-lens itself)."""
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sae_lens import HookedSAETransformer

    # transformer-lens guesses the architecture from names holding "llama" or "gemma" without reading the
    # folder's config: give it a path without them (a link in a fresh temporary folder).
    link = Path(tempfile.mkdtemp(prefix="sl-check-")) / "model"
    link.symlink_to(folder.resolve(), target_is_directory=True)
    name = str(link)
    with _local_model_name(name):
        hf = AutoModelForCausalLM.from_pretrained(name, torch_dtype=torch.float32)
        return HookedSAETransformer.from_pretrained_no_processing(
            name, hf_model=hf, tokenizer=AutoTokenizer.from_pretrained(name), device="cpu", **kwargs)


def role_sl(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="saelens_check.py sl")
    ap.add_argument("--work", required=True)
    ap.add_argument("--ref", required=True, help="safetensors file `saelens_check.py ours` wrote")
    ap.add_argument("--model-path", required=True, help="the harvested model's folder")
    ap.add_argument("--json", help="write the numbers here")
    args = ap.parse_args(argv)
    import warnings

    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    import sae_lens
    import transformer_lens
    import transformers
    from sae_lens import SAE

    warnings.filterwarnings("ignore", message=".*model_from_pretrained_kwargs.*")  # what we do anyway
    torch.set_grad_enabled(False)
    work = Path(args.work)
    versions = {"sae_lens": sae_lens.__version__, "torch": torch.__version__,
                "transformer_lens": getattr(transformer_lens, "__version__", None) or _dist_version("transformer-lens")}
    print(f"[sl] {versions}")
    ref = load_file(args.ref)
    with safe_open(args.ref, "pt") as f:
        cases = json.loads(f.metadata()["cases"])
    tokens = ref["tokens"]
    # One folder per transformers major: a tokenizer re-saved by transformers 5 does not load in 4.
    folder = _tl_model_folder(args.model_path, work / f"transformers{transformers.__version__.split('.')[0]}")
    models: dict[str, object] = {}
    rep = Report()
    for c in cases:
        export = work / f"export_{c}"
        sae = SAE.load_from_disk(str(export), device="cpu")
        meta = sae.cfg.metadata
        kwargs = dict(meta.model_from_pretrained_kwargs or {})
        key = json.dumps(kwargs, sort_keys=True)
        if key not in models:
            models[key] = _load_model(folder, kwargs)
        model = models[key]
        hook = meta.hook_name
        print(f"{c}: {type(sae).__name__} at {hook} (model kwargs {kwargs})")
        model.reset_saes()
        _, cache = model.run_with_cache(tokens[None], names_filter=[hook])
        x = cache[hook][0]  # as the hook holds it: hook_z [P, heads, d_head], which SAELens flattens itself

        def flat(t):
            return t.flatten(-2, -1) if t.dim() == 3 else t
        rep.compare(f"{c}: model {hook} vs our bridge", flat(x), ref[f"{c}/x_sl"], TOL_MODEL)
        lat = sae.encode(x)
        rep.compare(f"{c}: sae.encode vs ours", lat, ref[f"{c}/latents_sl"], TOL_SAE)
        flips = int(((lat > 0) != (ref[f"{c}/latents_sl"] > 0)).sum())
        if flips:
            rep.fails.append(f"{c}: {flips} latents active on one side only")
        rep.compare(f"{c}: sae(x) vs ours", flat(sae(x)), ref[f"{c}/out_sl"], TOL_SAE)
        # Attached: an SAE at its hook; a transcoder reads its input hook and writes its output hook.
        site = getattr(meta, "hook_name_out", None) or hook
        model.add_sae(sae)
        _, cache = model.run_with_cache(tokens[None], names_filter=lambda n: n.startswith(site + ".hook_sae"))
        spliced = {k: v[0] for k, v in cache.items()}
        got = spliced.get(f"{site}.hook_sae_acts_post")
        if got is None:
            rep.fails.append(f"{c}: attached, no {site}.hook_sae_acts_post among {sorted(spliced)}")
        else:
            rep.compare(f"{c}: attached latents vs ours", got, ref[f"{c}/latents_sl"], TOL_SAE)
            recons = spliced.get(f"{site}.hook_sae_recons")
            if recons is not None:
                want = ref[f"{c}/out_sl"]
                label = "attached reconstruction vs ours"
                if "W_skip" in dict(sae.named_parameters()):  # add_sae splices decode(encode(x)): no skip path
                    want = want - flat(x) @ sae.W_skip.detach().T
                    label += " minus the skip (SAELens's add_sae leaves W_skip out)"
                rep.compare(f"{c}: {label}", flat(recons), want, TOL_SAE)
        model.reset_saes()
    if args.json:
        Path(args.json).write_text(json.dumps({"versions": versions, "rows": rep.rows, "fails": rep.fails},
                                              indent=1, default=str))
    if rep.fails:
        print("[sl] FAILED:\n  " + "\n  ".join(rep.fails))
        return 1
    print(f"[sl] all {len(cases)} exports agree")
    return 0


# ======================================================================================================
# role "all": orchestration
# ======================================================================================================
def role_all(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="saelens_check.py all")
    ap.add_argument("--project", default=str(ROOT), help="crosscache checkout")
    ap.add_argument("--project-python", help="default: PROJECT/.venv/bin/python")
    ap.add_argument("--sl-python", default=str(ROOT / ".venv-saelens" / "bin" / "python"),
                    help="python of a venv with sae-lens (several: comma-separated)")
    ap.add_argument("--work", help="default: PROJECT/runs/interop-saelens[-ARCH]")
    ap.add_argument("--build", action="store_true", help="harvest and train the runs into WORK (else reuse them)")
    ap.add_argument("--model", default="toy-base")
    ap.add_argument("--arch", help="instead of --model: a tiny random-weight model of this architecture (tests/"
                    "arch_models.py; checked: llama, qwen2; norms with random weights), "
                    "built into WORK with --build")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of: " + ", ".join(CASES))
    args = ap.parse_args(argv)
    proj = Path(args.project).resolve()
    py = args.project_python or str(proj / ".venv" / "bin" / "python")
    work = Path(args.work or proj / "runs" / ("interop-saelens" + (f"-{args.arch}" if args.arch else ""))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.arch:
        folder = work / f"model-{args.arch}"
        if args.build and not (folder / "config.json").is_file():
            build = ("import sys; sys.path.insert(0, 'tests'); from pathlib import Path; "
                     "from arch_models import build_arch_model; from harvest.toy_models import ensure_toy_model; "
                     f"build_arch_model({args.arch!r}, Path({str(folder)!r}), ensure_toy_model('toy-base'))")
            if _sh([py, "-c", build], cwd=proj):
                print(f"could not build a {args.arch} model")
                return 2
        args.model = str(folder)
    cases = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        print(f"unknown cases {unknown}; known: {', '.join(CASES)}")
        return 2
    cache = work / "cache"
    if args.build:
        if not (cache / "manifest.json").is_file():
            # float32 rows: the check compares to ~1e-5, which bf16 storage would not meet on the folded norms
            rc = _sh([py, "run_harvest.py", "--models", args.model, "--hooks", *HOOKS, "--dataset", "builtin:mixed",
                      "--tokens", "60000", "--dtype", "float32", "--out", str(cache), "--device", "cpu",
                      "--no-progress"], cwd=proj, log=work / "harvest.log")
            if rc:
                print(f"harvest failed ({work / 'harvest.log'})")
                return 2
        for c in cases:
            flags, hook_in, hook_out = CASES[c]
            run = work / "runs" / c
            if (run / "export").is_dir():
                continue
            slots = (["--arch", "directional", "--in-hooks", hook_in, "--out-hooks", hook_out] if hook_out
                     else ["--hooks", hook_in])
            rc = _sh([py, "run_train.py", "--cache", str(cache), "--models", args.model, *slots, *flags,
                      "--latents", "256", "--batch-size", "512", "--lr", "1e-3", "--steps", str(args.steps),
                      "--device", "cpu", "--no-progress", "--out", str(run)], cwd=proj, log=work / "runs" / f"{c}.log")
            if rc:
                print(f"training failed ({work / 'runs' / f'{c}.log'})")
                return 2
    for c in cases:
        exp = work / f"export_{c}"
        if exp.exists():
            shutil.rmtree(exp)
        if _sh([py, "run_train.py", "export-saelens", str(work / "runs" / c), "--out", str(exp)], cwd=proj):
            print(f"export of {c} failed")
            return 2
    ref = work / "ref.safetensors"
    if _sh([py, str(HERE), "ours", "--work", str(work), "--model", args.model, "--out", str(ref)], cwd=proj):
        return 2
    model_path = json.loads((cache / "manifest.json").read_text())["models"][0]["path"]
    status = 0
    for sl_py in args.sl_python.split(","):
        tag = Path(sl_py).parent.parent.name
        rc = _sh([sl_py, str(HERE), "sl", "--work", str(work), "--ref", str(ref),
                  "--model-path", os.path.expanduser(model_path), "--json", str(work / f"result_{tag}.json")])
        status = _with_side(status, rc, f"SAELens side ({sl_py})")
    print("ALL AGREE" if status == 0 else f"DISAGREEMENT (exit {status})")
    return status


if __name__ == "__main__":
    role, rest = ((sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 and sys.argv[1] in ("all", "ours", "sl")
                  else ("all", sys.argv[1:]))
    sys.exit({"all": role_all, "ours": role_ours, "sl": role_sl}[role](rest))
