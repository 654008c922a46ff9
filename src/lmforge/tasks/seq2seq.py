"""Sequence to sequence (translation, summarization) with T5, or with a decoder-only model (GPT-2, Llama).

Encoder-decoder (T5), as transformers' run_translation.py / run_summarization.py lay it out:

    input_ids          prefix + source </s>         the tokenizer's own special tokens, right-padded
    labels             target </s>                  -100 on padding
    decoder_input_ids  <pad> target                 shift_right(labels): the decoder start token first

Decoder-only: prompt and target in one sequence, the loss only on the target:

    input_ids          [BOS] prefix + source + separator   target <eos>
    labels             -100  ...                -100        target <eos>

Labels are aligned with input_ids as in transformers (the prediction at position t is scored against
labels[t + 1]); the loss is the summed token cross-entropy, which `fit()` divides by the number of
target tokens. The prompt and the target are tokenized separately, so the prompt tokens seen in
training are exactly those generation starts from.

Metrics: generate from the validation sources (greedy, or beam search with num_beams > 1; batches of
similar length, decoder-only prompts left-padded, T5 sources padded on the encoder side) and score
against the targets: corpus BLEU and chrF (sacrebleu; `bleu_tokenize="zh"` for Chinese targets) and/or
ROUGE-1/2/L (rouge-score, for English summaries).

Examples: {"source": str, "target": str} (predict also takes plain source strings).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import metrics as M
from ..data.batching import EpochBatches, eval_order, share
from ..data.collate import pad_sequences
from ..losses import linear_cross_entropy, output_head
from ..models.t5 import shift_right
from .classify import gather

IGNORE = -100
GENERATION_METRICS = ("bleu", "chrf", "rouge")


@dataclass
class Features:
    """Per example: the prompt ids (T5: the encoder input), the target ids ending in EOS (None when
    predicting) and the target text (the reference of the metrics)."""

    prompts: list[list[int]]
    targets: list[list[int]] | None
    references: list[str] | None


class Seq2Seq:
    """Translation / summarization batches, loss, generation metrics and predictions.

    Args:
        train, val: {"source", "target"} example dicts; either may be None.
        tokenizer: lmforge `Tokenizer` of the model (it needs an EOS token).
        decoder_only: False for T5 (encoder-decoder layout), True for GPT-2 / Llama (one sequence).
        prefix: put before every source, e.g. "translate English to German: " (T5's task prefixes).
        separator: decoder-only: between the source and the target (the model learns to answer after it).
        max_len: most source tokens (special tokens and prefix included); None = 512.
        max_target_len: most target tokens, EOS included.
        batch_size: examples per optimizer step; eval_batch_size: per validation batch (0 = the same).
        generation_metrics: any of "bleu", "chrf", "rouge" (rouge1, rouge2, rougeL); () = only val_loss.
        bleu_tokenize: sacrebleu's tokenizer for BLEU: "13a" (default), "zh" (Chinese), "intl", ...
        max_new_tokens: generation length limit (None = max_target_len); num_beams: 1 = greedy.
        metric_examples: generate for the first this many validation examples (0 = all of them).
        decoder_start_token_id: T5's first decoder input (None = the pad token, as T5).
    """

    def __init__(self, train, val, tokenizer, decoder_only: bool = False, prefix: str = "", separator: str = "\n",
                 max_len: int | None = None, max_target_len: int = 128, batch_size: int = 16,
                 eval_batch_size: int = 0, seed: int = 0, generation_metrics=("bleu", "chrf"),
                 bleu_tokenize: str = "13a", max_new_tokens: int | None = None, num_beams: int = 1,
                 metric_examples: int = 0, decoder_start_token_id: int | None = None):
        unknown = set(generation_metrics) - set(GENERATION_METRICS)
        if unknown:
            raise ValueError(f"unknown generation_metrics {sorted(unknown)}; choose from {', '.join(GENERATION_METRICS)}")
        if tokenizer.eos_id is None:
            raise ValueError("the tokenizer has no EOS token: targets must end in one (set special_tokens eos)")
        self.tokenizer, self.decoder_only, self.prefix, self.separator = tokenizer, decoder_only, prefix, separator
        self.max_len, self.max_target_len = max_len or 512, max_target_len
        self.pad_id = next(i for i in (tokenizer.pad_id, tokenizer.eos_id) if i is not None)
        self.decoder_start = decoder_start_token_id if decoder_start_token_id is not None else self.pad_id
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.generation_metrics, self.bleu_tokenize = tuple(generation_metrics), bleu_tokenize
        self.sampling = {"max_new_tokens": max_new_tokens or max_target_len, "num_beams": num_beams}
        self.metric_examples = metric_examples
        self.train = self.features(train, "train") if train else None
        self.val = self.features(val, "validation") if val else None
        lengths = [len(p) + len(t) for p, t in zip(self.train.prompts, self.train.targets, strict=True)] if train else []
        self.sampler = EpochBatches(lengths, batch_size, seed) if train else None

    # ---- features and batches ----------------------------------------------------------------------

    def features(self, examples, split: str = "examples", with_targets: bool = True) -> Features:
        """Tokenize sources (prompts) and, with targets, the targets + EOS."""
        sources = [_text(ex, "source", i, split) for i, ex in enumerate(examples)]
        prompts = self.prompts(sources)
        if not with_targets:
            return Features(prompts, None, None)
        references = [_text(ex, "target", i, split) for i, ex in enumerate(examples)]
        encoded = self.tokenizer.encode_batch(references, add_special_tokens=False)
        targets = [ids[: self.max_target_len - 1] + [self.tokenizer.eos_id] for ids in encoded]
        return Features(prompts, targets, references)

    def prompts(self, sources: list[str]) -> list[list[int]]:
        """T5: prefix + source with the tokenizer's special tokens (</s>); decoder-only: [BOS] +
        prefix + source + separator. Cut to max_len tokens, special tokens kept."""
        tail = self.separator if self.decoder_only else ""
        return encode_truncated(self.tokenizer, [f"{self.prefix}{s}{tail}" for s in sources], self.max_len)

    def collate(self, feats: Features, rows) -> dict:
        """Rows `rows` of `feats` as a batch padded to its longest row."""
        prompts, targets = [feats.prompts[i] for i in rows], [feats.targets[i] for i in rows]
        if self.decoder_only:
            ids, mask = pad_sequences([p + t for p, t in zip(prompts, targets, strict=True)], self.pad_id)
            labels = pad_sequences([[IGNORE] * len(p) + t for p, t in zip(prompts, targets, strict=True)], IGNORE)[0]
            return {"input_ids": ids, "attention_mask": mask, "labels": labels}
        ids, mask = pad_sequences(prompts, self.pad_id)
        labels = pad_sequences(targets, IGNORE)[0]
        return {"input_ids": ids, "attention_mask": mask, "labels": labels,
                "decoder_input_ids": shift_right(labels, self.decoder_start, self.pad_id)}

    def train_batch(self, step: int, part: int = 0, parts: int = 1) -> dict:
        return self.collate(self.train, share(self.sampler(step), part, parts))

    def eval_batches(self, rank: int = 0, world: int = 1):
        if self.val is None:
            return
        lengths = [len(p) + len(t) for p, t in zip(self.val.prompts, self.val.targets, strict=True)]
        for rows in eval_rows(lengths, self.eval_batch_size, rank, world):
            yield self.collate(self.val, rows)

    # ---- loss, metrics, predictions ----------------------------------------------------------------

    def targets(self, batch: dict) -> int:
        labels = batch["labels"][:, 1:] if self.decoder_only else batch["labels"]
        return int((labels != IGNORE).sum())

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, int]:
        if self.decoder_only:
            return causal_lm_loss(model, batch)
        logits = model(batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"])  # (B, T, V)
        labels = batch["labels"]
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum")
        return loss, int((labels != IGNORE).sum())

    def metrics(self, model, rank: int = 0, world: int = 1) -> dict:
        """The `generation_metrics` of generations from the validation sources (all processes' shares)."""
        if self.val is None or not self.generation_metrics:
            return {}
        n = min(self.metric_examples or len(self.val.prompts), len(self.val.prompts))
        mine = share(np.arange(n), rank, world, strict=False).tolist()
        texts = self.generate(model, [self.val.prompts[i] for i in mine], self.eval_batch_size, rank == 0)
        pairs = sorted(gather(list(zip(mine, texts, strict=True)), world))
        return text_scores([t for _, t in pairs], self.val.references[:n], self.generation_metrics,
                           self.bleu_tokenize)

    def generate(self, model, prompts: list[list[int]], batch_size: int, progress: bool = False) -> list[str]:
        return generate_texts(model, self.tokenizer, prompts, batch_size, self.pad_id, progress, **self.sampling)

    def predict(self, model, examples, batch_size: int = 16) -> list[dict]:
        """{"source", "generated"} per example (dicts with "source", or plain strings)."""
        examples = [{"source": ex} if isinstance(ex, str) else ex for ex in examples]
        feats = self.features(examples, with_targets=False)
        texts = self.generate(model, feats.prompts, batch_size)
        return [{"source": ex["source"], "generated": t} for ex, t in zip(examples, texts, strict=True)]


# ---- shared with the chat task ---------------------------------------------------------------------

def causal_lm_loss(model, batch: dict) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy of a decoder-only model over the labelled positions: the output
    at position t is scored against labels[t + 1] (labels aligned with input_ids, -100 = ignore)."""
    ids, mask, labels = batch["input_ids"][:, :-1], batch["attention_mask"][:, :-1], batch["labels"][:, 1:]
    mask = None if bool(mask.all()) else mask  # no padding: the unmasked fast path
    head = output_head(model)
    if head is not None:  # the head and the loss fused, never holding all logits
        hidden = model(ids, mask, return_hidden=True)  # (B, T, C)
        loss = linear_cross_entropy(hidden.flatten(0, 1), head.weight, labels.flatten())
    else:
        logits = model(ids, mask)  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum")
    return loss, int((labels != IGNORE).sum())


def encode_truncated(tokenizer, texts: list[str], max_len: int) -> list[list[int]]:
    """Token ids of texts with the tokenizer's special tokens, the text cut so that all fits in max_len."""
    backend = tokenizer.backend
    room = max_len - backend.num_special_tokens_to_add(False)
    if room < 1:
        raise ValueError(f"max_len={max_len} leaves no room for text next to the special tokens")
    out = []
    for enc in backend.encode_batch(texts, add_special_tokens=False):
        if len(enc) > room:
            enc.truncate(room)
        out.append(backend.post_process(enc, None, add_special_tokens=True).ids)
    return out


def generate_texts(model, tokenizer, prompts: list[list[int]], batch_size: int, pad_id: int,
                   progress: bool = False, **sampling) -> list[str]:
    """Generated text for each prompt (token ids), in the prompts' order.

    Prompts run in batches of similar length: for decoder-only models left-padded (every row ends
    where generation starts) and cut from the left to fit the context with max_new_tokens; for
    encoder-decoder models padded on the encoder side. Generation stops at the tokenizer's or the
    model's EOS; the text is decoded without special tokens. `progress` shows a bar over the batches.
    """
    encoder_decoder = getattr(model, "is_encoder_decoder", False)
    eos = _eos_ids(model, tokenizer)
    device = next(model.parameters()).device
    prompts = prompts if encoder_decoder else [_fit_context(model, p, sampling.get("max_new_tokens", 32))
                                               for p in prompts]
    out = [""] * len(prompts)
    batches = list(eval_rows([len(p) for p in prompts], batch_size))
    for rows in tqdm(batches, desc="generate", unit="batch", leave=False, disable=not progress):
        ids, mask = pad_sequences([prompts[i] for i in rows], pad_id, left=not encoder_decoder)
        new = model.generate(ids.to(device), mask.to(device), eos_token_id=eos, pad_token_id=pad_id, **sampling)
        new = new[:, 1:] if encoder_decoder else new[:, ids.shape[1]:]  # T5: after the start token
        for row, i in zip(new.tolist(), rows, strict=True):
            end = next((k for k, t in enumerate(row) if t in eos), len(row))
            out[i] = tokenizer.decode(row[:end], skip_special_tokens=True).strip()
    return out


def text_scores(predictions: list[str], references: list[str], names, bleu_tokenize: str = "13a") -> dict:
    """The named metrics of generated texts: bleu, chrf, rouge (-> rouge1, rouge2, rougeL)."""
    scores = {}
    if "bleu" in names:
        scores["bleu"] = M.bleu(predictions, references, tokenize=bleu_tokenize)
    if "chrf" in names:
        scores["chrf"] = M.chrf(predictions, references)
    if "rouge" in names:
        scores.update(M.rouge(predictions, references))
    return scores


def eval_rows(lengths, batch_size: int, rank: int = 0, world: int = 1):
    """Row indices of each evaluation batch for this process: longest first, each batch split over processes."""
    order = eval_order(lengths)
    for first in range(0, len(order), batch_size):
        mine = share(order[first : first + batch_size], rank, world, strict=False)
        if len(mine):
            yield mine.tolist()


def _eos_ids(model, tokenizer) -> list[int]:
    ids = model.config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return sorted({*ids, *([tokenizer.eos_id] if tokenizer.eos_id is not None else [])})


def _fit_context(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Keep the end of a prompt (where the answer starts) when prompt + new tokens exceed the context."""
    max_len = getattr(model.config, "max_len", None)
    if max_len is None or len(prompt) + max_new_tokens <= max_len:
        return prompt
    if max_new_tokens >= max_len:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
                         f"context of {max_len} tokens")
    return prompt[len(prompt) + max_new_tokens - max_len:]


def _text(example, key: str, i: int, split: str) -> str:
    value = example.get(key) if isinstance(example, dict) else None
    if not isinstance(value, str):
        raise ValueError(f"{split} example {i} has no {key!r} text (seq2seq examples are {{source, target}})")  # noqa: TRY004
    return value
