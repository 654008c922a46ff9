"""T5 encoder-decoder: relative position bias, RMS LayerNorm, cross-attention, ReLU or gated-GELU MLP.

Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
Transformer" (arXiv:1910.10683). Loads T5 v1.0 (`feed_forward_proj="relu"`, tied head) and
T5 v1.1 / Flan-T5 (`"gated-gelu"`, separate head) checkpoints of transformers' T5ForConditionalGeneration.

    input_ids ──► embed ──► encoder (bidirectional) ──────────────┐ encoder_out (B, S, C)
    decoder_input_ids ──► embed ──► decoder (causal + cross-attn) ◄┘ ──► lm_head ──► logits (B, T, V)

Shapes: B batch, S encoder time, T decoder time, H heads, C channels, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..generate import Generates
from .attention import Attention, KVCache, build_mask
from .dropout import Dropout
from .linear import Linear
from .recompute import call_layer
from .statedict import rename


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation, written out as transformers' NewGELUActivation (bit-identical)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "gelu_new": gelu_new, "silu": F.silu}


@dataclass
class T5Config:
    vocab_size: int = 32128
    dim: int = 512
    kv_dim: int = 64  # width of one attention head (d_kv); H * kv_dim need not equal dim
    hidden_dim: int = 2048  # MLP inner width (d_ff)
    n_layers: int = 6  # encoder layers
    n_decoder_layers: int | None = None  # defaults to n_layers
    n_heads: int = 8
    rel_buckets: int = 32  # relative position buckets
    rel_max_distance: int = 128  # distances from here on share the last bucket
    dropout: float = 0.1  # hidden and attention-probability dropout (T5 uses one rate)
    norm_eps: float = 1e-6
    ffn: str = "relu"  # "relu" (T5 v1.0) or "gated-gelu" (T5 v1.1, Flan-T5); any "[gated-]relu|gelu|silu"
    tie_embeddings: bool = True  # head shares the token embedding (and decoder output is scaled by dim**-0.5)
    init_factor: float = 1.0
    pad_token_id: int = 0
    eos_token_id: int | list[int] | None = 1
    decoder_start_token_id: int = 0

    def __post_init__(self):
        if self.n_decoder_layers is None:
            self.n_decoder_layers = self.n_layers
        kind = self.ffn.split("-")
        if len(kind) > 2 or (len(kind) == 2 and kind[0] != "gated") or kind[-1] not in ACTIVATIONS:
            raise ValueError(f"ffn {self.ffn!r} is not supported; use 'relu', 'gated-gelu' or another "
                             f"'[gated-]ACT' with ACT in {', '.join(ACTIVATIONS)}")

    @property
    def gated(self) -> bool:
        return self.ffn.startswith("gated-")

    @property
    def activation(self) -> str:
        """transformers' name: "gated-gelu" means the tanh approximation (gelu_new)."""
        return "gelu_new" if self.ffn == "gated-gelu" else self.ffn.split("-")[-1]

    @classmethod
    def from_hf(cls, hf: dict) -> T5Config:
        """Read a transformers `config.json` dict (model_type t5)."""
        # transformers >= 5 always writes tie_word_embeddings=true and keeps the old meaning
        # (tied head, scaled decoder output) in scale_decoder_outputs
        tie = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True))
        pad = hf.get("pad_token_id", 0)
        start = hf.get("decoder_start_token_id")
        return cls(
            vocab_size=hf["vocab_size"], dim=hf["d_model"], kv_dim=hf["d_kv"], hidden_dim=hf["d_ff"],
            n_layers=hf["num_layers"], n_decoder_layers=hf.get("num_decoder_layers"), n_heads=hf["num_heads"],
            rel_buckets=hf.get("relative_attention_num_buckets", 32),
            rel_max_distance=hf.get("relative_attention_max_distance", 128),
            dropout=hf.get("dropout_rate", 0.1), norm_eps=hf.get("layer_norm_epsilon", 1e-6),
            ffn=hf.get("feed_forward_proj", "relu"), tie_embeddings=tie,
            init_factor=hf.get("initializer_factor", 1.0), pad_token_id=pad, eos_token_id=hf.get("eos_token_id", 1),
            decoder_start_token_id=start if start is not None else pad)

    def to_hf(self) -> dict:
        """A transformers `config.json` dict."""
        return {
            "model_type": "t5", "vocab_size": self.vocab_size, "d_model": self.dim, "d_kv": self.kv_dim,
            "d_ff": self.hidden_dim, "num_layers": self.n_layers, "num_decoder_layers": self.n_decoder_layers,
            "num_heads": self.n_heads, "relative_attention_num_buckets": self.rel_buckets,
            "relative_attention_max_distance": self.rel_max_distance, "dropout_rate": self.dropout,
            "layer_norm_epsilon": self.norm_eps, "feed_forward_proj": self.ffn,
            "tie_word_embeddings": self.tie_embeddings, "initializer_factor": self.init_factor,
            "is_encoder_decoder": True, "pad_token_id": self.pad_token_id, "eos_token_id": self.eos_token_id,
            "decoder_start_token_id": self.decoder_start_token_id}


PRESETS = {
    "t5-tiny": T5Config(vocab_size=512, dim=64, kv_dim=16, hidden_dim=256, n_layers=2, n_heads=4),
    "t5-mini": T5Config(vocab_size=8192, dim=256, kv_dim=64, hidden_dim=1024, n_layers=4, n_heads=4),
    "t5-small": T5Config(),  # google-t5/t5-small
    "t5-base": T5Config(dim=768, hidden_dim=3072, n_layers=12, n_heads=12),  # google-t5/t5-base
    "flan-t5-small": T5Config(dim=512, hidden_dim=1024, n_layers=8, n_heads=6, ffn="gated-gelu",
                              tie_embeddings=False),
    "flan-t5-base": T5Config(dim=768, hidden_dim=2048, n_layers=12, n_heads=12, ffn="gated-gelu",
                             tie_embeddings=False),
}


def shift_right(labels: torch.Tensor, decoder_start_token_id: int = 0, pad_token_id: int = 0) -> torch.Tensor:
    """Decoder inputs for teacher forcing: labels (B, T) shifted one step right behind the start token,
    with ignored positions (-100) replaced by the pad token (as transformers' `_shift_right`)."""
    shifted = labels.new_full(labels.shape, decoder_start_token_id)
    shifted[..., 1:] = labels[..., :-1]
    return shifted.masked_fill(shifted == -100, pad_token_id)


def relative_position_bucket(relative_position: torch.Tensor, bidirectional: bool = True, num_buckets: int = 32,
                             max_distance: int = 128) -> torch.Tensor:
    """Bucket of each relative position (key - query): one bucket per distance below half the
    buckets, log-spaced buckets up to `max_distance`, the last bucket beyond. Bidirectional
    attention gives half the buckets to keys after the query; causal attention sees only the past."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    exact = num_buckets // 2
    log_ratio = torch.log(distance.float() / exact) / math.log(max_distance / exact)
    large = (exact + (log_ratio * (num_buckets - exact)).long()).clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < exact, distance, large)


def padding_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Encoder padding mask (B, S) -> bool (B, 1, 1, S) for cross-attention; None when nothing is padded."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    allowed = attention_mask[:, None, None, :].bool()
    return allowed | ~allowed.any(-1, keepdim=True)  # an all-pad row attends everywhere, not nowhere (NaN)


class T5LayerNorm(nn.Module):
    """T5's LayerNorm is an RMSNorm: no mean subtraction, no bias; the variance is taken in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.eps)).to(self.weight.dtype)


class MLP(nn.Module):
    """down(act(up(x))) (T5 v1.0), or down(act(gate(x)) * up(x)) when gated (T5 v1.1)."""

    def __init__(self, c: T5Config):
        super().__init__()
        self.gate_proj = Linear(c.dim, c.hidden_dim, bias=False) if c.gated else None
        self.up_proj = Linear(c.dim, c.hidden_dim, bias=False)
        self.down_proj = Linear(c.hidden_dim, c.dim, bias=False)
        self.act, self.dropout = ACTIVATIONS[c.activation], Dropout(c.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_proj is None:
            h = self.act(self.up_proj(x))
        else:
            h = self.act(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(self.dropout(h))


class RelativePositionBias(nn.Module):
    """A learned scalar per (bucket, head), added to the attention scores of every layer of a stack."""

    def __init__(self, c: T5Config, bidirectional: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(c.rel_buckets, c.n_heads))
        self.bidirectional, self.max_distance = bidirectional, c.rel_max_distance

    def forward(self, q_len: int, k_len: int, past: int = 0) -> torch.Tensor:
        """Bias (1, H, T, S) for queries at positions past .. past + q_len - 1 and keys 0 .. k_len - 1."""
        device = self.weight.device
        query = torch.arange(past, past + q_len, device=device)[:, None]
        key = torch.arange(k_len, device=device)[None, :]
        buckets = relative_position_bucket(key - query, self.bidirectional, self.weight.shape[0], self.max_distance)
        return self.weight[buckets].permute(2, 0, 1)[None]  # (T, S, H) -> (1, H, T, S)


class Block(nn.Module):
    """Pre-norm residual block: self-attention, cross-attention (decoder only), MLP."""

    def __init__(self, c: T5Config, cross: bool):
        super().__init__()
        attention = partial(Attention, c.dim, c.n_heads, head_dim=c.kv_dim, bias=False, dropout=c.dropout, scale=1.0)
        self.attn_norm, self.attn = T5LayerNorm(c.dim, c.norm_eps), attention()
        self.cross_norm = T5LayerNorm(c.dim, c.norm_eps) if cross else None
        self.cross_attn = attention() if cross else None
        self.mlp_norm, self.mlp = T5LayerNorm(c.dim, c.norm_eps), MLP(c)
        self.dropout = Dropout(c.dropout)

    def forward(self, x, mask, cache=None, context=None, context_mask=None, static=None):  # x: (B, T, C)
        x = x + self.dropout(self.attn(self.attn_norm(x), mask, cache=cache))
        if self.cross_attn is not None:
            x = x + self.dropout(self.cross_attn(self.cross_norm(x), context_mask, context=context, static=static))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class Stack(nn.Module):
    """The encoder (bidirectional) or the decoder (causal, with cross-attention) over embedded tokens.

    The relative position bias is computed once per forward and shared by all layers (transformers
    keeps its weights in the first layer).
    """

    def __init__(self, c: T5Config, n_layers: int, decoder: bool):
        super().__init__()
        self.decoder = decoder
        self.position_bias = RelativePositionBias(c, bidirectional=not decoder)
        self.layers = nn.ModuleList(Block(c, cross=decoder) for _ in range(n_layers))
        self.norm = T5LayerNorm(c.dim, c.norm_eps)
        self.dropout = Dropout(c.dropout)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None,
                context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C). attention_mask (B, past + T); context (B, S, C) and its mask (B, S)."""
        past, T = (cache.length if cache is not None else 0), x.shape[1]
        mask = self.self_attention_mask(attention_mask, T, past, x.dtype)
        cross_mask = padding_mask(context_mask) if self.decoder else None
        x = self.dropout(x)
        for i, layer in enumerate(self.layers):
            layer_cache, static = (cache.layers[i], cache.cross[i]) if cache is not None else (None, None)
            x = call_layer(self, layer, x, mask, layer_cache, context, cross_mask, static)
        return self.dropout(self.norm(x))

    def self_attention_mask(self, attention_mask, T: int, past: int, dtype) -> torch.Tensor:
        """Position bias with padding (and causal) masking folded in: an additive mask (B|1, H, T, S)."""
        bias = self.position_bias(T, past + T, past).to(dtype)
        allowed, is_causal = build_mask(attention_mask, T, causal=self.decoder, past_len=past)
        if is_causal:
            allowed = torch.ones(T, T, dtype=torch.bool, device=bias.device).tril()
        if allowed is None:
            return bias
        return torch.where(allowed, bias, torch.finfo(dtype).min)


def init_weights(c: T5Config, module: nn.Module) -> None:
    """transformers' T5 init: N(0, factor * fan-in ** -0.5) for projections (q also takes the
    1/sqrt(D) that T5's attention leaves out), N(0, factor) for embeddings and the head."""
    f, normal = c.init_factor, nn.init.normal_
    if isinstance(module, nn.Embedding):
        normal(module.weight, std=f)
    elif isinstance(module, RelativePositionBias):
        normal(module.weight, std=f * c.dim ** -0.5)
    elif isinstance(module, Attention):
        normal(module.q_proj.weight, std=f * (c.dim * c.kv_dim) ** -0.5)  # T5 folds 1/sqrt(D) into q's init
        normal(module.k_proj.weight, std=f * c.dim ** -0.5)
        normal(module.v_proj.weight, std=f * c.dim ** -0.5)
        normal(module.o_proj.weight, std=f * (c.n_heads * c.kv_dim) ** -0.5)
    elif isinstance(module, MLP):
        for linear in (module.gate_proj, module.up_proj):
            if linear is not None:
                normal(linear.weight, std=f * c.dim ** -0.5)
        normal(module.down_proj.weight, std=f * c.hidden_dim ** -0.5)


class T5EncoderModel(nn.Module):
    """The encoder alone: token ids -> hidden states (B, S, C) (transformers' T5EncoderModel)."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.encoder = Stack(config, config.n_layers, decoder=False)
        self.apply(partial(init_weights, config))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, S); attention_mask (B, S) with 1 for tokens, 0 for padding."""
        return self.encoder(self.embed(input_ids), attention_mask)


class T5ForConditionalGeneration(Generates, nn.Module):
    """T5 with its language-model head: (input ids, decoder input ids) -> next-token logits (B, T, V).

    `generate(input_ids, attention_mask, ...)` runs the encoder once and returns decoder ids
    `[decoder_start, new tokens...]`, as transformers does.
    """

    is_encoder_decoder = True

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)  # shared by encoder, decoder (and head)
        self.encoder = Stack(config, config.n_layers, decoder=False)
        self.decoder = Stack(config, config.n_decoder_layers, decoder=True)
        self.lm_head = Linear(config.dim, config.vocab_size, bias=False)
        self.apply(partial(init_weights, config))
        nn.init.normal_(self.lm_head.weight, std=config.init_factor)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the token embedding with the output head when the config says so."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the encoder.

        Args:
            input_ids: (B, S) source tokens (left or right padding both work: positions are relative).
            attention_mask: (B, S), 1 for tokens and 0 for padding.
        Returns:
            encoder output (B, S, C).
        """
        return self.encoder(self.embed(input_ids), attention_mask)

    def decode(self, decoder_input_ids: torch.Tensor, encoder_out: torch.Tensor,
               attention_mask: torch.Tensor | None = None, decoder_attention_mask: torch.Tensor | None = None,
               cache: KVCache | None = None) -> torch.Tensor:
        """Run the decoder and the head.

        Args:
            decoder_input_ids: (B, T) target tokens so far (start with `decoder_start_token_id`).
            encoder_out: (B, S, C) from `encode`.
            attention_mask: (B, S) the encoder's padding mask.
            decoder_attention_mask: (B, past + T) padding mask of the decoder tokens, or None.
            cache: from `new_cache`; keeps self-attention keys/values and the encoder's keys/values.
        Returns:
            logits (B, T, V).
        """
        h = self.decoder(self.embed(decoder_input_ids), decoder_attention_mask, encoder_out, attention_mask, cache)
        if self.config.tie_embeddings:
            h = h * self.config.dim ** -0.5  # Mesh TensorFlow rescales before the tied head
        return self.lm_head(h)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                decoder_input_ids: torch.Tensor | None = None,
                decoder_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encode then decode: logits (B, T, V). For training, `decoder_input_ids = shift_right(labels, ...)`."""
        if decoder_input_ids is None:
            raise ValueError("T5 needs decoder_input_ids; for training pass "
                             "shift_right(labels, config.decoder_start_token_id, config.pad_token_id)")
        return self.decode(decoder_input_ids, self.encode(input_ids, attention_mask), attention_mask,
                           decoder_attention_mask)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty decoder cache (self-attention buffers of `max_len` positions + cross-attention slots)."""
        c, w = self.config, self.lm_head.weight
        return KVCache(c.n_decoder_layers, batch, c.n_heads, c.kv_dim, max_len, dtype=w.dtype, device=w.device,
                       cross=True)

    def _decoder_for(self, input_ids, attention_mask):
        """Encode once; generation then steps the decoder from the start token."""
        encoder_out = self.encode(input_ids, attention_mask)
        start = input_ids.new_full((input_ids.shape[0], 1), self.config.decoder_start_token_id)
        return _BoundDecoder(self, encoder_out, attention_mask), start, None


class _BoundDecoder:
    """The decoder with the encoder output bound: called like a decoder-only model by generate.py."""

    def __init__(self, model: T5ForConditionalGeneration, encoder_out: torch.Tensor,
                 encoder_mask: torch.Tensor | None):
        self.model, self.config = model, model.config
        self.encoder_out, self.encoder_mask = encoder_out, encoder_mask

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 cache: KVCache | None = None) -> torch.Tensor:
        n, b = input_ids.shape[0], self.encoder_out.shape[0]
        if n != b:
            assert n % b == 0, f"decoder batch {n} is not a multiple of the encoder batch {b}"
            self._repeat(n // b)
        return self.model.decode(input_ids, self.encoder_out, self.encoder_mask, attention_mask, cache)

    def _repeat(self, k: int) -> None:
        """Beam search decodes k rows per input, as rows b*k .. b*k+k-1 that never mix between inputs."""
        self.encoder_out = self.encoder_out.repeat_interleave(k, 0)
        if self.encoder_mask is not None:
            self.encoder_mask = self.encoder_mask.repeat_interleave(k, 0)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return self.model.new_cache(batch, max_len)


ARCHITECTURES = {"T5ForConditionalGeneration": T5ForConditionalGeneration, "T5EncoderModel": T5EncoderModel}

TOP_RENAMES = [(".shared.", ".embed.")]  # (HF name part, our name part)


def stack_renames(config: T5Config, decoder: bool):
    """Name parts inside `encoder.` / `decoder.`: their layer numbering differs (decoder has cross-attention)."""
    mlp = 2 if decoder else 1
    cross = [(".layer.1.EncDecAttention.", ".cross_attn."), (".layer.1.layer_norm.", ".cross_norm.")]
    wi = [(".wi_0.", ".gate_proj."), (".wi_1.", ".up_proj.")] if config.gated else [(".wi.", ".up_proj.")]
    return [(".block.0.layer.0.SelfAttention.relative_attention_bias.", ".position_bias."),
            (".block.", ".layers."), (".final_layer_norm.", ".norm."),
            (".layer.0.SelfAttention.", ".attn."), (".layer.0.layer_norm.", ".attn_norm."),
            *(cross if decoder else []),
            (f".layer.{mlp}.DenseReluDense.", ".mlp."), (f".layer.{mlp}.layer_norm.", ".mlp_norm."),
            (".q.", ".q_proj."), (".k.", ".k_proj."), (".v.", ".v_proj."), (".o.", ".o_proj."),
            *wi, (".wo.", ".down_proj.")]


def _rename(state: dict, config: T5Config, to_hf: bool) -> dict:
    out = {}
    for key, value in state.items():
        stack = key.split(".")[0]
        renames = stack_renames(config, stack == "decoder") if stack in ("encoder", "decoder") else TOP_RENAMES
        out.update(rename({key: value}, renames, to_hf))
    return out


# tied copies of `shared.weight`, and a bias old checkpoints carry but T5 never uses
HF_DROPPED = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
              "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight")


def from_hf_state_dict(state: dict, config: T5Config) -> dict:
    """transformers T5ForConditionalGeneration / T5EncoderModel weights -> ours."""
    state = dict(state)
    if "shared.weight" not in state:  # a checkpoint may keep the embedding under a tied name only
        state["shared.weight"] = state.get("encoder.embed_tokens.weight", state.get("decoder.embed_tokens.weight"))
    state = _rename({k: v for k, v in state.items() if k not in HF_DROPPED}, config, to_hf=False)
    if config.tie_embeddings and "lm_head.weight" not in state and any(k.startswith("decoder.") for k in state):
        state["lm_head.weight"] = state["embed.weight"]
    return state


def to_hf_state_dict(state: dict, config: T5Config) -> dict:
    """Our weights -> transformers names, as transformers saves them: the embedding once as
    `shared.weight` (its tied copies `encoder/decoder.embed_tokens` and a tied head left out)."""
    state = {k: v for k, v in state.items() if not (config.tie_embeddings and k == "lm_head.weight")}
    return _rename(state, config, to_hf=True)
