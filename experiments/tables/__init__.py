"""The paper's tables from finished sweeps: the ablation, methods, scale and the hypothesis test,
and for each the convergence of its cells and the cost of its runs (``python -m
experiments.tables <table> DIR``, one command for every table).

Modules, lowest first: :mod:`~experiments.tables.stats` (summaries, paired gains),
:mod:`~experiments.tables.plan` (which sweeps ``make reproduce`` runs, and where),
:mod:`~experiments.tables.collect` (finding runs, reading results.json / metrics.jsonl /
failed.json, cells of runs), :mod:`~experiments.tables.formatting` (numbers, cells, Markdown and
CSV), :mod:`~experiments.tables.select` (picking and grouping runs), one module per table
(:mod:`~experiments.tables.ablation`, :mod:`~experiments.tables.methods`,
:mod:`~experiments.tables.scale`, :mod:`~experiments.tables.hypothesis`),
:mod:`~experiments.tables.convergence`, :mod:`~experiments.tables.costs`,
:mod:`~experiments.tables.plots`, and :mod:`~experiments.tables.report` (writing a table's files).
"""
