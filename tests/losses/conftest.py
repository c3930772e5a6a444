"""Shared test data for the losses tests: the hand-derived derivative of every GPO loss, and the
extra per-pair inputs (NLL, tails, WPO terms, scores, mismatched log-ratios) objectives ask for.

Each derivative is worked out by hand from the loss's formula (not from the code under test):

    logistic             f = log(1 + e^-z)        f' = -e^-z / (1 + e^-z) = -sigmoid(-z)
    hinge                f = max(0, 1 - z)        f' = -1 for z < 1, 0 for z > 1
    squared              f = (z - 1)^2            f' = 2 (z - 1)
    exponential          f = e^-z                 f' = -e^-z  (for z >= -EXP_CAP)
    truncated_quadratic  f = max(0, 1 - z)^2      f' = -2 max(0, 1 - z)
    savage               f = sigmoid(-z)^2        f' = 2 sigmoid(-z) * (-sigmoid(-z) sigmoid(z))
                                                     = -2 sigmoid(-z)^2 sigmoid(z)

TRL's losses of one margin, at their defaults (beta 0.1, eps 0 / 1e-3, tau 0.05); s = sigmoid:

    ipo       f = (z/b - 1/(2b))^2                  f' = 2 (z/b - 1/(2b)) / b
    robust    f = softplus(-z)  (eps = 0)           f' = -s(-z)
    exo_pair  f = q log(q/(1-e)) + (1-q) log((1-q)/e), q = s(z)
              df/dq = log(q/(1-q)) - log((1-e)/e) = z - log((1-e)/e),
              so f' = q (1-q) (z - log((1-e)/e))
    discopop  f = (1-m) L + m E, m = s(z/t), L = softplus(-z), E = e^-z
              f' = m (1-m)/t (E - L) - (1-m) s(-z) - m e^-z
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

Derivative = Callable[[torch.Tensor], torch.Tensor]


def _exponential_derivative(z: torch.Tensor) -> torch.Tensor:
    # below the cap the loss is its tangent line at -EXP_CAP: slope -exp(EXP_CAP)
    from losses.functions import EXP_CAP

    return -torch.exp(-z.clamp(min=-EXP_CAP))


def _exo_pair_derivative(z: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    q = torch.sigmoid(z)
    return q * (1 - q) * (z - torch.log(torch.tensor((1 - eps) / eps, dtype=z.dtype)))


def _discopop_derivative(z: torch.Tensor, tau: float = 0.05) -> torch.Tensor:
    # E continues along its tangent line below -EXP_CAP, as exponential does
    from losses.functions import EXP_CAP

    m = torch.sigmoid(z / tau)
    capped = z.clamp(min=-EXP_CAP)
    exp_value = torch.exp(-capped) * (1 + capped - z)
    return (
        m * (1 - m) / tau * (exp_value - F.softplus(-z))
        - (1 - m) * torch.sigmoid(-z)
        + m * _exponential_derivative(z)
    )


LOSS_DERIVATIVES: dict[str, Derivative] = {
    "logistic": lambda z: -torch.sigmoid(-z),
    "hinge": lambda z: torch.where(z < 1, -torch.ones_like(z), torch.zeros_like(z)),
    "squared": lambda z: 2 * (z - 1),
    "exponential": _exponential_derivative,
    "truncated_quadratic": lambda z: -2 * torch.clamp(1 - z, min=0),
    "savage": lambda z: -2 * torch.sigmoid(-z) ** 2 * torch.sigmoid(z),
    "ipo": lambda z: 2 * (z / 0.1 - 5.0) / 0.1,
    "robust": lambda z: -torch.sigmoid(-z),
    "exo_pair": _exo_pair_derivative,
    "discopop": _discopop_derivative,
}


@pytest.fixture(scope="session")
def loss_derivatives() -> dict[str, Derivative]:
    """loss name -> its hand-derived derivative f'(z) (see the module docstring)."""
    return LOSS_DERIVATIVES


def make_extra_inputs(size: int, dtype: torch.dtype = torch.float32, grad: bool = False) -> dict:
    """Every per-batch input of ``PreferenceLoss.INPUTS`` for a batch of ``size`` pairs, with
    valid values (scores chosen > rejected; tails <= 0; WPO terms near 0), so that any method's
    requirements are met. ``grad``: the chosen NLL requires grad."""
    from losses import PreferenceLoss

    gen = torch.Generator().manual_seed(7)

    def column(low: float, high: float) -> torch.Tensor:
        return (torch.rand(size, generator=gen, dtype=torch.float64) * (high - low) + low).to(dtype)

    values = {name: column(-3.0, 0.0) for name in PreferenceLoss.INPUTS}
    values["policy_chosen_nll"] = column(0.1, 2.5).requires_grad_(grad)
    values["score_chosen"] = column(5.0, 9.0)
    values["score_rejected"] = column(0.0, 4.0)
    values["chosen_weighting_logps"] = column(-0.5, 0.0)
    values["rejected_weighting_logps"] = column(-0.5, 0.0)
    return values


@pytest.fixture(scope="session")
def extra_inputs():
    """``extra_inputs(size, dtype=float32, grad=False)``: valid values for every per-batch input
    (:func:`make_extra_inputs`)."""
    return make_extra_inputs
