"""The preference-loss zoo: every loss x margin cell and the named methods, in plain torch.

Importable on its own (it imports torch and nothing heavier), so any trainer can use it::

    from losses import preference_loss
    out = preference_loss(policy_chosen_logps, policy_rejected_logps,
                          ref_chosen_logps, ref_rejected_logps,
                          loss="hinge", margin="balanced", beta=0.1, alpha=0.3)
    out.losses.mean().backward()

Registries: :data:`LOSSES` (f(z)), :data:`MARGINS` (z), :data:`PAIR_LOSSES` (objectives defined
per side, which do not cross with a margin), :data:`F_DIVERGENCES` (reward transforms),
:data:`METHODS` (named compositions, TRL's loss_type names where TRL has the objective).
"""

from losses.core import PreferenceLossOutput, crosses_margin, preference_loss
from losses.diagnostics import PairDiagnostics, pair_diagnostics
from losses.functions import (
    EXP_CAP,
    LOSSES,
    discopop,
    exo_pair,
    exponential,
    hinge,
    ipo,
    logistic,
    robust,
    savage,
    squared,
    truncated_quadratic,
)
from losses.margins import MARGINS, balanced, difference
from losses.methods import METHODS, Method
from losses.module import PreferenceLoss, Requirements
from losses.pairwise import PAIR_LOSSES, PairTerms
from losses.registry import Registry, UnknownNameError
from losses.transforms import F_DIVERGENCES

__all__ = [
    "EXP_CAP",
    "F_DIVERGENCES",
    "LOSSES",
    "MARGINS",
    "METHODS",
    "PAIR_LOSSES",
    "Method",
    "PairDiagnostics",
    "PairTerms",
    "PreferenceLoss",
    "PreferenceLossOutput",
    "Registry",
    "Requirements",
    "UnknownNameError",
    "balanced",
    "crosses_margin",
    "difference",
    "discopop",
    "exo_pair",
    "exponential",
    "hinge",
    "ipo",
    "logistic",
    "pair_diagnostics",
    "preference_loss",
    "robust",
    "savage",
    "squared",
    "truncated_quadratic",
]
