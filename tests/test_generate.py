"""Generation: logits processing like transformers, stop strings, streaming text, fast CPU decoding."""

import pytest
import torch

from lmforge import kernels
from lmforge.generate import Sampling, process_logits, stream_text
from lmforge.models import llama

tf = pytest.importorskip("transformers")


def hf_processed(logits, seen, **kw):
    """What transformers' processors and warpers make of the same logits."""
    from transformers.generation import logits_process as lp

    procs = lp.LogitsProcessorList()
    if kw.get("min_new_tokens"):
        procs.append(lp.MinNewTokensLengthLogitsProcessor(10, kw["min_new_tokens"], eos_token_id=[4, 7]))
    if kw.get("repetition_penalty", 1.0) != 1.0:
        procs.append(lp.RepetitionPenaltyLogitsProcessor(kw["repetition_penalty"]))
    if kw.get("temperature", 1.0) != 1.0:
        procs.append(lp.TemperatureLogitsWarper(kw["temperature"]))
    if kw.get("top_k", 0):
        procs.append(lp.TopKLogitsWarper(kw["top_k"]))
    if kw.get("top_p", 1.0) < 1.0:
        procs.append(lp.TopPLogitsWarper(kw["top_p"]))
    return procs(seen, logits.clone())


@pytest.mark.parametrize("kw", [
    {"min_new_tokens": 3},
    {"repetition_penalty": 1.3},
    {"temperature": 0.7},
    {"top_k": 5},
    {"top_p": 0.8},
    {"repetition_penalty": 1.2, "temperature": 0.6, "top_k": 20, "top_p": 0.9},
])
def test_logits_processing_matches_transformers(kw):
    torch.manual_seed(0)
    logits, seen = torch.randn(3, 50) * 3, torch.randint(0, 50, (3, 12))
    ours = process_logits(logits, seen, Sampling(do_sample=True, eos_token_id=[4, 7], **kw), n_new=seen.shape[1] - 10)
    torch.testing.assert_close(ours, hf_processed(logits, seen, **kw))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return llama.LlamaForCausalLM(llama.PRESETS["llama-tiny"]).eval()


def test_greedy_with_repetition_penalty_matches_transformers(tiny):
    hf = tf.LlamaForCausalLM(tf.LlamaConfig(**{k: v for k, v in tiny.config.to_hf().items() if k != "model_type"}))
    hf.load_state_dict(llama.to_hf_state_dict(tiny.state_dict(), tiny.config), strict=False)
    hf.tie_weights()
    ids = torch.randint(3, 512, (1, 8))
    expected = hf.eval().generate(ids, max_new_tokens=15, do_sample=False, repetition_penalty=1.5,
                                  pad_token_id=0, eos_token_id=None)
    assert torch.equal(tiny.generate(ids, max_new_tokens=15, repetition_penalty=1.5, eos_token_id=[]), expected)


def test_sampling_is_reproducible_with_a_seed_and_varies_without(tiny):
    ids = torch.randint(3, 512, (2, 5))
    a = tiny.generate(ids, max_new_tokens=20, do_sample=True, temperature=1.5, seed=7, eos_token_id=[])
    b = tiny.generate(ids, max_new_tokens=20, do_sample=True, temperature=1.5, seed=7, eos_token_id=[])
    c = tiny.generate(ids, max_new_tokens=20, do_sample=True, temperature=1.5, seed=8, eos_token_id=[])
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = tiny.generate(ids, max_new_tokens=20, eos_token_id=[])
    assert torch.equal(tiny.generate(ids, max_new_tokens=20, do_sample=True, top_k=1, seed=3, eos_token_id=[]), greedy)


def test_eos_stops_a_row_and_pads_it(tiny):
    ids = torch.randint(3, 512, (2, 5))
    free = tiny.generate(ids, max_new_tokens=12, eos_token_id=[])
    eos = int(free[0, 8])  # the 4th new token of row 0 becomes "EOS"
    out = tiny.generate(ids, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    row0 = out[0, 5:].tolist()
    assert row0[: row0.index(eos) + 1] == free[0, 5 : 5 + row0.index(eos) + 1].tolist()
    assert all(t == 0 for t in row0[row0.index(eos) + 1:])


class CharTokenizer:
    """One token per character; enough to test text-level logic."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(97 + int(i) % 26) for i in ids)


def test_stop_strings_end_generation_after_the_string(tiny):
    ids = torch.randint(3, 512, (1, 5))
    text = CharTokenizer().decode(tiny.generate(ids, max_new_tokens=30, eos_token_id=[])[0, 5:])
    stop = text[10:12]
    out = tiny.generate(ids, max_new_tokens=30, eos_token_id=[], stop_strings=[stop], tokenizer=CharTokenizer())
    new_text = CharTokenizer().decode(out[0, 5:])
    assert new_text.endswith(stop) and stop not in new_text[:-1] and len(new_text) <= 12
    with pytest.raises(ValueError, match="tokenizer"):
        tiny.generate(ids, max_new_tokens=3, stop_strings=["x"])


class ByteTokenizer:
    """Tokens are UTF-8 bytes, so one character may need several tokens."""

    def decode(self, ids, skip_special_tokens=False):
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def test_stream_text_never_shows_half_a_character():
    text = "héllo 世界!"
    tokens = (torch.tensor([b]) for b in text.encode())
    pieces = list(stream_text(tokens, ByteTokenizer()))
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


def test_streaming_yields_the_same_tokens_as_generate(tiny):
    ids = torch.randint(3, 512, (1, 6))
    streamed = torch.stack(list(tiny.stream(ids, max_new_tokens=10, eos_token_id=[])), 1)
    assert torch.equal(streamed, tiny.generate(ids, max_new_tokens=10, eos_token_id=[])[:, 6:])


def test_bad_sampling_settings_are_refused():
    for kw in ({"max_new_tokens": 0}, {"do_sample": True, "temperature": 0.0}, {"top_p": 1.5}):
        with pytest.raises(ValueError):
            Sampling(**kw)


def test_compiled_gemv_matches_linear():
    torch.manual_seed(0)
    weight, bias, x = torch.randn(300, 257), torch.randn(300), torch.randn(1, 1, 257)
    torch.testing.assert_close(kernels.gemv(x, weight, bias), torch.nn.functional.linear(x, weight, bias),
                               rtol=1e-5, atol=1e-5)


def test_fast_decoding_gives_the_same_tokens(monkeypatch):
    torch.manual_seed(0)
    model = llama.LlamaForCausalLM(llama.LlamaConfig(vocab_size=2048, dim=256, n_layers=2, n_heads=4,
                                                     n_kv_heads=2, hidden_dim=512, max_len=128)).eval()
    ids = torch.randint(0, 2048, (1, 8))
    monkeypatch.setenv("LMFORGE_FAST_DECODE", "0")
    plain = model.generate(ids, max_new_tokens=16, eos_token_id=[])
    monkeypatch.setenv("LMFORGE_FAST_DECODE", "1")
    monkeypatch.setattr(kernels, "MIN_MODEL_BYTES", 0)
    calls = []
    monkeypatch.setattr(kernels, "gemv", lambda *a: calls.append(1) or torch.nn.functional.linear(*a))
    assert torch.equal(model.generate(ids, max_new_tokens=16, eos_token_id=[]), plain)
    assert calls, "the fast path was not taken"
    assert all("forward" not in vars(m) for m in model.modules())  # patched forwards removed afterwards
