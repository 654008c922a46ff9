"""Chat fine-tuning (supervised, "SFT"): conversations in the model's chat template, loss only on what
the assistant says.

    messages   system: ...   user: Translate to Chinese: Hi.   assistant: 你好。
    text       <|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\nTranslate ...<|im_end|>\\n<|im_start|>assistant\\n你好。<|im_end|>\\n
    labels     -100 .........................................................................................  你好。<|im_end|>  -100

What the assistant says is found by rendering the conversation prefix by prefix: for assistant
message i, `render(messages[:i], add_generation_prompt=True)` ends where its reply starts, and
`render(messages[:i + 1])`, trailing whitespace removed, ends right after its end-of-turn token (SmolLM2's
`<|im_end|>`, Llama 3's `<|eot_id|>`, ...): the model learns to say the reply and then to stop. Both
renders must be prefixes of the whole conversation's text (templates that rewrite earlier turns, e.g.
dropping old reasoning, are refused with an error).

The text is encoded piece by piece, cut where each reply starts and ends, and the labels are the ids
of the reply pieces: exactly the tokens the assistant generates, up to and including its end-of-turn
token, and the tokens before each reply are those of its generation prompt (when the earlier seams
tokenize cleanly, as ChatML's do). One encoding of the whole text can merge a token across the seam,
leaving no token boundary where the reply starts:

    "<|im_start|>assistant\\n" + "  Sure!"    pieces: ... "assistant" "\\n" | " " " Sure" "!"
                                             whole:  ... "assistant" "\\n " " Sure" "!"

Trained on the whole encoding, the model never sees the lone "\\n" it is given at generation, and a
label mask over it (transformers' `return_assistant_tokens_mask`, which TRL's `assistant_only_loss`
uses) teaches the header's "\\n" as part of the reply. Labels are aligned with input_ids (the output
at position t is scored against labels[t + 1]).

Conversations longer than max_len keep their start; a conversation left with no assistant token is
dropped (and counted in `dropped`). Metrics: val loss; optionally generation-based chrF / BLEU of the
reply to each validation conversation (its last assistant turn held back) against that turn.
Examples: {"messages": [{"role", "content"}, ...]} or the list of messages itself.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ..data.batching import share
from ..data.collate import pad_sequences
from .classify import FeatureBatches, gather
from .seq2seq import IGNORE, causal_lm_loss, eval_rows, generate_texts, text_scores


@dataclass
class Features:
    """Per conversation: token ids and labels (-100 off the assistant's replies)."""

    ids: list[list[int]]
    labels: list[list[int]]


class ChatSFT(FeatureBatches):
    """Chat SFT batches, loss, metrics and replies.

    Args:
        train, val: conversations (see the module docstring); either may be None.
        tokenizer: lmforge `Tokenizer` with a chat template.
        max_len: most tokens per conversation (its start is kept); None = the tokenizer's
            model_max_length, at most 2048.
        batch_size: conversations per optimizer step; eval_batch_size: per validation batch (0 = the same).
        generation_metrics: any of "chrf", "bleu" on the replies to the validation conversations; () = none.
        bleu_tokenize: sacrebleu's tokenizer for BLEU ("zh" for Chinese replies).
        max_new_tokens, num_beams: generation of replies (greedy when num_beams = 1).
        metric_examples: generate for the first this many validation conversations (0 = all).
        template_options: more chat-template variables (e.g. {"enable_thinking": False}).
    """

    def __init__(self, train, val, tokenizer, max_len: int | None = None, batch_size: int = 8,
                 eval_batch_size: int = 0, seed: int = 0, generation_metrics=(), bleu_tokenize: str = "13a",
                 max_new_tokens: int = 128, num_beams: int = 1, metric_examples: int = 0,
                 template_options: dict | None = None):
        unknown = set(generation_metrics) - {"chrf", "bleu"}
        if unknown:
            raise ValueError(f"unknown generation_metrics {sorted(unknown)}; choose from chrf, bleu")
        self.tokenizer, self.template_options = tokenizer, dict(template_options or {})
        self.max_len = max_len or min(tokenizer.model_max_length or 2048, 2048)
        self.pad_id = next((i for i in (tokenizer.pad_id, tokenizer.eos_id) if i is not None), 0)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.generation_metrics, self.bleu_tokenize = tuple(generation_metrics), bleu_tokenize
        self.sampling = {"max_new_tokens": max_new_tokens, "num_beams": num_beams}
        self.metric_examples, self.dropped = metric_examples, 0
        self.val_examples = [_messages(ex, i, "validation") for i, ex in enumerate(val or ())]
        self.set_splits(train, val, batch_size, seed)

    # ---- features and batches ----------------------------------------------------------------------

    def features(self, conversations, split: str = "examples") -> Features:
        """Token ids and assistant-only labels of each conversation, cut to max_len."""
        ids, labels, dropped = [], [], 0
        for i, conv in enumerate(conversations):
            row_ids, row_labels = tokenize_conversation(self.tokenizer, _messages(conv, i, split), self.max_len,
                                                        **self.template_options)
            if all(t == IGNORE for t in row_labels[1:]):  # nothing to learn: truncated away, or no reply
                dropped += 1
                continue
            ids.append(row_ids)
            labels.append(row_labels)
        if not ids:
            raise ValueError(f"{split}: no conversation has an assistant reply within max_len={self.max_len} tokens")
        self.dropped += dropped
        if dropped:
            warnings.warn(f"{split}: {dropped} conversations dropped: no assistant tokens within "
                          f"max_len={self.max_len}", stacklevel=2)
        return Features(ids, labels)

    def collate(self, feats: Features, rows) -> dict:
        """Rows `rows` of `feats` as a batch padded (on the right) to its longest row."""
        ids, mask = pad_sequences([feats.ids[i] for i in rows], self.pad_id)
        labels = pad_sequences([feats.labels[i] for i in rows], IGNORE)[0]
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def train_batch(self, step: int, part: int = 0, parts: int = 1) -> dict:
        return self.collate(self.train, share(self.sampler(step), part, parts))

    def eval_batches(self, rank: int = 0, world: int = 1):
        if self.val is None:
            return
        for rows in eval_rows([len(r) for r in self.val.ids], self.eval_batch_size, rank, world):
            yield self.collate(self.val, rows)

    # ---- loss, metrics, replies --------------------------------------------------------------------

    def targets(self, batch: dict) -> int:
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, int]:
        return causal_lm_loss(model, batch)

    def metrics(self, model, rank: int = 0, world: int = 1) -> dict:
        """chrF / BLEU of the replies generated for the validation conversations (the last assistant
        turn held back) against those turns."""
        held = [c for c in self.val_examples if c and c[-1]["role"] == "assistant"]
        if not self.generation_metrics or not held:
            return {}
        held = held[: self.metric_examples or len(held)]
        mine = share(np.arange(len(held)), rank, world, strict=False).tolist()
        texts = self.replies(model, [held[i][:-1] for i in mine], self.eval_batch_size, rank == 0)
        pairs = sorted(gather(list(zip(mine, texts, strict=True)), world))
        references = [c[-1]["content"] for c in held]
        return text_scores([t for _, t in pairs], references, self.generation_metrics, self.bleu_tokenize)

    def replies(self, model, conversations: list[list[dict]], batch_size: int, progress: bool = False) -> list[str]:
        """The assistant's next reply to each conversation (rendered with the generation prompt)."""
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True,
                                                      **self.template_options) for c in conversations]
        return generate_texts(model, self.tokenizer, prompts, batch_size, self.pad_id, progress, **self.sampling)

    def predict(self, model, examples, batch_size: int = 8) -> list[dict]:
        """{"generated": the next assistant reply} per conversation; a conversation that ends with an
        assistant turn gets that turn replaced (it is held back, as in the metrics)."""
        convs = [_messages(ex, i, "examples") for i, ex in enumerate(examples)]
        convs = [c[:-1] if c and c[-1]["role"] == "assistant" else c for c in convs]
        return [{"generated": t} for t in self.replies(model, convs, batch_size)]


# ---- the algorithm ---------------------------------------------------------------------------------

def assistant_spans(tokenizer, messages: list[dict], **options) -> tuple[str, list[tuple[int, int]]]:
    """(the rendered conversation, [start, end) character span of each assistant reply in it, from
    its first character to its end-of-turn token). See the module docstring."""
    text = tokenizer.apply_chat_template(messages, **options)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, **options)
        upto = tokenizer.apply_chat_template(messages[: i + 1], **options).rstrip()
        if not (upto.startswith(before) and text.startswith(upto)):
            raise ValueError(f"the chat template does not render message {i} (assistant) the same way in a "
                             "shorter conversation as in the whole one, so its reply cannot be located; "
                             "chat SFT needs a template whose output grows turn by turn")
        spans.append((len(before), len(upto)))
    return text, spans


def tokenize_conversation(tokenizer, messages: list[dict], max_len: int, **options) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a conversation: labels equal the ids on the assistant replies (end-of-turn
    token included) and -100 elsewhere; both cut to max_len tokens (the start kept). The text is encoded
    in pieces cut at the replies' ends (see the module docstring)."""
    text, spans = assistant_spans(tokenizer, messages, **options)
    pieces = _pieces(len(text), spans)
    encodings = tokenizer.backend.encode_batch([text[a:b] for a, b, _ in pieces], add_special_tokens=False)
    ids, labels = [], []
    for (_, _, reply), enc in zip(pieces, encodings, strict=True):
        ids += enc.ids
        labels += enc.ids if reply else [IGNORE] * len(enc.ids)
    return ids[:max_len], labels[:max_len]


def _pieces(length: int, spans: list[tuple[int, int]]) -> list[tuple[int, int, bool]]:
    """The non-empty character ranges [a, b) that cover a text of `length` characters, cut at the
    sorted, disjoint reply spans, each with whether it is a reply."""
    cuts = [0, *(c for span in spans for c in span), length]
    return [(a, b, k % 2 == 1) for k, (a, b) in enumerate(itertools.pairwise(cuts)) if b > a]


def _messages(example, i: int, split: str) -> list[dict]:
    messages = example.get("messages") if isinstance(example, dict) else example
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise ValueError(f"{split} example {i} is not a conversation: give {{\"messages\": [{{\"role\", "
                         "\"content\"}, ...]}")
    return messages
