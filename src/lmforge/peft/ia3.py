"""(IA)³: learned per-channel scaling of keys, values and the MLP's inner activations.

Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning" (arXiv:2205.05638), laid out as PEFT does:

    k_proj, v_proj:  y = (W x + b) ⊙ l          l: (out, 1), ones at init
    down_proj:       y = W (x ⊙ l) + b          l: (1, in), ones at init  ("feedforward" layers)

Ones at init, so step 0 equals the base model. Both forms are linear in W, so they merge exactly:
W ← W ⊙ l (rows, and the bias, for outputs; columns for inputs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .inject import (
    AdapterModule,
    adapter_state_dict,
    attach,
    check_fresh,
    matches,
    replace_modules,
    set_module,
)
from .lora import _plain

__all__ = ["IA3Config", "IA3Linear", "adapter_state_dict", "apply_ia3", "merge_ia3", "unmerge_ia3"]


@dataclass
class IA3Config:
    targets: list[str] = field(default_factory=lambda: ["k_proj", "v_proj", "down_proj"])
    feedforward: list[str] = field(default_factory=lambda: ["down_proj"])
    """Targets whose *input* is scaled (the MLP's inner activations); the others scale their output."""
    modules_to_save: list[str] = field(default_factory=list)

    def __post_init__(self):
        stray = [f for f in self.feedforward if not any(f == t or f.endswith(t) for t in self.targets)]
        if stray:
            raise ValueError(f"IA3 feedforward modules {stray} are not among the targets {self.targets}")


class IA3Linear(AdapterModule):
    """A linear layer with a learned scaling vector `ia3_l` on its output (or input, `feedforward`)."""

    def __init__(self, base: nn.Linear, feedforward: bool):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        shape = (1, base.in_features) if feedforward else (base.out_features, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape, device=base.weight.device, dtype=base.weight.dtype))
        self.feedforward, self.merged = feedforward, False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        scale = self.ia3_l.flatten()
        if self.feedforward:
            return F.linear(x * scale, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias) * scale

    @torch.no_grad()
    def _rescale(self, factor: torch.Tensor) -> None:
        self.weight.mul_(factor)  # (1, in) scales columns, (out, 1) rows
        if not self.feedforward and self.bias is not None:
            self.bias.mul_(factor.flatten())

    def merge(self) -> None:
        if not self.merged:
            self._rescale(self.ia3_l)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self._rescale(1.0 / self.ia3_l)
            self.merged = False

    def to_linear(self) -> nn.Linear:
        self.merge()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight, linear.bias = self.weight, self.bias
        return linear

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, feedforward={self.feedforward}"


def apply_ia3(model: nn.Module, cfg: IA3Config) -> nn.Module:
    """Put a scaling vector on every target layer; freeze the rest. Returns the model (in place)."""
    def make(name, linear):
        return IA3Linear(linear, feedforward=any(matches(name, f) for f in cfg.feedforward))

    check_fresh(model, cfg.modules_to_save)
    modules = replace_modules(model, cfg.targets, make)
    attach(model, "ia3", cfg, list(modules), cfg.modules_to_save)
    return model


def ia3_modules(model: nn.Module) -> dict[str, IA3Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, IA3Linear)}


def merge(model: nn.Module) -> nn.Module:
    """Fold the scalings into the weights, keeping the IA3 modules (so `unmerge_ia3` works)."""
    for m in ia3_modules(model).values():
        m.merge()
    return model


def unmerge_ia3(model: nn.Module) -> nn.Module:
    for m in ia3_modules(model).values():
        m.unmerge()
    return model


def merge_ia3(model: nn.Module) -> nn.Module:
    """Merge and remove IA3: plain nn.Linear layers again (for export or serving)."""
    for name, m in ia3_modules(model).items():
        set_module(model, name, m.to_linear())
    return _plain(model)
