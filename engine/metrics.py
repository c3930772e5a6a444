"""Training metrics: the per-pair sums a step adds, the window they accumulate in between log
steps, and the one reader of ``metrics.jsonl``.

The window is one float64 tensor of sums (:data:`SUMS`, in order), so a log step costs one
all-reduce however many metrics there are. Its means are the DCR metrics every logged step shows.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from engine.model.pair_logprobs import PairLogProbs
from engine.runtime import distributed as dist_utils

#: sums accumulated between log steps, in this order; every one but ``pairs`` is logged as a mean
SUMS = (
    "pairs",
    "loss",
    "chosen_reward",
    "rejected_reward",
    "reward_accuracy",
    "margin",
    "chosen_logp",
    "rejected_logp",
    "chosen_reward_below_zero",
)


def pair_sums(out: Any, policy: PairLogProbs) -> torch.Tensor:
    """Per-batch sums of :data:`SUMS` (detached, float64, on the CPU) from an objective's output
    and the policy's summed log-probs."""
    chosen, rejected = out.chosen_rewards, out.rejected_rewards
    return torch.stack(
        [
            torch.tensor(float(chosen.numel())),
            out.losses.detach().sum().cpu(),
            chosen.sum().cpu(),
            rejected.sum().cpu(),
            (chosen > rejected).float().sum().cpu(),
            out.margins.sum().cpu(),
            policy.chosen_logps.detach().sum().cpu(),
            policy.rejected_logps.detach().sum().cpu(),
            (chosen < 0).float().sum().cpu(),
        ]
    ).double()


def means(sums: torch.Tensor, prefix: str) -> dict[str, float]:
    """``{prefix/name: sum / pairs}`` for every name of :data:`SUMS` but ``pairs``."""
    n = max(float(sums[0]), 1.0)
    return {f"{prefix}/{name}": float(sums[i]) / n for i, name in enumerate(SUMS) if i > 0}


class MetricsWindow:
    """The sums of :data:`SUMS` since the last log step, on this rank, and when the window began."""

    def __init__(self) -> None:
        self.sums = torch.zeros(len(SUMS), dtype=torch.float64)
        self.started = time.time()

    def add(self, sums: torch.Tensor) -> None:
        """Add one micro batch's :func:`pair_sums`."""
        self.sums += sums

    def global_sums(self, device: torch.device) -> torch.Tensor:
        """The window's sums over every rank (an all-reduce: a sync point), the window untouched."""
        return dist_utils.all_reduce_sum(self.sums.clone().to(device)).cpu()

    def close(self, device: torch.device) -> tuple[dict[str, float], float]:
        """The ``train/`` means over every rank and the pairs per second since the window began;
        the window is then emptied."""
        sums = dist_utils.all_reduce_sum(self.sums.to(device)).cpu()  # may alias self.sums
        elapsed = time.time() - self.started
        train, pairs_per_second = means(sums, "train"), float(sums[0]) / max(elapsed, 1e-9)
        self.sums.zero_()
        return train, pairs_per_second

    def restart_clock(self) -> None:
        """Start timing the next window now."""
        self.started = time.time()

    def restore(self, global_sums: list[float]) -> None:
        """Add an interrupted run's unlogged global sums (call on rank 0 only: logging
        all-reduces the window, so a restored value on every rank would count N times)."""
        self.sums += torch.tensor(global_sums, dtype=torch.float64)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Rows of a ``metrics.jsonl`` (blank lines skipped; no file: no rows).

    A run killed while writing leaves a torn *last* line: it is ignored, with a warning naming
    file and line. A line elsewhere that is not a JSON object is an error naming file and line.
    """
    path = Path(path)
    if not path.is_file():
        return []
    lines = enumerate(path.read_text().splitlines(), 1)
    numbered = [(n, line) for n, line in lines if line.strip()]
    rows = []
    for position, (lineno, line) in enumerate(numbered):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        elif position == len(numbered) - 1:
            warnings.warn(
                f"{path}:{lineno}: ignoring a last line that is not a JSON object "
                "(truncated by a killed run?)",
                stacklevel=2,
            )
        else:
            raise ValueError(f"{path}:{lineno}: not a JSON object: {line[:80]!r}")
    return rows
