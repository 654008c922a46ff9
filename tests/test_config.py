"""Configs: YAML mirrors dataclasses, dotted overrides, strict errors that name the key and the fix."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from lmforge.config import ConfigError, load_config, to_yaml


@dataclass
class Inner:
    lr: float = 1e-3
    steps: int = 10
    schedule: Literal["cosine", "linear"] = "cosine"
    targets: list[str] = field(default_factory=lambda: ["q_proj"])
    path: str | None = None


@dataclass
class Outer:
    name: str = "run"
    train: Inner = field(default_factory=Inner)
    extra: dict = field(default_factory=dict)


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides_build_the_dataclass(tmp_path):
    path = write(tmp_path, "name: a\ntrain:\n  lr: 3e-4\n  steps: 5\n")
    cfg = load_config(Outer, path, ["train.steps=7", "train.targets=[q_proj, v_proj]", "extra.x=1", "train.path=p"])
    assert cfg == Outer("a", Inner(lr=3e-4, steps=7, targets=["q_proj", "v_proj"], path="p"), {"x": 1})
    assert isinstance(cfg.train.lr, float)  # YAML reads 3e-4 as a string; the hint makes it a float


def test_resolved_yaml_loads_back_equal(tmp_path):
    cfg = load_config(Outer, None, ["train.schedule=linear", "train.lr=2"])
    assert load_config(Outer, write(tmp_path, to_yaml(cfg))) == cfg


@pytest.mark.parametrize("text, overrides, message", [
    ("train:\n  lrr: 1\n", [], "unknown key 'train.lrr'; allowed keys in train: lr, steps, schedule, targets, path"),
    ("nme: x\n", [], "unknown key 'nme'"),
    ("train:\n  steps: many\n", [], "train.steps must be int, got 'many'"),
    ("", ["train.schedule=step"], "train.schedule = 'step' is not allowed; choose one of: cosine, linear"),
    ("", ["train.steps"], "is not of the form key.sub=value"),
    ("train: [1, 2]\n", [], "train must be a mapping"),
    ("- a\n- b\n", [], "top level must be a mapping"),
    ("train: {lr: 1\n", [], "invalid YAML"),
])
def test_mistakes_are_named(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")) as err:
        load_config(Outer, write(tmp_path, text), overrides)
    if text:
        assert "c.yaml" in str(err.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(Outer, tmp_path / "nope.yaml")
