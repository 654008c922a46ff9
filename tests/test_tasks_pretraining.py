"""Pretraining objectives on real text: BERT masked LM + next-sentence prediction, T5 span corruption.

Data: chapters of 西游记 (documents) cut into sentences at 。！？ (segments), tokenized with a
WordPiece (BERT) or Unigram (T5) tokenizer trained on the same slice; whole-word masking uses
English (tinyshakespeare), since WordPiece has no `##` pieces in Chinese.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmforge.models.bert import BertConfig, BertForPreTraining
from lmforge.models.t5 import T5Config, T5ForConditionalGeneration
from lmforge.tasks.mlm import MaskedLM, truncate_seq_pair
from lmforge.tasks.span import (
    SpanCorruption,
    add_sentinel_tokens,
    compute_input_and_target_lengths,
    corrupt,
    random_spans_noise_mask,
    sentinel_ids,
)
from lmforge.tokenizer import Tokenizer, train_tokenizer

DATA = Path(os.environ.get("LMFORGE_DATA", Path(__file__).resolve().parents[2] / "shared/data"))


class Shards:
    """Stand-in for lmforge.data.shards.TokenShards: documents of sentences, each document ended by `sep`."""

    def __init__(self, docs: list[list[list[int]]], sep: int, segments: bool = True):
        tokens, doc_starts, seg_starts = [], [0], []
        for doc in docs:
            for sentence in doc:
                seg_starts.append(len(tokens))
                tokens += sentence
            tokens.append(sep)
            doc_starts.append(len(tokens))
        self.tokens = np.array(tokens, np.uint16)
        self.doc_starts = np.array(doc_starts, np.int64)
        self.segment_starts = np.array([*seg_starts, len(tokens)], np.int64) if segments else None
        self.num_documents = len(docs)

    def document(self, i: int) -> np.ndarray:
        return self.tokens[self.doc_starts[i] : self.doc_starts[i + 1]]


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data not found at {path} (set LMFORGE_DATA to the data folder)")
    return path


def _chapters(n: int) -> list[str]:
    text = _need(DATA / "zh/novels/西游记.txt").read_text(encoding="utf-8")
    return [c for c in re.split(r"\n(?=第.{1,5}回)", text) if c.strip()][:n]


def _sentences(chapter: str) -> list[str]:
    return [s.strip() for s in re.findall(r"[^。！？]+[。！？]?", chapter) if s.strip()]


def _corpus(tok: Tokenizer, chapters: list[str], sep: int, segments: bool = True) -> Shards:
    docs = [[ids for ids in tok.encode_batch(_sentences(c), add_special_tokens=False) if ids] for c in chapters]
    return Shards(docs, sep, segments)


@pytest.fixture(scope="module")
def zh(tmp_path_factory):
    """(WordPiece tokenizer, train shards, val shards, chapter texts without whitespace)."""
    chapters = _chapters(14)
    slice_file = tmp_path_factory.mktemp("zh") / "xyj.txt"
    slice_file.write_text("\n".join(chapters), encoding="utf-8")
    tok = train_tokenizer("wordpiece", slice_file, 3000)
    train, val = _corpus(tok, chapters[:10], tok.sep_id), _corpus(tok, chapters[10:], tok.sep_id)
    texts = ["".join(tok.decode(tok.encode(c, add_special_tokens=False)).split()) for c in chapters[:10]]
    return tok, train, val, texts  # texts as the tokenizer normalizes them, without whitespace


@pytest.fixture(scope="module")
def zh_t5(tmp_path_factory):
    """(Unigram tokenizer, train shards, val shards) of a smaller slice."""
    chapters = _chapters(6)
    slice_file = tmp_path_factory.mktemp("zh_t5") / "xyj.txt"
    slice_file.write_text("\n".join(chapters), encoding="utf-8")
    tok = train_tokenizer("unigram", slice_file, 4000)
    return tok, _corpus(tok, chapters[:5], tok.eos_id), _corpus(tok, chapters[5:], tok.eos_id)


def _mlm(zh, **kw) -> MaskedLM:
    tok, train, val, _ = zh
    args = {"seq_len": 64, "batch_size": 8, "seed": 3, **kw}
    return MaskedLM(train, val, tok, vocab_size=len(tok), **args)


def _batches(task, n: int) -> list[dict]:
    return [task.train_batch(i) for i in range(n)]


def _original(batch: dict) -> torch.Tensor:
    """The unmasked ids: labels where chosen, the input elsewhere."""
    return torch.where(batch["labels"] != -100, batch["labels"], batch["input_ids"])


class Stream:
    """Find token sequences in a shard's token stream (aligned byte search)."""

    def __init__(self, shards: Shards):
        self.shards, self.hay = shards, shards.tokens.astype(np.int32).tobytes()

    def find(self, seq) -> list[int]:
        needle, found = np.asarray(seq, np.int32).tobytes(), []
        i = self.hay.find(needle)
        while i != -1:
            if i % 4 == 0:
                found.append(i // 4)
            i = self.hay.find(needle, i + 1)
        return found

    def doc(self, offset: int) -> int:
        return int(np.searchsorted(self.shards.doc_starts, offset, side="right")) - 1


def _split_pair(ids: list[int], sep: int) -> tuple[list[int], list[int]]:
    """[CLS] A [SEP] B [SEP] (unpadded) -> (A, B)."""
    first = ids.index(sep)
    return ids[1:first], ids[first + 1 : -1]


# ---- masked LM -----------------------------------------------------------------------------------

def test_masking_statistics_match_bert(zh):
    tok = zh[0]
    task = _mlm(zh, seq_len=128, batch_size=16)
    chosen = maskable = masked = unchanged = randomised = 0
    specials = torch.tensor([tok.cls_id, tok.sep_id, tok.pad_id, tok.unk_id])
    for batch in _batches(task, 60):
        orig, inputs, labels = _original(batch), batch["input_ids"], batch["labels"]
        special = torch.isin(orig, specials) | (batch["attention_mask"] == 0)
        picked = labels != -100
        assert not (picked & special).any()  # [CLS] [SEP] [PAD] [UNK] never chosen
        assert torch.equal(inputs[~picked], orig[~picked])  # not chosen: input untouched
        assert torch.equal(inputs[special], orig[special])
        chosen, maskable = chosen + int(picked.sum()), maskable + int((~special).sum())
        masked += int((inputs[picked] == tok.mask_id).sum())
        unchanged += int((inputs[picked] == labels[picked]).sum())
        randomised += int(((inputs[picked] != tok.mask_id) & (inputs[picked] != labels[picked])).sum())
    assert maskable > 100_000
    assert abs(chosen / maskable - 0.15) < 0.005
    assert abs(masked / chosen - 0.8) < 0.015
    assert abs(randomised / chosen - 0.1) < 0.015
    assert abs(unchanged / chosen - 0.1) < 0.015


def test_nsp_pairs_are_real_neighbours_or_other_documents(zh):
    tok, train, _, texts = zh
    task = _mlm(zh, seq_len=64, batch_size=64)
    stream, labels, checked = Stream(train), [], {0: 0, 1: 0}
    for batch in _batches(task, 70):
        labels += batch["next_sentence_label"].tolist()
        assert batch["input_ids"].shape[1] <= 64
        for row in range(len(batch["input_ids"]) if len(labels) <= 640 else 0):
            n = int(batch["attention_mask"][row].sum())
            ids = _original(batch)[row, :n].tolist()
            a, b = _split_pair(ids, tok.sep_id)
            assert ids[0] == tok.cls_id and ids[-1] == tok.sep_id and a and b
            assert tok.sep_id not in a + b and tok.cls_id not in a + b
            types = [0] * (len(a) + 2) + [1] * (len(b) + 1) + [0] * (batch["input_ids"].shape[1] - n)
            assert batch["token_type_ids"][row].tolist() == types
            label = int(batch["next_sentence_label"][row])
            if len(a) >= 8 and len(b) >= 8:
                checked[label] += 1
                _check_pair(stream, texts, tok, a, b, label)
    assert checked[0] > 100 and checked[1] > 100
    assert len(labels) == 4480 and abs(labels.count(0) / len(labels) - 0.5) < 0.03


def _check_pair(stream: Stream, texts: list[str], tok, a: list[int], b: list[int], label: int) -> None:
    """IsNext: B follows A in the same document with a sentence start between (truncation may cut
    A's end / B's front); NotNext: B comes from another document."""
    a_at, b_at = stream.find(a), stream.find(b)
    assert a_at and b_at
    pairs = [(p, q) for p in a_at for q in b_at]
    if label == 0:
        starts = stream.shards.segment_starts
        adjacent = [(p, q) for p, q in pairs if stream.doc(p) == stream.doc(q) and p + len(a) <= q
                    and ((starts >= p + len(a)) & (starts <= q)).any()]
        assert adjacent, "IsNext pair whose B does not follow A"
        p, q = adjacent[0]
        doc_text = texts[stream.doc(p)]
        joined = "".join(tok.decode(stream.shards.tokens[p : q + len(b)]).split())
        assert joined in doc_text and joined.endswith("".join(tok.decode(b).split()))
    else:
        assert any(stream.doc(p) != stream.doc(q) for p, q in pairs), "NotNext pair from one document"


def test_truncate_seq_pair_matches_berts_loop():
    def reference(la, lb, max_tokens, coins):  # Google's truncate_seq_pair on lists
        a, b, coins = list(range(la)), list(range(100, 100 + lb)), iter(coins)
        while len(a) + len(b) > max_tokens:
            trunc = a if len(a) > len(b) else b
            if next(coins) < 0.5:
                del trunc[0]
            else:
                trunc.pop()
        return (a[0], a[-1] + 1), (b[0] - 100, b[-1] - 99)

    for la, lb, max_tokens in [(50, 3, 20), (3, 50, 20), (30, 30, 21), (31, 30, 20), (5, 6, 20), (40, 10, 9)]:
        for seed in range(5):
            excess = max(0, la + lb - max_tokens)
            coins = np.random.default_rng(seed).random(excess)
            got = truncate_seq_pair((0, la), (0, lb), max_tokens, np.random.default_rng(seed))
            assert got == reference(la, lb, max_tokens, coins)


def test_whole_word_masking_keeps_wordpiece_words_together(tmp_path):
    text = _need(DATA / "en/tinyshakespeare.txt").read_text(encoding="utf-8")[:60_000]
    (tmp_path / "s.txt").write_text(text, encoding="utf-8")
    tok = train_tokenizer("wordpiece", tmp_path / "s.txt", 400)
    lines = [ln for ln in text.split("\n") if ln.strip()]
    sentences = tok.encode_batch(lines, add_special_tokens=False)
    shards = Shards([sentences[i : i + 40] for i in range(0, len(sentences), 40)], tok.sep_id)
    piece = np.array([tok.id_to_token(i).startswith("##") for i in range(len(tok))])
    split = {}
    for whole_word in (True, False):
        task = MaskedLM(shards, None, tok, 64, 8, seed=1, whole_word=whole_word, nsp=False)
        split[whole_word] = multi = 0
        for batch in _batches(task, 20):
            ids, picked = _original(batch).numpy(), (batch["labels"] != -100).numpy()
            for row, chosen in zip(ids, picked):
                cont = piece[row] & np.r_[False, row[:-1] > 4]  # a ## piece after a text token
                word = np.cumsum(~cont)
                uneven = [w for w in np.unique(word) if len(set(chosen[word == w])) > 1]
                split[whole_word] += len(uneven)
                multi += int((chosen & cont).sum())
                if whole_word:
                    assert chosen.sum() == round(0.15 * (~np.isin(row, [tok.cls_id, tok.sep_id])).sum())
        assert multi > 20  # ## pieces were chosen
    assert split[True] == 0 and split[False] > 0


def test_no_segment_index_needs_segments_for_nsp(zh):
    tok, train, _, _ = zh
    flat = Shards([[train.tokens[:-1].tolist()]], tok.sep_id, segments=False)
    flat.tokens = train.tokens  # the same stream, documents unrecorded
    with pytest.raises(ValueError, match="data.segments=sentences"):
        MaskedLM(flat, None, tok, 64, 8)
    task = MaskedLM(flat, None, tok, 64, 8, nsp=False)
    batch = task.train_batch(0)
    assert "next_sentence_label" not in batch and batch["input_ids"].shape == (8, 64)
    assert (batch["input_ids"][:, 0] == tok.cls_id).all() and (batch["input_ids"][:, -1] == tok.sep_id).all()
    assert not batch["token_type_ids"].any()
    stream = Stream(train)
    for row in _original(batch):
        assert stream.find(row[1:-1].numpy())  # a window of the stream


def test_mlm_batches_are_deterministic_and_split_over_processes(zh):
    for kw in ({}, {"nsp": False}, {"whole_word": True}):
        task = _mlm(zh, **kw)
        one = task.train_batch(5)
        _assert_same(one, task.train_batch(5))
        assert not torch.equal(one["input_ids"][:, :20], task.train_batch(6)["input_ids"][:, :20])
        for world in (2, 4):
            _assert_same_rows(one, [task.train_batch(5, rank, world) for rank in range(world)])
        evals = list(task.eval_batches())
        assert len(evals) >= 2
        for first, again in zip(evals, task.eval_batches()):
            _assert_same(first, again)
        _assert_same_rows(evals[0], [next(iter(task.eval_batches(rank, 2))) for rank in range(2)])
    with pytest.raises(ValueError, match="divisible"):
        _mlm(zh).train_batch(0, 0, 3)


def _assert_same(x: dict, y: dict) -> None:
    assert x.keys() == y.keys()
    for k, v in x.items():
        assert torch.equal(v, y[k]), k


def _assert_same_rows(whole: dict, shares: list[dict]) -> None:
    """Shares (each padded to its own longest row) hold exactly the global batch's rows, in order."""
    rows = [(s, i) for s in shares for i in range(len(s["input_ids"]))]
    assert len(rows) == len(whole["input_ids"])
    for i, (share, j) in enumerate(rows):
        n = int(whole["attention_mask"][i].sum())
        assert int(share["attention_mask"][j].sum()) == n
        for k, v in whole.items():
            if v.dim() == 1:
                assert v[i] == share[k][j]
            else:
                assert torch.equal(v[i, :n], share[k][j, :n]), k


def test_mlm_loss_is_mean_mlm_plus_mean_nsp(zh):
    tok = zh[0]
    task = _mlm(zh)
    torch.manual_seed(0)
    model = BertForPreTraining(BertConfig(vocab_size=len(tok), dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                          max_len=64, dropout=0.0, attention_dropout=0.0))
    batch = task.train_batch(0)
    total, count = task.loss(model, batch)
    mlm_logits, nsp_logits = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    picked = batch["labels"] != -100
    expected = (F.cross_entropy(mlm_logits[picked], batch["labels"][picked])
                + F.cross_entropy(nsp_logits, batch["next_sentence_label"]))
    assert count == int(picked.sum()) > 0
    torch.testing.assert_close(total / count, expected)
    total.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.nsp.weight.grad.abs().sum() > 0 and model.bert.embeddings.word.weight.grad.abs().sum() > 0
    metrics = task.eval_metrics(model, [batch])
    torch.testing.assert_close(metrics["mlm_loss"] + metrics["nsp_loss"], float(expected.detach()), rtol=1e-5, atol=1e-5)
    assert 0 <= metrics["mlm_accuracy"] <= 1 and 0 <= metrics["nsp_accuracy"] <= 1
    with pytest.raises(ValueError, match="next-sentence head"):
        task.loss(lambda *a, **k: mlm_logits[picked], batch)


# ---- T5 span corruption --------------------------------------------------------------------------
# A direct port of transformers' examples/flax/language-modeling/run_t5_mlm_flax.py (its
# np.random.shuffle replaced by a Generator's shuffle), the reference for the layout.

def _ref_random_spans_noise_mask(length, noise_density, mean_noise_span_length, rng):
    orig_length = length
    num_noise_tokens = int(np.round(length * noise_density))
    num_nonnoise_tokens = length - num_noise_tokens
    num_noise_tokens = min(max(num_noise_tokens, 1), length - 1)
    num_noise_spans = int(np.round(min(num_noise_tokens, num_nonnoise_tokens) / mean_noise_span_length))
    num_noise_spans = max(num_noise_spans, 1)
    num_nonnoise_tokens = length - num_noise_tokens

    def _random_segmentation(num_items, num_segments):
        mask_indices = np.arange(num_items - 1) < (num_segments - 1)
        rng.shuffle(mask_indices)
        first_in_segment = np.pad(mask_indices, [[1, 0]])
        segment_id = np.cumsum(first_in_segment)
        _, segment_length = np.unique(segment_id, return_counts=True)
        return segment_length

    noise_span_lengths = _random_segmentation(num_noise_tokens, num_noise_spans)
    nonnoise_span_lengths = _random_segmentation(num_nonnoise_tokens, num_noise_spans)
    interleaved_span_lengths = np.reshape(np.stack([nonnoise_span_lengths, noise_span_lengths], axis=1),
                                          [num_noise_spans * 2])
    span_starts = np.cumsum(interleaved_span_lengths)[:-1]
    span_start_indicator = np.zeros((length,), dtype=np.int8)
    span_start_indicator[span_starts] = True
    span_num = np.cumsum(span_start_indicator)
    is_noise = np.equal(span_num % 2, 1)
    return is_noise[:orig_length]


def _ref_create_sentinel_ids(mask_indices, tokenizer_len):
    start_indices = mask_indices - np.roll(mask_indices, 1, axis=-1) * mask_indices
    start_indices[:, 0] = mask_indices[:, 0]
    sentinel_ids = np.where(start_indices != 0, np.cumsum(start_indices, axis=-1), start_indices)
    sentinel_ids = np.where(sentinel_ids != 0, (tokenizer_len - sentinel_ids), 0)
    sentinel_ids -= mask_indices - start_indices
    return sentinel_ids


def _ref_filter_input_ids(input_ids, sentinel_ids, eos_token_id):
    batch_size = input_ids.shape[0]
    input_ids_full = np.where(sentinel_ids != 0, sentinel_ids, input_ids)
    input_ids = input_ids_full[input_ids_full >= 0].reshape((batch_size, -1))
    return np.concatenate([input_ids, np.full((batch_size, 1), eos_token_id, dtype=np.int32)], axis=-1)


def test_span_lengths_match_t5():
    assert compute_input_and_target_lengths(512, 0.15, 3.0) == (568, 114)  # T5's published 568 / 114
    assert compute_input_and_target_lengths(128, 0.15, 3.0) == (141, 29)  # 141 - 21 noise + 7 sentinels + EOS = 128


def test_span_corruption_matches_the_reference_port(zh_t5):
    tok, train, _ = zh_t5
    task = SpanCorruption(train, None, tok, 64, 4, vocab_size=len(tok) + 100)
    L, n_with_sentinels = task.tokens_length, len(tok) + 100  # T5: 32000 pieces + 100 extra ids = 32100
    for seed in range(4):
        masks = np.stack([random_spans_noise_mask(L, 0.15, 3.0, np.random.default_rng([seed, r])) for r in range(4)])
        refs = np.stack([_ref_random_spans_noise_mask(L, 0.15, 3.0, np.random.default_rng([seed, r]))
                         for r in range(4)])
        assert np.array_equal(masks, refs)
        windows = np.stack([train.tokens[s : s + L].astype(np.int64) for s in (0, 1000, 5000, 9000)])
        inputs = _ref_filter_input_ids(windows, _ref_create_sentinel_ids(masks.astype(np.int8), n_with_sentinels),
                                       tok.eos_id)
        targets = _ref_filter_input_ids(windows, _ref_create_sentinel_ids((~masks).astype(np.int8),
                                                                          n_with_sentinels), tok.eos_id)
        for row in range(4):
            ours = corrupt(windows[row], masks[row], task.sentinels, tok.eos_id)
            assert np.array_equal(ours[0], inputs[row]) and np.array_equal(ours[1], targets[row])
            assert len(ours[0]) == 64


def test_span_batches_reconstruct_the_text(zh_t5):
    tok, train, _ = zh_t5
    task = SpanCorruption(train, None, tok, 128, 8, seed=2, vocab_size=len(tok) + 100)
    sentinels, stream = list(task.sentinels), Stream(train)
    noise = spans = 0
    span_lengths = []
    for batch in _batches(task, 6):
        assert batch["input_ids"].shape == (8, 128) and batch["labels"].shape == (8, task.targets_length)
        assert batch["attention_mask"].all()
        assert torch.equal(batch["decoder_input_ids"][:, 1:], batch["labels"][:, :-1])
        assert (batch["decoder_input_ids"][:, 0] == tok.pad_id).all()
        for inputs, targets in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
            assert inputs[-1] == tok.eos_id and targets[-1] == tok.eos_id
            k = sum(t in sentinels for t in inputs)
            assert [t for t in inputs if t in sentinels] == sentinels[:k]  # <extra_id_0>, <extra_id_1>, ...
            assert [t for t in targets if t in sentinels] == sentinels[:k] and targets[0] == sentinels[0]
            pieces = _target_spans(targets[:-1], sentinels)
            span_lengths += [len(p) for p in pieces]
            text = [t for s in inputs[:-1] for t in (pieces[sentinels.index(s)] if s in sentinels else [s])]
            assert len(text) == task.tokens_length and stream.find(text)  # the original window
            noise, spans = noise + sum(map(len, pieces)), spans + k
    assert abs(noise / (48 * task.tokens_length) - 0.15) < 0.005
    assert abs(np.mean(span_lengths) - 3.0) < 0.3 and min(span_lengths) >= 1


def _target_spans(targets: list[int], sentinels: list[int]) -> list[list[int]]:
    """<X0> a b <X1> c ... -> [[a, b], [c, ...], ...]."""
    spans = []
    for t in targets:
        if t in sentinels:
            spans.append([])
        else:
            spans[-1].append(t)
    return spans


def test_sentinels_follow_t5s_convention(zh_t5):
    tok, train, _ = zh_t5
    n = len(tok)
    assert sentinel_ids(tok)[:3].tolist() == [n + 99, n + 98, n + 97] and sentinel_ids(tok)[-1] == n
    with pytest.raises(ValueError, match="vocab_size"):
        SpanCorruption(train, None, tok, 64, 4, vocab_size=n + 64)
    extended = Tokenizer(type(tok.backend).from_str(tok.backend.to_str()), tok.special_tokens)
    add_sentinel_tokens(extended)
    assert [extended.token_to_id(f"<extra_id_{i}>") for i in (0, 1, 99)] == [n + 99, n + 98, n]
    plain = SpanCorruption(train, None, tok, 64, 4, vocab_size=n + 100).train_batch(3)
    named = SpanCorruption(train, None, extended, 64, 4, vocab_size=n + 100).train_batch(3)
    _assert_same(plain, named)
    assert "<extra_id_0>" in extended.decode(named["input_ids"][0])
    with pytest.raises(ValueError, match="sentinels"):
        SpanCorruption(train, None, tok, 2048, 4, mean_span_length=1.0)


def test_span_batches_are_deterministic_and_split_over_processes(zh_t5):
    tok, train, val = zh_t5
    task = SpanCorruption(train, val, tok, 64, 8, seed=1)
    one = task.train_batch(7)
    _assert_same(one, task.train_batch(7))
    assert not torch.equal(one["input_ids"], task.train_batch(8)["input_ids"])
    assert not torch.equal(one["input_ids"], SpanCorruption(train, val, tok, 64, 8, seed=2).train_batch(7)["input_ids"])
    for world in (2, 4):
        shares = [task.train_batch(7, rank, world) for rank in range(world)]
        _assert_same(one, {k: torch.cat([s[k] for s in shares]) for k in one})
    evals = list(task.eval_batches())
    assert sum(len(b["input_ids"]) for b in evals) == len(val.tokens) // task.tokens_length
    for first, again in zip(evals, task.eval_batches()):
        _assert_same(first, again)


def test_span_loss_runs_on_t5(zh_t5):
    tok, train, _ = zh_t5
    task = SpanCorruption(train, None, tok, 64, 4, vocab_size=len(tok) + 100)
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(vocab_size=len(tok) + 100, dim=32, kv_dim=8, hidden_dim=64,
                                                n_layers=2, n_heads=4, dropout=0.0))
    batch = task.train_batch(0)
    total, count = task.loss(model, batch)
    logits = model(batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"])
    assert count == batch["labels"].numel()
    torch.testing.assert_close(total / count, F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten()))
    total.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
