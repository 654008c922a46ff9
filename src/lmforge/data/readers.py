"""Corpus readers: text, JSON lines and Parquet files streamed as pieces of documents.

    inputs (files, folders) ──► expand_inputs ──► read_pieces ──► (text, starts_document) ...

A reader never holds a whole file: text files are read in blocks of about a MiB, JSON lines one line
at a time, Parquet one record batch at a time. A document longer than `PIECE_CHARS` characters comes
as several pieces (cut after a newline where possible; only the first has `starts_document`), so a
one-document 10 GB file streams like any other. Each piece is tokenized on its own, so a document's
tokens are those of its pieces concatenated: at a cut the tokenizer may split a few characters
differently than it would in one piece (e.g. two newlines that would have merged into one token).

What a document is:
    *.txt (and any explicitly named file of another type)   the whole file, or one per paragraph
        (doc_sep="blank-line") or one per line (doc_sep="line"; blank lines are skipped)
    *.jsonl, *.json (JSON lines)      one per row: the string in `text_field`
    *.parquet (needs pyarrow)         one per row: the string in column `text_field`

Bad input (undecodable text lines, rows that are not JSON or lack the text field, unreadable files)
goes to `Problems`: counted and skipped, or raised at once as `BadInput` naming `path:line`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

BLOCK_BYTES = 1 << 20       # text files are read this much at a time
PIECE_CHARS = 1 << 16       # documents longer than this are tokenized in pieces
SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")   # what folders are searched for
DOC_SEPS = ("none", "blank-line", "line")
SEGMENT_MODES = ("none", "lines", "sentences")

Piece = tuple[str, bool]    # (text, starts a new document)


class BadInput(ValueError):
    """A bad row or file met with on_error="fail"; the message names `path:line`."""


class Problems:
    """Bad rows and files: counted with the first few kept (on_error="skip"), or raised ("fail")."""

    def __init__(self, on_error: str = "skip", keep: int = 10):
        if on_error not in ("skip", "fail"):
            raise ValueError(f"on_error must be 'skip' or 'fail', got {on_error!r}")
        self.fail, self.keep = on_error == "fail", keep
        self.count, self.first = 0, []

    def add(self, path, reason: str, line: int | None = None, row: int | None = None) -> None:
        where = f"{path}:{line}" if line is not None else f"{path} row {row}" if row is not None else f"{path}"
        if self.fail:
            raise BadInput(f"{where}: {reason} (use --on-error skip to skip bad rows and go on)")
        self.count += 1
        if len(self.first) < self.keep:
            self.first.append(f"{where}: {reason}")


# ---- which files ----------------------------------------------------------------------------------

def expand_inputs(inputs, exclude=None) -> list[Path]:
    """Files to read, in order: each file as given, each folder's matching files (recursive, sorted).

    Hidden files and folders, and anything inside `exclude` (the output folder), are left out.
    Raises FileNotFoundError naming a path that does not exist.
    """
    items = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    if not items:
        raise ValueError("no inputs given: name text/JSONL/Parquet files or folders")
    exclude = Path(exclude).resolve() if exclude is not None else None
    files, seen = [], set()
    for item in map(Path, items):
        if item.is_dir():
            found = [p for p in sorted(item.rglob("*")) if _wanted(p, item, exclude)]
            if not found:
                raise ValueError(f"input folder {item} has no {', '.join('*' + s for s in SUFFIXES)} files")
        elif item.is_file():
            found = [item]
        else:
            raise FileNotFoundError(f"input {item} does not exist")
        for path in found:
            if path.resolve() not in seen:
                seen.add(path.resolve())
                files.append(path)
    return files


def _wanted(path: Path, root: Path, exclude: Path | None) -> bool:
    if path.suffix.lower() not in SUFFIXES or not path.is_file():
        return False
    if any(part.startswith(".") for part in path.relative_to(root).parts):
        return False
    return exclude is None or not path.resolve().is_relative_to(exclude)


# ---- documents ------------------------------------------------------------------------------------

def read_pieces(files: Iterable[Path], problems: Problems, text_field: str = "text", doc_sep: str = "none",
                progress: Callable[[int], object] = lambda n: None) -> Iterator[Piece]:
    """Every document of every file, as pieces `(text, starts_document)`; `progress(n)` gets bytes read."""
    if doc_sep not in DOC_SEPS:
        raise ValueError(f"doc_sep must be one of {', '.join(DOC_SEPS)}; got {doc_sep!r}")
    for path in files:
        kind = path.suffix.lower()
        try:
            if kind in (".jsonl", ".json"):
                yield from _jsonl_pieces(path, text_field, problems, progress)
            elif kind == ".parquet":
                yield from _parquet_pieces(path, text_field, problems, progress)
            else:
                blocks = _blocks(path, problems, progress)
                yield from _whole_file(blocks) if doc_sep == "none" else _TEXT_READERS[doc_sep](_lines_of(blocks))
        except OSError as e:
            problems.add(path, f"cannot read: {e.strerror or e}")


def split_long(text: str, limit: int = PIECE_CHARS) -> list[str]:
    """`text` in pieces of at most `limit` characters, cut after a newline (else before a space)."""
    pieces, start = [], 0
    while len(text) - start > limit:
        end = text.rfind("\n", start, start + limit) + 1
        if end <= start:
            end = text.rfind(" ", start + 1, start + limit)
        if end <= start:
            end = start + limit
        pieces.append(text[start:end])
        start = end
    pieces.append(text[start:])
    return pieces


def _document(text: str) -> Iterator[Piece]:
    """One document as pieces; an empty text is no document."""
    for i, piece in enumerate(split_long(text) if text else ()):
        yield piece, i == 0


# ---- text files -----------------------------------------------------------------------------------

def _blocks(path: Path, problems: Problems, progress) -> Iterator[tuple[str, bool]]:
    """Decoded blocks `(text, continues_a_line)` of about BLOCK_BYTES, cut after a newline.

    A line longer than a block is cut at a character boundary and the next block `continues` it.
    Lines that are not UTF-8 are reported to `problems` and left out.
    """
    with open(path, "rb") as f:
        carry, line_no, continues = b"", 1, False
        while True:
            data = f.read(BLOCK_BYTES)
            progress(len(data))
            buf = carry + data
            cut = len(buf) if not data else buf.rfind(b"\n") + 1 or _char_boundary(buf)
            chunk, carry = buf[:cut], buf[cut:]
            if chunk:
                text = _decode(chunk, path, line_no, problems)
                yield (text.removeprefix("\ufeff") if line_no == 1 and not continues else text), continues
                continues = not chunk.endswith(b"\n")
                line_no += chunk.count(b"\n")
            if not data:
                return


def _char_boundary(buf: bytes) -> int:
    """Where to cut `buf` (a line longer than a block) so that no UTF-8 character is cut in half."""
    for back in range(1, min(4, len(buf)) + 1):
        byte = buf[-back]
        if byte < 0x80 or byte >= 0xC0:     # ASCII, or the first byte of a character
            size = 1 if byte < 0x80 else 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return len(buf) if size <= back else len(buf) - back
    return len(buf)     # not UTF-8 at all: the decoder reports it


def _decode(chunk: bytes, path: Path, line_no: int, problems: Problems) -> str:
    try:
        return chunk.decode("utf-8")
    except UnicodeDecodeError:
        pass
    good, lines = [], chunk.split(b"\n")
    for i, raw in enumerate(lines):     # find the bad lines, one by one
        try:
            good.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            problems.add(path, f"not valid UTF-8 (byte {e.start + 1} of the line)", line=line_no + i)
            if i in (0, len(lines) - 1):
                good.append("")     # a part of a line cut by the block ends: keep the line breaks around it
    return "\n".join(good)


def _lines_of(blocks: Iterator[tuple[str, bool]]) -> Iterator[tuple[str, bool]]:
    """Lines with their newline as `(line, continues_previous)`; a block cut mid-line splits a line."""
    for text, continues in blocks:
        lines = text.split("\n")
        last = lines.pop()
        for i, line in enumerate(lines):
            yield line + "\n", continues and i == 0
        if last:
            yield last, continues and not lines


def _whole_file(blocks) -> Iterator[Piece]:
    """doc_sep="none": the file is one document, in pieces of about PIECE_CHARS.

    A cut is made only once the next PIECE_CHARS characters are all read, so where the pieces are cut
    does not depend on how the file was read.
    """
    rest, first = "", True
    for text, _ in blocks:
        *full, rest = split_long(rest + text)
        for piece in full:
            yield piece, first
            first = False
    if rest:
        yield rest, first


def _line_documents(lines) -> Iterator[Piece]:
    """doc_sep="line": each non-blank line is a document (without its line break)."""
    for line, continues in lines:
        text = line.removesuffix("\n").removesuffix("\r")
        if continues:
            yield from ((piece, False) for piece in split_long(text) if piece)
        elif text.strip():
            yield from _document(text)


def _paragraphs(lines) -> Iterator[Piece]:
    """doc_sep="blank-line": runs of non-blank lines are documents (without the last line break)."""
    buf, size, started = [], 0, False
    for line, continues in lines:
        if continues or line.strip():
            buf.append(line)
            size += len(line)
            if size > PIECE_CHARS:      # a huge paragraph: pass on its full pieces
                *full, rest = split_long("".join(buf))
                for piece in full:
                    yield piece, not started
                    started = True
                buf, size = [rest], len(rest)
            continue
        yield from _end_paragraph(buf, started)
        buf, size, started = [], 0, False
    yield from _end_paragraph(buf, started)


def _end_paragraph(buf: list[str], started: bool) -> Iterator[Piece]:
    text = "".join(buf).removesuffix("\n").removesuffix("\r")
    for i, piece in enumerate(split_long(text) if text else ()):
        yield piece, not started and i == 0


_TEXT_READERS = {"line": _line_documents, "blank-line": _paragraphs}


# ---- JSON lines -----------------------------------------------------------------------------------

def _jsonl_pieces(path: Path, field: str, problems: Problems, progress) -> Iterator[Piece]:
    done = 0
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            done += len(raw)
            if done >= 1 << 20:     # the progress bar is not cheap enough to call per line
                progress(done)
                done = 0
            if not raw.strip():
                continue
            if line_no == 1 and raw.lstrip().startswith(b"["):
                problems.add(path, "a JSON array, not JSON lines (one object per line)", line=1)
                break
            text = _row_text(raw, field, path, line_no, problems)
            if text is not None:
                yield from _document(text)
    progress(done)


def _row_text(raw: bytes, field: str, path: Path, line_no: int, problems: Problems) -> str | None:
    try:
        row = json.loads(raw)
    except ValueError as e:     # JSONDecodeError and UnicodeDecodeError
        problems.add(path, f"not a JSON line ({e})", line=line_no)
        return None
    if not isinstance(row, dict) or field not in row:
        keys = ", ".join(map(str, list(row)[:10])) if isinstance(row, dict) else type(row).__name__
        problems.add(path, f"no {field!r} field (has: {keys}); name the text field with --text-field",
                     line=line_no)
        return None
    if not isinstance(row[field], str):
        problems.add(path, f"{field!r} is {type(row[field]).__name__}, not a string", line=line_no)
        return None
    return row[field]


# ---- Parquet --------------------------------------------------------------------------------------

def _parquet_pieces(path: Path, field: str, problems: Problems, progress) -> Iterator[Piece]:
    pq, pa = require_pyarrow()
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, ValueError) as e:
        problems.add(path, f"not a Parquet file ({e})")
        return
    names = pf.schema_arrow.names
    if field not in names:
        problems.add(path, f"no column {field!r} (has: {', '.join(names)}); name it with --text-field")
        return
    kind = pf.schema_arrow.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        problems.add(path, f"column {field!r} holds {kind}, not strings")
        return
    size, rows, row = path.stat().st_size, max(pf.metadata.num_rows, 1), 0
    for batch in pf.iter_batches(batch_size=1024, columns=[field]):
        for text in batch.column(0).to_pylist():
            row += 1
            if text is None:
                problems.add(path, f"{field!r} is null", row=row)
            else:
                yield from _document(text)
        progress(size * batch.num_rows // rows)


def require_pyarrow():
    """(pyarrow.parquet, pyarrow), or a ValueError saying how to install it."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError("reading Parquet files needs pyarrow: pip install pyarrow") from None
    return pq, pa


# ---- segments -------------------------------------------------------------------------------------

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_SEGMENT_ENDS = {
    "lines": re.compile(r"\n"),
    # a run of sentence-final marks (and closing quotes) followed by a space and more text, or by a
    # CJK character; the space goes with the next sentence, as byte-level BPE attaches it to the word
    "sentences": re.compile(rf"\n|[。！？!?.]+[\"'”’」』)）]*(?=[ \t\u3000]+\S|[{_CJK}])"),
}


def split_segments(text: str, mode: str) -> list[str]:
    """`text` cut into sentences or lines (joined, they give `text` back); blank ones join the one before."""
    if mode == "none":
        return [text]
    cuts = [m.end() for m in _SEGMENT_ENDS[mode].finditer(text) if m.end() < len(text)]
    segments = []
    for start, end in zip([0, *cuts], [*cuts, len(text)], strict=True):
        part = text[start:end]
        if segments and not part.strip():
            segments[-1] += part
        else:
            segments.append(part)
    return segments
