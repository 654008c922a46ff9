"""Putting PEFT modules into a model: name-based replacement, freezing, modules to save.

Every method file uses `replace_modules(model, targets, make)`: a target `"q_proj"` matches every
module whose name is `q_proj` or ends with `.q_proj`; `"re:layers\\.[01]\\..*v_proj"` is a regular
expression matched against the whole name. A target that matches nothing is an error (PEFT
silently ignores partial misses, so a typo trains fewer layers than asked for).

The replacement modules keep the base layer's `weight`/`bias` under the same names, so the model's
state-dict keys do not change; `adapter_state_dict(model)` returns only what the method added
(plus `modules_to_save` heads trained in full, plus resized embeddings).

The method and its config are recorded on the model as `model.peft` (a `PeftState`), which is what
`lmforge.peft.io.save_adapter` writes next to the weights.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn


class AdapterModule(nn.Module):
    """Base of every module a PEFT method puts in the model. `base_keys` are the state-dict entries
    that belong to the base model (kept under the base layer's names); everything else is adapter."""

    base_keys: tuple[str, ...] = ("weight", "bias")


@dataclass
class PeftState:
    """What was applied to a model: the method name, its config, the adapted module names, and the
    vocabulary size of the base model (to notice added tokens when saving)."""

    method: str
    config: object
    modules: list[str] = field(default_factory=list)
    modules_to_save: list[str] = field(default_factory=list)
    base_vocab_size: int | None = None
    allocator: object = None  # AdaLoRA's RankAllocator


def matches(name: str, target: str) -> bool:
    """A target matches a module name equal to it or ending with `.target`; `re:PATTERN` matches
    the whole name as a regular expression."""
    if target.startswith("re:"):
        return re.fullmatch(target[3:], name) is not None
    return name == target or name.endswith("." + target)


def _available(model: nn.Module, kind: type) -> str:
    """The distinct last name parts of the model's `kind` layers, for error messages."""
    names = [n for n, m in model.named_modules() if isinstance(m, kind) and n]
    short = sorted({n.rsplit(".", 1)[-1] for n in names})
    example = f" (e.g. {names[0]})" if names else ""
    return f"available {kind.__name__} layers: {', '.join(short) or 'none'}{example}"


def find_modules(model: nn.Module, targets: list[str], kind: type = nn.Linear) -> list[str]:
    """Names of the `kind` modules matched by any target; ValueError listing every target that
    matched nothing, with the names that are available."""
    if isinstance(targets, str):
        targets = [targets]
    if not targets:
        raise ValueError(f"no target modules given; {_available(model, kind)}")
    found, missing = [], []
    candidates = [n for n, m in model.named_modules() if isinstance(m, kind) and n]
    for target in targets:
        hits = [n for n in candidates if matches(n, target)]
        if not hits:
            missing.append(target)
        found += [n for n in hits if n not in found]
    if missing:
        raise ValueError(f"target modules matched nothing: {', '.join(missing)}; {_available(model, kind)}")
    return [n for n in candidates if n in found]  # model order


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def replace_modules(model: nn.Module, targets: list[str], make: Callable[[str, nn.Module], nn.Module],
                    kind: type = nn.Linear) -> dict[str, nn.Module]:
    """Replace every `kind` module matched by `targets` with `make(name, module)`.

    Returns:
        {name: new module}, in model order.
    Raises:
        ValueError naming every target that matched nothing and the available layer names.
    """
    new = {}
    for name in find_modules(model, targets, kind):
        new[name] = make(name, get_module(model, name))
        set_module(model, name, new[name])
    return new


def freeze(model: nn.Module) -> None:
    """requires_grad=False on every parameter."""
    for p in model.parameters():
        p.requires_grad_(False)


def mark_trainable(model: nn.Module, modules_to_save: list[str] = ()) -> list[str]:
    """Freeze the base model: only adapter parameters and the modules in `modules_to_save` (trained
    in full, e.g. a new `classifier`/`score`/`qa_outputs` head) stay trainable.

    Returns:
        the resolved names of the modules to save.
    """
    saved = _find_any(model, list(modules_to_save)) if modules_to_save else []
    full = saved + resized_embeddings(model)  # new token rows must train too
    for name, p in model.named_parameters():
        p.requires_grad_(_is_adapter_param(model, name) or any(_under(name, m) for m in full))
    return saved


def _find_any(model: nn.Module, targets: list[str]) -> list[str]:
    """modules_to_save: any module kind, same matching and errors as the adapter targets."""
    return find_modules(model, targets, kind=nn.Module)


def _under(param_name: str, module_name: str) -> bool:
    return param_name.startswith(module_name + ".")


def _is_adapter_param(model: nn.Module, name: str) -> bool:
    """A parameter added by a PEFT method (not one of an AdapterModule's base keys)."""
    owner_name, _, leaf = name.rpartition(".")
    parts = owner_name.split(".") if owner_name else []
    for i in range(len(parts), -1, -1):  # the closest AdapterModule above the parameter decides
        module = model.get_submodule(".".join(parts[:i]))
        if isinstance(module, AdapterModule):
            rest = ".".join(parts[i:] + [leaf])
            return rest not in module.base_keys
    return False


def adapter_keys(model: nn.Module) -> list[str]:
    """State-dict keys added by the PEFT method (never the base model's)."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, AdapterModule):
            prefix = name + "." if name else ""
            out += [prefix + k for k in module.state_dict() if k not in module.base_keys]
    return out


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What the PEFT method trained, under the model's own key names: the adapter weights, the
    `modules_to_save` modules and, when the vocabulary grew, the resized embedding and head."""
    state = model.state_dict()
    keys = adapter_keys(model)
    peft = getattr(model, "peft", None)
    if peft is not None:
        extra = list(peft.modules_to_save) + resized_embeddings(model)
        keys += [k for k in state if any(_under(k, m) for m in extra) and k not in keys]
    return {k: state[k] for k in keys}


# ---------------------------------------------------------------------------------------- embeddings

def input_embedding(model: nn.Module) -> tuple[str, nn.Embedding]:
    """(name, module) of the token embedding: the first nn.Embedding with `vocab_size` rows."""
    vocab = model.config.vocab_size
    for name, m in model.named_modules():
        if isinstance(m, nn.Embedding) and m.num_embeddings == vocab:
            return name, m
    raise ValueError(f"{type(model).__name__} has no token embedding of {vocab} rows")


def output_embedding(model: nn.Module) -> tuple[str, nn.Linear] | None:
    """(name, module) of the language-model head, when the model has one."""
    head = getattr(model, "lm_head", None)
    return ("lm_head", head) if isinstance(head, nn.Linear) else None


def resize_token_embeddings(model: nn.Module, n: int) -> None:
    """Grow (or shrink) the token embedding and the LM head to `n` rows after adding tokens to the
    tokenizer. New rows start like transformers' (mean of the old rows). Ties are kept; the config's
    vocab_size follows. PEFT saving then includes the resized matrices (PEFT #1457)."""
    name, emb = input_embedding(model)
    old = emb.num_embeddings
    if not hasattr(model, "_base_vocab_size"):
        model._base_vocab_size = old  # what the base checkpoint has, whenever adapters are applied
    new = nn.Embedding(n, emb.embedding_dim, padding_idx=emb.padding_idx, device=emb.weight.device,
                       dtype=emb.weight.dtype)
    with torch.no_grad():
        new.weight[: min(n, old)] = emb.weight[: min(n, old)]
        new.weight[old:] = emb.weight.mean(0)
    new.weight.requires_grad_(emb.weight.requires_grad or getattr(model, "peft", None) is not None)
    head = output_embedding(model)
    tied = head is not None and head[1].weight is emb.weight
    set_module(model, name, new)
    model.config.vocab_size = n
    if head is not None:
        _resize_head(model, head[1], new, tied, old, n)


def _resize_head(model: nn.Module, head: nn.Linear, emb: nn.Embedding, tied: bool, old: int, n: int) -> None:
    linear = nn.Linear(head.in_features, n, bias=head.bias is not None, device=head.weight.device,
                       dtype=head.weight.dtype)
    if tied:
        linear.weight = emb.weight
    else:
        linear.weight.requires_grad_(emb.weight.requires_grad)
        with torch.no_grad():
            linear.weight[: min(n, old)] = head.weight[: min(n, old)]
            linear.weight[old:] = head.weight.mean(0)
    model.lm_head = linear


def resized_embeddings(model: nn.Module) -> list[str]:
    """Module names of the embedding (and untied head) when the vocabulary differs from the base
    model's: those must be saved with the adapter, or the adapter will not load on the base."""
    peft = getattr(model, "peft", None)
    if peft is None or peft.base_vocab_size is None:
        return []
    name, emb = input_embedding(model)
    if emb.num_embeddings == peft.base_vocab_size:
        return []
    head = output_embedding(model)
    return [name] + ([head[0]] if head is not None and head[1].weight is not emb.weight else [])


def enable_input_grads(model: nn.Module) -> None:
    """Make the embedding output require grad, so adapters train under gradient checkpointing with
    a frozen base (reentrant checkpoints only backpropagate into inputs that require grad)."""
    _, emb = input_embedding(model)
    if not getattr(emb, "_lmforge_input_grads", False):
        emb.register_forward_hook(lambda m, args, out: out.requires_grad_(True) if torch.is_grad_enabled() else out)
        emb._lmforge_input_grads = True


def check_fresh(model: nn.Module, modules_to_save: list[str] = ()) -> None:
    """Before changing anything: the model has no adapter yet and every module to save exists."""
    if getattr(model, "peft", None) is not None:
        raise ValueError(f"this model already has a {model.peft.method} adapter; start from the base model "
                         "(or merge the first adapter) before applying another")
    if modules_to_save:
        _find_any(model, list(modules_to_save))


def attach(model: nn.Module, method: str, config, modules: list[str], modules_to_save: list[str] = ()) -> PeftState:
    """Freeze everything but the adapters and `modules_to_save`, record the method on the model."""
    check_fresh(model)
    base_vocab = getattr(model, "_base_vocab_size", None) or _vocab(model)
    model.peft = PeftState(method, config, list(modules), base_vocab_size=base_vocab)
    model.peft.modules_to_save = mark_trainable(model, modules_to_save)
    try:
        enable_input_grads(model)
    except ValueError:
        pass  # no token embedding (a bare stack): nothing to hook
    return model.peft


def _vocab(model: nn.Module) -> int | None:
    try:
        return input_embedding(model)[1].num_embeddings
    except (ValueError, AttributeError):
        return None


def trainable_parameters(model: nn.Module) -> dict[str, int]:
    """{"trainable": n, "total": n} parameter counts (shared tensors counted once)."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return {"trainable": trainable, "total": total}
