"""Losses shared by tasks.

`linear_cross_entropy` is the language-model head and the cross-entropy in one step, done in chunks
of rows: the (tokens x vocabulary) logits are never materialised whole. Each chunk's logits are
turned into their gradient (softmax - one-hot) while they are still in the CPU cache, so the loss
costs two matrix products' worth of memory traffic instead of several passes over a tensor that, at
B=16, T=256, V=8192, is 134 MB (and 800 MB for SmolLM2's 49k vocabulary). The gradients are computed
in the forward pass (the loss is a scalar) and scaled in the backward pass.
"""

from __future__ import annotations

import torch

from .models.linear import matmul_t

CHUNK_ROWS = 512  # 512 x 8192 fp32 logits = 16 MB: fits the L3 cache of the CPUs we test on


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk):  # hidden (N, C), weight (V, C), labels (N,)
        grad_hidden, grad_weight = torch.empty_like(hidden), torch.zeros_like(weight)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h, y = hidden[start : start + chunk], labels[start : start + chunk]
            total += _chunk_loss_and_grads(h, y, weight, grad_hidden[start : start + chunk], grad_weight)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad, grad_weight * grad, None, None


def _chunk_loss_and_grads(h, y, weight, grad_h_out, grad_weight) -> torch.Tensor:
    """Summed cross-entropy of one chunk; writes d/dh into grad_h_out and adds d/dW to grad_weight."""
    logits = matmul_t(h, weight).float()  # (n, V)
    valid = y != -100
    target = y.clamp(min=0)
    target_logits = logits.gather(1, target[:, None])[:, 0]  # (n,)
    top = logits.amax(-1, keepdim=True)  # (n, 1)
    probs = logits.sub_(top).exp_()  # in place, and exp taken once: softmax's numerators
    total = probs.sum(-1, keepdim=True)
    loss = ((top[:, 0] + total[:, 0].log() - target_logits) * valid).sum()  # log-sum-exp - target logit
    probs.div_(total)
    probs[torch.arange(len(y), device=y.device), target] -= 1.0
    probs.mul_(valid[:, None])  # ignored targets (-100) get no gradient
    probs = probs.to(h.dtype)
    grad_h_out.copy_(matmul_t(probs, weight.t()))  # (n, C)
    grad_weight.add_(matmul_t(probs.t(), h.t()))  # (V, C)
    return loss


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         chunk: int = CHUNK_ROWS) -> torch.Tensor:
    """Sum over targets of cross_entropy(hidden @ weight.T, labels), ignoring labels == -100.

    Args:
        hidden: (N, C) final hidden states; weight: (V, C) the output head; labels: (N,).
    Returns:
        the summed loss (a scalar); equals F.cross_entropy(..., reduction="sum") in value and gradients.
    """
    return _LinearCrossEntropy.apply(hidden, weight, labels, chunk)


def output_head(model) -> torch.nn.Linear | None:
    """The language-model head of a (possibly DDP-wrapped or compiled) model, when it is a plain
    bias-free linear layer the fused loss can use; None otherwise (FSDP-sharded weights, a LoRA
    head, mixed precision: those take the ordinary logits path)."""
    inner = getattr(model, "module", model)
    inner = getattr(inner, "_orig_mod", inner)
    head = getattr(inner, "lm_head", None)
    plain = isinstance(head, torch.nn.Linear) and head.bias is None and type(head.weight) is torch.nn.Parameter
    autocast = any(torch.is_autocast_enabled(kind) for kind in ("cpu", "cuda", "mps"))
    return head if plain and not autocast else None
