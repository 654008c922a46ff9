"""Prefix tuning: learned keys and values prepended to every attention layer.

Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation" (arXiv:2101.00190),
laid out as PEFT does (so PEFT's saved `prompt_embeddings` are the same tensor):

    training (reparameterised):  embedding (P, G·D) ─► Linear ─► tanh ─► Linear ─► (P, L·2·G·D)
    inference (collapsed):       embedding (P, L·2·G·D)                             │
                                                                                    ▼
        view (P, 2L, G, D) ─► layer i gets keys [2i], values [2i+1], each (B, G, P, D) ─► prefix=

Shapes: B batch, T time, P virtual tokens, L layers, G key/value heads, D head dim.

`PrefixModel(model, encoder)` passes the prefixes through the model's `prefix=` argument; the
shared Attention puts them in front of the keys/values *after* the KV cache, so the cache holds
only real tokens and generation works unchanged; every query may attend to every prefix position
(the mask gains P leading ones inside attention, so left padding needs nothing special). As in
PEFT/transformers, the virtual tokens take the first P positions: real tokens are numbered from P.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..generate import Generates
from ..models import bert
from ..models.attention import Attention, KVCache, positions
from ..models.hub import family_of
from .inject import AdapterModule, adapter_state_dict, attach, check_fresh

__all__ = ["PrefixConfig", "PrefixEncoder", "PrefixModel", "adapter_state_dict", "apply_prefix", "collapse_prefix"]


@dataclass
class PrefixConfig:
    n_tokens: int = 20
    """Virtual tokens P per layer."""
    projection: bool = True
    """Reparameterise through an MLP while training (more stable); `collapse_prefix` removes it."""
    hidden: int = 512
    """Inner width of the reparameterisation MLP."""
    modules_to_save: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.n_tokens < 1:
            raise ValueError(f"prefix n_tokens must be >= 1, got {self.n_tokens}")


class PrefixEncoder(AdapterModule):
    """Produces the per-layer key/value prefixes (everything here is adapter: no base keys)."""

    base_keys = ()

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, n_tokens: int, projection: bool = True,
                 hidden: int = 512):
        super().__init__()
        self.shape = (n_tokens, 2 * n_layers, n_kv_heads, head_dim)  # (P, 2L, G, D)
        token_dim, out = n_kv_heads * head_dim, 2 * n_layers * n_kv_heads * head_dim
        self.embedding = nn.Embedding(n_tokens, token_dim if projection else out)
        self.transform = nn.Sequential(nn.Linear(token_dim, hidden), nn.Tanh(), nn.Linear(hidden, out)) \
            if projection else None

    def forward(self) -> torch.Tensor:
        """All prefixes (P, L * 2 * G * D), PEFT's `prompt_embeddings` layout."""
        x = self.embedding.weight
        return x if self.transform is None else self.transform(x)

    def prefixes(self, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(keys, values)] per layer, each (B, G, P, D)."""
        P, L2, G, D = self.shape
        kv = self().view(P, L2, G, D).permute(1, 2, 0, 3)  # (2L, G, P, D)
        kv = kv[:, None].expand(L2, batch, G, P, D)
        return [(kv[i], kv[i + 1]) for i in range(0, L2, 2)]

    @torch.no_grad()
    def collapse(self) -> None:
        """Replace the MLP by its output: same prefixes, no reparameterisation (inference/export)."""
        if self.transform is not None:
            raw = self()
            self.embedding = nn.Embedding(*raw.shape, device=raw.device, dtype=raw.dtype)
            self.embedding.weight.copy_(raw)
            self.transform = None


class PrefixModel(Generates, nn.Module):
    """`model` called with the prefixes of `prefix_encoder`; generates like the model itself.

    Forward arguments are the model's (`input_ids, attention_mask, ..., cache=`), outputs too.
    """

    def __init__(self, model: nn.Module, prefix_encoder: PrefixEncoder):
        super().__init__()
        self.model, self.prefix_encoder, self.config = model, prefix_encoder, model.config
        self.bidirectional = family_of(model) is bert  # BERT numbers positions 0..T-1, ignoring padding

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *args,
                position_ids: torch.Tensor | None = None, cache: KVCache | None = None, **kwargs):
        if position_ids is None:
            position_ids = self._positions(input_ids, attention_mask, cache)
        if cache is not None:
            kwargs["cache"] = cache
        prefix = self.prefix_encoder.prefixes(input_ids.shape[0])
        return self.model(input_ids, attention_mask, *args, position_ids=position_ids, prefix=prefix, **kwargs)

    def _positions(self, input_ids, attention_mask, cache) -> torch.Tensor:
        """Positions of the real tokens, after the P virtual ones (as PEFT with transformers)."""
        P, T = self.prefix_encoder.shape[0], input_ids.shape[1]
        if self.bidirectional:
            return torch.arange(P, P + T, device=input_ids.device)[None]
        past = cache.length if cache is not None else 0
        return positions(attention_mask, past, T, input_ids.device) + P

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """The model's cache: prefixes are not stored in it (attention adds them at every step)."""
        return self.model.new_cache(batch, max_len)


def apply_prefix(model: nn.Module, cfg: PrefixConfig) -> PrefixModel:
    """Freeze `model` and wrap it with a trainable prefix encoder.

    Returns:
        a PrefixModel (train it, call it and generate with it like the model).
    """
    if getattr(model, "is_encoder_decoder", False) or not _takes_prefix(model):
        raise ValueError(f"prefix tuning needs a model whose forward takes prefix= (BERT, GPT-2, Llama); "
                         f"{type(model).__name__} does not. Use LoRA, IA3 or adapters instead")
    check_fresh(model, cfg.modules_to_save)
    attn = [m for m in model.modules() if isinstance(m, Attention)]
    w = next(model.parameters())
    encoder = PrefixEncoder(len(attn), attn[0].n_kv_heads, attn[0].head_dim, cfg.n_tokens, cfg.projection,
                            cfg.hidden).to(device=w.device, dtype=w.dtype)
    wrapper = PrefixModel(model, encoder)
    attach(wrapper, "prefix", cfg, ["prefix_encoder"], cfg.modules_to_save)
    return wrapper


def _takes_prefix(model: nn.Module) -> bool:
    import inspect

    return "prefix" in inspect.signature(model.forward).parameters


def collapse_prefix(model: PrefixModel) -> PrefixModel:
    """Drop the reparameterisation MLP, keeping the prefixes it produces (identical outputs)."""
    model.prefix_encoder.collapse()
    model.peft.config.projection = False
    return model
