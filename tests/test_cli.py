"""The `lmforge` command as a user runs it: every verb on tiny models saved as Hugging Face folders.

Most tests call `cli.main(argv)` in-process (fast, capsys sees stdout/stderr); two run the installed
console script in a subprocess to prove the entry point works.
"""

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmforge import cli
from lmforge.models import bert, hub, llama
from lmforge.tokenizer import Tokenizer, train_tokenizer

TEXT = """The quick brown fox jumps over the lazy dog. The dog sleeps while the fox runs away.
Once upon a time there lived a fox and a dog, and they were friends for a long time.
"""
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
PROMPT = "Once upon a time"


# ---- fixtures: tiny models saved as folders -------------------------------------------------------

@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(TEXT * 20, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def chat_tokenizer(corpus) -> Tokenizer:
    """A byte-level BPE (all 256 bytes + merges) with ChatML special tokens and template."""
    tok = train_tokenizer("bpe", [corpus], vocab_size=300)
    tok.backend.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok.chat_template = CHATML
    return tok


def tiny_llama(tok: Tokenizer, train_steps: int) -> llama.LlamaForCausalLM:
    """A tied Llama with a context of 64 tokens, trained `train_steps` steps on TEXT."""
    torch.manual_seed(0)
    config = llama.LlamaConfig(vocab_size=len(tok), dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64,
                               max_len=64, tie_embeddings=True, bos_token_id=tok.bos_id,
                               eos_token_id=tok.token_to_id("<|im_end|>"), pad_token_id=tok.pad_id)
    model = llama.LlamaForCausalLM(config)
    ids = torch.tensor(tok.encode(TEXT * 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(train_steps):
        starts = torch.randint(0, len(ids) - 33, (8,)).tolist()
        batch = torch.stack([ids[i:i + 33] for i in starts])  # (8, 33)
        loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, chat_tokenizer) -> Path:
    """40 steps: it continues the story in words ("... there lived a fox"), yet sampling still varies."""
    return hub.save(tiny_llama(chat_tokenizer, train_steps=40), tmp_path_factory.mktemp("models") / "llama",
                    chat_tokenizer)


@pytest.fixture(scope="module")
def babbler_dir(tmp_path_factory, chat_tokenizer) -> Path:
    """Untrained, with large weights: it emits stray UTF-8 continuation bytes, never whole characters."""
    model = tiny_llama(chat_tokenizer, train_steps=0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3) if p.ndim == 2 else p.fill_(1.0)
    return hub.save(model, tmp_path_factory.mktemp("models") / "babbler", chat_tokenizer)


@pytest.fixture(scope="module")
def llama_model(llama_dir):
    return hub.load_model(llama_dir), Tokenizer.from_dir(llama_dir)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return hub.save(bert.BertModel(bert.PRESETS["bert-tiny"]), tmp_path_factory.mktemp("models") / "bert")


def run(capsys, *argv, stdin: str | None = None, monkeypatch=None) -> tuple[int, str, str]:
    """`lmforge argv...` in-process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    status = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def continuation(model, tok, prompt_ids: list[int], **kwargs) -> str:
    """What the CLI must print: the new tokens of `model.generate`, special tokens skipped."""
    ids = torch.tensor([prompt_ids])
    new = model.generate(ids, tokenizer=tok, **kwargs)[0, ids.shape[1]:]
    return tok.decode(new, skip_special_tokens=True)


def assert_user_error(status: int, out: str, err: str, verb: str, message: str) -> None:
    assert status == 2, (out, err)
    assert "Traceback" not in err
    assert err.endswith("\n") and err.count("\n") == 1, err  # exactly one line
    assert err.startswith(f"lmforge {verb}: error: ") and message in err, err


# ---- help ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("verb", [[], ["generate"], ["chat"], ["info"], ["convert"], ["tokenizer"],
                                  ["tokenizer", "train"]])
def test_every_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main([*verb, "--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {' '.join(['lmforge', *verb])} ")
    if verb in (["generate"], ["chat"]):
        assert "--max-new-tokens" in out and "--temperature" in out and "--stop" in out


# ---- generate ------------------------------------------------------------------------------------

def test_generate_greedy_prints_only_the_continuation(llama_dir, llama_model, capsys):
    model, tok = llama_model
    expected = continuation(model, tok, tok.encode(PROMPT), max_new_tokens=12)
    assert expected.strip()
    first = run(capsys, "generate", llama_dir, "--prompt", PROMPT, "--max-new-tokens", 12, "--greedy")
    assert first == (0, expected + "\n", "")
    assert run(capsys, "generate", llama_dir, "--prompt", PROMPT, "--max-new-tokens", 12, "--greedy") == first


def test_generate_sampling_is_reproducible_with_a_seed(llama_dir, llama_model, capsys):
    model, tok = llama_model
    args = ["generate", llama_dir, "--prompt", PROMPT, "--max-new-tokens", 16, "--temperature", 0.8]
    status, out, _ = run(capsys, *args, "--seed", 1)
    assert status == 0 and run(capsys, *args, "--seed", 1)[1] == out
    assert out == continuation(model, tok, tok.encode(PROMPT), max_new_tokens=16, do_sample=True,
                               temperature=0.8, seed=1) + "\n"
    assert run(capsys, *args, "--seed", 2)[1] != out  # the seed matters: the little-trained model is unsure


def test_generate_stops_after_the_stop_string(llama_dir, llama_model, capsys):
    """As in transformers, generation ends with the token that completes the stop string: the
    output includes the stop string (and the rest of that last token), nothing after it."""
    model, tok = llama_model
    ids = torch.tensor([tok.encode(PROMPT)])
    new = model.generate(ids, max_new_tokens=24)[0, ids.shape[1]:].tolist()
    texts = [tok.decode(new[:k], skip_special_tokens=True) for k in range(len(new) + 1)]
    stop = next(t[-2:] for t in texts[8:-1] if t[-2:].isalnum())  # two letters seen before the end
    first = next(k for k, text in enumerate(texts) if stop in text)  # the token that completes it
    status, out, _ = run(capsys, "generate", llama_dir, "--prompt", PROMPT, "--max-new-tokens", 24, "--stop", stop)
    assert (status, out) == (0, texts[first] + "\n")
    assert len(texts[first]) < len(texts[-1])  # the stop string really cut the output short


def test_generate_prints_partial_characters_as_decoding_does(babbler_dir, capsys):
    """Output ending inside a multi-byte character shows U+FFFD, as `decode` (and transformers'
    TextStreamer) does; streaming holds such bytes back, but must not drop them at the end."""
    model, tok = hub.load(babbler_dir)
    expected = continuation(model, tok, tok.encode(PROMPT), max_new_tokens=12)
    assert expected.endswith("\ufffd")
    status, out, _ = run(capsys, "generate", babbler_dir, "--prompt", PROMPT, "--max-new-tokens", 12)
    assert (status, out) == (0, expected + "\n")


# ---- chat ----------------------------------------------------------------------------------------

def expected_chat(model, tok, messages: list[str], max_new_tokens: int) -> str:
    """Each answer generated from the whole conversation so far, one line per answer."""
    conversation, lines = [], []
    for message in messages:
        conversation.append({"role": "user", "content": message})
        ids = tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
        assert len(ids) + max_new_tokens <= model.config.max_len  # nothing dropped to fit the context
        answer = continuation(model, tok, ids, max_new_tokens=max_new_tokens)
        conversation.append({"role": "assistant", "content": answer.strip()})
        lines.append(answer + "\n")
    return "".join(lines)


def test_chat_answers_each_message_with_the_template(llama_dir, llama_model, capsys):
    model, tok = llama_model
    expected = expected_chat(model, tok, ["hi", "again"], max_new_tokens=6)
    assert expected.count("\n") >= 2
    status, out, err = run(capsys, "chat", llama_dir, "-m", "hi", "-m", "again", "--max-new-tokens", 6)
    assert (status, out, err) == (0, expected, "")


def test_chat_reads_turns_from_piped_stdin(llama_dir, llama_model, capsys, monkeypatch):
    model, tok = llama_model
    expected = expected_chat(model, tok, ["hi", "again"], max_new_tokens=6)
    status, out, err = run(capsys, "chat", llama_dir, "--max-new-tokens", 6, stdin="hi\n\nagain\n",
                         monkeypatch=monkeypatch)
    assert (status, out, err) == (0, expected, "")  # blank lines are no turns; no `you>` prompt when piped


# ---- info and convert ----------------------------------------------------------------------------

def test_info_prints_json(llama_dir, llama_model, capsys):
    model, tok = llama_model
    status, out, _ = run(capsys, "info", llama_dir)
    info = json.loads(out)
    unique = sum(p.numel() for p in model.parameters())  # parameters() lists the tied weight once
    assert unique < sum(t.numel() for t in model.state_dict().values())  # ...which state_dict() does not
    assert status == 0
    assert (info["family"], info["architecture"], info["format"]) == ("llama", "LlamaForCausalLM", "huggingface")
    assert info["parameters"] == unique
    assert info["tokenizer"]["vocab_size"] == len(tok) == 302 and info["tokenizer"]["chat_template"] is True
    assert info["config"]["max_position_embeddings"] == 64 and "model.safetensors" in info["files"]


def test_convert_copies_and_refuses_to_overwrite(llama_dir, llama_model, tmp_path, capsys):
    model, tok = llama_model
    dst = tmp_path / "copy"
    status, out, err = run(capsys, "convert", llama_dir, dst)
    assert (status, out, err) == (0, "", f"wrote {dst}\n")
    copy, copy_tok = hub.load(dst)
    ids = torch.tensor([tok.encode(PROMPT)])
    with torch.no_grad():
        torch.testing.assert_close(copy(ids), model(ids))
    assert copy_tok.encode(TEXT) == tok.encode(TEXT) and copy_tok.chat_template == CHATML

    (dst / "notes.txt").write_text("mine")
    assert_user_error(*run(capsys, "convert", llama_dir, dst), "convert", "already exists")
    assert (dst / "notes.txt").read_text() == "mine"
    assert run(capsys, "convert", llama_dir, dst, "--force")[0] == 0
    assert not (dst / "notes.txt").exists() and (dst / "model.safetensors").is_file()


def test_convert_error_names_the_force_flag(llama_dir, tmp_path, capsys):
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep.txt").write_text("mine")
    assert_user_error(*run(capsys, "convert", llama_dir, tmp_path / "dst"), "convert", "--force")


# ---- tokenizer train -----------------------------------------------------------------------------

@pytest.mark.parametrize("kind, vocab_size", [("bpe", 300), ("wordpiece", 120), ("unigram", 120)])
def test_tokenizer_train_writes_a_loadable_folder(kind, vocab_size, corpus, tmp_path, capsys):
    out_dir = tmp_path / kind
    status, out, err = run(capsys, "tokenizer", "train", "--kind", kind, "--vocab-size", vocab_size,
                           "--output", out_dir, corpus)
    assert status == 0 and out == ""
    tok = Tokenizer.from_dir(out_dir)
    assert err.endswith(f"wrote {out_dir} ({len(tok)} tokens)\n")
    assert 40 < len(tok) <= vocab_size  # byte-level BPE: 256 bytes + <|endoftext|> + merges
    text = "the quick brown fox jumps over the lazy dog"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) < len(text) and tok.decode(ids) == text  # merged pieces, decoded back exactly


# ---- errors: one line on stderr, status 2, no traceback --------------------------------------------

def test_missing_model_path(tmp_path, capsys):
    assert_user_error(*run(capsys, "generate", tmp_path / "nope", "--prompt", "x"), "generate", "no such file")


def test_missing_relative_path_that_looks_like_a_hub_id(tmp_path, capsys, monkeypatch):
    """`runs/model` (a typo) is tried on the Hugging Face Hub too; its long error must stay one line."""
    huggingface_hub = pytest.importorskip("huggingface_hub")

    def offline(repo_id, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError(
            "Got: ConnectError: no network\nAn error happened while trying to locate the files on the Hub.")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.chdir(tmp_path)
    assert_user_error(*run(capsys, "info", "runs/model"), "info", "runs/model: no such file or folder")


def test_unsupported_model_type(tmp_path, capsys):
    (tmp_path / "mamba").mkdir()
    (tmp_path / "mamba" / "config.json").write_text('{"model_type": "mamba"}')
    assert_user_error(*run(capsys, "info", tmp_path / "mamba"), "info", "unsupported model_type 'mamba'")


def test_prompt_longer_than_the_context(llama_dir, capsys):
    status, out, err = run(capsys, "generate", llama_dir, "--prompt", TEXT, "--max-new-tokens", 4)
    assert_user_error(status, out, err, "generate", "exceeds the model's context length (64)")
    assert out == ""


@pytest.mark.parametrize("verb", ["generate", "chat"])
def test_an_encoder_cannot_generate(verb, bert_dir, capsys):
    args = ["--prompt", "hello"] if verb == "generate" else ["-m", "hello"]
    assert_user_error(*run(capsys, verb, bert_dir, *args), verb, "is an encoder (BertModel)")


# ---- the installed console script ----------------------------------------------------------------

def console_script() -> str:
    script = shutil.which("lmforge") or Path(sys.executable).parent / "lmforge"
    if not Path(script).is_file():
        pytest.skip("the lmforge console script is not installed (pip install -e .)")
    return str(script)


def test_console_script_help():
    result = subprocess.run([console_script(), "--help"], check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.startswith("usage: lmforge ")
    assert all(verb in result.stdout for verb in ("generate", "chat", "info", "convert", "tokenizer"))


def test_console_script_error_exit(tmp_path):
    result = subprocess.run([console_script(), "info", str(tmp_path / "nope")], check=False, capture_output=True,
                            text=True, timeout=120)
    assert_user_error(result.returncode, result.stdout, result.stderr, "info", "no such file or folder")
