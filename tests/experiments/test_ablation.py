"""The ablation table (experiments.tables.ablation), the collector it reads runs through
(experiments.tables.collect), the cell formatting (experiments.tables.formatting) and ``python -m
experiments.tables ablation``, on a fake Hydra multirun sweep built in tmp_path.

The fake sweep (nested like Hydra's `<sweep>/<date>/<time>/<job>`) has the six paper losses x
{difference, balanced@0.3} x seeds {1, 2}, with eval.accuracy (for loss index i, seed s):

    difference: 0.40 + 0.01 i + 0.02 (s - 1)        balanced: 0.44 + 0.01 i + 0.03 (s - 1)

so every loss has the paired gains 4 and 5 points (seeds 1, 2): mean 4.5, sd sqrt(0.5), and the 95%
CI is 4.5 ± t_{0.975,1} * sqrt(0.5) / sqrt(2) = 4.5 ± 12.706 * 0.5 = [-1.853, 10.853].
Plus: savage/balanced failed on both seeds, exponential/difference has a failed seed 3,
squared/balanced has an incomplete seed 3, truncated_quadratic/balanced is missing, hinge has a
balanced alpha sweep (0.1, 0.5), a `chosen_nll` method run, and an extra loss `zeta`.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from experiments.tables import ablation
from experiments.tables.__main__ import main
from experiments.tables.ablation import build_tables, write_report
from experiments.tables.collect import TableError, collect_runs
from experiments.tables.formatting import format_cell, format_gain
from experiments.tables.stats import paired_gain, summarize

REPO = Path(__file__).resolve().parents[2]
LOSSES = ["logistic", "hinge", "squared", "exponential", "truncated_quadratic", "savage"]


def accuracy(i: int, margin: str, seed: int) -> float:
    if margin == "difference":
        return 0.40 + 0.01 * i + 0.02 * (seed - 1)
    return 0.44 + 0.01 * i + 0.03 * (seed - 1)


class Sweep:
    def __init__(self, root: Path, first_job: int = 0):
        self.root = root
        self.n = first_job

    def job(
        self,
        loss: str,
        margin: str,
        seed: int,
        alpha: float = 0.3,
        method: str | None = None,
        status: str = "finished",
        eval_metrics: dict | None = None,
        metrics_tail: str = "",
        beta: float = 0.1,
    ) -> Path:
        d = self.root / "2025-01-01" / "12-00-00" / str(self.n)
        self.n += 1
        (d / ".hydra").mkdir(parents=True)
        cfg = {
            "loss": {"name": loss},
            "margin": {"name": margin, "alpha": alpha},
            "beta": beta,
            "seed": seed,
            "method": {"name": method},
            "trainer": {"max_steps": 50, "out": "${hydra:runtime.output_dir}"},
        }
        (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
        if status == "failed":
            err = {"error": f"ValueError: boom {loss}\nsecond line", "traceback": "Traceback..."}
            (d / "failed.json").write_text(json.dumps(err))
            return d
        if status == "incomplete":
            return d
        sign = -1.0 if margin == "difference" else 1.0
        rows = [
            {
                "step": step,
                "train/loss": 0.6,
                "train/chosen_reward": sign * 0.01 * step,
                "train/rejected_reward": -0.03 * step,
                "train/chosen_reward_below_zero": 0.5 - sign * 0.008 * step,
            }
            for step in range(0, 60, 10)
        ]
        text = "".join(json.dumps(r) + "\n" for r in rows) + metrics_tail
        (d / "metrics.jsonl").write_text(text)
        results = {
            "loss": loss,
            "margin": margin,
            "method": method,
            "beta": beta,
            "alpha": alpha,
            "seed": seed,
            "steps": 50,
            "wall_seconds": 1.0,
            "train": {"chosen_reward": 0.1, "rejected_reward": -1.0, "reward_accuracy": 0.9},
            "eval": eval_metrics
            if eval_metrics is not None
            else {"reward_accuracy": 0.8, "accuracy": accuracy(0, margin, seed)},
            "sft": {"accuracy": 0.38, "accuracy_stderr": 0.02},
        }
        (d / "results.json").write_text(json.dumps(results))
        return d


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "sweep"
    s = Sweep(root)
    for i, loss in enumerate(LOSSES):
        for margin in ("difference", "balanced"):
            if (loss, margin) == ("truncated_quadratic", "balanced"):
                continue  # the missing cell
            for seed in (1, 2):
                status = "failed" if (loss, margin) == ("savage", "balanced") else "finished"
                ev = {"reward_accuracy": 0.8, "accuracy": accuracy(i, margin, seed)}
                s.job(loss, margin, seed, status=status, eval_metrics=ev)
    s.job("exponential", "difference", 3, status="failed")
    s.job("squared", "balanced", 3, status="incomplete")
    for alpha, acc in ((0.1, 0.45), (0.5, 0.47)):
        for seed in (1, 2):
            ev = {"reward_accuracy": 0.8, "accuracy": acc + 0.01 * seed}
            s.job("hinge", "balanced", seed, alpha=alpha, eval_metrics=ev)
    s.job("logistic", "difference", 1, method="chosen_nll", eval_metrics={"accuracy": 0.39})
    s.job("zeta", "difference", 1, eval_metrics={"accuracy": 0.30}, metrics_tail='{"step": 6')
    # A checkpoint dir inside a job dir must not be taken for a job.
    ckpt = root / "2025-01-01" / "12-00-00" / "0" / "checkpoints" / "x"
    ckpt.mkdir(parents=True)
    (ckpt / "results.json").write_text("{}")
    return root


# ----------------------------------------------------------------------------- stats


@pytest.mark.parametrize(
    ("confidence", "n", "t_table"),
    [(0.95, 2, 12.706), (0.95, 3, 4.303), (0.95, 11, 2.228), (0.95, 31, 2.042),
     (0.99, 6, 4.032), (0.90, 21, 1.725)],
)  # fmt: skip
def test_paired_gain_interval_uses_the_t_table(confidence: float, n: int, t_table: float) -> None:
    """Differences alternating 0 and 2 (mean 1): the half width is t_{n-1} * sd / sqrt(n)."""
    treatment = {seed: 2.0 * (seed % 2) for seed in range(n)}
    gain = paired_gain(dict.fromkeys(range(n), 0.0), treatment, confidence)
    sd = summarize(list(treatment.values())).std
    half = t_table * sd / math.sqrt(n)
    assert gain.n == n and gain.confidence == confidence
    assert gain.ci_high - gain.mean == pytest.approx(half, abs=1e-3 * sd / math.sqrt(n))
    assert gain.mean - gain.ci_low == pytest.approx(gain.ci_high - gain.mean)


def test_paired_gain_rejects_a_confidence_outside_0_1() -> None:
    with pytest.raises(ValueError, match="confidence"):
        paired_gain({1: 0.0, 2: 1.0}, {1: 1.0, 2: 1.0}, confidence=95)


def test_summarize_and_paired_gain_by_hand() -> None:
    s = summarize([1.0, 2.0, 4.0])
    assert (s.mean, s.n) == (pytest.approx(7 / 3), 3)
    assert s.std == pytest.approx(
        math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
    )
    assert math.isnan(summarize([3.0]).std)
    # Differences over common seeds 1, 2, 3 only: 1, 2, 1 -> mean 4/3, sd 1/sqrt(3).
    g = paired_gain({1: 1.0, 2: 2.0, 3: 4.0, 9: 0.0}, {1: 2.0, 2: 4.0, 3: 5.0, 7: 1.0})
    half = 4.303 * (1 / math.sqrt(3)) / math.sqrt(3)
    assert g.n == 3 and g.mean == pytest.approx(4 / 3)
    assert (g.ci_low, g.ci_high) == (
        pytest.approx(4 / 3 - half, abs=1e-3),
        pytest.approx(4 / 3 + half, abs=1e-3),
    )
    one = paired_gain({1: 1.0}, {1: 3.0})
    assert one.mean == 2.0 and one.n == 1 and math.isnan(one.ci_low)


# ----------------------------------------------------------------------------- collection


def test_collect_runs_finds_nested_jobs_and_statuses(sweep: Path) -> None:
    runs = collect_runs(sweep)
    assert len(runs) == 6 * 2 * 2 - 2 + 2 + 4 + 2
    statuses = [r.status for r in runs]
    assert statuses.count("failed") == 3 and statuses.count("incomplete") == 1
    assert not any("checkpoints" in str(r.path) for r in runs)
    failed = next(r for r in runs if r.status == "failed")
    assert failed.error.startswith("ValueError: boom") and failed.loss is not None
    nll = next(r for r in runs if r.method == "chosen_nll")
    assert nll.value("eval.accuracy") == 0.39
    assert all(r.alpha is None for r in runs if r.margin == "difference")


def test_truncated_metrics_line_warns_and_is_ignored(sweep: Path) -> None:
    zeta = next(r for r in collect_runs(sweep) if r.loss == "zeta")
    with pytest.warns(UserWarning, match=r"metrics.jsonl:7"):
        rows = zeta.metrics()
    assert [r["step"] for r in rows] == [0, 10, 20, 30, 40, 50]


def test_invalid_results_json_counts_as_failed_naming_the_file(sweep: Path) -> None:
    bad = Sweep(sweep, first_job=100).job("hinge", "difference", 5)
    (bad / "results.json").write_text('{"loss": "hin')
    run = next(r for r in collect_runs(sweep) if r.path == bad)
    assert run.status == "failed" and "invalid results.json" in run.error
    assert str(bad / "results.json") in run.error


@pytest.mark.parametrize("make", [lambda p: p / "nope", lambda p: p])
def test_missing_or_empty_sweep_dir_is_a_clear_error(tmp_path: Path, make) -> None:
    with pytest.raises(TableError, match=r"does not exist|no runs found"):
        collect_runs(make(tmp_path))


# ----------------------------------------------------------------------------- tables


def test_main_table_values_layout_and_gain(sweep: Path) -> None:
    t = build_tables(collect_runs(sweep))
    assert t.metric == "eval.accuracy" and t.percent and t.alpha == 0.3
    assert [r.loss for r in t.rows] == [*LOSSES, "zeta"]
    assert [r.known_as for r in t.rows][:4] == ["DPO", "SLiC", "IPO", "-"]
    hinge = t.rows[1]
    # difference: 41, 43 -> mean 42, sd sqrt(2); balanced: 45, 48 -> mean 46.5, sd sqrt(4.5)
    d, b = hinge.difference.summary, hinge.balanced.summary
    assert (d.mean, d.std, d.n) == (pytest.approx(42.0), pytest.approx(math.sqrt(2)), 2)
    assert (b.mean, b.std, b.n) == (pytest.approx(46.5), pytest.approx(math.sqrt(4.5)), 2)
    assert format_cell(hinge.difference, True) == "42.0 ± 1.4 (n=2)"
    g = hinge.gain
    assert g.n == 2 and g.mean == pytest.approx(4.5)
    assert g.ci_low == pytest.approx(4.5 - 12.706 * 0.5, abs=1e-3)
    assert g.ci_high == pytest.approx(4.5 + 12.706 * 0.5, abs=1e-3)
    assert format_gain(g, True) == "+4.5 [-1.9, +10.9] (n=2)"


def test_failed_missing_partial_incomplete_markers(sweep: Path) -> None:
    t = build_tables(collect_runs(sweep))
    by = {r.loss: r for r in t.rows}
    fmt = format_cell
    assert fmt(by["savage"].balanced, True) == "failed (2)"
    assert format_gain(by["savage"].gain, True) == "-"
    assert fmt(by["truncated_quadratic"].balanced, True) == "missing"
    assert fmt(by["exponential"].difference, True) == "44.0 ± 1.4 (n=2, 1 failed)"
    assert fmt(by["squared"].balanced, True).endswith("(n=2, 1 incomplete)")
    assert fmt(by["zeta"].difference, True) == "30.0 (n=1)"
    assert fmt(by["zeta"].balanced, True) == "missing"


def test_alpha_choice(sweep: Path) -> None:
    runs = collect_runs(sweep)
    t = build_tables(runs, alpha=0.5)
    assert t.alpha == 0.5 and t.alphas == [0.1, 0.3, 0.5]
    assert t.rows[1].balanced.summary.mean == pytest.approx(48.5)
    assert t.rows[0].balanced.empty  # logistic has no alpha 0.5
    with pytest.raises(TableError, match=r"0\.7.*alphas found"):
        build_tables(runs, alpha=0.7)
    # Without 0.3 the most common alpha is picked (0.1 and 0.5 tie -> smallest).
    no_03 = [r for r in runs if not (r.margin == "balanced" and r.alpha == 0.3)]
    assert build_tables(no_03).alpha == 0.1


def test_bad_metric_names_key_and_available_keys(sweep: Path) -> None:
    with pytest.raises(TableError) as e:
        build_tables(collect_runs(sweep), metric="eval.acuracy")
    msg = str(e.value)
    assert "eval.acuracy" in msg and "eval.accuracy" in msg and "train.reward_accuracy" in msg


def test_falls_back_to_reward_accuracy_with_a_note(tmp_path: Path) -> None:
    s = Sweep(tmp_path)
    for seed in (1, 2):
        s.job("logistic", "difference", seed, eval_metrics={"reward_accuracy": 0.6 + 0.1 * seed})
    t = build_tables(collect_runs(tmp_path))
    assert t.metric == "eval.reward_accuracy" and any("eval.accuracy" in n for n in t.notes)
    assert t.rows[0].difference.summary.mean == pytest.approx(75.0)
    non_percent = build_tables(collect_runs(tmp_path), metric="train.rejected_reward")
    assert not non_percent.percent and non_percent.rows[0].difference.summary.mean == -1.0


# ----------------------------------------------------------------------------- report


def test_write_report_files(sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the truncated metrics line
        md_path = write_report(sweep, out)
    assert md_path == out / "ablation.md"
    md = md_path.read_text()
    assert "30 runs: 26 finished, 3 failed, 1 incomplete" in md
    assert "Starting point (SFT model) eval.accuracy: 38.0." in md
    assert "| loss | known as | difference | balanced (alpha=0.3) | gain |" in md
    assert "| hinge | SLiC | 42.0 ± 1.4 (n=2) | 46.5 ± 2.1 (n=2) | +4.5 [-1.9, +10.9] (n=2) |" in md
    assert "## Gap adaptor" in md and "| alpha=0.1 |" in md.replace(" | alpha=0.3", "")
    assert "46.5 ± 0.7 (n=2)" in md  # hinge at alpha 0.1: 46, 47
    assert "## Methods" in md and "| chosen_nll | logistic | difference | 39.0 (n=1) |" in md
    assert "failed: ValueError: boom savage" in md and "second line" not in md
    assert "incomplete (killed or still running)" in md
    for png in ("rewards.png", "accuracy.png", "chosen_below_zero.png"):
        assert (out / png).stat().st_size > 1000
        assert f"]({png})" in md
    with open(out / "ablation.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ablation.CSV_COLUMNS
    for col in ("difference_mean", "balanced_std", "balanced_n", "balanced_failed",
                "gain_mean", "gain_ci_low", "gain_ci_high", "n_paired"):  # fmt: skip
        assert col in rows[0]
    hinge = rows[1]
    assert hinge["loss"] == "hinge" and float(hinge["difference_mean"]) == pytest.approx(42.0)
    assert float(hinge["gain_ci_high"]) == pytest.approx(4.5 + 12.706 * 0.5, abs=1e-3)
    savage = rows[5]
    assert savage["balanced_mean"] == "" and savage["balanced_failed"] == "2"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_cli_main_and_default_out_dir(sweep: Path, capsys) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        argv = ["ablation", str(sweep), "--metric", "eval.reward_accuracy", "--alpha", "0.1"]
        assert main(argv) == 0
    md = (sweep / "ablation-report" / "ablation.md").read_text()
    assert "# Ablation: eval.reward_accuracy (%)" in md and "alpha=0.1" in md
    assert "# Convergence" in md and "# Cost per run" in md  # the table's whole report
    out, err = capsys.readouterr()
    assert "# Ablation" in out and f"reading {sweep}: one sweep" in err
    assert main(["ablation", str(sweep), "--metric", "nope.key"]) == 2
    err = capsys.readouterr().err
    assert "nope.key" in err and "eval.accuracy" in err


def test_beta_option_keeps_only_its_runs(sweep: Path, tmp_path: Path) -> None:
    """A hinge x difference run at beta 0.2 joins the two at 0.1: --beta 0.1 leaves it out of the
    table and of the convergence section alike."""
    Sweep(sweep, first_job=100).job("hinge", "difference", 3, beta=0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["ablation", str(sweep), "--out", str(tmp_path / "all")]) == 0
        assert main(["ablation", str(sweep), "--beta", "0.1", "--out", str(tmp_path / "b")]) == 0
        assert main(["ablation", str(sweep), "--beta", "0.3", "--out", str(tmp_path / "c")]) == 2
    pooled = (tmp_path / "all" / "ablation.md").read_text()
    assert (
        "several beta values are pooled" in pooled
        and "| hinge / difference | never | 0/3 |" in pooled
    )
    md = (tmp_path / "b" / "ablation.md").read_text()
    assert "beta = 0.1" in md and "| hinge / difference | never | 0/2 |" in md
    assert "| hinge | SLiC | 42.0 ± 1.4 (n=2) |" in md


def test_cli_subprocess(sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    command = [sys.executable, "-m", "experiments.tables", "ablation"]
    res = subprocess.run(
        [*command, str(sweep), "--out", str(out)], cwd=REPO, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert (out / "ablation.csv").is_file() and "| hinge | SLiC |" in res.stdout
    res = subprocess.run(
        [*command, str(tmp_path / "none")], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 2 and "does not exist" in res.stderr
