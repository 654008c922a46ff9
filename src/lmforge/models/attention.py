"""Multi-head attention shared by every family, its masks, its KV cache and rotary positions.

One `Attention` module serves BERT, GPT-2, Llama and T5, so the projection names
(`q_proj k_proj v_proj o_proj`) mean the same thing everywhere and PEFT needs no per-family code.

Shapes: B batch, T query time, S key time, P prefix length, H query heads, G key/value heads,
D head dim, C channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .dropout import dropout
from .linear import Linear

ATTENTION_BLOCK = 64  # query rows per block of causal attention with dropout (64 measured best at T = 256)


class LayerCache:
    """Key/value buffers of one attention layer, preallocated for `max_len` positions.

    Writing into a preallocated buffer (instead of `torch.cat` per step) keeps decoding
    free of reallocation. `length` is how many positions are filled.
    """

    def __init__(self, batch: int, n_kv_heads: int, head_dim: int, max_len: int, dtype, device):
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v (B, G, T, D); return all keys and values so far (B, G, length, D)."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache is full: {end} positions needed, {self.k.shape[2]} allocated")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def reorder(self, index: torch.Tensor) -> None:
        """Select batch rows (beam search)."""
        self.k = self.k.index_select(0, index)
        self.v = self.v.index_select(0, index)


class StaticKV:
    """Keys/values computed once and reused at every step (T5 cross-attention)."""

    def __init__(self):
        self.kv: tuple[torch.Tensor, torch.Tensor] | None = None

    def reorder(self, index: torch.Tensor) -> None:
        if self.kv is not None:
            self.kv = (self.kv[0].index_select(0, index), self.kv[1].index_select(0, index))


class KVCache:
    """The cache of a whole model: one `LayerCache` per attention layer.

    `length` is the number of positions already processed (the offset of the next token).
    """

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, max_len: int,
                 dtype=torch.float32, device=None, cross: bool = False):
        self.layers = [LayerCache(batch, n_kv_heads, head_dim, max_len, dtype, device) for _ in range(n_layers)]
        self.cross = [StaticKV() for _ in range(n_layers)] if cross else None

    @property
    def length(self) -> int:
        return self.layers[0].length

    @property
    def max_len(self) -> int:
        return self.layers[0].k.shape[2]

    def reorder(self, index: torch.Tensor) -> None:
        for layer in self.layers + (self.cross or []):
            layer.reorder(index)


def build_mask(attention_mask: torch.Tensor | None, q_len: int, causal: bool,
               past_len: int = 0) -> tuple[torch.Tensor | None, bool]:
    """Turn a (B, S) padding mask (1 = token, 0 = pad) into what SDPA takes.

    Returns `(mask, is_causal)`: mask is None or a bool (B, 1, T, S) tensor (True = may attend).
    The cheap cases (no padding) return None and let SDPA use its causal kernel. Rows with
    nothing to attend to (queries at pad positions) are allowed everything: their output is
    ignored, and a fully masked row would give NaN that spreads through `0 * NaN` later.
    """
    padded = attention_mask is not None and not bool(attention_mask.all())
    if not padded:
        if not causal or q_len == 1:
            return None, False
        if past_len == 0:
            return None, True
    key_len = past_len + q_len
    device = attention_mask.device if attention_mask is not None else None
    allowed = torch.ones(1, 1, q_len, key_len, dtype=torch.bool, device=device)
    if causal:
        q_pos = torch.arange(past_len, key_len, device=device)[:, None]
        allowed = allowed & (torch.arange(key_len, device=device)[None, :] <= q_pos)
    if padded:
        allowed = allowed & attention_mask[:, None, None, -key_len:].bool()
        allowed = allowed | ~allowed.any(-1, keepdim=True)
    return allowed, False


def positions(attention_mask: torch.Tensor | None, past_len: int, q_len: int, device=None) -> torch.Tensor:
    """Position ids (B|1, T) of the next q_len tokens: counted over real tokens only, so left
    padding does not shift positions (as transformers' generate does)."""
    if attention_mask is None:
        return torch.arange(past_len, past_len + q_len, device=device)[None]
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp_(min=0)[:, -q_len:]


def check_context(position_ids: torch.Tensor, max_len: int) -> None:
    """A clear error for positions beyond what the model was built for (learned or rotary tables)."""
    last = int(position_ids.max())
    if last >= max_len:
        raise ValueError(f"sequence of {last + 1} positions exceeds the context length of this model ({max_len})")


def rotary_tables(head_dim: int, theta: float, max_len: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (max_len, D) for rotary position embeddings, computed as transformers does."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=device) / head_dim))
    freqs = torch.arange(max_len, dtype=torch.float, device=device)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) by cos/sin (B, 1, T, D): the half-split (GPT-NeoX / HF Llama) layout."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    """Scaled dot-product attention with separate q/k/v/o projections.

    Handles grouped-query attention (`n_kv_heads < n_heads`), rotary positions, a KV cache,
    cross-attention (`context`) and prefix tuning (`prefix` keys/values prepended).

    Args:
        dim: model width C.
        n_heads: query heads H; `n_kv_heads` G defaults to H.
        head_dim: D, defaults to dim // n_heads.
        bias: bias on q/k/v/o projections.
        scale: softmax scale, default 1/sqrt(D) (T5 uses 1.0).
    """

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int | None = None, head_dim: int | None = None,
                 bias: bool = True, dropout: float = 0.0, scale: float | None = None):
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads or n_heads
        self.head_dim = head_dim or dim // n_heads
        self.q_proj = Linear(dim, n_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(n_heads * self.head_dim, dim, bias=bias)
        self.dropout, self.scale = dropout, scale

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], n, self.head_dim).transpose(1, 2)  # (B, n, T, D)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, is_causal: bool = False,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None, cache: LayerCache | None = None,
                context: torch.Tensor | None = None, static: StaticKV | None = None,
                prefix: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C). `mask` is bool/float (B|1, 1, T, S) or None."""
        q = self._heads(self.q_proj(x), self.n_heads)
        k, v = self._keys_values(x, context, static)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = cache.update(k, v)
        if prefix is not None:
            k, v, mask, is_causal = _prepend_prefix(prefix, k, v, mask, is_causal, q.shape[2])
        if self.training and self.dropout > 0:
            y = self._attend_with_dropout(q, k, v, mask, is_causal)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=self.scale,
                                               enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(y.transpose(1, 2).flatten(2))  # (B, T, H*D) -> (B, T, C)

    def _attend_with_dropout(self, q, k, v, mask, is_causal):
        """Attention with dropout on the probabilities, spelled out (SDPA's CPU kernels have no dropout
        and fall back to these steps). Causal attention runs in blocks of query rows, each against
        only the keys it may see: about half the work at T = 256, and each block's scores stay in the
        CPU cache through the softmax and the dropout (GPT-2 benchmark shape: 87 -> 57 ms a layer, forward
        and backward of the attention itself)."""
        if self.n_kv_heads != self.n_heads:
            k, v = (t.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1) for t in (k, v))
        q = q * (self.scale or q.shape[-1] ** -0.5)  # scaling q is cheaper than scaling the scores
        if not is_causal:
            return _attend(q, k, v, mask, self.dropout)
        T, blocks = q.shape[2], []
        for start in range(0, T, ATTENTION_BLOCK):
            end = min(start + ATTENTION_BLOCK, T)  # queries start..end-1 see keys 0..end-1
            mask = _causal_block(start, end, q.dtype, q.device)
            blocks.append(_attend(q[:, :, start:end], k[:, :, :end], v[:, :, :end], mask, self.dropout))
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=2)  # (B, H, T, D)

    def _keys_values(self, x, context, static):
        if static is not None and static.kv is not None:
            return static.kv
        src = x if context is None else context
        kv = self._heads(self.k_proj(src), self.n_kv_heads), self._heads(self.v_proj(src), self.n_kv_heads)
        if static is not None:
            static.kv = kv
        return kv


def _attend(q, k, v, mask, p: float) -> torch.Tensor:
    """dropout(softmax(q @ k.T + mask), p) @ v for (B, H, T, D) q and (B, H, S, D) k, v; q is already
    scaled. mask: None, bool (True = may attend) or additive float, broadcastable to (B, H, T, S)."""
    scores = q @ k.transpose(-2, -1)  # (B, H, T, S)
    if mask is not None:  # added in place: the product's backward does not need its output, and an
        # addition, unlike masked_fill, has no backward pass of its own over the scores
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device).masked_fill_(~mask, float("-inf"))
        scores.add_(mask)
    return dropout(scores.softmax(-1), p) @ v


def _causal_block(start: int, end: int, dtype, device) -> torch.Tensor:
    """The additive mask of queries start..end-1 over keys 0..end-1: (end - start, end), -inf on the
    keys after each query, 0 elsewhere."""
    return torch.full((end - start, end), float("-inf"), dtype=dtype, device=device).triu(start + 1)


def _prepend_prefix(prefix, k, v, mask, is_causal, q_len):
    """Put prefix keys/values (B, G, P, D) in front; every query may attend to all of them."""
    pk, pv = prefix
    k, v = torch.cat((pk.to(k.dtype), k), dim=2), torch.cat((pv.to(v.dtype), v), dim=2)
    n_prefix, key_len = pk.shape[2], k.shape[2] - pk.shape[2]
    if mask is None:
        mask = torch.ones(1, 1, q_len, key_len, dtype=torch.bool, device=k.device)
        if is_causal:
            mask = mask.tril(key_len - q_len)
    ones = torch.ones(*mask.shape[:-1], n_prefix, dtype=mask.dtype, device=mask.device)
    if mask.dtype != torch.bool:
        ones = torch.zeros_like(ones)  # additive float mask: 0 = allowed
    return k, v, torch.cat((ones, mask), dim=-1), False
