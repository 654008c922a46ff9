"""Labeled-data readers on the real files users have (../shared/data) and on made-up bad files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lmforge.data.labeled import infer_format, read_examples

DATA = Path(os.environ.get("LMFORGE_DATA", Path(__file__).resolve().parents[2] / "shared/data"))


def _need(rel: str) -> Path:
    path = DATA / rel
    if not path.exists():
        pytest.skip(f"shared data not found at {path} (set LMFORGE_DATA to the data folder)")
    return path


def _write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


# ---- real files ---------------------------------------------------------------------------------------

def test_sst2_tsv_with_header():
    ex = read_examples(_need("en/sst2/dev.tsv"))
    assert ex.format == "tsv" and len(ex) == 6735 and ex.labels == ["0", "1"]
    assert ex[0] == {"text": "the expressive power of the camera ", "label": "1"}  # "sentence" -> text


def test_agnews_tsv_without_header_by_position():
    path = _need("en/agnews/train.tsv")
    ex = read_examples(path, text_column=0, label_column=1)
    assert len(ex) == len(path.read_text(encoding="utf-8").splitlines())  # no header row eaten
    assert ex.labels == ["Business", "Sci/Tech", "Sports", "World"]
    assert ex[0]["text"].startswith("p2pnet.net News:") and ex[0]["label"] == "Sci/Tech"
    assert any('"' in e["text"] for e in ex)  # TSV: quotes are ordinary characters, as in GLUE
    with pytest.raises(ValueError, match="no header row"):
        read_examples(path, header=False)


def test_chnsenticorp_csv_quotes_and_an_empty_review():
    path = _need("zh/chnsenticorp/ChnSentiCorp_htl_all.csv")
    with pytest.raises(ValueError, match=r"ChnSentiCorp_htl_all\.csv:6376: text is empty"):
        read_examples(path)
    ex = read_examples(path, skip_bad_rows=True)
    assert len(ex) == 7765 and ex.labels == ["0", "1"]
    assert ex.skipped == [f"{path}:6376: text is empty: expected non-empty text"]
    assert ex[0]["text"].startswith('距离川沙公路较近,但是公交指示不对,如果是"蔡陆线"的话')  # "" unescaped
    assert "skipped 1 bad rows" in ex.summary()


def test_conll2003_sentences_and_tags():
    path = _need("en/conll2003/dev.txt")
    ex = read_examples(path)
    assert ex.format == "conll" and len(ex) == 3250
    assert ex.labels == ["B-LOC", "B-MISC", "B-ORG", "B-PER", "I-LOC", "I-MISC", "I-ORG", "I-PER", "O"]
    assert ex[0]["tokens"][:3] == ["CRICKET", "-", "LEICESTERSHIRE"] and ex[0]["tags"][2] == "B-ORG"
    lines = [s for s in path.read_text().splitlines() if s.strip()]
    assert sum(len(e["tokens"]) for e in ex) == len(lines)
    assert all(len(e["tokens"]) == len(e["tags"]) for e in ex)


def test_msra_chinese_one_char_per_line_with_limit():
    ex = read_examples(_need("zh/msra_ner/train.txt"), limit=2000)
    assert len(ex) == 2000 and ex.format == "conll"
    assert ex.labels == ["B-LOC", "B-ORG", "B-PER", "I-LOC", "I-ORG", "I-PER", "O"]
    assert all(len(t) == 1 for e in ex for t in e["tokens"])
    assert "".join(ex[0]["tokens"]).startswith("当希望工程救助的百万儿童成长起来")


def test_squad_flattened():
    ex = read_examples(_need("en/squad/squad-v1.1-part-a.json"))
    assert ex.format == "squad" and len(ex) == 4961 and ex.labels is None
    first = ex[0]
    assert set(first) == {"id", "title", "context", "question", "answers"} and first["title"] == "Super_Bowl_50"
    for e in ex:
        for text, start in zip(e["answers"]["text"], e["answers"]["answer_start"], strict=True):
            assert e["context"][start : start + len(text)] == text


def test_multi30k_parallel_lines():
    ex = read_examples(_need("en/multi30k/val.en"), target_path=_need("en/multi30k/val.de"))
    assert ex.format == "parallel" and len(ex) == 1014  # the trailing blank line of both files is no pair
    assert ex[0] == {"source": "A group of men are loading cotton onto a truck",
                     "target": "Eine Gruppe von Männern lädt Baumwolle auf einen Lastwagen"}


def test_tatoeba_tsv_columns_renamed():
    ex = read_examples(_need("zh/tatoeba_en_zh/train.tsv"), columns={"source": "en", "target": "zh"})
    assert len(ex) == 25602 and ex[0] == {"source": "Hi.", "target": "你好。"} and ex.labels is None


def test_thucnews_txt_is_sniffed_as_tsv_and_labels_sort_numerically():
    path = _need("zh/thucnews/train.txt")
    assert infer_format(path) == "tsv"
    ex = read_examples(path, text_column=0, label_column=1)
    assert len(ex) == 10000 and ex.labels == [str(i) for i in range(10)]


# ---- formats and inference on made-up files ----------------------------------------------------------

def test_format_inference(tmp_path):
    cases = {
        "a.csv": "text,label\nx,1\n", "a.tsv": "text\tlabel\nx\t1\n", "a.jsonl": '{"text": "x"}\n',
        "c.jsonl": '{"messages": [{"role": "user", "content": "hi"}]}\n',
        "s.json": json.dumps({"version": "1.1", "data": []}), "p.json": '{\n  "data": []\n}\n',
        "l.json": '{"text": "x", "label": 1}\n', "n.txt": "-DOCSTART- -X- O O\n\nEU NNP B-NP B-ORG\n",
        "t.txt": "title one\t3\n", "a.conll": "x O\n",
    }
    want = {"a.csv": "csv", "a.tsv": "tsv", "a.jsonl": "jsonl", "c.jsonl": "chat", "s.json": "squad",
            "p.json": "squad", "l.json": "jsonl", "n.txt": "conll", "t.txt": "tsv", "a.conll": "conll"}
    assert {name: infer_format(_write(tmp_path, name, text)) for name, text in cases.items()} == want
    assert infer_format(_write(tmp_path, "x.en", "a\n"), target_path=tmp_path / "x.de") == "parallel"
    with pytest.raises(ValueError, match="cannot tell the format"):
        infer_format(_write(tmp_path, "plain.txt", "just text\nmore text\n"))
    with pytest.raises(ValueError, match="target_path"):
        infer_format(_write(tmp_path, "train.en", "a\n"))


def test_conll_four_columns_docstart_and_crlf(tmp_path):
    text = ("-DOCSTART- -X- -X- O\r\n\r\nEU NNP B-NP B-ORG\r\nrejects VBZ B-VP O\r\n\r\n\r\n"
            "Peter NNP B-NP B-PER\r\nBlackburn NNP I-NP I-PER\r\n")
    ex = read_examples(_write(tmp_path, "four.conll", text))
    assert list(ex) == [{"tokens": ["EU", "rejects"], "tags": ["B-ORG", "O"]},
                        {"tokens": ["Peter", "Blackburn"], "tags": ["B-PER", "I-PER"]}]


def test_jsonl_pairs_multilabel_and_regression(tmp_path):
    rows = [{"sentence1": "a", "sentence2": "b", "label": 1, "idx": 7}, {"sentence1": "c", "sentence2": "d", "label": 10},
            {"sentence1": "e", "sentence2": "f", "label": 2.0}]
    path = _write(tmp_path, "pairs.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    ex = read_examples(path)
    assert ex[0] == {"text": "a", "text_pair": "b", "label": 1, "idx": 7}
    assert ex.labels == ["1", "2", "10"]  # 2.0 is label "2"; integers sort as numbers
    multi = read_examples(_write(tmp_path, "m.csv", "text,tags\nx,sports|politics\ny,sports\n"),
                          label_column="tags", label_sep="|")
    assert multi[0]["label"] == ["sports", "politics"] and multi.labels == ["politics", "sports"]
    reg = read_examples(_write(tmp_path, "r.jsonl", '{"text": "x", "label": 3.8}\n{"text": "y", "label": 1}\n'))
    assert reg.labels is None and reg[0]["label"] == 3.8


def test_csv_multiline_quoted_field_keeps_line_numbers(tmp_path):
    path = _write(tmp_path, "m.csv", 'label,review\n1,"two\nlines"\n0,ok\n1\n')
    with pytest.raises(ValueError, match=r"m\.csv:5: 1 fields, expected 2"):
        read_examples(path)
    ex = read_examples(path, skip_bad_rows=True)
    assert [e["text"] for e in ex] == ["two\nlines", "ok"] and len(ex.skipped) == 1


def test_parquet_columns_and_bad_rows(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"review": ["good", "bad", "meh"], "stars": [1, None, 0]}), path)
    with pytest.raises(ValueError, match=r"d\.parquet row 2: label is empty"):
        read_examples(path, text_column="review", label_column="stars")
    ex = read_examples(path, text_column="review", label_column="stars", skip_bad_rows=True)
    assert list(ex) == [{"text": "good", "label": 1}, {"text": "meh", "label": 0}] and ex.labels == ["0", "1"]
    with pytest.raises(ValueError, match=r"no column 'sentence' \(columns: review, stars\)"):
        read_examples(path, text_column="sentence")


def test_chat_jsonl(tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad = {"messages": [{"role": "robot", "content": "beep"}]}
    path = _write(tmp_path, "chat.jsonl", json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match=r"chat\.jsonl:2: message 0 .* expected \{\"role\""):
        read_examples(path)
    ex = read_examples(path, skip_bad_rows=True)
    assert ex.format == "chat" and list(ex) == [good] and len(ex.skipped) == 1


# ---- bad rows: file and line named, or skipped and counted ---------------------------------------------

@pytest.mark.parametrize(("name", "text", "kwargs", "where", "what"), [
    ("b.csv", "text,label\na,1\nb,2,3\nc,1\n", {}, "b.csv:3", "3 fields, expected 2"),
    ("b.tsv", "sentence\tlabel\na\t1\n\t0\n", {}, "b.tsv:3", "text is empty"),
    ("b.tsv", "sentence\tlabel\na\t1\nb\t \n", {}, "b.tsv:3", "label is empty"),
    ("b.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": \n', {}, "b.jsonl:2", "not a JSON line"),
    ("b.jsonl", '{"text": "a", "label": 1}\n\n{"txt": "b", "label": 0}\n', {}, "b.jsonl:3", "no 'text' field"),
    ("b.jsonl", '{"text": "a", "label": 1}\n[1, 2]\n', {}, "b.jsonl:2", "expected an object"),
    ("b.jsonl", '{"text": "a", "label": {"x": 1}}\n{"text": "b", "label": 0}\n', {}, "b.jsonl:1", "label is dict"),
    ("b.txt", "EU B-ORG\nrejects O\n\nPeter\nBlackburn I-PER\n", {}, "b.txt:4", "expected `token TAG`"),
    ("b.txt", "EU B-ORG\nrejects O\n\nPeter PERSON\n", {"format": "conll"}, "b.txt:4", "'PERSON' is not a tag"),
    ("b.csv", b"text,label\na,1\n\xff\xfe,0\n", {}, "b.csv:3", "not valid UTF-8"),
])
def test_bad_rows_are_named_and_can_be_skipped(tmp_path, name, text, kwargs, where, what):
    path = _write(tmp_path, name, text)
    with pytest.raises(ValueError, match="skip_bad_rows") as err:
        read_examples(path, **kwargs)
    assert f"{path.parent}/{where}: " in str(err.value) and what in str(err.value)
    ex = read_examples(path, skip_bad_rows=True, **kwargs)
    assert len(ex.skipped) == 1 and ex.skipped[0].startswith(f"{path.parent}/{where}: ")
    assert len(ex) >= 1  # the good rows are kept


def test_conll_bad_line_drops_its_whole_sentence(tmp_path):
    path = _write(tmp_path, "b.txt", "EU B-ORG\nrejects O\n\nPeter B-PER\nBlackburn\n\nLondon B-LOC\n")
    ex = read_examples(path, format="conll", skip_bad_rows=True)
    assert [e["tokens"] for e in ex] == [["EU", "rejects"], ["London"]] and len(ex.skipped) == 1


def test_parallel_files_of_different_length(tmp_path):
    src, tgt = _write(tmp_path, "t.en", "a\nb\nc\n"), _write(tmp_path, "t.de", "A\nB\n\n")
    with pytest.raises(ValueError, match=rf"{src} has 3 lines, {tgt} has 2"):
        read_examples(src, target_path=tgt)
    one_sided = _write(tmp_path, "u.de", "A\n\nC\n")
    with pytest.raises(ValueError, match=rf"{one_sided}:2: empty line, while line 2 of {src} is not"):
        read_examples(src, target_path=one_sided)
    ex = read_examples(src, target_path=one_sided, skip_bad_rows=True)
    assert [e["target"] for e in ex] == ["A", "C"] and len(ex.skipped) == 1


def test_squad_answer_not_in_context(tmp_path):
    qa = {"id": "q1", "question": "Who?", "answers": [{"text": "Denver", "answer_start": 3}]}
    data = {"data": [{"title": "T", "paragraphs": [{"context": "Go Denver!", "qas": [qa]}]}]}
    path = _write(tmp_path, "s.json", json.dumps(data))
    assert read_examples(path)[0]["answers"] == {"text": ["Denver"], "answer_start": [3]}
    qa["answers"][0]["answer_start"] = 4
    path = _write(tmp_path, "s.json", json.dumps(data))
    with pytest.raises(ValueError, match=r"id q1\): answer 'Denver' is not in the context at answer_start=4"):
        read_examples(path)
    assert len(read_examples(path, skip_bad_rows=True).skipped) == 1
    with pytest.raises(ValueError, match=r"x\.json:2: not valid JSON"):
        read_examples(_write(tmp_path, "x.json", '{"data":\n [,]}'), format="squad")


def test_missing_named_column_and_file(tmp_path):
    path = _write(tmp_path, "a.csv", "review,stars\nx,1\n")
    with pytest.raises(ValueError, match=r"no column 'text' \(columns: review, stars\)"):
        read_examples(path, text_column="text")
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_examples(tmp_path / "nope.csv")
