"""`lmforge finetune` / `evaluate` / `predict` end to end: every recipe loads, every debug recipe runs
and exports a model that `lmforge evaluate` scores exactly as the run did, predictions are written,
and user errors are named."""

import json
import os
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.config import ConfigError, load_config
from lmforge.finetune import FinetuneConfig, as_chats, hold_out

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LMFORGE_DATA", ROOT.parent / "shared/data"))
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data not found at {DATA} (set LMFORGE_DATA)")
RECIPES = sorted((ROOT / "configs/finetune").glob("*.yaml"))
DEBUG = sorted((ROOT / "configs/debug-finetune").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES + DEBUG, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_recipe_loads(path):
    cfg = load_config(FinetuneConfig, path)
    for item in (cfg.data.train, cfg.data.validation, cfg.data.train_target, cfg.data.validation_target):
        assert item is None or item.startswith("../shared/data/"), "recipes read the shared data by its documented path"
    assert cfg.model.path or cfg.model.preset


def _need_weights(cfg: FinetuneConfig) -> None:
    from lmforge.models import hub

    if cfg.model.path in ("minilm", "smollm2"):
        try:
            hub.resolve(cfg.model.path)
        except (FileNotFoundError, ValueError, ImportError) as e:  # the weights package is not installed
            pytest.skip(f"{cfg.model.path} weights not installed ({e})")


def _last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


@needs_data
@pytest.mark.slow
@pytest.mark.parametrize("path", DEBUG, ids=lambda p: p.stem)
def test_debug_recipe_runs_exports_and_evaluates_the_same(tmp_path, monkeypatch, capsys, path):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg = load_config(FinetuneConfig, path)
    _need_weights(cfg)
    assert main(["finetune", str(path), f"run.dir={tmp_path}"]) == 0
    run = tmp_path / cfg.run.name
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, cfg.train.max_steps + 1))
    evals = [r for r in records if cfg.train.metric in r]
    assert evals, f"no validation line carries {cfg.train.metric}"
    assert {"config.yaml", "report.md", "loss.png", "final"} <= {p.name for p in run.iterdir()}
    assert (run / "adapter" / "adapter_config.json").is_file() == (cfg.peft.method != "none")
    settings = json.loads((run / "final" / "task.json").read_text())
    assert settings["kind"] == cfg.task.kind
    if cfg.data.validation is None:
        return  # held out of the training file: evaluate cannot name those rows
    capsys.readouterr()
    args = ["evaluate", str(run / "final"), "--data", cfg.data.validation, "--limit", str(cfg.data.validation_limit)]
    if cfg.data.validation_target:
        args += ["--target", cfg.data.validation_target]
    assert main(args) == 0
    result = _last_json(capsys.readouterr().out)
    best = max if not cfg.train.metric.endswith("loss") else min
    expected = best(r[cfg.train.metric] for r in evals) if cfg.train.patience else evals[-1][cfg.train.metric]
    assert result["examples"] == cfg.data.validation_limit
    assert result[cfg.train.metric] == pytest.approx(expected, abs=1e-6)


@needs_data
@pytest.mark.slow
def test_predict_writes_one_line_per_example(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    path = ROOT / "configs/debug-finetune/classify-minilm.yaml"
    cfg = load_config(FinetuneConfig, path)
    _need_weights(cfg)
    assert main(["finetune", str(path), f"run.dir={tmp_path}", "train.max_steps=2", "train.eval_every=0",
                 "train.patience=0", "train.save_every=0"]) == 0
    out = tmp_path / "predictions.jsonl"
    assert main(["predict", str(tmp_path / cfg.run.name / "final"), "--data", cfg.data.validation,
                 "--limit", "20", "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 20
    assert {r["label"] for r in rows} <= {"0", "1"}  # the label set saved with the model
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-5 and "label" not in r["input"] for r in rows)
    assert not list(tmp_path.glob(".predictions.jsonl.tmp*"))


def test_bad_key_and_missing_file_are_one_line_errors(tmp_path, capsys):
    path = ROOT / "configs/debug-finetune/classify-minilm.yaml"
    assert main(["finetune", str(path), f"run.dir={tmp_path}", "task.kinds=ner"]) == 2
    err = capsys.readouterr().err
    assert "task.kinds" in err and "kind" in err and "Traceback" not in err
    assert main(["finetune", str(path), f"run.dir={tmp_path}", "data.train=/nowhere/train.tsv"]) == 2
    assert "/nowhere/train.tsv" in capsys.readouterr().err


def test_hold_out_keeps_groups_whole_and_is_seeded():
    rows = [{"title": f"article {i % 8}", "n": i} for i in range(80)]
    train, val = hold_out(rows, 0.25, seed=3, group_by="title")
    assert len({r["title"] for r in val}) == 2 and len(train) + len(val) == 80
    assert not {r["title"] for r in val} & {r["title"] for r in train}
    assert hold_out(rows, 0.25, seed=3, group_by="title") == (train, val)
    with pytest.raises(ConfigError, match="group_by='topic'"):
        hold_out(rows, 0.25, seed=3, group_by="topic")


def test_rows_become_chats_by_the_template():
    chats = as_chats([{"en": "Hi.", "zh": "你好。"}], {"user": "Translate to Chinese: {en}", "assistant": "{zh}"}, "f")
    assert chats == [{"messages": [{"role": "user", "content": "Translate to Chinese: Hi."},
                                   {"role": "assistant", "content": "你好。"}]}]
    with pytest.raises(ConfigError, match=r"f example 1: data.template uses \{de\}"):
        as_chats([{"en": "Hi."}], {"user": "{de}"}, "f")


def test_compare_overrides_split_by_method():
    from lmforge.compare import split_overrides

    common, own = split_overrides(["train.max_steps=5", "lora:train.lr=5e-4", "data.template.user=a:b"], ["full", "lora"])
    assert common == ["train.max_steps=5", "data.template.user=a:b"] and own == {"full": [], "lora": ["train.lr=5e-4"]}
    with pytest.raises(ConfigError, match="'adapter' is not one of the compared methods"):
        split_overrides(["adapter:train.lr=1"], ["full", "lora"])


@needs_data
@pytest.mark.slow
def test_compare_runs_each_method_and_tabulates(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    path = ROOT / "configs/debug-finetune/classify-minilm.yaml"
    _need_weights(load_config(FinetuneConfig, path))
    assert main(["compare", str(path), "--methods", "full,lora", f"run.dir={tmp_path}", "train.max_steps=2",
                 "train.eval_every=2", "train.save_every=0", "lora:train.lr=5e-4"]) == 0
    folder = tmp_path / "debug-classify-minilm-compare"
    rows = json.loads((folder / "compare.json").read_text())
    assert [r["method"] for r in rows] == ["none", "lora"]
    full, lora = rows
    assert full["trainable_params"] == full["total_params"] > 100 * lora["trainable_params"] > 0
    assert all(r["peak_memory_mb"] > 100 and r["wall_s"] > 0 and r["metric"] == "accuracy" for r in rows)
    assert (folder / "compare.png").stat().st_size > 1000
    table = capsys.readouterr().out
    assert "| full |" in table and "| lora |" in table and "best accuracy" in table
    lora_cfg = (tmp_path / "debug-classify-minilm-lora" / "config.yaml").read_text()
    assert "lr: 0.0005" in lora_cfg and "method: lora" in lora_cfg
