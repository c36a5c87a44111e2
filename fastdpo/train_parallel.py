"""Data parallelism for ``fastdpo train`` under ``torchrun``: process group, batch sharding, collective agreement.

``torchrun --nproc-per-node N -m fastdpo.cli train ...`` (or the ``fastdpo`` script) starts N processes with
``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` set; :func:`setup` joins them in a process
group (``gloo`` on CPU, ``nccl`` on CUDA, each process on ``cuda:LOCAL_RANK``). Every process holds the same data order
(same seed); each optimizer step's global batch of ``N * batch_size`` pairs is split over the processes
(:func:`shard`) and the policy runs inside ``DistributedDataParallel``, so gradients are averaged. Each process's loss
is scaled by its share of the global batch (:func:`loss_scale`), so the averaged gradient is the gradient of the
global pair mean, as one process on the whole batch would compute it. Decisions that must be the same everywhere
(a non-finite loss somewhere, an interrupt on one process) are agreed on with one all-reduce (:func:`any_true`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place: ``rank`` of ``size`` processes (size 1: no process group)."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def launched_world_size() -> int:
    """``WORLD_SIZE`` set by ``torchrun`` (1 when not launched by it)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def setup(device: torch.device) -> tuple[World, torch.device]:
    """Join the ``torchrun`` process group when ``WORLD_SIZE > 1`` (``gloo`` for CPU, ``nccl`` for CUDA; a CUDA device
    becomes ``cuda:LOCAL_RANK``); returns the world and this process's device."""
    size = launched_world_size()
    if size == 1:
        return World(), device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size()), device


def teardown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def shard(rows: list[Any], world: World) -> list[Any]:
    """This process's share of a global batch: contiguous, sizes differing by at most one (rank order)."""
    base, extra = divmod(len(rows), world.size)
    start = world.rank * base + min(world.rank, extra)
    return rows[start : start + base + (world.rank < extra)]


def loss_scale(local: int, total: int, world: World) -> float:
    """Factor on this process's pair-mean loss so that DDP's gradient average equals the global pair mean's gradient:
    ``size * local / total``."""
    return world.size * local / total


def any_true(flag: bool, world: World, device: torch.device) -> bool:
    """True when ``flag`` is true on any process (one all-reduce; the flag itself in one process)."""
    if not world.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_sum(values: torch.Tensor, world: World) -> torch.Tensor:
    """Element-wise sum over the processes (a copy; ``values`` unchanged)."""
    out = values.clone()
    if world.distributed:
        dist.all_reduce(out)
    return out


def gather_cat(t: torch.Tensor, world: World) -> torch.Tensor:
    """``[n_r, ...]`` of every process concatenated in rank order along dim 0 (``n_r`` may differ between
    processes): what :meth:`fastdpo.DPOEngine.step` expects of ``gather``."""
    if not world.distributed:
        return t
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world.size)]
    dist.all_gather(sizes, n)
    longest = int(max(int(s) for s in sizes))
    padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.zeros_like(padded) for _ in range(world.size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s)] for p, s in zip(parts, sizes, strict=True)])


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()
