"""Markers of finished phases, for callers that run the commands and resume them.

A command's output directory holds ``done/<phase>.json`` for each phase whose outputs are complete,
written atomically by rank 0 after those outputs (so a marker never names a half-written file):

- ``python -m engine.train``: ``reference`` (``reference_logps.pt``), ``training`` (every
  optimizer step, and the final checkpoint), ``export`` (``final_model/``, ``final_adapter/``), and
  ``complete`` (``results.json``; the run is finished);
- ``python -m engine.evaluate``: ``complete`` (``results.json``, ``results.md``, ``records/``);
- ``python -m engine.sample_pairs``: ``complete`` (``pairs.jsonl``, ``report.json``).

``complete`` is every command's last marker: a caller (``engine.iterate``, a job script, a
notebook) that finds it skips the command; one that does not reruns the same command, which
resumes. A fresh training run in a reused directory removes the markers first.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from engine.runtime.fileio import atomic_write_json

DONE_DIR = "done"
#: the marker of a finished command
COMPLETE = "complete"


def marker(directory: str | os.PathLike, phase: str) -> Path:
    """The marker file of ``phase`` in a command's output ``directory``."""
    return Path(directory) / DONE_DIR / f"{phase}.json"


def mark_done(directory: str | os.PathLike, phase: str, **info: Any) -> None:
    """Record that ``phase`` finished (call it on rank 0, after the phase's outputs are written);
    ``info`` (JSON values) is kept in the marker, with the time."""
    atomic_write_json(
        marker(directory, phase), {"phase": phase, "finished_at": time.time(), **info}
    )


def done_info(directory: str | os.PathLike, phase: str) -> dict[str, Any] | None:
    """What :func:`mark_done` recorded for ``phase``, or None when it has not finished."""
    path = marker(directory, phase)
    return json.loads(path.read_text()) if path.is_file() else None


def is_done(directory: str | os.PathLike, phase: str = COMPLETE) -> bool:
    """Whether ``phase`` (default: the whole command) finished in ``directory``."""
    return marker(directory, phase).is_file()


def clear(directory: str | os.PathLike) -> None:
    """Forget every finished phase of ``directory`` (a fresh run reusing it)."""
    shutil.rmtree(Path(directory) / DONE_DIR, ignore_errors=True)
