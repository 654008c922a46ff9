"""Running under `torchrun`: process group, DDP or FSDP2 wrapping, reductions. No launcher of our own:
`torchrun --nproc-per-node N -m lmforge pretrain CONFIG` runs the same code on N processes."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def pick_device(name: str = "auto") -> torch.device:
    """"auto" = CUDA, else MPS, else CPU."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def init_distributed(device: str = "auto") -> Dist:
    """Join the process group torchrun set up (gloo on CPU, nccl on GPU); a single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    chosen = pick_device(device)
    if world == 1:
        return Dist(device=chosen)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if chosen.type == "cuda":
        chosen = torch.device("cuda", local_rank)
        torch.cuda.set_device(chosen)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if chosen.type == "cuda" else "gloo")
    return Dist(rank=rank, world=world, local_rank=local_rank, device=chosen)


def wrap(model: nn.Module, d: Dist, strategy: str = "ddp") -> nn.Module:
    """DDP (a replica per process) or FSDP2 (`fully_shard`: parameters sharded across processes)."""
    if not d.enabled:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in getattr(getattr(model, "model", model), "layers", []):
            fully_shard(layer)
        return fully_shard(model)
    if strategy != "ddp":
        raise ValueError(f"unknown distributed strategy {strategy!r}; choose ddp or fsdp")
    ids = [d.device.index] if d.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def all_reduce_sum(values: list[float], d: Dist) -> list[float]:
    """Sum numbers over all processes (identity for one process)."""
    if not d.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=d.device if d.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def shutdown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
