"""GGUF import, on small files written here the way llama.cpp's convert_hf_to_gguf.py writes Llama models.

No real GGUF file is needed: a tiny random Llama and a tiny trained byte-level BPE are written with
`gguf.GGUFWriter` (llama.cpp's names, its q/k row permutation, F32 or Q8_0 weights), then imported.
"""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

import lmforge
from lmforge import cli
from lmforge.models import hub, llama
from lmforge.tokenizer import train_tokenizer

gguf = pytest.importorskip("gguf")
Q8_0, F32 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.F32

TEXT = """The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away.
A tokenizer learns merges from frequent pairs: the the the, then then, there there.
Once upon a time, in a small village, there lived a fox and a dog who were friends.
"""
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SAMPLES = ["The quick brown fox.", "  two  spaces\tand a tab\n", "<|im_start|>user\nhi there<|im_end|>",
           "数字 123,456 émigré 😀", "<|endoftext|>the end"]
CONTROL, NORMAL = 3, 1  # llama.cpp token types (gguf.TokenType)


# ---- writing GGUF files like llama.cpp -----------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A byte-level BPE (256 bytes + merges) with ChatML special tokens, as `tokenizers` trains it."""
    corpus = tmp_path_factory.mktemp("corpus") / "text.txt"
    corpus.write_text(TEXT * 20, encoding="utf-8")
    tok = train_tokenizer("bpe", [corpus], vocab_size=300)
    tok.backend.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok.chat_template = CHATML
    assert len(tok) == 302
    return tok


def tiny_llama(vocab_size: int, tied: bool, seed: int = 0) -> llama.LlamaForCausalLM:
    """A random Llama whose weights are large enough that any mix-up shows in the logits."""
    torch.manual_seed(seed)
    config = llama.LlamaConfig(vocab_size=vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128,
                               max_len=128, rope_theta=5000.0, norm_eps=1e-6, tie_embeddings=tied,
                               bos_token_id=0, eos_token_id=301, pad_token_id=0)
    model = llama.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(0.5, 1.5) if p.ndim == 1 else p.normal_(0.0, 0.1)  # norms too: not all ones
    return model


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute` for q/k rows (interleaved RoPE pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(model: llama.LlamaForCausalLM) -> dict[str, np.ndarray]:
    """GGUF name -> fp32 array (PyTorch layout), from the transformers state dict as the converter does."""
    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.n_layers)
    out = {}
    for hf_name, w in llama.to_hf_state_dict(model.state_dict(), config).items():
        w = w.numpy().copy()
        if hf_name.endswith("q_proj.weight"):
            w = permute(w, config.n_heads)
        elif hf_name.endswith("k_proj.weight"):
            w = permute(w, config.n_kv_heads)
        out[names.get_name(hf_name, try_suffixes=(".weight",))] = w
    return out


def add_tokenizer(writer, tok) -> None:
    tokens = [tok.id_to_token(i) for i in range(len(tok))]
    merges = json.loads(tok.backend.to_str())["model"]["merges"]
    special = tok.special_ids
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([CONTROL if i in special else NORMAL for i in range(len(tokens))])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(tok.token_to_id("<|endoftext|>"))
    writer.add_eos_token_id(tok.token_to_id("<|im_end|>"))
    writer.add_pad_token_id(tok.token_to_id("<|endoftext|>"))
    writer.add_add_bos_token(False)
    writer.add_chat_template(tok.chat_template)


def write_gguf(path, model, tok, qtype=F32, arch: str = "llama", override: dict | None = None):
    """Write `model` as llama.cpp does: hyper-parameters, tokenizer, then tensors (2-D ones as `qtype`,
    norms always F32). `override` replaces tensors by GGUF name (to store one in an odd type)."""
    c = model.config
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name("tiny-test-llama")
    writer.add_vocab_size(c.vocab_size)
    writer.add_context_length(c.max_len)
    writer.add_embedding_length(c.dim)
    writer.add_block_count(c.n_layers)
    writer.add_feed_forward_length(c.hidden_dim)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_head_count(c.n_heads)
    writer.add_head_count_kv(c.n_kv_heads)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.norm_eps)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if qtype == Q8_0 else gguf.LlamaFileType.ALL_F32)
    add_tokenizer(writer, tok)
    for name, w in {**gguf_tensors(model), **(override or {})}.items():
        if qtype == Q8_0 and w.ndim == 2:
            writer.add_tensor(name, gguf.quants.quantize(w, Q8_0), raw_dtype=Q8_0)
        else:
            writer.add_tensor(name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer):
    """(original model, path) per variant, written once for the module."""
    folder = tmp_path_factory.mktemp("gguf")
    tied, untied = tiny_llama(len(tokenizer), tied=True), tiny_llama(len(tokenizer), tied=False, seed=1)
    return {
        "tied": (tied, write_gguf(folder / "tied.gguf", tied, tokenizer)),
        "untied": (untied, write_gguf(folder / "untied.gguf", untied, tokenizer)),
        "q8_0": (untied, write_gguf(folder / "q8_0.gguf", untied, tokenizer, qtype=Q8_0)),
    }


IDS = torch.randint(0, 302, (2, 24), generator=torch.Generator().manual_seed(0))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids)


# ---- F32 files -----------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["tied", "untied"])
def test_f32_gguf_gives_the_original_model(files, variant):
    original, path = files[variant]
    model, _ = hub.load_gguf(path)
    assert isinstance(model, llama.LlamaForCausalLM)
    # GGUF stores floats as float32: 1e-6 comes back as 9.99999997e-07 (the same value in fp32 math)
    assert model.config.norm_eps == pytest.approx(original.config.norm_eps, rel=1e-7)
    assert replace(model.config, norm_eps=original.config.norm_eps) == original.config
    assert (model.lm_head.weight is model.model.embed.weight) == (variant == "tied")
    for name, w in original.state_dict().items():
        assert torch.equal(model.state_dict()[name], w), name
    expected = logits(original)
    assert expected.std() > 0.5  # big enough that a wrong permutation or swapped norm would show
    torch.testing.assert_close(logits(model), expected)


def test_gguf_tokenizer_encodes_like_the_original(files, tokenizer):
    _, tok = hub.load_gguf(files["tied"][1])
    assert len(tok) == len(tokenizer)
    for text in SAMPLES:
        expected = tokenizer.backend.encode(text).ids
        assert tok.encode(text) == expected, text
        assert tok.decode(expected) == text
    assert tok.encode("<|im_end|>") == [301]  # matched whole, as a special token
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 301, 0)
    messages = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(messages, add_generation_prompt=True) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_lmforge_load_reads_gguf(files, tokenizer):
    original, path = files["untied"]
    model, tok = lmforge.load(path)
    torch.testing.assert_close(logits(model), logits(original))
    assert tok.encode(SAMPLES[0]) == tokenizer.encode(SAMPLES[0])
    torch.testing.assert_close(logits(hub.load_model(path)), logits(original))


def test_a_new_head_on_gguf_weights(files):
    original, path = files["tied"]
    model = hub.load_model(path, architecture="LlamaForSequenceClassification", num_labels=3)
    assert isinstance(model, llama.LlamaForSequenceClassification) and model.score.weight.shape[0] == 3
    for name, w in original.model.state_dict().items():  # the backbone is the file's
        assert torch.equal(model.model.state_dict()[name], w), name
    assert logits(model).shape == (2, 3)
    with pytest.raises(hub.CheckpointError, match="not a Llama one"):
        hub.load_model(path, architecture="BertForSequenceClassification")
    with pytest.raises(ValueError, match="unknown field 'num_label'"):
        hub.load_model(path, architecture="LlamaForSequenceClassification", num_label=3)


def test_info_describes_a_gguf_file(files, capsys):
    original, path = files["tied"]
    assert cli.main(["info", str(path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["format"], info["family"], info["architecture"]) == ("gguf", "llama", "LlamaForCausalLM")
    assert info["parameters"] == sum(p.numel() for p in original.parameters())  # the tied matrix once
    assert info["tokenizer"]["vocab_size"] == 302 and info["tokenizer"]["chat_template"] is True


def test_convert_gguf_to_a_folder_transformers_loads(files, tokenizer, tmp_path):
    tf = pytest.importorskip("transformers")
    original, path = files["untied"]
    assert cli.main(["convert", str(path), str(tmp_path / "out")]) == 0
    hf = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, logits(original))
    hf_tok = tf.AutoTokenizer.from_pretrained(tmp_path / "out")
    for text in SAMPLES:
        assert hf_tok(text)["input_ids"] == tokenizer.backend.encode(text).ids, text
    messages = [{"role": "user", "content": "hi"}]
    assert hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        tokenizer.apply_chat_template(messages, add_generation_prompt=True)


# ---- Q8_0 files ----------------------------------------------------------------------------------

def by_hand(path, config) -> llama.LlamaForCausalLM:
    """The reference import: every tensor of the file dequantized by `gguf` itself, llama.cpp's row
    permutation undone by inverting it on row numbers, loaded into a fresh model by name."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.n_layers)
    to_gguf = {names.get_name(k, try_suffixes=(".weight",)): k
               for k in llama.to_hf_state_dict(llama.LlamaForCausalLM(config).state_dict(), config)}
    state = {}
    for t in gguf.GGUFReader(path).tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
        heads = {"attn_q": config.n_heads, "attn_k": config.n_kv_heads}.get(t.name.split(".")[-2])
        if heads:
            rows = permute(np.arange(w.shape[0])[:, None], heads)[:, 0]  # original row of each stored row
            w = w[np.argsort(rows)]
        state[to_gguf[t.name]] = torch.from_numpy(np.array(w, dtype=np.float32))
    model = llama.LlamaForCausalLM(config).eval()
    model.load_state_dict(llama.from_hf_state_dict(state, config), strict=True)
    return model


def test_q8_0_gguf_adds_no_error_beyond_quantization(files):
    original, path = files["q8_0"]
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == Q8_0 and types["output_norm.weight"] == F32
    model, _ = hub.load_gguf(path)
    reference = by_hand(path, original.config)
    for name, w in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], w), name
    assert torch.equal(logits(model), logits(reference))
    # Q8_0 keeps each block of 32 weights as int8 times one fp16 scale (max|w| / 127): a weight moves
    # by up to half a step, ~0.4% of its block's largest weight (rms ~0.5% of the weights' std). About
    # ten such matmuls lie on the path to a logit (embedding, q/k/v/o, gate/up/down per layer, head),
    # their errors adding in quadrature: ~2% of the logits (measured 1.8-2.2% over four seeds, with
    # single logits off by up to 0.11 at std 0.85). A bound of 5% leaves room for other seeds, while a
    # real import error changes the logits by tens of percent (63% with q/k rows left permuted).
    expected, got = logits(original), logits(model)
    assert not torch.equal(got, expected)  # the file really is quantized
    relative_error = (got - expected).norm() / expected.norm()
    assert 0.005 < relative_error < 0.05


# ---- what is not supported -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, files, tokenizer):
    folder, (model, _) = tmp_path_factory.mktemp("bad"), files["untied"]
    norm = gguf_tensors(model)["blk.0.attn_norm.weight"]
    return {
        "F64": write_gguf(folder / "f64.gguf", model, tokenizer, override={"blk.0.attn_norm.weight":
                                                                          norm.astype(np.float64)}),
        "I32": write_gguf(folder / "i32.gguf", model, tokenizer, override={"blk.0.attn_norm.weight":
                                                                          norm.astype(np.int32)}),
        "falcon": write_gguf(folder / "falcon.gguf", model, tokenizer, arch="falcon"),
    }


@pytest.mark.parametrize("type_name", ["F64", "I32"])
def test_the_gguf_package_cannot_dequantize(type_name):
    """The premise of the next test: these types stay unsupported until `gguf` learns them."""
    with pytest.raises(NotImplementedError):
        gguf.quants.dequantize(np.zeros(4), gguf.GGMLQuantizationType[type_name])


@pytest.mark.parametrize("kind, message", [
    ("F64", "blk.0.attn_norm.weight has type F64"),
    ("I32", "blk.0.attn_norm.weight has type I32"),
    ("falcon", "GGUF architecture 'falcon' is not supported"),
])
def test_unsupported_gguf_says_why(bad_files, kind, message, capsys):
    assert issubclass(hub.CheckpointError, ValueError)
    with pytest.raises(hub.CheckpointError, match=message):
        hub.load_gguf(bad_files[kind])
    assert cli.main(["info", str(bad_files[kind])]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("lmforge info: error: ") and message in err
