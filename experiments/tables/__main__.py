"""Write one reproduce table from sweeps that already ran.

    python -m experiments.tables <table> <sweep root> [--out DIR]

``<sweep root>`` holds the sweeps as ``make reproduce`` lays them out (``ablation/``,
``methods/``, ``scale/``, ``hypothesis/``; see ``experiments.tables.report.SOURCES``); the report
goes to ``--out`` (default ``<sweep root>/<table>-report``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from experiments.tables.ablation import AblationError
from experiments.tables.report import TABLES, write_table


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 on a clear user error)."""
    p = argparse.ArgumentParser(
        prog="python -m experiments.tables", description=__doc__.split("\n")[1]
    )
    p.add_argument("table", choices=list(TABLES))
    p.add_argument("sweep_root", help="the directory holding the table's sweeps")
    p.add_argument("--out", default=None, help="report directory")
    args = p.parse_args(argv)
    root = Path(args.sweep_root)
    if not root.is_dir():
        print(f"error: sweep root {root} is not a directory", file=sys.stderr)
        return 2
    try:
        md = write_table(args.table, root, args.out or root / f"{args.table}-report")
    except AblationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(md.read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
