"""AdaLoRA: LoRA in SVD form whose rank budget is moved, during training, to the matrices that need it.

Zhang et al. 2023, "AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning"
(arXiv:2303.10512), as implemented in PEFT (same parameters, schedule and importance scores).

        x ──► W (frozen) ──────────────────────────────────┐
        │                                                 (+) ──► y = W x + b + scale · P Λ Q x
        └─► dropout ─► Q (r × in) ─► Λ (r singular values) ─► P (out × r) ─► · alpha / r

Each update is P diag(λ) Q; Λ starts at zero (step 0 equals the base model). An orthogonality
penalty ||PᵀP - I|| + ||QQᵀ - I|| keeps P and Q near orthogonal, so λ are true singular values.
The `RankAllocator` scores every triplet (λ_i, P[:, i], Q[i]) by smoothed sensitivity |w · ∂L/∂w|
times its uncertainty, and zeroes the λ of the lowest-scoring triplets so that the total rank
follows a cubic schedule from `init_r` × n to `target_r` × n (n = adapted matrices):

    budget
    init ──────┐
               └──.__
                     `--.____
    target                   `───────────
          0   tinit               total_step - tfinal   total_step

The allocator must be stepped after every optimizer step, or AdaLoRA silently trains as a plain
LoRA (PEFT #1327). Here `apply_adalora` *returns* the allocator, which fit() takes
(`fit(..., allocator=allocator)`); saving or merging raises if gradients flowed but it never stepped.

    allocator = apply_adalora(model, AdaLoraConfig(init_r=12, target_r=4, total_step=1000))
    loss = task_loss + allocator.regularization(model)      # orthogonality penalty
    fit(model, task, cfg, run, allocator=allocator)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .inject import AdapterModule, adapter_state_dict, attach, check_fresh, replace_modules, set_module
from .lora import _plain

__all__ = [
    "AdaLoraConfig",
    "RankAllocator",
    "SVDLinear",
    "adapter_state_dict",
    "apply_adalora",
    "merge_adalora",
    "regularization",
]


@dataclass
class AdaLoraConfig:
    total_step: int
    """Number of optimizer steps of the whole training run (the schedule needs its end)."""
    init_r: int = 12
    """Starting rank of every adapted matrix."""
    target_r: int = 8
    """Average final rank: the total budget is target_r x number of adapted matrices."""
    alpha: float = 8.0
    """Scale numerator: the update is scaled by alpha / init_r (PEFT's lora_alpha / ranknum)."""
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    modules_to_save: list[str] = field(default_factory=list)
    tinit: int = 0
    """Steps of warmup at the full budget before pruning starts."""
    tfinal: int = 0
    """Steps at the end with the final budget and a fixed rank pattern."""
    delta_t: int = 1
    """Prune every this many steps during the budget decrease."""
    beta1: float = 0.85
    """EMA factor of the sensitivity."""
    beta2: float = 0.85
    """EMA factor of the uncertainty."""
    orth_reg_weight: float = 0.5
    rank_pattern: dict[str, list[bool]] = field(default_factory=dict)
    """The final pattern of kept singular values per module (filled in by the allocator)."""

    def __post_init__(self):
        if isinstance(self.targets, str):
            self.targets = [self.targets]
        if not 0 < self.target_r <= self.init_r:
            raise ValueError(f"AdaLoRA needs 0 < target_r <= init_r, got target_r={self.target_r}, "
                             f"init_r={self.init_r}")
        if self.total_step - self.tfinal <= self.tinit:
            raise ValueError(f"AdaLoRA's budget never decreases: total_step ({self.total_step}) - tfinal "
                             f"({self.tfinal}) must exceed tinit ({self.tinit}); lower tinit/tfinal")
        if not (0 < self.beta1 < 1 and 0 < self.beta2 < 1):
            raise ValueError(f"beta1 and beta2 must be in (0, 1), got {self.beta1}, {self.beta2}")


class SVDLinear(AdapterModule):
    """x -> W x + b + alpha / r * P (λ ⊙ Q x), PEFT's AdaLoRA layer (`lora_A` = Q, `lora_E` = λ,
    `lora_B` = P). The base weight and bias keep their names."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.randn(r, base.in_features, **kw) * 0.02)  # Q (r, in)
        self.lora_E = nn.Parameter(torch.zeros(r, 1, **kw))  # singular values λ (r, 1): zero at init
        self.lora_B = nn.Parameter(torch.randn(base.out_features, r, **kw) * 0.02)  # P (out, r)
        self.register_buffer("ranknum", torch.tensor(float(r), **kw))  # PEFT scales by alpha / (r + 1e-5)
        self.alpha, self.merged = alpha, False
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def scale(self) -> float:
        return self.alpha / (float(self.ranknum) + 1e-5)

    def delta_weight(self) -> torch.Tensor:
        return self.scale * (self.lora_B @ (self.lora_A * self.lora_E))  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        h = self.dropout(x) @ (self.lora_A * self.lora_E).T  # (..., r)
        return y + self.scale * (h @ self.lora_B.T)

    def rank(self) -> int:
        """Singular values still in use."""
        return int((self.lora_E != 0).sum())

    def to_linear(self) -> nn.Linear:
        with torch.no_grad():
            self.weight += self.delta_weight().to(self.weight.dtype)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight, linear.bias = self.weight, self.bias
        return linear

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.rank()}/{self.lora_E.shape[0]}"


def svd_modules(model: nn.Module) -> dict[str, SVDLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SVDLinear)}


def regularization(model: nn.Module, weight: float | None = None) -> torch.Tensor:
    """The orthogonality penalty, weighted: mean over P and Q of ||PᵀP - I||_F / ||QQᵀ - I||_F."""
    weight = model.peft.config.orth_reg_weight if weight is None else weight
    terms = []
    for m in svd_modules(model).values():
        for cov in (m.lora_A @ m.lora_A.T, m.lora_B.T @ m.lora_B):  # (r, r) each
            eye = torch.eye(cov.shape[0], device=cov.device, dtype=cov.dtype)
            terms.append(torch.linalg.matrix_norm(cov - eye))
    return weight * torch.stack(terms).mean()


class RankAllocator:
    """Moves the rank budget between AdaLoRA's matrices; `step(model, step)` after every optimizer step.

    It catches the gradients of the AdaLoRA parameters as they are accumulated (hooks), so it may be
    stepped after `optimizer.zero_grad()`, as fit() does.
    """

    def __init__(self, model: nn.Module, cfg: AdaLoraConfig):
        self.cfg, self.steps, self.backwards = cfg, 0, 0
        self.names = list(svd_modules(model))
        self.init_budget = sum(m.lora_E.shape[0] for m in svd_modules(model).values())
        self.target_budget = cfg.target_r * len(self.names)
        self.grads: dict[str, torch.Tensor] = {}
        self.ipt, self.unc = {}, {}  # smoothed sensitivity and uncertainty per parameter
        for name, m in svd_modules(model).items():
            for part in ("lora_A", "lora_E", "lora_B"):
                getattr(m, part).register_post_accumulate_grad_hook(self._catch(f"{name}.{part}"))

    def _catch(self, key: str):
        def hook(p: torch.Tensor) -> None:
            self.grads[key] = p.grad  # the same tensor clipping and unscaling change in place
            if key.endswith("lora_A") and key.startswith(self.names[0] + "."):
                self.backwards += 1
        return hook

    def budget(self, step: int) -> tuple[int, bool]:
        """(total rank allowed at `step`, whether to prune at this step): the cubic schedule."""
        c = self.cfg
        if step <= c.tinit:
            return self.init_budget, False
        if step > c.total_step - c.tfinal:
            return self.target_budget, True
        progress = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        budget = int((self.init_budget - self.target_budget) * progress ** 3 + self.target_budget)
        return budget, step % c.delta_t == 0

    @torch.no_grad()
    def step(self, model: nn.Module, step: int) -> int:
        """Update the importance scores and prune to the budget of `step`. Returns the budget."""
        self.steps += 1
        c, modules = self.cfg, svd_modules(model)
        last_scored = c.total_step - c.tfinal
        if step < last_scored:
            self._update_scores(modules)
        budget, prune = self.budget(step)
        if step > last_scored and c.rank_pattern:
            self._apply_pattern(modules)  # the final phase: ranks frozen
        elif prune or step == last_scored:
            c.rank_pattern = self._prune(modules, budget)
            if step == last_scored:
                self.ipt, self.unc = {}, {}
        return budget

    def _update_scores(self, modules: dict[str, SVDLinear]) -> None:
        b1, b2 = self.cfg.beta1, self.cfg.beta2
        for name, m in modules.items():
            for part in ("lora_A", "lora_E", "lora_B"):
                key, p = f"{name}.{part}", getattr(m, part)
                grad = self.grads.get(key)
                if grad is None:
                    continue
                ipt = (p * grad).abs()  # sensitivity |w · dL/dw|
                avg = self.ipt.get(key, torch.zeros_like(p))
                self.ipt[key] = b1 * avg + (1 - b1) * ipt
                self.unc[key] = b2 * self.unc.get(key, torch.zeros_like(p)) + (1 - b2) * (ipt - self.ipt[key]).abs()

    def _score(self, key: str, like: torch.Tensor) -> torch.Tensor:
        if key not in self.ipt:
            return torch.zeros_like(like)
        return self.ipt[key] * self.unc[key]

    def _triplet_scores(self, name: str, m: SVDLinear) -> torch.Tensor:
        """Score (r,) of each (λ_i, P[:, i], Q[i]): λ's own score + mean scores of its P column and Q row."""
        e = self._score(f"{name}.lora_E", m.lora_E).view(-1)
        a = self._score(f"{name}.lora_A", m.lora_A).mean(1)
        b = self._score(f"{name}.lora_B", m.lora_B).mean(0)
        return e + a + b

    def _prune(self, modules: dict[str, SVDLinear], budget: int) -> dict[str, list[bool]]:
        scores = {name: self._triplet_scores(name, m) for name, m in modules.items()}
        n_pruned = self.init_budget - budget
        if n_pruned <= 0:
            return {name: [True] * m.lora_E.shape[0] for name, m in modules.items()}
        threshold = torch.kthvalue(torch.cat(list(scores.values())), n_pruned).values
        pattern = {}
        for name, m in modules.items():
            keep = scores[name] > threshold
            m.lora_E.masked_fill_(~keep[:, None], 0.0)
            pattern[name] = keep.tolist()
        return pattern

    def _apply_pattern(self, modules: dict[str, SVDLinear]) -> None:
        for name, m in modules.items():
            keep = torch.tensor(self.cfg.rank_pattern[name], device=m.lora_E.device)
            m.lora_E.masked_fill_(~keep[:, None], 0.0)

    def regularization(self, model: nn.Module) -> torch.Tensor:
        """The weighted orthogonality penalty to add to the loss of every step."""
        return regularization(model, self.cfg.orth_reg_weight)

    def ranks(self, model: nn.Module) -> dict[str, int]:
        """Current rank (non-zero singular values) of every adapted matrix."""
        return {name: m.rank() for name, m in svd_modules(model).items()}

    def check(self) -> None:
        """Raise if the model trained but the allocator was never stepped (it would be plain LoRA)."""
        if self.backwards and not self.steps:
            raise RuntimeError(
                f"AdaLoRA trained for {self.backwards} backward passes but its rank allocator was never stepped, "
                "so no rank was reallocated (it acted as a plain LoRA). Pass the allocator that apply_adalora "
                "returned to fit(..., allocator=allocator), or call allocator.step(model, step) after every "
                "optimizer step.")


def apply_adalora(model: nn.Module, cfg: AdaLoraConfig) -> RankAllocator:
    """Wrap the target linear layers in SVDLinear (rank `init_r`), freeze the rest.

    Returns:
        the RankAllocator, which training must step (`fit(..., allocator=...)`); the model is
        changed in place and remembers it (`model.peft.allocator`).
    """
    check_fresh(model, cfg.modules_to_save)
    modules = replace_modules(model, cfg.targets, lambda name, linear: SVDLinear(linear, cfg.init_r, cfg.alpha,
                                                                                cfg.dropout))
    state = attach(model, "adalora", cfg, list(modules), cfg.modules_to_save)
    state.allocator = RankAllocator(model, cfg)
    return state.allocator


def merge_adalora(model: nn.Module) -> nn.Module:
    """Fold every update into its base weight and remove the AdaLoRA modules (plain nn.Linear)."""
    allocator = getattr(getattr(model, "peft", None), "allocator", None)
    if allocator is not None:
        allocator.check()
    for name, m in svd_modules(model).items():
        set_module(model, name, m.to_linear())
    return _plain(model)
