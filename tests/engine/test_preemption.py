"""Preemption: a stop signal is recorded (never acted on inside the handler), every rank agrees
on the step at which it stops, previous handlers come back, and the exit hands the signal to the
handler that was there before (submitit's requeue) or exits with status 75.

Signals are real: sent to this process with ``signal.raise_signal``, or to one of two gloo
processes with ``os.kill``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from engine.checkpoint import complete_steps, latest_verified_step, read_manifest
from engine.runtime.preemption import (
    PREEMPTED_EXIT_CODE,
    Preempted,
    PreemptionGuard,
    exit_preempted,
    watched_signals,
)

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def fake_submitit():
    """A Python handler on SIGUSR2 and SIGTERM standing for submitit's (requeue, bypass); the
    original handlers come back afterwards."""
    calls: list[int] = []
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}

    def handler(signum, frame):
        calls.append(signum)

    signal.signal(signal.SIGUSR2, handler)
    signal.signal(signal.SIGTERM, handler)
    yield handler, calls
    for signum, previous in saved.items():
        signal.signal(signum, previous)


def test_watched_signals():
    assert watched_signals({}) == (signal.SIGTERM, signal.SIGUSR1)
    submitit = {"SUBMITIT_EXECUTOR": "slurm"}
    assert watched_signals(submitit) == (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
    chosen = {**submitit, "SUBMITIT_PREEMPT_SIGNAL": "USR1"}
    assert watched_signals(chosen) == (signal.SIGTERM, signal.SIGUSR1)  # no duplicate
    with pytest.raises(ValueError, match="SUBMITIT_PREEMPT_SIGNAL='NOPE'"):
        watched_signals({**submitit, "SUBMITIT_PREEMPT_SIGNAL": "NOPE"})


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_is_recorded_and_handlers_come_back(fake_submitit, signum):
    handler, calls = fake_submitit
    before_usr1 = signal.getsignal(signal.SIGUSR1)
    with PreemptionGuard() as guard:
        assert not guard.should_stop(CPU)
        signal.raise_signal(signum)  # the process survives: the guard only records it
        signal.raise_signal(signum)  # twice: recorded once
        assert guard.received == [signum]
        assert guard.should_stop(CPU) and guard.should_stop(CPU)
        stop = guard.preempted(7)
    assert calls == []  # the previous handler was not called while the guard held the signal
    assert signal.getsignal(signal.SIGTERM) is handler
    assert signal.getsignal(signal.SIGUSR1) == before_usr1
    assert isinstance(stop, Preempted) and stop.step == 7 and stop.signals == (signum,)
    assert f"stopped after step 7, on {signum.name}" in str(stop)


def test_no_signal_no_stop_and_an_exception_restores_handlers(fake_submitit):
    handler, _ = fake_submitit
    with pytest.raises(RuntimeError, match="inside"), PreemptionGuard() as guard:
        assert signal.getsignal(signal.SIGTERM) is not handler
        assert not any(guard.should_stop(CPU) for _ in range(3))
        raise RuntimeError("inside")
    assert signal.getsignal(signal.SIGTERM) is handler


def test_outside_the_main_thread_nothing_is_installed(fake_submitit):
    handler, _ = fake_submitit
    seen = {}

    def body():
        with PreemptionGuard() as guard:
            seen["handler"] = signal.getsignal(signal.SIGTERM)
            seen["stop"] = guard.should_stop(CPU)

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert seen == {"handler": handler, "stop": False}


def test_exit_hands_the_signal_to_the_previous_handler(fake_submitit):
    _, calls = fake_submitit
    guard = PreemptionGuard((signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2))
    with guard:
        signal.raise_signal(signal.SIGUSR2)
        signal.raise_signal(signal.SIGUSR1)  # SIG_DFL before the guard: nothing to hand on
        signal.raise_signal(signal.SIGTERM)
        assert guard.should_stop(CPU)
        stop = guard.preempted(3)
    assert stop.signals == (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)  # watch order
    with pytest.raises(SystemExit) as exited:
        exit_preempted(stop, requeue=True)
    assert exited.value.code == PREEMPTED_EXIT_CODE == 75
    assert calls == [signal.SIGTERM, signal.SIGUSR2]
    # on its way out the process ignores further stop signals (the fixture restores them)
    assert all(signal.getsignal(s) == signal.SIG_IGN for s in stop.previous_handlers)


def test_a_previous_handler_that_exits_decides_the_status(fake_submitit):
    """submitit's requeue handler ends with ``sys.exit(-1)`` on rank 0."""

    def requeue_and_exit(signum, frame):
        sys.exit(-1)

    signal.signal(signal.SIGUSR2, requeue_and_exit)
    with PreemptionGuard((signal.SIGUSR2,)) as guard:
        signal.raise_signal(signal.SIGUSR2)
        assert guard.should_stop(CPU)
    with pytest.raises(SystemExit) as exited:
        exit_preempted(guard.preempted(1), requeue=True)
    assert exited.value.code == -1


def test_without_resume_the_signal_is_not_handed_on(fake_submitit, caplog):
    _, calls = fake_submitit
    with PreemptionGuard((signal.SIGUSR2,)) as guard:
        signal.raise_signal(signal.SIGUSR2)
        assert guard.should_stop(CPU)
    with pytest.raises(SystemExit) as exited:
        exit_preempted(guard.preempted(1), requeue=False)
    assert exited.value.code == PREEMPTED_EXIT_CODE and calls == []
    assert "trainer.resume is not 'auto'" in caplog.text


def test_one_guard_per_process_and_stop_points_anywhere(fake_submitit):
    """A guard entered inside another stands for it (the commands nest train() in run()); a stop
    point raises Preempted with its words once a signal came, and does nothing without a guard
    (a library call outside the commands)."""
    from engine.runtime.preemption import active_guard, stop_point, watch_from_start

    stop_point("anywhere")  # no guard: nothing happens
    watch_from_start("engine.train")  # imported, not run as a command: no guard either
    assert active_guard() is None
    with PreemptionGuard() as outer:
        with PreemptionGuard() as inner:
            assert inner is outer is active_guard()
            stop_point("in a phase")  # nothing received yet
            signal.raise_signal(signal.SIGUSR1)
            with pytest.raises(Preempted, match="stopped in a phase, on SIGUSR1") as stopped:
                stop_point("in a phase")
        assert active_guard() is outer  # the inner one left the handlers alone
        assert stopped.value.where == "in a phase" and stopped.value.step is None
    assert active_guard() is None


class HydraLikeJob:
    """Stands for hydra-submitit-launcher's launcher: ``checkpoint()`` resubmits itself."""

    def __call__(self, overrides: list[str]) -> None:
        raise AssertionError("never run here")

    def checkpoint(self, overrides: list[str]) -> object:
        import submitit

        return submitit.helpers.DelayedSubmission(self, overrides)


def test_submitit_requeues_only_after_the_stop(tmp_path, monkeypatch):
    """The real submitit signal handling, as a job installs it (SIGTERM and SIGCONT logged,
    SIGUSR2 checkpoint-and-requeue); only ``scontrol requeue`` is replaced by a record."""
    submitit = pytest.importorskip("submitit")
    from submitit.slurm.slurm import SlurmJobEnvironment

    requeued: list[int] = []

    class Cluster(SlurmJobEnvironment):
        def _requeue(self, countdown: int) -> None:
            requeued.append(countdown)

    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.delenv("SUBMITIT_PREEMPT_SIGNAL", raising=False)
    watched = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCONT)
    saved = {s: signal.getsignal(s) for s in watched}
    paths = submitit.core.utils.JobPaths(tmp_path, job_id="42", task_id=0)
    paths.folder.mkdir(parents=True, exist_ok=True)
    delayed = submitit.helpers.DelayedSubmission(HydraLikeJob(), ["trainer.resume=auto"])
    delayed.set_timeout(60, 3)  # timeout_min, max_num_timeout
    try:
        Cluster()._handle_signals(paths, delayed)
        with PreemptionGuard() as guard:  # under submitit: SIGTERM, SIGUSR1, SIGUSR2
            signal.raise_signal(signal.SIGTERM)  # a preemption: SIGTERM, then the user signal
            signal.raise_signal(signal.SIGUSR2)
            assert requeued == []  # held while the step finishes and the checkpoint is written
            assert guard.should_stop(CPU)
            stop = guard.preempted(12)
        with pytest.raises(SystemExit) as exited:
            exit_preempted(stop, requeue=True)
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
    assert requeued == [3]  # a preemption: no timeout used up
    assert exited.value.code == -1  # submitit's own exit after requeueing
    resubmitted = submitit.helpers.DelayedSubmission.load(paths.submitted_pickle)
    assert isinstance(resubmitted.function, HydraLikeJob)
    assert resubmitted.args == (["trainer.resume=auto"],)


# ---- two gloo processes: a signal to one rank stops both at the same step ----------------------

WORKER = textwrap.dedent(
    """
    import json, os, signal, sys, torch, torch.distributed as dist
    from engine.runtime.preemption import PreemptionGuard

    rank, out = int(os.environ["RANK"]), sys.argv[1]
    dist.init_process_group("gloo")
    stopped = None
    with PreemptionGuard() as guard:
        for step in range(1, 50):
            if rank == 1 and step == 4:
                os.kill(os.getpid(), signal.SIGUSR1)  # this rank only, mid-step
            dist.barrier()  # stands for the optimizer step's collectives
            if guard.should_stop(torch.device("cpu")):
                stopped = guard.preempted(step)
                break
    dist.destroy_process_group()
    record = {"step": stopped and stopped.step, "signals": stopped and
              [s.name for s in stopped.signals], "received": [s.name for s in guard.received]}
    open(out, "w").write(json.dumps(record))
    """
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_ranks_agree_on_the_stop_step(tmp_path):
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        rendezvous = {"RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}
        env = {**os.environ, **rendezvous, "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(REPO), env.get("PYTHONPATH"))))
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", WORKER, str(tmp_path / f"rank{rank}.json")],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert records[0] == {"step": 4, "signals": ["SIGUSR1"], "received": []}
    assert records[1] == {"step": 4, "signals": ["SIGUSR1"], "received": ["SIGUSR1"]}


# ---- end to end: SIGTERM in the middle of a training run, then resume ----------------------------

STEPS = 24
RTOL = 1e-6


def cell_overrides(base_overrides, run_dir: Path) -> list[str]:
    """A sweep cell as a user starts it: resume=auto from the start, checkpoints only at the end
    (so the one a stop leaves is the stop's own), train rows every 3 steps, eval every 10."""
    return [
        *base_overrides(run_dir, eval=True, steps=STEPS),
        "trainer.log_every=3",
        "trainer.eval_every=10",
        "trainer.save_every=0",
        "trainer.tensorboard=false",
        "trainer.resume=auto",
        f"hydra.run.dir={run_dir}",
    ]


def start_training(cli, overrides: list[str], cwd: Path, nproc: int = 1) -> subprocess.Popen:
    """``python -m engine.train`` (under torchrun for ``nproc`` > 1) in the background; its
    output goes to ``cwd/output.log``."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [sys.executable, *(launcher if nproc > 1 else []), "-m", "engine.train", *overrides]
    cwd.mkdir(parents=True, exist_ok=True)
    with (cwd / "output.log").open("w") as log:
        return subprocess.Popen(cmd, cwd=cwd, env=cli.env(), stdout=log, stderr=subprocess.STDOUT)


def wait_for_training_step(
    metrics_rows, proc: subprocess.Popen, run_dir: Path, timeout: float = 300
) -> int:
    """Block until ``metrics.jsonl`` has a train row (the run is inside its loop); its step.
    Polls: it assumes nothing about how fast the machine is."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the run ended before it was signalled: {proc.returncode}"
        rows = metrics_rows(run_dir, "train/loss")
        if rows:
            return max(row["step"] for row in rows)
        time.sleep(0.02)
    pytest.fail(f"no train row in {run_dir / 'metrics.jsonl'} after {timeout} s")


def finish(cli, proc: subprocess.Popen, cwd: Path, timeout: float = 300) -> str:
    """Wait for ``proc`` (killing its tree after ``timeout``); its output."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        cli.kill_tree(proc.pid)
        proc.wait()
        pytest.fail(f"still running after {timeout} s:\n{(cwd / 'output.log').read_text()[-4000:]}")
    return (cwd / "output.log").read_text()


@pytest.mark.slow
def test_sigterm_then_resume_matches_an_uninterrupted_run(
    tmp_path, base_overrides, cli, metrics_rows, metrics_match
):
    reference_dir = tmp_path / "reference"
    reference = cli.run(cell_overrides(base_overrides, reference_dir), cwd=tmp_path)
    assert reference.returncode == 0, cli.describe(reference)

    run_dir = tmp_path / "run"
    cwd = tmp_path / "interrupted"
    proc = start_training(cli, cell_overrides(base_overrides, run_dir), cwd)
    seen = wait_for_training_step(metrics_rows, proc, run_dir)
    proc.send_signal(signal.SIGTERM)
    output = finish(cli, proc, cwd)
    assert proc.returncode == PREEMPTED_EXIT_CODE, output[-4000:]

    # the stop: after a whole step, with one complete, verified checkpoint of that step
    checkpoints = run_dir / "checkpoints"
    [stopped] = complete_steps(checkpoints)
    assert seen <= stopped < STEPS, output[-4000:]
    assert latest_verified_step(checkpoints) == stopped
    assert f"stopped after step {stopped} (saved), on SIGTERM" in output
    assert not (run_dir / "results.json").exists() and not (run_dir / "final_model").exists()
    assert not (run_dir / "failed.json").exists()  # a stop is not a failure
    assert max(row["step"] for row in metrics_rows(run_dir)) <= stopped

    resumed = cli.run(cell_overrides(base_overrides, run_dir), cwd=cwd)
    assert resumed.returncode == 0, cli.describe(resumed)
    assert f"resuming from {checkpoints / f'step_{stopped}'}" in resumed.stdout + resumed.stderr
    metrics_match.rows(metrics_rows(run_dir), metrics_rows(reference_dir), rtol=RTOL)
    results = json.loads((run_dir / "results.json").read_text())
    expected = json.loads((reference_dir / "results.json").read_text())
    metrics_match.results(results, expected, rtol=RTOL)


def worker_pid(launcher_pid: int, rank: int) -> int:
    """The torchrun worker process of ``rank`` (read from its environment)."""
    from tests.engine.conftest import descendants  # not on the cli fixture (yet)

    for pid in descendants(launcher_pid):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and f"LOCAL_RANK={rank}".encode() in environ:
            return pid
    pytest.fail(f"no worker of rank {rank} under torchrun ({launcher_pid})")


@pytest.mark.slow
@pytest.mark.distributed
def test_sigterm_to_one_rank_stops_both_at_the_same_step(
    tmp_path, base_overrides, cli, metrics_rows
):
    run_dir = tmp_path / "run"
    overrides = [*cell_overrides(base_overrides, run_dir), "trainer.micro_batch_size=1"]
    proc = start_training(cli, overrides, tmp_path, nproc=2)
    seen = wait_for_training_step(metrics_rows, proc, run_dir)
    os.kill(worker_pid(proc.pid, 1), signal.SIGTERM)  # rank 1 only; rank 0 learns it by agreement
    output = finish(cli, proc, tmp_path)
    # torchrun's failure report: both exited with the stop status (rank 0 too, even when torchrun
    # sent it SIGTERM on seeing rank 1 leave first: a stopped run ignores further stop signals)
    for rank in (0, 1):
        report = rf"rank\s+: {rank} \(local_rank: {rank}\)\s+exitcode\s+: {PREEMPTED_EXIT_CODE} "
        assert re.search(report, output), output[-4000:]

    # one complete save, to which both ranks contributed at the same step
    checkpoints = run_dir / "checkpoints"
    [stopped] = complete_steps(checkpoints)
    assert seen <= stopped < STEPS
    assert latest_verified_step(checkpoints) == stopped
    saved = read_manifest(checkpoints / f"step_{stopped}")["files"]
    assert {"rng_rank0.pt", "rng_rank1.pt"} <= saved.keys()
    assert f"stopped after step {stopped} (saved), on SIGTERM" in output


@pytest.mark.slow
@pytest.mark.distributed
def test_sigterm_to_one_rank_in_the_reference_pass_stops_both_after_the_same_shard(
    tmp_path, base_overrides, cli
):
    """Outside the loop too: rank 1 alone is signalled while the reference pass runs (frozen
    the moment the first shard is kept, then signalled, then let go); both ranks leave with the
    requeue status after the same shard, and the rerun scores only the shards left."""
    run_dir = tmp_path / "run"
    overrides = [
        *cell_overrides(base_overrides, run_dir),
        "trainer.micro_batch_size=1",
        "reference.shard_pairs=1",  # 16 + 5 shards, each scored by both ranks together
    ]
    proc = start_training(cli, overrides, tmp_path, nproc=2)
    first = run_dir / "reference" / "train-00000.pt"
    deadline = time.monotonic() + 300
    while not first.is_file():
        assert proc.poll() is None and time.monotonic() < deadline, "no shard was kept"
        time.sleep(0.005)
    rank1 = worker_pid(proc.pid, 1)
    for signum in (signal.SIGSTOP, signal.SIGTERM, signal.SIGCONT):
        os.kill(rank1, signum)
    output = finish(cli, proc, tmp_path)
    for rank in (0, 1):
        report = rf"rank\s+: {rank} \(local_rank: {rank}\)\s+exitcode\s+: {PREEMPTED_EXIT_CODE} "
        assert re.search(report, output), output[-4000:]
    [stopped] = set(
        re.findall(r"stopped in the reference pass after train shard (\d+) of 16", output)
    )
    kept = sorted(p.name for p in (run_dir / "reference").glob("train-*.pt"))
    assert kept == [f"train-{i:05d}.pt" for i in range(int(stopped))]
    assert not (run_dir / "checkpoints").exists()  # stopped before the first step

    resumed = start_training(cli, overrides, tmp_path / "resumed", nproc=2)
    output = finish(cli, resumed, tmp_path / "resumed")
    assert resumed.returncode == 0, output[-4000:]
    assert f"train: {stopped} of 16 shards kept" in output
    assert (run_dir / "results.json").is_file() and not (run_dir / "reference").exists()
