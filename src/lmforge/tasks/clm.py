"""Causal language modelling over packed windows of a token stream (GPT-2, Llama pretraining).

Training windows start at random positions (as nanoGPT samples them); the global batch of step `step`
is drawn from a generator seeded by (seed, step), so it is the same whatever was run before: resuming
at any step, or splitting the batch over processes and micro-steps, sees exactly the same data. Validation covers the whole
validation split once, in consecutive windows.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..data.batching import share as _share
from ..losses import linear_cross_entropy, output_head


class CausalLM:
    """Predict every next token. Batches: `input_ids` (B, T) and `labels` (B, T), shifted by one."""

    def __init__(self, train, val, seq_len: int, batch_size: int, eval_batch_size: int = 0, seed: int = 0):
        for name, split in (("train", train), ("validation", val)):
            if split is not None and len(split.tokens) < seq_len + 2:
                raise ValueError(f"the {name} split has {len(split.tokens)} tokens, fewer than one window of "
                                 f"seq_len={seq_len}; use a larger corpus or a shorter task.seq_len")
        self.train, self.val, self.seq_len, self.seed = train, val, seq_len, seed
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size

    def _windows(self, tokens, starts: np.ndarray) -> dict:
        idx = starts[:, None] + np.arange(self.seq_len + 1)  # (B, T + 1)
        chunk = torch.from_numpy(tokens[idx].astype(np.int64))
        return {"input_ids": chunk[:, :-1], "labels": chunk[:, 1:]}

    def train_batch(self, step: int, part: int = 0, parts: int = 1) -> dict:
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, len(self.train.tokens) - self.seq_len - 1, size=self.batch_size)
        return self._windows(self.train.tokens, _share(starts, part, parts))

    def eval_batches(self, rank: int = 0, world: int = 1):
        if self.val is None:
            return
        starts = np.arange(0, len(self.val.tokens) - self.seq_len, self.seq_len)
        for first in range(0, len(starts), self.eval_batch_size):
            mine = _share(starts[first : first + self.eval_batch_size], rank, world, strict=False)
            if len(mine):
                yield self._windows(self.val.tokens, mine)

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, int]:
        labels = batch["labels"]
        head = output_head(model)
        if head is not None:  # the head and the loss fused, never holding all logits
            hidden = model(batch["input_ids"], return_hidden=True)  # (B, T, C)
            loss = linear_cross_entropy(hidden.flatten(0, 1), head.weight, labels.flatten())
        else:
            logits = model(batch["input_ids"])  # (B, T, V)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                                   reduction="sum")
        return loss, int((labels != -100).sum())
