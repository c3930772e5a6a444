"""Input transforms applied before any objective, as TRL applies them: they compose with every loss,
margin and per-side objective.

- f-divergence rewards (f-DPO, arXiv 2309.16240): the log-ratio r is replaced by f'(pi/pi_ref), a
  function of r, registered in :data:`F_DIVERGENCES` (``f_divergence_type``).
- LD-DPO (arXiv 2409.06411): log-probs of the tokens beyond the shorter response of the pair
  are down-weighted by ``ld_alpha`` (:func:`length_desensitized`).
- WPO (arXiv 2406.11827, Eq. 2): each pair's loss is weighted by how likely the current policy
  finds both responses (:func:`wpo_weights`).
- ODPO (arXiv 2402.10571): a per-pair offset from the responses' scores (:func:`odpo_offsets`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from losses.registry import Registry

FDivergenceFn = Callable[..., torch.Tensor]

#: ``f_divergence_type`` -> the reward transform ``r -> f'(exp(r))``.
F_DIVERGENCES: Registry[FDivergenceFn] = Registry("f-divergence")

#: where alpha_divergence clamps (alpha - 1) r before exp, as TRL does in float32
ALPHA_EXP_CLAMP = 80.0


@F_DIVERGENCES.register()
def reverse_kl(logratios: torch.Tensor) -> torch.Tensor:
    """Reverse KL (standard DPO): f'(t) = log t + 1, so g(r) is r itself."""
    return logratios


@F_DIVERGENCES.register()
def forward_kl(logratios: torch.Tensor) -> torch.Tensor:
    """Forward KL: f'(t) = 1 - 1/t, g(r) = ``1 - exp(-r)``. Example: r = log 2 gives 0.5."""
    return -torch.expm1(-logratios)


@F_DIVERGENCES.register()
def js_divergence(logratios: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon: f'(t) = log(2t / (t + 1)), g(r) = ``log 2 + log sigmoid(r)``.

    Example: r = 0 gives 0.
    """
    return math.log(2.0) + F.logsigmoid(logratios)


@F_DIVERGENCES.register()
def alpha_divergence(
    logratios: torch.Tensor, *, f_alpha_divergence_coef: float = 0.5
) -> torch.Tensor:
    """Alpha divergence: f'(t) = (t^(a - 1) - 1) / (a - 1), a = ``f_alpha_divergence_coef``.

    g(r) = ``(exp((a - 1) r) - 1) / (a - 1)``, with (a - 1) r clamped at 80 as TRL does;
    a = 1 is the reverse-KL limit (r itself). Example: a = 0.5, r = 0 gives 0.
    """
    shift = f_alpha_divergence_coef - 1.0
    if abs(shift) < 1e-6:
        return logratios
    return torch.expm1((shift * logratios).clamp(max=ALPHA_EXP_CLAMP)) / shift


def length_desensitized(
    logps: torch.Tensor, tail_logps: torch.Tensor, ld_alpha: float
) -> torch.Tensor:
    """LD-DPO (arXiv 2409.06411, Eq. 9): ``shared + ld_alpha * tail = logps - (1 - ld_alpha) *
    tail``, where ``tail_logps`` sums the log-probs of the tokens beyond the shorter response of
    the pair (0 for the shorter one) and ``logps`` is the whole response's sum.

    Example: logps -10 with tail -4, ld_alpha 0.5: -6 + 0.5 * -4 = -8.
    """
    if not 0 <= ld_alpha <= 1:
        raise ValueError(f"ld_alpha must be in [0, 1], got {ld_alpha!r}")
    return logps - (1.0 - ld_alpha) * tail_logps


def wpo_weights(chosen_weighting_logps: torch.Tensor, rejected_weighting_logps: torch.Tensor):
    """WPO (arXiv 2406.11827, Eq. 2): ``exp(a_w + a_l)``, detached, where a is a response's mean
    over its tokens of ``log p(y_t) - log sum_v p(v)^2`` under the current policy.

    Example: a_w = -0.5, a_l = -1 gives exp(-1.5) ~ 0.2231.
    """
    return torch.exp(chosen_weighting_logps.detach() + rejected_weighting_logps.detach())


def odpo_offsets(
    score_chosen: torch.Tensor, score_rejected: torch.Tensor, odpo_alpha: float
) -> torch.Tensor:
    """ODPO's offset (arXiv 2402.10571, Sec. 3): ``odpo_alpha * log(score_w - score_l)``,
    subtracted from the margin z. Needs ``score_chosen > score_rejected`` for every pair.

    Example: scores 8 and 3, alpha 1: log 5 ~ 1.6094.
    """
    gaps = score_chosen - score_rejected
    bad = torch.nonzero(~(gaps > 0)).flatten().tolist()
    if bad:
        raise ValueError(
            f"odpo needs score_chosen > score_rejected for every pair (the offset is "
            f"log(score_chosen - score_rejected)); not so at batch positions {bad[:10]}"
        )
    return odpo_alpha * torch.log(gaps)
