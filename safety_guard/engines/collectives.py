"""The few collective operations safety-guard needs, no-ops in a single process.

Every rank calls the same operations in the same order (the guard's decisions depend only on
all-reduced numbers), so no rank waits on work another does alone.

Example:
    >>> rank_and_world()
    (0, 1)
    >>> all_reduce_sum([1.0, 2.0])
    [1.0, 2.0]
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "all_gather_objects",
    "all_reduce_bits",
    "all_reduce_max",
    "all_reduce_sum",
    "barrier",
    "rank_and_world",
]


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _collective_device(device: torch.device | None) -> torch.device:
    """Where the default process group's backend reduces tensors (NCCL: CUDA only)."""
    if torch.distributed.get_backend() == "nccl":
        cuda = device is not None and device.type == "cuda"
        return device if cuda else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _reduce(values: list[float], op: Any, device: torch.device | None) -> list[float]:
    if rank_and_world()[1] == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device(device))
    torch.distributed.all_reduce(tensor, op=op)
    return tensor.tolist()


def all_reduce_bits(tensor: torch.Tensor) -> torch.Tensor:
    """The byte-wise sum over ranks of ``tensor``, where every element is nonzero on at most one
    rank (each rank fills its own range, zeros elsewhere): the gathered tensor, bit for bit
    (``-0.0`` and NaN payloads included), on ``tensor``'s device. A collective.

    Example:
        >>> all_reduce_bits(torch.tensor([-0.0, 1.5])).tolist()
        [-0.0, 1.5]
    """
    if rank_and_world()[1] == 1:
        return tensor
    raw = tensor.contiguous().reshape(-1).view(torch.uint8).to(_collective_device(tensor.device))
    torch.distributed.all_reduce(raw, op=torch.distributed.ReduceOp.SUM)
    return raw.to(tensor.device).view(tensor.dtype).view(tensor.shape)


def all_reduce_sum(values: list[float], device: torch.device | None = None) -> list[float]:
    """Element-wise sum over ranks (float64)."""
    op = torch.distributed.ReduceOp.SUM if torch.distributed.is_available() else None
    return _reduce(values, op, device)


def all_reduce_max(values: list[float], device: torch.device | None = None) -> list[float]:
    """Element-wise maximum over ranks (float64)."""
    op = torch.distributed.ReduceOp.MAX if torch.distributed.is_available() else None
    return _reduce(values, op, device)


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` in a single process)."""
    _, world = rank_and_world()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if rank_and_world()[1] > 1:
        torch.distributed.barrier()
