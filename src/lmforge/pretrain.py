"""`lmforge pretrain CONFIG [key=value ...]`: self-supervised training on unlabeled text.

    corpus --(tokenizer: given, or trained on the corpus)--> token shards --> model (preset or checkpoint)
      --> fit() with the objective (clm | mlm | span) --> runs/<name>/ (metrics, plots, report, checkpoints)
      --> runs/<name>/final/ (Hugging Face layout: loads in transformers)

The same command runs on one CPU or under `torchrun --nproc-per-node N -m lmforge pretrain CONFIG`.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from .config import ConfigError, load_config, to_yaml
from .train.loop import TrainConfig


@dataclass
class RunConfig:
    name: str = "pretrain"
    dir: str = "runs"
    """Runs are folders: the run lives in `dir/name`."""
    resume: bool = False
    """Continue from the newest checkpoint in the run folder (exactly: model, optimizer, RNG, data)."""


@dataclass
class ModelConfig:
    preset: str | None = None
    """A preset from lmforge.models (e.g. gpt-char-cpu, llama-mini, bert-small, t5-tiny)."""
    init_from: str | None = None
    """Continue pretraining a checkpoint (Hugging Face folder, .gguf or alias) instead of a preset."""
    overrides: dict = field(default_factory=dict)
    """Config fields to change, e.g. {dropout: 0.1, n_layers: 6}; vocab_size follows the tokenizer."""


@dataclass
class DataConfig:
    inputs: list[str] = field(default_factory=list)
    """Text/JSONL/Parquet files or folders; prepared into token shards inside the run folder."""
    prepared: str | None = None
    """Or: a folder written by `lmforge data prepare` (then `inputs` and the tokenizer options are unused)."""
    tokenizer: str | None = None
    """A tokenizer folder; without it one is trained on `inputs` (kind and vocab_size below)."""
    tokenizer_kind: Literal["bpe", "wordpiece", "unigram", "char"] = "bpe"
    vocab_size: int = 8000
    text_field: str = "text"
    val_fraction: float = 0.005
    val_split: Literal["documents", "tail"] = "documents"
    """documents: a random set of whole documents; tail: the last val_fraction of the token stream."""
    doc_sep: Literal["none", "blank-line", "line"] = "none"
    segments: Literal["none", "lines", "sentences"] = "none"
    """Record sentence/line starts (BERT's next-sentence prediction needs them)."""


@dataclass
class TaskConfig:
    objective: Literal["clm", "mlm", "span"] = "clm"
    """clm: next-token prediction (GPT-2, Llama); mlm: masked LM + next-sentence prediction (BERT);
    span: T5 span corruption."""
    seq_len: int = 256
    eval_batch_size: int = 0
    """0 = the training batch size."""
    mlm_probability: float = 0.15
    whole_word: bool = False
    nsp: bool = True
    noise_density: float = 0.15
    mean_span_length: float = 3.0


@dataclass
class PretrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


ARCHITECTURE = {  # objective -> the model class name (transformers' name) it trains
    ("clm", "llama"): "LlamaForCausalLM", ("clm", "gpt2"): "GPT2LMHeadModel",
    ("mlm", "bert"): "BertForPreTraining", ("span", "t5"): "T5ForConditionalGeneration",
}


def pretrain(cfg: PretrainConfig) -> dict:
    """Run a pretraining job; returns the final trainer state. See the module docstring."""
    from .models.hub import save
    from .train.distributed import barrier, init_distributed, shutdown, unsharded
    from .train.logging import Run
    from .train.loop import fit
    from .train.report import write_report

    d = init_distributed(cfg.train.device)
    folder = Path(cfg.run.dir) / cfg.run.name
    resume_from = _resume_point(folder, cfg.run.resume)
    run = Run(folder, main=d.main, resume=cfg.run.resume)
    run.write_text("config.yaml", to_yaml(cfg))
    started = time.time()
    tokenizer, shards = _data(cfg, folder, d, barrier)
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every process
    model = build_model(cfg, tokenizer)
    torch.manual_seed(cfg.train.seed + d.rank)  # dropout differs between processes
    task = build_task(cfg, tokenizer, shards, model.config)
    state = fit(model, task, cfg.train, run, d, resume_from=resume_from)
    model = unsharded(model, d)  # under FSDP every process helps gather the weights to rank 0
    if d.main:
        if cfg.task.objective == "span":
            from .tasks.span import add_sentinel_tokens

            add_sentinel_tokens(tokenizer)  # <extra_id_N> at the ids training used, as T5's tokenizer has
        save(model.cpu(), folder / "final", tokenizer, overwrite=True)
        write_report(run, cfg, model, state, time.time() - started)
    run.close()
    shutdown(d)
    return state


def _resume_point(folder: Path, resume: bool):
    from .train.checkpoint import latest_checkpoint

    if not resume:
        return None
    latest = latest_checkpoint(folder)
    if latest is None:
        print(f"no checkpoint in {folder} yet: starting from the beginning")
    return latest


def _data(cfg: PretrainConfig, folder: Path, d, barrier):
    """(tokenizer, {"train": shards, "val": shards}): prepared once by rank 0, read by all."""
    from .data.prepare import prepare
    from .data.shards import TokenShards
    from .tokenizer import Tokenizer, train_tokenizer

    data = cfg.data
    prepared = Path(data.prepared) if data.prepared else folder / "data"
    if data.prepared is None and d.main:
        if not data.inputs:
            raise ConfigError("data.inputs is empty: give text files/folders, or data.prepared")
        tok_dir = Path(data.tokenizer) if data.tokenizer else folder / "tokenizer"
        if data.tokenizer is None and not (tok_dir / "tokenizer.json").is_file():
            train_tokenizer(data.tokenizer_kind, _text_files(data.inputs), data.vocab_size, output=tok_dir)
        prepare(data.inputs, tok_dir, prepared, text_field=data.text_field, val_fraction=data.val_fraction,
                val_split=data.val_split, doc_sep=data.doc_sep, segments=data.segments)
    barrier(d)
    tokenizer = Tokenizer.from_dir(prepared / "tokenizer")
    return tokenizer, {"train": TokenShards(prepared, "train"), "val": TokenShards(prepared, "val")}


def _text_files(inputs: list[str]) -> list[Path]:
    """Tokenizer training reads plain text: the .txt files among the inputs (folders searched)."""
    files = []
    for item in map(Path, inputs):
        if not item.exists():
            raise ConfigError(f"data.inputs: {item} does not exist")
        files += sorted(item.rglob("*.txt")) if item.is_dir() else [item]
    if not files:
        raise ConfigError("data.inputs has no .txt files to train a tokenizer on; give data.tokenizer")
    return files


def build_model(cfg: PretrainConfig, tokenizer):
    """A fresh model from a preset (vocab from the tokenizer, context >= seq_len), or a checkpoint."""
    from .models import all_presets
    from .models.hub import load_model, with_overrides

    if cfg.model.init_from:
        model = load_model(cfg.model.init_from, **cfg.model.overrides)
        _check_objective(cfg.task.objective, model.config.to_hf()["model_type"])
        return model
    presets = all_presets()
    if cfg.model.preset not in presets:
        raise ConfigError(f"model.preset {cfg.model.preset!r} is unknown; choose one of: {', '.join(presets)} "
                          "(or set model.init_from)")
    module, preset = presets[cfg.model.preset]
    model_type = preset.to_hf()["model_type"]
    arch = _check_objective(cfg.task.objective, model_type)
    config = type(preset).from_hf(with_overrides(module, preset.to_hf(), cfg.model.overrides))
    fields = {f.name for f in dataclasses.fields(config)}
    changes = {"vocab_size": padded_vocab_size(tokenizer, cfg.task.objective), **_special_ids(tokenizer, fields)}
    if "max_len" in fields:
        changes["max_len"] = max(config.max_len, cfg.task.seq_len)
    return module.ARCHITECTURES[arch](dataclasses.replace(config, **changes))


def _check_objective(objective: str, model_type: str) -> str:
    arch = ARCHITECTURE.get((objective, model_type))
    if arch is None:
        fits = sorted(m for o, m in ARCHITECTURE if o == objective)
        raise ConfigError(f"task.objective={objective} does not fit a {model_type} model; it trains: "
                          f"{', '.join(fits)}")
    return arch


def padded_vocab_size(tokenizer, objective: str = "") -> int:
    """The tokenizer's size, plus T5's 100 sentinel ids for span corruption, rounded up to a multiple
    of 64 for faster matrix products (the extra rows are never targets)."""
    size = len(tokenizer) + (100 if objective == "span" else 0)
    return size if size < 256 else -(-size // 64) * 64


def _special_ids(tokenizer, fields: set[str]) -> dict:
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    return {k: v for k, v in ids.items() if k in fields}


def build_task(cfg: PretrainConfig, tokenizer, shards: dict, model_config):
    """The objective's task object over the train/validation shards."""
    t, batch, seed = cfg.task, cfg.train.batch_size, cfg.train.seed
    if t.objective == "clm":
        from .tasks.clm import CausalLM

        return CausalLM(shards["train"], shards["val"], t.seq_len, batch, t.eval_batch_size, seed)
    if t.objective == "mlm":
        from .tasks.mlm import MaskedLM

        return MaskedLM(shards["train"], shards["val"], tokenizer, t.seq_len, batch, t.eval_batch_size, seed,
                        mlm_probability=t.mlm_probability, whole_word=t.whole_word, nsp=t.nsp,
                        vocab_size=model_config.vocab_size)
    from .tasks.span import SpanCorruption

    return SpanCorruption(shards["train"], shards["val"], tokenizer, t.seq_len, batch, t.eval_batch_size, seed,
                          noise_density=t.noise_density, mean_span_length=t.mean_span_length,
                          vocab_size=model_config.vocab_size)


def main(config_path: str, overrides: list[str], resume: bool = False) -> dict:
    """CLI entry: load the YAML + overrides strictly, then pretrain."""
    cfg = load_config(PretrainConfig, config_path, [*overrides, *(["run.resume=true"] if resume else [])])
    return pretrain(cfg)
