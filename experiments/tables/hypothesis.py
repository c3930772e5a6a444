"""The hypothesis test: why the ablation's six balanced cells land within two points of each other.

Hypothesis: under the balanced margin z stays near 0, where every loss f has a nearly constant
slope, and Adam divides the gradient's scale away, so the six losses follow almost the same path.
If so, plain SGD (which keeps the scale: each f's slope reaches the update) spreads them apart.

Per optimizer and loss (balanced margin, the paper's beta and alpha, same seeds): accuracy, the
margin z the runs train at (``train/margin``, mean over the logged steps and at the last one)
and the gradient weights dL/dr_w, dL/dr_l (``train/grad_weight_chosen`` / ``_rejected``, when the
engine logs them); per optimizer, the spread of the six accuracies (max - min of the means, and
the std of the means) and of the chosen-side gradient weight across losses (std / |mean|).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from experiments.tables.ablation import PAPER_LOSSES
from experiments.tables.collect import Cell, Run
from experiments.tables.formatting import CELL_FIELDS, csv_cell, csv_text, format_cell, md_table
from experiments.tables.formatting import csv_number as num
from experiments.tables.select import cell, optimizer_of

__all__ = ["HypothesisCell", "HypothesisTable", "build", "render_csv", "render_markdown"]

MARGIN, WEIGHT_W, WEIGHT_L = (
    "train/margin",
    "train/grad_weight_chosen",
    "train/grad_weight_rejected",
)


def _series_mean(runs: Sequence[Run], key: str, last: bool = False) -> float | None:
    """Mean over runs of the run's mean (or last) logged ``key``; None when no run logs it."""
    per_run = []
    for run in runs:
        values = [float(r[key]) for r in run.metrics() if isinstance(r.get(key), int | float)]
        if values:
            per_run.append(values[-1] if last else sum(values) / len(values))
    return sum(per_run) / len(per_run) if per_run else None


@dataclass
class HypothesisCell:
    """One optimizer x loss cell at the balanced margin."""

    optimizer: str
    loss: str
    cell: Cell
    z_mean: float | None
    z_last: float | None
    weight_chosen: float | None
    weight_rejected: float | None


@dataclass
class HypothesisTable:
    """Cells by optimizer, and per optimizer the spread across losses."""

    cells: list[HypothesisCell]
    spread: dict[str, dict[str, float | None]] = field(default_factory=dict)
    alpha: float | None = None
    beta: float | None = None


def _spread(cells: Sequence[HypothesisCell]) -> dict[str, float | None]:
    means = [c.cell.summary.mean for c in cells if c.cell.summary.n]
    weights = [c.weight_chosen for c in cells if c.weight_chosen is not None]
    cv = None
    if len(weights) > 1 and statistics.fmean(weights) != 0:
        cv = statistics.stdev(weights) / abs(statistics.fmean(weights))
    return {
        "range": max(means) - min(means) if means else None,
        "std": statistics.stdev(means) if len(means) > 1 else None,
        "weight_cv": cv,
    }


def build(runs: Sequence[Run], alpha: float = 0.3, beta: float = 0.1) -> HypothesisTable:
    """Plain balanced runs at ``alpha`` and ``beta`` (the ablation's Adam cells and the
    hypothesis sweep's SGD cells), by optimizer and loss."""
    picked = [
        r
        for r in runs
        if r.method is None
        and r.margin == "balanced"
        and r.alpha is not None
        and math.isclose(r.alpha, alpha)
        and r.beta is not None
        and math.isclose(r.beta, beta)
    ]
    optimizers = sorted({optimizer_of(r) for r in picked})
    losses = [x for x in PAPER_LOSSES if any(r.loss == x for r in picked)]
    cells = []
    for opt in optimizers:
        for loss in losses:
            group = [r for r in picked if optimizer_of(r) == opt and r.loss == loss]
            finished = [r for r in group if r.status == "finished"]
            cells.append(
                HypothesisCell(
                    optimizer=opt,
                    loss=loss,
                    cell=cell(group),
                    z_mean=_series_mean(finished, MARGIN),
                    z_last=_series_mean(finished, MARGIN, last=True),
                    weight_chosen=_series_mean(finished, WEIGHT_W),
                    weight_rejected=_series_mean(finished, WEIGHT_L),
                )
            )
    spread = {opt: _spread([c for c in cells if c.optimizer == opt]) for opt in optimizers}
    return HypothesisTable(cells=cells, spread=spread, alpha=alpha, beta=beta)


def _f(x: float | None, fmt: str = "+.3f") -> str:
    return "-" if x is None else format(x, fmt)


def render_markdown(table: HypothesisTable) -> str:
    """Cells, then the spread per optimizer, then what the numbers say (computed, not written)."""
    out = [
        "# Hypothesis: do the balanced cells agree because Adam divides the scale away?",
        "",
        f"Balanced margin at alpha = {table.alpha:g}, beta = {table.beta:g}; accuracy in %, mean ± "
        "std over seeds. z: the trained margin (train/margin), mean over logged steps and last. "
        "dL/dr_w, dL/dr_l: mean gradient weight on the chosen / rejected log-ratio "
        "(`-` when the engine did not log it).",
        "",
    ]
    out += md_table(
        ["optimizer", "loss", "accuracy", "z (mean)", "z (last)", "dL/dr_w", "dL/dr_l"],
        (
            [
                c.optimizer,
                c.loss,
                format_cell(c.cell, True),
                _f(c.z_mean),
                _f(c.z_last),
                _f(c.weight_chosen, "+.4f"),
                _f(c.weight_rejected, "+.4f"),
            ]
            for c in table.cells
        ),
    )
    out += ["", "## Spread across the losses", ""]
    out += md_table(
        ["optimizer", "range of means (points)", "std of means", "dL/dr_w: std / abs(mean)"],
        (
            [opt, _f(s["range"], ".1f"), _f(s["std"], ".2f"), _f(s["weight_cv"], ".2f")]
            for opt, s in table.spread.items()
        ),
    )
    if {"adamw", "sgd"} <= set(table.spread):
        a, s = table.spread["adamw"]["range"], table.spread["sgd"]["range"]
        if a is not None and s is not None:
            out += [
                "",
                f"Measured: the balanced cells span {a:.1f} points under AdamW and {s:.1f} under "
                "SGD.",
            ]
    return "\n".join(out) + "\n"


CSV_COLUMNS = (
    *("optimizer", "loss", *CELL_FIELDS, "z_mean", "z_last"),
    *("grad_weight_chosen", "grad_weight_rejected"),
)


def render_csv(table: HypothesisTable) -> str:
    """One row per optimizer x loss cell."""
    rows = [
        [
            *(c.optimizer, c.loss, *csv_cell(c.cell), num(c.z_mean), num(c.z_last)),
            *(num(c.weight_chosen), num(c.weight_rejected)),
        ]
        for c in table.cells
    ]
    return csv_text(CSV_COLUMNS, rows)
