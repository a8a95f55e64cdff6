"""Data parallelism across processes with torch.distributed: `score` and `finetune`.

Launched by `torchrun --nproc-per-node N -m wandacli score|finetune ...` (or `accelerate
launch`): every process loads the model (each on its own GPU with NCCL, or on the CPU with
gloo) and takes its share of the work; all-reduces (sums) combine what the shares found, and
only rank 0 touches the store or saves a model. A rank that fails makes torchrun stop the
others before rank 0 can write anything complete.

    score     every N-th calibration sample per rank; the sums (wanda's squared input norms,
              wandg's |grad| sums, actsvd's second moments and token count) all-reduced
    finetune  every N-th pair of each batch per rank; the gradients all-reduced before each
              step (training/finetune.py)
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

# A tensor off the group's device crosses to it in pieces of this many elements (64 MiB of
# float64): the device never holds a second copy of a whole sum.
STAGING_ELEMENTS = 8 << 20


@dataclass(frozen=True)
class Distributed:
    """This process's place in the group; world_size 1 means no group at all. `device` is
    where the group's collectives run: NCCL takes only tensors on this rank's GPU."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

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
        """Sum tensors across ranks, in place. A tensor elsewhere than the group's device
        (actsvd's token counter, --offload-accumulators' CPU sums under NCCL) goes through the
        device in pieces and comes back summed."""
        if not self.active:
            return
        import torch

        device = torch.device(self.device)
        for tensor in tensors:
            if tensor.device == device:
                self._all_reduce(tensor)
                continue
            pieces = (
                [
                    tensor.view(-1)[i : i + STAGING_ELEMENTS]
                    for i in range(0, tensor.numel(), STAGING_ELEMENTS)
                ]
                if tensor.is_contiguous()
                else [tensor]
            )
            for piece in pieces:
                staged = self._to_group(piece)
                self._all_reduce(staged)
                piece.copy_(staged)

    def _to_group(self, tensor: Any) -> Any:
        return tensor.to(self.device)

    def _all_reduce(self, tensor: Any) -> None:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)

    def broadcast_int(self, value: int) -> int:
        """Rank 0's value, on every rank."""
        if not self.active:
            return value
        import torch
        import torch.distributed as dist

        tensor = torch.tensor([value], dtype=torch.long, device=self.device)
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
    device = f"cuda:{local_rank}" if dist.get_backend() == "nccl" else "cpu"
    return Distributed(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_prefix() -> str:
    """'rank 1: ' inside a multi-process run, '' otherwise (for error messages)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"rank {os.environ.get('RANK', '?')}: "
    return ""
