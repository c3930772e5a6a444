"""The rendezvous variables the engine sets when no launcher did (pure: no process group), and
a world of one's rendezvous when its chosen port is taken (a subprocess)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from engine.runtime.distributed import rendezvous_env, without_launcher_env


def test_a_launcher_is_left_alone() -> None:
    env = {
        "WORLD_SIZE": "2",
        "RANK": "1",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "h",
        "MASTER_PORT": "1",
    }
    assert rendezvous_env(env) == {}


def test_no_launcher_is_a_world_of_one_on_a_free_port() -> None:
    env = rendezvous_env({})
    assert env["WORLD_SIZE"] == "1" and env["RANK"] == "0" and env["LOCAL_RANK"] == "0"
    assert env["MASTER_ADDR"] == "127.0.0.1"
    assert 0 < int(env["MASTER_PORT"]) < 65536


def test_a_given_master_port_is_kept() -> None:
    assert rendezvous_env({"MASTER_PORT": "29555"})["MASTER_PORT"] == "29555"


def test_slurm_step_tasks_become_ranks() -> None:
    env = rendezvous_env(
        {
            "SLURM_STEP_NUM_TASKS": "8",
            "SLURM_NTASKS": "8",
            "SLURM_PROCID": "5",
            "SLURM_LOCALID": "1",
            "SLURM_JOB_ID": "123456",
            "SLURM_JOB_NODELIST": "gpu07",
        }
    )
    assert env == {
        "RANK": "5",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "8",
        "MASTER_ADDR": "gpu07",
        "MASTER_PORT": str(20000 + 123456 % 20000),
    }


def test_a_batch_script_in_a_multi_task_allocation_is_a_world_of_one() -> None:
    # no srun step: one python process must not wait for 7 peers that will never come
    env = rendezvous_env({"SLURM_NTASKS": "8", "SLURM_PROCID": "0", "SLURM_JOB_ID": "7"})
    assert env["WORLD_SIZE"] == "1"


def test_compressed_node_list_without_scontrol_falls_back_to_the_launch_node(
    monkeypatch,
) -> None:
    monkeypatch.setattr("engine.runtime.distributed.shutil.which", lambda name: None)
    env = rendezvous_env(
        {
            "SLURM_STEP_NUM_TASKS": "16",
            "SLURM_PROCID": "0",
            "SLURM_JOB_NODELIST": "gpu[01-02]",
            "SLURM_LAUNCH_NODE_IPADDR": "10.0.0.7",
        }
    )
    assert env["MASTER_ADDR"] == "10.0.0.7"


_TAKEN_PORT_SCRIPT = """
import socket, sys
import torch.distributed as dist
from engine.runtime import distributed

taken = socket.socket()
taken.bind(("127.0.0.1", 0))
taken.listen()
port = taken.getsockname()[1]
ports = iter([port])
free = distributed._free_port
distributed._free_port = lambda: next(ports, None) or free()
distributed.init_distributed()
import os
assert dist.is_initialized() and dist.get_world_size() == 1
assert os.environ["MASTER_PORT"] != str(port), (os.environ["MASTER_PORT"], port)
print("ok", port, os.environ["MASTER_PORT"])
"""


def test_a_world_of_one_whose_free_port_was_taken_tries_another() -> None:
    """The port chosen for a world of one can be taken by any process before the store binds it
    (seen in a parallel sweep: EADDRINUSE): the engine chooses another rather than failing."""
    done = subprocess.run(
        [sys.executable, "-c", _TAKEN_PORT_SCRIPT],
        env=without_launcher_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ok" in done.stdout and "was taken meanwhile" in done.stderr


_SHUTDOWN_SCRIPT = """
import atexit
import torch.distributed as dist
from engine.runtime.distributed import init_distributed
from engine.runtime.launch import hydra_entry

seen = []
atexit.register(lambda: print("at exit: group", dist.is_initialized(), "during", seen, flush=True))

def job(cfg):
    init_distributed()
    seen.append(dist.is_initialized())
    if cfg.fail:
        raise RuntimeError("the job failed")

hydra_entry("sample_pairs", job)
"""


@pytest.mark.parametrize("fail", [False, True], ids=["succeeded", "failed"])
def test_a_command_destroys_its_process_group_before_it_leaves(tmp_path, fail: bool) -> None:
    """A command's process (a world of one) leaves through launch.leave: its process group is
    destroyed before the exit handlers run, also after a failure, and Python exits as usual."""
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            _SHUTDOWN_SCRIPT,
            f"hydra.run.dir={tmp_path}",
            f"+fail={str(fail).lower()}",
        ],
        env=without_launcher_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == (1 if fail else 0), done.stderr[-3000:]
    assert "at exit: group False during [True]" in done.stdout, (done.stdout, done.stderr[-3000:])


_LAUNCHED_SCRIPT = """
import atexit, os, sys
import torch.distributed as dist
from engine.runtime.distributed import all_reduce_sum, init_distributed
from engine.runtime.launch import hydra_entry
import torch

rank = os.environ["RANK"]
atexit.register(lambda: print(f"rank {rank}: exit handlers ran", flush=True))

def job(cfg):
    init_distributed()
    total = all_reduce_sum(torch.ones(1))
    print(f"rank {rank}: sum {int(total.item())}", end="")  # no newline, no flush: leave() flushes
    if cfg.fail:
        raise RuntimeError(f"rank {rank} failed")

hydra_entry("sample_pairs", job)
"""


@pytest.mark.distributed
@pytest.mark.parametrize("fail", [False, True], ids=["succeeded", "failed"])
def test_two_launched_ranks_leave_with_the_commands_status(tmp_path, fail: bool) -> None:
    """Under torchrun, a command's ranks leave through launch.leave (the process group's threads
    can outlive it; the interpreter's teardown could abort a finished rank): the launcher sees
    the command's own status, the exit handlers ran and unflushed output arrived."""
    script = tmp_path / "job.py"
    script.write_text(_LAUNCHED_SCRIPT)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(script),
            f"hydra.run.dir={tmp_path}",
            f"+fail={str(fail).lower()}",
        ],
        env=without_launcher_env() | {"OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (done.returncode != 0) == fail, done.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank}: sum 2" in done.stdout, (done.stdout, done.stderr[-3000:])
        assert f"rank {rank}: exit handlers ran" in done.stdout, done.stdout
    if fail:
        assert "RuntimeError: rank" in done.stdout + done.stderr
        assert "exitcode  : 1" in done.stderr and "exitcode  : -6" not in done.stderr
