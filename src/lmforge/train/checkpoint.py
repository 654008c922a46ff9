"""Checkpoints `step-N/` that resume a run exactly, written atomically.

A checkpoint is assembled in `.step-N.tmp/` (files fsync'ed) and renamed into place, so a crash
while saving leaves the previous checkpoints as they were; only the last `keep_last` are kept.
Contents: `model.safetensors` (our parameter names), `optimizer.pt`, `rng.pt` (torch/python/numpy
random states) and `trainer.json` (step, tokens seen, best validation loss, ...).

Under FSDP the same files are written: every process calls `save_checkpoint` (the full weights and
optimizer state are gathered to rank 0, which alone writes), and every process reads the checkpoint
back and keeps its shard. So a run can resume with or without FSDP, whichever way it was saved.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model

from .distributed import (
    full_model_state,
    full_optimizer_state,
    load_full_model_state,
    load_full_optimizer_state,
    sharded,
)

STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(run_dir: Path, step: int, model, optimizer, state: dict, keep_last: int = 2,
                    main: bool = True) -> Path | None:
    """Write `run_dir/step-{step}` atomically and delete checkpoints older than the last `keep_last`.
    Only `main` writes; under FSDP every process must call this (the full state is gathered first)."""
    if not (main or sharded(model)):
        return None
    weights = full_model_state(model) if sharded(model) else None  # FSDP: every process helps gather
    optimizer_state = full_optimizer_state(model, optimizer) if sharded(model) else optimizer.state_dict()
    if not main:
        return None
    final, tmp = run_dir / f"step-{step}", run_dir / f".step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _write_weights(model, weights, tmp / "model.safetensors")
    torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save(_rng_states(), tmp / "rng.pt")
    (tmp / "trainer.json").write_text(json.dumps({**state, "step": step}, indent=2))
    _fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(run_dir)
    for old in checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old)
    return final


def load_checkpoint(path: Path, model, optimizer=None) -> dict:
    """Restore model, optimizer and random states; returns the trainer state (with "step").
    Under FSDP every process calls this, after `fully_shard` and building the optimizer."""
    load_weights(model, path / "model.safetensors")
    if optimizer is not None:
        optimizer_state = torch.load(path / "optimizer.pt", weights_only=True)
        if sharded(model):
            load_full_optimizer_state(model, optimizer, optimizer_state)
        else:
            optimizer.load_state_dict(optimizer_state)
    _set_rng_states(torch.load(path / "rng.pt", weights_only=False))
    return json.loads((path / "trainer.json").read_text())


def save_weights(model, path: Path, main: bool = True) -> None:
    """`model`'s weights as safetensors. Only `main` writes; under FSDP every process must call this
    (the full weights are gathered first)."""
    weights = full_model_state(model) if sharded(model) else None
    if main:
        _write_weights(model, weights, path)


def load_weights(model, path: Path) -> None:
    """Load weights written by `save_weights` into `model`, sharded by FSDP or not; every name must match.
    Under FSDP every process calls this."""
    if sharded(model):
        weights = _read_weights(path)
        expected = model.state_dict().keys()
        missing, unexpected = sorted(expected - weights.keys()), sorted(weights.keys() - expected)
        if not (missing or unexpected):
            load_full_model_state(model, weights)
    else:
        missing, unexpected = load_model(model, str(path), strict=False)
    if missing or unexpected:
        raise ValueError(f"{path.parent}: checkpoint does not match the model (missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}); was the config changed since the run started?")


def _write_weights(model, weights: dict | None, path: Path) -> None:
    """safetensors of `model`, or of its gathered full `weights` under FSDP. Either way tied weights are
    stored once: the alphabetically first name kept, the others named in the metadata (`save_model`'s way)."""
    if weights is None:
        save_model(model, str(path))
        return
    tied = _tied_names(model)
    save_file({k: v for k, v in weights.items() if k not in tied}, str(path), metadata=tied or None)


def _tied_names(model) -> dict[str, str]:
    """{name: kept name} for each parameter reachable under several names (tied embeddings)."""
    names = defaultdict(list)
    for name, param in model.named_parameters(remove_duplicate=False):
        names[param].append(name)
    return {name: min(group) for group in names.values() for name in group if name != min(group)}


def _read_weights(path: Path) -> dict:
    """A safetensors file as a full state dict: tied weights stored once are given all their names."""
    weights = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        tied = f.metadata() or {}
    weights.update({name: weights[kept] for name, kept in tied.items() if kept in weights})
    return weights


def _rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _fsync_tree(folder: Path) -> None:
    for f in folder.iterdir():
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
