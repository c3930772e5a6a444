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

Under ``torchrun`` the generation batches (``generation.batch_size`` problems) are dealt out
across ranks, each rank generates its share on its own device, and rank 0 gathers and writes.
``evaluate(cfg)`` is the plain function; :class:`engine.generation.evaluation.BenchmarkEvaluator`
is what training calls on its own model (``python -m engine.train benchmark=[math500]
benchmark.math500.path=...``).

Resuming: the records of each generation batch are kept as it finishes (``records/.parts/``), and
``records/<name>.jsonl`` once a benchmark is done. A stop signal (SIGTERM, SIGUSR1, submitit's:
:mod:`engine.runtime.preemption`) is taken after a batch round: the command exits with the requeue
status 75, and running it again into the same ``output_dir`` skips the finished benchmarks and
batches (``records/.parts/run.json`` holds the settings; other settings there are refused).
``done/complete.json`` marks a finished evaluation (:mod:`engine.runtime.phases`), which a rerun
reads back instead of loading the model.
"""

# ruff: noqa: E402

from __future__ import annotations

from engine.runtime.preemption import watch_from_start

watch_from_start(__name__)  # python -m engine.evaluate: stop signals are recorded from here on

# the imports below take seconds: after the line above (hence the file's E402 exemption)
import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

import engine.task  # noqa: F401  (registers the embedded task's verifier)
from engine.generation.backends import load_backend
from engine.generation.benchmarks import benchmarks_from_config
from engine.generation.evaluation import (
    PARTS,
    evaluate_benchmarks,
    markdown_table,
    write_outputs,
)
from engine.model.conversion import resolve_model_config
from engine.runtime import distributed as dist_utils
from engine.runtime import phases
from engine.runtime.fileio import atomic_write_json
from engine.runtime.launch import hydra_entry, init_if_launched, resolve_output_dir
from engine.runtime.preemption import run_or_requeue, stop_point, stop_signals_watched

log = logging.getLogger("engine.evaluate")


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.model`` on ``cfg.benchmark``; returns (and on rank 0 writes) the results.
    Stop signals are watched meanwhile: a stop raises
    :class:`engine.runtime.preemption.Preempted` after the batches in hand are kept."""
    with stop_signals_watched():
        return _evaluate(cfg)


def _evaluate(cfg: DictConfig) -> dict[str, Any]:
    benchmarks = benchmarks_from_config(cfg.get("benchmark"))
    if not benchmarks:
        raise ValueError("no benchmarks selected: benchmark=[math500,...] (conf/benchmark/)")
    problems = {b.name: b.load() for b in benchmarks}  # a bad file fails before any model work
    stop_point("during startup, after reading the benchmarks")
    init_if_launched()
    run_dir = resolve_output_dir(cfg, "outputs/evaluate")
    finished = _check_settings(cfg, run_dir)
    if finished is not None:  # this evaluation finished earlier: its results, not redone
        return finished
    model_cfg = resolve_model_config(cfg.model)  # model=smollm2_135m: converted on first use
    model = model_cfg.get("name_or_path") or "tiny (random weights)"
    from engine.model.loading import load_tokenizer  # transformers' model classes: seconds

    results, records = evaluate_benchmarks(
        lambda: load_backend(cfg.generation, model_cfg)[0],  # loaded when a batch is left
        load_tokenizer(model_cfg),
        benchmarks,
        problems=problems,
        records_dir=run_dir / "records",
        batch_size=int(cfg.generation.get("batch_size") or 64),
    )
    results["model"] = model
    if dist_utils.is_main():
        label = _label(model)
        write_outputs(run_dir, results, records, label=label)
        phases.mark_done(run_dir, phases.COMPLETE)
        print(markdown_table(results, label=label), flush=True)
        log.info("results: %s", run_dir / "results.json")
    dist_utils.barrier()
    return results


def _label(model: str) -> str:
    """The table's row label: a run's ``final_model/`` is named by its run directory."""
    path = Path(model)
    return f"{path.parent.name}/{path.name}" if path.name == "final_model" else path.name


def _check_settings(cfg: DictConfig, run_dir: Path) -> dict[str, Any] | None:
    """Refuse an ``output_dir`` that holds an evaluation with other settings (its kept batches
    would be mixed in); record this one's. Returns the results of this very evaluation when it
    finished earlier (every rank), else None."""
    settings = {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "benchmark": OmegaConf.to_container(cfg.benchmark, resolve=True),
        "batch_size": int(cfg.generation.get("batch_size") or 64),
        "backend": str(cfg.generation.get("backend", "hf")),
    }
    finished, problem = None, None
    if dist_utils.is_main():
        recorded = run_dir / "records" / PARTS / "run.json"
        if recorded.is_file() and json.loads(recorded.read_text()) != settings:
            problem = (
                f"{run_dir} holds an evaluation with other settings ({recorded}); use another "
                "output_dir or delete it"
            )
        else:
            atomic_write_json(recorded, settings)
        if problem is None and phases.is_done(run_dir) and (run_dir / "results.json").is_file():
            finished = json.loads((run_dir / "results.json").read_text())
            print(markdown_table(finished, label=_label(str(finished["model"]))), flush=True)
            log.info("finished earlier: %s", run_dir / "results.json")
    finished, problem = dist_utils.broadcast_object((finished, problem))
    if problem is not None:  # on every rank, so that none waits for the others
        raise ValueError(problem)
    return finished


def main(cfg: DictConfig) -> dict[str, Any]:
    """The command: :func:`evaluate`, whose stop exits with the requeue status."""
    return run_or_requeue(evaluate, cfg)


if __name__ == "__main__":
    hydra_entry("evaluate", main)
