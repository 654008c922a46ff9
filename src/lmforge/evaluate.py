"""`lmforge evaluate` and `lmforge predict`: a fine-tuned model on a labeled (or unlabeled) file.

    MODEL folder ──► model, tokenizer, labels (config.json id2label), task settings (task.json,
                     written by `lmforge finetune`)
    --data FILE  ──► examples (the readers of data/labeled.py: TSV/CSV/JSONL/Parquet, CoNLL, SQuAD,
                     parallel text with --target)
    evaluate: the task's validation loss and metrics, one JSON object on the last line of stdout
    predict:  one JSON line per example (its prediction) in --output, written atomically
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .data.labeled import read_examples

TASK_FILE = "task.json"
KINDS = ("classify", "ner", "qa", "seq2seq", "chat")
# the task a model's architecture is trained for, when --task is not given
KIND_OF_ARCHITECTURE = {
    "ForSequenceClassification": "classify",
    "ForTokenClassification": "ner",
    "ForQuestionAnswering": "qa",
    "ForConditionalGeneration": "seq2seq",
}


def task_settings(folder: Path, kind: str | None) -> dict:
    """{"kind", "max_len", "options", ...}: task.json of the folder, else inferred from config.json."""
    saved = json.loads((folder / TASK_FILE).read_text()) if (folder / TASK_FILE).is_file() else {}
    if kind and saved.get("kind") not in (None, kind):
        saved = {}  # another task than the one trained: its options do not apply
    if kind:
        saved["kind"] = kind
    if "kind" not in saved:
        arch = _architecture(folder)
        saved["kind"] = next((k for suffix, k in KIND_OF_ARCHITECTURE.items() if arch.endswith(suffix)), None)
    if saved["kind"] not in KINDS:
        raise ValueError(f"{folder}: cannot tell which task this model is for; pass --task "
                         f"{'|'.join(KINDS)}")
    return saved


def build_task(settings: dict, model, tokenizer, examples, batch_size: int):
    """The task object over `examples` as its validation split, with the model's label set."""
    from .finetune import task_class

    kind, options = settings["kind"], dict(settings.get("options") or {})
    labels = _labels(model)
    if kind in ("classify", "ner") and labels:
        options["labels"] = labels
    if kind == "classify" and getattr(model.config, "problem_type", None):
        options.setdefault("problem", model.config.problem_type)
    cls = task_class(kind)
    return cls(None, examples, tokenizer, max_len=settings.get("max_len"), batch_size=batch_size, **options)


def evaluate_file(model_path: str, data: str, kind: str | None = None, batch_size: int = 32, **read) -> dict:
    """Validation loss and the task's metrics of the model on `data`; {"examples": n, ...}."""
    from . import load
    from .models.hub import resolve
    from .train.distributed import Dist
    from .train.loop import evaluate

    folder = resolve(model_path)
    settings = task_settings(folder, kind)
    model, tokenizer = load(model_path)
    examples = read_examples(data, **read)
    task = build_task(settings, model, tokenizer, examples, batch_size)
    metrics = evaluate(model, task, Dist(device=next(model.parameters()).device))
    if settings["kind"] not in ("seq2seq", "chat"):  # perplexity means something for text only
        metrics.pop("val_ppl", None)
    return {"task": settings["kind"], "examples": len(examples), **metrics}


def predict_file(model_path: str, data: str, output: str, kind: str | None = None, batch_size: int = 32,
                 **read) -> int:
    """Write one JSON line per example of `data` (its prediction, and the input) to `output`;
    returns the number of lines."""
    from tqdm import tqdm

    from . import load
    from .models.hub import resolve

    folder = resolve(model_path)
    settings = task_settings(folder, kind)
    model, tokenizer = load(model_path)
    examples = read_examples(data, **read)
    task = build_task(settings, model, tokenizer, None, batch_size)
    chunk = max(batch_size * 8, 1)
    tmp = Path(output).with_name(f".{Path(output).name}.tmp-{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f, tqdm(total=len(examples), unit="ex", desc="predict") as bar:
        for start in range(0, len(examples), chunk):
            part = examples[start : start + chunk]
            for example, prediction in zip(part, task.predict(model, part, batch_size), strict=True):
                f.write(json.dumps({"input": _shown(example), **prediction}, ensure_ascii=False) + "\n")
            bar.update(len(part))
    tmp.replace(output)
    return len(examples)


def _labels(model) -> list[str] | None:
    id2label = getattr(model.config, "id2label", None) or {}
    if not id2label:
        return None
    return [id2label[k] for k in sorted(id2label, key=int)]


def _architecture(folder: Path) -> str:
    config = folder / "config.json"
    if not config.is_file():
        return ""
    return (json.loads(config.read_text()).get("architectures") or [""])[0]


def _shown(example) -> object:
    """The input part of an example, without its gold answer."""
    if not isinstance(example, dict):
        return example
    gold = {"label", "tags", "answers", "target"}
    return {k: v for k, v in example.items() if k not in gold}
