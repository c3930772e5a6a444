"""The run state a checkpoint's client state holds, and the resume lookup."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from engine.checkpoint import COMPLETE
from engine.run_state import RunState, find_resume_step, restore


def test_client_state_round_trip() -> None:
    state = RunState(
        step=7, last_train={"train/loss": 0.5}, last_eval={"eval/loss": 0.6}, eval_pending=True
    )
    state.window.add(torch.arange(9, dtype=torch.float64))
    client = state.to_client_state(torch.device("cpu"))
    assert client == {
        "step": 7,
        "window": [float(i) for i in range(9)],
        "last_train": {"train/loss": 0.5},
        "last_eval": {"eval/loss": 0.6},
        "eval_pending": True,  # saved before its step's evaluation was logged
    }
    back = RunState.from_client_state(client, default_step=3)
    assert (back.step, back.last_train, back.last_eval) == (7, state.last_train, state.last_eval)
    assert back.eval_pending
    assert torch.equal(back.window.sums, state.window.sums)
    # an older checkpoint without our keys: its step, an empty window, nothing logged
    old = RunState.from_client_state({}, default_step=3)
    assert (old.step, old.last_train, old.last_eval, old.window.sums.any().item()) == (
        3,
        {},
        {},
        False,
    )
    assert not old.eval_pending


def test_a_fresh_run_starts_from_an_empty_state(tmp_path) -> None:
    state = restore(ds_engine=None, checkpoint_dir=tmp_path, resume_step=None)
    assert state.step == 0 and not state.last_train and not state.window.sums.any()


def test_the_resume_lookup(tmp_path) -> None:
    checkpoints = tmp_path / "checkpoints"
    auto, fresh = OmegaConf.create({"resume": "auto"}), OmegaConf.create({"resume": None})
    assert find_resume_step(auto, checkpoints) is None  # nothing saved yet: start fresh
    for step in (2, 4):
        (checkpoints / f"step_{step}").mkdir(parents=True)
        (checkpoints / f"step_{step}" / COMPLETE).write_text(f"{step}\n")
    (checkpoints / "step_6").mkdir()  # never completed
    assert find_resume_step(auto, checkpoints) == 4
    assert find_resume_step(fresh, checkpoints) is None
    with pytest.raises(ValueError, match=r"trainer\.resume"):
        find_resume_step(OmegaConf.create({"resume": "yes"}), checkpoints)
