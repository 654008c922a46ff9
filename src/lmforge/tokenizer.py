"""Tokenizers: train, load and save them in the Hugging Face format, and render chat templates.

Everything that cuts text into tokens is the `tokenizers` library (Rust); this file only assembles
its parts and keeps the metadata around them (named special tokens, chat template, max length):

    text ──► normalizer ──► pre-tokenizer ──► model (BPE / WordPiece / Unigram) ──► post-processor ──► ids
    ids  ──► decoder ──► text

Three ways in, one way out:

    Tokenizer.from_dir(folder)          tokenizer.json (+ tokenizer_config.json), or a BERT vocab.txt
    Tokenizer.from_gguf_fields(fields)  the vocabulary stored in a GGUF file's metadata (byte-level BPE)
    train_tokenizer(kind, files, ...)   byte-level BPE (GPT-2), WordPiece (BERT) or Unigram (T5)
    tok.save(folder)                    tokenizer.json + tokenizer_config.json + special_tokens_map.json

A saved folder loads in `transformers.AutoTokenizer.from_pretrained(folder)` and encodes identically:
the config names `PreTrainedTokenizerFast`, which (unlike family classes such as `BertTokenizer` in
transformers 5) takes the pipeline from tokenizer.json as it is instead of rebuilding parts of it.
CJK text works in every kind: byte-level BPE round-trips any text exactly, WordPiece puts each CJK
character in its own token, and Unigram learns CJK pieces like any other.
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as Backend

SPECIAL_NAMES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")   # HF's order; saved as `<name>_token`
BERT_SPECIALS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
GPT_SPECIAL = "<|endoftext|>"
T5_SPECIALS = {"pad": "<pad>", "eos": "</s>", "unk": "<unk>"}       # ids 0, 1, 2 as in T5
_HF_UNLIMITED = int(1e29)       # transformers writes ~1e30 for "no known maximum length"


class Tokenizer:
    """A `tokenizers.Tokenizer` plus its named special tokens, chat template and maximum length.

    Args:
        backend: the `tokenizers.Tokenizer` doing the work (normalizer ... decoder).
        special_tokens: role -> token string, roles from `SPECIAL_NAMES`, e.g. {"eos": "</s>"}.
        chat_template: a jinja2 chat template, as in tokenizer_config.json.
        model_max_length: the longest input the model was trained on, if known.
    """

    def __init__(self, backend: Backend, special_tokens: dict | None = None, chat_template: str | None = None,
                 model_max_length: int | None = None):
        self.backend = backend
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        unknown = set(self.special_tokens) - set(SPECIAL_NAMES)
        assert not unknown, f"unknown special token roles {unknown}"
        self.chat_template = chat_template
        self.model_max_length = model_max_length
        # transformers registers every named special token as a special added token (matched whole in
        # text, dropped by skip_special_tokens); do the same so both encode "[CLS]" or "</s>" alike.
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for t in self.special_tokens.values()])
        # Padding/truncation baked into some tokenizer.json files (e.g. sentence-transformers' fixed
        # 128) would silently change encode(); batching and truncation belong to the data code.
        backend.no_padding()
        backend.no_truncation()

    # ---- loading -------------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path) -> Tokenizer:
        """Load a Hugging Face tokenizer folder: tokenizer.json, or a BERT vocab.txt when there is none.

        tokenizer_config.json / special_tokens_map.json give the special tokens, `model_max_length`
        and `chat_template` (a chat_template.jinja file wins over the config, as in transformers).
        """
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"tokenizer folder {folder} does not exist (or is not a folder)")
        config = _read_json(folder / "tokenizer_config.json")
        specials = _special_tokens_from_config(config, _read_json(folder / "special_tokens_map.json"))
        if (folder / "tokenizer.json").is_file():
            backend = Backend.from_file(str(folder / "tokenizer.json"))
        elif (folder / "vocab.txt").is_file():
            specials = {**BERT_SPECIALS, **specials}
            backend = _bert_from_vocab(folder / "vocab.txt", config, specials)
        else:
            raise FileNotFoundError(_missing_files_message(folder))
        return cls(backend, specials, _chat_template(folder, config), _max_length(config))

    @classmethod
    def from_gguf_fields(cls, fields: dict) -> Tokenizer:
        """Build the tokenizer a GGUF file describes, from its metadata as a dict of decoded values.

        Only `tokenizer.ggml.model == "gpt2"` (byte-level BPE: SmolLM2, Llama 3, Qwen2, ...) is
        supported. The result encodes like `AutoTokenizer.from_pretrained(dir, gguf_file=...)`.
        """
        kind = fields.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(f"GGUF tokenizer.ggml.model is {kind!r}; only 'gpt2' (byte-level BPE) is "
                             "supported. Load the model's Hugging Face tokenizer folder instead (from_dir).")
        if "tokenizer.ggml.merges" not in fields:
            raise ValueError("GGUF metadata has no tokenizer.ggml.merges; a byte-level BPE needs them")
        tokens = list(fields["tokenizer.ggml.tokens"])
        merges, pre = fields["tokenizer.ggml.merges"], fields.get("tokenizer.ggml.pre")
        backend = _gguf_byte_level_bpe(tokens, merges, pre)
        _add_gguf_added_tokens(backend, tokens, fields.get("tokenizer.ggml.token_type") or [])
        specials = {name: tokens[fields[key]] for name, key in _GGUF_SPECIAL_IDS.items()
                    if fields.get(key) is not None}
        backend.post_processor = _bos_eos_template(
            backend, specials.get("bos"), specials.get("eos"),
            bool(fields.get("tokenizer.ggml.add_bos_token", False)),
            bool(fields.get("tokenizer.ggml.add_eos_token", False)))
        context = fields.get(f"{fields.get('general.architecture')}.context_length")
        return cls(backend, specials, fields.get("tokenizer.chat_template"), context)

    # ---- encoding ------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` lets the post-processor add e.g. [CLS] ... [SEP]."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Token ids of many texts, encoded in parallel by the Rust library."""
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def encode_pair(self, a: str, b: str, add_special_tokens: bool = True) -> tuple[list[int], list[int]]:
        """A sentence pair (BERT: [CLS] a [SEP] b [SEP]) -> (input_ids, token_type_ids), both of length T."""
        enc = self.backend.encode(a, b, add_special_tokens=add_special_tokens)
        return enc.ids, enc.type_ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of token ids (a list or a 1-D tensor)."""
        ids = ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, id: int) -> str | None:
        return self.backend.id_to_token(int(id))

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included: the size a model's embedding needs."""
        return len(self)

    @property
    def special_ids(self) -> set[int]:
        """Ids of every special token (named ones and e.g. `<|im_start|>`), the ones decode can skip."""
        return {i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}

    def _special_id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self.backend.token_to_id(token)

    bos_id = property(lambda self: self._special_id("bos"), doc="Id of the begin-of-sequence token, or None.")
    eos_id = property(lambda self: self._special_id("eos"), doc="Id of the end-of-sequence token, or None.")
    pad_id = property(lambda self: self._special_id("pad"), doc="Id of the padding token, or None.")
    unk_id = property(lambda self: self._special_id("unk"), doc="Id of the unknown token, or None.")
    mask_id = property(lambda self: self._special_id("mask"), doc="Id of the mask token (MLM), or None.")
    cls_id = property(lambda self: self._special_id("cls"), doc="Id of the classifier token, or None.")
    sep_id = property(lambda self: self._special_id("sep"), doc="Id of the separator token, or None.")

    def __repr__(self) -> str:
        model = type(self.backend.model).__name__
        return f"Tokenizer({model}, vocab={len(self)}, special={self.special_tokens})"

    # ---- chat ----------------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False,
                            tokenize: bool = False, **extra):
        """Render a conversation with the model's chat template, exactly as transformers does.

        Args:
            messages: [{"role": "system" | "user" | "assistant", "content": str}, ...].
            add_generation_prompt: end with the header that starts the assistant's turn.
            tokenize: return token ids (no special tokens added around them) instead of the text.
            extra: more template variables (`tools`, `documents`, `enable_thinking`, ...).
        Returns:
            The rendered text, or its ids when `tokenize`.
        """
        if not self.chat_template:
            raise ValueError("This tokenizer has no chat template, so it cannot format chat messages. Add "
                             "one: set `tokenizer.chat_template = '<jinja template>'`, or put a "
                             "\"chat_template\" string in the folder's tokenizer_config.json (or a "
                             "chat_template.jinja file).")
        # Like transformers: keys whose value is None are dropped (templates test for missing keys).
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        variables = {f"{name}_token": token for name, token in self.special_tokens.items()}
        variables.update(tools=None, documents=None)
        variables.update(extra)
        text = _compile_template(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **variables)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    # ---- saving --------------------------------------------------------------------------------

    def save(self, path) -> Path:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `path`.

        Each file is written atomically (temp file in the same folder, then `os.replace`), so a crash
        never leaves a half-written tokenizer behind. Returns the folder.
        """
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        named = {f"{name}_token": token for name, token in self.special_tokens.items()}
        _write_atomic(folder / "tokenizer.json", self.backend.to_str(pretty=True))
        _write_atomic(folder / "tokenizer_config.json", _dump_json(self._hf_config(named)))
        _write_atomic(folder / "special_tokens_map.json", _dump_json(named))
        return folder

    def _hf_config(self, named: dict) -> dict:
        """tokenizer_config.json: what transformers needs on top of tokenizer.json."""
        inputs = ["input_ids", "attention_mask"]
        if self.cls_id is not None:     # BERT-style models take segment ids too
            inputs.insert(1, "token_type_ids")
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **named,
            # transformers' extra cleanup would strip spaces before punctuation that decode() keeps
            "clean_up_tokenization_spaces": False,
            "model_input_names": inputs,
        }
        if self.model_max_length:
            config["model_max_length"] = self.model_max_length
        if self.chat_template:
            config["chat_template"] = self.chat_template
        return config


# ---- training ----------------------------------------------------------------------------------

def train_tokenizer(kind: str, files, vocab_size: int, output=None, min_frequency: int = 2,
                    lowercase: bool = False) -> Tokenizer:
    """Train a tokenizer on text files, streamed by the Rust library (with its progress bars).

    Args:
        kind: "bpe" (byte-level, GPT-2 style, for decoders), "wordpiece" (BERT), "unigram" (T5) or
            "char" (one token per character, as nanoGPT's character-level models).
        files: a file, a folder (all its *.txt files, sorted) or a list of them.
        vocab_size: wanted vocabulary size, special tokens included. WordPiece and Unigram always keep
            every character they saw, so with many CJK characters the result can be larger.
        output: if given, save the trained tokenizer into this folder.
        min_frequency: a BPE/WordPiece merge must be seen this often (Unigram has no such knob).
        lowercase: lowercase the text first (WordPiece also strips accents then, as uncased BERT).
    """
    builders = {"bpe": _new_byte_level_bpe, "wordpiece": _new_wordpiece, "unigram": _new_unigram,
                "char": _new_char_level}
    if kind not in builders:
        raise ValueError(f"unknown tokenizer kind {kind!r}; choose one of: {', '.join(builders)}")
    paths = _training_files(files)
    backend, trainer, specials = builders[kind](vocab_size, min_frequency, lowercase)
    try:
        backend.train([str(p) for p in paths], trainer)
    except Exception as e:      # the Rust trainer raises a bare Exception
        if "not large enough" not in str(e):
            raise
        raise ValueError(f"vocab_size={vocab_size} is too small for a {kind} tokenizer of these files: it "
                         "must hold every distinct character (CJK text has thousands); raise vocab_size"
                         ) from e
    if kind == "wordpiece":     # the template needs the ids, which exist only after training
        backend.post_processor = _bert_template(backend, specials["cls"], specials["sep"])
    elif kind == "unigram":
        backend.post_processor = _bos_eos_template(backend, None, specials["eos"], False, True)
    tokenizer = Tokenizer(backend, specials)
    if output is not None:
        tokenizer.save(output)
    return tokenizer


def _training_files(files) -> list[Path]:
    """Expand files and folders (their *.txt, sorted) into a list of files; fail on anything missing."""
    items = [files] if isinstance(files, (str, os.PathLike)) else list(files)
    paths = []
    for item in map(Path, items):
        if item.is_dir():
            found = sorted(item.glob("*.txt"))
            if not found:
                raise ValueError(f"training folder {item} has no *.txt files")
            paths += found
        elif item.is_file():
            paths.append(item)
        else:
            raise FileNotFoundError(f"training file {item} does not exist")
    if not paths:
        raise ValueError("no training files given")
    return paths


def _new_byte_level_bpe(vocab_size, min_frequency, lowercase):
    """GPT-2: bytes mapped to printable characters, so every text is representable and round-trips."""
    backend = Backend(models.BPE())
    if lowercase:
        backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1")  # no BOS
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=True,
                                  special_tokens=[GPT_SPECIAL],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # all 256 bytes
    return backend, trainer, dict.fromkeys(("bos", "eos", "unk", "pad"), GPT_SPECIAL)


def _new_wordpiece(vocab_size, min_frequency, lowercase):
    """BERT: clean + (lowercase, strip accents) + one token per CJK character, then ##-subwords."""
    backend = Backend(models.WordPiece(unk_token=BERT_SPECIALS["unk"]))
    backend.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                    strip_accents=lowercase, lowercase=lowercase)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=list(BERT_SPECIALS.values()),
                                        continuing_subword_prefix="##", show_progress=True)
    return backend, trainer, dict(BERT_SPECIALS)


def _new_unigram(vocab_size, min_frequency, lowercase):
    """T5: SentencePiece-style Unigram, spaces kept as '▁' so decoding restores them."""
    backend = Backend(models.Unigram())
    if lowercase:
        backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, show_progress=True, unk_token=T5_SPECIALS["unk"],
                                      special_tokens=list(T5_SPECIALS.values()))
    return backend, trainer, dict(T5_SPECIALS)


def _new_char_level(vocab_size, min_frequency, lowercase):
    """Every character its own token (nanoGPT's shakespeare_char): unseen characters map to unk."""
    backend = Backend(models.WordLevel(unk_token=GPT_SPECIAL))
    if lowercase:
        backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"(?m:.)"), behavior="isolated")  # (?m) = dot matches newlines in Oniguruma
    backend.decoder = decoders.Fuse()
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=True,
                                        special_tokens=[GPT_SPECIAL])
    return backend, trainer, dict.fromkeys(("bos", "eos", "unk", "pad"), GPT_SPECIAL)


# ---- pieces shared by the builders --------------------------------------------------------------

def _bos_eos_template(backend, bos, eos, add_bos, add_eos):
    """The post-processor transformers builds from add_bos_token / add_eos_token (`update_post_processor`)."""
    add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
    b, e = (f"{bos}:0 " if add_bos else ""), (f" {eos}:0" if add_eos else "")
    single = f"{b}$A:0{e}"
    pair = f"{single}{f' {bos}:1' if add_bos else ''} $B:1{f' {eos}:1' if add_eos else ''}"
    special = [(t, backend.token_to_id(t)) for t, used in ((bos, add_bos), (eos, add_eos)) if used]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def _bert_template(backend, cls, sep):
    return processors.TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0", pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, backend.token_to_id(cls)), (sep, backend.token_to_id(sep))])


def _bert_from_vocab(vocab_file: Path, config: dict, specials: dict) -> Backend:
    """A BERT WordPiece tokenizer from vocab.txt, built the way transformers' BertTokenizer builds it."""
    vocab = {}
    with open(vocab_file, encoding="utf-8") as f:
        for line in f:          # one token per line, id = line number; keep the first of duplicates
            vocab.setdefault(line.rstrip("\n"), len(vocab))
    backend = Backend(models.WordPiece(vocab, unk_token=specials["unk"]))
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=config.get("tokenize_chinese_chars", True),
        strip_accents=config.get("strip_accents"), lowercase=config.get("do_lower_case", True))
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    backend.post_processor = _bert_template(backend, specials["cls"], specials["sep"])
    return backend


# ---- GGUF ----------------------------------------------------------------------------------------

_GGUF_SPECIAL_IDS = {"bos": "tokenizer.ggml.bos_token_id", "eos": "tokenizer.ggml.eos_token_id",
                     "unk": "tokenizer.ggml.unknown_token_id", "pad": "tokenizer.ggml.padding_token_id"}

# llama.cpp names the split regex a vocabulary was trained with (tokenizer.ggml.pre). transformers
# knows these; any other name (e.g. SmolLM2's "smollm") gets GPT-2's own regex from ByteLevel.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GGUF_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2_SPLIT),
}


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the one ByteLevel uses)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]   # "!"-"~" "¡"-"¬" "®"-"ÿ"
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def _gguf_byte_level_bpe(tokens: list[str], merges: list[str], pre: str | None) -> Backend:
    """BPE over GPT-2's byte alphabet, as transformers' GGUF converter builds it (GPT2Tokenizer)."""
    spell = _byte_alphabet()
    alphabet = set(spell.values())
    # Tokens llama.cpp stored as raw text (outside the byte alphabet) are re-spelled in it.
    vocab = {t if set(t) <= alphabet else "".join(spell[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ")) for m in merges]
    backend = Backend(models.BPE(vocab, pairs, dropout=None, continuing_subword_prefix="",
                                 end_of_word_suffix="", fuse_unk=False))
    split = _GGUF_SPLITS.get(pre)
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    return backend


def _add_gguf_added_tokens(backend: Backend, tokens: list[str], token_types: list[int]) -> None:
    """CONTROL tokens (type 3, e.g. <|im_start|>) become special, USER_DEFINED (4) plain added tokens.

    Both are matched whole in text. A control token outside the byte alphabet is a llama.cpp
    mislabel that transformers skips (adding it would grow the vocabulary), so we skip it too.
    """
    alphabet = set(_byte_alphabet().values())
    control = [AddedToken(t, special=True, normalized=False)
               for t, kind in zip(tokens, token_types, strict=False) if kind == 3 and set(t) <= alphabet]
    backend.add_special_tokens(control)
    vocab = backend.get_vocab()
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, kind in zip(tokens, token_types, strict=False) if kind == 4 and t in vocab])


# ---- chat templates ------------------------------------------------------------------------------

class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks in transformers.

    Rendering only needs the body, but the tag must parse, or such templates fail to compile.
    """
    tags = frozenset({"generation"})

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson escapes HTML characters (<, >, &), which would change the prompt text
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


@lru_cache(maxsize=8)
def _compile_template(template: str) -> jinja2.Template:
    """The environment transformers renders chat templates in: sandboxed (templates come from the
    internet), trim_blocks + lstrip_blocks, loop controls, and the same helper functions."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


# ---- files ---------------------------------------------------------------------------------------

def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def _token_text(value) -> str | None:
    """A special token as written in HF configs: a string or an AddedToken dict {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


def _special_tokens_from_config(config: dict, special_map: dict) -> dict:
    """Named special tokens. As transformers does, special_tokens_map.json overrides the config's
    values unless the config is a modern one (it then has `added_tokens_decoder`)."""
    merged = dict(config)
    if "added_tokens_decoder" not in config:
        merged.update(special_map)
    tokens = {name: _token_text(merged.get(f"{name}_token")) for name in SPECIAL_NAMES}
    return {name: t for name, t in tokens.items() if isinstance(t, str)}


def _chat_template(folder: Path, config: dict) -> str | None:
    """chat_template.jinja if present, else the config's string, or its "default" entry when the
    config holds a list of named templates."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        template = {t.get("name"): t.get("template") for t in template}.get("default")
    return template


def _max_length(config: dict) -> int | None:
    value = config.get("model_max_length")
    return int(value) if isinstance(value, (int, float)) and value < _HF_UNLIMITED else None


def _missing_files_message(folder: Path) -> str:
    found = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
    hint = ""
    if (folder / "tokenizer.model").is_file():
        hint = (" It has a SentencePiece tokenizer.model, which lmforge does not read; convert it once with "
                "transformers: AutoTokenizer.from_pretrained(folder).save_pretrained(folder).")
    return f"no tokenizer.json or vocab.txt in tokenizer folder {folder} (it has: {found}).{hint}"


def _dump_json(obj) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    """Write to a temp file next to `path`, then rename over it: readers see the old or the new file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)    # mkstemp makes it private; a tokenizer file is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
