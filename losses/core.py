"""The preference objective: a margin, a loss of the margin, and optional extra terms.

:func:`preference_loss` is the pure function (the signature DPO code across the ecosystem uses);
:class:`PreferenceLoss` is its ``nn.Module`` form, which also tells a trainer what it needs
(:class:`Requirements`) so that the trainer asks instead of branching on names.

Per pair, with log-ratios r = log pi - log pi_ref and s = ``margin_scale`` (default ``beta``)::

    z      = margin(r_w, r_l, s, alpha) - s * dpop_lambda * max(0, -r_w) - gamma
    pref   = (1 - eps) * f(z) + eps * f(-z)                      # eps = label_smoothing (cDPO)
    losses = preference_weight * pref
           + calibration_weight * ((r_w - 1/(2 beta))^2 + (r_l + 1/(2 beta))^2)   # Cal-DPO
           + nll_weight * chosen_nll                                              # RPO

With every extra at its default this is exactly ``f(margin(r_w, r_l, beta, alpha))``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from losses.functions import LOSSES
from losses.margins import MARGINS


@dataclass(frozen=True)
class PreferenceLossOutput:
    """What :func:`preference_loss` returns. All tensors have the batch shape (B,).

    Attributes:
        losses: per-example loss (float32, differentiable); reduce it yourself (e.g. ``.mean()``).
        chosen_rewards: beta * r_w, detached (the implicit reward of the chosen response).
        rejected_rewards: beta * r_l, detached.
        margins: the margin z fed to the loss, detached.
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    margins: torch.Tensor


@dataclass(frozen=True)
class Requirements:
    """What an objective needs from the trainer that calls it.

    Attributes:
        needs_reference: the loss uses reference log-probs (False: reference-free, e.g. SimPO).
        length_normalized: pass log-probs averaged over response tokens instead of summed.
        needs_chosen_nll: pass ``policy_chosen_nll``, the chosen response's mean token NLL.
    """

    needs_reference: bool = True
    length_normalized: bool = False
    needs_chosen_nll: bool = False


def _check_tensor(name: str, tensor: object, shape: torch.Size | None) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor (log-probabilities), got dtype {tensor.dtype}"
        )
    if shape is not None and tensor.shape != shape:
        raise ValueError(
            f"{name} has shape {tuple(tensor.shape)}, but policy_chosen_logps has shape "
            f"{tuple(shape)}; all log-prob tensors must have the same (batch) shape"
        )
    return tensor


def _check_options(
    beta: float,
    alpha: float,
    label_smoothing: float,
    margin_scale: float | None,
    weights: dict[str, float],
) -> None:
    if isinstance(beta, bool) or not (
        isinstance(beta, int | float) and math.isfinite(beta) and beta > 0
    ):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    if isinstance(alpha, bool) or not (isinstance(alpha, int | float) and 0 < alpha <= 1):
        raise ValueError(f"alpha (the gap adaptor) must be in (0, 1], got {alpha!r}")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing!r}")
    if margin_scale is not None and not (math.isfinite(margin_scale) and margin_scale > 0):
        raise ValueError(f"margin_scale must be None or a finite number > 0, got {margin_scale!r}")
    for key, value in weights.items():
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{key} must be a finite number >= 0, got {value!r}")


def preference_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    *,
    loss: str = "logistic",
    margin: str = "difference",
    beta: float = 0.1,
    alpha: float = 1.0,
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
    dpop_lambda: float = 0.0,
    margin_scale: float | None = None,
    calibration_weight: float = 0.0,
    nll_weight: float = 0.0,
    preference_weight: float = 1.0,
    reference_free: bool = False,
    policy_chosen_nll: torch.Tensor | None = None,
) -> PreferenceLossOutput:
    """Per-example preference loss for any loss x margin cell, plus optional extra terms.

    Computation is in float32 whatever the input dtype (bfloat16 inputs are upcast, and their
    gradients flow back in bfloat16), so the result is finite for log-ratios of size 1e5.

    Args:
        policy_chosen_logps: (B,) log pi(y_w|x), summed (or averaged) over response tokens.
        policy_rejected_logps: (B,) log pi(y_l|x).
        ref_chosen_logps: (B,) log pi_ref(y_w|x); None only for a reference-free objective.
        ref_rejected_logps: (B,) log pi_ref(y_l|x); None together with ``ref_chosen_logps``.
        loss: a name in ``LOSSES`` (logistic, hinge, squared, exponential, truncated_quadratic,
            savage).
        margin: a name in ``MARGINS`` (difference, balanced).
        beta: KL strength, > 0 (typical 0.01-0.5; SimPO uses ~2).
        alpha: gap adaptor of the balanced margin, in (0, 1] (BPO's ablation: 0.3).
        label_smoothing: cDPO's eps in [0, 0.5): the probability that a label is flipped.
        gamma: a target margin subtracted from z (SimPO's gamma, in units of z).
        dpop_lambda: DPOP's lambda >= 0 (arXiv 2402.13228): penalises r_w < 0 inside the margin.
        margin_scale: the scale used inside the margin instead of beta (Cal-DPO uses 1).
        calibration_weight: weight of Cal-DPO's calibration term (arXiv 2412.14516).
        nll_weight: weight of the chosen response's NLL (RPO, arXiv 2404.19733).
        preference_weight: weight of the margin loss; 0 leaves only the extra terms (the
            chosen-NLL control).
        reference_free: ignore the reference: r = policy log-probs (SimPO).
        policy_chosen_nll: (B,) mean token NLL of the chosen response; needed iff nll_weight > 0.

    Returns:
        :class:`PreferenceLossOutput` with ``losses`` (B,), ``chosen_rewards``,
        ``rejected_rewards`` (beta * log-ratio, detached) and ``margins`` (z, detached).

    Example (hand-worked): policy logps (-1, -3), reference logps (-2, -2), beta 1, logistic and
    difference: r_w = 1, r_l = -1, z = 2, loss = log(1 + e^-2) ~ 0.1269.
    """
    loss_fn = LOSSES[loss]
    margin_fn = MARGINS[margin]
    _check_options(
        beta,
        alpha,
        label_smoothing,
        margin_scale,
        {
            "dpop_lambda": dpop_lambda,
            "calibration_weight": calibration_weight,
            "nll_weight": nll_weight,
            "preference_weight": preference_weight,
        },
    )
    if not math.isfinite(gamma):
        raise ValueError(f"gamma must be finite, got {gamma!r}")
    shape = _check_tensor("policy_chosen_logps", policy_chosen_logps, None).shape
    _check_tensor("policy_rejected_logps", policy_rejected_logps, shape)
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("pass both ref_chosen_logps and ref_rejected_logps, or neither")
    if ref_chosen_logps is None and not reference_free:
        raise ValueError(
            "reference log-probs are missing: pass ref_chosen_logps and ref_rejected_logps, or "
            "reference_free=True for a reference-free objective such as SimPO"
        )

    # float32 throughout: bf16 has 8 bits of mantissa, too few for differences of large log-probs
    policy_chosen = policy_chosen_logps.float()
    policy_rejected = policy_rejected_logps.float()
    if reference_free or ref_chosen_logps is None:
        chosen_logratios, rejected_logratios = policy_chosen, policy_rejected
    else:
        _check_tensor("ref_chosen_logps", ref_chosen_logps, shape)
        _check_tensor("ref_rejected_logps", ref_rejected_logps, shape)
        chosen_logratios = policy_chosen - ref_chosen_logps.float()
        rejected_logratios = policy_rejected - ref_rejected_logps.float()

    scale = beta if margin_scale is None else margin_scale
    z = margin_fn(chosen_logratios, rejected_logratios, scale, alpha)
    if dpop_lambda > 0:
        # DPOP (arXiv 2402.13228, Eq. 3): lambda * max(0, log pi_ref(y_w) - log pi(y_w))
        z = z - scale * dpop_lambda * torch.relu(-chosen_logratios)
    if gamma != 0:
        z = z - gamma

    losses = torch.zeros_like(z)
    if preference_weight > 0:
        pref = loss_fn(z)
        if label_smoothing > 0:
            # cDPO (Mitchell 2023): the expected loss when a label is flipped with probability eps
            pref = (1.0 - label_smoothing) * pref + label_smoothing * loss_fn(-z)
        losses = losses + preference_weight * pref
    if calibration_weight > 0:
        # Cal-DPO (arXiv 2412.14516, Eq. 10): pull log-ratios towards +-1/(2 beta)
        target = 1.0 / (2.0 * beta)
        calibration = (chosen_logratios - target) ** 2 + (rejected_logratios + target) ** 2
        losses = losses + calibration_weight * calibration
    if nll_weight > 0:
        if policy_chosen_nll is None:
            raise ValueError(
                "nll_weight > 0 needs policy_chosen_nll (the chosen response's mean token NLL)"
            )
        _check_tensor("policy_chosen_nll", policy_chosen_nll, shape)
        losses = losses + nll_weight * policy_chosen_nll.float()

    return PreferenceLossOutput(
        losses=losses,
        chosen_rewards=(beta * chosen_logratios).detach(),
        rejected_rewards=(beta * rejected_logratios).detach(),
        margins=z.detach(),
    )


class PreferenceLoss(nn.Module):
    """``nn.Module`` form of :func:`preference_loss`, configured once, called per batch.

    Args:
        loss: loss name (see ``losses.LOSSES``).
        margin: margin name (see ``losses.MARGINS``).
        beta: KL strength, > 0.
        alpha: gap adaptor in (0, 1].
        length_normalized: the objective wants log-probs averaged over response tokens.
        **extras: the extra keyword options of :func:`preference_loss` (label_smoothing, gamma,
            dpop_lambda, margin_scale, calibration_weight, nll_weight, preference_weight,
            reference_free).

    The configuration is validated here, at construction, so a bad name or value fails before a
    model is loaded. ``requirements`` tells a trainer what to feed ``forward``.
    """

    #: the extra options a PreferenceLoss accepts (trainers read method configs with this)
    EXTRAS = (
        "label_smoothing",
        "gamma",
        "dpop_lambda",
        "margin_scale",
        "calibration_weight",
        "nll_weight",
        "preference_weight",
        "reference_free",
    )

    def __init__(
        self,
        loss: str = "logistic",
        margin: str = "difference",
        beta: float = 0.1,
        alpha: float = 1.0,
        *,
        length_normalized: bool = False,
        **extras: float | bool | None,
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
        # fail now, not at the first batch: run the objective once on a dummy pair
        dummy = torch.zeros(1)
        preference_loss(dummy, dummy, dummy, dummy, policy_chosen_nll=dummy, **self.options)

    @property
    def requirements(self) -> Requirements:
        """What the trainer must provide (reference log-probs, averaging, chosen NLL)."""
        return Requirements(
            needs_reference=not bool(self.options.get("reference_free", False)),
            length_normalized=self.length_normalized,
            needs_chosen_nll=float(self.options.get("nll_weight") or 0.0) > 0,
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
        *,
        policy_chosen_nll: torch.Tensor | None = None,
    ) -> PreferenceLossOutput:
        """Per-example losses and rewards; see :func:`preference_loss` for shapes."""
        return preference_loss(
            policy_chosen_logps,
            policy_rejected_logps,
            ref_chosen_logps,
            ref_rejected_logps,
            policy_chosen_nll=policy_chosen_nll,
            **self.options,  # type: ignore[arg-type]
        )

    @classmethod
    def from_method(cls, name: str, **overrides: float | bool | None) -> PreferenceLoss:
        """Build the objective of a named method (``losses.METHODS``), with overrides."""
        from losses.methods import METHODS

        return METHODS[name].build(**overrides)

    def extra_repr(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{options}, length_normalized={self.length_normalized}"
