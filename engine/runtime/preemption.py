"""Stopping a command cleanly when the cluster asks, at any phase: finish the unit of work in hand,
keep it, exit so the job is requeued, and let the rerun of the same command skip what was kept.

Which signals mean "stop soon":
- ``SIGTERM``: SLURM at preemption and at the time limit (then ``SIGKILL`` after its grace time),
  ``scancel``, torchrun forwarding its own SIGTERM, Kubernetes;
- ``SIGUSR1``: ``sbatch --signal=USR1@<seconds>`` in hand-written job scripts;
- under submitit (``hydra/launcher=slurm``) also submitit's own signal, ``SIGUSR2`` unless
  ``SUBMITIT_PREEMPT_SIGNAL`` names another: submitit asks SLURM for
  ``--signal=USR2@<signal_delay_s>`` (before the time limit) and, on clusters with
  ``SlurmctldParameters=preempt_send_user_signal``, gets it at preemption too.

One :class:`PreemptionGuard` per process records them (a handler does nothing else). The commands
install it first thing (``python -m engine.train`` before its imports: :func:`watch_from_start`),
so no phase is left where a signal kills the process. The phases ask :func:`stop_point` at the end
of each unit of work (an optimizer step, a reference shard, a generation batch, a sampled batch,
a startup phase); it raises :class:`Preempted` once a stop was asked. Under torchrun every rank
must stop at the same point (the next unit may be a collective), so the ranks agree through one
all-reduce of a tiny tensor per stop point: **every rank must reach the same stop points in the
same order**. Before the process group exists (and in a world of one) a rank reads its own record.

The exit path (:func:`exit_preempted`, called by the commands) hands the signal back to the
handler that was there before the guard, which is how submitit requeues: its ``SIGUSR2`` handler
calls the Hydra launcher's ``checkpoint()`` (a ``DelayedSubmission`` of the same job), runs
``scontrol requeue`` on rank 0 (always after a preemption, at most ``max_num_timeout`` times
after time limits) and exits with status 255; its ``SIGTERM`` handler only logs (submitit never
requeues on SIGTERM, which ``scancel`` also sends). Without such a handler the process exits with
:data:`PREEMPTED_EXIT_CODE` (75, ``EX_TEMPFAIL``: "try again later"), for job scripts to requeue
(``[ $? -eq 75 ] && scontrol requeue $SLURM_JOB_ID``) or SLURM's ``RequeueExit=75``.
A ``SystemExit``, not an exception, so submitit records no result and the job is not "failed".

Importing this module costs nothing (the standard library; torch only once a stop point agrees
across ranks), so a command can install the guard before its heavy imports.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType, TracebackType
from typing import Any, NoReturn, TypeVar

T = TypeVar("T")

log = logging.getLogger("engine.runtime.preemption")

PREEMPTED_EXIT_CODE = 75  # os.EX_TEMPFAIL (sysexits.h): a temporary failure, retry later

#: the guard installed in this process (None: signals have their usual effect)
_ACTIVE: PreemptionGuard | None = None


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
    """Raised at a stop point once a stop was asked (everything done so far is kept); the
    commands turn it into the exit (see :func:`exit_preempted`).

    Attributes: ``where`` (the phase and unit it stopped after, e.g. ``"after step 12"`` or
    ``"in the reference pass after shard 3 of 40"``), ``step`` (the optimizer steps saved, when
    it stopped in training), ``signals`` (what any rank received, in watch order) and
    ``previous_handlers`` (the handlers the guard replaced).
    """

    def __init__(
        self,
        where: str,
        signals: tuple[signal.Signals, ...],
        previous_handlers: dict[signal.Signals, Any],
        step: int | None = None,
    ) -> None:
        names = ", ".join(s.name for s in signals) or "a signal on another rank"
        super().__init__(f"stopped {where}, on {names}")
        self.where = where
        self.step = step
        self.signals = signals
        self.previous_handlers = previous_handlers


class PreemptionGuard:
    """Records the stop signals while installed (a context manager; previous handlers come back
    on exit) and is the process's guard meanwhile (:func:`stop_point` asks it). Installs nothing
    outside the main thread, where Python cannot handle signals, and nothing when the process
    already has a guard (it then stands for that one).

    >>> with PreemptionGuard():
    ...     for step in range(start, total):
    ...         train_one_step()
    ...         stop_point(f"after step {step + 1}")  # raises Preempted once a stop was asked
    """

    def __init__(self, signals: tuple[signal.Signals, ...] | None = None) -> None:
        self.signals = watched_signals() if signals is None else tuple(signals)
        self.received: list[signal.Signals] = []  # this process, in arrival order
        self._agreed: tuple[signal.Signals, ...] = ()  # every rank's, after should_stop
        self._previous: dict[signal.Signals, Any] = {}
        self._installed = False  # False: stands for the process's guard, or not the main thread

    def __enter__(self) -> PreemptionGuard:
        global _ACTIVE
        if _ACTIVE is not None:  # the process is watched already: stand for its guard
            return _ACTIVE
        if threading.current_thread() is not threading.main_thread():
            log.debug("not in the main thread: stop signals are not watched")
            return self
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._record)
        self._installed = True
        _ACTIVE = self
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        global _ACTIVE
        if not self._installed:
            return
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._installed = False
        _ACTIVE = None

    def _record(self, signum: int, frame: FrameType | None) -> None:
        # a handler runs between two bytecodes of the main thread: record, nothing else
        if signum not in self.received:
            self.received.append(signal.Signals(signum))

    def should_stop(self, device: Any = None) -> bool:
        """Whether any rank received a stop signal; every rank must call this at the same point.
        World > 1: one all-reduce (MAX) of ``len(signals)`` values on ``device`` (default: the
        process group's device), a sync point; otherwise this process's own record."""
        received = [signum in self.received for signum in self.signals]
        world = _world_size()
        if world > 1:
            import torch
            import torch.distributed as dist

            flags = torch.tensor(received, dtype=torch.float32, device=device or _group_device())
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            received = [bool(flag) for flag in flags.tolist()]
        agreed = tuple(s for s, hit in zip(self.signals, received, strict=True) if hit)
        if agreed and not self._agreed:
            mine = ", ".join(s.name for s in self.received) or "nothing (another rank did)"
            log.warning(
                "stop requested (%s; this rank received %s): keeping the work done, then exiting",
                ", ".join(s.name for s in agreed),
                mine,
            )
        self._agreed = agreed
        return bool(agreed)

    def preempted(self, where: str | int, step: int | None = None) -> Preempted:
        """The exception that ends the command after ``where`` (a phase's words, or the number
        of optimizer steps done and saved)."""
        if isinstance(where, int):
            where, step = f"after step {where}", where
        return Preempted(where, self._agreed or tuple(self.received), dict(self._previous), step)

    def check(self, where: str | int, device: Any = None, step: int | None = None) -> None:
        """Raise :meth:`preempted` when :meth:`should_stop` agrees (every rank must call it)."""
        if self.should_stop(device):
            raise self.preempted(where, step)


def _world_size() -> int:
    """The process group's size (1 without one), without importing torch when it is not."""
    import sys

    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size()


def _group_device() -> Any:
    """Where the process group's collectives take their tensors: this GPU for NCCL, else CPU."""
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def active_guard() -> PreemptionGuard | None:
    """The guard watching this process (None when none is installed)."""
    return _ACTIVE


def stop_point(where: str | int, device: Any = None, step: int | None = None) -> None:
    """The end of a unit of work whose result is kept: raise :class:`Preempted` if a stop was
    asked (on any rank). A no-op without a guard (a library call outside the commands).

    A collective when the world is larger than one: every rank must call it at the same points,
    in the same order. ``where`` says what is done (``"in the reference pass after shard 3 of
    40"``), or is the number of optimizer steps saved."""
    if _ACTIVE is not None:
        _ACTIVE.check(where, device, step)


@contextlib.contextmanager
def stop_signals_watched() -> Iterator[PreemptionGuard]:
    """The process's guard for the body: the installed one, else a new one installed for it."""
    with PreemptionGuard() as guard:
        yield guard


def watch_from_start(module_name: str) -> None:
    """Install the process's guard for good when ``module_name`` is ``"__main__"`` (a command
    run as ``python -m engine.<command>``): called on a command module's first line, so a stop
    signal during its imports and startup (seconds) is recorded, not fatal (status 143)."""
    if module_name == "__main__" and _ACTIVE is None:
        PreemptionGuard().__enter__()


def run_or_requeue(function: Callable[..., T], *args: Any, requeue: bool = True) -> T:
    """``function(*args)`` with stop signals watched; a :class:`Preempted` stop becomes the requeue
    exit (:func:`exit_preempted`). The commands' Hydra entry (a rerun of the same command
    resumes: ``requeue``)."""
    with stop_signals_watched():
        try:
            return function(*args)
        except Preempted as stop:
            stopped = stop
    exit_preempted(stopped, requeue=requeue)


def exit_preempted(stop: Preempted, *, requeue: bool) -> NoReturn:
    """Leave the process after a :class:`Preempted` stop.

    From here the watched signals are ignored (the work is kept; the exit must not be cut short).
    ``requeue`` (a rerun resumes): each received signal whose previous handler was a Python
    function (submitit's) gets it called, in watch order; submitit's requeues and exits itself on
    rank 0. Then, or without ``requeue``, ``SystemExit`` with :data:`PREEMPTED_EXIT_CODE`. Call
    it in the main thread.
    """
    log.warning("%s", stop)
    # the run is on its way out: a second stop signal (e.g. torchrun's SIGTERM once another rank
    # has left) must not cut the requeue short; SIGKILL still ends it
    for signum in {*stop.previous_handlers, *stop.signals}:
        signal.signal(signum, signal.SIG_IGN)
    if requeue:
        for signum in stop.signals:
            handler = stop.previous_handlers.get(signum)
            if callable(handler):  # not SIG_DFL / SIG_IGN
                log.info("handing %s to the handler it had before the command", signum.name)
                handler(signum, None)
    else:
        log.warning(
            "not handing the signal on for a requeue: trainer.resume is not 'auto', so a requeued "
            "job would start over; resume by hand with trainer.resume=auto"
        )
    raise SystemExit(PREEMPTED_EXIT_CODE)
