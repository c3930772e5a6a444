"""Benchmark accuracy by generation, as a library: generate, verify, summarise, tabulate.

:func:`evaluate_benchmarks` runs every benchmark of a selection with a backend (sharded across
ranks under a launcher, gathered on rank 0): ``results`` (``benchmarks.<name>`` = ``accuracy``,
``stderr`` (binomial, sqrt(p (1 - p) / n)), ``n``, ``timeouts``; ``accuracy``: the unweighted
average, as the paper's Avg.) and one :class:`Record` per problem. :class:`BenchmarkEvaluator` is
what training calls on its own model at every evaluation; ``python -m engine.evaluate`` is the
command around :func:`evaluate_benchmarks` for a saved model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from engine.data.loading import write_jsonl
from engine.generation.backends import Backend, HFBackend, PromptFormat, complete
from engine.generation.benchmarks import Benchmark, Problem, benchmarks_from_config
from engine.generation.verifiers import VERIFIERS
from engine.runtime import distributed as dist_utils
from engine.runtime.distributed import gather_in_order, shard
from engine.runtime.fileio import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Record:
    """One problem's outcome."""

    prompt: str
    completion: str
    extracted: str | None
    gold: str
    correct: bool
    timed_out: bool
    score: float | None = None  # the verifier's graded score, when it has one (reasoning_gym)


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
            Record(
                r.text,
                completion,
                verdict.extracted,
                gold,
                verdict.correct,
                verdict.timed_out,
                verdict.score,
            )
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
    """Benchmark accuracy of a model in memory: training's evaluator (``engine.data.sources``).

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


def merge_benchmark_evaluators(evaluators: Sequence[Any]) -> list[Any]:
    """``evaluators`` with every :class:`BenchmarkEvaluator` merged into one (the first's settings),
    so that a data source's benchmark (``data=reasoning_gym``'s test problems) and the ones a user
    selects (``benchmark=[...]``) share one ``accuracy``, their average, as in ``engine.evaluate``.
    A benchmark named twice is an error."""
    benchmarks = [e for e in evaluators if isinstance(e, BenchmarkEvaluator)]
    if len(benchmarks) < 2:
        return list(evaluators)
    merged = benchmarks[0]
    for other in benchmarks[1:]:
        for benchmark in other.benchmarks:
            if benchmark.name in merged.problems:
                raise ValueError(
                    f"benchmark {benchmark.name} is evaluated twice (the data source evaluates "
                    f"it already); drop it from benchmark=[...]"
                )
            merged.benchmarks.append(benchmark)
            merged.problems[benchmark.name] = other.problems[benchmark.name]
    return [e for e in evaluators if not isinstance(e, BenchmarkEvaluator)] + [merged]


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
