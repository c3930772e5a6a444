"""Stopping a run cleanly when the cluster asks: finish the optimizer step, checkpoint, exit so
the job is requeued and resumes with ``trainer.resume=auto``.

Which signals mean "stop soon":
- ``SIGTERM``: SLURM at preemption and at the time limit (then ``SIGKILL`` after its grace time),
  ``scancel``, torchrun forwarding its own SIGTERM, Kubernetes;
- ``SIGUSR1``: ``sbatch --signal=USR1@<seconds>`` in hand-written job scripts;
- under submitit (``hydra/launcher=slurm``) also submitit's own signal, ``SIGUSR2`` unless
  ``SUBMITIT_PREEMPT_SIGNAL`` names another: submitit asks SLURM for
  ``--signal=USR2@<signal_delay_s>`` (before the time limit) and, on clusters with
  ``SlurmctldParameters=preempt_send_user_signal``, gets it at preemption too.

:class:`PreemptionGuard` only records a signal (a handler does nothing else); the loop asks
:meth:`PreemptionGuard.should_stop` once per optimizer step. Under torchrun every rank must stop
at the same step (the save is a collective), so the ranks agree through one all-reduce of a tiny
tensor per step; a world of one reads its own flag.

The exit path (:func:`exit_preempted`, called by ``engine.train.run``) hands the signal back to
the handler that was there before the guard, which is how submitit requeues: its ``SIGUSR2``
handler calls the Hydra launcher's ``checkpoint()`` (a ``DelayedSubmission`` of the same job),
runs ``scontrol requeue`` on rank 0 (always after a preemption, at most ``max_num_timeout`` times
after time limits) and exits with status 255; its ``SIGTERM`` handler only logs (submitit never
requeues on SIGTERM, which ``scancel`` also sends). Without such a handler the process exits with
:data:`PREEMPTED_EXIT_CODE` (75, ``EX_TEMPFAIL``: "try again later"), for job scripts to requeue
(``[ $? -eq 75 ] && scontrol requeue $SLURM_JOB_ID``) or SLURM's ``RequeueExit=75``.
A ``SystemExit``, not an exception, so submitit records no result and the job is not "failed".
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType, TracebackType
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from engine.runtime import distributed as dist_utils

log = logging.getLogger("engine.runtime.preemption")

PREEMPTED_EXIT_CODE = 75  # os.EX_TEMPFAIL (sysexits.h): a temporary failure, retry later


def watched_signals(environ: dict[str, str] | None = None) -> tuple[signal.Signals, ...]:
    """SIGTERM and SIGUSR1, plus submitit's requeue signal when running as a submitit job."""
    environ = os.environ if environ is None else environ
    signals = [signal.SIGTERM, signal.SIGUSR1]
    if environ.get("SUBMITIT_EXECUTOR"):
        name = "SIG" + environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2").upper().removeprefix("SIG")
        submitit_signal = getattr(signal, name, None)
        if submitit_signal is None:
            raise ValueError(f"SUBMITIT_PREEMPT_SIGNAL={name[3:]!r} names no signal")
        if submitit_signal not in signals:
            signals.append(submitit_signal)
    return tuple(signals)


class Preempted(Exception):  # noqa: N818 (a stop, not an error)
    """Raised by the loop after its stop checkpoint; ``engine.train.run`` turns it into the exit
    (see :func:`exit_preempted`).

    Attributes: ``step`` (the optimizer steps done, all saved), ``signals`` (what any rank
    received, in watch order) and ``previous_handlers`` (the handlers the guard replaced).
    """

    def __init__(
        self,
        step: int,
        signals: tuple[signal.Signals, ...],
        previous_handlers: dict[signal.Signals, Any],
    ) -> None:
        names = ", ".join(s.name for s in signals) or "a signal on another rank"
        super().__init__(f"stopped after step {step} on {names}; its checkpoint is complete")
        self.step = step
        self.signals = signals
        self.previous_handlers = previous_handlers


class PreemptionGuard:
    """Records the stop signals while installed (a context manager; previous handlers come back
    on exit). Installs nothing outside the main thread, where Python cannot handle signals.

    >>> with PreemptionGuard() as guard:
    ...     for step in range(start, total):
    ...         train_one_step()
    ...         if guard.should_stop(device):
    ...             save_checkpoint(...)
    ...             raise guard.preempted(step + 1)
    """

    def __init__(self, signals: tuple[signal.Signals, ...] | None = None) -> None:
        self.signals = watched_signals() if signals is None else tuple(signals)
        self.received: list[signal.Signals] = []  # this process, in arrival order
        self._agreed: tuple[signal.Signals, ...] = ()  # every rank's, after should_stop
        self._previous: dict[signal.Signals, Any] = {}

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is not threading.main_thread():
            log.debug("not in the main thread: stop signals are not watched")
            return self
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._record)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _record(self, signum: int, frame: FrameType | None) -> None:
        # a handler runs between two bytecodes of the main thread: record, nothing else
        if signum not in self.received:
            self.received.append(signal.Signals(signum))

    def should_stop(self, device: torch.device) -> bool:
        """Whether any rank received a stop signal; every rank must call this at the same point
        of every optimizer step. World > 1: one all-reduce (MAX) of ``len(signals)`` values,
        a sync point; a world of one reads its own record."""
        received = [signum in self.received for signum in self.signals]
        if dist_utils.world_size() > 1:
            flags = torch.tensor(received, dtype=torch.float32, device=device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            received = [bool(flag) for flag in flags.tolist()]
        agreed = tuple(s for s, hit in zip(self.signals, received, strict=True) if hit)
        if agreed and not self._agreed:
            mine = ", ".join(s.name for s in self.received) or "nothing (another rank did)"
            log.warning(
                "stop requested (%s; this rank received %s): saving a checkpoint, then exiting",
                ", ".join(s.name for s in agreed),
                mine,
            )
        self._agreed = agreed
        return bool(agreed)

    def preempted(self, step: int) -> Preempted:
        """The exception that ends the run after the checkpoint of ``step`` is complete."""
        return Preempted(step, self._agreed or tuple(self.received), dict(self._previous))


def exit_preempted(stop: Preempted, *, requeue: bool) -> NoReturn:
    """Leave the process after a :class:`Preempted` stop.

    From here the watched signals are ignored (the checkpoint is complete; the exit must not be
    cut short). ``requeue`` (the run resumes with ``trainer.resume=auto``): each received signal
    whose previous handler was a Python function (submitit's) gets it called, in watch order;
    submitit's requeues and exits itself on rank 0. Then, or without ``requeue``,
    ``SystemExit`` with :data:`PREEMPTED_EXIT_CODE`. Call it in the main thread.
    """
    log.warning("%s", stop)
    # the run is on its way out: a second stop signal (e.g. torchrun's SIGTERM once another rank
    # has left) must not cut the requeue short; SIGKILL still ends it
    for signum in stop.previous_handlers:
        signal.signal(signum, signal.SIG_IGN)
    if requeue:
        for signum in stop.signals:
            handler = stop.previous_handlers.get(signum)
            if callable(handler):  # not SIG_DFL / SIG_IGN
                log.info("handing %s to the handler it had before training", signum.name)
                handler(signum, None)
    else:
        log.warning(
            "not handing the signal on for a requeue: trainer.resume is not 'auto', so a requeued "
            "job would start over; resume by hand with trainer.resume=auto"
        )
    raise SystemExit(PREEMPTED_EXIT_CODE)
