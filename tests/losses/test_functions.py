"""Tests for losses.functions: the six GPO losses f(z).

Hand-worked values (the arithmetic the tests check):

    logistic(0)  = log(1 + e^0)  = log 2                 ~ 0.693147
    logistic(2)  = log(1 + e^-2)                          ~ 0.126928
    logistic(-1) = log(1 + e)                             ~ 1.313262
    hinge(0.5) = 1 - 0.5 = 0.5; hinge(2) = max(0, -1) = 0; hinge(-3) = 1 + 3 = 4
    squared(0) = 1; squared(1) = 0; squared(3) = 2^2 = 4; squared(-1) = (-2)^2 = 4
    exponential(0) = 1; exponential(1) = e^-1 ~ 0.367879; exponential(-2) = e^2 ~ 7.389056
    exponential(-40) = e^30 * (1 + (40 - 30)) = 11 e^30   (tangent line at -EXP_CAP = -30)
    truncated_quadratic(-1) = 2^2 = 4; (0.5) = 0.5^2 = 0.25; (2) = 0; (0) = 1
    savage(0) = (1/2)^2 = 0.25; savage(ln 3) = (1/(1+3))^2 = 1/16; savage(-ln 3) = (3/4)^2 = 9/16
"""

from __future__ import annotations

import math

import pytest
import torch

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

HAND_WORKED = [
    (logistic, 0.0, math.log(2.0)),
    (logistic, 2.0, math.log(1.0 + math.exp(-2.0))),
    (logistic, -1.0, math.log(1.0 + math.e)),
    (hinge, 0.5, 0.5),
    (hinge, 2.0, 0.0),
    (hinge, -3.0, 4.0),
    (squared, 0.0, 1.0),
    (squared, 1.0, 0.0),
    (squared, 3.0, 4.0),
    (squared, -1.0, 4.0),
    (exponential, 0.0, 1.0),
    (exponential, 1.0, math.exp(-1.0)),
    (exponential, -2.0, math.exp(2.0)),
    (exponential, -40.0, 11.0 * math.exp(30.0)),
    (truncated_quadratic, -1.0, 4.0),
    (truncated_quadratic, 0.5, 0.25),
    (truncated_quadratic, 2.0, 0.0),
    (truncated_quadratic, 0.0, 1.0),
    (savage, 0.0, 0.25),
    (savage, math.log(3.0), 1.0 / 16.0),
    (savage, -math.log(3.0), 9.0 / 16.0),
]

# a float64 grid over [-20, 20]; 400 points spaced 40/399 apart, so no point lands on a kink
# (hinge and truncated_quadratic at z = 1) -- checked in the test
GRID = torch.linspace(-20.0, 20.0, 400, dtype=torch.float64)

EXTREME_Z = [1e5, -1e5, 1e4, -1e4, 88.0, -88.0, 20.0, -20.0, 0.0]

# losses known to be convex on the whole line; savage is bounded, so it cannot be (see below)
CONVEX = ["logistic", "hinge", "squared", "exponential", "truncated_quadratic"]


def test_six_losses_registered_under_their_names():
    expected = {
        "logistic": logistic,
        "hinge": hinge,
        "squared": squared,
        "exponential": exponential,
        "truncated_quadratic": truncated_quadratic,
        "savage": savage,
    }
    for name, fn in expected.items():
        assert LOSSES[name] is fn


@pytest.mark.parametrize(
    ("fn", "z", "expected"), HAND_WORKED, ids=[f"{f.__name__}({z:g})" for f, z, _ in HAND_WORKED]
)
def test_hand_worked_values(fn, z, expected):
    value = fn(torch.tensor(z, dtype=torch.float64))
    assert value.item() == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_elementwise_shape_and_dtype(name):
    z = torch.linspace(-3, 3, 12).reshape(3, 4)
    out = LOSSES[name](z)
    assert out.shape == (3, 4)
    assert out.dtype == torch.float32
    for i in range(3):
        for j in range(4):
            assert out[i, j].item() == pytest.approx(LOSSES[name](z[i, j]).item(), rel=1e-6)


@pytest.mark.parametrize(
    "name", ["logistic", "hinge", "squared", "exponential", "truncated_quadratic", "savage"]
)
def test_gradient_matches_hand_derivative_on_grid(name, loss_derivatives):
    assert not torch.any(GRID == 1.0)
    z = GRID.clone().requires_grad_(True)
    LOSSES[name](z).sum().backward()
    expected = loss_derivatives[name](GRID)
    torch.testing.assert_close(z.grad, expected, rtol=1e-10, atol=1e-12)


def test_exponential_cap_covers_exact_range():
    # the formulas must be exact for |z| <= 20 (DESIGN.md), so the switch must lie beyond
    assert EXP_CAP >= 20
    z = torch.tensor([-20.0, -EXP_CAP], dtype=torch.float64)
    torch.testing.assert_close(exponential(z), torch.exp(-z), rtol=1e-14, atol=0)


def test_exponential_linear_continuation_below_cap():
    cap = EXP_CAP
    slope = -math.exp(cap)
    # value continuous at the cap: the line starts at exp(cap)
    below = torch.tensor([-cap - 1e-9, -cap - 1.0, -cap - 10.0, -1e4, -1e5], dtype=torch.float64)
    expected = math.exp(cap) + slope * (below - (-cap))  # tangent line at -cap
    torch.testing.assert_close(exponential(below), expected, rtol=1e-12, atol=0)
    at_cap = exponential(torch.tensor(-cap, dtype=torch.float64)).item()
    assert at_cap == pytest.approx(math.exp(cap), rel=1e-14)
    just_below = exponential(torch.tensor(-cap - 1e-6, dtype=torch.float64)).item()
    assert just_below == pytest.approx(math.exp(cap) * (1 + 1e-6), rel=1e-12)

    # slope: -exp(cap) below the cap, continuous across it, never zero
    z = torch.tensor(
        [-cap + 1e-6, -cap, -cap - 1e-6, -cap - 5.0, -1e3, -1e5], dtype=torch.float64
    ).requires_grad_(True)
    exponential(z).sum().backward()
    torch.testing.assert_close(z.grad, torch.full_like(z, slope), rtol=1e-5, atol=0)
    assert torch.all(z.grad != 0)


def test_exponential_decreasing_and_convex_across_cap():
    z = torch.linspace(-60.0, 0.0, 601, dtype=torch.float64)
    values = exponential(z)
    assert torch.all(values[1:] < values[:-1])
    # second differences >= 0 (convex), with a tolerance scaled to the values (~1e13)
    second = values[2:] - 2 * values[1:-1] + values[:-2]
    assert torch.all(second >= -1e-9 * values[1:-1])


def _midpoint_gaps(fn, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(f(a) + f(b)) / 2 - f((a + b) / 2): >= 0 everywhere for a convex f."""
    return (fn(a) + fn(b)) / 2 - fn((a + b) / 2)


@pytest.mark.parametrize("name", CONVEX)
def test_convexity_spot_checks(name):
    generator = torch.Generator().manual_seed(0)
    a = torch.empty(2000, dtype=torch.float64).uniform_(-20, 20, generator=generator)
    b = torch.empty(2000, dtype=torch.float64).uniform_(-20, 20, generator=generator)
    gaps = _midpoint_gaps(LOSSES[name], a, b)
    scale = LOSSES[name](a).abs() + LOSSES[name](b).abs() + 1.0
    assert torch.all(gaps >= -1e-12 * scale)
    # a strictly convex spot (except flat parts of hinge): -2 and 0.5
    strict = _midpoint_gaps(
        LOSSES[name],
        torch.tensor([-2.0], dtype=torch.float64),
        torch.tensor([0.5], dtype=torch.float64),
    )
    if name != "hinge":
        assert strict.item() > 0


def test_savage_convex_only_above_minus_ln2():
    """f'' = 2 s(-z)^2 s(z) (2 - 3 s(-z)): >= 0 iff s(-z) <= 2/3 iff z >= -ln 2.

    A bounded function cannot be convex on the whole line, so check both sides of -ln 2.
    """
    a = torch.tensor([-math.log(2.0), 0.0, 1.0, 5.0], dtype=torch.float64)
    b = torch.tensor([3.0, 10.0, 2.0, 20.0], dtype=torch.float64)
    assert torch.all(_midpoint_gaps(savage, a, b) >= 0)
    concave = _midpoint_gaps(
        savage,
        torch.tensor([-10.0], dtype=torch.float64),
        torch.tensor([-4.0], dtype=torch.float64),
    )
    assert concave.item() < 0


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_decreasing_near_zero(name):
    # every loss prefers a larger margin around z = 0 (squared only below its minimum at 1)
    z = torch.tensor([-1.0, -0.5, 0.0, 0.5], dtype=torch.float64)
    values = LOSSES[name](z)
    assert torch.all(values[1:] < values[:-1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_finite_values_and_gradients_at_extremes(name, dtype):
    z = torch.tensor(EXTREME_Z, dtype=dtype, requires_grad=True)
    out = LOSSES[name](z)
    assert out.dtype == dtype
    assert torch.isfinite(out).all(), out
    out.sum().backward()
    assert torch.isfinite(z.grad).all(), z.grad


def _gradient_cases():
    for name in sorted(LOSSES):
        for dtype, dtype_id in [(torch.float32, "f32"), (torch.bfloat16, "bf16")]:
            yield pytest.param(name, dtype, id=f"{name}-{dtype_id}")


@pytest.mark.parametrize(("name", "dtype"), _gradient_cases())
def test_low_precision_gradients_match_hand_derivative(name, dtype, loss_derivatives):
    """In float32 and bfloat16 the gradient is the true derivative wherever |f'| > 1e-4.

    So a gradient is never silently zero (or badly off) where the math says it is not; checked
    on a grid over [-100, 100] plus the extreme points up to |z| = 1e5.
    """
    if name not in loss_derivatives:
        pytest.skip(f"no hand-derived derivative for {name!r} in conftest.py")
    grid = torch.cat([torch.tensor(EXTREME_Z), torch.linspace(-100, 100, 2001)])
    z = grid.to(dtype).requires_grad_(True)
    LOSSES[name](z).sum().backward()
    exact = loss_derivatives[name](z.detach().double())
    actual = z.grad.double()
    assert torch.isfinite(actual).all()
    significant = exact.abs() > 1e-4
    # float32: 1e-3 leaves room for savage's s (1 - s) with s near 1 (6e-4 at z = -9)
    rtol = 1e-3 if dtype == torch.float32 else 2e-2
    relative = (actual - exact).abs() / exact.abs()
    worst = relative[significant].argmax()
    assert relative[significant].max() <= rtol, (
        f"z = {z[significant][worst].item()}: grad {actual[significant][worst].item()}, "
        f"expected {exact[significant][worst].item()}"
    )
    # where the true derivative is tiny the gradient is tiny too
    assert torch.all((actual - exact).abs()[~significant] <= 1e-4)
