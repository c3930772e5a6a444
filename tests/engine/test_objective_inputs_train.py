"""End-to-end: the objective inputs beyond the four log-probs reach the objective in a real run
(LD-DPO's tails of policy and reference, WPO's weights, ODPO's scores), and every logged step
carries the gradient-weight diagnostics (means in metrics.jsonl, histograms in TensorBoard).

Each run is checked against a second, plain run of the same config: the option must change the
logged losses (so the extra input really reached the objective), not break the run.
"""

from __future__ import annotations

import math

import pytest


def losses(metrics_rows, run_dir):
    return [row["train/loss"] for row in metrics_rows(run_dir, "train/loss")]


@pytest.fixture(scope="module")
def uneven(tmp_path_factory, jsonl):
    """Pairs whose rejected response is only its final line (much shorter than the chosen), so
    LD-DPO's tails are not zero."""
    rows = jsonl.pairs(16, seed=0)
    for row in rows:
        row["rejected"] = row["rejected"].rsplit("|", 1)[-1]
    return jsonl.write(tmp_path_factory.mktemp("uneven") / "train.jsonl", rows)


def run(train_run, run_dir, data, *overrides):
    quiet = ("trainer.tensorboard=false", "trainer.export=false")
    train_run(run_dir, "method=dpo", f"data.train={data}", *quiet, *overrides, steps=3)


@pytest.fixture(scope="module")
def plain(tmp_path_factory, train_run, metrics_rows, uneven):
    run_dir = tmp_path_factory.mktemp("plain")
    run(train_run, run_dir, uneven)
    return losses(metrics_rows, run_dir)


@pytest.mark.parametrize(
    "overrides",
    [
        ["method.ld_alpha=0.5"],
        ["method.ld_alpha=0.5", "reference.precompute=false"],
        ["method.use_weighting=true"],
        ["method.odpo_alpha=1.0"],
    ],
    ids=["ld_alpha", "ld_alpha-live-reference", "use_weighting", "odpo"],
)
def test_extra_inputs_reach_the_objective(
    tmp_path, train_run, metrics_rows, plain, uneven, overrides
):
    run_dir = tmp_path / "run"
    run(train_run, run_dir, uneven, *overrides)
    got = losses(metrics_rows, run_dir)
    assert len(got) == len(plain) == 3 and all(math.isfinite(v) for v in got)
    if overrides[0].startswith("method.ld_alpha"):
        # step 1: policy == reference, so the down-weighted tails cancel and the loss is log 2
        assert got[0] == pytest.approx(plain[0], abs=1e-6)
        assert got[1:] != pytest.approx(plain[1:], abs=1e-7)
    else:
        assert got != pytest.approx(plain, abs=1e-7)


def test_logged_steps_carry_gradient_weights_and_histograms(tmp_path, train_run, metrics_rows):
    run_dir = tmp_path / "run"
    train_run(run_dir, "method=dpo", "trainer.export=false", "trainer.log_every=1", steps=2)
    rows = metrics_rows(run_dir, "train/loss")
    # step 1: z = 0 for every pair, so DPO's weights are exactly -beta / 2 and +beta / 2
    assert rows[0]["train/grad_weight_chosen"] == pytest.approx(-0.05)
    assert rows[0]["train/grad_weight_rejected"] == pytest.approx(0.05)
    assert rows[0]["train/chosen_below_reference"] == 0.0
    assert all("train/grad_weight_chosen" in row for row in rows)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"histograms": 0})
    events.Reload()
    tags = set(events.Tags()["histograms"])
    assert {"hist/grad_weight_chosen", "hist/grad_weight_rejected", "hist/margin"} <= tags
    assert len(events.Histograms("hist/margin")) == 2  # one per logged step


@pytest.mark.parametrize("precompute", [True, False], ids=["precomputed", "live-reference"])
def test_kto_trains_and_evaluates_with_mismatched_pairs(
    tmp_path, train_run, metrics_rows, precompute
):
    """KTO's reference point comes from mismatched pairs (scored by the reference with the
    others, and by the policy each step without gradient): the run trains and evaluates."""
    run_dir = tmp_path / "run"
    train_run(
        run_dir, "method=kto", f"reference.precompute={str(precompute).lower()}",
        "trainer.tensorboard=false", "trainer.export=false", eval=True,
    )  # fmt: skip
    train = metrics_rows(run_dir, "train/loss")
    evals = metrics_rows(run_dir, "eval/loss")
    # step 1: policy == reference, every log-ratio (and so z0) is 0: the loss is s(0) = 0.5
    assert train[0]["train/loss"] == pytest.approx(0.5, abs=1e-6)
    assert train[1]["train/loss"] != pytest.approx(0.5, abs=1e-7)
    assert evals and all(math.isfinite(row["eval/loss"]) for row in evals)
