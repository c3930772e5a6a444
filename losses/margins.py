"""Margins: how the chosen and rejected implicit rewards are combined into one number z.

With log-ratios ``r_w = log pi(y_w|x) - log pi_ref(y_w|x)`` and ``r_l`` likewise (one number per
pair, usually the sum over response tokens), ``beta > 0`` and the gap adaptor ``alpha in (0, 1]``:

============  ====================================  ===========================
name          z                                     source
============  ====================================  ===========================
difference    beta * (r_w - r_l)                    DPO family (arXiv 2305.18290)
balanced      beta * min(r_w, -alpha * r_l)         BPO (arXiv 2506.03557, Eq. 6)
============  ====================================  ===========================

Each margin is registered in :data:`MARGINS` and has the signature
``(chosen_logratios, rejected_logratios, beta, alpha=1.0) -> z``.
"""

from __future__ import annotations

from typing import Protocol

import torch

from losses.registry import Registry


class MarginFn(Protocol):
    """The signature every registered margin has."""

    def __call__(
        self,
        chosen_logratios: torch.Tensor,
        rejected_logratios: torch.Tensor,
        beta: float,
        alpha: float = 1.0,
    ) -> torch.Tensor: ...


#: margin name -> margin function. Holds ``difference`` and ``balanced``.
MARGINS: Registry[MarginFn] = Registry("margin")


@MARGINS.register()
def difference(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    beta: float,
    alpha: float = 1.0,
) -> torch.Tensor:
    """Difference margin ``z = beta * (r_w - r_l)`` (DPO, arXiv 2305.18290, Eq. 7).

    Only the gap matters: both rewards can fall together (the chosen likelihood degrading below
    the reference, "DCR") while z grows. ``alpha`` is accepted for a uniform signature and ignored.

    Args:
        chosen_logratios: (B,) log pi(y_w|x) - log pi_ref(y_w|x).
        rejected_logratios: (B,) log pi(y_l|x) - log pi_ref(y_l|x).
        beta: KL strength, > 0; typical 0.01-0.5.
        alpha: unused.

    Example: r_w = 2, r_l = -1, beta = 0.1 gives z = 0.3.
    """
    return beta * (chosen_logratios - rejected_logratios)


@MARGINS.register()
def balanced(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    beta: float,
    alpha: float = 1.0,
) -> torch.Tensor:
    """Balanced margin ``z = beta * min(r_w, -alpha * r_l)`` (BPO, arXiv 2506.03557, Eq. 6).

    The weaker side gets all the gradient: while the chosen reward r_w is below -alpha * r_l, only
    the chosen response is pushed up, so its reward cannot be traded away for a lower rejected one.
    The gap adaptor alpha in (0, 1] scales the pressure on the rejected side (the paper's ablation
    uses 0.3). At a tie the chosen branch is taken (a deterministic choice; torch.minimum would
    split the gradient in halves).

    Args:
        chosen_logratios: (B,) chosen log-ratios r_w.
        rejected_logratios: (B,) rejected log-ratios r_l.
        beta: KL strength, > 0.
        alpha: gap adaptor in (0, 1].

    Example: r_w = 2, r_l = -1, alpha = 0.3, beta = 0.1: min(2, 0.3) = 0.3, so z = 0.03 and only
    the rejected side receives gradient.
    """
    scaled_rejected = -alpha * rejected_logratios
    return beta * torch.where(
        chosen_logratios <= scaled_rejected, chosen_logratios, scaled_rejected
    )
