"""The methods table: the BPO paper's first table in miniature, widened to the zoo's methods.

Rows: the paper's methods first, in its order, with its Qwen2.5-Math-7B accuracy beside ours for
reference (a 7B model on competition math against a 0.9M model on arithmetic: compare the order,
not the numbers), then every other method found, the chosen-NLL control last. Cells: accuracy
mean ± sample std over seeds; the paired difference against DPO (same seeds, same SFT model) with
its 95% t interval; the final eval chosen reward (below 0: the chosen response lost likelihood).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from experiments.tables.collect import Cell, Run
from experiments.tables.formatting import (
    CELL_FIELDS,
    csv_cell,
    csv_gain,
    csv_number,
    csv_text,
    format_cell,
    format_gain,
    format_signed,
    gain_columns,
    md_notes,
    md_table,
)
from experiments.tables.select import (
    METRIC,
    cell,
    group,
    method_of,
    optimizer_of,
    sft_accuracy,
    size_of,
)
from experiments.tables.stats import PairedGain, Summary, paired_gain, summarize

__all__ = ["PAPER_METHODS", "MethodsRow", "MethodsTable", "build", "render_csv", "render_markdown"]

#: the paper's methods table (Qwen2.5-Math-7B, average accuracy %, single runs), in its order
PAPER_METHODS = (
    ("dpo", "DPO", 41.0),
    ("ipo", "IPO", 43.1),
    ("slic", "SLiC", 41.7),
    ("cal_dpo", "Cal-DPO", 43.6),
    ("dpop", "DPOP", 44.9),
    ("bpo", "BPO", 46.7),
)
BASELINE, CONTROL = "dpo", "chosen_nll"


@dataclass
class MethodsRow:
    """One method: our cell, the paper's number (None when the paper has no row for it)."""

    method: str
    paper_label: str | None
    paper: float | None
    cell: Cell
    vs_dpo: PairedGain
    chosen_reward: Summary
    objective: str  # loss x margin, or "-" when unknown


@dataclass
class MethodsTable:
    """The table's rows, the SFT starting point and notes (what was pooled or left out)."""

    rows: list[MethodsRow]
    sft: float | None
    notes: list[str] = field(default_factory=list)


def _order(names: Sequence[str]) -> list[str]:
    from losses import METHODS

    paper = [m for m, _, _ in PAPER_METHODS]
    registry = list(METHODS)
    rest = sorted(
        (n for n in names if n not in paper and n != CONTROL),
        key=lambda n: (registry.index(n) if n in registry else len(registry), n),
    )
    return paper + rest + ([CONTROL] if CONTROL in names else [])


def build(runs: Sequence[Run]) -> MethodsTable:
    """Group ``runs`` by method (:func:`method_of`) at one model size with AdamW, and compare each
    with DPO paired by seed. The paper's rows are always shown (``missing`` when not run)."""
    notes: list[str] = []
    runs = [r for r in runs if optimizer_of(r) == "adamw"]
    sizes = Counter(s for r in runs if (s := size_of(r)) is not None)
    if len(sizes) > 1:
        size = sizes.most_common(1)[0][0]
        notes.append(f"several model sizes found; the table shows {size.label} only")
        runs = [r for r in runs if size_of(r) == size]
    by_method = group(runs, method_of)
    baseline = cell(by_method.get(BASELINE, [])).by_seed()
    paper = {m: (label, value) for m, label, value in PAPER_METHODS}
    rows = []
    for name in _order(list(by_method)):
        method_runs = by_method.get(name, [])
        c = cell(method_runs)
        rewards = [v for r in method_runs if (v := r.value("eval.chosen_reward")) is not None]
        first = method_runs[0] if method_runs else None
        objective = f"{first.loss} x {first.margin}" if first and first.loss else "-"
        label, value = paper.get(name, (None, None))
        gain = paired_gain(baseline, c.by_seed()) if name != BASELINE else paired_gain({}, {})
        rows.append(MethodsRow(name, label, value, c, gain, summarize(rewards), objective))
    return MethodsTable(rows=rows, sft=sft_accuracy(runs), notes=notes)


def render_markdown(table: MethodsTable) -> str:
    """The methods table as Markdown (header, notes, the table)."""
    out = ["# Methods: eval.accuracy (%)", ""]
    out += md_notes(table.notes)
    if table.sft is not None:
        out += [f"Starting point (SFT model) accuracy: {table.sft:.1f}.", ""]
    out += [
        "Ours: mean ± sample std over seeds (n). vs DPO: method - DPO paired by seed, mean [95% t "
        "interval]. Paper: Qwen2.5-Math-7B, single runs (arXiv 2506.03557), for the order only. "
        "Chosen reward: final eval mean of beta log(pi/pi_ref) on the chosen responses.",
        "",
    ]
    body = [
        [
            r.method,
            r.objective,
            "-" if r.paper is None else f"{r.paper:.1f}",
            format_cell(r.cell, True),
            "(baseline)" if r.method == BASELINE else format_gain(r.vs_dpo, True),
            format_signed(r.chosen_reward.mean, 3),  # nan (-) without values
        ]
        for r in table.rows
    ]
    out += md_table(
        ["method", "loss x margin", "paper (7B)", "ours", "vs DPO", "chosen reward"], body
    )
    return "\n".join(out) + "\n"


CSV_COLUMNS = (
    *("method", "objective", "paper", *CELL_FIELDS, "incomplete"),
    *gain_columns("vs_dpo"),
    "chosen_reward_mean",
)


def render_csv(table: MethodsTable) -> str:
    """One row per method; accuracies in percent, empty = undefined."""
    rows = [
        [
            *(r.method, r.objective, csv_number(r.paper), *csv_cell(r.cell), r.cell.incomplete),
            *(*csv_gain(r.vs_dpo), csv_number(r.chosen_reward.mean)),
        ]
        for r in table.rows
    ]
    return csv_text(CSV_COLUMNS, rows)


def plot(table: MethodsTable, out: Path) -> list[str]:
    """accuracy.png: one bar per method (mean, std error bar), the SFT accuracy as a line."""
    from experiments.tables.plots import plot_accuracy

    rows = [r for r in table.rows if r.cell.summary.n]
    if not rows:
        return []
    summaries = {(r.method, "accuracy"): r.cell.summary for r in rows}
    plot_accuracy(
        summaries,
        [r.method for r in rows],
        ["accuracy"],
        out / "accuracy.png",
        ylabel=f"{METRIC} (%)",
        reference=table.sft,
    )
    return ["accuracy.png"]
