"""The iterative table: rounds of on-policy pairs -> training -> evaluation (``engine.iterate``).

``+experiment=iterative``: from the embedded task's SFT model (round 0), each round samples k
answers for fresh prompts from the current policy, verifies and pairs them, trains one epoch with
the cell's method from that policy (the reference stays the SFT model) and evaluates greedy
held-out accuracy. One pipeline per method x seed; each leaves a ``results.json`` with its
``per_round`` rows (:func:`engine.iterate.cell_results`).

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
from pathlib import Path

from engine.runtime.fileio import atomic_open
from experiments.tables.collect import Cell, Run, number
from experiments.tables.formatting import csv_number as num
from experiments.tables.formatting import csv_text, format_cell, format_gain, md_table
from experiments.tables.select import group, method_of
from experiments.tables.stats import PairedGain, Summary, paired_gain, summarize

__all__ = ["IterativeRow", "IterativeTable", "build", "plot", "render_csv", "render_markdown"]

BASELINE, CONTROL = "dpo", "chosen_nll"
ORDER = ("dpo", "slic", "bpo")  # the difference margin first, then the balanced one
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


def _order(names: Sequence[str]) -> list[str]:
    known = [n for n in ORDER if n in names]
    rest = sorted(n for n in names if n not in ORDER and n != CONTROL)
    return known + rest + ([CONTROL] if CONTROL in names else [])


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


def _summary(runs: Sequence[Run], number_: int, key: str) -> Summary:
    finished = [r for r in runs if r.status == "finished"]
    return summarize([v for r in finished if (v := round_value(r, number_, key)) is not None])


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
    for name in _order([str(n) for n in by_method]):
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
                counts={key: _summary(method_runs, n, key) for key in COUNTS},
                seconds={phase: _seconds(method_runs, n, phase) for phase in PHASES},
            )
        objective = f"{first.loss} x {first.margin}" if first.loss else "-"
        rows.append(IterativeRow(method=name, objective=objective, rounds=cells))
    return IterativeTable(start=_start(runs, notes), rounds=rounds, rows=rows, notes=notes)


def _mean(s: Summary, digits: int = 0, signed: bool = False) -> str:
    if not s.n:
        return "-"
    return f"{s.mean:+.{digits}f}" if signed else f"{s.mean:.{digits}f}"


def render_markdown(table: IterativeTable) -> str:
    """The per-round accuracy, the per-round detail and what each phase cost, as Markdown."""
    out = ["# Iterative on-policy training: held-out accuracy (%) per round", ""]
    out += [f"> Note: {n}" for n in table.notes] + ([""] if table.notes else [])
    if table.start is not None:
        s = table.start
        out += [
            f"Round 0 (the SFT model, greedy): {s.mean:.1f} ± {s.std:.1f} (binomial stderr, "
            f"n={s.n} held-out problems).",
            "",
        ]
    out += [
        "Mean ± sample std over seeds (n). Every round samples fresh prompts from the policy the "
        "previous round trained; the reference is the SFT model throughout.",
        "",
    ]
    start = "-" if table.start is None else f"{table.start.mean:.1f}"
    body = [
        [r.method, r.objective, start]
        + [format_cell(r.rounds[n].accuracy, True) for n in table.rounds]
        for r in table.rows
    ]
    out += md_table(
        ["method", "loss x margin", "round 0", *(f"round {n}" for n in table.rounds)], body
    )
    out += [
        "",
        "## Against DPO, round by round",
        "",
        "vs DPO: method - DPO in the same round, paired by seed, mean [95% t interval].",
        "",
    ]
    body = [
        [r.method]
        + [
            "(baseline)" if r.method == BASELINE else format_gain(r.rounds[n].vs_dpo, True)
            for n in table.rounds
        ]
        for r in table.rows
    ]
    out += md_table(["method", *(f"round {n}" for n in table.rounds)], body)
    out += [
        "",
        "## Each round's pairs and training",
        "",
        "Chosen reward: the last logged training window's mean of beta log(pi/pi_ref) on the "
        "chosen responses (below 0: DCR). Pairs made, all-correct and all-wrong prompts: the "
        "round's sampling from the policy it started with, mean over seeds.",
        "",
    ]
    body = []
    for r in table.rows:
        for n in table.rounds:
            c = r.rounds[n]
            reward = c.chosen_reward
            body.append(
                [
                    r.method,
                    str(n),
                    format_cell(c.accuracy, True),
                    "-"
                    if not reward.n
                    else f"{reward.mean:+.3f}"
                    + ("" if math.isnan(reward.std) else f" ± {reward.std:.3f}"),
                    *(_mean(c.counts[key]) for key in COUNTS),
                ]
            )
    out += md_table(
        [
            "method",
            "round",
            "accuracy",
            "chosen reward",
            "pairs made",
            "all correct",
            "all wrong",
        ],
        body,
    )
    out += ["", "## Cost: seconds per round (mean over seeds)", ""]
    body = [
        [r.method, str(n), *(_mean(r.rounds[n].seconds[p]) for p in PHASES)]
        for r in table.rows
        for n in table.rounds
    ]
    out += md_table(["method", "round", *PHASES], body)
    return "\n".join(out) + "\n"


CSV_COLUMNS = (
    "method",
    "objective",
    "round",
    "start",
    "mean",
    "std",
    "n",
    "failed",
    "vs_dpo_mean",
    "vs_dpo_ci_low",
    "vs_dpo_ci_high",
    "vs_dpo_n",
    "chosen_reward_mean",
    "chosen_reward_std",
    "pairs_mean",
    "all_correct_mean",
    "all_wrong_mean",
    *(f"{p}_seconds_mean" for p in PHASES),
)


def render_csv(table: IterativeTable) -> str:
    """One row per method x round; accuracies in percent, empty = undefined."""
    rows = []
    for r in table.rows:
        for n in table.rounds:
            c = r.rounds[n]
            s, g = c.accuracy.summary, c.vs_dpo
            rows.append(
                [
                    r.method,
                    r.objective,
                    n,
                    num(table.start.mean if table.start else None),
                    num(s.mean),
                    num(s.std),
                    s.n,
                    c.accuracy.failed,
                    num(g.mean),
                    num(g.ci_low),
                    num(g.ci_high),
                    g.n,
                    num(c.chosen_reward.mean),
                    num(c.chosen_reward.std),
                    *(num(c.counts[key].mean) for key in COUNTS),
                    *(num(c.seconds[p].mean) for p in PHASES),
                ]
            )
    return csv_text(CSV_COLUMNS, rows)


def plot(table: IterativeTable, out: Path) -> list[str]:
    """rounds.png: held-out accuracy (round 0 = the SFT model) and the chosen reward against the
    round, one line per method (mean ± std over seeds)."""
    from experiments.tables.plots import plt  # the Agg backend, set there

    if not table.rows or not table.rounds:
        return []
    fig, (left, right) = plt.subplots(1, 2, figsize=(10.0, 3.8))
    for r in table.rows:
        xs, ys, errs = [], [], []
        if table.start is not None:
            xs, ys, errs = [0], [table.start.mean], [0.0]
        for n in table.rounds:
            s = r.rounds[n].accuracy.summary
            if s.n:
                xs.append(n)
                ys.append(s.mean)
                errs.append(0.0 if math.isnan(s.std) else s.std)
        left.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=r.method)
        points = [(n, r.rounds[n].chosen_reward) for n in table.rounds]
        points = [(n, s) for n, s in points if s.n]
        right.errorbar(
            [n for n, _ in points],
            [s.mean for _, s in points],
            yerr=[0.0 if math.isnan(s.std) else s.std for _, s in points],
            marker="o",
            capsize=3,
            label=r.method,
        )
    right.axhline(0.0, color="black", linestyle="--", linewidth=0.9)
    for ax, label in ((left, "held-out accuracy (%)"), (right, "chosen reward (end of round)")):
        ax.set_xlabel("round")
        ax.set_ylabel(label)
        ax.set_xticks([0, *table.rounds] if ax is left else table.rounds)
    left.legend(fontsize=8)
    fig.suptitle("iterative on-policy rounds (mean ± std over seeds)", fontsize=10)
    fig.tight_layout()
    try:
        with atomic_open(out / "rounds.png", "wb") as handle:
            fig.savefig(handle, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    return ["rounds.png"]
