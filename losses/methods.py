"""Named methods: well-known preference objectives as compositions of a margin, a loss and extras.

Each :class:`Method` is data, not code: it names a loss and a margin from the registries and sets
defaults for :func:`losses.preference_loss`'s options. ``METHODS["bpo"].build(beta=0.05)`` gives the
configured :class:`losses.PreferenceLoss`; ``METHODS["dpo"](pc, pr, rc, rr)`` computes directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from losses.core import PreferenceLoss, PreferenceLossOutput, preference_loss
from losses.registry import Registry


@dataclass(frozen=True)
class Method:
    """A named preference objective.

    Attributes:
        name: registry name.
        title: the method's name as published.
        paper: arXiv link (or the note that defines it).
        formula: the per-pair loss in the paper's notation, h = log-ratio.
        loss: loss name in ``LOSSES``.
        margin: margin name in ``MARGINS``.
        defaults: option defaults for :func:`preference_loss` (beta, alpha, extras).
        length_normalized: the method uses log-probs averaged over response tokens.
    """

    name: str
    title: str
    paper: str
    formula: str
    loss: str = "logistic"
    margin: str = "difference"
    defaults: MappingProxyType[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    length_normalized: bool = False

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
)
_method(
    "slic",
    title="SLiC-HF (calibration with a hinge loss)",
    paper="https://arxiv.org/abs/2305.10425",
    formula="max(0, 1 - beta (h_w - h_l))  (SLiC's margin delta = 1/beta)",
    loss="hinge",
    defaults={"beta": 0.1},
)
_method(
    "ipo",
    title="Identity Preference Optimization",
    paper="https://arxiv.org/abs/2310.12036",
    formula="(beta (h_w - h_l) - 1)^2 = 4 tau^2 (h_w - h_l - 1/(2 tau))^2 with beta = 2 tau",
    loss="squared",
    defaults={"beta": 0.1},
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
