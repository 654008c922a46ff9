"""Sequence classification: one label, several labels, or a number per text (or text pair).

    {"text": a, "text_pair": b, "label": y} ──► [CLS] a [SEP] b [SEP]    input_ids, token_type_ids
                                                 0   0   0   1   1      (BERT; GPT-2 just concatenates)
    model(input_ids, attention_mask[, token_type_ids]) ──► logits (B, L)
        single_label_classification   cross-entropy          labels (B,) class ids
        multi_label_classification    BCE with logits        labels (B, L) 0/1 (mean over the L labels)
        regression                    MSE                    labels (B,) floats (L = 1)

The names are transformers' `problem_type`s; by default the problem follows the labels (lists:
multi-label, non-integer floats: regression, else single-label). Works with BertForSequenceClassification
(pooled [CLS]) and GPTForSequenceClassification / LlamaForSequenceClassification (the last real token,
found by attention_mask).

Text is tokenized once, truncated to `max_len` tokens special tokens included (pairs "longest first",
as transformers does); batches are padded to their longest row (dynamic padding), training batches
length-grouped by `EpochBatches`. Every row is one target: `fit()` averages losses over examples.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import metrics as M
from ..data.batching import EpochBatches, eval_order, share
from ..data.collate import pad_sequences
from ..data.labeled import infer_labels, label_name

SINGLE, MULTI, REGRESSION = "single_label_classification", "multi_label_classification", "regression"
PROBLEMS = (SINGLE, MULTI, REGRESSION)
DEFAULT_MAX_LEN = 512  # when the tokenizer does not know its model's maximum length


class FeatureBatches:
    """train_batch / eval_batches of a task holding tokenized `train` / `val` features, a
    `collate(features, rows)` and an `EpochBatches` sampler (classification, NER, QA, chat)."""

    def set_splits(self, train, val, batch_size: int, seed: int) -> None:
        """Tokenize the splits (`self.features`; None for a split not given) and sample training
        batches grouped by length."""
        self.train = self.features(train, "train") if train else None
        self.val = self.features(val, "validation") if val else None
        self.sampler = EpochBatches([len(r) for r in self.train.ids], batch_size, seed) if train else None

    def train_batch(self, step: int, part: int = 0, parts: int = 1) -> dict:
        return self.collate(self.train, share(self.sampler(step), part, parts))

    def eval_batches(self, rank: int = 0, world: int = 1):
        for rows in eval_rows(self.val, self.eval_batch_size, rank, world):
            yield self.collate(self.val, rows)


@dataclass
class Features:
    """Tokenized examples: `ids` and `type_ids` (None without pairs) per row, and the targets."""

    ids: list[list[int]]
    type_ids: list[list[int]] | None
    targets: list | None


class SequenceClassification(FeatureBatches):
    """Classification (or regression) batches, loss, metrics and predictions.

    Args:
        train, val: example dicts with "text" (+ "text_pair") and "label"; either may be None
            (e.g. only `predict`). Multi-label labels are lists; regression labels numbers.
        tokenizer: lmforge `Tokenizer` of the model.
        problem: one of PROBLEMS; None = from the labels (see the module docstring).
        labels: label names in class-id order; None = those of train + val, sorted (numerically
            when they are integers). Save them with the model (`id2label`).
        max_len: most tokens per row, special tokens included; None = the tokenizer's
            model_max_length (else 512).
        batch_size: examples per optimizer step; eval_batch_size: per validation batch (0 = the same).
        threshold: multi-label predictions are the labels whose probability reaches it.
    """

    def __init__(self, train, val, tokenizer, problem: str | None = None, labels: list[str] | None = None,
                 max_len: int | None = None, batch_size: int = 32, eval_batch_size: int = 0, seed: int = 0,
                 threshold: float = 0.5):
        examples = [*(train or ()), *(val or ())]
        self.problem = problem or infer_problem(examples)
        if self.problem not in PROBLEMS:
            raise ValueError(f"unknown problem {self.problem!r}; choose one of: {', '.join(PROBLEMS)}")
        self.labels = None if self.problem == REGRESSION else list(labels or infer_labels(examples) or [])
        if self.labels == [] and examples:
            raise ValueError("the examples have no labels; give each a \"label\" (or pass labels=)")
        self.label2id = {name: i for i, name in enumerate(self.labels or [])}
        self.tokenizer, self.threshold = tokenizer, threshold
        self.max_len = max_len or _max_len(tokenizer)
        self.pad_id = _pad_id(tokenizer)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.set_splits(train, val, batch_size, seed)

    @property
    def num_labels(self) -> int:
        """Outputs the model needs: 1 for regression, else the number of labels."""
        return 1 if self.problem == REGRESSION else len(self.labels)

    @property
    def id2label(self) -> dict[int, str] | None:
        return None if self.labels is None else dict(enumerate(self.labels))

    # ---- features and batches ----------------------------------------------------------------------

    def features(self, examples, split: str = "examples", with_targets: bool = True) -> Features:
        """Tokenize examples (dicts, or plain strings when predicting)."""
        texts, pairs = _texts(examples, split)
        encodings = encode(self.tokenizer, texts, pairs, self.max_len)
        ids = [e.ids for e in encodings]
        type_ids = [e.type_ids for e in encodings] if pairs is not None else None
        targets = [self._target(ex, i, split) for i, ex in enumerate(examples)] if with_targets else None
        return Features(ids, type_ids, targets)

    def _target(self, example, i: int, split: str):
        label = example.get("label") if isinstance(example, dict) else None
        if label is None:
            raise ValueError(f"{split} example {i} has no label")
        if self.problem == REGRESSION:
            try:
                return float(label)
            except (TypeError, ValueError):
                raise ValueError(f"{split} example {i}: label {label!r} is not a number (regression)") from None
        names = [label_name(v) for v in (label if isinstance(label, list) else [label])]
        unknown = [n for n in names if n not in self.label2id]
        if unknown or (self.problem == SINGLE and len(names) != 1):
            raise ValueError(f"{split} example {i}: label {label!r} is not one of the labels "
                             f"{', '.join(self.labels)}" + (" (one label per example)" if not unknown else ""))
        ids = [self.label2id[n] for n in names]
        return ids[0] if self.problem == SINGLE else ids

    def collate(self, feats: Features, rows) -> dict:
        """Rows `rows` of `feats` as a batch padded to its longest row."""
        ids, mask = pad_sequences([feats.ids[i] for i in rows], self.pad_id)
        batch = {"input_ids": ids, "attention_mask": mask}
        if feats.type_ids is not None:
            batch["token_type_ids"] = pad_sequences([feats.type_ids[i] for i in rows], 0)[0]
        if feats.targets is not None:
            batch["labels"] = self._labels([feats.targets[i] for i in rows])
        return batch

    def _labels(self, targets: list) -> torch.Tensor:
        if self.problem == SINGLE:
            return torch.tensor(targets, dtype=torch.long)  # (B,)
        if self.problem == REGRESSION:
            return torch.tensor(targets, dtype=torch.float)  # (B,)
        hot = torch.zeros(len(targets), self.num_labels)  # (B, L) multi-hot
        for row, ids in enumerate(targets):
            hot[row, ids] = 1.0
        return hot

    # ---- loss, metrics, predictions ----------------------------------------------------------------

    def targets(self, batch: dict) -> int:
        """Every row is one target (multi-label rows too: their loss is a mean over labels)."""
        return len(batch["labels"])

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, int]:
        logits = self._logits(model, batch).float()  # (B, L)
        labels = batch["labels"]
        if self.problem == SINGLE:
            loss = F.cross_entropy(logits, labels, reduction="sum")
        elif self.problem == MULTI:
            loss = F.binary_cross_entropy_with_logits(logits, labels, reduction="sum") / logits.shape[-1]
        else:
            loss = F.mse_loss(logits.squeeze(-1), labels, reduction="sum")
        return loss, len(labels)

    def _logits(self, model, batch: dict) -> torch.Tensor:
        logits = model(**model_inputs(model, batch))
        if logits.shape[-1] != self.num_labels:
            raise ValueError(f"the model has {logits.shape[-1]} outputs but this task needs {self.num_labels} "
                             f"({self.problem}); build or load it with num_labels={self.num_labels}")
        return logits

    def metrics(self, model, rank: int = 0, world: int = 1) -> dict:
        """single-label: accuracy, f1_macro; multi-label: f1_micro, f1_macro, accuracy (exact set);
        regression: mse, pearson. Over the whole validation split (all processes' shares)."""
        if self.val is None:
            return {}
        pairs = []
        for rows, logits in predict_rows(model, self.val, self.eval_batch_size, self.collate, rank, world):
            pairs += zip(self._decode(logits), (self.val.targets[i] for i in rows), strict=True)
        pairs = gather(pairs, world)
        pred, ref = [p for p, _ in pairs], [r for _, r in pairs]
        if self.problem == REGRESSION:
            return {"mse": M.mse(pred, ref), "pearson": M.pearson(pred, ref)}
        if self.problem == MULTI:
            return {"f1_micro": M.f1(pred, ref, "micro"), "f1_macro": M.f1(pred, ref, "macro"),
                    "accuracy": M.accuracy(pred, ref)}
        return {"accuracy": M.accuracy(pred, ref), "f1_macro": M.f1(pred, ref, "macro")}

    def _decode(self, logits: torch.Tensor) -> list:
        """Logits (B, L) -> predicted class ids (single), lists of ids (multi) or numbers (regression)."""
        if self.problem == SINGLE:
            return logits.argmax(-1).tolist()
        if self.problem == REGRESSION:
            return logits.squeeze(-1).tolist()
        return [torch.nonzero(row).flatten().tolist() for row in logits.sigmoid() >= self.threshold]

    def predict(self, model, examples, batch_size: int = 32) -> list[dict]:
        """Human-readable predictions, in the order of `examples` (dicts or strings):
        single: {"label", "score", "probabilities": {name: p}}; multi: {"labels": [...], "probabilities"};
        regression: {"score"}."""
        feats = self.features(examples, with_targets=False)
        out = [None] * len(feats.ids)
        for rows, logits in predict_rows(model, feats, batch_size, self.collate):
            for i, row_logits in zip(rows, logits, strict=True):
                out[i] = self._readable(row_logits)
        return out

    def _readable(self, logits: torch.Tensor) -> dict:  # logits (L,)
        if self.problem == REGRESSION:
            return {"score": float(logits[0])}
        names = self.labels or [f"LABEL_{i}" for i in range(len(logits))]
        probs = (logits.softmax(-1) if self.problem == SINGLE else logits.sigmoid()).tolist()
        table = dict(zip(names, probs, strict=True))
        if self.problem == MULTI:
            return {"labels": [n for n, p in table.items() if p >= self.threshold], "probabilities": table}
        best = max(range(len(probs)), key=probs.__getitem__)
        return {"label": names[best], "score": probs[best], "probabilities": table}


# ---- helpers shared with the other fine-tuning tasks -----------------------------------------------

def infer_problem(examples) -> str:
    """multi-label when labels are lists, regression when some label is a non-integer number, else single."""
    labels = [ex["label"] for ex in examples if isinstance(ex, dict) and ex.get("label") is not None]
    if any(isinstance(v, list) for v in labels):
        return MULTI
    if any(isinstance(v, float) and not v.is_integer() for v in labels):
        return REGRESSION
    return SINGLE


def encode(tokenizer, texts: list, pairs: list | None = None, max_len: int = DEFAULT_MAX_LEN,
           is_pretokenized: bool = False) -> list:
    """Encode texts (and pairs) with special tokens, truncated to `max_len` tokens in all.

    Pairs are cut "longest first" (tokens come off the longer side), as transformers truncates.
    Returns `tokenizers.Encoding`s (`.ids`, `.type_ids`, `.word_ids`, `.offsets`).
    """
    backend = tokenizer.backend
    room = max_len - backend.num_special_tokens_to_add(pairs is not None)
    if room < 1:
        raise ValueError(f"max_len={max_len} leaves no room for text next to the special tokens")
    firsts = backend.encode_batch(texts, is_pretokenized=is_pretokenized, add_special_tokens=False)
    seconds = (backend.encode_batch(pairs, is_pretokenized=is_pretokenized, add_special_tokens=False)
               if pairs is not None else [None] * len(firsts))
    out = []
    for a, b in zip(firsts, seconds, strict=True):
        keep_a, keep_b = truncated_lengths(len(a), len(b) if b is not None else 0, room)
        if keep_a < len(a):
            a.truncate(keep_a)
        if b is not None and keep_b < len(b):
            b.truncate(keep_b)
        out.append(backend.post_process(a, b, add_special_tokens=True))
    return out


def truncated_lengths(a: int, b: int, room: int) -> tuple[int, int]:
    """Lengths a pair keeps when cut longest-first to `room` tokens, as the `tokenizers` library cuts:
    the shorter side stays whole if it fits in half the room, else each gets half (the longer one, or
    the second when equal, the odd token)."""
    if a + b <= room:
        return a, b
    short = min(a, b)
    if 2 * short > room:
        short, long = room // 2, room // 2 + room % 2
    else:
        long = room - short
    return (long, short) if a > b else (short, long)


def model_inputs(model, batch: dict) -> dict:
    """The batch tensors the model's forward takes (GPT-2 has no token_type_ids)."""
    bare = getattr(model, "_orig_mod", model)  # torch.compile
    bare = getattr(bare, "module", bare)  # DDP
    accepted = _forward_parameters(type(bare))
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch and k in accepted}


@functools.cache
def _forward_parameters(cls) -> frozenset:
    """The argument names of a model class's forward (inspected once per class, not per batch)."""
    return frozenset(inspect.signature(cls.forward).parameters)


def eval_rows(feats: Features | None, batch_size: int, rank: int = 0, world: int = 1):
    """Row indices of each validation batch for this process: longest first, each batch split over processes."""
    if feats is None:
        return
    order = eval_order([len(r) for r in feats.ids])
    for first in range(0, len(order), batch_size):
        mine = share(order[first : first + batch_size], rank, world, strict=False)
        if len(mine):
            yield mine


def predict_rows(model, feats: Features, batch_size: int, collate, rank: int = 0, world: int = 1):
    """(row indices, model output for them) over `feats`, in eval mode without gradients."""
    was_training, device = model.training, next(model.parameters()).device
    model.eval()
    try:
        with torch.no_grad():
            for rows in eval_rows(feats, batch_size, rank, world):
                batch = {k: v.to(device) for k, v in collate(feats, rows).items()}
                out = model(**model_inputs(model, batch))
                yield rows, (tuple(o.float().cpu() for o in out) if isinstance(out, tuple) else out.float().cpu())
    finally:
        model.train(was_training)


def gather(items: list, world: int) -> list:
    """Every process's `items`, concatenated (the list itself on one process)."""
    if world == 1:
        return items
    parts = [None] * world
    torch.distributed.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def _texts(examples, split: str) -> tuple[list[str], list[str] | None]:
    texts = [ex if isinstance(ex, str) else ex.get("text") for ex in examples]
    pairs = [None if isinstance(ex, str) else ex.get("text_pair") for ex in examples]
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(f"{split} example {i} has no \"text\" (keys: {', '.join(examples[i])})")  # noqa: TRY004
    if all(p is None for p in pairs):
        return texts, None
    if any(not isinstance(p, str) for p in pairs):
        i = next(i for i, p in enumerate(pairs) if not isinstance(p, str))
        raise ValueError(f"{split} example {i} has no \"text_pair\" while others do: give all or none a pair")
    return texts, pairs


def _max_len(tokenizer) -> int:
    n = tokenizer.model_max_length
    return n if n and n < 1_000_000 else DEFAULT_MAX_LEN


def _pad_id(tokenizer) -> int:
    """Padding id: the tokenizer's pad token, else EOS (GPT-2 has no pad; the mask hides it anyway)."""
    for i in (tokenizer.pad_id, tokenizer.eos_id):
        if i is not None:
            return i
    return 0
