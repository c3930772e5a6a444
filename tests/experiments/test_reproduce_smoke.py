"""``python -m experiments.reproduce`` end to end on one tiny cell: the task is built in an empty
cache (tests/conftest.py's TINY_TASK), one methods-table run trains with periodic
evaluation, and the table's directory gets its report, CSVs, convergence, costs and provenance;
``--dry-run`` prints the whole plan and runs nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.runtime.distributed import without_launcher_env
from experiments.reproduce import main

REPO = Path(__file__).resolve().parents[2]


def test_dry_run_prints_every_sweep_once(tmp_path, capsys):
    assert main(["--dry-run", "--sweep-root", str(tmp_path / "s"), "--jobs", "2"]) == 0
    out = capsys.readouterr().out
    for preset in ("ablation", "ablation_control", "ablation_alpha", "methods", "scale"):
        assert out.count(f"+experiment={preset} ") == 1, preset
    assert out.count("experiments.prepare_task") == 3  # one task per model size
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_reproduce_one_tiny_cell(tmp_path, tiny_task_overrides):
    # every launcher variable off: a process group started in this pytest process (an earlier
    # in-process test) leaves MASTER_PORT set to the port its store still listens on
    env = without_launcher_env() | {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    out = tmp_path / "results"
    cmd = [
        sys.executable,
        "-m",
        "experiments.reproduce",
        "--table",
        "methods",
        "--jobs",
        "1",
        "--seeds",
        "0",
        "--sweep-root",
        str(tmp_path / "sweeps"),
        "--out",
        str(out),
        *tiny_task_overrides,
        "method=dpo",
        "trainer.max_steps=4",
        "trainer.micro_batch_size=4",
        "trainer.eval_every=2",
        "trainer.log_every=1",
    ]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = out / "methods"
    md = (table / "methods.md").read_text()
    assert "| dpo | logistic x difference | 41.0 |" in md and "(n=1)" in md
    assert "# Convergence" in md and "# Cost per run" in md and "## Provenance" in md
    run = next((tmp_path / "sweeps" / "methods").rglob("results.json"))
    results = json.loads(run.read_text())
    phases = ("startup", "reference", "train", "eval", "diagnostics", "export")
    assert set(results["timings"]) == {f"{phase}_s" for phase in phases}
    curve = [json.loads(line) for line in (run.parent / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in curve if "eval/accuracy" in r] == [2, 4]
    costs = (table / "costs.csv").read_text().splitlines()
    assert len(costs) == 2 and costs[1].startswith("dpo,0,")
    provenance = json.loads((table / "provenance.json").read_text())
    assert provenance["table"] == "methods" and provenance["exit_statuses"]["methods"] == 0
    assert (table / "accuracy.png").is_file() and (table / "convergence.png").is_file()
