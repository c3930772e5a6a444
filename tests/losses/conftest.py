"""Shared test data for the losses tests: the hand-derived derivative of every GPO loss.

Each derivative is worked out by hand from the loss's formula (not from the code under test):

    logistic             f = log(1 + e^-z)        f' = -e^-z / (1 + e^-z) = -sigmoid(-z)
    hinge                f = max(0, 1 - z)        f' = -1 for z < 1, 0 for z > 1
    squared              f = (z - 1)^2            f' = 2 (z - 1)
    exponential          f = e^-z                 f' = -e^-z  (for z >= -EXP_CAP)
    truncated_quadratic  f = max(0, 1 - z)^2      f' = -2 max(0, 1 - z)
    savage               f = sigmoid(-z)^2        f' = 2 sigmoid(-z) * (-sigmoid(-z) sigmoid(z))
                                                     = -2 sigmoid(-z)^2 sigmoid(z)
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

Derivative = Callable[[torch.Tensor], torch.Tensor]


def _exponential_derivative(z: torch.Tensor) -> torch.Tensor:
    # below the cap the loss is its tangent line at -EXP_CAP: slope -exp(EXP_CAP)
    from losses.functions import EXP_CAP

    return -torch.exp(-z.clamp(min=-EXP_CAP))


LOSS_DERIVATIVES: dict[str, Derivative] = {
    "logistic": lambda z: -torch.sigmoid(-z),
    "hinge": lambda z: torch.where(z < 1, -torch.ones_like(z), torch.zeros_like(z)),
    "squared": lambda z: 2 * (z - 1),
    "exponential": _exponential_derivative,
    "truncated_quadratic": lambda z: -2 * torch.clamp(1 - z, min=0),
    "savage": lambda z: -2 * torch.sigmoid(-z) ** 2 * torch.sigmoid(z),
}


@pytest.fixture(scope="session")
def loss_derivatives() -> dict[str, Derivative]:
    """loss name -> its hand-derived derivative f'(z) (see the module docstring)."""
    return LOSS_DERIVATIVES
