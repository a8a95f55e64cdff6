"""Data-parallel scoring across processes with torch.distributed.

Launched by `torchrun --nproc-per-node N -m wandacli score ...` (or `accelerate launch`): every
process loads the model (each on its own GPU with NCCL, or on the CPU with gloo), takes every
N-th calibration sample, and accumulates its own sums (wanda's squared input norms, wandg's
|grad| sums, actsvd's second moments and token count); an all-reduce (sum) combines them and only rank 0 touches the store. A rank that fails makes
torchrun stop the others before rank 0 can write a complete set.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Distributed:
    """This process's place in the group; world_size 1 means no group at all."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def local_indices(self, total: int) -> list[int]:
        """The samples this rank processes: every world_size-th, starting at its rank."""
        return list(range(self.rank, total, self.world_size))

    def steps(self, total: int) -> int:
        """Loop length shared by every rank, so collective calls line up."""
        return -(-total // self.world_size)

    def all_reduce_sum(self, tensors: Iterable[Any]) -> None:
        """Sum tensors across ranks, in place."""
        if not self.active:
            return
        import torch.distributed as dist

        for tensor in tensors:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)

    def broadcast_int(self, value: int) -> int:
        """Rank 0's value, on every rank."""
        if not self.active:
            return value
        import torch
        import torch.distributed as dist

        device = (
            torch.device("cuda", torch.cuda.current_device())
            if dist.get_backend() == "nccl"
            else torch.device("cpu")
        )
        tensor = torch.tensor([value], dtype=torch.long, device=device)
        dist.broadcast(tensor, src=0)
        return int(tensor.item())

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()


SINGLE = Distributed()


def from_environment(device: str) -> Distributed:
    """Join the process group torchrun (or accelerate) describes in the environment; a single
    process when there is none. NCCL on CUDA, gloo on the CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return SINGLE
    import torch
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    use_cuda = device in ("cuda", "auto") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Distributed(rank=rank, world_size=world_size, local_rank=local_rank)


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_prefix() -> str:
    """'rank 1: ' inside a multi-process run, '' otherwise (for error messages)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"rank {os.environ.get('RANK', '?')}: "
    return ""
