"""Chat with a model in the terminal: its chat template, streamed answers, several turns."""

from __future__ import annotations

import sys
from collections.abc import Iterable

import torch

from .generate import stream_text


def user_turns(messages: list[str] | None) -> Iterable[str]:
    """Messages from --message, else typed at a `you>` prompt (a terminal), else stdin lines."""
    if messages:
        yield from messages
    elif sys.stdin.isatty():
        while True:
            try:
                line = input("you> ")
            except EOFError:
                print(file=sys.stderr)
                return
            if line.strip() in ("/exit", "/quit"):
                return
            yield line
    else:
        yield from (line.rstrip("\n") for line in sys.stdin if line.strip())


def fit_context(tokenizer, conversation: list[dict], max_len: int | None, reserve: int) -> list[int]:
    """Token ids of the conversation with a generation prompt, dropping the oldest turns
    (never the system prompt or the newest message) until `reserve` new tokens fit."""
    while True:
        text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True)
        ids = tokenizer.encode(text, add_special_tokens=False)
        first = 1 if conversation[0]["role"] == "system" else 0
        if max_len is None or len(ids) + reserve <= max_len or len(conversation) - first <= 1:
            return ids
        del conversation[first]


def chat_loop(model, tokenizer, system: str | None = None, messages: list[str] | None = None,
              sampling: dict | None = None, out=None) -> list[dict]:
    """Run a conversation; each answer streams to `out` (default: the current sys.stdout). Returns the
    conversation."""
    out = out or sys.stdout  # looked up per call: a default bound at import would outlive a redirected stdout
    sampling = dict(sampling or {})
    conversation = [{"role": "system", "content": system}] if system else []
    interactive = not messages and sys.stdin.isatty()
    for message in user_turns(messages):
        if message.strip() == "/reset":
            conversation = conversation[:1] if system else []
            continue
        conversation.append({"role": "user", "content": message})
        ids = fit_context(tokenizer, conversation, getattr(model.config, "max_len", None),
                          sampling.get("max_new_tokens", 256))
        tokens = model.stream(torch.tensor([ids]), tokenizer=tokenizer, **sampling)
        answer = "".join(_echo(stream_text(tokens, tokenizer), out, prefix="bot> " if interactive else ""))
        conversation.append({"role": "assistant", "content": answer.strip()})
    return conversation


def _echo(pieces, out, prefix: str):
    print(prefix, end="", file=out, flush=True)
    for piece in pieces:
        print(piece, end="", file=out, flush=True)
        yield piece
    print(file=out, flush=True)
