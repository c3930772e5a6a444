"""The iterative table written out: Markdown (per-round accuracy, the paired gain against DPO,
each round's pairs and training, the cost per round), CSV (one row per method x round) and
rounds.png (accuracy and chosen reward against the round).
"""

from __future__ import annotations

import math
from pathlib import Path

from engine.runtime.fileio import atomic_open
from experiments.tables.formatting import (
    CELL_FIELDS,
    csv_cell,
    csv_gain,
    csv_number,
    csv_text,
    format_cell,
    format_gain,
    format_summary,
    gain_columns,
    md_notes,
    md_table,
)
from experiments.tables.iterative.table import BASELINE, COUNTS, PHASES, IterativeTable

__all__ = ["plot", "render_csv", "render_markdown"]


def render_markdown(table: IterativeTable) -> str:
    """The per-round accuracy, the per-round detail and what each phase cost, as Markdown."""
    out = ["# Iterative on-policy training: held-out accuracy (%) per round", ""]
    out += md_notes(table.notes)
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
        "chosen responses (below 0: DCR). Sample accuracy, pairs made, all-correct and all-wrong "
        "prompts: the round's sampling (k answers per prompt at its temperature) from the policy "
        "it started with, mean over seeds.",
        "",
    ]
    body = []
    for r in table.rows:
        for n in table.rounds:
            c = r.rounds[n]
            body.append(
                [
                    r.method,
                    str(n),
                    format_cell(c.accuracy, True),
                    format_summary(c.chosen_reward, 3, signed=True),
                    format_summary(c.sample_accuracy, 1, spread=False),
                    *(format_summary(c.counts[key], 0, spread=False) for key in COUNTS),
                ]
            )
    out += md_table(
        [
            "method",
            "round",
            "accuracy",
            "chosen reward",
            "sample accuracy (%)",
            "pairs made",
            "all correct",
            "all wrong",
        ],
        body,
    )
    out += ["", "## Cost: seconds per round (mean over seeds)", ""]
    body = [
        [
            r.method,
            str(n),
            *(format_summary(r.rounds[n].seconds[p], 0, spread=False) for p in PHASES),
        ]
        for r in table.rows
        for n in table.rounds
    ]
    out += md_table(["method", "round", *PHASES], body)
    return "\n".join(out) + "\n"


CSV_COLUMNS = (
    *("method", "objective", "round", "start", *CELL_FIELDS, *gain_columns("vs_dpo")),
    "chosen_reward_mean",
    "chosen_reward_std",
    "sample_accuracy_mean",
    "pairs_mean",
    "all_correct_mean",
    "all_wrong_mean",
    *(f"{p}_seconds_mean" for p in PHASES),
)


def render_csv(table: IterativeTable) -> str:
    """One row per method x round; accuracies in percent, empty = undefined."""
    start = csv_number(table.start.mean if table.start else None)
    rows = []
    for r in table.rows:
        for n in table.rounds:
            c = r.rounds[n]
            rows.append(
                [
                    *(r.method, r.objective, n, start, *csv_cell(c.accuracy), *csv_gain(c.vs_dpo)),
                    *(csv_number(c.chosen_reward.mean), csv_number(c.chosen_reward.std)),
                    csv_number(c.sample_accuracy.mean),
                    *(csv_number(c.counts[key].mean) for key in COUNTS),
                    *(csv_number(c.seconds[p].mean) for p in PHASES),
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
