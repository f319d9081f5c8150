"""Distributed training of ``bsr-finetune``: the process group and the samplers, in one place.

* :func:`setup_distributed` joins a ``torchrun`` job: NCCL on GPUs, gloo on CPU
  (:class:`DistInfo` says where this process runs); :func:`teardown_distributed` leaves it.
* The batch size is global: :class:`GlobalBatchSampler` gives every process its share of the same
  global batches whatever the number of processes, and DDP averages the gradients.
  :class:`ShardSampler` cuts the evaluation set into contiguous shards.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = ["DistInfo", "setup_distributed", "teardown_distributed", "barrier",
           "GlobalBatchSampler", "ShardSampler"]


# --- process group -----------------------------------------------------------------------------

@dataclasses.dataclass
class DistInfo:
    """Where this process runs: ``rank`` of ``world_size``, on ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether there is more than one process."""
        return self.world_size > 1


def setup_distributed(device: Optional[str] = None) -> DistInfo:
    """Joins the ``torchrun`` process group when there is one.

    Args:
        device: "cpu", "cuda" or None (CUDA when available).

    Returns:
        This process's :class:`DistInfo`. Without ``torchrun`` (``WORLD_SIZE`` unset or 1) no
        process group is made.
    """
    if device not in (None, "cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    use_cuda = torch.cuda.is_available() if device is None else device == "cuda"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        if local_world > 1:  # share the cores instead of oversubscribing them
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistInfo(rank, world, local, dev)


def teardown_distributed() -> None:
    """Leaves the process group, if any, once every process has arrived (destroying a gloo
    group while a peer still has collectives in flight can abort that peer)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    """Waits for every process (nothing with one process)."""
    if info.distributed:
        dist.barrier()


# --- samplers -----------------------------------------------------------------------------

class GlobalBatchSampler(Sampler):
    """Batches whose union over processes is the same whatever the number of processes.

    Each epoch shuffles ``range(n)`` with a generator seeded by ``(seed, epoch)``, cuts it into
    global batches of ``batch_size`` (the last, incomplete one is dropped when ``drop_last``),
    and gives process ``rank`` the ``rank``-th of ``world_size`` equal slices of each.

    Args:
        n: dataset length.
        batch_size: global batch size, a multiple of ``world_size``.
        rank, world_size: this process and the number of processes.
        seed: base seed of the shuffling.
        shuffle: shuffle (training) or keep the order.
        drop_last: drop the last incomplete global batch (keeps every step's batch equal).
    """

    def __init__(self, n: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True, drop_last: bool = True):
        if batch_size < 1 or batch_size % world_size:
            raise ValueError(f"batch_size ({batch_size}) must be a positive multiple of the "
                             f"number of processes ({world_size})")
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.epoch, self.start = 0, 0

    def global_count(self, b: int) -> int:
        """The images of global batch ``b`` (0-based, of an epoch) over all processes: the
        batch size, or fewer for a last, short batch kept (``drop_last=False``; one image per
        process at least: a batch smaller than that is cycled)."""
        return max(min(self.batch_size, self.n - b * self.batch_size), self.world_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Selects the shuffle of ``epoch``, and its first batch ``start`` (resuming a run
        inside an epoch); the length stays the whole epoch's."""
        self.epoch, self.start = int(epoch), int(start)

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def __iter__(self) -> Iterator[list]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        local = self.batch_size // self.world_size
        for b in range(self.start, len(self)):
            batch = order[b * self.batch_size:(b + 1) * self.batch_size]
            if len(batch) < self.batch_size:   # last batch, not dropped: share it out evenly
                if len(batch) < self.world_size:   # an image for every process: cycle the
                    batch = (batch * self.world_size)[:self.world_size]  # batch, as torch's
                per, extra = divmod(len(batch), self.world_size)      # DistributedSampler pads
                lo = self.rank * per + min(self.rank, extra)
                yield batch[lo:lo + per + (self.rank < extra)]
            else:
                yield batch[self.rank * local:(self.rank + 1) * local]


class ShardSampler(Sampler):
    """Contiguous evaluation shards: process ``rank`` gets its slice of ``range(n)``, no padding.

    Args:
        n: dataset length.
        rank, world_size: this process and the number of processes.
    """

    def __init__(self, n: int, rank: int = 0, world_size: int = 1):
        per = -(-n // world_size)
        self.indices = list(range(min(n, rank * per), min(n, (rank + 1) * per)))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)
