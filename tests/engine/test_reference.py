"""The reference policy: precomputed once (default) or scored live; the initial policy or a
separate model. Every combination gives the same training values as its counterpart."""

from __future__ import annotations

import json

import pytest


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("layout", ["default", "plain"])
def test_live_reference_equals_precomputed(tmp_path, train_run, metrics_match, layout) -> None:
    plain = (
        ["trainer.prefix_sharing=false", "trainer.padding_free=false"] if layout == "plain" else []
    )
    _, pre = train_run(tmp_path / "pre", *plain, eval=True, steps=3)
    _, live = train_run(tmp_path / "live", *plain, "reference.precompute=false", eval=True, steps=3)
    metrics_match.rows(_rows(live), _rows(pre), rtol=1e-5)


def test_separate_reference_model_live_and_precomputed(tmp_path, train_run, metrics_match) -> None:
    """A trained model as the reference: both modes agree, and differ from the self-reference
    (whose step-1 rewards are exactly zero)."""
    _, first = train_run(tmp_path / "first", "trainer.export=true", steps=3)
    ref = f"reference.name_or_path={first / 'final_model'}"
    _, own = train_run(tmp_path / "own", eval=True)
    _, pre = train_run(tmp_path / "pre", ref, eval=True)
    _, live = train_run(tmp_path / "live", ref, "reference.precompute=false", eval=True)
    metrics_match.rows(_rows(live), _rows(pre), rtol=1e-5)
    step1 = {r["step"]: r for r in _rows(pre) if "train/loss" in r}[1]
    own1 = {r["step"]: r for r in _rows(own) if "train/loss" in r}[1]
    assert own1["train/chosen_reward"] == 0.0
    assert abs(step1["train/chosen_reward"]) > 1e-4


def test_a_missing_reference_path_names_the_key(tmp_path, train_run) -> None:
    with pytest.raises(FileNotFoundError, match=r"reference\.name_or_path"):
        train_run(tmp_path / "run", f"reference.name_or_path={tmp_path / 'nope'}")
