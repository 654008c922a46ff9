"""Checkpoints `step-N/` that resume a run exactly, written atomically.

A checkpoint is assembled in `.step-N.tmp/` (files fsync'ed) and renamed into place, so a crash
while saving leaves the previous checkpoints as they were; only the last `keep_last` are kept.
Contents: `model.safetensors` (our parameter names), `optimizer.pt`, `rng.pt` (torch/python/numpy
random states) and `trainer.json` (step, tokens seen, best validation loss, ...).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model, save_model

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


def save_checkpoint(run_dir: Path, step: int, model, optimizer, state: dict, keep_last: int = 2) -> Path:
    """Write `run_dir/step-{step}` atomically and delete checkpoints older than the last `keep_last`."""
    final, tmp = run_dir / f"step-{step}", run_dir / f".step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
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
    """Restore model, optimizer and random states; returns the trainer state (with "step")."""
    missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match the model (missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}); was the config changed since the run started?")
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    _set_rng_states(torch.load(path / "rng.pt", weights_only=False))
    return json.loads((path / "trainer.json").read_text())


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
