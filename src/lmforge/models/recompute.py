"""Activation (gradient) checkpointing: during training, keep only each layer's input and recompute
the layer's activations in the backward pass.

A layer stack's saved activations grow with batch x length x layers; recomputing them costs about
one more forward pass (~30% of a step) and leaves roughly one layer's activations alive at a time.
Dropout masks are the same in the recomputation (the RNG state is replayed), so the gradients equal
those of an ordinary step. Turned on with `train.gradient_checkpointing=true`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def call_layer(stack: nn.Module, layer: nn.Module, *args):
    """`layer(*args)`, recomputed in backward when `stack` trains with recomputation enabled."""
    if stack.training and getattr(stack, "recompute", False) and torch.is_grad_enabled():  # eval: no lookup
        return checkpoint(layer, *args, use_reentrant=False)
    return layer(*args)


def enable(model: nn.Module, on: bool = True) -> None:
    """Turn recomputation on (or off) for every layer stack in `model`."""
    stacks = [m for m in model.modules() if isinstance(getattr(m, "layers", None), nn.ModuleList)]
    if not stacks:
        raise ValueError(f"{type(model).__name__} has no layer stack to checkpoint; "
                         "set train.gradient_checkpointing=false")
    for stack in stacks:
        stack.recompute = on
