"""The one training loop: it learns, schedules, accumulates, checkpoints, resumes exactly, stops early."""

import json
import math
import types

import numpy as np
import pytest
import torch

from lmforge.models import gpt
from lmforge.tasks.clm import CausalLM
from lmforge.train import memory
from lmforge.train.checkpoint import checkpoints, latest_checkpoint
from lmforge.train.distributed import Dist
from lmforge.train.logging import Run
from lmforge.train.loop import TrainConfig, evaluate, fit
from lmforge.train.optim import build_optimizer, lr_at


def stream(n=6000, seed=0):
    """A learnable token stream: a noisy repeating pattern over 20 symbols."""
    rng = np.random.default_rng(seed)
    pattern = np.tile(np.arange(20), n // 20 + 1)[:n]
    noise = rng.random(n) < 0.05
    return np.where(noise, rng.integers(0, 20, n), pattern).astype(np.uint16)


def make(seed=0, batch=8, seq=16):
    torch.manual_seed(seed)
    config = gpt.GPTConfig(vocab_size=20, dim=32, n_layers=2, n_heads=2, max_len=seq, bos_token_id=None,
                           eos_token_id=None)
    tokens = stream()
    task = CausalLM(types.SimpleNamespace(tokens=tokens[:5000]), types.SimpleNamespace(tokens=tokens[5000:]),
                    seq, batch, seed=3)
    return gpt.GPTForCausalLM(config), task


def losses(run: Run) -> list[float]:
    return [r["loss"] for r in run.records() if "loss" in r]


CFG = {"max_steps": 12, "batch_size": 8, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "log_every": 1,
       "eval_every": 6, "eval_batches": 4, "deterministic": True}


def test_learns_and_writes_metrics(tmp_path):
    model, task = make()
    run = Run(tmp_path / "r")
    state = fit(model, task, TrainConfig(**{**CFG, "max_steps": 40}), run)
    assert state["step"] == 40 and state["val_loss"] < math.log(20) - 1.0  # far below uniform guessing
    records = run.records()
    train = [r for r in records if "loss" in r]
    assert len(train) == 40 and {"step", "loss", "lr", "tokens_per_s"} <= set(train[0])
    assert train[-1]["loss"] < train[0]["loss"] - 1.0
    assert [r["step"] for r in records if "val_loss" in r] == [6, 12, 18, 24, 30, 36, 40]
    assert [p.name for p in checkpoints(run.folder)] == ["step-40"]


def test_schedule():
    assert lr_at(0, 1.0, 0.1, 9, 100) == pytest.approx(0.1)  # (0 + 1) / (9 + 1)
    assert lr_at(9, 1.0, 0.1, 10, 100) == pytest.approx(10 / 11)
    assert lr_at(10, 1.0, 0.1, 10, 100) == pytest.approx(1.0)
    assert lr_at(55, 1.0, 0.1, 10, 100) == pytest.approx(0.55)  # cosine midpoint
    assert lr_at(100, 1.0, 0.1, 10, 100) == pytest.approx(0.1)
    assert lr_at(55, 1.0, 0.1, 10, 100, "linear") == pytest.approx(0.55)
    assert lr_at(99, 1.0, 0.1, 10, 100, "constant") == 1.0


def test_weight_decay_only_on_matrices():
    model, _ = make()
    decayed, plain = build_optimizer(model, 1e-3, 0.1, (0.9, 0.99)).param_groups
    assert decayed["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decayed["params"])
    assert plain["weight_decay"] == 0.0 and all(p.dim() < 2 for p in plain["params"])
    n_unique = len({id(p) for p in model.parameters()})
    assert len(decayed["params"]) + len(plain["params"]) == n_unique  # the tied embedding counted once


def test_scaled_adamw_steps_each_tensor_by_its_rms():
    """adamw-scale = AdamW with lr x RMS(tensor) per tensor (floored at 1e-3), weight decay on matrices
    only; the learning rate the schedule set is left in place for the next step."""
    torch.manual_seed(0)
    big, small, gain = torch.randn(8, 4) * 2.0, torch.randn(6, 4) * 0.01, torch.zeros(4)
    model = torch.nn.ParameterList([torch.nn.Parameter(t.clone()) for t in (big, small, gain)])
    optimizer = build_optimizer(model, 0.1, 0.01, (0.9, 0.99), kind="adamw-scale")
    for p in model:
        p.grad = torch.randn_like(p)
    grads = [p.grad.clone() for p in model]
    optimizer.step()
    for p, start, grad, decay in zip(model, (big, small, gain), grads, (0.01, 0.01, 0.0), strict=True):
        reference = torch.nn.Parameter(start.clone())
        reference.grad = grad
        lr = 0.1 * max(1e-3, float(start.pow(2).mean().sqrt()))
        torch.optim.AdamW([reference], lr=lr, betas=(0.9, 0.99), weight_decay=decay).step()
        torch.testing.assert_close(p.data, reference.data)
    assert [g["lr"] for g in optimizer.param_groups] == [0.1, 0.1, 0.1]
    with pytest.raises(ValueError, match="adamw-scale"):
        build_optimizer(model, 0.1, 0.01, (0.9, 0.99), kind="adam")


def test_fit_learns_with_scaled_adamw(tmp_path):
    model, task = make()
    cfg = TrainConfig(**{**CFG, "max_steps": 40, "lr": 0.1, "min_lr": 0.01, "optimizer": "adamw-scale"})
    state = fit(model, task, cfg, Run(tmp_path / "r"))
    assert state["val_loss"] < math.log(20) - 1.0


def test_gradient_accumulation_gives_the_same_steps(tmp_path):
    results = []
    for accum in (1, 2, 4):
        model, task = make()
        run = Run(tmp_path / f"a{accum}")
        fit(model, task, TrainConfig(**{**CFG, "max_steps": 5, "grad_accum": accum, "eval_every": 0}), run)
        results.append(losses(run))
    for other in results[1:]:
        np.testing.assert_allclose(other, results[0], rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_steps(tmp_path):
    results = []
    for on in (False, True):
        model, task = make()
        run = Run(tmp_path / f"c{on}")
        fit(model, task, TrainConfig(**{**CFG, "max_steps": 5, "gradient_checkpointing": on, "eval_every": 0}), run)
        results.append(losses(run))
        assert getattr(model.model, "recompute", False) is on  # switched on only when asked
    np.testing.assert_allclose(results[1], results[0], rtol=1e-6)


class Crash(Exception):
    pass


def crash_at(task, step):
    """The task, but the process "dies" when it asks for the batch of `step`."""
    original = task.train_batch

    def train_batch(s, *args):
        if s == step:
            raise Crash
        return original(s, *args)

    task.train_batch = train_batch
    return task


def test_resume_continues_exactly(tmp_path):
    model, task = make()
    straight = Run(tmp_path / "straight")
    fit(model, task, TrainConfig(**CFG), straight)

    model, task = make()
    first = Run(tmp_path / "resumed")
    cfg = TrainConfig(**{**CFG, "save_every": 3, "keep_last": 1})
    with pytest.raises(Crash):
        fit(model, crash_at(task, 8), cfg, first)
    assert [p.name for p in checkpoints(first.folder)] == ["step-6"]
    (first.folder / ".step-9.tmp").mkdir()  # a checkpoint whose writing was interrupted is ignored
    model, task = make(seed=99)  # a different init: everything must come from the checkpoint
    again = Run(first.folder, resume=True)
    fit(model, task, cfg, again, resume_from=latest_checkpoint(first.folder))
    assert losses(again) == losses(straight)  # bit-identical on CPU, metrics of the lost steps replaced


def test_a_run_folder_is_never_overwritten(tmp_path):
    model, task = make()
    fit(model, task, TrainConfig(**{**CFG, "max_steps": 2}), Run(tmp_path / "r"))
    with pytest.raises(FileExistsError, match="resume"):
        Run(tmp_path / "r")


def test_early_stopping_keeps_the_best_weights(tmp_path):
    model, task = make()
    run = Run(tmp_path / "r")
    cfg = TrainConfig(**{**CFG, "max_steps": 200, "lr": 0.5, "min_lr": 0.5, "warmup_steps": 0, "eval_every": 1,
                         "patience": 2, "grad_clip": 0.0})  # a learning rate that wrecks the model
    state = fit(model, task, cfg, run)
    assert state["step"] < 200
    vals = [r["val_loss"] for r in run.records() if "val_loss" in r]
    assert min(vals) < vals[-1]
    with torch.no_grad():
        assert evaluate(model, task, Dist(), cfg.eval_batches)["val_loss"] == pytest.approx(min(vals), rel=1e-5)
    assert json.loads((checkpoints(run.folder)[-1] / "trainer.json").read_text())["bad_evals"] == 2


def test_eval_first_scores_the_starting_point_and_can_be_the_best(tmp_path):
    model, task = make()
    with torch.no_grad():
        start = evaluate(model, task, Dist(), CFG["eval_batches"])["val_loss"]
    run = Run(tmp_path / "r")
    cfg = TrainConfig(**{**CFG, "max_steps": 4, "lr": 5.0, "min_lr": 5.0, "warmup_steps": 0, "eval_every": 2,
                         "eval_first": True, "patience": 5, "grad_clip": 0.0})  # training only makes it worse
    state = fit(model, task, cfg, run)
    vals = [(r["step"], r["val_loss"]) for r in run.records() if "val_loss" in r]
    assert vals[0] == (0, pytest.approx(start, rel=1e-6)) and [s for s, _ in vals] == [0, 2, 4]
    assert state["best_step"] == 0  # the exported weights are the untouched start
    with torch.no_grad():
        assert evaluate(model, task, Dist(), cfg.eval_batches)["val_loss"] == pytest.approx(start, rel=1e-5)


def test_adalora_through_fit_reallocates_ranks_within_budget(tmp_path):
    from lmforge.peft.adalora import AdaLoraConfig, apply_adalora

    model, task = make()
    cfg = AdaLoraConfig(total_step=30, init_r=6, target_r=2, tinit=3, tfinal=5, alpha=8,
                        targets=["q_proj", "v_proj", "up_proj", "down_proj"])
    allocator = apply_adalora(model, cfg)
    fit(model, task, TrainConfig(**{**CFG, "max_steps": 30, "eval_every": 0}), Run(tmp_path / "r"),
        allocator=allocator)
    ranks = allocator.ranks(model)
    assert len(ranks) == 8 and sum(ranks.values()) <= 2 * 8  # 2 layers x 4 targets, target_r 2 each
    assert len(set(ranks.values())) > 1, ranks


def test_logged_loss_is_the_mean_since_the_last_line(tmp_path):
    """With log_every=4 each line holds the mean of the four steps' losses (equal target counts here),
    the same steps a log_every=1 run logs one by one."""
    runs = {}
    for every in (1, 4):
        model, task = make()
        runs[every] = Run(tmp_path / f"every{every}")
        fit(model, task, TrainConfig(**{**CFG, "log_every": every, "eval_every": 0}), runs[every])
    each, grouped = losses(runs[1]), losses(runs[4])
    assert len(grouped) == 3
    assert grouped == pytest.approx([np.mean(each[i:i + 4]) for i in (0, 4, 8)], rel=1e-5)
    assert grouped[0] != pytest.approx(each[3], rel=1e-3)  # not just the last step's loss


@pytest.mark.skipif(memory._malloc_trim() is None, reason="the C library has no malloc_trim (not glibc)")
def test_freed_heap_memory_goes_back_to_the_system(monkeypatch):
    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 // 2**20

    pairs = [(bytearray(100_000), bytearray(1000)) for _ in range(3000)]  # 300 MB of heap, below mmap size
    kept = [small for _, small in pairs]  # the small blocks between the big ones stay: free() leaves holes
    del pairs
    before = rss_mb()
    monkeypatch.setattr(memory, "_last_trim", 0.0)
    assert memory.release_free_memory(interval=0)
    assert before - rss_mb() > 150
    assert not memory.release_free_memory(interval=3600)  # at most once per interval
    assert len(kept) == 3000
