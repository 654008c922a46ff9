"""Token classification (named-entity recognition): a tag per word, scored by entity spans.

Words are cut into sub-words; each word's tag goes on its first sub-token and the other sub-tokens
are ignored (-100), as transformers' run_ner.py does (label_all_tokens=False):

    words     EU      rejects     German   call   Leicestershire
    tokens    [CLS] eu  rejects   german   call   leicester ##shire  [SEP]
    labels    -100  B-ORG  O      B-MISC   O      B-ORG     -100     -100

A word's predicted tag is the argmax of its first sub-token's logits. Metrics are entity-level
(seqeval, conlleval's default mode: an entity counts when its type and exact span match), computed
over every word: a word that lost its tokens to truncation at `max_len` (or that tokenizes to
nothing) is predicted "O", so truncation costs recall instead of hiding entities.

Batches: input_ids, attention_mask, labels (B, T); the model (BertForTokenClassification) returns
logits (B, T, L). Predictions are entity spans: {"type", "text", "start", "end"} (word indices, end
exclusive).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.nn.functional as F

from .. import metrics as M
from ..data.collate import pad_sequences
from ..data.labeled import infer_labels
from .classify import FeatureBatches, _max_len, _pad_id, encode, gather, model_inputs, predict_rows

IGNORE = -100
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af\u3000-\u303f\uff00-\uffef]")


@dataclass
class Features:
    """Per sentence: token ids, aligned label ids (-100 off first sub-tokens; None when predicting),
    each word's first-token position (-1: no token) and the words' gold tags."""

    ids: list[list[int]]
    labels: list[list[int]] | None
    starts: list[list[int]]
    tags: list[list[str]] | None


class TokenClassification(FeatureBatches):
    """NER batches, loss, entity-level metrics and span predictions.

    Args:
        train, val: example dicts {"tokens": [words], "tags": [tag per word]} (CoNLL reader); either
            may be None.
        tokenizer: lmforge `Tokenizer` of the model (a fast tokenizer that reports word ids).
        labels: tag names in class-id order; None = the tags of train + val, sorted.
        max_len: most tokens per sentence, special tokens included; None = the tokenizer's
            model_max_length (else 512).
        mode, scheme: seqeval's evaluation mode (None = conlleval-compatible, "strict") and scheme
            (for strict mode: "IOB2", "IOBES", ...).
    """

    def __init__(self, train, val, tokenizer, labels: list[str] | None = None, max_len: int | None = None,
                 batch_size: int = 32, eval_batch_size: int = 0, seed: int = 0, mode: str | None = None,
                 scheme: str = "IOB2"):
        self.labels = list(labels or infer_labels([*(train or ()), *(val or ())], "tags") or [])
        self.label2id = {name: i for i, name in enumerate(self.labels)}
        self.tokenizer, self.mode, self.scheme = tokenizer, mode, scheme
        self.max_len, self.pad_id = max_len or _max_len(tokenizer), _pad_id(tokenizer)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.set_splits(train, val, batch_size, seed)

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.labels))

    # ---- features and batches ----------------------------------------------------------------------

    def features(self, examples, split: str = "examples", with_labels: bool = True) -> Features:
        """Tokenize sentences given as word lists (`{"tokens": [...]}`), labels aligned to sub-words."""
        words = [_words(ex, i, split) for i, ex in enumerate(examples)]
        encodings = encode(self.tokenizer, words, max_len=self.max_len, is_pretokenized=True)
        starts = [first_token_positions(e.word_ids, len(w)) for e, w in zip(encodings, words, strict=True)]
        ids = [e.ids for e in encodings]
        if not with_labels:
            return Features(ids, None, starts, None)
        tags = [self._tags(ex, i, split) for i, ex in enumerate(examples)]
        labels = [align_labels(e.word_ids, [self.label2id[t] for t in row])
                  for e, row in zip(encodings, tags, strict=True)]
        return Features(ids, labels, starts, tags)

    def _tags(self, example: dict, i: int, split: str) -> list[str]:
        tags = example.get("tags")
        if not isinstance(tags, list) or len(tags) != len(example["tokens"]):
            raise ValueError(f"{split} sentence {i}: needs \"tags\", one per token ({len(example['tokens'])})")
        unknown = sorted({t for t in tags if t not in self.label2id})
        if unknown:
            raise ValueError(f"{split} sentence {i}: tags {', '.join(unknown)} are not among the labels "
                             f"{', '.join(self.labels)}; pass labels= with every tag")
        return tags

    def collate(self, feats: Features, rows) -> dict:
        ids, mask = pad_sequences([feats.ids[i] for i in rows], self.pad_id)
        batch = {"input_ids": ids, "attention_mask": mask}
        if feats.labels is not None:
            batch["labels"] = pad_sequences([feats.labels[i] for i in rows], IGNORE)[0]  # (B, T)
        return batch

    # ---- loss, metrics, predictions ----------------------------------------------------------------

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, int]:
        logits = model(**model_inputs(model, batch))  # (B, T, L)
        if logits.shape[-1] != self.num_labels:
            raise ValueError(f"the model has {logits.shape[-1]} outputs per token but there are "
                             f"{self.num_labels} tags; build or load it with num_labels={self.num_labels}")
        labels = batch["labels"]
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum")
        return loss, int((labels != IGNORE).sum())

    def word_tags(self, model, feats: Features, batch_size: int, rank: int = 0, world: int = 1):
        """(row index, predicted tag per word) for this process's share of `feats`."""
        for rows, logits in predict_rows(model, feats, batch_size, self.collate, rank, world):
            best = logits.argmax(-1).tolist()  # (B, T)
            for i, row in zip(rows, best, strict=True):
                yield i, [self.labels[row[p]] if p >= 0 else "O" for p in feats.starts[i]]

    def metrics(self, model, rank: int = 0, world: int = 1) -> dict:
        """Entity-level precision, recall, f1 (+ f1_<TYPE> per entity type) and word accuracy."""
        if self.val is None:
            return {}
        pairs = [(self.val.tags[i], tags) for i, tags in self.word_tags(model, self.val, self.eval_batch_size,
                                                                       rank, world)]
        pairs = gather(pairs, world)
        gold, pred = [g for g, _ in pairs], [p for _, p in pairs]
        scores = M.span_f1(gold, pred, self.mode, self.scheme)
        words = [(g, p) for gs, ps in pairs for g, p in zip(gs, ps, strict=True)]
        out = {k: scores[k] for k in ("precision", "recall", "f1")}
        out["accuracy"] = M.accuracy([p for _, p in words], [g for g, _ in words])
        out.update({f"f1_{name}": r["f1"] for name, r in scores["per_type"].items()})
        return out

    def predict(self, model, examples, batch_size: int = 32) -> list[dict]:
        """Entity spans per example (a word list {"tokens": [...]}, or a string, cut into words by the
        tokenizer): {"tokens", "tags", "entities": [{"type", "text", "start", "end"}]}; for a string
        each entity also gets its character offsets "char_start", "char_end"."""
        texts = [ex if isinstance(ex, str) else None for ex in examples]
        spans = [_word_spans(self.tokenizer, t) if t is not None else None for t in texts]
        words = [{"tokens": [t[s:e] for s, e in sp]} if sp is not None else ex
                 for t, sp, ex in zip(texts, spans, examples, strict=True)]
        feats = self.features(words, with_labels=False)
        out = [None] * len(words)
        for i, tags in self.word_tags(model, feats, batch_size):
            out[i] = {"tokens": words[i]["tokens"], "tags": tags,
                      "entities": _entities(words[i]["tokens"], tags, texts[i], spans[i])}
        return out


# ---- alignment ----------------------------------------------------------------------------------------

def align_labels(word_ids: list[int | None], word_labels: list[int]) -> list[int]:
    """Label of each token: its word's label on the word's first sub-token, -100 on the others and
    on special tokens (transformers' run_ner.py with label_all_tokens=False)."""
    out, previous = [], None
    for w in word_ids:
        out.append(IGNORE if w is None or w == previous else word_labels[w])
        previous = w
    return out


def first_token_positions(word_ids: list[int | None], n_words: int) -> list[int]:
    """Position of each word's first token; -1 for a word with none (truncated, or empty after
    normalization)."""
    starts = [-1] * n_words
    for position, w in enumerate(word_ids):
        if w is not None and starts[w] < 0:
            starts[w] = position
    return starts


def _words(example, i: int, split: str) -> list[str]:
    words = example.get("tokens") if isinstance(example, dict) else None
    if not isinstance(words, list) or not words or not all(isinstance(w, str) for w in words):
        raise ValueError(f"{split} sentence {i}: expected {{\"tokens\": [word, ...]}}, got {str(example)[:80]!r}")
    return words


def _word_spans(tokenizer, text: str) -> list[tuple[int, int]]:
    """Character spans of the words the tokenizer cuts `text` into (its pre-tokenization)."""
    enc = tokenizer.backend.encode(text, add_special_tokens=False)
    spans: dict[int, list[int]] = {}
    for w, (start, end) in zip(enc.word_ids, enc.offsets, strict=True):
        if w is not None:
            span = spans.setdefault(w, [start, end])
            span[0], span[1] = min(span[0], start), max(span[1], end)
    return [tuple(spans[w]) for w in sorted(spans)]


def _entities(words: list[str], tags: list[str], text: str | None, spans) -> list[dict]:
    """Entity spans of a tag sequence (seqeval's chunking, as the metric counts them)."""
    from seqeval.metrics.sequence_labeling import get_entities

    out = []
    for kind, first, last in get_entities(tags):
        entity = {"type": kind, "text": join_words(words[first : last + 1]), "start": first, "end": last + 1}
        if text is not None:
            entity.update(text=text[spans[first][0] : spans[last][1]], char_start=spans[first][0],
                          char_end=spans[last][1])
        out.append(entity)
    return out


def join_words(words: list[str]) -> str:
    """Words as text: spaces between them, none between CJK characters (MSRA's one char per word)."""
    text = words[0] if words else ""
    for prev, word in pairwise(words):
        text += word if _CJK.match(prev[-1:]) and _CJK.match(word[:1]) else " " + word
    return text
