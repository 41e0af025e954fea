"""The process group a training run joins: set up by ``torchrun`` (its environment variables),
never by fastseg itself, and used only through ``torch.distributed``.

Run ``torchrun --nproc-per-node=N script.py`` (add ``--nnodes``, ``--node-rank`` and
``--rdzv-endpoint`` for several machines): the trainer reads ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``, joins with NCCL on CUDA or gloo on CPU, and trains with DistributedDataParallel.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistributedContext", "setup_distributed", "all_reduce_sum"]


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: ``rank`` of ``world_size`` processes, ``local_rank`` on its
    node, the ``device`` it trains on. ``world_size == 1`` without torchrun."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs, draws and writes checkpoints."""
        return self.rank == 0


def setup_distributed(device: str | torch.device | None = None) -> DistributedContext:
    """Join the process group torchrun describes (if any) and choose the device.

    ``device``: ``None`` picks ``cuda:<LOCAL_RANK>`` when CUDA is available, else ``cpu``; a
    ``"cuda"`` without index means this process's local GPU. With ``WORLD_SIZE > 1`` in the
    environment and no process group yet, one is initialised (``nccl`` for CUDA, ``gloo`` for
    CPU); an existing group is used as it is.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.is_initialized():
        return DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank, device)
    return DistributedContext(device=device)


def all_reduce_sum(values: list[float], context: DistributedContext) -> list[float]:
    """Element-wise sum of ``values`` over all processes (unchanged in one process)."""
    if not context.distributed:
        return list(values)
    device = context.device if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()
