"""Adapters on disk in PEFT's folder format: `adapter_config.json` + `adapter_model.safetensors`.

Keys and module names are transformers' (e.g. `base_model.model.model.layers.0.self_attn.q_proj.
lora_A.weight` for Llama), so `peft.PeftModel.from_pretrained(hf_model, folder)` loads what we
save, and `load_adapter` loads what PEFT saves. The names come from each family's own
`to_hf_state_dict`, run on tiny marker tensors (one distinct value per weight): where a marker
lands tells the transformers name, whether the weight is stored transposed (GPT-2's Conv1D, PEFT's
`fan_in_fan_out`) and which weights transformers fuses into one (GPT-2's q/k/v in `c_attn`).

A LoRA on fused q and v becomes ONE LoRA on `c_attn`, block-structured:

    lora_A = [A_q; A_v]                      (r_q + r_v, C)
    lora_B = [[B_q·f_q, 0], [0, 0], [0, B_v·f_v]]    (3C, r_q + r_v)   rows q | k | v
    PEFT's scale s = lora_alpha / (r_q + r_v)   (/ sqrt(r_q + r_v) with rsLoRA)

With s equal to our first block's scale, f_i = s_i / s (1 when every block has the same scale),
so lora_alpha = s · (r_q + r_v): 2·alpha for two blocks of rank r (alpha·sqrt(2) with rsLoRA).
How we split it back is kept in the safetensors metadata; a PEFT-written c_attn LoRA loads as
q/k/v LoRAs sharing its A (each gets its rows of B), which is the same function.

Prefix and prompt tuning save PEFT's `prompt_embeddings`; bottleneck adapters (no PEFT
equivalent) use the same folder layout with `peft_type` "LMFORGE_ADAPTER".
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..models.hub import family_of
from . import adalora, adapter, ia3, lora, prefix, prompt
from .inject import adapter_keys, get_module, input_embedding, resize_token_embeddings, resized_embeddings

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_TYPES = {"lora": "LORA", "adalora": "ADALORA", "ia3": "IA3", "prefix": "PREFIX_TUNING",
              "prompt": "PROMPT_TUNING", "adapter": "LMFORGE_ADAPTER"}
TASK_TYPES = [("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
              ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS"),
              ("ForConditionalGeneration", "SEQ_2_SEQ_LM")]
WRAPPERS = (prefix.PrefixModel, prompt.PromptModel)


# ------------------------------------------------------------------------------------- the name map

@dataclass
class Slot:
    """Where one of our linear layers lives in the transformers model."""

    hf: str  # transformers module name
    index: int  # position among the layers fused into `hf` (0 when not fused)
    parts: list[str]  # our layers fused into `hf`, in order (just this one when not fused)
    transposed: bool  # transformers stores (in, out): GPT-2's Conv1D, PEFT's fan_in_fan_out


def base_of(model: nn.Module) -> nn.Module:
    """The model itself, or the one inside a prefix/prompt wrapper."""
    return model.model if isinstance(model, WRAPPERS) else model


def hf_names(model: nn.Module) -> tuple[dict[str, Slot], dict[str, str]]:
    """({our linear layer: Slot}, {our state-dict key: transformers key} for unfused tensors), found by
    running the family's `to_hf_state_dict` on markers (a (1, 2) tensor per weight holding its index)."""
    skip = set(adapter_keys(model))
    keys = [k for k, v in model.state_dict().items() if k not in skip and v.ndim in (1, 2)]
    state = model.state_dict()
    markers = {k: torch.full((1, 2) if state[k].ndim == 2 else (1,), float(i)) for i, k in enumerate(keys)}
    slots, key_map = {}, {}
    for hf_key, t in family_of(model).to_hf_state_dict(markers, model.config).items():
        ids, transposed = _marker_ids(t)
        if len(ids) == 1:
            key_map[keys[ids[0]]] = hf_key
        ours = [keys[i] for i in ids]
        if hf_key.endswith(".weight") and all(k.endswith(".weight") for k in ours):
            parts = [k[: -len(".weight")] for k in ours]
            for j, name in enumerate(parts):
                slots[name] = Slot(hf_key[: -len(".weight")], j, parts, transposed)
    return slots, key_map


def _marker_ids(t: torch.Tensor) -> tuple[list[int], bool]:
    """Which markers a converted tensor holds, and whether it was transposed."""
    if t.ndim == 1:
        return [int(v) for v in t], False
    if t.shape[0] == 1 and t.shape[1] == 2:
        return [int(t[0, 0])], False
    if t.shape[0] == 2:  # (in, out...) transposed; fused along the output columns
        return [int(v) for v in t[0]], True
    return [int(v) for v in t[:, 0]], False  # fused along the output rows


def _task_type(model: nn.Module) -> str:
    name = next((n for n, cls in family_of(model).ARCHITECTURES.items() if type(model) is cls), type(model).__name__)
    return next((task for suffix, task in TASK_TYPES if name.endswith(suffix)), "FEATURE_EXTRACTION")


def _unique_suffix(name: str, chosen: set[str], all_names: set[str]) -> str:
    """The shortest dotted suffix of `name` that PEFT's target matching resolves to chosen modules only."""
    parts = name.split(".")
    for k in range(1, len(parts) + 1):
        suffix = ".".join(parts[-k:])
        if all(n in chosen for n in all_names if n == suffix or n.endswith("." + suffix)):
            return suffix
    return name


def _module_names(key_map: dict[str, str]) -> set[str]:
    names = set()
    for hf_key in key_map.values():
        parts = hf_key.split(".")[:-1]
        names.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return names


# ------------------------------------------------------------------------------------------- saving

def save_adapter(model: nn.Module, folder: str | os.PathLike, base_model_name_or_path: str | None = None,
                 task_type: str | None = None) -> Path:
    """Write the adapter of `model` (what `apply_*` added, modules_to_save, resized embeddings) as a
    PEFT folder. Raises if AdaLoRA's allocator was never stepped during training."""
    peft = getattr(model, "peft", None)
    if peft is None:
        raise ValueError("this model has no adapter: apply a PEFT method (lmforge.peft.apply_lora, ...) first")
    if peft.allocator is not None:
        peft.allocator.check()
    base = base_of(model)
    slots, key_map = hf_names(base)
    tensors, config, extra = WRITERS[peft.method](model, slots, key_map)
    root = "base_model." if isinstance(model, WRAPPERS) else "base_model.model."
    tensors.update(_full_modules(model, key_map, root))
    empty = [k for k, v in tensors.items() if v.numel() == 0]
    if not tensors or empty:  # PEFT #453: sharded (FSDP) parameters saved without gathering them
        raise ValueError(f"the adapter has empty tensors ({empty[:3]}); with FSDP, gather the full state "
                         "(unshard the model) before saving")
    config = {"peft_type": PEFT_TYPES[peft.method], "task_type": task_type or _task_type(base),
              "base_model_name_or_path": base_model_name_or_path, "inference_mode": True, "revision": None,
              "modules_to_save": _hf_modules(peft.modules_to_save, model, key_map) or None, **config}
    meta = {"format": "pt", "lmforge": json.dumps({"method": peft.method, "config": asdict(peft.config),
                                                   "base_vocab_size": peft.base_vocab_size, **extra})}
    return _write(Path(folder), config, tensors, meta)


def _write(folder: Path, config: dict, tensors: dict, meta: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{WEIGHTS}.tmp"
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=meta)
    tmp.replace(folder / WEIGHTS)
    tmp = folder / f".{CONFIG}.tmp"
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tmp.replace(folder / CONFIG)
    return folder


def _our_name(model: nn.Module, name: str) -> str:
    """A module name of a wrapper, relative to the base model."""
    return name.removeprefix("model.") if isinstance(model, WRAPPERS) else name


def _hf_modules(names: list[str], model: nn.Module, key_map: dict[str, str]) -> list[str]:
    """transformers names of whole modules (modules_to_save)."""
    out = []
    for name in names:
        name = _our_name(model, name)
        ours, hf = next(((k, v) for k, v in key_map.items() if k.startswith(name + ".")), (None, None))
        if hf is None:
            raise ValueError(f"module {name} has no transformers counterpart to save it under (a tied head? "
                             "save the embedding it is tied to instead)")
        out.append(hf[: len(hf) - len(ours) + len(name)])  # e.g. "classifier.weight" -> "classifier"
    return out


def _full_modules(model: nn.Module, key_map: dict[str, str], root: str) -> dict[str, torch.Tensor]:
    """modules_to_save and resized embeddings, whole, under transformers names."""
    names = [_our_name(model, n) for n in model.peft.modules_to_save + resized_embeddings(model)]
    state = base_of(model).state_dict()
    out = {}
    for key, value in state.items():
        if any(key.startswith(n + ".") for n in names):
            if key not in key_map:
                raise ValueError(f"{key} is fused or tied in transformers' layout; it cannot be saved on its own")
            out[root + key_map[key]] = value
    return out


def _pattern_config(ranks: dict[str, int], alphas: dict[str, float], slots_hf: set[str],
                    key_map: dict[str, str]) -> dict:
    """r / lora_alpha (the most common), target_modules (shortest unambiguous transformers names),
    rank_pattern / alpha_pattern for modules that differ."""
    r, alpha = Counter(zip(ranks.values(), alphas.values())).most_common(1)[0][0]
    all_names = _module_names(key_map) | slots_hf
    targets = sorted({_unique_suffix(n, set(ranks), all_names) for n in ranks})
    return {"r": r, "lora_alpha": alpha, "target_modules": targets,
            "rank_pattern": {n: v for n, v in ranks.items() if v != r},
            "alpha_pattern": {n: v for n, v in alphas.items() if v != alpha}}


def _groups(modules: dict[str, nn.Module], slots: dict[str, Slot]) -> dict[str, list[tuple[str, nn.Module]]]:
    """Our adapted layers grouped by the transformers layer they live in (in fused order)."""
    groups: dict[str, list] = {}
    for name, m in modules.items():
        if name not in slots:
            raise ValueError(f"{name} has no transformers counterpart; cannot save it in PEFT's format")
        groups.setdefault(slots[name].hf, []).append((name, m))
    for items in groups.values():
        items.sort(key=lambda item: slots[item[0]].index)
    return groups


def _rows(base: nn.Module, slots: dict[str, Slot], name: str) -> slice:
    """Output rows of our layer `name` inside its (possibly fused) transformers layer."""
    slot = slots[name]
    sizes = [get_module(base, p).out_features for p in slot.parts]
    start = sum(sizes[: slot.index])
    return slice(start, start + sizes[slot.index])


def _out_total(base: nn.Module, slot: Slot) -> int:
    return sum(get_module(base, p).out_features for p in slot.parts)


def _write_lora(model, slots, key_map):
    cfg, base = model.peft.config, base_of(model)
    tensors, ranks, alphas, fused = {}, {}, {}, {}
    for hf, items in _groups(lora.lora_modules(model), slots).items():
        scale = items[0][1].scale
        A = torch.cat([m.lora_a.weight for _, m in items])  # (R, in)
        B = A.new_zeros(_out_total(base, slots[items[0][0]]), A.shape[0])  # (out, R), block structured
        col = 0
        for name, m in items:
            B[_rows(base, slots, name), col : col + m.r] = m.lora_b.weight * (m.scale / scale)
            fused.setdefault(hf, []).append([name, col, col + m.r, m.scale / scale])
            col += m.r
        R = A.shape[0]
        ranks[hf], alphas[hf] = R, scale * (math.sqrt(R) if cfg.rslora else R)
        tensors[f"base_model.model.{hf}.lora_A.weight"] = A
        tensors[f"base_model.model.{hf}.lora_B.weight"] = B
    config = {**_pattern_config(ranks, alphas, set(ranks), key_map), "lora_dropout": cfg.dropout,
              "fan_in_fan_out": _fan_in_fan_out(slots, ranks), "use_rslora": cfg.rslora, "bias": "none",
              "init_lora_weights": True if cfg.init == "kaiming" else "gaussian", "use_dora": False,
              "layers_to_transform": None, "layers_pattern": None}
    return tensors, config, {"fused": fused}


def _fan_in_fan_out(slots: dict[str, Slot], hf_modules) -> bool:
    kinds = {s.transposed for s in slots.values() if s.hf in hf_modules}
    if len(kinds) > 1:
        raise ValueError("the adapted layers mix transposed (Conv1D) and plain linear layers in transformers' "
                         "layout; PEFT's single fan_in_fan_out flag cannot describe them: adapt fewer layers")
    return kinds == {True}


def _write_adalora(model, slots, key_map):
    cfg, base = model.peft.config, base_of(model)
    tensors, fused, ranks = {}, {}, {}
    for hf, items in _groups(adalora.svd_modules(model), slots).items():
        first = items[0][1]
        A = torch.cat([m.lora_A for _, m in items])
        E = torch.cat([m.lora_E for _, m in items])
        B = A.new_zeros(_out_total(base, slots[items[0][0]]), A.shape[0])
        col = 0
        for name, m in items:
            r = m.lora_A.shape[0]
            B[_rows(base, slots, name), col : col + r] = m.lora_B * (m.scale / first.scale)
            fused.setdefault(hf, []).append([name, col, col + r, m.scale / first.scale])
            col += r
        p = f"base_model.model.{hf}"
        tensors.update({f"{p}.lora_A": A, f"{p}.lora_E": E, f"{p}.lora_B": B, f"{p}.ranknum": first.ranknum})
        ranks[hf] = A.shape[0]
    targets = sorted({_unique_suffix(n, set(ranks), _module_names(key_map) | set(ranks)) for n in ranks})
    config = {"r": cfg.init_r, "init_r": cfg.init_r, "target_r": cfg.target_r, "lora_alpha": cfg.alpha,
              "lora_dropout": cfg.dropout, "target_modules": targets, "tinit": cfg.tinit, "tfinal": cfg.tfinal,
              "deltaT": cfg.delta_t, "beta1": cfg.beta1, "beta2": cfg.beta2, "orth_reg_weight": cfg.orth_reg_weight,
              "total_step": cfg.total_step, "rank_pattern": None,  # pruned ranks are zeros in lora_E
              "fan_in_fan_out": _fan_in_fan_out(slots, ranks), "bias": "none"}
    return tensors, config, {"fused": fused}


def _write_ia3(model, slots, key_map):
    base, tensors, feedforward = base_of(model), {}, set()
    for hf, items in _groups(ia3.ia3_modules(model), slots).items():
        if items[0][1].feedforward:
            if len(items) > 1 or len(slots[items[0][0]].parts) > 1:
                raise ValueError(f"{hf}: a fused transformers layer cannot take an IA3 input scaling")
            vector = items[0][1].ia3_l
            feedforward.add(hf)
        else:
            vector = items[0][1].ia3_l.new_ones(_out_total(base, slots[items[0][0]]), 1)  # unadapted parts: 1
            for name, m in items:
                vector[_rows(base, slots, name)] = m.ia3_l
        tensors[f"base_model.model.{hf}.ia3_l"] = vector
    hf_all = {k[len("base_model.model."): -len(".ia3_l")] for k in tensors}
    all_names = _module_names(key_map) | hf_all
    config = {"target_modules": sorted({_unique_suffix(n, hf_all, all_names) for n in hf_all}),
              "feedforward_modules": sorted({_unique_suffix(n, feedforward, all_names) for n in feedforward}),
              "fan_in_fan_out": _fan_in_fan_out(slots, hf_all), "init_ia3_weights": True}
    return tensors, config, {}


def _write_adapter(model, slots, key_map):
    tensors = {}
    groups = _groups({n: m for n, m in model.named_modules() if isinstance(m, adapter.BottleneckAdapter)}, slots)
    for hf, items in groups.items():
        for key, value in items[0][1].state_dict().items():
            if key.startswith("adapter_"):
                tensors[f"base_model.model.{hf}.{key}"] = value
    all_names = _module_names(key_map)
    return tensors, {"target_modules": sorted({_unique_suffix(n, set(groups), all_names) for n in groups})}, {}


def _prompt_learning_config(model, n_tokens: int, token_dim: int, n_heads: int) -> dict:
    c = model.config
    return {"num_virtual_tokens": n_tokens, "token_dim": token_dim, "num_attention_heads": n_heads,
            "num_layers": c.n_layers, "num_transformer_submodules": 1}


def _write_prefix(model, slots, key_map):
    enc = model.prefix_encoder
    P, _, G, D = enc.shape
    tensors = {"prompt_embeddings": enc().detach()}  # collapsed: what PEFT saves
    tensors.update({f"lmforge.prefix_encoder.{k}": v for k, v in enc.state_dict().items()})  # for resuming
    cfg = model.peft.config
    config = {**_prompt_learning_config(model, P, G * D, G), "prefix_projection": cfg.projection,
              "encoder_hidden_size": cfg.hidden}
    return tensors, config, {}


def _write_prompt(model, slots, key_map):
    w = model.prompt.embedding.weight
    attn_heads = getattr(model.config, "n_heads", 1)
    config = {**_prompt_learning_config(model, w.shape[0], w.shape[1], attn_heads), "prompt_tuning_init": "RANDOM"}
    return {"prompt_embeddings": w}, config, {}


WRITERS = {"lora": _write_lora, "adalora": _write_adalora, "ia3": _write_ia3, "adapter": _write_adapter,
           "prefix": _write_prefix, "prompt": _write_prompt}


# ------------------------------------------------------------------------------------------ loading

def read_adapter(folder: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor], dict | None]:
    """(adapter_config.json, tensors, lmforge metadata or None) of an adapter folder."""
    folder = Path(folder)
    if not (folder / CONFIG).is_file():
        raise FileNotFoundError(f"{folder}: no {CONFIG} (is this a PEFT adapter folder?)")
    config = json.loads((folder / CONFIG).read_text())
    path = folder / WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {WEIGHTS} (adapters saved as .bin are not supported; re-save "
                                "them with safe_serialization=True)")
    with safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
        meta = (f.metadata() or {}).get("lmforge")
    return config, tensors, json.loads(meta) if meta else None


def load_adapter(model: nn.Module, folder: str | os.PathLike, trainable: bool = True) -> nn.Module:
    """Apply the adapter saved in `folder` (by lmforge or by PEFT) to the base `model` and load its weights.

    Returns:
        the adapted model: `model` itself for LoRA/AdaLoRA/IA3/adapters (AdaLoRA's allocator is
        `model.peft.allocator`), a PrefixModel/PromptModel for prefix/prompt tuning. With
        `trainable=False` every parameter is frozen (inference).
    """
    config, tensors, meta = read_adapter(folder)
    kind = config.get("peft_type")
    if kind not in READERS:
        raise ValueError(f"{folder}: peft_type {kind!r} is not supported; supported: {', '.join(READERS)}")
    if getattr(model, "peft", None) is not None:
        raise ValueError("load_adapter needs the base model, but this one already has an adapter")
    root = "base_model." if kind in ("PREFIX_TUNING", "PROMPT_TUNING") else "base_model.model."
    _resize_for(model, tensors, root)
    slots, key_map = hf_names(model)
    model = READERS[kind](model, config, tensors, meta, slots, key_map)
    _load_full_modules(model, tensors, key_map, root)
    if not trainable:
        for p in model.parameters():
            p.requires_grad_(False)
    return model


def _resize_for(model: nn.Module, tensors: dict, root: str) -> None:
    """Grow the vocabulary first when the adapter carries a resized embedding (added tokens)."""
    _, key_map = hf_names(model)
    emb_key = input_embedding(model)[0] + ".weight"
    saved = tensors.get(root + key_map.get(emb_key, emb_key))
    if saved is not None and saved.shape[0] != model.config.vocab_size:
        resize_token_embeddings(model, saved.shape[0])


def _load_full_modules(model: nn.Module, tensors: dict, key_map: dict[str, str], root: str) -> None:
    """Copy modules_to_save / embedding tensors into the model."""
    to_ours = {hf: ours for ours, hf in key_map.items()}
    base = base_of(model)
    state = base.state_dict()
    with torch.no_grad():
        for key, value in tensors.items():
            hf = key.removeprefix(root)
            if key.startswith(root) and hf in to_ours:
                state[to_ours[hf]].copy_(value)


def _adapted(tensors: dict, suffix: str) -> dict[str, torch.Tensor]:
    """{transformers module: tensor} of the keys `base_model.model.<module>.<suffix>`."""
    root = "base_model.model."
    return {k[len(root): -len(suffix) - 1]: v for k, v in tensors.items() if k.startswith(root) and k.endswith(suffix)}


def _parts_of(slots: dict[str, Slot]) -> dict[str, list[str]]:
    """{transformers module: our layers fused into it}."""
    out = {}
    for s in slots.values():
        out[s.hf] = s.parts
    return out


def _pattern(patterns: dict, name: str, default):
    """PEFT's rank/alpha pattern lookup: a key matches a module name ending with it (regex)."""
    return next((v for k, v in (patterns or {}).items() if re.match(rf"(.*\.)?({k})$", name)), default)


def _modules_to_save(config: dict, meta: dict | None, key_map: dict[str, str]) -> list[str]:
    if meta is not None:
        return meta["config"].get("modules_to_save", [])
    names = []
    hf_to_ours = {hf.rsplit(".", 1)[0]: ours.rsplit(".", 1)[0] for ours, hf in key_map.items()}
    for name in config.get("modules_to_save") or []:
        names += [ours for hf, ours in hf_to_ours.items() if hf == name or hf.endswith("." + name)]
    return sorted(set(names))


def _read_lora(model, config, tensors, meta, slots, key_map):
    As, Bs = _adapted(tensors, "lora_A.weight"), _adapted(tensors, "lora_B.weight")
    parts = _parts_of(slots)
    _check_known(As, parts)
    if meta is not None:
        cfg = lora.LoraConfig(**meta["config"])
    else:
        ranks, alphas = {}, {}
        for hf, A in As.items():
            for name in parts[hf]:
                ranks[name] = A.shape[0]
                alphas[name] = _pattern(config.get("alpha_pattern"), hf, config["lora_alpha"])
        cfg = lora.LoraConfig(r=config["r"], alpha=config["lora_alpha"], dropout=config.get("lora_dropout", 0.0),
                              targets=sorted(ranks), rslora=config.get("use_rslora", False),
                              modules_to_save=_modules_to_save(config, meta, key_map),
                              rank_pattern=ranks, alpha_pattern=alphas)
    lora.apply_lora(model, cfg)
    fused = (meta or {}).get("fused", {})
    with torch.no_grad():
        for hf, A in As.items():
            for name, c0, c1, factor in fused.get(hf) or [[n, 0, A.shape[0], 1.0] for n in parts[hf]]:
                m = get_module(model, name)
                m.lora_a.weight.copy_(A[c0:c1])
                m.lora_b.weight.copy_(Bs[hf][_rows(model, slots, name), c0:c1] / factor)
    return model


def _check_known(found: dict, parts: dict) -> None:
    unknown = [hf for hf in found if hf not in parts]
    if unknown:
        raise ValueError(f"adapter weights for modules this model does not have: {unknown[:5]} (an adapter for "
                         "another architecture?)")


def _read_adalora(model, config, tensors, meta, slots, key_map):
    As, Es, Bs = (_adapted(tensors, s) for s in ("lora_A", "lora_E", "lora_B"))
    parts = _parts_of(slots)
    _check_known(As, parts)
    if meta is not None:
        cfg = adalora.AdaLoraConfig(**meta["config"])
    else:
        init_r = config.get("init_r", 12)
        cfg = adalora.AdaLoraConfig(total_step=config["total_step"], init_r=init_r,
                                    target_r=config.get("target_r", 8), alpha=config.get("lora_alpha", 8),
                                    dropout=config.get("lora_dropout", 0.0),
                                    targets=sorted(n for hf in As for n in parts[hf]),
                                    tinit=config.get("tinit", 0), tfinal=config.get("tfinal", 0),
                                    delta_t=config.get("deltaT", 1), beta1=config.get("beta1", 0.85),
                                    beta2=config.get("beta2", 0.85), orth_reg_weight=config.get("orth_reg_weight", 0.5),
                                    modules_to_save=_modules_to_save(config, meta, key_map))
    adalora.apply_adalora(model, cfg)
    fused = (meta or {}).get("fused", {})
    with torch.no_grad():
        for hf, A in As.items():
            for name, c0, c1, factor in fused.get(hf) or [[n, 0, A.shape[0], 1.0] for n in parts[hf]]:
                m = get_module(model, name)
                m.lora_A.copy_(A[c0:c1])
                m.lora_E.copy_(Es[hf][c0:c1])
                m.lora_B.copy_(Bs[hf][_rows(model, slots, name), c0:c1] / factor)
    return model


def _read_ia3(model, config, tensors, meta, slots, key_map):
    vectors, parts = _adapted(tensors, "ia3_l"), _parts_of(slots)
    _check_known(vectors, parts)
    if meta is not None:
        cfg = ia3.IA3Config(**meta["config"])
    else:
        names = sorted(n for hf in vectors for n in parts[hf])
        ff = [n for hf, v in vectors.items() for n in parts[hf] if v.shape[0] == 1 and v.shape[1] != 1]
        cfg = ia3.IA3Config(targets=names, feedforward=ff, modules_to_save=_modules_to_save(config, meta, key_map))
    ia3.apply_ia3(model, cfg)
    with torch.no_grad():
        for name, m in ia3.ia3_modules(model).items():
            v = vectors[slots[name].hf]
            m.ia3_l.copy_(v if m.feedforward else v[_rows(model, slots, name)])
    return model


def _read_adapter(model, config, tensors, meta, slots, key_map):
    if meta is None:
        raise ValueError("LMFORGE_ADAPTER folders are written by lmforge; this one has no lmforge metadata")
    adapter.apply_adapters(model, adapter.AdapterConfig(**meta["config"]))
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, adapter.BottleneckAdapter):
                for key, value in m.state_dict().items():
                    if key.startswith("adapter_"):
                        value.copy_(tensors[f"base_model.model.{slots[name].hf}.{key}"])
    return model


def _read_prefix(model, config, tensors, meta, slots, key_map):
    own = {k.removeprefix("lmforge.prefix_encoder."): v for k, v in tensors.items() if k.startswith("lmforge.")}
    projection = bool(own) and config.get("prefix_projection", False)
    cfg = prefix.PrefixConfig(n_tokens=config["num_virtual_tokens"], projection=projection,
                              hidden=config.get("encoder_hidden_size", 512),
                              modules_to_save=_modules_to_save(config, meta, key_map))
    wrapper = prefix.apply_prefix(model, cfg)
    if projection:
        wrapper.prefix_encoder.load_state_dict(own)
    else:
        wrapper.prefix_encoder.embedding.weight.data.copy_(tensors["prompt_embeddings"])
    return wrapper


def _read_prompt(model, config, tensors, meta, slots, key_map):
    cfg = prompt.PromptConfig(n_tokens=config["num_virtual_tokens"],
                              modules_to_save=_modules_to_save(config, meta, key_map))
    wrapper = prompt.apply_prompt(model, cfg)
    wrapper.prompt.embedding.weight.data.copy_(tensors["prompt_embeddings"])
    return wrapper


READERS = {"LORA": _read_lora, "ADALORA": _read_adalora, "IA3": _read_ia3, "LMFORGE_ADAPTER": _read_adapter,
           "PREFIX_TUNING": _read_prefix, "PROMPT_TUNING": _read_prompt}
