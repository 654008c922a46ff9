"""Extractive question answering (SQuAD v1.1), as transformers' `examples/pytorch/question-answering/run_qa.py`.

A question and its context form one pair. A context longer than the window is cut into overlapping
windows ("features"); neighbouring windows share `stride` context tokens, so every answer lies whole
inside some window:

    example     question (12 tokens) + context (300 tokens), max_len=128, stride=32
    feature 0   [CLS] question [SEP] context tokens   0 .. 112 [SEP]
    feature 1   [CLS] question [SEP] context tokens  81 .. 193 [SEP]     81 = 113 - stride
    feature 2   [CLS] question [SEP] context tokens 162 .. 274 [SEP]  ...

The windows are cut by the `tokenizers` library's own truncation (`only_second` with a stride), the
function transformers' fast tokenizers call for run_qa.py, so the features are the same as there.

Training labels: start/end token positions of the (first) gold answer inside the window, found from
the tokens' character offsets in the context; a window that does not hold the whole answer points
both at [CLS] (position 0). Loss per feature: (CE(start) + CE(end)) / 2, padding excluded from the
softmax; `fit()` averages it over features (`targets` = features in the batch).

Answers (run_qa.py's postprocess_qa_predictions): in every window of an example, the `n_best` highest
start and end logits pair into spans; a span counts when both ends lie in the context, end >= start,
and it is at most `max_answer_len` tokens; it scores start logit + end logit. The best span over all
windows of the example is the answer, cut from the context by the offsets. Metrics: SQuAD v1.1
`exact_match` and `f1` (percent, max over the gold answers) over examples.

Examples: {"id", "context", "question", "answers": {"text": [...], "answer_start": [...]}} (SQuAD v1.1
flattened; answers may be absent when predicting). Batches: input_ids, attention_mask, token_type_ids
(B, T), start_positions, end_positions (B,). Model: BertForQuestionAnswering -> (start, end) (B, T).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer as Backend

from .. import metrics as M
from ..data.collate import pad_sequences
from .classify import FeatureBatches, eval_rows, gather, model_inputs

CONTEXT = 1  # sequence id of the context in a (question, context) pair


@dataclass
class Features:
    """Windows of (question, context) pairs. Per feature: token ids and type ids, the index of its
    example, each token's character span in the context (None off the context), and (when the
    examples have answers) the answer's start/end token positions."""

    ids: list[list[int]]
    type_ids: list[list[int]]
    example: list[int]
    offsets: list[list[tuple[int, int] | None]]
    starts: list[int] | None
    ends: list[int] | None


class QuestionAnswering(FeatureBatches):
    """Extractive QA batches, loss, SQuAD metrics and answers.

    Args:
        train, val: SQuAD-style example dicts (see the module docstring); either may be None.
        tokenizer: lmforge `Tokenizer` of the model (a fast BERT tokenizer: it must give offsets).
        max_len: tokens per window, special tokens included (run_qa.py: 384); None = 384, or the
            tokenizer's model_max_length when smaller.
        stride: context tokens shared by neighbouring windows (run_qa.py's doc_stride, 128).
        n_best: how many start and end candidates per window are paired (20).
        max_answer_len: longest answer in tokens (30).
        batch_size: features per optimizer step; eval_batch_size: per validation batch (0 = the same).
    """

    def __init__(self, train, val, tokenizer, max_len: int | None = None, stride: int = 128, n_best: int = 20,
                 max_answer_len: int = 30, batch_size: int = 32, eval_batch_size: int = 0, seed: int = 0):
        self.tokenizer, self.n_best, self.max_answer_len = tokenizer, n_best, max_answer_len
        self.max_len = max_len or min(384, tokenizer.model_max_length or 384)
        if not 0 <= stride < self.max_len // 2:
            raise ValueError(f"stride={stride} must be smaller than half of max_len={self.max_len} "
                             f"(windows advance by max_len - question - stride tokens)")
        self.stride = stride
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.train_examples, self.val_examples = train, val
        self.set_splits(train, val, batch_size, seed)

    # ---- features and batches ----------------------------------------------------------------------

    def features(self, examples, split: str = "examples", with_answers: bool = True) -> Features:
        """Cut every (question, context) into windows; with answers, label each window."""
        pairs = [(_field(ex, "question", i, split).lstrip(), _field(ex, "context", i, split))  # as run_qa.py
                 for i, ex in enumerate(examples)]
        try:
            encodings = self._windowing().encode_batch(pairs)
        except Exception as e:  # the Rust library raises a bare Exception
            raise ValueError(f"{split}: a question leaves no room for its context in max_len={self.max_len} "
                             f"tokens with stride={self.stride}; raise max_len or shorten the questions ({e})"
                             ) from e
        f = Features([], [], [], [], [] if with_answers else None, [] if with_answers else None)
        for i, enc in enumerate(encodings):
            for window in (enc, *enc.overflowing):
                offsets = [o if s == CONTEXT else None for o, s in zip(window.offsets, window.sequence_ids,
                                                                       strict=True)]
                f.ids.append(window.ids)
                f.type_ids.append(window.type_ids)
                f.example.append(i)
                f.offsets.append(offsets)
                if with_answers:
                    start, end = answer_positions(offsets, *_answer_chars(examples[i], i, split))
                    f.starts.append(start)
                    f.ends.append(end)
        return f

    def _windowing(self) -> Backend:
        """A private copy of the tokenizer's backend that cuts pairs into strided windows."""
        backend = Backend.from_str(self.tokenizer.backend.to_str())
        backend.enable_truncation(self.max_len, stride=self.stride, strategy="only_second")
        return backend

    def collate(self, feats: Features, rows) -> dict:
        """Rows `rows` of `feats` as a batch padded to its longest row."""
        ids, mask = pad_sequences([feats.ids[i] for i in rows], self.pad_id)
        batch = {"input_ids": ids, "attention_mask": mask,
                 "token_type_ids": pad_sequences([feats.type_ids[i] for i in rows], 0)[0]}
        if feats.starts is not None:
            batch["start_positions"] = torch.tensor([feats.starts[i] for i in rows])
            batch["end_positions"] = torch.tensor([feats.ends[i] for i in rows])
        return batch

    # ---- loss, metrics, answers --------------------------------------------------------------------

    def targets(self, batch: dict) -> int:
        """Every feature is one target."""
        return len(batch["input_ids"])

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, int]:
        start, end = _masked_logits(model, batch)  # (B, T) each
        loss = (F.cross_entropy(start, batch["start_positions"], reduction="sum")
                + F.cross_entropy(end, batch["end_positions"], reduction="sum")) / 2
        return loss, len(start)

    def metrics(self, model, rank: int = 0, world: int = 1) -> dict:
        """exact_match and f1 (SQuAD v1.1, percent) over every validation example."""
        if self.val is None:
            return {}
        logits = dict(gather(list(self._logits(model, self.val, self.eval_batch_size, rank, world).items()), world))
        answers = self.answers(self.val_examples, self.val, logits)
        golds = [ex["answers"]["text"] for ex in self.val_examples]
        texts = [a["answer"] for a in answers]
        return {"exact_match": M.exact_match(texts, golds), "f1": M.squad_f1(texts, golds)}

    def predict(self, model, examples, batch_size: int = 32) -> list[dict]:
        """The answer to each example: {"id", "answer", "score" (start + end logit), "start" (character
        offset in the context; -1 when no span was valid)}."""
        feats = self.features(examples, with_answers=False)
        return self.answers(examples, feats, self._logits(model, feats, batch_size))

    def _logits(self, model, feats: Features, batch_size: int, rank: int = 0, world: int = 1) -> dict:
        """feature index -> (start logits, end logits) over its own tokens, in eval mode."""
        was_training, device = model.training, next(model.parameters()).device
        model.eval()
        out = {}
        try:
            with torch.no_grad():
                for rows in eval_rows(feats, batch_size, rank, world):
                    batch = {k: v.to(device) for k, v in self.collate(feats, rows).items()}
                    start, end = (x.float().cpu() for x in model(**model_inputs(model, batch)))
                    for r, i in enumerate(rows.tolist()):
                        n = len(feats.ids[i])
                        out[i] = (start[r, :n], end[r, :n])
        finally:
            model.train(was_training)
        return out

    def answers(self, examples, feats: Features, logits: dict) -> list[dict]:
        """The best span of each example over all its windows (run_qa.py's postprocessing)."""
        windows = defaultdict(list)
        for f, i in enumerate(feats.example):
            windows[i].append(f)
        out = []
        for i, ex in enumerate(examples):
            spans = [s for f in windows[i] for s in best_spans(feats.offsets[f], *logits[f], self.n_best,
                                                               self.max_answer_len)]
            # the first of equal scores wins, as run_qa.py's stable sort picks (not the later span)
            score, start, end = max(spans, key=lambda span: span[0], default=(0.0, -1, -1))
            text = ex["context"][start:end] if start >= 0 else ""
            out.append({"id": ex.get("id", i), "answer": text, "score": score, "start": start})
        return out


# ---- the algorithm ---------------------------------------------------------------------------------

def answer_positions(offsets: list, start_char: int, end_char: int) -> tuple[int, int]:
    """Token positions of the first and last token of the answer characters [start_char, end_char)
    in a window (offsets: a character span per token, None off the context); (0, 0), the [CLS]
    position, when the window does not hold the whole answer. As run_qa.py's prepare_train_features,
    except that the search stays inside the context (run_qa.py walks on into [SEP] and padding, whose
    offsets are (0, 0), when the answer starts at the window's last context token)."""
    context = [k for k, o in enumerate(offsets) if o is not None]
    if not context:
        return 0, 0
    first, last = context[0], context[-1]
    if not (offsets[first][0] <= start_char and offsets[last][1] >= end_char):
        return 0, 0
    start = first
    while start <= last and offsets[start][0] <= start_char:
        start += 1
    end = last
    while end >= first and offsets[end][1] >= end_char:
        end -= 1
    return start - 1, end + 1


def best_spans(offsets: list, start_logits: torch.Tensor, end_logits: torch.Tensor, n_best: int = 20,
               max_answer_len: int = 30) -> list[tuple[float, int, int]]:
    """Valid answer spans of one window as (score, start char, end char): the `n_best` highest start
    and end logits paired, both in the context, end >= start, at most `max_answer_len` tokens."""
    starts = torch.argsort(start_logits, descending=True, stable=True)[:n_best].tolist()
    ends = torch.argsort(end_logits, descending=True, stable=True)[:n_best].tolist()
    spans = []
    for s in starts:
        for e in ends:
            if offsets[s] is None or offsets[e] is None or e < s or e - s + 1 > max_answer_len:
                continue
            spans.append((float(start_logits[s] + end_logits[e]), offsets[s][0], offsets[e][1]))
    return spans


def _masked_logits(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, end) logits (B, T) with padding at -inf, so a feature's loss does not depend on its batch."""
    start, end = model(**model_inputs(model, batch))
    pad = batch["attention_mask"] == 0
    return start.float().masked_fill(pad, float("-inf")), end.float().masked_fill(pad, float("-inf"))


def _field(example, key: str, i: int, split: str) -> str:
    value = example.get(key) if isinstance(example, dict) else None
    if not isinstance(value, str):
        raise ValueError(f"{split} example {i} has no {key!r} text (QA examples need question and context)")  # noqa: TRY004
    return value


def _answer_chars(example: dict, i: int, split: str) -> tuple[int, int]:
    """[start, end) character span of the first gold answer in the context."""
    answers = example.get("answers") or {}
    texts, starts = answers.get("text") or [], answers.get("answer_start") or []
    if not texts or not starts:
        raise ValueError(f"{split} example {i} ({example.get('id', '?')}) has no answer; SQuAD v1.1 "
                         "examples need answers: {text: [...], answer_start: [...]}")
    return starts[0], starts[0] + len(texts[0])
