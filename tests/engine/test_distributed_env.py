"""The rendezvous variables the engine sets when no launcher did (pure: no process group)."""

from __future__ import annotations

from engine.runtime.distributed import rendezvous_env


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
