"""Which examples form the batch of a training step: epochs of shuffled, length-grouped batches.

Fine-tuning data are lists of examples of different lengths. Each epoch shuffles them, cuts the
order into windows of `group` batches, sorts each window by length (so a batch holds examples of
similar length and dynamic padding wastes little), and shuffles the batches. Everything is a pure
function of (seed, epoch), so the batch of step `s` can be computed directly: resuming at any step,
or splitting a batch over processes and accumulation micro-steps, sees exactly the same examples.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


class EpochBatches:
    """Step -> example indices of that step's (global) batch.

    Args:
        lengths: token length of each example (used to group similar lengths).
        batch_size: examples per optimizer step (over all processes and micro-steps).
        seed: shuffling seed.
        group: batches per length-sorted window (1 = no length grouping).
    """

    def __init__(self, lengths, batch_size: int, seed: int = 0, group: int = 50):
        self.lengths = np.asarray(lengths)
        if len(self.lengths) == 0:
            raise ValueError("no training examples")
        self.batch_size, self.seed, self.group = batch_size, seed, max(1, group)
        self.steps_per_epoch = -(-len(self.lengths) // batch_size)

    def __call__(self, step: int) -> np.ndarray:
        epoch, k = divmod(step, self.steps_per_epoch)
        return self._epoch(epoch)[k]

    @lru_cache(maxsize=2)  # noqa: B019 - two epochs cached per sampler: the current and the next
    def _epoch(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.lengths))
        window = self.batch_size * self.group
        grouped = [chunk[np.argsort(-self.lengths[chunk], kind="stable")]
                   for chunk in np.split(order, range(window, len(order), window))]
        batches = [b for chunk in grouped for b in np.split(chunk, range(self.batch_size, len(chunk), self.batch_size))]
        return [batches[i] for i in rng.permutation(len(batches))]


def share(rows: np.ndarray, part: int, parts: int, strict: bool = True) -> np.ndarray:
    """Contiguous part `part` of `parts` of a global batch (rows of the batch, in order)."""
    if parts == 1:
        return rows
    if strict and len(rows) % parts:
        raise ValueError(f"train.batch_size ({len(rows)}) must be divisible by processes x grad_accum ({parts})")
    per = -(-len(rows) // parts)
    return rows[part * per : (part + 1) * per]


def eval_order(lengths) -> np.ndarray:
    """Evaluation order: longest first (padding stays small and memory peaks early, not at the end)."""
    return np.argsort(-np.asarray(lengths), kind="stable")
