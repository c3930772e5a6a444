"""The gradient-weight diagnostics of every logged step: for each pair of the step, the objective's
gradient weight on the chosen and rejected log-ratios (dL/dr_w, dL/dr_l), its margin, and whether
the chosen log-prob fell below the reference's (:mod:`losses.diagnostics`).

Logged per logged step: the means (``train/grad_weight_chosen``, ``train/grad_weight_rejected``,
``train/chosen_below_reference``) in ``metrics.jsonl`` and TensorBoard, and TensorBoard
histograms of the per-pair weights and margins (``hist/...``). The means are over every rank's
pairs of that optimizer step (one small all-reduce at the log step); the histograms show rank 0's.

Cost: per micro batch of a logged step, one more objective call on (B,) detached log-probs and
``torch.autograd.grad`` through it (no second backward through the model); about 0.3 ms for B = 8
on one CPU core, timed in :attr:`GradientDiagnostics.seconds`.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from engine.objective import ObjectiveInputs
from engine.runtime import distributed as dist_utils
from losses.diagnostics import PairDiagnostics, pair_diagnostics


class GradientDiagnostics:
    """Collects the per-pair diagnostics of a logged step's micro batches, then logs them."""

    def __init__(self) -> None:
        self._batches: list[PairDiagnostics] = []
        self.seconds = 0.0  # time spent here (computing and logging), for the cost measurement

    def add(self, objective: Any, inputs: ObjectiveInputs) -> None:
        """The diagnostics of one micro batch (the objective's inputs as it was fed)."""
        start = time.perf_counter()
        args, kwargs = inputs.arguments()
        self._batches.append(pair_diagnostics(objective, *args, **kwargs))
        self.seconds += time.perf_counter() - start

    def flush(self, logger: Any, step: int, device: torch.device | str = "cpu") -> dict[str, float]:
        """The means over every rank's collected pairs (``train/...`` keys; one small all-reduce,
        so every rank calls this at a log step) and, through ``logger`` (rank 0's
        :class:`engine.tracking.MetricsLogger`, or None), histograms of this rank's pairs; then
        forget them."""
        if not self._batches:
            return {}
        start = time.perf_counter()
        columns = [torch.cat([getattr(d, name) for d in self._batches]) for name in _FIELDS]
        merged = PairDiagnostics(*(column.float().cpu() for column in columns))
        self._batches.clear()
        sums = torch.stack(
            [
                torch.tensor(float(merged.margins.numel())),
                merged.chosen_weights.sum(),
                merged.rejected_weights.sum(),
                merged.chosen_below_reference.sum(),
            ]
        ).double()
        count, *totals = dist_utils.all_reduce_sum(sums.to(device)).cpu().tolist()
        names = ("grad_weight_chosen", "grad_weight_rejected", "chosen_below_reference")
        metrics = {f"train/{k}": total / count for k, total in zip(names, totals, strict=True)}
        if logger is not None:
            logger.histogram(step, "hist/grad_weight_chosen", merged.chosen_weights)
            logger.histogram(step, "hist/grad_weight_rejected", merged.rejected_weights)
            logger.histogram(step, "hist/margin", merged.margins)
        self.seconds += time.perf_counter() - start
        return metrics


_FIELDS = ("chosen_weights", "rejected_weights", "margins", "chosen_below_reference")
