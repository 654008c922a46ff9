"""Batching token sequences of different lengths: dynamic padding to the longest in the batch."""

from __future__ import annotations

import torch


def pad_sequences(seqs: list[list[int]], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to the longest sequence. Returns `(input_ids, attention_mask)`, both (B, T).

    Left padding is what batched generation needs (every row ends at the same position).
    """
    if not seqs:
        raise ValueError("no sequences to pad")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        span = slice(width - len(s), width) if left else slice(0, len(s))
        ids[row, span] = torch.tensor(s, dtype=torch.long)
        mask[row, span] = 1
    return ids, mask
