"""The paper's pairs for any model: ``python -m engine.sample_pairs [hydra overrides]``.

    python -m engine.sample_pairs model=hf model.name_or_path=Qwen/Qwen2.5-Math-7B \\
        prompts.path=questions.jsonl samples_per_prompt=8 temperature=1.0 output_dir=pairs/

Reads a prompts file with gold answers (the keys of a benchmark,
:mod:`engine.generation.benchmarks`), samples ``samples_per_prompt`` completions per prompt at
``temperature`` from the model, verifies each and pairs a correct one (chosen) with a wrong one
(rejected) by the rule in :mod:`engine.generation.pairing`. Writes, in ``output_dir``:

- ``pairs.jsonl``: the preference file (``data=files data.train=<output_dir>/pairs.jsonl``);
- ``report.json``: prompts, samples, sample accuracy, pairs made, prompts all-correct / all-wrong,
  verification timeouts;
- ``parts/``: the work log that makes a rerun cheap (below).

Work is cut into batches of ``batch_prompts`` prompts; batch b is sampled with its own seed
(derived from ``seed`` and b) and, under ``torchrun``, by rank ``b % world_size``. So the pairs do
not depend on the number of ranks or on interruptions. Each finished batch is appended (and
fsynced) to ``parts/rank-<r>.jsonl``; a rerun with the same settings skips the batches found there,
so a killed run loses at most the batches in flight. A stop signal (SIGTERM, SIGUSR1, submitit's:
:mod:`engine.runtime.preemption`) is taken after a round of batches (one per rank): every rank
exits with the requeue status 75 and the rerun of the same command goes on from there.
``parts/run.json`` records the settings; a rerun into the same directory with different ones is
refused. ``pairs.jsonl`` and ``report.json`` are written atomically by rank 0 once every batch is
done, then ``done/complete.json`` (:mod:`engine.runtime.phases`).
"""

# ruff: noqa: E402

from __future__ import annotations

from engine.runtime.preemption import watch_from_start

watch_from_start(__name__)  # python -m engine.sample_pairs: stop signals are recorded from here on

# the imports below take seconds: after the line above (hence the file's E402 exemption)
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

import engine.task  # noqa: F401  (registers the embedded task's verifier)
from engine.data.loading import write_jsonl
from engine.generation.backends import load_backend
from engine.generation.benchmarks import Benchmark
from engine.generation.pairing import PairCounts, build_pairs
from engine.runtime import distributed as dist_utils
from engine.runtime import phases
from engine.runtime.fileio import append_log_entry, atomic_write_json, read_log
from engine.runtime.launch import hydra_entry, init_if_launched, resolve_output_dir
from engine.runtime.preemption import run_or_requeue, stop_point, stop_signals_watched
from engine.runtime.progress import Progress

log = logging.getLogger("engine.sample_pairs")

_DECODING_KEYS = ("max_new_tokens", "temperature", "top_p")


def batch_seed(seed: int, batch: int) -> int:
    """The sampling seed of batch ``batch``: a hash of both, so batches draw independently."""
    return int(hashlib.sha256(f"{seed}:{batch}".encode()).hexdigest()[:15], 16)


def _settings(cfg: DictConfig) -> dict[str, Any]:
    """What the pairs depend on (a rerun into the same directory must match)."""
    return {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "prompts": OmegaConf.to_container(cfg.prompts, resolve=True),
        **{
            key: OmegaConf.to_container(cfg, resolve=True)[key]
            for key in ("samples_per_prompt", "temperature", "top_p", "max_new_tokens", "seed")
        },
        "batch_prompts": int(cfg.batch_prompts),
    }


def _check(cfg: DictConfig) -> Benchmark:
    k = int(cfg.samples_per_prompt)
    if k < 2:
        raise ValueError(
            f"samples_per_prompt={k}: needs >= 2 (a pair needs a correct and a wrong sample)"
        )
    if float(cfg.temperature) <= 0:
        raise ValueError(f"temperature={cfg.temperature}: sampling needs temperature > 0")
    if int(cfg.batch_prompts) < 1:
        raise ValueError(f"batch_prompts={cfg.batch_prompts}: needs >= 1")
    prompts = OmegaConf.to_container(cfg.prompts, resolve=True)
    misplaced = [key for key in _DECODING_KEYS if key in prompts]
    if misplaced:
        raise ValueError(f"prompts.{misplaced[0]}: set {misplaced[0]}=... at the top level")
    return Benchmark.from_config("prompts", prompts)


def read_parts(parts: Path) -> dict[int, dict[str, Any]]:
    """Finished batches in ``parts/rank-*.jsonl``: batch index -> ``{rows, counts}``.

    A last line without its newline (the process died while writing it) is ignored; any other
    unreadable line is an error naming the file and line.
    """
    done: dict[int, dict[str, Any]] = {}
    for path in sorted(parts.glob("rank-*.jsonl")):
        for number, entry in enumerate(read_log(path, what="batch"), start=1):
            try:
                done[int(entry["batch"])] = entry
            except (KeyError, TypeError, ValueError) as error:
                raise ValueError(
                    f"{path}: entry {number}: not a finished batch ({error})"
                ) from None
    return done


def sample_pairs(cfg: DictConfig) -> dict[str, Any]:
    """Sample, verify and pair (module docstring); returns the report (every rank). Stop signals
    are watched meanwhile: a stop raises :class:`engine.runtime.preemption.Preempted` after the
    batches in hand are kept."""
    with stop_signals_watched():
        return _sample_pairs(cfg)


def _sample_pairs(cfg: DictConfig) -> dict[str, Any]:
    spec = _check(cfg)
    problems = spec.load()
    stop_point("during startup, after reading the prompts")
    init_if_launched()
    rank, world = dist_utils.rank(), dist_utils.world_size()
    run_dir = resolve_output_dir(cfg, "outputs/sample_pairs")
    parts = run_dir / "parts"
    settings = _settings(cfg)
    if dist_utils.is_main():
        parts.mkdir(parents=True, exist_ok=True)
        recorded = parts / "run.json"
        if recorded.is_file() and json.loads(recorded.read_text()) != settings:
            raise ValueError(
                f"{run_dir} holds batches sampled with other settings ({recorded}); "
                "use another output_dir or delete it"
            )
        atomic_write_json(recorded, settings)
    dist_utils.barrier()

    size = int(cfg.batch_prompts)
    batches = range((len(problems) + size - 1) // size)
    done = read_parts(parts)
    todo = [[b for b in batches if b % world == r and b not in done] for r in range(world)]
    rounds = max(len(batches_of_rank) for batches_of_rank in todo)  # the same on every rank
    mine, loaded = todo[rank], None
    if mine:
        log.info("rank %d: %d batches to sample (%d found done)", rank, len(mine), len(done))
    # a line per batch: prompts done, rate, ETA (terminal and log file)
    progress = Progress(
        f"[sample_pairs] rank {rank}",
        sum(len(problems[b * size : (b + 1) * size]) for b in mine),
        "prompts",
        every=0.0,
        logger=log,
    )
    made = 0
    for round_ in range(rounds):
        if round_ < len(mine):
            b = mine[round_]
            loaded = loaded or load_backend(cfg.generation, cfg.model)
            backend, tokenizer = loaded
            chunk = problems[b * size : (b + 1) * size]
            rows, counts = build_pairs(
                backend,
                tokenizer,
                [(p.problem, p.gold) for p in chunk],
                prompt=spec.prompt,
                verifier=spec.verifier,
                samples_per_prompt=int(cfg.samples_per_prompt),
                temperature=float(cfg.temperature),
                top_p=float(cfg.top_p),
                max_new_tokens=int(cfg.max_new_tokens),
                seed=batch_seed(int(cfg.seed), b),
            )
            entry = {"batch": b, "rows": rows, "counts": counts.to_dict()}
            append_log_entry(parts / f"rank-{rank}.jsonl", entry)  # kept once this returns
            made += counts.pairs
            progress.set_postfix(batch=f"{b + 1}/{len(batches)}", pairs=made)
            progress.update(len(chunk))
        stop_point(f"in sampling after batch round {round_ + 1} of {rounds}")
    if mine:
        progress.close()
    dist_utils.barrier()

    report: dict[str, Any] = {}
    if dist_utils.is_main():
        done = read_parts(parts)
        missing = [b for b in batches if b not in done]
        if missing:
            raise RuntimeError(f"{parts}: batches {missing[:5]} are missing after sampling")
        total = PairCounts()
        for b in batches:
            counts = dict(done[b]["counts"])
            counts.pop("sample_accuracy")
            total = total + PairCounts(**counts)
        write_jsonl(run_dir / "pairs.jsonl", (row for b in batches for row in done[b]["rows"]))
        stats = total.to_dict()
        report = {
            "prompts": stats["prompts"],
            "samples": stats["samples"],
            "sample_accuracy": stats["sample_accuracy"],
            "pairs": stats["pairs"],
            "all_correct_prompts": stats["all_correct_prompts"],
            "all_wrong_prompts": stats["all_wrong_prompts"],
            "verification_timeouts": stats["timeouts"],
            "pairs_file": str(run_dir / "pairs.jsonl"),
            "settings": settings,
        }
        atomic_write_json(run_dir / "report.json", report)
        phases.mark_done(run_dir, phases.COMPLETE, pairs=report["pairs"])
        print(
            f"[sample_pairs] {report['pairs']} pairs from {report['prompts']} prompts "
            f"(sample accuracy {report['sample_accuracy']:.3f}, all correct "
            f"{report['all_correct_prompts']}, all wrong {report['all_wrong_prompts']}): "
            f"{report['pairs_file']}",
            flush=True,
        )
    dist_utils.barrier()
    return dist_utils.broadcast_object(report)


def main(cfg: DictConfig) -> dict[str, Any]:
    """The command: :func:`sample_pairs`, whose stop exits with the requeue status."""
    return run_or_requeue(sample_pairs, cfg)


if __name__ == "__main__":
    hydra_entry("sample_pairs", main)
