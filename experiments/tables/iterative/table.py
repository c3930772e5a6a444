"""The iterative table's numbers: each method's pipelines, round by round, against DPO.

``+experiment=iterative``: from the embedded task's SFT model (round 0), each round samples k
answers for fresh prompts from the current policy, verifies and pairs them, trains one epoch with
the cell's method from that policy (the reference stays the SFT model) and evaluates greedy
held-out accuracy. One pipeline per method x seed; each leaves a ``results.json`` with its
``per_round`` rows (:func:`engine.rounds.cell_results`).

Rows: methods (DPO first, the chosen-NLL control last). Per round: held-out accuracy, mean ± sample
std over seeds; the paired difference against DPO in the same round (same seeds) with its 95% t
interval; the chosen reward at the end of the round's training (below 0: the chosen responses lost
likelihood against the reference, the DCR effect); the pairs the round's sampling made and its
all-correct / all-wrong prompts (mean over seeds: they measure the policy that sampled them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from experiments.tables.collect import Cell, Run, number
from experiments.tables.select import BASELINE, group, method_of, method_order
from experiments.tables.stats import PairedGain, Summary, paired_gain, summarize

__all__ = ["IterativeRow", "IterativeTable", "RoundCells", "build", "round_cell", "round_value"]

#: per-round numbers shown as means over seeds (besides the accuracy)
COUNTS = ("pairs", "all_correct_prompts", "all_wrong_prompts")
PHASES = ("sample", "train", "eval")


def round_value(run: Run, number_: int, key: str) -> float | None:
    """``key`` of round ``number_`` of a finished pipeline's ``per_round`` (None if absent)."""
    rows = (run.results or {}).get("per_round")
    if not isinstance(rows, list):
        return None
    for row in rows:
        if isinstance(row, dict) and row.get("round") == number_:
            return number(row.get(key))
    return None


def round_cell(
    runs: Sequence[Run], number_: int, key: str = "accuracy", scale: float = 100.0
) -> Cell:
    """The :class:`Cell` of ``key`` in round ``number_`` over ``runs``, one run per seed."""
    out, seen = Cell(), set()
    for run in sorted(runs, key=lambda r: str(r.path)):
        if run.seed is not None and run.seed in seen:
            continue
        seen.add(run.seed)
        if run.status == "failed":
            out.failed += 1
        elif run.status == "incomplete":
            out.incomplete += 1
        elif (v := round_value(run, number_, key)) is None:
            out.no_metric += 1
        else:
            out.values.append(v * scale)
            out.seeds.append(run.seed)
    return out


@dataclass
class RoundCells:
    """One method in one round."""

    accuracy: Cell
    vs_dpo: PairedGain
    chosen_reward: Summary
    sample_accuracy: Summary  # % of the round's samples that were correct: its starting policy
    counts: dict[str, Summary]  # pairs made, all-correct and all-wrong prompts
    seconds: dict[str, Summary]  # sample, train, eval


@dataclass
class IterativeRow:
    """One method over its seeds, round by round (1..R)."""

    method: str
    objective: str
    rounds: dict[int, RoundCells]


@dataclass
class IterativeTable:
    """The start (round 0), the rounds, the rows and notes."""

    start: Summary | None  # the SFT model's accuracy (%); std = its binomial stderr
    rounds: list[int]
    rows: list[IterativeRow]
    notes: list[str] = field(default_factory=list)


def _start(runs: Sequence[Run], notes: list[str]) -> Summary | None:
    values = {v for r in runs if (v := round_value(r, 0, "accuracy")) is not None}
    if not values:
        return None
    if len(values) > 1:
        notes.append(f"the pipelines disagree on round 0 ({sorted(values)}): different SFT models")
    first = next(r for r in runs if round_value(r, 0, "accuracy") is not None)
    stderr = round_value(first, 0, "stderr")
    n = round_value(first, 0, "n")
    return Summary(100.0 * min(values), 100.0 * (stderr or math.nan), int(n or 0))


def _summary(runs: Sequence[Run], number_: int, key: str, scale: float = 1.0) -> Summary:
    finished = [r for r in runs if r.status == "finished"]
    values = [v for r in finished if (v := round_value(r, number_, key)) is not None]
    return summarize([scale * v for v in values])


def _seconds(runs: Sequence[Run], number_: int, phase: str) -> Summary:
    values = []
    for run in runs:
        for row in (run.results or {}).get("per_round") or []:
            if isinstance(row, dict) and row.get("round") == number_:
                value = number((row.get("seconds") or {}).get(phase))
                if value is not None:
                    values.append(value)
    return summarize(values)


def build(runs: Sequence[Run]) -> IterativeTable:
    """Group the pipelines by method and compare each with DPO round by round, paired by seed."""
    notes: list[str] = []
    by_method = group(runs, method_of)
    rounds = sorted(
        {
            int(row["round"])
            for r in runs
            for row in (r.results or {}).get("per_round") or []
            if isinstance(row, dict) and isinstance(row.get("round"), int) and row["round"] > 0
        }
    )
    baseline = {n: round_cell(by_method.get(BASELINE, []), n).by_seed() for n in rounds}
    rows = []
    for name in method_order([str(n) for n in by_method]):
        method_runs = by_method[name]
        first = method_runs[0]
        cells = {}
        for n in rounds:
            accuracy = round_cell(method_runs, n)
            cells[n] = RoundCells(
                accuracy=accuracy,
                vs_dpo=paired_gain(baseline[n], accuracy.by_seed())
                if name != BASELINE
                else paired_gain({}, {}),
                chosen_reward=_summary(method_runs, n, "chosen_reward"),
                sample_accuracy=_summary(method_runs, n, "sample_accuracy", 100.0),
                counts={key: _summary(method_runs, n, key) for key in COUNTS},
                seconds={phase: _seconds(method_runs, n, phase) for phase in PHASES},
            )
        objective = f"{first.loss} x {first.margin}" if first.loss else "-"
        rows.append(IterativeRow(method=name, objective=objective, rounds=cells))
    return IterativeTable(start=_start(runs, notes), rounds=rounds, rows=rows, notes=notes)
