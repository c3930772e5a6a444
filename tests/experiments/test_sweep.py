"""Sweeps end to end, as a user runs them: ``python -m engine.train -m ...`` in a subprocess, then
``python -m experiments.tables ablation <sweep dir>``, on the tiny model and a tiny arithmetic pair
file.

Covers: a 2-cell sweep and its table and plots; a sweep with a crashing job (the other job still
finishes, the crash leaves failed.json, the collector reports the cell as failed, and the hydra
process exits non-zero) under the basic and the joblib launcher; the same 2-cell sweep run in
parallel with hydra/launcher=local_parallel.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from engine.runtime.distributed import without_launcher_env

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
PNG = b"\x89PNG\r\n\x1a\n"
ALPHA_ERROR = "alpha (the gap adaptor) must be in (0, 1], got 5.0"


def tiny_overrides(pairs: Path) -> list[str]:
    """A tiny budget: the tiny Llama shrunk further, 3 steps of 2 pairs, one thread per job."""
    return [
        "model=tiny",
        "model.tiny.hidden_size=32",
        "model.tiny.intermediate_size=64",
        "model.tiny.num_layers=2",
        "model.tiny.num_heads=2",
        "data=files",
        f"data.train={pairs}",
        f"data.eval={pairs}",
        "trainer.max_steps=3",
        "trainer.micro_batch_size=2",
        "trainer.log_every=1",
        "trainer.threads=1",
        "trainer.progress_bar=false",
        "trainer.tensorboard=false",
    ]


def run(*args: str) -> subprocess.CompletedProcess:
    # launcher variables (or those an in-process train() of an earlier test left behind): a job
    # inheriting them would join that (finished) world instead of forming its own
    env = without_launcher_env()
    env.update(HYDRA_FULL_ERROR="0", PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )


def sweep(sweep_dir: Path, pairs: Path, *overrides: str) -> subprocess.CompletedProcess:
    return run(
        "-m",
        "engine.train",
        "-m",
        *overrides,
        *tiny_overrides(pairs),
        f"hydra.sweep.dir={sweep_dir}",
    )


def jobs(sweep_dir: Path, *keys: str) -> dict[str, Path]:
    """Job dirs by the overrides of ``keys`` (``"margin=balanced margin.alpha=0.3"``), read from
    each job's .hydra/overrides.yaml."""
    found = {}
    for job in sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()):
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        found[" ".join(o for o in overrides if o.split("=", 1)[0] in keys)] = job
    return found


def collect(sweep_dir: Path, out: Path, *options: str) -> tuple[str, dict[str, dict[str, str]]]:
    """Run the collector CLI; return ablation.md and the CSV rows by loss."""
    result = run("-m", "experiments.tables", "ablation", str(sweep_dir), f"--out={out}", *options)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(out / "ablation.csv", newline="") as f:
        rows = {row["loss"]: row for row in csv.DictReader(f)}
    return (out / "ablation.md").read_text(), rows


def table_row(markdown: str, loss: str) -> list[str]:
    """The cells of the main table's row for ``loss`` (the first table of the report)."""
    line = next(line for line in markdown.splitlines() if line.startswith(f"| {loss} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def assert_finished(metrics_rows, job: Path, margin: str, alpha: float | None = None) -> dict:
    results = json.loads((job / "results.json").read_text())
    assert not (job / "failed.json").exists()
    assert (results["loss"], results["margin"], results["steps"]) == ("hinge", margin, 3)
    if alpha is not None:
        assert results["alpha"] == pytest.approx(alpha)
    for key in ("loss", "chosen_reward", "rejected_reward", "reward_accuracy"):
        assert math.isfinite(results["train"][key]) and math.isfinite(results["eval"][key])
    rows = metrics_rows(job)
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3]
    assert (job / "final_model" / "model.safetensors").is_file()
    return results


def test_two_cell_sweep_and_its_ablation_table(
    metrics_rows, tmp_path: Path, arithmetic_pairs: Path
) -> None:
    sweep_dir = tmp_path / "sweep"
    result = sweep(
        sweep_dir, arithmetic_pairs, "loss=hinge", "margin=difference,balanced", "margin.alpha=0.3"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    found = jobs(sweep_dir, "margin")
    assert set(found) == {"margin=difference", "margin=balanced"}
    difference = assert_finished(metrics_rows, found["margin=difference"], "difference")
    balanced = assert_finished(metrics_rows, found["margin=balanced"], "balanced", alpha=0.3)

    markdown, rows = collect(sweep_dir, tmp_path / "report")
    # data=files has no verifier: the table shows eval.reward_accuracy, in percent
    assert "eval.reward_accuracy" in markdown and "alpha=0.3" in markdown
    assert "2 runs: 2 finished, 0 failed, 0 incomplete" in markdown
    loss, known_as, diff_cell, bal_cell, gain = table_row(markdown, "hinge")
    assert (loss, known_as) == ("hinge", "SLiC")
    want_diff = 100 * difference["eval"]["reward_accuracy"]
    want_bal = 100 * balanced["eval"]["reward_accuracy"]
    assert diff_cell == f"{want_diff:.1f} (n=1)"
    assert bal_cell == f"{want_bal:.1f} (n=1)"
    assert gain.startswith(f"{want_bal - want_diff:+.1f}")
    row = rows["hinge"]
    assert float(row["difference_mean"]) == pytest.approx(want_diff)
    assert float(row["balanced_mean"]) == pytest.approx(want_bal)
    assert (row["difference_n"], row["balanced_n"]) == ("1", "1")
    assert (row["difference_failed"], row["balanced_failed"]) == ("0", "0")
    assert float(row["gain_mean"]) == pytest.approx(want_bal - want_diff)
    assert row["metric"] == "eval.reward_accuracy" and row["alpha"] == "0.3"
    for plot in ("rewards.png", "accuracy.png", "chosen_below_zero.png"):
        assert (tmp_path / "report" / plot).read_bytes()[:8] == PNG, plot
        assert f"]({plot})" in markdown


@pytest.mark.parametrize("launcher", ["basic", "local_parallel"])
def test_a_crashing_job_fails_its_cell_not_the_sweep(
    metrics_rows, tmp_path: Path, arithmetic_pairs: Path, launcher: str
) -> None:
    """margin.alpha=5.0 fails validation (alpha must be in (0, 1]); it runs first, so the basic
    launcher must go on to the next job after a crash."""
    sweep_dir = tmp_path / "sweep"
    launcher_override = [] if launcher == "basic" else [f"hydra/launcher={launcher}"]
    result = sweep(
        sweep_dir,
        arithmetic_pairs,
        "loss=hinge",
        "margin=balanced",
        "margin.alpha=5.0,0.3",
        *launcher_override,
    )
    # a sweep with a failed job must not look green: hydra re-raises the job's error at the end
    assert result.returncode != 0
    assert ALPHA_ERROR in result.stderr
    found = jobs(sweep_dir, "margin", "margin.alpha")
    assert set(found) == {"margin=balanced margin.alpha=5.0", "margin=balanced margin.alpha=0.3"}
    assert_finished(metrics_rows, found["margin=balanced margin.alpha=0.3"], "balanced", alpha=0.3)
    crashed = found["margin=balanced margin.alpha=5.0"]
    assert not (crashed / "results.json").exists()
    failed = json.loads((crashed / "failed.json").read_text())
    assert failed["error"].startswith("ConfigError") and ALPHA_ERROR in failed["error"]
    assert "Traceback" in failed["traceback"]

    # the main table at the crashed alpha: the balanced cell is failed, in Markdown and CSV
    markdown, rows = collect(sweep_dir, tmp_path / "at_5", "--alpha", "5")
    assert "2 runs: 1 finished, 1 failed, 0 incomplete" in markdown
    assert table_row(markdown, "hinge")[3] == "failed (1)"
    row = rows["hinge"]
    assert (row["balanced_n"], row["balanced_failed"], row["balanced_mean"]) == ("0", "1", "")
    assert "## Runs that did not finish" in markdown
    failed_line = next(line for line in markdown.splitlines() if "failed: ConfigError" in line)
    assert f"`{crashed.name}`" in failed_line and "hinge / balanced" in failed_line

    # the default table (alpha 0.3) keeps the finished run; the gap-adaptor table marks alpha=5
    markdown, rows = collect(sweep_dir, tmp_path / "default")
    assert table_row(markdown, "hinge")[3].endswith("(n=1)")
    assert (rows["hinge"]["balanced_n"], rows["hinge"]["balanced_failed"]) == ("1", "0")
    gap = markdown.split("## Gap adaptor", 1)[1]
    header = table_row("\n" + gap, "loss")
    cells = table_row("\n" + gap, "hinge")
    assert cells[header.index("alpha=5")] == "failed (1)"
    assert cells[header.index("alpha=0.3")].endswith("(n=1)")


def test_two_cell_sweep_in_parallel_with_joblib(
    metrics_rows, tmp_path: Path, arithmetic_pairs: Path
) -> None:
    sweep_dir = tmp_path / "sweep"
    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(f'{{"prompt": "{a}+1=", "answer": {a + 1}}}\n' for a in range(4)))
    result = sweep(
        sweep_dir,
        arithmetic_pairs,
        "loss=hinge",
        "margin=difference,balanced",
        "hydra/launcher=local_parallel",
        # a verifier the embedded task registers: a worker gets engine.train, run as __main__,
        # pickled by value without its module-level imports, and must register it all the same
        "benchmark=[arithmetic]",
        f"benchmark.arithmetic.path={problems}",
        "benchmark.arithmetic.max_new_tokens=4",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in result.stdout + result.stderr
    found = jobs(sweep_dir, "margin")
    assert set(found) == {"margin=difference", "margin=balanced"}
    assert_finished(metrics_rows, found["margin=difference"], "difference")
    assert_finished(metrics_rows, found["margin=balanced"], "balanced")
    launcher = yaml.safe_load((sweep_dir / "multirun.yaml").read_text())["hydra"]["launcher"]
    assert launcher["_target_"].endswith("JoblibLauncher") and launcher["n_jobs"] == 2


def test_a_parallel_sweeps_jobs_know_the_registered_data_sources(tmp_path: Path) -> None:
    """local_parallel pickles engine.train's ``run`` by value (the command runs as __main__), so
    its workers never run that module's imports: the data sources registered by importing
    engine.task (``math``, ``reasoning_gym``) must still be known there. The job fails on purpose
    inside the reasoning-gym source (a test split of 0 problems), before any model or data."""
    sweep_dir = tmp_path / "sweep"
    result = run(
        "-m",
        "engine.train",
        "-m",
        "hydra/launcher=local_parallel",
        "hydra.launcher.n_jobs=2",  # 1 would run the job in this process (joblib)
        "model=tiny",
        "data=reasoning_gym",
        "data.problems.sizes.test=0",
        "seed=0",
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert result.returncode != 0
    (failed,) = sweep_dir.glob("*/failed.json")
    error = json.loads(failed.read_text())["error"]
    assert "unknown data source" not in error
    assert error.startswith("ConfigError") and "data.problems.sizes.test" in error, error
