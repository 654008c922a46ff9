"""GPT-2 decoder: learned positions, pre-LayerNorm blocks, GELU MLP, LM head tied to the embeddings.

Radford et al. 2019, "Language Models are Unsupervised Multitask Learners".
Loads and saves transformers' GPT2LMHeadModel / GPT2Model / GPT2ForSequenceClassification weights.

Shapes: B batch, T time, C channels, V vocabulary, L labels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention, KVCache, build_mask, check_context, positions
from .decoder import DecoderLM
from .dropout import Dropout
from .linear import Linear
from .recompute import call_layer
from .statedict import rename

# transformers' `activation_function` names; "gelu_new" (GELU, tanh approximation) is GPT-2's
_gelu_tanh = partial(F.gelu, approximate="tanh")
ACTIVATIONS = {"gelu_new": _gelu_tanh, "gelu_pytorch_tanh": _gelu_tanh, "gelu": F.gelu, "relu": F.relu,
               "silu": F.silu}


@dataclass
class GPTConfig:
    vocab_size: int = 50257
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    hidden_dim: int | None = None  # MLP inner width, defaults to 4 * dim
    max_len: int = 1024  # learned positions: the context length is fixed
    norm_eps: float = 1e-5
    dropout: float = 0.0  # on embeddings and on each residual branch (GPT-2 itself trained with 0.1)
    attention_dropout: float = 0.0  # on attention probabilities
    act: str = "gelu_new"
    bias: bool = True  # biases in the Linear and LayerNorm layers (nanoGPT's `bias`; its recipes use False)
    init_std: float = 0.02
    bos_token_id: int | None = 50256
    eos_token_id: int | list[int] | None = 50256
    pad_token_id: int | None = None  # sequence classification: finds the last token when no mask is given
    tie_embeddings: bool = True
    num_labels: int = 2  # sequence classification head only

    def __post_init__(self):
        self.hidden_dim = self.hidden_dim or 4 * self.dim
        if self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) must be a multiple of n_heads ({self.n_heads})")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"activation {self.act!r} is not supported; choose one of: "
                             f"{', '.join(ACTIVATIONS)}")

    @classmethod
    def from_hf(cls, hf: dict) -> GPTConfig:
        """Read a transformers `config.json` dict (model_type gpt2). `embd_pdrop` is taken equal to
        `resid_pdrop` (one `dropout` here); `"bias": false` (ours, which transformers ignores) marks
        a model without biases."""
        if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx", False):
            raise ValueError("GPT-2 attention without the 1/sqrt(head_dim) scale or with per-layer scaling "
                             "is not supported; set scale_attn_weights=true and "
                             "scale_attn_by_inverse_layer_idx=false")
        if hf.get("add_cross_attention", False):
            raise ValueError("GPT-2 with cross-attention (add_cross_attention=true) is not supported")
        return cls(
            vocab_size=hf["vocab_size"], dim=hf["n_embd"], n_layers=hf["n_layer"], n_heads=hf["n_head"],
            hidden_dim=hf.get("n_inner"), max_len=hf.get("n_positions", 1024),
            norm_eps=hf.get("layer_norm_epsilon", 1e-5), dropout=hf.get("resid_pdrop", 0.1),
            attention_dropout=hf.get("attn_pdrop", 0.1), act=hf.get("activation_function", "gelu_new"),
            init_std=hf.get("initializer_range", 0.02), bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"), pad_token_id=hf.get("pad_token_id"),
            tie_embeddings=hf.get("tie_word_embeddings", True), bias=hf.get("bias", True),
            num_labels=hf.get("num_labels") or len(hf.get("id2label") or {}) or 2)

    def to_hf(self) -> dict:
        """A transformers `config.json` dict; a model without biases adds `"bias": false`, so that it
        loads here without them again (its weights carry zero biases for transformers)."""
        return {**({} if self.bias else {"bias": False}),
            "model_type": "gpt2", "vocab_size": self.vocab_size, "n_embd": self.dim, "n_layer": self.n_layers,
            "n_head": self.n_heads, "n_inner": self.hidden_dim, "n_positions": self.max_len,
            "layer_norm_epsilon": self.norm_eps, "resid_pdrop": self.dropout, "embd_pdrop": self.dropout,
            "attn_pdrop": self.attention_dropout, "activation_function": self.act,
            "initializer_range": self.init_std, "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id,
            "tie_word_embeddings": self.tie_embeddings, "num_labels": self.num_labels}


_OWN_TOKENIZER = {"bos_token_id": None, "eos_token_id": None}  # special ids come from the run's tokenizer

PRESETS = {
    "gpt-tiny": GPTConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, max_len=256, **_OWN_TOKENIZER),
    "gpt-mini": GPTConfig(vocab_size=8192, dim=256, n_layers=4, n_heads=4, max_len=512, **_OWN_TOKENIZER),
    "gpt-small": GPTConfig(vocab_size=32000, dim=512, n_layers=8, n_heads=8, max_len=1024, **_OWN_TOKENIZER),
    "gpt-base": GPTConfig(vocab_size=50304),  # GPT-2 124M with 50257 padded to a multiple of 64 (nanoGPT)
    "gpt2": GPTConfig(),  # the 124M model, loads `openai-community/gpt2`
    "gpt2-medium": GPTConfig(dim=1024, n_layers=24, n_heads=16),
    "gpt2-large": GPTConfig(dim=1280, n_layers=36, n_heads=20),
    "gpt2-xl": GPTConfig(dim=1600, n_layers=48, n_heads=25),
    # nanoGPT's Shakespeare-characters config for CPU (65 characters, context 64), with nanoGPT's model:
    # no biases, the exact GELU. (GPT-2's biases and tanh GELU measured 0.012 lower in validation loss
    # on the recipe, mean of seeds 1, 2, 3, 1337, 1.889 vs 1.901, but PyTorch's tanh GELU costs ~2.7x
    # the exact one on the CPU; `model.overrides={bias: true, act: gelu_new}` gives that model.)
    "gpt-char-cpu": GPTConfig(vocab_size=65, dim=128, n_layers=4, n_heads=4, max_len=64, bias=False, act="gelu",
                              **_OWN_TOKENIZER),
}


class MLP(nn.Module):
    """down(act(up(x)))."""

    def __init__(self, dim: int, hidden_dim: int, act: str = "gelu_new", bias: bool = True):
        super().__init__()
        self.up_proj = Linear(dim, hidden_dim, bias=bias)
        self.down_proj = Linear(hidden_dim, dim, bias=bias)
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x)))  # (B, T, C) -> (B, T, 4C) -> (B, T, C)


class Block(nn.Module):
    """Pre-LayerNorm residual block: attention then MLP, each branch followed by dropout."""

    def __init__(self, c: GPTConfig):
        super().__init__()
        self.attn_norm = nn.LayerNorm(c.dim, eps=c.norm_eps, bias=c.bias)
        self.attn = Attention(c.dim, c.n_heads, bias=c.bias, dropout=c.attention_dropout)
        self.mlp_norm = nn.LayerNorm(c.dim, eps=c.norm_eps, bias=c.bias)
        self.mlp = MLP(c.dim, c.hidden_dim, c.act, c.bias)
        self.dropout = Dropout(c.dropout)

    def forward(self, x, mask, is_causal, cache=None, prefix=None):  # x: (B, T, C)
        x = x + self.dropout(self.attn(self.attn_norm(x), mask, is_causal, cache=cache, prefix=prefix))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class GPT(nn.Module):
    """The decoder stack without a head (transformers' GPT2Model): token ids -> hidden states (B, T, C)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.pos_embed = nn.Embedding(config.max_len, config.dim)
        self.dropout = Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = nn.LayerNorm(config.dim, eps=config.norm_eps, bias=config.bias)
        self.apply(self._init_weights)
        self.register_load_state_dict_pre_hook(_strip_backbone_prefix)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.init_std
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, Block):  # GPT-2: residual projections scaled by 1/sqrt(number of residual adds)
            for proj in (module.attn.o_proj, module.mlp.down_proj):
                nn.init.normal_(proj.weight, std=std / math.sqrt(2 * self.config.n_layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                prefix: list | None = None) -> torch.Tensor:
        """input_ids (B, T); attention_mask (B, past + T) with 1 for tokens, 0 for padding.

        Positions are counted over real tokens (so left padding does not shift them) unless
        `position_ids` (B, T) are given.
        """
        past = cache.length if cache is not None else 0
        T = input_ids.shape[1]
        if position_ids is None:
            position_ids = positions(attention_mask, past, T, input_ids.device)
        check_context(position_ids, self.config.max_len)
        x = self.dropout(self.embed(input_ids) + self.pos_embed(position_ids))  # (B, T, C)
        mask, is_causal = build_mask(attention_mask, T, causal=True, past_len=past)
        for i, layer in enumerate(self.layers):
            x = call_layer(self, layer, x, mask, is_causal, cache.layers[i] if cache is not None else None,
                           prefix[i] if prefix is not None else None)
        return self.norm(x)


class GPTForCausalLM(DecoderLM):
    """GPT-2 with its language-model head: token ids -> next-token logits (B, T, V)."""

    backbone = GPT

    def __init__(self, config: GPTConfig):
        super().__init__(config)
        nn.init.normal_(self.lm_head.weight, std=config.init_std)
        self.tie_weights()
        self.register_load_state_dict_pre_hook(_add_backbone_prefix)


class GPTForSequenceClassification(nn.Module):
    """GPT-2 with a linear head on the last real token of each row: token ids -> class logits (B, L)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.model = GPT(config)
        self.score = Linear(config.dim, config.num_labels, bias=False)
        nn.init.normal_(self.score.weight, std=config.init_std)
        self.register_load_state_dict_pre_hook(_add_backbone_prefix)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, prefix: list | None = None) -> torch.Tensor:
        """input_ids (B, T), left- or right-padded; attention_mask (B, T) 1 for tokens, 0 for padding."""
        hidden = self.model(input_ids, attention_mask, position_ids, prefix=prefix)  # (B, T, C)
        last = last_token_index(input_ids, attention_mask, self.config.pad_token_id)
        return self.score(hidden[torch.arange(len(last), device=last.device), last])  # (B, C) -> (B, L)


def last_token_index(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                     pad_token_id: int | None) -> torch.Tensor:
    """Index (B,) of the last real token of each row: found by the mask, else by `pad_token_id`
    (as transformers does), else the last position (rows assumed unpadded)."""
    B, T = input_ids.shape
    if attention_mask is not None:
        real = attention_mask[:, -T:].bool()
    elif pad_token_id is not None:
        real = input_ids != pad_token_id
    else:
        return torch.full((B,), T - 1, device=input_ids.device)
    return (torch.arange(T, device=input_ids.device) * real).argmax(-1)  # rightmost real token


ARCHITECTURES = {"GPT2LMHeadModel": GPTForCausalLM, "GPT2Model": GPT,
                 "GPT2ForSequenceClassification": GPTForSequenceClassification}

BACKBONE_PARTS = ("embed.", "pos_embed.", "layers.", "norm.")  # first name parts of the backbone's weights


def _add_backbone_prefix(module, state, prefix, *args) -> None:
    """Load-state hook of the head models: accept bare backbone weights (transformers' GPT2Model and
    the original GPT-2 checkpoints have no `transformer.` prefix) and fill in a tied head."""
    for key in [k for k in state if k.startswith(prefix) and k[len(prefix):].startswith(BACKBONE_PARTS)]:
        state[prefix + "model." + key[len(prefix):]] = state.pop(key)
    tied = getattr(module, "lm_head", None) is not None and module.config.tie_embeddings
    if tied and prefix + "lm_head.weight" not in state and prefix + "model.embed.weight" in state:
        state[prefix + "lm_head.weight"] = state[prefix + "model.embed.weight"]


def _strip_backbone_prefix(module, state, prefix, *args) -> None:
    """Load-state hook of the bare backbone: accept a head model's weights (`model.` prefix); the
    head's own weights are left in and reported as unexpected."""
    for key in [k for k in state if k.startswith(prefix + "model.")]:
        state[prefix + key[len(prefix + "model."):]] = state.pop(key)


# (HF name part, our name part); q/k/v are fused in HF's `attn.c_attn` and split apart below
HF_RENAMES = [(".transformer.", ".model."), (".wte.", ".embed."), (".wpe.", ".pos_embed."),
              (".h.", ".layers."), (".ln_1.", ".attn_norm."), (".ln_2.", ".mlp_norm."), (".ln_f.", ".norm."),
              (".attn.c_proj.", ".attn.o_proj."), (".mlp.c_fc.", ".mlp.up_proj."),
              (".mlp.c_proj.", ".mlp.down_proj.")]

QKV = ("q_proj", "k_proj", "v_proj")


def _is_conv1d(key: str) -> bool:
    """HF GPT-2 stores these Linear weights transposed (its `Conv1D`: (in, out))."""
    return key.endswith(".weight") and (".attn." in key or ".mlp." in key)


def from_hf_state_dict(state: dict, config: GPTConfig) -> dict:
    """transformers GPT2LMHeadModel / GPT2ForSequenceClassification (`transformer.` -> `model.`) or
    GPT2Model (no prefix) weights -> ours: `c_attn` split into q/k/v, Conv1D weights transposed."""
    out = {}
    for key, value in rename(state, HF_RENAMES).items():
        if key.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # causal-mask buffers of old checkpoints
        if ".attn.c_attn." in key:
            for name, part in zip(QKV, value.chunk(3, dim=-1)):  # (C, 3C) -> 3 x (C, C); bias (3C) -> 3 x (C)
                out[key.replace("c_attn", name)] = part.t().contiguous() if part.ndim == 2 else part
        else:
            out[key] = value.t().contiguous() if _is_conv1d(key) else value
    return out if config.bias else _without_zero_biases(out)


def _without_zero_biases(state: dict) -> dict:
    """Drop the zero biases that `to_hf_state_dict` writes for a model without biases; a non-zero one
    stays, and loading then stops on it as an unexpected weight."""
    return {k: v for k, v in state.items() if not (_block_or_norm_bias(k) and not v.any())}


def _block_or_norm_bias(key: str) -> bool:
    names = key.split(".")
    return names[-1] == "bias" and ("layers" in names or names[-2] == "norm")


def to_hf_state_dict(state: dict, config: GPTConfig) -> dict:
    """Our weights -> transformers GPT-2 names: q/k/v fused into `c_attn`, Conv1D weights transposed,
    a tied `lm_head.weight` left out (as transformers saves it). A model without biases
    (`bias=False`) gets zero biases, which transformers' GPT-2 requires and which change nothing."""
    state = state if config.bias else _with_zero_biases(state)
    out = {}
    for key, value in state.items():
        if (config.tie_embeddings and key == "lm_head.weight") or any(f".attn.{n}." in key for n in QKV[1:]):
            continue  # k/v go into c_attn with q
        if ".attn.q_proj." in key:
            parts = [state[key.replace("q_proj", n)] for n in QKV]
            parts = [p.t() if p.ndim == 2 else p for p in parts]  # weights 3 x (C, C) -> (C, 3C)
            out[key.replace("q_proj", "c_attn")] = torch.cat(parts, dim=-1)
        else:
            out[key] = value.t().contiguous() if _is_conv1d(key) else value
    return rename(out, HF_RENAMES, to_hf=True)


def _with_zero_biases(state: dict) -> dict:
    """Add a zero `.bias` beside every LayerNorm and Linear weight of the blocks and the final norm."""
    out = dict(state)
    for key, value in state.items():
        bias = key.removesuffix("weight") + "bias"
        if key.endswith(".weight") and _block_or_norm_bias(bias):
            out.setdefault(bias, value.new_zeros(value.shape[0]))
    return out
