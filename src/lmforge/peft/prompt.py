"""Prompt tuning: P learned embeddings ("soft prompt") in front of the input embeddings.

Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning" (arXiv:2104.08691),
as PEFT does it (positions count the virtual tokens; PEFT's `prompt_embeddings` is the same tensor):

    input_ids (B, T) ─► [0]*P + input_ids ─► embedding ─► rows 0..P-1 replaced by the prompt (P, C)
    attention_mask   ─► [1]*P + attention_mask                    │
                                                                  ▼
                                          model ─► outputs without the P virtual positions

The models take token ids, not embeddings, so `PromptModel` feeds P placeholder ids and a forward
hook on the token embedding swaps their rows for the learned prompt: no model change needed. With a
KV cache the prompt sits in the cache after the first call (its P positions are accounted for).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from ..generate import Generates
from ..models.attention import KVCache
from .inject import AdapterModule, adapter_state_dict, attach, check_fresh, input_embedding

__all__ = ["PromptConfig", "PromptEmbedding", "PromptModel", "adapter_state_dict", "apply_prompt"]


@dataclass
class PromptConfig:
    n_tokens: int = 20
    """Virtual tokens P."""
    init: Literal["sample_vocab", "random"] = "sample_vocab"
    """Start from randomly chosen rows of the token embedding, or from N(0, 1) (PEFT's RANDOM)."""
    modules_to_save: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.n_tokens < 1:
            raise ValueError(f"prompt n_tokens must be >= 1, got {self.n_tokens}")


class PromptEmbedding(AdapterModule):
    """The soft prompt (P, C)."""

    base_keys = ()

    def __init__(self, n_tokens: int, token_embedding: nn.Embedding, init: str = "sample_vocab"):
        super().__init__()
        w = token_embedding.weight
        self.embedding = nn.Embedding(n_tokens, w.shape[1], device=w.device, dtype=w.dtype)
        if init == "sample_vocab":
            rows = torch.randint(0, w.shape[0], (n_tokens,), device=w.device)
            with torch.no_grad():
                self.embedding.weight.copy_(w[rows])

    def forward(self, batch: int) -> torch.Tensor:
        return self.embedding.weight[None].expand(batch, -1, -1)  # (B, P, C)


class PromptModel(Generates, nn.Module):
    """`model` with a soft prompt in front of every input; generates like the model itself."""

    def __init__(self, model: nn.Module, prompt: PromptEmbedding):
        super().__init__()
        self.model, self.prompt, self.config = model, prompt, model.config
        self.n_tokens, self._inserting = prompt.embedding.num_embeddings, False
        self.qa = hasattr(model, "qa_outputs")  # its (B, T) start/end logits carry a time axis
        self._hook = input_embedding(model)[1].register_forward_hook(self._insert)

    def _insert(self, module, args, out: torch.Tensor) -> torch.Tensor | None:
        """Forward hook of the token embedding: the placeholder rows become the prompt."""
        if not self._inserting:
            return None
        return torch.cat((self.prompt(out.shape[0]).to(out.dtype), out[:, self.n_tokens:]), dim=1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *args,
                cache: KVCache | None = None, token_type_ids: torch.Tensor | None = None, **kwargs):
        if kwargs.get("position_ids") is not None:
            raise ValueError("prompt tuning numbers positions itself; leave position_ids out")
        B, P = input_ids.shape[0], self.n_tokens
        if attention_mask is not None:
            attention_mask = torch.cat((attention_mask.new_ones(B, P), attention_mask), dim=1)
        if cache is not None:
            kwargs["cache"] = cache
            if cache.length > 0:  # the prompt is in the cache already
                return self.model(input_ids, attention_mask, *args, **kwargs)
        if token_type_ids is not None:
            kwargs["token_type_ids"] = torch.cat((token_type_ids.new_zeros(B, P), token_type_ids), dim=1)
        ids = torch.cat((input_ids.new_zeros(B, P), input_ids), dim=1)  # placeholders for the prompt
        self._inserting = True
        try:
            out = self.model(ids, attention_mask, *args, **kwargs)
        finally:
            self._inserting = False
        return self._drop_prompt(out, P + input_ids.shape[1])

    def _drop_prompt(self, out, length: int):
        """Outputs at the real positions only: per-token tensors (B, P + T, ...) lose the first P."""
        if isinstance(out, tuple):
            return tuple(self._drop_prompt(o, length) for o in out)
        per_token = out.ndim >= 3 or (self.qa and out.ndim == 2)
        return out[:, self.n_tokens:] if per_token and out.shape[1] == length else out

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """Room for the P prompt positions too."""
        return self.model.new_cache(batch, max_len + self.n_tokens)


def apply_prompt(model: nn.Module, cfg: PromptConfig) -> PromptModel:
    """Freeze `model` and wrap it with a trainable soft prompt.

    Returns:
        a PromptModel (train it, call it and generate with it like the model).
    """
    if getattr(model, "is_encoder_decoder", False):
        raise ValueError("prompt tuning of encoder-decoder models (T5) is not supported: the token embedding "
                         "is shared with the decoder. Use LoRA, IA3 or adapters instead")
    check_fresh(model, cfg.modules_to_save)
    wrapper = PromptModel(model, PromptEmbedding(cfg.n_tokens, input_embedding(model)[1], cfg.init))
    attach(wrapper, "prompt", cfg, ["prompt"], cfg.modules_to_save)
    return wrapper
