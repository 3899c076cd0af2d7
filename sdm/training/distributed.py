"""Processes that train one model together: PyTorch DDP, launched by `torchrun`.

torchrun starts one process per rank and tells each its place through the environment (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); without it, a process is a world of one and
nothing here talks to anybody. gloo carries the collectives on CPU, nccl on GPUs.

What the trainer needs from the other ranks is small: sums (the number of targets of a step,
loss totals, metric sums) and, for in-batch negatives, the other ranks' target vectors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from pipeline.errors import InputError

DEVICES = ("auto", "cpu", "cuda")
# Rank 0 evaluates and writes a checkpoint while the others wait at the next collective.
COLLECTIVE_TIMEOUT = timedelta(hours=2)


def resolve_device(option: str, local_rank: int = 0) -> torch.device:
    """--device auto|cpu|cuda -> the device of this process (its local rank's GPU under DDP)."""
    if option not in DEVICES:
        raise InputError(f"--device {option!r}: expected one of {', '.join(DEVICES)}")
    if option == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: PyTorch sees no CUDA device here; use --device cpu (or auto)")
    if option == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes that train together."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes checkpoints, history and logs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def sum(self, values: Tensor) -> Tensor:
        """values summed over every rank (the same result on each); values itself in a world of one."""
        if not self.distributed:
            return values
        total = values.to(self.device, copy=True)
        dist.all_reduce(total)
        return total.to(values.device)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def share(self, n: int) -> tuple[int, int]:
        """This rank's contiguous share [start, stop) of n items, the shares as equal as possible."""
        return n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size

    def gather(self, values: Tensor) -> tuple[Tensor, int]:
        """(every rank's rows of values [n_r, ...] concatenated in rank order, the offset of this
        rank's first row). Gradients flow back to each rank's own rows."""
        if not self.distributed:
            return values, 0
        counts = torch.zeros(self.world_size, dtype=torch.int64, device=values.device)
        counts[self.rank] = len(values)
        counts = self.sum(counts).tolist()
        padded = values.new_zeros((max(counts), *values.shape[1:]))
        padded = torch.cat([values, padded[len(values):]])  # equal shapes on every rank, as all_gather needs
        # torch.distributed.nn's all_gather is differentiable: its backward sums each rank's
        # gradients for our rows, so the loss terms of every rank reach the rows they used.
        from torch.distributed.nn.functional import all_gather

        parts = all_gather(padded)
        gathered = torch.cat([part[:count] for part, count in zip(parts, counts, strict=True)])
        return gathered, sum(counts[: self.rank])


def join(device_option: str) -> Ranks:
    """This process's Ranks: from torchrun's environment (joining the process group), or alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_option, local_rank)
    if world_size == 1:
        return Ranks(device=device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
    return Ranks(dist.get_rank(), dist.get_world_size(), device)


def leave(ranks: Ranks) -> None:
    if ranks.distributed and dist.is_initialized():
        dist.destroy_process_group()
