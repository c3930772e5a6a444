"""Tests for losses.margins: the difference and balanced margins.

Hand-worked values:

    difference: r_w = 2, r_l = -1, beta = 0.1          -> z = 0.1 * (2 + 1) = 0.3
                r_w = -1, r_l = 0.5, beta = 2          -> z = 2 * (-1.5) = -3
    balanced:   r_w = 2, r_l = -1, alpha = 0.3, b 0.1  -> min(2, 0.3) = 0.3, z = 0.03 (rejected)
                r_w = -3, r_l = 2, alpha = 1, b 0.5    -> min(-3, -2) = -3, z = -1.5 (chosen)
                r_w = -1, r_l = 2, alpha = 1, b 0.5    -> min(-1, -2) = -2, z = -1.0 (rejected)
                r_w = 1, r_l = 4, alpha = 0.25, b 1    -> min(1, -1) = -1, z = -1.0 (rejected)
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from losses.margins import MARGINS, balanced, difference

F64 = torch.float64


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def test_registered():
    assert MARGINS["difference"] is difference
    assert MARGINS["balanced"] is balanced


@pytest.mark.parametrize(
    ("r_w", "r_l", "beta", "expected"), [(2.0, -1.0, 0.1, 0.3), (-1.0, 0.5, 2.0, -3.0)]
)
def test_difference_hand_worked(r_w, r_l, beta, expected):
    z = difference(t([r_w]), t([r_l]), beta)
    assert z.item() == pytest.approx(expected, rel=1e-12)


def test_difference_ignores_alpha():
    r_w, r_l = t([2.0, -3.0, 0.5]), t([-1.0, 4.0, 0.5])
    for alpha in (0.1, 0.3, 1.0):
        assert torch.equal(difference(r_w, r_l, 0.1, alpha), difference(r_w, r_l, 0.1))


@pytest.mark.parametrize(
    ("r_w", "r_l", "alpha", "beta", "expected"),
    [
        (2.0, -1.0, 0.3, 0.1, 0.03),
        (-3.0, 2.0, 1.0, 0.5, -1.5),
        (-1.0, 2.0, 1.0, 0.5, -1.0),
        (1.0, 4.0, 0.25, 1.0, -1.0),
    ],
)
def test_balanced_hand_worked(r_w, r_l, alpha, beta, expected):
    z = balanced(t([r_w]), t([r_l]), beta, alpha)
    assert z.item() == pytest.approx(expected, rel=1e-12)


def test_balanced_default_alpha_is_one():
    # min(1, -(-0.5)) = 0.5 with alpha = 1; it would be 0.15 with alpha = 0.3
    assert balanced(t([1.0]), t([-0.5]), 1.0).item() == pytest.approx(0.5)


def _grads(r_w: float, r_l: float, beta: float, alpha: float) -> tuple[float, float]:
    chosen = t([r_w]).requires_grad_(True)
    rejected = t([r_l]).requires_grad_(True)
    balanced(chosen, rejected, beta, alpha).sum().backward()
    return chosen.grad.item(), rejected.grad.item()


@pytest.mark.parametrize(
    ("r_w", "r_l", "alpha"),
    [(-3.0, 2.0, 1.0), (-1.0, -0.5, 0.3), (0.1, -1.0, 0.3), (-50.0, 10.0, 0.5)],
)
def test_balanced_chosen_branch_gets_all_gradient(r_w, r_l, alpha):
    assert r_w < -alpha * r_l  # chosen is the weaker side
    beta = 0.2
    assert _grads(r_w, r_l, beta, alpha) == pytest.approx((beta, 0.0))


@pytest.mark.parametrize(
    ("r_w", "r_l", "alpha"),
    [(2.0, -1.0, 0.3), (-1.0, 2.0, 1.0), (5.0, 1.0, 0.3), (0.0, 0.5, 1.0)],
)
def test_balanced_rejected_branch_gets_all_gradient(r_w, r_l, alpha):
    assert r_w > -alpha * r_l  # rejected is the weaker side
    beta = 0.2
    # dz/dr_l = -beta * alpha; the chosen side gets nothing
    assert _grads(r_w, r_l, beta, alpha) == pytest.approx((0.0, -beta * alpha))


@pytest.mark.parametrize(
    ("r_w", "r_l", "alpha"), [(1.0, -2.0, 0.5), (0.0, 0.0, 1.0), (-3.0, 3.0, 1.0)]
)
def test_balanced_tie_goes_to_chosen(r_w, r_l, alpha):
    assert r_w == -alpha * r_l  # exact in binary floating point
    beta = 0.2
    assert _grads(r_w, r_l, beta, alpha) == (pytest.approx(beta), 0.0)


def test_balanced_mixed_batch_routes_per_pair():
    r_w = t([-3.0, 2.0, 1.0]).requires_grad_(True)
    r_l = t([2.0, -1.0, -2.0]).requires_grad_(True)
    z = balanced(r_w, r_l, 0.5, 0.5)
    # min(-3, -1) = -3 (chosen); min(2, 0.5) = 0.5 (rejected); min(1, 1) = 1 (tie: chosen)
    torch.testing.assert_close(z, t([-1.5, 0.25, 0.5]))
    z.sum().backward()
    torch.testing.assert_close(r_w.grad, t([0.5, 0.0, 0.5]))
    torch.testing.assert_close(r_l.grad, t([0.0, -0.25, 0.0]))


@pytest.mark.parametrize("alpha", [0.1, 0.3, 0.5, 1.0])
def test_balanced_alpha_scales_the_rejected_side(alpha):
    # r_w = 100 is never the minimum here, so z = beta * (-alpha * r_l), linear in alpha
    r_w, r_l, beta = t([100.0, 100.0]), t([2.0, -4.0]), 0.5
    expected = t([-beta * alpha * 2.0, beta * alpha * 4.0])
    torch.testing.assert_close(balanced(r_w, r_l, beta, alpha), expected)


def test_balanced_alpha_does_not_touch_the_chosen_side():
    # r_w = -100 is always the minimum, so alpha has no effect
    r_w, r_l = t([-100.0]), t([2.0])
    values = {balanced(r_w, r_l, 0.5, alpha).item() for alpha in (0.1, 0.3, 1.0)}
    assert values == {-50.0}


@pytest.mark.parametrize("name", sorted(MARGINS))
def test_margin_shape_and_dtype(name):
    r_w = torch.randn(7, generator=torch.Generator().manual_seed(0))
    r_l = torch.randn(7, generator=torch.Generator().manual_seed(1))
    z = MARGINS[name](r_w, r_l, 0.1, 0.3)
    assert z.shape == (7,)
    assert z.dtype == torch.float32


finite = st.floats(min_value=-1e5, max_value=1e5, allow_nan=False, allow_infinity=False)
pairs = st.lists(st.tuples(finite, finite), min_size=1, max_size=8)
betas = st.floats(min_value=1e-3, max_value=10.0)
alphas = st.floats(min_value=1e-3, max_value=1.0)


@settings(max_examples=150, deadline=None)
@given(pairs=pairs, beta=betas, alpha=alphas)
def test_balanced_bounded_by_both_sides(pairs, beta, alpha):
    r_w = t([p[0] for p in pairs])
    r_l = t([p[1] for p in pairs])
    z = balanced(r_w, r_l, beta, alpha)
    chosen_bound = beta * r_w
    rejected_bound = -beta * alpha * r_l
    slack = 1e-12 * (chosen_bound.abs() + rejected_bound.abs()) + 1e-300
    assert torch.all(z <= chosen_bound + slack)
    assert torch.all(z <= rejected_bound + slack)
    # and it is one of the two: the minimum
    assert torch.all((z - torch.minimum(chosen_bound, rejected_bound)).abs() <= slack)


@settings(max_examples=150, deadline=None)
@given(pairs=pairs, beta=betas, alpha=alphas)
def test_difference_antisymmetric(pairs, beta, alpha):
    r_w = t([p[0] for p in pairs])
    r_l = t([p[1] for p in pairs])
    assert torch.equal(difference(r_w, r_l, beta, alpha), -difference(r_l, r_w, beta, alpha))
    expected = beta * (r_w - r_l)
    torch.testing.assert_close(difference(r_w, r_l, beta, alpha), expected, rtol=1e-12, atol=0)
