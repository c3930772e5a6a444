"""The preference-loss zoo: every loss x margin cell and the named methods, in plain torch.

Importable on its own (it imports torch and nothing heavier), so any trainer can use it::

    from losses import preference_loss
    out = preference_loss(policy_chosen_logps, policy_rejected_logps,
                          ref_chosen_logps, ref_rejected_logps,
                          loss="hinge", margin="balanced", beta=0.1, alpha=0.3)
    out.losses.mean().backward()

Registries: :data:`LOSSES` (f(z)), :data:`MARGINS` (z), :data:`METHODS` (named compositions).
"""

from losses.core import PreferenceLoss, PreferenceLossOutput, Requirements, preference_loss
from losses.functions import (
    EXP_CAP,
    LOSSES,
    exponential,
    hinge,
    logistic,
    savage,
    squared,
    truncated_quadratic,
)
from losses.margins import MARGINS, balanced, difference
from losses.methods import METHODS, Method
from losses.registry import Registry, UnknownNameError

__all__ = [
    "EXP_CAP",
    "LOSSES",
    "MARGINS",
    "METHODS",
    "Method",
    "PreferenceLoss",
    "PreferenceLossOutput",
    "Registry",
    "Requirements",
    "UnknownNameError",
    "balanced",
    "difference",
    "exponential",
    "hinge",
    "logistic",
    "preference_loss",
    "savage",
    "squared",
    "truncated_quadratic",
]
