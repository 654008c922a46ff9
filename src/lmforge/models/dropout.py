"""Dropout with a cheaper mask: uniform floats compared with p instead of Bernoulli draws, drawn by
several threads at once on the CPU.

`torch.bernoulli_` costs ~6 ns per element on our CPUs, twice `torch.rand`; at training sizes
(attention probabilities are B x H x T x T) dropout masks were over a tenth of a GPT-2 step.
Same distribution as `nn.Dropout`: each element is zeroed with probability p, the rest scaled by 1/(1-p).
The mask is made in place in the floats drawn (0 or 1/(1-p)): one multiplication applies it, with no
boolean-to-float conversion pass.

PyTorch's CPU generator draws on one core (~3.5 ns per float), so a large mask is drawn in parts,
one per thread, each part by its own generator seeded from the default one. The masks are
therefore fixed by `torch.manual_seed` and replay from saved RNG states (resumed runs, gradient
checkpointing) whatever the thread timing.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

PARALLEL_MIN = 1 << 18  # elements: below ~1 ms of drawing, one thread is as fast
_pool: ThreadPoolExecutor | None = None


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Zero each element with probability p and scale the others by 1 / (1 - p) (when training)."""
    if not training or p == 0.0:
        return x
    if p >= 1.0:
        return x * 0.0
    scale = uniform(x.shape, x.dtype, x.device).ge_(p).mul_(1.0 / (1.0 - p))  # 0 or 1/(1-p)
    return x * scale


def uniform(shape, dtype, device) -> torch.Tensor:
    """`torch.rand(shape)`; large CPU tensors are filled in parts by parallel threads (module docstring)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    parts = torch.get_num_threads()
    if out.device.type != "cpu" or parts < 2 or out.numel() < PARALLEL_MIN:
        return out.uniform_()
    seeds = torch.randint(2**62, (parts,)).tolist()  # from the default generator
    chunks = out.view(-1).chunk(parts)
    fill = lambda chunk, seed: chunk.uniform_(generator=torch.Generator().manual_seed(seed))
    others = [_threads(parts - 1).submit(fill, c, s) for c, s in zip(chunks[1:], seeds[1:])]
    fill(chunks[0], seeds[0])  # while the other threads fill theirs: ATen calls release the GIL
    for job in others:
        job.result()
    return out


def _threads(n: int) -> ThreadPoolExecutor:
    global _pool
    if _pool is None or _pool._max_workers < n:
        _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="lmforge-dropout")
    return _pool


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
