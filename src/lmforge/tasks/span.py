"""T5 span corruption (Raffel et al. 2019, arXiv:1910.10683), as transformers' example
`examples/flax/language-modeling/run_t5_mlm_flax.py` implements it:

    window   a b c d e f g h i j k l                  tokens_length consecutive tokens of the stream
    noise          ─── ─       ─────                  noise_density of them, in spans of mean length 3
    inputs   a b <X0> e <X1> g h i <X2> </s>          exactly seq_len tokens
    labels   <X0> c d <X1> f <X2> j k l </s>          targets_length tokens
    decoder_input_ids = shift_right(labels)

`compute_input_and_target_lengths` picks the window length so that the corrupted inputs are exactly
seq_len tokens; every row has the same lengths, so batches need no padding.

Sentinels: `<extra_id_i>` is the i-th span's sentinel. When the tokenizer has `<extra_id_N>` tokens
(a Hugging Face T5 tokenizer) their ids are used. Otherwise (our Unigram tokenizers have none) the
ids come right after the tokenizer's n ids, counting down as T5's do: sentinel i = n + 99 - i, the
id `<extra_id_i>` gets from `add_sentinel_tokens(tokenizer)` (T5: 32000 pieces, sentinels 32099 ...
32000, model vocabulary 32128). The model's vocab_size must therefore be at least n + 100
(`lmforge pretrain` builds it that way).

Row r of micro-batch `index` comes from `np.random.default_rng([seed, index, r])` (window start and
noise mask): a pure function of (seed, index), whatever process builds the row.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..data.batching import share as _share
from ..models.t5 import shift_right

NUM_SENTINELS = 100  # T5's extra_ids
_EVAL = 2**40  # generator key of validation rows, far from any training batch index


class SpanCorruption:
    """T5 span-corruption batches: `input_ids`, `attention_mask` (B, seq_len), `labels`,
    `decoder_input_ids` (B, targets_length).

    Args:
        train, val: token shards (`tokens`: documents concatenated, each ended by EOS); val may be None.
        tokenizer: gives EOS, padding (decoder start) and possibly `<extra_id_N>` sentinel tokens.
        seq_len: encoder input length after corruption, EOS included.
        batch_size: windows per micro-batch, summed over all processes.
        eval_batch_size: windows per validation batch; 0 = batch_size.
        seed: the data seed.
        noise_density: fraction of the window's tokens that are masked out.
        mean_span_length: mean length of a masked span.
        vocab_size: the model's vocabulary, checked to hold the sentinel ids.
    """

    def __init__(self, train, val, tokenizer, seq_len: int, batch_size: int, eval_batch_size: int = 0,
                 seed: int = 0, noise_density: float = 0.15, mean_span_length: float = 3.0,
                 vocab_size: int | None = None):
        if not 0 < noise_density < 1:
            raise ValueError(f"noise_density must be between 0 and 1, got {noise_density}")
        self.eos = tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.sep_id
        if self.eos is None:
            raise ValueError(f"span corruption ends inputs and targets with EOS, and {tokenizer} has none; "
                             "use a T5-style tokenizer (data.tokenizer_kind=unigram)")
        self.pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0  # also T5's decoder start
        self.sentinels = sentinel_ids(tokenizer, vocab_size)
        self.train, self.val, self.seq_len, self.seed = train, val, seq_len, seed
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.noise_density, self.mean_span_length = noise_density, mean_span_length
        self.tokens_length, self.targets_length = compute_input_and_target_lengths(
            seq_len, noise_density, mean_span_length)
        spans = _num_spans(self.tokens_length, noise_density, mean_span_length)
        if spans > len(self.sentinels):
            raise ValueError(f"seq_len={seq_len} makes {spans} noise spans but there are only "
                             f"{len(self.sentinels)} sentinels; use a shorter task.seq_len or a longer "
                             "task.mean_span_length")
        for name, split in (("train", train), ("validation", val)):
            if split is not None and len(split.tokens) < self.tokens_length:
                raise ValueError(f"the {name} split has {len(split.tokens)} tokens, fewer than one window "
                                 f"of {self.tokens_length} (seq_len={seq_len} after corruption); use a larger "
                                 "corpus or a shorter task.seq_len")

    def train_batch(self, index: int, rank: int = 0, world: int = 1) -> dict:
        rows = []
        for r in _share(np.arange(self.batch_size), rank, world):
            rng = np.random.default_rng([self.seed, index, r])
            start = int(rng.integers(0, len(self.train.tokens) - self.tokens_length + 1))
            rows.append(self._corrupt(self.train.tokens, start, rng))
        return self._collate(rows)

    def eval_batches(self, rank: int = 0, world: int = 1):
        """Consecutive windows covering the validation split once, with fixed noise masks."""
        if self.val is None:
            return
        count = len(self.val.tokens) // self.tokens_length
        for first in range(0, count, self.eval_batch_size):
            rows = _share(np.arange(first, min(first + self.eval_batch_size, count)), rank, world, strict=False)
            if len(rows):
                yield self._collate([self._corrupt(self.val.tokens, r * self.tokens_length,
                                                   np.random.default_rng([self.seed, _EVAL, r])) for r in rows])

    def _corrupt(self, tokens, start: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        window = np.asarray(tokens[start : start + self.tokens_length], np.int64)
        noise = random_spans_noise_mask(self.tokens_length, self.noise_density, self.mean_span_length, rng)
        return corrupt(window, noise, self.sentinels, self.eos)

    def _collate(self, rows: list[tuple[np.ndarray, np.ndarray]]) -> dict:
        input_ids = torch.from_numpy(np.stack([r[0] for r in rows]))  # (B, seq_len)
        labels = torch.from_numpy(np.stack([r[1] for r in rows]))  # (B, targets_length)
        assert input_ids.shape[1] == self.seq_len and labels.shape[1] == self.targets_length
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels,
                "decoder_input_ids": shift_right(labels, self.pad, self.pad)}

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, int]:
        """(sum of the target tokens' cross-entropy, number of target tokens)."""
        logits = model(batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"])  # (B, T, V)
        labels = batch["labels"]
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")
        return loss, int((labels != -100).sum())


# ---- the algorithm (run_t5_mlm_flax.py, with an explicit generator) ------------------------------

def compute_input_and_target_lengths(inputs_length: int, noise_density: float,
                                     mean_noise_span_length: float) -> tuple[int, int]:
    """(window length before corruption, target length) for corrupted inputs of `inputs_length`
    tokens, EOS included: the longest window whose corrupted form still fits."""
    def lengths(tokens_length):
        noise = round(tokens_length * noise_density)
        spans = round(noise / mean_noise_span_length)
        return tokens_length - noise + spans + 1, noise + spans + 1  # inputs, targets (+ EOS each)

    tokens_length = inputs_length
    while lengths(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    inputs, targets = lengths(tokens_length)
    if noise_density == 0.5 and targets > inputs:  # the example script's tweak: targets = inputs
        tokens_length, targets = tokens_length - 1, targets - 1
    return tokens_length, targets


def _num_spans(length: int, noise_density: float, mean_noise_span_length: float) -> int:
    noise = min(max(int(np.round(length * noise_density)), 1), length - 1)
    return max(int(np.round(min(noise, length - noise) / mean_noise_span_length)), 1)


def random_spans_noise_mask(length: int, noise_density: float, mean_noise_span_length: float,
                            rng: np.random.Generator) -> np.ndarray:
    """(length,) bool, True = noise: alternating non-noise / noise spans of random lengths, starting
    with non-noise, round(length * noise_density) noise tokens in about noise / mean length spans."""
    noise = min(max(int(np.round(length * noise_density)), 1), length - 1)
    spans = _num_spans(length, noise_density, mean_noise_span_length)
    noise_lengths = _random_segmentation(noise, spans, rng)
    kept_lengths = _random_segmentation(length - noise, spans, rng)
    interleaved = np.stack([kept_lengths, noise_lengths], axis=1).reshape(-1)  # kept, noise, kept, ...
    span_start = np.zeros(length, np.int8)
    span_start[np.cumsum(interleaved)[:-1]] = 1
    return np.cumsum(span_start) % 2 == 1


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Split num_items into num_segments non-empty runs of random lengths -> (num_segments,) lengths."""
    first_in_segment = np.arange(num_items - 1) < num_segments - 1
    rng.shuffle(first_in_segment)
    segment_id = np.cumsum(np.pad(first_in_segment, [[1, 0]]))
    return np.bincount(segment_id)


def corrupt(tokens: np.ndarray, noise: np.ndarray, sentinels: np.ndarray, eos: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets): the noise spans replaced by sentinels 0, 1, ... in the inputs, the kept
    spans replaced by them in the targets, EOS after both."""
    return (np.r_[_replace_spans(tokens, noise, sentinels), eos],
            np.r_[_replace_spans(tokens, ~noise, sentinels), eos])


def _replace_spans(tokens: np.ndarray, mask: np.ndarray, sentinels: np.ndarray) -> np.ndarray:
    """Each run of masked tokens -> one sentinel, numbered in order; unmasked tokens stay."""
    first = mask & ~np.r_[False, mask[:-1]]  # first token of each masked run
    run = np.cumsum(first) - 1
    out = np.where(first, sentinels[np.maximum(run, 0)], tokens)
    return out[~mask | first]


def sentinel_ids(tokenizer, vocab_size: int | None = None) -> np.ndarray:
    """(100,) ids of `<extra_id_0>` ... `<extra_id_99>`: the tokenizer's own tokens when it has them,
    else n + 99 - i after its n ids (see the module docstring); checked against the model's vocab_size."""
    own = [tokenizer.token_to_id(f"<extra_id_{i}>") for i in range(NUM_SENTINELS)]
    if all(i is not None for i in own):
        ids = np.array(own, np.int64)
    else:
        ids = len(tokenizer) + NUM_SENTINELS - 1 - np.arange(NUM_SENTINELS)
    if vocab_size is not None and ids.max() >= vocab_size:
        raise ValueError(f"span corruption's sentinel ids go up to {ids.max()} but the model's vocab_size is "
                         f"{vocab_size}; build the model with vocab_size >= {ids.max() + 1} (the tokenizer's "
                         f"{len(tokenizer)} ids + {NUM_SENTINELS} sentinels)")
    return ids


def add_sentinel_tokens(tokenizer) -> None:
    """Add `<extra_id_99>` ... `<extra_id_0>` to a tokenizer without them, so their ids are exactly the
    ids span corruption used (n + 99 - i) and decoding shows them, as in T5's tokenizer."""
    from tokenizers import AddedToken

    if tokenizer.token_to_id("<extra_id_0>") is not None:
        return
    tokenizer.backend.add_special_tokens([AddedToken(f"<extra_id_{i}>", special=True, normalized=False)
                                          for i in reversed(range(NUM_SENTINELS))])
