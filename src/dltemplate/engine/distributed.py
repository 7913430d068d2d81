"""Process-group set-up for ``torchrun`` and the few collectives the engine needs.

On one process every function here is a cheap no-op, so the trainer calls them unconditionally.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from dltemplate.engine import slurm


@dataclass
class DistContext:
    """Where this process stands: its rank among ``world_size`` and its local GPU index."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes logs, TensorBoard and checkpoints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """Whether several processes take part."""
        return self.world_size > 1


def adopt_srun_ranks() -> None:
    """For a task of ``srun --ntasks N`` without torchrun: set the variables torchrun would
    (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``,
    ``MASTER_PORT``) from SLURM's, so that everything after reads one set of names."""
    ranks = slurm.srun_ranks()
    if ranks is None:
        return
    per_node = os.environ.get("SLURM_STEP_TASKS_PER_NODE") or os.environ.get(
        "SLURM_TASKS_PER_NODE", "1"
    )
    os.environ.update(
        RANK=str(ranks.rank),
        WORLD_SIZE=str(ranks.world_size),
        LOCAL_RANK=str(ranks.local_rank),
        LOCAL_WORLD_SIZE=per_node.split("(")[0].split(",")[0],
        MASTER_ADDR=os.environ.get("MASTER_ADDR", ranks.master_addr),
        MASTER_PORT=os.environ.get("MASTER_PORT", str(ranks.master_port)),
    )


def init_distributed(use_cuda: bool) -> DistContext:
    """Join the process group that ``torchrun`` (or an ``srun`` step of several tasks)
    describes in the environment, if any."""
    adopt_srun_ranks()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    ctx = DistContext(
        rank=int(os.environ["RANK"]),
        world_size=world_size,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )
    if not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        if use_cuda:
            torch.cuda.set_device(ctx.local_rank)
        timeout = datetime.timedelta(minutes=30)
        attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        if attempt == 0:
            dist.init_process_group(backend, timeout=timeout)
        else:
            # torchrun keeps its key-value store across restarts: without a fresh prefix the
            # restarted workers would read the failed attempt's peer addresses and not connect.
            store, _, _ = next(dist.rendezvous("env://", ctx.rank, world_size, timeout=timeout))
            store = dist.PrefixStore(f"attempt_{attempt}", store)
            dist.init_process_group(
                backend, store=store, rank=ctx.rank, world_size=world_size, timeout=timeout
            )
    return ctx


def shutdown_distributed() -> None:
    """Leave the process group (safe to call when there is none)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensors: list[torch.Tensor]) -> None:
    """Sum each tensor over all processes, in place."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)


def all_reduce_max(tensor: torch.Tensor) -> None:
    """Replace ``tensor`` by its element-wise maximum over all processes, in place."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)


def collective_device() -> torch.device:
    """Where tensors for collectives live: the GPU under NCCL, the CPU under gloo."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` as held by process ``src``, on every process."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """A list of every process's ``obj``, indexed by rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait for every process."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
