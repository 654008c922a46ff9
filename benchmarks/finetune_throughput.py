"""Fine-tuning throughput: MiniLM sequence classification on real SST-2 training sentences,
lmforge's `fit()` vs transformers' `Trainer` (+ `peft` for LoRA), on the same weights and data.

Both sides train all-MiniLM-L6-v2 with a new 2-class head: batch 32, AdamW (lr 5e-5 full, 5e-4 LoRA;
weight decay 0.01, betas 0.9/0.999), linear decay, gradient clipping 1.0, dropout as the checkpoint
says (0.1), fp32, on the same sentences (one pass over batch x steps of them). LoRA: rank 8, alpha 16,
dropout 0.05 on the query and value projections, the classifier trained fully. transformers runs
twice: padding every sentence to 128 tokens (what the seed articles' code does) and dynamic padding
with `train_sampling_strategy="group_by_length"`; lmforge pads each length-grouped batch to its
longest row (its only mode). Each run is preceded by a short untimed warm-up run of the same kind
(allocator, kernels, thread pools); then the whole run is timed, batch preparation included, from
the start of its first step to the start of its last. Every batch but the last is inside the timed
span on both sides (transformers' length-grouped sampler puts its longest batch first: leaving out
the first steps as warm-up would leave out its most expensive batch, and not ours).

Prints one JSON line (the last line of stdout): examples/s of each run and our ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

BATCH, MAX_LEN, LORA = 32, 128, {"r": 8, "alpha": 16, "dropout": 0.05}
LR = {"full": 5e-5, "lora": 5e-4}
DATA = Path(os.environ.get("LMFORGE_DATA", Path(__file__).resolve().parents[2] / "shared/data"))


def sentences(n: int) -> list[dict]:
    """The first n SST-2 training sentences with their labels."""
    from lmforge.data.labeled import read_examples

    return list(read_examples(DATA / "en/sst2/train.tsv", limit=n))


class StepClock:
    """Times of the starts of training steps; the rate over all of them."""

    def __init__(self):
        self.starts = []

    def tick(self) -> None:
        self.starts.append(time.perf_counter())

    def examples_per_s(self) -> float:
        return BATCH * (len(self.starts) - 1) / (self.starts[-1] - self.starts[0])


def ours(examples: list[dict], method: str, steps: int) -> float:
    from lmforge.finetune import PeftConfig, apply_peft
    from lmforge.models.hub import load_model, load_tokenizer
    from lmforge.tasks.classify import SequenceClassification
    from lmforge.train.logging import Run
    from lmforge.train.loop import TrainConfig, fit

    torch.manual_seed(0)
    task = SequenceClassification(examples, examples[:BATCH], load_tokenizer("minilm"), max_len=MAX_LEN,
                                  batch_size=BATCH, seed=0)
    model = load_model("minilm", architecture="BertForSequenceClassification", num_labels=2).train()
    if method == "lora":
        model, _ = apply_peft(model, PeftConfig(method="lora", targets=["q_proj", "v_proj"], **LORA), steps)
    clock, batch = StepClock(), task.train_batch
    task.train_batch = lambda *a: (clock.tick(), batch(*a))[1]
    cfg = TrainConfig(max_steps=steps, batch_size=BATCH, lr=LR[method], min_lr=0.0, warmup_steps=0,
                      schedule="linear", weight_decay=0.01, beta2=0.999, eval_every=0, log_every=10**6, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        fit(model, task, cfg, Run(Path(tmp) / "run"))
    return clock.examples_per_s()


def hf(examples: list[dict], method: str, steps: int, padded: bool) -> float:
    import transformers

    path = str(_minilm())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    enc = tokenizer([e["text"] for e in examples], truncation=True, max_length=MAX_LEN,
                    padding="max_length" if padded else False)
    rows = [{**{k: enc[k][i] for k in enc}, "labels": int(e["label"])} for i, e in enumerate(examples)]
    transformers.set_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    if method == "lora":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(task_type="SEQ_CLS", r=LORA["r"], lora_alpha=LORA["alpha"],
                                                           lora_dropout=LORA["dropout"], target_modules=["query", "value"]))
    clock = StepClock()

    class Clock(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            clock.tick()

    with tempfile.TemporaryDirectory() as tmp:
        args = transformers.TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=BATCH, learning_rate=LR[method], weight_decay=0.01,
            lr_scheduler_type="linear", warmup_steps=0, max_steps=steps, max_grad_norm=1.0, logging_steps=10**6,
            save_strategy="no", eval_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
            dataloader_num_workers=0, train_sampling_strategy="random" if padded else "group_by_length")
        collator = transformers.DataCollatorWithPadding(tokenizer)
        transformers.Trainer(model=model, args=args, train_dataset=rows, data_collator=collator,
                             callbacks=[Clock()]).train()
    return clock.examples_per_s()


def warmed_up(run, examples: list[dict], steps: int, warmup: int, method: str, **kwargs) -> float:
    """`run(examples, method, steps)` timed, after an untimed run of `warmup` steps of the same kind."""
    run(examples[: BATCH * warmup], method, warmup, **kwargs)
    return run(examples, method, steps, **kwargs)


def _minilm() -> Path:
    from lmforge.models.hub import resolve

    return resolve("minilm")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="timed training steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="steps of the untimed warm-up run before each run")
    args = parser.parse_args()
    examples = sentences(BATCH * args.steps)
    result = {"benchmark": "finetune_throughput", "model": "all-MiniLM-L6-v2", "data": "SST-2 train",
              "batch": BATCH, "timed_steps": args.steps - 1, "threads": torch.get_num_threads()}
    for method in ("full", "lora"):
        ex = {"ours": warmed_up(ours, examples, args.steps, args.warmup, method),
              "hf_padded": warmed_up(hf, examples, args.steps, args.warmup, method, padded=True),
              "hf_dynamic": warmed_up(hf, examples, args.steps, args.warmup, method, padded=False)}
        result.update({f"{method}_{k}_examples_per_s": round(v, 1) for k, v in ex.items()})
        result[f"{method}_ratio_vs_hf_padded"] = round(ex["ours"] / ex["hf_padded"], 3)
        result[f"{method}_ratio_vs_hf_dynamic"] = round(ex["ours"] / ex["hf_dynamic"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
