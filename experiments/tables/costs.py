"""Where the runs' time went: each run's ``timings`` from results.json (startup, reference pass,
training, evaluation, export), per cell and in total, so the slow parts of a table are visible.

``startup`` is data, model and DeepSpeed set-up inside the run (the task's SFT build too, on a
cold cache); ``reference`` the reference model's scoring pass; ``train`` the optimizer steps (with
their gradient-weight diagnostics, which results.json books apart as ``diagnostics_s``); ``eval``
every periodic and final evaluation; ``export`` writing the final model. Process start
(Python imports, Hydra) is outside ``train()`` and shows as the gap between a sweep's wall time
and the sum of its runs' (jobs run in parallel, so compare per job).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from experiments.tables.collect import Run
from experiments.tables.formatting import csv_text, md_table

__all__ = ["PHASES", "render_csv", "render_markdown", "totals"]

PHASES = ("startup", "reference", "train", "eval", "export")


def _timings(run: Run) -> dict[str, float] | None:
    timings = (run.results or {}).get("timings")
    if not isinstance(timings, dict):
        return None
    seconds = {p: float(timings.get(f"{p}_s", 0.0)) for p in PHASES}
    seconds["train"] += float(timings.get("diagnostics_s", 0.0))  # part of the steps' time
    return seconds


def totals(runs: Sequence[Run]) -> tuple[dict[str, float], int]:
    """Seconds per phase summed over the finished runs that record timings, and their count."""
    sums = dict.fromkeys(PHASES, 0.0)
    count = 0
    for run in runs:
        t = _timings(run) if run.status == "finished" else None
        if t is not None:
            count += 1
            for p in PHASES:
                sums[p] += t[p]
    return sums, count


def render_markdown(cells: Mapping[str, Sequence[Run]], title: str) -> str:
    """Mean seconds per run and phase for each cell, then the total over all cells with each
    phase's share."""
    out = [
        f"# Cost per run: {title}",
        "",
        "Mean seconds per run by phase (results.json `timings`); runs without timings (older code) "
        "are left out.",
        "",
    ]
    body = []
    everything: list[Run] = []
    for label, runs in cells.items():
        everything += runs
        sums, n = totals(runs)
        if n:
            body.append([label, str(n)] + [f"{sums[p] / n:.1f}" for p in PHASES])
    sums, n = totals(everything)
    total = sum(sums.values())
    if n:
        body.append(["**all runs (sum, s)**", str(n)] + [f"{sums[p]:.0f}" for p in PHASES])
        share = [f"{100 * sums[p] / total:.0f}%" if total else "-" for p in PHASES]
        body.append(["**share**", "", *share])
    out += md_table(["cell", "runs", *(f"{p} (s)" for p in PHASES)], body)
    return "\n".join(out) + "\n"


def render_csv(cells: Mapping[str, Sequence[Run]]) -> str:
    """One row per finished run that records timings: its cell, seed, path and seconds by phase."""
    rows = []
    for label, runs in cells.items():
        for run in runs:
            t = _timings(run) if run.status == "finished" else None
            if t is None:
                continue
            wall = (run.results or {}).get("wall_seconds", "")
            rows.append([label, run.seed, str(run.path), *(round(t[p], 3) for p in PHASES), wall])
    return csv_text(["cell", "seed", "run", *(f"{p}_s" for p in PHASES), "wall_s"], rows)
