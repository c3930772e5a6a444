"""Why an objective behaves as it does: each pair's gradient weight on its chosen and rejected
log-ratios, dL/dr_w and dL/dr_l.

DPO's weight on both sides is beta * sigmoid(-z), equal and opposite; the balanced margin sends it
all to one side per pair; a per-side objective weighs the sides separately. Logging the weights
every step shows which pairs drive the update and whether the chosen side is pushed down (DCR).

Cost: the objective is evaluated once more on detached (B,) copies of the log-probs and
differentiated there (``torch.autograd.grad`` on B-sized tensors): no second backward through the
model, nothing of size vocabulary or sequence length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class PairDiagnostics:
    """Per-pair diagnostics of one batch, all (B,), detached.

    Attributes:
        chosen_weights: dL_i/dr_w,i, the objective's gradient weight on the chosen log-ratio
            (negative: the chosen likelihood is pushed up).
        rejected_weights: dL_i/dr_l,i (positive: the rejected likelihood is pushed down).
        margins: the margin z of each pair (``PreferenceLossOutput.margins``).
        chosen_below_reference: 1.0 where log pi(y_w) < log pi_ref(y_w), else 0.0 (all 0.0
            when no reference log-probs are given).
    """

    chosen_weights: torch.Tensor
    rejected_weights: torch.Tensor
    margins: torch.Tensor
    chosen_below_reference: torch.Tensor

    def means(self) -> dict[str, float]:
        """Batch means, named for a metrics row (one host sync for all four)."""
        stacked = torch.stack(
            [
                self.chosen_weights.mean(),
                self.rejected_weights.mean(),
                self.margins.mean(),
                self.chosen_below_reference.mean(),
            ]
        ).tolist()
        names = ("grad_weight_chosen", "grad_weight_rejected", "margin", "chosen_below_reference")
        return dict(zip(names, stacked, strict=True))


def pair_diagnostics(
    objective: Any,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    **inputs: Any,
) -> PairDiagnostics:
    """The gradient weights, margins and below-reference flags of one batch.

    Args:
        objective: a :class:`losses.PreferenceLoss` (or any callable with its signature).
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: the
            (B,) log-probs the objective was fed (policy ones may require grad: they are
            detached here).
        **inputs: the objective's other per-batch inputs (``PreferenceLoss.INPUTS``), as fed.
            They are constants here, so an NLL term's own gradient is not part of the weights.

    Since r = log pi - log pi_ref, dL/dr is dL/d log pi: the derivative is taken with respect
    to detached copies of the policy log-probs. For a reference-free objective r is the policy
    log-prob itself.

    Example: DPO, beta 1, r_w - r_l = 0: weights -0.5 and +0.5 (beta * sigmoid(-z) = 0.5).
    """
    detached = {
        key: value.detach() if torch.is_tensor(value) else value for key, value in inputs.items()
    }
    with torch.enable_grad():
        chosen = policy_chosen_logps.detach().requires_grad_(True)
        rejected = policy_rejected_logps.detach().requires_grad_(True)
        refs = [
            None if ref is None else ref.detach() for ref in (ref_chosen_logps, ref_rejected_logps)
        ]
        out = objective(chosen, rejected, *refs, **detached)
        grad_w = grad_l = None
        if out.losses.requires_grad:  # (a control without a preference term reads no log-prob)
            grad_w, grad_l = torch.autograd.grad(
                out.losses.sum(), (chosen, rejected), allow_unused=True
            )
    zeros = torch.zeros_like(out.losses).detach()
    below = zeros if refs[0] is None else (chosen < refs[0]).to(zeros.dtype).detach()
    return PairDiagnostics(
        chosen_weights=zeros if grad_w is None else grad_w.to(zeros.dtype),
        rejected_weights=zeros if grad_l is None else grad_l.to(zeros.dtype),
        margins=out.margins,
        chosen_below_reference=below,
    )
