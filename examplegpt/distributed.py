"""Scale and speed applied from outside the model: torchrun process groups, DDP, FSDP2, activation checkpointing,
and the full (unsharded) state dicts that checkpoints save under FSDP.

`model.py` stays a plain single-device module; these functions wrap it.
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist
import torch.utils.checkpoint

from .model import GPT
from .optim import torch_optimizers


@dataclass
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def print(self, *args, **kwargs) -> None:
        """Print on rank 0 only."""
        if self.is_main:
            print(*args, **kwargs)


SINGLE_PROCESS = World()


def torchrun_world_size() -> int:
    """The number of processes torchrun started for this run (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_world(device_type: str) -> World:
    """Join the process group that torchrun describes in the environment (NCCL on CUDA, gloo otherwise)."""
    if torchrun_world_size() == 1:
        return World()
    world = World(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))
    if device_type == "cuda":
        torch.cuda.set_device(world.local_rank)
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    if not world.is_main:  # only rank 0 talks
        sys.stdout = open(os.devnull, "w")
    return world


def mean_over_ranks(value: float, world: World, device: torch.device) -> float:
    if world.size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / world.size


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def apply_activation_checkpointing(model: GPT) -> None:
    """Recompute each block's activations in the backward pass instead of storing them.

    The block's forward is replaced in place, so parameter names (and checkpoints) do not change.
    """
    for block in model.transformer.h:
        block.forward = functools.partial(torch.utils.checkpoint.checkpoint, block.forward, use_reentrant=False)


def wrap_data_parallel(model: GPT, world: World, device: torch.device, fsdp: bool) -> torch.nn.Module:
    """DDP (a full copy per rank, gradients all-reduced) or FSDP2 (parameters sharded per block)."""
    if world.size == 1:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def model_state(model: GPT, world: World, fsdp: bool) -> dict:
    """The model's full state dict (under FSDP gathered from every rank: a collective, every rank calls it)."""
    if fsdp and world.size > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return model.state_dict()


def optimizer_state(model: GPT, optimizer: torch.optim.Optimizer, world: World, fsdp: bool) -> dict:
    """The optimizer's full state dict (a collective under FSDP, as `model_state`)."""
    if fsdp and world.size > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(
            model, torch_optimizers(optimizer), options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    return optimizer.state_dict()


def load_states(model: GPT, optimizer: torch.optim.Optimizer, state: dict, world: World, fsdp: bool) -> None:
    """Put a checkpoint's full model and optimizer state back (under FSDP each rank keeps its shard)."""
    if fsdp and world.size > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(
            model,
            torch_optimizers(optimizer),
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
            options=StateDictOptions(full_state_dict=True),
        )
    else:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])


def exit_without_teardown(status: int) -> NoReturn:
    """End a finished torchrun worker (ranks met, process group destroyed) without the interpreter's teardown.

    The teardown can abort (SIGABRT, "terminate called without an active exception": a gloo thread
    still joinable while C++ statics are destroyed) and would turn a finished run into a failed one.
    Everything is saved, closed and flushed by then, so the process leaves at once with its status.
    Called by the `train` command, not by `train()`, which returns to its caller as usual.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def shutdown(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
