"""What every decoder-only language model shares: a backbone with a language-model head on top.

The family files (gpt.py, llama.py) define the backbone; `DecoderLM` adds the head, weight tying,
the KV cache and generation (`Generates`), so those live in one place.
"""

from __future__ import annotations

import torch
from torch import nn

from ..generate import Generates
from .attention import KVCache
from .linear import Linear


class DecoderLM(Generates, nn.Module):
    """Backbone (`self.model`: token ids -> hidden states (B, T, C)) + `lm_head`: logits (B, T, V).

    Subclasses set `backbone` (the backbone class) and initialise weights in their `__init__`.
    """

    backbone: type[nn.Module]

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = self.backbone(config)
        self.lm_head = Linear(config.dim, config.vocab_size, bias=False)

    def tie_weights(self) -> None:
        """Share the token embedding with the output head when the config says so."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.model.embed.weight

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                prefix: list | None = None, return_hidden: bool = False) -> torch.Tensor:
        """Next-token logits (B, T, V); with `return_hidden`, the final hidden states (B, T, C) that the
        head would read (training uses them with a fused head + loss, `lmforge.losses`)."""
        hidden = self.model(input_ids, attention_mask, position_ids, cache, prefix)
        return hidden if return_hidden else self.lm_head(hidden)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty KV cache for `batch` sequences of up to `max_len` positions."""
        c, w = self.config, self.lm_head.weight
        n_kv_heads = getattr(c, "n_kv_heads", None) or c.n_heads
        head_dim = getattr(c, "head_dim", None) or c.dim // c.n_heads
        return KVCache(c.n_layers, batch, n_kv_heads, head_dim, max_len, dtype=w.dtype, device=w.device)
