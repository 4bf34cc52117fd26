"""Single-process or DistributedDataParallel, decided by the environment torchrun sets.

Under ``torchrun --nproc_per_node N`` every process runs the same command; WORLD_SIZE, RANK and
LOCAL_RANK tell them apart. We use gloo on the CPU and NCCL on CUDA (one GPU per process, by LOCAL_RANK).
Only rank 0 writes files (teacher cache, checkpoints, metrics, the student); the others wait at barriers
where they need those files. Multi-node runs are the same command on every node with
``--nnodes M --node_rank K --rdzv_endpoint HOST:PORT`` (see the README).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from onnx_inher.errors import InputError


@dataclass(frozen=True)
class World:
    """Where this process stands: its rank, how many processes, and its device."""

    rank: int
    size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast_float(self, value: float) -> float:
        """Rank 0's value on every rank (decisions such as early stopping must agree)."""
        if not self.distributed:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.broadcast(tensor, src=0)
        return float(tensor.item())


def pick_device(preference: str) -> torch.device:
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise InputError("--device cuda: torch has no CUDA device here; use --device cpu or auto")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init_world(preference: str) -> World:
    """Join the process group when torchrun started us (WORLD_SIZE > 1), else a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(preference)
    if size <= 1:
        return World(0, 1, device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return World(dist.get_rank(), dist.get_world_size(), device)


def close_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
