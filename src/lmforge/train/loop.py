"""The one training loop, `fit()`, used by every pretraining and fine-tuning run.

    for step in range(start, max_steps):
        lr <- schedule(step)
        for each micro-batch: loss.backward()        (gradient accumulation; DDP syncs on the last)
        clip gradients; optimizer.step()
        AdaLoRA's rank allocator steps here (visible, not hidden in a callback)
        log / evaluate (early stopping) / checkpoint

The loss of a step is the mean over every target token of the global batch (all micro-batches on all
processes), so results do not depend on how the batch is split across accumulation or processes.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from itertools import islice
from typing import Literal

import torch
from tqdm.auto import tqdm

from ..models import recompute
from .checkpoint import load_checkpoint, load_weights, save_checkpoint, save_weights
from .distributed import Dist, all_reduce_max, all_reduce_sum, barrier, sharded, unwrap, wrap
from .logging import Run, Timer
from .memory import release_free_memory
from .optim import build_optimizer, lr_at, set_lr


@dataclass
class TrainConfig:
    max_steps: int = 1000
    batch_size: int = 16
    """Sequences per optimizer step, over all processes and accumulation micro-steps: each micro-batch
    holds batch_size / (processes x grad_accum), so results do not depend on how the work is split."""
    grad_accum: int = 1
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in backward instead of keeping them: activation memory of
    about one layer for ~30% more compute (long sequences, big batches, LoRA on a laptop)."""
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 100
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.1
    optimizer: Literal["adamw", "adamw-scale"] = "adamw"
    """adamw-scale: each tensor's step scaled by its RMS (`ScaledAdamW`), for T5 trained from scratch;
    it wants a larger lr (~1e-2)."""
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 turns clipping off."""
    eval_every: int = 250
    """Validate every this many steps (and at the end); 0 = only at the end."""
    eval_batches: int = 0
    """Validation batches per periodic evaluation; 0 = the whole validation split. The evaluation at
    the end of training always covers the whole split."""
    log_every: int = 10
    """Log every this many steps: the training loss as the mean per target over the steps since the
    last line (not one noisy step), the learning rate, the gradient norm and tokens/s."""
    save_every: int = 0
    """Checkpoint every this many steps (and at the end); 0 = only at the end."""
    keep_last: int = 2
    patience: int = 0
    """Early stopping: stop after this many evaluations without a better `metric`; 0 = off.
    When on, the best weights are kept (best.safetensors) and exported at the end."""
    eval_first: bool = False
    """Also validate before the first step (logged as step 0): where training starts from, e.g. the
    base model's score, which then counts for early stopping and the best weights."""
    metric: str = "val_loss"
    """The validation number that early stopping and the best weights follow: losses and perplexities
    are minimised, anything else the task reports (accuracy, f1, exact_match, bleu, ...) maximised."""
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Autocast on CUDA/MPS ("auto": bf16 where supported, else fp16); the CPU trains in fp32."""
    compile: bool = False
    distributed: Literal["ddp", "fsdp"] = "ddp"
    deterministic: bool = False
    seed: int = 1337


def fit(model, task, cfg: TrainConfig, run: Run, d: Dist | None = None, allocator=None,
        resume_from=None) -> dict:
    """Train `model` on `task`; returns the final trainer state (step, losses, best validation loss).

    Args:
        task: gives `train_batch(index, rank, world)`, `eval_batches(rank, world)` and
            `loss(model, batch) -> (sum of losses, number of targets)`; see `lmforge.tasks`.
        run: where metrics, checkpoints and the best weights go.
        allocator: AdaLoRA's rank allocator: its orthogonality penalty joins the loss, and it is
            stepped after every optimizer step (re-allocating ranks).
        resume_from: a `step-N` checkpoint folder to continue from exactly.
    """
    d = d or Dist()
    torch.use_deterministic_algorithms(cfg.deterministic)
    model.to(d.device).train()
    if cfg.gradient_checkpointing:
        recompute.enable(model)
    net = wrap(model, d, cfg.distributed)  # before the optimizer: FSDP replaces the parameters by shards
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), kind=cfg.optimizer)
    state = {"step": 0, "tokens": 0, "best": None, "best_step": 0, "bad_evals": 0, "elapsed": 0.0}
    if resume_from is not None:
        state = load_checkpoint(resume_from, unwrap(model), optimizer)
        run.truncate_after(state["step"])
    net = torch.compile(net) if cfg.compile else net
    autocast, scaler = _precision(cfg, d.device)
    timer, accum, elapsed_before = Timer(), cfg.grad_accum, state["elapsed"]
    count_targets = getattr(task, "targets", _targets)
    window_loss, window_targets = torch.zeros((), device=d.device), 0  # summed since the last log line
    progress = tqdm(total=cfg.max_steps, initial=state["step"], disable=not d.main, desc="train", unit="step",
                    dynamic_ncols=True)
    if cfg.eval_first and state["step"] == 0:
        _evaluate_and_check(model, task, cfg, run, d, state, 0, autocast)
    for step in range(state["step"], cfg.max_steps):
        set_lr(optimizer, lr := lr_at(step, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps, cfg.schedule))
        shares = d.world * accum  # the step's global batch, split over processes and micro-steps
        batches = [_to(task.train_batch(step, d.rank * accum + i, shares), d.device) for i in range(accum)]
        targets = all_reduce_sum([sum(count_targets(b) for b in batches)], d)[0]
        window_targets += targets
        for i, batch in enumerate(batches):
            with _no_sync(net, i < accum - 1), autocast:
                micro_loss, _ = task.loss(net, batch)
                penalty = allocator.regularization(unwrap(model)) / accum if allocator is not None else 0.0
            scaler.scale(micro_loss * (d.world / targets) + penalty).backward()  # DDP averages over processes
            window_loss += micro_loss.detach().float()
        grad_norm = _clip(net, optimizer, scaler, cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if allocator is not None:
            allocator.step(unwrap(model), step)
        state["step"], state["elapsed"] = step + 1, elapsed_before + timer.elapsed
        tokens = sum(b["input_ids"].numel() for b in batches) * d.world
        state["tokens"] += tokens
        timer.tokens += tokens
        progress.update()
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps:
            loss = all_reduce_sum([float(window_loss)], d)[0] / window_targets  # mean per target since the last line
            window_loss, window_targets = window_loss.zero_(), 0
            record = {"step": step + 1, "loss": loss, "lr": lr, "tokens_per_s": timer.rate(),
                      "grad_norm": grad_norm, "tokens": state["tokens"], "elapsed_s": timer.elapsed}
            run.log(record)
            state["loss"] = loss
            progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
            release_free_memory()  # changing batch shapes leave freed memory in the CPU heap
        last = step + 1 == cfg.max_steps
        evaluate_now = last or (cfg.eval_every and (step + 1) % cfg.eval_every == 0)
        if evaluate_now and _evaluate_and_check(model, task, cfg, run, d, state, step + 1, autocast):
            last = True  # early stopping
        if last or (cfg.save_every and (step + 1) % cfg.save_every == 0):  # every process: FSDP gathers
            save_checkpoint(run.folder, step + 1, unwrap(model), optimizer, state, cfg.keep_last, main=d.main)
        if last:
            break
    progress.close()
    if cfg.patience:
        _restore_best(unwrap(model), run.folder / "best.safetensors", d)
    return state


def evaluate(model, task, d: Dist, max_batches: int = 0, autocast=None) -> dict:
    """Validation loss and perplexity over the validation batches (this process's share, then summed),
    plus the task's own metrics when it has `metrics(model, rank, world)` (accuracy, F1, ...)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    count_targets = getattr(task, "targets", _targets)
    batches = islice(task.eval_batches(d.rank, d.world), max_batches or None)
    with torch.no_grad(), autocast or contextlib.nullcontext():
        for batch, counted in _forward_passes(batches, task, d, lockstep=sharded(model)):
            batch = _to(batch, d.device)
            loss_sum, _ = task.loss(model, batch)
            if counted:
                total, count = total + float(loss_sum), count + count_targets(batch)
        extra = task.metrics(model, d.rank, d.world) if hasattr(task, "metrics") else {}
    model.train(was_training)
    total, count = all_reduce_sum([total, count], d)
    if count == 0:
        raise ValueError("the validation split is empty: give the data more documents or a larger val fraction")
    loss = total / count
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), **extra}


def _forward_passes(batches, task, d: Dist, lockstep: bool):
    """(batch, counted) for each validation forward pass. In `lockstep` (FSDP: every forward pass
    gathers the weights from all processes, so all must run as many) a process out of batches repeats
    its last one, uncounted, until every process is out."""
    if not lockstep:
        yield from ((batch, True) for batch in batches)
        return
    batches, last = iter(batches), None
    while True:
        batch = next(batches, None)
        if not all_reduce_max(batch is not None, d):
            return
        if batch is not None:
            last = batch
        elif last is None:  # this process had no batch at all: borrow the first of the split
            last = next(iter(task.eval_batches(0, d.world)))
        yield last, batch is not None


def _evaluate_and_check(model, task, cfg, run, d, state, step, autocast) -> bool:
    """Validate (the last evaluation on the whole validation split), log, remember the best weights;
    True when early stopping says stop."""
    whole = step == cfg.max_steps
    metrics = evaluate(model, task, d, 0 if whole else cfg.eval_batches, autocast)
    run.log({"step": step, **metrics})
    if cfg.metric not in metrics:
        raise ValueError(f"train.metric={cfg.metric!r} is not reported by this task; it reports: "
                         f"{', '.join(metrics)}")
    value, best = metrics[cfg.metric], state["best"]
    smaller_is_better = cfg.metric.endswith(("loss", "ppl"))
    if best is None or (value < best if smaller_is_better else value > best):
        state["best"], state["best_step"], state["bad_evals"] = value, step, 0
        if cfg.patience:  # every process: FSDP gathers the weights
            tmp = run.folder / ".best.safetensors.tmp"
            save_weights(unwrap(model), tmp, main=d.main)
            if d.main:
                tmp.replace(run.folder / "best.safetensors")
    else:
        state["bad_evals"] += 1
    state.update(metrics)
    return bool(cfg.patience) and state["bad_evals"] >= cfg.patience


def _restore_best(model, path, d: Dist) -> None:
    """Go back to the best weights for the export. Under DDP rank 0 exports alone, so it alone reloads;
    under FSDP every process holds a shard, so every process reloads, once rank 0 has written the file."""
    if sharded(model):
        barrier(d)
    elif not d.main:
        return
    if path.exists():
        load_weights(model, path)


def _targets(batch: dict) -> int:
    """How many targets a batch holds: labels that are not the ignore index -100."""
    return int((batch["labels"] != -100).sum())


def _to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _no_sync(net, skip: bool):
    """Skip DDP's gradient all-reduce on all but the last micro-batch of a step."""
    return net.no_sync() if skip and hasattr(net, "no_sync") else contextlib.nullcontext()


def _clip(net, optimizer, scaler, max_norm: float) -> float:
    scaler.unscale_(optimizer)
    params = [p for p in net.parameters() if p.grad is not None]
    if not params:
        return 0.0
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))


def _precision(cfg: TrainConfig, device: torch.device):
    """(autocast context, grad scaler): fp32 on the CPU; bf16/fp16 autocast on accelerators."""
    kind = cfg.precision
    if kind == "auto":
        kind = "fp32" if device.type == "cpu" else (
            "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp16")
    enabled = kind != "fp32"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(kind, torch.float32)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=enabled)
    scaler = torch.amp.GradScaler(device.type, enabled=kind == "fp16")
    return autocast, scaler
