"""Feeding the objective: policy and reference scores in, the objective's output out.

The one place where scores become the objective's inputs, shared by the train step and
evaluation: length normalisation (``requirements.length_normalized``: log-probs averaged over
response tokens) is applied here, and the chosen response's mean token NLL is made here.

To give objectives a new per-response input (e.g. tail log-probs, per-pair weights): add an
optional field to :class:`engine.scoring.PairScores` (filled where scores are made), a field to
:class:`ObjectiveInputs` made from it in :meth:`ObjectiveInputs.from_scores`, and pass it on in
:func:`objective_output`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.scoring import PairScores
from losses import PreferenceLoss, PreferenceLossOutput


def _per_pair(logps: torch.Tensor, counts: torch.Tensor, length_normalized: bool) -> torch.Tensor:
    """Summed log-probs, or their mean over response tokens when ``length_normalized``."""
    return logps / counts.clamp(min=1) if length_normalized else logps


@dataclass(frozen=True)
class ObjectiveInputs:
    """The tensors an objective is called with, (B,) each, on the policy's device.

    Attributes:
        policy_chosen: log pi(y_w|x), summed (or averaged, for length-normalised objectives).
        policy_rejected: log pi(y_l|x), likewise.
        reference_chosen: log pi_ref(y_w|x), likewise (zeros for a reference-free objective).
        reference_rejected: log pi_ref(y_l|x), likewise.
        policy_chosen_nll: the chosen response's mean token NLL under the policy.
    """

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    reference_chosen: torch.Tensor
    reference_rejected: torch.Tensor
    policy_chosen_nll: torch.Tensor

    @classmethod
    def from_scores(
        cls, policy: PairScores, reference: PairScores, length_normalized: bool
    ) -> ObjectiveInputs:
        """The inputs from the policy's scores (with gradients) and the reference's (detached,
        on any device: moved to the policy's)."""
        device = policy.chosen_logps.device
        return cls(
            policy_chosen=_per_pair(policy.chosen_logps, policy.chosen_counts, length_normalized),
            policy_rejected=_per_pair(
                policy.rejected_logps, policy.rejected_counts, length_normalized
            ),
            reference_chosen=_per_pair(
                reference.chosen_logps, reference.chosen_counts, length_normalized
            ).to(device),
            reference_rejected=_per_pair(
                reference.rejected_logps, reference.rejected_counts, length_normalized
            ).to(device),
            policy_chosen_nll=-policy.chosen_logps / policy.chosen_counts.clamp(min=1),
        )


def objective_output(
    objective: PreferenceLoss, policy: PairScores, reference: PairScores
) -> PreferenceLossOutput:
    """``objective`` on the pairs scored by ``policy`` and ``reference`` (same pairs, same order).

    Returns the objective's output: per-pair ``losses`` (differentiable through ``policy``),
    ``chosen_rewards``, ``rejected_rewards`` and ``margins``.
    """
    inputs = ObjectiveInputs.from_scores(policy, reference, objective.length_normalized)
    return objective(
        inputs.policy_chosen,
        inputs.policy_rejected,
        inputs.reference_chosen,
        inputs.reference_rejected,
        policy_chosen_nll=inputs.policy_chosen_nll,
    )
