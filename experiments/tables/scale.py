"""The scale table: the BPO paper's second table (DPO -> BPO on four models) in miniature.

Rows: sizes of the tiny Llama, each trained from its own SFT model (the task caches one per
architecture); columns: parameters, the SFT starting accuracy (and whether it landed in the
task's accuracy band), DPO and BPO accuracy (mean ± std over seeds) and the gain BPO - DPO paired
by seed with its 95% t interval. The paper's four models follow, for reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from experiments.tables.collect import Cell, Run
from experiments.tables.formatting import (
    CELL_FIELDS,
    csv_cell,
    csv_gain,
    csv_number,
    csv_text,
    format_cell,
    format_gain,
    md_notes,
    md_table,
)
from experiments.tables.select import (
    METRIC,
    Size,
    cell,
    group,
    method_of,
    optimizer_of,
    sft_accuracy,
    size_of,
)
from experiments.tables.stats import PairedGain, paired_gain

__all__ = ["PAPER_SCALE", "ScaleRow", "ScaleTable", "build", "render_csv", "render_markdown"]

#: the paper's DPO -> BPO table (average accuracy %, single runs)
PAPER_SCALE = (
    ("Llama-3.1-8B-Instruct", 18.8, 28.9),
    ("Qwen2.5-Math-1.5B", 28.2, 38.3),
    ("Qwen2.5-Math-7B", 41.0, 46.7),
    ("Qwen2.5-Math-7B-Instruct", 42.8, 48.8),
)


@dataclass
class ScaleRow:
    """One model size: its parameters, SFT start, and the DPO and BPO cells with the gain."""

    size: Size
    parameters: int | None
    sft: float | None
    sft_in_band: bool | None
    dpo: Cell
    bpo: Cell
    gain: PairedGain


@dataclass
class ScaleTable:
    """The rows, smallest model first, and notes."""

    rows: list[ScaleRow]
    notes: list[str] = field(default_factory=list)


def parameter_count(run: Run) -> int | None:
    """Parameters of the run's tiny model, counted on a model built from its config."""
    from omegaconf import OmegaConf

    from engine.model.loading import load_model
    from engine.task.tokenizer import build_tokenizer

    model_cfg = run.config.get("model")
    if not isinstance(model_cfg, dict):
        return None
    cfg = OmegaConf.merge(OmegaConf.create(model_cfg), {"name_or_path": None, "dtype": "float32"})
    model = load_model(cfg, build_tokenizer(), seed=0)
    return sum(p.numel() for p in model.parameters())


def _in_band(runs: Sequence[Run]) -> bool | None:
    flags = [r.results["sft"].get("in_band") for r in runs if r.results and "sft" in r.results]
    flags = [f for f in flags if isinstance(f, bool)]
    return all(flags) if flags else None


def build(runs: Sequence[Run]) -> ScaleTable:
    """DPO and BPO (:func:`method_of`: also the ablation's logistic x difference and hinge x
    balanced at alpha 0.3 runs) with AdamW, grouped by the tiny model's size."""
    runs = [r for r in runs if optimizer_of(r) == "adamw" and method_of(r) in ("dpo", "bpo")]
    rows = []
    notes = []
    for size, size_runs in sorted(group(runs, size_of).items()):
        by_method = group(size_runs, method_of)
        dpo, bpo = cell(by_method.get("dpo", [])), cell(by_method.get("bpo", []))
        in_band = _in_band(size_runs)
        if in_band is False:
            notes.append(f"{size.label}: the SFT model did not land in the accuracy band")
        rows.append(
            ScaleRow(
                size=size,
                parameters=parameter_count(size_runs[0]),
                sft=sft_accuracy(size_runs),
                sft_in_band=in_band,
                dpo=dpo,
                bpo=bpo,
                gain=paired_gain(dpo.by_seed(), bpo.by_seed()),
            )
        )
    return ScaleTable(rows=rows, notes=notes)


def render_markdown(table: ScaleTable) -> str:
    """The scale table and the paper's, as Markdown."""
    out = ["# Scale: DPO -> BPO by model size, eval.accuracy (%)", ""]
    out += md_notes(table.notes)
    out += [
        "Each size starts from its own SFT model. Cells: mean ± sample std over seeds (n). "
        "Gain: BPO - DPO paired by seed, mean [95% t interval].",
        "",
    ]
    body = [
        [
            r.size.label,
            "-" if r.parameters is None else f"{r.parameters / 1e6:.2f}M",
            "-"
            if r.sft is None
            else f"{r.sft:.1f}" + ("" if r.sft_in_band is not False else " (out of band)"),
            format_cell(r.dpo, True),
            format_cell(r.bpo, True),
            format_gain(r.gain, True),
        ]
        for r in table.rows
    ]
    out += md_table(["model", "parameters", "SFT", "DPO", "BPO", "gain"], body)
    out += ["", "The paper (single runs, average accuracy over five math benchmarks):", ""]
    out += md_table(
        ["model", "DPO", "BPO", "gain"],
        ([m, f"{d:.1f}", f"{b:.1f}", f"{b - d:+.1f}"] for m, d, b in PAPER_SCALE),
    )
    return "\n".join(out) + "\n"


CSV_COLUMNS = (
    "hidden_size",
    "num_layers",
    "parameters",
    "sft",
    "sft_in_band",
    *(f"{m}_{k}" for m in ("dpo", "bpo") for k in CELL_FIELDS),
    "gain_mean",
    "gain_ci_low",
    "gain_ci_high",
    "n_paired",
)


def render_csv(table: ScaleTable) -> str:
    """One row per size; accuracies in percent, empty = undefined."""
    rows = []
    for r in table.rows:
        row = [r.size.hidden_size, r.size.num_layers, r.parameters or "", csv_number(r.sft)]
        row.append("" if r.sft_in_band is None else str(r.sft_in_band).lower())
        row += [*csv_cell(r.dpo), *csv_cell(r.bpo), *csv_gain(r.gain)]
        rows.append(row)
    return csv_text(CSV_COLUMNS, rows)


def plot(table: ScaleTable, out: Path) -> list[str]:
    """accuracy.png: DPO and BPO bars per size (mean, std error bars)."""
    from experiments.tables.plots import plot_accuracy

    if not table.rows:
        return []
    labels = [r.size.label for r in table.rows]
    summaries = {}
    for r in table.rows:
        summaries[(r.size.label, "DPO")] = r.dpo.summary
        summaries[(r.size.label, "BPO")] = r.bpo.summary
    plot_accuracy(summaries, labels, ["DPO", "BPO"], out / "accuracy.png", f"{METRIC} (%)")
    return ["accuracy.png"]
