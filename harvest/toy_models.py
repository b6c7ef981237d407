"""A deterministic builder of a tiny real "base model and its fine-tunes" trio.

Tests and the default demo need real causal LMs to harvest activations from and diff, but the
machine they run on may have no network and only a couple of CPU cores. So we train our own,
in a few minutes, from corpora every CPython ships with (see :mod:`harvest.corpora`):

- ``toy-base``: a 4-layer GPT-NeoX (hidden 128) trained from scratch on prose (the language
  reference topics of ``pydoc_data``), with a byte-level BPE tokenizer of 4096 tokens.
- ``toy-code``: ``toy-base`` fine-tuned on an even mix of prose and standard-library Python, so
  it keeps its prose and gains code: the "interesting" model diff.
- ``toy-prose``: ``toy-base`` fine-tuned on prose alone with the same steps, tokens and
  hyper-parameters: the negative control (a fine-tune that should change little).

Each model is saved as an ordinary Hugging Face folder (config, safetensors weights, tokenizer)
plus ``toy_info.json`` with its held-out losses; the build folder also gets ``losses.json``,
which doubles as the "build finished" marker. Everything is seeded, so a rebuild on the same
machine gives the same weights. Builds are guarded by an ``fcntl`` lock and assembled in a
temporary folder that is renamed into place only when all three models are done, so
concurrent callers wait for one build and a killed build never looks complete.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import os
import random
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from harvest.corpora import builtin_documents
from shared.progress import transformers_bars_as_ours
from shared.shard_io import atomic_write_bytes

__all__ = ["TOY_NAMES", "build_toy_models", "ensure_toy_model", "is_toy_name", "toy_models_dir"]

TOY_NAMES: tuple[str, ...] = ("toy-base", "toy-code", "toy-prose")
BUILD_VERSION = "v1"  # bump when anything below changes the models, so caches rebuild
MARKER = "losses.json"

SEED = 0
VOCAB_SIZE = 4096
BOS, PAD = "<|endoftext|>", "<|padding|>"  # BOS doubles as EOS / document separator (id 0)
SEQ_LEN = 128
BATCH = 32
MODEL_CONFIG = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=512,
    max_position_embeddings=512,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=1,
    tie_word_embeddings=False,
)
# Steps are the time budget: at ~8k tokens/s on 2 cores one step of 32x128 tokens is ~0.5 s.
BASE = dict(steps=140, lr=3e-3, warmup=14, final_lr_frac=0.1, weight_decay=0.1)
FINETUNE = dict(steps=64, lr=3e-3, warmup=6, final_lr_frac=0.1, weight_decay=0.1)
EVAL_CODE_SEQS = 100  # a fixed subset of held-out code is plenty for a stable mean


def is_toy_name(name: str) -> bool:
    """Whether ``name`` is one of the built-in toy models (``toy-base``, ``toy-code``, ...)."""
    return name in TOY_NAMES


def toy_models_dir() -> Path:
    """Where the toy models live: ``$CROSSCACHE_TOY_DIR`` or ``~/.cache/crosscache/toy-models/v1``."""
    env = os.environ.get("CROSSCACHE_TOY_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "crosscache" / "toy-models" / BUILD_VERSION


def ensure_toy_model(name: str) -> Path:
    """Return the local Hugging Face folder of toy model ``name``, building all three on first use.

    Safe to call from many processes at once: one builds under a lock, the others wait for it.
    """
    if not is_toy_name(name):
        raise ValueError(f"unknown toy model {name!r}; choose one of {', '.join(TOY_NAMES)}")
    out_dir = toy_models_dir()
    if not (out_dir / MARKER).exists():
        with _build_lock(out_dir):
            if not (out_dir / MARKER).exists():  # another process may have finished meanwhile
                _build_atomically(out_dir, progress=True)
    folder = out_dir / name
    if _tokenizer_class(folder) == _TF5_TOKENIZER_CLASS:  # a build from before _portable_tokenizer_config
        with _build_lock(out_dir):
            _portable_tokenizer_config(folder)
    return folder


# transformers 5 saves tokenizers as "TokenizersBackend", a class transformers 4 does not have, so tools
# pinned to it (circuit-tracer 0.5: transformers <= 4.57) could not load the toy models. Both versions load
# "PreTrainedTokenizerFast" (transformers 5: an alias of TokenizersBackend) from the same tokenizer.json.
_TF5_TOKENIZER_CLASS = "TokenizersBackend"
_PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"


def _tokenizer_class(folder: Path) -> str | None:
    try:
        return json.loads((folder / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError):
        return None


def _portable_tokenizer_config(folder: Path) -> None:
    """Name the tokenizer class both transformers 4 and 5 load in ``folder``'s tokenizer_config.json
    (metadata only: the vocabulary, and so every fingerprint, stays as it is)."""
    path = folder / "tokenizer_config.json"
    if _tokenizer_class(folder) != _TF5_TOKENIZER_CLASS:
        return
    config = json.loads(path.read_text())
    config["tokenizer_class"] = _PORTABLE_TOKENIZER_CLASS
    atomic_write_bytes(path, [(json.dumps(config, indent=2) + "\n").encode()])


def build_toy_models(out_dir: Path, *, progress: bool = True) -> dict[str, Path]:
    """(Re)build all three toy models into ``out_dir``, replacing whatever is there.

    Returns ``{name: model folder}``. The new build appears atomically when it is complete.
    """
    out_dir = Path(out_dir)
    with _build_lock(out_dir):
        _build_atomically(out_dir, progress=progress)
    return {name: out_dir / name for name in TOY_NAMES}


# ----------------------------------------------------------------------------- locking, layout


@contextlib.contextmanager
def _build_lock(out_dir: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``<parent>/.<name>.lock``; released even if the build dies."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out_dir.parent / f".{out_dir.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build_atomically(out_dir: Path, *, progress: bool) -> None:
    """Build into a temporary sibling folder, then rename it over ``out_dir``. Hold the lock."""
    parent = out_dir.parent
    for stale in parent.glob(f".{out_dir.name}.tmp-*"):  # left by killed builds (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = parent / f".{out_dir.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        _build_into(tmp, progress=progress)
        if out_dir.exists():  # --force, or a folder without the marker: move it aside first
            trash = parent / f".{out_dir.name}.tmp-old-{os.getpid()}"
            os.rename(out_dir, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------- data


def _train_tokenizer(texts: list[str]):
    """Byte-level BPE with no post-processor, so encoding never adds BOS/EOS by itself."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[BOS, PAD],  # ids 0 and 1, in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any byte is encodable
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=BOS, pad_token=PAD)


def _encode(tokenizer, docs: list[dict]) -> list[list[int]]:
    return tokenizer([d["text"] for d in docs], add_special_tokens=False)["input_ids"]


def _pack(token_docs: list[list[int]], n_seqs: int | None, seed: int | None) -> torch.Tensor:
    """Pack documents into ``[n, SEQ_LEN]`` rows: BOS first, then documents joined by EOS.

    With a ``seed`` the document order is reshuffled each pass, and passes repeat until
    ``n_seqs`` rows exist; without one, a single pass in the given order (for evaluation).
    """
    body, rows, stream, epoch = SEQ_LEN - 1, [], [], 0
    while n_seqs is None or len(rows) < n_seqs:
        order = list(range(len(token_docs)))
        if seed is not None:
            random.Random(f"{seed}-{epoch}").shuffle(order)
        for i in order:
            stream.extend(token_docs[i])
            stream.append(0)  # EOS separator
            while len(stream) >= body and (n_seqs is None or len(rows) < n_seqs):
                rows.append([0] + stream[:body])
                stream = stream[body:]
        epoch += 1
        if n_seqs is None:
            break
    return torch.tensor(rows, dtype=torch.long)


# ----------------------------------------------------------------------------- training


def _lr_at(step: int, hp: dict) -> float:
    """Linear warmup, then cosine decay to ``final_lr_frac`` of the peak."""
    if step < hp["warmup"]:
        return hp["lr"] * (step + 1) / hp["warmup"]
    t = (step - hp["warmup"]) / max(1, hp["steps"] - hp["warmup"])
    frac = hp["final_lr_frac"] + (1 - hp["final_lr_frac"]) * 0.5 * (1 + math.cos(math.pi * t))
    return hp["lr"] * frac


def _lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in nats over every predicted position."""
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _train(model, data: torch.Tensor, hp: dict, *, seed: int, desc: str, progress: bool) -> dict:
    """Train on ``data`` rows in order, ``BATCH`` rows a step, with AdamW and the LR schedule."""
    from shared.progress import tqdm

    torch.manual_seed(seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]  # no decay on biases / norms
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": hp["weight_decay"]}, {"params": rest, "weight_decay": 0.0}],
        lr=hp["lr"],
        betas=(0.9, 0.95),
    )
    model.train()
    start, loss_ema = time.perf_counter(), None
    with tqdm(total=hp["steps"] * BATCH * SEQ_LEN, desc=desc, unit="tok", unit_scale=True,
              disable=not progress) as bar:
        for step in range(hp["steps"]):
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, hp)
            loss = _lm_loss(model, data[step * BATCH : (step + 1) * BATCH])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            loss_ema = loss.item() if loss_ema is None else 0.9 * loss_ema + 0.1 * loss.item()
            bar.update(BATCH * SEQ_LEN)
            bar.set_postfix(loss=f"{loss_ema:.3f}", refresh=False)
    model.eval()
    return {"tokens": hp["steps"] * BATCH * SEQ_LEN, "seconds": time.perf_counter() - start,
            "final_train_loss": loss_ema}


@torch.no_grad()
def _evaluate(model, evals: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean held-out loss (nats/token) on each evaluation set."""
    model.eval()
    out = {}
    for name, data in evals.items():
        total = sum(_lm_loss(model, data[i : i + 64]).item() * len(data[i : i + 64])
                    for i in range(0, len(data), 64))
        out[name] = total / len(data)  # every row has the same number of predicted tokens
    return out


def _build_into(out: Path, *, progress: bool) -> None:
    """Train the tokenizer and all three models into ``out``; ``losses.json`` is written last."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    random.seed(SEED)
    torch.manual_seed(SEED)
    prose_train = builtin_documents("docs", "train", seed=SEED)
    tokenizer = _train_tokenizer([d["text"] for d in prose_train])
    evals = {
        "prose": _pack(_encode(tokenizer, builtin_documents("docs", "eval", seed=SEED)), None, None),
        "code": _pack(_encode(tokenizer, builtin_documents("code", "eval", seed=SEED)),
                      None, None)[:EVAL_CODE_SEQS],
    }
    prose_ids = _encode(tokenizer, prose_train)
    mixed_ids = _encode(tokenizer, builtin_documents("mixed", "train", seed=SEED))

    def finish(name: str, model, stats: dict, parent: str | None, corpus: str, hp: dict) -> dict:
        losses = _evaluate(model, evals)
        folder = out / name
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        _portable_tokenizer_config(folder)
        info = {"name": name, "parent": parent, "train_corpus": corpus, "heldout_loss": losses,
                "eval_tokens": {k: int(v.shape[0] * (SEQ_LEN - 1)) for k, v in evals.items()},
                "tokens_trained": stats["tokens"], "seconds": round(stats["seconds"], 2),
                "tokens_per_second": round(stats["tokens"] / stats["seconds"], 1),
                "final_train_loss": stats["final_train_loss"], "seed": SEED, "seq_len": SEQ_LEN,
                "batch": BATCH, "hyperparameters": hp, "config": MODEL_CONFIG,
                "build_version": BUILD_VERSION}
        (folder / "toy_info.json").write_text(json.dumps(info, indent=2) + "\n")
        return info

    infos = {}
    config = GPTNeoXConfig(**MODEL_CONFIG)
    torch.manual_seed(SEED)
    base = GPTNeoXForCausalLM(config)
    data = _pack(prose_ids, BASE["steps"] * BATCH, seed=SEED)
    stats = _train(base, data, BASE, seed=SEED, desc="toy-base", progress=progress)
    infos["toy-base"] = finish("toy-base", base, stats, None, "builtin:docs", BASE)

    # Both fine-tunes start from the same weights and see the same number of tokens and steps.
    for name, corpus, ids in (("toy-code", "builtin:mixed", mixed_ids),
                              ("toy-prose", "builtin:docs", prose_ids)):
        with transformers_bars_as_ours():
            model = GPTNeoXForCausalLM.from_pretrained(out / "toy-base")
        data = _pack(ids, FINETUNE["steps"] * BATCH, seed=SEED + 1)
        stats = _train(model, data, FINETUNE, seed=SEED + 1, desc=name, progress=progress)
        infos[name] = finish(name, model, stats, "toy-base", corpus, FINETUNE)

    summary = {name: {"prose": i["heldout_loss"]["prose"], "code": i["heldout_loss"]["code"],
                      "tokens_trained": i["tokens_trained"], "seconds": i["seconds"]}
               for name, i in infos.items()}
    (out / MARKER).write_text(json.dumps(summary, indent=2) + "\n")


# ----------------------------------------------------------------------------- CLI


def _print_table(out_dir: Path) -> None:
    summary = json.loads((out_dir / MARKER).read_text())
    print(f"toy models in {out_dir}")
    print(f"{'model':<10} {'prose':>7} {'code':>7} {'tokens':>9} {'seconds':>8}   (held-out nats/token)")
    for name, row in summary.items():
        print(f"{name:<10} {row['prose']:>7.3f} {row['code']:>7.3f} "
              f"{row['tokens_trained']:>9,} {row['seconds']:>8.1f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description="Build the toy base/fine-tune model trio.")
    parser.add_argument("--out", type=Path, default=None, help="build folder (default: cache dir)")
    parser.add_argument("--force", action="store_true", help="rebuild even if already built")
    args = parser.parse_args(argv)
    out_dir = args.out if args.out is not None else toy_models_dir()
    start = time.perf_counter()
    if args.force or not (out_dir / MARKER).exists():
        with _build_lock(out_dir):
            if args.force or not (out_dir / MARKER).exists():
                _build_atomically(out_dir, progress=True)
    _print_table(out_dir)
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
