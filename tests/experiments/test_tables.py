"""experiments.tables on fake sweeps laid out as ``make reproduce`` lays them out (tmp_path).

Hand-worked numbers (accuracy %, seeds 0, 1, 2):

- dpo (the ablation's logistic x difference): 40, 42, 44; bpo (hinge x balanced at 0.3): 50, 51, 52;
  so bpo - dpo paired = 10, 9, 8: mean 9, sd 1, 95% CI 9 ± t_{0.975,2} / sqrt(3) = 9 ± 2.484.
- convergence (SFT 40 %, target 50 %): a seed at 45, 52, 60 % at steps 10, 20, 30 reaches it at
  step 20, one at 50, 55, 58 % at step 10, one at 41, 42, 43 % never: 2/3, mean 15, sd 7.07.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pytest
import yaml

from experiments.tables import convergence, costs, hypothesis, methods, plan, scale
from experiments.tables.__main__ import main
from experiments.tables.collect import Sweeps, TableError, collect
from experiments.tables.report import write_table
from experiments.tables.select import method_of, size_of

DPO = {0: 0.40, 1: 0.42, 2: 0.44}
BPO = {0: 0.50, 1: 0.51, 2: 0.52}
CURVES = {0: (0.45, 0.52, 0.60), 1: (0.50, 0.55, 0.58), 2: (0.41, 0.42, 0.43)}
TIMINGS = {"startup_s": 2.0, "reference_s": 1.0, "train_s": 6.0, "eval_s": 3.0, "export_s": 0.5}


def fake_run(
    d: Path,
    *,
    seed: int,
    accuracy: float | None = None,
    loss: str = "logistic",
    margin: str = "difference",
    alpha: float = 0.3,
    beta: float = 0.1,
    method: str | None = None,
    optimizer: str = "adamw",
    hidden: int = 128,
    layers: int = 4,
    curve: tuple[float, ...] = (),
    extra_rows: tuple[dict, ...] = (),
    status: str = "finished",
) -> Path:
    """One job dir: .hydra/config.yaml, and results.json + metrics.jsonl unless failed."""
    (d / ".hydra").mkdir(parents=True)
    cfg = {
        "loss": {"name": loss},
        "margin": {"name": margin, "alpha": alpha},
        "method": {"name": method},
        "beta": beta,
        "seed": seed,
        "model": {
            "name_or_path": None,
            "tokenizer": None,
            "dtype": "float32",
            "trust_remote_code": False,
            "attn_implementation": None,
            "gradient_checkpointing": False,
            "tiny": {
                "hidden_size": hidden,
                "intermediate_size": 3 * hidden,
                "num_layers": layers,
                "num_heads": 4,
                "num_kv_heads": None,
                "max_position_embeddings": 256,
                "tie_word_embeddings": True,
            },
        },
        "trainer": {"optimizer": optimizer, "eval_every": 10},
    }
    (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    if status == "failed":
        (d / "failed.json").write_text(json.dumps({"error": "RuntimeError: boom"}))
        return d
    rows = [
        {"step": 10 * (i + 1), "eval/accuracy": a, "eval/chosen_reward": 0.1 * i}
        for i, a in enumerate(curve)
    ] + list(extra_rows)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = {
        "loss": loss,
        "margin": margin,
        "method": method,
        "beta": beta,
        "alpha": alpha,
        "seed": seed,
        "eval": {"accuracy": accuracy, "chosen_reward": -0.5},
        "sft": {"accuracy": 0.40, "in_band": True},
        "timings": TIMINGS,
    }
    (d / "results.json").write_text(json.dumps(results))
    return d


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """ablation/ (plain cells, the control), methods/ (method runs, a failed kto, a repeated dpo
    seed), scale/ (hidden 64 dpo / bpo), hypothesis/ (SGD balanced cells)."""
    r = tmp_path / "sweeps"
    n = iter(range(1000))

    def job(sweep: str, **kw) -> Path:
        return fake_run(r / sweep / "2026-01-01" / str(next(n)), **kw)

    for s in (0, 1, 2):
        job("ablation/ablation", seed=s, accuracy=DPO[s], curve=CURVES[s])
        job("ablation/ablation", seed=s, accuracy=BPO[s], loss="hinge", margin="balanced")
        job("ablation/ablation", seed=s, accuracy=0.41, loss="hinge")
        job("ablation/ablation", seed=s, accuracy=0.55, loss="logistic", margin="balanced")
        job(
            "ablation/ablation_alpha",
            seed=s,
            accuracy=0.3,
            loss="hinge",
            margin="balanced",
            alpha=1.0,
        )
        job("ablation/ablation_control", seed=s, accuracy=0.60, method="chosen_nll")
        job("methods", seed=s, accuracy=0.45 + 0.01 * s, loss="ipo", method="ipo")
        job("methods", seed=s, accuracy=0.30, method="simpo", beta=2.0)
        job(
            "methods",
            seed=s,
            accuracy=0.35,
            loss="kto",
            method="kto",
            status="failed" if s == 2 else "finished",
        )
        job("scale", seed=s, accuracy=DPO[s] - 0.1, method="dpo", hidden=64, layers=3)
        job(
            "scale",
            seed=s,
            accuracy=BPO[s] - 0.1,
            method="bpo",
            loss="hinge",
            margin="balanced",
            hidden=64,
            layers=3,
        )
        for i, loss in enumerate(("logistic", "hinge")):
            z = {"step": 5, "train/margin": 0.02 * (i + 1), "train/grad_weight_chosen": -0.5}
            job(
                "hypothesis",
                seed=s,
                accuracy=0.3 + 0.1 * i,
                loss=loss,
                margin="balanced",
                optimizer="sgd",
                extra_rows=(z,),
            )
    job("methods", seed=0, accuracy=0.99, method="dpo")  # a seed the ablation ran already
    return r


def test_method_of_names_the_ablation_cells_by_their_objective(root):
    runs = collect([root / "ablation"])
    named = {(r.loss, r.margin, r.alpha, r.method): method_of(r) for r in runs}
    assert named[("logistic", "difference", None, None)] == "dpo"
    assert named[("hinge", "difference", None, None)] == "slic"
    assert named[("hinge", "balanced", 0.3, None)] == "bpo"
    assert named[("hinge", "balanced", 1.0, None)] is None  # not the paper's alpha
    assert named[("logistic", "balanced", 0.3, None)] is None  # no method is this cell
    assert named[("logistic", "difference", None, "chosen_nll")] == "chosen_nll"


def test_methods_table_paper_rows_first_paired_against_dpo(root):
    table = methods.build(collect([root / "ablation", root / "methods"]))
    names = [r.method for r in table.rows]
    assert names[:6] == ["dpo", "ipo", "slic", "cal_dpo", "dpop", "bpo"]
    assert names[-1] == "chosen_nll" and {"simpo", "kto"} <= set(names[6:-1])
    rows = {r.method: r for r in table.rows}
    assert [rows[m].paper for m in names[:6]] == [41.0, 43.1, 41.7, 43.6, 44.9, 46.7]
    assert rows["simpo"].paper is None and rows["cal_dpo"].cell.empty
    # dpo: the ablation's runs; the methods sweep's repeat of seed 0 is not counted twice
    assert rows["dpo"].cell.values == pytest.approx([40.0, 42.0, 44.0])
    gain = rows["bpo"].vs_dpo
    assert (gain.n, gain.mean) == (3, pytest.approx(9.0))
    assert (gain.ci_low, gain.ci_high) == (
        pytest.approx(9 - 2.484, abs=1e-3),
        pytest.approx(9 + 2.484, abs=1e-3),
    )
    assert (rows["kto"].cell.summary.n, rows["kto"].cell.failed) == (2, 1)
    assert table.sft == pytest.approx(40.0)
    md = methods.render_markdown(table)
    assert "| dpo | logistic x difference | 41.0 | 42.0 ± 2.0 (n=3) | (baseline) |" in md
    assert "+9.0 [+6.5, +11.5] (n=3)" in md
    assert "| cal_dpo | - | 43.6 | missing | - | - |" in md  # not run: no number, not nan
    body = list(csv.DictReader(io.StringIO(methods.render_csv(table))))
    assert body[5]["method"] == "bpo" and float(body[5]["vs_dpo_mean"]) == pytest.approx(9.0)
    assert body[3]["mean"] == ""  # cal_dpo not run: empty, not 0


def test_scale_table_pairs_bpo_with_dpo_per_size(root):
    runs = [
        r for r in collect([root / "ablation", root / "scale"]) if method_of(r) in ("dpo", "bpo")
    ]
    table = scale.build(runs)
    assert [(r.size.hidden_size, r.size.num_layers) for r in table.rows] == [(64, 3), (128, 4)]
    small, base = table.rows
    assert small.parameters is not None and base.parameters / small.parameters > 4
    for row in table.rows:
        assert (row.gain.n, row.gain.mean) == (3, pytest.approx(9.0))
        assert row.sft == pytest.approx(40.0) and row.sft_in_band is True
    md = scale.render_markdown(table)
    assert "Qwen2.5-Math-1.5B | 28.2 | 38.3 | +10.1" in md
    assert "| hidden 64, 3 layers |" in md


def test_convergence_counts_the_steps_to_sft_plus_ten(root):
    runs = [r for r in collect([root / "ablation/ablation"]) if method_of(r) == "dpo"]
    assert [convergence.first_step(r) for r in sorted(runs, key=lambda r: r.seed)] == [20, 10, None]
    (row,) = convergence.build({"dpo": runs})
    assert (row.reached, row.finished, row.eval_every) == (2, 3, 10)
    assert (row.steps.mean, row.steps.std) == (15.0, pytest.approx(math.sqrt(50)))
    assert "| dpo | 15 ± 7 | 2/3 | 10 |" in convergence.render_markdown([row], "t")


def test_costs_sum_each_phase_over_runs(root):
    runs = collect([root / "methods"])
    sums, n = costs.totals(runs)
    assert n == 9  # 10 runs, one failed
    assert sums == {p: pytest.approx(9 * TIMINGS[f"{p}_s"]) for p in costs.PHASES}
    md = costs.render_markdown({"all": runs}, "t")
    assert "| **share** |  | 16% | 8% | 48% | 24% | 4% |" in md


def test_costs_count_the_diagnostics_as_training(tmp_path):
    """results.json books the gradient-weight diagnostics apart (``diagnostics_s``); the cost
    table's ``train`` is the steps' whole time, so they are added back."""
    run_dir = fake_run(tmp_path / "run", seed=0, accuracy=0.5)
    results = json.loads((run_dir / "results.json").read_text())
    results["timings"] = {**TIMINGS, "train_s": 5.75, "diagnostics_s": 0.25}
    (run_dir / "results.json").write_text(json.dumps(results))
    sums, n = costs.totals(collect([run_dir]))
    assert n == 1 and sums["train"] == pytest.approx(6.0) and sums["eval"] == 3.0


def test_hypothesis_compares_the_optimizers_cells(root):
    table = hypothesis.build(collect([root / "ablation", root / "hypothesis"]))
    cells = {(c.optimizer, c.loss): c for c in table.cells}
    assert set(cells) == {
        ("adamw", "logistic"),
        ("adamw", "hinge"),
        ("sgd", "logistic"),
        ("sgd", "hinge"),
    }
    assert cells[("adamw", "hinge")].cell.values == pytest.approx([50.0, 51.0, 52.0])
    assert cells[("sgd", "hinge")].z_mean == pytest.approx(0.04)
    assert cells[("sgd", "hinge")].weight_chosen == pytest.approx(-0.5)
    assert table.spread["adamw"]["range"] == pytest.approx(4.0)  # logistic 55 vs hinge 51
    assert table.spread["sgd"]["range"] == pytest.approx(10.0)
    assert "span 4.0 points under AdamW and 10.0 under SGD" in hypothesis.render_markdown(table)


@pytest.mark.parametrize("name", ["ablation", "methods", "scale", "hypothesis"])
def test_write_table_writes_every_file(root, tmp_path, name):
    out = tmp_path / "out" / name
    md = write_table(name, root, out)
    assert md == out / f"{name}.md"
    text = md.read_text()
    assert "# Convergence" in text and "# Cost per run" in text
    for f in ("convergence.csv", "costs.csv", f"{name}.csv"):
        assert (out / f).is_file(), f
    assert (out / "convergence.png").is_file() == (name != "hypothesis")  # no eval curves there


def test_plan_runs_each_cell_once():
    planned, notes = plan.plan(list(plan.TABLE_SWEEPS))
    by_name = {p.name: p for p in planned}
    assert list(by_name) == [
        "ablation",
        "ablation_control",
        "ablation_alpha",
        "methods",
        "scale",
        "hypothesis",
        "real",
        "iterative",
    ]
    kept = by_name["methods"].grid["method"]
    assert not {"dpo", "slic", "bpo", "chosen_nll"} & set(kept) and "orpo" in kept
    assert f"method={','.join(kept)}" in by_name["methods"].overrides
    assert by_name["scale"].overrides == ["model=tiny_small,tiny_medium"]
    assert plan.task_models(planned) == ["tiny", "tiny_small", "tiny_medium"]
    assert any("dpo,slic,bpo comes from the ablation" in n for n in notes)
    alone, _ = plan.plan(["methods"])  # alone, a table runs its whole grid
    assert alone[0].overrides == [] and "dpo" in alone[0].grid["method"]
    with pytest.raises(ValueError, match="unknown tables"):
        plan.plan(["nope"])


def test_size_of_reads_the_tiny_architecture(root):
    runs = collect([root / "scale"])
    assert {size_of(r).label for r in runs} == {"hidden 64, 3 layers"}


def test_a_sweep_root_and_one_sweep_are_told_apart(root, tmp_path):
    """make reproduce's root reads the table's folders; one of its folders, or a sweep of one's
    own, is one sweep whose every run counts."""
    found = Sweeps.find(root)
    assert found.is_root and found.dirs("methods") == [root / "ablation", root / "methods"]
    # ablation/ holds ablation/, ablation_control/ and ablation_alpha/: one sweep, not a root
    inner = Sweeps.find(root / "ablation")
    assert not inner.is_root and inner.dirs("ablation") == [root / "ablation"]
    assert len(inner.runs("ablation")) == 18  # the three sweeps' 6 runs per seed
    assert not Sweeps.find(root / "methods").is_root
    with pytest.raises(TableError, match="does not exist"):
        Sweeps.find(tmp_path / "nope")


def test_one_command_writes_every_table_from_a_root_or_one_sweep(root, tmp_path, capsys):
    for name in ("ablation", "methods", "scale", "hypothesis"):
        assert main([name, str(root), "--out", str(tmp_path / name)]) == 0
        assert (tmp_path / name / f"{name}.md").is_file()
        assert f"reading {root}: a sweep root" in capsys.readouterr().err
    # the methods sweep alone: its runs only (no dpo from the ablation), default out inside it
    assert main(["methods", str(root / "methods")]) == 0
    md = (root / "methods" / "methods-report" / "methods.md").read_text()
    assert "| ipo |" in md and "| dpo | logistic x difference | 41.0 | 99.0 (n=1) |" in md
    # the ablation's options belong to the ablation
    with pytest.raises(SystemExit) as error:
        main(["methods", str(root), "--metric", "eval.accuracy"])
    assert error.value.code == 2
