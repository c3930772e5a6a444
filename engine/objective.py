"""Feeding the objective: policy and reference scores in, the objective's output out.

The one place where scores become the objective's inputs, shared by the train step and
evaluation: length normalisation (``requirements.length_normalized``: log-probs averaged over
response tokens) is applied here, and the chosen response's mean token NLL is made here.

To give objectives a new per-response input (e.g. tail log-probs, per-pair weights): add an
optional field to :class:`engine.model.pair_logprobs.PairLogProbs` (filled where scores are made), a
field to
:class:`ObjectiveInputs` made from it in :meth:`ObjectiveInputs.from_scores`, and pass it on in
:func:`objective_output`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from engine.model.pair_logprobs import PairLogProbs
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
        extras: the other per-pair inputs (``losses.PreferenceLoss.INPUTS``) the scores carry:
            LD-DPO's tails (policy and reference), WPO's terms, ODPO's data scores.
    """

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    reference_chosen: torch.Tensor
    reference_rejected: torch.Tensor
    policy_chosen_nll: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def from_scores(
        cls,
        policy: PairLogProbs,
        reference: PairLogProbs,
        length_normalized: bool,
        batch_inputs: dict[str, torch.Tensor] | None = None,
    ) -> ObjectiveInputs:
        """The inputs from the policy's scores (with gradients) and the reference's (detached,
        on any device: moved to the policy's); ``batch_inputs``: inputs that do not come from
        scores (ODPO's ``score_chosen`` / ``score_rejected`` columns, KTO's ``kl_logratios``)."""
        device = policy.chosen_logps.device
        extras: dict[str, torch.Tensor] = {}
        for prefix, source in (("policy", policy), ("ref", reference)):
            if source.chosen_tail_logps is not None:  # averaged like the log-probs they cut
                for side in ("chosen", "rejected"):
                    tails = getattr(source, f"{side}_tail_logps")
                    counts = getattr(source, f"{side}_counts")
                    extras[f"{prefix}_{side}_tail_logps"] = _per_pair(
                        tails, counts, length_normalized
                    ).to(device)
        if (
            policy.chosen_weighting_logps is not None
            and policy.rejected_weighting_logps is not None
        ):
            extras["chosen_weighting_logps"] = policy.chosen_weighting_logps
            extras["rejected_weighting_logps"] = policy.rejected_weighting_logps
        for key, value in (batch_inputs or {}).items():
            extras[key] = value.to(device)
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
            extras=extras,
        )

    def arguments(self) -> tuple[tuple[torch.Tensor, ...], dict[str, Any]]:
        """``(args, kwargs)`` of the objective's call (:meth:`losses.PreferenceLoss.forward`)."""
        args = (self.policy_chosen, self.policy_rejected)
        args += (self.reference_chosen, self.reference_rejected)
        return args, {"policy_chosen_nll": self.policy_chosen_nll, **self.extras}


def objective_output(
    objective: PreferenceLoss,
    policy: PairLogProbs,
    reference: PairLogProbs,
    batch_inputs: dict[str, torch.Tensor] | None = None,
) -> PreferenceLossOutput:
    """``objective`` on the pairs scored by ``policy`` and ``reference`` (same pairs, same order);
    ``batch_inputs``: inputs that do not come from scores (ODPO's score columns, KTO's
    ``kl_logratios``).

    Returns the objective's output: per-pair ``losses`` (differentiable through ``policy``),
    ``chosen_rewards``, ``rejected_rewards`` and ``margins``.
    """
    return feed(objective, objective_inputs(objective, policy, reference, batch_inputs))


def feed(objective: PreferenceLoss, inputs: ObjectiveInputs) -> PreferenceLossOutput:
    """``objective`` called with ``inputs`` (the train step keeps the inputs for diagnostics)."""
    args, kwargs = inputs.arguments()
    return objective(*args, **kwargs)


def objective_inputs(
    objective: PreferenceLoss,
    policy: PairLogProbs,
    reference: PairLogProbs,
    batch_inputs: dict[str, torch.Tensor] | None = None,
) -> ObjectiveInputs:
    """The :class:`ObjectiveInputs` of ``objective`` (its length normalisation applied)."""
    return ObjectiveInputs.from_scores(policy, reference, objective.length_normalized, batch_inputs)


def kl_logratios(policy: PairLogProbs, reference: PairLogProbs) -> torch.Tensor:
    """KTO's ``kl_logratios``: the log-ratios of both responses of each mismatched pair (2B,),
    detached (the reference point is a constant of the step, as in KTOTrainer)."""
    chosen = policy.chosen_logps.detach().float() - reference.chosen_logps.to(policy.chosen_logps)
    rejected = policy.rejected_logps.detach().float() - reference.rejected_logps.to(chosen)
    return torch.cat([chosen, rejected]).detach()
