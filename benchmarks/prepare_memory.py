"""Memory bound of `lmforge data prepare` on a corpus several times larger than the memory it may use.

Builds (in a temp folder) a corpus of `--corpus-mb` MB (default 4.25 x the limit) by shuffling the lines
of ../shared/data/en/tinyshakespeare.txt and ../shared/data/zh/novels/*.txt (synthetic text if they
are absent): text files that are each ONE document (streamed in pieces) and JSON-lines files of
paragraphs. Trains a small byte-level BPE on a slice, runs `python -m lmforge data prepare
--max-memory-mb LIMIT` as a subprocess and polls the resident memory (VmRSS) of it and all its
children every 50 ms. Their sum is what must stay under the limit.

Prints one JSON line (the last line of stdout).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def source_lines() -> list[str]:
    files = [DATA / "en" / "tinyshakespeare.txt", *sorted((DATA / "zh" / "novels").glob("*.txt"))]
    lines = [line for f in files if f.is_file() for line in f.read_text(encoding="utf-8").splitlines() if line]
    if not lines:   # outside this workplace: synthetic sentences
        rng = random.Random(0)
        words = ["the", "a", "king", "queen", "river", "said", "and", "went", "to", "of", "天", "下", "人", "山"]
        lines = [" ".join(rng.choices(words, k=rng.randint(5, 20))) + "." for _ in range(50_000)]
    return lines


def build_corpus(folder: Path, total_bytes: int, files: int = 8) -> int:
    """`files` files of total_bytes / files each: 3 in 4 are .txt (one document), the rest .jsonl."""
    lines, rng, written = source_lines(), random.Random(0), 0
    per_file = total_bytes // files
    for i in range(files):
        jsonl = i % 4 == 3
        path = folder / (f"part{i}.jsonl" if jsonl else f"part{i}.txt")
        with open(path, "w", encoding="utf-8") as f:
            size = 0
            while size < per_file:
                rng.shuffle(lines)
                if jsonl:
                    chunk = "".join(json.dumps({"text": "\n".join(lines[j:j + 20])}, ensure_ascii=False) + "\n"
                                    for j in range(0, len(lines), 20))
                else:
                    chunk = "\n".join(lines) + "\n"
                f.write(chunk)
                size += len(chunk.encode("utf-8"))
        written += path.stat().st_size
    return written


def tree_rss_kb(root: int) -> dict[int, int]:
    """VmRSS (kB) of `root` and every descendant process."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    tree, grew = {root}, True
    while grew:
        new = {pid for pid, ppid in parents.items() if ppid in tree} - tree
        tree |= new
        grew = bool(new)
    rss = {}
    for pid in tree:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            rss[pid] = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            continue
    return rss


def run_polled(cmd: list[str]) -> tuple[int, float, float, float]:
    """(exit code, seconds, peak summed RSS MB, peak RSS MB of the main process)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
    reader.start()
    peak = peak_main = 0
    while proc.poll() is None:
        rss = tree_rss_kb(proc.pid)
        peak, peak_main = max(peak, sum(rss.values())), max(peak_main, rss.get(proc.pid, 0))
        time.sleep(0.05)
    reader.join()
    seconds = time.perf_counter() - start
    print("".join(line for line in out if not line.startswith("tokenizing:"))[-3000:], file=sys.stderr)
    return proc.returncode, seconds, peak / 1024, peak_main / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit-mb", type=int, default=256)
    parser.add_argument("--corpus-mb", type=int, default=0, help="default: 4.25 x the limit")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    corpus_mb = args.corpus_mb or int(4.25 * args.limit_mb)

    from lmforge.tokenizer import train_tokenizer

    with tempfile.TemporaryDirectory(prefix="lmforge-prepare-") as tmp:
        tmp = Path(tmp)
        (tmp / "corpus").mkdir()
        t = time.perf_counter()
        corpus_bytes = build_corpus(tmp / "corpus", corpus_mb << 20)
        sample = tmp / "sample.txt"
        sample.write_text("\n".join(source_lines()[:40_000]), encoding="utf-8")
        train_tokenizer("bpe", [sample], vocab_size=4000, output=tmp / "tok")
        print(f"corpus {corpus_bytes / 2**20:.0f} MB and tokenizer in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        cmd = [sys.executable, "-m", "lmforge", "data", "prepare", "--tokenizer", str(tmp / "tok"),
               "--output", str(tmp / "out"), "--max-memory-mb", str(args.limit_mb),
               "--workers", str(args.workers), str(tmp / "corpus")]
        code, seconds, peak, peak_main = run_polled(cmd)
        meta = json.loads((tmp / "out" / "meta.json").read_text()) if code == 0 else {"summary": {}}
    summary = meta["summary"]
    print(json.dumps({
        "benchmark": "prepare_memory", "corpus_bytes": corpus_bytes, "corpus_files": 8,
        "documents": summary.get("documents"), "tokens": summary.get("tokens"),
        "peak_rss_total_mb": round(peak, 1), "peak_rss_main_mb": round(peak_main, 1), "limit_mb": args.limit_mb,
        "corpus_over_limit": round(corpus_bytes / (args.limit_mb << 20), 2), "workers": summary.get("workers"),
        "ok": code == 0 and peak <= args.limit_mb, "seconds": round(seconds, 1),
        "tokens_per_s": summary.get("tokens_per_s"),
    }))


if __name__ == "__main__":
    main()
