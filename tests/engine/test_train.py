"""End-to-end runs of ``engine.train.train`` in this process on the tiny model and tiny pairs.

Each run is two optimizer steps of two pairs on a 4-layer, 128-wide Llama (well under a second
once DeepSpeed is imported). At step 1 the policy equals the reference, so every implicit reward is
exactly 0 and the logged loss is f(0): a check of the wiring that does not trust the engine.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from hydra.errors import HydraException
from omegaconf import OmegaConf

from engine.config import ConfigError
from engine.data.loading import BadRowError
from engine.runtime.machine import machine_info
from engine.train import _summary_line, train
from losses import LOSSES, MARGINS

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
METHODS = sorted(p.stem for p in (CONF_DIR / "method").glob("*.yaml") if p.stem != "none")
CELLS = [(loss, margin) for loss in sorted(LOSSES) for margin in sorted(MARGINS)]

#: what metrics.jsonl must show at every logged train step (the DCR effect and the basics)
DCR_KEYS = (
    "train/loss",
    "train/chosen_reward",
    "train/rejected_reward",
    "train/reward_accuracy",
    "train/margin",
    "train/chosen_logp",
    "train/rejected_logp",
    "train/chosen_reward_below_zero",
    "train/lr",
)
EVAL_KEYS = tuple(k.replace("train/", "eval/") for k in DCR_KEYS if k != "train/lr")
RESULT_TRAIN_KEYS = ("chosen_reward", "rejected_reward", "reward_accuracy", "loss")


def assert_finite(values: dict, where: str) -> None:
    bad = {k: v for k, v in values.items() if not (isinstance(v, int | float) and math.isfinite(v))}
    assert not bad, f"{where}: non-finite metrics {bad}"


# ---- (a) every loss x margin cell ---------------------------------------------------------------


@pytest.mark.parametrize(("loss", "margin"), CELLS, ids=[f"{l}-{m}" for l, m in CELLS])
def test_every_cell_trains(metrics_rows, tmp_path, train_run, loss, margin):
    results, run_dir = train_run(
        tmp_path / "run",
        f"loss={loss}",
        f"margin={margin}",
        "margin.alpha=0.5",
        "trainer.tensorboard=false",
        "trainer.export=false",
    )
    assert (results["loss"], results["margin"], results["steps"]) == (loss, margin, 2)
    assert (results["beta"], results["alpha"]) == (0.1, 0.5)
    rows = metrics_rows(run_dir, "train/loss")
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert_finite({k: row[k] for k in DCR_KEYS}, f"{loss} x {margin}, step {row['step']}")

    # step 1: policy == reference, so z = 0 for both margins and the loss is exactly f(0)
    first, second = rows
    f0 = LOSSES[loss](torch.zeros(1)).item()
    assert first["train/loss"] == pytest.approx(f0, abs=1e-6)
    assert first["train/chosen_reward"] == first["train/rejected_reward"] == 0.0
    assert first["train/chosen_reward_below_zero"] == 0.0
    # step 2: every f has f'(0) < 0, so the first update moved the policy away from the reference
    assert abs(second["train/chosen_reward"]) + abs(second["train/rejected_reward"]) > 1e-6
    assert results["train"]["loss"] == second["train/loss"]


# ---- (b) every named method -------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains(metrics_rows, tmp_path, train_run, method):
    results, run_dir = train_run(
        tmp_path / "run", f"method={method}", "trainer.tensorboard=false", "trainer.export=false"
    )
    assert results["method"] == method
    config = OmegaConf.load(run_dir / "config.yaml")
    assert (results["loss"], results["margin"]) == (config.loss.name, config.margin.name)
    rows = metrics_rows(run_dir, "train/loss")
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert_finite({k: row[k] for k in DCR_KEYS}, f"method={method}, step {row['step']}")
    assert rows[0]["train/loss"] != rows[1]["train/loss"]  # the update changed something
    if method == "chosen_nll":  # only the chosen response's mean token NLL: positive
        assert all(r["train/loss"] > 0 for r in rows)


# ---- (c) the run directory ----------------------------------------------------------------------


def test_run_directory_contents(metrics_rows, tmp_path, train_run, pair_files):
    results, run_dir = train_run(
        tmp_path / "run",
        "beta=0.2",
        "seed=3",
        "trainer.eval_every=2",
        "trainer.save_every=1",
        "trainer.keep_checkpoints=2",
        eval=True,
        steps=3,
    )
    rows = metrics_rows(run_dir)
    trains, evals = metrics_rows(run_dir, "train/loss"), metrics_rows(run_dir, "eval/loss")
    assert len(rows) == len(trains) + len(evals)

    # metrics.jsonl: every logged step has the DCR metrics, with values that hang together
    assert [r["step"] for r in trains] == [1, 2, 3]
    for row in trains:
        assert_finite({k: row[k] for k in DCR_KEYS}, f"step {row['step']}")
        assert 0.0 <= row["train/chosen_reward_below_zero"] <= 1.0
        assert 0.0 <= row["train/reward_accuracy"] <= 1.0
        assert row["train/lr"] == pytest.approx(1e-4)
        assert row["train/chosen_logp"] < 0 and row["train/rejected_logp"] < 0
        # margin=difference: z = beta (r_w - r_l) = chosen_reward - rejected_reward (means)
        assert row["train/margin"] == pytest.approx(
            row["train/chosen_reward"] - row["train/rejected_reward"], abs=1e-6
        )
    assert trains[0]["train/chosen_reward"] == trains[0]["train/rejected_reward"] == 0.0
    assert trains[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert trains[-1]["train/epoch"] == pytest.approx(3 * 2 / 16)
    assert any(r["train/chosen_reward"] != 0.0 for r in trains[1:])

    assert [r["step"] for r in evals] == [2, 3]
    for row in evals:
        assert_finite({k: row[k] for k in EVAL_KEYS}, f"eval at step {row['step']}")
        assert 0.0 <= row["eval/chosen_reward_below_zero"] <= 1.0
        assert row["eval/margin"] == pytest.approx(
            row["eval/chosen_reward"] - row["eval/rejected_reward"], abs=1e-6
        )

    # results.json: what train() returned, with the last logged windows
    on_disk = json.loads((run_dir / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    for key in ("loss", "margin", "beta", "alpha", "seed", "steps", "wall_seconds", "world_size"):
        assert key in on_disk, key
    assert (on_disk["loss"], on_disk["margin"], on_disk["method"]) == (
        "logistic",
        "difference",
        None,
    )
    assert (on_disk["beta"], on_disk["alpha"], on_disk["seed"], on_disk["steps"]) == (
        0.2,
        1.0,
        3,
        3,
    )
    assert on_disk["world_size"] == 1 and on_disk["wall_seconds"] > 0
    # the machine, so that numbers from different CPUs can be told apart
    here = machine_info()
    assert on_disk["machine"].keys() == here.keys()
    assert {k: on_disk["machine"][k] for k in ("cpu", "cpu_id", "cpu_capability", "torch")} == {
        k: here[k] for k in ("cpu", "cpu_id", "cpu_capability", "torch")
    }
    # the wall time's split by phase: every phase booked, none negative, none beyond the total
    timings = on_disk["timings"]
    phases = {"startup_s", "reference_s", "train_s", "eval_s", "diagnostics_s", "export_s"}
    assert set(timings) == phases
    assert all(v >= 0 for v in timings.values()), timings
    assert timings["eval_s"] > 0 and timings["train_s"] > 0 and timings["reference_s"] > 0
    assert timings["diagnostics_s"] > 0  # the gradient weights of the logged steps
    assert sum(timings.values()) <= on_disk["wall_seconds"] + 1e-3
    for key in RESULT_TRAIN_KEYS:
        assert on_disk["train"][key] == trains[-1][f"train/{key}"], key
    for key in ("reward_accuracy", "chosen_reward", "rejected_reward", "loss"):
        assert on_disk["eval"][key] == evals[-1][f"eval/{key}"], key
    assert on_disk["data"]["train"] == {
        "source": str(pair_files.train),
        "rows_read": 16,
        "pairs": 16,
        "skipped": {},
        "truncated": 0,
    }
    assert on_disk["data"]["eval"]["pairs"] == 5

    # config.yaml: the composed config, fully resolved
    text = (run_dir / "config.yaml").read_text()
    assert "${" not in text
    saved = OmegaConf.load(run_dir / "config.yaml")
    assert saved.output_dir == str(run_dir)
    assert (saved.beta, saved.seed, saved.trainer.max_steps) == (0.2, 3, 3)
    assert saved.data.train == str(pair_files.train)
    assert saved.trainer.eval_every == 2 and saved.loss.name == "logistic"

    # checkpoints (keep 2 of 3), TensorBoard events, the exported model
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_3"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_2", "step_3"]
    assert all((checkpoints / name / "COMPLETE").is_file() for name in ("step_2", "step_3"))
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "final_model" / "model.safetensors").is_file()
    assert (run_dir / "final_model" / "config.json").is_file()


# ---- (d) determinism ----------------------------------------------------------------------------


def test_same_config_gives_identical_metrics(metrics_rows, tmp_path, train_run, metrics_match):
    first, run_a = train_run(tmp_path / "a", "trainer.tensorboard=false", eval=True, steps=3)
    second, run_b = train_run(tmp_path / "b", "trainer.tensorboard=false", eval=True, steps=3)
    metrics_match.rows(metrics_rows(run_b), metrics_rows(run_a), rtol=0.0)
    metrics_match.results(second, first, rtol=0.0)

    from safetensors.torch import load_file

    weights_a = load_file(run_a / "final_model" / "model.safetensors")
    weights_b = load_file(run_b / "final_model" / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)

    # and the comparison can fail: another seed gives another model and other metrics
    _, run_c = train_run(tmp_path / "c", "seed=1", "trainer.tensorboard=false", steps=3)
    with pytest.raises(AssertionError):
        metrics_match.rows(
            metrics_rows(run_c, "train/loss"), metrics_rows(run_a, "train/loss"), rtol=1e-6
        )


#: rewards near zero are beta x (a float32 sum of ~30 byte-token log-probs, about -170, minus the
#: reference's): float32 rounding of those sums (ulp 1.5e-5 above 128) reaches ~2e-6 in a reward,
#: more when the order of reductions changes (gradient accumulation, ZeRO-3's partitions)
REWARD_ATOL = 1e-5


def test_grad_accum_matches_a_bigger_micro_batch(metrics_rows, tmp_path, train_run, metrics_match):
    """Two micro steps of two pairs are one optimizer step over the same four pairs."""
    options = ("trainer.tensorboard=false", "trainer.export=false")
    _, big = train_run(tmp_path / "big", "trainer.micro_batch_size=4", *options, eval=True, steps=3)
    _, accum = train_run(
        tmp_path / "accum",
        "trainer.micro_batch_size=2",
        "trainer.grad_accum=2",
        *options,
        eval=True,
        steps=3,
    )
    metrics_match.rows(metrics_rows(accum), metrics_rows(big), rtol=1e-5, atol=REWARD_ATOL)
    assert metrics_rows(accum, "train/loss")[-1]["train/epoch"] == pytest.approx(3 * 4 / 16)


# ---- (e) ZeRO stages agree ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def zero0_run(tmp_path_factory, train_run):
    return train_run(
        tmp_path_factory.mktemp("zero0") / "run",
        "deepspeed=zero0",
        "trainer.tensorboard=false",
        "trainer.export=false",
        eval=True,
        steps=3,
    )


@pytest.mark.parametrize("stage", ["zero1", "zero2", "zero3", "zero3_offload"])
def test_zero_stages_match_zero0(
    metrics_rows, tmp_path, train_run, metrics_match, zero0_run, stage
):
    expected, expected_dir = zero0_run
    results, run_dir = train_run(
        tmp_path / "run",
        f"deepspeed={stage}",
        "trainer.tensorboard=false",
        "trainer.export=false",
        eval=True,
        steps=3,
    )
    # zero0 on fp32 CPU does not report a gradient norm (DeepSpeed keeps none): compare the rest
    metrics_match.rows(
        metrics_rows(run_dir),
        metrics_rows(expected_dir),
        rtol=1e-5,
        atol=REWARD_ATOL,
        ignore={"train/grad_norm"},
    )
    metrics_match.results(
        {s: {k: v for k, v in results[s].items() if k != "grad_norm"} for s in ("train", "eval")},
        expected,
        rtol=1e-5,
        atol=REWARD_ATOL,
    )
    assert (
        metrics_rows(run_dir, "train/loss")[-1]["train/chosen_reward"] != 0.0
    )  # the runs did train


# ---- (f) bad inputs -----------------------------------------------------------------------------


def test_unknown_loss_group_lists_the_options(compose_config, base_overrides, tmp_path):
    with pytest.raises(HydraException) as error:
        compose_config([*base_overrides(tmp_path), "loss=nonexistent"])
    message = str(error.value)
    assert "nonexistent" in message
    assert all(name in message for name in LOSSES), message


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        (["loss.name=nonexistent"], ["nonexistent", *LOSSES]),
        (["margin.name=nonexistent"], ["nonexistent", *MARGINS]),
        (["margin=balanced", "margin.alpha=0"], ["alpha", "(0, 1]"]),
        (["margin=balanced", "margin.alpha=1.5"], ["alpha", "(0, 1]", "1.5"]),
        (["beta=0"], ["beta", "> 0"]),
        (["beta=-0.5"], ["beta", "-0.5"]),
    ],
    ids=["loss-name", "margin-name", "alpha-0", "alpha-1.5", "beta-0", "beta-negative"],
)
def test_bad_objective_fails_before_training(
    tmp_path, compose_config, base_overrides, overrides, needles
):
    cfg = compose_config([*base_overrides(tmp_path / "run"), *overrides])
    with pytest.raises(ConfigError) as error:
        train(cfg)
    message = str(error.value)
    assert all(needle in message for needle in needles), message
    assert not (tmp_path / "run").exists()  # failed before creating anything


def test_missing_train_file(tmp_path, compose_config, base_overrides):
    missing = tmp_path / "nope" / "pairs.jsonl"
    cfg = compose_config([*base_overrides(tmp_path / "run"), f"data.train={missing}"])
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        train(cfg)


GOOD = {"prompt": "12+34=", "chosen": "2+4+0=6 c0|1+3+0=4 c0|#### 46", "rejected": "#### 47"}
BAD_ROWS = {  # case -> (bad line, reason key, words the error must contain)
    "malformed_json": ('{"prompt": "1+2=", "chosen": ', "invalid_json", ["invalid JSON"]),
    "missing_key": (
        json.dumps({"prompt": "1+2=", "chosen": "#### 3"}),
        "missing_key",
        ["missing key", "'rejected'"],
    ),
    "empty_response": (
        json.dumps({"prompt": "1+2=", "chosen": "   ", "rejected": "#### 4"}),
        "empty_response",
        ["empty", "'chosen'"],
    ),
    "chosen_equals_rejected": (
        json.dumps({"prompt": "1+2=", "chosen": "#### 3", "rejected": "#### 3"}),
        "identical_responses",
        ["identical"],
    ),
    "prompt_leaves_no_room": (
        json.dumps({"prompt": "1" * 600 + "+2=", "chosen": "#### 3", "rejected": "#### 4"}),
        "prompt_too_long",
        ["prompt is 604 tokens", "max_length=512"],
    ),
}


def write_with_bad_row(path: Path, bad_line: str, jsonl) -> Path:
    """Two good rows, a blank line, the bad row (file line 4), then six good rows."""
    return jsonl.write(path, [GOOD, GOOD, "", bad_line, *([GOOD] * 6)])


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_row_error_names_file_and_line(tmp_path, compose_config, base_overrides, jsonl, case):
    bad_line, reason, words = BAD_ROWS[case]
    data = write_with_bad_row(tmp_path / f"{case}.jsonl", bad_line, jsonl)
    cfg = compose_config(
        [*base_overrides(tmp_path / "run"), f"data.train={data}", "data.max_prompt_length=null"]
    )
    with pytest.raises(BadRowError) as error:
        train(cfg)
    message = str(error.value)
    assert f"{data}: line 4" in message, message
    assert all(word in message for word in words), message
    assert error.value.reason == reason


def test_bad_rows_skipped_and_counted(tmp_path, train_run, jsonl):
    lines = [GOOD] * 8 + [bad for bad, _, _ in BAD_ROWS.values()] + [BAD_ROWS["missing_key"][0]]
    data = jsonl.write(tmp_path / "mixed.jsonl", lines)
    results, run_dir = train_run(
        tmp_path / "run",
        f"data.train={data}",
        "data.on_bad_row=skip",
        "data.max_prompt_length=null",
        "trainer.tensorboard=false",
        "trainer.export=false",
    )
    report = results["data"]["train"]
    assert report["rows_read"] == 14 and report["pairs"] == 8
    assert report["skipped"] == {
        "invalid_json": 1,
        "missing_key": 2,
        "empty_response": 1,
        "identical_responses": 1,
        "prompt_too_long": 1,
    }
    assert json.loads((run_dir / "results.json").read_text())["data"]["train"] == report


def test_dataset_smaller_than_a_batch(tmp_path, compose_config, base_overrides, jsonl):
    data = jsonl.write(tmp_path / "tiny.jsonl", [GOOD] * 3)
    cfg = compose_config(
        [*base_overrides(tmp_path / "run"), f"data.train={data}", "trainer.micro_batch_size=4"]
    )
    with pytest.raises(ValueError, match="3 pairs, fewer than one global batch of 4"):
        train(cfg)


def test_the_closing_console_line_names_steps_time_and_headline_metrics() -> None:
    results = {
        "steps": 100,
        "wall_seconds": 20.6,
        "eval": {"accuracy": 0.5925, "accuracy_stderr": 0.0246, "loss": 0.99159},
        "train": {"loss": 0.5, "margin": 3.0},
    }
    assert _summary_line(results) == (
        "finished 100 steps in 21 s, eval accuracy 0.593 +- 0.025, eval loss 0.9916, train loss 0.5"
    )
    # without an eval split (data=files without data.eval) only the training loss is reported
    assert _summary_line({"steps": 2, "wall_seconds": 1.0, "eval": {}, "train": {"loss": 0.7}}) == (
        "finished 2 steps in 1 s, train loss 0.7"
    )
