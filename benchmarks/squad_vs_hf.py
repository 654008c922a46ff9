"""Extractive QA quality: lmforge vs transformers' Trainer, same weights, data and hyper-parameters.

The recipe configs/finetune/squad-minilm.yaml (MiniLM, SQuAD v1.1 part A: 21 articles to train on,
3 held-out articles to evaluate, windows of 256 tokens with stride 64, batch 16, AdamW lr 1e-4 with
linear decay after 90 warm-up steps, weight decay 0.01, 900 steps) runs through `lmforge finetune`;
then `AutoModelForQuestionAnswering` on the same MiniLM weights trains with `Trainer` on the very same
windows (the tokenizer's features equal transformers' own, tests check that), padded to 256 as
run_qa.py does by default, with the same hyper-parameters. Both are scored by the same run_qa.py
post-processing (best start + end over all windows, n_best 20, answers up to 30 tokens) and the
official SQuAD v1.1 exact-match / F1.

Prints one JSON line (the last line of stdout).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

RECIPE = Path(__file__).resolve().parents[1] / "configs/finetune/squad-minilm.yaml"


class QAOutputs(torch.nn.Module):
    """A transformers QA model answering as lmforge's do: (start logits, end logits)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return out.start_logits, out.end_logits


def ours(cfg) -> tuple[dict, float]:
    from lmforge.finetune import finetune

    start = time.perf_counter()
    state = finetune(cfg)
    return {"exact_match": state["exact_match"], "f1": state["f1"]}, time.perf_counter() - start


def hf(cfg) -> tuple[dict, float]:
    import transformers

    from lmforge.finetune import build_task, load_tokenizer_for, read_data
    from lmforge.models.hub import resolve

    start = time.perf_counter()
    train, val = read_data(cfg)
    task = build_task(cfg, train, val, load_tokenizer_for(cfg, Path(cfg.run.dir)))
    f = task.train
    rows = [{"input_ids": f.ids[i], "token_type_ids": f.type_ids[i], "attention_mask": [1] * len(f.ids[i]),
             "start_positions": f.starts[i], "end_positions": f.ends[i]} for i in range(len(f.ids))]
    path = str(resolve(cfg.model.path))
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    transformers.set_seed(cfg.train.seed)
    model = transformers.AutoModelForQuestionAnswering.from_pretrained(path)
    t = cfg.train
    with tempfile.TemporaryDirectory() as tmp:
        args = transformers.TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=t.batch_size, learning_rate=t.lr, weight_decay=t.weight_decay,
            adam_beta2=t.beta2, lr_scheduler_type=t.schedule, warmup_steps=t.warmup_steps, max_steps=t.max_steps,
            max_grad_norm=t.grad_clip, logging_steps=100, save_strategy="no", eval_strategy="no", report_to="none",
            use_cpu=True, seed=t.seed, dataloader_num_workers=0)
        collator = transformers.DataCollatorWithPadding(tokenizer, padding="max_length", max_length=task.max_len)
        transformers.Trainer(model=model, args=args, train_dataset=rows, data_collator=collator).train()
    scores = task.metrics(QAOutputs(model))
    return scores, time.perf_counter() - start


def main() -> None:
    from lmforge.config import load_config
    from lmforge.finetune import FinetuneConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", help="recipe overrides for both sides, e.g. train.max_steps=100")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(FinetuneConfig, RECIPE, [f"run.dir={tmp}", "run.name=squad-ours", *args.overrides])
        ours_scores, ours_s = ours(cfg)
        hf_scores, hf_s = hf(cfg)
    print(json.dumps({
        "benchmark": "squad_vs_hf", "recipe": "configs/finetune/squad-minilm.yaml", "overrides": args.overrides,
        "ours_f1": round(ours_scores["f1"], 2), "hf_f1": round(hf_scores["f1"], 2),
        "ours_exact_match": round(ours_scores["exact_match"], 2), "hf_exact_match": round(hf_scores["exact_match"], 2),
        "ours_wall_s": round(ours_s, 1), "hf_wall_s": round(hf_s, 1),
        "f1_difference": round(ours_scores["f1"] - hf_scores["f1"], 2),
    }))


if __name__ == "__main__":
    main()
