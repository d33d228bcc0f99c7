"""Where this process sits in a torchrun (or Ray Train) job, and the few collectives the trainer uses.

``setup_distributed`` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE), or takes the placement Ray Train gives, picks the device and joins
the process group (Ray has already set it up); a plain ``python -m pipeline.training.train`` is
rank 0 of 1 and every collective here is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from pipeline.training.cpu_threads import threads_per_rank
from pipeline.errors import ConfigError


@dataclass(frozen=True)
class Dist:
    """Where this process sits: torchrun's environment, or a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str = "auto", *, placement: tuple[int, int, int, int] | None = None,
                      cuda_index: int | None = None) -> Dist:
    """Pick the device and join the process group (unless the launcher already did: Ray Train).

    ``placement`` is (rank, world_size, local_rank, local_world_size); by default it is
    read from torchrun's RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE. ``cuda_index`` is
    the visible GPU this rank drives, LOCAL_RANK by default (Ray assigns its own).
    """
    env = os.environ
    rank, world_size, local_rank, local_world_size = placement or (
        int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)),
        int(env.get("LOCAL_RANK", 0)), int(env.get("LOCAL_WORLD_SIZE", 1)))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        gpu = local_rank if cuda_index is None else cuda_index
        if not torch.cuda.is_available():
            raise ConfigError("train.device is 'cuda' but no CUDA device is available")
        if gpu >= torch.cuda.device_count():
            raise ConfigError(f"local rank {local_rank} has no GPU: this node has "
                              f"{torch.cuda.device_count()} (use --nproc-per-node <= that)")
        dev = torch.device("cuda", gpu)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    torch.set_num_threads(threads_per_rank(local_world_size))  # ranks on one node share its cores
    if world_size > 1 and not dist.is_initialized():  # Ray Train sets the group up itself
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return Dist(rank, world_size, local_rank, local_world_size, dev)


def teardown_distributed(d: Dist | None) -> None:
    if d is not None and d.distributed and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_from_main(values: list[float], d: Dist) -> list[float]:
    """Rank 0's ``values`` on every rank (decisions all ranks must share)."""
    if not d.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.broadcast(t, src=0)
    return t.tolist()


def broadcast_object(obj: Any, d: Dist) -> Any:
    """Rank 0's picklable ``obj`` on every rank."""
    if not d.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=d.device if d.device.type == "cuda" else None)
    return box[0]


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """The sum of ``t`` over ranks (a copy; ``t`` is left alone)."""
    t = t.clone()
    if d.distributed:
        dist.all_reduce(t)
    return t


def gather_hidden(state: tuple[torch.Tensor, ...], d: Dist) -> list[torch.Tensor]:
    """Every rank's rows of the recurrent state, concatenated in rank order: the global (L, B, H)."""
    parts = []
    for s in state:
        if d.distributed:
            chunks = [torch.empty_like(s) for _ in range(d.world_size)]
            dist.all_gather(chunks, s.contiguous())
            s = torch.cat(chunks, dim=1)
        parts.append(s.detach().cpu())
    return parts


def barrier(d: Dist) -> None:
    if d.distributed:
        dist.barrier()
