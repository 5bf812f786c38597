"""The processes of one training run on several devices (`accelerate launch`, torchrun): which one
this is, how many there are, and the few collective operations the run needs.

One process is rank 0 of 1, and every operation here is then a no-op, so the single-device code
path is the same code. Under a launcher the process group is accelerate's (`PartialState`): gloo on
the CPU, NCCL on GPUs.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Ranks:
    """Process `index` of `count`; `device` is where collective tensors live (NCCL needs CUDA)."""

    index: int = 0
    count: int = 1
    device: str = "cpu"

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes the run directory and prints progress."""
        return self.index == 0

    def share(self, items: list) -> list:
        """This process's share of `items`: every count-th one from its index (disjoint, covering)."""
        return items[self.index :: self.count]

    def rows(self, size: int) -> slice:
        """This process's contiguous rows of a global batch of `size` (a multiple of `count`)."""
        per = size // self.count
        return slice(self.index * per, (self.index + 1) * per)

    def wait(self) -> None:
        """Barrier: return once every process got here."""
        if self.count > 1:
            torch.distributed.barrier()

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the block, then the others: for work that fills a shared cache on first use
        (a built-in model built into the cache folder), which would race if all ran it at once."""
        if not self.main:
            self.wait()
        yield
        if self.main:
            self.wait()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of `value` over the processes (a detached copy)."""
        if self.count == 1:
            return value.detach()
        total = value.detach().to(self.device, torch.float32).clone()
        torch.distributed.all_reduce(total)
        return (total / self.count).to(value.device, value.dtype)

    def any(self, flag: bool) -> bool:
        """Whether `flag` is true on any process, so that all of them take the same branch (a stop
        asked of one process stops all at the same step)."""
        if self.count == 1:
            return flag
        value = torch.tensor([int(flag)], device=self.device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return bool(value.item())

    def average_(self, tensors: list[torch.Tensor], bucket: int = 2**25) -> None:
        """Replace each tensor (gradients) by its mean over the processes, in place. Tensors are
        summed in buckets of up to `bucket` elements of one dtype, so a model of many small
        gradients makes a few collective calls; a large contiguous one (a flat buffer) goes alone."""
        if self.count == 1:
            return
        for group in _buckets(tensors, bucket):
            if len(group) == 1 and group[0].is_contiguous():
                torch.distributed.all_reduce(group[0])
                group[0].div_(self.count)
                continue
            flat = torch.cat([t.reshape(-1) for t in group])
            torch.distributed.all_reduce(flat)
            flat.div_(self.count)
            for t, part in zip(group, flat.split([t.numel() for t in group])):
                t.copy_(part.view(t.shape))

    def broadcast_(self, tensors: list[torch.Tensor]) -> None:
        """Overwrite each tensor with rank 0's, in place (what DDP does to a model it wraps)."""
        if self.count == 1:
            return
        for t in tensors:
            if t.is_contiguous():
                torch.distributed.broadcast(t, src=0)
            else:
                dense = t.contiguous()
                torch.distributed.broadcast(dense, src=0)
                t.copy_(dense)

    def gather(self, part: dict) -> dict:
        """The union of every process's `part` (picklable values; tensors should be on the CPU)."""
        if self.count == 1:
            return part
        parts: list = [None] * self.count
        torch.distributed.all_gather_object(parts, part)
        return {key: value for p in parts for key, value in p.items()}


def _buckets(tensors: list[torch.Tensor], size: int) -> list[list[torch.Tensor]]:
    """`tensors` in consecutive groups of one dtype and device, each up to `size` elements (a larger
    tensor makes a group of its own)."""
    groups: list[list[torch.Tensor]] = []
    filled = 0
    for t in tensors:
        last = groups[-1] if groups else None
        if last is None or (last[0].dtype, last[0].device) != (t.dtype, t.device) or filled + t.numel() > size:
            groups.append([t])
            filled = t.numel()
        else:
            last.append(t)
            filled += t.numel()
    return groups


def launched_world_size() -> int:
    """How many processes the launcher started (1 without one); read before any process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    """This process's rank as the launcher set it (0 without one)."""
    return int(os.environ.get("RANK", "0"))


def launched_ranks(device: torch.device) -> Ranks:
    """This process's `Ranks`; under a launcher this starts the process group (through accelerate's
    `PartialState`, which the run's Accelerator then shares) on `device`'s kind."""
    if launched_world_size() <= 1:
        return Ranks()
    from accelerate.state import PartialState

    state = PartialState(cpu=device.type == "cpu")
    where = state.device if state.device.type == "cuda" else torch.device("cpu")
    return Ranks(state.process_index, state.num_processes, str(where))
