"""The zoo page's tables (docs/zoo.md) agree with the registries: every registered part has its row
(and no row names a part that does not exist), and the methods table says truthfully which methods
cross with a margin and which TRL ``loss_type`` they match."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from losses import LOSSES, METHODS, PAIR_LOSSES

ZOO_PAGE = Path(__file__).resolve().parents[2] / "docs" / "zoo.md"


def table(marker: str) -> list[list[str]]:
    """The rows (cells, stripped) of the Markdown table after ``<!-- zoo:<marker> -->``."""
    text = ZOO_PAGE.read_text(encoding="utf-8")
    start = text.index(f"<!-- zoo:{marker} -->")
    lines = text[start:].splitlines()[1:]
    rows = []
    for line in lines:
        if not line.startswith("|"):
            if rows:
                break
            continue
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        rows.append(cells)
    return rows[2:]  # header and separator


def names(rows: list[list[str]]) -> list[str]:
    return [row[0].strip("`") for row in rows]


@pytest.mark.parametrize(
    ("marker", "registry"), [("losses", LOSSES), ("per-side", PAIR_LOSSES), ("methods", METHODS)]
)
def test_every_registered_part_has_one_row(marker, registry):
    listed = names(table(marker))
    assert sorted(listed) == sorted(registry), marker
    assert len(listed) == len(set(listed))


def test_methods_table_says_which_cross_and_trl_names():
    for row in table("methods"):
        method = METHODS[row[0].strip("`")]
        assert row[2] == ("yes" if method.crosses_margin else "no"), method.name
        assert row[3].strip("`") == (method.trl_loss_type or "-"), method.name
        # a TRL name has a measured agreement; no TRL name, no number
        assert (row[4] != "-") == (method.trl_loss_type is not None), method.name
