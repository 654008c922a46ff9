"""AdamW with weight decay on matrices only (optionally with steps scaled to each tensor's size), and
the learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                    eps: float = 1e-8, kind: str = "adamw") -> torch.optim.AdamW:
    """AdamW; weight decay only on >= 2-D weights (not on biases, norms, or 1-D gains), as nanoGPT.
    kind="adamw-scale": `ScaledAdamW`, each tensor's step scaled by its RMS."""
    params = [p for p in model.parameters() if p.requires_grad]
    params = list({id(p): p for p in params}.values())  # tied weights once
    device = params[0].device.type if params else "cpu"
    fused = device in ("cpu", "cuda", "mps")  # one kernel per group: fewer passes over memory
    if kind == "adamw-scale":
        groups = [{"params": [p], "weight_decay": weight_decay if p.dim() >= 2 else 0.0} for p in params]
        return ScaledAdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)
    if kind != "adamw":
        raise ValueError(f"unknown optimizer {kind!r}; choose adamw or adamw-scale")
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)


class ScaledAdamW(torch.optim.AdamW):
    """AdamW whose step for each tensor is lr x max(1e-3, RMS of the tensor): Adafactor's
    `scale_parameter` on Adam (nanoT5's AdamWScale, Nawrot 2023, arXiv:2309.02373).

    Plain AdamW moves every weight by about lr per step whatever its size. T5 starts its embeddings
    at std 1 and its projections at fan-in^-1/2 (0.008-0.06 for a small model), so one learning rate
    is either too slow for the embeddings or too fast for the projections; trained from scratch on
    Multi30k, a small T5 learns several times faster with this (lr ~1e-2). One parameter per group,
    so the scale applies per tensor; weight decay is scaled with it, as in Adafactor.
    """

    @torch.no_grad()
    def step(self, closure=None):
        params = [group["params"][0] for group in self.param_groups]
        norms = torch.stack([n.float() for n in torch._foreach_norm(params)])
        if hasattr(norms, "full_tensor"):  # FSDP: each process holds its shards' part of the norms
            norms = norms.full_tensor()
        rms = [n / p.numel() ** 0.5 for n, p in zip(norms.tolist(), params, strict=True)]  # one device sync
        base = [group["lr"] for group in self.param_groups]
        for group, r in zip(self.param_groups, rms, strict=True):
            group["lr"] = group["lr"] * max(1e-3, r)
        try:
            return super().step(closure)
        finally:
            for group, lr in zip(self.param_groups, base, strict=True):
                group["lr"] = lr


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
