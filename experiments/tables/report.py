"""Write each reproduce table's report: its table (Markdown, CSV, PNG), the convergence of its
cells and the cost of its runs, into one directory.

``TABLES[name](sweep_root, out)`` reads the runs of the sweeps under ``sweep_root`` that the
table needs (``SOURCES``: the methods table pools the ablation's runs of the same objectives)
and writes ``<name>.md`` (table, convergence, cost per run, plots), ``<name>.csv``,
``convergence.csv``, ``costs.csv`` and PNGs. Returns the Markdown file's path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from engine.runtime.fileio import atomic_write_text
from experiments.tables import convergence, costs, hypothesis, methods, real, scale
from experiments.tables.ablation import Run, write_report
from experiments.tables.select import collect, group, method_of, optimizer_of, sft_accuracy, size_of

__all__ = ["SOURCES", "TABLES", "write_table"]

#: table -> the sweep directories (under the sweep root) whose runs it reads
SOURCES: dict[str, tuple[str, ...]] = {
    "ablation": ("ablation",),
    "methods": ("ablation", "methods"),
    "scale": ("ablation", "methods", "scale"),
    "hypothesis": ("ablation", "hypothesis"),
    "real": ("real",),
}


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


def _runs(sweep_root: Path, name: str) -> list[Run]:
    return collect(sweep_root / source for source in SOURCES[name])


def write_methods(sweep_root: Path, out: Path) -> Path:
    """methods.md / .csv / accuracy.png and the convergence and costs of each method."""
    table = methods.build(_runs(sweep_root, "methods"))
    picked = _picked_methods(sweep_root, table)
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


def _picked_methods(sweep_root: Path, table: methods.MethodsTable) -> dict[str, list[Run]]:
    runs = [r for r in _runs(sweep_root, "methods") if optimizer_of(r) == "adamw"]
    sizes = {size_of(r) for r in runs}
    if len(sizes) > 1:  # the table kept the most common size; so do its curves
        keep = max(sizes, key=lambda s: sum(size_of(r) == s for r in runs))
        runs = [r for r in runs if size_of(r) == keep]
    return {str(k): v for k, v in group(runs, method_of).items()}


def write_scale(sweep_root: Path, out: Path) -> Path:
    """scale.md / .csv / accuracy.png and the convergence and costs of each size x method."""
    runs = [
        r
        for r in _runs(sweep_root, "scale")
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


def write_hypothesis(sweep_root: Path, out: Path) -> Path:
    """hypothesis.md / .csv, rewards and gradient-weight grids per optimizer x loss."""
    from experiments.tables.plots import plot_gradient_weights, plot_rewards

    runs = _runs(sweep_root, "hypothesis")
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


def write_ablation(sweep_root: Path, out: Path) -> Path:
    """The ablation report (:func:`experiments.tables.ablation.write_report`), plus the convergence
    and
    costs of its cells."""
    md = write_report(sweep_root / "ablation", out)
    runs = _runs(sweep_root, "ablation")
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


def write_real(sweep_root: Path, out: Path) -> Path:
    """real.md / .csv, accuracy and convergence plots, and the cost of each method's runs."""
    runs = _runs(sweep_root, "real")
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


TABLES: dict[str, Callable[[Path, Path], Path]] = {
    "ablation": write_ablation,
    "methods": write_methods,
    "scale": write_scale,
    "hypothesis": write_hypothesis,
    "real": write_real,
}


def write_table(name: str, sweep_root: str | Path, out: str | Path) -> Path:
    """Write table ``name``'s report from the sweeps under ``sweep_root`` into ``out``."""
    if name not in TABLES:
        raise ValueError(f"unknown table {name!r}; known: {', '.join(TABLES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return TABLES[name](Path(sweep_root), out)
