"""`lmforge data prepare`: tokenize a corpus once, in parallel and in bounded memory, into token shards.

    files ──► readers (this process) ──► tasks of ~1 MB of text ──► worker processes (tokenize)
          ──► results, in order ──► each document to train or val, EOS after it ──► OUTPUT/*.bin

    lmforge data prepare --tokenizer tok/ --output data/shakespeare --val-split tail --val-fraction 0.1 \\
        ../shared/data/en/tinyshakespeare.txt
    summary = prepare(["corpus/"], "tok/", "data/corpus", segments="sentences")

Memory stays bounded whatever the corpus size: readers stream (lmforge.data.readers), at most two tasks
per worker are in flight, results go straight to disk, and `max_memory_mb` sets the task size and, if
it is tight, how many workers fit (each holds its own copy of the tokenizer). The output is the same
for any number of workers or memory limit. Writing goes to temporary names that are renamed at the
end, meta.json last, so an interrupted run never leaves a folder that looks complete; a re-run with
the same inputs (size, mtime, first/last MiB), tokenizer and options does nothing. The on-disk
format is described in lmforge.data.shards.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import multiprocessing
import os
import re
import shutil
import sys
import time
from collections import deque
from contextlib import closing
from pathlib import Path

import numpy as np

from .readers import (
    DOC_SEPS,
    SEGMENT_MODES,
    Problems,
    expand_inputs,
    read_pieces,
    require_pyarrow,
    split_segments,
)
from .shards import FORMAT, SPLITS, VERSION, ShardWriter, read_meta, split_tail, token_dtype, write_meta

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "chat_template.jinja", "added_tokens.json")
ENCODE_CHARS = 1 << 16      # text per call into the tokenizer (its per-token bookkeeping stays small)
WORKER_MB = 40              # a worker's tokenizing working memory (caches, allocator) beyond its imports
HEADROOM = 0.9              # plan for 90% of the limit: allocators do not hand every freed byte back
TASK_FACTOR = 8             # memory per byte of task text: copies in this process, the pipe, the worker, ids
MIN_TASK, MAX_TASK = 1 << 18, 1 << 22


def prepare(inputs, tokenizer_dir, output, *, text_field: str = "text", val_fraction: float = 0.005,
            val_split: str = "documents", seed: int = 0, doc_sep: str = "none", segments: str = "none",
            workers: int | None = None, on_error: str = "skip", max_memory_mb: int = 1024,
            force: bool = False, progress: bool = True) -> dict:
    """Tokenize `inputs` with the tokenizer in `tokenizer_dir` into token shards in `output`.

    Args:
        inputs: files or folders (searched recursively for *.txt, *.jsonl, *.json, *.parquet).
        tokenizer_dir: a tokenizer folder (tokenizer.json or vocab.txt); copied to OUTPUT/tokenizer.
        output: the folder to write (see lmforge.data.shards for its layout).
        text_field: the JSON field / Parquet column holding each row's text.
        val_fraction: share of documents (val_split="documents": a seeded pseudo-random set, at least
            one when there are two or more) or of tokens (val_split="tail": the last ones) for val.
        doc_sep: what a document is in a text file: "none" (the file), "blank-line", "line".
        segments: also record sentence ("sentences") or line ("lines") starts, e.g. for BERT's NSP.
        workers: tokenizing processes (default: all cores; 1 = in this process).
        on_error: "skip" bad rows/files and report them at the end, or "fail" at the first one.
        max_memory_mb: bound on the resident memory of this process and its workers together.
        force: rebuild even when the folder is up to date.
    Returns:
        The summary (documents, tokens, bytes/token, split sizes, skipped rows, time), also in meta.json;
        with "up_to_date": True when nothing had to be done.
    """
    from ..tokenizer import Tokenizer

    options = _options(text_field, val_fraction, val_split, seed, doc_sep, segments, on_error, max_memory_mb)
    out, tok_dir = Path(output), Path(tokenizer_dir)
    files = expand_inputs(inputs, exclude=out)
    tokenizer = Tokenizer.from_dir(tok_dir)
    key = {"version": VERSION, "tokenizer": {"path": str(tok_dir.resolve()), "sha1": _tokenizer_sha1(tok_dir)},
           "options": options, "inputs": [_fingerprint(p) for p in files]}
    old = read_meta(out)
    if not force and _up_to_date(old, key, out, on_error):
        print(f"{out} is up to date ({old['summary']['tokens']:,} tokens); nothing to do (--force rebuilds)")
        return {**old["summary"], "up_to_date": True}
    if any(p.suffix.lower() == ".parquet" for p in files):
        require_pyarrow()      # fail early, and count its memory in the base below

    _claim(out)
    start, problems = time.time(), Problems(on_error)
    eos = tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.sep_id
    dtype = token_dtype(len(tokenizer))
    n_workers, task_bytes = plan_workers(max_memory_mb, workers or os.cpu_count() or 1, _rss_mb())
    if sum(_size(p) for p in files) <= task_bytes:
        n_workers = 1       # one task: starting workers would only cost time
    print(f"tokenizing {len(files)} file(s) with {n_workers} process(es), tasks of {task_bytes / 2**20:.2f} MB "
          f"of text (--max-memory-mb {max_memory_mb})")
    try:
        splits, counts = _tokenize(files, tok_dir, out, options, problems, eos, dtype, n_workers, task_bytes,
                                   progress)
    except BaseException:
        _remove_temporaries(out)
        raise
    summary = _summary(files, splits, counts, problems, eos, n_workers, time.time() - start)
    _finish(out, tok_dir)
    write_meta(out, {"format": FORMAT, **key, "dtype": dtype.name, "vocab_size": len(tokenizer), "eos_id": eos,
                     "splits": splits, "summary": summary})
    _print_summary(out, summary, options)
    return summary


def _options(text_field, val_fraction, val_split, seed, doc_sep, segments, on_error, max_memory_mb) -> dict:
    """The options that shape the output (stored in meta.json), checked."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    for name, value, allowed in (("val_split", val_split, ("documents", "tail")), ("doc_sep", doc_sep, DOC_SEPS),
                                 ("segments", segments, SEGMENT_MODES), ("on_error", on_error, ("skip", "fail"))):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
    if max_memory_mb <= 0:
        raise ValueError(f"max_memory_mb must be positive, got {max_memory_mb}")
    if not text_field:
        raise ValueError("text_field must name the JSON field / Parquet column holding the text")
    return {"text_field": text_field, "val_fraction": val_fraction, "val_split": val_split, "seed": seed,
            "doc_sep": doc_sep, "segments": segments}


# ---- the pipeline ---------------------------------------------------------------------------------

def _tokenize(files, tok_dir, out, options, problems, eos, dtype, n_workers, task_bytes, progress):
    """Read, tokenize and route everything; returns (split sizes, {"documents", "text_bytes"})."""
    from tqdm import tqdm

    segments = options["segments"] != "none"
    tail = options["val_split"] == "tail"
    names = ["all"] if tail else list(SPLITS)
    writers = {name: ShardWriter(out, name, dtype, segments) for name in names}
    fraction, seed = options["val_fraction"], options["seed"]
    choose = (lambda i: "all") if tail else (lambda i: "val" if _is_val(i, seed, fraction) else "train")
    router = _Router(writers, choose, eos, dtype)
    total = sum(_size(p) for p in files)
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="tokenizing", file=sys.stderr,
               disable=not progress, mininterval=0.5)
    pieces = read_pieces(files, problems, options["text_field"], options["doc_sep"], bar.update)
    results = _encoded(_batches(pieces, task_bytes), tok_dir, options["segments"], dtype, n_workers)
    try:
        with bar, closing(results):     # closing: the worker pool stops even if writing fails
            for starts, result in results:
                router.add(starts, result)
            router.end_document()
    finally:
        for writer in writers.values():
            writer.close()
    if router.documents == 0:
        raise ValueError(f"no documents in the inputs ({problems.count} bad rows or files skipped"
                         + (f"; the first: {problems.first[0]}" if problems.first else "") + ")")
    if tail:
        return split_tail(writers["all"], fraction), router.counts()
    _at_least_one_each(writers, fraction)
    return {name: w.finish() for name, w in writers.items()}, router.counts()


def _is_val(index: int, seed: int, fraction: float) -> bool:
    """Whether document `index` goes to val: a seeded hash, so the same documents every run."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < fraction * 2**64


def _at_least_one_each(writers: dict, fraction: float) -> None:
    """With two or more documents, neither split is left empty (when val_fraction > 0)."""
    train, val = writers["train"], writers["val"]
    if fraction > 0 and train.num_documents + val.num_documents >= 2:
        if val.num_documents == 0:
            train.move_last_document(val)
        elif train.num_documents == 0:
            val.move_last_document(train)


def _batches(pieces, task_bytes: int):
    """Group pieces into tasks `(texts, starts_document)` of about `task_bytes` of text."""
    texts, starts, size = [], [], 0
    for text, start in pieces:
        texts.append(text)
        starts.append(start)
        size += len(text) if text.isascii() else 3 * len(text)    # ~UTF-8 bytes, without encoding
        if size >= task_bytes:
            yield texts, starts
            texts, starts, size = [], [], 0
    if texts:
        yield texts, starts


def _encoded(batches, tok_dir: Path, segments: str, dtype: np.dtype, n_workers: int):
    """`(starts, encode_pieces(...))` for each batch, in order: in this process or in a worker pool.

    At most two tasks per worker are in flight (Pool.imap would read the whole corpus ahead).
    """
    if n_workers <= 1:
        backend = _load_backend(tok_dir)
        for texts, starts in batches:
            yield starts, encode_pieces(backend, texts, segments, dtype)
        return
    context = multiprocessing.get_context("spawn")      # no fork of a process holding threads
    with context.Pool(n_workers, _init_worker, (str(tok_dir),)) as pool:
        pending = deque()
        for texts, starts in batches:
            pending.append((starts, pool.apply_async(_encode_task, ((texts, segments, dtype.str),))))
            if len(pending) >= 2 * n_workers:
                starts, result = pending.popleft()
                yield starts, result.get()
        while pending:
            starts, result = pending.popleft()
            yield starts, result.get()


class _Router:
    """Sends each document's tokens to its split's writer, and an EOS after each document."""

    def __init__(self, writers: dict, choose, eos: int | None, dtype: np.dtype):
        self.writers, self.choose = writers, choose
        self.eos = None if eos is None else np.array([eos], dtype)
        self.current, self.documents, self.text_bytes = None, 0, 0

    def add(self, starts: list[bool], result) -> None:
        ids, lengths, seg_counts, seg_offsets, text_bytes = result
        self.text_bytes += text_bytes
        ends = np.cumsum(lengths).tolist()
        seg_ends = np.cumsum(seg_counts).tolist() if seg_counts is not None else None
        for k, start in enumerate(starts):
            if start:
                self.end_document()
                self.current = self.writers[self.choose(self.documents)]
                self.current.start_document()
                self.documents += 1
            segs = None if seg_ends is None else seg_offsets[seg_ends[k] - seg_counts[k]:seg_ends[k]]
            self.current.write(ids[ends[k] - lengths[k]:ends[k]], segs)

    def end_document(self) -> None:
        if self.current is not None and self.eos is not None:
            self.current.write(self.eos)

    def counts(self) -> dict:
        return {"documents": self.documents, "text_bytes": self.text_bytes}


# ---- tokenizing (in the workers) ------------------------------------------------------------------

_worker_backend = None


def _load_backend(tok_dir):
    from ..tokenizer import Tokenizer

    return Tokenizer.from_dir(tok_dir).backend


def _init_worker(tok_dir: str) -> None:
    # Each worker is one process on one core; the Rust thread pool inside would oversubscribe them.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    global _worker_backend
    _worker_backend = _load_backend(tok_dir)


def _encode_task(task):
    texts, segments, dtype = task
    return encode_pieces(_worker_backend, texts, segments, np.dtype(dtype))


def encode_pieces(backend, texts: list[str], segments: str, dtype: np.dtype):
    """Tokenize pieces of documents (no special tokens), each segment on its own if asked.

    Returns (ids (N,), tokens per piece (P,), segments per piece (P,) or None, segment starts relative
    to their piece or None, UTF-8 bytes of the text).
    """
    text_bytes = sum(len(t) if t.isascii() else len(t.encode("utf-8")) for t in texts)
    if segments == "none":
        ids, lengths = _encode(backend, texts, dtype)
        return ids, lengths, None, None, text_bytes
    split = [split_segments(t, segments) for t in texts]
    counts = np.array([len(parts) for parts in split])
    ids, part_lengths = _encode(backend, [s for parts in split for s in parts], dtype)
    part_ends = np.cumsum(part_lengths)
    piece_ends = part_ends[np.cumsum(counts) - 1]
    lengths = np.diff(piece_ends, prepend=0)
    piece_of_part = np.repeat(np.arange(len(texts)), counts)
    keep = part_lengths > 0      # a segment with no tokens (whitespace for WordPiece) starts nothing
    offsets = (part_ends - part_lengths - (piece_ends - lengths)[piece_of_part])[keep]
    return ids, lengths, np.bincount(piece_of_part[keep], minlength=len(texts)), offsets, text_bytes


def _encode(backend, texts: list[str], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(all ids concatenated, ids per text); the tokenizer sees at most ENCODE_CHARS per call."""
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)   # fast: no offsets
    chunks, lengths = [], []
    for group in _groups(texts, ENCODE_CHARS):
        ids = [e.ids for e in encode(group, add_special_tokens=False)]
        sizes = list(map(len, ids))
        chunks.append(np.fromiter(itertools.chain.from_iterable(ids), dtype, count=sum(sizes)))
        lengths += sizes
    return (np.concatenate(chunks) if chunks else np.zeros(0, dtype)), np.array(lengths, np.int64)


def _groups(texts: list[str], limit: int):
    group, size = [], 0
    for text in texts:
        if group and size + len(text) > limit:
            yield group
            group, size = [], 0
        group.append(text)
        size += len(text)
    if group:
        yield group


# ---- memory ---------------------------------------------------------------------------------------

def plan_workers(max_memory_mb: float, workers: int, base_mb: float) -> tuple[int, int]:
    """(processes, task bytes) that fit in `max_memory_mb`.

    A worker costs about what this process does once the tokenizer is loaded (`base_mb`: the same
    libraries and tokenizer), plus WORKER_MB, plus TASK_FACTOR times the text it has in flight (this
    process holds up to two tasks per worker and their results). Fewer workers are used when they
    would not fit; one means tokenizing in this process.
    """
    max_memory_mb *= HEADROOM
    for n in range(max(workers, 1), 1, -1):
        room = max_memory_mb - base_mb - n * (base_mb + WORKER_MB)
        if room * 2**20 / (TASK_FACTOR * n) >= MIN_TASK:
            return n, int(min(room * 2**20 / (TASK_FACTOR * n), MAX_TASK))
    room = max_memory_mb - base_mb - WORKER_MB
    return 1, int(min(max(room * 2**20 / 4, MIN_TASK), MAX_TASK))


def _rss_mb() -> float:
    """This process's resident memory now (Linux), else its peak so far."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
    except (OSError, StopIteration):
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / (2**20 if sys.platform == "darwin" else 1024)


# ---- the output folder ----------------------------------------------------------------------------

_OURS = re.compile(r"meta\.json(\.tmp)?|tokenizer(\.tmp)?"
                   r"|(train|val|all)\.(bin|docs\.npy|segments\.npy|docs\.raw|segments\.raw)(\.tmp)?")


def _claim(out: Path) -> None:
    """Make `out` ready for a rebuild: no meta.json (so it no longer looks complete), no old files."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--output {out} is a file; name a folder")
    out.mkdir(parents=True, exist_ok=True)
    foreign = sorted(p.name for p in out.iterdir() if not _OURS.fullmatch(p.name))
    if foreign and read_meta(out) is None:
        raise FileExistsError(f"--output {out} is not empty (it has {', '.join(foreign[:3])}) and was not written "
                              "by `lmforge data prepare`; choose a new or empty folder (nothing was changed)")
    (out / "meta.json").unlink(missing_ok=True)
    for path in out.iterdir():
        if _OURS.fullmatch(path.name) and path.name != "tokenizer":   # it may be the tokenizer we read
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def _remove_temporaries(out: Path) -> None:
    for path in out.glob("*.tmp"):
        if _OURS.fullmatch(path.name):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def _finish(out: Path, tok_dir: Path) -> None:
    """Copy the tokenizer in, then give every temporary file its final name."""
    tmp = out / "tokenizer.tmp"
    tmp.mkdir()
    for name in TOKENIZER_FILES:
        if (tok_dir / name).is_file():
            shutil.copyfile(tok_dir / name, tmp / name)
    if (out / "tokenizer").exists():
        shutil.rmtree(out / "tokenizer")
    os.replace(tmp, out / "tokenizer")
    for path in out.glob("*.tmp"):
        if _OURS.fullmatch(path.name) and not path.name.startswith("meta"):
            os.replace(path, path.with_suffix(""))


def _up_to_date(meta: dict | None, key: dict, out: Path, on_error: str) -> bool:
    if meta is None or meta.get("version") != key["version"] or meta.get("options") != key["options"]:
        return False
    if meta.get("inputs") != key["inputs"] or meta.get("tokenizer", {}).get("sha1") != key["tokenizer"]["sha1"]:
        return False
    if on_error == "fail" and meta["summary"]["skipped"]:
        return False    # skipped rows were fine then; now they must fail
    itemsize = np.dtype(meta["dtype"]).itemsize
    return all(_size(out / f"{name}.bin") == sizes["tokens"] * itemsize for name, sizes in meta["splits"].items())


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


def _fingerprint(path: Path) -> dict:
    """What the up-to-date check compares: path, size, mtime, and sha1 of the first and last MiB."""
    stat = path.stat()
    head = tail = None
    try:
        with open(path, "rb") as f:
            head = hashlib.sha1(f.read(1 << 20)).hexdigest()
            f.seek(max(stat.st_size - (1 << 20), 0))
            tail = hashlib.sha1(f.read(1 << 20)).hexdigest()
    except OSError:
        pass    # unreadable: the reader reports it
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "head_sha1": head, "tail_sha1": tail}


def _tokenizer_sha1(folder: Path) -> str:
    digest = hashlib.sha1()
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            digest.update(name.encode() + b"\0" + (folder / name).read_bytes())
    return digest.hexdigest()


# ---- summary --------------------------------------------------------------------------------------

def _summary(files, splits, counts, problems, eos, n_workers, elapsed) -> dict:
    tokens = sum(s["tokens"] for s in splits.values())
    content = tokens - (counts["documents"] if eos is not None else 0)
    return {
        "documents": counts["documents"], "tokens": tokens, "text_bytes": counts["text_bytes"],
        "bytes_per_token": round(counts["text_bytes"] / max(content, 1), 3),    # EOS tokens not counted
        "train_tokens": splits["train"]["tokens"], "val_tokens": splits["val"]["tokens"],
        "train_documents": splits["train"]["documents"], "val_documents": splits["val"]["documents"],
        "skipped": problems.count, "problems": problems.first,
        "input_files": len(files), "input_bytes": sum(_size(p) for p in files),
        "workers": n_workers, "elapsed_s": round(elapsed, 2), "tokens_per_s": round(tokens / max(elapsed, 1e-9)),
    }


def _print_summary(out: Path, s: dict, options: dict) -> None:
    print(f"prepared {out}: {s['input_files']} file(s), {s['documents']:,} documents, {s['tokens']:,} tokens "
          f"({s['bytes_per_token']} bytes/token)")
    print(f"  train {s['train_tokens']:,} tokens ({s['train_documents']:,} documents), "
          f"val {s['val_tokens']:,} tokens ({s['val_documents']:,} documents)")
    print(f"  {s['elapsed_s']} s, {s['tokens_per_s']:,} tokens/s with {s['workers']} process(es)")
    if s["skipped"]:
        print(f"  skipped {s['skipped']:,} bad row(s) or file(s); the first {len(s['problems'])}:")
        for problem in s["problems"]:
            print(f"    {problem}")
    if s["documents"] == 1 and options["val_split"] == "documents" and options["val_fraction"] > 0:
        print("  note: one document only, so val is empty; use --val-split tail (or --doc-sep blank-line/line)")


# ---- command line ---------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `lmforge data prepare`."""
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="text (.txt), JSON lines (.jsonl, .json) or Parquet files, or folders of them")
    parser.add_argument("--tokenizer", required=True, metavar="DIR", help="tokenizer folder (tokenizer.json)")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for the token shards")
    parser.add_argument("--text-field", default="text", help="JSON field / Parquet column with the text "
                        "(default %(default)s)")
    parser.add_argument("--val-fraction", type=float, default=0.005, metavar="F",
                        help="share of documents (or, with --val-split tail, of tokens) for val (default %(default)s)")
    parser.add_argument("--val-split", choices=["documents", "tail"], default="documents",
                        help="documents: a seeded random set of whole documents; tail: the last tokens "
                        "(single-file corpora, like nanoGPT's 90/10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the document split (default 0)")
    parser.add_argument("--doc-sep", choices=DOC_SEPS, default="none",
                        help="documents in a text file: none = the whole file, blank-line = paragraphs, line = lines")
    parser.add_argument("--segments", choices=SEGMENT_MODES, default="none",
                        help="also record sentence or line starts (BERT next-sentence prediction)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), metavar="N",
                        help="tokenizing processes (default: all cores, %(default)s)")
    parser.add_argument("--on-error", choices=["skip", "fail"], default="skip",
                        help="bad rows/files: skip and report at the end (default), or stop at the first")
    parser.add_argument("--max-memory-mb", type=int, default=1024, metavar="M",
                        help="bound on resident memory of all processes (default %(default)s)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the output is up to date")


def run(args: argparse.Namespace) -> dict:
    """Run `lmforge data prepare` from parsed arguments."""
    return prepare(args.inputs, args.tokenizer, args.output, text_field=args.text_field,
                   val_fraction=args.val_fraction, val_split=args.val_split, seed=args.seed, doc_sep=args.doc_sep,
                   segments=args.segments, workers=args.workers, on_error=args.on_error,
                   max_memory_mb=args.max_memory_mb, force=args.force)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m lmforge.data.prepare", description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args())
