"""The reproduce tables beyond the ablation: methods, scale, the hypothesis test, and for each the
convergence of its cells and the cost of its runs (``python -m experiments.tables``).

Modules: :mod:`~experiments.tables.select` (picking and grouping runs), one module per table
(:mod:`~experiments.tables.methods`, :mod:`~experiments.tables.scale`,
:mod:`~experiments.tables.hypothesis`), :mod:`~experiments.tables.convergence`,
:mod:`~experiments.tables.costs`, :mod:`~experiments.tables.report` (writing a table's files) and
:mod:`~experiments.tables.plan` (which sweeps ``make reproduce`` runs for which table).
"""
