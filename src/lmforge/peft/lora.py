"""LoRA: a trainable low-rank update beside each frozen linear layer.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv:2106.09685);
rsLoRA (Kalajdzievski 2023, arXiv:2312.03732) scales by alpha / sqrt(r) instead of alpha / r.

        x ──────────► W (frozen) ─────────────┐
        │                                     (+) ──► y = W x + b + scale · B A x
        └─► dropout ─► A (r × in) ─► B (out × r, zeros at init) ─► · scale

B starts at zero, so the adapted model equals the base model at step 0. `merge` folds
scale · B A into W (no extra cost at inference); `unmerge` takes it back out.

    model = apply_lora(model, LoraConfig(r=8, alpha=16, targets=["q_proj", "v_proj"]))
    ... train ...
    save_adapter(model, "adapter/")          # lmforge.peft.io: PEFT's folder format
    plain = merge_lora(model)                # nn.Linear layers again, for export/serving
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

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

__all__ = ["LoRALinear", "LoraConfig", "adapter_state_dict", "apply_lora", "merge_lora", "unmerge_lora"]


@dataclass
class LoraConfig:
    r: int = 8
    """Rank of the update."""
    alpha: float = 16.0
    """The update is scaled by alpha / r (alpha / sqrt(r) with rslora)."""
    dropout: float = 0.0
    """Dropout on the input of the LoRA branch (training only)."""
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Module names (or `re:` patterns) to adapt; the same names in every family."""
    rslora: bool = False
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full and saved with the adapter, e.g. a new `classifier` / `score` head."""
    init: Literal["kaiming", "gaussian"] = "kaiming"
    """A's init (B is always zero): PEFT's default Kaiming-uniform, or N(0, 1/r)."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module ranks overriding `r`: {target: rank}, matched like `targets`."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-module alphas overriding `alpha`."""

    def __post_init__(self):
        if self.r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.targets, str):
            self.targets = [self.targets]

    def rank_alpha(self, name: str) -> tuple[int, float]:
        """(r, alpha) of one module, after the patterns."""
        r = next((v for k, v in self.rank_pattern.items() if matches(name, k)), self.r)
        alpha = next((v for k, v in self.alpha_pattern.items() if matches(name, k)), self.alpha)
        return r, alpha


def lora_scale(r: int, alpha: float, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


class LoRALinear(AdapterModule):
    """x -> W x + b + scale * B A x. Owns the base `weight`/`bias`, so state-dict keys stay the base model's.

    Args:
        base: the frozen nn.Linear.
        r, alpha: rank and scale numerator; scale = alpha / r, or alpha / sqrt(r) with `rslora`.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 init: str = "kaiming"):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # same state-dict keys as the base model
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_a = nn.Linear(base.in_features, r, bias=False, **kw)
        self.lora_b = nn.Linear(r, base.out_features, bias=False, **kw)
        if init == "gaussian":
            nn.init.normal_(self.lora_a.weight, std=1 / r)
        else:
            nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))  # PEFT's default
        nn.init.zeros_(self.lora_b.weight)
        self.r, self.scale, self.merged = r, lora_scale(r, alpha, rslora), False
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta_weight(self) -> torch.Tensor:
        """scale * B A, the update of W (out, in)."""
        return self.scale * (self.lora_b.weight @ self.lora_a.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        return y + self.scale * self.lora_b(self.lora_a(self.dropout(x)))

    @torch.no_grad()
    def merge(self) -> None:
        """W += scale * B A (computed in fp32, so a bf16 base loses no more than one rounding)."""
        if not self.merged:
            self.weight.copy_((self.weight.float() + self.delta_weight().float()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W -= scale * B A."""
        if self.merged:
            self.weight.copy_((self.weight.float() - self.delta_weight().float()).to(self.weight.dtype))
            self.merged = False

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear holding the merged weight (the same Parameter objects)."""
        self.merge()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device="meta")
        linear.weight, linear.bias = self.weight, self.bias
        return linear

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, scale={self.scale:g}"


def apply_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Wrap every target linear layer in a LoRALinear, freeze the rest (but `modules_to_save`).

    Returns:
        the same model, changed in place; `model.peft` records the config.
    Raises:
        ValueError listing every target that matched no linear layer.
    """
    def make(name, linear):
        r, alpha = cfg.rank_alpha(name)
        return LoRALinear(linear, r, alpha, cfg.dropout, cfg.rslora, cfg.init)

    check_fresh(model, cfg.modules_to_save)
    modules = replace_modules(model, cfg.targets, make)
    attach(model, "lora", cfg, list(modules), cfg.modules_to_save)
    return model


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight, keeping the LoRA modules (so `unmerge` works)."""
    for m in lora_modules(model).values():
        m.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Take the LoRA updates back out of the base weights (after `merge`)."""
    for m in lora_modules(model).values():
        m.unmerge()
    return model


unmerge = unmerge_lora


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge and remove LoRA: the model gets plain nn.Linear layers again (for export or serving);
    every parameter becomes trainable again, `model.peft` is removed."""
    for name, m in lora_modules(model).items():
        set_module(model, name, m.to_linear())
    return _plain(model)


def _plain(model: nn.Module) -> nn.Module:
    """Forget the PEFT method: no `model.peft`, every parameter trainable (as a loaded model)."""
    if getattr(model, "peft", None) is not None:
        del model.peft
    for p in model.parameters():
        p.requires_grad_(True)
    return model
