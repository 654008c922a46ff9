"""Model families. One file per family; each file provides the same names:

- `<Family>Config`: a dataclass with `from_hf(dict)` and `to_hf() -> dict` (transformers' config.json).
- `PRESETS`: name -> config (at least tiny / mini / small / base sizes).
- the modules and models; every model has `.config` and returns a tensor (logits or hidden states).
- `ARCHITECTURES`: transformers architecture name -> our model class (the first is the default).
- `from_hf_state_dict(state, config)` / `to_hf_state_dict(state, config)`: rename weights between
  transformers' names and ours (the same `q_proj k_proj v_proj o_proj` / `gate_proj up_proj down_proj`
  names in every family).
"""

from __future__ import annotations

import importlib
from types import ModuleType

# transformers `model_type` -> our module
FAMILIES = {"llama": "llama", "gpt2": "gpt", "bert": "bert", "t5": "t5"}


def family(model_type: str) -> ModuleType:
    """The module for a transformers `model_type` (e.g. "llama" -> lmforge.models.llama)."""
    if model_type not in FAMILIES:
        raise ValueError(f"unsupported model_type {model_type!r}; lmforge supports: {', '.join(FAMILIES)}")
    return importlib.import_module(f"{__name__}.{FAMILIES[model_type]}")


def all_presets() -> dict:
    """Every preset of every family: name -> (family module, config)."""
    out = {}
    for model_type in FAMILIES:
        module = family(model_type)
        out.update({name: (module, cfg) for name, cfg in module.PRESETS.items()})
    return out
