"""Objectives defined per side (or per batch), not through one margin z: they do not cross with a
margin.

Each is registered in :data:`PAIR_LOSSES` as ``fn(terms, beta, **options) -> (B,) losses``, with
``terms`` a :class:`PairTerms` (the pair's log-ratios after any input transform, and the raw
log-probs for the objectives that compare log-probs, not log-ratios). Options are keyword-only
parameters with TRL's defaults, passed by name like the losses of :mod:`losses.functions`.

Why no margin: nca_pair, bco_pair, sppo_hard, apo_zero and kto put a separate term on each side
(r_w and r_l each have their own target), apo_down mixes one side with the difference, aot and
aot_unpaired sort over the batch before pairing, and orpo's odds ratio is of log-probs, not
log-ratios. A min(r_w, -alpha r_l) margin has nothing to replace in any of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from losses.registry import Registry, pick_options


@dataclass(frozen=True)
class PairTerms:
    """What a per-side objective reads, all (B,) in the compute dtype.

    Attributes:
        chosen_logratios: r_w (after the f-divergence transform, if any).
        rejected_logratios: r_l.
        policy_chosen: log pi(y_w|x) (after LD-DPO's down-weighting, if any).
        policy_rejected: log pi(y_l|x).
        ref_chosen: log pi_ref(y_w|x), or None (reference-free).
        ref_rejected: log pi_ref(y_l|x), or None.
        kl_logratios: log-ratios of mismatched (prompt, response) pairs (KTO's reference point),
            or None when the trainer provides none.
    """

    chosen_logratios: torch.Tensor
    rejected_logratios: torch.Tensor
    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None
    kl_logratios: torch.Tensor | None = None


PairLossFn = Callable[..., torch.Tensor]

#: name -> per-side objective ``fn(terms, beta, **options)``.
PAIR_LOSSES: Registry[PairLossFn] = Registry("per-side loss")


@PAIR_LOSSES.register()
def nca_pair(terms: PairTerms, beta: float) -> torch.Tensor:
    """NCA on pairs (arXiv 2402.05369, Eq. 11): absolute likelihoods, not only their gap.

    ``-log s(beta r_w) - 1/2 log s(-beta r_w) - 1/2 log s(-beta r_l)``, s = sigmoid.

    Example: r_w = r_l = 0: ``2 log 2 ~ 1.3863``.
    """
    chosen, rejected = beta * terms.chosen_logratios, beta * terms.rejected_logratios
    return F.softplus(-chosen) + 0.5 * F.softplus(chosen) + 0.5 * F.softplus(rejected)


@PAIR_LOSSES.register()
def bco_pair(terms: PairTerms, beta: float) -> torch.Tensor:
    """BCO on pairs (arXiv 2404.04656): a binary classifier per side, chosen = 1, rejected = 0.

    ``-log s(beta r_w) - log s(-beta r_l)``, as TRL's ``bco_pair`` (no running reward shift).

    Example: r_w = r_l = 0: ``2 log 2``.
    """
    chosen, rejected = beta * terms.chosen_logratios, beta * terms.rejected_logratios
    return F.softplus(-chosen) + F.softplus(rejected)


@PAIR_LOSSES.register()
def sppo_hard(terms: PairTerms, beta: float) -> torch.Tensor:
    """SPPO with hard win probabilities (arXiv 2405.00675, Eq. 4.7 with P = 1 / 0).

    ``(r_w - 1/(2 beta))^2 + (r_l + 1/(2 beta))^2``: each log-ratio pulled to its own target
    (also Cal-DPO's calibration term, arXiv 2412.14516).

    Example: beta 0.5, r_w = 1, r_l = 0: ``0 + 1 = 1``.
    """
    target = 0.5 / beta
    return (terms.chosen_logratios - target) ** 2 + (terms.rejected_logratios + target) ** 2


@PAIR_LOSSES.register()
def apo_zero(terms: PairTerms, beta: float) -> torch.Tensor:
    """APO-zero (arXiv 2408.06266, Eq. 7): raise the chosen likelihood, lower the rejected.

    ``1 - s(beta r_w) + s(beta r_l)``. For chosen responses better than the model's own.

    Example: r_w = r_l = 0: ``1``.
    """
    return torch.sigmoid(-beta * terms.chosen_logratios) + torch.sigmoid(
        beta * terms.rejected_logratios
    )


@PAIR_LOSSES.register()
def apo_down(terms: PairTerms, beta: float) -> torch.Tensor:
    """APO-down (arXiv 2408.06266, Eq. 8): lower both, the rejected more.

    ``s(beta r_w) + 1 - s(beta (r_w - r_l))``. For chosen responses worse than the model's own.

    Example: r_w = r_l = 0: ``1``.
    """
    chosen = terms.chosen_logratios
    return torch.sigmoid(beta * chosen) + torch.sigmoid(-beta * (chosen - terms.rejected_logratios))


def _smoothed_logistic(delta: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    return (1.0 - label_smoothing) * F.softplus(-delta) + label_smoothing * F.softplus(delta)


@PAIR_LOSSES.register()
def aot(terms: PairTerms, beta: float, *, label_smoothing: float = 0.0) -> torch.Tensor:
    """AOT, paired (arXiv 2406.05882): distributional alignment via sorting over the batch.

    ``delta = sort(log pi(y_w) - log pi(y_l)) - sort(log pi_ref(y_w) - log pi_ref(y_l))``
    (each sorted over the batch), then ``(1 - eps) softplus(-beta delta) + eps softplus(beta
    delta)``. Element i of the result belongs to the i-th smallest, not to pair i.

    Example: one pair with r_w - r_l = 2, beta 1: ``log(1 + e^-2)``.
    """
    if terms.ref_chosen is None or terms.ref_rejected is None:
        raise ValueError("aot compares policy and reference log-prob gaps; it needs a reference")
    policy_gaps = torch.sort(terms.policy_chosen - terms.policy_rejected, dim=0).values
    ref_gaps = torch.sort(terms.ref_chosen - terms.ref_rejected, dim=0).values
    return _smoothed_logistic(beta * (policy_gaps - ref_gaps), label_smoothing)


@PAIR_LOSSES.register()
def aot_unpaired(terms: PairTerms, beta: float, *, label_smoothing: float = 0.0) -> torch.Tensor:
    """AOT, unpaired (arXiv 2406.05882): ``delta = sort(r_w) - sort(r_l)`` over the batch, then
    the label-smoothed logistic loss of ``beta delta`` as in :func:`aot`.

    Example: r_w = (1, 3), r_l = (0, -2), beta 1: delta = (1 - (-2), 3 - 0) = (3, 3).
    """
    chosen = torch.sort(terms.chosen_logratios, dim=0).values
    rejected = torch.sort(terms.rejected_logratios, dim=0).values
    return _smoothed_logistic(beta * (chosen - rejected), label_smoothing)


@PAIR_LOSSES.register()
def kto(terms: PairTerms, beta: float) -> torch.Tensor:
    """KTO on paired data (arXiv 2402.01306, Eq. 7), the chosen response desirable, the rejected
    undesirable, desirable and undesirable weights 1.

    ``(1 - s(beta (r_w - z0)) + 1 - s(beta (z0 - r_l))) / 2`` with the reference point
    ``z0 = max(0, mean(kl_logratios))`` (detached): the mean log-ratio of mismatched (prompt,
    response) pairs of the batch, as TRL's KTOTrainer estimates it. The halving makes the batch
    mean equal to KTOTrainer's mean over its 2B unpaired examples.

    Example: r_w = r_l = 0 and z0 = 0: ``(0.5 + 0.5) / 2 = 0.5``.
    """
    if terms.kl_logratios is None:
        raise ValueError(
            "kto needs kl_logratios: the log-ratios log pi(y_j|x_i) - log pi_ref(y_j|x_i) of "
            "mismatched pairs of the batch (its reference point); the trainer provides them when "
            "the objective's requirements.needs_mismatched_pairs is True"
        )
    reference_point = terms.kl_logratios.detach().mean().clamp(min=0)
    desirable = torch.sigmoid(-beta * (terms.chosen_logratios - reference_point))
    undesirable = torch.sigmoid(-beta * (reference_point - terms.rejected_logratios))
    return 0.5 * (desirable + undesirable)


kto.reads_mismatched_pairs = True  # type: ignore[attr-defined]  # trainers provide kl_logratios


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -log 2 (Maechler 2012)."""
    x = x.clamp(max=-1e-6)  # log-probs are < 0; keeps log 0 (and junk inputs > 0) finite
    return torch.where(
        x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x))
    )


@PAIR_LOSSES.register()
def orpo(terms: PairTerms, beta: float) -> torch.Tensor:
    """ORPO's odds-ratio term (arXiv 2403.07691, Eqs. 4-7), reference-free, on length-averaged
    log-probs p_w, p_l; method ``orpo`` adds the chosen NLL (``nll_weight`` 1).

    ``beta * softplus(-log_odds)``, ``log_odds = (p_w - p_l) - (log(1 - e^p_w) - log(1 - e^p_l))``
    (beta is ORPO's lambda). Log-probs are clamped to <= -1e-6 inside ``log(1 - e^p)``.

    Example: p_w = p_l = -1, beta 0.1: ``0.1 log 2``.
    """
    chosen, rejected = terms.policy_chosen, terms.policy_rejected
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    return beta * F.softplus(-log_odds)


def apply_pair_loss(name: str, terms: PairTerms, *, beta: float, **options: Any) -> torch.Tensor:
    """``PAIR_LOSSES[name](terms, beta, ...)`` with the options (from ``options``) it takes."""
    loss = PAIR_LOSSES[name]
    return loss(terms, beta, **pick_options(loss, options))
