"""Write one table's report from sweeps that already ran: one command for every table.

    python -m experiments.tables <table> DIR [--out OUT]
    python -m experiments.tables ablation DIR [--out OUT] [--metric M] [--alpha A] [--beta B]

DIR is either a sweep root as ``make reproduce`` lays it out (its ``--sweep-root``, e.g.
multirun/reproduce), of which the table reads the folders it needs, or one sweep directory (e.g.
multirun/<date>/<time>, or the directory your jobs' hydra.run.dir point into), of which it reads
every run, at any depth. DIR is taken as a sweep root when one of make reproduce's sweep folders
under it holds runs; the command says which it took. The report goes to OUT (default
DIR/<table>-report): <table>.md (the table, the convergence of its cells, the cost of its runs,
plots), <table>.csv, convergence.csv, costs.csv and PNGs, each written atomically; the Markdown is
also printed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from experiments.tables.ablation import DEFAULT_METRIC, FALLBACK_METRIC
from experiments.tables.collect import SOURCES, Sweeps, TableError
from experiments.tables.plan import SWEEPS
from experiments.tables.report import TABLES, write_table

#: what each table shows, for --help
ABOUT = {
    "ablation": "six losses x {difference, balanced}, the gap adaptor and the control",
    "methods": "every named method against DPO, the paper's rows first",
    "scale": "DPO vs BPO at each model size",
    "hypothesis": "the balanced cells under AdamW and plain SGD, with gradient weights",
    "real": "DPO, BPO and the chosen-NLL control with LoRA on SmolLM2-135M-Instruct",
    "iterative": "DPO, BPO and the chosen-NLL control over rounds of on-policy pairs",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.tables",
        description=__doc__,
        epilog="make reproduce's sweep folders: "
        + ", ".join(f"{s.directory}/" for s in SWEEPS.values())
        + "\nfolders each table reads under a sweep root:\n"
        + "\n".join(f"  {t}: {', '.join(f'{d}/' for d in dirs)}" for t, dirs in SOURCES.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tables = parser.add_subparsers(dest="table", required=True, metavar="<table>")
    for name in TABLES:
        table = tables.add_parser(
            name,
            help=ABOUT[name],
            description=f"The {name} table: {ABOUT[name]}. DIR: python -m experiments.tables -h",
        )
        table.add_argument(
            "dir", metavar="DIR", help="a sweep root (make reproduce's layout) or one sweep dir"
        )
        table.add_argument(
            "--out", default=None, help=f"report directory (default DIR/{name}-report)"
        )
        if name == "ablation":
            table.add_argument(
                "--metric",
                default=None,
                help=f"dotted path into results.json (default {DEFAULT_METRIC}, "
                f"else {FALLBACK_METRIC})",
            )
            table.add_argument(
                "--alpha",
                type=float,
                default=None,
                help="balanced-margin alpha for the main table (default 0.3, else most common)",
            )
            table.add_argument(
                "--beta", type=float, default=None, help="keep only runs with this beta"
            )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 on a clear user error)."""
    args = _parser().parse_args(argv)
    options = {k: getattr(args, k) for k in ("metric", "alpha", "beta") if hasattr(args, k)}
    try:
        sweeps = Sweeps.find(args.dir)
        print(f"reading {sweeps.describe(args.table)}", file=sys.stderr)
        out = args.out or Path(args.dir) / f"{args.table}-report"
        md = write_table(args.table, sweeps, out, **options)
    except TableError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(md.read_text(encoding="utf-8"))
    print(f"wrote {md.parent}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
