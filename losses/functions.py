"""The convex losses f(z) of the margin z: the GPO family (arXiv 2402.05749).

Each is a pure, elementwise function of a tensor ``z`` (the margin, see :mod:`losses.margins`) and
is registered in :data:`LOSSES` under its name. Preference learning minimises ``f(z)``: every f here
is decreasing around z = 0, so a larger margin means a smaller loss; all are convex except savage,
which is bounded (and so concave for z < -ln 2).

Numerics: every function is finite, with a finite gradient that is not silently zero, for any
finite z in float32 and bfloat16 (the margin of log-ratios of size 1e5 is about 1e4 to 1e5). The
formulas are exact for |z| <= 20; the one loss that would overflow (exponential) continues linearly
past ``EXP_CAP`` (see :func:`exponential`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from losses.registry import Registry

LossFn = Callable[[torch.Tensor], torch.Tensor]

#: loss name -> f(z). Holds the six GPO losses; add one with ``@LOSSES.register()``.
LOSSES: Registry[LossFn] = Registry("loss")

#: Where :func:`exponential` switches from exp(-z) to its tangent line (z < -EXP_CAP).
#: exp(30) ~ 1e13 is finite in float32 and bfloat16, and the switch is far beyond |z| <= 20.
EXP_CAP = 30.0


@LOSSES.register()
def logistic(z: torch.Tensor) -> torch.Tensor:
    """Logistic loss, ``f(z) = -log sigmoid(z) = log(1 + exp(-z))``: DPO (arXiv 2305.18290).

    Written as ``softplus(-z)``, which is exact and overflow-free for every finite z; its gradient
    ``-sigmoid(-z)`` lies in (-1, 0).

    Args:
        z: margin, any shape; typical values in [-10, 10].

    Example: ``logistic(torch.tensor(0.0)) == log(2) ~ 0.6931``.
    """
    return F.softplus(-z)


@LOSSES.register()
def hinge(z: torch.Tensor) -> torch.Tensor:
    """Hinge loss, ``f(z) = max(0, 1 - z)``: SLiC (arXiv 2305.10425) / RSO (arXiv 2309.06657).

    Zero (and flat) once the margin passes 1; gradient -1 below it.

    Example: ``hinge(torch.tensor([0.5, 2.0])) == [0.5, 0.0]``.
    """
    return torch.relu(1.0 - z)


@LOSSES.register()
def squared(z: torch.Tensor) -> torch.Tensor:
    """Squared loss, ``f(z) = (z - 1)^2``: IPO (arXiv 2310.12036) with beta = 2 tau.

    With the difference margin z = beta * h (h = r_w - r_l), ``(beta h - 1)^2 =
    beta^2 (h - 1/beta)^2 = 4 tau^2 (h - 1/(2 tau))^2``: IPO's loss up to the constant
    factor 4 tau^2.
    Not monotone: it also pushes margins above 1 back down (IPO's regularisation).

    Example: ``squared(torch.tensor([0.0, 1.0, 3.0])) == [1.0, 0.0, 4.0]``.
    """
    return (z - 1.0) ** 2


@LOSSES.register()
def exponential(z: torch.Tensor) -> torch.Tensor:
    """Exponential loss, ``f(z) = exp(-z)`` (GPO, arXiv 2402.05749; AdaBoost's loss).

    Exact for z >= -EXP_CAP (30). Below it, exp(-z) overflows float32 near z = -88, so the loss
    continues along its tangent line at -EXP_CAP: ``exp(C) * (1 + (-C - z))``. Value and slope are
    continuous there, the gradient stays at ``-exp(C)`` (never silently zero), and the function
    stays convex and decreasing.

    Example: ``exponential(torch.tensor(0.0)) == 1.0``; ``exponential(torch.tensor(1.0)) ~ 0.3679``.
    """
    # One expression for both branches: where z >= -C, z_capped == z and the correction factor is 1;
    # below, z_capped == -C is constant and (1 + z_capped - z) is the tangent line. No inf ever
    # enters the graph, so no NaN gradient leaks from an unused branch of a torch.where.
    z_capped = z.clamp(min=-EXP_CAP)
    return torch.exp(-z_capped) * (1.0 + (z_capped - z))


@LOSSES.register()
def truncated_quadratic(z: torch.Tensor) -> torch.Tensor:
    """Truncated quadratic loss, ``f(z) = max(0, 1 - z)^2`` (GPO, arXiv 2402.05749).

    A smooth hinge: zero past z = 1, quadratic below.

    Example: ``truncated_quadratic(torch.tensor([-1.0, 0.5, 2.0])) == [4.0, 0.25, 0.0]``.
    """
    return torch.relu(1.0 - z) ** 2


@LOSSES.register()
def savage(z: torch.Tensor) -> torch.Tensor:
    """Savage loss, ``f(z) = sigmoid(-z)^2 = 1 / (1 + exp(z))^2`` (GPO, arXiv 2402.05749).

    Bounded in (0, 1), so a badly-wrong pair cannot dominate a batch (robust to label noise); its
    gradient ``-2 sigmoid(-z)^2 sigmoid(z)`` vanishes for very negative z as well as very positive.

    Example: ``savage(torch.tensor(0.0)) == 0.25``.
    """
    # exp(-2 softplus(z)) == sigmoid(-z)^2, but its backward goes through sigmoid(z), which stays
    # accurate where sigmoid(-z) rounds to 1 (bfloat16 from z ~ -6): no silently lost gradient.
    # Computed in float32: in bfloat16 the exp would amplify softplus's rounding to a few percent.
    wide = z.to(torch.promote_types(z.dtype, torch.float32))
    return torch.exp(-2.0 * F.softplus(wide)).to(z.dtype)
