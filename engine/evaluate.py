"""Benchmark accuracy by generation: ``python -m engine.evaluate [hydra overrides]``.

    python -m engine.evaluate model=hf model.name_or_path=outputs/run/final_model \\
        benchmark=[math500,aime24] benchmark.math500.path=math500.jsonl \\
        benchmark.aime24.path=aime24.parquet

For each benchmark: every problem rendered with the benchmark's prompt, one completion (greedy by
default), verified against the gold answer. Writes, in ``output_dir`` (default Hydra's run dir):

- ``results.json``: ``benchmarks.<name>`` = ``accuracy``, ``stderr`` (binomial,
  sqrt(p (1 - p) / n)), ``n``, ``timeouts`` (verifications over the time limit, counted wrong);
  ``accuracy``: the average over benchmarks (unweighted, as the paper's Avg.);
- ``results.md``: the paper's table layout, benchmarks as columns, Avg. last (percent);
- ``records/<name>.jsonl``: one line per problem: prompt, completion, extracted answer, gold,
  verdict.

Under ``torchrun`` the problems are dealt out across ranks
(:func:`engine.runtime.distributed.shard`), each rank generates its share on its own device, and
rank 0 gathers and writes. ``evaluate(cfg)`` is the plain function;
:class:`engine.generation.evaluation.BenchmarkEvaluator` is what training calls on its own model
(``python -m engine.train benchmark=[math500] benchmark.math500.path=...``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

import engine.task  # noqa: F401  (registers the embedded task's verifier)
from engine.generation.backends import load_backend
from engine.generation.benchmarks import benchmarks_from_config
from engine.generation.evaluation import evaluate_benchmarks, markdown_table, write_outputs
from engine.model.conversion import resolve_model_config
from engine.runtime import distributed as dist_utils
from engine.runtime.launch import hydra_entry, init_if_launched, resolve_output_dir

log = logging.getLogger("engine.evaluate")


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.model`` on ``cfg.benchmark``; returns (and on rank 0 writes) the results."""
    benchmarks = benchmarks_from_config(cfg.get("benchmark"))
    if not benchmarks:
        raise ValueError("no benchmarks selected: benchmark=[math500,...] (conf/benchmark/)")
    problems = {b.name: b.load() for b in benchmarks}  # a bad file fails before any model work
    init_if_launched()
    model_cfg = resolve_model_config(cfg.model)  # model=smollm2_135m: converted on first use
    backend, tokenizer = load_backend(cfg.generation, model_cfg)
    results, records = evaluate_benchmarks(backend, tokenizer, benchmarks, problems=problems)
    results["model"] = model_cfg.get("name_or_path") or "tiny (random weights)"
    run_dir = resolve_output_dir(cfg, "outputs/evaluate")
    if dist_utils.is_main():
        model = Path(str(results["model"]))  # a run's final_model/ is named by its run dir
        label = f"{model.parent.name}/{model.name}" if model.name == "final_model" else model.name
        write_outputs(run_dir, results, records, label=label)
        print(markdown_table(results, label=label), flush=True)
        log.info("results: %s", run_dir / "results.json")
    dist_utils.barrier()
    return results


if __name__ == "__main__":
    hydra_entry("evaluate", evaluate)
