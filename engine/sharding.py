"""Splitting work across ranks and putting the results back in order, for generation.

Items are dealt out round-robin (rank r takes items r, r + world, ...), which balances long and
short prompts better than contiguous blocks; :func:`gather_in_order` undoes it on rank 0. Without a
process group (one process) both are the identity.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, TypeVar

import torch.distributed as dist

from engine import distributed as dist_utils

T = TypeVar("T")


def init_if_launched() -> None:
    """Join the process group when a launcher started several processes (``WORLD_SIZE`` > 1);
    a single process stays without one (no DeepSpeed import, no port)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist_utils.init_distributed()


def shard(items: Sequence[T], rank: int | None = None, world: int | None = None) -> list[T]:
    """This rank's share of ``items``: every ``world``-th item from ``rank`` on."""
    rank = dist_utils.rank() if rank is None else rank
    world = dist_utils.world_size() if world is None else world
    return list(items[rank::world])


def gather_in_order(mine: list[Any]) -> list[Any] | None:
    """On rank 0: every rank's :func:`shard` results, back in the original order; elsewhere None.

    A collective (every rank must call it). Objects travel pickled (gloo or NCCL).
    """
    world = dist_utils.world_size()
    if world == 1:
        return list(mine)
    parts: list[list[Any]] | None = [[] for _ in range(world)] if dist_utils.is_main() else None
    dist.gather_object(mine, parts, dst=0)
    if parts is None:
        return None
    ordered: list[Any] = []
    for index in range(max(len(part) for part in parts)):
        ordered += [part[index] for part in parts if index < len(part)]
    return ordered
