"""Sentence embeddings from encoder models (e.g. MiniLM): masked mean pooling, unit length."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data.collate import pad_sequences
from .models.bert import mean_pool


@torch.inference_mode()
def embed(model, tokenizer, texts: list[str], batch_size: int = 64) -> torch.Tensor:
    """Unit-length embeddings (N, C) of `texts`, as sentence-transformers computes them for MiniLM."""
    model.eval()
    max_len = model.config.max_len
    out = []
    for start in range(0, len(texts), batch_size):
        seqs = [s if len(s) <= max_len else s[: max_len - 1] + s[-1:]  # keep the final [SEP]
                for s in tokenizer.encode_batch(texts[start : start + batch_size])]
        ids, mask = pad_sequences(seqs, tokenizer.pad_id or 0)
        out.append(F.normalize(mean_pool(model(ids, mask), mask), dim=-1))
    return torch.cat(out)


def similarity(model, tokenizer, query: str, candidates: list[str]) -> list[tuple[float, str]]:
    """Cosine similarity of each candidate to the query, most similar first."""
    vectors = embed(model, tokenizer, [query, *candidates])
    scores = (vectors[1:] @ vectors[0]).tolist()
    return sorted(zip(scores, candidates), reverse=True)
