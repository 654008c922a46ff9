"""`lmforge finetune CONFIG [key=value ...]`: adapt a model to a labeled task, fully or with PEFT.

    labeled files --read_examples--> task (features, batches, loss, metrics)
    checkpoint (or preset) + the task's head --load_model--> model --peft.apply (optional)-->
      fit() (early stopping on train.metric, best weights kept) --> runs/<name>/:
        final/ (merged, Hugging Face layout), adapter/ (PEFT folder, PEFT runs), metrics, plots, report.md
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from . import pretrain
from .config import ConfigError, load_config, to_yaml
from .evaluate import TASK_FILE
from .train.loop import TrainConfig

# task kind -> model_type -> transformers architecture of the model to train
ARCHITECTURES = {
    "classify": {"bert": "BertForSequenceClassification", "gpt2": "GPT2ForSequenceClassification",
                 "llama": "LlamaForSequenceClassification"},
    "ner": {"bert": "BertForTokenClassification"},
    "qa": {"bert": "BertForQuestionAnswering"},
    "seq2seq": {"t5": "T5ForConditionalGeneration", "gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"},
    "chat": {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"},
}


@dataclass
class RunConfig(pretrain.RunConfig):
    name: str = "finetune"


@dataclass
class ModelConfig:
    path: str | None = None
    """The checkpoint to adapt: a Hugging Face folder, .gguf, alias (minilm, smollm2), hub id, or a
    run's `final/` folder."""
    preset: str | None = None
    """Or: train a fresh model of this preset (with `tokenizer`), e.g. a small T5 from scratch."""
    tokenizer: str | None = None
    """Tokenizer folder (default: the checkpoint's own). With `preset` and no tokenizer, one is
    trained on the training files (plain text: parallel data) into the run folder."""
    tokenizer_kind: Literal["bpe", "wordpiece", "unigram", "char"] = "unigram"
    vocab_size: int = 8000
    random_init: bool = False
    """Keep the checkpoint's architecture but start from random weights (what pretraining buys)."""
    overrides: dict = field(default_factory=dict)
    """Config fields to change, by transformers' config.json name or ours: {hidden_dropout_prob: 0.2}
    and {dropout: 0.2} are the same; an unknown name is an error."""


@dataclass
class DataConfig:
    train: str | None = None
    validation: str | None = None
    """Without it, `val_fraction` of the training examples are held out (a fixed, seeded choice)."""
    format: str | None = None
    """csv, tsv, jsonl, parquet, conll, squad, parallel, chat; None = from the file name/content."""
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None
    columns: dict = field(default_factory=dict)
    header: bool | None = None
    train_target: str | None = None
    """Parallel text: the target side of `train` (e.g. train.de for train.en)."""
    validation_target: str | None = None
    template: dict = field(default_factory=dict)
    """Turn table rows into chats: role -> text with {column} fields, e.g.
    {user: "Translate to Chinese: {en}", assistant: "{zh}"} (task.kind=chat)."""
    val_fraction: float = 0.1
    group_by: str | None = None
    """Without `validation`: hold out whole groups of examples sharing this field (SQuAD: title)."""
    limit: int = 0
    """Read at most this many training examples (0 = all)."""
    validation_limit: int = 0
    skip_bad_rows: bool = False
    seed: int = 0


@dataclass
class TaskConfig:
    kind: Literal["classify", "ner", "qa", "seq2seq", "chat"] = "classify"
    max_len: int | None = None
    eval_batch_size: int = 0
    problem: str | None = None
    """classify: single_label_classification, multi_label_classification or regression (None = from labels)."""
    options: dict = field(default_factory=dict)
    """Further options of the task's constructor (e.g. qa: {stride: 128}; seq2seq: {max_new_tokens: 64})."""


@dataclass
class PeftConfig:
    method: Literal["none", "lora", "adalora", "adapter", "prefix", "prompt", "ia3"] = "none"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    rslora: bool = False
    modules_to_save: list[str] | None = None
    """Trained fully and saved with the adapter; None = the task head (classifier, score, qa_outputs)."""
    options: dict = field(default_factory=dict)
    """Method-specific fields, e.g. adalora: {init_r: 12, target_r: 4}; adapter: {bottleneck: 64};
    prefix/prompt: {n_tokens: 20}."""


@dataclass
class FinetuneConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ------------------------------------------------------------------------------------------- data

def read_data(cfg: FinetuneConfig):
    """(train examples, validation examples)."""
    from .data.labeled import read_examples

    d = cfg.data
    if not d.train:
        raise ConfigError("data.train is not set: give the training file")
    common = {"format": d.format, "text_column": d.text_column, "text_pair_column": d.text_pair_column,
              "label_column": d.label_column, "columns": d.columns or None, "header": d.header,
              "skip_bad_rows": d.skip_bad_rows}
    train = read_examples(d.train, target_path=d.train_target, limit=d.limit or None, **common)
    _report_skipped(d.train, train)
    train = as_chats(train, d.template, d.train)
    if d.validation:
        val = read_examples(d.validation, target_path=d.validation_target, limit=d.validation_limit or None, **common)
        _report_skipped(d.validation, val)
        return train, as_chats(val, d.template, d.validation)
    train, val = hold_out(train, d.val_fraction, d.seed, d.group_by)
    if not train:
        raise ConfigError(f"{d.train}: nothing is left to train on after holding out data.val_fraction="
                          f"{d.val_fraction} (group_by={d.group_by}); read more rows (data.limit) or give data.validation")
    return train, val[: d.validation_limit or None]


def as_chats(rows, template: dict, path: str) -> list:
    """Rows as {"messages": [...]} by `data.template` (role -> "text with {column}"); unchanged without one."""
    if not template:
        return list(rows)
    chats = []
    for i, row in enumerate(rows):
        try:
            chats.append({"messages": [{"role": role, "content": text.format(**row)} for role, text in template.items()]})
        except KeyError as e:
            raise ConfigError(f"{path} example {i + 1}: data.template uses {{{e.args[0]}}} but the row has "
                              f"only {', '.join(row)}") from None
    return chats


def _report_skipped(path, examples) -> None:
    if getattr(examples, "skipped", None):
        print(f"{path}: skipped {len(examples.skipped)} bad rows, e.g. {examples.skipped[:3]}")


def hold_out(examples: list, fraction: float, seed: int, group_by: str | None = None) -> tuple[list, list]:
    """A fixed, seeded split of one file into (train, validation): `fraction` of the examples, or of
    the groups of examples sharing `group_by` (e.g. SQuAD's article "title": no article on both sides)."""
    import numpy as np

    if not 0 < fraction < 1:
        raise ConfigError(f"data.val_fraction must be between 0 and 1 without data.validation, got {fraction}")
    keys = [_group(e, group_by, i) for i, e in enumerate(examples)]
    groups = list(dict.fromkeys(keys))  # in order of first appearance
    order = np.random.default_rng(seed).permutation(len(groups))
    held = {groups[i] for i in order[: max(1, round(fraction * len(groups)))]}
    return [e for e, k in zip(examples, keys, strict=True) if k not in held], \
        [e for e, k in zip(examples, keys, strict=True) if k in held]


def _group(example, key: str | None, i: int):
    if key is None:
        return i
    if not isinstance(example, dict) or key not in example:
        raise ConfigError(f"data.group_by={key!r}: example {i + 1} has no such field")
    return example[key]


# ------------------------------------------------------------------------------------------ model

def task_class(kind: str):
    """The task class of `task.kind`."""
    if kind == "classify":
        from .tasks.classify import SequenceClassification as cls
    elif kind == "ner":
        from .tasks.ner import TokenClassification as cls
    elif kind == "qa":
        from .tasks.qa import QuestionAnswering as cls
    elif kind == "seq2seq":
        from .tasks.seq2seq import Seq2Seq as cls
    elif kind == "chat":
        from .tasks.chat import ChatSFT as cls
    else:
        raise ConfigError(f"task.kind={kind!r} is unknown; choose classify, ner, qa, seq2seq or chat")
    return cls


def build_task(cfg: FinetuneConfig, train, val, tokenizer):
    """The task object for `task.kind` over the examples."""
    t = cfg.task
    options = {**t.options, **({"problem": t.problem} if t.problem else {})}
    return task_class(t.kind)(train, val, tokenizer, max_len=t.max_len, batch_size=cfg.train.batch_size,
                              eval_batch_size=t.eval_batch_size, seed=cfg.train.seed, **options)


def task_settings(cfg: FinetuneConfig, task) -> dict:
    """What `lmforge evaluate/predict` need to rebuild the task for the exported model (task.json)."""
    options = dict(cfg.task.options)
    if getattr(task, "problem", None):
        options["problem"] = task.problem
    return {"kind": cfg.task.kind, "max_len": cfg.task.max_len, "options": options}


def head_overrides(task) -> dict:
    """config.json fields the task's head needs (transformers' names)."""
    labels = getattr(task, "labels", None)
    out = {}
    if getattr(task, "num_labels", None) is not None and labels is not None:
        out["num_labels"] = task.num_labels
        out["id2label"] = {str(i): name for i, name in enumerate(labels)}
        out["label2id"] = {name: i for i, name in enumerate(labels)}
    if getattr(task, "problem", None):
        out["problem_type"] = task.problem
    return out


def load_tokenizer_for(cfg: FinetuneConfig, folder: Path):
    """The checkpoint's tokenizer, `model.tokenizer`, or (preset without one) a new one trained on the
    training files into <run>/tokenizer."""
    from .models.hub import load_tokenizer
    from .tokenizer import Tokenizer, train_tokenizer

    m, d = cfg.model, cfg.data
    if m.preset and not m.tokenizer:
        out = folder / "tokenizer"
        if not (out / "tokenizer.json").is_file():
            files = [f for f in (d.train, d.train_target) if f]
            if d.format not in (None, "parallel") or not d.train_target:
                raise ConfigError("model.preset without model.tokenizer trains a tokenizer on plain-text "
                                  "training files (parallel data); give model.tokenizer for other formats")
            train_tokenizer(m.tokenizer_kind, files, m.vocab_size, output=out)
        return Tokenizer.from_dir(out)
    source = m.tokenizer or m.path
    if source is None:
        raise ConfigError("model.path (or model.preset) is not set")
    tokenizer = load_tokenizer(source)
    if tokenizer is None:
        raise ConfigError(f"{source} has no tokenizer files; set model.tokenizer")
    return tokenizer


def build_model(cfg: FinetuneConfig, task, tokenizer):
    """The model with the task's head: from the checkpoint (pretrained or re-initialised) or a preset."""
    from .models import all_presets, family
    from .models.hub import load_model, read_config, resolve, with_overrides

    overrides = {**head_overrides(task), **cfg.model.overrides}
    if cfg.model.preset:
        presets = all_presets()
        if cfg.model.preset not in presets:
            raise ConfigError(f"model.preset {cfg.model.preset!r} is unknown; choose one of: {', '.join(presets)}")
        module, preset = presets[cfg.model.preset]
        hf = {**preset.to_hf(), "vocab_size": pretrain.padded_vocab_size(tokenizer), **_special_ids(tokenizer)}
        return _fresh(module, cfg.task.kind, with_overrides(module, hf, overrides))
    path = resolve(cfg.model.path)
    model_type = "llama" if path.suffix == ".gguf" else read_config(path).get("model_type", "?")
    arch = _architecture(cfg.task.kind, model_type)
    if cfg.model.random_init:
        module = family(model_type)
        return _fresh(module, cfg.task.kind, with_overrides(module, read_config(path), overrides))
    return load_model(path, architecture=arch, **overrides)


def _fresh(module, kind: str, hf: dict):
    from .models.hub import module_config

    arch = _architecture(kind, hf["model_type"])
    return module.ARCHITECTURES[arch](module_config(module).from_hf(hf))


def _architecture(kind: str, model_type: str) -> str:
    table = ARCHITECTURES[kind]
    if model_type not in table:
        raise ConfigError(f"task.kind={kind} needs a {' or '.join(table)} model, got model_type {model_type!r}")
    return table[model_type]


def _special_ids(tokenizer) -> dict:
    """A fresh model's special ids from its tokenizer (T5 starts decoding from pad, as transformers)."""
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id,
           "decoder_start_token_id": tokenizer.pad_id}
    return {k: v for k, v in ids.items() if v is not None}


# ------------------------------------------------------------------------------------------- peft

HEADS = ("classifier", "score", "qa_outputs")


def apply_peft(model, cfg: PeftConfig, total_steps: int):
    """Apply the PEFT method in place (or wrap the model); returns (model, allocator or None)."""
    from . import peft

    if cfg.method == "none":
        return model, None
    keep = cfg.modules_to_save
    if keep is None:
        keep = [h for h in HEADS if hasattr(model, h)]
    opts = dict(cfg.options)
    if cfg.method == "lora":
        return peft.apply_lora(model, peft.LoraConfig(r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, targets=cfg.targets,
                                                      rslora=cfg.rslora, modules_to_save=keep, **opts)), None
    if cfg.method == "adalora":
        opts.setdefault("total_step", total_steps)
        allocator = peft.apply_adalora(model, peft.AdaLoraConfig(alpha=cfg.alpha, dropout=cfg.dropout,
                                                                 targets=cfg.targets, modules_to_save=keep, **opts))
        return model, allocator
    if cfg.method == "adapter":
        return peft.apply_adapters(model, peft.AdapterConfig(modules_to_save=keep, **opts)), None
    if cfg.method == "ia3":
        return peft.apply_ia3(model, peft.IA3Config(modules_to_save=keep, **opts)), None
    if cfg.method == "prefix":
        return peft.apply_prefix(model, peft.PrefixConfig(modules_to_save=keep, **opts)), None
    return peft.apply_prompt(model, peft.PromptConfig(modules_to_save=keep, **opts)), None


def export(model, cfg: FinetuneConfig, folder: Path, tokenizer, settings: dict) -> dict:
    """final/ (merged, Hugging Face layout, with task.json for `lmforge evaluate`) and, for PEFT runs,
    adapter/ (PEFT folder)."""
    from .models.hub import save
    from .peft import merge_adalora, merge_ia3, merge_lora, save_adapter

    written = {}
    method = cfg.peft.method
    if method != "none":
        save_adapter(model, folder / "adapter", base_model_name_or_path=cfg.model.path)
        written["adapter"] = str(folder / "adapter")
    merge = {"none": lambda m: m, "lora": merge_lora, "adalora": merge_adalora, "ia3": merge_ia3}.get(method)
    if merge is None:  # adapters/prefix/prompt add computation that cannot fold into the weights
        print(f"peft.method={method} cannot be merged into the base weights: the result is adapter/ "
              f"(load it with lmforge.peft.load_adapter on {cfg.model.path})")
        return written
    save(merge(model).cpu(), folder / "final", tokenizer, overwrite=True)
    _write_json(folder / "final" / TASK_FILE, settings)
    written["final"] = str(folder / "final")
    return written


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


# -------------------------------------------------------------------------------------------- run

def finetune(cfg: FinetuneConfig) -> dict:
    """Run a fine-tuning job; returns the final trainer state with the validation metrics."""
    from .train.checkpoint import latest_checkpoint
    from .train.distributed import init_distributed, shutdown
    from .train.logging import Run
    from .train.loop import fit
    from .train.report import write_report

    d = init_distributed(cfg.train.device)
    if d.enabled and cfg.train.distributed == "fsdp":  # the task metrics run unevenly sized shares per process
        raise ConfigError("train.distributed=fsdp is for pretraining; fine-tuning runs under torchrun with ddp "
                          "(train.distributed=ddp)")
    folder = Path(cfg.run.dir) / cfg.run.name
    run = Run(folder, main=d.main, resume=cfg.run.resume)
    run.write_text("config.yaml", to_yaml(cfg))
    started = time.time()
    train, val = read_data(cfg)
    tokenizer = load_tokenizer_for(cfg, folder)
    task = build_task(cfg, train, val, tokenizer)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, task, tokenizer)
    model, allocator = apply_peft(model, cfg.peft, cfg.train.max_steps)
    torch.manual_seed(cfg.train.seed + d.rank)
    resume_from = latest_checkpoint(folder) if cfg.run.resume else None
    state = fit(model, task, cfg.train, run, d, allocator=allocator, resume_from=resume_from)
    if d.main:
        summary = run_summary(cfg, model, state, time.time() - started)
        write_report(run, cfg, model, state, time.time() - started)  # before export merges adapters away
        state["exported"] = export(model, cfg, folder, tokenizer, task_settings(cfg, task))
        _write_json(folder / "summary.json", {**summary, "exported": state["exported"]})
    run.close()
    shutdown(d)
    return state


def run_summary(cfg: FinetuneConfig, model, state: dict, wall_seconds: float) -> dict:
    """The numbers `lmforge compare` tabulates (summary.json): parameters, time, memory, metrics."""
    params = {id(p): p for p in model.parameters()}.values()
    scores = {k: v for k, v in state.items() if isinstance(v, float) and k not in ("elapsed", "loss", "best")}
    return {"method": cfg.peft.method, "trainable_params": sum(p.numel() for p in params if p.requires_grad),
            "total_params": sum(p.numel() for p in params), "steps": state["step"],
            "wall_s": round(wall_seconds, 1), "train_s": round(state.get("elapsed", 0.0), 1),
            "peak_memory_mb": round(peak_memory_mb(), 1), "metric": cfg.train.metric, "best": state.get("best"),
            "best_step": state.get("best_step"), **scores}


def peak_memory_mb() -> float:
    """Peak memory of this process: CUDA's allocator peak on a GPU, else the resident set size."""
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def main(config_path: str, overrides: list[str], resume: bool = False) -> dict:
    """CLI entry: load the YAML + overrides strictly, then fine-tune."""
    cfg = load_config(FinetuneConfig, config_path, [*overrides, *(["run.resume=true"] if resume else [])])
    return finetune(cfg)

