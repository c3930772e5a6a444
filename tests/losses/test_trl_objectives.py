"""TRL's objectives, the reviewers' baselines and the input transforms against their published
formulas, written here in float64 from the papers (and TRL 1.16's DPOTrainer), not from losses/.

Hand-worked pair used below: r_w = 1, r_l = -1, beta = 0.5 (so beta r_w = 0.5, beta r_l = -0.5,
z = beta (r_w - r_l) = 1); s = sigmoid, sp = softplus = log(1 + e^x):

    robust eps 0.1     (0.9 sp(-1) - 0.1 sp(1)) / 0.8 = (0.9 * 0.313262 - 0.1 * 1.313262) / 0.8
                       = 0.188262
    exo_pair eps 0.1   s(1) (log s(1) - log 0.9) + s(-1) (log s(-1) - log 0.1) = 0.114082
    discopop tau 0.05  (1 - s(20)) sp(-1) + s(20) e^-1 = 0.367879 (s(20) = 1 - 2.1e-9)
    ipo (h = 2)        (2 - 1/(2 * 0.5))^2 = 1
    nca_pair           sp(-0.5) + 0.5 sp(0.5) + 0.5 sp(-0.5) = 0.474077 + 0.487038 + 0.237039
                       = 1.198154
    bco_pair           sp(-0.5) + sp(-0.5) = 0.948154
    sppo_hard          (1 - 1)^2 + (-1 + 1)^2 = 0
    apo_zero           1 - s(0.5) + s(-0.5) = 2 s(-0.5) = 0.755081
    apo_down           s(0.5) + 1 - s(1) = 0.622459 + 0.268941 = 0.891401
    kto (z0 = 0)       (1 - s(0.5) + 1 - s(0.5)) / 2 = s(-0.5) = 0.377541
    orpo (p_w = -1, p_l = -2, beta 0.5): log odds = (-1 + 2) - (log(1 - e^-1) - log(1 - e^-2))
                       = 1 - (-0.458675 + 0.145413) = 1.313262; 0.5 sp(-1.313262) = 0.119092
    odpo scores 5, 2   sp(-(1 - log 3)) = sp(0.098612) = 0.743668
"""

from __future__ import annotations

import math

import pytest
import torch

from losses import F_DIVERGENCES, LOSSES, METHODS, PAIR_LOSSES, PairTerms, preference_loss
from losses.functions import apply_loss
from losses.pairwise import apply_pair_loss


def sp(x: float) -> float:
    """softplus in float64."""
    return math.log1p(math.exp(-abs(x))) + max(x, 0.0)


def s(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def one_pair(**options) -> float:
    """The loss of the hand-worked pair (r_w = 1, r_l = -1; refs -10, beta 0.5), in float64."""
    out = preference_loss(
        torch.tensor([-9.0], dtype=torch.float64),
        torch.tensor([-11.0], dtype=torch.float64),
        torch.tensor([-10.0], dtype=torch.float64),
        torch.tensor([-10.0], dtype=torch.float64),
        beta=options.pop("beta", 0.5),
        **options,
    )
    assert out.losses.dtype == torch.float64
    return out.losses.item()


HAND_WORKED = {
    "robust": ({"label_smoothing": 0.1}, (0.9 * sp(-1) - 0.1 * sp(1)) / 0.8),
    "exo_pair": (
        {"label_smoothing": 0.1},
        s(1) * (math.log(s(1)) - math.log(0.9)) + s(-1) * (math.log(s(-1)) - math.log(0.1)),
    ),
    "discopop": ({}, (1 - s(20)) * sp(-1) + s(20) * math.exp(-1)),
    "ipo": ({}, (2 - 1 / (2 * 0.5)) ** 2),
    "nca_pair": ({}, sp(-0.5) + 0.5 * sp(0.5) + 0.5 * sp(-0.5)),
    "bco_pair": ({}, 2 * sp(-0.5)),
    "sppo_hard": ({}, 0.0),
    "apo_zero": ({}, 2 * s(-0.5)),
    "apo_down": ({}, s(0.5) + 1 - s(1)),
    "kto": ({"kl_logratios": torch.tensor([-3.0, 1.0], dtype=torch.float64)[:1]}, s(-0.5)),
}


@pytest.mark.parametrize("loss", sorted(HAND_WORKED))
def test_hand_worked_pair(loss):
    options, expected = HAND_WORKED[loss]
    assert one_pair(loss=loss, **options) == pytest.approx(expected, rel=1e-12, abs=1e-14)


def test_hand_worked_numbers_in_the_docstring():
    # the docstring's decimals, so a reader can check them by hand
    assert (0.9 * sp(-1) - 0.1 * sp(1)) / 0.8 == pytest.approx(0.188262, abs=1e-6)
    assert HAND_WORKED["exo_pair"][1] == pytest.approx(0.114082, abs=1e-6)
    assert HAND_WORKED["apo_zero"][1] == pytest.approx(0.755081, abs=1e-6)
    assert HAND_WORKED["nca_pair"][1] == pytest.approx(1.198154, abs=1e-6)
    assert HAND_WORKED["apo_down"][1] == pytest.approx(0.891401, abs=1e-6)


def test_orpo_hand_worked():
    log_odds = 1 - (math.log(1 - math.exp(-1)) - math.log(1 - math.exp(-2)))
    assert log_odds == pytest.approx(1.313262, abs=1e-6)
    chosen = torch.tensor([-1.0], dtype=torch.float64)
    rejected = torch.tensor([-2.0], dtype=torch.float64)
    nll = torch.tensor([0.25], dtype=torch.float64)
    out = METHODS["orpo"](chosen, rejected, beta=0.5, policy_chosen_nll=nll)
    assert out.losses.item() == pytest.approx(0.25 + 0.5 * sp(-log_odds), rel=1e-12)
    assert 0.5 * sp(-log_odds) == pytest.approx(0.119092, abs=1e-6)
    # ORPO's rewards are beta times the (averaged) policy log-probs
    assert out.chosen_rewards.item() == pytest.approx(-0.5)


def test_odpo_offset_from_scores():
    scores = {
        "score_chosen": torch.tensor([5.0], dtype=torch.float64),
        "score_rejected": torch.tensor([2.0], dtype=torch.float64),
    }
    expected = sp(-(1 - math.log(3.0)))
    assert expected == pytest.approx(0.743668, abs=1e-6)
    assert one_pair(loss="logistic", odpo_alpha=1.0, **scores) == pytest.approx(expected)


def test_odpo_without_scores_names_the_columns():
    with pytest.raises(ValueError, match="score_chosen") as info:
        one_pair(loss="logistic", odpo_alpha=1.0)
    assert "score_rejected" in str(info.value)


def test_odpo_needs_chosen_score_above_rejected():
    scores = {"score_chosen": torch.tensor([2.0]).double(), "score_rejected": torch.tensor([2.0])}
    with pytest.raises(ValueError, match="batch positions \\[0\\]"):
        one_pair(loss="logistic", odpo_alpha=1.0, **scores)


def test_kto_without_mismatched_pairs_is_a_clear_error():
    with pytest.raises(ValueError, match="kl_logratios"):
        one_pair(loss="kto")


def test_kto_reference_point_is_clamped_batch_mean_and_detached():
    # mismatched log-ratios mean 2 -> z0 = 2: (1 - s(0.5 (1 - 2)) + 1 - s(0.5 (2 + 1))) / 2
    kl = torch.tensor([1.0, 3.0], dtype=torch.float64, requires_grad=True)
    pc = torch.tensor([-9.0, -9.0], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([-11.0, -11.0], dtype=torch.float64)
    refs = torch.full((2,), -10.0, dtype=torch.float64)
    out = preference_loss(pc, pr, refs, refs, loss="kto", beta=0.5, kl_logratios=kl)
    expected = (1 - s(-0.5) + 1 - s(1.5)) / 2
    assert out.losses[0].item() == pytest.approx(expected, rel=1e-12)
    out.losses.sum().backward()
    assert kl.grad is None  # the reference point is a constant of the step
    # a negative mean clamps to 0
    negative = preference_loss(pc, pr, refs, refs, loss="kto", beta=0.5, kl_logratios=-kl)
    assert negative.losses[0].item() == pytest.approx(s(-0.5), rel=1e-12)


def test_aot_sorts_over_the_batch():
    # policy gaps (pc - pr) = (3, -1), ref gaps = (0, 1): sorted (-1, 3) - (0, 1) = (-1, 2)
    pc = torch.tensor([0.0, -1.0], dtype=torch.float64)
    pr = torch.tensor([-3.0, 0.0], dtype=torch.float64)
    rc = torch.tensor([-1.0, 0.0], dtype=torch.float64)
    rr = torch.tensor([-1.0, -1.0], dtype=torch.float64)
    out = preference_loss(pc, pr, rc, rr, loss="aot", beta=1.0, label_smoothing=0.2)
    expected = [0.8 * sp(-d) + 0.2 * sp(d) for d in (-1.0, 2.0)]
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-12)
    # unpaired: r_w = (1, -1), r_l = (-2, 1): sorted (-1, 1) - (-2, 1) = (1, 0)
    out = preference_loss(pc, pr, rc, rr, loss="aot_unpaired", beta=1.0)
    assert out.losses.tolist() == pytest.approx([sp(-1.0), sp(0.0)], rel=1e-12)


def test_ipo_method_is_trl_ipo_not_squared():
    # beta 0.1 and averaged log-ratio gap h: IPO's optimum is h = 5, squared's is h = 10
    h = torch.tensor([5.0, 10.0], dtype=torch.float64)
    zeros = torch.zeros(2, dtype=torch.float64)
    ipo = METHODS["ipo"](h, zeros, zeros, zeros).losses
    squared = preference_loss(h, zeros, zeros, zeros, loss="squared", beta=0.1).losses
    assert ipo.tolist() == pytest.approx([0.0, 25.0])
    assert squared.tolist() == pytest.approx([0.25, 0.0])


# --------------------------------------------------------------------------- gradients


def per_side_terms(r_w: torch.Tensor, r_l: torch.Tensor) -> PairTerms:
    zeros = torch.zeros_like(r_w)
    kl = torch.zeros_like(r_w)
    return PairTerms(r_w, r_l, r_w, r_l, zeros, zeros, kl_logratios=kl)


# d loss / d r_w and d loss / d r_l by hand (b = beta, s = sigmoid, z0 = 0 for kto)
PER_SIDE_GRADIENTS = {
    "nca_pair": lambda w, l, b: (-b * s(-b * w) + 0.5 * b * s(b * w), 0.5 * b * s(b * l)),
    "bco_pair": lambda w, l, b: (-b * s(-b * w), b * s(b * l)),
    "sppo_hard": lambda w, l, b: (2 * (w - 0.5 / b), 2 * (l + 0.5 / b)),
    "apo_zero": lambda w, l, b: (-b * s(b * w) * s(-b * w), b * s(b * l) * s(-b * l)),
    "apo_down": lambda w, l, b: (
        b * s(b * w) * s(-b * w) - b * s(b * (w - l)) * s(-b * (w - l)),
        b * s(b * (w - l)) * s(-b * (w - l)),
    ),
    "kto": lambda w, l, b: (-0.5 * b * s(b * w) * s(-b * w), 0.5 * b * s(b * l) * s(-b * l)),
}


@pytest.mark.parametrize("loss", sorted(PER_SIDE_GRADIENTS))
def test_per_side_gradients_match_hand_derivatives(loss):
    beta = 0.7
    values = [(1.5, -0.5), (-2.0, 3.0), (0.0, 0.0), (4.0, 2.5)]
    r_w = torch.tensor([w for w, _ in values], dtype=torch.float64, requires_grad=True)
    r_l = torch.tensor([l for _, l in values], dtype=torch.float64, requires_grad=True)
    apply_pair_loss(loss, per_side_terms(r_w, r_l), beta=beta).sum().backward()
    for i, (w, l) in enumerate(values):
        grad_w, grad_l = PER_SIDE_GRADIENTS[loss](w, l, beta)
        assert r_w.grad[i].item() == pytest.approx(grad_w, rel=1e-10, abs=1e-12)
        assert r_l.grad[i].item() == pytest.approx(grad_l, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_every_margin_loss_gradient_matches_finite_differences(loss):
    # smooth points (no hinge kink at z = 1, no cap switch) in float64
    z = torch.tensor([-3.3, -0.7, 0.05, 0.45, 2.2, 6.1], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: apply_loss(loss, x), (z,))


@pytest.mark.parametrize("loss", sorted(PAIR_LOSSES))
def test_every_per_side_gradient_matches_finite_differences(loss):
    gen = torch.Generator().manual_seed(0)
    pc, pr, rc, rr, kl = (
        -(torch.rand(5, generator=gen, dtype=torch.float64) * 3 + 0.5) for _ in range(5)
    )
    pc.requires_grad_(True)
    pr.requires_grad_(True)

    def objective(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
        terms = PairTerms(chosen - rc, rejected - rr, chosen, rejected, rc, rr, kl_logratios=kl)
        return apply_pair_loss(loss, terms, beta=0.8)

    assert torch.autograd.gradcheck(objective, (pc, pr))


# --------------------------------------------------------------------------- the margin axis


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_every_margin_loss_crosses_with_balanced(loss):
    # balanced: z = beta min(r_w, -alpha r_l) = 0.5 * min(1, 0.3) = 0.15
    pc, pr, rc, rr = (torch.tensor([v], dtype=torch.float64) for v in (-9.0, -11.0, -10.0, -10.0))
    out = preference_loss(pc, pr, rc, rr, loss=loss, margin="balanced", beta=0.5, alpha=0.3)
    assert out.margins.item() == pytest.approx(0.15)
    expected = apply_loss(loss, torch.tensor([0.15], dtype=torch.float64), beta=0.5)
    assert out.losses.item() == pytest.approx(expected.item(), rel=1e-12)


@pytest.mark.parametrize("loss", sorted(PAIR_LOSSES))
def test_per_side_objectives_refuse_the_balanced_margin(loss, extra_inputs):
    inputs = [torch.tensor([-1.0, -2.0]) for _ in range(4)]
    with pytest.raises(ValueError, match="does not cross with margin='balanced'"):
        preference_loss(*inputs, loss=loss, margin="balanced", **extra_inputs(2))


@pytest.mark.parametrize("option", ["gamma", "dpop_lambda", "odpo_alpha"])
def test_per_side_objectives_refuse_margin_options(option):
    inputs = [torch.tensor([-1.0, -2.0]) for _ in range(4)]
    with pytest.raises(ValueError, match=option):
        preference_loss(*inputs, loss="nca_pair", **{option: 0.5})


@pytest.mark.parametrize("name", sorted(METHODS))
def test_methods_report_whether_they_cross(name):
    method = METHODS[name]
    assert method.crosses_margin == (method.loss in LOSSES)
    assert method.build().requirements.crosses_margin == method.crosses_margin


# --------------------------------------------------------------------------- precision


@pytest.mark.parametrize("name", sorted(METHODS))
def test_float64_inputs_stay_float64(name, extra_inputs):
    gen = torch.Generator().manual_seed(1)
    logps = [-(torch.rand(6, generator=gen, dtype=torch.float64) * 30 + 1) for _ in range(4)]
    logps[0].requires_grad_(True)
    extras = extra_inputs(6, torch.float64)
    out = METHODS[name](*logps, **extras)
    for tensor in (out.losses, out.chosen_rewards, out.rejected_rewards, out.margins):
        assert tensor.dtype == torch.float64
    if out.losses.requires_grad:  # (chosen_nll reads no log-prob gradient)
        out.losses.sum().backward()
        assert logps[0].grad.dtype == torch.float64
    # and float32 inputs give the same values to float32 rounding
    narrow = METHODS[name](*(x.detach().float() for x in logps), **extra_inputs(6))
    assert narrow.losses.dtype == torch.float32
    torch.testing.assert_close(narrow.losses.double(), out.losses.detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_inputs_computed_in_float32(dtype):
    logps = [torch.tensor([-3.0, -5.0], dtype=dtype) for _ in range(4)]
    out = preference_loss(*logps, loss="discopop")
    assert out.losses.dtype == torch.float32


# --------------------------------------------------------------------------- input transforms


@pytest.mark.parametrize(
    ("name", "options", "r", "expected"),
    [
        ("reverse_kl", {}, 0.7, 0.7),
        ("forward_kl", {}, math.log(2.0), 0.5),  # 1 - 1/t with t = 2
        ("js_divergence", {}, 0.0, 0.0),  # log(2t / (t + 1)) at t = 1
        ("js_divergence", {}, math.log(3.0), math.log(1.5)),  # log(6 / 4)
        ("alpha_divergence", {}, math.log(4.0), (4.0**-0.5 - 1) / -0.5),  # (t^(a-1) - 1)/(a - 1)
        ("alpha_divergence", {"f_alpha_divergence_coef": 1.0}, 0.7, 0.7),  # the KL limit
    ],
)
def test_f_divergence_transforms(name, options, r, expected):
    value = F_DIVERGENCES[name](torch.tensor(r, dtype=torch.float64), **options)
    assert value.item() == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("name", sorted(F_DIVERGENCES))
@pytest.mark.parametrize("loss", ["logistic", "nca_pair"])
def test_f_divergence_composes_with_any_objective(name, loss):
    # the objective sees g(r) instead of r; rewards stay beta * r (as TRL logs them)
    pc, pr, rc, rr = (torch.tensor([v], dtype=torch.float64) for v in (-9.0, -11.0, -10.0, -10.0))
    out = preference_loss(pc, pr, rc, rr, loss=loss, beta=0.5, f_divergence_type=name)
    g = F_DIVERGENCES[name]
    g_w, g_l = g(torch.tensor([1.0], dtype=torch.float64)), g(torch.tensor([-1.0]).double())
    plain = preference_loss(g_w, g_l, reference_free=True, loss=loss, beta=0.5)
    assert out.losses.item() == pytest.approx(plain.losses.item(), rel=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(0.5)


def test_ld_alpha_downweights_the_tail():
    # chosen: 10 tokens, logp -10 (tail past the rejected's 6 tokens: -4); rejected no tail
    tails = {
        "policy_chosen_tail_logps": torch.tensor([-4.0]).double(),
        "policy_rejected_tail_logps": torch.zeros(1).double(),
        "ref_chosen_tail_logps": torch.tensor([-5.0]).double(),
        "ref_rejected_tail_logps": torch.zeros(1).double(),
    }
    pc, pr, rc, rr = (torch.tensor([v], dtype=torch.float64) for v in (-10.0, -8.0, -12.0, -7.0))
    out = preference_loss(pc, pr, rc, rr, beta=0.5, ld_alpha=0.5, **tails)
    # shared + 0.5 tail: policy chosen -6 - 2 = -8, ref chosen -7 - 2.5 = -9.5 -> r_w = 1.5
    assert out.chosen_rewards.item() == pytest.approx(0.5 * 1.5)
    assert out.losses.item() == pytest.approx(sp(-0.5 * (1.5 - (-1.0))), rel=1e-12)
    with pytest.raises(ValueError, match="policy_chosen_tail_logps"):
        preference_loss(pc, pr, rc, rr, ld_alpha=0.5)


def test_use_weighting_multiplies_by_both_responses_weights():
    weights = {
        "chosen_weighting_logps": torch.tensor([-0.5]).double(),
        "rejected_weighting_logps": torch.tensor([-1.0]).double(),
    }
    plain = one_pair(loss="bco_pair")
    assert one_pair(loss="bco_pair", use_weighting=True, **weights) == pytest.approx(
        plain * math.exp(-1.5), rel=1e-12
    )
    with pytest.raises(ValueError, match="chosen_weighting_logps"):
        one_pair(use_weighting=True)
