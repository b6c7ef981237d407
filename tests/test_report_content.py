"""What an analysis report says, checked against what it should say: latent scaling lists each latent
once with counts that add up, top contexts read as the text the model saw (whole characters, the spaces
of SentencePiece tokens), a 3-model crosscoder is diffed on a default pair, and each latent class keeps
its colour in every figure."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch

from shared.cache import CacheWriter
from shared.cache_format import Manifest, shard_file_name
from shared.token_table import write_token_table
from tests.test_analysis import _planted_cache, _planted_run
from train.analysis import _scaling_set, analyze
from train.analysis_config import AnalysisConfig
from train.analysis_run import diff_spec
from train.diffing import classify
from train.report_figures import CLASS_COLORS
from train.token_text import TokenDecoder, contexts, load_token_decoder

SPLIT = "\ufffd"  # what a decoder shows for part of a character


# ---- 1. latent scaling: each latent once, counts that add up ------------------------------------------------
def test_scaling_set_has_each_latent_once_when_top_r_latents_are_shared():
    """BatchTopK-like r, all in the shared band: the top-r latents are shared latents too. They get betas once,
    and the shared reference sample is other shared latents."""
    r_L = torch.linspace(0.45, 0.55, 40).double()
    cfg = AnalysisConfig(top_r_frac=0.1)
    masks = classify(r_L, cfg)
    top = torch.nonzero(masks["top_r"]).flatten().tolist()
    assert len(top) == 4 and masks["shared"][top].all()
    ids = _scaling_set(r_L, masks, cfg).tolist()
    assert len(ids) == len(set(ids)) == 40  # every latent once: 4 top-r, then the other 36 as the reference
    assert ids[:4] == sorted(top, reverse=True)  # highest r first
    small = AnalysisConfig(top_r_frac=0.1, scaling_max_latents=12)
    ids = _scaling_set(r_L, classify(r_L, small), small).tolist()
    assert len(ids) == len(set(ids)) == 12 and not set(ids[4:]) & set(top)


@pytest.fixture(scope="module")
def overlap(tmp_path_factory):
    """The planted run (latents 0 and 1 read by both models: r 0.5; 2 base-only; 3 fine-tune-only) analysed
    with the top half by r as a class: latent 3 and latent 0, which is also shared. The figures drawn are
    kept: {file name: matplotlib figure}."""
    from train import report_figures

    tmp = tmp_path_factory.mktemp("overlap")
    _planted_cache(tmp / "cache")
    run = _planted_run(tmp, tmp / "cache")
    drawn: dict[str, object] = {}
    real_save = report_figures._save

    def keep(fig, path: Path) -> str:
        drawn[path.name] = fig
        return real_save(fig, path)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(report_figures, "_save", keep)
        rep = analyze(AnalysisConfig(run=str(run), progress=False, top_r_frac=0.5, top_k=3))
    return {"rep": rep, "figs": drawn}


def test_latent_scaling_lists_each_latent_once_with_consistent_counts(overlap):
    rep = overlap["rep"]
    d = rep["diffing"]
    ls = d["latent_scaling"]
    assert d["counts"]["top_r"] == 2 and d["per_latent"]["r"][:4] == [0.5, 0.5, 0.0, 1.0]  # top by r: 3, then 0
    ids = [e["latent"] for e in ls["latents"]]
    assert len(ids) == len(set(ids)) and set(ids) == {0, 1, 3}
    assert {e["latent"]: e["group"] for e in ls["latents"]} == {3: "ft_only", 0: "top_r", 1: "shared"}
    g = ls["groups"]
    assert (g["ft_only"]["n"], g["top_r"]["n"], g["shared"]["n"]) == (1, 2, 1)  # top_r n counts latent 3 as well
    for name, group in g.items():
        assert group["n"] <= d["counts"][name]
        assert group["n_flagged"] == sum(e["flagged"] for e in ls["latents"] if e["group"] == name
                                         or (name == "top_r" and e["latent"] in (0, 3))) <= group["n"]
    # Latents 0 and 1 are read by both models alike (ν ≈ 1): top-r latent 0 is flagged, the shared reference
    # sample never is (it is what ν is read against).
    flagged = {e["latent"]: e["flagged"] for e in ls["latents"]}
    assert flagged == {0: True, 1: False, 3: False}, ls["latents"]
    assert g["shared"]["n_flagged"] == 0
    # report.md: one row per latent in the per-latent table, and the group counts as in report.json.
    md = Path(rep["paths"]["report_md"]).read_text()
    section = md.split("## Latent scaling", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\d+) \| ", section, flags=re.MULTILINE)
    assert sorted(rows) == ["0", "3"]
    assert re.search(r"^\| top 50% by r \| 2 \|", section, flags=re.MULTILINE)
    assert re.search(r"^\| shared \(reference sample\) \| 1 \|", section, flags=re.MULTILINE)
    # The scatter plot: one point per latent.
    fig = overlap["figs"]["latent_scaling.png"]
    points = sum(len(c.get_offsets()) for c in fig.axes[0].collections)
    assert points == sum(e["nu_err"] is not None and e["nu_rec"] is not None for e in ls["latents"]) <= 3


def test_shared_cosine_median_and_the_top_r_bound_are_exact(overlap):
    """The median of an even number of cosines is the mean of the middle two (torch's median() gave the lower
    one), and the top-r class's bound is rounded down: its least r 0.99154 read "≥ 0.992", which it is not."""
    import copy

    from train.report_data import cosine_summary
    from train.report_markdown import render_markdown

    assert cosine_summary(torch.tensor([0.4, 0.1, 0.3, 0.2])) == {"n": 4, "median": 0.25, "mean": 0.25,
                                                                  "frac_above_0.9": 0.0}
    assert cosine_summary(torch.tensor([0.95, 0.1, 0.3]))["median"] == 0.3
    assert cosine_summary(torch.tensor([]))["median"] is None
    rep = overlap["rep"]
    assert rep["diffing"]["cos_shared"]["n"] == 2
    for top_r_min, shown in ((0.99154, "0.991"), (0.992, "0.992"), (0.9999, "0.999"), (0.5, "0.500")):
        changed = copy.deepcopy(rep)
        changed["diffing"]["top_r_min"] = top_r_min
        md = render_markdown(changed, AnalysisConfig(run="x", progress=False, top_r_frac=0.5, top_k=3))
        assert re.search(rf"^\| top 50% by r \| ≥ {re.escape(shown)} \| 2 \|", md, flags=re.MULTILINE), top_r_min
    assert rep["diffing"]["top_r_min"] == 0.5  # report.json keeps it rounded down too (4 digits)


# ---- 4. one colour per class in every figure ----------------------------------------------------------------
def test_each_class_keeps_its_colour_when_a_class_is_empty(overlap):
    """No latent of the planted run is 'in between': the class-focus bars of the other classes keep their
    colours (fine-tune-only is not drawn in the shared green), the same as in the latent-scaling plot."""
    from matplotlib.colors import to_hex

    rep, figs = overlap["rep"], overlap["figs"]
    assert rep["diffing"]["classes"]["between"]["n"] == 0
    ax = figs["class_focus.png"].axes[0]
    labels = [t.get_text().split("\n")[0] for t in ax.get_xticklabels()]
    colours = {lab: to_hex(bar.get_facecolor()) for lab, bar in zip(labels, ax.patches)}
    assert colours == {"base-only": CLASS_COLORS["base_only"], "shared": CLASS_COLORS["shared"],
                       "fine-tune-only": CLASS_COLORS["ft_only"], "top by r": CLASS_COLORS["top_r"]}
    scatter = figs["latent_scaling.png"].axes[0]
    for coll in scatter.collections:
        label = coll.get_label()
        group = "shared" if label.startswith("shared") else "ft_only" if label.startswith("fine-tune") else "top_r"
        assert to_hex(coll.get_facecolor()[0]) == CLASS_COLORS[group], label
    assert len({to_hex(c) for c in CLASS_COLORS.values()}) == len(CLASS_COLORS)


# ---- 2. top contexts: the text the model read --------------------------------------------------------------
NON_ASCII = ["Über naïve façade: déjà vu, crème brûlée à la carte.", "Zoë’s résumé — “coöperate” ñandú, São Paulo.",
             "Café naïve résumé: “quotes” — ok. Ça va? Grüße aus Köln."]


def _check_windows(dec: TokenDecoder, ids: list[int], whole: str, sizes=((40, 40), (0, 0), (1, 0), (2, 1), (3, 2))):
    """Every window of ``ids`` (BOS first): no U+FFFD, and the shown text is a piece of ``whole``; with a
    window covering the sequence, exactly ``whole``. Returns the big-window contexts by position."""
    out = {}
    for pos in range(1, len(ids)):
        for before, after in sizes:
            c = contexts([(ids, pos)], dec, before, after)[0]
            shown = c["before"] + c["token"] + c["after"]
            assert SPLIT not in shown, (pos, before, after, c)
            assert c["token"] and shown in whole, (pos, before, after, c)
            if before >= len(ids):
                assert shown == whole and not c["cut_before"] and not c["cut_after"]
                out[pos] = c
    return out


def test_contexts_of_a_byte_level_tokenizer_show_whole_characters(toy_dirs):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(toy_dirs["toy-base"] / "tokenizer.json"))
    dec = TokenDecoder(tok)
    for text in NON_ASCII:
        ids = [0, *tok.encode(text, add_special_tokens=False).ids]
        whole = tok.decode(ids[1:])
        assert whole == text
        ctx = _check_windows(dec, ids, whole)
        for pos, c in ctx.items():
            alone = tok.decode([ids[pos]])
            if SPLIT in alone:  # part of a character: shown as the whole character
                assert len(c["token"]) == 1 and ord(c["token"]) > 127, c
            else:  # a token of whole characters: itself, leading space included
                assert c["token"] == alone, c
    ids = [0, *tok.encode("Café naïve", add_special_tokens=False).ids]  # C a f Ã © Ġn a Ã ¯ ve
    assert [tok.id_to_token(i) for i in ids[3:6]] == ["f", "Ã", "©"]
    assert [contexts([(ids, p)], dec, 20, 4)[0]["token"] for p in (4, 5, 6)] == ["é", "é", " n"]
    c = contexts([(ids, 4)], dec, 20, 4)[0]
    assert (c["before"], c["after"]) == ("Caf", " naï")  # Ġn a Ã ¯: the ï its last two tokens split, whole


def _sentencepiece(style: str):
    """A small SentencePiece-style BPE tokenizer (▁ for spaces, byte fallback), trained offline: ``llama2``
    as Llama-2's tokenizer.json (its decoder strips the first space of what it decodes), ``metaspace``
    with the Metaspace pre-tokenizer and decoder."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    if style == "llama2":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(replacement="▁",
                                                                                     prepend_scheme="always")])
    corpus = ["the quick brown fox jumps over the lazy dog"] * 50 + ["a cat sat on the mat"] * 50
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=320, special_tokens=specials))
    return tok


@pytest.mark.parametrize("style", ["llama2", "metaspace"])
def test_contexts_of_a_sentencepiece_tokenizer_keep_each_tokens_space(style, tmp_path):
    tok = _sentencepiece(style)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    meta = {"file": "tokenizer.json", "file_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    dec = load_token_decoder(meta, tmp_path)  # as a report reads a cache's own tokenizer.json
    assert isinstance(dec, TokenDecoder)
    bos = tok.token_to_id("<s>")
    for text in ("the quick brown fox jumps over the lazy dog", "the naïve cat — sat on the café mat"):
        ids = [bos, *tok.encode(text).ids]
        whole = tok.decode(ids[1:], skip_special_tokens=False)
        assert whole == text
        ctx = _check_windows(dec, ids, whole)
        for pos in range(2, len(ids)):
            piece = tok.id_to_token(ids[pos])
            if piece.startswith("▁"):  # its space is the token's, also where it is not the text's first
                assert ctx[pos]["token"].startswith(" "), (piece, ctx[pos])
                for before in (1, 3):
                    assert contexts([(ids, pos)], dec, before, 1)[0]["token"].startswith(" ")
            if piece.startswith("<0x"):  # a byte of a character: the whole character
                assert len(ctx[pos]["token"]) == 1 and ord(ctx[pos]["token"]) > 127
    ids = [bos, *tok.encode("the quick brown fox jumps over").ids]
    fo = next(p for p in range(1, len(ids)) if tok.id_to_token(ids[p]) in ("fo", "▁fo"))
    c = contexts([(ids, fo)], dec, 20, 1)[0]
    # As trained: llama2 has tokens '▁br' 'ow' 'n▁' 'fo' 'x▁', metaspace '▁br' 'ow' 'n' '▁fo' 'x'.
    want = {"llama2": "the quick brown «fo»x ", "metaspace": "the quick brown« fo»x"}[style]
    assert c["before"] + "«" + c["token"] + "»" + c["after"] == want


def _text_cache(path: Path, tokenizer_dir: Path, fire_on: int, seq_len: int = 24, n_seqs: int = 96) -> list[list[int]]:
    """A cache whose token table is real non-ASCII text (the toy tokenizer's ids) and whose activations put
    10·e0 in every slot where the token is ``fire_on`` (noise elsewhere), so the planted run's latent 0
    fires there; the manifest names the toy model folder as the tokenizer's path. Returns the sequences."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    stream = [i for text in NON_ASCII * 40 for i in tok.encode(text + " ", add_special_tokens=False).ids]
    ids = torch.tensor([[0] + stream[s * seq_len: (s + 1) * seq_len] for s in range(n_seqs)])
    g = torch.Generator().manual_seed(0)
    seq = torch.arange(n_seqs).repeat_interleave(seq_len)
    pos = torch.arange(1, seq_len + 1).repeat(n_seqs)
    token = ids[seq, pos]
    acts = torch.randn(len(seq), 2, 1, 16, generator=g) * 0.1
    acts[:, :, :, 0] += (token == fire_on).float()[:, None, None] * 10
    perm = torch.randperm(len(seq), generator=g)
    man = Manifest(
        models=[{"name": "model0", "path": None}, {"name": "model1", "path": None}],
        hooks=["blocks.0.hook_resid_post"], d_model=16, dtype="float32", context_size=seq_len + 1, n_rows=0,
        shards=[], normalization={"method": "none", "scale": [[1.0], [1.0]], "file": None, "calibration_rows": 0},
        excluded_tokens={"special": True, "token_ids": [0]}, dataset={"name": "non-ascii"},
        tokenizer={"name": "toy-base", "path": str(tokenizer_dir), "vocab_size": tok.get_vocab_size()},
        created_by={"tool": "tests/test_report_content.py"}, complete=False, extra={"n_sequences": n_seqs})
    w = CacheWriter(path, man)
    for s, lo in enumerate(range(0, len(seq), 256)):
        r = perm[lo:lo + 256]
        w.add_shard(shard_file_name(s), acts[r].contiguous(), seq[r], pos[r].to(torch.int32), token[r].to(torch.int32))
    write_token_table(path, ids.tolist(), {"source": ["code" if s % 2 == 0 else "docs" for s in range(n_seqs)]})
    w.finish()
    return ids.tolist()


def test_report_shows_top_contexts_as_the_text_the_model_read(toy_dirs, tmp_path):
    """End to end: a latent that fires on 'Ã' (the first byte of é, ï, ü, ... in the byte-level vocabulary)
    shows that character whole in report.json and report.md, never U+FFFD."""
    from tokenizers import Tokenizer

    folder = toy_dirs["toy-base"]
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    lead = tok.token_to_id("Ã")
    seqs = _text_cache(tmp_path / "cache", folder, fire_on=lead)
    run = _planted_run(tmp_path, tmp_path / "cache")
    rep = analyze(AnalysisConfig(run=str(run), progress=False, top_k=8, latents_shown=8))
    shown = {e["latent"]: e for e in rep["shown_latents"] if not e["repeat"]}
    ctxs = shown[0]["contexts"]
    assert len(ctxs) == 8
    for c in ctxs:
        assert c["token_id"] == lead
        assert len(c["token"]) == 1 and c["token"].encode()[0] == 0xC3, c  # é, ï, ü, ß, ...: whole
        shown_text = c["before"] + c["token"] + c["after"]
        assert SPLIT not in json.dumps(c, ensure_ascii=False) and shown_text in tok.decode(seqs[c["seq"]][1:])
    md = Path(rep["paths"]["report_md"]).read_text()
    assert SPLIT not in md and f"«{ctxs[0]['token']}»" in md


# ---- 3. a crosscoder of three models --------------------------------------------------------------------------
def test_three_model_roles_default_to_the_first_two():
    class FakeRun:
        arch, out_slot_names = "crosscoder", ["a/h", "b/h", "c/h"]

    run = FakeRun()
    for base, ft, want in ((None, None, ("a", "b")), (None, "c", ("a", "c")), (None, "a", ("b", "a")),
                           ("b", None, ("b", "a")), ("c", "b", ("c", "b"))):
        spec, note = diff_spec(run, base, ft)  # type: ignore[arg-type]
        assert spec is not None and (spec.base, spec.ft) == want, (base, ft)
        left_out = ({"a", "b", "c"} - set(want)).pop()
        assert f"leave out ['{left_out}']" in note and "--base-model" in note
    spec, note = diff_spec(type("Two", (), {"arch": "crosscoder", "out_slot_names": ["a/h", "b/h"]})())  # type: ignore[arg-type]
    assert (spec.base, spec.ft, note) == ("a", "b", "")


def test_three_model_crosscoder_is_diffed_on_the_first_two_models(tmp_path):
    _planted_cache(tmp_path / "cache", n_models=3)
    run = _planted_run(tmp_path, tmp_path / "cache")
    rep = analyze(AnalysisConfig(run=str(run), progress=False, top_k=2))
    d = rep["diffing"]
    assert (d["base_model"], d["ft_model"]) == ("model0", "model1") and "latent_scaling" in d
    assert any("reads 3 models" in n and "leave out ['model2']" in n for n in rep["notes"])
    assert "## Relative decoder norms" in Path(rep["paths"]["report_md"]).read_text()
    rep = analyze(AnalysisConfig(run=str(run), out=str(tmp_path / "ft2"), progress=False, top_k=2, ft_model="model2"))
    assert (rep["diffing"]["base_model"], rep["diffing"]["ft_model"]) == ("model0", "model2")


def test_r_histogram_leaves_out_tied_latents_and_the_text_names_the_caches_normalization(tmp_path):
    """The histogram counted latents with one shared decoder (r = 0.5 by construction) while the class table left
    them out; and a cache harvested with --normalize none was described as scaled to one mean norm."""
    from train.config import TrainConfig
    from train.trainer import train

    _planted_cache(tmp_path / "cache")  # --normalize none
    run = tmp_path / "run"
    train(TrainConfig(cache=str(tmp_path / "cache"), out=str(run), latents=16, shared_latents=4, steps=3,
                      batch_size=64, device="cpu", progress=False, eval_shards=2, log_every=1))
    rep = analyze(AnalysisConfig(run=str(run), progress=False, top_k=2))
    d = rep["diffing"]
    assert d["counts"]["tied"] == 4 and d["normalization"] == "none"
    assert sum(d["r_histogram"]["counts"]) == 16 - 4 - d["counts"]["no_decoder"]
    assert any("not normalized" in n and "--normalize norm_scale" in n for n in rep["notes"])
    text = Path(rep["paths"]["report_md"]).read_text()
    assert "on the raw activations the dictionary was trained on" in text and "same mean norm" not in text
