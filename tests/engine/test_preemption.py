"""Preemption: a stop signal is recorded (never acted on inside the handler), every rank agrees
on the step at which it stops, previous handlers come back, and the exit hands the signal to the
handler that was there before (submitit's requeue) or exits with status 75.

Signals are real: sent to this process with ``signal.raise_signal``, or to one of two gloo
processes with ``os.kill``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from engine.preemption import (
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
    assert f"stopped after step 7 on {signum.name}" in str(stop)


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


# ---- two gloo processes: a signal to one rank stops both at the same step ----------------------

WORKER = textwrap.dedent(
    """
    import json, os, signal, sys, torch, torch.distributed as dist
    from engine.preemption import PreemptionGuard

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
