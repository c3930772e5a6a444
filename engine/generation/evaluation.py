"""Benchmark accuracy by generation, as a library: generate, verify, summarise, tabulate.

:func:`evaluate_benchmarks` runs every benchmark of a selection with a backend (batches dealt out
across ranks under a launcher, gathered on rank 0): ``results`` (``benchmarks.<name>`` =
``accuracy``, ``stderr`` (binomial, sqrt(p (1 - p) / n)), ``n``, ``timeouts``; ``accuracy``: the
unweighted average, as the paper's Avg.) and one :class:`Record` per problem.
:class:`BenchmarkEvaluator` is what training calls on its own model at every evaluation;
``python -m engine.evaluate`` is the command around :func:`evaluate_benchmarks` for a saved model.

Long evaluations are kept batch by batch (``records_dir``): rank 0 appends each generation batch's
records to ``<records_dir>/.parts/<name>.jsonl`` as it finishes, and writes
``<records_dir>/<name>.jsonl`` (one line per problem, file order) once the benchmark is done. A
stop signal (:mod:`engine.runtime.preemption`) is taken after a batch; evaluating into the same
directory again skips finished benchmarks and batches, so a stopped evaluation loses at most the
batches in flight (one per rank).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from engine.data.loading import write_jsonl
from engine.generation.backends import Backend, HFBackend, PromptFormat, complete
from engine.generation.benchmarks import Benchmark, Problem, benchmarks_from_config
from engine.generation.verifiers import VERIFIERS
from engine.runtime import distributed as dist_utils
from engine.runtime.distributed import gather_in_order
from engine.runtime.fileio import (
    append_log_entry,
    atomic_write_json,
    atomic_write_text,
    read_log,
)
from engine.runtime.preemption import stop_point

#: the work log of unfinished benchmarks, under ``records_dir``
PARTS = ".parts"

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
    backend: Backend | Callable[[], Backend],
    tokenizer: Any,
    benchmarks: Sequence[Benchmark],
    *,
    problems: dict[str, list[Problem]] | None = None,
    lockstep: bool = False,
    records_dir: Path | None = None,
    batch_size: int | None = None,
) -> tuple[dict[str, Any], dict[str, list[Record]]]:
    """Every benchmark, its batches dealt out across ranks: ``(results, records by benchmark)``.

    ``results`` (the same on every rank) holds ``benchmarks.<name>`` (:func:`summarize`) and
    ``accuracy``, the unweighted average; the records are gathered on rank 0 (empty elsewhere).
    ``backend`` may be a function that returns one (called only when a batch is left to generate).
    ``problems`` (by benchmark name) saves reading the files again. ``batch_size``: problems per
    generation batch (batch ``b`` goes to rank ``b % world``); None: one batch per rank.
    ``records_dir``: keep the work there and skip what an earlier call kept (module docstring).
    Every batch round (one batch per rank) ends at a stop point. ``lockstep`` pads every rank's
    batch of a round to ``batch_size`` prompts (a rank without one generates padding), so that
    ranks call ``generate`` equally often: ZeRO-3 needs every rank in every forward (with
    ``HFBackend(synced_gpus=True)``).
    """
    summaries: dict[str, dict[str, float]] = {}
    all_records: dict[str, list[Record]] = {}
    loaded_backend: list[Backend] = []

    def get_backend() -> Backend:
        if not loaded_backend:
            loaded_backend.append(backend() if callable(backend) else backend)
        return loaded_backend[0]

    for benchmark in benchmarks:
        loaded = (problems or {}).get(benchmark.name) or benchmark.load()
        records = _run_benchmark(
            benchmark, loaded, get_backend, tokenizer, lockstep, records_dir, batch_size
        )
        if records is not None:
            summaries[benchmark.name] = summarize(records)
            all_records[benchmark.name] = records
            log.info("%s: %s", benchmark.name, summaries[benchmark.name])
    summaries = dist_utils.broadcast_object(summaries)
    results: dict[str, Any] = {
        "benchmarks": summaries,
        "accuracy": average(summaries),
    }
    return results, all_records


def _run_benchmark(
    benchmark: Benchmark,
    loaded: list[Problem],
    get_backend: Callable[[], Backend],
    tokenizer: Any,
    lockstep: bool,
    records_dir: Path | None,
    batch_size: int | None,
) -> list[Record] | None:
    """One benchmark's records in file order on rank 0 (None elsewhere), batch by batch."""
    rank, world = dist_utils.rank(), dist_utils.world_size()
    items = [(p.problem, p.gold) for p in loaded]
    size = batch_size or max(1, -(-len(items) // world))
    batches = -(-len(items) // size)
    finished, kept = (
        _kept(benchmark.name, records_dir, size) if dist_utils.is_main() else (None, None)
    )
    if dist_utils.broadcast_object(finished is not None):  # finished earlier: not redone
        if dist_utils.is_main():
            log.info("%s: finished earlier (%s)", benchmark.name, records_dir)
        return finished
    done = dist_utils.broadcast_object(None if kept is None else sorted(kept))
    todo = [[b for b in range(r, batches, world) if b not in done] for r in range(world)]
    if done and dist_utils.is_main():
        log.info("%s: %d of %d batches kept by an earlier run", benchmark.name, len(done), batches)
    log_path = None if records_dir is None else records_dir / PARTS / f"{benchmark.name}.jsonl"
    rounds = max(len(mine) for mine in todo)
    for round_ in range(rounds):
        batch = todo[rank][round_] if round_ < len(todo[rank]) else None
        chunk = items[batch * size : (batch + 1) * size] if batch is not None else []
        padded = chunk
        if lockstep and items:  # every rank generates `size` prompts (the padding's records are
            # dropped): ZeRO-3 needs every rank in every forward
            padded = chunk + [chunk[-1] if chunk else items[0]] * (size - len(chunk))
        out = []
        if padded:
            out = generate_and_judge(
                get_backend(),
                tokenizer,
                padded,
                prompt=benchmark.prompt,
                verifier=benchmark.verifier,
                max_new_tokens=benchmark.max_new_tokens,
                temperature=benchmark.temperature,
                top_p=benchmark.top_p,
                seed=batch or 0,
            )[: len(chunk)]
        gathered = gather_in_order([(batch, out)])
        if gathered is not None and kept is not None:
            for index, records in gathered:
                if index is None:
                    continue
                kept[index] = records
                if log_path is not None:
                    entry = {"batch": index, "size": size, "records": list(map(asdict, records))}
                    append_log_entry(log_path, entry)
        stop_point(f"in evaluation after {benchmark.name} batch round {round_ + 1} of {rounds}")
    if kept is None:
        return None
    records = [r for b in range(batches) for r in kept[b]]
    if records_dir is not None:
        write_jsonl(records_dir / f"{benchmark.name}.jsonl", (asdict(r) for r in records))
        if log_path is not None:
            log_path.unlink(missing_ok=True)
    return records


def _kept(
    name: str, records_dir: Path | None, size: int
) -> tuple[list[Record] | None, dict[int, list[Record]]]:
    """What ``records_dir`` keeps of benchmark ``name`` (read on rank 0): ``(records, {})`` when
    it finished, else ``(None, {batch: records})`` for the batches of ``size`` problems found."""
    if records_dir is None:
        return None, {}
    final = records_dir / f"{name}.jsonl"
    if final.is_file():
        return [Record(**row) for row in read_log(final)], {}
    entries = read_log(records_dir / PARTS / f"{name}.jsonl")
    # a batch kept with another batch size holds other problems: not reused
    return None, {
        int(e["batch"]): [Record(**row) for row in e["records"]]
        for e in entries
        if e.get("size") == size
    }


class BenchmarkEvaluator:
    """Benchmark accuracy of a model in memory: training's evaluator (``engine.data.sources``).

    Built once from the ``benchmark`` config selection (the files are read here, so a bad file
    fails before training starts); :meth:`evaluate` generates with the model as it is now and
    returns flat metrics (logged as ``eval/<key>``; ``results.json`` nests them):
    ``accuracy`` (the average) and ``benchmarks/<name>/{accuracy, stderr, n, timeouts}``, the same
    on every rank. ``lockstep`` (ZeRO-3 on several ranks) keeps every rank in every forward.
    It keeps its records (:data:`keeps_records`): the loop gives each evaluation a directory of its
    own, where an evaluation redone after a stop finds the batches already generated.
    """

    #: evaluate() takes ``records=<directory>`` (the Evaluator protocol's optional capability)
    keeps_records = True

    def __init__(
        self,
        benchmark_cfg: Any,
        batch_size: int = 64,
        lockstep: bool = False,
        decoder: str = "auto",
    ) -> None:
        self.benchmarks = benchmarks_from_config(benchmark_cfg)
        self.problems = {b.name: b.load() for b in self.benchmarks}
        self.batch_size, self.lockstep, self.decoder = batch_size, lockstep, decoder

    def evaluate(
        self, model: Any, tokenizer: Any, device: Any, records: Path | None = None
    ) -> dict[str, float]:
        """Greedy (or as configured) accuracy on every benchmark, and their average; the
        records of each generation batch kept in ``records`` (see :func:`evaluate_benchmarks`)."""
        backend = HFBackend(
            model,
            tokenizer,
            device,
            batch_size=self.batch_size,
            synced_gpus=self.lockstep,
            decoder=self.decoder,
            progress="evaluation",
        )
        results, _ = evaluate_benchmarks(
            backend,
            tokenizer,
            self.benchmarks,
            problems=self.problems,
            lockstep=self.lockstep,
            records_dir=records,
            batch_size=self.batch_size,
        )
        metrics = {"accuracy": float(results["accuracy"])}
        for name, summary in results["benchmarks"].items():
            metrics |= {f"benchmarks/{name}/{key}": float(v) for key, v in summary.items()}
        return metrics


def benchmark_evaluators(
    cfg: DictConfig, world_size: int | None = None
) -> list[BenchmarkEvaluator]:
    """Training's benchmark evaluator for ``cfg.benchmark`` (none when no benchmark is selected):
    ``generation.batch_size`` prompts per ``generate`` call, ``generation.decoder``, lockstep
    under ZeRO-3 on several ranks (``world_size``: the launcher's, when the process group is not
    up yet)."""
    if not cfg.get("benchmark"):
        return []
    stage = int(OmegaConf.select(cfg, "deepspeed.zero_optimization.stage", default=0) or 0)
    batch_size = int(OmegaConf.select(cfg, "generation.batch_size", default=64) or 64)
    decoder = str(OmegaConf.select(cfg, "generation.decoder", default="auto") or "auto")
    world_size = dist_utils.world_size() if world_size is None else world_size
    lockstep = stage == 3 and world_size > 1
    return [
        BenchmarkEvaluator(cfg.benchmark, batch_size=batch_size, lockstep=lockstep, decoder=decoder)
    ]


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
