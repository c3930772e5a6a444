"""The losses f(z) of the margin z: the GPO family (arXiv 2402.05749) and TRL's objectives of one
margin (ipo, robust, exo_pair, discopop).

Each is a pure, elementwise function of a tensor ``z`` (the margin, see :mod:`losses.margins`) and
is registered in :data:`LOSSES` under its name. Preference learning minimises ``f(z)``: every f here
is decreasing around z = 0, so a larger margin means a smaller loss; the six GPO losses are convex
except savage, which is bounded (and so concave for z < -ln 2).

Some losses have options (``beta``, ``label_smoothing``, ``discopop_tau``): keyword-only
parameters with TRL's defaults, so ``f(z)`` always works. :func:`apply_loss` passes a loss
exactly the options its signature names (:func:`losses.registry.keyword_options`); nothing else
needs to know which loss takes which option.

Numerics: every function is finite, with a finite gradient that is not silently zero, for any
finite z in float32 and bfloat16 (the margin of log-ratios of size 1e5 is about 1e4 to 1e5). The
formulas are exact for |z| <= 20; the one loss that would overflow (exponential) continues linearly
past ``EXP_CAP`` (see :func:`exponential`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from losses.registry import Registry, pick_options

LossFn = Callable[..., torch.Tensor]

#: loss name -> f(z). Holds the six GPO losses and TRL's four objectives of one margin (ipo,
#: robust, exo_pair, discopop); add one with ``@LOSSES.register()``.
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


@LOSSES.register()
def ipo(z: torch.Tensor, *, beta: float = 0.1) -> torch.Tensor:
    """IPO as TRL and the IPO authors use it (arXiv 2310.12036, Eq. 17): ``(h - 1/(2 beta))^2``.

    With the difference margin on length-averaged log-ratios (method ``ipo``), ``z = beta h`` and
    ``h = r_w/|y_w| - r_l/|y_l|``, so ``f(z) = (z/beta - 1/(2 beta))^2``: tau = beta, target
    margin 1/(2 beta), optimum at ``h = 5`` for beta 0.1. Not monotone (it also pulls margins above
    the target back). With ``margin=balanced``, h is ``min(r_w, -alpha r_l)``. The GPO ablation's
    ``squared`` is the (z - 1)^2 form.

    Example: beta 0.1, z = 0.3 (h = 3): ``(3 - 5)^2 = 4``.
    """
    return ((z - 0.5) / beta) ** 2  # z - 0.5 first: exact near the optimum (no cancellation)


@LOSSES.register()
def robust(z: torch.Tensor, *, label_smoothing: float = 0.0) -> torch.Tensor:
    """Robust DPO (rDPO, arXiv 2403.00409, Eq. 10): an unbiased loss under label noise eps.

    ``f(z) = ((1 - eps) softplus(-z) - eps softplus(z)) / (1 - 2 eps)``, eps = ``label_smoothing``
    in [0, 0.5); eps = 0 is DPO's logistic loss. Decreasing for every eps; linear (unbounded
    below) for large z when eps > 0.

    Example: eps 0.1, z = 0: ``(0.9 - 0.1) log 2 / 0.8 = log 2 ~ 0.6931``.
    """
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"robust needs label_smoothing in [0, 0.5), got {label_smoothing!r}")
    clean = (1.0 - label_smoothing) * F.softplus(-z)
    return (clean - label_smoothing * F.softplus(z)) / (1.0 - 2.0 * label_smoothing)


@LOSSES.register()
def exo_pair(z: torch.Tensor, *, label_smoothing: float = 1e-3) -> torch.Tensor:
    """EXO on pairs (arXiv 2402.00856, Eq. 16): ``KL(q || p)`` with ``q = (sigmoid(z),
    sigmoid(-z))`` and the target ``p = (1 - eps, eps)``, eps = ``label_smoothing`` in (0, 0.5).

    ``f(z) = s(z) (log s(z) - log(1 - eps)) + s(-z) (log s(-z) - log eps)``, s = sigmoid. Its
    minimum (0) is at ``z = log((1 - eps) / eps)``. TRL's default eps 0 is an error there (log 0);
    the EXO paper's 1e-3 is the default here.

    Example: eps 1e-3, z = 0: ``0.5 (log 0.5 - log 0.999) + 0.5 (log 0.5 - log 0.001) ~ 2.4537``.
    """
    if not 0 < label_smoothing < 0.5:
        raise ValueError(
            f"exo_pair needs label_smoothing in (0, 0.5) (EXO recommends 1e-3), "
            f"got {label_smoothing!r}"
        )
    wide = z.to(torch.promote_types(z.dtype, torch.float32))  # bf16 would round log-terms
    log_qw, log_ql = F.logsigmoid(wide), F.logsigmoid(-wide)
    chosen = torch.exp(log_qw) * (log_qw - math.log1p(-label_smoothing))
    return (chosen + torch.exp(log_ql) * (log_ql - math.log(label_smoothing))).to(z.dtype)


@LOSSES.register()
def discopop(z: torch.Tensor, *, discopop_tau: float = 0.05) -> torch.Tensor:
    """DiscoPOP's log-ratio modulated loss (arXiv 2406.08414, Eq. 5).

    ``f(z) = (1 - m) softplus(-z) + m exp(-z)`` with ``m = sigmoid(z / tau)``, tau =
    ``discopop_tau`` > 0: logistic for negative margins, exponential for positive ones. The
    exponential part continues linearly below ``-EXP_CAP`` like :func:`exponential` (there m is
    below 1e-260, so the value is the logistic one).

    Example: z = 0: ``0.5 log 2 + 0.5 = 0.8466``.
    """
    if not discopop_tau > 0:
        raise ValueError(f"discopop needs discopop_tau > 0, got {discopop_tau!r}")
    # float32 inside: in bfloat16 the blend of two terms loses the gradient's sign near z = 0
    wide = z.to(torch.promote_types(z.dtype, torch.float32))
    modulation = torch.sigmoid(wide / discopop_tau)
    return ((1.0 - modulation) * F.softplus(-wide) + modulation * exponential(wide)).to(z.dtype)


def apply_loss(name: str, z: torch.Tensor, **options: Any) -> torch.Tensor:
    """``LOSSES[name](z, ...)`` with the options from ``options`` that this loss takes."""
    loss = LOSSES[name]
    return loss(z, **pick_options(loss, options))
