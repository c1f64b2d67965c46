"""``torch.distributed`` as ``torchrun`` launches it: joining the process group, leaving it cleanly, and which
process writes. Every ``gradmetanet run`` experiment trained by :func:`~gradmetanet.metanets.training.fit_regression` is
data-parallel under ``torchrun`` (gloo on CPU, NCCL on GPU); rank 0 writes the run folder."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["init_from_environment", "shut_down", "is_main_process", "is_distributed", "rank_and_world",
           "all_reduce_sum"]


def init_from_environment(device: str = "cpu") -> bool:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1); ``True`` when distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return True


def shut_down() -> None:
    """Leave the process group once every rank is done (a no-op when not distributed).

    The barrier keeps a fast rank from tearing its connections down while a peer still talks to
    it, and destroying the group joins gloo's worker threads while the interpreter is alive:
    left to interpreter exit, their teardown can abort the process.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def is_distributed() -> bool:
    """Whether a process group of more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def is_main_process() -> bool:
    return rank_and_world()[0] == 0


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """The sum of ``value`` over every process (``value`` itself in one process); a collective."""
    if not is_distributed():
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out
