"""Convergence: accuracy and chosen reward against step, and the steps each cell needs to gain
10 points of accuracy over its SFT starting point.

Runs evaluate every ``trainer.eval_every`` steps (``eval/accuracy``, ``eval/chosen_reward`` in
metrics.jsonl). For each run, the first evaluated step at which the accuracy reaches its own
``sft.accuracy`` + 10 points (None when it never does); per cell, how many seeds got there and the
mean ± std of their steps. The paper claims BPO converges faster: this is the miniature's measure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from experiments.tables.collect import Run
from experiments.tables.formatting import csv_number, csv_text, md_table
from experiments.tables.stats import Summary, summarize

__all__ = [
    "GAIN_POINTS",
    "ConvergenceRow",
    "build",
    "curve",
    "first_step",
    "render_csv",
    "render_markdown",
]

#: accuracy points over the SFT model that count as converged
GAIN_POINTS = 10.0
ACCURACY, CHOSEN = "eval/accuracy", "eval/chosen_reward"


def curve(run: Run, key: str = ACCURACY) -> list[tuple[int, float]]:
    """(step, value) of ``key`` in the run's metrics.jsonl, in step order."""
    points = {
        int(row["step"]): float(row[key])
        for row in run.metrics()
        if isinstance(row.get(key), int | float) and isinstance(row.get("step"), int)
    }
    return sorted(points.items())


def first_step(run: Run, points: float = GAIN_POINTS) -> int | None:
    """The first evaluated step whose accuracy (percent) is at least the run's SFT accuracy +
    ``points``; None when the run never gets there or has no ``sft.accuracy``."""
    sft = run.value("sft.accuracy")
    if sft is None:
        return None
    target = 100.0 * sft + points
    return next((step for step, v in curve(run) if 100.0 * v >= target - 1e-9), None)


@dataclass
class ConvergenceRow:
    """One cell: how many finished seeds reached SFT + 10 points, and when."""

    label: str
    reached: int
    finished: int
    steps: Summary  # over the seeds that reached it
    eval_every: int | None


def _eval_every(runs: Sequence[Run]) -> int | None:
    values = {
        r.config.get("trainer", {}).get("eval_every")
        for r in runs
        if isinstance(r.config.get("trainer"), dict)
    }
    return values.pop() if len(values) == 1 and isinstance(next(iter(values)), int) else None


def build(cells: Mapping[str, Sequence[Run]]) -> list[ConvergenceRow]:
    """One row per labelled cell (label -> its runs), finished runs only."""
    rows = []
    for label, runs in cells.items():
        finished = [r for r in runs if r.status == "finished"]
        steps = [s for r in finished if (s := first_step(r)) is not None]
        rows.append(
            ConvergenceRow(label, len(steps), len(finished), summarize(steps), _eval_every(runs))
        )
    return rows


def render_markdown(rows: Sequence[ConvergenceRow], title: str) -> str:
    """The convergence table as Markdown."""
    out = [
        f"# Convergence: {title}",
        "",
        f"First evaluated step at which eval accuracy reaches the SFT accuracy + {GAIN_POINTS:g} "
        "points: mean ± sample std over the seeds that reach it (reached / finished seeds). Steps "
        "are multiples of trainer.eval_every (the resolution).",
        "",
    ]

    def steps(r: ConvergenceRow) -> str:
        if not r.finished:
            return "-"
        if not r.reached:
            return "never"
        s = r.steps
        return f"{s.mean:.0f}" + (f" ± {s.std:.0f}" if s.n > 1 else "")

    out += md_table(
        ["cell", "steps to SFT+10", "reached", "eval every"],
        ([r.label, steps(r), f"{r.reached}/{r.finished}", str(r.eval_every or "-")] for r in rows),
    )
    return "\n".join(out) + "\n"


def render_csv(rows: Sequence[ConvergenceRow]) -> str:
    """One row per cell: steps mean/std over the seeds that reached SFT + 10, counts."""
    body = []
    for r in rows:
        mean, std = csv_number(r.steps.mean), csv_number(r.steps.std)
        body.append([r.label, mean, std, r.reached, r.finished, r.eval_every or ""])
    header = ["cell", "steps_mean", "steps_std", "reached", "finished", "eval_every"]
    return csv_text(header, body)


def plot(cells: Mapping[str, Sequence[Run]], out: Path, sft: float | None) -> list[str]:
    """convergence.png: eval accuracy (%) and eval chosen reward against step per cell."""
    from experiments.tables.plots import plot_curves

    def rows(run: Run) -> list[dict]:
        acc = {s: 100.0 * v for s, v in curve(run, ACCURACY)}
        chosen = dict(curve(run, CHOSEN))
        return [
            {"step": s, "accuracy": acc.get(s), "chosen_reward": chosen.get(s)}
            for s in sorted(set(acc) | set(chosen))
        ]

    data = {
        label: [rows(r) for r in runs if r.status == "finished"] for label, runs in cells.items()
    }
    if not any(row for runs in data.values() for rs in runs for row in rs):
        return []
    target = None if sft is None else sft + GAIN_POINTS
    plot_curves(
        data,
        [("accuracy", "eval accuracy (%)", target), ("chosen_reward", "eval chosen reward", 0.0)],
        out / "convergence.png",
        title=f"accuracy and chosen reward against step (dashed: SFT + {GAIN_POINTS:g} points)",
    )
    return ["convergence.png"]
