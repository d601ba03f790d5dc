"""The few collectives the run-folder and preemption logic need; each is a no-op in a single process.

They run on the default process group: gloo tensors on the CPU, NCCL tensors on the rank's current GPU.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if distributed() else (0, 1)


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def largest(value: int) -> int:
    """The largest of the ranks' `value`, on every rank."""
    if not distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one."""
    return bool(largest(1 if flag else 0))


def from_main(value):
    """The main process's `value` on every rank (a picklable object)."""
    if not distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gathered(value) -> list:
    """Every rank's `value`, in rank order, on every rank."""
    if not distributed():
        return [value]
    boxes = [None] * dist.get_world_size()
    dist.all_gather_object(boxes, value)
    return boxes


def on_main(value) -> list | None:
    """Every rank's `value`, in rank order, on the main process; None on the others."""
    if not distributed():
        return [value]
    boxes = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(value, boxes, dst=0)
    return boxes


def rank_prefix() -> str:
    """What a line one rank prints starts with: its rank, when there are several."""
    rank, world = rank_and_world()
    return f"[rank {rank}] " if world > 1 else ""
