#!/usr/bin/env python3
"""Interop check: does `run_train.py export-circuit-tracer` output work in circuit-tracer, numerically?

Run it with ``make interop`` (README, "Export to circuit-tracer"), which makes the circuit-tracer venv and
runs the ``all`` role. One file, three roles:

- ``python3 circuit_tracer_check.py all [options]`` (any Python): builds the runs if asked, exports them,
  runs the two roles below in their own venvs, exits non-zero on any disagreement.
- ``<project venv>/bin/python circuit_tracer_check.py ours ...`` (cwd = the crosscache checkout): the
  harvested model's raw MLP inputs/outputs on one prompt (transformer-lens 4 TransformerBridge, as the
  harvest runs it), and the dictionary's latents/reconstructions: from RUN/export (raw space) and,
  independent of the export code, from RUN/dictionary (normalized space) on inputs normalized with the
  cache's own factors.
- ``<circuit-tracer venv>/bin/python circuit_tracer_check.py ct ...``: loads the export with circuit-tracer's
  own loaders, compares its features/reconstructions with ours on the same activations, builds
  circuit-tracer's ReplacementModel around the same model (offline) and compares its hooks, features and
  error vectors, then runs attribute() and compute_graph_scores().

Exit codes: 0 all agree; 1 a number disagrees (printed as FAIL); 2 a step could not run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]  # the crosscache checkout

# Tolerances (float32 throughout; our export is written float32).
TOL_REL = 1e-5  # relative Frobenius error of latents/recons computed from the same weights
TOL_REL_NORM = 1e-4  # vs the normalized-space dictionary (a different float path: fold in float64, cast)
TOL_REL_MODEL = 1e-5  # circuit-tracer's HookedTransformer vs our TransformerBridge, same tokens
TOL_MARGIN = 1e-4  # a latent whose pre-activation is this close to its threshold may flip on rounding


# ======================================================================================================
# role "ours": crosscache's own API (project venv, cwd = checkout)
# ======================================================================================================
def _run_dirs(spec: list[str]) -> list[Path]:
    out: list[Path] = []
    for s in spec:
        p = Path(s)
        if (p / "export").is_dir():
            out.append(p)
        else:
            out += sorted((q for q in p.iterdir() if (q / "export").is_dir()),
                          key=lambda q: int("".join(c for c in q.name if c.isdigit()) or 0))
    return out


def role_ours(argv: list[str]) -> int:
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(Path.cwd()))
    from harvest.corpora import builtin_documents
    from harvest.models import _capture, load_models
    from shared.cache import open_cache
    from train.export import SlotNorm, load_dictionary

    ap = argparse.ArgumentParser(prog="circuit_tracer_check.py ours")
    ap.add_argument("--runs", nargs="+", required=True, help="a CLT run, or per-layer runs / their parent folder")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--doc", type=int, default=0, help="index of the built-in docs eval document (prose)")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)

    runs = _run_dirs(args.runs)
    exports = [load_dictionary(r / "export") for r in runs]
    normed = [load_dictionary(r / "dictionary") for r in runs]
    for r in runs:
        space = json.loads((r / "dictionary" / "config.json").read_text())["metadata"].get("space")
        assert space == "normalized", f"{r}/dictionary is in space {space!r}, expected normalized"
        space = json.loads((r / "export" / "config.json").read_text())["metadata"].get("space")
        assert space == "raw", f"{r}/export is in space {space!r}, expected raw"

    def slot(cfg, i):  # 'model/blocks.L.hook' -> (model, hook)
        return cfg.slot_names[i].split("/", 1)

    cfg0 = exports[0].cfg
    model = slot(cfg0, cfg0.in_slots[0])[0]
    run_cfg = json.loads((runs[0] / "config.json").read_text())
    n_layers = next(m["n_layers"] for m in run_cfg["cache"]["models"] if m["name"] == model)
    model_path = next(m["path"] for m in run_cfg["cache"]["models"] if m["name"] == model)
    if cfg0.arch == "clt":
        assert len(runs) == 1
        in_hooks = [slot(cfg0, i)[1] for i in cfg0.in_slots]
        out_hooks = [slot(cfg0, i)[1] for i in cfg0.out_slots]
    else:
        assert len(runs) == n_layers, f"need one run per layer ({n_layers}), got {len(runs)}"
        in_hooks = [slot(d.cfg, d.cfg.in_slots[0])[1] for d in exports]
        out_hooks = [slot(d.cfg, d.cfg.out_slots[0])[1] for d in exports]
    lm = load_models([model], in_hooks + out_hooks, context_size=128, device=torch.device("cpu"),
                     model_dtype=torch.float32, progress=False)
    assert lm.bos_id is not None
    text = builtin_documents("docs", "eval")[args.doc]["text"]
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"][: args.tokens - 1]
    tokens = torch.tensor([lm.bos_id] + list(ids), dtype=torch.long)
    cap = _capture(lm.bridges[0], in_hooks + out_hooks, tokens[None], None)
    x_in = torch.stack([cap[h][0].float() for h in in_hooks])  # [n, P, D] raw MLP inputs
    mlp_out = torch.stack([cap[h][0].float() for h in out_hooks])  # [n, P, D] raw MLP outputs

    def norms(run: Path, cfg):
        """The cache's normalization of the dictionary's in/out slots, looked up by slot NAME ('model/hook') in
        the cache manifest (a dictionary's slot indices count only the hooks its run selected)."""
        cache = open_cache(Path(json.loads((run / "config.json").read_text())["cache"]["path"]).expanduser())
        nm, man = cache.normalization(), cache.manifest

        def one(i: int) -> SlotNorm:
            model_name, hook = cfg.slot_names[i].split("/", 1)
            sel = nm.select([man.model_names.index(model_name)], [man.hooks.index(hook)])
            return SlotNorm.from_normalization(sel, [0], cfg.d_model)

        def stack(slots):
            parts = [one(i) for i in slots]
            return SlotNorm(torch.cat([p.scale_XD for p in parts]), torch.cat([p.shift_XD for p in parts]))
        return stack(cfg.in_slots), stack(cfg.out_slots)

    if cfg0.arch == "clt":
        ex, nd, F = exports[0], normed[0], cfg0.latents_per_layer
        x = x_in.transpose(0, 1)  # [P, n, D]
        lat = ex.encode(x)
        pre = ex.pre_activations(x)
        rec = ex.decode(lat, x)
        sin, sout = norms(runs[0], cfg0)
        xn = x * sin.scale_XD + sin.shift_XD
        lat_n = nd.encode(xn)
        rec_n = (nd.decode(lat_n, xn) - sout.shift_XD) / sout.scale_XD
        per_layer = lambda t: t.reshape(t.shape[0], n_layers, F).transpose(0, 1)  # noqa: E731
        latents, pre_acts, latents_norm = per_layer(lat), per_layer(pre), per_layer(lat_n)
        recon, recon_norm = rec.transpose(0, 1), rec_n.transpose(0, 1)
    else:
        L, PR, R, LN, RN = [], [], [], [], []
        for r, ex, nd, xl in zip(runs, exports, normed, x_in):
            x = xl[:, None]
            lat = ex.encode(x)
            L.append(lat)
            PR.append(ex.pre_activations(x))
            R.append(ex.decode(lat, x)[:, 0])
            sin, sout = norms(r, ex.cfg)
            xn = x * sin.scale_XD + sin.shift_XD
            lat_n = nd.encode(xn)
            LN.append(lat_n)
            RN.append(((nd.decode(lat_n, xn) - sout.shift_XD) / sout.scale_XD)[:, 0])
        latents, pre_acts, recon, latents_norm, recon_norm = map(torch.stack, (L, PR, R, LN, RN))

    out = {"tokens": tokens, "x_in": x_in, "mlp_out": mlp_out, "latents": latents, "pre_acts": pre_acts,
           "recon": recon, "latents_norm": latents_norm, "recon_norm": recon_norm}
    meta = {"model": model, "model_path": model_path, "runs": json.dumps([str(r) for r in runs]),
            "arch": cfg0.arch, "activation": cfg0.activation, "in_hooks": json.dumps(in_hooks),
            "out_hooks": json.dumps(out_hooks)}
    save_file({k: v.contiguous() for k, v in out.items()}, args.out, metadata=meta)
    l0 = (latents[:, 1:] > 0).float().sum(-1).mean(-1)
    print(f"[ours] {args.out}: {cfg0.arch}/{cfg0.activation}, {len(tokens)} tokens, latents {tuple(latents.shape)}, "
          f"L0 per layer (pos>0) {[round(v, 2) for v in l0.tolist()]}")
    return 0


# ======================================================================================================
# role "ct": circuit-tracer (its own venv)
# ======================================================================================================
class Report:
    def __init__(self) -> None:
        self.fails: list[str] = []
        self.rows: dict[str, dict] = {}

    def compare(self, name: str, got, want, tol: float, *, mask=None, atol: float = 0.0) -> None:
        """OK when the relative Frobenius error is <= tol, or every element is within atol (float32 noise on
        quantities that are small next to what they are computed from, e.g. logit differences)."""
        import torch
        got, want = got.double(), want.double()
        if got.shape != want.shape:
            self.rows[name] = {"shape_got": list(got.shape), "shape_want": list(want.shape)}
            self.fails.append(f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}")
            print(f"  FAIL {name}: shape {tuple(got.shape)} != {tuple(want.shape)}")
            return
        d = (got - want) if mask is None else (got - want) * mask
        w = want if mask is None else want * mask
        max_abs = d.abs().max().item() if d.numel() else 0.0
        rel = (d.norm() / w.norm().clamp_min(1e-30)).item()
        self.rows[name] = {"max_abs_diff": max_abs, "rel_err": rel, "max_abs_ref": w.abs().max().item(), "tol": tol,
                           "atol": atol}
        ok = (rel <= tol or max_abs <= atol) and bool(torch.isfinite(got).all())
        if not ok:
            self.fails.append(f"{name}: rel err {rel:.3g} > {tol:g} (max abs diff {max_abs:.3g})")
        print(f"  {'ok  ' if ok else 'FAIL'} {name}: max|diff| {max_abs:.3g} (max|ref| {self.rows[name]['max_abs_ref']:.3g}), "
              f"rel err {rel:.3g} (tol {tol:g}" + (f" or atol {atol:g})" if atol else ")"))

    def active_sets(self, name: str, got, want, pre, thr) -> None:
        """Latents active in one and not the other, outside the rounding margin around the threshold."""
        flip = (got > 0) != (want > 0)
        near = (pre - thr).abs() <= TOL_MARGIN * (1 + thr.abs())
        bad = int((flip & ~near).sum())
        self.rows[name] = {"active_got": int((got > 0).sum()), "active_want": int((want > 0).sum()),
                           "flips": int(flip.sum()), "flips_outside_margin": bad}
        if bad:
            self.fails.append(f"{name}: {bad} latents active on one side only")
        print(f"  {'ok  ' if not bad else 'FAIL'} {name}: active {self.rows[name]['active_got']} vs "
              f"{self.rows[name]['active_want']}, flips {int(flip.sum())} ({bad} outside the rounding margin)")


def _tl_model_folder(model_path: str, work: Path) -> Path:
    """A folder transformers 4.x (circuit-tracer pins <= 4.57.3) loads: the model's config and weights linked,
    its tokenizer re-saved (a folder written by transformers 5 names tokenizer_class TokenizersBackend, which
    transformers 4 cannot import)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    src = Path(model_path).expanduser()
    dst = work / f"{src.name}-tf4"
    if (dst / "tokenizer_config.json").is_file():
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    for f in ("config.json", "model.safetensors", "generation_config.json"):
        if (src / f).is_file() and not (dst / f).exists():
            os.symlink(src / f, dst / f)
    try:
        AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(dst))
    except (ValueError, OSError):
        tc = json.loads((src / "tokenizer_config.json").read_text())
        special = {k: tc[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if isinstance(tc.get(k), str)}
        PreTrainedTokenizerFast(tokenizer_file=str(src / "tokenizer.json"), **special).save_pretrained(str(dst))
    return dst


@contextlib.contextmanager
def _local_model_name(name: str):
    """Let transformer-lens's HookedTransformer.from_pretrained take the local folder ``name``: it only takes names
    it knows (get_official_model_name raises for others, even though get_pretrained_model_config and the weight
    conversion accept a local folder), so that one lookup is let through for this folder while inside."""
    import transformer_lens.loading_from_pretrained as loading

    orig = loading.get_official_model_name
    loading.get_official_model_name = lambda n: n if n == name else orig(n)
    try:
        yield
    finally:
        loading.get_official_model_name = orig


def _build_replacement_model(folder: Path, export: Path, device):
    """circuit-tracer's own entry point, ReplacementModel.from_pretrained(model, <absolute export path>) (which
    loads the transcoders with load_transcoder_from_hub, lazy decoder, then calls from_pretrained_and_transcoders),
    on a local model folder, offline (:func:`_local_model_name`); the weights come from hf_model
    (GPTNeoXForCausalLM etc. loaded from the folder), converted by transformer-lens itself."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from circuit_tracer import ReplacementModel

    name = str(folder)
    with _local_model_name(name):
        hf = AutoModelForCausalLM.from_pretrained(name, torch_dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(name)
        return ReplacementModel.from_pretrained(
            name, str(export), backend="transformerlens", device=device, dtype=torch.float32,
            hf_model=hf, tokenizer=tok)


def role_ct(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="circuit_tracer_check.py ct")
    ap.add_argument("--export", required=True, help="folder export-circuit-tracer wrote")
    ap.add_argument("--ref", required=True, help="safetensors file `circuit_tracer_check.py ours` wrote")
    ap.add_argument("--work", default=str(ROOT / "runs" / "interop-circuit-tracer"))
    ap.add_argument("--attr-tokens", type=int, default=12, help="prompt length (BOS included) for attribute()")
    ap.add_argument("--edge-samples", type=int, default=20, help="features doubled in the edge check")
    ap.add_argument("--json", help="write the numbers here")
    args = ap.parse_args(argv)
    import torch
    import yaml
    from safetensors.torch import load_file
    from safetensors import safe_open

    import circuit_tracer
    from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder, load_clt
    from circuit_tracer.transcoder.single_layer_transcoder import TranscoderSet, load_transcoder_set
    from circuit_tracer.utils.hf_utils import load_transcoder_from_hub

    torch.manual_seed(0)
    dev = torch.device("cpu")
    export = Path(args.export).resolve()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rep = Report()
    import transformer_lens
    import transformers
    versions = {"circuit_tracer": getattr(circuit_tracer, "__version__", "?"), "torch": torch.__version__,
                "transformer_lens": getattr(transformer_lens, "__version__", None) or _dist_version("transformer-lens"),
                "transformers": transformers.__version__}
    print(f"[ct] {export} vs {args.ref}; {versions}")

    ref = load_file(args.ref)
    with safe_open(args.ref, "pt") as f:
        meta = f.metadata()
    cfg = yaml.safe_load((export / "config.yaml").read_text())
    kind, ct_in, ct_out = cfg["model_kind"], cfg["feature_input_hook"], cfg["feature_output_hook"]
    x_in, mlp_out, tokens = ref["x_in"], ref["mlp_out"], ref["tokens"]
    n, P, D = x_in.shape

    # ---- 1. circuit-tracer's loaders -------------------------------------------------------------
    print("1. loaders")
    via_path, _ = load_transcoder_from_hub(str(export), device=dev, dtype=torch.float32, lazy_decoder=False)
    if kind == "cross_layer_transcoder":
        tc = load_clt(str(export), feature_input_hook=ct_in, feature_output_hook=ct_out, scan=cfg["scan"],
                      device=dev, dtype=torch.float32, lazy_decoder=False, lazy_encoder=False)
        tc_lazy = load_clt(str(export), feature_input_hook=ct_in, feature_output_hook=ct_out, scan=cfg["scan"],
                           device=dev, dtype=torch.float32, lazy_decoder=True, lazy_encoder=True)
        assert isinstance(tc, CrossLayerTranscoder)
    else:
        paths = {int(p.stem.split("_")[1]): str(p) for p in export.glob("layer_*.safetensors")}
        tc = load_transcoder_set(paths, scan=cfg["scan"], feature_input_hook=ct_in, feature_output_hook=ct_out,
                                 device=dev, dtype=torch.float32, lazy_encoder=False, lazy_decoder=False)
        tc_lazy = load_transcoder_set(paths, scan=cfg["scan"], feature_input_hook=ct_in, feature_output_hook=ct_out,
                                      device=dev, dtype=torch.float32, lazy_encoder=True, lazy_decoder=True)
        assert isinstance(tc, TranscoderSet)
    act_fns = [tc.activation_function] if kind == "cross_layer_transcoder" else [t.activation_function for t in tc]
    act = act_fns[0]
    info = {"kind": kind, "n_layers": tc.n_layers, "d_transcoder": tc.d_transcoder, "skip": bool(tc.skip_connection),
            "activation": getattr(act, "__name__", type(act).__name__), "input_hook": tc.feature_input_hook,
            "output_hook": tc.feature_output_hook, "scan": tc.scan}
    print(f"  {info}")
    if tc.n_layers != n:
        rep.fails.append(f"circuit-tracer sees {tc.n_layers} layers, ours {n}")
    want_act = {"relu": "relu", "jumprelu": "JumpReLU", "batchtopk": "JumpReLU"}[meta["activation"]]
    got_acts = {getattr(a, "__name__", type(a).__name__) for a in act_fns}
    if got_acts != {want_act}:
        rep.fails.append(f"activation {sorted(got_acts)} != {want_act}")

    # ---- 2. features and reconstructions on OUR activations ------------------------------------
    print("2. circuit-tracer's transcoders on our raw MLP inputs")
    lat_e = None  # the eager loader's latents, which the other loaders must equal
    with torch.no_grad():
        for label, t in (("eager", tc), ("lazy", tc_lazy), ("abs-path loader", via_path)):
            if kind == "cross_layer_transcoder":
                lat = t.encode(x_in)
                pre = torch.stack([t.encode_layer(x_in[l], l, apply_activation_function=False) for l in range(n)])
                rec = t.decode(lat.to_sparse(), x_in)
                if rec.shape[1] < P:
                    # circuit-tracer 0.5.0's CLT compute_reconstruction sizes its output by the last position
                    # with an active feature: trailing featureless positions are dropped (their recon is b_dec)
                    rep.rows.setdefault("notes", []).append(
                        f"circuit-tracer CLT decode dropped {P - rec.shape[1]} trailing featureless positions")
                    rec = torch.cat([rec, tc.b_dec[:, None].expand(n, P - rec.shape[1], D)], 1)
            else:
                lat = t.encode(x_in)
                pre = torch.stack([t.encode_layer(x_in[l], l, apply_activation_function=False) for l in range(n)])
                rec = t.decode(lat, x_in)
            if label != "eager":
                rep.compare(f"latents[{label}] vs eager", lat, lat_e, 0.0)
                continue
            lat_e = lat
            thr = _thresholds(tc, kind, n)
            rep.compare("pre-activations vs ours", pre, ref["pre_acts"], TOL_REL)
            rep.compare("latents vs ours (RUN/export)", lat, ref["latents"], TOL_REL)
            rep.active_sets("active set vs ours", lat, ref["latents"], pre, thr)
            rep.compare("reconstruction vs ours (RUN/export)", rec, ref["recon"], TOL_REL)
            rep.compare("latents vs normalized dictionary on cache-normalized inputs", lat, ref["latents_norm"],
                        TOL_REL_NORM)
            rep.compare("reconstruction vs normalized dictionary, un-normalized", rec, ref["recon_norm"], TOL_REL_NORM)
            ev = 1 - ((mlp_out[:, 1:] - rec[:, 1:]) ** 2).sum((1, 2)) / (
                (mlp_out[:, 1:] - mlp_out[:, 1:].mean(1, keepdim=True)) ** 2).sum((1, 2))
            rep.rows["explained_variance_per_layer(pos>0)"] = ev.tolist()
            print(f"  explained variance of the MLP outputs per layer (pos>0): {[round(v, 4) for v in ev.tolist()]}")

    # ---- 3. circuit-tracer's ReplacementModel around the same model -----------------------------
    print("3. ReplacementModel.from_pretrained(model folder, export path) (transformerlens backend), same tokens")
    folder = _tl_model_folder(meta["model_path"], work)
    t0 = time.time()
    model = _build_replacement_model(folder, export, dev)
    rep.rows["replacement_model_build_s"] = time.time() - t0
    cache: dict = {}

    def keep(a, hook):
        cache[hook.name] = a.detach().clone()

    hooks = [(f"blocks.{l}.{h}", keep) for l in range(n) for h in (ct_in, model.original_feature_output_hook)]
    with torch.no_grad():
        model.run_with_hooks(tokens[None], fwd_hooks=hooks)
    rep.compare(f"model: blocks.L.{ct_in} vs our {json.loads(meta['in_hooks'])[0].split('.', 2)[2]}",
                torch.stack([cache[f"blocks.{l}.{ct_in}"][0] for l in range(n)]), x_in, TOL_REL_MODEL)
    rep.compare(f"model: blocks.L.{ct_out} vs our {json.loads(meta['out_hooks'])[0].split('.', 2)[2]}",
                torch.stack([cache[f"blocks.{l}.{model.original_feature_output_hook}"][0] for l in range(n)]),
                mlp_out, TOL_REL_MODEL)
    _, acts = model.get_activations(tokens)  # position 0 (BOS) zeroed by circuit-tracer
    mask = torch.ones_like(ref["latents"])
    mask[:, 0] = 0
    rep.compare("model.get_activations vs ours (pos>0)", acts, ref["latents"], TOL_REL_MODEL, mask=mask)
    ctx = model.setup_attribution(tokens)
    err = ctx.error_vectors  # mlp_out - reconstruction, position 0 zeroed
    want_err = (mlp_out - ref["recon"])
    want_err[:, 0] = 0
    rep.compare("setup_attribution error vectors vs ours (mlp_out - recon)", err, want_err, 1e-4)
    rel_err = (err[:, 1:].norm(dim=-1).pow(2).sum(-1) / mlp_out[:, 1:].norm(dim=-1).pow(2).sum(-1)).sqrt()
    rep.rows["error_norm_over_mlp_out_norm_per_layer"] = rel_err.tolist()
    print(f"  |error| / |mlp_out| per layer (pos>0): {[round(v, 4) for v in rel_err.tolist()]}; "
          f"active features {ctx.activation_matrix._nnz()}")

    # ---- 4. attribute() --------------------------------------------------------------------------
    print(f"4. attribute() on the first {args.attr_tokens} tokens")
    from circuit_tracer import attribute
    from circuit_tracer.graph import compute_graph_scores, prune_graph

    prompt = tokens[: args.attr_tokens]
    t0 = time.time()
    graph = attribute(prompt, model, max_n_logits=5, desired_logit_prob=0.9, batch_size=64, verbose=False)
    dt = time.time() - t0
    rs, cs = compute_graph_scores(graph)
    n_feat = len(graph.selected_features)
    n_nodes = graph.adjacency_matrix.shape[0]
    n_edges = int((graph.adjacency_matrix != 0).sum())
    pruned = prune_graph(graph, node_threshold=0.8, edge_threshold=0.98)
    rep.rows["attribute"] = {"seconds": dt, "prompt_tokens": int(len(prompt)), "active_features": int(len(graph.active_features)),
                             "feature_nodes": n_feat, "nodes": n_nodes, "nonzero_edges": n_edges,
                             "logit_targets": len(graph.logit_targets), "replacement_score": rs,
                             "completeness_score": cs, "pruned_nodes": int(pruned.node_mask.sum()),
                             "pruned_edges": int(pruned.edge_mask.sum())}
    print(f"  {rep.rows['attribute']}")
    graph_path = work / f"graph_{export.name}.pt"
    graph.to_pt(str(graph_path))
    if not (torch.isfinite(graph.adjacency_matrix).all() and 0 <= rs <= 1 and 0 <= cs <= 1):
        rep.fails.append("attribute(): non-finite adjacency or scores outside [0, 1]")
    # The graph's own features are the replacement model's: same set as ours on this prompt (pos>0).
    af = graph.active_features  # (layer, pos, feature)
    ours = (ref["latents"][:, 1: args.attr_tokens] > 0).nonzero()
    ours[:, 1] += 1
    got = {tuple(r) for r in af.tolist()}
    want = {tuple(r) for r in ours.tolist()}
    rep.rows["attribute_active_features_match"] = got == want
    print(f"  {'ok  ' if got == want else 'FAIL'} graph active features == our active latents (pos>0): "
          f"{len(got)} vs {len(want)}")
    if got != want:
        rep.fails.append(f"graph active features differ from ours: {len(got ^ want)} differ")
    _check_edges(model, graph, prompt, n, rep, args.edge_samples)

    if args.json:
        Path(args.json).write_text(json.dumps({"versions": versions, "info": info, "rows": rep.rows,
                                               "fails": rep.fails}, indent=1, default=str))
    if rep.fails:
        print("[ct] FAILED:\n  " + "\n  ".join(rep.fails))
        os._exit(1)  # skip circuit-tracer's noisy ReplacementModel.__del__ at interpreter exit
    print("[ct] all checks passed")
    sys.stdout.flush()
    os._exit(0)


def _check_edges(model, graph, prompt, n_layers: int, rep: "Report", n_samples: int) -> None:
    """circuit-tracer's own consistency test (its test suite's verify_feature_edges): in the local replacement
    model (attention patterns, LayerNorm scales and MLP outputs frozen: constrained_layers = all layers),
    doubling one active feature's activation must move every active feature's pre-activation, and every
    target's demeaned logit, by exactly that feature's column of the adjacency matrix."""
    import torch

    af = graph.active_features
    n_feat, n_logits = len(af), len(graph.logit_targets)
    if n_samples <= 0 or n_feat == 0:
        return
    if len(graph.selected_features) != n_feat:
        print("  (edge check skipped: not all features selected)")
        return
    tok_ids = torch.tensor([t.vocab_idx for t in graph.logit_targets])
    with torch.no_grad():
        logits0, pre0 = model.get_activations(prompt, apply_activation_function=False)
    base_act = pre0[af[:, 0], af[:, 1], af[:, 2]]
    base_logit = logits0[0, -1, tok_ids] - logits0[0, -1].mean()
    g = torch.Generator().manual_seed(0)
    picks = torch.randperm(n_feat, generator=g)[:n_samples]
    d_act, d_logit, w_act, w_logit = [], [], [], []
    for i in picks.tolist():
        layer, pos, feat = af[i].tolist()
        new_val = 2 * pre0[layer, pos, feat]
        logits1, pre1 = model.feature_intervention(prompt, [(layer, pos, feat, new_val)],
                                                   constrained_layers=range(n_layers), apply_activation_function=False)
        got_act = pre1[af[:, 0], af[:, 1], af[:, 2]] - base_act
        got_logit = (logits1[0, -1, tok_ids] - logits1[0, -1].mean()) - base_logit
        col = graph.adjacency_matrix[:, i]
        d_act.append(got_act); w_act.append(col[:n_feat])
        d_logit.append(got_logit); w_logit.append(col[-n_logits:])
    rep.compare(f"attribute(): edges into features vs intervention ({len(picks)} features doubled)",
                torch.stack(d_act), torch.stack(w_act), 1e-3, atol=1e-5)
    rep.compare(f"attribute(): edges into logits vs intervention ({len(picks)} features doubled)",
                torch.stack(d_logit), torch.stack(w_logit), 1e-3, atol=1e-5)


def _thresholds(tc, kind: str, n: int):
    import torch
    from circuit_tracer.transcoder.activation_functions import JumpReLU
    if kind == "cross_layer_transcoder":
        a = tc.activation_function
        return a.threshold.detach().reshape(n, 1, -1) if isinstance(a, JumpReLU) else torch.zeros(n, 1, tc.d_transcoder)
    out = []
    for t in tc:
        a = t.activation_function
        out.append(a.threshold.detach().reshape(1, -1) if isinstance(a, JumpReLU) else torch.zeros(1, t.d_transcoder))
    return torch.stack(out)


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name)
    except PackageNotFoundError:
        return None


# ======================================================================================================
# role "all": orchestration
# ======================================================================================================
def _sh(cmd: list[str], cwd: Path | None = None, log: Path | None = None) -> int:
    print("$ " + " ".join(cmd) + (f"   (cwd {cwd})" if cwd else ""), flush=True)
    if log:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            return subprocess.call(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT)
    return subprocess.call(cmd, cwd=cwd)


def _with_side(status: int, rc: int, what: str) -> int:
    """The exit status so far, with one other-venv side's exit code: 1 a disagreement, 2 a crash (named)."""
    if rc == 1:
        return max(status, 1)
    if rc:
        print(f"{what} crashed: rc {rc}")
        return 2
    return status


def role_all(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="circuit_tracer_check.py all")
    ap.add_argument("--project", default=str(ROOT), help="crosscache checkout")
    ap.add_argument("--project-python", help="default: PROJECT/.venv/bin/python")
    ap.add_argument("--ct-python", default=str(ROOT / ".venv-circuit-tracer" / "bin" / "python"),
                    help="python of a venv with circuit-tracer (several: comma-separated)")
    ap.add_argument("--work", default=str(ROOT / "runs" / "interop-circuit-tracer"))
    ap.add_argument("--build", action="store_true", help="harvest and train the runs into WORK (else reuse them)")
    ap.add_argument("--model", default="toy-base")
    ap.add_argument("--n-layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--sets", default="clt,clt-relu,tc", help="which dictionaries to check: clt (jumprelu), "
                    "clt-relu (relu), tc (per-layer batchtopk transcoders with --skip)")
    args = ap.parse_args(argv)
    proj = Path(args.project).resolve()
    py = args.project_python or str(proj / ".venv" / "bin" / "python")
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    L = list(range(args.n_layers))
    ins = [f"blocks.{l}.ln2.hook_out" for l in L]
    outs = [f"blocks.{l}.hook_mlp_out" for l in L]
    cache, runs = work / "cache", work / "runs"
    common = ["--cache", str(cache), "--models", args.model, "--batch-size", "512", "--lr", "1e-3",
              "--device", "cpu", "--no-progress", "--steps", str(args.steps)]
    sets = [s for s in args.sets.split(",") if s]
    specs = {
        "clt": [["--arch", "clt", "--activation", "jumprelu", "--latents", "1024", "--in-hooks", *ins,
                 "--out-hooks", *outs, "--out", str(runs / "clt")]],
        "clt-relu": [["--arch", "clt", "--activation", "relu", "--sparsity-coeff", "0.3", "--latents", "1024",
                      "--in-hooks", *ins, "--out-hooks", *outs, "--out", str(runs / "clt-relu")]],
        "tc": [["--arch", "directional", "--activation", "batchtopk", "--k", "8", "--skip", "--latents", "256",
                "--in-hooks", ins[l], "--out-hooks", outs[l], "--out", str(runs / "tc" / f"layer{l}")] for l in L],
    }
    if args.build:
        if not (cache / "manifest.json").is_file():
            rc = _sh([py, "run_harvest.py", "--models", args.model, "--hooks", *ins, *outs, "--dataset", "builtin:mixed",
                      "--tokens", "60000", "--out", str(cache), "--device", "cpu", "--no-progress"], cwd=proj,
                     log=work / "harvest.log")
            if rc:
                print(f"harvest failed ({work / 'harvest.log'})")
                return 2
        for s in sets:
            for spec in specs[s]:
                if (Path(spec[-1]) / "export").is_dir():
                    continue
                rc = _sh([py, "run_train.py", *common, *spec], cwd=proj, log=Path(spec[-1] + ".log"))
                if rc:
                    print(f"training failed ({spec[-1]}.log)")
                    return 2
    status = 0
    for s in sets:
        run = runs / s if s != "tc" else runs / "tc"
        exp = work / f"export_{s}"
        if exp.exists():
            shutil.rmtree(exp)
        if _sh([py, "run_train.py", "export-circuit-tracer", *([str(run)] if s != "tc" else
               [str(runs / "tc" / f"layer{l}") for l in L]), "--out", str(exp), "--model-name", args.model], cwd=proj):
            print(f"export of {s} failed")
            return 2
        ref = work / f"ref_{s}.safetensors"
        if _sh([py, str(HERE), "ours", "--runs", str(run), "--out", str(ref)], cwd=proj):
            return 2
        for ct_py in args.ct_python.split(","):
            tag = Path(ct_py).parent.parent.name
            rc = _sh([ct_py, str(HERE), "ct", "--export", str(exp), "--ref", str(ref), "--work", str(work),
                      "--json", str(work / f"result_{s}_{tag}.json")])
            status = _with_side(status, rc, f"circuit-tracer side ({ct_py}, {s})")
    print("ALL AGREE" if status == 0 else f"DISAGREEMENT (exit {status})")
    return status


if __name__ == "__main__":
    role, rest = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 and sys.argv[1] in ("all", "ours", "ct") else ("all", sys.argv[1:])
    sys.exit({"all": role_all, "ours": role_ours, "ct": role_ct}[role](rest))
