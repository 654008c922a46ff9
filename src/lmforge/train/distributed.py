"""Running under `torchrun`: process group, DDP or FSDP2 wrapping, reductions. No launcher of our own:
`torchrun --nproc-per-node N -m lmforge pretrain CONFIG` runs the same code on N processes.

Under FSDP2 every parameter is a DTensor holding this process's shard. Whatever reads or writes whole
weights (checkpoints, the best weights, the export) goes through `full_model_state` /
`full_optimizer_state` (gathered to rank 0's CPU: every process must call them) and
`load_full_model_state` / `load_full_optimizer_state` (every process passes the same full state and
keeps its shard), all built on `torch.distributed.checkpoint.state_dict`."""

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
    """DDP (a replica per process) or FSDP2 (`fully_shard`: parameters sharded across processes).
    Build the optimizer after this: FSDP2 replaces the model's parameters with sharded ones."""
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


def sharded(model: nn.Module) -> bool:
    """Whether FSDP2 (`fully_shard`) holds the model's parameters, sharded over the processes."""
    if not dist.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_model_state(model: nn.Module) -> dict:
    """The full (unsharded) state dict of an FSDP model on rank 0's CPU; {} on the other ranks.
    A collective: every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The full optimizer state of an FSDP model on rank 0's CPU ({} on the other ranks), numbered as
    `optimizer.state_dict()` numbers parameters, so checkpoints look the same with or without FSDP.
    A collective: every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    named = get_optimizer_state_dict(model, optimizer, options=options)
    if not named:
        return {}
    number = {name: i for i, name in enumerate(_param_names(model, optimizer))}
    return {"state": {number[name]: s for name, s in named["state"].items()},
            "param_groups": [{**g, "params": [number[n] for n in g["params"]]} for g in named["param_groups"]]}


def load_full_model_state(model: nn.Module, weights: dict) -> None:
    """Load full (unsharded) weights into an FSDP model; each process keeps its shard. Every process
    calls it with the same weights (each reads the file)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a full optimizer state, numbered as `optimizer.state_dict()` numbers parameters, into the
    optimizer of an FSDP model; each process keeps its shard. Every process calls it with the same state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _param_names(model, optimizer)
    named = {"state": {names[i]: s for i, s in state["state"].items()},
             "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, named, options=StateDictOptions(full_state_dict=True))


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the order `optimizer.state_dict()` numbers them (0, 1, ... over the groups)."""
    name = {p: n for n, p in model.named_parameters()}
    return [name[p] for group in optimizer.param_groups for p in group["params"]]


def unsharded(model: nn.Module, d: Dist) -> nn.Module | None:
    """`model` itself; under FSDP an ordinary copy with the full weights on rank 0's CPU (None on the
    other ranks), to export. A collective under FSDP: every process must call it."""
    if not sharded(model):
        return model
    from torch.distributed.fsdp import FSDPModule

    weights = full_model_state(model)
    if not d.main:
        return None
    plain_class = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))  # fully_shard subclassed it
    with torch.device("meta"):
        plain = plain_class(model.config)
    plain.load_state_dict(weights, assign=True)
    if hasattr(plain, "tie_weights"):
        plain.tie_weights()  # assign=True gave tied weights separate Parameters
    return plain.train(model.training)


def all_reduce_sum(values: list[float], d: Dist) -> list[float]:
    """Sum numbers over all processes (identity for one process)."""
    if not d.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=d.device if d.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_max(value: float, d: Dist) -> float:
    """The largest of a number over all processes (identity for one process)."""
    if not d.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=d.device if d.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def shutdown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
