"""Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP",
arXiv:1902.00751): a small residual MLP after the attention output and after the MLP of each block.

        x ──► o_proj / down_proj (frozen) ──► h ──┬──────────────────────────────────────┐
                                                  └─► down (C → m) ─► act ─► up (m → C) ─(+)──► h + up(act(down(h)))

`up` starts at zero, so the adapted model equals the base model at step 0. The adapters wrap the
`o_proj` and `down_proj` layers (whose outputs are exactly the attention and MLP branch outputs,
before the residual add), so no family needs its own code. Not mergeable (the bottleneck is
non-linear); saved on their own by `lmforge.peft.io` (PEFT has no such method: lmforge format).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .inject import AdapterModule, adapter_state_dict, attach, check_fresh, replace_modules

__all__ = ["AdapterConfig", "BottleneckAdapter", "adapter_state_dict", "apply_adapters"]

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "tanh": torch.tanh}


@dataclass
class AdapterConfig:
    bottleneck: int = 64
    """Inner width m of each adapter."""
    act: str = "gelu"
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["o_proj", "down_proj"])
    """Layers whose output gets an adapter: the attention output and the MLP output."""
    modules_to_save: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.act not in ACTIVATIONS:
            raise ValueError(f"adapter activation {self.act!r} is not supported; choose one of: "
                             f"{', '.join(ACTIVATIONS)}")
        if self.bottleneck < 1:
            raise ValueError(f"adapter bottleneck must be >= 1, got {self.bottleneck}")


class BottleneckAdapter(AdapterModule):
    """h = W x + b; h + up(act(down(h))). Owns the base weight/bias (same state-dict keys)."""

    def __init__(self, base: nn.Linear, bottleneck: int, act: str = "gelu", dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.adapter_down = nn.Linear(base.out_features, bottleneck, **kw)
        self.adapter_up = nn.Linear(bottleneck, base.out_features, **kw)
        nn.init.normal_(self.adapter_down.weight, std=0.02)
        nn.init.zeros_(self.adapter_down.bias)
        nn.init.zeros_(self.adapter_up.weight)  # identity at init
        nn.init.zeros_(self.adapter_up.bias)
        self.act, self.act_name = ACTIVATIONS[act], act
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        h = F.linear(x, self.weight, self.bias)
        return h + self.adapter_up(self.dropout(self.act(self.adapter_down(h))))  # (..., C) -> (..., m) -> (..., C)

    def extra_repr(self) -> str:
        return f"out={self.out_features}, bottleneck={self.adapter_down.out_features}, act={self.act_name}"


def apply_adapters(model: nn.Module, cfg: AdapterConfig) -> nn.Module:
    """Put a bottleneck adapter on the output of every target layer; freeze the rest.

    Returns:
        the same model, changed in place.
    """
    check_fresh(model, cfg.modules_to_save)
    modules = replace_modules(model, cfg.targets,
                              lambda name, linear: BottleneckAdapter(linear, cfg.bottleneck, cfg.act, cfg.dropout))
    attach(model, "adapter", cfg, list(modules), cfg.modules_to_save)
    return model
