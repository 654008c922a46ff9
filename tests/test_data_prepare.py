"""`lmforge data prepare`: text/JSONL/Parquet corpora -> token shards, read back with TokenShards."""

import itertools
import json
import os

import numpy as np
import pytest

from lmforge import cli
from lmforge.data import prepare as prepare_module
from lmforge.data import readers
from lmforge.data.prepare import _is_val, prepare
from lmforge.data.readers import BadInput
from lmforge.data.shards import TokenShards, token_dtype
from lmforge.tokenizer import Tokenizer, train_tokenizer

EN = ("It was the best of times, it was the worst of times. It was the age of wisdom!\n"
      "The river ran quietly past the old mill, and the miller counted his sacks.\n")
ZH = "话说天下大势，分久必合，合久必分。周末七国分争，并入于秦。\n"


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    (folder / "train.txt").write_text((EN + ZH) * 30, encoding="utf-8")
    train_tokenizer("bpe", [folder / "train.txt"], vocab_size=300, output=folder / "tok")
    return folder / "tok"


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer.from_dir(tok_dir)


def run(inputs, tok_dir, out, **kw):
    kw.setdefault("val_fraction", 0.0)
    kw.setdefault("workers", 1)
    return prepare(inputs, tok_dir, out, progress=False, **kw)


def texts(folder, tok, split="train"):
    shards = TokenShards(folder, split)
    return [tok.decode(shards.document(i)) for i in range(shards.num_documents)]


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


# ---- documents --------------------------------------------------------------------------------------

@pytest.mark.parametrize("doc_sep", ["none", "blank-line", "line"])
def test_text_files_give_documents_each_followed_by_eos(tmp_path, tok_dir, tok, doc_sep):
    a = write(tmp_path / "a.txt", "First paragraph, line one.\nLine two.\n\n\nSecond paragraph 你好。\n")
    b = write(tmp_path / "b.txt", "Only line of b")
    run([a, b], tok_dir, tmp_path / "out", doc_sep=doc_sep)
    expected = {
        "none": [a.read_text(), b.read_text()],
        "blank-line": ["First paragraph, line one.\nLine two.", "Second paragraph 你好。", "Only line of b"],
        "line": ["First paragraph, line one.", "Line two.", "Second paragraph 你好。", "Only line of b"],
    }[doc_sep]
    assert texts(tmp_path / "out", tok) == expected
    shards = TokenShards(tmp_path / "out")
    eos = tok.eos_id
    assert shards.doc_starts[0] == 0 and shards.doc_starts[-1] == len(shards)
    assert all(shards.tokens[end - 1] == eos for end in shards.doc_starts[1:])     # EOS closes every document
    assert int((np.asarray(shards.tokens) == eos).sum()) == len(expected)
    assert shards.tokens.dtype == np.uint16 and shards.meta["eos_id"] == eos
    assert Tokenizer.from_dir(tmp_path / "out" / "tokenizer").encode(EN) == tok.encode(EN)


def test_jsonl_and_parquet_rows_are_documents(tmp_path, tok_dir, tok):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = ["one row", "第二行。", "three\nlines\nhere", "four"]
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    write(data / "a.jsonl", "".join(json.dumps({"body": r, "id": i}) + "\n" for i, r in enumerate(rows[:2])))
    pq.write_table(pa.table({"body": rows[2:], "n": [1, 2]}), data / "sub" / "b.parquet", row_group_size=1)
    write(data / "notes.md", "not a corpus file: folders only give .txt/.jsonl/.json/.parquet")
    summary = run([data], tok_dir, tmp_path / "out", text_field="body")
    assert texts(tmp_path / "out", tok) == rows
    assert summary["documents"] == 4 and summary["skipped"] == 0 and summary["input_files"] == 2


def test_huge_document_in_pieces_and_workers_give_the_same_output(tmp_path, tok_dir, tok, monkeypatch):
    monkeypatch.setattr(prepare_module, "MAX_TASK", 1 << 14)     # many small tasks, several in flight
    big = "".join(f"Line {i} of a long document. It goes on 然后继续。\n" for i in range(3500))
    assert len(big) > 2 * readers.PIECE_CHARS       # tokenized in several pieces
    files = [write(tmp_path / "big.txt", big)]
    files += [write(tmp_path / f"small{i}.txt", EN * (i + 1)) for i in range(6)]
    one = run(files, tok_dir, tmp_path / "one", segments="sentences", val_fraction=0.3)
    two = run(files, tok_dir, tmp_path / "two", segments="sentences", val_fraction=0.3, workers=2,
              max_memory_mb=1 << 16)  # this test process may already hold much memory (other tests)
    assert one["workers"] == 1 and two["workers"] == 2
    for name in ["train.bin", "val.bin", "train.docs.npy", "val.docs.npy", "train.segments.npy"]:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    decoded = texts(tmp_path / "two", tok) + texts(tmp_path / "two", tok, "val")
    assert sorted(decoded) == sorted(f.read_text() for f in files)


# ---- validation split -------------------------------------------------------------------------------

def test_tail_split_is_exactly_the_last_tokens(tmp_path, tok_dir, tok):
    corpus = write(tmp_path / "corpus.txt", (EN + ZH) * 40)
    run([corpus], tok_dir, tmp_path / "all")
    stream = np.asarray(TokenShards(tmp_path / "all").tokens)
    run([corpus], tok_dir, tmp_path / "tail", val_split="tail", val_fraction=0.1)
    train, val = TokenShards(tmp_path / "tail", "train"), TokenShards(tmp_path / "tail", "val")
    assert len(train) == int(0.9 * len(stream))
    np.testing.assert_array_equal(np.concatenate([train.tokens, val.tokens]), stream)
    assert val.doc_starts.tolist() == [0, len(val)]     # the rest of the cut document
    assert tok.decode(np.concatenate([train.document(0), val.document(0)])) == corpus.read_text()


def test_document_split_is_seeded_and_deterministic(tmp_path, tok_dir, tok):
    lines = [f"document number {i} 第{i}行" for i in range(40)]
    corpus = write(tmp_path / "c.txt", "\n".join(lines) + "\n")
    for out in ("a", "b"):
        run([corpus], tok_dir, tmp_path / out, doc_sep="line", val_fraction=0.25, seed=7)
    val = texts(tmp_path / "a", tok, "val")
    assert val == texts(tmp_path / "b", tok, "val")
    assert val == [line for i, line in enumerate(lines) if _is_val(i, 7, 0.25)]
    assert 3 <= len(val) <= 20
    assert texts(tmp_path / "a", tok) == [line for line in lines if line not in val]
    run([corpus], tok_dir, tmp_path / "c", doc_sep="line", val_fraction=0.25, seed=8)
    assert texts(tmp_path / "c", tok, "val") != val


def test_two_documents_always_give_one_to_val(tmp_path, tok_dir, tok):
    corpus = write(tmp_path / "c.txt", "first document\nsecond document\n")
    summary = run([corpus], tok_dir, tmp_path / "out", doc_sep="line", val_fraction=0.005, segments="lines")
    assert summary["val_documents"] == 1 and summary["train_documents"] == 1
    assert texts(tmp_path / "out", tok, "val") == ["second document"]
    val = TokenShards(tmp_path / "out", "val")
    assert val.segment_starts.tolist() == [0, len(val)] and val.tokens[-1] == tok.eos_id


# ---- segments ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode, expected", [
    ("sentences", ["Hello world.", " How are you?", " 我很好。", "你呢？\n", "A new line... \n\n", "End 3.5"]),
    ("lines", ["Hello world. How are you? 我很好。你呢？\n", "A new line... \n\n", "End 3.5"]),
])
def test_segment_starts_decode_to_sentences_or_lines(tmp_path, tok_dir, tok, mode, expected):
    corpus = write(tmp_path / "c.txt", "Hello world. How are you? 我很好。你呢？\nA new line... \n\nEnd 3.5")
    run([corpus], tok_dir, tmp_path / "out", segments=mode)
    shards = TokenShards(tmp_path / "out")
    starts = shards.segment_starts.tolist()
    segments = [tok.decode(shards.tokens[a:b]) for a, b in itertools.pairwise(starts)]
    assert segments == [*expected[:-1], expected[-1] + tok.decode([tok.eos_id])]


# ---- re-runs ----------------------------------------------------------------------------------------

def test_rerun_is_a_noop_and_changes_rebuild(tmp_path, tok_dir, capsys):
    corpus = write(tmp_path / "c.txt", EN * 3)
    first = run([corpus], tok_dir, tmp_path / "out")
    mtime = (tmp_path / "out" / "train.bin").stat().st_mtime_ns
    capsys.readouterr()
    again = run([corpus], tok_dir, tmp_path / "out")
    assert "up to date" in capsys.readouterr().out
    assert again["up_to_date"] and again["tokens"] == first["tokens"]
    assert (tmp_path / "out" / "train.bin").stat().st_mtime_ns == mtime
    changed = run([corpus], tok_dir, tmp_path / "out", segments="lines")        # another option
    assert "up_to_date" not in changed and (tmp_path / "out" / "train.segments.npy").is_file()
    write(corpus, EN * 4)                                                         # another input
    bigger = run([corpus], tok_dir, tmp_path / "out", segments="lines")
    assert "up_to_date" not in bigger and bigger["tokens"] > first["tokens"]
    assert len(TokenShards(tmp_path / "out")) == bigger["tokens"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")) == []


def test_output_folder_of_someone_else_is_left_alone(tmp_path, tok_dir):
    corpus = write(tmp_path / "c.txt", EN)
    (tmp_path / "out").mkdir()
    write(tmp_path / "out" / "thesis.tex", "precious")
    with pytest.raises(FileExistsError, match="not written by `lmforge data prepare`"):
        run([corpus], tok_dir, tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["thesis.tex"]


# ---- bad input --------------------------------------------------------------------------------------

def bad_corpus(tmp_path):
    write(tmp_path / "rows.jsonl", '{"text": "good row"}\n{"text": broken\n{"title": "no text"}\n'
                                   '{"text": 5}\n{"text": "last good row"}\n')
    (tmp_path / "latin1.txt").write_bytes("fine line\ncaf\xe9 au lait\nanother fine line\n".encode("latin-1"))
    return [tmp_path / "rows.jsonl", tmp_path / "latin1.txt"]


def test_bad_rows_are_skipped_and_reported_with_path_and_line(tmp_path, tok_dir, tok, capsys):
    summary = run(bad_corpus(tmp_path), tok_dir, tmp_path / "out")
    assert summary["skipped"] == 4
    where = [p.split(": ")[0] for p in summary["problems"]]
    assert where == [f"{tmp_path / 'rows.jsonl'}:{n}" for n in (2, 3, 4)] + [f"{tmp_path / 'latin1.txt'}:2"]
    assert "no 'text' field (has: title)" in summary["problems"][1]
    assert texts(tmp_path / "out", tok) == ["good row", "last good row", "fine line\nanother fine line\n"]
    out = capsys.readouterr().out
    assert "skipped 4 bad row(s)" in out and f"{tmp_path / 'latin1.txt'}:2: not valid UTF-8" in out


def test_on_error_fail_stops_at_the_first_bad_row(tmp_path, tok_dir):
    with pytest.raises(BadInput, match=r"rows\.jsonl:2: not a JSON line"):
        run(bad_corpus(tmp_path), tok_dir, tmp_path / "out", on_error="fail")
    assert not (tmp_path / "out" / "meta.json").exists()
    assert [p.name for p in (tmp_path / "out").iterdir()] == []        # temporaries removed


def test_missing_input_is_an_error_naming_it(tmp_path, tok_dir):
    with pytest.raises(FileNotFoundError, match="nope.txt does not exist"):
        run([write(tmp_path / "c.txt", EN), tmp_path / "nope.txt"], tok_dir, tmp_path / "out")


# ---- reading back -----------------------------------------------------------------------------------

def test_reader_refuses_missing_or_incomplete_folders(tmp_path, tok_dir):
    with pytest.raises(FileNotFoundError, match="run `lmforge data prepare"):
        TokenShards(tmp_path / "never")
    run([write(tmp_path / "c.txt", EN * 3)], tok_dir, tmp_path / "out", val_fraction=0.0)
    bin_path = tmp_path / "out" / "train.bin"
    os.truncate(bin_path, bin_path.stat().st_size - 2)
    with pytest.raises(ValueError, match="incomplete or damaged.*train.bin"):
        TokenShards(tmp_path / "out")
    (tmp_path / "out" / "meta.json").unlink()
    with pytest.raises(FileNotFoundError, match="did not finish"):
        TokenShards(tmp_path / "out")
    assert token_dtype(65535) == np.uint16 and token_dtype(65536) == np.uint32


def test_cli_prepares_and_reports_errors(tmp_path, tok_dir, capsys):
    corpus = write(tmp_path / "c.txt", EN * 5)
    argv = ["data", "prepare", "--tokenizer", str(tok_dir), "--output", str(tmp_path / "out"),
            "--val-split", "tail", "--val-fraction", "0.1", "--workers", "1", str(corpus)]
    assert cli.main(argv) == 0
    assert "prepared" in capsys.readouterr().out
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["options"]["val_split"] == "tail" and meta["summary"]["val_tokens"] > 0
    assert cli.main([*argv[:-1], str(tmp_path / "missing")]) == 2
    assert "missing does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("doc_sep", ["none", "blank-line", "line"])
def test_tiny_read_blocks_and_pieces_give_the_same_documents(tmp_path, tok_dir, tok, monkeypatch, doc_sep):
    text = ("short\n" + "很长的一行中文，没有换行" * 20 + "\n\n  \n" + "long english line " * 30 + "\n"
            + "x" * 7 + "\n\n" + ZH * 3 + "\nend without newline 。")
    corpus = write(tmp_path / "c.txt", text)
    run([corpus], tok_dir, tmp_path / "ref", doc_sep=doc_sep)
    monkeypatch.setattr(readers, "BLOCK_BYTES", 37)     # lines longer than a block, UTF-8 cut mid-character
    monkeypatch.setattr(readers, "PIECE_CHARS", 23)
    run([corpus], tok_dir, tmp_path / "tiny", doc_sep=doc_sep)
    assert texts(tmp_path / "tiny", tok) == texts(tmp_path / "ref", tok)
    assert len(texts(tmp_path / "ref", tok)) == {"none": 1, "blank-line": 4, "line": 8}[doc_sep]
