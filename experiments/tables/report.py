"""Write each table's report: its table (Markdown, CSV, PNG), the convergence of its cells and the
cost of its runs, into one directory.

``TABLES[name](sweeps, out, **options)`` reads the runs the table needs
(:class:`experiments.tables.collect.Sweeps`: the ``SOURCES`` folders of a sweep root as ``make
reproduce`` lays it out, where the methods table pools the ablation's runs of the same
objectives; or every run of one sweep directory) and writes ``<name>.md`` (table, convergence,
cost per run, plots), ``<name>.csv``, ``convergence.csv``, ``costs.csv`` and PNGs. Returns the
Markdown file's path. Only the ablation takes options (metric, alpha, beta:
:func:`experiments.tables.ablation.build_tables`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from engine.runtime.fileio import atomic_write_text
from experiments.tables import convergence, costs, hypothesis, iterative, methods, real, scale
from experiments.tables.ablation import write_report
from experiments.tables.collect import Run, Sweeps
from experiments.tables.select import group, method_of, optimizer_of, sft_accuracy, size_of

__all__ = ["TABLES", "write_table"]


def _demote(markdown: str) -> str:
    """Headings one level down, to append a section to a report."""
    return "\n".join("#" + line if line.startswith("#") else line for line in markdown.split("\n"))


def _finish(
    name: str,
    out: Path,
    table_md: str,
    table_csv: str | None,
    cells: Mapping[str, Sequence[Run]],
    plots: list[str],
    sft: float | None,
) -> Path:
    """Append convergence and cost sections and the plots; write every file atomically."""
    rows = convergence.build(cells)
    plots = plots + convergence.plot(cells, out, sft)
    md = table_md + "\n" + _demote(convergence.render_markdown(rows, f"{name} cells"))
    md += "\n" + _demote(costs.render_markdown(cells, f"{name} runs"))
    if plots:
        md += "\n## Plots\n\n" + "\n".join(f"![{Path(p).stem}]({p})" for p in plots) + "\n"
    if table_csv is not None:
        atomic_write_text(out / f"{name}.csv", table_csv)
    atomic_write_text(out / "convergence.csv", convergence.render_csv(rows))
    atomic_write_text(out / "costs.csv", costs.render_csv(cells))
    path = out / f"{name}.md"
    atomic_write_text(path, md)
    return path


def write_methods(sweeps: Sweeps, out: Path) -> Path:
    """methods.md / .csv / accuracy.png and the convergence and costs of each method."""
    table = methods.build(sweeps.runs("methods"))
    picked = _picked_methods(sweeps, table)
    cells = {r.method: picked.get(r.method, []) for r in table.rows}
    return _finish(
        "methods",
        out,
        methods.render_markdown(table),
        methods.render_csv(table),
        cells,
        methods.plot(table, out),
        table.sft,
    )


def _picked_methods(sweeps: Sweeps, table: methods.MethodsTable) -> dict[str, list[Run]]:
    runs = [r for r in sweeps.runs("methods") if optimizer_of(r) == "adamw"]
    sizes = {size_of(r) for r in runs}
    if len(sizes) > 1:  # the table kept the most common size; so do its curves
        keep = max(sizes, key=lambda s: sum(size_of(r) == s for r in runs))
        runs = [r for r in runs if size_of(r) == keep]
    return {str(k): v for k, v in group(runs, method_of).items()}


def write_scale(sweeps: Sweeps, out: Path) -> Path:
    """scale.md / .csv / accuracy.png and the convergence and costs of each size x method."""
    runs = [
        r
        for r in sweeps.runs("scale")
        if optimizer_of(r) == "adamw" and method_of(r) in ("dpo", "bpo")
    ]
    table = scale.build(runs)
    cells: dict[str, list[Run]] = {}
    for size, size_runs in sorted(group(runs, size_of).items()):
        for method, method_runs in group(size_runs, method_of).items():
            cells[f"{size.label} {method}"] = method_runs
    return _finish(
        "scale",
        out,
        scale.render_markdown(table),
        scale.render_csv(table),
        cells,
        scale.plot(table, out),
        None,
    )


def write_hypothesis(sweeps: Sweeps, out: Path) -> Path:
    """hypothesis.md / .csv, rewards and gradient-weight grids per optimizer x loss."""
    from experiments.tables.plots import plot_gradient_weights, plot_rewards

    runs = sweeps.runs("hypothesis")
    table = hypothesis.build(runs)
    picked = [r for r in runs if r.method is None and r.margin == "balanced"]
    cells = {
        f"{c.optimizer} {c.loss}": [
            r for r in picked if optimizer_of(r) == c.optimizer and r.loss == c.loss
        ]
        for c in table.cells
    }
    grid = {
        (c.loss, c.optimizer): [r.metrics() for r in cells[f"{c.optimizer} {c.loss}"]]
        for c in table.cells
    }
    losses = list(dict.fromkeys(c.loss for c in table.cells))
    optimizers = list(table.spread)
    plots = []
    if losses:
        plot_rewards(grid, losses, optimizers, out / "rewards.png", title="reward by optimizer")
        plots.append("rewards.png")
        keys = {k for runs in grid.values() for rows in runs for row in rows for k in row}
        if hypothesis.WEIGHT_W in keys:
            plot_gradient_weights(grid, losses, optimizers, out / "gradient_weights.png")
            plots.append("gradient_weights.png")
    return _finish(
        "hypothesis",
        out,
        hypothesis.render_markdown(table),
        hypothesis.render_csv(table),
        cells,
        plots,
        sft_accuracy(picked),
    )


def write_ablation(
    sweeps: Sweeps,
    out: Path,
    metric: str | None = None,
    alpha: float | None = None,
    beta: float | None = None,
) -> Path:
    """The ablation report (:func:`experiments.tables.ablation.write_report`; ``metric``, ``alpha``
    and ``beta`` as there), plus the convergence and costs of its cells."""
    (sweep_dir,) = sweeps.dirs("ablation")
    md = write_report(sweep_dir, out, metric=metric, alpha=alpha, beta=beta)
    runs = sweeps.runs("ablation")
    if beta is not None:  # the sections cover the runs the table shows
        runs = [r for r in runs if r.beta is not None and math.isclose(r.beta, beta)]
    cells: dict[str, list[Run]] = {}
    for r in runs:
        if r.method is not None:
            label = r.method
        elif r.margin == "balanced" and r.alpha is not None:
            label = f"{r.loss} / balanced (alpha={r.alpha:g})"
        else:
            label = f"{r.loss} / {r.margin}"
        cells.setdefault(label, []).append(r)
    text = md.read_text(encoding="utf-8")
    return _finish("ablation", out, text, None, cells, [], sft_accuracy(runs))


def write_real(sweeps: Sweeps, out: Path) -> Path:
    """real.md / .csv, accuracy and convergence plots, and the cost of each method's runs."""
    runs = sweeps.runs("real")
    table = real.build(runs)
    cells = {str(k): v for k, v in group(runs, method_of).items()}
    md = real.render_markdown(table) + "\n" + _demote(costs.render_markdown(cells, "real runs"))
    plots = real.plot(table, cells, out)
    if plots:
        md += "\n## Plots\n\n" + "\n".join(f"![{Path(p).stem}]({p})" for p in plots) + "\n"
    atomic_write_text(out / "real.csv", real.render_csv(table))
    atomic_write_text(out / "costs.csv", costs.render_csv(cells))
    path = out / "real.md"
    atomic_write_text(path, md)
    return path


def write_iterative(sweeps: Sweeps, out: Path) -> Path:
    """iterative.md / .csv and rounds.png: accuracy, the paired gain against DPO, the chosen
    reward, the pairs and the cost of each round, per method."""
    table = iterative.build(sweeps.runs("iterative"))
    md = iterative.render_markdown(table)
    plots = iterative.plot(table, out)
    if plots:
        md += "\n## Plots\n\n" + "\n".join(f"![{Path(p).stem}]({p})" for p in plots) + "\n"
    atomic_write_text(out / "iterative.csv", iterative.render_csv(table))
    path = out / "iterative.md"
    atomic_write_text(path, md)
    return path


TABLES: dict[str, Callable[..., Path]] = {
    "ablation": write_ablation,
    "methods": write_methods,
    "scale": write_scale,
    "hypothesis": write_hypothesis,
    "real": write_real,
    "iterative": write_iterative,
}


def write_table(
    name: str, sweeps: Sweeps | str | os.PathLike, out: str | os.PathLike, **options: object
) -> Path:
    """Write table ``name``'s report into ``out`` from ``sweeps`` (a path is read as a sweep root
    or as one sweep by :meth:`Sweeps.find`). ``options``: the ablation's metric, alpha, beta."""
    if name not in TABLES:
        raise ValueError(f"unknown table {name!r}; known: {', '.join(TABLES)}")
    if not isinstance(sweeps, Sweeps):
        sweeps = Sweeps.find(sweeps)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return TABLES[name](sweeps, out, **options)
