"""`lmforge info MODEL`: what a checkpoint is, without reading the code."""

from __future__ import annotations

from pathlib import Path

from .models.hub import family_of, load, resolve


def describe(name: str) -> dict:
    """A JSON-able summary: format, family, architecture, parameter count, config, tokenizer, files."""
    path = resolve(name)
    model, tokenizer = load(path)
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())  # tied counted once
    info = {
        "path": str(path),
        "format": "gguf" if path.suffix == ".gguf" else "huggingface",
        "family": family_of(model).__name__.rsplit(".", 1)[-1],
        "architecture": type(model).__name__,
        "parameters": params,
        "parameters_human": f"{params / 1e6:.1f}M",
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "config": model.config.to_hf(),
        "files": _files(path),
    }
    if tokenizer is not None:
        info["tokenizer"] = {
            "vocab_size": len(tokenizer),
            "special_tokens": {k: tokenizer.id_to_token(i) for k, i in _specials(tokenizer).items()},
            "chat_template": tokenizer.chat_template is not None,
        }
    return info


def _specials(tokenizer) -> dict:
    names = ("bos", "eos", "pad", "unk", "cls", "sep", "mask")
    return {n: getattr(tokenizer, f"{n}_id") for n in names if getattr(tokenizer, f"{n}_id", None) is not None}


def _files(path: Path) -> dict:
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    return {p.name: p.stat().st_size for p in files}
