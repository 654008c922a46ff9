"""lmforge: build, pretrain, fine-tune, evaluate, compress and serve Transformer language models.

    >>> import lmforge
    >>> model, tokenizer = lmforge.load("smollm2")      # or a Hugging Face folder, a .gguf file
    >>> ids = torch.tensor([tokenizer.encode("The capital of France is")])
    >>> tokenizer.decode(model.generate(ids, max_new_tokens=8)[0])
"""

__version__ = "0.1.0"


def load(path_or_alias, architecture=None, dtype=None, device=None, **overrides):
    """Load `(model, tokenizer)` from a Hugging Face folder, a .gguf file, an alias or a hub id.

    See `lmforge.models.hub.load`; imported lazily so `lmforge --help` stays fast.
    """
    import torch

    from .models.hub import load as _load

    return _load(path_or_alias, architecture, dtype or torch.float32, device, **overrides)
