"""Tests for losses.core: preference_loss and the PreferenceLoss module.

Hand-worked case (logistic x difference): policy logps (-1, -3), reference logps (-2, -2), beta 1:
r_w = -1 - (-2) = 1, r_l = -3 - (-2) = -1, z = 1 * (1 - (-1)) = 2, loss = log(1 + e^-2) ~ 0.126928;
rewards are beta * r = (1, -1).
Same pair, balanced with alpha 0.3: z = min(1, -0.3 * -1) = 0.3, loss = log(1 + e^-0.3) ~ 0.554355;
with hinge: 1 - 0.3 = 0.7.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from losses import LOSSES, MARGINS, PreferenceLoss, Requirements, UnknownNameError, preference_loss
from losses.functions import apply_loss
from losses.methods import METHODS

CELLS = list(itertools.product(sorted(LOSSES), sorted(MARGINS), [0.3, 1.0]))
CELL_IDS = [f"{loss}-{margin}-a{alpha}" for loss, margin, alpha in CELLS]

EXTRA_OPTIONS = list(PreferenceLoss.EXTRAS)


def batch(seed: int = 0, size: int = 6, dtype: torch.dtype = torch.float32):
    """Four (size,) log-prob tensors; the policy ones require grad."""
    gen = torch.Generator().manual_seed(seed)
    tensors = [-(torch.rand(size, generator=gen, dtype=torch.float64) * 40 + 1) for _ in range(4)]
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = (x.to(dtype) for x in tensors)
    return (
        policy_chosen.requires_grad_(True),
        policy_rejected.requires_grad_(True),
        ref_chosen,
        ref_rejected,
    )


# --------------------------------------------------------------------------- hand-worked values


def test_hand_worked_dpo_case():
    out = preference_loss(
        torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]),
        beta=1.0,
    )  # fmt: skip
    assert out.losses.item() == pytest.approx(math.log(1 + math.exp(-2.0)), rel=1e-6)
    assert out.margins.item() == pytest.approx(2.0)
    assert out.chosen_rewards.item() == pytest.approx(1.0)
    assert out.rejected_rewards.item() == pytest.approx(-1.0)


@pytest.mark.parametrize(
    ("loss", "expected"), [("logistic", math.log(1 + math.exp(-0.3))), ("hinge", 0.7)]
)
def test_hand_worked_balanced_case(loss, expected):
    out = preference_loss(
        torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]),
        loss=loss, margin="balanced", beta=1.0, alpha=0.3,
    )  # fmt: skip
    assert out.margins.item() == pytest.approx(0.3, rel=1e-6)
    assert out.losses.item() == pytest.approx(expected, rel=1e-6)


def test_defaults_are_logistic_difference_beta_0_1():
    # beta 0.1: z = 0.1 * (1 - (-1)) = 0.2, loss = log(1 + e^-0.2)
    out = preference_loss(
        torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0])
    )
    assert out.losses.item() == pytest.approx(math.log(1 + math.exp(-0.2)), rel=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(0.1)


# --------------------------------------------------------------------------- every cell


@pytest.mark.parametrize(("loss", "margin", "alpha"), CELLS, ids=CELL_IDS)
def test_cell_shapes_rewards_and_composition(loss, margin, alpha):
    beta = 0.2
    pc, pr, rc, rr = batch()
    out = preference_loss(pc, pr, rc, rr, loss=loss, margin=margin, beta=beta, alpha=alpha)
    for tensor in (out.losses, out.chosen_rewards, out.rejected_rewards, out.margins):
        assert tensor.shape == (6,)
        assert tensor.dtype == torch.float32
    assert out.losses.requires_grad
    for detached in (out.chosen_rewards, out.rejected_rewards, out.margins):
        assert not detached.requires_grad
        assert detached.grad_fn is None

    r_w = (pc - rc).detach()
    r_l = (pr - rr).detach()
    torch.testing.assert_close(out.chosen_rewards, beta * r_w)
    torch.testing.assert_close(out.rejected_rewards, beta * r_l)
    # with every extra at its default the loss is exactly f(margin(r_w, r_l, beta, alpha))
    z = MARGINS[margin](r_w, r_l, beta, alpha)
    assert torch.equal(out.margins, z)
    assert torch.equal(out.losses.detach(), apply_loss(loss, z, beta=beta))

    out.losses.sum().backward()
    assert torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()


@pytest.mark.parametrize(("loss", "margin", "alpha"), CELLS, ids=CELL_IDS)
def test_cell_value_against_independent_formula(loss, margin, alpha, loss_derivatives):
    """The loss of each cell in float64 from the formulas in the module docstrings."""
    formulas = {
        "logistic": lambda z: math.log1p(math.exp(-z)),
        "hinge": lambda z: max(0.0, 1.0 - z),
        "squared": lambda z: (z - 1.0) ** 2,
        "exponential": lambda z: math.exp(-z),
        "truncated_quadratic": lambda z: max(0.0, 1.0 - z) ** 2,
        "savage": lambda z: (1.0 / (1.0 + math.exp(z))) ** 2,
        # TRL's defaults: beta (0.3 here), label_smoothing 0 (robust) / 1e-3 (exo_pair), tau 0.05
        "ipo": lambda z: (z / 0.3 - 1 / (2 * 0.3)) ** 2,
        "robust": lambda z: math.log1p(math.exp(-z)),
        "exo_pair": lambda z: (
            (q := 1 / (1 + math.exp(-z))) * (math.log(q) - math.log(0.999))
            + (1 - q) * (math.log(1 - q) - math.log(0.001))
        ),
        "discopop": lambda z: (
            (m := 1 / (1 + math.exp(-z / 0.05))) * math.exp(-z) + (1 - m) * math.log1p(math.exp(-z))
        ),
    }
    margins = {
        "difference": lambda r_w, r_l, beta, alpha: beta * (r_w - r_l),
        "balanced": lambda r_w, r_l, beta, alpha: beta * min(r_w, -alpha * r_l),
    }
    # a newly registered loss or margin needs its independent formula here, not a skip
    assert loss in formulas, f"loss {loss!r}: write its independent formula in this test"
    assert margin in margins, f"margin {margin!r}: write its independent formula in this test"
    beta = 0.3
    pc, pr, rc, rr = batch(seed=1, dtype=torch.float64)
    out = preference_loss(pc, pr, rc, rr, loss=loss, margin=margin, beta=beta, alpha=alpha)
    for i in range(6):
        r_w = pc[i].item() - rc[i].item()
        r_l = pr[i].item() - rr[i].item()
        z = margins[margin](r_w, r_l, beta, alpha)
        assert out.losses[i].item() == pytest.approx(formulas[loss](z), rel=1e-5, abs=1e-6)


# --------------------------------------------------------------------------- extreme inputs

# (policy_chosen, policy_rejected, ref_chosen, ref_rejected) per pair: log-ratios of size 1e5 of
# both signs, log-probs of size 1e5 with small log-ratios, and a pair with z = -1e4 (beta 0.1)
EXTREME_PAIRS = [
    (1e5, -1e5, 0.0, 0.0),  # r_w = 1e5, r_l = -1e5
    (-1e5, 1e5, 0.0, 0.0),  # r_w = -1e5, r_l = 1e5
    (-1e5, -1e5, 0.0, 0.0),  # both far down (DCR)
    (1e5, 1e5, 0.0, 0.0),  # both far up
    (-1e5, -99_000.0, -99_990.0, -99_970.0),  # huge log-probs, log-ratios -10 and 970
    (-5e4, 5e4, 0.0, 0.0),  # z = 0.1 * -1e5 = -1e4 with the difference margin
    (0.0, 0.0, 0.0, 0.0),  # z = 0
]


def _hand_gradients(loss, margin, alpha, beta, pairs, derivative):
    """d loss / d policy log-probs in float64: f'(z) * dz/dr from the hand-derived f'."""
    pc, pr, rc, rr = (pairs[:, k] for k in range(4))
    r_w, r_l = pc - rc, pr - rr
    if margin == "difference":
        z = beta * (r_w - r_l)
        dz_dw, dz_dl = torch.full_like(z, beta), torch.full_like(z, -beta)
    else:
        chosen_active = r_w <= -alpha * r_l
        z = beta * torch.where(chosen_active, r_w, -alpha * r_l)
        dz_dw = torch.where(chosen_active, beta, 0.0)
        dz_dl = torch.where(chosen_active, 0.0, -beta * alpha)
    slope = derivative(z)
    return slope * dz_dw, slope * dz_dl


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize(("loss", "margin", "alpha"), CELLS, ids=CELL_IDS)
def test_extreme_inputs_finite_with_true_gradients(loss, margin, alpha, dtype, loss_derivatives):
    beta = 0.1
    pairs = torch.tensor(EXTREME_PAIRS, dtype=dtype)
    pc, pr, rc, rr = (pairs[:, k].clone() for k in range(4))
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    out = preference_loss(pc, pr, rc, rr, loss=loss, margin=margin, beta=beta, alpha=alpha)
    assert torch.isfinite(out.losses).all(), out.losses
    out.losses.sum().backward()
    assert pc.grad.dtype == dtype
    assert torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()

    if loss not in loss_derivatives:
        return  # finiteness only for a loss with no hand-derived derivative
    # expected gradients from the inputs as actually stored in `dtype`
    grad_w, grad_l = _hand_gradients(
        loss, margin, alpha, beta, pairs.double(), loss_derivatives[loss]
    )
    rtol = 1e-4 if dtype == torch.float32 else 2e-2
    for actual, expected in ((pc.grad.double(), grad_w), (pr.grad.double(), grad_l)):
        significant = expected.abs() > 1e-6
        assert torch.all(actual[significant] != 0), (actual, expected)
        torch.testing.assert_close(actual[significant], expected[significant], rtol=rtol, atol=0)
        assert torch.all(actual[~significant].abs() <= 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_logistic_gradient_at_minus_1e4_is_minus_beta(dtype):
    # z = 0.1 * (-5e4 - 5e4) = -1e4: f'(z) = -sigmoid(1e4) = -1, so d loss / d r_w = -beta
    pc = torch.tensor([-5e4], dtype=dtype, requires_grad=True)
    pr = torch.tensor([5e4], dtype=dtype, requires_grad=True)
    zeros = torch.zeros(1, dtype=dtype)
    out = preference_loss(pc, pr, zeros, zeros, beta=0.1)
    assert out.losses.item() == pytest.approx(1e4, rel=1e-2)
    out.losses.sum().backward()
    assert pc.grad.item() == pytest.approx(-0.1, rel=1e-2)
    assert pr.grad.item() == pytest.approx(0.1, rel=1e-2)


def test_bfloat16_inputs_computed_in_float32():
    # bf16 inputs are upcast before any arithmetic: the output is float32 and equals the float32
    # computation on the same (bf16-representable) values
    pc, pr, rc, rr = batch(seed=3, dtype=torch.bfloat16)
    out = preference_loss(pc, pr, rc, rr, loss="squared")
    reference = preference_loss(*(x.detach().float() for x in (pc, pr, rc, rr)), loss="squared")
    assert out.losses.dtype == torch.float32
    assert torch.equal(out.losses.detach(), reference.losses)


def test_reference_free_bfloat16_computed_in_float32():
    # z = 0.1 * (-3 - (-1)) = -0.2: loss log(1 + e^0.2), returned in float32 like every cell
    pc = torch.tensor([-3.0], dtype=torch.bfloat16, requires_grad=True)
    pr = torch.tensor([-1.0], dtype=torch.bfloat16, requires_grad=True)
    out = preference_loss(pc, pr, reference_free=True)
    assert out.losses.dtype == torch.float32
    assert out.chosen_rewards.dtype == torch.float32
    assert out.losses.item() == pytest.approx(math.log(1 + math.exp(0.2)), rel=1e-6)
    out.losses.sum().backward()
    assert pc.grad.dtype == torch.bfloat16


# --------------------------------------------------------------------------- validation


def good_inputs():
    return [torch.tensor([-1.0, -2.0]) for _ in range(4)]


@pytest.mark.parametrize(
    ("change", "error", "fragment"),
    [
        ({"alpha": 0.0}, ValueError, "alpha"),
        ({"alpha": 1.5}, ValueError, "alpha"),
        ({"alpha": -0.3}, ValueError, "alpha"),
        ({"alpha": float("nan")}, ValueError, "alpha"),
        ({"beta": 0.0}, ValueError, "beta"),
        ({"beta": -0.1}, ValueError, "beta"),
        ({"beta": float("nan")}, ValueError, "beta"),
        ({"beta": float("inf")}, ValueError, "beta"),
        ({"label_smoothing": 0.5}, ValueError, "label_smoothing"),
        ({"label_smoothing": -0.1}, ValueError, "label_smoothing"),
        ({"margin_scale": 0.0}, ValueError, "margin_scale"),
        ({"dpop_lambda": -1.0}, ValueError, "dpop_lambda"),
        ({"calibration_weight": float("nan")}, ValueError, "calibration_weight"),
        ({"preference_weight": -1.0}, ValueError, "preference_weight"),
        ({"gamma": float("inf")}, ValueError, "gamma"),
        ({"nll_weight": 0.5}, ValueError, "policy_chosen_nll"),
    ],
    ids=lambda value: str(value) if not isinstance(value, type) else value.__name__,
)
def test_bad_options_rejected(change, error, fragment):
    with pytest.raises(error, match=fragment):
        preference_loss(*good_inputs(), **change)


@pytest.mark.parametrize("position", range(4))
def test_mismatched_shapes_rejected(position):
    inputs = good_inputs()
    inputs[position] = torch.tensor([-1.0, -2.0, -3.0])
    with pytest.raises(ValueError, match="shape"):
        preference_loss(*inputs)


@pytest.mark.parametrize("position", range(4))
def test_integer_dtype_rejected(position):
    inputs = good_inputs()
    inputs[position] = torch.tensor([-1, -2])
    with pytest.raises(TypeError, match="floating"):
        preference_loss(*inputs)


@pytest.mark.parametrize("position", range(4))
def test_non_tensor_rejected(position):
    inputs = good_inputs()
    inputs[position] = [-1.0, -2.0]
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        preference_loss(*inputs)


def test_chosen_nll_validated():
    with pytest.raises(ValueError, match="shape"):
        preference_loss(*good_inputs(), nll_weight=1.0, policy_chosen_nll=torch.ones(3))
    with pytest.raises(TypeError, match="floating"):
        preference_loss(*good_inputs(), nll_weight=1.0, policy_chosen_nll=torch.ones(2).long())


def test_missing_references_need_reference_free():
    policy_chosen, policy_rejected, _, _ = good_inputs()
    with pytest.raises(ValueError, match="reference_free"):
        preference_loss(policy_chosen, policy_rejected)
    # reference-free: r = policy log-probs, z = 0.1 * (-1 - (-1)) = 0 -> log 2
    out = preference_loss(policy_chosen, policy_rejected, reference_free=True)
    torch.testing.assert_close(out.losses, torch.full((2,), math.log(2.0)))


@pytest.mark.parametrize("missing", [2, 3])
def test_one_reference_none_rejected(missing):
    inputs = good_inputs()
    inputs[missing] = None
    with pytest.raises(ValueError, match="both"):
        preference_loss(*inputs)


@pytest.mark.parametrize(("kind", "registry"), [("loss", LOSSES), ("margin", MARGINS)])
def test_unknown_name_lists_registered_names(kind, registry):
    with pytest.raises(UnknownNameError) as info:
        preference_loss(*good_inputs(), **{kind: "no_such_part"})
    assert isinstance(info.value, KeyError)
    message = str(info.value)
    assert "no_such_part" in message
    for name in registry:
        assert name in message


# --------------------------------------------------------------------------- extra terms


def test_extras_combine_as_documented():
    """z = s m - s lambda max(0, -r_w) - gamma; eps-smoothing; calibration; NLL, by hand.

    r_w = -1, r_l = -3 (refs 0), beta 0.5, margin_scale 2, lambda 0.25, gamma 0.5:
    z = 2 * 2 - 2 * 0.25 * 1 - 0.5 = 3; pref = 0.9 f(3) + 0.1 f(-3) with f logistic;
    calibration (target 1/(2 * 0.5) = 1): (-1 - 1)^2 + (-3 + 1)^2 = 8; NLL 0.7.
    """

    def f(z: float) -> float:
        return math.log1p(math.exp(-z))

    expected = 2.0 * (0.9 * f(3.0) + 0.1 * f(-3.0)) + 0.5 * 8.0 + 3.0 * 0.7
    out = preference_loss(
        torch.tensor([-1.0]), torch.tensor([-3.0]), torch.zeros(1), torch.zeros(1),
        beta=0.5, margin_scale=2.0, dpop_lambda=0.25, gamma=0.5, label_smoothing=0.1,
        preference_weight=2.0, calibration_weight=0.5, nll_weight=3.0,
        policy_chosen_nll=torch.tensor([0.7]),
    )  # fmt: skip
    assert out.margins.item() == pytest.approx(3.0, rel=1e-6)
    assert out.losses.item() == pytest.approx(expected, rel=1e-6)
    # rewards stay beta * r, not margin_scale * r
    assert out.chosen_rewards.item() == pytest.approx(-0.5)
    assert out.rejected_rewards.item() == pytest.approx(-1.5)


# --------------------------------------------------------------------------- PreferenceLoss


@pytest.mark.parametrize(("loss", "margin", "alpha"), CELLS, ids=CELL_IDS)
def test_module_matches_function(loss, margin, alpha):
    module = PreferenceLoss(loss=loss, margin=margin, beta=0.2, alpha=alpha)
    assert isinstance(module, torch.nn.Module)
    assert module.beta == 0.2
    pc, pr, rc, rr = batch(seed=2)
    out = module(pc, pr, rc, rr)
    expected = preference_loss(pc, pr, rc, rr, loss=loss, margin=margin, beta=0.2, alpha=alpha)
    assert torch.equal(out.losses, expected.losses)
    assert torch.equal(out.chosen_rewards, expected.chosen_rewards)
    assert torch.equal(out.rejected_rewards, expected.rejected_rewards)
    # plain cells need a reference, summed log-probs, and no chosen NLL
    assert module.requirements == Requirements(
        needs_reference=True, length_normalized=False, needs_chosen_nll=False
    )


def test_module_requirements_follow_options():
    assert PreferenceLoss(reference_free=True).requirements.needs_reference is False
    assert PreferenceLoss(nll_weight=0.5).requirements.needs_chosen_nll is True
    assert PreferenceLoss(nll_weight=0.0).requirements.needs_chosen_nll is False
    assert PreferenceLoss(length_normalized=True).requirements.length_normalized is True


def test_module_forward_passes_chosen_nll():
    module = PreferenceLoss(nll_weight=2.0, preference_weight=0.0, reference_free=True)
    policy_chosen, policy_rejected, _, _ = good_inputs()
    out = module(policy_chosen, policy_rejected, policy_chosen_nll=torch.tensor([0.5, 1.5]))
    torch.testing.assert_close(out.losses, torch.tensor([1.0, 3.0]))


# requirements of the named methods, written from the papers: SimPO is reference-free and
# length-normalised; RPO adds the chosen NLL; the chosen-NLL control is reference-free NLL only
METHOD_REQUIREMENTS = {
    "dpo": (True, False, False),
    "slic": (True, False, False),
    "ipo": (True, True, False),
    "bpo": (True, False, False),
    "dpop": (True, False, False),
    "cal_dpo": (True, False, False),
    "cdpo": (True, False, False),
    "rpo": (True, False, True),
    "simpo": (False, True, False),
    "chosen_nll": (False, False, True),
    # TRL's objectives: ipo and sigmoid_norm average log-ratios over tokens (TRL's form)
    "sigmoid_norm": (True, True, False),
    **dict.fromkeys(
        ["robust", "exo_pair", "discopop", "nca_pair", "bco_pair", "sppo_hard", "aot"],
        (True, False, False),
    ),
    **dict.fromkeys(["aot_unpaired", "apo_zero", "apo_down", "kto", "odpo"], (True, False, False)),
    # ORPO is reference-free on length-averaged log-probs, plus the chosen NLL
    "orpo": (False, True, True),
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_requirements(name):
    requirements = METHODS[name].build().requirements
    assert name in METHOD_REQUIREMENTS, f"method {name!r}: write its expected requirements here"
    assert (
        requirements.needs_reference,
        requirements.length_normalized,
        requirements.needs_chosen_nll,
    ) == METHOD_REQUIREMENTS[name]


def test_unknown_module_option_lists_valid_ones():
    with pytest.raises(TypeError) as info:
        PreferenceLoss(gama=1.0)
    message = str(info.value)
    assert "gama" in message
    for option in EXTRA_OPTIONS:
        assert option in message


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"loss": "nope"}, UnknownNameError),
        ({"margin": "nope"}, UnknownNameError),
        ({"beta": 0.0}, ValueError),
        ({"beta": float("nan")}, ValueError),
        ({"alpha": 1.5}, ValueError),
        ({"label_smoothing": 0.5}, ValueError),
        ({"calibration_weight": -1.0}, ValueError),
    ],
    ids=lambda value: str(value) if not isinstance(value, type) else value.__name__,
)
def test_module_bad_config_fails_at_construction(kwargs, error):
    with pytest.raises(error):
        PreferenceLoss(**kwargs)


def test_module_of_a_method():
    module = METHODS["bpo"].build(beta=0.05)
    assert module.options["loss"] == "hinge"
    assert module.options["margin"] == "balanced"
    assert module.beta == 0.05
