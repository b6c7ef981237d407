"""Analysis of trained runs (train/analysis.py, train/report.py): diffing math on hand-built
dictionaries, latent scaling on planted data, top contexts and metadata on a synthetic cache
whose latents fire on known tokens, report files, bad input, and the known answer on the toy trio."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from shared.cache import CacheWriter
from shared.cache_format import Manifest, shard_file_name
from shared.token_table import write_token_table
from train.analysis import analyze
from train.analysis_config import AnalysisConfig
from train.analysis_run import DiffSpec, RunError, diff_spec, load_run
from train.analysis_stream import StreamStats, default_batch_rows
from train.dictionary import Dictionary, DictionaryConfig
from train.diffing import classify, relative_norms, scaling_betas
from train.export import save_dictionary

D = 16
MARK_TOKEN = 7  # latent 0 of the planted run fires exactly on this token id


def _dict(n_models: int = 2, n_hooks: int = 1, L: int = 4, d: int = 4, arch: str = "crosscoder", **kw) -> Dictionary:
    names = [f"m{m}/blocks.{p}.hook_resid_post" for m in range(n_models) for p in range(n_hooks)]
    slots = list(range(len(names)))
    cfg = DictionaryConfig(arch=arch, activation="relu", d_model=d, n_latents=L, in_slots=kw.pop("in_slots", slots),
                           out_slots=kw.pop("out_slots", slots), slot_names=names, **kw)
    torch.manual_seed(0)
    return Dictionary(cfg)


# ---- pure math ---------------------------------------------------------------------------------------
def test_relative_norms_on_a_hand_built_decoder():
    dec = torch.zeros(5, 2, 4)  # [L, Xo = (base, ft), D]
    dec[0, 0] = torch.tensor([1.0, 0, 0, 0])  # base only -> r 0
    dec[1, 0] = dec[1, 1] = torch.tensor([0, 2.0, 0, 0])  # equal -> r 0.5, cos 1
    dec[2, 1] = torch.tensor([0, 0, 3.0, 0])  # ft only -> r 1
    dec[3, 0], dec[3, 1] = torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 3.0, 0, 0])  # r 3/4, cos 0
    # latent 4: all zero -> NaN
    r, cos = relative_norms(dec, DiffSpec("m0", "m1", [0], [1]))
    assert r[:4].tolist() == pytest.approx([0.0, 0.5, 1.0, 0.75])
    assert math.isnan(r[4]) and math.isnan(cos[0]) and math.isnan(cos[2]) and math.isnan(cos[4])
    assert cos[1] == pytest.approx(1.0) and cos[3] == pytest.approx(0.0)
    # Several hooks: a model's decoder is its slots concatenated (norm = sqrt of the sum of squares).
    dec2 = torch.zeros(1, 4, 4)  # slots m0/h0, m0/h1, m1/h0, m1/h1
    dec2[0, 0, 0], dec2[0, 1, 1] = 3.0, 4.0  # base norm 5
    dec2[0, 2, 0], dec2[0, 3, 2] = 6.0, 8.0  # ft norm 10, cos = 18 / 50
    r2, cos2 = relative_norms(dec2, DiffSpec("m0", "m1", [0, 1], [2, 3]))
    assert r2.item() == pytest.approx(10 / 15) and cos2.item() == pytest.approx(18 / 50)


def test_classes_and_thresholds():
    r = torch.tensor([0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 1.0, float("nan")], dtype=torch.float64)
    m = classify(r, AnalysisConfig())
    assert torch.nonzero(m["base_only"]).flatten().tolist() == [0, 1, 2]
    assert torch.nonzero(m["between"]).flatten().tolist() == [3, 7]
    assert torch.nonzero(m["shared"]).flatten().tolist() == [4, 5, 6]
    assert torch.nonzero(m["ft_only"]).flatten().tolist() == [8, 9, 10]
    assert torch.nonzero(m["no_decoder"]).flatten().tolist() == [11]
    assert torch.nonzero(m["top_r"]).flatten().tolist() == [10]  # ceil(2% of 11 valid) = 1
    # Configurable thresholds and top fraction; ties go to the lower index; tied latents are in no class.
    cfg = AnalysisConfig(base_only_max=0.2, shared_min=0.4, shared_max=0.6, ft_only_min=0.95, top_r_frac=0.25)
    tied = torch.zeros(12, dtype=torch.bool)
    tied[5] = True
    m = classify(r, cfg, tied)
    assert torch.nonzero(m["base_only"]).flatten().tolist() == [0, 1, 2, 3]
    assert torch.nonzero(m["shared"]).flatten().tolist() == []
    assert torch.nonzero(m["ft_only"]).flatten().tolist() == [9, 10]
    assert torch.nonzero(m["tied"]).flatten().tolist() == [5]
    assert torch.nonzero(m["top_r"]).flatten().tolist() == [8, 9, 10]  # ceil(0.25 * 10 valid) = 3
    same = classify(torch.full((4,), 0.5, dtype=torch.float64), AnalysisConfig(top_r_frac=0.5))
    assert torch.nonzero(same["top_r"]).flatten().tolist() == [0, 1]
    for bad in (dict(base_only_max=0.5), dict(ft_only_min=0.6), dict(top_r_frac=0.0), dict(focus="source"),
                dict(nu_max=-1.0)):
        with pytest.raises(ValueError):
            AnalysisConfig(**bad)


def test_diff_roles():
    class FakeRun:
        def __init__(self, arch, names):
            self.arch, self.out_slot_names = arch, names

    names = ["a/h0", "b/h0"]
    spec, _ = diff_spec(FakeRun("crosscoder", names))  # type: ignore[arg-type]
    assert (spec.base, spec.ft, spec.base_slots, spec.ft_slots) == ("a", "b", [0], [1])
    spec, _ = diff_spec(FakeRun("crosscoder", names), ft="a")  # type: ignore[arg-type]
    assert (spec.base, spec.ft, spec.base_slots, spec.ft_slots) == ("b", "a", [1], [0])
    assert diff_spec(FakeRun("crosscoder", ["a/h0", "a/h1"]))[0] is None  # type: ignore[arg-type]
    assert diff_spec(FakeRun("clt", names))[0] is None  # type: ignore[arg-type]
    three = diff_spec(FakeRun("crosscoder", ["a/h", "b/h", "c/h"]))[0]  # type: ignore[arg-type]
    assert three is not None and (three.base, three.ft) == ("a", "b")  # 3+ models: the first two
    with pytest.raises(ValueError, match="not a model"):
        diff_spec(FakeRun("crosscoder", names), base="zz")  # type: ignore[arg-type]


def _stream(model: Dictionary, x_BXD: torch.Tensor, ids: list[int], spec: DiffSpec) -> dict[str, torch.Tensor]:
    dec = model.decoder_weight().detach()
    st = StreamStats(model.cfg.n_latents, 3, {}, model.cfg.n_out, model.cfg.d_model,
                     (torch.tensor(ids), dec[ids], spec), torch.device("cpu"))
    B = x_BXD.shape[0]
    for lo in range(0, B, 100):  # several batches: the sums must add up
        st.update(model, x_BXD[lo:lo + 100], x_BXD[lo:lo + 100], torch.arange(lo, min(lo + 100, B)),
                  torch.ones(min(100, B - lo), dtype=torch.int64))
    return scaling_betas(st.sc)


def test_latent_scaling_on_a_planted_latent():
    """Latent 0 writes e0 into the fine-tune only; the data puts 0.3 of it into the base too (and
    orthogonal noise everywhere): β_ε(base) = 0.3, β_ε(ft) = 1, ν_ε = 0.3; the base reconstruction
    holds none of it (ν_r = 0); the base activation holds 0.3 (ν_x = 0.3)."""
    model = _dict(L=2, d=8)
    with torch.no_grad():
        model.W_dec_LXoD.zero_()
        model.W_enc_XiDL.zero_()
        model.b_enc_L.zero_()
        model.b_dec_XoD.zero_()
        model.W_dec_LXoD[0, 1, 0] = 2.0  # ft decoder 2·e0
        model.W_enc_XiDL[1, 0, 0] = 0.5  # latent 0 = relu(0.5 · x_ft[0])
    g = torch.Generator().manual_seed(0)
    n = 500
    f = torch.rand(n, generator=g) * 3 + 0.5
    x = torch.zeros(n, 2, 8)
    x[:, 1, 0] = 2 * f  # ft: f · d
    x[:, 0, 0] = 0.3 * 2 * f  # base: 0.3 of it
    x[:, :, 1:] = torch.randn(n, 2, 7, generator=g)  # orthogonal to d
    b = _stream(model, x, [0], DiffSpec("m0", "m1", [0], [1]))
    assert b["beta_err_base"].item() == pytest.approx(0.3, abs=1e-5)
    assert b["beta_err_ft"].item() == pytest.approx(1.0, abs=1e-5)
    assert b["nu_err"].item() == pytest.approx(0.3, abs=1e-5)
    assert b["beta_rec_base"].item() == pytest.approx(0.0, abs=1e-6)
    assert b["nu_rec"].item() == pytest.approx(0.0, abs=1e-6)
    assert b["nu_act"].item() == pytest.approx(0.3, abs=1e-5)
    assert math.isnan(_stream(model, x, [1], DiffSpec("m0", "m1", [0], [1]))["beta_err_base"].item())  # never fires


def test_latent_scaling_matches_a_per_latent_least_squares_fit():
    """The streamed closed form (error target with latent j's own term added back analytically)
    equals an explicit least-squares fit of β·f·d to y^(j) = x − x̂ + f·d^m on the firing rows."""
    model = _dict(L=6, d=5)
    x = torch.randn(300, 2, 5, generator=torch.Generator().manual_seed(1)) * 2
    ids = [0, 2, 5]
    spec = DiffSpec("m0", "m1", [0], [1])
    b = _stream(model, x, ids, spec)
    with torch.no_grad():
        out = model(x, inference=True)
        dec = model.decoder_weight()
        for i, j in enumerate(ids):
            f = out.latents_BL[:, j]
            on = f > 0
            d = dec[j, 1]
            for m, slot in (("base", 0), ("ft", 1)):
                y = x[on, slot] - out.recon_BXoD[on, slot] + f[on, None] * dec[j, slot]
                a = (f[on, None] * d).reshape(-1, 1).double()
                beta = torch.linalg.lstsq(a, y.reshape(-1, 1).double()).solution.item()
                assert b[f"beta_err_{m}"][i].item() == pytest.approx(beta, rel=1e-4, abs=1e-6)
                yr = out.recon_BXoD[on, slot].reshape(-1, 1).double()
                assert b[f"beta_rec_{m}"][i].item() == pytest.approx(
                    torch.linalg.lstsq(a, yr).solution.item(), rel=1e-4, abs=1e-6)


def test_streamed_latent_statistics_match_a_brute_force_pass():
    """Counts, mass, max, metadata and the running top-k (merged batch by batch, sparse) equal the same
    numbers computed on the whole activation matrix at once."""
    g = torch.Generator().manual_seed(0)
    n, L, K = 700, 40, 4
    f = torch.rand(n, L, generator=g) * (torch.rand(n, L, generator=g) < 0.1)
    f[:, 7] = 0  # a latent that never fires
    seq, pos = torch.arange(n) // 7, torch.arange(n) % 7 + 1
    codes = (torch.arange(n // 7 + 1) % 3).numpy()
    st = StreamStats(L, K, {"source": (["a", "b", "c"], codes)}, 1, 2, None, torch.device("cpu"))
    perm = torch.randperm(n, generator=g)
    for lo in range(0, n, 128):
        rows = perm[lo:lo + 128]
        r, lat = f[rows].nonzero(as_tuple=True)
        st.add_latents(r, lat, f[rows][r, lat], seq[rows], pos[rows])
    assert st.rows == n and st.nnz == int((f > 0).sum())
    assert torch.equal(st.fires_L, (f > 0).sum(0).double())
    assert torch.allclose(st.mass_L, f.sum(0).double()) and torch.equal(st.max_L, f.max(0).values)
    v = torch.from_numpy(codes)[seq]
    for i in range(3):
        assert torch.allclose(st.meta_mass["source"][:, i], f[v == i].sum(0).double())
        assert torch.equal(st.meta_fires["source"][:, i], (f[v == i] > 0).sum(0).double())
    top_v, top_i = f.topk(K, dim=0)
    fired = top_v > 0
    assert torch.equal(st.top_val_KL[fired], top_v[fired]) and (st.top_val_KL[~fired] == 0).all()
    assert torch.equal(st.top_seq_KL[fired], seq[top_i][fired]) and torch.equal(st.top_pos_KL[fired], pos[top_i][fired])
    assert (st.top_seq_KL[:, 7] == -1).all()


# ---- a planted run: latents that fire on a known token and on one metadata value -------------------------
def _planted_cache(path: Path, *, n_models: int = 2, n_hooks: int = 1, n_seqs: int = 96, seq_len: int = 17,
                   rows_per_shard: int = 256, seed: int = 0) -> dict:
    """Rows of ``n_seqs`` sequences; ``source`` alternates code/docs by sequence. Activations: noise, plus
    10·e0 in every slot where the token is MARK_TOKEN, plus 5·e1 in every slot of a code sequence."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(8, 200, (n_seqs, seq_len), generator=g)
    ids[:, 0] = 0  # BOS
    ids[torch.rand(n_seqs, seq_len, generator=g) < 0.05] = MARK_TOKEN
    ids[:, 0] = 0
    source = ["code" if s % 2 == 0 else "docs" for s in range(n_seqs)]
    seq = torch.arange(n_seqs).repeat_interleave(seq_len - 1)
    pos = torch.arange(1, seq_len).repeat(n_seqs)
    tok = ids[seq, pos]
    n = len(seq)
    acts = torch.randn(n, n_models, n_hooks, D, generator=g) * 0.1
    acts[:, :, :, 0] += (tok == MARK_TOKEN).float()[:, None, None] * 10
    acts[:, :, :, 1] += torch.tensor([s == "code" for s in source])[seq].float()[:, None, None] * 5
    perm = torch.randperm(n, generator=g)
    models = [f"model{m}" for m in range(n_models)]
    man = Manifest(
        models=[{"name": m, "path": None} for m in models],
        hooks=[f"blocks.{p}.hook_resid_post" for p in range(n_hooks)],
        d_model=D, dtype="float32", context_size=seq_len, n_rows=0, shards=[],
        normalization={"method": "none", "scale": [[1.0] * n_hooks] * n_models, "file": None, "calibration_rows": 0},
        excluded_tokens={"special": True, "token_ids": [0]}, dataset={"name": "planted"},
        tokenizer={"name": "none", "vocab_size": 256}, created_by={"tool": "tests/test_analysis.py"}, complete=False,
        extra={"n_sequences": n_seqs})
    w = CacheWriter(path, man)
    for s, lo in enumerate(range(0, n, rows_per_shard)):
        r = perm[lo:lo + rows_per_shard]
        w.add_shard(shard_file_name(s), acts[r].contiguous(), seq[r], pos[r].to(torch.int32), tok[r].to(torch.int32))
    write_token_table(path, ids.tolist(), {"source": source})
    w.finish()
    return {"ids": ids, "source": source, "acts": acts, "seq": seq, "pos": pos, "tok": tok}


def _planted_run(tmp: Path, cache: Path, **train_kw) -> Path:
    """A real (tiny) training run on ``cache``; then its dictionary/ is replaced by a hand-set one whose
    latent 0 reads e0 (the marked token) and latent 1 reads e1 (code sequences) from every input slot."""
    from train.config import TrainConfig
    from train.export import load_dictionary
    from train.trainer import train

    out = tmp / "run"
    kw = dict(cache=str(cache), out=str(out), latents=8, steps=2, batch_size=64, device="cpu", progress=False,
              eval_shards=2, log_every=1)
    kw.update(train_kw)
    train(TrainConfig(**kw))
    model = load_dictionary(out / "dictionary")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        W_enc = model.W_enc_XiDL  # [Xi, D, L] (clt: L of one layer, so latent j of every layer)
        W_enc[:, 0, 0] = 1.0
        W_enc[:, 1, 1] = 1.0
        b = model.b_enc_L
        b[:2] = torch.tensor([-5.0, -2.5])  # relu(x·e - t): fires on the marked token / on code only
        if model.cfg.arch == "clt":
            model.W_dec_XiLXoD[:, 0, :, 0] = 1.0
            model.W_dec_XiLXoD[:, 1, :, 1] = 1.0
        else:
            dec = model.W_dec_LXoD
            dec[0, :, 0] = 1.0
            dec[1, :, 1] = 1.0
            if model.cfg.n_out == 2:  # diffing: latent 2 base-only, latent 3 ft-only (decoder only)
                dec[2, 0, 2] = 1.0
                dec[3, 1, 3] = 1.0
    save_dictionary(out / "dictionary", model, {"space": "normalized"})
    return out


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("planted")
    info = _planted_cache(tmp / "cache")
    run = _planted_run(tmp, tmp / "cache")
    rep = analyze(AnalysisConfig(run=str(run), progress=False, top_k=5, latents_shown=8))
    return {"tmp": tmp, "run": run, "rep": rep, **info}


def test_contexts_are_text_from_the_caches_own_tokenizer(tmp_path):
    """A cache that holds its tokenizer.json shows contexts as text, with no model folder to find one in."""
    from tests.cache_factory import add_tokenizer

    _planted_cache(tmp_path / "cache")
    add_tokenizer(tmp_path / "cache")  # the manifest names no path; the cache's own file: id i is "t{i}"
    run = _planted_run(tmp_path, tmp_path / "cache")
    rep = analyze(AnalysisConfig(run=str(run), progress=False, top_k=3, latents_shown=8))
    shown = {e["latent"]: e for e in rep["shown_latents"] if not e["repeat"]}
    assert shown[0]["contexts"] and all(c["token"] == f"t{MARK_TOKEN}" for c in shown[0]["contexts"])
    assert not any("no tokenizer.json" in n for n in rep["notes"]), rep["notes"]
    # A tokenizer.json that is not the one the manifest lists (swapped in) would show wrong text: not used.
    swapped = json.loads((tmp_path / "cache" / "tokenizer.json").read_text())
    swapped["model"]["vocab"] = {f"x{v}": v for v in swapped["model"]["vocab"].values()}
    (tmp_path / "cache" / "tokenizer.json").write_text(json.dumps(swapped))
    rep = analyze(AnalysisConfig(run=str(run), out=str(tmp_path / "again"), progress=False, top_k=3, latents_shown=8))
    shown = {e["latent"]: e for e in rep["shown_latents"] if not e["repeat"]}
    assert all(c["token"] == f"<{MARK_TOKEN}>" for c in shown[0]["contexts"])
    assert any("no tokenizer.json" in n for n in rep["notes"])


def test_tokenizer_notes_say_what_is_missing(tmp_path):
    """A manifest whose tokenizer names nothing says so (not "no tokenizer.json for None"); a cache's own
    tokenizer.json that fails its check or does not load is named, rather than the model name blamed."""
    import hashlib

    cache = tmp_path / "cache"
    _planted_cache(cache)
    run = _planted_run(tmp_path, cache)
    path = cache / "manifest.json"
    obj = json.loads(path.read_text())

    def note(tokenizer: dict, out: str) -> list[str]:
        path.write_text(json.dumps({**obj, "tokenizer": tokenizer}))
        rep = analyze(AnalysisConfig(run=str(run), out=str(tmp_path / out), progress=False, top_k=1, latents_shown=1))
        return [n for n in rep["notes"] if "contexts show token ids" in n]

    assert note({}, "a") == ["the manifest's tokenizer object lists no file, path or name to find one by: contexts "
                             "show token ids as <id>"]
    (cache / "tokenizer.json").write_text("not json")
    listed = {"name": "no-such-model", "file": "tokenizer.json"}
    assert note({**listed, "file_sha256": hashlib.sha256(b"not json").hexdigest()}, "b") == [
        f"the cache's own {cache / 'tokenizer.json'} does not load as a tokenizers tokenizer.json; no tokenizer.json "
        "for 'no-such-model' was found offline: contexts show token ids as <id>"]
    assert note({**listed, "file_sha256": "0" * 64}, "c") == [
        "the cache's own tokenizer.json is unusable (tokenizer.json: sha256 mismatch (corrupted)); no tokenizer.json "
        "for 'no-such-model' was found offline: contexts show token ids as <id>"]


def test_rows_outside_the_token_table_are_refused_with_verify_advice(tmp_path, capsys):
    """Rows whose (seq, pos) is not a token of tokens.arrow (verify names them) stop the analysis with a clear
    error, not an IndexError deep in the report (or, for a negative pos, a context from the sequence's end)."""
    import numpy as np
    import pyarrow as pa

    import run_train

    cache = tmp_path / "cache"
    info = _planted_cache(cache)
    run = _planted_run(tmp_path, cache)
    ids, source = info["ids"].tolist(), info["source"]
    for table, meta, match in [([x[:3] for x in ids], source, "pos values past their sequence's length"),
                               (ids[:10], source[:10], r"seq values outside the tokens.arrow sequences 0..9")]:
        (cache / "tokens.arrow").unlink()
        write_token_table(cache, table, {"source": meta})
        with pytest.raises(RunError, match=rf"eval split's rows hold {match}.*run_harvest.py verify {cache}"):
            analyze(AnalysisConfig(run=str(run), progress=False))
    assert run_train.main(["analyze", str(run), "--no-progress"]) == 2
    assert "run_harvest.py verify" in capsys.readouterr().err
    # The same check refuses a negative pos, which indexing would take from the sequence's end.
    from shared.token_table import position_problem, sequence_lengths

    lengths = sequence_lengths(pa.table({"seq": pa.array([0, 1], pa.int64()), "input_ids": [[0, 5, 6], [0, 7]]}))
    assert position_problem(np.array([0, 1]), np.array([2, 1]), lengths) is None
    assert "negative pos values" in str(position_problem(np.array([0, 1]), np.array([2, -1]), lengths))


def test_held_out_shards_of_no_rows_are_analysed_as_no_held_out_split(tmp_path):
    """A run whose held-out shards hold 0 rows (training refuses such a split now; older runs have one) is
    analysed on the train split with the note a one-shard cache gets, not refused with "batch_size ... got 0"."""
    from tests.cache_factory import make_cache
    from train.config import TrainConfig
    from train.trainer import train

    cache, run = tmp_path / "cache", tmp_path / "run"
    make_cache(cache, n_shards=3, rows_per_shard=[256, 256, 0], d_model=D)
    train(TrainConfig(cache=str(cache), out=str(run), latents=8, steps=2, batch_size=64, device="cpu",
                      progress=False, eval_shards=0))
    cfg = json.loads((run / "config.json").read_text())
    cfg["config"]["eval_shards"] = None  # the default: the last shard, of 0 rows
    (run / "config.json").write_text(json.dumps(cfg))
    rep = analyze(AnalysisConfig(run=str(run), progress=False))
    assert rep["eval"]["split"] == "train" and rep["eval"]["rows"] == 512
    assert any("no held-out split (eval_shards = 1 of 3 shards, and they hold 0 rows)" in n for n in rep["notes"])


def test_top_contexts_mark_the_firing_token(planted):
    rep, ids = planted["rep"], planted["ids"]
    shown = {e["latent"]: e for e in rep["shown_latents"] if not e["repeat"]}
    assert 0 in shown, [e["latent"] for e in rep["shown_latents"]]
    ctxs = shown[0]["contexts"]
    assert len(ctxs) == 5
    for c in ctxs:
        assert c["token_id"] == MARK_TOKEN and ids[c["seq"], c["pos"]].item() == MARK_TOKEN
        assert c["token"] == f"<{MARK_TOKEN}>"  # no tokenizer in this cache: ids are shown
        before = ids[c["seq"], max(1, c["pos"] - 20): c["pos"]].tolist()
        assert c["before"] == "".join(f"<{t}>" for t in before)
        assert c["meta"]["source"] == planted["source"][c["seq"]]
        assert c["value"] == pytest.approx(15.0, abs=1.0)  # relu(10 + 10 - 5) over the two models
        assert c["cut_before"] == (c["pos"] - 20 > 1) and c["cut_after"] == (c["pos"] + 5 < ids.shape[1])
    md = (Path(rep["paths"]["report_md"])).read_text()
    assert f"«<{MARK_TOKEN}>»" in md

    from train.token_text import contexts

    whole = contexts([([0, 5, 6, 7], 2)], None, before=20, after=4)[0]  # the sequence's start and end are shown
    assert (whole["before"], whole["after"], whole["cut_before"], whole["cut_after"]) == ("<5>", "<7>", False, False)
    assert contexts([(list(range(40)), 30)], None, before=3, after=2)[0]["cut_before"] is True


def test_metadata_breakdown(planted):
    rep = planted["rep"]
    ev = rep["eval"]
    from shared.cache import open_cache
    from train.loader import ActivationLoader

    loader = ActivationLoader(open_cache(planted["tmp"] / "cache"), 64, split="eval", eval_shards=2, with_index=True)
    seqs = torch.cat([idx[:, 0] for _, idx in loader])
    assert ev["rows"] == len(seqs)
    code = torch.tensor([planted["source"][s] == "code" for s in seqs.tolist()])
    assert ev["row_share"]["source"]["code"] == pytest.approx(code.float().mean().item(), abs=1e-4)
    assert rep["focus"] == {"column": "source", "value": "code", "base_rate": ev["row_share"]["source"]["code"]}
    focus = rep["latents"]["focus_share"]
    assert focus[1] == pytest.approx(1.0)  # latent 1 fires on code sequences only
    toks = torch.tensor([planted["ids"][s, p].item() for s, p in zip(seqs.tolist(), torch.cat(
        [idx[:, 1] for _, idx in ActivationLoader(open_cache(planted["tmp"] / "cache"), 64, split="eval",
                                                  eval_shards=2, with_index=True)]).tolist())])
    marked = toks == MARK_TOKEN
    assert rep["latents"]["fires"][0] == int(marked.sum())
    # Class shares are mass-weighted over the class's latents; ft-only here is latent 3 (never fires).
    d = rep["diffing"]
    assert d["counts"]["ft_only"] >= 1 and d["counts"]["base_only"] >= 1
    assert d["classes"]["shared"]["mass_share"]["source"]["code"] + \
        d["classes"]["shared"]["mass_share"]["source"]["docs"] == pytest.approx(1.0, abs=1e-3)


def _numbers(text: str) -> list[tuple[float, int]]:
    """Numbers of a markdown text outside code blocks, code spans and links: (value, decimals shown)."""
    text = re.sub(r"```.*?```", " ", text, flags=re.S)
    text = re.sub(r"`[^`]*`", " ", text)
    text = re.sub(r"!?\[[^\]]*\]\([^)]*\)", " ", text)
    out = []
    for m in re.finditer(r"(?<![\w.])(-?\d[\d,]*(?:\.\d+)?)(?![\w])", text):
        s = m.group(1).replace(",", "")
        out.append((float(s), len(s.split(".")[1]) if "." in s else 0))
    return out


def _json_numbers(obj) -> list[float]:
    if isinstance(obj, bool) or obj is None:
        return []
    if isinstance(obj, (int, float)):
        return [float(obj)]
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _json_numbers(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in _json_numbers(v)]
    return []


def test_report_files_and_every_number_in_json(planted):
    rep = planted["rep"]
    out = Path(rep["paths"]["report_md"]).parent
    for name in ("report.md", "report.json", "r_hist.png", "firing.png", "class_focus.png"):
        assert (out / name).is_file(), name
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["format"] == "crosscache.analysis/1"
    nums = sorted(set(_json_numbers(on_disk)))
    md = (out / "report.md").read_text()
    assert "## Relative decoder norms" in md and "## Latent scaling" in md and "## Top-activating contexts" in md
    # Every figure is a file of the report's own folder (training curves included): it can be moved or shared.
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert "curves.png" in linked and all((out / f).is_file() and "/" not in f for f in linked), linked
    assert f"analyze {planted['run']} --top-k 5 --latents-shown 8`" in md  # the command repeats the report
    found = _numbers(md)
    assert len(found) > 30
    for value, dec in found:
        tol = 0.5 * 10 ** -dec + 1e-9
        assert any(abs(value - x) <= tol for x in nums), f"{value} (shown in report.md) is not in report.json"


def test_latent_scaling_cap_is_noted():
    """Fine-tune-only latents beyond --scaling-max-latents get no betas, and a note says how many."""
    from train.analysis import _scaling_cap_note, _scaling_set

    r_L = torch.cat([torch.linspace(0.91, 0.99, 20), torch.full((30,), 0.5)]).double()
    cfg = AnalysisConfig(scaling_max_latents=8)
    masks = classify(r_L, cfg)
    ids = _scaling_set(r_L, masks, cfg)
    assert len(ids) == 8 and set(ids[:6].tolist()) == set(range(14, 20))  # 6 of highest r, 2 shared references
    assert _scaling_cap_note(masks, ids, cfg) == ("latent scaling: 6 of 20 fine-tune-only latents got betas (those of "
                                                  "highest r; --scaling-max-latents 8); raise it to fit them all")
    roomy = AnalysisConfig(scaling_max_latents=512)
    assert _scaling_cap_note(masks, _scaling_set(r_L, masks, roomy), roomy) is None
    # Top-r latents that are not fine-tune-only (r below the class bound, as in BatchTopK runs) are counted too.
    r_L = torch.cat([torch.linspace(0.60, 0.70, 20), torch.full((30,), 0.5)]).double()
    cfg = AnalysisConfig(scaling_max_latents=8, top_r_frac=0.4)
    masks = classify(r_L, cfg)
    assert int(masks["ft_only"].sum()) == 0 and int(masks["top_r"].sum()) == 20
    ids = _scaling_set(r_L, masks, cfg)
    assert _scaling_cap_note(masks, ids, cfg) == ("latent scaling: 6 of 20 other top-r latents got betas (those of "
                                                  "highest r; --scaling-max-latents 8); raise it to fit them all")


# ---- bad input ------------------------------------------------------------------------------------------
def test_non_diffing_run_skips_diffing_with_a_note_and_reports_profiles(tmp_path):
    _planted_cache(tmp_path / "cache", n_models=1, n_hooks=2)
    run = _planted_run(tmp_path, tmp_path / "cache")  # one model, two hooks: a cross-layer crosscoder
    rep = analyze(AnalysisConfig(run=str(run), progress=False))
    assert rep["diffing"] is None and any("model-diffing sections need two models" in n for n in rep["notes"])
    assert rep["eval"]["rows"] > 0 and rep["shown_latents"]
    assert rep["profiles"]["slots"] == ["model0/blocks.0.hook_resid_post", "model0/blocks.1.hook_resid_post"]
    assert rep["profiles"]["latents"][0]["profile"] == pytest.approx([0.5, 0.5])
    md = Path(rep["paths"]["report_md"]).read_text()
    assert "model-diffing sections need two models" in md and "## Decoder-norm profiles" in md
    assert (run / "analysis" / "profiles.png").is_file()


def test_clt_run_reports_its_layer_profile(tmp_path):
    _planted_cache(tmp_path / "cache", n_models=1, n_hooks=2)
    run = _planted_run(tmp_path, tmp_path / "cache", arch="clt", latents=8,
                       in_hooks=["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"],
                       out_hooks=["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"])
    rep = analyze(AnalysisConfig(run=str(run), progress=False))
    assert rep["diffing"] is None and "clt" in rep["notes"][0]
    prof = rep["profiles"]
    assert set(prof["source_layer"].values()) <= {0, 1}
    for e in prof["latents"]:  # a layer-1 latent never writes to layer 0
        if prof["source_layer"][str(e["latent"])] == 1:
            assert e["profile"][0] == 0


def test_missing_cache_reports_from_the_weights(planted, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(planted["run"], run)
    cfg = json.loads((run / "config.json").read_text())
    cfg["cache"]["path"] = str(tmp_path / "gone")
    cfg["config"]["cache"] = "caches/gone-too"
    (run / "config.json").write_text(json.dumps(cfg))
    rep = analyze(AnalysisConfig(run=str(run), progress=False))
    assert rep["eval"] is None and rep["shown_latents"] == []
    assert any("cannot be opened" in n and "from the weights" in n and "gone-too" in n and "--cache" in n
               for n in rep["notes"])
    assert rep["diffing"]["counts"] == planted["rep"]["diffing"]["counts"]
    assert "latent_scaling" not in rep["diffing"]
    md = Path(rep["paths"]["report_md"]).read_text()
    assert "cannot be opened" in md and "## Relative decoder norms" in md


def test_a_cache_that_moved_is_found_or_named(planted, tmp_path):
    """The folder a run trained on is gone (moved, another machine): its --cache spec is tried next, and
    --cache says where it is now; a cache with other slots is refused, never analysed in its place."""
    import run_train

    run = tmp_path / "run"
    shutil.copytree(planted["run"], run)
    moved = tmp_path / "moved"
    shutil.copytree(planted["tmp"] / "cache", moved)
    cfg = json.loads((run / "config.json").read_text())
    cfg["cache"]["path"] = str(tmp_path / "gone")
    (run / "config.json").write_text(json.dumps(cfg))
    # The spec as given at training time (here the original folder, still there) is the fallback.
    rep = analyze(AnalysisConfig(run=str(run), out=str(tmp_path / "a"), progress=False, top_k=5, latents_shown=8))
    assert rep["run_config"]["cache"] == cfg["config"]["cache"]
    assert rep["diffing"]["counts"] == planted["rep"]["diffing"]["counts"]
    assert rep["eval"] == planted["rep"]["eval"]
    # --cache: the copy gives the same report.
    rep = analyze(AnalysisConfig(run=str(run), out=str(tmp_path / "b"), cache=str(moved), progress=False, top_k=5,
                                 latents_shown=8))
    assert rep["run_config"]["cache"] == str(moved) and rep["eval"] == planted["rep"]["eval"]
    # Another cache (one model, not the run's two) or no cache at all: an error, no report.
    other = tmp_path / "other"
    _planted_cache(other, n_models=1)
    with pytest.raises(RunError, match=r"--cache .*other is not the cache run .* was trained on: it has no model "
                                       r"\['model1'\] of the run's \(it holds \['model0'\]\)"):
        analyze(AnalysisConfig(run=str(run), out=str(tmp_path / "c"), cache=str(other), progress=False))
    assert not (tmp_path / "c").exists()
    assert run_train.main(["analyze", str(run), "--cache", str(tmp_path / "nowhere"), "--no-progress"]) == 2


def test_what_makes_a_cache_the_runs(tmp_path):
    """A cache can be read for a run when it holds the models and hooks the run uses (more is fine), with
    their normalization; other shards or rows are noted. A model under the home folder matches its name
    as push publishes it (~/...)."""
    from types import SimpleNamespace

    from shared.cache_format import Manifest as RealManifest
    from train.analysis_run import RunData, cache_mismatch

    home_model = str(Path.home() / "models" / "chat")

    def manifest(models: list[str], scale: list[list[float]], rows: int = 100) -> SimpleNamespace:
        shards = [SimpleNamespace(sha256=f"{rows:064x}")]
        m = SimpleNamespace(model_names=models, hooks=["h"], d_model=8, n_rows=rows, dtype="float32",
                            normalization={"method": "norm_scale", "scale": scale}, shards=shards)
        m.shards_fingerprint = RealManifest.shards_fingerprint.fget(m)
        return m

    trained_on = manifest(["base", home_model], [[2.0], [3.0]])
    info = {"slots": [f"{home_model}/h"], "d_model": 8,
            "cache": {"models": [{"name": "base"}, {"name": home_model}], "hooks": ["h"], "n_rows": 100,
                      "dtype": "float32", "normalization": "norm_scale", "normalization_scale": [[2.0], [3.0]],
                      "shards_sha256": RealManifest.shards_fingerprint.fget(trained_on)}}
    run = RunData(tmp_path, info, None, [])
    assert cache_mismatch(run, trained_on) == (None, None)
    assert cache_mismatch(run, manifest(["~/models/chat"], [[3.0]], rows=80)) == (
        None, "other shards (80 rows; the run's cache had 100): another harvest of the same models and hooks")
    other, _ = cache_mismatch(run, manifest(["~/models/chat"], [[3.5]]))
    assert other == f"normalization scale 3.5 for {home_model}/h, the run's 3 (another harvest)"
    other, _ = cache_mismatch(run, manifest(["base"], [[2.0]]))
    assert other is not None and other.startswith(f"no model ['{home_model}'] of the run's")


def test_not_a_run_and_the_cli(planted, tmp_path, capsys):
    import run_train

    with pytest.raises(RunError, match="no config.json"):
        load_run(tmp_path)
    assert run_train.main(["analyze", str(tmp_path), "--no-progress"]) == 2
    assert "not a training run" in capsys.readouterr().err
    out = tmp_path / "rep"
    assert run_train.main(["analyze", str(planted["run"]), "--no-progress", "--out", str(out),
                           "--ft-only-min", "0.95", "--top-k", "3", "--focus", "source=nope"]) == 0
    printed = capsys.readouterr().out
    assert f"report: {out / 'report.md'}" in printed
    assert "note: focus source=nope" in printed  # a focus the token table lacks is said on the console too
    saved = json.loads((out / "report.json").read_text())
    assert saved["analysis_config"]["ft_only_min"] == 0.95 and saved["analysis_config"]["run"] == str(planted["run"])


# ---- the known answer, small: toy-code's diff finds code, toy-prose's finds no such class -----------------
@pytest.mark.slow
def test_known_answer_on_the_toy_trio(toy_dirs, tmp_path):
    """A smaller version of ``make demo``: 60k tokens per pair, 512 latents, 400 steps (demo.py's λ)."""
    import demo
    from harvest.config import HarvestConfig
    from harvest.harvester import harvest
    from train.config import TrainConfig
    from train.trainer import train

    reports = {}
    for ft in ("toy-code", "toy-prose"):
        cache, run = tmp_path / f"cache-{ft}", tmp_path / f"run-{ft}"
        harvest(HarvestConfig(models=["toy-base", ft], tokens=60_000, out=str(cache), device="cpu", progress=False))
        train(TrainConfig(cache=str(cache), out=str(run), latents=512, steps=400, batch_size=256, lr=1e-3,
                          sparsity_coeff=demo.TRAIN["sparsity_coeff"], eval_shards=4, device="cpu", progress=False))
        reports[ft] = analyze(AnalysisConfig(run=str(run), progress=False))
    code_has, c = demo.verdict(reports["toy-code"])
    prose_has, p = demo.verdict(reports["toy-prose"])
    assert code_has, c  # >= 3 fine-tune-only latents, code share >= shared + 0.2
    assert c["ft_code"] > 0.8 and c["top_code"] > 0.8, c
    assert not prose_has, p
    assert p["n_ft"] <= 2 and p["top_code"] < c["top_code"] - 0.2, p
    # Latent scaling runs on the fine-tune-only latents; the shared reference sample is held by both models.
    ls = reports["toy-code"]["diffing"]["latent_scaling"]["groups"]
    assert ls["ft_only"]["n"] == c["n_ft"] and ls["shared"]["median_nu_err"] > ls["ft_only"]["median_nu_err"]


def test_the_default_batch_counts_slot_width_as_well_as_latents():
    """A wide crosscoder (many slots x d_model) with few latents got 4096 rows from 2^24 / latents alone: 16 toy
    slots at 1024 latents peaked ~270 MB above baseline, an OOM in a 500 MB container. Rows now shrink with
    2 x in+out slots x d_model too; the common two-slot toy case keeps 4096, and the clamp holds."""
    assert default_batch_rows(1024, 32, 128) == 2**24 // (1024 + 2 * 32 * 128) == 1820
    assert default_batch_rows(2048, 4, 128) == 4096
    assert default_batch_rows(16384, 4, 4096) == 2**24 // (16384 + 2 * 4 * 4096) == 341
    assert default_batch_rows(2**20, 2, 4096) == 256
