"""Running generation commands on several ranks: splitting work and putting the results back in
order, joining a launcher's process group, and the Hydra entry point they share.

Items are dealt out round-robin (rank r takes items r, r + world, ...), which balances long and
short prompts better than contiguous blocks; :func:`gather_in_order` undoes it on rank 0. Without a
process group (one process) both are the identity.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
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


def hydra_entry(config_name: str, function: Callable[[Any], Any]) -> None:
    """``python -m engine.<command>``: compose ``conf/<config_name>.yaml`` with the command line
    and call ``function(cfg)``. Ranks other than 0 (under torchrun) make no run directory and no
    log files of their own: rank 0's output directory is broadcast."""
    import hydra

    if int(os.environ.get("RANK", "0")) > 0:
        sys.argv += ["hydra.output_subdir=null", "hydra.run.dir=.", "hydra/job_logging=disabled"]

    conf = str(Path(__file__).resolve().parents[1] / "conf")  # absolute: this is not __main__

    @hydra.main(config_path=conf, config_name=config_name, version_base="1.3")
    def main(cfg: Any) -> None:
        function(cfg)

    main()
