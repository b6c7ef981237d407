"""What the language models lose when a trained dictionary stands in for their activations.

``run_train.py lm-eval RUN_DIR`` (:func:`evaluate_lm`) loads the run's models, forwards sequences of
its cache's eval split (those with the most of their rows there; ``training_split_share`` in the
result says how many of their rows are in the training split) or, with ``--sequences-from fresh``,
the sequences the harvest's dataset gives after the cache's last one, and for each model whose
hooks the dictionary writes (its output slots) compares three forward passes:

- clean: the model as it is;
- spliced: each output hook's activation replaced by the dictionary's reconstruction;
- zero-ablated: the same activations replaced by zeros (the usual floor).

It reports the next-token cross-entropy of each, ``delta_ce = spliced - clean`` (nats/token),
``loss_recovered = (zero - spliced) / (zero - clean)`` and the KL divergence of the spliced from the
clean next-token distribution. Splicing uses the run's exported dictionary, which reads raw
activations (the cache's normalization folded in), and replaces only the positions whose tokens the
harvest kept (BOS and the other excluded tokens stay clean: the dictionary never saw them).

``--loop`` says where the reconstructions' inputs come from:

- ``open`` (default): every input slot is read from the clean forward passes (of every model: a
  crosscoder's encoder reads them all), then each model runs once with all of its output hooks
  replaced. For several hooks of one model (a cross-layer crosscoder or CLT), a later hook's
  reconstruction is not fed the earlier splices.
- ``closed``: one forward pass per model in which each input hook reads the activation as it flows
  through the spliced model (earlier output hooks already replaced), and each output hook is
  replaced by the reconstruction from the inputs captured before it: the "replacement model" of a
  CLT ("Circuit Tracing", Ameisen et al. 2025; circuit-tracer). Defined only where the forward order
  makes that causal (:func:`train.splice.check_closed_loop`): a CLT whose layer-j output reads inputs of layers
  <= j that fire before it (e.g. ``blocks.L.ln2.hook_out`` -> ``blocks.L.hook_mlp_out``), or a
  directional dictionary of one model whose every input fires before its first output. A crosscoder
  (its encoder reads the hooks it writes), a dictionary reading another model than it writes, and a
  topk CLT (its top k spans every layer, so layer j's latents depend on later inputs) are refused.
  With one input and one output hook both loops give the same figures.

Before any figure, the clean activations are compared with the cache's own rows for the same tokens:
models that no longer produce what was harvested (a model folder retrained since) are refused.
No LLM runs inside training; this is an evaluation step after it, like ``analyze``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from shared.config import add_dataclass_arguments, coerce_field_types, config_from_namespace, field_help
from shared.folder_lock import FolderLockError, exit_code_for
from shared.shard_io import atomic_write_bytes
from train.analysis_run import RunData, RunError, cache_model_names, load_run, open_run_cache, still_training
from train.report_lm_eval import LM_EVAL_FORMAT, default_lm_eval_path, export_weights_sha256, sequences_words
from train.splice import capture_hook, check_closed_loop, closed_loop_forward, forward_with_hooks, replace_hook

__all__ = ["ACTIVATION_CHECK_MAX", "LMEvalConfig", "evaluate_lm", "format_table", "lm_eval_cli"]

ACTIVATION_CHECK_MAX = 0.05
"""Largest median relative error between the models' activations now and the cache's rows for the same
tokens. Storage rounding is ~0.4% (bfloat16) and batching changes little; a model retrained since the
harvest is off by far more."""


@dataclass(frozen=True)
class LMEvalConfig:
    """Options of ``run_train.py lm-eval``. Validated on construction; saved in the result."""

    run: str = field_help("Run folder (from run_train.py).", default="runs/toy-diff",
                          metadata={"cli": False, "path": True})
    cache: str | None = field_help(
        "The run's cache (tokens and excluded tokens; a folder or hf://USER/NAME[@REV]). Default: where the run "
        "trained on it, as analyze finds it.", default=None, metadata={"path": True})
    # 128 x 128 tokens: ~16k predictions per model, a delta CE to ~0.01 nats on the toy pair.
    sequences: int = field_help("Sequences to evaluate (see sequences_from).", default=128)
    sequences_from: Literal["eval", "fresh"] = field_help(
        "eval: sequences of the cache's eval split (part of their tokens' rows are in the training split: "
        "the result says how many); fresh: the sequences the harvest's dataset gives after the cache's last one, "
        "never harvested (reads and tokenizes the dataset from its start again; falls back to eval, with a "
        "note, where it cannot).", default="eval")
    batch_size: int = field_help("Sequences per forward pass.", default=8)
    device: str = field_help("auto (cuda if available), cpu, cuda, ...", default="auto")
    model_dtype: str = field_help("dtype the models run in (float32, bfloat16, float16).", default="float32")
    loop: Literal["open", "closed"] = field_help(
        "open: every reconstruction from the clean activations; closed: one forward per model where each input "
        "hook reads the spliced model and each output hook its reconstruction from those inputs (a CLT's "
        "replacement model; refused where the forward order is not causal, e.g. for a crosscoder).", default="open")
    out: str | None = field_help("Result JSON (default: RUN/analysis/lm_eval.json).", default=None,
                                 metadata={"path": True})
    progress: bool = field_help("Show a progress bar.", default=True)

    def __post_init__(self) -> None:
        coerce_field_types(self)  # also refuses a loop other than open or closed (a Literal)
        for name in ("sequences", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.model_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"model_dtype must be float32, bfloat16 or float16, got {self.model_dtype!r}")
        if self.out is not None and (self.out.endswith(("/", os.sep)) or Path(self.out).is_dir()):
            raise ValueError(f"out (--out) {self.out} is a folder; it names the result JSON file to write, e.g. "
                             f"{Path(self.out) / 'lm_eval.json'}")

    @property
    def out_path(self) -> Path:
        return Path(self.out) if self.out else default_lm_eval_path(self.run)


MIN_ZERO_ABLATION_GAP = 0.01
"""Nats zero ablation must add to the clean loss for loss recovered, a ratio over that gap, to be reported:
below it (a hook the model barely uses, or random weights) the ratio is noise, e.g. 11.6 for a 0.0003-nat gap."""


def _recovered_note(model: str, summary: dict[str, Any]) -> str | None:
    """Why a model's loss recovered is n/a (zero ablation barely raised the loss, or lowered it), or None."""
    if summary["loss_recovered"] is not None:
        return None
    gap = summary["ce_zero_ablation"] - summary["ce_clean"]
    how = (f"lowered the loss (by {-gap:.4f} nats)" if gap < 0 else
           f"raised the loss by only {gap:.4f} nats (< {MIN_ZERO_ABLATION_GAP})")
    return (f"{model}: loss recovered is n/a: zero ablation {how}, so the ratio (zero - spliced) / (zero - clean) "
            "means nothing; compare ΔCE with that gap instead")


@dataclass
class _Totals:
    """Running sums over predicted tokens for one model."""

    clean: float = 0.0
    spliced: float = 0.0
    zero: float = 0.0
    kl: float = 0.0
    n: int = 0

    def summary(self, hooks: list[str]) -> dict[str, Any]:
        clean, spliced, zero = self.clean / self.n, self.spliced / self.n, self.zero / self.n
        recovered = (zero - spliced) / (zero - clean) if zero - clean >= MIN_ZERO_ABLATION_GAP else None
        return {"hooks": hooks, "tokens": self.n, "ce_clean": clean, "ce_spliced": spliced, "ce_zero_ablation": zero,
                "delta_ce": spliced - clean, "loss_recovered": recovered, "kl_spliced": self.kl / self.n}


def _shard_seqs(cache: Any, i: int) -> np.ndarray:
    """Shard ``i``'s ``seq`` column, copied and the shard closed: a view would keep every shard mapped at once
    (one file descriptor each: a cache of more shards than ``ulimit -n`` failed with EMFILE)."""
    with cache.shard(i) as shard:
        return shard.seq.numpy().copy()


def _held_out_sequences(cache: Any, run: RunData, n: int, notes: list[str]) -> tuple[list[int], float]:
    """``n`` sequences of the run's eval split (its last shards), those with the largest share of their rows
    there first (then by index), and the share of the chosen sequences' rows that lie in the training split.

    The harvest shuffles rows across several shards before writing them, so a sequence's rows are usually
    split between the eval shards and the training ones: the share says how held out the evaluation is."""
    from train.loader import default_eval_shards

    n_eval = run.info["config"].get("eval_shards")
    n_eval = default_eval_shards(cache.n_shards) if n_eval is None else int(n_eval)
    held_rows = sum(cache.manifest.shards[i].n_rows for i in range(cache.n_shards - n_eval, cache.n_shards))
    if n_eval == 0 or held_rows == 0:  # every row was trained on: the share is 1 (the first sequences, by index)
        notes.append("the run held out no shards with rows (eval_shards 0, a one-shard cache, or held-out shards of 0 "
                     "rows): the sequences evaluated are ones the dictionary was trained on")
        seqs = np.unique(np.concatenate([_shard_seqs(cache, i) for i in range(cache.n_shards)]))
        return [int(x) for x in seqs[:n]], 1.0
    first_eval = cache.n_shards - n_eval
    seq_by_shard = [_shard_seqs(cache, i) for i in range(cache.n_shards)]
    eval_seq, eval_rows = np.unique(np.concatenate(seq_by_shard[first_eval:]), return_counts=True)
    train_all = np.concatenate(seq_by_shard[:first_eval]) if first_eval else np.zeros(0, np.int64)
    train_rows = np.zeros(len(eval_seq), np.int64)
    found = np.isin(train_all, eval_seq)
    if found.any():
        where, counts = np.unique(train_all[found], return_counts=True)
        train_rows[np.searchsorted(eval_seq, where)] = counts
    share_eval = eval_rows / (eval_rows + train_rows)
    order = np.lexsort((eval_seq, -share_eval))[:n]  # most held out first, then by index
    picked_eval, picked_train = int(eval_rows[order].sum()), int(train_rows[order].sum())
    trained_share = picked_train / max(1, picked_eval + picked_train)
    if trained_share > 0:
        notes.append(f"{trained_share:.0%} of the evaluated sequences' kept tokens have their rows in the training "
                     "split: the harvest shuffles each sequence's rows over several shards, so few sequences lie "
                     "wholly in the eval split (those that do were taken first)")
    return [int(s) for s in eval_seq[order]], trained_share


def _fresh_sequences(man: Any, table: Any, models: Any, excluded_ids: list[int], n: int,
                     notes: list[str]) -> list[np.ndarray] | None:
    """Up to ``n`` sequences the harvest's token stream gives after the cache's last one (never harvested, so
    never trained on): the cache's dataset packed again as the harvest packed it. None, with a note, where the
    dataset cannot be read again, holds no more text, or no longer gives the cache's sequences (it changed)."""
    from harvest.token_stream import build_token_plan

    ds = man.dataset or {}
    n_cached = table.num_rows
    fallback = "; evaluated sequences of the eval split instead"
    try:
        plan = build_token_plan(
            dataset=ds["name"], split=ds.get("split", "train"), text_column=ds.get("text_column", "text"),
            meta_columns=ds.get("meta_columns"), seed=int(ds.get("seed", 0)), tokenizer=models.tokenizer,
            context_size=man.context_size, bos_id=models.bos_id, eos_id=models.eos_id, excluded_ids=excluded_ids,
            n_rows=man.n_rows + n * man.context_size, n_vocab=models.n_vocab)
    except Exception as e:  # noqa: BLE001 - whatever keeps the dataset from being read again: said, then eval split
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        notes.append(f"--sequences-from fresh: the cache's dataset {ds.get('name')!r} could not be read again "
                     f"({first}){fallback}")
        return None
    # The stream must still be the harvest's: its sequences, in its order (a dataset edited since differs).
    cached = table.column("input_ids")
    same = len(plan.input_ids) >= n_cached and all(
        np.array_equal(plan.input_ids[i], np.asarray(cached[i].as_py())) for i in range(n_cached))
    if not same:
        notes.append(f"--sequences-from fresh: the cache's dataset {ds.get('name')!r} no longer gives the cache's "
                     f"sequences (it changed since the harvest){fallback}")
        return None
    fresh = plan.input_ids[n_cached:n_cached + n]
    if not fresh:
        notes.append(f"--sequences-from fresh: the cache's dataset {ds.get('name')!r} holds no text past the "
                     f"harvested sequences{fallback}")
        return None
    if len(fresh) < n:
        notes.append(f"--sequences-from fresh: the dataset holds {len(fresh)} sequences past the harvest; all of "
                     "them were evaluated")
    return fresh


def _load_spec(entry: dict[str, Any]) -> str:
    """What to load for a cache's model entry: its recorded local folder if it is still there, else its name."""
    path = entry.get("path")
    if path and Path(path).expanduser().is_dir():
        return str(Path(path).expanduser())
    name, revision = entry["name"], entry.get("revision")
    return f"{name}@{revision}" if revision and "@" not in name else name


def _token_ce(logits_BPV: torch.Tensor, tokens_BP: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of every predicted position [B*(P-1)], in float32."""
    return F.cross_entropy(rearrange(logits_BPV[:, :-1].float(), "b p v -> (b p) v"),
                           rearrange(tokens_BP[:, 1:], "b p -> (b p)"), reduction="none")


def _kl(clean_BPV: torch.Tensor, other_BPV: torch.Tensor) -> torch.Tensor:
    """KL(clean || other) of the next-token distributions at every predicted position, summed."""
    lp_clean = F.log_softmax(clean_BPV[:, :-1].float(), dim=-1)
    lp_other = F.log_softmax(other_BPV[:, :-1].float(), dim=-1)
    return (lp_clean.exp() * (lp_clean - lp_other)).sum()


def _cache_rows(cache: Any, seqs: list[int], run: RunData) -> dict[tuple[int, int], torch.Tensor]:
    """The cache's rows of sequences ``seqs`` in the run's slot layout [X, D], raw (normalization undone),
    keyed by (seq, pos). Read from the eval shards' rows for those sequences."""
    man = cache.manifest
    names = cache_model_names(run, man)
    m_idx = [man.model_names.index(names[m]) for m in run.models_used]
    p_idx = [list(man.hooks).index(h) for h in run.hooks_used]
    norm = cache.normalization().select(m_idx, p_idx)
    wanted = set(seqs)
    found: dict[tuple[int, int], torch.Tensor] = {}
    for i in reversed(range(cache.n_shards)):  # held-out shards are the last ones
        with cache.shard(i) as shard:  # closed at once: one shard mapped at a time
            rows = np.nonzero(np.isin(shard.seq.numpy(), list(wanted)))[0]
            if len(rows):
                acts_NMPD = shard.acts[torch.from_numpy(rows)][:, m_idx][:, :, p_idx].float()
                raw = rearrange(norm.undo(acts_NMPD), "n m p d -> n (m p) d")
                for r, x in zip(rows.tolist(), raw):
                    found[(int(shard.seq[r]), int(shard.pos[r]))] = x
        if len(found) >= 256:
            break
    return found


def _activation_error(found: dict[tuple[int, int], torch.Tensor], seqs: list[int], x_BPXD: torch.Tensor) -> float | None:
    """Median relative error of the activations computed now against the cache's rows of the same tokens.

    Cache rows holding inf or NaN (an older harvest's float16 overflow) are left out: their NaN error made the
    median NaN, which passed the check whatever the models. Activations that are not finite now count as
    infinitely wrong."""
    errors = []
    for b, s in enumerate(seqs):
        for (seq, pos), row in found.items():
            if seq == s and bool(torch.isfinite(row).all()):
                now = x_BPXD[b, pos].cpu()
                error = float((now - row).norm() / row.norm().clamp_min(1e-12))
                errors.append(error if math.isfinite(error) else math.inf)
    return float(np.median(errors)) if errors else None


def evaluate_lm(cfg: LMEvalConfig) -> dict[str, Any]:
    """Splice the run's exported dictionary into its models on sequences of its cache or dataset (see the module
    docstring); write the result to ``cfg.out_path`` (JSON) and return it."""
    from harvest.models import load_models, resolve_device
    from shared.cache_format import dtype_from_name
    from train.export import load_dictionary

    t0 = time.perf_counter()
    run = load_run(cfg.run, command="lm-eval")
    export_dir = Path(cfg.run) / "export"
    if not (export_dir / "config.json").is_file():
        still_training(Path(cfg.run), "export/", "lm-eval")
        raise RunError(f"{cfg.run} has no export/: re-run its run_train.py command to finish and export it")
    device = resolve_device(cfg.device)
    # analyze shows the result only while the run's export still has this checksum (train.report_lm_eval). Read
    # before the weights load: an export rewritten meanwhile leaves a result that reads as stale, never as current.
    export_sha = export_weights_sha256(cfg.run)
    dictionary = load_dictionary(export_dir, device)  # raw activations in, raw out
    slots = run.slot_pairs  # (model, hook) of each slot, the dictionary's X order
    if cfg.loop == "closed":  # before the cache and the models load
        check_closed_loop(dictionary.cfg, slots)
    notes: list[str] = []
    opened = open_run_cache(run, cfg.cache, notes)
    if opened is None:
        raise RunError(f"lm-eval needs the run's cache (its tokens): {notes[-1]}")
    cache, table = opened
    man = cache.manifest
    names = cache_model_names(run, man)
    entries = {m["name"]: m for m in man.models}
    specs = [_load_spec(entries[names[m]]) for m in run.models_used]
    excluded = man.excluded_tokens
    models = load_models(specs, list(run.hooks_used), context_size=man.context_size, device=device,
                         model_dtype=dtype_from_name(cfg.model_dtype), exclude_special=bool(excluded.get("special", True)),
                         exclude_token_ids=list(excluded.get("token_ids") or []),
                         allow_vocab_extension="extended_by" in man.tokenizer, progress=cfg.progress)
    # The cache's own list (what its rows lack); a cache written elsewhere without one: the models' rule.
    ids = excluded.get("token_ids")
    excluded_ids = torch.tensor(sorted(models.excluded_ids if ids is None else ids), dtype=torch.long, device=device)

    fresh = (_fresh_sequences(man, table, models, excluded_ids.tolist(), cfg.sequences, notes)
             if cfg.sequences_from == "fresh" else None)
    # The models must reproduce the cache's activations: checked on eval-split sequences, which have rows.
    eval_notes: list[str] = []  # about the eval split: the result's notes only when its sequences are evaluated
    eval_seqs, trained_share = _held_out_sequences(cache, run, cfg.batch_size if fresh else cfg.sequences, eval_notes)
    seq_col = table.column("seq").to_numpy()
    ids_col = table.column("input_ids")
    row_of = {int(s): i for i, s in enumerate(seq_col)}
    if fresh is None:
        seqs, token_ids = eval_seqs, [np.asarray(ids_col[row_of[s]].as_py()) for s in eval_seqs]
        notes += eval_notes
        if len(seqs) < cfg.sequences:
            notes.append(f"the eval split holds {len(seqs)} sequences; all of them were evaluated")
    else:  # numbered on from the cache's own sequences, as the stream gives them
        seqs, token_ids, trained_share = [table.num_rows + i for i in range(len(fresh))], fresh, 0.0
    in_slots, out_slots = list(dictionary.cfg.in_slots), list(dictionary.cfg.out_slots)
    out_by_model = {m: [(x, h) for x, (mm, h) in enumerate(slots[s] for s in out_slots) if mm == m]
                    for m in run.models_used}
    out_by_model = {m: v for m, v in out_by_model.items() if v}
    totals = {m: _Totals() for m in out_by_model}
    check_seqs = eval_seqs[:cfg.batch_size]
    check_rows = _cache_rows(cache, check_seqs, run)
    activation_error = None

    def clean_pass(tokens_BP: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Every slot's activations [B, P, X, D] and the clean logits of the models the dictionary writes."""
        captured: dict[str, dict[str, torch.Tensor]] = {}
        logits_of: dict[str, torch.Tensor] = {}
        for m, bridge in zip(run.models_used, models.bridges):
            store: dict[str, torch.Tensor] = {}
            hooks = {h: capture_hook(store, h, bridge.hook_dict[h]) for h in run.hooks_used}
            logits = forward_with_hooks(bridge, tokens_BP, hooks)
            captured[m] = store
            if m in out_by_model:
                logits_of[m] = logits
        return torch.stack([captured[m][h] for m, h in slots], dim=2), logits_of

    def check_activations(batch: list[int], x_BPXD: torch.Tensor) -> float | None:
        error = _activation_error(check_rows, batch, x_BPXD)
        if error is not None and error > ACTIVATION_CHECK_MAX:
            raise RunError(
                f"the models loaded now ({', '.join(specs)}) do not reproduce the cache's activations for the "
                f"same tokens (median relative error {error:.3f}, more than {ACTIVATION_CHECK_MAX}): "
                "a model folder changed since the harvest, or another model answers to its name. Evaluate with "
                "the models the cache was harvested from")
        return error

    from shared.progress import tqdm

    bar = tqdm(total=len(seqs) * man.context_size, unit="tok", unit_scale=True, desc="lm-eval",
               disable=not cfg.progress, dynamic_ncols=True)
    with torch.inference_mode():
        if fresh is not None and check_seqs:  # fresh sequences have no rows: one extra clean pass for the check
            check_BP = torch.tensor(np.stack([np.asarray(ids_col[row_of[s]].as_py()) for s in check_seqs]),
                                    dtype=torch.long, device=device)
            activation_error = check_activations(check_seqs, clean_pass(check_BP)[0])
        for start in range(0, len(seqs), cfg.batch_size):
            batch = seqs[start:start + cfg.batch_size]
            tokens_BP = torch.tensor(np.stack(token_ids[start:start + cfg.batch_size]), dtype=torch.long, device=device)
            keep_BP = ~torch.isin(tokens_BP, excluded_ids)
            x_BPXD, clean_logits = clean_pass(tokens_BP)
            if fresh is None and activation_error is None:
                activation_error = check_activations(batch, x_BPXD)
            if cfg.loop == "open":
                x_in_NXiD = rearrange(x_BPXD[:, :, in_slots], "b p x d -> (b p) x d")
                recon_BPXD = rearrange(dictionary(x_in_NXiD).recon_BXoD, "(b p) x d -> b p x d", b=tokens_BP.shape[0])
            for m, bridge in zip(run.models_used, models.bridges):
                if m not in out_by_model:
                    continue
                t = totals[m]
                if cfg.loop == "open":
                    spliced = forward_with_hooks(bridge, tokens_BP, {h: replace_hook(recon_BPXD[:, :, x], keep_BP)
                                                                     for x, h in out_by_model[m]})
                else:  # one model reads and writes every slot (check_closed_loop)
                    spliced = closed_loop_forward(bridge, dictionary, tokens_BP, keep_BP,
                                                  [slots[s][1] for s in in_slots], [slots[s][1] for s in out_slots])
                zero_BPD = torch.zeros(*tokens_BP.shape, dictionary.cfg.d_model, device=device)
                zeroed = forward_with_hooks(bridge, tokens_BP,
                                            {h: replace_hook(zero_BPD, keep_BP) for _, h in out_by_model[m]})
                t.clean += float(_token_ce(clean_logits[m], tokens_BP).sum())
                t.spliced += float(_token_ce(spliced, tokens_BP).sum())
                t.zero += float(_token_ce(zeroed, tokens_BP).sum())
                t.kl += float(_kl(clean_logits[m], spliced))
                t.n += tokens_BP.shape[0] * (tokens_BP.shape[1] - 1)
            bar.update(tokens_BP.numel())
    bar.close()

    summaries = {m: totals[m].summary([h for _, h in out_by_model[m]]) for m in out_by_model}
    notes += [note for m, r in summaries.items() if (note := _recovered_note(m, r))]
    result = {
        "format": LM_EVAL_FORMAT,
        "run": str(cfg.run), "cache": run.cache_used, "arch": dictionary.cfg.arch,
        "export_weights_sha256": export_sha, "created": dt.datetime.now().isoformat(timespec="seconds"),
        "sequences": len(seqs), "sequence_ids": seqs, "context_size": man.context_size,
        "sequences_from": "eval" if fresh is None else "fresh",
        "training_split_share": trained_share,
        "models": summaries,
        "activation_check_median_rel_error": activation_error,
        "loop": cfg.loop,
        "method": _METHODS[cfg.loop],
        "notes": notes,
        "config": dataclasses.asdict(cfg),
        "seconds": time.perf_counter() - t0,
    }
    path = cfg.out_path
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(result, indent=1, default=_json_default) + "\n").encode())
    result["path"] = str(path)
    return result


_METHODS = {
    "open": ("open loop: reconstructions from the clean activations of every input slot; each model's output hooks "
             "replaced together at kept tokens (excluded tokens such as BOS stay clean); zero ablation replaces the "
             "same activations with zeros; cross-entropy averaged over every predicted token"),
    "closed": ("closed loop: one forward per model in which each input hook reads the spliced model's activation and "
               "each output hook is replaced, at kept tokens (excluded tokens such as BOS keep the model's own value), "
               "by the reconstruction from the inputs that fired before it; zero ablation replaces the same "
               "activations with zeros; cross-entropy averaged over every predicted token"),
}
_LOOP_LINES = {"open": "open loop (reconstructions from the clean activations)",
               "closed": "closed loop (each output hook reconstructed from the spliced model's own inputs)"}


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def format_table(result: dict[str, Any]) -> list[str]:
    """The result as lines: the loop, then a table with one row per model."""
    loop = result.get("loop", "open")  # results from before --loop are open loop
    lines = [f"{_LOOP_LINES.get(loop, f'{loop} loop')}; {result['sequences']} {sequences_words(result)}",
             f"{'model':<24} {'CE clean':>9} {'spliced':>9} {'zero-abl':>9} {'ΔCE':>8} {'recovered':>9} {'KL':>8}"]
    label, numbered = _short_labels(list(result["models"]))
    for m, r in result["models"].items():
        rec = "n/a" if r["loss_recovered"] is None else f"{r['loss_recovered']:.3f}"
        lines.append(f"{label[m]:<24} {r['ce_clean']:>9.4f} {r['ce_spliced']:>9.4f} {r['ce_zero_ablation']:>9.4f} "
                     f"{r['delta_ce']:>8.4f} {rec:>9} {r['kl_spliced']:>8.4f}")
    if numbered:  # say which is which
        lines += [f"{i}: {m}" for i, m in enumerate(label, 1)]
    return lines


def _short_labels(names: list[str], width: int = 24) -> tuple[dict[str, str], bool]:
    """Each model name cut to ``width`` characters (its end, which names the checkpoint), and False; or, where
    two would then read the same, every name numbered in the table's order (``1: …``), and True."""
    cut = {n: n if len(n) <= width else "…" + n[-(width - 1):] for n in names}
    if len(set(cut.values())) == len(names):
        return cut, False
    return {n: f"{i}: " + (n if len(n) <= width - 2 - len(str(i)) else "…" + n[-(width - 3 - len(str(i))):])
            for i, n in enumerate(names, 1)}, True


def lm_eval_cli(argv: list[str]) -> int:
    """``run_train.py lm-eval RUN_DIR [flags]``: prints the table and the result's path."""
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="run_train.py lm-eval",
                                     description="Splice a trained dictionary into its models: what the LM loses.")
    parser.add_argument("run", help="run folder (the --out of run_train.py)")
    add_dataclass_arguments(parser, LMEvalConfig)
    args = parser.parse_args(argv)
    try:
        cfg = dataclasses.replace(config_from_namespace(LMEvalConfig, args), run=args.run)
        result = evaluate_lm(cfg)
    except FolderLockError as e:  # the run is still training: 75, try again later
        print(f"error: {e}", file=sys.stderr)
        return exit_code_for(e)
    except (RunError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in format_table(result):
        print(line)
    for note in result["notes"]:
        print(f"note: {note}")
    if note := _report_note(cfg):
        print(f"note: {note}")
    print(f"result: {result['path']}")
    return 0


def _report_note(cfg: LMEvalConfig) -> str | None:
    """What to run so that an analysis report shows the result just written: the report beside it predates
    it (its analyze command, flags and all, read from its report.json); a result written away from the run's
    analysis folder is read by analyze only with --out naming its folder."""
    from train.report_lm_eval import LM_EVAL_NAME
    from train.report_markdown import analyze_command

    folder = cfg.out_path.parent
    if cfg.out_path.name != LM_EVAL_NAME:  # analyze looks for that name only
        return (f"analyze reads a result only as {LM_EVAL_NAME} in its report folder, so no report shows "
                f"{cfg.out_path.name}; write it as {folder / LM_EVAL_NAME} (and run `python run_train.py analyze "
                f"{cfg.run} --out {folder}`) to see it in one")
    away = folder.resolve() != default_lm_eval_path(cfg.run).parent.resolve()
    command = f"python run_train.py analyze {cfg.run}" + (f" --out {folder}" if away else "")
    if not (folder / "report.md").is_file():
        return f"analyze reads this result only from its report folder: `{command}` includes it" if away else None
    try:
        command = analyze_command(json.loads((folder / "report.json").read_text()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # no readable report.json beside it: the plain command
    return f"{folder / 'report.md'} predates this result and does not show it: run `{command}` to refresh it"
