"""Plots for the ablation report (matplotlib, Agg backend, PNG, written atomically).

The functions take plain data (per-seed lists of metrics.jsonl rows, summaries), not runs, so they
can be reused for any grid of (row, column) cells.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from engine.runtime.fileio import atomic_open
from experiments.tables.stats import Summary

__all__ = [
    "mean_curve",
    "plot_accuracy",
    "plot_chosen_below_zero",
    "plot_curves",
    "plot_gradient_weights",
    "plot_rewards",
    "series",
    "write_plots",
]

# One cell = a list of runs (seeds), each run = its metrics.jsonl rows in order.
Cells = Mapping[tuple[str, str], Sequence[Sequence[Mapping]]]

CHOSEN_COLOR, REJECTED_COLOR = "tab:blue", "tab:red"


def series(rows: Sequence[Mapping], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of `key` over the rows that have both `step` and a numeric `key`."""
    pts = [
        (r["step"], r[key])
        for r in rows
        if isinstance(r.get(key), int | float) and isinstance(r.get("step"), int | float)
    ]
    if not pts:
        return np.empty(0), np.empty(0)
    steps, values = zip(*pts, strict=True)
    return np.asarray(steps, dtype=float), np.asarray(values, dtype=float)


def mean_curve(runs: Sequence[Sequence[Mapping]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Mean of `key` over runs at each step of the union of their steps."""
    per_run = [dict(zip(*series(rows, key), strict=True)) for rows in runs]
    steps = sorted({s for d in per_run for s in d})
    means = [np.mean([d[s] for d in per_run if s in d]) for s in steps]
    return np.asarray(steps, dtype=float), np.asarray(means, dtype=float)


def _save(fig: plt.Figure, path: Path) -> None:
    """Save a figure as PNG atomically (:func:`engine.runtime.fileio.atomic_open`), then close
    it."""
    try:
        with atomic_open(path, "wb") as f:
            fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)


def plot_rewards(
    cells: Cells,
    rows: Sequence[str],
    columns: Sequence[str],
    path: Path,
    title: str = "",
    keys: tuple[str, str] = ("train/chosen_reward", "train/rejected_reward"),
) -> Path:
    """Grid (rows x columns) of chosen and rejected reward vs step: the DCR picture.

    Each panel draws every seed as a light line and the mean over seeds as a bold line for
    `train/chosen_reward` (blue) and `train/rejected_reward` (red), with a line at 0: a chosen
    reward below 0 means the chosen response became less likely than under the reference.
    ``keys``: another (chosen, rejected) pair of metrics drawn the same way.
    """
    fig, axes = plt.subplots(
        len(rows),
        len(columns),
        figsize=(3.2 * len(columns), 2.2 * len(rows)),
        sharex=True,
        squeeze=False,
    )
    for i, row in enumerate(rows):
        for j, col in enumerate(columns):
            ax = axes[i][j]
            runs = cells.get((row, col), [])
            drew = False
            for key, color in zip(keys, (CHOSEN_COLOR, REJECTED_COLOR), strict=True):
                for rows_of_run in runs:
                    x, y = series(rows_of_run, key)
                    if len(x):
                        ax.plot(x, y, color=color, alpha=0.25, linewidth=0.8)
                x, y = mean_curve(runs, key)
                if len(x):
                    drew = True
                    ax.plot(x, y, color=color, linewidth=1.8, label=key.split("/")[-1])
            ax.axhline(0.0, color="black", linewidth=0.8, linestyle=":")
            if not drew:
                ax.text(
                    0.5, 0.5, "no finished run", ha="center", va="center", transform=ax.transAxes
                )
            if i == 0:
                ax.set_title(col, fontsize=9)
            if j == 0:
                ax.set_ylabel(row, fontsize=9)
            if i == len(rows) - 1:
                ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
    handles, labels = [], []
    for ax in axes.flat:
        h, lab = ax.get_legend_handles_labels()
        if h:
            handles, labels = h, lab
            break
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=len(handles), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    _save(fig, path)
    return Path(path)


def plot_accuracy(
    summaries: Mapping[tuple[str, str], Summary],
    rows: Sequence[str],
    columns: Sequence[str],
    path: Path,
    ylabel: str,
    reference: float | None = None,
    reference_label: str = "SFT",
) -> Path:
    """Grouped bars (one group per row, one bar per column) of means with std error bars.

    `reference` (e.g. the SFT starting accuracy) is drawn as a dashed horizontal line.
    """
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(rows) + 2), 3.6))
    width = 0.8 / max(1, len(columns))
    x = np.arange(len(rows))
    for j, col in enumerate(columns):
        found = [
            (i, summaries[(row, col)]) for i, row in enumerate(rows) if (row, col) in summaries
        ]
        found = [(i, s) for i, s in found if s.n]  # no bar at all for missing or failed cells
        ax.bar(
            [x[i] + (j - (len(columns) - 1) / 2) * width for i, _ in found],
            [s.mean for _, s in found],
            width,
            yerr=[s.std if s.n > 1 else 0.0 for _, s in found],
            capsize=3,
            label=col,
            color=f"C{j}",
        )
    if reference is not None and math.isfinite(reference):
        ax.axhline(reference, color="black", linestyle="--", linewidth=1.0, label=reference_label)
    ax.set_xticks(x, list(rows), rotation=20, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    return Path(path)


def plot_gradient_weights(
    cells: Cells, rows: Sequence[str], columns: Sequence[str], path: Path
) -> Path:
    """Grid of the mean gradient weights on the chosen (blue) and rejected (red) log-ratios vs
    step (``train/grad_weight_chosen`` = mean dL/dr_w, ``train/grad_weight_rejected`` = mean
    dL/dr_l; :mod:`losses.diagnostics`): which side each cell's objective pushes, and how hard.
    Below 0 the chosen likelihood is pushed up; above 0 the rejected one is pushed down."""
    return plot_rewards(
        cells,
        rows,
        columns,
        path,
        title="gradient weight on the chosen (blue) and rejected (red) log-ratio",
        keys=("train/grad_weight_chosen", "train/grad_weight_rejected"),
    )


def plot_chosen_below_zero(
    cells: Cells,
    rows: Sequence[str],
    columns: Sequence[str],
    path: Path,
    key: str = "train/chosen_reward_below_zero",
) -> Path:
    """Fraction of pairs with chosen reward below 0 vs step, one line (mean over seeds) per cell.

    Colour marks the row (loss), line style the column (margin).
    """
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    styles = ["-", "--", ":", "-."]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, row in enumerate(rows):
        for j, col in enumerate(columns):
            x, y = mean_curve(cells.get((row, col), []), key)
            if len(x):
                ax.plot(
                    x,
                    y,
                    color=colors[i % len(colors)],
                    linestyle=styles[j % len(styles)],
                    label=f"{row} / {col}",
                )
    ax.set_xlabel("step")
    ax.set_ylabel("fraction chosen reward < 0")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    _save(fig, path)
    return Path(path)


def plot_curves(
    cells: Mapping[str, Sequence[Sequence[Mapping]]],
    panels: Sequence[tuple[str, str, float | None]],
    path: Path,
    title: str = "",
) -> Path:
    """Side-by-side panels of metrics against step, one line per cell (mean over its seeds).

    ``cells``: label -> per-seed lists of metrics.jsonl rows. ``panels``: (metric key, y label,
    a dashed horizontal reference line or None) per panel, e.g. ``eval/accuracy`` with the SFT
    accuracy + 10 points the convergence table counts steps to.
    """
    fig, axes = plt.subplots(1, len(panels), figsize=(5.0 * len(panels), 3.8), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    for ax, (key, ylabel, reference) in zip(axes[0], panels, strict=True):
        for i, (label, runs) in enumerate(cells.items()):
            x, y = mean_curve(runs, key)
            if len(x):
                ax.plot(
                    x,
                    y,
                    color=colors[i % len(colors)],
                    linestyle=styles[(i // len(colors)) % len(styles)],
                    marker=".",
                    label=label,
                )
        if reference is not None and math.isfinite(reference):
            ax.axhline(reference, color="black", linestyle="--", linewidth=0.9)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    return Path(path)


@dataclass(frozen=True)
class PlotData:
    """What the report's plots show, as plain data (``experiments.tables.ablation.plot_data`` builds
    it
    from a sweep's tables).

    Attributes:
        cells: (loss, column) -> per-seed lists of metrics.jsonl rows.
        losses: the table's rows, in order.
        columns: the table's columns (difference, balanced at the chosen alpha).
        summaries: (loss, column) -> the final-metric summary of that cell.
        ylabel: the accuracy plot's y label.
        reference: a horizontal reference line (the SFT accuracy), or None.
    """

    cells: dict[tuple[str, str], list[list[dict]]]
    losses: list[str]
    columns: list[str]
    summaries: dict[tuple[str, str], Summary | None]
    ylabel: str
    reference: float | None = None


def write_plots(data: PlotData, out: Path) -> list[str]:
    """Write rewards.png, accuracy.png, gradient_weights.png and chosen_below_zero.png (each when
    its data exists) into `out`. Returns the names of the files written."""
    cells, losses, columns = data.cells, data.losses, data.columns
    written = []
    has = {k for runs in cells.values() for rows in runs for row in rows for k in row}
    if losses and "train/chosen_reward" in has:
        plot_rewards(
            cells,
            losses,
            columns,
            out / "rewards.png",
            title="chosen (blue) and rejected (red) reward; below 0 = DCR",
        )
        written.append("rewards.png")
    if losses:
        plot_accuracy(
            data.summaries,
            losses,
            columns,
            out / "accuracy.png",
            ylabel=data.ylabel,
            reference=data.reference,
        )
        written.append("accuracy.png")
    if losses and "train/grad_weight_chosen" in has:
        plot_gradient_weights(cells, losses, columns, out / "gradient_weights.png")
        written.append("gradient_weights.png")
    if "train/chosen_reward_below_zero" in has:
        plot_chosen_below_zero(cells, losses, columns, out / "chosen_below_zero.png")
        written.append("chosen_below_zero.png")
    return written
