"""The lm-eval result (``lm_eval.json``, :mod:`train.lm_eval`) in an analysis report.

``analyze`` splices nothing itself (that needs the language models); it reads what ``lm-eval`` left
(:func:`lm_eval_block`) and shows its figures only when they were computed on the dictionary the report
describes. The result records the sha256 of the exported weights it spliced (``export_weights_sha256``,
the checksum ``export/config.json`` pins); the run's ``export/config.json`` now must give the same. A run
resumed and re-exported after lm-eval ran has other weights: its result is *stale*, said so, and its
figures are left out of report.md and report.json.

The result is looked for beside the report (``analyze --out DIR``: ``DIR/lm_eval.json``), then where
``lm-eval`` writes it by default (``RUN/analysis/lm_eval.json``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from shared.config import read_json_object
from train.report_data import _fmt, _int, _num, cli_flags

__all__ = ["LM_EVAL_FORMAT", "LM_EVAL_NAME", "default_lm_eval_path", "export_weights_sha256", "lm_eval_block",
           "lm_eval_headline", "lm_eval_markdown", "lm_eval_note", "sequences_words"]

LM_EVAL_FORMAT = "crosscache.lm_eval/1"
LM_EVAL_NAME = "lm_eval.json"


def default_lm_eval_path(run_dir: str | Path) -> Path:
    """Where ``lm-eval`` writes its result unless ``--out`` says otherwise: ``RUN/analysis/lm_eval.json``."""
    return Path(run_dir) / "analysis" / LM_EVAL_NAME


def export_weights_sha256(run_dir: str | Path) -> str | None:
    """The weights checksum the run's ``export/config.json`` records (None: no readable export)."""
    value = read_json_object(Path(run_dir) / "export" / "config.json").get("weights_sha256")
    return str(value) if value else None


def _find(run_dir: Path, report_dir: Path) -> Path:
    """The result the report reads: beside the report, else at lm-eval's default (also when neither exists)."""
    default = default_lm_eval_path(run_dir)
    beside = report_dir / LM_EVAL_NAME
    return beside if beside.resolve() != default.resolve() and beside.is_file() else default


def _command(run: str, path: Path, config: dict[str, Any] | None) -> str:
    """The lm-eval command that (re)writes ``path``, with the flags ``config`` (a past result's) changed."""
    from train.lm_eval import LMEvalConfig  # here, not at the top: lm_eval imports this module

    flags = ""
    if config:
        defaults = dataclasses.asdict(LMEvalConfig())  # as lm-eval saves its config
        flags = cli_flags(config, defaults, skip=("run", "out", "progress", "device"))
    out = "" if path.resolve() == default_lm_eval_path(run).resolve() else f" --out {path}"
    return f"python run_train.py lm-eval {run}{flags}{out}"


def lm_eval_block(run_dir: str | Path, report_dir: str | Path) -> dict[str, Any]:
    """report.json's ``lm_eval``: ``status`` ``current`` (with the figures), ``missing``, ``stale`` (computed
    on another dictionary, or on one it cannot name) or ``unreadable``; with ``reason`` for the last two, the
    ``path`` read and the ``command`` that writes it."""
    run_dir, report_dir = Path(run_dir), Path(report_dir)
    path = _find(run_dir, report_dir)
    now = export_weights_sha256(run_dir)
    block: dict[str, Any] = {"status": "missing", "path": str(path), "command": _command(str(run_dir), path, None),
                             "export_weights_sha256": now}
    if not path.is_file():
        return block
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return {**block, "status": "unreadable", "reason": f"it cannot be read ({e})"}
    if not isinstance(data, dict) or data.get("format") != LM_EVAL_FORMAT or not isinstance(data.get("models"), dict):
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        return {**block, "status": "unreadable", "reason": f"format {got!r}, expected {LM_EVAL_FORMAT!r}"}
    config = data.get("config") if isinstance(data.get("config"), dict) else None
    block["command"] = _command(str(run_dir), path, config)
    evaluated = data.get("export_weights_sha256")
    block["evaluated_export_weights_sha256"] = evaluated
    block["created"] = data.get("created")
    if now is None:
        reason = "the run has no readable export/config.json now, so the dictionary it spliced cannot be matched"
    elif not evaluated:
        reason = ("it does not record which export it spliced (written by an lm-eval before it recorded "
                  "export_weights_sha256), so it cannot be matched to this dictionary")
    elif evaluated != now:
        reason = (f"it spliced the export with weights sha256 `{evaluated[:12]}…`, the run's export/ now has "
                  f"`{now[:12]}…` (re-exported since, e.g. a resumed run)")
    else:
        try:
            return {**block, "status": "current", **_figures(data)}
        except (KeyError, TypeError, ValueError) as e:  # a hand-edited or truncated result: said, not a traceback
            return {**block, "status": "unreadable", "reason": f"its figures cannot be read ({e!r})"}
    return {**block, "status": "stale", "reason": reason}


def _figures(data: dict[str, Any]) -> dict[str, Any]:
    """The numbers of a current result that the report shows (rounded finer than report.md prints them)."""
    keys = ("ce_clean", "ce_spliced", "delta_ce", "ce_zero_ablation", "loss_recovered", "kl_spliced")
    models = {m: {"hooks": list(r.get("hooks", [])), "tokens": int(r["tokens"]), **{k: _num(r.get(k), 6) for k in keys}}
              for m, r in data["models"].items()}
    return {"sequences": int(data["sequences"]), "context_size": data.get("context_size"),
            "training_split_share": _num(data.get("training_split_share"), 4),  # None: a result from before it
            "sequences_from": data.get("sequences_from", "eval"),
            "activation_check_median_rel_error": _num(data.get("activation_check_median_rel_error"), 6),
            "method": data.get("method"), "loop": data.get("loop", "open"),  # results from before --loop: open
            "notes": list(data.get("notes") or []), "models": models}


def _signed(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:+.{digits}f}"


def lm_eval_headline(block: dict[str, Any]) -> str | None:
    """One summary line for a current result (None otherwise)."""
    if block["status"] != "current":
        return None
    per_model = "; ".join(f"{m}: ΔCE {_signed(r['delta_ce'])} nats/token, loss recovered {_fmt(r['loss_recovered'])}"
                          for m, r in block["models"].items())
    return (f"spliced into its models (lm-eval, {_int(block['sequences'])} {sequences_words(block)}, "
            f"{block.get('loop', 'open')} loop): {per_model}")


def sequences_words(block: dict[str, Any]) -> str:
    """What the evaluated sequences of a result (or its report block) are: eval-split sequences and how much of
    them the training split holds, or fresh ones (lm-eval's table and the report say it alike)."""
    if block.get("sequences_from") == "fresh":
        return "fresh sequences (never harvested)"
    share = block.get("training_split_share")
    if share is None:  # a result from before the share was recorded
        return "eval-split sequences"
    if share >= 1.0:  # an eval-split sequence has a row there: only a run with no eval split reaches 1
        return "sequences the dictionary was trained on (the run held out no shards)"
    return f"eval-split sequences, {share:.0%} of their tokens in the training split"


def lm_eval_note(block: dict[str, Any]) -> str | None:
    """A note for the report's Notes (and analyze's output) when a result is there but not shown."""
    if block["status"] not in ("stale", "unreadable"):
        return None
    return f"lm-eval result {block['path']} not shown: {block['reason']}; re-run `{block['command']}`"


_LOOP_TEXT = {
    "open": ("Open loop: every reconstruction is computed from the clean activations, then each model runs once "
             "with all of its spliced hooks replaced (a later hook's reconstruction is not fed the earlier splices; "
             "`--loop closed` feeds them, for CLTs and transcoders)."),
    "closed": ("Closed loop: one forward pass per model in which each input hook reads the activation of the "
               "spliced model (earlier output hooks already replaced) and each output hook is replaced by the "
               "reconstruction from those inputs (a CLT's replacement model)."),
}


def lm_eval_markdown(block: dict[str, Any]) -> list[str]:
    """report.md's section on what the models lose with the dictionary spliced in, from ``block``."""
    L = ["", "## What the models lose (lm-eval)", ""]
    path, command = block["path"], block["command"]
    if block["status"] == "missing":
        return L + [f"Not evaluated yet: `{command}` splices this dictionary into its models and writes `{path}`; "
                    "run analyze again to show it here."]
    if block["status"] != "current":
        what = "is stale" if block["status"] == "stale" else "cannot be read"
        return L + [f"`{path}` {what}: {block['reason']}. Its figures are not shown, as they may not be this "
                    f"dictionary's. Re-run `{command}`, then analyze."]
    when = f" written `{block['created']}`" if block.get("created") else ""
    sha = block["export_weights_sha256"][:12]
    L += [f"From `{path}`{when}, on this run's export (weights sha256 `{sha}…`). "
          "Next-token cross-entropy (nats per token) of each model as it is (clean), with the dictionary's "
          "reconstruction in place of its activations at the hooks the dictionary writes (spliced; tokens the "
          "harvest excluded, such as BOS, stay clean), and with those activations zeroed (zero-ablated). "
          "ΔCE = spliced − clean; loss recovered = (zero-ablated − spliced) / (zero-ablated − clean); "
          "KL = KL(clean ‖ spliced) of the next-token distributions, per token.", "",
          "| model | CE clean | CE spliced | ΔCE | CE zero-ablated | loss recovered | KL | sequences | tokens |",
          "|---|---|---|---|---|---|---|---|---|"]
    for m, r in block["models"].items():
        L.append(f"| `{m}` | {_fmt(r['ce_clean'], 4)} | {_fmt(r['ce_spliced'], 4)} | {_signed(r['delta_ce'])} | "
                 f"{_fmt(r['ce_zero_ablation'], 4)} | {_fmt(r['loss_recovered'])} | {_fmt(r['kl_spliced'], 4)} | "
                 f"{_int(block['sequences'])} | {_int(r['tokens'])} |")
    # Why the loop is said every time: for several hooks of one model, open-loop figures are not those of a
    # model running on its own reconstructions (README, "What the models lose").
    L += ["", _LOOP_TEXT.get(block.get("loop", "open"), f"{block.get('loop')} loop.")]
    if block.get("training_split_share"):
        L.append(f"The sequences are {sequences_words(block)}: the harvest shuffles a sequence's rows over several "
                 "shards, so most sequences have rows on both sides of the split.")
    if block["activation_check_median_rel_error"] is not None:
        L.append(f"The models reproduced the cache's activations to a median relative error of "
                 f"{_fmt(block['activation_check_median_rel_error'], 4)}.")
    if block["notes"]:
        L += [""] + [f"- lm-eval note: {n}" for n in block["notes"]]
    return L
