"""How every table writes its numbers: cells and gains as text, Markdown tables, CSV files.

- A cell (:class:`experiments.tables.collect.Cell`): ``44.5 ± 1.2 (n=3)``, ``44.5 (n=1)``,
  ``missing``, ``failed (2)``, ``41.0 ± 0.3 (n=2, 1 failed)``; one decimal in percent, else four
  significant digits.
- A paired gain: ``+3.5 [+1.2, +5.8] (n=3)`` (mean [95% CI]); ``-`` without paired seeds.
- A summary at fixed decimals: ``0.42 ± 0.05``, ``-0.200`` (signed), ``-`` without values.
- A Markdown table's notes (``> Note: ...``) and the table itself.
- CSV: numbers rounded to 10 digits, an empty cell for an undefined one (None or nan), never 0;
  a cell as its :data:`CELL_FIELDS` (mean, std, n, failed), a gain as its :data:`GAIN_FIELDS`
  (mean, ci_low, ci_high, n).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Sequence

from experiments.tables.collect import Cell
from experiments.tables.stats import PairedGain, Summary

__all__ = [
    "CELL_FIELDS",
    "GAIN_FIELDS",
    "csv_cell",
    "csv_gain",
    "csv_number",
    "csv_text",
    "format_cell",
    "format_gain",
    "format_number",
    "format_signed",
    "format_summary",
    "gain_columns",
    "md_notes",
    "md_table",
]

#: a cell's CSV columns (:func:`csv_cell`); a table prefixes them when it has several cells a row
CELL_FIELDS = ("mean", "std", "n", "failed")
#: a paired gain's CSV columns (:func:`csv_gain`), named after the gain (:func:`gain_columns`)
GAIN_FIELDS = ("mean", "ci_low", "ci_high", "n")


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


def format_signed(x: float | None, digits: int) -> str:
    """``x`` with its sign and ``digits`` decimals (``-0.200``); ``-`` when undefined (None or
    nan)."""
    return "-" if x is None or math.isnan(x) else f"{x:+.{digits}f}"


def format_summary(s: Summary, digits: int, signed: bool = False, spread: bool = True) -> str:
    """``mean ± std`` with ``digits`` decimals; ``-`` when ``s`` has no values. The std only with
    ``spread`` and when defined (n > 1); ``signed``: the mean with its sign."""
    if not s.n:
        return "-"
    mean = f"{s.mean:+.{digits}f}" if signed else f"{s.mean:.{digits}f}"
    return mean if not spread or math.isnan(s.std) else f"{mean} ± {s.std:.{digits}f}"


def md_notes(notes: Sequence[str]) -> list[str]:
    """A table's notes as Markdown lines (``> Note: ...``), a blank line after them; none without
    notes."""
    return [f"> Note: {n}" for n in notes] + ([""] if notes else [])


def md_table(header: Sequence[str], body: Iterable[Sequence[str]]) -> list[str]:
    """A Markdown table's lines: the header, the rule, one line per row."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in body]


def csv_number(x: float | None) -> str:
    """A CSV cell for a number: empty when undefined (None or nan), else rounded to 10 digits."""
    return "" if x is None or math.isnan(x) else repr(round(x, 10))


def csv_cell(cell: Cell) -> list[object]:
    """A cell's CSV values, in :data:`CELL_FIELDS` order: mean, std, n, failed."""
    s = cell.summary
    return [csv_number(s.mean), csv_number(s.std), s.n, cell.failed]


def csv_gain(gain: PairedGain) -> list[object]:
    """A paired gain's CSV values, in :data:`GAIN_FIELDS` order: mean, ci_low, ci_high, n."""
    return [csv_number(gain.mean), csv_number(gain.ci_low), csv_number(gain.ci_high), gain.n]


def gain_columns(prefix: str) -> tuple[str, ...]:
    """Columns of the gain ``prefix``: ``vs_dpo`` -> ``vs_dpo_mean`` ... ``vs_dpo_n``."""
    return tuple(f"{prefix}_{field}" for field in GAIN_FIELDS)


def csv_text(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A CSV file's text: the header line, then one line per row."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()
