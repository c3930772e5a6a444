"""The BPO paper's ablation table: six losses x {difference, balanced} margin, with plots.

    python -m engine.train -m loss=logistic,hinge,squared,exponential,truncated_quadratic,savage \\
        margin=difference,balanced seed=1,2,3
    python -m experiments.tables ablation multirun/<date>/<time> [--out DIR] \\
        [--metric eval.accuracy] [--alpha 0.3] [--beta 0.1]

:func:`write_report` writes ``ablation.md``, ``ablation.csv``, ``rewards.png``, ``accuracy.png``
and, when logged, ``chosen_below_zero.png`` (every file atomically); ``python -m
experiments.tables ablation`` adds the convergence and cost sections (:mod:`.report`). The runs
come from :mod:`.collect`, the text of cells and gains from :mod:`.formatting`.

Decisions worth knowing:
- Runs with `method.name` set (dpo, bpo, chosen_nll, ...) go to the methods table only: a method may
  add extra terms, so it is not a plain loss x margin cell.
- The main table shows the balanced margin at one alpha (0.3 when present); every alpha found, and
  margins other than the two, fill the gap-adaptor table.
- Accuracies in [0, 1] are shown, and written to the CSV, in percent.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from engine.runtime.fileio import atomic_write_text
from experiments.tables.collect import Cell, Run, TableError, collect_runs, fill_cell, number
from experiments.tables.formatting import (
    CELL_FIELDS,
    csv_cell,
    csv_gain,
    csv_text,
    format_cell,
    format_gain,
    format_number,
    md_notes,
    md_table,
)
from experiments.tables.stats import PairedGain, paired_gain

if TYPE_CHECKING:
    from experiments.tables.plots import PlotData

__all__ = [
    "CSV_COLUMNS",
    "PAPER_LOSSES",
    "AblationRow",
    "MethodRow",
    "Tables",
    "build_tables",
    "plot_data",
    "render_csv",
    "render_markdown",
    "write_report",
]

PAPER_LOSSES = ("logistic", "hinge", "squared", "exponential", "truncated_quadratic", "savage")
KNOWN_AS = {"logistic": "DPO", "hinge": "SLiC", "squared": "IPO"}
MARGINS = ("difference", "balanced")
DEFAULT_METRIC, FALLBACK_METRIC = "eval.accuracy", "eval.reward_accuracy"
DEFAULT_ALPHA = 0.3


# ----------------------------------------------------------------------------- tables


def _numeric_keys(node: object, prefix: str = "") -> set[str]:
    if isinstance(node, dict):
        return {k for key, v in node.items() for k in _numeric_keys(v, f"{prefix}{key}.")}
    return {prefix[:-1]} if number(node) is not None else set()


def _resolve_metric(finished: Sequence[Run], metric: str | None) -> tuple[str, str | None]:
    """(metric, note). None means the default with its fallback; a named metric must exist."""
    candidates = [DEFAULT_METRIC, FALLBACK_METRIC] if metric is None else [metric]
    if not finished:
        return candidates[0], None
    for m in candidates:
        if any(r.value(m) is not None for r in finished):
            note = None
            if m != candidates[0]:
                note = f"no run has `{DEFAULT_METRIC}` (no verifier?); showing `{m}` instead"
            return m, note
    available = sorted(set().union(*(_numeric_keys(r.results) for r in finished)))
    raise TableError(
        f"metric {candidates[0]!r} is not in any results.json; numeric keys available: "
        + ", ".join(available)
    )


@dataclass
class AblationRow:
    """One loss of the ablation table."""

    loss: str
    known_as: str
    difference: Cell
    balanced: Cell
    gain: PairedGain  # balanced - difference, paired by seed


@dataclass
class MethodRow:
    """One named method (runs with `method.name` set), at one alpha when it uses one."""

    label: str
    loss: str
    margin: str
    cell: Cell


@dataclass
class Tables:
    """Everything the report shows, in display units (percent for accuracies)."""

    metric: str
    percent: bool
    alpha: float | None
    beta: float | None
    notes: list[str]
    rows: list[AblationRow]
    alphas: list[float]  # every balanced alpha found: the gap-adaptor table's columns
    other_margins: list[str]  # margins besides difference/balanced, shown in that table too
    gap_adaptor: dict[str, dict[float | str, Cell]]  # loss -> alpha, or margin name -> cell
    methods: list[MethodRow]
    runs: list[Run]
    sft: float | None = None  # mean `sft.accuracy` (start of training) when the metric is accuracy


def _key(alpha: float | None) -> float | None:
    return None if alpha is None else round(alpha, 6)


def _choose_alpha(alphas: Counter, alpha: float | None) -> float | None:
    if alpha is not None:
        if alphas and _key(alpha) not in alphas:
            raise TableError(
                f"--alpha {alpha} has no balanced runs; alphas found: {sorted(alphas)}"
            )
        return _key(alpha)
    if not alphas:
        return None
    if DEFAULT_ALPHA in alphas:
        return DEFAULT_ALPHA
    return max(sorted(alphas), key=lambda a: alphas[a])  # most common; ties -> smallest


def _loss_order(names: Iterable[str]) -> list[str]:
    names = set(names)
    return [n for n in PAPER_LOSSES if n in names] + sorted(names - set(PAPER_LOSSES))


def build_tables(
    runs: Sequence[Run],
    metric: str | None = None,
    alpha: float | None = None,
    beta: float | None = None,
) -> Tables:
    """Group runs into the ablation, gap-adaptor and methods tables.

    Args:
        runs: from `collect_runs`.
        metric: dotted path into results.json; None means `eval.accuracy`, falling back (with a
            note) to `eval.reward_accuracy` when no run has it. A named metric found in no run
            raises TableError listing the numeric keys available.
        alpha: the balanced margin's gap adaptor for the main table; None picks 0.3 when present,
            else the most common one. The difference margin ignores alpha.
        beta: keep only runs with this beta; None keeps all (with a note when several are pooled).
    """
    notes: list[str] = []
    if beta is not None:
        runs = [r for r in runs if r.beta is not None and math.isclose(r.beta, beta)]
        if not runs:
            raise TableError(f"--beta {beta} matches no run")
    betas = sorted({r.beta for r in runs if r.beta is not None})
    if beta is None and len(betas) > 1:
        notes.append(f"runs with several beta values are pooled: {betas} (use --beta to pick one)")
    finished = [r for r in runs if r.status == "finished"]
    metric, note = _resolve_metric(finished, metric)
    if note:
        notes.append(note)
    values = [v for r in finished if (v := r.value(metric)) is not None]
    percent = "accuracy" in metric.rsplit(".", 1)[-1] and all(0.0 <= v <= 1.0 for v in values)
    scale = 100.0 if percent else 1.0

    sft = [v for r in finished if (v := r.value("sft.accuracy")) is not None]
    plain = [r for r in runs if r.method is None and r.loss and r.margin]
    balanced_alphas = Counter(
        _key(r.alpha) for r in plain if r.margin == "balanced" and r.alpha is not None
    )
    chosen_alpha = _choose_alpha(balanced_alphas, alpha)

    losses = _loss_order(r.loss for r in plain)
    gap: dict[str, dict[float | str, Cell]] = {loss: {} for loss in losses}
    no_alpha = 0
    for r in plain:
        col = {"difference": "difference", "balanced": _key(r.alpha)}.get(r.margin, r.margin)
        if col is None:  # a balanced run that records no alpha cannot be placed
            no_alpha += 1
            continue
        fill_cell(gap[r.loss].setdefault(col, Cell()), r, metric, scale)
    if no_alpha:
        notes.append(f"{no_alpha} balanced run(s) record no margin.alpha and are left out")
    rows = []
    for loss in losses:
        diff = gap[loss].get("difference", Cell())
        bal = gap[loss].get(chosen_alpha, Cell()) if chosen_alpha is not None else Cell()
        gain = paired_gain(diff.by_seed(), bal.by_seed())
        rows.append(AblationRow(loss, KNOWN_AS.get(loss, "-"), diff, bal, gain))
    others = sorted({r.margin for r in plain} - set(MARGINS))
    if others:
        notes.append(f"margins other than difference/balanced appear in the alpha table: {others}")

    method_cells: dict[tuple[str, float | None], MethodRow] = {}
    for r in runs:
        if r.method is None:
            continue
        k = (r.method, _key(r.alpha))
        if k not in method_cells:
            method_cells[k] = MethodRow(r.method, r.loss or "-", r.margin or "-", Cell())
        fill_cell(method_cells[k].cell, r, metric, scale)
    method_alphas = Counter(m for m, _ in method_cells)
    for (m, a), row in method_cells.items():
        if method_alphas[m] > 1 and a is not None:
            row.label = f"{m} (alpha={a:g})"
    methods = [method_cells[k] for k in sorted(method_cells, key=lambda k: (k[0], k[1] or 0))]

    return Tables(
        metric=metric,
        percent=percent,
        alpha=chosen_alpha,
        beta=beta,
        notes=notes,
        rows=rows,
        alphas=sorted(balanced_alphas),
        other_margins=others,
        gap_adaptor=gap,
        methods=methods,
        runs=list(runs),
        sft=(sum(sft) / len(sft) * scale) if sft and metric == DEFAULT_METRIC else None,
    )


# ----------------------------------------------------------------------------- rendering


def render_markdown(tables: Tables, sweep_dir: Path, plots: Sequence[str] = ()) -> str:
    """The ablation report as Markdown: header, main table, gap-adaptor and methods tables, runs."""
    runs, pct = tables.runs, tables.percent
    status = Counter(r.status for r in runs)
    unit = " (%)" if pct else ""
    alpha = "-" if tables.alpha is None else f"{tables.alpha:g}"
    out = [
        f"# Ablation: {tables.metric}{unit}",
        "",
        f"Sweep `{sweep_dir}`; metric `{tables.metric}`; balanced margin at alpha = {alpha}"
        + ("" if tables.beta is None else f"; beta = {tables.beta:g}")
        + f". {len(runs)} runs: {status['finished']} finished, {status['failed']} failed, "
        f"{status['incomplete']} incomplete.",
        "",
    ]
    out += md_notes(tables.notes)
    if tables.sft is not None:
        out += [
            f"Starting point (SFT model) {tables.metric}: {format_number(tables.sft, pct)}.",
            "",
        ]
    out += [
        "Cells: mean ± sample std over seeds (n = seeds). Gain: balanced - difference paired "
        "by seed, mean [95% t confidence interval].",
        "",
    ]
    out += md_table(
        ["loss", "known as", "difference", f"balanced (alpha={alpha})", "gain"],
        (
            [
                r.loss,
                r.known_as,
                format_cell(r.difference, pct),
                format_cell(r.balanced, pct),
                format_gain(r.gain, pct),
            ]
            for r in tables.rows
        ),
    )
    if len(tables.alphas) > 1 or tables.other_margins:
        cols: list[float | str] = ["difference", *tables.alphas, *tables.other_margins]
        out += ["", "## Gap adaptor (alpha of the balanced margin)", ""]
        out += md_table(
            ["loss", *(c if isinstance(c, str) else f"alpha={c:g}" for c in cols)],
            (
                [loss, *(format_cell(by_col.get(c, Cell()), pct) for c in cols)]
                for loss, by_col in tables.gap_adaptor.items()
            ),
        )
    if tables.methods:
        out += ["", "## Methods", ""]
        out += md_table(
            ["method", "loss", "margin", tables.metric],
            ([m.label, m.loss, m.margin, format_cell(m.cell, pct)] for m in tables.methods),
        )
    if plots:
        out += ["", "## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots]
    bad = [r for r in runs if r.status != "finished"]
    if bad:
        out += ["", "## Runs that did not finish", ""]
        for r in bad:
            rel = os.path.relpath(r.path, sweep_dir)
            what = f"{r.loss or '?'} / {r.margin or '?'}" + (
                f" / method={r.method}" if r.method else ""
            )
            why = (r.error or "").strip().splitlines()[0] if r.error and r.error.strip() else ""
            detail = (
                f"failed: {why}" if r.status == "failed" else "incomplete (killed or still running)"
            )
            out.append(f"- `{rel}` ({what}, seed {r.seed}): {detail}")
    return "\n".join(out) + "\n"


CSV_COLUMNS = (
    ["loss", "known_as", "metric", "unit", "alpha"]
    + [f"{m}_{k}" for m in MARGINS for k in (*CELL_FIELDS, "incomplete")]
    + ["gain_mean", "gain_ci_low", "gain_ci_high", "n_paired"]
)


def render_csv(tables: Tables) -> str:
    """One row per loss: mean, std, n, failed, incomplete per margin; paired gain and its 95% CI.

    Values are in display units (percent for accuracies, see the `unit` column); empty = undefined.
    """
    rows = []
    for r in tables.rows:
        row = [
            r.loss,
            r.known_as,
            tables.metric,
            "%" if tables.percent else "",
            "" if tables.alpha is None else f"{tables.alpha:g}",
        ]
        for cell in (r.difference, r.balanced):
            row += [*csv_cell(cell), cell.incomplete]
        row += csv_gain(r.gain)
        rows.append(row)
    return csv_text(CSV_COLUMNS, rows)


# ----------------------------------------------------------------------------- report


def plot_data(tables: Tables) -> PlotData:
    """The plots' data for the main table's cells: difference, and balanced at `tables.alpha`."""
    from experiments.tables.plots import PlotData

    alpha = tables.alpha
    columns = ["difference", f"balanced (alpha={alpha:g})" if alpha is not None else "balanced"]
    losses = [r.loss for r in tables.rows]
    cells: dict[tuple[str, str], list[list[dict]]] = {}
    for r in tables.runs:
        if r.status != "finished" or r.method is not None or r.loss not in losses:
            continue
        if r.margin == "difference" or (
            r.margin == "balanced"
            and r.alpha is not None
            and alpha is not None
            and round(r.alpha, 6) == alpha
        ):
            col = columns[0] if r.margin == "difference" else columns[1]
            cells.setdefault((r.loss, col), []).append(r.metrics())
    summaries = {
        (r.loss, c): cell.summary
        for r in tables.rows
        for c, cell in zip(columns, (r.difference, r.balanced), strict=True)
    }
    return PlotData(
        cells=cells,
        losses=losses,
        columns=columns,
        summaries=summaries,
        ylabel=tables.metric + (" (%)" if tables.percent else ""),
        reference=tables.sft,
    )


def write_report(
    sweep_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    metric: str | None = None,
    alpha: float | None = None,
    beta: float | None = None,
) -> Path:
    """Collect the runs under ``sweep_dir``, build the tables and write ablation.md, ablation.csv
    and the plots into ``out_dir``. See `build_tables` for metric, alpha and beta. Returns the
    path of ablation.md."""
    sweep = Path(sweep_dir)
    tables = build_tables(collect_runs(sweep), metric=metric, alpha=alpha, beta=beta)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from experiments.tables.plots import write_plots  # matplotlib is imported only when plotting

    written = write_plots(plot_data(tables), out)
    atomic_write_text(out / "ablation.csv", render_csv(tables))
    md = out / "ablation.md"
    atomic_write_text(md, render_markdown(tables, sweep, written))
    return md
