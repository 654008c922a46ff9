"""Labeled data for fine-tuning: one reader per file format, all returning lists of example dicts.

    read_examples(path, ...) ──► Examples: [ {example}, ... ] + .labels (inferred label set) + .skipped

What each format gives (the keys the tasks read):

    csv, tsv, jsonl, parquet   {"text", "label"} (+ "text_pair", + every other named column), keys
                               renamed from the file's columns (see "Columns" below)
    conll                      {"tokens": [...], "tags": [...]}: `token ... TAG` per line (the token
                               first, the tag last: CoNLL-2003's two or four columns, MSRA's one
                               character per line `char<TAB>TAG`), a blank line between sentences,
                               `-DOCSTART-` lines skipped; tags O / B-TYPE / I-TYPE (IOB2; IOBES
                               prefixes E- S- and BILOU's L- U- are accepted too)
    squad                      {"id", "title", "context", "question",
                                "answers": {"text": [...], "answer_start": [...]}} (SQuAD v1.1 JSON;
                               v2's unanswerable questions have empty answers)
    parallel                   {"source", "target"}: line i of `path` and line i of `target_path`
    chat                       {"messages": [{"role", "content"}, ...]} (JSON lines)

The format, when not given, comes from the file:
    target_path given            parallel
    .csv / .tsv, .tab            csv / tsv
    .jsonl, .ndjson              jsonl, or chat when the first row has a "messages" list
    .json                        squad when the first line is not a whole JSON object or is one with
                                 a "data" list (SQuAD's layout), else JSON lines as .jsonl
    .parquet, .pq                parquet (needs pyarrow)
    .conll, .bio, .iob           conll
    .txt                         conll when most of its first non-blank lines end in tags (O, B-X, ...),
                                 else tsv when they hold a tab (e.g. `title<TAB>label`)

Columns (csv, tsv, jsonl, parquet): `text_column`, `text_pair_column` and `label_column` name the
file's columns that become "text", "text_pair" and "label"; `columns={"source": "en", ...}` maps any
other key. Not named, they default to the first column present among "text", "sentence",
"sentence1", "review", "content" (text), "text_pair", "sentence2" (text_pair) and "label", "labels"
(label). CSV/TSV files have a header row unless `header=False`, or unless every column is given by
position (0-based ints), as for AG News' headerless `text<TAB>label`: `text_column=0, label_column=1`.
TSV is read without quote handling (GLUE's convention: a `"` is an ordinary character); CSV with
standard quoting. `label_sep` splits string labels into lists (multi-label), e.g. "sports|politics".

Bad rows (wrong field count, bad JSON, missing or empty text/label, a tag that is not a tag, text that
is not UTF-8, ...) raise a `ValueError` naming `file:line` and what is wrong; with
`skip_bad_rows=True` they are left out and listed in `Examples.skipped` for the caller to report.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from itertools import islice, zip_longest
from pathlib import Path

FORMATS = ("csv", "tsv", "jsonl", "parquet", "conll", "squad", "parallel", "chat")
TEXT_NAMES = ("text", "sentence", "sentence1", "review", "content")
PAIR_NAMES = ("text_pair", "sentence2")
LABEL_NAMES = ("label", "labels")
ROLES = ("system", "user", "assistant", "tool")
TAG = re.compile(r"O|[BIESLU]-\S+")
_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl",
             ".parquet": "parquet", ".pq": "parquet", ".conll": "conll", ".bio": "conll", ".iob": "conll"}


class Examples(list):
    """A list of example dicts, with what was learned reading them.

    Attributes:
        labels: the label set, sorted (numerically when every label is an integer), or None (no
            labels, or float labels: regression). Save it with the model (BertConfig.id2label).
        skipped: "file:line: reason" of each bad row left out (skip_bad_rows=True).
        format: the format the file was read as.
    """

    def __init__(self, rows=(), labels: list[str] | None = None, skipped=(), format: str | None = None):
        super().__init__(rows)
        self.labels, self.skipped, self.format = labels, list(skipped), format

    def summary(self) -> str:
        """One line for the user: how many examples, labels, skipped rows (the first few named)."""
        text = f"{len(self)} examples ({self.format})"
        if self.labels is not None:
            text += f", {len(self.labels)} labels: {', '.join(self.labels[:10])}" + (" ..." if len(self.labels) > 10 else "")
        if self.skipped:
            text += f"; skipped {len(self.skipped)} bad rows, first: " + "; ".join(self.skipped[:3])
        return text


def read_examples(path, format: str | None = None, *, text_column: str | int | None = None,
                  text_pair_column: str | int | None = None, label_column: str | int | None = None,
                  columns: dict | None = None, header: bool | None = None, label_sep: str | None = None,
                  target_path=None, limit: int | None = None, skip_bad_rows: bool = False) -> Examples:
    """Read a labeled file into example dicts (see the module docstring for formats and columns).

    Args:
        path: the file (for parallel text: the source side, e.g. `train.en`).
        format: one of FORMATS; None = inferred from the file name / content.
        text_column, text_pair_column, label_column: file columns (names, or 0-based positions for
            CSV/TSV) that become "text", "text_pair", "label".
        columns: more renames, example key -> file column, e.g. {"source": "en", "target": "zh"}.
        header: whether a CSV/TSV file starts with column names (None: yes, unless all columns named
            above are positions).
        label_sep: split string labels on this separator into lists (multi-label data).
        target_path: the target side of line-aligned parallel text (e.g. `train.de`).
        limit: read at most this many examples (sentences, for CoNLL) from the start of the file.
        skip_bad_rows: leave bad rows out (listed in `.skipped`) instead of raising ValueError.
    Returns:
        Examples (a list of dicts) with `.labels`, `.skipped` and `.format`.
    """
    path = Path(path)
    for p in (path, target_path):
        if p is not None and not Path(p).is_file():
            raise FileNotFoundError(f"{p} does not exist (or is not a file)")
    format = format or infer_format(path, target_path)
    if format not in FORMATS:
        raise ValueError(f"unknown data format {format!r}; choose one of: {', '.join(FORMATS)}")
    bad = _Bad(skip_bad_rows)
    names = _Columns(text_column, text_pair_column, label_column, columns, label_sep)
    rows = _READERS[format](path, bad, names=names, header=header, target_path=target_path)
    examples = list(islice(rows, limit))
    rows.close()  # stop reading (and close the file) when `limit` cut the file short
    label_key = "tags" if format == "conll" else "label"
    return Examples(examples, infer_labels(examples, label_key), bad.skipped, format)


def infer_format(path, target_path=None) -> str:
    """The format `read_examples` reads `path` as when none is given (rules: module docstring)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if target_path is not None:
        return "parallel"
    if suffix in _SUFFIXES:
        return "chat" if _SUFFIXES[suffix] == "jsonl" and _first_row_is_chat(path) else _SUFFIXES[suffix]
    if suffix == ".json":
        return _json_kind(path)
    if suffix == ".txt":
        return _txt_kind(path)
    raise ValueError(f"cannot tell the format of {path} from its name; pass format= one of {', '.join(FORMATS)}"
                     " (line-aligned parallel text also needs target_path=)")


def infer_labels(rows, key: str = "label") -> list[str] | None:
    """Sorted label names found under `key` (values or lists of values), None when there are none or
    some label is a non-integer float (a regression target)."""
    names = set()
    for row in rows:
        value = row.get(key)
        for v in value if isinstance(value, list) else () if value is None else [value]:
            if isinstance(v, float) and not v.is_integer():
                return None
            names.add(label_name(v))
    return sort_labels(names) if names else None


def label_name(value) -> str:
    """A label value as the name it is stored under: 1 and 1.0 (JSON) and "1" (CSV) are all "1"."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def sort_labels(names) -> list[str]:
    """Label names sorted: as numbers when all are integers ("2" before "10"), else as strings."""
    names = sorted(set(names))
    if all(re.fullmatch(r"-?\d+", n) for n in names):
        return sorted(names, key=int)
    return names


# ---- shared pieces ----------------------------------------------------------------------------------

class _Bad:
    """Bad rows: raised as ValueError at once, or recorded and skipped."""

    def __init__(self, skip: bool):
        self.skip, self.skipped = skip, []

    def __call__(self, where: str, reason: str) -> None:
        if not self.skip:
            raise ValueError(f"{where}: {reason} (skip_bad_rows=True leaves bad rows out)")
        self.skipped.append(f"{where}: {reason}")


class _Columns:
    """Which file columns become which example keys."""

    def __init__(self, text, text_pair, label, columns, label_sep):
        given = {"text": text, "text_pair": text_pair, "label": label}
        self.given = {k: v for k, v in {**given, **(columns or {})}.items() if v is not None}
        self.label_sep = label_sep

    def positional(self) -> bool:
        return bool(self.given) and all(isinstance(v, int) for v in self.given.values())

    def resolve(self, path: Path, names: list[str]) -> dict:
        """key -> column name (or position), checked against the file's column names."""
        mapping = dict(self.given)
        for key, defaults in (("text", TEXT_NAMES), ("text_pair", PAIR_NAMES), ("label", LABEL_NAMES)):
            if key not in mapping:
                found = next((n for n in defaults if n in names), None)
                if found is not None:
                    mapping[key] = found
        for key, col in mapping.items():
            if isinstance(col, int) and names:
                if not -len(names) <= col < len(names):
                    raise ValueError(f"{path}: {key} column {col} is out of range: the file has {len(names)} columns")
                mapping[key] = names[col]
            elif names and col not in names:
                raise ValueError(f"{path}: no column {col!r} (columns: {', '.join(map(str, names))}); "
                                 f"name the {key} column (e.g. {key}_column=...)")
        return mapping

    def apply(self, record: dict, mapping: dict) -> tuple[dict | None, str | None]:
        """(example, None), or (None, what is wrong): renames, checks text and labels."""
        missing = [str(c) for c in mapping.values() if c not in record]
        if missing:
            return None, f"no {', '.join(repr(m) for m in missing)} field (has: {', '.join(map(str, record))})"
        used = set(mapping.values())
        row = {k: v for k, v in record.items() if isinstance(k, str) and k not in used}
        row.update({key: record[col] for key, col in mapping.items()})
        return self._check(row)

    def _check(self, row: dict) -> tuple[dict | None, str | None]:
        for key in ("text", "text_pair"):
            if key in row and (not isinstance(row[key], str) or not row[key].strip()):
                return None, f"{key} is {_show(row[key])}: expected non-empty text"
        if "label" in row:
            label = row["label"]
            if isinstance(label, str):
                label = label.strip()
                if self.label_sep is not None:
                    label = [part.strip() for part in label.split(self.label_sep) if part.strip()]
            if label is None or label == "" or not _label_ok(label):
                return None, f"label is {_show(row['label'])}: expected a label name or number (or a list of them)"
            row["label"] = label
        return row, None


def _label_ok(label) -> bool:
    scalar = (str, int, float, bool)
    return isinstance(label, scalar) or (isinstance(label, list) and all(isinstance(v, scalar) for v in label))


def _show(value) -> str:
    if value is None or isinstance(value, str) and not value.strip():
        return "empty"
    return f"{type(value).__name__} {str(value)[:40]!r}"


def _lines(path: Path, bad: _Bad) -> Iterator[tuple[int, str | None]]:
    """(line number, text) of each line with its line break; None for a line that is not UTF-8."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad(f"{path}:{n}", f"not valid UTF-8 (byte {e.start + 1} of the line)")
                yield n, None
                continue
            yield n, line.removeprefix("\ufeff") if n == 1 else line


def _head(path: Path, n: int = 20) -> list[str]:
    """The first `n` non-blank lines (for format sniffing)."""
    lines = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                lines.append(line.removeprefix("\ufeff").rstrip("\r\n"))
            if len(lines) == n:
                break
    return lines


def _first_row_is_chat(path: Path) -> bool:
    try:
        first = json.loads(_head(path, 1)[0])
    except (ValueError, IndexError):
        return False
    return isinstance(first, dict) and isinstance(first.get("messages"), list)


def _json_kind(path: Path) -> str:
    try:
        first = json.loads(_head(path, 1)[0])
    except IndexError:
        raise ValueError(f"{path} is empty") from None
    except ValueError:
        return "squad"  # not one object per line: a pretty-printed JSON document
    if isinstance(first, dict) and isinstance(first.get("data"), list):
        return "squad"
    return "chat" if _first_row_is_chat(path) else "jsonl"


def _txt_kind(path: Path) -> str:
    lines = [s for s in _head(path) if not s.startswith("-DOCSTART-")]
    tagged = sum(len(_fields(s)) >= 2 and bool(TAG.fullmatch(_fields(s)[-1])) for s in lines)
    if lines and tagged > len(lines) / 2:  # most lines, so that a bad line is reported, not a format error
        return "conll"
    if lines and all("\t" in s for s in lines):
        return "tsv"
    raise ValueError(f"cannot tell the format of {path}: its lines are neither `token TAG` (CoNLL) nor "
                     f"tab-separated columns; pass format= one of {', '.join(FORMATS)}")


# ---- CSV / TSV --------------------------------------------------------------------------------------

class _Feed:
    """Lines for csv.reader, remembering the number of the last line handed out."""

    def __init__(self, lines):
        self.lines, self.number = lines, 0

    def __iter__(self):
        for number, line in self.lines:
            self.number = number
            if line is not None:
                yield line


def _read_csv(path, bad, names, header, delimiter=",", **_):
    feed = _Feed(_lines(path, bad))
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(iter(feed), delimiter=delimiter, quoting=quoting)
    header = not names.positional() if header is None else header
    if not header and not names.positional():
        raise ValueError(f"{path} has no header row, so name its columns by position, e.g. "
                         "text_column=0, label_column=1")
    columns = [c.strip() for c in next(reader, [])] if header else None
    mapping, start = names.resolve(path, columns) if header else None, feed.number + 1
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            bad(f"{path}:{feed.number}", f"not a CSV row ({e})")
            start = feed.number + 1
            continue
        line, start = start, feed.number + 1
        if not any(f.strip() for f in fields):
            continue
        if columns is None:  # no header: the first row sets the width, columns are positions
            columns = list(range(len(fields)))
            mapping = names.resolve(path, columns)
        if len(fields) != len(columns):
            bad(f"{path}:{line}", f"{len(fields)} fields, expected {len(columns)}"
                + (" (is a tab or comma inside the text?)" if len(fields) > len(columns) else ""))
            continue
        row, problem = names.apply(dict(zip(columns, fields, strict=True)), mapping)
        if problem:
            bad(f"{path}:{line}", problem)
        else:
            yield row


def _read_tsv(path, bad, names, header, **_):
    yield from _read_csv(path, bad, names, header, delimiter="\t")


# ---- JSON lines, chat, Parquet ----------------------------------------------------------------------

def _read_jsonl(path, bad, names, chat=False, **_):
    mapping = None
    for n, line in _lines(path, bad):
        if line is None or not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            bad(f"{path}:{n}", f"not a JSON line ({getattr(e, 'msg', e)}, column {getattr(e, 'colno', '?')})")
            continue
        if not isinstance(record, dict):
            bad(f"{path}:{n}", f"a JSON {type(record).__name__}, expected an object {{...}} per line")
            continue
        if mapping is None:
            mapping = {} if chat else names.resolve(path, list(record))
        row, problem = _chat_row(record) if chat else names.apply(record, mapping)
        if problem:
            bad(f"{path}:{n}", problem)
        else:
            yield row


def _read_chat(path, bad, names, **_):
    yield from _read_jsonl(path, bad, names, chat=True)


def _chat_row(record: dict) -> tuple[dict | None, str | None]:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        return None, f"no \"messages\" list (has: {', '.join(record)})"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            return None, (f"message {i} is {str(m)[:60]!r}: expected {{\"role\": one of {', '.join(ROLES)}, "
                          "\"content\": text}")
    return record, None


def _read_parquet(path, bad, names, **_):
    from .readers import require_pyarrow

    pq, pa = require_pyarrow()
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, ValueError) as e:
        raise ValueError(f"{path}: not a Parquet file ({e})") from None
    mapping, n = names.resolve(path, pf.schema_arrow.names), 0
    for batch in pf.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            n += 1
            row, problem = names.apply(record, mapping)
            if problem:
                bad(f"{path} row {n}", problem)
            else:
                yield row


# ---- CoNLL ------------------------------------------------------------------------------------------

def _fields(line: str) -> list[str]:
    """`token TAG` fields: split on tabs when the line has any (a token may then hold spaces), else on spaces."""
    fields = line.rstrip("\r\n").split("\t") if "\t" in line else line.split()
    while fields and not fields[-1].strip():
        fields.pop()
    return fields


def _read_conll(path, bad, **_):
    tokens, tags, problem = [], [], None
    for n, line in _lines(path, bad):
        if line is None:
            problem = problem or "skipped"  # already reported
            continue
        if not line.strip():
            if tokens and problem is None:
                yield {"tokens": tokens, "tags": tags}
            tokens, tags, problem = [], [], None
            continue
        fields = _fields(line)
        if fields[0] == "-DOCSTART-":
            continue
        if len(fields) < 2 or not TAG.fullmatch(fields[-1].strip()):
            why = "expected `token TAG`" if len(fields) < 2 else f"{fields[-1].strip()!r} is not a tag"
            bad(f"{path}:{n}", f"{why} (tags: O, B-TYPE, I-TYPE; sentences separated by a blank line)")
            problem = why
            continue
        tokens.append(fields[0])
        tags.append(fields[-1].strip())
    if tokens and problem is None:
        yield {"tokens": tokens, "tags": tags}


# ---- SQuAD ------------------------------------------------------------------------------------------

def _read_squad(path, bad, **_):
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 (byte {e.start + 1})") from None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise ValueError(  # noqa: TRY004 - bad user data, not a programming error
            f"{path}: not SQuAD JSON: expected {{\"data\": [{{\"title\", \"paragraphs\": [...]}}]}}")
    for a, article in enumerate(data["data"]):
        for p, paragraph in enumerate(article.get("paragraphs", [])):
            for q, qa in enumerate(paragraph.get("qas", [])):
                where = f"{path} (data[{a}].paragraphs[{p}].qas[{q}], id {qa.get('id')})"
                row, problem = _squad_row(article, paragraph, qa)
                if problem:
                    bad(where, problem)
                else:
                    yield row


def _squad_row(article: dict, paragraph: dict, qa: dict) -> tuple[dict | None, str | None]:
    context, question = paragraph.get("context"), qa.get("question")
    if not isinstance(context, str) or not context.strip():
        return None, "the paragraph has no context text"
    if not isinstance(question, str) or not question.strip():
        return None, "no question text"
    texts, starts = [], []
    for ans in qa.get("answers", []):
        text, start = ans.get("text"), ans.get("answer_start")
        if not isinstance(text, str) or not isinstance(start, int) or context[start : start + len(text)] != text:
            return None, f"answer {text!r} is not in the context at answer_start={start}"
        texts.append(text)
        starts.append(start)
    answers = {"text": texts, "answer_start": starts}
    return {"id": str(qa.get("id")), "title": article.get("title", ""), "context": context,
            "question": question, "answers": answers}, None


# ---- parallel text ----------------------------------------------------------------------------------

def _read_parallel(path, bad, target_path, **_):
    target = Path(target_path)
    _check_line_counts(path, target)
    for (n, src), (_, tgt) in zip_longest(_lines(path, bad), _lines(target, bad), fillvalue=(None, "")):
        if src is None or tgt is None:
            continue  # not UTF-8, already reported
        src, tgt = src.rstrip("\r\n"), tgt.rstrip("\r\n")
        if src.strip() and tgt.strip():
            yield {"source": src, "target": tgt}
        elif src.strip() or tgt.strip():
            empty, other = (path, target) if not src.strip() else (target, path)
            bad(f"{empty}:{n}", f"empty line, while line {n} of {other} is not")


def _check_line_counts(path: Path, target: Path) -> None:
    counts = [_count_lines(p) for p in (path, target)]
    if counts[0] != counts[1]:
        raise ValueError(f"parallel files differ in length: {path} has {counts[0]} lines, {target} has "
                         f"{counts[1]}; line i of one must translate line i of the other")


def _count_lines(path: Path) -> int:
    """Lines up to the last non-blank one (trailing blank lines do not count)."""
    last = 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if raw.strip():
                last = n
    return last


_READERS = {"csv": _read_csv, "tsv": _read_tsv, "jsonl": _read_jsonl, "chat": _read_chat,
            "parquet": _read_parquet, "conll": _read_conll, "squad": _read_squad, "parallel": _read_parallel}
