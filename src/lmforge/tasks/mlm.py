"""BERT pretraining: masked language modelling, with next-sentence prediction (Devlin et al. 2018,
arXiv:1810.04805), drawn at random access from token shards.

One example (nsp=True), built like Google's `create_pretraining_data.py`:

    document d:  | s0 | s1 | s2 | s3 | s4 |          (segments = sentences or lines of the document)
                   └── A ──┘└─ B ─┘                 IsNext  (label 0): B is the text that follows A
                   └── A ──┘  + B = a run of segments of another document   NotNext (label 1)
    input_ids       [CLS] A ... [SEP] B ... [SEP]   at most seq_len tokens (truncate_seq_pair)
    token_type_ids    0   0 ...   0   1 ...   1

A starts at a random segment that has a successor in its document (so IsNext is always possible
and exactly half of the examples are IsNext in expectation); segments are added until the pair
reaches the target length (seq_len - 3, or with probability short_seq_prob a random shorter one),
and A takes a random number of them. With nsp=False every example is a window of seq_len - 2
consecutive tokens of the stream in [CLS] ... [SEP] (documents inside it stay separated by the
shards' own separator token); no segment index is needed then.

Conventions (the same as transformers, so weights and numbers compare):
- Masking is transformers' `DataCollatorForLanguageModeling`: every non-special position is chosen
  independently with probability mlm_probability (Bernoulli, so the count varies per sequence);
  of the chosen, 80% become [MASK], 10% a random id uniform over the tokenizer's ids (special ids
  included, as transformers draws `randint(len(tokenizer))`), 10% stay. `labels` hold the original
  id at chosen positions and -100 elsewhere. Special positions ([CLS], [SEP], [PAD] and any special
  token of the tokenizer such as [UNK]) are never chosen.
- Whole-word masking (`whole_word=True`, Google's --do_whole_word_mask): a word is a token plus the
  `##` continuation tokens after it; words are shuffled and taken whole until round(mlm_probability
  x non-special tokens) tokens are chosen (an exact count; a word that would overshoot is skipped);
  the 80/10/10 choice is then made per token. WordPiece cuts CJK text into one token per character,
  so for Chinese each character is its own word here: Chinese whole-word masking (BERT-wwm) needs a
  word segmenter to group the characters, which lmforge does not include.
- next_sentence_label: 0 = IsNext, 1 = NotNext (transformers' BertForPreTraining).
- NSP needs the shards' segment index (prepare the data with `data.segments: sentences` or
  `lines`); without one the constructor raises rather than inventing fixed-length pseudo-sentences.
- The loss is mean MLM cross-entropy + mean NSP cross-entropy, see `MaskedLM.loss`.
- Row r of micro-batch `index` comes from `np.random.default_rng([seed, index, r])`: a pure function
  of (seed, index), so resuming sees the same data, and a process building only its rows of the
  global batch gets exactly those rows (batches are padded to their own longest row).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..data.batching import share as _share

_EVAL = 2**40  # generator key of validation examples, far from any training batch index


class MaskedLM:
    """Masked LM (+ NSP) batches: `input_ids`, `token_type_ids`, `attention_mask`, `labels` (B, T),
    and `next_sentence_label` (B,) when nsp.

    Args:
        train, val: token shards (`tokens`, `doc_starts`, `segment_starts`); val may be None.
        tokenizer: the WordPiece tokenizer (gives [CLS] [SEP] [MASK] [PAD], the special ids and the
            `##` continuation tokens).
        seq_len: maximum tokens per example, [CLS] and [SEP]s included.
        batch_size: examples per micro-batch, summed over all processes.
        eval_batch_size: examples per validation batch; 0 = batch_size.
        seed: the data seed.
        mlm_probability: chance of a position being chosen for prediction.
        whole_word: choose whole `##` words (an exact count) instead of independent positions.
        nsp: sentence pairs with a next-sentence label; else packed windows of the token stream.
        vocab_size: the model's vocabulary, checked to hold every id of the tokenizer (random
            replacements are drawn from the tokenizer's ids, never from padding rows beyond them).
        short_seq_prob: chance of a shorter target length for an NSP example (BERT: 0.1).
    """

    def __init__(self, train, val, tokenizer, seq_len: int, batch_size: int, eval_batch_size: int = 0,
                 seed: int = 0, mlm_probability: float = 0.15, whole_word: bool = False, nsp: bool = True,
                 vocab_size: int | None = None, short_seq_prob: float = 0.1):
        self.cls, self.sep, self.mask, self.pad = _bert_ids(tokenizer)
        self.n_ids = len(tokenizer)
        if vocab_size is not None and vocab_size < self.n_ids:
            raise ValueError(f"the model's vocab_size ({vocab_size}) is smaller than the tokenizer's "
                             f"{self.n_ids} ids; build the model with vocab_size >= {self.n_ids}")
        if seq_len < 8:
            raise ValueError(f"seq_len={seq_len} is too short for [CLS] A [SEP] B [SEP]; use at least 8")
        if not 0 < mlm_probability < 1:
            raise ValueError(f"mlm_probability must be between 0 and 1, got {mlm_probability}")
        self.train, self.val, self.seq_len, self.seed = train, val, seq_len, seed
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.p, self.whole_word, self.nsp, self.short_seq_prob = mlm_probability, whole_word, nsp, short_seq_prob
        self.special = _id_table(self.n_ids, tokenizer.special_ids | {self.cls, self.sep, self.pad})
        vocab = tokenizer.backend.get_vocab()
        self.continuation = _id_table(self.n_ids, [i for t, i in vocab.items() if t.startswith("##")])
        separators = {i for i in (tokenizer.eos_id, tokenizer.sep_id) if i is not None}
        self.tables = {}
        for name, split in (("train", train), ("validation", val)):
            if split is not None:
                self.tables[name] = _SegmentTable(split, separators, name) if nsp else None
                _check_length(split, seq_len, name, nsp)

    # ---- batches ---------------------------------------------------------------------------------

    def train_batch(self, index: int, rank: int = 0, world: int = 1) -> dict:
        rows = _share(np.arange(self.batch_size), rank, world)
        return self._collate([self._example("train", np.random.default_rng([self.seed, index, r]), r)
                              for r in rows])

    def eval_batches(self, rank: int = 0, world: int = 1):
        """Fixed validation examples: about one per seq_len tokens of the split, the same every time."""
        if self.val is None:
            return
        if self.nsp:
            count = max(self.eval_batch_size, len(self.val.tokens) // self.seq_len)
        else:
            count = len(self.val.tokens) // (self.seq_len - 2)
        for first in range(0, count, self.eval_batch_size):
            rows = _share(np.arange(first, min(first + self.eval_batch_size, count)), rank, world, strict=False)
            if len(rows):
                yield self._collate([self._example("validation", np.random.default_rng([self.seed, _EVAL, r]), r)
                                     for r in rows])

    def _example(self, split: str, rng: np.random.Generator, row: int) -> dict:
        """One masked example: NSP pair or a window (validation windows are consecutive, by row)."""
        ids, types, label = self._pair(self.tables[split], rng) if self.nsp else self._window(split, rng, row)
        inputs, labels = self._mask(ids, rng)
        return {"input_ids": inputs, "token_type_ids": types, "labels": labels, "next_sentence_label": label}

    def _window(self, split: str, rng: np.random.Generator, row: int):
        """[CLS] seq_len - 2 consecutive tokens [SEP]: at random in training, the row-th in validation."""
        tokens, L = (self.train if split == "train" else self.val).tokens, self.seq_len - 2
        start = int(rng.integers(0, len(tokens) - L + 1)) if split == "train" else row * L
        ids = np.concatenate([[self.cls], tokens[start : start + L], [self.sep]]).astype(np.int64)
        return ids, np.zeros(len(ids), np.int64), None

    def _pair(self, table: _SegmentTable, rng: np.random.Generator):
        """[CLS] A [SEP] B [SEP] -> (ids, token_type_ids, next_sentence_label)."""
        (a0, a1), (b0, b1), label = table.pair(rng, self.seq_len - 3, self.short_seq_prob)
        (a0, a1), (b0, b1) = truncate_seq_pair((a0, a1), (b0, b1), self.seq_len - 3, rng)
        tokens = table.tokens
        ids = np.concatenate([[self.cls], tokens[a0:a1], [self.sep], tokens[b0:b1], [self.sep]]).astype(np.int64)
        types = np.repeat(np.array([0, 1]), [a1 - a0 + 2, b1 - b0 + 1])
        return ids, types, label

    def _mask(self, ids: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """BERT's corruption of one example -> (input_ids, labels) (see the module docstring)."""
        maskable = ~self.special[ids]
        chosen = self._whole_words(ids, maskable, rng) if self.whole_word else (rng.random(len(ids)) < self.p)
        chosen &= maskable
        to_mask = chosen & (rng.random(len(ids)) < 0.8)
        to_random = chosen & ~to_mask & (rng.random(len(ids)) < 0.5)
        random_ids = rng.integers(0, self.n_ids, len(ids))
        inputs = np.where(to_mask, self.mask, np.where(to_random, random_ids, ids))
        return inputs, np.where(chosen, ids, -100)

    def _whole_words(self, ids: np.ndarray, maskable: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Choose shuffled whole words (a token + its ## pieces) up to round(p * maskable) tokens."""
        starts = maskable & ~(self.continuation[ids] & np.r_[False, maskable[:-1]])
        word = np.cumsum(starts) - 1  # (T,) word number of each position (valid where maskable)
        lengths = np.bincount(word[maskable], minlength=int(starts.sum()))
        budget, taken = max(1, round(self.p * int(maskable.sum()))), np.zeros(len(lengths), bool)
        total = 0
        for w in rng.permutation(len(lengths)):
            if total >= budget:
                break
            if total + lengths[w] <= budget:
                taken[w], total = True, total + lengths[w]
        return maskable & taken[word]

    def _collate(self, rows: list[dict]) -> dict:
        """Pad to the longest row: input_ids with [PAD], token types with 0, labels with -100."""
        T = max(len(r["input_ids"]) for r in rows)
        out = {}
        for key, fill in (("input_ids", self.pad), ("token_type_ids", 0), ("labels", -100)):
            out[key] = torch.from_numpy(np.stack([np.pad(r[key], (0, T - len(r[key])), constant_values=fill)
                                                  for r in rows]).astype(np.int64))
        lengths = torch.tensor([len(r["input_ids"]) for r in rows])
        out["attention_mask"] = (torch.arange(T)[None] < lengths[:, None]).long()  # (B, T)
        if self.nsp:
            out["next_sentence_label"] = torch.tensor([r["next_sentence_label"] for r in rows])  # (B,)
        return out

    # ---- loss ------------------------------------------------------------------------------------

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, int]:
        """(sum of MLM losses + mean NSP loss x number of masked tokens, number of masked tokens).

        `fit()` divides the summed loss by the number of masked tokens N, so the step's loss is
        mean MLM cross-entropy + mean NSP cross-entropy: BERT's objective. With several micro-batches
        or processes the NSP part is the mean over pieces weighted by their masked-token counts
        (equal to the plain mean when every piece has the same count; a piece with no masked
        token adds no NSP loss).
        """
        mlm_logits, targets, nsp_logits = self._forward(model, batch)
        mlm_sum, n = F.cross_entropy(mlm_logits.float(), targets, reduction="sum"), len(targets)
        if not self.nsp:
            return mlm_sum, n
        return mlm_sum + F.cross_entropy(nsp_logits.float(), batch["next_sentence_label"]) * n, n

    def eval_metrics(self, model, batches) -> dict:
        """mlm_loss, mlm_accuracy (over masked tokens) and, with nsp, nsp_loss, nsp_accuracy (over
        examples), summed over `batches` (e.g. `task.eval_batches()`), without gradients."""
        was_training, sums = model.training, dict.fromkeys(("mlm", "mlm_ok", "n", "nsp", "nsp_ok", "m"), 0.0)
        model.eval()
        with torch.no_grad():
            for batch in batches:
                mlm_logits, targets, nsp_logits = self._forward(model, batch)  # (N, V), (N,) masked positions
                sums["mlm"] += float(F.cross_entropy(mlm_logits.float(), targets, reduction="sum"))
                sums["mlm_ok"] += float((mlm_logits.argmax(-1) == targets).sum())
                sums["n"] += len(targets)
                if self.nsp:
                    y = batch["next_sentence_label"]
                    sums["nsp"] += float(F.cross_entropy(nsp_logits.float(), y, reduction="sum"))
                    sums["nsp_ok"] += float((nsp_logits.argmax(-1) == y).sum())
                    sums["m"] += len(y)
        model.train(was_training)
        out = {"mlm_loss": sums["mlm"] / max(sums["n"], 1), "mlm_accuracy": sums["mlm_ok"] / max(sums["n"], 1)}
        if self.nsp:
            out.update(nsp_loss=sums["nsp"] / max(sums["m"], 1), nsp_accuracy=sums["nsp_ok"] / max(sums["m"], 1))
        return out

    def _forward(self, model, batch: dict):
        """(MLM logits (N, V) at the N masked positions (row-major), their original ids (N,), NSP
        logits (B, 2) or None) from BertForPreTraining / BertForMaskedLM: the vocabulary projection
        runs on masked positions only."""
        masked = batch["labels"] != -100  # (B, T)
        out = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], masked=masked)
        mlm_logits, nsp_logits = out if isinstance(out, tuple) else (out, None)
        if self.nsp and nsp_logits is None:
            raise ValueError("task.nsp is on but the model has no next-sentence head; train a "
                             "BertForPreTraining, or set task.nsp=false for a BertForMaskedLM")
        return mlm_logits, batch["labels"][masked], nsp_logits


class _SegmentTable:
    """The segments (sentences/lines) of a split as token ranges [start, end) with their document;
    a document's trailing separator token is left out, so ranges hold text only."""

    def __init__(self, split, separators: set[int], name: str):
        if getattr(split, "segment_starts", None) is None:
            raise ValueError(f"next-sentence prediction needs sentence boundaries, and the {name} shards have "
                             "none: prepare the data with data.segments=sentences (or lines), or set "
                             "task.nsp=false for masked LM alone")
        self.tokens, docs = split.tokens, np.asarray(split.doc_starts, np.int64)
        bounds = np.union1d(docs, np.asarray(split.segment_starts, np.int64))
        starts, ends = bounds[:-1], bounds[1:].copy()
        doc = np.searchsorted(docs, starts, side="right") - 1
        # Trim the separator that ends each document (it belongs to its last segment).
        doc_end = docs[1:] - np.isin(self.tokens[docs[1:] - 1], list(separators))
        ends = np.minimum(ends, doc_end[doc])
        keep = ends > starts
        self.starts, self.ends, self.doc = starts[keep], ends[keep], doc[keep]
        self.last = np.searchsorted(self.doc, self.doc, side="right") - 1  # last segment of each one's doc
        self.cum = np.r_[0, np.cumsum(self.ends - self.starts)]  # token counts before each segment
        self.heads = np.flatnonzero(self.last > np.arange(len(self.doc)))  # segments with a successor
        self.docs = np.unique(self.doc)  # documents with text
        self.first = np.searchsorted(self.doc, self.docs)  # their first segments
        if len(self.heads) == 0 or len(self.docs) < 2:
            raise ValueError(f"the {name} split needs at least two documents, one with two or more "
                             f"segments, for next-sentence prediction (it has {len(self.docs)} documents "
                             f"and {len(self.heads)} segment pairs); use more text or task.nsp=false")

    def pair(self, rng: np.random.Generator, max_tokens: int, short_seq_prob: float):
        """((a_start, a_end), (b_start, b_end), label) before truncation: Google's chunking."""
        target = max_tokens
        if rng.random() < short_seq_prob:
            target = int(rng.integers(2, max_tokens + 1))
        s = self.heads[rng.integers(len(self.heads))]
        e = max(s + 1, self._end_segment(s, target))  # chunk = segments s..e, at least two
        a_end = s + int(rng.integers(1, e - s + 1))  # A = s..a_end-1
        a = (self.starts[s], self.ends[a_end - 1])
        if rng.random() < 0.5:
            return a, (self.starts[a_end], self.ends[e]), 0
        i = rng.integers(len(self.docs) - 1)  # another document, uniformly
        i += i >= np.searchsorted(self.docs, self.doc[s])
        b = int(rng.integers(self.first[i], self.last[self.first[i]] + 1))
        return a, (self.starts[b], self.ends[self._end_segment(b, target - (a[1] - a[0]))]), 1

    def _end_segment(self, s: int, target: int) -> int:
        """Last segment of the run from s holding >= target tokens, within s's document."""
        e = int(np.searchsorted(self.cum, self.cum[s] + target)) - 1
        return min(max(e, s), self.last[s])


def truncate_seq_pair(a: tuple[int, int], b: tuple[int, int], max_tokens: int, rng: np.random.Generator):
    """BERT's `truncate_seq_pair` on token ranges: while the pair is too long, cut one token off the
    longer one (B on ties), from its front or back at random. Returns the new (a, b) ranges."""
    la, lb = a[1] - a[0], b[1] - b[0]
    excess = max(0, la + lb - max_tokens)
    # Which side each cut hits is fixed: the longer side until both are equal, then B, A, B, ...
    even = min(abs(la - lb), excess)
    side_a = np.r_[np.full(even, la > lb), np.arange(excess - even) % 2 == 1]
    front = rng.random(excess) < 0.5
    cuts = [np.sum(side_a & front), np.sum(side_a & ~front), np.sum(~side_a & front), np.sum(~side_a & ~front)]
    return (a[0] + cuts[0], a[1] - cuts[1]), (b[0] + cuts[2], b[1] - cuts[3])


def _bert_ids(tokenizer) -> tuple[int, int, int, int]:
    ids = (tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id, tokenizer.pad_id)
    if None in ids:
        raise ValueError(f"masked LM needs a BERT tokenizer with [CLS] [SEP] [MASK] [PAD] tokens; {tokenizer} "
                         "lacks some: train one with data.tokenizer_kind=wordpiece")
    return ids


def _id_table(n: int, ids) -> np.ndarray:
    table = np.zeros(n, bool)
    table[list(ids)] = True
    return table


def _check_length(split, seq_len: int, name: str, nsp: bool) -> None:
    if not nsp and len(split.tokens) < seq_len - 2:
        raise ValueError(f"the {name} split has {len(split.tokens)} tokens, fewer than one window of "
                         f"seq_len={seq_len}; use a larger corpus or a shorter task.seq_len")
