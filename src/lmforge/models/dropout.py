"""Dropout with a cheaper mask: uniform floats compared with p instead of Bernoulli draws, drawn by
several threads at once on the CPU.

`torch.bernoulli_` costs ~6 ns per element on our CPUs, twice `torch.rand`; at training sizes
(attention probabilities are B x H x T x T) dropout masks were over a tenth of a GPT-2 step.
Same distribution as `nn.Dropout`: each element is zeroed with probability p, the rest scaled by 1/(1-p).
The mask is made in place in the floats drawn (0 or 1/(1-p)): one multiplication applies it, with no
boolean-to-float conversion pass.

PyTorch's CPU generator draws on one core (~3.5 ns per float), so a large mask is drawn in four
parts, shared out among the threads, each part by its own generator seeded from the default one.
The masks are therefore fixed by `torch.manual_seed`, whatever the thread count or timing, and
replay from saved RNG states (resumed runs, gradient checkpointing).
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

PARALLEL_MIN = 1 << 18  # elements: below ~1 ms of drawing, one thread is as fast
PARTS = 4  # a large mask is always drawn in 4 parts, so it depends on the seed, not on the thread count


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Zero each element with probability p and scale the others by 1 / (1 - p) (when training)."""
    if not training or p == 0.0:
        return x
    if p >= 1.0:
        return x * 0.0
    scale = uniform(x.shape, x.dtype, x.device).ge_(p).mul_(1.0 / (1.0 - p))  # 0 or 1/(1-p)
    return x * scale


def uniform(shape, dtype, device) -> torch.Tensor:
    """`torch.rand(shape)`; a large CPU tensor is drawn in PARTS parts by parallel threads (module docstring)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if out.device.type != "cpu" or out.numel() < PARALLEL_MIN:
        return out.uniform_()
    seeds = torch.randint(2**62, (PARTS,)).tolist()  # from the default generator
    parts = list(zip(out.view(-1).chunk(PARTS), seeds))
    workers = min(torch.get_num_threads(), PARTS)
    groups = [parts[i::workers] for i in range(workers)]  # the parts, not the masks, depend on the threads
    others = [_threads(workers - 1, os.getpid()).submit(_fill, group) for group in groups[1:]]
    _fill(groups[0])  # while the other threads fill theirs: ATen calls release the GIL
    for job in others:
        job.result()
    return out


def _fill(parts) -> None:
    for chunk, seed in parts:
        chunk.uniform_(generator=torch.Generator().manual_seed(seed))


@functools.cache
def _threads(n: int, pid: int) -> ThreadPoolExecutor:
    """A pool of n threads, one per process (a forked child gets its own: the parent's threads are gone)."""
    return ThreadPoolExecutor(max_workers=n, thread_name_prefix="lmforge-dropout")


class Dropout(nn.Module):
    """`nn.Dropout` with the cheaper mask (see the module docstring)."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
