"""The run's state between steps, and how it goes into and comes out of a checkpoint.

A checkpoint's client state holds: ``step`` (optimizer steps done), ``window`` (the unlogged
metrics window's global sums, so a resumed run logs exactly what an uninterrupted one logs),
``last_train`` and ``last_eval`` (the last logged means, for ``results.json``) and
``eval_pending`` (the step's evaluation had not been logged when it was saved: the final save and
saves at evaluation steps come before the evaluation, and a stop during an evaluation saves
before leaving; a resumed run evaluates that step first). Model, optimizer, scheduler and RNG are
:mod:`engine.checkpoint`'s.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.checkpoint import find_verified_step, load_checkpoint, save_checkpoint
from engine.metrics import MetricsWindow
from engine.runtime import distributed as dist_utils

log = logging.getLogger("engine.train")


@dataclass
class RunState:
    """Where the run is: steps done, the metrics window, the last logged train and eval means."""

    step: int = 0
    window: MetricsWindow = field(default_factory=MetricsWindow)
    last_train: dict[str, float] = field(default_factory=dict)
    last_eval: dict[str, float] = field(default_factory=dict)
    eval_pending: bool = False  # the evaluation of ``step`` is still to be logged
    eval_seconds: float = 0.0  # this process's time in evaluate() (results.json timings; not saved)

    def to_client_state(self, device: torch.device) -> dict[str, Any]:
        """The checkpoint's client state (all-reduces the window: every rank must call this)."""
        return {
            "step": self.step,
            "window": self.window.global_sums(device).tolist(),
            "last_train": self.last_train,
            "last_eval": self.last_eval,
            "eval_pending": self.eval_pending,
        }

    @classmethod
    def from_client_state(cls, client: dict[str, Any], default_step: int) -> RunState:
        """The state a checkpoint saved. The window's global sums are restored on rank 0 only
        (logging all-reduces them)."""
        state = cls(
            step=int(client.get("step", default_step)),
            last_train=dict(client.get("last_train") or {}),
            last_eval=dict(client.get("last_eval") or {}),
            eval_pending=bool(client.get("eval_pending", False)),
        )
        if client.get("window") is not None and dist_utils.is_main():
            state.window.restore(client["window"])
        return state


def find_resume_step(trainer: Any, checkpoint_dir: Path) -> int | None:
    """The resume lookup: the step of the checkpoint to resume from (``trainer.resume=auto``),
    or None to start fresh.

    This is the one place that picks the checkpoint (``engine.train.train`` calls it once, before
    the reference scores and :func:`restore`): the newest complete save whose files match their
    recorded sizes and checksums, else an older one (with a warning naming the damaged file);
    :class:`engine.checkpoint.CheckpointError` when none does.
    """
    if trainer.get("resume") not in (None, "auto"):
        raise ValueError(f"trainer.resume must be null or 'auto', got {trainer.resume!r}")
    if trainer.get("resume") != "auto":
        return None
    step = find_verified_step(checkpoint_dir)  # rank 0 reads the files, every rank gets it
    if step is not None and dist_utils.is_main():
        log.info("resuming from %s", checkpoint_dir / f"step_{step}")
    return step


def restore(ds_engine: Any, checkpoint_dir: Path, resume_step: int | None) -> RunState:
    """A fresh state, or the one saved at ``resume_step`` (model, optimizer, scheduler and RNG
    restored into ``engine`` too)."""
    if resume_step is None:
        return RunState()
    client = load_checkpoint(ds_engine, checkpoint_dir, resume_step)
    return RunState.from_client_state(client, default_step=resume_step)


def save(
    ds_engine: Any, checkpoint_dir: Path, state: RunState, keep: int, device: torch.device
) -> None:
    """A complete checkpoint of ``engine`` and ``state`` at ``state.step`` (every rank)."""
    save_checkpoint(ds_engine, checkpoint_dir, state.step, state.to_client_state(device), keep=keep)
