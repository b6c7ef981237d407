"""The token stream: sources, packing with BOS, metadata per sequence, exact row counts."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from harvest.models import HarvestInputError
from harvest.token_stream import build_token_plan


@pytest.fixture(scope="module")
def tokenizer(toy_dirs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(toy_dirs["toy-base"])


def _plan(tokenizer, dataset, n_rows=300, context_size=32, **kw):
    args = dict(dataset=dataset, split="train", text_column="text", meta_columns=None, seed=0, tokenizer=tokenizer,
                context_size=context_size, bos_id=0, eos_id=0, excluded_ids=[0, 1], n_rows=n_rows)
    args.update(kw)
    return build_token_plan(**args)


def _texts(n=60):
    return [f"Paragraph {i} talks about the assert statement and the import system, part {i}." for i in range(n)]


def test_packing_invariants(tokenizer):
    plan = _plan(tokenizer, "builtin:mixed", n_rows=2000)
    assert plan.n_rows == 2000
    for ids in plan.input_ids:
        assert len(ids) == 32 and ids[0] == 0
    # Every sequence but the last contributes all its non-special tokens.
    for ids, n in zip(plan.input_ids[:-1], plan.rows_per_seq[:-1]):
        assert n == int((~np.isin(ids, [0, 1])).sum())
    assert set(plan.metadata["source"]) == {"docs", "code"}
    # Seeded: same seed same plan, other seed other order.
    again = _plan(tokenizer, "builtin:mixed", n_rows=2000)
    assert all(np.array_equal(a, b) for a, b in zip(plan.input_ids, again.input_ids))
    other = _plan(tokenizer, "builtin:mixed", n_rows=2000, seed=1)
    assert not all(np.array_equal(a, b) for a, b in zip(plan.input_ids, other.input_ids))


def test_sequences_never_mix_sources(tokenizer, tmp_path):
    """Two sources with disjoint words, interleaved document by document: no sequence mixes them."""
    jl = tmp_path / "two.jsonl"
    rows = [{"text": " ".join(["alpha"] * (5 + i % 7)), "source": "a"} if i % 2 else
            {"text": " ".join(["omega"] * (5 + i % 5)), "source": "b"} for i in range(400)]
    jl.write_text("\n".join(json.dumps(r) for r in rows))
    plan = _plan(tokenizer, str(jl), n_rows=1500)
    assert set(plan.metadata["source"]) == {"a", "b"}
    for ids, src in zip(plan.input_ids, plan.metadata["source"]):
        text = tokenizer.decode(ids[1:], skip_special_tokens=True)
        assert ("alpha" in text) == (src == "a") and ("omega" in text) == (src == "b"), (src, text)


def test_local_text_jsonl_parquet_and_pretokenized(tokenizer, tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("\n\n".join(_texts()))
    p_txt = _plan(tokenizer, str(txt), n_rows=200)
    assert p_txt.n_rows == 200 and p_txt.metadata == {}

    jl = tmp_path / "b.jsonl"
    jl.write_text("\n".join(json.dumps({"text": t, "source": "x" if i % 2 else "y"}) for i, t in enumerate(_texts())))
    p_jl = _plan(tokenizer, str(jl), n_rows=200)
    assert set(p_jl.metadata["source"]) <= {"x", "y"} and len(p_jl.metadata["source"]) == p_jl.n_sequences

    pq.write_table(pa.table({"body": _texts(), "lang": ["en"] * 60}), tmp_path / "c.parquet")
    p_pq = _plan(tokenizer, str(tmp_path / "c.parquet"), n_rows=200, text_column="body", meta_columns=["lang"])
    assert p_pq.metadata["lang"][0] == "en"
    with pytest.raises(HarvestInputError, match="no text column 'text'"):
        _plan(tokenizer, str(tmp_path / "c.parquet"))
    with pytest.raises(HarvestInputError, match="meta column 'nope'"):
        _plan(tokenizer, str(jl), meta_columns=["nope"])

    # Pre-tokenized: already-packed rows are kept as they are; shorter rows are packed.
    ids = [[0] + list(range(10 + i, 41 + i)) for i in range(20)]
    pt = tmp_path / "d.jsonl"
    pt.write_text("\n".join(json.dumps({"input_ids": x}) for x in ids))
    p_pt = _plan(tokenizer, str(pt), n_rows=31 * 20)
    got = sorted(tuple(x.tolist()) for x in p_pt.input_ids)
    assert got == sorted(tuple(x) for x in ids)
    short = tmp_path / "e.jsonl"
    short.write_text("\n".join(json.dumps({"input_ids": list(range(5, 15))}) for _ in range(30)))
    p_short = _plan(tokenizer, str(short), n_rows=100)
    assert all(len(x) == 32 and x[0] == 0 for x in p_short.input_ids)


@pytest.mark.parametrize("bad_id", [-5, 4096, 10**6])
def test_pretokenized_ids_outside_the_vocabulary_are_refused(tokenizer, tmp_path, bad_id):
    path = tmp_path / "oov.jsonl"
    path.write_text("\n".join(json.dumps({"input_ids": [5, 6, bad_id, 7] * 20}) for _ in range(5)))
    with pytest.raises(HarvestInputError, match=rf"id {bad_id} \(20 such id\(s\) in one document\).*\[0, {len(tokenizer)}\)"):
        _plan(tokenizer, str(path), n_rows=50)
    # The bound is the models' embedding table when given (it may exceed the tokenizer's length).
    if bad_id == len(tokenizer):
        assert len(_plan(tokenizer, str(path), n_rows=50, n_vocab=len(tokenizer) + 1).input_ids) >= 1


def test_metadata_travels_into_the_token_table(toy_dirs, tmp_path):
    from conftest import small_harvest_config
    from harvest.harvester import harvest
    from shared.cache import open_cache

    jl = tmp_path / "b.jsonl"
    jl.write_text("\n".join(json.dumps({"text": t, "source": "x" if i % 2 else "y"}) for i, t in enumerate(_texts())))
    harvest(small_harvest_config(tmp_path / "c", models=["toy-base"], dataset=str(jl), tokens=300, context_size=32))
    table = open_cache(tmp_path / "c").token_table()
    assert table.column_names == ["seq", "input_ids", "source"]
    assert set(table.column("source").to_pylist()) <= {"x", "y"}


def test_unknown_builtin(tokenizer):
    with pytest.raises(HarvestInputError, match="builtin:docs, builtin:code, builtin:mixed"):
        _plan(tokenizer, "builtin:nope")


def test_local_files_that_are_empty_odd_or_inconsistent_get_clear_errors(tokenizer, tmp_path):
    """Empty .jsonl/.parquet/.txt files, a meta column of lists, files whose columns differ, and
    a --split on local files: a HarvestInputError that names the problem, never a raw error."""
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.txt").write_text("\n \n\n")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    for name in ("empty.jsonl", "blank.txt", "empty.parquet"):
        with pytest.raises(HarvestInputError, match="yielded no documents"):
            _plan(tokenizer, str(tmp_path / name))

    # An empty file beside real ones is skipped.
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in _texts()))
    (mixed / "b.jsonl").write_text("")
    assert _plan(tokenizer, str(mixed), n_rows=200).n_rows == 200

    tags = tmp_path / "tags.jsonl"
    tags.write_text("\n".join(json.dumps({"text": t, "tags": ["a", "b"]}) for t in _texts()))
    with pytest.raises(HarvestInputError, match="meta column 'tags' holds list values"):
        _plan(tokenizer, str(tags), meta_columns=["tags"])

    # A column whose documents disagree on the type (else an ArrowTypeError when tokens.arrow is written);
    # missing values (null) beside numbers are fine.
    kinds = tmp_path / "kinds.jsonl"
    kinds.write_text("\n".join(json.dumps({"text": t * 3, "kind": "s0" if i % 2 else 7, "year": None if i % 3 else 2021})
                               for i, t in enumerate(_texts())))
    with pytest.raises(HarvestInputError, match=r"meta column 'kind' mixes value types across documents: .*str "
                                                r"\(e\.g\. 's0'\).*--meta-columns"):
        _plan(tokenizer, str(kinds), meta_columns=["kind"], n_rows=200)
    years = _plan(tokenizer, str(kinds), meta_columns=["year"], n_rows=200).metadata["year"]
    assert set(years) <= {None, 2021} and 2021 in years

    differ = tmp_path / "differ"
    differ.mkdir()
    (differ / "a.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in _texts()))
    (differ / "b.jsonl").write_text("\n".join(json.dumps({"body": t, "n": 1}) for t in _texts()))
    with pytest.raises(HarvestInputError, match="reading dataset .* failed"):
        _plan(tokenizer, str(differ), n_rows=3000)

    with pytest.raises(HarvestInputError, match="local dataset files have one split"):
        _plan(tokenizer, str(mixed), split="validation")


def test_documents_without_text_are_skipped_and_counted(tokenizer, tmp_path):
    """Rows whose text is null, missing or empty add no lone EOS to the stream; they are counted
    (the harvest prints the count, which reveals a wrong --text-column)."""
    rows = [{"text": t} for t in _texts()] + [{"text": None}] * 7 + [{"text": ""}] * 3 + [{"body": "x"}] * 5
    path = tmp_path / "gaps.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(HarvestInputError, match=r"holds only ([\d,]+) usable tokens") as e:
        _plan(tokenizer, str(path), n_rows=10**6)
    usable = int(e.value.args[0].split("holds only ")[1].split(" ")[0].replace(",", ""))
    plan = _plan(tokenizer, str(path), n_rows=usable)  # reads every document
    assert plan.empty_docs == 15
    for ids in plan.input_ids:  # after BOS, no two EOS in a row: an empty document would have made one
        body = ids[1:]
        assert not np.any((body[1:] == 0) & (body[:-1] == 0))


def test_a_meta_column_with_a_value_per_document_is_refused(tokenizer, tmp_path):
    """Documents are packed per metadata value: with a per-document id every document's tail (and every
    short document) stayed in memory, never packed, and the harvest then blamed the dataset's size."""
    from harvest.token_stream import MAX_OPEN_META_VALUES

    jl = tmp_path / "ids.jsonl"
    jl.write_text("\n".join(json.dumps({"text": t, "doc_id": f"d{i}"})
                            for i, t in enumerate(_texts(MAX_OPEN_META_VALUES + 50))))
    with pytest.raises(HarvestInputError, match=rf"--meta-columns doc_id: {MAX_OPEN_META_VALUES + 1:,} distinct "
                                                r"values among the first .* documents .* pass --meta-columns alone"):
        _plan(tokenizer, str(jl), n_rows=10**6, meta_columns=["doc_id"])
    # Without the column the same documents pack into full sequences.
    assert _plan(tokenizer, str(jl), n_rows=3000, meta_columns=[]).n_rows == 3000


def test_too_small_says_what_waits_in_partly_filled_sequences_per_meta_value(tokenizer, tmp_path):
    jl = tmp_path / "few.jsonl"
    jl.write_text("\n".join(json.dumps({"text": t, "lang": f"l{i % 3}"}) for i, t in enumerate(_texts(12))))
    for context_size, also in ((16, "another "), (128, "")):  # some sequences made, or none at all
        with pytest.raises(HarvestInputError, match=rf"; {also}[\d,]+ tokens sit in partly filled sequences of 3 "
                                                    r"values of --meta-columns lang \(documents are packed per value\)"):
            _plan(tokenizer, str(jl), n_rows=10**6, meta_columns=["lang"], context_size=context_size)
    with pytest.raises(HarvestInputError) as e:  # no meta column: nothing to say about values
        _plan(tokenizer, str(jl), n_rows=10**6, meta_columns=[], context_size=128)
    assert "partly filled" not in str(e.value)
