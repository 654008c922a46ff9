"""AdamW with weight decay on matrices only, and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                    eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW; weight decay only on >= 2-D weights (not on biases, norms, or 1-D gains), as nanoGPT."""
    params = [p for p in model.parameters() if p.requires_grad]
    params = list({id(p): p for p in params}.values())  # tied weights once
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    device = params[0].device.type if params else "cpu"
    fused = device in ("cpu", "cuda", "mps")  # one kernel for all parameters: fewer passes over memory
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)


def lr_at(step: int, lr: float, min_lr: float, warmup: int, total: int, schedule: str = "cosine") -> float:
    """Learning rate at optimizer step `step` (0-based): linear warm-up, then cosine/linear decay to
    `min_lr` at `total`, or constant. Warm-up follows nanoGPT: lr * (step + 1) / (warmup + 1)."""
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    if schedule == "constant":
        return lr
    if step >= total:
        return min_lr
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return lr - progress * (lr - min_lr)
    if schedule == "cosine":
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
    raise ValueError(f"unknown schedule {schedule!r}; choose cosine, linear or constant")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
