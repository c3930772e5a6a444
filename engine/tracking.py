"""Run outputs written by rank 0: ``metrics.jsonl`` (one JSON object per logged step) and
TensorBoard events, plus the step-window averages that ``results.json`` reports."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from engine.fileio import atomic_write_text


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Rows of a ``metrics.jsonl``; a torn last line (a killed run) is dropped."""
    rows = []
    if not path.is_file():
        return rows
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # only the last line can be torn: everything before it was flushed whole
    return rows


class MetricsLogger:
    """Append-only metrics sink. Only rank 0 should create one.

    Args:
        run_dir: the run directory.
        resume_step: on resume, rows logged after this step (by the killed run, past its last
            checkpoint) are dropped first, so the file reads as one uninterrupted run.
        tensorboard: also write TensorBoard events under ``run_dir/tensorboard``.
    """

    def __init__(self, run_dir: Path, resume_step: int | None = None, tensorboard: bool = True):
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()  # a fresh run in a reused directory starts a fresh log
        self._file = self.path.open("a")
        self._writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Write one row (flushed at once, so a crash loses at most the row being written)."""
        row = {"step": step}
        row.update({k: (float(v) if math.isfinite(float(v)) else None) for k, v in metrics.items()})
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in metrics.items():
                self._writer.add_scalar(key, float(value), step)

    def histogram(self, step: int, key: str, values: Any) -> None:
        """A TensorBoard histogram of ``values`` (a tensor or array) at ``step`` (no-op without
        TensorBoard; histograms do not go to metrics.jsonl)."""
        if self._writer is not None:
            self._writer.add_histogram(key, values, step)

    def close(self) -> None:
        """Flush and close the files."""
        self._file.close()
        if self._writer is not None:
            self._writer.close()
