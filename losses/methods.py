"""Named methods: well-known preference objectives as compositions of a margin, a loss and extras.

Each :class:`Method` is data, not code: it names a loss (or per-side objective) and a margin from
the registries and sets defaults for :func:`losses.preference_loss`'s options. Where TRL's
DPOTrainer has the objective, the method carries TRL's ``loss_type`` name (``dpo`` = sigmoid,
``slic`` = hinge) and, with the same beta and inputs, gives TRL's per-pair loss.
``METHODS["bpo"].build(beta=0.05)`` gives the configured :class:`losses.PreferenceLoss`;
``METHODS["dpo"](pc, pr, rc, rr)`` computes directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from losses.core import PreferenceLossOutput, crosses_margin, preference_loss
from losses.module import PreferenceLoss
from losses.registry import Registry


@dataclass(frozen=True)
class Method:
    """A named preference objective.

    Attributes:
        name: registry name.
        title: the method's name as published.
        paper: arXiv link (or the note that defines it).
        formula: the per-pair loss in the paper's notation, h = log-ratio.
        loss: loss name in ``LOSSES`` or ``PAIR_LOSSES``.
        margin: margin name in ``MARGINS``.
        defaults: option defaults for :func:`preference_loss` (beta, alpha, extras).
        length_normalized: the method uses log-probs averaged over response tokens.
        trl_loss_type: TRL's ``DPOConfig.loss_type`` of the same objective, or None.
    """

    name: str
    title: str
    paper: str
    formula: str
    loss: str = "logistic"
    margin: str = "difference"
    defaults: MappingProxyType[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    length_normalized: bool = False
    trl_loss_type: str | None = None

    @property
    def crosses_margin(self) -> bool:
        """Whether ``margin=`` / ``alpha=`` overrides apply (an objective of one margin z)."""
        return crosses_margin(self.loss)

    def options(self, **overrides: Any) -> dict[str, Any]:
        """The full keyword options of :func:`preference_loss`, defaults updated by overrides."""
        options: dict[str, Any] = {"loss": self.loss, "margin": self.margin, "beta": 0.1}
        options.update(self.defaults)
        options.update(overrides)
        return options

    def build(self, **overrides: Any) -> PreferenceLoss:
        """The configured :class:`PreferenceLoss` module of this method."""
        options = self.options(**overrides)
        return PreferenceLoss(length_normalized=self.length_normalized, **options)

    def __call__(
        self,
        policy_chosen_logps: torch.Tensor,
        policy_rejected_logps: torch.Tensor,
        ref_chosen_logps: torch.Tensor | None = None,
        ref_rejected_logps: torch.Tensor | None = None,
        **overrides: Any,
    ) -> PreferenceLossOutput:
        """Compute this method's loss; keyword overrides change its options."""
        return preference_loss(
            policy_chosen_logps,
            policy_rejected_logps,
            ref_chosen_logps,
            ref_rejected_logps,
            **self.options(**overrides),
        )


#: method name -> :class:`Method`.
METHODS: Registry[Method] = Registry("method")


def _method(name: str, **kwargs: Any) -> Method:
    defaults = MappingProxyType(kwargs.pop("defaults", {}))
    method = Method(name=name, defaults=defaults, **kwargs)
    METHODS.add(name, method)
    return method


_method(
    "dpo",
    title="Direct Preference Optimization",
    paper="https://arxiv.org/abs/2305.18290",
    formula="-log sigmoid(beta (h_w - h_l))",
    defaults={"beta": 0.1},
    trl_loss_type="sigmoid",
)
_method(
    "slic",
    title="SLiC-HF (calibration with a hinge loss)",
    paper="https://arxiv.org/abs/2305.10425",
    formula="max(0, 1 - beta (h_w - h_l))  (SLiC's margin delta = 1/beta)",
    loss="hinge",
    defaults={"beta": 0.1},
    trl_loss_type="hinge",
)
_method(
    "ipo",
    title="Identity Preference Optimization (TRL's and the IPO authors' length-averaged form)",
    paper="https://arxiv.org/abs/2310.12036",
    formula="(h_w/|y_w| - h_l/|y_l| - 1/(2 beta))^2  (Eq. 17, tau = beta)",
    loss="ipo",
    defaults={"beta": 0.1},
    length_normalized=True,
    trl_loss_type="ipo",
)
_method(
    "bpo",
    title="Balanced Preference Optimization (the paper's headline setting)",
    paper="https://arxiv.org/abs/2506.03557",
    formula="max(0, 1 - beta min(h_w, -alpha h_l)), alpha = 0.3",
    loss="hinge",
    margin="balanced",
    defaults={"beta": 0.1, "alpha": 0.3},
)
_method(
    "dpop",
    title="DPO-Positive (Smaug)",
    paper="https://arxiv.org/abs/2402.13228",
    formula="-log sigmoid(beta (h_w - h_l - lambda max(0, -h_w))), lambda = 50",
    defaults={"beta": 0.1, "dpop_lambda": 50.0},
)
_method(
    "cal_dpo",
    title="Calibrated DPO",
    paper="https://arxiv.org/abs/2412.14516",
    formula="-log sigmoid(h_w - h_l) + (h_w - 1/(2 beta))^2 + (h_l + 1/(2 beta))^2",
    defaults={"beta": 0.1, "margin_scale": 1.0, "calibration_weight": 1.0},
)
_method(
    "rpo",
    title="Iterative Reasoning Preference Optimization (DPO + NLL on the chosen response)",
    paper="https://arxiv.org/abs/2404.19733",
    formula="-log sigmoid(beta (h_w - h_l)) - alpha_rpo log pi(y_w|x) / |y_w|, alpha_rpo = 1",
    defaults={"beta": 0.1, "nll_weight": 1.0},
)
_method(
    "simpo",
    title="Simple Preference Optimization (reference-free, length-normalised)",
    paper="https://arxiv.org/abs/2405.14734",
    formula="-log sigmoid(beta/|y_w| log pi(y_w|x) - beta/|y_l| log pi(y_l|x) - gamma)",
    defaults={"beta": 2.0, "gamma": 1.0, "reference_free": True},
    length_normalized=True,
)
_method(
    "cdpo",
    title="Conservative DPO (label smoothing)",
    paper="https://ericmitchell.ai/cdpo.pdf",
    formula="(1 - eps) (-log sigmoid(beta (h_w - h_l))) + eps (-log sigmoid(-beta (h_w - h_l)))",
    defaults={"beta": 0.1, "label_smoothing": 0.1},
)
_method(
    "chosen_nll",
    title="Chosen-NLL control (SFT on the chosen responses, no preference term)",
    paper="control: shows what the preference signal adds beyond raising the chosen likelihood",
    formula="-log pi(y_w|x) / |y_w|",
    defaults={"beta": 0.1, "preference_weight": 0.0, "nll_weight": 1.0, "reference_free": True},
)

_method(
    "sigmoid_norm",
    title="DPO on length-averaged log-ratios (TRL's sigmoid_norm)",
    paper="https://arxiv.org/abs/2305.18290",
    formula="-log sigmoid(beta (h_w/|y_w| - h_l/|y_l|))",
    defaults={"beta": 0.1},
    length_normalized=True,
    trl_loss_type="sigmoid_norm",
)
_method(
    "robust",
    title="Provably Robust DPO (rDPO), unbiased under label noise eps",
    paper="https://arxiv.org/abs/2403.00409",
    formula="((1 - eps) (-log s(beta h)) - eps (-log s(-beta h))) / (1 - 2 eps), h = h_w - h_l",
    loss="robust",
    defaults={"beta": 0.1, "label_smoothing": 0.0},
    trl_loss_type="robust",
)
_method(
    "exo_pair",
    title="Efficient Exact Optimization (EXO) on pairs",
    paper="https://arxiv.org/abs/2402.00856",
    formula="s(z) (log s(z) - log(1 - eps)) + s(-z) (log s(-z) - log eps), z = beta h",
    loss="exo_pair",
    defaults={"beta": 0.1, "label_smoothing": 1e-3},
    trl_loss_type="exo_pair",
)
_method(
    "discopop",
    title="DiscoPOP (log-ratio modulated loss, discovered by LLM-driven search)",
    paper="https://arxiv.org/abs/2406.08414",
    formula="(1 - s(z/tau)) (-log s(z)) + s(z/tau) exp(-z), z = beta h, tau = 0.05",
    loss="discopop",
    defaults={"beta": 0.1, "discopop_tau": 0.05},
    trl_loss_type="discopop",
)
_method(
    "nca_pair",
    title="Noise Contrastive Alignment (NCA) on pairs",
    paper="https://arxiv.org/abs/2402.05369",
    formula="-log s(beta h_w) - 1/2 log s(-beta h_w) - 1/2 log s(-beta h_l)",
    loss="nca_pair",
    defaults={"beta": 0.1},
    trl_loss_type="nca_pair",
)
_method(
    "bco_pair",
    title="Binary Classifier Optimization (BCO) on pairs",
    paper="https://arxiv.org/abs/2404.04656",
    formula="-log s(beta h_w) - log s(-beta h_l)",
    loss="bco_pair",
    defaults={"beta": 0.1},
    trl_loss_type="bco_pair",
)
_method(
    "sppo_hard",
    title="Self-Play Preference Optimization, hard win probabilities",
    paper="https://arxiv.org/abs/2405.00675",
    formula="(h_w - 1/(2 beta))^2 + (h_l + 1/(2 beta))^2",
    loss="sppo_hard",
    defaults={"beta": 0.1},
    trl_loss_type="sppo_hard",
)
_method(
    "aot",
    title="Alignment via Optimal Transport (paired)",
    paper="https://arxiv.org/abs/2406.05882",
    formula="-log s(beta (sort(log pi_w - log pi_l) - sort(log ref_w - log ref_l)))",
    loss="aot",
    defaults={"beta": 0.1, "label_smoothing": 0.0},
    trl_loss_type="aot",
)
_method(
    "aot_unpaired",
    title="Alignment via Optimal Transport (unpaired)",
    paper="https://arxiv.org/abs/2406.05882",
    formula="-log s(beta (sort(h_w) - sort(h_l)))",
    loss="aot_unpaired",
    defaults={"beta": 0.1, "label_smoothing": 0.0},
    trl_loss_type="aot_unpaired",
)
_method(
    "apo_zero",
    title="Anchored Preference Optimization, zero anchor",
    paper="https://arxiv.org/abs/2408.06266",
    formula="1 - s(beta h_w) + s(beta h_l)",
    loss="apo_zero",
    defaults={"beta": 0.1},
    trl_loss_type="apo_zero",
)
_method(
    "apo_down",
    title="Anchored Preference Optimization, down anchor",
    paper="https://arxiv.org/abs/2408.06266",
    formula="s(beta h_w) + 1 - s(beta (h_w - h_l))",
    loss="apo_down",
    defaults={"beta": 0.1},
    trl_loss_type="apo_down",
)
_method(
    "orpo",
    title="Odds Ratio Preference Optimization (reference-free)",
    paper="https://arxiv.org/abs/2403.07691",
    formula="NLL(y_w) - lambda log s(log odds(p_w) - log odds(p_l)), odds(p) = p / (1 - p), "
    "p = exp(mean token log-prob), lambda = beta = 0.1",
    loss="orpo",
    defaults={"beta": 0.1, "reference_free": True, "nll_weight": 1.0},
    length_normalized=True,
)
_method(
    "kto",
    title="Kahneman-Tversky Optimization on paired data",
    paper="https://arxiv.org/abs/2402.01306",
    formula="(1 - s(beta (h_w - z0)) + 1 - s(beta (z0 - h_l))) / 2, z0 = max(0, mean h of "
    "mismatched pairs)",
    loss="kto",
    defaults={"beta": 0.1},
)
_method(
    "odpo",
    title="DPO with an Offset (ODPO)",
    paper="https://arxiv.org/abs/2402.10571",
    formula="-log s(beta (h_w - h_l) - alpha log(score_w - score_l)), alpha = 1",
    defaults={"beta": 0.1, "odpo_alpha": 1.0},
)
