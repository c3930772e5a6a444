"""The metrics window (sums between log steps, their means) and the one metrics.jsonl reader."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from engine.metrics import SUMS, MetricsWindow, means, pair_sums, read_metrics
from engine.model.pair_logprobs import PairLogProbs


def output(chosen, rejected, losses):
    chosen, rejected = torch.tensor(chosen), torch.tensor(rejected)
    return SimpleNamespace(
        chosen_rewards=chosen,
        rejected_rewards=rejected,
        margins=chosen - rejected,
        losses=torch.tensor(losses),
    )


POLICY = PairLogProbs(
    torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -2.0]), torch.ones(2), torch.ones(2)
)


def test_pair_sums_and_their_means() -> None:
    sums = pair_sums(output([0.5, -0.5], [0.0, 0.0], [1.0, 3.0]), POLICY)
    assert sums.dtype == torch.float64 and len(sums) == len(SUMS)
    assert means(sums, "train") == {
        "train/loss": 2.0,
        "train/chosen_reward": 0.0,
        "train/rejected_reward": 0.0,
        "train/reward_accuracy": 0.5,
        "train/margin": 0.0,
        "train/chosen_logp": -2.0,
        "train/rejected_logp": -2.0,
        "train/chosen_reward_below_zero": 0.5,
    }


def test_the_window_accumulates_closes_empty_and_restores() -> None:
    window = MetricsWindow()
    first, second = POLICY.index(torch.tensor([0])), POLICY.index(torch.tensor([1]))
    window.add(pair_sums(output([1.0], [0.0], [1.0]), first))
    window.add(pair_sums(output([-1.0], [0.0], [3.0]), second))
    pending = window.global_sums(torch.device("cpu"))
    assert pending[0] == 2 and window.sums[0] == 2  # a copy: the window is untouched
    train, pairs_per_second = window.close(torch.device("cpu"))
    assert train["train/loss"] == 2.0 and train["train/reward_accuracy"] == 0.5
    assert pairs_per_second > 0
    assert not window.sums.any()
    window.restore(pending.tolist())  # a resumed run continues the interrupted window
    assert torch.equal(window.sums, pending)


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_read_metrics_ignores_a_torn_last_line_with_a_warning(tmp_path) -> None:
    path = write(tmp_path / "metrics.jsonl", [json.dumps({"step": 1}), "", '{"step": 2, "tr'])
    with pytest.warns(UserWarning, match=r"metrics.jsonl:3"):
        assert read_metrics(path) == [{"step": 1}]
    assert read_metrics(tmp_path / "absent.jsonl") == []


def test_read_metrics_rejects_a_bad_line_elsewhere_naming_file_and_line(tmp_path) -> None:
    path = write(tmp_path / "metrics.jsonl", [json.dumps({"step": 1}), "[1, 2]", json.dumps({})])
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        read_metrics(path)
