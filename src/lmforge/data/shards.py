"""Token shards: a tokenized corpus as flat binary files that training memory-maps.

Written by `lmforge data prepare` (lmforge.data.prepare), read with `TokenShards(folder, split)`.
The folder:

    meta.json               written last: its presence means the folder is complete. Holds the
                            format version, dtype, vocab_size, eos_id, the tokenizer (path + sha1 of its
                            files), the options, every input (path, size, mtime, sha1 of its first and
                            last MiB: the "up to date" check), the splits' sizes and the run summary.
    train.bin, val.bin      token ids, flat, little-endian uint16 (vocab < 65536) or uint32: the
                            documents one after another, each followed by the EOS id (if the
                            tokenizer has one), so a causal-LM window sees where documents end.
    {split}.docs.npy        int64 (D + 1,): where each document starts in {split}.bin, then the
                            total token count; document i is tokens[docs[i]:docs[i + 1]] (EOS included).
    {split}.segments.npy    int64 (S + 1,), only when segments were asked for: where each sentence or
                            line starts (every document start is one), then the total.
    tokenizer/              a copy of the tokenizer's files: training loads it from here.

With a "tail" validation split the cut falls inside a document: train's last document then has no EOS
and val's first document is the rest of it (its start, 0, is in val.docs.npy either way).

    shards = TokenShards("data/shakespeare", "train")
    x = shards.tokens[i : i + 257]          # np.memmap, nothing is read until sliced
    shards.document(3)                      # the 4th document's ids, without its EOS
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

FORMAT = "lmforge-token-shards"
VERSION = 1
SPLITS = ("train", "val")
_INDEX_CHUNK = 1 << 20      # int64 entries per read when rewriting an index


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits in it (vocab < 65536), else uint32; always little-endian."""
    return np.dtype("<u2" if vocab_size < 1 << 16 else "<u4")


def read_meta(folder) -> dict | None:
    """The folder's meta.json, or None when there is none (not prepared, or not finished)."""
    path = Path(folder) / "meta.json"
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def write_meta(folder, meta: dict) -> None:
    """meta.json, written atomically (it marks the folder complete)."""
    path = Path(folder) / "meta.json"
    tmp = path.with_name("meta.json.tmp")
    tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class TokenShards:
    """One split of a prepared folder: tokens memory-mapped, document (and segment) starts.

    Args:
        folder: a folder written by `lmforge data prepare`.
        split: "train" or "val".
    Attributes:
        tokens: np.memmap (N,) of uint16/uint32 ids (a plain empty array for an empty split).
        doc_starts: int64 (D + 1,): document starts, then N.
        segment_starts: int64 (S + 1,) sentence/line starts, then N; None unless prepared with segments.
        meta: the folder's meta.json.
    """

    def __init__(self, folder, split: str = "train"):
        self.folder, self.split = Path(folder), split
        meta = read_meta(self.folder)
        if meta is None:
            raise FileNotFoundError(f"{self.folder} holds no prepared token shards (no meta.json: never prepared, "
                                    "or the run did not finish); run `lmforge data prepare --tokenizer TOKENIZER "
                                    f"--output {self.folder} INPUTS...` first")
        if split not in meta["splits"]:
            raise ValueError(f"no split {split!r} in {self.folder}; choose one of: {', '.join(meta['splits'])}")
        self.meta, sizes = meta, meta["splits"][split]
        self.dtype = np.dtype(meta["dtype"]).newbyteorder("<")
        self.tokens = self._map(sizes["tokens"])
        self.doc_starts = self._index("docs", sizes["documents"] + 1)
        self.segment_starts = self._index("segments", sizes["segments"] + 1) if sizes.get("segments") else None

    def _map(self, n: int) -> np.ndarray:
        path = self._file(f"{self.split}.bin", n * self.dtype.itemsize)
        return np.memmap(path, dtype=self.dtype, mode="r", shape=(n,)) if n else np.zeros(0, self.dtype)

    def _index(self, kind: str, n: int) -> np.ndarray:
        path = self._file(f"{self.split}.{kind}.npy")
        index = np.load(path, mmap_mode="r")
        if index.shape != (n,) or index[-1] != len(self.tokens):
            raise ValueError(self._incomplete(f"{path.name} has {index.shape[0]} entries, meta.json says {n}"))
        return index

    def _file(self, name: str, size: int | None = None) -> Path:
        path = self.folder / name
        if not path.is_file():
            raise FileNotFoundError(self._incomplete(f"{name} is missing"))
        if size is not None and path.stat().st_size != size:
            raise ValueError(self._incomplete(f"{name} has {path.stat().st_size} bytes, meta.json says {size}"))
        return path

    def _incomplete(self, what: str) -> str:
        return (f"token shards in {self.folder} are incomplete or damaged ({what}); run `lmforge data prepare "
                f"... --output {self.folder} --force` again")

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_documents(self) -> int:
        return len(self.doc_starts) - 1

    @property
    def eos_id(self) -> int | None:
        return self.meta.get("eos_id")

    def document(self, i: int) -> np.ndarray:
        """The ids of document `i` (a view into the memmap), without the EOS that follows it."""
        if not -self.num_documents <= i < self.num_documents:
            raise IndexError(f"document {i} out of range: the {self.split} split has {self.num_documents}")
        i %= self.num_documents
        start, end = int(self.doc_starts[i]), int(self.doc_starts[i + 1])
        if end > start and self.eos_id is not None and self.tokens[end - 1] == self.eos_id:
            end -= 1
        return self.tokens[start:end]

    def __repr__(self) -> str:
        return (f"TokenShards({str(self.folder)!r}, {self.split!r}: {len(self):,} tokens, "
                f"{self.num_documents:,} documents)")


# ---- writing --------------------------------------------------------------------------------------

class _IndexFile:
    """Int64 offsets appended to a raw file, buffered: memory does not grow with the corpus."""

    def __init__(self, path: Path):
        self.path, self.buf, self.count = path, [], 0
        self.file = open(path, "wb")     # noqa: SIM115 (closed by ShardWriter.close)

    def append(self, value: int) -> None:
        self.buf.append(value)
        self.count += 1
        if len(self.buf) >= 1 << 16:
            self.flush()

    def extend(self, values: np.ndarray) -> None:
        self.flush()
        self.file.write(values.astype("<i8", copy=False).tobytes())
        self.count += len(values)

    def flush(self) -> None:
        if self.buf:
            self.file.write(np.array(self.buf, "<i8").tobytes())
            self.buf = []
        self.file.flush()

    def pop_from(self, value: int) -> np.ndarray:
        """Remove and return the trailing entries >= value (the offsets are sorted). File closed."""
        entries = np.memmap(self.path, "<i8", "r") if self.count else np.zeros(0, "<i8")
        keep = int(np.searchsorted(entries, value))
        tail = np.array(entries[keep:])
        del entries
        os.truncate(self.path, keep * 8)
        self.count = keep
        return tail

    def rewrite(self, values: np.ndarray) -> None:
        """Replace the entries (file closed)."""
        self.path.write_bytes(values.astype("<i8").tobytes())
        self.count = len(values)


class ShardWriter:
    """Appends a split's tokens, document starts and segment starts to temporary files in `folder`.

    After `close()`, `finish()` adds `{name}.docs.npy.tmp` (and `.segments.npy.tmp`) to `{name}.bin.tmp`;
    the caller renames them once everything is written.
    """

    def __init__(self, folder: Path, name: str, dtype: np.dtype, segments: bool):
        self.folder, self.name, self.dtype = Path(folder), name, np.dtype(dtype)
        self.bin_path = self.folder / f"{name}.bin.tmp"
        self.bin = open(self.bin_path, "wb")     # noqa: SIM115 (closed by close)
        self.docs = _IndexFile(self.folder / f"{name}.docs.raw.tmp")
        self.segments = _IndexFile(self.folder / f"{name}.segments.raw.tmp") if segments else None
        self.n = 0                   # tokens written
        self.last_doc_start = -1     # where the last document started

    @property
    def num_documents(self) -> int:
        return self.docs.count

    def start_document(self) -> None:
        self.docs.append(self.n)
        self.last_doc_start = self.n

    def write(self, ids: np.ndarray, segment_offsets: np.ndarray | None = None) -> None:
        """Append ids (N,); `segment_offsets` are segment starts relative to ids[0]."""
        self.bin.write(ids.astype(self.dtype, copy=False).tobytes())
        if self.segments is not None and segment_offsets is not None:
            self.segments.extend(segment_offsets + self.n)
        self.n += len(ids)

    def move_last_document(self, dst: ShardWriter) -> None:
        """Make this split's last document the only one of the empty split `dst` (both closed)."""
        assert dst.n == 0 and dst.num_documents == 0 and self.last_doc_start >= 0
        start, itemsize = self.last_doc_start, self.dtype.itemsize
        _copy_tail(self.bin_path, dst.bin_path, start * itemsize)
        os.truncate(self.bin_path, start * itemsize)
        dst.docs.rewrite(self.docs.pop_from(start) - start)
        if self.segments is not None:
            dst.segments.rewrite(self.segments.pop_from(start) - start)
        self.n, dst.n = start, self.n - start

    def finish(self) -> dict:
        """Write the .npy indexes; returns the split's sizes for meta.json."""
        _write_index(self.docs.path, self._npy("docs"), self.n)
        sizes = {"tokens": self.n, "documents": self.docs.count, "segments": None}
        if self.segments is not None:
            _write_index(self.segments.path, self._npy("segments"), self.n)
            sizes["segments"] = self.segments.count
        self.remove_raw()
        return sizes

    def close(self) -> None:
        """Flush and close the files (again: no effect); `finish` or `split_tail` come after."""
        self.bin.close()
        for index in (self.docs, self.segments):
            if index is not None and not index.file.closed:
                index.flush()
                index.file.close()

    def remove_raw(self) -> None:
        for index in (self.docs, self.segments):
            if index is not None:
                index.path.unlink(missing_ok=True)

    def _npy(self, kind: str) -> Path:
        return self.folder / f"{self.name}.{kind}.npy.tmp"


def split_tail(writer: ShardWriter, val_fraction: float) -> dict:
    """Cut one finished-writing stream into train (first tokens) and val (the last `val_fraction`).

    The cut is at exactly int((1 - val_fraction) * N) tokens, as nanoGPT cuts its 90/10 split.
    Returns {"train": sizes, "val": sizes}.
    """
    writer.close()
    n, folder, dtype = writer.n, writer.folder, writer.dtype
    cut = int((1 - val_fraction) * n)
    _copy_tail(writer.bin_path, folder / "val.bin.tmp", cut * dtype.itemsize)
    os.truncate(writer.bin_path, cut * dtype.itemsize)
    os.replace(writer.bin_path, folder / "train.bin.tmp")
    sizes = {"train": {"tokens": cut, "segments": None}, "val": {"tokens": n - cut, "segments": None}}
    kinds = [("docs", writer.docs.path, "documents")]
    if writer.segments is not None:
        kinds.append(("segments", writer.segments.path, "segments"))
    for kind, raw, key in kinds:
        sizes["train"][key] = _write_index(raw, folder / f"train.{kind}.npy.tmp", cut, hi=cut)
        starts_at_cut = _contains(raw, cut)
        sizes["val"][key] = _write_index(raw, folder / f"val.{kind}.npy.tmp", n - cut, lo=cut,
                                         lead_zero=n > cut and not starts_at_cut)
    writer.remove_raw()
    return sizes


def _copy_tail(src: Path, dst: Path, offset: int) -> None:
    with open(src, "rb") as f, open(dst, "wb") as out:
        f.seek(offset)
        while chunk := f.read(1 << 24):
            out.write(chunk)


def _index_chunks(raw: Path, lo: int, hi: int | None):
    """The raw index's entries in [lo, hi), shifted by -lo, a chunk at a time."""
    with open(raw, "rb") as f:
        while (chunk := np.fromfile(f, "<i8", count=_INDEX_CHUNK)).size:
            keep = chunk >= lo if hi is None else (chunk >= lo) & (chunk < hi)
            yield chunk[keep] - lo


def _contains(raw: Path, value: int) -> bool:
    return any(len(chunk) for chunk in _index_chunks(raw, value, value + 1))


def _write_index(raw: Path, out: Path, total: int, lo: int = 0, hi: int | None = None,
                 lead_zero: bool = False) -> int:
    """Write an int64 .npy: [0 if lead_zero] + raw entries in [lo, hi) minus lo + [total].

    Streams (two passes: count, then write) so a huge index never sits in memory. Returns the number
    of entries before the total.
    """
    count = int(lead_zero) + sum(len(c) for c in _index_chunks(raw, lo, hi))
    with open(out, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<i8", "fortran_order": False, "shape": (count + 1,)})
        if lead_zero:
            f.write(np.zeros(1, "<i8").tobytes())
        f.writelines(chunk.tobytes() for chunk in _index_chunks(raw, lo, hi))
        f.write(np.array([total], "<i8").tobytes())
    return count
