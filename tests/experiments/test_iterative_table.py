"""experiments.tables.iterative on a fake ``+experiment=iterative`` sweep (tmp_path) whose cells'
``results.json`` are written by ``engine.rounds.cell_results`` itself (so the table reads what
the pipeline writes), and the table's place in the reproduce plan and the CLI.

Hand-worked numbers (held-out accuracy %, seeds 0, 1, 2; round 0, the SFT model, is 40 %):

- round 1: dpo 38, 40, 36; bpo 44, 43, 45: bpo - dpo paired = 6, 3, 9: mean 6, sd 3, 95%
  interval 6 ± t_{0.975,2} * 3 / sqrt(3) = 6 ± 7.45 -> [-1.5, +13.5];
- round 2: dpo 30, 32, 28; bpo 50, 50, 50: paired 20, 18, 22 -> mean +20.0, sd 2,
  interval 20 ± 4.97 -> [+15.0, +25.0]; chosen_nll 41 every seed in both rounds: +3.0 in
  round 1 (3, 1, 5), +11.0 in round 2 (11, 9, 13);
- chosen reward: dpo -0.2 each round, bpo +0.1, chosen_nll +0.05; pairs: 300 - 10 x round for
  every method, all correct 10 x round, all wrong 200; sample accuracy 20 + 5 x round %.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from experiments.tables import iterative, plan
from experiments.tables.collect import collect
from experiments.tables.report import write_table

ACCURACY = {  # per round (1, 2) per seed
    "dpo": ((0.38, 0.40, 0.36), (0.30, 0.32, 0.28)),
    "bpo": ((0.44, 0.43, 0.45), (0.50, 0.50, 0.50)),
    "chosen_nll": ((0.41, 0.41, 0.41), (0.41, 0.41, 0.41)),
}
REWARD = {"dpo": -0.2, "bpo": 0.1, "chosen_nll": 0.05}
START = 0.40


def round_rows(method: str, seed: int) -> list[dict]:
    """``rounds.jsonl`` rows as engine.iterate writes them."""

    def evaluation(accuracy: float) -> dict:
        return {
            "accuracy": accuracy,
            "stderr": 0.0245,
            "n": 400,
            "benchmarks": {"arithmetic": {"accuracy": accuracy, "n": 400, "stderr": 0.0245}},
        }

    rows = [{"round": 0, "policy": "sft", "eval": evaluation(START), "seconds": {"eval": 5.0}}]
    for number, by_seed in enumerate(ACCURACY[method], start=1):
        rows.append(
            {
                "round": number,
                "policy": f"round_{number}/train/final_model",
                "pairs": {
                    "prompts": 512,
                    "pairs": 300 - 10 * number,
                    "sample_accuracy": 0.2 + 0.05 * number,
                    "all_correct_prompts": 10 * number,
                    "all_wrong_prompts": 200,
                },
                "train": {"loss": 0.6, "chosen_reward": REWARD[method], "rejected_reward": -1.0}
                | {"reward_accuracy": 0.9, "chosen_logp": -5.0, "chosen_reward_below_zero": 0.2},
                "eval": evaluation(by_seed[seed]),
                "seconds": {"sample": 30.0, "train": 6.0, "eval": 5.0},
            }
        )
    return rows


def fake_pipeline(compose_config, d: Path, method: str, seed: int) -> None:
    from omegaconf import OmegaConf

    from engine.rounds import cell_results

    cfg = compose_config(
        ["+experiment=iterative", f"method={method}", f"seed={seed}", "iterate.rounds=2"],
        config_name="iterate",
    )
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    (d / "results.json").write_text(json.dumps(cell_results(cfg, round_rows(method, seed), 9.0)))


@pytest.fixture
def sweep(tmp_path: Path, compose_config) -> Path:
    root = tmp_path / "sweeps"
    n = 0
    for method in ACCURACY:
        for seed in (0, 1, 2):
            fake_pipeline(compose_config, root / "iterative" / str(n), method, seed)
            n += 1
    # a pipeline still running (a fourth seed): counted, not averaged
    (root / "iterative" / str(n) / ".hydra").mkdir(parents=True)
    (root / "iterative" / str(n) / ".hydra" / "config.yaml").write_text(
        yaml.safe_dump({"method": {"name": "bpo"}, "loss": {"name": "hinge"}, "seed": 3})
    )
    return root


def test_rounds_compare_each_method_with_dpo_by_seed(sweep: Path) -> None:
    runs = collect([sweep / "iterative"])
    results = json.loads((sweep / "iterative" / "3" / "results.json").read_text())
    assert results["eval"]["accuracy"] == 0.50 and results["start"]["accuracy"] == START
    table = iterative.build(runs)
    assert [r.method for r in table.rows] == ["dpo", "bpo", "chosen_nll"]
    assert table.rounds == [1, 2]
    assert table.start.mean == pytest.approx(40.0) and table.start.n == 400
    dpo, bpo, control = table.rows
    assert dpo.objective == "logistic x difference" and bpo.objective == "hinge x balanced"
    assert dpo.rounds[2].accuracy.summary.mean == pytest.approx(30.0)
    first, second = bpo.rounds[1].vs_dpo, bpo.rounds[2].vs_dpo
    assert first.mean == pytest.approx(6.0) and first.n == 3
    half = 4.302652729749464 * 3 / math.sqrt(3)  # t_{0.975, 2} sd / sqrt(n)
    assert (first.ci_low, first.ci_high) == pytest.approx((6 - half, 6 + half))
    assert second.mean == pytest.approx(20.0)
    assert second.ci_high - second.ci_low == pytest.approx(2 * 4.302652729749464 * 2 / 3**0.5)
    assert control.rounds[1].vs_dpo.mean == pytest.approx(3.0)
    assert control.rounds[2].vs_dpo.mean == pytest.approx(11.0)
    assert bpo.rounds[1].accuracy.incomplete == 1  # the fourth seed, still running
    assert dpo.rounds[1].chosen_reward.mean == pytest.approx(-0.2)
    assert bpo.rounds[2].counts["pairs"].mean == pytest.approx(280.0)
    assert bpo.rounds[2].sample_accuracy.mean == pytest.approx(30.0)
    assert bpo.rounds[1].sample_accuracy.mean == pytest.approx(25.0)
    assert bpo.rounds[2].counts["all_correct_prompts"].mean == pytest.approx(20.0)
    assert bpo.rounds[1].seconds["sample"].mean == pytest.approx(30.0)

    md = iterative.render_markdown(table)
    assert "Round 0 (the SFT model, greedy): 40.0 ± 2.5 (binomial stderr, n=400" in md
    assert "| dpo | logistic x difference | 40.0 | 38.0 ± 2.0 (n=3) | 30.0 ± 2.0 (n=3) |" in md
    assert "| bpo | hinge x balanced | 40.0 | 44.0 ± 1.0 (n=3, 1 incomplete) |" in md
    assert "| bpo | +6.0 [-1.5, +13.5] (n=3) | +20.0 [+15.0, +25.0] (n=3) |" in md
    assert "| dpo | (baseline) | (baseline) |" in md
    assert "| chosen_nll | 2 | 41.0 ± 0.0 (n=3) | +0.050 ± 0.000 | 30.0 | 280 | 20 | 200 |" in md
    assert "| bpo | 1 | 30 | 6 | 5 |" in md  # seconds per phase


def test_write_table_writes_the_iterative_report(sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    md = write_table("iterative", sweep, out)
    assert md == out / "iterative.md"
    assert "![rounds](rounds.png)" in md.read_text()
    assert (out / "rounds.png").stat().st_size > 0
    header, *rows = (out / "iterative.csv").read_text().splitlines()
    assert header.startswith("method,objective,round,start,mean,std,n,failed,vs_dpo_mean")
    assert len(rows) == 3 * 2
    bpo_round_2 = dict(zip(header.split(","), rows[3].split(","), strict=True))
    assert (bpo_round_2["method"], bpo_round_2["round"]) == ("bpo", "2")
    assert float(bpo_round_2["vs_dpo_mean"]) == pytest.approx(20.0)


def test_the_cli_reads_one_sweep_or_a_root(sweep: Path, tmp_path: Path, capsys) -> None:
    from experiments.tables.__main__ import main

    assert main(["iterative", str(sweep), "--out", str(tmp_path / "a")]) == 0
    assert "a sweep root, its folders iterative" in capsys.readouterr().err
    assert main(["iterative", str(sweep / "iterative"), "--out", str(tmp_path / "b")]) == 0
    assert "one sweep, every run under it" in capsys.readouterr().err
    assert (tmp_path / "a" / "iterative.md").read_text() == (
        tmp_path / "b" / "iterative.md"
    ).read_text()


def test_the_iterative_table_is_planned_only_when_asked() -> None:
    assert "iterative" not in plan.DEFAULT_TABLES
    planned, _ = plan.plan(["iterative"])
    assert [p.name for p in planned] == ["iterative"]
    assert planned[0].grid == {"method": ["dpo", "bpo", "chosen_nll"], "seed": ["0", "1", "2"]}
    assert planned[0].sweep.command == "engine.iterate"
    assert plan.preparations(planned) == [["model=tiny"]]  # the embedded task's SFT model


def test_reproduce_runs_the_pipelines_with_engine_iterate(tmp_path: Path, capsys) -> None:
    from experiments.reproduce import main

    root = tmp_path / "s"
    assert main(["--dry-run", "--table", "iterative", "--sweep-root", str(root)]) == 0
    commands = [line for line in capsys.readouterr().out.splitlines() if line.startswith("$ ")]
    assert len(commands) == 2
    assert "experiments.prepare_task model=tiny" in commands[0]
    assert "-m engine.iterate -m +experiment=iterative " in commands[1]
    assert f"hydra.sweep.dir={root / 'iterative'}" in commands[1] and "seed=0,1,2" in commands[1]
