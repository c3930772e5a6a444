"""The iterative table: rounds of on-policy pairs -> training -> evaluation (``engine.iterate``).

``+experiment=iterative``: from the embedded task's SFT model (round 0), each round samples k
answers for fresh prompts from the current policy, verifies and pairs them, trains one epoch with
the cell's method from that policy (the reference stays the SFT model) and evaluates greedy
held-out accuracy. One pipeline per method x seed; each leaves a ``results.json`` with its
``per_round`` rows (:func:`engine.rounds.cell_results`). :mod:`.table` groups them by method
and compares each round with DPO's; :mod:`.render` writes the report.
"""

from experiments.tables.iterative.render import plot, render_csv, render_markdown
from experiments.tables.iterative.table import (
    IterativeRow,
    IterativeTable,
    RoundCells,
    build,
    round_cell,
    round_value,
)

__all__ = [
    "IterativeRow",
    "IterativeTable",
    "RoundCells",
    "build",
    "plot",
    "render_csv",
    "render_markdown",
    "round_cell",
    "round_value",
]
