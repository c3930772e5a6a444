"""Speed: this engine against TRL's DPOTrainer (``python -m experiments.bench``, ``make bench``),
generation throughput (``python -m experiments.bench.generation``) and the cost of the
gradient-weight diagnostics (``python -m experiments.bench.diagnostics_cost``).

Modules: :mod:`~experiments.bench.throughput` (the comparison and its command),
:mod:`~experiments.bench.variants` (what it measures, and the spec of one run),
:mod:`~experiments.bench.worker` (one measured run in its own process),
:mod:`~experiments.bench.synthetic` (the shared model, pairs and FLOP counts),
:mod:`~experiments.bench.report` (the Markdown report).
"""
