"""The objective feed: scores in, the objective's output out, the same for training and eval.

Hand-worked case (DPO, beta 0.1, sums): policy chosen / rejected -4 / -9, reference -5 / -8,
so r_w = 1, r_l = -1, z = 0.1 * 2 = 0.2 and the loss is -log sigmoid(0.2) = 0.598139.
"""

from __future__ import annotations

import math

import pytest
import torch

from engine.model.pair_logprobs import PairLogProbs
from engine.objective import ObjectiveInputs, objective_output
from losses import PreferenceLoss


def scores(chosen, rejected, chosen_counts, rejected_counts) -> PairLogProbs:
    return PairLogProbs(
        torch.tensor(chosen, dtype=torch.float32),
        torch.tensor(rejected, dtype=torch.float32),
        torch.tensor(chosen_counts),
        torch.tensor(rejected_counts),
    )


POLICY = scores([-4.0, -2.0], [-9.0, -3.0], [2, 4], [3, 0])
REFERENCE = scores([-5.0, -2.0], [-8.0, -3.0], [2, 4], [3, 0])


def test_the_hand_worked_dpo_case() -> None:
    out = objective_output(PreferenceLoss(beta=0.1), POLICY, REFERENCE)
    assert out.losses[0].item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.2))), abs=1e-6)
    assert out.chosen_rewards[0].item() == pytest.approx(0.1)
    assert out.rejected_rewards[0].item() == pytest.approx(-0.1)
    assert out.chosen_rewards[1].item() == 0.0  # policy == reference on pair 1


def test_length_normalisation_divides_by_counts_once_with_empty_responses_as_one() -> None:
    inputs = ObjectiveInputs.from_scores(POLICY, REFERENCE, length_normalized=True)
    assert inputs.policy_chosen.tolist() == [-2.0, -0.5]
    assert inputs.policy_rejected.tolist() == [-3.0, -3.0]  # count 0 is clamped to 1
    assert inputs.reference_chosen.tolist() == [-2.5, -0.5]
    assert inputs.policy_chosen_nll.tolist() == [2.0, 0.5]  # always per token
    summed = ObjectiveInputs.from_scores(POLICY, REFERENCE, length_normalized=False)
    assert summed.policy_chosen.tolist() == [-4.0, -2.0]
    assert summed.policy_chosen_nll.tolist() == [2.0, 0.5]


def test_the_objective_sees_what_its_length_normalisation_asks_for() -> None:
    averaged = objective_output(PreferenceLoss(beta=1.0, length_normalized=True), POLICY, REFERENCE)
    assert averaged.chosen_rewards[0].item() == pytest.approx(-2.0 - -2.5)


def test_gradients_flow_to_the_policy_only() -> None:
    logps = torch.tensor([-4.0, -9.0], requires_grad=True)
    policy = PairLogProbs.split(logps, torch.tensor([2, 3]))
    reference = scores([-5.0], [-8.0], [2], [3])
    objective_output(PreferenceLoss(beta=0.1), policy, reference).losses.sum().backward()
    assert logps.grad is not None and logps.grad[0] < 0 < logps.grad[1]
