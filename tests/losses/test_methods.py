"""Tests for losses.methods: each named method against its published formula.

The expected values are computed in float64 from the formulas as published (h = log-ratio
log pi(y|x) - log pi_ref(y|x)), written here independently of losses/:

    dpo        -log sigmoid(beta (h_w - h_l))                                  arXiv 2305.18290
    ipo        (h_w - h_l - 1/(2 beta))^2 on length-averaged h (tau = beta)       arXiv 2310.12036
    slic       max(0, 1 - beta (h_w - h_l))                                    arXiv 2305.10425
    bpo        max(0, 1 - beta min(h_w, -0.3 h_l))                             arXiv 2506.03557
    dpop       -log sigmoid(beta (h_w - h_l - 50 max(0, -h_w)))                arXiv 2402.13228
    cal_dpo    -log sigmoid(h_w - h_l) + (h_w - 1/(2b))^2 + (h_l + 1/(2b))^2   arXiv 2412.14516
    rpo        dpo + mean-token NLL of the chosen response                      arXiv 2404.19733
    simpo      -log sigmoid(beta avg_logp_w - beta avg_logp_l - gamma), no ref  arXiv 2405.14734
    cdpo       (1 - eps) (-log sigmoid(beta h)) + eps (-log sigmoid(-beta h))  cDPO note
    chosen_nll the chosen NLL only

Hand-worked pair for the batch below, first pair: h_w = -12 - (-13) = 1, h_l = -15 - (-14) = -1;
dpo with beta 0.1: -log sigmoid(0.2) = log(1 + e^-0.2) ~ 0.598139.
"""

from __future__ import annotations

import math

import pytest
import torch

from losses import PreferenceLoss
from losses.methods import METHODS, Method

# log-probs; h_w = (1, -1.5, 0.75, -5, -0.5, 3), h_l = (-1, -0.5, 0.5, 4, 0.5, -8)
POLICY_CHOSEN = [-12.0, -30.5, -7.25, -50.0, -3.0, -20.0]
POLICY_REJECTED = [-15.0, -28.0, -9.5, -40.0, -3.0, -30.0]
REF_CHOSEN = [-13.0, -29.0, -8.0, -45.0, -2.5, -23.0]
REF_REJECTED = [-14.0, -27.5, -10.0, -44.0, -3.5, -22.0]
CHOSEN_NLL = [0.4, 1.2, 0.3, 2.5, 0.1, 0.9]
H_W = [pc - rc for pc, rc in zip(POLICY_CHOSEN, REF_CHOSEN, strict=True)]
H_L = [pr - rr for pr, rr in zip(POLICY_REJECTED, REF_REJECTED, strict=True)]


def inputs():
    return [torch.tensor(v) for v in (POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED)]


def neg_logsigmoid(x: float) -> float:
    """-log sigmoid(x) = log(1 + e^-x), in float64."""
    return math.log1p(math.exp(-x)) if x > -30 else -x + math.log1p(math.exp(x))


@pytest.fixture
def run(extra_inputs):
    """``run(name, *args, **overrides)``: method ``name``'s per-pair losses on ``args`` (default:
    :func:`inputs`), with valid extra inputs and the chosen NLL of :data:`CHOSEN_NLL`."""

    def losses_of(name: str, *args, **overrides) -> list[float]:
        module = METHODS[name].build(**overrides)
        extras = extra_inputs(6)
        extras["policy_chosen_nll"] = torch.tensor(CHOSEN_NLL)
        out = module(*(args or inputs()), **extras)
        return out.losses.tolist()

    return losses_of


def assert_close(actual: list[float], expected: list[float]) -> None:
    assert actual == pytest.approx(expected, rel=1e-5, abs=1e-6)


def beta_of(name: str) -> float:
    return METHODS[name].options()["beta"]


# --------------------------------------------------------------------------- every method


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_builds_and_runs(name, extra_inputs):
    method = METHODS[name]
    assert isinstance(method, Method)
    assert method.name == name
    assert method.paper and method.formula and method.title
    module = method.build()
    assert isinstance(module, PreferenceLoss)
    pc, pr, rc, rr = inputs()
    pc.requires_grad_(True)
    extras = extra_inputs(6, grad=True)
    out = module(pc, pr, rc, rr, **extras)
    assert out.losses.shape == (6,)
    assert torch.isfinite(out.losses).all()
    out.losses.mean().backward()
    # the direct call gives the same values as the module
    direct = method(pc, pr, rc, rr, **extras)
    assert torch.equal(direct.losses, out.losses)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_finite_at_extreme_inputs(name, dtype, extra_inputs):
    # log-ratios of size 1e5 of both signs (refs 0), and huge log-probs with small log-ratios
    pc = torch.tensor([1e5, -1e5, -1e5, 1e5, -99_990.0], dtype=dtype, requires_grad=True)
    pr = torch.tensor([-1e5, 1e5, -1e5, 1e5, -99_000.0], dtype=dtype, requires_grad=True)
    refs = torch.tensor([0.0, 0.0, 0.0, 0.0, -1e5], dtype=dtype)
    nll = torch.tensor([1e5, 0.0, 3.0, 1e4, 2.0], dtype=dtype, requires_grad=True)
    extras = extra_inputs(5, dtype)
    extras["policy_chosen_nll"] = nll
    out = METHODS[name].build()(pc, pr, refs, refs, **extras)
    assert out.losses.dtype == torch.float32
    assert torch.isfinite(out.losses).all(), out.losses
    out.losses.sum().backward()
    for grad in (pc.grad, pr.grad, nll.grad):
        assert grad is None or torch.isfinite(grad).all()


def test_dpo(run):
    beta = beta_of("dpo")
    assert beta == 0.1
    expected = [neg_logsigmoid(beta * (w - l)) for w, l in zip(H_W, H_L, strict=True)]
    assert expected[0] == pytest.approx(math.log(1 + math.exp(-0.2)))  # the docstring's pair
    assert_close(run("dpo"), expected)


@pytest.mark.parametrize("beta", [0.05, 0.1, 1.0])
def test_ipo_is_the_length_averaged_published_loss(beta, run):
    # IPO Eq. 17 with tau = beta on length-averaged log-ratios (the trainer averages: here the
    # inputs are taken as already averaged): (h_w - h_l - 1/(2 beta))^2, optimum h = 5 at 0.1
    assert METHODS["ipo"].length_normalized
    expected = [(w - l - 1 / (2 * beta)) ** 2 for w, l in zip(H_W, H_L, strict=True)]
    assert_close(run("ipo", beta=beta), expected)


def test_squared_loss_keeps_the_gpo_form(run):
    # the GPO ablation's squared loss is (beta h - 1)^2, not IPO
    expected = [(0.1 * (w - l) - 1) ** 2 for w, l in zip(H_W, H_L, strict=True)]
    assert_close(run("dpo", loss="squared"), expected)


def test_slic_hinge(run):
    beta = beta_of("slic")
    expected = [max(0.0, 1 - beta * (w - l)) for w, l in zip(H_W, H_L, strict=True)]
    assert_close(run("slic"), expected)
    # and with a beta that puts some pairs past the hinge (zero loss)
    expected = [max(0.0, 1 - 0.6 * (w - l)) for w, l in zip(H_W, H_L, strict=True)]
    assert 0.0 in expected
    assert_close(run("slic", beta=0.6), expected)


def test_bpo_hinge_on_balanced_margin(run):
    beta = beta_of("bpo")
    expected = [max(0.0, 1 - beta * min(w, -0.3 * l)) for w, l in zip(H_W, H_L, strict=True)]
    assert_close(run("bpo"), expected)


def test_bpo_alpha_override(run):
    module = METHODS["bpo"].build(alpha=0.5)
    assert module.options["alpha"] == 0.5
    expected = [max(0.0, 1 - 0.1 * min(w, -0.5 * l)) for w, l in zip(H_W, H_L, strict=True)]
    assert_close(run("bpo", alpha=0.5), expected)
    with pytest.raises(ValueError, match="alpha"):
        METHODS["bpo"].build(alpha=2.0)


def test_dpop(run):
    beta = beta_of("dpop")
    expected = [
        neg_logsigmoid(beta * (w - l - 50.0 * max(0.0, -w))) for w, l in zip(H_W, H_L, strict=True)
    ]
    assert any(w < 0 for w in H_W)  # the penalty is active on some pairs
    assert_close(run("dpop"), expected)


def test_cal_dpo(run):
    beta = beta_of("cal_dpo")
    expected = [
        neg_logsigmoid(w - l) + (w - 1 / (2 * beta)) ** 2 + (l + 1 / (2 * beta)) ** 2
        for w, l in zip(H_W, H_L, strict=True)
    ]
    assert_close(run("cal_dpo"), expected)


def test_rpo_is_dpo_plus_chosen_nll(run):
    beta = beta_of("rpo")
    expected = [
        neg_logsigmoid(beta * (w - l)) + nll for w, l, nll in zip(H_W, H_L, CHOSEN_NLL, strict=True)
    ]
    assert_close(run("rpo"), expected)


# length-averaged log-probs for SimPO
AVG_CHOSEN = [-0.5, -1.2, -0.3, -2.0, -0.9, -0.05]
AVG_REJECTED = [-0.7, -1.0, -0.9, -1.5, -0.9, -3.0]


@pytest.mark.parametrize("with_refs", [True, False], ids=["refs-passed", "refs-none"])
def test_simpo_ignores_references(with_refs, run):
    options = METHODS["simpo"].options()
    beta, gamma = options["beta"], options["gamma"]
    assert gamma > 0
    assert METHODS["simpo"].length_normalized
    expected = [
        neg_logsigmoid(beta * w - beta * l - gamma)
        for w, l in zip(AVG_CHOSEN, AVG_REJECTED, strict=True)
    ]
    policy = [torch.tensor(AVG_CHOSEN), torch.tensor(AVG_REJECTED)]
    # references far from the policy: they would change every value if they were used
    refs = [torch.full((6,), -100.0), torch.full((6,), 7.0)] if with_refs else [None, None]
    assert_close(run("simpo", *policy, *refs), expected)


def test_cdpo(run):
    eps = METHODS["cdpo"].options()["label_smoothing"]
    assert 0 < eps < 0.5
    beta = beta_of("cdpo")
    expected = [
        (1 - eps) * neg_logsigmoid(beta * (w - l)) + eps * neg_logsigmoid(-beta * (w - l))
        for w, l in zip(H_W, H_L, strict=True)
    ]
    assert_close(run("cdpo"), expected)
    # override eps
    expected = [
        0.75 * neg_logsigmoid(0.1 * (w - l)) + 0.25 * neg_logsigmoid(-0.1 * (w - l))
        for w, l in zip(H_W, H_L, strict=True)
    ]
    assert_close(run("cdpo", label_smoothing=0.25, beta=0.1), expected)


@pytest.mark.parametrize("with_refs", [True, False], ids=["refs-passed", "refs-none"])
def test_chosen_nll_is_the_nll_only(with_refs, run):
    pc, pr, rc, rr = inputs()
    args = (pc, pr, rc, rr) if with_refs else (pc, pr, None, None)
    assert_close(run("chosen_nll", *args), CHOSEN_NLL)


def test_overrides_in_call_and_build(run):
    # beta 0.5 instead of dpo's 0.1
    expected = [neg_logsigmoid(0.5 * (w - l)) for w, l in zip(H_W, H_L, strict=True)]
    assert_close(run("dpo", beta=0.5), expected)
    direct = METHODS["dpo"](*inputs(), beta=0.5)
    assert_close(direct.losses.tolist(), expected)
    assert METHODS["dpo"].build(beta=0.5).beta == 0.5
    # an override of the loss itself: dpo's margin with the hinge is SLiC
    slic = [max(0.0, 1 - 0.1 * (w - l)) for w, l in zip(H_W, H_L, strict=True)]
    assert_close(run("dpo", loss="hinge"), slic)
    # the defaults themselves are not changed by an override
    assert METHODS["dpo"].options()["beta"] == 0.1
    assert METHODS["bpo"].options()["alpha"] == 0.3


def test_unknown_override_rejected():
    with pytest.raises(TypeError, match="valid options"):
        METHODS["dpo"].build(betta=0.2)


def test_published_defaults():
    assert METHODS["dpo"].loss == "logistic" and METHODS["dpo"].margin == "difference"
    assert METHODS["slic"].loss == "hinge"
    assert METHODS["ipo"].loss == "ipo"
    assert (METHODS["bpo"].loss, METHODS["bpo"].margin) == ("hinge", "balanced")
    assert METHODS["dpop"].options()["dpop_lambda"] == 50.0
    assert METHODS["simpo"].options()["reference_free"] is True
