"""Tests for losses.diagnostics: each pair's gradient weight on its chosen and rejected log-ratios.

Hand-worked (s = sigmoid): DPO, beta 0.5, r_w = 1, r_l = -1 (z = 1): dL/dr_w = -beta s(-z) =
-0.5 * 0.268941 = -0.134471 and dL/dr_l = +0.134471. Balanced, alpha 0.3, same pair: z = 0.5 *
min(1, 0.3) = 0.15 comes from the rejected side, so dL/dr_w = 0 and dL/dr_l = -f'(z) * beta *
(-alpha) = beta alpha s(-z) = 0.15 * s(-0.15) = 0.069386.
"""

from __future__ import annotations

import math

import pytest
import torch

from losses import METHODS, PreferenceLoss
from losses.diagnostics import pair_diagnostics


def s(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def pair():
    values = (-9.0, -11.0, -10.0, -10.0)  # r_w = 1, r_l = -1
    return [torch.tensor([v, v - 1.0]) for v in values]  # the second pair: same log-ratios


def test_dpo_weights_by_hand():
    out = pair_diagnostics(PreferenceLoss(beta=0.5), *pair())
    assert out.chosen_weights.tolist() == pytest.approx([-0.5 * s(-1.0)] * 2, rel=1e-6)
    assert out.rejected_weights.tolist() == pytest.approx([0.5 * s(-1.0)] * 2, rel=1e-6)
    assert out.chosen_weights[0].item() == pytest.approx(-0.134471, abs=1e-6)
    assert out.margins.tolist() == pytest.approx([1.0, 1.0])
    assert out.chosen_below_reference.tolist() == [0.0, 0.0]


def test_balanced_margin_routes_the_weight_to_one_side():
    objective = PreferenceLoss(margin="balanced", beta=0.5, alpha=0.3)
    out = pair_diagnostics(objective, *pair())
    assert out.chosen_weights.tolist() == [0.0, 0.0]
    assert out.rejected_weights[0].item() == pytest.approx(0.15 * s(-0.15), rel=1e-6)
    assert out.rejected_weights[0].item() == pytest.approx(0.069386, abs=1e-6)


def test_chosen_below_reference_and_means():
    pc, pr, rc, rr = pair()
    pc = torch.tensor([-11.0, -10.0])  # vs refs (-10, -11): the first below, the second above
    out = pair_diagnostics(PreferenceLoss(), pc, pr, rc, rr)
    assert out.chosen_below_reference.tolist() == [1.0, 0.0]
    means = out.means()
    assert means["chosen_below_reference"] == 0.5
    assert means["grad_weight_chosen"] == pytest.approx(out.chosen_weights.mean().item())


@pytest.mark.parametrize("name", sorted(METHODS))
def test_weights_equal_autograd_through_the_objective(name, extra_inputs):
    """The diagnostic equals the gradient the training step itself puts on the log-probs."""
    objective = METHODS[name].build()
    gen = torch.Generator().manual_seed(5)
    pc, pr, rc, rr = (-(torch.rand(6, generator=gen) * 20 + 1) for _ in range(4))
    extras = extra_inputs(6)
    out = pair_diagnostics(objective, pc, pr, rc, rr, **extras)
    for tensor in (out.chosen_weights, out.rejected_weights, out.margins):
        assert tensor.shape == (6,) and not tensor.requires_grad
        assert torch.isfinite(tensor).all()
    chosen, rejected = pc.clone().requires_grad_(True), pr.clone().requires_grad_(True)
    losses = objective(chosen, rejected, rc, rr, **extras).losses
    if losses.requires_grad:
        losses.sum().backward()
    for grad, weights in ((chosen.grad, out.chosen_weights), (rejected.grad, out.rejected_weights)):
        expected = torch.zeros(6) if grad is None else grad
        torch.testing.assert_close(weights, expected)


def test_policy_graph_is_left_alone():
    """The diagnostic detaches its inputs: no gradient reaches the caller's tensors."""
    pc, pr, rc, rr = pair()
    pc.requires_grad_(True)
    pair_diagnostics(PreferenceLoss(), pc, pr, rc, rr)
    assert pc.grad is None
