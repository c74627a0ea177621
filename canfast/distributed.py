"""The torch.distributed job a run belongs to, when it was started by ``torchrun``.

canfast needs no option for it: ``torchrun --nproc-per-node N canfast sweep ...`` sets the
launcher's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` ...), and the run joins the
process group with gloo on the CPU or nccl on CUDA. Without that environment a run is one process
of a world of one, and nothing here touches torch.distributed.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Job:
    """This process's place in the run: its rank, the world size and the local rank."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def leader(self) -> bool:
        """Rank 0: the one process that writes the run's final files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


SINGLE = Job()


def launched() -> bool:
    """Whether torchrun (or another launcher with its environment) started this process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def join(device: str | None = None) -> Job:
    """Join the launcher's process group, or return the world of one.

    The backend follows the device: nccl when the run computes on CUDA, gloo otherwise. On CUDA
    each rank takes the GPU of its local rank (:func:`rank_device`).
    """
    if not launched():
        return SINGLE
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed")
    job = Job(
        int(os.environ["RANK"]),
        int(os.environ["WORLD_SIZE"]),
        int(os.environ.get("LOCAL_RANK", "0")),
    )
    if not dist.is_initialized():
        cuda = device is not None and device.startswith("cuda") and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(job.local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
    return job


def leave() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_device(device: str | None, job: Job) -> str | None:
    """The device of this rank: ``cuda`` becomes ``cuda:LOCAL_RANK`` under a launcher."""
    if job.distributed and device == "cuda":
        return f"cuda:{job.local_rank}"
    return device


def rank_max_memory() -> dict | None:
    """Under a launcher on CUDA, the memory a ``device_map="auto"`` model of this rank may use:
    its own contiguous share of the node's GPUs (and the CPU), so that the ranks of a node do
    not all fill GPU 0. None outside a launcher or without CUDA."""
    if not launched() or not torch.cuda.is_available():
        return None
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    per_rank = max(1, torch.cuda.device_count() // max(local, 1))
    first = rank * per_rank
    gpus = range(first, min(first + per_rank, torch.cuda.device_count()))
    share: dict = {i: torch.cuda.get_device_properties(i).total_memory for i in gpus}
    import psutil  # accelerate's own dependency

    share["cpu"] = psutil.virtual_memory().available // max(local, 1)
    return share


def _exchange_device() -> torch.device:
    """Where collective buffers live: nccl only moves CUDA tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_agree(ok: bool, job: Job) -> bool:
    """Whether every rank is ``ok`` (a collective: every rank must call it at the same point)."""
    if not job.distributed:
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=_exchange_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def same_everywhere(text: str, job: Job) -> bool:
    """Whether every rank holds the same ``text`` (compared by its SHA-256)."""
    if not job.distributed:
        return True
    digest = hashlib.sha256(text.encode()).digest()
    mine = torch.tensor(list(digest), dtype=torch.int32, device=_exchange_device())
    low, high = mine.clone(), mine.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    return bool(torch.equal(low, high))


def sum_exact(values: torch.Tensor, job: Job) -> torch.Tensor:
    """The sum over ranks of float64 buffers in which each entry comes from one rank and is zero
    on every other: adding zeros is exact, so the result is bit for bit the owner's value."""
    if not job.distributed:
        return values
    buffer = values.to(device=_exchange_device(), dtype=torch.float64)
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    return buffer.cpu()
