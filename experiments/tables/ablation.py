"""Turn a Hydra multirun sweep directory into the BPO paper's ablation table and plots.

    python -m engine.train -m loss=logistic,hinge,squared,exponential,truncated_quadratic,savage \\
        margin=difference,balanced seed=1,2,3
    python -m experiments.tables.ablation multirun/<date>/<time> [--out DIR] [--metric
    eval.accuracy]
        [--alpha 0.3] [--beta 0.1]

Writes to `--out` (default `<sweep_dir>/ablation/`): `ablation.md`, `ablation.csv`, `rewards.png`,
`accuracy.png` and, when logged, `chosen_below_zero.png`. Every file is written atomically.

Decisions worth knowing:
- A job dir is any directory holding `.hydra/config.yaml`, `results.json` or `failed.json`; its
  status is "finished" (results.json), "failed" (failed.json) or "incomplete" (neither).
- A `results.json` that is not valid JSON makes the run *failed*, with a reason naming the file, so
  one corrupt run is reported instead of hiding the whole sweep.
- Runs with `method.name` set (dpo, bpo, chosen_nll, ...) go to the methods table only: a method may
  add extra terms, so it is not a plain loss x margin cell.
- Accuracies in [0, 1] are shown, and written to the CSV, in percent.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from engine.metrics import read_metrics
from engine.runtime.fileio import atomic_write_text
from experiments.tables.stats import PairedGain, Summary, paired_gain, summarize

if TYPE_CHECKING:
    from experiments.tables.plots import PlotData

__all__ = [
    "AblationError",
    "AblationRow",
    "Cell",
    "MethodRow",
    "Run",
    "Tables",
    "build_tables",
    "collect_runs",
    "csv_number",
    "csv_text",
    "fill_cell",
    "format_cell",
    "format_gain",
    "main",
    "md_table",
    "render_csv",
    "render_markdown",
    "write_report",
]

PAPER_LOSSES = ("logistic", "hinge", "squared", "exponential", "truncated_quadratic", "savage")
KNOWN_AS = {"logistic": "DPO", "hinge": "SLiC", "squared": "IPO"}
MARGINS = ("difference", "balanced")
DEFAULT_METRIC, FALLBACK_METRIC = "eval.accuracy", "eval.reward_accuracy"
DEFAULT_ALPHA = 0.3


class AblationError(ValueError):
    """A sweep directory, metric or option that cannot produce a report; the message says why."""


# ----------------------------------------------------------------------------- collecting runs


@dataclass
class Run:
    """One job of a sweep: where it is, what it ran, and how it ended."""

    path: Path
    status: str  # "finished" | "failed" | "incomplete"
    loss: str | None = None
    margin: str | None = None
    alpha: float | None = None  # gap adaptor; None for the difference margin, which ignores it
    beta: float | None = None
    seed: int | None = None
    method: str | None = None
    results: dict | None = None
    error: str | None = None
    config: dict = field(default_factory=dict)
    _metrics: list[dict] | None = field(default=None, repr=False)

    def value(self, metric: str) -> float | None:
        """The numeric value at the dotted path `metric` of results.json, or None."""
        node = self.results
        for part in metric.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        ok = isinstance(node, int | float) and not isinstance(node, bool)
        return float(node) if ok else None

    def metrics(self) -> list[dict]:
        """Rows of this run's metrics.jsonl ([] when absent), read once."""
        if self._metrics is None:
            path = self.path / "metrics.jsonl"
            self._metrics = read_metrics(path) if path.is_file() else []
        return self._metrics


def _is_job_dir(d: Path) -> bool:
    return any((d / n).is_file() for n in (".hydra/config.yaml", "results.json", "failed.json"))


def _find_job_dirs(root: Path) -> list[Path]:
    """Job dirs under root (root included), not descending into a job dir (checkpoints, models)."""
    if _is_job_dir(root):
        return [root]
    found = []
    # Natural order, so job 10 comes after job 9.
    for child in sorted(root.iterdir(), key=lambda p: (not p.name.isdigit(), p.name.zfill(12))):
        if child.is_dir() and not child.is_symlink() and not child.name.startswith("."):
            found += _find_job_dirs(child)
    return found


def _load_config(path: Path) -> dict:
    """The config as a plain dict, resolving interpolations when they resolve outside Hydra."""
    if not path.is_file():
        return {}
    from omegaconf import OmegaConf

    try:
        cfg = OmegaConf.load(path)
        try:
            data = OmegaConf.to_container(cfg, resolve=True)
        except Exception:  # e.g. ${hydra:...} interpolations: fall back to raw values
            data = OmegaConf.to_container(cfg, resolve=False)
    except Exception as e:
        raise AblationError(f"{path}: not a readable YAML config: {e}") from e
    return data if isinstance(data, dict) else {}


def _name(node: object) -> str | None:
    """`loss: {name: hinge}` or `loss: hinge` -> "hinge"."""
    if isinstance(node, dict):
        node = node.get("name")
    return node if isinstance(node, str) else None


def _num(x: object) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else None


def _first(*values: float | None) -> float | None:
    return next((v for v in values if v is not None), None)


def _load_run(job: Path) -> Run:
    config = _load_config(job / ".hydra" / "config.yaml")
    margin_cfg = config.get("margin")
    run = Run(
        path=job,
        status="incomplete",
        config=config,
        loss=_name(config.get("loss")),
        margin=_name(margin_cfg),
        alpha=_num(margin_cfg.get("alpha")) if isinstance(margin_cfg, dict) else None,
        beta=_num(config.get("beta")),
        seed=config.get("seed") if isinstance(config.get("seed"), int) else None,
        method=_name(config.get("method")),
    )
    results_path, failed_path = job / "results.json", job / "failed.json"
    if results_path.is_file():
        try:
            results = json.loads(results_path.read_text(encoding="utf-8"))
            if not isinstance(results, dict):
                raise ValueError("top level is not a JSON object")
        except ValueError as e:  # JSONDecodeError is a ValueError
            run.status, run.error = "failed", f"invalid results.json ({results_path}): {e}"
        else:
            run.status, run.results = "finished", results
            # results.json records what actually ran; the config fills in what it lacks.
            run.loss = _name(results.get("loss")) or run.loss
            run.margin = _name(results.get("margin")) or run.margin
            run.method = _name(results.get("method")) or run.method
            run.beta = _first(_num(results.get("beta")), run.beta)
            run.alpha = _first(_num(results.get("alpha")), run.alpha)
            seed = results.get("seed")
            run.seed = seed if isinstance(seed, int) and not isinstance(seed, bool) else run.seed
    elif failed_path.is_file():
        run.status = "failed"
        try:
            failed = json.loads(failed_path.read_text(encoding="utf-8"))
            run.error = str(failed.get("error") or "unknown error")
        except (ValueError, AttributeError) as e:
            run.error = f"unreadable failed.json ({failed_path}): {e}"
    if run.margin != "balanced":
        run.alpha = None
    return run


def collect_runs(sweep_dir: str | os.PathLike) -> list[Run]:
    """All job runs found recursively under a Hydra multirun sweep directory, sorted by path.

    Raises AblationError when the directory does not exist or holds no job dirs.
    """
    root = Path(sweep_dir)
    if not root.is_dir():
        raise AblationError(f"sweep directory {root} does not exist or is not a directory")
    jobs = _find_job_dirs(root)
    if not jobs:
        raise AblationError(
            f"no runs found under {root}: expected job dirs holding .hydra/config.yaml, "
            "results.json or failed.json (is this a Hydra multirun sweep dir?)"
        )
    return [_load_run(j) for j in jobs]


# ----------------------------------------------------------------------------- tables


def _numeric_keys(node: object, prefix: str = "") -> set[str]:
    if isinstance(node, dict):
        return {k for key, v in node.items() for k in _numeric_keys(v, f"{prefix}{key}.")}
    return {prefix[:-1]} if _num(node) is not None else set()


def _resolve_metric(finished: Sequence[Run], metric: str | None) -> tuple[str, str | None]:
    """(metric, note). None means the default with its fallback; a named metric must exist."""
    candidates = [DEFAULT_METRIC, FALLBACK_METRIC] if metric is None else [metric]
    if not finished:
        return candidates[0], None
    for m in candidates:
        if any(r.value(m) is not None for r in finished):
            note = None
            if m != candidates[0]:
                note = f"no run has `{DEFAULT_METRIC}` (no verifier?); showing `{m}` instead"
            return m, note
    available = sorted(set().union(*(_numeric_keys(r.results) for r in finished)))
    raise AblationError(
        f"metric {candidates[0]!r} is not in any results.json; numeric keys available: "
        + ", ".join(available)
    )


@dataclass
class Cell:
    """The runs of one table cell: metric values (display units) per finished seed, and the rest."""

    values: list[float] = field(default_factory=list)
    seeds: list[int | None] = field(default_factory=list)
    failed: int = 0
    incomplete: int = 0
    no_metric: int = 0  # finished runs whose results.json lacks the metric

    @property
    def summary(self) -> Summary:
        """Mean, sample std and n over the finished runs."""
        return summarize(self.values)

    @property
    def empty(self) -> bool:
        """True when no run at all belongs to this cell."""
        return not (self.values or self.failed or self.incomplete or self.no_metric)

    def by_seed(self) -> dict[int, float]:
        """Value per seed, averaging repeated seeds; runs without a seed are left out."""
        groups: dict[int, list[float]] = {}
        for s, v in zip(self.seeds, self.values, strict=True):
            if s is not None:
                groups.setdefault(s, []).append(v)
        return {s: sum(v) / len(v) for s, v in groups.items()}


@dataclass
class AblationRow:
    """One loss of the ablation table."""

    loss: str
    known_as: str
    difference: Cell
    balanced: Cell
    gain: PairedGain  # balanced - difference, paired by seed


@dataclass
class MethodRow:
    """One named method (runs with `method.name` set), at one alpha when it uses one."""

    label: str
    loss: str
    margin: str
    cell: Cell


@dataclass
class Tables:
    """Everything the report shows, in display units (percent for accuracies)."""

    metric: str
    percent: bool
    alpha: float | None
    beta: float | None
    notes: list[str]
    rows: list[AblationRow]
    alphas: list[float]  # every balanced alpha found: the gap-adaptor table's columns
    other_margins: list[str]  # margins besides difference/balanced, shown in that table too
    gap_adaptor: dict[str, dict[float | str, Cell]]  # loss -> alpha, or margin name -> cell
    methods: list[MethodRow]
    runs: list[Run]
    sft: float | None = None  # mean `sft.accuracy` (start of training) when the metric is accuracy


def _key(alpha: float | None) -> float | None:
    return None if alpha is None else round(alpha, 6)


def _choose_alpha(alphas: Counter, alpha: float | None) -> float | None:
    if alpha is not None:
        if alphas and _key(alpha) not in alphas:
            raise AblationError(
                f"--alpha {alpha} has no balanced runs; alphas found: {sorted(alphas)}"
            )
        return _key(alpha)
    if not alphas:
        return None
    if DEFAULT_ALPHA in alphas:
        return DEFAULT_ALPHA
    return max(sorted(alphas), key=lambda a: alphas[a])  # most common; ties -> smallest


def fill_cell(cell: Cell, run: Run, metric: str, scale: float) -> None:
    """Count ``run`` into ``cell``: its metric x ``scale`` (and seed) when it finished with the
    metric, else as failed, incomplete or without the metric."""
    if run.status == "failed":
        cell.failed += 1
    elif run.status == "incomplete":
        cell.incomplete += 1
    elif (v := run.value(metric)) is None:
        cell.no_metric += 1
    else:
        cell.values.append(v * scale)
        cell.seeds.append(run.seed)


def _loss_order(names: Iterable[str]) -> list[str]:
    names = set(names)
    return [n for n in PAPER_LOSSES if n in names] + sorted(names - set(PAPER_LOSSES))


def build_tables(
    runs: Sequence[Run],
    metric: str | None = None,
    alpha: float | None = None,
    beta: float | None = None,
) -> Tables:
    """Group runs into the ablation, gap-adaptor and methods tables.

    Args:
        runs: from `collect_runs`.
        metric: dotted path into results.json; None means `eval.accuracy`, falling back (with a
            note) to `eval.reward_accuracy` when no run has it. A named metric found in no run
            raises AblationError listing the numeric keys available.
        alpha: the balanced margin's gap adaptor for the main table; None picks 0.3 when present,
            else the most common one. The difference margin ignores alpha.
        beta: keep only runs with this beta; None keeps all (with a note when several are pooled).
    """
    notes: list[str] = []
    if beta is not None:
        runs = [r for r in runs if r.beta is not None and math.isclose(r.beta, beta)]
        if not runs:
            raise AblationError(f"--beta {beta} matches no run")
    betas = sorted({r.beta for r in runs if r.beta is not None})
    if beta is None and len(betas) > 1:
        notes.append(f"runs with several beta values are pooled: {betas} (use --beta to pick one)")
    finished = [r for r in runs if r.status == "finished"]
    metric, note = _resolve_metric(finished, metric)
    if note:
        notes.append(note)
    values = [v for r in finished if (v := r.value(metric)) is not None]
    percent = "accuracy" in metric.rsplit(".", 1)[-1] and all(0.0 <= v <= 1.0 for v in values)
    scale = 100.0 if percent else 1.0

    sft = [v for r in finished if (v := r.value("sft.accuracy")) is not None]
    plain = [r for r in runs if r.method is None and r.loss and r.margin]
    balanced_alphas = Counter(
        _key(r.alpha) for r in plain if r.margin == "balanced" and r.alpha is not None
    )
    chosen_alpha = _choose_alpha(balanced_alphas, alpha)

    losses = _loss_order(r.loss for r in plain)
    gap: dict[str, dict[float | str, Cell]] = {loss: {} for loss in losses}
    no_alpha = 0
    for r in plain:
        col = {"difference": "difference", "balanced": _key(r.alpha)}.get(r.margin, r.margin)
        if col is None:  # a balanced run that records no alpha cannot be placed
            no_alpha += 1
            continue
        fill_cell(gap[r.loss].setdefault(col, Cell()), r, metric, scale)
    if no_alpha:
        notes.append(f"{no_alpha} balanced run(s) record no margin.alpha and are left out")
    rows = []
    for loss in losses:
        diff = gap[loss].get("difference", Cell())
        bal = gap[loss].get(chosen_alpha, Cell()) if chosen_alpha is not None else Cell()
        gain = paired_gain(diff.by_seed(), bal.by_seed())
        rows.append(AblationRow(loss, KNOWN_AS.get(loss, "-"), diff, bal, gain))
    others = sorted({r.margin for r in plain} - set(MARGINS))
    if others:
        notes.append(f"margins other than difference/balanced appear in the alpha table: {others}")

    method_cells: dict[tuple[str, float | None], MethodRow] = {}
    for r in runs:
        if r.method is None:
            continue
        k = (r.method, _key(r.alpha))
        if k not in method_cells:
            method_cells[k] = MethodRow(r.method, r.loss or "-", r.margin or "-", Cell())
        fill_cell(method_cells[k].cell, r, metric, scale)
    method_alphas = Counter(m for m, _ in method_cells)
    for (m, a), row in method_cells.items():
        if method_alphas[m] > 1 and a is not None:
            row.label = f"{m} (alpha={a:g})"
    methods = [method_cells[k] for k in sorted(method_cells, key=lambda k: (k[0], k[1] or 0))]

    return Tables(
        metric=metric,
        percent=percent,
        alpha=chosen_alpha,
        beta=beta,
        notes=notes,
        rows=rows,
        alphas=sorted(balanced_alphas),
        other_margins=others,
        gap_adaptor=gap,
        methods=methods,
        runs=list(runs),
        sft=(sum(sft) / len(sft) * scale) if sft and metric == DEFAULT_METRIC else None,
    )


# ----------------------------------------------------------------------------- rendering


def _fmt(x: float, percent: bool, sign: bool = False) -> str:
    return (
        f"{x:+.1f}"
        if percent and sign
        else f"{x:.1f}"
        if percent
        else f"{x:+.4g}"
        if sign
        else f"{x:.4g}"
    )


def format_cell(cell: Cell, percent: bool) -> str:
    """`44.5 ± 1.2 (n=3)`, `44.5 (n=1)`, `missing`, `failed (2)`, `41.0 ± 0.3 (n=2, 1 failed)`."""
    if cell.empty:
        return "missing"
    counts = [
        (cell.failed, "failed", "failed"),
        (cell.incomplete, "incomplete", "incomplete"),
        (cell.no_metric, "without metric", "no metric"),
    ]
    s = cell.summary
    if s.n == 0:  # name the first reason nothing finished, then the others
        k, _, head = next(c for c in counts if c[0])
        rest = [f"{c[0]} {c[1]}" for c in counts if c[0] and c[2] != head]
        return f"{head} ({k})" + (f" ({', '.join(rest)})" if rest else "")
    extras = [f"{k} {what}" for k, what, _ in counts if k]
    value = _fmt(s.mean, percent) + (f" ± {_fmt(s.std, percent)}" if s.n > 1 else "")
    return f"{value} ({', '.join([f'n={s.n}', *extras])})"


def format_gain(gain: PairedGain, percent: bool) -> str:
    """`+3.5 [+1.2, +5.8] (n=3)`; `-` without paired seeds; no interval with one pair."""
    if gain.n == 0:
        return "-"
    if gain.n == 1:
        return f"{_fmt(gain.mean, percent, True)} (n=1, no CI)"
    lo, hi = _fmt(gain.ci_low, percent, True), _fmt(gain.ci_high, percent, True)
    return f"{_fmt(gain.mean, percent, True)} [{lo}, {hi}] (n={gain.n})"


def md_table(header: Sequence[str], body: Iterable[Sequence[str]]) -> list[str]:
    """A Markdown table's lines: the header, the rule, one line per row."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in body]


def render_markdown(tables: Tables, sweep_dir: Path, plots: Sequence[str] = ()) -> str:
    """The ablation report as Markdown: header, main table, gap-adaptor and methods tables, runs."""
    runs, pct = tables.runs, tables.percent
    status = Counter(r.status for r in runs)
    unit = " (%)" if pct else ""
    alpha = "-" if tables.alpha is None else f"{tables.alpha:g}"
    out = [
        f"# Ablation: {tables.metric}{unit}",
        "",
        f"Sweep `{sweep_dir}`; metric `{tables.metric}`; balanced margin at alpha = {alpha}"
        + ("" if tables.beta is None else f"; beta = {tables.beta:g}")
        + f". {len(runs)} runs: {status['finished']} finished, {status['failed']} failed, "
        f"{status['incomplete']} incomplete.",
        "",
    ]
    out += [f"> Note: {n}" for n in tables.notes] + ([""] if tables.notes else [])
    if tables.sft is not None:
        out += [f"Starting point (SFT model) {tables.metric}: {_fmt(tables.sft, pct)}.", ""]
    out += [
        "Cells: mean ± sample std over seeds (n = seeds). Gain: balanced - difference paired "
        "by seed, mean [95% t confidence interval].",
        "",
    ]
    out += md_table(
        ["loss", "known as", "difference", f"balanced (alpha={alpha})", "gain"],
        (
            [
                r.loss,
                r.known_as,
                format_cell(r.difference, pct),
                format_cell(r.balanced, pct),
                format_gain(r.gain, pct),
            ]
            for r in tables.rows
        ),
    )
    if len(tables.alphas) > 1 or tables.other_margins:
        cols: list[float | str] = ["difference", *tables.alphas, *tables.other_margins]
        out += ["", "## Gap adaptor (alpha of the balanced margin)", ""]
        out += md_table(
            ["loss", *(c if isinstance(c, str) else f"alpha={c:g}" for c in cols)],
            (
                [loss, *(format_cell(by_col.get(c, Cell()), pct) for c in cols)]
                for loss, by_col in tables.gap_adaptor.items()
            ),
        )
    if tables.methods:
        out += ["", "## Methods", ""]
        out += md_table(
            ["method", "loss", "margin", tables.metric],
            ([m.label, m.loss, m.margin, format_cell(m.cell, pct)] for m in tables.methods),
        )
    if plots:
        out += ["", "## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots]
    bad = [r for r in runs if r.status != "finished"]
    if bad:
        out += ["", "## Runs that did not finish", ""]
        for r in bad:
            rel = os.path.relpath(r.path, sweep_dir)
            what = f"{r.loss or '?'} / {r.margin or '?'}" + (
                f" / method={r.method}" if r.method else ""
            )
            why = (r.error or "").strip().splitlines()[0] if r.error and r.error.strip() else ""
            detail = (
                f"failed: {why}" if r.status == "failed" else "incomplete (killed or still running)"
            )
            out.append(f"- `{rel}` ({what}, seed {r.seed}): {detail}")
    return "\n".join(out) + "\n"


CSV_COLUMNS = (
    ["loss", "known_as", "metric", "unit", "alpha"]
    + [f"{m}_{k}" for m in MARGINS for k in ("mean", "std", "n", "failed", "incomplete")]
    + ["gain_mean", "gain_ci_low", "gain_ci_high", "n_paired"]
)


def csv_number(x: float | None) -> str:
    """A CSV cell for a number: empty when undefined (None or nan), else rounded to 10 digits."""
    return "" if x is None or math.isnan(x) else repr(round(x, 10))


def csv_text(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A CSV file's text: the header line, then one line per row."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def render_csv(tables: Tables) -> str:
    """One row per loss: mean, std, n, failed, incomplete per margin; paired gain and its 95% CI.

    Values are in display units (percent for accuracies, see the `unit` column); empty = undefined.
    """
    num = csv_number

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in tables.rows:
        row = [
            r.loss,
            r.known_as,
            tables.metric,
            "%" if tables.percent else "",
            "" if tables.alpha is None else f"{tables.alpha:g}",
        ]
        for cell in (r.difference, r.balanced):
            s = cell.summary
            row += [num(s.mean), num(s.std), s.n, cell.failed, cell.incomplete]
        row += [num(r.gain.mean), num(r.gain.ci_low), num(r.gain.ci_high), r.gain.n]
        w.writerow(row)
    return buf.getvalue()


# ----------------------------------------------------------------------------- report and CLI


def plot_data(tables: Tables) -> PlotData:
    """The plots' data for the main table's cells: difference, and balanced at `tables.alpha`."""
    from experiments.tables.plots import PlotData

    alpha = tables.alpha
    columns = ["difference", f"balanced (alpha={alpha:g})" if alpha is not None else "balanced"]
    losses = [r.loss for r in tables.rows]
    cells: dict[tuple[str, str], list[list[dict]]] = {}
    for r in tables.runs:
        if r.status != "finished" or r.method is not None or r.loss not in losses:
            continue
        if r.margin == "difference" or (
            r.margin == "balanced"
            and r.alpha is not None
            and alpha is not None
            and round(r.alpha, 6) == alpha
        ):
            col = columns[0] if r.margin == "difference" else columns[1]
            cells.setdefault((r.loss, col), []).append(r.metrics())
    summaries = {
        (r.loss, c): cell.summary
        for r in tables.rows
        for c, cell in zip(columns, (r.difference, r.balanced), strict=True)
    }
    return PlotData(
        cells=cells,
        losses=losses,
        columns=columns,
        summaries=summaries,
        ylabel=tables.metric + (" (%)" if tables.percent else ""),
        reference=tables.sft,
    )


def write_report(
    sweep_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    metric: str | None = None,
    alpha: float | None = None,
    beta: float | None = None,
) -> Path:
    """Collect a sweep, build its tables and write ablation.md, ablation.csv and the plots.

    `out_dir` defaults to `<sweep_dir>/ablation`. See `build_tables` for metric, alpha and beta.
    Returns the path of ablation.md.
    """
    sweep = Path(sweep_dir)
    tables = build_tables(collect_runs(sweep), metric=metric, alpha=alpha, beta=beta)
    out = Path(out_dir) if out_dir is not None else sweep / "ablation"
    out.mkdir(parents=True, exist_ok=True)
    from experiments.tables.plots import write_plots  # matplotlib is imported only when plotting

    written = write_plots(plot_data(tables), out)
    atomic_write_text(out / "ablation.csv", render_csv(tables))
    md = out / "ablation.md"
    atomic_write_text(md, render_markdown(tables, sweep, written))
    return md


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 on a clear user error)."""
    p = argparse.ArgumentParser(
        prog="python -m experiments.tables.ablation", description=__doc__.split("\n")[0]
    )
    p.add_argument("sweep_dir", help="Hydra multirun sweep directory")
    p.add_argument("--out", default=None, help="output directory (default: <sweep_dir>/ablation)")
    p.add_argument(
        "--metric",
        default=None,
        help=f"dotted path into results.json (default: {DEFAULT_METRIC}, else {FALLBACK_METRIC})",
    )
    p.add_argument(
        "--alpha",
        type=float,
        default=None,
        help="balanced-margin alpha for the main table (default: 0.3, else most common)",
    )
    p.add_argument("--beta", type=float, default=None, help="keep only runs with this beta")
    args = p.parse_args(argv)
    try:
        md = write_report(
            args.sweep_dir, args.out, metric=args.metric, alpha=args.alpha, beta=args.beta
        )
    except AblationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(md.read_text(encoding="utf-8"))
    print(f"wrote {md.parent}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
