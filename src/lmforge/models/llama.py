"""Llama-family decoder: RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention.

Touvron et al. 2023, "LLaMA: Open and Efficient Foundation Language Models" (arXiv:2302.13971).
Also loads SmolLM2 and other checkpoints with the same layout.
Loads and saves transformers' LlamaForCausalLM / LlamaForSequenceClassification weights.

Shapes: B batch, T time, C channels, V vocabulary, L labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention, KVCache, build_mask, check_context, positions, rotary_tables
from .decoder import DecoderLM
from .gpt import last_token_index
from .linear import Linear
from .recompute import call_layer
from .statedict import rename


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # grouped-query attention when < n_heads
    head_dim: int | None = None  # defaults to dim // n_heads
    hidden_dim: int = 11008  # SwiGLU inner width
    max_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    dropout: float = 0.0  # attention-probability dropout (Llama itself uses none)
    init_std: float = 0.02
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None  # sequence classification: finds the last token when no mask is given
    num_labels: int = 2  # sequence classification head only

    def __post_init__(self):
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        self.head_dim = self.head_dim or self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")

    @classmethod
    def from_hf(cls, hf: dict) -> LlamaConfig:
        """Read a transformers `config.json` dict (model_type llama)."""
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"rope type {rope_type!r} is not supported yet; supported: 'default'")
        return cls(
            vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
            n_heads=hf["num_attention_heads"], n_kv_heads=hf.get("num_key_value_heads"),
            head_dim=hf.get("head_dim"), hidden_dim=hf["intermediate_size"],
            max_len=hf.get("max_position_embeddings", 2048),
            rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
            norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=hf.get("tie_word_embeddings", False),
            attention_bias=hf.get("attention_bias", False), mlp_bias=hf.get("mlp_bias", False),
            dropout=hf.get("attention_dropout", 0.0), init_std=hf.get("initializer_range", 0.02),
            bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
            num_labels=hf.get("num_labels") or len(hf.get("id2label") or {}) or 2)

    def to_hf(self) -> dict:
        """A transformers `config.json` dict."""
        return {
            "model_type": "llama", "vocab_size": self.vocab_size, "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim,
            "intermediate_size": self.hidden_dim, "max_position_embeddings": self.max_len,
            "rope_theta": self.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "rms_norm_eps": self.norm_eps, "tie_word_embeddings": self.tie_embeddings,
            "attention_bias": self.attention_bias, "mlp_bias": self.mlp_bias, "hidden_act": "silu",
            "attention_dropout": self.dropout, "initializer_range": self.init_std,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id,
            "num_labels": self.num_labels}


PRESETS = {
    "llama-tiny": LlamaConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=172, max_len=256),
    "llama-mini": LlamaConfig(vocab_size=8192, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, hidden_dim=688,
                              max_len=512),
    "llama-small": LlamaConfig(vocab_size=32000, dim=512, n_layers=8, n_heads=8, n_kv_heads=4, hidden_dim=1376,
                               max_len=1024),
    "smollm2-135m": LlamaConfig(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536,
                                max_len=8192, rope_theta=100000.0, tie_embeddings=True),
    "llama-base": LlamaConfig(vocab_size=32000, dim=768, n_layers=12, n_heads=12, n_kv_heads=4, hidden_dim=2048,
                              max_len=2048),
}


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 (as transformers does) and cast back."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = False):
        super().__init__()
        self.gate_proj = Linear(dim, hidden_dim, bias=bias)
        self.up_proj = Linear(dim, hidden_dim, bias=bias)
        self.down_proj = Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm residual block: attention then MLP."""

    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.attn_norm = RMSNorm(c.dim, c.norm_eps)
        self.attn = Attention(c.dim, c.n_heads, c.n_kv_heads, c.head_dim, bias=c.attention_bias, dropout=c.dropout)
        self.mlp_norm = RMSNorm(c.dim, c.norm_eps)
        self.mlp = MLP(c.dim, c.hidden_dim, bias=c.mlp_bias)

    def forward(self, x, mask, is_causal, rope, cache=None, prefix=None):  # x: (B, T, C)
        x = x + self.attn(self.attn_norm(x), mask, is_causal, rope=rope, cache=cache, prefix=prefix)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    """The decoder stack without a head: token ids -> final hidden states (B, T, C)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None  # (max_len, D) each, made on first use

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (B, 1, T, D) for position ids (B, T); the tables are built once per device."""
        if self._rope is None or self._rope[0].device != position_ids.device:
            c = self.config
            self._rope = rotary_tables(c.head_dim, c.rope_theta, c.max_len, position_ids.device)
        cos, sin = self._rope
        return cos[position_ids][:, None].to(dtype), sin[position_ids][:, None].to(dtype)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                prefix: list | None = None) -> torch.Tensor:
        """input_ids (B, T); attention_mask (B, past + T) with 1 for tokens, 0 for padding."""
        past = cache.length if cache is not None else 0
        T = input_ids.shape[1]
        if position_ids is None:
            position_ids = positions(attention_mask, past, T, input_ids.device)
        check_context(position_ids, self.config.max_len)
        x = self.embed(input_ids)
        rope = self.rope(position_ids, x.dtype)
        mask, is_causal = build_mask(attention_mask, T, causal=True, past_len=past)
        for i, layer in enumerate(self.layers):
            x = call_layer(self, layer, x, mask, is_causal, rope, cache.layers[i] if cache is not None else None,
                           prefix[i] if prefix is not None else None)
        return self.norm(x)


class LlamaForCausalLM(DecoderLM):
    """Llama with its language-model head: token ids -> next-token logits (B, T, V)."""

    backbone = Llama

    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        self.apply(self._init_weights)
        self.tie_weights()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)


class LlamaForSequenceClassification(nn.Module):
    """Llama with a linear head on the last real token of each row: token ids -> class logits (B, L)."""

    _init_weights = LlamaForCausalLM._init_weights  # the same normal(init_std) init, the new head included

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = Llama(config)
        self.score = Linear(config.dim, config.num_labels, bias=False)
        self.apply(self._init_weights)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, prefix: list | None = None) -> torch.Tensor:
        """input_ids (B, T), left- or right-padded; attention_mask (B, T) 1 for tokens, 0 for padding."""
        hidden = self.model(input_ids, attention_mask, position_ids, prefix=prefix)  # (B, T, C)
        last = last_token_index(input_ids, attention_mask, self.config.pad_token_id)
        return self.score(hidden[torch.arange(len(last), device=last.device), last])  # (B, C) -> (B, L)


ARCHITECTURES = {"LlamaForCausalLM": LlamaForCausalLM,
                 "LlamaForSequenceClassification": LlamaForSequenceClassification}

# (HF name part, our name part)
HF_RENAMES = [(".embed_tokens.", ".embed."), (".self_attn.", ".attn."),
              (".input_layernorm.", ".attn_norm."), (".post_attention_layernorm.", ".mlp_norm.")]


def from_hf_state_dict(state: dict, config: LlamaConfig) -> dict:
    """transformers LlamaForCausalLM / LlamaForSequenceClassification weights -> ours."""
    state = rename(state, HF_RENAMES)
    if config.tie_embeddings and "score.weight" not in state:  # a classifier has no LM head to tie
        state["lm_head.weight"] = state["model.embed.weight"]
    return state


def to_hf_state_dict(state: dict, config: LlamaConfig) -> dict:
    """Our weights -> transformers Llama names (a tied LM head left out, as transformers saves it)."""
    state = {k: v for k, v in state.items() if not (config.tie_embeddings and k == "lm_head.weight")}
    return rename(state, HF_RENAMES, to_hf=True)
