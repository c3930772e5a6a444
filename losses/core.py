"""The preference objective: input transforms, a margin and a loss of it (or a per-side
objective), and optional extra terms. :func:`preference_loss` is the pure function (the signature
DPO code across the ecosystem uses); :class:`losses.PreferenceLoss` is its ``nn.Module`` form.

Per pair, in TRL's order, with s = ``margin_scale`` (default ``beta``)::

    logps  -> logps - (1 - ld_alpha) * tail_logps                  # LD-DPO (ld_alpha set)
    r      =  logps - ref_logps;  g = f_divergence(r)              # f-DPO (reverse_kl: g = r)
    z      =  margin(g_w, g_l, s, alpha) - s * dpop_lambda * max(0, -g_w) - gamma - offset
    pref   =  f(z), or (1 - eps) f(z) + eps f(-z) when f takes no label_smoothing (cDPO);
              a per-side objective instead reads g_w, g_l (and the log-probs) directly
    losses =  weight * (preference_weight * pref
                        + calibration_weight * ((g_w - 1/(2 beta))^2 + (g_l + 1/(2 beta))^2)
                        + nll_weight * chosen_nll)
    weight =  exp(a_w + a_l) with use_weighting (WPO), else 1;  offset = ODPO's alpha log(s_w - s_l)

With every extra at its default this is exactly ``f(margin(r_w, r_l, beta, alpha))``.
Precision: float64 inputs are computed and returned in float64; float32, bfloat16 and float16 in
float32 (bf16's 8-bit mantissa is too coarse for differences of large log-probs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from losses.functions import LOSSES, apply_loss
from losses.margins import MARGINS
from losses.pairwise import PAIR_LOSSES, PairTerms, apply_pair_loss, sppo_hard
from losses.registry import UnknownNameError, keyword_options, pick_options
from losses.transforms import F_DIVERGENCES, length_desensitized, odpo_offsets, wpo_weights

#: options that act on the margin z, so a per-side objective cannot take them (value: neutral)
MARGIN_OPTIONS = {"gamma": 0.0, "dpop_lambda": 0.0, "margin_scale": None, "odpo_alpha": 0.0}


@dataclass(frozen=True)
class PreferenceLossOutput:
    """What :func:`preference_loss` returns. All tensors have the batch shape (B,).

    Attributes:
        losses: per-example loss (float32, or float64 for float64 inputs; differentiable);
            reduce it yourself (e.g. ``.mean()``).
        chosen_rewards: beta * r_w, detached (the implicit reward of the chosen response).
        rejected_rewards: beta * r_l, detached.
        margins: the margin z fed to the loss, detached; for a per-side objective, which has
            none, ``beta * (g_w - g_l)``.
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    margins: torch.Tensor


def crosses_margin(loss: str) -> bool:
    """True for a loss of one margin z (``LOSSES``), which crosses with every margin; False for a
    per-side objective (``PAIR_LOSSES``). Unknown names raise, listing both registries."""
    if loss in LOSSES:
        return True
    if loss in PAIR_LOSSES:
        return False
    raise UnknownNameError(
        f"unknown loss {loss!r}; registered losses of the margin: {', '.join(sorted(LOSSES))}; "
        f"per-side objectives (margin=difference only): {', '.join(sorted(PAIR_LOSSES))}"
    )


def needs_mismatched_pairs(loss: str) -> bool:
    """True for an objective that reads ``kl_logratios`` (marked ``reads_mismatched_pairs``)."""
    return not crosses_margin(loss) and getattr(PAIR_LOSSES[loss], "reads_mismatched_pairs", False)


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


def _check_options(options: dict[str, Any]) -> None:
    beta, alpha = options["beta"], options["alpha"]
    if isinstance(beta, bool) or not (
        isinstance(beta, int | float) and math.isfinite(beta) and beta > 0
    ):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    if isinstance(alpha, bool) or not (isinstance(alpha, int | float) and 0 < alpha <= 1):
        raise ValueError(f"alpha (the gap adaptor) must be in (0, 1], got {alpha!r}")
    smoothing = options["label_smoothing"]
    if smoothing is not None and not 0 <= smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {smoothing!r}")
    scale = options["margin_scale"]
    if scale is not None and not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"margin_scale must be None or a finite number > 0, got {scale!r}")
    if not math.isfinite(options["gamma"]):
        raise ValueError(f"gamma must be finite, got {options['gamma']!r}")
    for key in ("dpop_lambda", "calibration_weight", "nll_weight", "preference_weight"):
        if not (math.isfinite(options[key]) and options[key] >= 0):
            raise ValueError(f"{key} must be a finite number >= 0, got {options[key]!r}")
    if not (math.isfinite(options["odpo_alpha"]) and options["odpo_alpha"] >= 0):
        raise ValueError(f"odpo_alpha must be a finite number >= 0, got {options['odpo_alpha']!r}")
    if options["ld_alpha"] is not None and not 0 <= options["ld_alpha"] <= 1:
        raise ValueError(f"ld_alpha must be None or in [0, 1], got {options['ld_alpha']!r}")
    F_DIVERGENCES[options["f_divergence_type"]]  # unknown names list the registered ones
    if crosses_margin(options["loss"]):
        MARGINS[options["margin"]]
        return
    # a per-side objective: nothing may act on a margin it does not have
    if options["margin"] != "difference":
        raise ValueError(
            f"loss {options['loss']!r} is defined per side, not through one margin z, so it does "
            f"not cross with margin={options['margin']!r}; use margin=difference (the default). "
            f"Losses that cross: {', '.join(sorted(LOSSES))}"
        )
    for key, neutral in MARGIN_OPTIONS.items():
        if options[key] != neutral:
            raise ValueError(
                f"{key}={options[key]!r} acts on the margin z, which per-side loss "
                f"{options['loss']!r} does not have; leave it at {neutral!r}"
            )
    if smoothing and "label_smoothing" not in keyword_options(PAIR_LOSSES[options["loss"]]):
        raise ValueError(f"per-side loss {options['loss']!r} takes no label_smoothing")


@dataclass(frozen=True)
class _Batch:
    """The (batch) shape every input tensor must have and the dtype the loss is computed in."""

    shape: torch.Size
    dtype: torch.dtype

    @classmethod
    def of(
        cls,
        policy_chosen_logps: torch.Tensor,
        policy_rejected_logps: torch.Tensor,
        ref_chosen_logps: torch.Tensor | None,
        ref_rejected_logps: torch.Tensor | None,
        reference_free: bool,
    ) -> _Batch:
        """Check the four log-prob inputs (the reference's only when it is used)."""
        shape = _check_tensor("policy_chosen_logps", policy_chosen_logps, None).shape
        _check_tensor("policy_rejected_logps", policy_rejected_logps, shape)
        if (ref_chosen_logps is None) != (ref_rejected_logps is None):
            raise ValueError("pass both ref_chosen_logps and ref_rejected_logps, or neither")
        if ref_chosen_logps is None and not reference_free:
            raise ValueError(
                "reference log-probs are missing: pass ref_chosen_logps and ref_rejected_logps, or "
                "reference_free=True for a reference-free objective such as SimPO"
            )
        if not reference_free and ref_chosen_logps is not None and ref_rejected_logps is not None:
            _check_tensor("ref_chosen_logps", ref_chosen_logps, shape)
            _check_tensor("ref_rejected_logps", ref_rejected_logps, shape)
        # float64 stays float64; everything narrower is computed in float32
        return cls(shape, torch.promote_types(policy_chosen_logps.dtype, torch.float32))

    def wide(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.dtype)

    def needed(self, name: str, tensor: torch.Tensor | None, why: str) -> torch.Tensor:
        """An optional input that ``why`` needs, checked and widened."""
        if tensor is None:
            raise ValueError(f"{why} needs {name}")
        return self.wide(_check_tensor(name, tensor, self.shape))

    def log_probs(
        self,
        chosen_and_rejected: tuple[torch.Tensor, torch.Tensor],
        tails: dict[str, torch.Tensor | None],
        ld_alpha: float | None,
    ) -> list[torch.Tensor]:
        """One model's (chosen, rejected) log-probs, widened; with ``ld_alpha``, LD-DPO's: the
        tokens past the pair's shorter response count ld_alpha (``tails``: their log-prob sums,
        by argument name)."""
        logps = [self.wide(x) for x in chosen_and_rejected]
        if ld_alpha is None:
            return logps
        why = "ld_alpha (LD-DPO)"
        return [
            length_desensitized(x, self.needed(name, tail, why), ld_alpha)
            for x, (name, tail) in zip(logps, tails.items(), strict=True)
        ]


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
    label_smoothing: float | None = None,
    discopop_tau: float | None = None,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float | None = None,
    ld_alpha: float | None = None,
    use_weighting: bool = False,
    odpo_alpha: float = 0.0,
    gamma: float = 0.0,
    dpop_lambda: float = 0.0,
    margin_scale: float | None = None,
    calibration_weight: float = 0.0,
    nll_weight: float = 0.0,
    preference_weight: float = 1.0,
    reference_free: bool = False,
    policy_chosen_nll: torch.Tensor | None = None,
    policy_chosen_tail_logps: torch.Tensor | None = None,
    policy_rejected_tail_logps: torch.Tensor | None = None,
    ref_chosen_tail_logps: torch.Tensor | None = None,
    ref_rejected_tail_logps: torch.Tensor | None = None,
    chosen_weighting_logps: torch.Tensor | None = None,
    rejected_weighting_logps: torch.Tensor | None = None,
    score_chosen: torch.Tensor | None = None,
    score_rejected: torch.Tensor | None = None,
    kl_logratios: torch.Tensor | None = None,
) -> PreferenceLossOutput:
    """Per-example preference loss of any objective, with the input transforms and extra terms.

    Args:
        policy_chosen_logps: (B,) log pi(y_w|x), summed (or averaged) over response tokens.
        policy_rejected_logps: (B,) log pi(y_l|x).
        ref_chosen_logps: (B,) log pi_ref(y_w|x); None only for a reference-free objective.
        ref_rejected_logps: (B,) log pi_ref(y_l|x); None together with ``ref_chosen_logps``.
        loss: a loss of the margin (``LOSSES``: the six GPO losses, ipo, robust, exo_pair,
            discopop) or a per-side objective (``PAIR_LOSSES``: nca_pair, bco_pair, sppo_hard,
            apo_zero, apo_down, aot, aot_unpaired, kto, orpo; margin=difference only).
        margin: a name in ``MARGINS`` (difference, balanced).
        beta: KL strength, > 0 (typical 0.01-0.5; SimPO uses ~2).
        alpha: gap adaptor of the balanced margin, in (0, 1] (BPO's ablation: 0.3).
        label_smoothing: eps in [0, 0.5). Losses that define it (robust, exo_pair, aot,
            aot_unpaired) use it their way; for the others it is cDPO's flip probability.
            None: the loss's own default (TRL's).
        discopop_tau: DiscoPOP's temperature (None: 0.05).
        f_divergence_type: the reward transform (``F_DIVERGENCES``): reverse_kl (none),
            forward_kl, js_divergence, alpha_divergence.
        f_alpha_divergence_coef: alpha of alpha_divergence (None: 0.5).
        ld_alpha: LD-DPO's weight in [0, 1] of the tokens past the shorter response; needs the
            four ``*_tail_logps``. None: off.
        use_weighting: WPO's weights; needs ``chosen_weighting_logps`` and
            ``rejected_weighting_logps``.
        odpo_alpha: ODPO's offset scale > 0 (0: off); needs ``score_chosen`` / ``score_rejected``.
        gamma: a target margin subtracted from z (SimPO's gamma, in units of z).
        dpop_lambda: DPOP's lambda >= 0 (arXiv 2402.13228): penalises r_w < 0 inside the margin.
        margin_scale: the scale used inside the margin instead of beta (Cal-DPO uses 1).
        calibration_weight: weight of Cal-DPO's calibration term (arXiv 2412.14516).
        nll_weight: weight of the chosen response's NLL (RPO, arXiv 2404.19733; ORPO).
        preference_weight: weight of the objective; 0 leaves only the extra terms.
        reference_free: ignore the reference: r = policy log-probs (SimPO, ORPO).
        policy_chosen_nll: (B,) mean token NLL of the chosen response; needed iff nll_weight > 0.
        policy_chosen_tail_logps, policy_rejected_tail_logps, ref_chosen_tail_logps,
            ref_rejected_tail_logps: (B,) sums of the log-probs past the pair's shorter response.
        chosen_weighting_logps, rejected_weighting_logps: (B,) each response's mean over its
            tokens of log p(y_t) - log sum_v p(v)^2 under the policy (WPO).
        score_chosen, score_rejected: (B,) the responses' scores (ODPO).
        kl_logratios: (B,) log-ratios of mismatched (prompt, response) pairs (KTO).

    Returns:
        :class:`PreferenceLossOutput` with ``losses`` (B,), ``chosen_rewards``,
        ``rejected_rewards`` (beta * log-ratio, detached) and ``margins`` (z, detached).

    Example (hand-worked): policy logps (-1, -3), reference logps (-2, -2), beta 1, logistic and
    difference: r_w = 1, r_l = -1, z = 2, loss = log(1 + e^-2) ~ 0.1269.
    """
    options: dict[str, Any] = {
        "loss": loss,
        "margin": margin,
        "beta": beta,
        "alpha": alpha,
        "label_smoothing": label_smoothing,
        "discopop_tau": discopop_tau,
        "f_divergence_type": f_divergence_type,
        "f_alpha_divergence_coef": f_alpha_divergence_coef,
        "ld_alpha": ld_alpha,
        "odpo_alpha": odpo_alpha,
        "gamma": gamma,
        "dpop_lambda": dpop_lambda,
        "margin_scale": margin_scale,
        "calibration_weight": calibration_weight,
        "nll_weight": nll_weight,
        "preference_weight": preference_weight,
    }
    _check_options(options)
    batch = _Batch.of(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        reference_free,
    )
    # log-probs (LD-DPO's when ld_alpha is set); no refs: a reference-free objective
    logps = batch.log_probs(
        (policy_chosen_logps, policy_rejected_logps),
        {
            "policy_chosen_tail_logps": policy_chosen_tail_logps,
            "policy_rejected_tail_logps": policy_rejected_tail_logps,
        },
        ld_alpha,
    )
    refs = None
    if not reference_free and ref_chosen_logps is not None and ref_rejected_logps is not None:
        refs = batch.log_probs(
            (ref_chosen_logps, ref_rejected_logps),
            {
                "ref_chosen_tail_logps": ref_chosen_tail_logps,
                "ref_rejected_tail_logps": ref_rejected_tail_logps,
            },
            ld_alpha,
        )
    # r = log-ratios (the log-probs themselves for a reference-free objective), g = f-DPO's
    # transform of r
    ratios = logps if refs is None else [x - ref for x, ref in zip(logps, refs, strict=True)]
    transform = F_DIVERGENCES[f_divergence_type]
    part_options = {k: v for k, v in options.items() if v is not None}
    transformed = [transform(r, **pick_options(transform, part_options)) for r in ratios]
    terms = PairTerms(
        *transformed,
        *logps,
        *(refs or (None, None)),
        kl_logratios=None if kl_logratios is None else batch.wide(kl_logratios),
    )
    z = _margin_z(
        transformed, options, _odpo_offsets(batch, odpo_alpha, score_chosen, score_rejected)
    )
    # the objective, then the extra terms
    losses = torch.zeros_like(z)
    if preference_weight > 0:
        losses = losses + preference_weight * _objective(loss, z, terms, part_options)
    losses = _with_extra_terms(
        losses,
        terms,
        options,
        batch,
        use_weighting=use_weighting,
        policy_chosen_nll=policy_chosen_nll,
        chosen_weighting_logps=chosen_weighting_logps,
        rejected_weighting_logps=rejected_weighting_logps,
    )
    chosen_logratios, rejected_logratios = ratios

    return PreferenceLossOutput(
        losses=losses,
        chosen_rewards=(beta * chosen_logratios).detach(),
        rejected_rewards=(beta * rejected_logratios).detach(),
        margins=z.detach(),
    )


def _odpo_offsets(
    batch: _Batch,
    odpo_alpha: float,
    score_chosen: torch.Tensor | None,
    score_rejected: torch.Tensor | None,
) -> torch.Tensor | None:
    """ODPO's offsets alpha log(s_w - s_l) of the responses' scores; None when odpo_alpha is 0."""
    if odpo_alpha <= 0:
        return None
    why = "odpo_alpha (ODPO: data rows need score_chosen and score_rejected columns)"
    return odpo_offsets(
        batch.needed("score_chosen", score_chosen, why),
        batch.needed("score_rejected", score_rejected, why),
        odpo_alpha,
    )


def _margin_z(
    transformed: list[torch.Tensor],
    options: dict[str, Any],
    offsets: torch.Tensor | None,
) -> torch.Tensor:
    """The margin z of the (transformed) log-ratios g_w, g_l, with the options that act on it;
    for a per-side objective, which has no margin, ``beta * (g_w - g_l)`` (what it reports)."""
    chosen_transformed, rejected_transformed = transformed
    beta = options["beta"]
    if not crosses_margin(options["loss"]):
        return beta * (chosen_transformed - rejected_transformed)
    scale = beta if options["margin_scale"] is None else options["margin_scale"]
    z = MARGINS[options["margin"]](
        chosen_transformed, rejected_transformed, scale, options["alpha"]
    )
    if options["dpop_lambda"] > 0:
        # DPOP (arXiv 2402.13228, Eq. 3): lambda * max(0, log pi_ref(y_w) - log pi(y_w))
        z = z - scale * options["dpop_lambda"] * torch.relu(-chosen_transformed)
    if options["gamma"] != 0:
        z = z - options["gamma"]
    if offsets is not None:  # ODPO
        z = z - offsets
    return z


def _objective(
    loss: str, z: torch.Tensor, terms: PairTerms, part_options: dict[str, Any]
) -> torch.Tensor:
    """The per-pair objective: f(z) for a loss of the margin (cDPO's smoothing for a loss that
    does not define label_smoothing itself), or the per-side objective of ``terms``."""
    if not crosses_margin(loss):
        return apply_pair_loss(loss, terms, **part_options)
    smoothing = part_options.get("label_smoothing")
    if smoothing and "label_smoothing" not in keyword_options(LOSSES[loss]):
        # cDPO (Mitchell 2023): the expected loss when a label is flipped with probability eps
        return (1.0 - smoothing) * apply_loss(loss, z, **part_options) + smoothing * apply_loss(
            loss, -z, **part_options
        )
    return apply_loss(loss, z, **part_options)


def _with_extra_terms(
    losses: torch.Tensor,
    terms: PairTerms,
    options: dict[str, Any],
    batch: _Batch,
    *,
    use_weighting: bool,
    policy_chosen_nll: torch.Tensor | None,
    chosen_weighting_logps: torch.Tensor | None,
    rejected_weighting_logps: torch.Tensor | None,
) -> torch.Tensor:
    """``losses`` (the weighted objective) plus Cal-DPO's calibration and the chosen NLL, times
    WPO's weights, each when its option is on."""
    if options["calibration_weight"] > 0:
        # Cal-DPO (arXiv 2412.14516, Eq. 10): pull log-ratios towards +-1/(2 beta), SPPO's term
        losses = losses + options["calibration_weight"] * sppo_hard(terms, options["beta"])
    if options["nll_weight"] > 0:
        losses = losses + options["nll_weight"] * batch.needed(
            "policy_chosen_nll", policy_chosen_nll, "nll_weight > 0"
        )
    if use_weighting:
        why = "use_weighting (WPO)"
        losses = losses * wpo_weights(
            batch.needed("chosen_weighting_logps", chosen_weighting_logps, why),
            batch.needed("rejected_weighting_logps", rejected_weighting_logps, why),
        )
    return losses
