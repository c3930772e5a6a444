"""Sweep collectors, ablation tables, plots and benchmarks for the preference-loss zoo."""
