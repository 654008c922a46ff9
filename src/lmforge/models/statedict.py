"""Renaming state-dict keys between lmforge's module names and Hugging Face's."""

from __future__ import annotations

import torch

# (hf_fragment, our_fragment) pairs of whole dotted name parts, e.g. (".self_attn.", ".attn.").
Renames = list[tuple[str, str]]


def rename(state: dict[str, torch.Tensor], renames: Renames, to_hf: bool = False) -> dict[str, torch.Tensor]:
    """Rename keys part by part; `to_hf=True` applies the pairs backwards (ours -> HF).

    Keys are matched with a leading "." so that a fragment like ".embed." never hits ".pos_embed.".
    """
    pairs = [(ours, hf) for hf, ours in reversed(renames)] if to_hf else renames
    out = {}
    for key, value in state.items():
        key = "." + key
        for old, new in pairs:
            key = key.replace(old, new)
        out[key[1:]] = value
    return out
