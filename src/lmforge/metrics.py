"""Evaluation metrics, one function per metric, each independent of the others.

Classification (labels are any hashable names or ids):
    accuracy(predictions, references)                      fraction equal (multi-label: exact set match)
    f1(predictions, references, average="macro"|"micro")   single-label, or multi-label when each item is
                                                           a list/set of labels; as scikit-learn computes it
    confusion_matrix(predictions, references, labels)      counts[gold][predicted], rows in `labels` order
    mse(predictions, references), pearson(x, y)            regression
Named-entity recognition (entity level, seqeval = conlleval):
    span_f1(references, predictions)                       precision / recall / f1 + per-type report
"""

from __future__ import annotations

import math
import re
import string
import warnings
from collections import Counter


def accuracy(predictions, references) -> float:
    """Fraction of predictions equal to their reference (for multi-label lists: the same set)."""
    pairs = list(zip(predictions, references, strict=True))
    if not pairs:
        return 0.0
    return sum(_as_set(p) == _as_set(r) if _is_multi(r) else p == r for p, r in pairs) / len(pairs)


def f1(predictions, references, average: str = "macro") -> float:
    """F1 score. Single-label: one label per item; multi-label: a list (or set) of labels per item.

    macro: the mean of per-label F1 over every label that occurs in references or predictions;
    micro: F1 of the true/false positives and false negatives summed over labels (for single-label
    data that equals accuracy). A label with no positives at all scores 0, as in scikit-learn.
    """
    if average not in ("macro", "micro"):
        raise ValueError(f"average must be 'macro' or 'micro', got {average!r}")
    tp, fp, fn = _confusion(predictions, references)
    if average == "micro":
        return _f1(sum(tp.values()), sum(fp.values()), sum(fn.values()))
    labels = set(tp) | set(fp) | set(fn)
    return sum(_f1(tp[k], fp[k], fn[k]) for k in labels) / len(labels) if labels else 0.0


def confusion_matrix(predictions, references, labels) -> list[list[int]]:
    """Single-label counts: row = reference label, column = predicted label, both in `labels` order."""
    index = {label: i for i, label in enumerate(labels)}
    counts = [[0] * len(index) for _ in index]
    for p, r in zip(predictions, references, strict=True):
        counts[index[r]][index[p]] += 1
    return counts


def _confusion(predictions, references) -> tuple[Counter, Counter, Counter]:
    """Per label: true positives, false positives, false negatives."""
    tp, fp, fn = Counter(), Counter(), Counter()
    for p, r in zip(predictions, references, strict=True):
        p, r = _as_set(p), _as_set(r)
        tp.update(p & r)
        fp.update(p - r)
        fn.update(r - p)
    return tp, fp, fn


def _f1(tp: int, fp: int, fn: int) -> float:
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def _is_multi(x) -> bool:
    return isinstance(x, (list, tuple, set, frozenset))


def _as_set(x) -> set:
    return set(x) if _is_multi(x) else {x}


def mse(predictions, references) -> float:
    """Mean squared error."""
    pairs = [(float(p), float(r)) for p, r in zip(predictions, references, strict=True)]
    return sum((p - r) ** 2 for p, r in pairs) / len(pairs) if pairs else 0.0


def pearson(x, y) -> float:
    """Pearson correlation of two sequences of numbers (0 when either is constant, where it is undefined)."""
    x, y = [float(v) for v in x], [float(v) for v in y]
    if len(x) != len(y):
        raise ValueError(f"pearson needs sequences of equal length, got {len(x)} and {len(y)}")
    n = len(x)
    if n < 2:
        return 0.0
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else 0.0


def span_f1(references: list[list[str]], predictions: list[list[str]], mode: str | None = None,
            scheme: str = "IOB2") -> dict:
    """Entity-level precision, recall and F1 of tag sequences, computed by seqeval.

    An entity counts as found only when its type and its exact span (first and last word) match.
    Args:
        references, predictions: one list of tags (O, B-PER, I-PER, ...) per sentence.
        mode: None = seqeval's default, conlleval-compatible (an I-X after O starts an entity);
            "strict" = only entities well formed under `scheme` count.
        scheme: the tagging scheme for strict mode: "IOB2", "IOE2", "IOBES", "BILOU".
    Returns:
        {"precision", "recall", "f1", "per_type": {type: {"precision", "recall", "f1", "support"}}}
    """
    from seqeval import metrics as sm  # imported here: it loads scikit-learn, which takes a while

    kwargs = {}
    if mode == "strict":
        from seqeval import scheme as schemes

        kwargs = {"mode": "strict", "scheme": getattr(schemes, scheme)}
    with warnings.catch_warnings():  # numpy warns about empty means when there are no entities at all
        warnings.simplefilter("ignore", RuntimeWarning)
        report = sm.classification_report(references, predictions, output_dict=True, zero_division=0, **kwargs)
    per_type = {name: {"precision": float(r["precision"]), "recall": float(r["recall"]),
                       "f1": float(r["f1-score"]), "support": int(r["support"])}
                for name, r in report.items() if not name.endswith(" avg")}
    micro = report.get("micro avg", {"precision": 0.0, "recall": 0.0, "f1-score": 0.0})
    return {"precision": float(micro["precision"]), "recall": float(micro["recall"]),
            "f1": float(micro["f1-score"]), "per_type": per_type}


# ---- extractive QA (SQuAD v1.1) and generated text (sacrebleu, rouge-score) ------------------------
#   exact_match(predictions, references), squad_f1(...)   percent; references: gold answers per example
#   bleu(predictions, references, tokenize="13a"), chrf(...)   corpus-level, sacrebleu (percent)
#   rouge(predictions, references)                     rouge1 / rouge2 / rougeL F-measure (percent)

_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's official normalisation: lowercase, no punctuation, no articles (a, an, the),
    single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _answer_f1(prediction: str, gold: str) -> float:
    """Token-overlap F1 of two answers after normalisation (the official script's f1_score)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def _golds(references) -> list[list[str]]:
    return [[r] if isinstance(r, str) else list(r) for r in references]


def exact_match(predictions: list[str], references) -> float:
    """SQuAD v1.1 exact match in percent: a prediction scores when, normalised, it equals one of its
    example's gold answers. `references`: a list of gold answers (or one string) per prediction."""
    pairs = list(zip(predictions, _golds(references), strict=True))
    if not pairs:
        return 0.0
    hits = sum(max(normalize_answer(p) == normalize_answer(g) for g in golds) for p, golds in pairs)
    return 100.0 * hits / len(pairs)


def squad_f1(predictions: list[str], references) -> float:
    """SQuAD v1.1 F1 in percent: token-overlap F1 with the best-matching gold answer, averaged."""
    pairs = list(zip(predictions, _golds(references), strict=True))
    if not pairs:
        return 0.0
    return 100.0 * sum(max(_answer_f1(p, g) for g in golds) for p, golds in pairs) / len(pairs)


def bleu(predictions: list[str], references: list[str], tokenize: str = "13a") -> float:
    """Corpus BLEU (sacrebleu, one reference per prediction). `tokenize`: sacrebleu's tokenizer,
    "13a" by default (WMT's), "zh" for Chinese targets, "intl", "char", "none", ..."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)], tokenize=tokenize).score)


def chrf(predictions: list[str], references: list[str]) -> float:
    """Corpus chrF (sacrebleu's defaults: character 6-grams, beta 2; works on any script)."""
    import sacrebleu

    return float(sacrebleu.corpus_chrf(list(predictions), [list(references)]).score)


def rouge(predictions: list[str], references: list[str], use_stemmer: bool = True) -> dict:
    """ROUGE-1, ROUGE-2 and ROUGE-L F-measure in percent, averaged over pairs (rouge-score, with
    Porter stemming as transformers' summarization example). Its tokenizer keeps only a-z and 0-9:
    English (and other Latin-script) text only."""
    from rouge_score import rouge_scorer

    kinds = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(kinds), use_stemmer=use_stemmer)
    scores = [scorer.score(r, p) for p, r in zip(predictions, references, strict=True)]
    n = max(len(scores), 1)
    return {k: 100.0 * sum(s[k].fmeasure for s in scores) / n for k in kinds}
