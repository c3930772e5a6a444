"""Process-group setup and the few collective helpers the engine needs.

One process with no launcher works: :func:`init_distributed` fills in the rendezvous variables a
launcher would set (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) before DeepSpeed reads
them; SLURM tasks get them from SLURM's variables. Under ``torchrun`` or the ``deepspeed``
launcher they are already set and left alone.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from engine.runtime import extensions

log = logging.getLogger(__name__)

#: every variable a launcher (torchrun, the deepspeed launcher, SLURM's srun) or
#: :func:`init_distributed` for a world of one sets to describe a process's place in its job. A
#: child process that must start a job of its own (a sweep's run, a test's subprocess) is given an
#: environment without them (:func:`without_launcher_env`), else it would rendezvous on its
#: parent's port.
LAUNCHER_VARIABLES = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "SLURM_STEP_NUM_TASKS",
)


def without_launcher_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of ``environ`` (default: this process's) without :data:`LAUNCHER_VARIABLES`."""
    environ = dict(os.environ if environ is None else environ)
    return {key: value for key, value in environ.items() if key not in LAUNCHER_VARIABLES}


#: tries at a world of one's rendezvous, each on a newly chosen free port (see init_distributed)
PORT_ATTEMPTS = 3


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _slurm_master(environ: dict[str, str]) -> str:
    """The first host of a SLURM job (``scontrol`` expands compressed node lists)."""
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST", "")
    if nodelist and shutil.which("scontrol"):
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=False
        )
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    if nodelist and not any(c in nodelist for c in "[,"):
        return nodelist  # a single plain host name
    return environ.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1")


def launched_world_size(environ: dict[str, str] | None = None) -> int:
    """The number of processes a launcher started (1 without one), known before the process
    group exists: ``WORLD_SIZE``, else an srun step's task count (see :func:`rendezvous_env`)."""
    environ = dict(os.environ if environ is None else environ)
    if "WORLD_SIZE" in environ:
        return int(environ["WORLD_SIZE"])
    return int(rendezvous_env(environ, port=0)["WORLD_SIZE"])


def rendezvous_env(environ: dict[str, str], port: int | None = None) -> dict[str, str]:
    """The rendezvous variables to add to ``environ`` before the process group is created.

    - a launcher (torchrun, deepspeed) already set ``WORLD_SIZE``: nothing to add;
    - SLURM tasks (``srun``, submitit with ``tasks_per_node`` > 1): rank, local rank and world
      size from ``SLURM_PROCID`` / ``SLURM_LOCALID`` / ``SLURM_STEP_NUM_TASKS``, the first node as
      master, a port derived from the job id (so array jobs sharing a node do not collide);
    - otherwise a world of one on this host, on a free port (``port``, when given).
    """
    if "WORLD_SIZE" in environ:
        return {}
    # SLURM_STEP_NUM_TASKS, not SLURM_NTASKS: only an srun step's tasks are peers (a batch script
    # running one python in an --ntasks=8 allocation is a world of one)
    if int(environ.get("SLURM_STEP_NUM_TASKS", "1") or 1) > 1 and "SLURM_PROCID" in environ:
        job = int(environ.get("SLURM_JOB_ID", "0") or 0)
        return {
            "RANK": environ["SLURM_PROCID"],
            "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
            "WORLD_SIZE": environ["SLURM_STEP_NUM_TASKS"],
            "MASTER_ADDR": environ.get("MASTER_ADDR") or _slurm_master(environ),
            "MASTER_PORT": environ.get("MASTER_PORT") or str(20000 + job % 20000),
        }
    return {
        "RANK": environ.get("RANK", "0"),
        "LOCAL_RANK": environ.get("LOCAL_RANK", "0"),
        "WORLD_SIZE": "1",
        "MASTER_ADDR": environ.get("MASTER_ADDR", "127.0.0.1"),
        "MASTER_PORT": environ.get("MASTER_PORT") or str(_free_port() if port is None else port),
    }


def init_distributed() -> None:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, NCCL on GPU); idempotent.

    Sets the rendezvous variables first when no launcher did (see :func:`rendezvous_env`). A world
    of one on a CPU does without DeepSpeed's shared-memory op (never used there); a larger one
    loads it from the venv's prebuilt copy, a stale build lock cleared
    (:mod:`engine.runtime.extensions`).
    """
    own_port = "WORLD_SIZE" not in os.environ and not os.environ.get("MASTER_PORT")
    os.environ.update(rendezvous_env(dict(os.environ)))
    if dist.is_available() and dist.is_initialized():
        return
    extensions.use_venv_extensions_dir()
    import deepspeed

    if int(os.environ["WORLD_SIZE"]) == 1:
        extensions.skip_shm_op()
    for attempt in range(1, PORT_ATTEMPTS + 1):
        try:
            with extensions.BuildLockWatch():
                deepspeed.init_distributed(dist_init_required=True, verbose=False)
            break
        except dist.DistNetworkError as error:
            # the free port chosen for a world of one was taken before the store bound it (any
            # process's outgoing connection may take it): choose another. A launcher's or a
            # user's port is theirs to fix.
            if not own_port or "EADDRINUSE" not in str(error) or attempt == PORT_ATTEMPTS:
                raise
            taken, os.environ["MASTER_PORT"] = os.environ["MASTER_PORT"], str(_free_port())
            log.warning("port %s was taken meanwhile; trying %s", taken, os.environ["MASTER_PORT"])
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def shutdown() -> None:
    """Destroy the process group, if there is one (the commands call it on their way out:
    :func:`engine.runtime.launch.leave`, which also keeps a launched rank out of the interpreter's
    teardown, where gloo's threads can abort it). Local to this process (no collective): safe on
    an error path where other ranks are gone."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def zero_stage(ds_engine: Any) -> int:
    """The ZeRO stage of a DeepSpeed engine (0 for anything that is not one, e.g. a bare model)."""
    stage = getattr(ds_engine, "zero_optimization_stage", None)
    return int(stage()) if callable(stage) else 0


def rank() -> int:
    """This process's global rank (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on rank 0, the process that writes logs, results and exports."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (a no-op in a world of one)."""
    if world_size() > 1:
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (e.g. the run directory all ranks must share)."""
    if world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place and return it (a sync point: call at log steps only)."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's equally-shaped ``tensor`` along dim 0, in rank order."""
    if world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


T = TypeVar("T")


def shard(items: Sequence[T], rank_: int | None = None, world: int | None = None) -> list[T]:
    """This rank's share of ``items``: every ``world``-th item from ``rank_`` on (round-robin,
    which balances long and short items better than contiguous blocks)."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    return list(items[rank_::world])


def gather_in_order(mine: list[Any]) -> list[Any] | None:
    """On rank 0: every rank's :func:`shard` results, back in the original order; elsewhere None.

    A collective (every rank must call it). Objects travel pickled (gloo or NCCL). Without a
    process group (one process) it is the identity.
    """
    world = world_size()
    if world == 1:
        return list(mine)
    parts: list[list[Any]] | None = [[] for _ in range(world)] if is_main() else None
    dist.gather_object(mine, parts, dst=0)
    if parts is None:
        return None
    ordered: list[Any] = []
    for index in range(max(len(part) for part in parts)):
        ordered += [part[index] for part in parts if index < len(part)]
    return ordered
