"""Parameter-efficient fine-tuning: LoRA, AdaLoRA, bottleneck adapters, IA3, prefix and prompt tuning.

Every method is a file with the same verbs: `apply_<method>(model, cfg)`, `adapter_state_dict(model)`
and `merge_<method>(model)` where merging makes sense. `io.save_adapter` / `io.load_adapter` read and
write PEFT's adapter folders (transformers' module names), so adapters move between lmforge and PEFT.

    from lmforge.peft import LoraConfig, apply_lora, save_adapter
    apply_lora(model, LoraConfig(r=8, alpha=16, targets=["q_proj", "v_proj"]))
"""

from .adalora import AdaLoraConfig, RankAllocator, apply_adalora, merge_adalora
from .adapter import AdapterConfig, apply_adapters
from .ia3 import IA3Config, apply_ia3, merge_ia3
from .inject import (
           adapter_state_dict,
           mark_trainable,
           replace_modules,
           resize_token_embeddings,
           trainable_parameters,
)
from .io import load_adapter, save_adapter
from .lora import LoraConfig, apply_lora, merge_lora, unmerge_lora
from .prefix import PrefixConfig, PrefixModel, apply_prefix, collapse_prefix
from .prompt import PromptConfig, PromptModel, apply_prompt

__all__ = ["AdaLoraConfig", "AdapterConfig", "IA3Config", "LoraConfig", "PrefixConfig", "PrefixModel",
           "PromptConfig", "PromptModel", "RankAllocator", "adapter_state_dict", "apply_adalora", "apply_adapters",
           "apply_ia3", "apply_lora", "apply_prefix", "apply_prompt", "collapse_prefix", "load_adapter",
           "mark_trainable", "merge_adalora", "merge_ia3", "merge_lora", "replace_modules",
           "resize_token_embeddings", "save_adapter", "trainable_parameters", "unmerge_lora"]
