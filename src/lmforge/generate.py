"""Text generation: greedy, sampling (temperature, top-k, top-p, repetition penalty), beam search,
stop strings, EOS, batched prompts with left padding, and a streaming token iterator.

The logits are processed in the order transformers uses (repetition penalty, then temperature,
top-k, top-p), so greedy decoding gives the same tokens as `transformers.generate`.

Shapes: B batch (times beams), T prompt length, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .kernels import fast_decoding


@dataclass
class Sampling:
    """How to pick the next token. The defaults are greedy decoding."""

    max_new_tokens: int = 32
    min_new_tokens: int = 0  # EOS is forbidden until this many new tokens exist
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off; > 1 discourages repeating any token seen so far
    eos_token_id: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    stop_strings: list[str] = field(default_factory=list)
    num_beams: int = 1
    length_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]
        self.eos_token_id = list(self.eos_token_id or [])
        if isinstance(self.stop_strings, str):
            self.stop_strings = [self.stop_strings]
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def process_logits(logits: torch.Tensor, seen: torch.Tensor, s: Sampling, n_new: int = 0) -> torch.Tensor:
    """Apply min-new-tokens, repetition penalty, temperature, top-k and top-p to next-token logits (B, V);
    `n_new` is how many tokens were generated so far."""
    logits = logits.float()
    if n_new < s.min_new_tokens and s.eos_token_id:
        logits = logits.index_fill(1, torch.tensor(s.eos_token_id, device=logits.device), float("-inf"))
    if s.repetition_penalty != 1.0:
        score = logits.gather(1, seen)
        score = torch.where(score < 0, score * s.repetition_penalty, score / s.repetition_penalty)
        logits = logits.scatter(1, seen, score)
    if not s.do_sample:
        return logits
    if s.temperature != 1.0:
        logits = logits / s.temperature
    if s.top_k > 0:
        kth = torch.topk(logits, min(s.top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        remove = sorted_logits.softmax(-1).cumsum(-1) <= 1 - s.top_p
        remove[:, -1] = False  # always keep the most likely token
        logits = logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    return logits


def pick_next(logits: torch.Tensor, seen: torch.Tensor, s: Sampling, generator=None, n_new: int = 0) -> torch.Tensor:
    """Choose one token per row (B,) from logits (B, V)."""
    logits = process_logits(logits, seen, s, n_new)
    if not s.do_sample:
        return logits.argmax(-1)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)


class StopChecker:
    """Decides per row whether generation is finished: EOS or a stop string in the new text."""

    def __init__(self, s: Sampling, tokenizer=None):
        if s.stop_strings and tokenizer is None:
            raise ValueError("stop_strings need the tokenizer: pass tokenizer=...")
        self.eos = torch.tensor(s.eos_token_id or [-1])
        self.stops, self.tokenizer = s.stop_strings, tokenizer
        self.window = max((len(x) for x in self.stops), default=0) + 8  # tokens: each is >= 1 char, mostly

    def __call__(self, token: torch.Tensor, new_tokens: list[torch.Tensor]) -> torch.Tensor:
        """token (B,) just chosen; new_tokens all chosen so far. Returns finished flags (B,)."""
        done = torch.isin(token, self.eos.to(token.device))
        if self.stops:
            tail = torch.stack(new_tokens[-self.window:], 1).tolist()
            texts = [self.tokenizer.decode(row) for row in tail]
            done |= torch.tensor([any(x in t for x in self.stops) for t in texts], device=token.device)
        return done


def _model_inputs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
    """Drop an all-ones mask (the fast path); check the context length up front."""
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None
    return input_ids, attention_mask


def decode_steps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, s: Sampling,
                 tokenizer=None) -> Iterator[torch.Tensor]:
    """Yield the next token of every row (B,) until all rows finished or max_new_tokens.

    Finished rows keep yielding the pad token (as transformers does), so rows stay aligned.
    """
    input_ids, attention_mask = _model_inputs(model, input_ids, attention_mask)
    B, T = input_ids.shape
    _check_length(model, T + s.max_new_tokens)
    generator = torch.Generator(input_ids.device).manual_seed(s.seed) if s.seed is not None else None
    pad = s.pad_token_id if s.pad_token_id is not None else (s.eos_token_id or [0])[0]
    stop, new_tokens = StopChecker(s, tokenizer), []
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    cache, seen = model.new_cache(B, T + s.max_new_tokens), input_ids
    logits = model(input_ids, attention_mask, cache=cache)[:, -1]  # (B, V)
    for step in range(s.max_new_tokens):
        token = pick_next(logits, seen, s, generator, step).masked_fill(finished, pad)
        new_tokens.append(token)
        finished |= stop(token, new_tokens)
        yield token
        if bool(finished.all()) or step == s.max_new_tokens - 1:
            return
        seen = torch.cat((seen, token[:, None]), 1)
        if attention_mask is not None:
            attention_mask = torch.cat((attention_mask, attention_mask.new_ones(B, 1)), 1)
        logits = model(token[:, None], attention_mask, cache=cache)[:, -1]


def _check_length(model, total: int) -> None:
    max_len = getattr(model.config, "max_len", None)
    if max_len is not None and total > max_len:
        raise ValueError(f"prompt + max_new_tokens = {total} tokens exceeds the model's context length "
                         f"({max_len}); shorten the prompt or lower max_new_tokens")


def beam_search(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, s: Sampling) -> torch.Tensor:
    """Beam search over `s.num_beams` hypotheses per row; returns the best new tokens (B, N).

    Scores are summed log-probabilities divided by length ** length_penalty; a hypothesis ends at EOS.
    """
    input_ids, attention_mask = _model_inputs(model, input_ids, attention_mask)
    B, T = input_ids.shape
    K, V = s.num_beams, None
    _check_length(model, T + s.max_new_tokens)
    rows = torch.arange(B, device=input_ids.device).repeat_interleave(K)
    ids, mask = input_ids[rows], attention_mask[rows] if attention_mask is not None else None
    cache = model.new_cache(B * K, T + s.max_new_tokens)
    logits = model(ids, mask, cache=cache)[:, -1]
    beam_scores = torch.zeros(B, K, device=ids.device)
    beam_scores[:, 1:] = float("-inf")  # all beams start identical: let only the first expand at step 0
    tokens = ids.new_zeros(B * K, 0)
    done: list[list[tuple[float, torch.Tensor]]] = [[] for _ in range(B)]
    eos, finished = set(s.eos_token_id), [False] * B  # finished rows keep their hypotheses as they are
    for step in range(s.max_new_tokens):
        logp = process_logits(logits, torch.cat((ids, tokens), 1), s, step).log_softmax(-1)
        V = logp.shape[-1]
        total = (beam_scores.view(-1, 1) + logp).view(B, K * V)
        top_scores, top_idx = total.topk(2 * K, dim=1)  # (B, 2K): room for beams that end at EOS
        beam_scores, chosen = _advance_beams(top_scores, top_idx, V, K, eos, done, tokens, step, s, finished)
        finished = [f or _cannot_improve(d, scores, step, s, K) for f, d, scores in zip(finished, done, beam_scores)]
        if all(finished):
            break
        cache.reorder(chosen[0])
        tokens = torch.cat((tokens[chosen[0]], chosen[1][:, None]), 1)
        if mask is not None:
            mask = torch.cat((mask[chosen[0]], mask.new_ones(B * K, 1)), 1)
        if step < s.max_new_tokens - 1:
            logits = model(chosen[1][:, None], mask, cache=cache)[:, -1]
    return _best_hypotheses(done, tokens, beam_scores, s)


def _advance_beams(top_scores, top_idx, V, K, eos, done, tokens, step, s, finished):
    """Split the 2K candidates per row into finished hypotheses (EOS) and the K live beams."""
    B = top_scores.shape[0]
    new_scores = torch.full((B, K), float("-inf"), device=top_scores.device)
    src_beam = torch.arange(B * K, device=top_scores.device)  # finished rows: beams stay where they are
    new_tok = torch.zeros(B * K, dtype=torch.long, device=top_scores.device)
    for b in range(B):
        if finished[b]:
            continue
        kept = 0
        for rank, (score, idx) in enumerate(zip(top_scores[b].tolist(), top_idx[b].tolist())):
            beam, tok = b * K + idx // V, idx % V
            if tok in eos:
                if rank < K:  # only the top K candidates may finish (as in transformers)
                    hypothesis = torch.cat((tokens[beam], tokens.new_tensor([tok])))
                    _keep_best(done[b], score / (step + 1) ** s.length_penalty, hypothesis, K)
                continue
            new_scores[b, kept], src_beam[b * K + kept], new_tok[b * K + kept] = score, beam, tok
            kept += 1
            if kept == K:
                break
    return new_scores, (src_beam, new_tok)


def _keep_best(done: list, score: float, hypothesis: torch.Tensor, K: int) -> None:
    """Add a finished hypothesis if it is among the K best so far."""
    done.append((score, hypothesis))
    done.sort(key=lambda d: -d[0])
    del done[K:]


def _cannot_improve(done: list, scores: torch.Tensor, step: int, s: Sampling, K: int) -> bool:
    """A row is finished when it has K hypotheses and no live beam can beat the worst of them
    (log-probabilities only fall; transformers' heuristic for early_stopping=False)."""
    if len(done) < K or s.length_penalty < 0:
        return False
    return float(scores.max()) / (step + 1) ** s.length_penalty <= min(d[0] for d in done)


def _best_hypotheses(done, tokens, beam_scores, s) -> torch.Tensor:
    """Best finished hypothesis per row (or the best live beam), right-padded to one tensor."""
    B, K = beam_scores.shape
    length = tokens.shape[1]
    best = []
    for b in range(B):
        live = [(float(beam_scores[b, k]) / max(length, 1) ** s.length_penalty, tokens[b * K + k]) for k in range(K)]
        best.append(max(done[b] + live, key=lambda d: d[0])[1])
    pad = s.pad_token_id if s.pad_token_id is not None else (s.eos_token_id or [0])[0]
    out = tokens.new_full((B, max(len(t) for t in best)), pad)
    for b, t in enumerate(best):
        out[b, : len(t)] = t
    return out


class Generates:
    """Mixin giving a model `generate()` and `stream()`.

    The model needs `forward(input_ids, attention_mask, cache=...) -> logits (B, T, V)`,
    `new_cache(batch, max_len)` and `config` (with `eos_token_id`, optionally `max_len`).
    Encoder-decoder models (T5) override `_decoder_for` to bind the encoder output.
    """

    def _sampling(self, kwargs: dict) -> Sampling:
        kwargs.setdefault("eos_token_id", getattr(self.config, "eos_token_id", None))
        kwargs.setdefault("pad_token_id", getattr(self.config, "pad_token_id", None))
        return Sampling(**kwargs)

    def _decoder_for(self, input_ids, attention_mask):
        """(model to step, its first input ids, its mask). Decoders step themselves on the prompt."""
        return self, input_ids, attention_mask

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 tokenizer=None, **kwargs) -> torch.Tensor:
        """Continue each prompt. Returns prompt + new tokens (B, T + N); for encoder-decoder models,
        the decoder start token + new tokens (as transformers does).

        Args:
            input_ids: (B, T) prompts, left-padded when of different lengths.
            attention_mask: (B, T), 1 for tokens and 0 for padding.
            tokenizer: needed only for `stop_strings`.
            **kwargs: fields of `Sampling` (max_new_tokens, min_new_tokens, do_sample, temperature, top_k,
                top_p, repetition_penalty, eos_token_id, pad_token_id, stop_strings, num_beams, seed).
        """
        s = self._sampling(kwargs)
        was_training = self.training
        self.eval()
        try:
            with fast_decoding(self):
                model, ids, mask = self._decoder_for(input_ids, attention_mask)
                if s.num_beams > 1:
                    new = beam_search(model, ids, mask, s)
                else:
                    new = torch.stack(list(decode_steps(model, ids, mask, s, tokenizer)), 1)
        finally:
            self.train(was_training)
        return torch.cat((ids, new), 1)

    def stream(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               tokenizer=None, **kwargs) -> Iterator[torch.Tensor]:
        """Like `generate`, but yields each new token (B,) as soon as it is chosen."""
        s = self._sampling(kwargs)
        self.eval()
        with torch.inference_mode(), fast_decoding(self):
            model, ids, mask = self._decoder_for(input_ids, attention_mask)
            yield from decode_steps(model, ids, mask, s, tokenizer)


def stream_text(tokens: Iterator[torch.Tensor], tokenizer, skip_special_tokens: bool = True) -> Iterator[str]:
    """Turn a batch-1 token stream into text pieces, holding back incomplete UTF-8 characters until
    a later token completes them; what is still held at the end is shown as decoding shows it (U+FFFD)."""
    ids, shown, text = [], "", ""
    for token in tokens:
        ids.append(int(token[0]))
        text = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        if text.endswith("\ufffd"):
            continue  # a multi-byte character split across tokens: wait for the rest
        yield text[len(shown):]
        shown = text
    if len(text) > len(shown):
        yield text[len(shown):]  # the stream ended inside a character (e.g. at max_new_tokens)
