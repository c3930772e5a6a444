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

Under ``torchrun`` the problems are dealt out across ranks (:mod:`engine.sharding`), each rank
generates its share on its own device, and rank 0 gathers and writes. ``evaluate(cfg)`` is the
plain function; :class:`BenchmarkEvaluator` is what training calls on its own model
(``python -m engine.train benchmark=[math500] benchmark.math500.path=...``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from engine import distributed as dist_utils
from engine.benchmarks import Benchmark, Problem, benchmarks_from_config
from engine.data import write_jsonl
from engine.fileio import atomic_write_json, atomic_write_text
from engine.generation import Backend, HFBackend, PromptFormat, complete, load_backend
from engine.sharding import gather_in_order, hydra_entry, init_if_launched, shard
from engine.verifiers import VERIFIERS

log = logging.getLogger("engine.evaluate")


@dataclass(frozen=True)
class Record:
    """One problem's outcome."""

    prompt: str
    completion: str
    extracted: str | None
    gold: str
    correct: bool
    timed_out: bool


def generate_and_judge(
    backend: Backend,
    tokenizer: Any,
    problems: Sequence[tuple[str, str]],
    *,
    prompt: PromptFormat,
    verifier: str,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> list[Record]:
    """One completion per ``(problem, gold)``, verified; in this process, in order."""
    rendered, completions = complete(
        backend,
        tokenizer,
        prompt,
        [problem for problem, _ in problems],
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
    )
    judge = VERIFIERS[verifier].judge
    records = []
    for r, completion, (_, gold) in zip(rendered, completions, problems, strict=True):
        verdict = judge(completion, gold)
        records.append(
            Record(r.text, completion, verdict.extracted, gold, verdict.correct, verdict.timed_out)
        )
    return records


def summarize(records: Sequence[Record]) -> dict[str, float]:
    """``accuracy``, its binomial ``stderr``, ``n`` and ``timeouts`` (NaN accuracy when empty)."""
    n = len(records)
    accuracy = sum(r.correct for r in records) / n if n else float("nan")
    stderr = math.sqrt(accuracy * (1 - accuracy) / n) if n else float("nan")
    return {
        "accuracy": accuracy,
        "stderr": stderr,
        "n": n,
        "timeouts": sum(r.timed_out for r in records),
    }


def evaluate_benchmarks(
    backend: Backend,
    tokenizer: Any,
    benchmarks: Sequence[Benchmark],
    *,
    problems: dict[str, list[Problem]] | None = None,
    lockstep: bool = False,
) -> tuple[dict[str, Any], dict[str, list[Record]]]:
    """Every benchmark, sharded across ranks: ``(results, records by benchmark)``.

    ``results`` (the same on every rank) holds ``benchmarks.<name>`` (:func:`summarize`) and
    ``accuracy``, the unweighted average; the records are gathered on rank 0 (empty elsewhere).
    ``problems`` (by benchmark name) saves reading the files again. ``lockstep`` gives every
    rank the same number of prompts (a short shard repeats its last one, whose extra records are
    dropped), so that ranks call ``generate`` equally often: ZeRO-3 needs every rank in every
    forward (with ``HFBackend(synced_gpus=True)``).
    """
    summaries: dict[str, dict[str, float]] = {}
    all_records: dict[str, list[Record]] = {}
    world = dist_utils.world_size()
    for benchmark in benchmarks:
        loaded = (problems or {}).get(benchmark.name) or benchmark.load()
        items = shard([(p.problem, p.gold) for p in loaded])
        padding = (-(-len(loaded) // world) - len(items)) if lockstep else 0
        mine = generate_and_judge(
            backend,
            tokenizer,
            items + [items[-1] if items else (loaded[0].problem, loaded[0].gold)] * padding,
            prompt=benchmark.prompt,
            verifier=benchmark.verifier,
            max_new_tokens=benchmark.max_new_tokens,
            temperature=benchmark.temperature,
            top_p=benchmark.top_p,
        )
        gathered = gather_in_order(mine[: len(items)])
        if gathered is not None:
            summaries[benchmark.name] = summarize(gathered)
            all_records[benchmark.name] = gathered
            log.info("%s: %s", benchmark.name, summaries[benchmark.name])
    summaries = dist_utils.broadcast_object(summaries)
    results: dict[str, Any] = {
        "benchmarks": summaries,
        "accuracy": average(summaries),
    }
    return results, all_records


class BenchmarkEvaluator:
    """Benchmark accuracy of a model in memory: training's evaluator (``engine.sources``).

    Built once from the ``benchmark`` config selection (the files are read here, so a bad file
    fails before training starts); :meth:`evaluate` generates with the model as it is now and
    returns flat metrics (logged as ``eval/<key>``; ``results.json`` nests them):
    ``accuracy`` (the average) and ``benchmarks/<name>/{accuracy, stderr, n, timeouts}``, the same
    on every rank. ``lockstep`` (ZeRO-3 on several ranks) keeps every rank in every forward.
    """

    def __init__(self, benchmark_cfg: Any, batch_size: int = 64, lockstep: bool = False) -> None:
        self.benchmarks = benchmarks_from_config(benchmark_cfg)
        self.problems = {b.name: b.load() for b in self.benchmarks}
        self.batch_size, self.lockstep = batch_size, lockstep

    def evaluate(self, model: Any, tokenizer: Any, device: Any) -> dict[str, float]:
        """Greedy (or as configured) accuracy on every benchmark, and their average."""
        backend = HFBackend(
            model, tokenizer, device, batch_size=self.batch_size, synced_gpus=self.lockstep
        )
        results, _ = evaluate_benchmarks(
            backend, tokenizer, self.benchmarks, problems=self.problems, lockstep=self.lockstep
        )
        metrics = {"accuracy": float(results["accuracy"])}
        for name, summary in results["benchmarks"].items():
            metrics |= {f"benchmarks/{name}/{key}": float(v) for key, v in summary.items()}
        return metrics


def benchmark_evaluators(cfg: DictConfig) -> list[BenchmarkEvaluator]:
    """Training's benchmark evaluator for ``cfg.benchmark`` (none when no benchmark is selected):
    ``generation.batch_size`` prompts per ``generate`` call, lockstep under ZeRO-3."""
    if not cfg.get("benchmark"):
        return []
    stage = int(OmegaConf.select(cfg, "deepspeed.zero_optimization.stage", default=0) or 0)
    batch_size = int(OmegaConf.select(cfg, "generation.batch_size", default=64) or 64)
    lockstep = stage == 3 and dist_utils.world_size() > 1
    return [BenchmarkEvaluator(cfg.benchmark, batch_size=batch_size, lockstep=lockstep)]


def average(summaries: dict[str, dict[str, float]]) -> float:
    """The unweighted mean accuracy over benchmarks (NaN for none)."""
    values = [s["accuracy"] for s in summaries.values()]
    return sum(values) / len(values) if values else float("nan")


def markdown_table(results: dict[str, Any], label: str = "model") -> str:
    """The paper's layout: one row, benchmarks as columns, Avg. last; accuracy in percent with
    the standard error and n below each."""
    names = list(results["benchmarks"])
    header = f"| {' | '.join([label, *names, 'Avg.'])} |"
    rule = f"|{'|'.join(['---'] * (len(names) + 2))}|"
    cells = [f"{100 * results['benchmarks'][n]['accuracy']:.1f}" for n in names]
    mean = f"{100 * results['accuracy']:.1f}"
    row = f"| {' | '.join(['accuracy (%)', *cells, mean])} |"
    spread = [
        f"{100 * results['benchmarks'][n]['stderr']:.1f} (n={results['benchmarks'][n]['n']})"
        for n in names
    ]
    stderr_row = f"| {' | '.join(['stderr (%)', *spread, ''])} |"
    return "\n".join([header, rule, row, stderr_row]) + "\n"


def write_outputs(
    run_dir: Path, results: dict[str, Any], records: dict[str, list[Record]], label: str
) -> None:
    """``results.json``, ``results.md`` and ``records/<name>.jsonl`` (atomic writes)."""
    atomic_write_json(run_dir / "results.json", results)
    atomic_write_text(run_dir / "results.md", markdown_table(results, label))
    for name, rows in records.items():
        write_jsonl(run_dir / "records" / f"{name}.jsonl", (asdict(r) for r in rows))


def resolve_output_dir(cfg: DictConfig, fallback: str) -> Path:
    """``cfg.output_dir``, else Hydra's run dir, else ``fallback`` (called outside Hydra): rank
    0's choice on every rank (a collective)."""
    run_dir = cfg.get("output_dir")
    if not run_dir:
        try:
            from hydra.core.hydra_config import HydraConfig

            run_dir = HydraConfig.get().runtime.output_dir
        except ValueError:  # called outside @hydra.main
            run_dir = fallback
    return Path(dist_utils.broadcast_object(str(Path(run_dir).resolve())))


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.model`` on ``cfg.benchmark``; returns (and on rank 0 writes) the results."""
    benchmarks = benchmarks_from_config(cfg.get("benchmark"))
    if not benchmarks:
        raise ValueError("no benchmarks selected: benchmark=[math500,...] (conf/benchmark/)")
    problems = {b.name: b.load() for b in benchmarks}  # a bad file fails before any model work
    init_if_launched()
    backend, tokenizer = load_backend(cfg.generation, cfg.model)
    results, records = evaluate_benchmarks(backend, tokenizer, benchmarks, problems=problems)
    results["model"] = cfg.model.get("name_or_path") or "tiny (random weights)"
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
