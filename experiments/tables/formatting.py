"""How every table writes its numbers: cells and gains as text, Markdown tables, CSV files.

- A cell (:class:`experiments.tables.collect.Cell`): ``44.5 ± 1.2 (n=3)``, ``44.5 (n=1)``,
  ``missing``, ``failed (2)``, ``41.0 ± 0.3 (n=2, 1 failed)``; one decimal in percent, else four
  significant digits.
- A paired gain: ``+3.5 [+1.2, +5.8] (n=3)`` (mean [95% CI]); ``-`` without paired seeds.
- CSV: numbers rounded to 10 digits, an empty cell for an undefined one (None or nan), never 0.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Sequence

from experiments.tables.collect import Cell
from experiments.tables.stats import PairedGain

__all__ = ["csv_number", "csv_text", "format_cell", "format_gain", "format_number", "md_table"]


def format_number(x: float, percent: bool, sign: bool = False) -> str:
    """``x`` with one decimal when ``percent``, else four significant digits; ``sign``: always
    with its sign (a gain)."""
    if percent:
        return f"{x:+.1f}" if sign else f"{x:.1f}"
    return f"{x:+.4g}" if sign else f"{x:.4g}"


def format_cell(cell: Cell, percent: bool) -> str:
    """`44.5 ± 1.2 (n=3)`, `44.5 (n=1)`, `missing`, `failed (2)`, `41.0 ± 0.3 (n=2, 1 failed)`."""
    if cell.empty:
        return "missing"
    counts = [
        (cell.failed, "failed", "failed"),
        (cell.incomplete, "incomplete", "incomplete"),
        (cell.no_metric, "without metric", "no metric"),
    ]
    s = cell.summary
    if s.n == 0:  # name the first reason nothing finished, then the others
        k, _, head = next(c for c in counts if c[0])
        rest = [f"{c[0]} {c[1]}" for c in counts if c[0] and c[2] != head]
        return f"{head} ({k})" + (f" ({', '.join(rest)})" if rest else "")
    extras = [f"{k} {what}" for k, what, _ in counts if k]
    value = format_number(s.mean, percent)
    if s.n > 1:
        value += f" ± {format_number(s.std, percent)}"
    return f"{value} ({', '.join([f'n={s.n}', *extras])})"


def format_gain(gain: PairedGain, percent: bool) -> str:
    """`+3.5 [+1.2, +5.8] (n=3)`; `-` without paired seeds; no interval with one pair."""
    if gain.n == 0:
        return "-"
    mean = format_number(gain.mean, percent, sign=True)
    if gain.n == 1:
        return f"{mean} (n=1, no CI)"
    low = format_number(gain.ci_low, percent, sign=True)
    high = format_number(gain.ci_high, percent, sign=True)
    return f"{mean} [{low}, {high}] (n={gain.n})"


def md_table(header: Sequence[str], body: Iterable[Sequence[str]]) -> list[str]:
    """A Markdown table's lines: the header, the rule, one line per row."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in body]


def csv_number(x: float | None) -> str:
    """A CSV cell for a number: empty when undefined (None or nan), else rounded to 10 digits."""
    return "" if x is None or math.isnan(x) else repr(round(x, 10))


def csv_text(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A CSV file's text: the header line, then one line per row."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()
