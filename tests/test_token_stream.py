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


def _plan_of_every_document(tokenizer, dataset, **kw):
    """The plan of all a dataset's usable tokens: every document is read but those (shuffled) after its
    last full sequence."""
    with pytest.raises(HarvestInputError, match=r"holds only ([\d,]+) usable tokens") as e:
        _plan(tokenizer, dataset, **{**kw, "n_rows": 10**6})
    usable = int(e.value.args[0].split("holds only ")[1].split(" ")[0].replace(",", ""))
    return _plan(tokenizer, dataset, **{**kw, "n_rows": usable})


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


def _compressed(path, data: bytes):
    """``data`` written to ``path``, compressed as its suffix says."""
    import bz2
    import gzip
    import lzma

    import zstandard

    pack = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress,
            ".zst": zstandard.ZstdCompressor().compress}.get(path.suffix, lambda b: b)
    path.write_bytes(pack(data))
    return str(path)


def _same_plan(a, b) -> bool:
    return (a.n_rows == b.n_rows and a.metadata == b.metadata
            and all(np.array_equal(x, y) for x, y in zip(a.input_ids, b.input_ids, strict=True)))


def test_csv_tsv_and_compressed_files_give_the_plan_of_the_plain_file(tokenizer, tmp_path):
    """The same documents as .jsonl, compressed four ways, as .csv (with Excel's byte-order mark, gzipped) and
    .tsv, and as .txt gzipped: the same sequences and metadata as the plain file gives."""
    import csv
    import io

    docs = [{"text": t + ", with a comma and a \"quote\"", "source": "x" if i % 3 else "y"}
            for i, t in enumerate(_texts())]
    jsonl = "\n".join(json.dumps(d) for d in docs).encode()
    ref = _plan(tokenizer, _compressed(tmp_path / "ref.jsonl", jsonl), n_rows=250)
    for name in ("a.jsonl.gz", "a.jsonl.bz2", "a.jsonl.xz", "a.jsonl.zst", "a.json.gz"):
        assert _same_plan(_plan(tokenizer, _compressed(tmp_path / name, jsonl), n_rows=250), ref), name

    def table(sep: str) -> str:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=["text", "source"], delimiter=sep)
        writer.writeheader()
        writer.writerows(docs)
        return out.getvalue()

    for name, data in (("b.csv", table(",").encode()), ("b.tsv", table("\t").encode()),
                       ("bom.csv.gz", table(",").encode("utf-8-sig"))):
        assert _same_plan(_plan(tokenizer, _compressed(tmp_path / name, data), n_rows=250), ref), name

    # CSV cells are strings, however pandas would guess them: numbers are text, and a year column is not an int.
    numbers = tmp_path / "numbers.csv"
    numbers.write_text("text,year\n" + "".join(f"{i * 7919},{2000 + i % 3}\n" for i in range(400)) + '"",\n')
    plan = _plan_of_every_document(tokenizer, str(numbers), meta_columns=["year"])
    assert set(plan.metadata["year"]) == {"2000", "2001", "2002"} and plan.empty_docs == 1
    assert tokenizer.decode(plan.input_ids[0][1:]).replace(tokenizer.eos_token, " ").split()[1].isdigit()
    (tmp_path / "latin1.csv").write_bytes("text\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(HarvestInputError, match=r"latin1.csv failed: it is not UTF-8 text"):
        _plan(tokenizer, str(tmp_path / "latin1.csv"))

    paragraphs = "\n\n".join(_texts()).encode()
    assert _same_plan(_plan(tokenizer, _compressed(tmp_path / "c.txt.gz", paragraphs), n_rows=200),
                      _plan(tokenizer, _compressed(tmp_path / "c.txt", paragraphs), n_rows=200))

    # A folder of compressed files is split by their names, as datasets splits it.
    folder = tmp_path / "corpus"
    folder.mkdir()
    _compressed(folder / "train.jsonl.zst", jsonl)
    _compressed(folder / "test.jsonl.gz", "\n".join(json.dumps({"text": "test " + t}) for t in _texts()).encode())
    assert _same_plan(_plan(tokenizer, str(folder), n_rows=250), ref)
    assert "test" in tokenizer.decode(_plan(tokenizer, str(folder), n_rows=100, split="test").input_ids[0])


def test_compressed_files_that_are_empty_damaged_or_of_no_kind_get_clear_errors(tokenizer, tmp_path):
    with pytest.raises(HarvestInputError, match="yielded no documents"):
        _plan(tokenizer, _compressed(tmp_path / "empty.jsonl.gz", b"\n  \n"))
    for compression in (".gz", ".bz2", ".xz", ".zst"):  # each decompressor fails with an error of its own
        (tmp_path / f"noise.jsonl{compression}").write_bytes(b"not compressed at all" * 100)
        with pytest.raises(HarvestInputError, match=rf"noise.jsonl{compression} does not decompress as its name says"):
            _plan(tokenizer, str(tmp_path / f"noise.jsonl{compression}"))
    pq.write_table(pa.table({"text": _texts()}), tmp_path / "d.parquet")
    _compressed(tmp_path / "d.parquet.gz", (tmp_path / "d.parquet").read_bytes())
    with pytest.raises(HarvestInputError, match=r"d.parquet.gz: not a .*parquet.* file \(by its name\)"):
        _plan(tokenizer, str(tmp_path / "d.parquet.gz"))
    lines = [json.dumps({"text": t}) for t in _texts()]
    lines[41] = '{"text": "cut'
    with pytest.raises(HarvestInputError, match=r"bad.jsonl.zst line 42 is not valid JSON"):
        _plan(tokenizer, _compressed(tmp_path / "bad.jsonl.zst", "\n".join(lines).encode()))


def test_a_field_of_a_nested_column_is_a_meta_column(tokenizer, tmp_path):
    """The Pile's subset sits in {"meta": {"pile_set_name": ...}}: --meta-columns meta.pile_set_name takes it,
    sequences never mix subsets, and a document without the field has null. A column named with a dot is
    taken whole; a wrong field or column is named with what there is."""
    words = {"Pile-CC": "alpha", "Github": "omega", "ArXiv": "import", None: "assert"}
    rows = [{"text": " ".join([words[subset]] * (20 + i % 7)), "meta": {"pile_set_name": subset, "n": i}}
            for i, subset in zip(range(90), ["Pile-CC", "Github", "ArXiv"] * 30)]
    rows += [{"text": " ".join(["assert"] * 25), "meta": {}} for _ in range(30)]
    path = tmp_path / "pile.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    plan = _plan_of_every_document(tokenizer, str(path), meta_columns=["meta.pile_set_name"])
    assert set(plan.metadata) == {"meta.pile_set_name"}
    assert set(plan.metadata["meta.pile_set_name"]) == set(words)
    for ids, subset in zip(plan.input_ids, plan.metadata["meta.pile_set_name"]):
        text = tokenizer.decode(ids[1:]).replace(tokenizer.eos_token, " ")  # EOS ends a document
        inner = text.split()[1:-1]  # the ends may be cut words
        assert set(inner) == {words[subset]}, subset

    with pytest.raises(HarvestInputError, match=r"meta column 'meta' holds dict values.*--meta-columns meta\."):
        _plan(tokenizer, str(path), meta_columns=["meta"])
    with pytest.raises(HarvestInputError, match=r"'meta.subset': none of the first 120 documents has it; "
                                                r"column 'meta' has the fields \['n', 'pile_set_name'\]"):
        _plan(tokenizer, str(path), meta_columns=["meta.subset"])
    with pytest.raises(HarvestInputError, match=r"'info.x' not in dataset columns \['meta', 'text'\]"):
        _plan(tokenizer, str(path), meta_columns=["info.x"])

    dotted = tmp_path / "dotted.jsonl"
    dotted.write_text("\n".join(json.dumps({"text": t * 3, "a.b": "whole", "a": {"b": "nested"}}) for t in _texts()))
    assert set(_plan(tokenizer, str(dotted), meta_columns=["a.b"]).metadata["a.b"]) == {"whole"}


@pytest.mark.parametrize("bad_id", [-5, 4096, 10**6, 2**70])
def test_pretokenized_ids_outside_the_vocabulary_are_refused(tokenizer, tmp_path, bad_id):
    # 2**70 (read from JSON as a float) was named as id -9223372036854775808: the check came after a cast to int64.
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

    with pytest.raises(HarvestInputError, match="has one split, .train.; drop --split"):
        _plan(tokenizer, str(mixed), split="validation")

    # A file of another kind (by its name) was a bare KeyError: '.csv' (now read, as .jsonl.gz is).
    for name in ("x.xml", "a.jsonl.7z", "noext"):
        (tmp_path / name).write_text("text\nhello\n")
        with pytest.raises(HarvestInputError, match=r"not a \.txt/\.jsonl/\.json/\.parquet/\.csv/\.tsv \(the text "
                                                    r"ones also compressed: \.gz/\.bz2/\.xz/\.zst\) file \(by its name\)"):
            _plan(tokenizer, str(tmp_path / name))


def test_documents_without_text_are_skipped_and_counted(tokenizer, tmp_path):
    """Rows whose text is null, missing or empty add no lone EOS to the stream; they are counted
    (the harvest prints the count, which reveals a wrong --text-column)."""
    rows = [{"text": t} for t in _texts()] + [{"text": None}] * 7 + [{"text": ""}] * 3 + [{"body": "x"}] * 5
    path = tmp_path / "gaps.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    plan = _plan_of_every_document(tokenizer, str(path))
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


def _doc_words(plan, tokenizer) -> set[str]:
    return {w for ids in plan.input_ids for w in tokenizer.decode(ids, skip_special_tokens=True).split()}


def test_a_folder_is_split_by_file_names_as_datasets_splits_it(tokenizer, tmp_path):
    """A folder with train.jsonl and test.jsonl once read both into the train stream (held-out text leaked
    into training); files in subfolders and a Hub snapshot's data/ layout were not read at all."""
    words = {"train": "alpha", "test": "omega"}
    flat = tmp_path / "flat"
    flat.mkdir()
    for split, word in words.items():
        (flat / f"{split}.jsonl").write_text("\n".join(json.dumps({"text": f"{word} {t}"}) for t in _texts()))
    (flat / "README.md").write_text("# a dataset card, not data\n")
    hub = tmp_path / "hub" / "data"
    hub.mkdir(parents=True)
    for split, word in words.items():
        pq.write_table(pa.table({"text": [f"{word} {t}" for t in _texts()]}), hub / f"{split}-00000-of-00001.parquet")
    for folder in (flat, hub.parent):
        for split, word in words.items():
            got = _doc_words(_plan(tokenizer, str(folder), n_rows=300, split=split), tokenizer)
            assert word in got and (set(words.values()) - {word}).isdisjoint(got), (folder, split)
        with pytest.raises(HarvestInputError, match=r"has the splits \['test', 'train'\] \(by file name\)"):
            _plan(tokenizer, str(folder), split="validation")

    nested = tmp_path / "nested"
    (nested / "sub").mkdir(parents=True)
    (nested / "a.txt").write_text("\n\n".join(f"alpha {t}" for t in _texts(5)))
    (nested / "sub" / "b.txt").write_text("\n\n".join(f"omega {t}" for t in _texts(5)))
    assert {"alpha", "omega"} <= _doc_words(_plan(tokenizer, str(nested), n_rows=150), tokenizer)
    with pytest.raises(HarvestInputError, match="has one split, 'train'; drop --split"):
        _plan(tokenizer, str(nested), split="test")
    # A folder whose only files are named like another split is read as the default split.
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "eval_texts.jsonl").write_text("\n".join(json.dumps({"text": f"alpha {t}"}) for t in _texts()))
    assert "alpha" in _doc_words(_plan(tokenizer, str(lone), n_rows=100), tokenizer)


def test_a_save_to_disk_folder_is_read_with_its_splits(tokenizer, tmp_path):
    import datasets

    train = datasets.Dataset.from_dict({"text": [f"alpha {t}" for t in _texts()], "source": ["a"] * 60})
    test = datasets.Dataset.from_dict({"text": [f"omega {t}" for t in _texts()], "source": ["b"] * 60})
    train.save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "two"))
    one = _plan(tokenizer, str(tmp_path / "one"), n_rows=300)
    assert "alpha" in _doc_words(one, tokenizer) and set(one.metadata["source"]) == {"a"}
    assert _doc_words(_plan(tokenizer, str(tmp_path / "two"), n_rows=300, split="test"), tokenizer) >= {"omega"}
    with pytest.raises(HarvestInputError, match=r"has the splits \['test', 'train'\]; pass one of them"):
        _plan(tokenizer, str(tmp_path / "two"), split="validation")
    with pytest.raises(HarvestInputError, match="is one split, read as 'train'"):
        _plan(tokenizer, str(tmp_path / "one"), split="test")
    # An empty split (no .arrow file) made load_from_disk fail for the whole folder: "does not load".
    empty = datasets.Dataset.from_dict({"text": []})
    datasets.DatasetDict({"train": train, "validation": empty}).save_to_disk(str(tmp_path / "three"))
    assert "alpha" in _doc_words(_plan(tokenizer, str(tmp_path / "three"), n_rows=300), tokenizer)
    empty.save_to_disk(str(tmp_path / "none"))
    for folder, split in (("three", "validation"), ("none", "train")):
        with pytest.raises(HarvestInputError, match=rf"\(split '{split}'\) yielded no documents"):
            _plan(tokenizer, str(tmp_path / folder), split=split)


def test_a_meta_column_with_a_value_per_document_is_refused_below_the_limit_too(tokenizer, tmp_path):
    """Under 1,024 open values a per-document id dropped every tail silently (the audit: 1,291 sequences of
    227 documents, 8 holding a document's end). Per-document values on long documents lose little: kept."""
    short = tmp_path / "short.jsonl"
    short.write_text("\n".join(json.dumps({"text": " ".join([t] * 2), "source": f"file{i}.py"})
                               for i, t in enumerate(_texts(200))))
    with pytest.raises(HarvestInputError, match=r"--meta-columns source: .* distinct values .* would be dropped: "
                                                r"[\d,]+ of the [\d,]+ tokens read \(\d+%\)"):
        _plan(tokenizer, str(short), n_rows=500)
    assert _plan(tokenizer, str(short), n_rows=500, meta_columns=[]).n_rows == 500
    books = tmp_path / "books.jsonl"
    books.write_text("\n".join(json.dumps({"text": " ".join(_texts(60)), "title": f"book {i}"}) for i in range(20)))
    plan = _plan(tokenizer, str(books), n_rows=20_000, meta_columns=["title"])
    assert len(set(plan.metadata["title"])) > 10


def test_pretokenized_rows_keep_their_order_when_some_are_already_packed(tokenizer, tmp_path):
    """A row that is exactly [BOS] + context_size - 1 ids was emitted at once even while the previous
    document's tail (and EOS) waited in the buffer, which then surfaced later, out of order."""
    from harvest.token_stream import iter_documents

    rng = np.random.default_rng(0)
    rows = [[0] + rng.integers(2, 4000, 31).tolist() if i % 3 == 0 else rng.integers(2, 4000, 9 + i % 20).tolist()
            for i in range(60)]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps({"input_ids": r}) for r in rows))
    plan = _plan(tokenizer, str(path), n_rows=1000)
    stream = np.concatenate([ids[1:] for ids in plan.input_ids]).tolist()
    at = 0
    for doc in iter_documents(str(path), "train", 0):  # the order the plan read them
        ids = doc["input_ids"][1:] if doc["input_ids"][0] == 0 else doc["input_ids"]
        found = next((i for i in range(at, len(stream) - len(ids) + 1) if stream[i:i + len(ids)] == ids), None)
        if found is None:  # the plan stopped before this document
            assert len(stream) - at < len(ids) + 32
            break
        assert found <= at + 1, "a document came out of order"  # +1: the EOS after the one before
        at = found + len(ids)


def test_pretokenized_values_are_checked_not_cast(tokenizer, tmp_path):
    def plan_of(rows, read_all=False, **kw):
        path = tmp_path / "pt.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in rows))
        return (_plan_of_every_document if read_all else _plan)(tokenizer, str(path), **kw)

    good = [{"input_ids": list(range(5, 40))} for _ in range(10)]
    with pytest.raises(HarvestInputError, match=r"hold 377\.5, not a whole number"):
        plan_of(good + [{"input_ids": [5, 377.5, 6]}] * 300, n_rows=5000)
    with pytest.raises(HarvestInputError, match=r"a row holds nulls or mixed values: \[5, True, 6\]"):
        plan_of(good + [{"input_ids": [5, True, 6]}] * 300, n_rows=5000)  # not id 1
    with pytest.raises(HarvestInputError, match=r"a row holds bools"):
        plan_of([{"input_ids": [True, False]}] * 5, n_rows=5)
    with pytest.raises(HarvestInputError, match=r"a row holds a nested list \(one row per document: flatten it\)"):
        plan_of([{"input_ids": [[5, 6, 7], [8, 9]]}] * 5, n_rows=5)
    plan = plan_of(good + [{"input_ids": None}] * 4 + [{"input_ids": []}] * 3, n_rows=10**6, read_all=True)
    assert plan.empty_docs > 0 and plan.pretokenized  # most of the 7: the stream may end before the last
    from harvest.token_stream import empty_documents_note

    assert empty_documents_note(plan, "text") == f"note: skipped {plan.empty_docs} rows with null or empty input_ids"
    # Right padding with a mask: the masked ids (pad 1) never reach a sequence.
    padded = [{"input_ids": list(range(5, 25)) + [1] * 12, "attention_mask": [1] * 20 + [0] * 12}] * 20
    assert not any(1 in ids for ids in plan_of(padded, n_rows=300).input_ids)
    with pytest.raises(HarvestInputError, match="attention_mask has 3 entries for 32 input_ids"):
        plan_of([{"input_ids": list(range(5, 37)), "attention_mask": [1, 1, 1]}] * 5, n_rows=5)


def test_padded_pretokenized_rows_without_a_mask_are_refused(tokenizer, tmp_path):
    """``padding="max_length"`` output with no attention_mask: the pad runs were packed between documents
    (every later token attended to them). A few rows ending in a run (another packer's empty documents)
    are still text."""
    rng = np.random.default_rng(0)

    def plan_of(rows, **kw):
        path = tmp_path / "pt.jsonl"
        path.write_text("\n".join(json.dumps({"input_ids": r}) for r in rows))
        return _plan(tokenizer, str(path), **kw)

    text = [rng.integers(5, 4000, int(rng.integers(8, 40))).tolist() for _ in range(200)]
    right = [t + [1] * (48 - len(t)) for t in text]  # pad 1
    with pytest.raises(HarvestInputError, match=r"rows look padded: (\d+) of the \1 rows read .* no attention_mask"):
        plan_of(right, n_rows=3000)
    left = [[0] * (48 - len(t)) + t for t in text]  # EOS standing in for pad, on the left
    with pytest.raises(HarvestInputError, match=r"look padded: .* starts with \d+ x id 0"):
        plan_of(left, n_rows=3000)
    few = [t + [0, 0, 0] if i % 50 == 0 else t for i, t in enumerate(text)]  # 4 of 200: kept
    assert plan_of(few, n_rows=3000).n_rows == 3000
    # Another packer's sequences (SAELens's defaults: BOS, separator = BOS, BOS starting each document) hold
    # runs of 2 at their ends, often: neither they nor rows of a lone BOS are padding.
    stream = [x for t in text for x in [0] + t[:int(rng.integers(1, 8))]]
    packed = [[0] + stream[i:i + 31] for i in range(0, len(stream) - 31, 31)]
    assert sum(r[1] == 0 for r in packed) > len(packed) // 10
    assert plan_of(packed, n_rows=500).n_rows == 500  # rows of exactly context_size starting with BOS
    assert plan_of([r[:20] for r in packed] + [[0]] * 5, n_rows=200).n_rows == 200  # packed again; lone BOS rows
    # A row that ends with EOS already gets no second one.
    stream = np.concatenate([ids[1:] for ids in plan_of([t + [0] for t in text], n_rows=3000).input_ids])
    assert not np.any((stream[1:] == 0) & (stream[:-1] == 0))


def test_text_files_are_tidied_and_must_be_utf8(tokenizer, tmp_path):
    """A byte-order mark, runs of 3+ newlines and lines of spaces no longer become text or documents."""
    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeff".encode() + "\n\n\n\n\n".join(_texts(40)).encode() + b"\n\n   \n\n" * 5)
    plan = _plan_of_every_document(tokenizer, str(bom))
    assert plan.empty_docs > 0  # paragraphs of spaces
    for ids in plan.input_ids:
        text = tokenizer.decode(ids[1:])
        assert "\ufeff" not in text and "<|endoftext|>\n" not in text and not text.startswith("\n")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 au lait\n\n".encode("latin-1") * 50)
    with pytest.raises(HarvestInputError, match="it is not UTF-8 text .* convert it, e.g. iconv"):
        _plan(tokenizer, str(latin), n_rows=100)


def test_text_ids_past_a_smaller_embedding_table_are_refused_before_any_forward(tokenizer):
    """A fine-tune whose tokenizer gained tokens its embeddings lack crashed mid-harvest (IndexError), or
    passed when the sample held none of them."""
    with pytest.raises(HarvestInputError, match=r"the text tokenizes to id \d+ .* past the smallest embedding table "
                                                r"of the models \(1000 rows\).*resize_token_embeddings"):
        _plan(tokenizer, "builtin:mixed", n_rows=500, n_vocab=1000)


@pytest.mark.parametrize("context_size", [0, 1])
def test_context_size_below_two_has_one_message(context_size, tmp_path):
    from conftest import small_harvest_config

    with pytest.raises(ValueError, match=rf"context_size must be >= 2 \(BOS plus .*\), got {context_size}"):
        small_harvest_config(tmp_path / "c", context_size=context_size)


def test_a_bad_jsonl_line_is_named_by_file_and_line(tokenizer, tmp_path):
    """pyarrow's "in row N" counts from 0 within the block it parsed (line 150,001 of a 17 MB file was
    "row 40734"): the error names the file and the 1-based line, and what is wrong with it."""
    lines = [json.dumps({"text": t}) for t in _texts()]
    for bad, what in (("{not json", r"is not valid JSON \(Expecting property name"),
                      ("[1, 2]", "is an array, not an object")):
        path = tmp_path / "bad.jsonl"
        path.write_text("\n".join(lines[:30] + [bad] + lines[30:]))
        with pytest.raises(HarvestInputError, match=rf"bad\.jsonl line 31 {what}.*fix or remove that line"):
            _plan(tokenizer, str(path), n_rows=10**6)
    # A .json file may be JSON Lines too (its bad line is named), or one document (no line is named).
    (tmp_path / "lines.json").write_text("\n".join(lines[:30] + ["{not json"] + lines[30:]))
    with pytest.raises(HarvestInputError, match=r"lines\.json line 31 is not valid JSON"):
        _plan(tokenizer, str(tmp_path / "lines.json"), n_rows=10**6)
    (tmp_path / "one.json").write_text(json.dumps([{"text": t} for t in _texts()], indent=2)[:-3])
    with pytest.raises(HarvestInputError, match="reading dataset .* failed") as e:
        _plan(tokenizer, str(tmp_path / "one.json"), n_rows=10**6)
    assert " line " not in str(e.value)


def test_nan_metadata_values_are_one_value(tokenizer, tmp_path):
    """NaN != NaN: every document whose float metadata was NaN (a missing value, as polars or numpy write it)
    opened a partly filled sequence of its own, so those documents were never packed together (their tails
    dropped, or the column refused as holding a value per document)."""
    n = 200
    pq.write_table(pa.table({"text": _texts(n), "score": pa.array([float("nan") if i % 2 else 1.5 for i in range(n)])}),
                   tmp_path / "nan.parquet")
    plan = _plan(tokenizer, str(tmp_path / "nan.parquet"), n_rows=1500, meta_columns=["score"])
    nan_seqs = [ids for ids, v in zip(plan.input_ids, plan.metadata["score"]) if v != v]
    assert nan_seqs and all(int((ids[1:] == 0).sum()) >= 1 for ids in nan_seqs)  # several documents per sequence
