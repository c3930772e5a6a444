"""The ``nn.Module`` form of the preference objective, and what it asks of a trainer.

:class:`PreferenceLoss` is configured once (and validated then, before any model loads) and called
per batch; its :attr:`~PreferenceLoss.requirements` tell a trainer what to feed it, so the trainer
asks instead of branching on names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from losses.core import (
    PreferenceLossOutput,
    crosses_margin,
    needs_mismatched_pairs,
    preference_loss,
)


@dataclass(frozen=True)
class Requirements:
    """What an objective needs from the trainer that calls it.

    Attributes:
        needs_reference: the loss uses reference log-probs (False: reference-free, e.g. SimPO).
        length_normalized: pass log-probs averaged over response tokens instead of summed.
        needs_chosen_nll: pass ``policy_chosen_nll``, the chosen response's mean token NLL.
        needs_tail_logps: pass the four ``*_tail_logps`` (LD-DPO's ``ld_alpha``).
        needs_weighting_logps: pass ``chosen_weighting_logps`` / ``rejected_weighting_logps``
            (WPO's ``use_weighting``).
        needs_scores: pass ``score_chosen`` / ``score_rejected`` from the data (ODPO).
        needs_mismatched_pairs: pass ``kl_logratios``, the log-ratios of mismatched (prompt,
            response) pairs of the batch (KTO).
        crosses_margin: the objective is a loss of one margin z, so ``margin=balanced`` applies
            (False for per-side objectives, which take margin=difference only).
    """

    needs_reference: bool = True
    length_normalized: bool = False
    needs_chosen_nll: bool = False
    needs_tail_logps: bool = False
    needs_weighting_logps: bool = False
    needs_scores: bool = False
    needs_mismatched_pairs: bool = False
    crosses_margin: bool = True


class PreferenceLoss(nn.Module):
    """``nn.Module`` form of :func:`losses.preference_loss`, configured once, called per batch.

    Args:
        loss: loss name (``losses.LOSSES``) or per-side objective (``losses.PAIR_LOSSES``).
        margin: margin name (see ``losses.MARGINS``).
        beta: KL strength, > 0.
        alpha: gap adaptor in (0, 1].
        length_normalized: the objective wants log-probs averaged over response tokens.
        **extras: the extra keyword options of :func:`losses.preference_loss` (:attr:`EXTRAS`).

    The configuration is validated here, at construction, so a bad name or value fails before a
    model is loaded. ``requirements`` tells a trainer what to feed ``forward``.
    """

    #: the extra options a PreferenceLoss accepts (trainers read method configs with this)
    EXTRAS = (
        "label_smoothing",
        "discopop_tau",
        "f_divergence_type",
        "f_alpha_divergence_coef",
        "ld_alpha",
        "use_weighting",
        "odpo_alpha",
        "gamma",
        "dpop_lambda",
        "margin_scale",
        "calibration_weight",
        "nll_weight",
        "preference_weight",
        "reference_free",
    )

    #: the per-batch tensors beyond the four log-probs that ``forward`` passes through
    INPUTS = (
        "policy_chosen_nll",
        "policy_chosen_tail_logps",
        "policy_rejected_tail_logps",
        "ref_chosen_tail_logps",
        "ref_rejected_tail_logps",
        "chosen_weighting_logps",
        "rejected_weighting_logps",
        "score_chosen",
        "score_rejected",
        "kl_logratios",
    )

    def __init__(
        self,
        loss: str = "logistic",
        margin: str = "difference",
        beta: float = 0.1,
        alpha: float = 1.0,
        *,
        length_normalized: bool = False,
        **extras: float | bool | str | None,
    ) -> None:
        super().__init__()
        unknown = sorted(set(extras) - set(self.EXTRAS))
        if unknown:
            raise TypeError(
                f"unknown option(s) {', '.join(unknown)}; valid options: {', '.join(self.EXTRAS)}"
            )
        self.options: dict[str, object] = {"loss": loss, "margin": margin, "beta": beta}
        self.options["alpha"] = alpha
        self.options.update(extras)
        self.length_normalized = length_normalized
        # fail now, not at the first batch: run the objective once on a dummy pair (two rows:
        # ODPO needs score_chosen > score_rejected, KTO a batch to estimate its reference point)
        dummy = torch.full((2,), -1.0)
        inputs = dict.fromkeys(self.INPUTS, dummy)
        inputs.update(score_chosen=torch.ones(2), score_rejected=torch.zeros(2))
        preference_loss(dummy, dummy, dummy, dummy, **inputs, **self.options)  # type: ignore[arg-type]

    @property
    def requirements(self) -> Requirements:
        """What the trainer must provide (reference log-probs, averaging, extra inputs)."""
        options = self.options
        loss = str(options["loss"])
        return Requirements(
            needs_reference=not bool(options.get("reference_free", False)),
            length_normalized=self.length_normalized,
            needs_chosen_nll=float(options.get("nll_weight") or 0.0) > 0,  # type: ignore[arg-type]
            needs_tail_logps=options.get("ld_alpha") is not None,
            needs_weighting_logps=bool(options.get("use_weighting", False)),
            needs_scores=float(options.get("odpo_alpha") or 0.0) > 0,  # type: ignore[arg-type]
            needs_mismatched_pairs=needs_mismatched_pairs(loss),
            crosses_margin=crosses_margin(loss),
        )

    @property
    def beta(self) -> float:
        """The KL strength beta (rewards are beta * log-ratio)."""
        return float(self.options["beta"])  # type: ignore[arg-type]

    def forward(
        self,
        policy_chosen_logps: torch.Tensor,
        policy_rejected_logps: torch.Tensor,
        ref_chosen_logps: torch.Tensor | None = None,
        ref_rejected_logps: torch.Tensor | None = None,
        **inputs: torch.Tensor | None,
    ) -> PreferenceLossOutput:
        """Per-example losses and rewards; see :func:`losses.preference_loss` for shapes.

        ``inputs`` are the per-batch tensors named in :attr:`INPUTS` (``policy_chosen_nll``...).
        """
        unknown = sorted(set(inputs) - set(self.INPUTS))
        if unknown:
            raise TypeError(
                f"unknown input(s) {', '.join(unknown)}; valid inputs: {', '.join(self.INPUTS)}"
            )
        return preference_loss(
            policy_chosen_logps,
            policy_rejected_logps,
            ref_chosen_logps,
            ref_rejected_logps,
            **inputs,
            **self.options,  # type: ignore[arg-type]
        )

    def extra_repr(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{options}, length_normalized={self.length_normalized}"
