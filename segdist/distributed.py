"""The one place segdist asks torch.distributed about the process group: this process's rank
and the world size, sums over ranks, and flags the ranks agree on without touching the
device. Every function works without a process group (a single process)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def rank_and_world_size() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over the ranks, in place (unchanged in a single process)."""
    if rank_and_world_size()[1] > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(value: float, device: torch.device) -> float:
    """The mean of a Python number over the ranks (float64 on `device`, the group's device)."""
    total = all_reduce_sum(torch.tensor(value, dtype=torch.float64, device=device))
    return float(total) / rank_and_world_size()[1]


def host_group():
    """A process group for host-side flags: the default group when it is gloo, else a new gloo
    group (every rank must call this together, as it creates a group), so that agreeing on a
    flag never waits for the device. None in a single process."""
    if rank_and_world_size()[1] == 1:
        return None
    return dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")


def any_rank(flag: bool, group) -> bool:
    """`flag` or-ed over the ranks of `group` (host_group(); None: this process only)."""
    if group is None:
        return flag
    tensor = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return bool(tensor.item())
