"""Pretraining end to end: every recipe loads, every debug recipe runs, SIGKILL + resume is exact,
a crash while saving keeps the previous checkpoint, torchrun DDP matches one process, and FSDP2
checkpoints, resumes (with FSDP or in one process) and exports."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.config import load_config
from lmforge.models import all_presets
from lmforge.pretrain import PretrainConfig, _check_objective, build_model

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LMFORGE_DATA", ROOT.parent / "shared/data"))
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data not found at {DATA} (set LMFORGE_DATA)")
CONFIGS = sorted((ROOT / "configs").glob("*/*.yaml"))
PRETRAIN = [p for p in CONFIGS if p.parent.name in ("pretrain", "debug")]


@pytest.mark.parametrize("path", PRETRAIN, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_recipe_loads(path):
    cfg = load_config(PretrainConfig, path)
    _, preset = all_presets()[cfg.model.preset]
    _check_objective(cfg.task.objective, preset.to_hf()["model_type"])
    for item in cfg.data.inputs:
        assert item.startswith("../shared/data/"), "recipes read the shared data by the documented path"


def run_dir_args(tmp_path, *extra):
    return [f"run.dir={tmp_path}", *extra]


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def train_losses(folder: Path) -> list[float]:
    return [r["loss"] for r in metrics(folder) if "loss" in r]


class _Tokenizer:  # what build_model reads from a tokenizer
    bos_id, eos_id, pad_id = None, 1, 0

    def __len__(self):
        return 300


@pytest.mark.parametrize("overrides", ["{dropout: 0.3}", "{hidden_dropout_prob: 0.3}"])
def test_preset_overrides_take_our_names_or_transformers(overrides):
    cfg = load_config(PretrainConfig, None, ["model.preset=bert-tiny", "task.objective=mlm", f"model.overrides={overrides}"])
    config = build_model(cfg, _Tokenizer()).config
    assert (config.dropout, config.vocab_size, config.pad_token_id) == (0.3, 320, 0)
    with pytest.raises(ValueError, match="unknown field 'drop_out'"):
        build_model(load_config(PretrainConfig, None, ["model.preset=bert-tiny", "task.objective=mlm", "model.overrides={drop_out: 0.3}"]),
                    _Tokenizer())


def test_preset_override_without_a_config_json_name_applies():
    """GPT-2's `bias` has no transformers field; it used to be lost on the way through config.json."""
    cfg = load_config(PretrainConfig, None, ["model.preset=gpt-tiny", "task.objective=clm", "model.overrides={bias: false}"])
    model = build_model(cfg, _Tokenizer())
    assert model.config.bias is False and not any(n.endswith("bias") for n, _ in model.named_parameters())


@needs_data
@pytest.mark.parametrize("path", sorted((ROOT / "configs/debug").glob("*.yaml")), ids=lambda p: p.stem)
def test_debug_recipe_runs_and_exports(tmp_path, monkeypatch, path):
    monkeypatch.chdir(ROOT)
    assert main(["pretrain", str(path), *run_dir_args(tmp_path)]) == 0
    cfg = load_config(PretrainConfig, path)
    run = tmp_path / cfg.run.name
    records = metrics(run)
    assert [r["step"] for r in records if "loss" in r] == list(range(1, cfg.train.max_steps + 1))
    assert any("val_loss" in r for r in records)
    assert {"config.yaml", "report.md", "loss.png", "lr.png", "final", "metrics.jsonl"} <= {
        p.name for p in run.iterdir()}
    assert sorted(p.name for p in run.glob("step-*")) == [f"step-{cfg.train.max_steps}"] or cfg.train.keep_last > 1
    tf = pytest.importorskip("transformers")
    auto = tf.AutoModelForSeq2SeqLM if cfg.task.objective == "span" else (
        tf.AutoModelForPreTraining if cfg.task.objective == "mlm" else tf.AutoModelForCausalLM)
    assert auto.from_pretrained(run / "final") is not None
    assert tf.AutoTokenizer.from_pretrained(run / "final") is not None


CHAR = ROOT / "configs/debug/shakespeare-char.yaml"
LONG = ["train.max_steps=30", "train.save_every=5", "train.log_every=1", "train.eval_every=10",
        "train.deterministic=true", "train.keep_last=3"]


def cli(*args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LMFORGE_DEBUG": "1"}
    return subprocess.Popen([sys.executable, "-m", "lmforge", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)


@needs_data
def test_sigkill_then_resume_gives_the_same_losses(tmp_path):
    straight = cli("pretrain", str(CHAR), *run_dir_args(tmp_path, "run.name=straight", *LONG))
    assert straight.wait(timeout=300) == 0, straight.stderr.read().decode()[-2000:]
    victim = cli("pretrain", str(CHAR), *run_dir_args(tmp_path, "run.name=killed", *LONG))
    log = tmp_path / "killed/metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 13):
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    done = [r["step"] for r in metrics(tmp_path / "killed") if "loss" in r]
    assert 12 <= done[-1] < 30, "the run must be killed part-way"
    resumed = cli("pretrain", str(CHAR), "--resume", *run_dir_args(tmp_path, "run.name=killed", *LONG))
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()[-2000:]
    assert train_losses(tmp_path / "killed") == train_losses(tmp_path / "straight")


@needs_data
def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import torch

    from lmforge.train import checkpoint

    monkeypatch.chdir(ROOT)
    real_save, calls = torch.save, []

    def dying_save(obj, path, *a, **k):  # the process "dies" half-way through writing step-4
        calls.append(path)
        if "step-4" in str(path):
            raise KeyboardInterrupt
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(checkpoint.torch, "save", dying_save)
    assert main(["pretrain", str(CHAR), *run_dir_args(tmp_path, "run.name=r", "train.save_every=2")]) == 130
    run = tmp_path / "r"
    assert (run / ".step-4.tmp").is_dir() and checkpoint.latest_checkpoint(run).name == "step-2"
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    assert main(["pretrain", str(CHAR), "--resume", *run_dir_args(tmp_path, "run.name=r", "train.save_every=2")]) == 0
    assert checkpoint.latest_checkpoint(run).name == "step-4"


def torchrun(*args, port: int) -> None:
    """`lmforge ARGS` on two CPU processes (gloo), one thread each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(port), "-m", "lmforge", *args],
                          cwd=ROOT, env=env, capture_output=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr.decode()[-3000:]


@needs_data
def test_ddp_two_processes_match_one(tmp_path):
    common = ["train.max_steps=20", "train.batch_size=8", "train.log_every=1", "train.eval_every=0",
              "train.save_every=0"]
    single = cli("pretrain", str(CHAR), *run_dir_args(tmp_path, "run.name=one", *common))
    assert single.wait(timeout=300) == 0, single.stderr.read().decode()[-2000:]
    torchrun("pretrain", str(CHAR), *run_dir_args(tmp_path, "run.name=two", *common), port=29517)
    one, two = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert len(two) == 20  # one line per step: only rank 0 writes
    assert two == pytest.approx(one, rel=1e-4)


@needs_data
def test_fsdp_checkpoints_resume_and_export(tmp_path):
    """FSDP2 on two processes: checkpoints, best weights and the export hold the full weights, and a
    run resumed from a step-2 checkpoint, with FSDP or in one process, continues as if uninterrupted.
    GPT-2 for its tied embeddings, and for a validation split the two processes share unevenly."""
    import torch

    import lmforge

    gpt = str(ROOT / "configs/debug/clm-gpt-bpe.yaml")
    common = ["train.max_steps=4", "train.save_every=2", "train.eval_every=2", "train.log_every=1",
              "train.patience=10"]
    fsdp = "train.distributed=fsdp"
    torchrun("pretrain", gpt, *run_dir_args(tmp_path, "run.name=straight", *common, fsdp), port=29518)
    straight = tmp_path / "straight"
    assert {"step-2", "step-4", "best.safetensors", "final"} <= {p.name for p in straight.iterdir()}
    for name in ("fsdp", "one"):  # interrupted after the step-2 checkpoint
        shutil.copytree(straight, tmp_path / name, ignore=shutil.ignore_patterns("step-4", "final"))
    single = cli("pretrain", gpt, "--resume", *run_dir_args(tmp_path, "run.name=one", *common))
    torchrun("pretrain", gpt, "--resume", *run_dir_args(tmp_path, "run.name=fsdp", *common, fsdp), port=29519)
    assert single.wait(timeout=300) == 0, single.stderr.read().decode()[-2000:]
    losses = train_losses(straight)
    assert len(losses) == 4
    for name in ("fsdp", "one"):
        assert train_losses(tmp_path / name) == pytest.approx(losses, rel=1e-5)
    ids = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    logits = {name: lmforge.load(tmp_path / name / "final")[0](ids) for name in ("straight", "fsdp", "one")}
    torch.testing.assert_close(logits["fsdp"], logits["straight"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits["one"], logits["straight"], rtol=1e-4, atol=1e-4)


@needs_data
def test_scaled_adamw_under_fsdp_matches_one_process(tmp_path):
    """adamw-scale reads each tensor's RMS; under FSDP a process holds only shards, so the norms are
    gathered first: two FSDP processes take the same steps as one process."""
    gpt = str(ROOT / "configs/debug/clm-gpt-bpe.yaml")
    common = ["train.max_steps=3", "train.optimizer=adamw-scale", "train.lr=1e-2", "train.log_every=1",
              "train.eval_every=0"]
    single = cli("pretrain", gpt, *run_dir_args(tmp_path, "run.name=one", *common))
    torchrun("pretrain", gpt, *run_dir_args(tmp_path, "run.name=fsdp", *common, "train.distributed=fsdp"),
             port=29520)
    assert single.wait(timeout=300) == 0, single.stderr.read().decode()[-2000:]
    assert train_losses(tmp_path / "fsdp") == pytest.approx(train_losses(tmp_path / "one"), rel=1e-5)
