"""The real-model table: the BPO paper's pipeline on a pretrained instruction model.

``+experiment=real``: SmolLM2-135M-Instruct, its own greedy accuracy on held-out reasoning-gym
problems (the start), on-policy pairs sampled from it once (shared by every run), LoRA training
from it with DPO, BPO and the chosen-NLL control over seeds, greedy accuracy on the same held-out
problems at every evaluation. Rows: methods (DPO first, the control last). Cells: test accuracy,
mean ± sample std over seeds; its change from the start; the paired difference against DPO (same
seeds, same pairs) with its 95% t interval; the final eval chosen reward (below 0: the chosen
responses lost likelihood against the reference, the DCR effect) and the share of eval pairs whose
chosen reward is below 0. Below it: accuracy at every evaluated step (the convergence), the pairs,
and what each phase cost.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from experiments.tables.collect import Cell, Run
from experiments.tables.convergence import curve
from experiments.tables.formatting import (
    CELL_FIELDS,
    csv_cell,
    csv_gain,
    csv_number,
    csv_text,
    format_cell,
    format_gain,
    format_signed,
    format_summary,
    gain_columns,
    md_notes,
    md_table,
)
from experiments.tables.select import BASELINE, cell, group, method_of, method_order
from experiments.tables.stats import PairedGain, Summary, paired_gain, summarize

__all__ = [
    "RealRow",
    "RealTable",
    "build",
    "plot",
    "reference_free",
    "render_csv",
    "render_markdown",
]

METRIC = "eval.accuracy"


@dataclass
class RealRow:
    """One method over its seeds."""

    method: str
    objective: str
    cell: Cell
    vs_dpo: PairedGain
    chosen_reward: Summary  # final eval mean of beta log(pi/pi_ref) on the chosen responses
    chosen_below_zero: Summary  # final eval share of pairs with a chosen reward below 0
    by_step: dict[int, Summary]  # eval accuracy (%) at each evaluated step


@dataclass
class RealTable:
    """The start, the pairs' statistics, the rows and notes."""

    start: Summary | None  # the instruct model's test accuracy (%); std = its binomial stderr
    pairs: dict
    rows: list[RealRow]
    notes: list[str] = field(default_factory=list)


def _start(runs: Sequence[Run]) -> Summary | None:
    values = {v for r in runs if (v := r.value("start.accuracy")) is not None}
    if not values:
        return None
    first = next(r for r in runs if r.value("start.accuracy") is not None)
    stderr = first.value("start.stderr")
    n = first.value("start.n")
    return Summary(100.0 * min(values), 100.0 * (stderr or math.nan), int(n or 0))


def _by_step(runs: Sequence[Run]) -> dict[int, Summary]:
    values: dict[int, list[float]] = {}
    for run in runs:
        if run.status != "finished":
            continue
        for step, value in curve(run):
            values.setdefault(step, []).append(100.0 * value)
    return {step: summarize(v) for step, v in sorted(values.items())}


def reference_free(run: Run) -> bool:
    """Whether ``run``'s method scores without the reference (``method.reference_free``, e.g. the
    chosen-NLL control): its logged "reward" is ``beta log pi``, no log-ratio against the start."""
    method = run.config.get("method") or {}
    return bool(method.get("reference_free")) if isinstance(method, dict) else False


def build(runs: Sequence[Run]) -> RealTable:
    """Group the real sweep's runs by method and compare each with DPO, paired by seed."""
    notes = []
    starts = {v for r in runs if (v := r.value("start.accuracy")) is not None}
    if len(starts) > 1:
        notes.append(f"the runs disagree on the start ({sorted(starts)}): different pairs caches")
    by_method = group(runs, method_of)
    baseline = cell(by_method.get(BASELINE, []), METRIC).by_seed()
    rows = []
    for name in method_order([str(n) for n in by_method]):
        method_runs = by_method[name]
        c = cell(method_runs, METRIC)
        first = method_runs[0]
        finished = [r for r in method_runs if r.status == "finished"]
        if any(reference_free(r) for r in finished):  # its "reward" is beta log pi: no DCR
            notes.append(
                f"{name} is reference-free: its logged chosen reward is beta log pi, not a "
                "log-ratio against the start, so its chosen-reward cells are left empty"
            )
            finished = [r for r in finished if not reference_free(r)]
        rows.append(
            RealRow(
                method=name,
                objective=f"{first.loss} x {first.margin}" if first.loss else "-",
                cell=c,
                vs_dpo=paired_gain(baseline, c.by_seed())
                if name != BASELINE
                else paired_gain({}, {}),
                chosen_reward=summarize(
                    [v for r in finished if (v := r.value("eval.chosen_reward")) is not None]
                ),
                chosen_below_zero=summarize(
                    [
                        100.0 * v
                        for r in finished
                        if (v := r.value("eval.chosen_reward_below_zero")) is not None
                    ]
                ),
                by_step=_by_step(method_runs),
            )
        )
    pairs = next((r.results.get("pairs") for r in runs if r.results), None) or {}
    return RealTable(start=_start(runs), pairs=pairs, rows=rows, notes=notes)


def render_markdown(table: RealTable) -> str:
    """The table, the accuracy by step and the pairs, as Markdown."""
    out = ["# A real model: SmolLM2-135M-Instruct on reasoning-gym, test accuracy (%)", ""]
    out += md_notes(table.notes)
    start = table.start
    if start is not None:
        out += [
            f"Start (the instruct model itself, greedy): {start.mean:.1f} ± {start.std:.1f} "
            f"(binomial stderr, n={start.n} held-out problems).",
            "",
        ]
    out += [
        "Ours: mean ± sample std over seeds (n). vs start: mean change from the start. vs DPO: "
        "method - DPO paired by seed, mean [95% t interval]. Chosen reward: final eval mean of "
        "beta log(pi/pi_ref) on the chosen responses (below 0: DCR); chosen < 0: share of eval "
        "pairs whose chosen reward is below 0.",
        "",
    ]
    body = []
    for r in table.rows:
        s = r.cell.summary
        delta = s.mean - start.mean if start is not None and s.n else math.nan
        body.append(
            [
                r.method,
                r.objective,
                format_cell(r.cell, True),
                format_signed(delta, 1),
                "(baseline)" if r.method == BASELINE else format_gain(r.vs_dpo, True),
                format_signed(r.chosen_reward.mean, 3),  # nan (-) without values
                format_summary(r.chosen_below_zero, 0),
            ]
        )
    out += md_table(
        [
            "method",
            "loss x margin",
            "accuracy",
            "vs start",
            "vs DPO",
            "chosen reward",
            "chosen < 0",
        ],
        body,
    )
    steps = sorted({s for r in table.rows for s in r.by_step})
    if steps:
        out += [
            "",
            "## Convergence: test accuracy (%) at each evaluated step",
            "",
            "Mean ± sample std over seeds; step 0 is the start.",
            "",
        ]
        rows = [
            [r.method, "-" if start is None else f"{start.mean:.1f}"]
            + [format_summary(r.by_step[s], 1) if s in r.by_step else "-" for s in steps]
            for r in table.rows
        ]
        out += md_table(["method", "0", *map(str, steps)], rows)
    if table.pairs:
        out += ["", "## Pairs (sampled once from the instruct model, shared by every run)", ""]
        body = []
        for split, p in table.pairs.items():
            body.append(
                [
                    split,
                    str(p.get("prompts", "-")),
                    str(p.get("samples", "-")),
                    f"{100 * p.get('sample_accuracy', math.nan):.1f}",
                    str(p.get("pairs", "-")),
                    str(p.get("all_correct_prompts", "-")),
                    str(p.get("all_wrong_prompts", "-")),
                    f"{p.get('seconds', math.nan):.0f}",
                ]
            )
        out += md_table(
            [
                "split",
                "prompts",
                "samples",
                "sample accuracy (%)",
                "pairs",
                "all correct",
                "all wrong",
                "seconds",
            ],
            body,
        )
    return "\n".join(out) + "\n"


CSV_COLUMNS = (
    *("method", "objective", "start", *CELL_FIELDS, *gain_columns("vs_dpo")),
    *("chosen_reward_mean", "chosen_reward_std", "chosen_below_zero_mean"),
)


def render_csv(table: RealTable) -> str:
    """One row per method; accuracies in percent, empty = undefined."""
    start = csv_number(table.start.mean if table.start else None)
    rows = [
        [
            *(r.method, r.objective, start, *csv_cell(r.cell), *csv_gain(r.vs_dpo)),
            *(csv_number(r.chosen_reward.mean), csv_number(r.chosen_reward.std)),
            csv_number(r.chosen_below_zero.mean),
        ]
        for r in table.rows
    ]
    return csv_text(CSV_COLUMNS, rows)


def plot(table: RealTable, cells: dict[str, list[Run]], out: Path) -> list[str]:
    """accuracy.png (bars per method, the start as a line) and convergence.png (test accuracy and
    eval chosen reward against step, the start and 0 as lines)."""
    from experiments.tables.plots import plot_accuracy, plot_curves

    rows = [r for r in table.rows if r.cell.summary.n]
    if not rows:
        return []
    start = table.start.mean if table.start else None
    plot_accuracy(
        {(r.method, "accuracy"): r.cell.summary for r in rows},
        [r.method for r in rows],
        ["accuracy"],
        out / "accuracy.png",
        ylabel="test accuracy (%)",
        reference=start,
        reference_label="start",
    )

    def points(run: Run) -> list[dict]:
        accuracy = dict(curve(run))
        chosen = {} if reference_free(run) else dict(curve(run, "eval/chosen_reward"))
        return [
            {"step": s, "accuracy": 100.0 * accuracy[s] if s in accuracy else None}
            | {"chosen_reward": chosen.get(s)}
            for s in sorted(set(accuracy) | set(chosen))
        ]

    data = {k: [points(r) for r in runs if r.status == "finished"] for k, runs in cells.items()}
    plot_curves(
        data,
        [("accuracy", "test accuracy (%)", start), ("chosen_reward", "eval chosen reward", 0.0)],
        out / "convergence.png",
        title="test accuracy and chosen reward against step (dashed: the start, and 0)",
    )
    return ["accuracy.png", "convergence.png"]
