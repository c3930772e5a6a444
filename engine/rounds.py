"""What ``engine.iterate`` records of its rounds: each round's ``round.json`` (written last: the
round is done), ``rounds.jsonl`` and ``rounds.md`` (the per-round table), and the pipeline's
``results.json`` (the cell a table reads: :func:`cell_results`). Rank 0 writes, atomically;
costs a few small JSON files per round.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from engine.data.loading import write_jsonl
from engine.runtime import distributed as dist_utils
from engine.runtime.fileio import atomic_write_json, atomic_write_text

log = logging.getLogger("engine.iterate")

ROUND_FILE = "round.json"


def eval_summary(results: dict[str, Any]) -> dict[str, Any]:
    benchmarks = results["benchmarks"]
    n = sum(int(b["n"]) for b in benchmarks.values())
    stderr = benchmarks[next(iter(benchmarks))]["stderr"] if len(benchmarks) == 1 else None
    return {"accuracy": results["accuracy"], "stderr": stderr, "n": n, "benchmarks": benchmarks}


def read_round(round_dir: Path) -> dict[str, Any] | None:
    """A finished round's summary (rank 0's view on every rank), or None."""
    path = round_dir / ROUND_FILE
    found = json.loads(path.read_text()) if dist_utils.is_main() and path.is_file() else None
    return dist_utils.broadcast_object(found)


def write_round(round_dir: Path, done: dict[str, Any]) -> None:
    if dist_utils.is_main():
        atomic_write_json(round_dir / ROUND_FILE, done)
    dist_utils.barrier()


def write_table(root: Path, rows: list[dict[str, Any]]) -> None:
    """``rounds.jsonl`` and ``rounds.md`` from the finished rounds (rank 0)."""
    if not dist_utils.is_main():
        return
    write_jsonl(root / "rounds.jsonl", rows)
    atomic_write_text(root / "rounds.md", rounds_table(rows))
    log.info("rounds so far:\n%s", rounds_table(rows))


def rounds_table(rows: list[dict[str, Any]]) -> str:
    """The per-round table: accuracy (percent, with its binomial standard error), the chosen
    reward at the end of training, pairs made and the prompts that made none."""
    lines = [
        "| round | accuracy (%) | chosen reward | pairs | all correct | all wrong |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        ev = row["eval"]
        accuracy = f"{100 * ev['accuracy']:.1f}"
        if ev.get("stderr") is not None:
            accuracy += f" +- {100 * ev['stderr']:.1f}"
        pairs = row.get("pairs") or {}
        chosen = (row.get("train") or {}).get("chosen_reward")
        cells = [
            str(row["round"]),
            accuracy,
            "-" if chosen is None else f"{chosen:+.3f}",
            str(pairs.get("pairs", "-")),
            str(pairs.get("all_correct_prompts", "-")),
            str(pairs.get("all_wrong_prompts", "-")),
        ]
        lines.append(f"| {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def cell_results(
    cfg: DictConfig, rows: list[dict[str, Any]], seconds: float | None = None
) -> dict[str, Any]:
    """The pipeline's ``results.json``, what a table reads of one cell: the objective's keys as
    ``engine.train`` writes them (``loss``, ``margin``, ``method``, ``beta``, ``alpha``,
    ``seed``), ``eval`` (the last round's accuracy, stderr, n), ``start`` (round 0's),
    ``per_round`` (round, accuracy, stderr, the chosen and rejected reward and reward accuracy
    at the end of its training, pairs made, all-correct / all-wrong prompts, sample accuracy,
    seconds by phase), ``iterate`` (the pipeline's keys) and ``config`` (resolved).
    ``wall_seconds``: this process's time (a rerun that continued counts only its own);
    ``rounds_seconds``: every phase's seconds summed over the rounds, however many runs did them.
    """

    def summary(row: dict[str, Any]) -> dict[str, Any]:
        ev = row["eval"]
        return {"accuracy": ev["accuracy"], "stderr": ev.get("stderr"), "n": ev.get("n")}

    per_round = []
    for row in rows:
        pairs, train = row.get("pairs") or {}, row.get("train") or {}
        per_round.append(
            {"round": row["round"]}
            | summary(row)
            | {
                key: train.get(key)
                for key in ("chosen_reward", "rejected_reward", "reward_accuracy")
            }
            | {
                key: pairs.get(key)
                for key in ("pairs", "all_correct_prompts", "all_wrong_prompts", "sample_accuracy")
            }
            | {"seconds": row.get("seconds", {})}
        )
    config = OmegaConf.to_container(cfg, resolve=True)
    return {
        "kind": "iterate",
        "loss": cfg.loss.name,
        "margin": cfg.margin.name,
        "method": cfg.method.get("name"),
        "beta": float(cfg.beta),
        "alpha": float(cfg.margin.alpha),
        "seed": int(cfg.seed),
        "rounds": int(cfg.iterate.rounds),
        "start": summary(rows[0]),
        "eval": summary(rows[-1]),
        "per_round": per_round,
        "wall_seconds": None if seconds is None else round(seconds, 1),
        "rounds_seconds": round(
            sum(float(v) for row in rows for v in (row.get("seconds") or {}).values()), 1
        ),
        "iterate": config.get("iterate"),
        "config": config,
    }
